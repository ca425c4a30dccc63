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


class PreemptionGuard:
    """In a submitit job, SLURM's interrupt signals stop training at the next step, not mid-step.

    submitit's USR2 handler (preemption, time limit) resubmits the task, runs `scontrol requeue`
    and raises SystemExit wherever the job happens to be. Wrapped, a signal first asks the training
    loop to stop (`train.STOP`): it checkpoints and raises `Interrupted`, and `hand_over` then calls
    submitit's handler from a clean place. The SystemExit leaves the MLflow run KILLED, and the
    requeued job resumes both the checkpoint and that run. SIGTERM alone (`scontrol requeue`,
    scancel; SIGKILL follows after KillWait) stops the same way minus submitit's requeue: SLURM
    decides. Outside the training loop (cache build, evals) nobody polls: hand over at once.
    """

    ACT_WITHIN_S = 20.0  # a loop that has not stopped by then gets the signal handed over directly
    USR2_AFTER_TERM_S = 5.0

    def __init__(self) -> None:
        import signal

        self.usr = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        # Only under submitit (it sets SUBMITIT_FOLDER and installs a USR2 handler before the task).
        self.active = "SUBMITIT_FOLDER" in os.environ and callable(signal.getsignal(self.usr))
        self.saved: Dict[int, Any] = {}
        self.signum: Optional[int] = None  # the first signal received
        self.requeue = False  # USR2 received: submitit requeues (SIGTERM comes first in its interrupt)
        self.force = False  # the loop did not act in time: the next signal hands over at once
        self.lingering = False  # handing over without a requeue, waiting for a USR2
        self.requeuing = False  # submitit's handler called: later signals (SLURM's kill after the
        #                         requeue) must not requeue a second time

    def __enter__(self) -> "PreemptionGuard":
        import signal

        if self.active:
            from sae_sweep.train import STOP

            STOP.clear()
            for sig in (self.usr, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> bool:
        import signal

        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        return False

    def _on_signal(self, signum: int, frame: Any) -> None:
        import threading

        from sae_sweep.train import STOP

        if self.requeuing or (self.lingering and signum != self.usr):
            log.warning("got %s while handing over: ignored", signal_name(signum))
            return
        first = self.signum is None
        self.signum = self.signum or signum
        self.requeue = self.requeue or signum == self.usr
        if self.force or STOP.loops == 0:
            self.hand_over(frame)  # raises
        log.warning("got %s: stopping training at the next step to checkpoint", signal_name(signum))
        STOP.request()
        if first:
            timer = threading.Timer(self.ACT_WITHIN_S, self._resend_if_unseen, (signum,))
            timer.daemon = True
            timer.start()

    def _resend_if_unseen(self, signum: int) -> None:
        from sae_sweep.train import STOP

        if not STOP.seen:
            self.force = True
            os.kill(os.getpid(), signum)

    def hand_over(self, frame: Any = None) -> None:
        """Let submitit requeue (after USR2) or just exit; raises SystemExit or submitit's error."""
        if not self.requeue:
            # submitit's preemption (Job._interrupt) sends SIGTERM, then USR2: give the USR2 a moment
            # to arrive (its handler runs during the sleep and requeues) before exiting unrequeued.
            self.lingering = True
            time.sleep(self.USR2_AFTER_TERM_S)
        if self.requeue:
            self.requeuing = True
            self.saved[self.usr](self.usr, frame)  # checkpoint() → scontrol requeue → sys.exit
        raise SystemExit(128 + (self.signum or 15))


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def run_job(cfg: DictConfig) -> Dict[str, Any]:
    """Run one grid point end to end. Returns {"status": "finished"|"skipped", "run_id", "run_key"}.
    With `sweep.pack=true` the sweeper may hand this job a pack of points (see run_pack_job)."""
    from sae_sweep.tracking import Tracker

    C.validate(cfg)
    key = C.run_key(cfg)
    if cfg.sweep.pack and cfg.tracking.parent_run_id:
        from sae_sweep.packing import pack_file, read_pack

        path = pack_file(C.output_dir(cfg), cfg.tracking.parent_run_id, key)
        if path.exists():
            return run_pack_job(read_pack(path))
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

    from sae_sweep.pipeline import execute
    from sae_sweep.train import Interrupted

    with PreemptionGuard() as guard, \
            tracker.child(cfg.tracking.experiment, name, key, cfg.tracking.parent_run_id, resume_id) as run:
        run.set_tags(job_tags(cfg, key))
        run.log_params({**C.flat_params(cfg), "derived.d_sae": d_sae, "derived.total_steps": total_steps(cfg)})
        run.tracker.log_text(run.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
        try:
            execute(cfg, run, key)
        except Interrupted as e:
            if guard.signum is None:
                raise
            log.warning("%s; handing over to %s", e, "submitit to requeue" if guard.requeue else "SLURM")
            run.set_tags({"interrupted_at_step": e.step})
            guard.hand_over()  # SystemExit: the run ends KILLED and the requeued job continues it
        run.finish()
    log.info("run %s (%s) FINISHED", run.run_id, name)
    return {"status": "finished", "run_id": run.run_id, "run_key": key}


def run_pack_job(cfgs: list) -> Dict[str, Any]:
    """Grid points sharing a cache, seed and batch size (`packing.pack_key`), trained in one process
    from one reader. Each point keeps its own MLflow run, checkpoints, SAE and evals, and ends
    FINISHED or FAILED on its own. Returns {"status": "packed", "members": {run_key: result}}."""
    from sae_sweep.packing import run_pack
    from sae_sweep.tracking import Tracker
    from sae_sweep.train import Interrupted

    tracker = Tracker(C.tracking_uri(cfgs[0]))
    members: Dict[str, Any] = {}
    todo = []
    for cfg in cfgs:
        C.validate(cfg)
        key = C.run_key(cfg)
        exp_id = tracker.experiment_id(cfg.tracking.experiment)
        done = tracker.find_runs(exp_id, run_key=key, statuses=["FINISHED"]) if cfg.tracking.skip_finished else []
        if done:
            members[key] = {"status": "skipped", "run_id": done[0].info.run_id, "run_key": key}
            continue
        prior = tracker.find_runs(exp_id, run_key=key, statuses=["RUNNING", "KILLED", "FAILED"])
        todo.append((cfg, key, prior[0].info.run_id if prior else None))
    if not todo:
        return {"status": "packed", "members": members}

    cfg0 = todo[0][0]
    if cfg0.dataset.kind == "synthetic":
        d_in = int(cfg0.dataset.synthetic.d)
    else:
        from sae_sweep.lm import model_shape

        _, d_in = model_shape(cfg0.model, C.cache_dir(cfg0))
    runs = []
    with PreemptionGuard() as guard:
        try:
            for cfg, key, resume_id in todo:
                d_sae = C.resolved_d_sae(cfg, d_in)
                run = tracker.child(cfg.tracking.experiment, run_name(cfg, d_sae, total_steps(cfg)), key,
                                    cfg.tracking.parent_run_id, resume_id)
                runs.append(run)
                run.set_tags(job_tags(cfg, key))
                run.log_params({**C.flat_params(cfg), "derived.d_sae": d_sae, "derived.total_steps": total_steps(cfg)})
                run.tracker.log_text(run.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
            outcomes = run_pack([c for c, _, _ in todo], runs, [k for _, k, _ in todo],
                                resolve_device(str(todo[0][0].device)))
        except Interrupted as e:
            if guard.signum is None:
                for run in runs:
                    run.__exit__(type(e), e, e.__traceback__)
                raise
            stop = SystemExit(128 + guard.signum)
            for run in runs:  # KILLED: the requeued job continues every member
                run.set_tags({"interrupted_at_step": e.step})
                run.__exit__(SystemExit, stop, None)
            guard.hand_over()
            raise
        except BaseException as e:
            for run in runs:
                run.__exit__(type(e), e, e.__traceback__)
            raise
    for (cfg, key, _), run, outcome in zip(todo, runs, outcomes):
        if isinstance(outcome, BaseException):
            run.__exit__(type(outcome), outcome, outcome.__traceback__)  # this member FAILED, with reason
            members[key] = {"status": "failed", "run_id": run.run_id, "run_key": key,
                            "error": f"{type(outcome).__name__}: {outcome}"}
        else:
            run.finish()
            members[key] = {"status": "finished", "run_id": run.run_id, "run_key": key}
    return {"status": "packed", "members": members}


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
