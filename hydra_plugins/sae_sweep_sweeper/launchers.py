"""submitit launchers (``conf/hydra/launcher/*.yaml``) that gather every job's result on its own.

hydra-submitit-launcher 1.2.0 ends ``launch()`` with ``[j.results()[0] for j in jobs]``: the first
job that produced no result (scancel, OOM kill, node failure → ``UncompletedJobError``) raises out
of the list, so the results of the batch are lost and nobody waits for the jobs after it. Here each
job is waited for separately and a lost job becomes a FAILED ``JobReturn`` carrying the reason;
the sweep (``sae_sweep.job.sweep.GridSweep``) counts it, closes its MLflow run and keeps going.

Everything else (the executor's parameters, the job body, ``checkpoint()`` for requeues) is the
plugin's own, so the presets keep ``defaults: [submitit_slurm]`` and every plugin key validates.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf

from hydra_plugins.hydra_submitit_launcher import submitit_launcher as base
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

log = logging.getLogger(__name__)

MAX_REASON = 2000  # a lost job's reason ends up in an MLflow tag; keep the head of submitit's message


class _GatherEach:
    """Mixin over ``BaseSubmititLauncher``: same submission, per-job result gathering."""

    _EXECUTOR: str

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit  # lazy, like the plugin: plugin discovery imports this module

        assert self.config is not None and len(job_overrides) > 0
        executor = self._executor(submitit)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))

        job_params: List[Any] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params))
        return [self._gather(job, list(overrides)) for job, overrides in zip(jobs, job_overrides)]

    def _executor(self, submitit: Any) -> Any:
        """The plugin's executor set-up (BaseSubmititLauncher.launch), unchanged."""
        init_keys = {"max_num_timeout"}
        init_params = {
            "folder": self.params["submitit_folder"],
            **{f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in init_keys},
        }
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                k if k in shared else f"{self._EXECUTOR}_{k}": v
                for k, v in self.params.items()
                if k not in init_keys | {"submitit_folder"}
            }
        )
        return executor

    def _gather(self, job: Any, overrides: List[str]) -> JobReturn:
        """Wait for one job; a job that ended without a result is a FAILED JobReturn, not a raise."""
        try:
            lost = self._wait(job)
            if lost is None:
                return job.results()[0]
            reason = f"job {job.job_id} {lost}"
        except Exception as e:  # UncompletedJobError (killed, lost), or a result that cannot be unpickled
            reason = f"job {job.job_id} ended without a result: {e}"
        log.error("%s", reason)
        ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
        ret.return_value = RuntimeError(reason[:MAX_REASON])
        return ret

    def _wait(self, job: Any) -> Optional[str]:
        """Block until the job has ended; None, or why it ended without a result."""
        job.wait()
        return None


class SlurmLauncher(_GatherEach, base.SlurmLauncher):
    POLL_S = 5.0
    RESULT_GRACE_S = 15.0  # a finished job's result pickle may show up late on a network filesystem

    def resources(self) -> Dict[str, Any]:
        """What each job gets: it runs on a cluster node, with the preset's memory and GPUs."""
        return {
            "runs_here": False,
            "memory_gb": self.params.get("mem_gb"),
            "gpus_per_node": self.params.get("gpus_per_node") or 0,
        }

    def preflight(self) -> List[str]:
        """The preset's request checked against its partition (``sinfo``), before anything is
        submitted: sbatch would refuse the whole array ("More processors requested than
        permitted") or leave it pending forever."""
        return slurm_request_problems(self.params)

    def _wait(self, job: Any) -> Optional[str]:
        """Until the job has a result or has left SLURM's queue without one. submitit's own wait asks
        sacct, which answers nothing on clusters without accounting storage (the local test
        cluster): a cancelled job would be waited for forever. squeue knows either way."""
        result = job.paths.result_pickle
        while not result.exists():
            state = _squeue_state(job.job_id)
            if state is not None and state not in ACTIVE_STATES:
                deadline = time.monotonic() + self.RESULT_GRACE_S
                while not result.exists() and time.monotonic() < deadline:
                    time.sleep(1.0)
                if result.exists():
                    break
                again = _squeue_state(job.job_id)  # still over, not between a requeue's states
                if again is not None and again not in ACTIVE_STATES:
                    return (
                        f"ended without a result (SLURM state {again or state or 'gone from the queue'}); "
                        f"its log: {job.paths.stderr}\n{_tail(job.paths.stderr)}"
                    )
            time.sleep(self.POLL_S)
        return None


