"""submitit launchers (``conf/hydra/launcher/*.yaml``) that gather every job's result on its own.

hydra-submitit-launcher 1.2.0 ends ``launch()`` with ``[j.results()[0] for j in jobs]``: the first
job that produced no result (scancel, OOM kill, node failure → ``UncompletedJobError``) raises out
of the list, so the results of the batch are lost and nobody waits for the jobs after it. Here each
job is waited for separately and a lost job becomes a FAILED ``JobReturn`` carrying the reason;
the sweep (``sae_sweep.sweep.GridSweep``) counts it, closes its MLflow run and keeps going.

Everything else (the executor's parameters, the job body, ``checkpoint()`` for requeues) is the
plugin's own, so the presets keep ``defaults: [submitit_slurm]`` and every plugin key validates.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, List, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as base
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

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
        init_params = {"folder": self.params["submitit_folder"],
                       **{f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in init_keys}}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{
            k if k in shared else f"{self._EXECUTOR}_{k}": v
            for k, v in self.params.items() if k not in init_keys | {"submitit_folder"}
        })
        return executor

    @staticmethod
    def _gather(job: Any, overrides: List[str]) -> JobReturn:
        """Wait for one job; a job that ended without a result is a FAILED JobReturn, not a raise."""
        try:
            return job.results()[0]
        except Exception as e:  # UncompletedJobError (killed, lost), or a result that cannot be unpickled
            reason = f"job {job.job_id} ended without a result (state {job.state}): {e}"[:MAX_REASON]
            log.error("%s", reason)
            ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
            ret.return_value = RuntimeError(reason)
            return ret


class SlurmLauncher(_GatherEach, base.SlurmLauncher):
    pass


class LocalLauncher(_GatherEach, base.LocalLauncher):
    pass
