"""Nothing lost, nothing silently wrong: each case a hostile user found, reproduced as it was found.

Corrupted caches, token windows and checkpoints are detected, set aside and rebuilt (and the run
says so); concurrent starts neither corrupt the store nor train a point twice; bad input is refused
before any work with the real reason. Real MLflow stores, real CLI processes, planted-dictionary
or tiny-model data.
"""

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.cli import cli_argv, cli_env, run_cli
from helpers.config import compose_config
from helpers.mlflow_store import store_client, store_runs
from sae_sweep.activations.cache import ActivationCache, get_or_build
from sae_sweep.training.loop import CheckpointUnreadable, Interrupted, load_checkpoint, train
from sae_sweep.util.locks import OwnedLock

SYNTH = [
    "dataset=synthetic",
    "dataset.tokens=16384",
    "dataset.eval_tokens=2048",
    "train.tokens=16384",
    "trainer.batch_size=512",
    "sae.d_sae=128",
    "sae.k=4",
    "eval=core_only",
    "sweep.name=rel",
]


def _jobs(out: Path):
    return store_runs(out, "rel", "job")


# -- corrupted files are detected, set aside, rebuilt, and the run says so ---------------------------


def _small_cache(root, seed=0):
    def build():
        g = torch.Generator().manual_seed(seed)
        yield torch.ones(64, 16, dtype=torch.long), torch.randn(64, 16, 8, generator=g)

    return get_or_build({"test": "corrupt", "seed": seed}, root, build, special_token_ids=[])


@pytest.mark.unit
def test_overwritten_cache_rows_are_detected_quarantined_and_rebuilt(tmp_path):
    cache, built = _small_cache(tmp_path)
    assert built and cache.replaced is None
    shard = cache.path / "acts-00000.npy"
    original = np.load(shard).copy()
    with open(shard, "r+b") as fh:  # 26% of the rows after the header, as in the report
        np.lib.format.read_magic(fh)
        np.lib.format.read_array_header_1_0(fh)
        fh.write(np.full(int(0.26 * original.size), 7.0, dtype=np.float32).tobytes())
    again, built = _small_cache(tmp_path)
    assert built, "a corrupt cache must not be reused"
    assert "checksum mismatch in acts-00000.npy" in again.replaced
    np.testing.assert_array_equal(np.load(again.path / "acts-00000.npy"), original)
    (kept,) = (tmp_path / "activations" / "quarantine").iterdir()
    assert "checksum mismatch" in (kept / "reason.txt").read_text()
    # unchanged files are trusted on their stat: the next open hashes nothing and reuses
    third, built = _small_cache(tmp_path)
    assert not built and third.replaced is None


@pytest.mark.unit
def test_full_verification_on_demand_catches_a_change_that_kept_size_and_mtime(tmp_path):
    cache, _ = _small_cache(tmp_path, seed=1)
    shard = cache.path / "acts-00000.npy"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-4:] = np.float32(np.nan).tobytes()
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # a sneaky edit: same size, same mtime
    ActivationCache.open(cache.path, verify="changed")  # stat-level check cannot see it (inode same)
    with pytest.raises(Exception, match="checksum mismatch"):
        ActivationCache.open(cache.path, verify="full")