class LocalLauncher(_GatherEach, base.LocalLauncher):
    def resources(self) -> Dict[str, Any]:
        return {"runs_here": True, "memory_gb": None, "gpus_per_node": None}


def _sinfo(*args: str) -> Optional[List[List[str]]]:
    try:
        proc = subprocess.run(["sinfo", "-h", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return [line.split() for line in proc.stdout.splitlines() if line.strip()]


def _gres_gpus(gres: str) -> int:
    """GPUs per node from sinfo's %G (e.g. ``gpu:a100:4(S:0-1)``, ``gpu:8``, ``(null)``)."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def slurm_request_problems(params: Dict[str, Any]) -> List[str]:
    """Problems of a launcher request against the partition's nodes; [] when it fits, or when
    SLURM cannot be asked from here (then sbatch's own answer will say)."""
    partition = params.get("partition")
    listed = _sinfo("-o", "%R")
    if listed is None:
        log.info("sinfo is not available here: the SLURM request is not checked before submission")
        return []
    names = sorted({row[0].rstrip("*") for row in listed})
    if partition and partition not in names:
        return [f"hydra.launcher.partition={partition!r}: no such partition; allowed values are {', '.join(names)}"]
    rows = _sinfo("-o", "%c %m %G", *(["-p", str(partition)] if partition else []))
    if not rows:
        return []
    cpus = max(int(r[0].rstrip("+")) for r in rows)
    mem_mb = max(int(r[1].rstrip("+")) for r in rows)
    gpus = max(_gres_gpus(r[2]) for r in rows)
    where = f"partition {partition!r}" if partition else "the default partition"
    problems = []
    want_cpus = int(params.get("cpus_per_task") or 1) * int(params.get("tasks_per_node") or 1)
    if want_cpus > cpus:
        problems.append(
            f"hydra.launcher.cpus_per_task={params.get('cpus_per_task')} (x tasks_per_node="
            f"{params.get('tasks_per_node') or 1}): the nodes of {where} have at most {cpus} CPUs"
        )
    mem_gb = params.get("mem_gb")
    if mem_gb and float(mem_gb) * 1024 > mem_mb:
        problems.append(f"hydra.launcher.mem_gb={mem_gb}: the nodes of {where} have at most {mem_mb / 1024:.1f} GB")
    want_gpus = int(params.get("gpus_per_node") or 0)
    if want_gpus > gpus:
        problems.append(f"hydra.launcher.gpus_per_node={want_gpus}: the nodes of {where} have {gpus or 'no'} GPUs")
    return problems


# squeue states of a job that may still produce a result (a requeued job goes back to PENDING).
ACTIVE_STATES = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "PREEMPTED",
    "SIGNALING",
    "STAGE_OUT",
    "RESV_DEL_HOLD",
}


def _squeue_state(job_id: str) -> Optional[str]:
    """State of job "<id>" or array task "<id>_<task>"; "" once SLURM has forgotten it; None when
    squeue could not answer. Asks for the whole array one task per line (-r): a pending array is
    otherwise listed as "<id>_[0-7]", which names no task."""
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-r", "-t", "all", "-j", job_id.split("_")[0], "-o", "%i %T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return "" if "Invalid job id" in proc.stderr else None
    states = dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2)
    return states.get(job_id, "")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
