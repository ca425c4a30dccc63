"""conf/dataset/*: every text dataset through the real `datasets` loading code, offline. Local files of
each format stand in for the hub (jsonl, jsonl.gz, parquet, csv, txt), hub yamls read a local mirror
directory through the same ``load_dataset(hf_id, ...)`` call, streaming stops at the token budget,
and a full job runs with ``dataset=local dataset.data_files=[...]`` through the CLI."""

from __future__ import annotations

import gzip
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network in tests

import pytest
import torch

from helpers.cli import run_cli
from helpers.config import compose_config
from helpers.mlflow_store import store_runs
from helpers.models import build_family_dir
from sae_sweep import config as C
from sae_sweep.config import ModelConfig
from sae_sweep.data.text import DatasetUnavailable, check_dataset_available, dataset_fingerprint, token_windows
from sae_sweep.job.app import validate_point
from sae_sweep.models.lm import load_lm

CTX = 32


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, corpus):
    """A Llama-style model whose tokenizer adds BOS itself: windows must still hold one BOS."""
    return build_family_dir("llama", tmp_path_factory.mktemp("ds_models"), corpus[:400])


@pytest.fixture(scope="module")
def lm(llama_dir, tmp_path_factory):
    return load_lm(
        ModelConfig(name="llama-rand", hf_id=str(llama_dir), dtype="float32"),
        tmp_path_factory.mktemp("lm_cache"),
        "cpu",
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory, corpus):
    """The same 600 documents in every format (txt: one document per line, so newlines are folded)."""
    import pandas as pd

    docs = [" ".join(d.split()) for d in corpus[400:1000]]
    root = tmp_path_factory.mktemp("data")
    out = {}
    out["jsonl"] = root / "docs.jsonl"
    out["jsonl"].write_text("".join(json.dumps({"text": d, "meta": i}) + "\n" for i, d in enumerate(docs)))
    out["jsonl.gz"] = root / "docs.jsonl.gz"
    out["jsonl.gz"].write_bytes(gzip.compress(out["jsonl"].read_bytes()))
    out["parquet"] = root / "docs.parquet"
    pd.DataFrame({"text": docs}).to_parquet(out["parquet"])
    out["csv"] = root / "docs.csv"
    pd.DataFrame({"id": range(len(docs)), "text": docs}).to_csv(out["csv"], index=False)
    out["txt"] = root / "docs.txt"
    out["txt"].write_text("\n".join(docs) + "\n")
    return out