@pytest.mark.integration
def test_nan_in_a_batch_blames_the_cache_not_the_sae(tmp_path):
    """NaN bytes written so that size and mtime still match: the stat check passes, training hits
    the NaN at step 1, and the job says the cache is bad and quarantines it -- the next run
    rebuilds it and finishes, tagged with why."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert run_cli(out, *SYNTH, "seed=1", cache=cache).returncode == 0
    (shard,) = (cache / "activations").glob("*/acts-00000.npy")
    st = shard.stat()
    arr = np.load(shard, mmap_mode="r+")
    arr[:] = np.nan  # every row: the first batch surely holds one
    arr.flush()
    del arr
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    bad = run_cli(out, *SYNTH, "seed=2", cache=cache)
    assert bad.returncode != 0
    failed = [r for r in _jobs(out) if r.data.tags["seed"] == "2"]
    assert failed[0].info.status == "FAILED"
    assert "holds NaN/inf values" in failed[0].data.tags["error"] and "quarantine" in failed[0].data.tags["error"]
    good = run_cli(out, *SYNTH, "seed=2", cache=cache)
    assert good.returncode == 0, good.stderr[-3000:]
    run = [r for r in _jobs(out) if r.data.tags["seed"] == "2"][0]
    assert run.info.status == "FINISHED" and run.data.tags["cache_built"] == "true"


@pytest.mark.integration
def test_corrupt_token_windows_are_rebuilt_and_reported(tiny_lm, tmp_path):
    from sae_sweep.data import text
    from sae_sweep.data.text import token_windows

    cfg = {"name": "builtin", "kind": "builtin", "context_size": 32}
    first = token_windows(cfg, tiny_lm, "eval", 32 * 20, tmp_path)
    (path,) = (tmp_path / "tokens").glob("*.npy")
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # flip bits in the last window
    path.write_bytes(bytes(data))
    before = len(text.REPAIRED)
    again = token_windows(cfg, tiny_lm, "eval", 32 * 20, tmp_path)
    assert torch.equal(again, first)
    assert len(text.REPAIRED) == before + 1 and "checksum mismatch" in text.REPAIRED[-1]


@pytest.mark.unit
def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    from sae_sweep.sae import get_trainer

    data = torch.randn(4000, 16)

    class Reader:
        def __init__(self):
            self.i = 0

        def __iter__(self):
            return self

        def __next__(self):
            x = data[(self.i * 32) % 3968 : (self.i * 32) % 3968 + 32]
            self.i += 1
            return x

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, s):
            self.i = s["i"]

    def trainer(steps):
        return get_trainer("topk")(16, {"d_sae": 64, "k": 4}, {"name": "topk", "lr": 1e-3}, steps, seed=0)

    full = trainer(30)
    train(full, Reader(), 30, progress=False)
    ckpt = tmp_path
    partial = trainer(30)
    with pytest.raises(Interrupted):
        train(
            partial,
            Reader(),
            30,
            ckpt,
            checkpoint_every=10,
            progress=False,
            should_stop=lambda: partial.step_count >= 25,
        )  # checkpoints at 10, 20, then 25 on the stop
    latest = ckpt / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, as by a full disk
    state = load_checkpoint(ckpt)
    assert state["step"] == 20 and "latest.pt" in state["fallback_from"]  # 25 was latest.pt
    resumed = trainer(30)
    result = train(resumed, Reader(), 30, ckpt, checkpoint_every=10, progress=False)
    assert result.resumed_from_step == 20 and result.checkpoint_fallback
    for name, p in full.sae.state_dict().items():
        assert torch.equal(p, resumed.sae.state_dict()[name]), name
    (ckpt / "previous.pt").write_bytes(b"not a checkpoint")
    latest.write_bytes(b"")
    with pytest.raises(CheckpointUnreadable) as e:
        load_checkpoint(ckpt)
    assert "latest.pt" in str(e.value) and "previous.pt" in str(e.value) and "Delete" in str(e.value)


# -- concurrent starts ---------------------------------------------------------------------------


def _tracker_at(uri, start, queue):
    from sae_sweep.tracking.runs import Tracker

    while time.time() < start:
        time.sleep(0.001)
    try:
        queue.put(("ok", Tracker(uri).experiment_id("e")))
    except Exception as e:  # the report: a crash in MLflow's schema migration
        queue.put(("error", f"{type(e).__name__}: {e}"))


@pytest.mark.integration
def test_concurrent_first_use_of_a_store_does_not_corrupt_it(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    for trial in range(2):
        uri = f"sqlite:///{tmp_path / f't{trial}' / 'mlflow.db'}"
        q = ctx.Queue()
        start = time.time() + 6  # after every process has imported MLflow
        procs = [ctx.Process(target=_tracker_at, args=(uri, start, q)) for _ in range(4)]
        for p in procs:
            p.start()
        got = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join()
        assert all(kind == "ok" for kind, _ in got), got
        assert len({exp for _, exp in got}) == 1


@pytest.mark.unit
def test_a_half_migrated_store_is_refused_with_the_reason(tmp_path):
    import sqlite3

    from sae_sweep.tracking.runs import Tracker, TrackingStoreError

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE _alembic_tmp_experiments (x INTEGER)")
    with pytest.raises(TrackingStoreError, match="half-migrated"):
        Tracker(f"sqlite:///{db}")


@pytest.mark.integration
def test_a_point_running_elsewhere_is_not_started_again(tmp_path):
    """While another process holds a point's lock, a second start says who runs it and does not
    touch the run; a multirun counts it as skipped."""
    from sae_sweep.config import run_key
    from sae_sweep.job.app import point_lock

    out = tmp_path / "out"
    cfg = compose_config(*SYNTH, "seed=3", f"paths.output_dir={out}")
    with OwnedLock(point_lock(cfg, run_key(cfg))):
        single = run_cli(out, *SYNTH, "seed=3")
        multi = run_cli(out, "-m", *SYNTH, "seed=3,4")
    assert single.returncode == 3
    assert f"pid={os.getpid()}" in single.stderr and "running in another process" in single.stderr
    assert multi.returncode == 0, multi.stderr[-3000:]
    runs = _jobs(out)
    assert [r.data.tags["seed"] for r in runs] == ["4"]  # seed 3 was never started here
    parents = store_runs(out, "rel", "sweep")
    assert parents[0].data.metrics["sweep/skipped"] == 1 and parents[0].data.metrics["sweep/finished"] == 1


@pytest.mark.integration
def test_artifacts_live_under_the_output_dir_not_the_launch_dir(tmp_path):
    launch, out = tmp_path / "launch", tmp_path / "out"
    launch.mkdir()
    r = run_cli(out, *SYNTH, "seed=5", cwd=launch)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (launch / "mlruns").exists()
    (run,) = _jobs(out)
    assert run.info.artifact_uri.startswith((out / "mlartifacts").as_uri())
    assert list((out / "mlartifacts").rglob("sae.safetensors"))


# -- bad input: refused before any work, with the real reason -------------------------------------


@pytest.mark.parametrize(
    "args, needles, modes",
    [
        (["train.tokens=5"], ["train.tokens=5", "less than one batch"], ([],)),
        (["device=cuda"], ["device='cuda'", "CUDA is not available"], ([], ["-m"])),  # checked with the grid
        (["dataset=builtin", "dataset.tokens=200000000000"], ["dataset.tokens=200000000000", "GB of memory"], ([],)),
        (["trainer.lrr=1e-3"], ["trainer.lrr: unknown setting", "did you mean 'lr'?"], ([], ["-m"])),
        (["tracking.uri=sqlite:////proc/nowhere/mlflow.db"], ["/proc/nowhere", "cannot create"], ([],)),
    ],
    ids=["budget", "device", "memory", "typo", "store"],
)
@pytest.mark.integration
def test_bad_input_is_refused_in_seconds_naming_key_and_reason(tmp_path, args, needles, modes):
    t0 = time.time()
    for mode in modes:
        r = run_cli(tmp_path / "out", *mode, *SYNTH, *args, "seed=6")
        assert r.returncode == 2, (args, r.stderr[-2000:])
        for n in needles:
            assert n in r.stderr, (n, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
    assert time.time() - t0 < 120
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "is empty"),
        (b"hello \xff\xfe world\nsecond line\n", "is not UTF-8 text"),
        (b"x" * 2_000_000 + b"\n", "all fall in one split"),  # one long line: one document
    ],
    ids=["empty", "not-utf8", "one-long-line"],
)
@pytest.mark.integration
def test_local_files_that_cannot_give_both_splits_are_refused_naming_the_file(tmp_path, content, needle):
    f = tmp_path / "data.txt"
    f.write_bytes(content)
    r = run_cli(tmp_path / "out", "dataset=local", f"dataset.data_files=[{f}]", "sweep.name=rel", "seed=7")
    assert r.returncode == 2 and needle in r.stderr and str(f) in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out" / "mlflow.db").exists()


# -- the stress check: many sweeps of one grid started at once on a fresh output dir ---------------


@pytest.mark.integration
@pytest.mark.slow
def test_eight_sweeps_of_one_grid_started_at_once_train_each_point_once(tmp_path):
    out = tmp_path / "out"
    grid = ["-m", *SYNTH, "seed=11,12", "sae.d_sae=96,128"]
    procs = [
        subprocess.Popen(
            cli_argv(out, *grid),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
            cwd=tmp_path,
        )
        for _ in range(8)
    ]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-1500:] for e in errs)

    import sqlite3

    with sqlite3.connect(out / "mlflow.db") as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert not con.execute("SELECT name FROM sqlite_master WHERE name LIKE '_alembic_tmp_%'").fetchall()
    client = store_client(out)
    jobs = _jobs(out)
    keys = [r.data.tags["run_key"] for r in jobs]
    assert len(keys) == len(set(keys)) == 4, keys  # one run per point, none started twice
    assert all(r.info.status == "FINISHED" for r in jobs)
    for r in jobs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
        assert len(steps) == len(set(steps)), f"{r.info.run_id}: train/loss logged twice"
        assert len(client.get_metric_history(r.info.run_id, "recovery/sparsity/l0")) == 1  # evals ran once
    parents = [
        r for r in client.search_runs([jobs[0].info.experiment_id]) if r.data.tags.get("sae_sweep.kind") == "sweep"
    ]
    assert len(parents) == 8
    assert sum(p.data.metrics["sweep/finished"] for p in parents) == 4
    assert all(p.data.metrics["sweep/finished"] + p.data.metrics["sweep/skipped"] == 4 for p in parents)
    assert all(p.data.metrics["sweep/failed"] == 0 for p in parents)


@pytest.mark.unit
def test_a_usr2_that_arrives_while_the_stopped_runs_are_recorded_waits_for_the_hand_over(monkeypatch):
    """submitit's preemption is SIGTERM then USR2 a few ms later: the USR2 may land after the loop
    has stopped but while the runs are being tagged. It must not cut that short; hand_over requeues."""
    import signal

    from sae_sweep.job.app import PreemptionGuard
    from sae_sweep.training.loop import STOP

    calls = []

    def submitit_handler(signum, frame):
        calls.append(signum)
        raise SystemExit(0)

    monkeypatch.setenv("SUBMITIT_FOLDER", "/nonexistent")
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with PreemptionGuard() as guard:
            assert guard.active
            STOP.loops += 1  # a training loop is running
            os.kill(os.getpid(), signal.SIGTERM)
            assert STOP.requested and guard.signum == signal.SIGTERM and not calls
            STOP.seen, STOP.loops = True, STOP.loops - 1  # it stopped and checkpointed
            os.kill(os.getpid(), signal.SIGUSR2)  # ... while the runs are being recorded
            assert guard.requeue and calls == []
            with pytest.raises(SystemExit):
                guard.hand_over()
            assert calls == [signal.SIGUSR2]
        # The guard's resend of an unacted signal dies with it: left running, it would SIGTERM this
        # process (handler restored) 20 s later, a pytest worker in the middle of another test.
        guard.timer.join(5)
        assert not guard.timer.is_alive() and not guard.saved
    finally:
        signal.signal(signal.SIGUSR2, previous)
        STOP.clear()
