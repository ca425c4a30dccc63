"""A sweep survives crashes, kills and re-runs, without SLURM: real CLI, real MLflow, tiny model.

- A job killed mid-training and run again ends with an SAE bit-identical to an uninterrupted run.
- A point that fails (NaN) does not stop the others; the parent run counts finished/failed/skipped;
  running the same sweep again runs only the failed and the missing points.
- Eight processes writing one sqlite MLflow store at once lose no run, param or metric.
(The same on the SLURM cluster, with requeues and cancelled jobs: tests/test_sweep_slurm.py.)
"""

import multiprocessing as mp
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from helpers.cli import run_cli, start_cli_until_checkpoint
from helpers.mlflow_store import store_runs, store_uri

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Small caches trained over many times, on purpose: train.epochs says so (the default refuses repeated data).
SMALL = [
    "dataset.tokens=20000",
    "train.epochs=50",
    "dataset.eval_tokens=2048",
    "train.tokens=40000",
    "trainer.batch_size=1000",
    "train.checkpoint_every=5",
    "sweep.name=resilience",
    "eval=core_only",
]


def _cli(out: Path, *args):
    return run_cli(out, *args, timeout=900)


def _runs(out: Path, kind: str):
    """The store's runs of ``kind``, oldest first."""
    return sorted(store_runs(out, "resilience", kind), key=lambda r: r.info.start_time)


def _sae_tensors(out: Path) -> dict:
    (path,) = (out / "saes").glob("*/sae.safetensors")
    return load_file(str(path))


def _start_until_first_checkpoint(out: Path, args) -> subprocess.Popen:
    """The CLI started in the background on `out` (stderr piped), returned once its first checkpoint is on disk."""
    return start_cli_until_checkpoint(out, *args, stderr=subprocess.PIPE)


