"""The Hydra task: one job = one grid point.

Lifecycle: validate → skip if this run key already FINISHED → open (or continue) the MLflow run →
LM + text → activation cache (built once, shared) → train (resumable) → evals → artifacts.
Anything that raises ends the run FAILED with the reason; a preempted job (SIGTERM/SIGUSR2 →
SystemExit) leaves it KILLED and its checkpoint on disk, and the requeued job continues both.

The task function lives here rather than in ``__main__`` because Hydra names jobs (and SLURM
job names and log files) after the task function's module.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from sae_sweep import config as C

log = logging.getLogger("sae_sweep")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise C.ConfigError(f"device={name!r}: CUDA is not available on this machine; allowed values here: auto, cpu")
    return name


def run_name(cfg: DictConfig, d_sae: int, steps: int) -> str:
    """FaithfulSAE-style name, readable in the MLflow UI."""
    from sae_sweep.lm import hook_name

    lr = cfg.trainer.get("lr")
    k = cfg.sae.k
    if cfg.dataset.kind == "synthetic":  # no model, no hook: name the planted dictionary instead
        syn = cfg.dataset.synthetic
        return (f"planted-d{syn.d}-n{syn.n_features}_{d_sae}_{cfg.trainer.name}_{k}_{lr}_{cfg.seed}_"
                f"{cfg.dataset.name}_{steps}")
    return (f"{cfg.model.name}_{hook_name(cfg.layer, cfg.hook)}_{d_sae}_{cfg.trainer.name}_{k}_{lr}_"
            f"{cfg.seed}_{cfg.dataset.name}_{cfg.dataset.context_size}_{steps}")


def job_tags(cfg: DictConfig, key: str) -> Dict[str, str]:
    tags = {
        "model": cfg.model.name, "layer": str(cfg.layer), "hook": cfg.hook, "dataset": cfg.dataset.name,
        "seed": str(cfg.seed), "trainer": cfg.trainer.name, "config_hash": key,
        "seed_group": C.seed_group_key(cfg), "git_commit": _git_commit(),
    }
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        tags["hydra_job_num"] = str(hc.job.get("num", ""))
        tags["hydra_job_id"] = str(hc.job.get("id", ""))
        tags["hydra_output_dir"] = str(hc.runtime.output_dir)
    except ValueError:
        pass
    return tags


def total_steps(cfg: DictConfig) -> int:
    return max(1, int(cfg.train.tokens) // int(cfg.trainer.batch_size))


def run_job(cfg: DictConfig) -> Dict[str, Any]:
    """Run one grid point end to end. Returns {"status": "finished"|"skipped", "run_id", "run_key"}."""
    from sae_sweep.tracking import Tracker

    C.validate(cfg)
    key = C.run_key(cfg)
    tracker = Tracker(C.tracking_uri(cfg))
    exp_id = tracker.experiment_id(cfg.tracking.experiment)

    if cfg.tracking.skip_finished:
        done = tracker.find_runs(exp_id, run_key=key, statuses=["FINISHED"])
        if done:
            log.info("skipping: run key %s already FINISHED as run %s", key, done[0].info.run_id)
            return {"status": "skipped", "run_id": done[0].info.run_id, "run_key": key}

    # A run of this key that did not finish (preempted, crashed) is continued, not duplicated.
    prior = tracker.find_runs(exp_id, run_key=key, statuses=["RUNNING", "KILLED", "FAILED"])
    resume_id = prior[0].info.run_id if prior else None

    from sae_sweep.lm import model_shape

    if cfg.dataset.kind == "synthetic":
        d_model = int(cfg.dataset.synthetic.d)
    else:
        _, d_model = model_shape(cfg.model, C.cache_dir(cfg))
    d_sae = C.resolved_d_sae(cfg, d_model)
    name = run_name(cfg, d_sae, total_steps(cfg))

    with tracker.child(cfg.tracking.experiment, name, key, cfg.tracking.parent_run_id, resume_id) as run:
        run.set_tags(job_tags(cfg, key))
        run.log_params({**C.flat_params(cfg), "derived.d_sae": d_sae, "derived.total_steps": total_steps(cfg)})
        run.tracker.log_text(run.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
        from sae_sweep.pipeline import execute

        execute(cfg, run, key)
        run.finish()
    log.info("run %s (%s) FINISHED", run.run_id, name)
    return {"status": "finished", "run_id": run.run_id, "run_key": key}


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> Dict[str, Any]:
    try:
        return run_job(cfg)
    except C.ConfigError as e:
        # A single run: print the message, not a traceback (multiruns validate in the sweeper).
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().mode.name == "RUN":
            print(f"sae_sweep: {e}", file=sys.stderr)
            sys.exit(2)
        raise
