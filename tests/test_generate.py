"""The faithful dataset generated ahead of training, in shards (`python -m sae_sweep.generate`,
launchers/generate.sbatch): shards write disjoint chunks that together are the text one process
writes, training then reads them without generating, and a SLURM array does it on the real cluster."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers.cli import cli_env
from sae_sweep.config import GenerationConfig
from sae_sweep.data.faithful import chunks_needed, generate_shard
from sae_sweep.data.text import generations, token_windows

SAMPLER = GenerationConfig().sampler  # the manifest records the sampler the settings left at its default

GEN = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9, "repetition_penalty": 1.1, "batch_size": 8, "seed": 5}
DATASET = {"name": "faithful", "kind": "faithful", "context_size": 32, "generation": GEN}
REPO = Path(__file__).resolve().parent.parent


def _chunks(root: Path):
    return {p.name: p.stat().st_mtime_ns for p in root.glob("chunk_*.npz")}


@pytest.mark.integration
def test_shards_write_disjoint_chunks_that_together_are_one_processs_text(tiny_lm, tmp_path):
    sharded = generations(DATASET, tiny_lm, tmp_path / "sharded")
    first = generate_shard(sharded, 0, 2, train_tokens=1500, eval_tokens=200)
    assert sharded.present() == list(range(0, 2 * first["chunks_seen"], 2))  # only its own residue class
    second = generate_shard(sharded, 1, 2, train_tokens=1500, eval_tokens=200)
    needed = min(first["chunks_needed"], second["chunks_needed"])
    assert set(range(needed)) <= set(sharded.present())
    assert first["chunks_generated"] == first["chunks_seen"] and first["tokens_per_s"] > 0

    alone = generations(DATASET, tiny_lm, tmp_path / "alone")
    generate_shard(alone, 0, 1, train_tokens=1500, eval_tokens=200)
    assert set(alone.present()) <= set(sharded.present())
    for i in alone.present():  # chunk i is the same text whoever wrote it
        with np.load(alone.path(i)) as a, np.load(sharded.path(i)) as b:
            assert np.array_equal(a["tokens"], b["tokens"]) and np.array_equal(a["lengths"], b["lengths"])

    # A second pass over the same shard finds everything on disk and generates nothing.
    assert generate_shard(sharded, 0, 2, train_tokens=1500, eval_tokens=200)["chunks_generated"] == 0
    # Training reads the pre-generated chunks: nothing is generated or rewritten. The reads stay well
    # inside what the shards were sized for: ~15 eval documents of <= 16 tokens (each document goes
    # to eval with probability 10 %) hold ~200 tokens give or take ~60, so reading 100 eval tokens
    # (4 windows: 124 stream tokens) fell short for some random streams; one window (31) is ~3 sd inside.
    before = _chunks(sharded.root)
    token_windows(DATASET, tiny_lm, "train", 1000, tmp_path / "sharded")
    token_windows(DATASET, tiny_lm, "eval", 32, tmp_path / "sharded")
    assert _chunks(sharded.root) == before
    manifest = json.loads((sharded.root / "manifest.json").read_text())
    assert manifest["chunks"] == len(before) and manifest["generation"] == {**GEN, "sampler": SAMPLER}


@pytest.mark.unit
def test_chunks_needed_covers_both_splits():
    # 10 % of documents go to eval: 900 train tokens need 1000 tokens; 200 eval tokens need 2000.
    assert chunks_needed(900, 10, tokens_per_chunk=100, margin=1.0) == 10
    assert chunks_needed(900, 200, tokens_per_chunk=100, margin=1.0) == 20
    assert chunks_needed(1, 1, tokens_per_chunk=1e9) == 1


def _generate(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "sae_sweep.generate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env=cli_env(),
    )


CLI = [
    "dataset.generation.batch_size=8",
    "dataset.generation.max_new_tokens=16",
    "dataset.generation.seed=77",
    "train.tokens=3000",
    "train.epochs=1",
    "dataset.eval_tokens=256",
]


@pytest.mark.integration
def test_cli_generates_its_shard_and_refuses_bad_input_naming_the_key(tmp_path):
    r = _generate("--shard", "1", "--shards", "2", *CLI, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads(r.stdout[r.stdout.index("{") :])
    assert record["shard"] == 1 and record["shards"] == 2 and record["train_tokens"] == 3150  # + 5 %
    (root,) = [
        p
        for p in (Path(os.environ["SAE_SWEEP_CACHE"]) / "faithful").glob("tiny-*")
        if (p / "shards" / "shard-1-of-2.json").exists()
        and json.loads((p / "manifest.json").read_text())["generation"]["seed"] == 77
    ]
    assert all(int(p.stem.split("_")[1]) % 2 == 1 for p in root.glob("chunk_*.npz"))  # shard 1's chunks only

    bad = _generate("--shard", "2", "--shards", "2", *CLI, cwd=tmp_path)
    assert bad.returncode == 2 and "--shard=2: allowed values are 0 .. 1" in bad.stderr
    bad = _generate("dataset=builtin", *CLI, cwd=tmp_path)
    assert bad.returncode == 2 and "only dataset.kind=faithful is generated" in bad.stderr
    bad = _generate("dataset.generation.top_pp=0.5", cwd=tmp_path)
    assert bad.returncode == 2 and "top_pp" in bad.stderr and "top_p" in bad.stderr


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
@pytest.mark.skipif(
    shutil.which("sbatch") is None and os.environ.get("CI", "").lower() != "true",
    reason="SLURM not installed (`sbatch` not on PATH): run .ci/install_slurm.sh",
)
def test_a_slurm_array_generates_the_dataset_in_shards(tmp_path):
    """launchers/generate.sbatch as a 2-task array on the real cluster: each task writes its half."""
    r = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--array=0-1",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            "--mem=2G",
            f"--chdir={tmp_path}",
            "--export=ALL,HF_HUB_OFFLINE=1",
            str(REPO / "launchers" / "generate.sbatch"),
            *CLI[:2],
            "dataset.generation.seed=78",
            *CLI[3:],
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    logs = {p.name: p.read_text() for p in tmp_path.glob("sae_sweep_generate-*.out")}
    assert r.returncode == 0, (r.stderr, logs)
    assert len(logs) == 2
    records = [json.loads(text[text.index("{") :]) for text in logs.values()]
    assert sorted((x["shard"], x["shards"]) for x in records) == [(0, 2), (1, 2)]
    assert all(x["slurm_job_id"] and x["chunks_generated"] >= 1 for x in records)