def test_job_killed_and_rerun_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    # 300 steps, a checkpoint every 5: the kill lands mid-training, the rerun resumes there.
    args = [*SMALL, "train.tokens=300000", "seed=7"]
    whole, cut = tmp_path / "whole" / "out", tmp_path / "cut" / "out"
    whole.parent.mkdir()
    cut.parent.mkdir()

    proc = _start_until_first_checkpoint(cut, args)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    (ckpt,) = (cut / "checkpoints").glob("*/latest.pt")
    step = torch.load(ckpt, map_location="cpu", weights_only=False)["step"]
    assert 0 < step < 300, f"the kill did not land mid-training (checkpoint at step {step})"

    r = _cli(cut, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli(whole, *args)
    assert r.returncode == 0, r.stderr[-3000:]

    (resumed,) = _runs(cut, "job")
    assert resumed.info.status == "FINISHED" and int(resumed.data.tags["resumed_from_step"]) >= step
    assert resumed.data.metrics["train/steps"] == 300
    a, b = _sae_tensors(whole), _sae_tensors(cut)
    assert a.keys() == b.keys() and {"W_enc", "W_dec", "b_enc", "b_dec"} <= a.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resuming from step {step}"


def test_failed_point_does_not_stop_the_sweep_and_a_rerun_runs_only_failed_and_missing(tmp_path):
    out = tmp_path / "out"
    # lr=1e30 without clipping or warm-up: NaN at once, TrainingFailed
    fixed = [*SMALL, "trainer.grad_clip=0", "trainer.warmup_steps=0"]
    r = _cli(out, "-m", *fixed, "trainer.lr=1e-3,1e30")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "1 finished, 1 failed, 0 skipped" in r.stderr, r.stderr[-3000:]
    assert "Run the same command again" in r.stderr

    children = {c.data.params["trainer.lr"]: c for c in _runs(out, "job")}
    assert set(children) == {"0.001", "1e+30"}
    assert children["0.001"].info.status == "FINISHED"
    bad = children["1e+30"]
    assert bad.info.status == "FAILED"
    assert bad.data.tags["error_type"] == "TrainingFailed" and "non-finite" in bad.data.tags["error"]
    (parent,) = _runs(out, "sweep")
    assert parent.info.status == "FAILED"
    assert {k: parent.data.metrics[k] for k in ("sweep/finished", "sweep/failed", "sweep/skipped")} == {
        "sweep/finished": 1,
        "sweep/failed": 1,
        "sweep/skipped": 0,
    }

    # Again, with one point the first sweep did not have: the finished point is skipped, the failed
    # one runs again (continuing its own run), the missing one runs.
    r = _cli(out, "-m", *fixed, "trainer.lr=1e-3,1e30,2e-3")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "1 finished, 1 failed, 1 skipped" in r.stderr, r.stderr[-3000:]
    after = {c.data.params["trainer.lr"]: c for c in _runs(out, "job")}
    assert set(after) == {"0.001", "1e+30", "0.002"}  # no duplicate runs
    assert after["1e+30"].info.run_id == bad.info.run_id and after["1e+30"].info.status == "FAILED"
    assert after["0.002"].info.status == "FINISHED"
    assert after["0.001"].info.end_time == children["0.001"].info.end_time  # not run again
    second = _runs(out, "sweep")[-1]
    assert (
        second.data.metrics["sweep/finished"],
        second.data.metrics["sweep/failed"],
        second.data.metrics["sweep/skipped"],
    ) == (1, 1, 1)


# eight writers, one sqlite store

N_WRITERS, N_PARAMS, N_STEPS = 8, 150, 20


def _writer(uri: str, i: int, go) -> None:
    from sae_sweep.tracking.runs import Tracker

    tracker = Tracker(uri)
    go.wait()  # all at once, experiment creation included
    with tracker.child("concurrency", f"writer-{i}", f"key-{i}", None) as run:
        run.log_params({f"p{j}": f"{i}-{j}" for j in range(N_PARAMS)})
        for step in range(N_STEPS):
            run.log_metrics({"train/loss": i + step / N_STEPS, "train/l0": float(step)}, step=step)
        run.set_tags({"writer": str(i)})


def test_eight_processes_writing_one_sqlite_store_lose_nothing(tmp_path):
    from sae_sweep.tracking.runs import Tracker

    uri = store_uri(tmp_path)
    Tracker(uri).client.search_experiments()  # create the schema first: migrations are not concurrent
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(uri, i, go)) for i in range(N_WRITERS)]
    for p in procs:
        p.start()
    time.sleep(1.0)
    go.set()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * N_WRITERS

    client = MlflowClient(uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "concurrency"]
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert sorted(r.data.tags["writer"] for r in runs) == [str(i) for i in range(N_WRITERS)]
    for r in runs:
        i = int(r.data.tags["writer"])
        assert r.info.status == "FINISHED"
        assert r.data.params == {f"p{j}": f"{i}-{j}" for j in range(N_PARAMS)}
        for key in ("train/loss", "train/l0"):
            history = client.get_metric_history(r.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(N_STEPS)), key
        assert {m.step: m.value for m in client.get_metric_history(r.info.run_id, "train/loss")}[
            N_STEPS - 1
        ] == pytest.approx(i + (N_STEPS - 1) / N_STEPS)


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "sweep"])
def test_a_local_job_sent_sigterm_leaves_no_run_running(tmp_path, multirun):
    """`kill <pid>` (or `timeout`, or scancel of a batch script running the CLI) mid-training: the job's
    run ends KILLED, and a sweep's parent run is closed too, not left RUNNING; the rerun continues."""
    out = tmp_path / "out"
    args = [*(["-m"] if multirun else []), *SMALL, "train.tokens=300000", "seed=11"]
    proc = _start_until_first_checkpoint(out, args)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-3000:]
    (job,) = _runs(out, "job")
    assert job.info.status == "KILLED", err[-3000:]
    for parent in _runs(out, "sweep"):  # KILLED, with the count of points it left unfinished
        assert parent.info.status == "KILLED", err[-3000:]
        assert parent.data.tags["sweep.interrupted"].endswith("1 of 1 points unfinished")
        assert parent.data.metrics["sweep/interrupted"] == 1 and parent.data.metrics["sweep/finished"] == 0

    r = _cli(out, *args)  # the rerun continues the killed run to FINISHED
    assert r.returncode == 0, r.stderr[-3000:]
    (again,) = _runs(out, "job")
    assert again.info.run_id == job.info.run_id and again.info.status == "FINISHED"
