"""Sweeps through `hydra/launcher=slurm_local` on the real single-node cluster
(launchers/slurm_local.sh): the CLI, submitit, SLURM, MLflow and the tiny model, no mocks.

- An invalid grid submits nothing to SLURM.
- A job interrupted the way SLURM preempts (SIGTERM + SIGUSR2: submitit's own interrupt) checkpoints,
  is requeued, resumes and continues the same MLflow run; the sweep counts it as finished.
- A point that fails (NaN) and a job cancelled from outside do not stop the sweep; the two jobs
  that ran at once built their shared activation cache once.

Setup: launchers/slurm_local.sh start (CI: .ci/install_slurm.sh). Under CI=true a missing cluster
fails instead of skipping. The cluster makes a requeued job wait ~30 s before it runs again.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers.cli import cli_argv, cli_env
from helpers.mlflow_store import store_runs
from sae_sweep.activations.cache import read_builds_log

IN_CI = os.environ.get("CI", "").lower() == "true"
if shutil.which("sinfo") is None and not IN_CI:
    pytest.skip(
        "SLURM not installed (`sinfo` not on PATH): run .ci/install_slurm.sh, or "
        "apt-get install slurm-wlm munge && launchers/slurm_local.sh start",
        allow_module_level=True,
    )

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm"), pytest.mark.slow, pytest.mark.timeout(900)]

# Small caches trained over many times, on purpose: train.epochs says so (the default refuses repeated data).
SMALL = [
    "dataset.tokens=20000",
    "train.epochs=50",
    "dataset.eval_tokens=2048",
    "train.tokens=40000",
    "trainer.batch_size=1000",
    "train.checkpoint_every=5",
    "sweep.name=slurm",
    "hydra/launcher=slurm_local",
    "eval=core_only",
]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """Point clients at the local cluster's config when nothing else does; fail if it is down."""
    if "SLURM_CONF" not in os.environ and not Path("/etc/slurm/slurm.conf").exists():
        os.environ["SLURM_CONF"] = str(
            Path(os.environ.get("SAE_SWEEP_SLURM_DIR", "/tmp/sae_sweep_slurm")) / "slurm.conf"
        )
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    assert "UP" in ping.stdout, f"SLURM is not up ({ping.stdout}{ping.stderr}): launchers/slurm_local.sh start"


