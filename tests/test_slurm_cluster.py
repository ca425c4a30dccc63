"""The single-node SLURM cluster from launchers/slurm_local.sh, driven through submitit.

Real daemons, no mocks: these tests submit real jobs with sbatch and wait for them.

Setup:  launchers/slurm_local.sh start   (or .ci/install_slurm.sh, which also apt-installs)
Run:    pytest -m slurm tests/test_slurm_cluster.py

Environment:
  SLURM_CONF                 optional; if unset and /etc/slurm/slurm.conf does not exist, the
                             config written by slurm_local.sh ($SAE_SWEEP_SLURM_DIR or
                             /tmp/sae_sweep_slurm)/slurm.conf is used.
  SAE_SWEEP_TEST_PARTITION   partition to submit to (default: debug).
  SAE_SWEEP_TEST_PREEMPT_PARTITION  higher-priority partition whose jobs preempt the above
                             (default: urgent, as configured by slurm_local.sh).
  CI                         when "true", a missing SLURM is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

submitit = pytest.importorskip("submitit")

IN_CI = os.environ.get("CI", "").lower() == "true"
HAVE_SINFO = shutil.which("sinfo") is not None

if not HAVE_SINFO and not IN_CI:
    pytest.skip(
        "SLURM not installed (`sinfo` not on PATH): run .ci/install_slurm.sh, or "
        "apt-get install slurm-wlm munge && launchers/slurm_local.sh start",
        allow_module_level=True,
    )

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm"), pytest.mark.timeout(300)]

PARTITION = os.environ.get("SAE_SWEEP_TEST_PARTITION", "debug")
# a partition whose jobs preempt PARTITION's (slurm_local.sh: `urgent`, PriorityTier=10)
PREEMPT_PARTITION = os.environ.get("SAE_SWEEP_TEST_PREEMPT_PARTITION", "urgent")
UP_STATES = {"idle", "mix", "mixed", "alloc", "allocated"}

# The job processes import nothing from tests/ (it is not on their sys.path): ship this
# module's functions and classes inside the pickle instead of by reference.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def slurm_conf():
    """Point clients at the local cluster's config when nothing else does."""
    if "SLURM_CONF" in os.environ or Path("/etc/slurm/slurm.conf").exists():
        yield os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
        return
    state_dir = os.environ.get("SAE_SWEEP_SLURM_DIR", "/tmp/sae_sweep_slurm")
    conf = str(Path(state_dir) / "slurm.conf")
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        os.environ.pop("SLURM_CONF", None)


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


def _executor(folder: Path, **extra) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    params = dict(
        slurm_partition=PARTITION,
        gpus_per_node=0,
        mem_gb=1,
        cpus_per_task=1,
        tasks_per_node=1,
        # > 10 min on purpose: submitit calls any USR2 a *timeout* (not a preemption) once the
        # job has run min(0.8 * limit, limit - 10 min), which is from the start when limit <= 10.
        timeout_min=60,
        name="sae_sweep_test",
    )
    executor.update_parameters(**{**params, **extra})
    return executor


def _wait_for(predicate, timeout_s: float, what: str, job=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if job is not None and job.done():
            break
        time.sleep(0.5)
    detail = ""
    if job is not None:
        detail = f"\njob {job.job_id} state {job.state}\nstdout:\n{job.stdout()}\nstderr:\n{job.stderr()}"
    queue = subprocess.run(["squeue", "-o", "%i %P %T %R %C"], capture_output=True, text=True)
    detail += f"\nsqueue:\n{queue.stdout}{queue.stderr}"
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}{detail}")


# functions that run inside SLURM jobs


def report_env(x: int) -> dict:
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_PARTITION")
    return {"x": x, "square": x * x, **{k: os.environ.get(k) for k in keys}}


class ResumableCounter(submitit.helpers.Checkpointable):
    """Counts to `total` one step at a time, saving its position to `state_path` after every
    step. When interrupted, submitit calls `checkpoint()` (inherited: resubmit with the same
    arguments) and requeues the job; the rerun resumes from the saved step."""

    def __call__(self, state_path: str, total: int, step_s: float) -> dict:
        path = Path(state_path)
        state = json.loads(path.read_text()) if path.exists() else {"step": 0, "runs": []}
        state["runs"].append(
            {
                "start_step": state["step"],
                "restart_count": os.environ.get("SLURM_RESTART_COUNT"),
                "job_id": os.environ.get("SLURM_JOB_ID"),
            }
        )
        self._save(path, state)
        while state["step"] < total:
            time.sleep(step_s)
            state["step"] += 1
            self._save(path, state)
        return {
            "step": state["step"],
            "runs": state["runs"],
            "restart_count": os.environ.get("SLURM_RESTART_COUNT"),
        }

    @staticmethod
    def _save(path: Path, state: dict) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)