def _windows(cfg, lm, cache, split="train", n=CTX * 60):
    w = token_windows(cfg.dataset, lm, split, n, cache)
    assert w.shape == (n // CTX, CTX)
    assert ((w == lm.bos_token_id).sum(dim=1) == 1).all() and (w[:, 0] == lm.bos_token_id).all()
    return w


@pytest.mark.integration
def test_local_files_of_every_format_give_the_same_windows(lm, files, tmp_path):
    results = {}
    for fmt, path in files.items():
        cfg = compose_config(
            "dataset=local",
            f"dataset.data_files=[{path}]",
            f"dataset.context_size={CTX}",
            f"dataset.eval_tokens={CTX * 8}",
        )  # what this corpus's held-out split can give
        validate_point(cfg)  # the job's own validation, including check_dataset_available
        results[fmt] = (_windows(cfg, lm, tmp_path), _windows(cfg, lm, tmp_path, "eval", CTX * 8))
        assert dataset_fingerprint(cfg.dataset, lm)["kind"] == "local"
    for fmt in files:
        assert torch.equal(results[fmt][0], results["jsonl"][0]), fmt
        assert torch.equal(results[fmt][1], results["jsonl"][1]), fmt
    assert not (set(map(tuple, results["jsonl"][0].tolist())) & set(map(tuple, results["jsonl"][1].tolist())))


@pytest.mark.unit
def test_local_yaml_requires_data_files_and_checks_them(files, tmp_path):
    with pytest.raises(C.ConfigError, match="dataset.data_files is required"):
        validate_point(compose_config("dataset=local"))
    with pytest.raises(C.ConfigError, match="no such file"):
        validate_point(compose_config("dataset=local", f"dataset.data_files=[{tmp_path / 'missing.jsonl'}]"))
    bad = tmp_path / "docs.xlsx"
    bad.write_text("x")
    with pytest.raises(C.ConfigError, match="unsupported extension"):
        validate_point(compose_config("dataset=local", f"dataset.data_files=[{bad}]"))


@pytest.mark.integration
def test_streaming_stops_at_the_token_budget(lm, files, tmp_path):
    """The second file is not JSON at all: reading it would fail, so the budget was met before it."""
    junk = tmp_path / "zz_junk.jsonl"
    junk.write_text("this is not json\n" * 100)
    cfg = compose_config(
        "dataset=local", f"dataset.data_files=[{files['jsonl']},{junk}]", f"dataset.context_size={CTX}"
    )
    w = _windows(cfg, lm, tmp_path)
    assert torch.equal(
        w,
        token_windows(
            compose_config(
                "dataset=local", f"dataset.data_files=[{files['jsonl']}]", f"dataset.context_size={CTX}"
            ).dataset,
            lm,
            "train",
            CTX * 60,
            tmp_path / "other",
        ),
    )
    # Asking for more than the first file holds reaches the junk, which the json reader rejects.
    with pytest.raises(Exception):  # noqa: B017 -- the datasets library's error, whose type varies by version
        token_windows(cfg.dataset, lm, "train", 10_000_000, tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize(
    "name, fmt", [("fineweb", "parquet"), ("pile-uncopyrighted", "jsonl.gz"), ("openwebtext", "parquet")]
)
def test_hub_yaml_reads_a_local_mirror_of_the_dataset(lm, files, tmp_path, name, fmt):
    """dataset.hf_id=<directory with the dataset's files>: the hub code path, no network."""
    mirror = tmp_path / name / "data"
    mirror.mkdir(parents=True)
    (mirror / f"train-00000-of-00001.{fmt}").write_bytes(files[fmt].read_bytes())
    cfg = compose_config(
        f"dataset={name}", f"dataset.hf_id={mirror.parent}", "dataset.hf_config=null", f"dataset.context_size={CTX}"
    )
    assert cfg.dataset.kind == "hub"
    validate_point(cfg)
    w = _windows(cfg, lm, tmp_path)
    local = compose_config("dataset=local", f"dataset.data_files=[{files[fmt]}]", f"dataset.context_size={CTX}")
    assert torch.equal(w, token_windows(local.dataset, lm, "train", CTX * 60, tmp_path))
    fp = dataset_fingerprint(cfg.dataset, lm)
    assert fp["kind"] == "hub" and fp["data_files"] == dataset_fingerprint(local.dataset, lm)["data_files"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetUnavailable, match="without data files"):
        check_dataset_available(compose_config(f"dataset={name}", f"dataset.hf_id={empty}").dataset)


@pytest.mark.unit
@pytest.mark.parametrize(
    "name, hf_id",
    [
        ("fineweb", "HuggingFaceFW/fineweb"),
        ("pile-uncopyrighted", "monology/pile-uncopyrighted"),
        ("openwebtext", "Skylion007/openwebtext"),
    ],
)
def test_hub_yaml_offline_fails_fast_with_the_local_alternative(name, hf_id, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(C.ConfigError) as err:
        validate_point(compose_config(f"dataset={name}"))
    msg = str(err.value)
    assert hf_id in msg and "dataset=local dataset.data_files=[" in msg


@pytest.mark.integration
@pytest.mark.slow
def test_full_job_on_local_files(llama_dir, files, tmp_path):
    out = tmp_path / "out"
    args = [
        "model=llama-3.2-1b",
        f"model.hf_id={llama_dir}",
        "layer=1",
        "dataset=local",
        f"dataset.data_files=[{files['parquet']}]",
        f"dataset.context_size={CTX}",
        "dataset.tokens=8192",
        "dataset.eval_tokens=512",
        "train.tokens=2560",
        "trainer.batch_size=256",
        "sae.expansion_factor=4",
        "sae.k=8",
        "eval=core_only",
        "sweep.name=datasets",
    ]
    r = run_cli(out, *args, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    (run,) = store_runs(out, "datasets")
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset"] == "local"
    assert json.loads(run.data.params["dataset.data_files"]) == [str(files["parquet"])]
    assert run.data.metrics["core/reconstruction_quality/explained_variance"] > 0
    assert "_local_32_10" in run.info.run_name