def _sweep(out: Path, *args, wait=True, timeout=800):
    cmd = cli_argv(out, "-m", *SMALL, *args)
    env = cli_env()
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=out.parent)
    # A file, not a pipe: nobody reads a pipe while the driver waits for its jobs, and a full one blocks it.
    with open(out.parent / "driver.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=out.parent)
    proc.log_path = out.parent / "driver.log"
    return proc


def _driver_log(proc) -> str:
    return proc.log_path.read_text()


def _runs(out: Path, kind: str):
    return store_runs(out, "slurm", kind)


def _job_dirs(out: Path):
    """submitit's per-job folders (.submitit/<job id>), one per submitted job or array task."""
    return sorted(p for p in out.glob("sweeps/*/*/.submitit/*") if p.is_dir())


def _wait_for(predicate, timeout_s, what, proc=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended while waiting for {what}:\n{_driver_log(proc)[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_invalid_grid_submits_nothing(tmp_path):
    out = tmp_path / "out"
    r = _sweep(out, "sae.k=0,16")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "1 of 2 grid points are invalid; nothing was launched" in r.stderr
    assert "sae.k=0" in r.stderr and "Traceback" not in r.stderr
    assert _job_dirs(out) == [] and not (out / "sweeps").exists()  # no submitit folder, no sweep dir
    assert not (out / "mlflow.db").exists()


def test_a_request_the_partition_cannot_meet_is_refused_before_submission(tmp_path):
    out = tmp_path / "out"
    r = _sweep(out, "hydra.launcher.cpus_per_task=64", "hydra.launcher.gpus_per_node=2", "seed=1,2")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "hydra.launcher.cpus_per_task=64" in r.stderr and "at most" in r.stderr and "CPUs" in r.stderr
    assert "hydra.launcher.gpus_per_node=2" in r.stderr and "nothing was launched" in r.stderr
    assert _job_dirs(out) == [] and not (out / "mlflow.db").exists()
    r = _sweep(out, "hydra.launcher.partition=nope", "seed=1,2")
    assert r.returncode == 2 and "no such partition" in r.stderr and "debug" in r.stderr, r.stderr[-3000:]


def test_a_refused_submission_fails_its_points_with_slurms_own_message(tmp_path):
    """A request sbatch refuses for a reason the preflight does not check (here 2 nodes of a 1-node cluster): each
    point fails with what sbatch said, not as a lost job."""
    out = tmp_path / "out"
    r = _sweep(out, "hydra.launcher.nodes=2", "seed=1,2")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "sbatch: error" in r.stderr and "job lost" not in r.stderr
    parent = _runs(out, "sweep")[0]
    assert parent.data.metrics["sweep/failed"] == 2


def test_interrupted_job_is_requeued_resumes_and_continues_its_run(tmp_path):
    import submitit

    out = tmp_path / "out"
    total = 400  # steps: long enough that the interrupt lands mid-training
    proc = _sweep(out, f"train.tokens={total * 1000}", "seed=11", wait=False)
    try:
        ckpt = _wait_for(lambda: list(out.glob("checkpoints/*/latest.pt")), 600, "the first checkpoint", proc)[0]
        (job_dir,) = _job_dirs(out)
        # What submitit does on preemption (SIGTERM, then SIGUSR2 -> checkpoint() -> scontrol requeue);
        # the cluster's own preemption sends the same USR2 (tests/test_slurm_cluster.py).
        submitit.SlurmJob(folder=job_dir, job_id=job_dir.name)._interrupt()
        proc.wait(timeout=800)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, _driver_log(proc)[-4000:]

    (run,) = _runs(out, "job")
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["slurm_restart_count"] == "1" and tags["resumed"] == "true"
    assert 0 < int(tags["interrupted_at_step"]) < total
    assert int(tags["resumed_from_step"]) == int(tags["interrupted_at_step"])  # checkpointed on the signal
    assert metrics["train/steps"] == total
    assert "error" not in tags
    log = (job_dir / f"{job_dir.name}_0_log.err").read_text() + (job_dir / f"{job_dir.name}_0_log.out").read_text()
    assert "stopping training at the next step" in log and "Requeued job" in log, log[-3000:]
    (parent,) = _runs(out, "sweep")
    assert parent.info.status == "FINISHED"
    assert (parent.data.metrics["sweep/finished"], parent.data.metrics["sweep/failed"]) == (1, 0)
    assert ckpt.exists()


def test_failed_and_cancelled_points_do_not_stop_the_sweep_and_the_cache_is_built_once(tmp_path, fresh_cache):
    out = tmp_path / "out"
    cache = fresh_cache(tmp_path)
    # Three points, two run at once (2 CPUs): lr=1e30 gives NaN; the third is cancelled from outside.
    proc = _sweep(
        out,
        f"paths.cache_dir={cache}",
        "trainer.grad_clip=0",
        "trainer.warmup_steps=0",
        "trainer.lr=1e-3,1e30,2e-3",
        wait=False,
    )
    try:
        third = _wait_for(lambda: [d for d in _job_dirs(out) if d.name.endswith("_2")], 300, "the array", proc)[0]
        subprocess.run(["scancel", third.name], check=True, timeout=60)
        proc.wait(timeout=800)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = _driver_log(proc)
    assert proc.returncode == 1, log[-4000:]
    assert "1 finished, 2 failed, 0 skipped" in log, log[-4000:]
    assert f"job {third.name} ended without a result" in log, log[-4000:]

    children = {c.data.params["trainer.lr"]: c for c in _runs(out, "job")}
    assert children["0.001"].info.status == "FINISHED"
    assert children["1e+30"].info.status == "FAILED" and "non-finite" in children["1e+30"].data.tags["error"]
    if "0.002" in children:  # it may have started before the scancel: then its run is closed FAILED
        assert children["0.002"].info.status == "FAILED"
    (parent,) = _runs(out, "sweep")
    assert parent.info.status == "FAILED"
    assert (
        parent.data.metrics["sweep/finished"],
        parent.data.metrics["sweep/failed"],
        parent.data.metrics["sweep/skipped"],
    ) == (1, 2, 0)

    # The two jobs that ran at once, in separate SLURM jobs, share one activation cache built once.
    ran = [children["0.001"], children["1e+30"]]
    keys = {c.data.tags["cache_key"] for c in ran}
    assert len(keys) == 1
    assert sorted(c.data.tags["cache_built"] for c in ran) == ["false", "true"]
    builds = [b for b in read_builds_log(cache) if b["key"] in keys]
    assert len(builds) == 1 and builds[0]["slurm_job_id"], builds