def test_cluster_is_up():
    assert HAVE_SINFO, (
        "CI=true but `sinfo` is not on PATH: SLURM is not installed. Run .ci/install_slurm.sh before the test suite."
    )
    ping = _run("scontrol", "ping")
    assert "UP" in ping, f"slurmctld is not answering:\n{ping}\n(launchers/slurm_local.sh start)"
    states = _run("sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %t").split()
    assert states, f"partition {PARTITION!r} has no nodes"
    nodes = dict(zip(states[::2], states[1::2]))
    up = {n: s for n, s in nodes.items() if s.rstrip("*~#!%$@^-") in UP_STATES}
    assert up, (
        f"no node of partition {PARTITION!r} is idle/mixed/allocated: {nodes}. "
        "See the logs in $SAE_SWEEP_SLURM_DIR (default /tmp/sae_sweep_slurm), "
        "or restart with launchers/slurm_local.sh restart"
    )


def test_job_array_runs_and_sees_slurm_env(tmp_path):
    executor = _executor(tmp_path, slurm_array_parallelism=2)
    jobs = executor.map_array(report_env, [3, 4])
    assert len(jobs) == 2
    results = [job.result() for job in jobs]  # raises (with the job's stderr) if a job failed

    assert [r["x"] for r in results] == [3, 4]
    assert [r["square"] for r in results] == [9, 16]
    array_ids = {r["SLURM_ARRAY_JOB_ID"] for r in results}
    assert len(array_ids) == 1 and None not in array_ids, results
    array_id = array_ids.pop()
    assert sorted(r["SLURM_ARRAY_TASK_ID"] for r in results) == ["0", "1"]
    for job, r in zip(jobs, results):
        assert r["SLURM_JOB_ID"], r
        assert job.job_id == f"{array_id}_{r['SLURM_ARRAY_TASK_ID']}"
        assert r["SLURM_JOB_PARTITION"] == PARTITION


def test_checkpointable_job_is_requeued_and_resumes(tmp_path):
    state_path = tmp_path / "counter.json"
    total = 20
    executor = _executor(tmp_path)
    job = executor.submit(ResumableCounter(), str(state_path), total, 0.5)

    def progressed():
        if not state_path.exists():
            return None
        state = json.loads(state_path.read_text())
        return state if state["step"] >= 3 else None

    _wait_for(progressed, 600, "the job to make 3 steps", job=job)  # the node may be busy with other tests' jobs
    # What submitit does when a job's time runs out: USR2 -> checkpoint() -> scontrol requeue. (Its
    # preemption interrupt sends SIGTERM first, from a separate scancel: when that SIGTERM is delivered
    # after the USR2, it kills the `scontrol requeue` child; real preemption is the next test's.)
    job._interrupt(timeout=True)

    result = job.result()  # requeued jobs start again after cred_expire (30 s on the local cluster)
    assert result["step"] == total
    assert result["restart_count"] == "1", result
    runs = result["runs"]
    assert len(runs) == 2, runs
    assert runs[0]["restart_count"] in (None, "0"), runs
    assert runs[1]["restart_count"] == "1", runs
    assert 3 <= runs[1]["start_step"] < total, f"rerun did not resume from saved state: {runs}"
    assert runs[0]["job_id"] == runs[1]["job_id"], "requeue keeps the job id"


def test_preempted_job_gets_signal_is_requeued_and_resumes(tmp_path):
    """A job in a higher-priority partition preempts a running one: the victim receives
    submitit's USR2 (SlurmctldParameters=preempt_send_user_signal), requeues itself, and its
    rerun resumes from the state it saved."""
    partitions = _run("sinfo", "-h", "-o", "%R").split()
    if PREEMPT_PARTITION not in partitions:
        msg = f"no partition {PREEMPT_PARTITION!r} (have {partitions}) to preempt with"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    cpus = max(int(c) for c in _run("sinfo", "-h", "-N", "-p", PARTITION, "-o", "%c").split())

    state_path = tmp_path / "victim.json"
    total = 20
    victim = _executor(tmp_path / "victim", cpus_per_task=cpus)  # fills the node
    job = victim.submit(ResumableCounter(), str(state_path), total, 0.5)

    def progressed():
        if not state_path.exists():
            return None
        state = json.loads(state_path.read_text())
        return state if state["step"] >= 3 else None

    # It fills the node, so it starts only when the other test worker's SLURM jobs have ended.
    _wait_for(progressed, 600, "the victim to make 3 steps", job=job)

    urgent = _executor(tmp_path / "urgent")
    urgent.update_parameters(slurm_partition=PREEMPT_PARTITION)
    urgent_job = urgent.submit(report_env, 7)
    assert urgent_job.result()["SLURM_JOB_PARTITION"] == PREEMPT_PARTITION

    result = job.result()
    assert result["step"] == total
    assert result["restart_count"] == "1", result
    runs = result["runs"]
    assert len(runs) == 2, runs
    assert 3 <= runs[1]["start_step"] < total, f"rerun did not resume from saved state: {runs}"
    log = job.stderr() or ""
    assert "SIGUSR2" in log and "preempted" in log, f"victim never got the preemption signal:\n{log}"
