"""The Hydra task: one job = one grid point, or a pack of points that share a batch stream.

Lifecycle (the same for one point and for a pack): validate -> skip points whose run key already
FINISHED -> open (or continue) each point's MLflow run -> ``pipeline.execute`` (LM + text ->
activation cache -> training -> evals) -> close each run FINISHED or FAILED with its reason.
A preempted job (SIGTERM/SIGUSR2) leaves its runs KILLED and its checkpoints on disk, and the
requeued job continues both.

The task function lives here rather than in ``__main__`` because Hydra names jobs (and SLURM
job names and log files) after the task function's module.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

import sae_sweep.evals  # noqa: F401  (registers every eval's settings schema before Hydra composes)
import sae_sweep.sae  # noqa: F401  (registers every trainer's schema)
from sae_sweep import config as C
from sae_sweep.files import atomic_write

log = logging.getLogger("sae_sweep")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


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


def model_shape(cfg: DictConfig) -> C.ModelShape:
    """The real depth and width of the point's model (config.json or the built-in model's recipe;
    no weights loaded); for ``dataset=synthetic``, no layers and the planted dimension."""
    if cfg.dataset.kind == "synthetic":
        from sae_sweep.synthetic_data import synthetic_params

        return C.ModelShape(None, int(synthetic_params(cfg.dataset)["d"]))
    from sae_sweep.lm import model_shape as lm_shape

    return C.ModelShape(*lm_shape(cfg.model, C.cache_dir(cfg)))


def validate_point(cfg: DictConfig, check_availability: bool = True) -> None:
    """Raise ConfigError listing every problem of a grid point: its values (``config.validate``,
    given the model's real shape) and, with ``check_availability``, whether its model and
    dataset can be read here (an offline hub id fails now, before any run or cache exists)."""
    problems: List[str] = []
    try:
        shape: Optional[C.ModelShape] = model_shape(cfg)
    except Exception as e:  # an unavailable model: lm.py's message says how to point at local files
        shape = None
        problems.append(str(e))
    try:
        C.validate(cfg, shape)
    except C.ConfigError as e:
        problems = e.problems + problems
    if check_availability and not problems and cfg.dataset.kind != "synthetic":
        problems += _unavailable(cfg)
    C.fail_if(problems)


def _unavailable(cfg: DictConfig) -> List[str]:
    from sae_sweep.text import check_dataset_available

    found = []
    try:
        _model_check(str(cfg.model.hf_id), cfg.model.revision, str(C.cache_dir(cfg)))
    except Exception as e:
        found.append(str(e))
    if not found and cfg.dataset.kind in ("hub", "local"):
        try:
            check_dataset_available(cfg.dataset)
        except Exception as e:
            found.append(str(e))
    return found


@functools.lru_cache(maxsize=64)
def _model_check(hf_id: str, revision: Optional[str], cache_root: str) -> None:
    """Whether a model can be loaded here (checked once per id per process: a grid asks often)."""
    from sae_sweep.lm import check_model_available

    check_model_available(OmegaConf.create({"hf_id": hf_id, "revision": revision}), cache_root)


def pack_file(output_dir: Path, parent_run_id: str, leader_key: str) -> Path:
    """Where the sweeper leaves a pack's member configs for the pack's (leader's) job."""
    return Path(output_dir) / "packs" / str(parent_run_id) / f"{leader_key}.yaml"


def write_pack(path: Path, cfgs: Sequence[DictConfig]) -> None:
    atomic_write(path, OmegaConf.to_yaml(OmegaConf.create({"members": [OmegaConf.to_container(c, resolve=True)
                                                                      for c in cfgs]})))


def read_pack(path: Path) -> List[DictConfig]:
    return list(OmegaConf.load(path).members)


def run_job(cfg: DictConfig) -> Dict[str, Any]:
    """Run one grid point, or (``sweep.pack=true``, a pack file left by the sweeper) the pack the
    point leads. One point: {"status": "finished"|"skipped", "run_id", "run_key"}, and a failure
    raises. A pack: {"status": "packed", "members": {run_key: that dict, or status "failed" with
    "error"}}: each member ends FINISHED or FAILED on its own."""
    cfgs = [cfg]
    if cfg.sweep.pack and cfg.tracking.parent_run_id:
        path = pack_file(C.output_dir(cfg), cfg.tracking.parent_run_id, C.run_key(cfg))
        if path.exists():
            cfgs = read_pack(path)
    results = run_points(cfgs)
    if len(cfgs) > 1:  # the job's return value travels back pickled: reasons as text only
        return {"status": "packed", "members": {k: {n: v for n, v in r.items() if n != "exception"}
                                                for k, r in results.items()}}
    (result,) = results.values()
    if result["status"] == "failed":
        raise result["exception"]
    return result


def run_points(cfgs: Sequence[DictConfig]) -> Dict[str, Dict[str, Any]]:
    """The job lifecycle for points that read one batch stream; {run_key: result}."""
    from sae_sweep.pipeline import Point, execute
    from sae_sweep.tracking import Tracker
    from sae_sweep.train import Interrupted

    for cfg in cfgs:
        validate_point(cfg)
    tracker = Tracker(C.tracking_uri(cfgs[0]))
    results: Dict[str, Dict[str, Any]] = {}
    todo = []
    for cfg in cfgs:
        key = C.run_key(cfg)
        exp_id = tracker.experiment_id(cfg.tracking.experiment)
        done = tracker.find_runs(exp_id, run_key=key, statuses=["FINISHED"]) if cfg.tracking.skip_finished else []
        if done:
            log.info("skipping: run key %s already FINISHED as run %s", key, done[0].info.run_id)
            results[key] = {"status": "skipped", "run_id": done[0].info.run_id, "run_key": key}
            continue
        # A run of this key that did not finish (preempted, crashed) is continued, not duplicated.
        prior = tracker.find_runs(exp_id, run_key=key, statuses=["RUNNING", "KILLED", "FAILED"])
        todo.append((cfg, key, prior[0].info.run_id if prior else None))
    if not todo:
        return results

    device = C.resolve_device(todo[0][0].device)
    d_in = model_shape(todo[0][0]).d_model
    points: List[Point] = []
    names: Dict[str, str] = {}
    with PreemptionGuard() as guard:
        try:
            for cfg, key, resume_id in todo:
                steps = C.total_steps(cfg)
                name = run_name(cfg, C.d_sae_for(cfg.sae, d_in), steps)
                run = tracker.child(cfg.tracking.experiment, name, key, cfg.tracking.parent_run_id, resume_id)
                names[key] = name
                points.append(Point(cfg, key, run))
                run.set_tags(job_tags(cfg, key))
                run.log_params({**C.flat_params(cfg), "derived.d_sae": C.d_sae_for(cfg.sae, d_in),
                                "derived.total_steps": steps})
                run.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
            outcomes = execute(points, device)
        except Interrupted as e:
            if guard.signum is None:
                _close_all(points, e)
                raise
            log.warning("%s; handing over to %s", e, "submitit to requeue" if guard.requeue else "SLURM")
            stop = SystemExit(128 + guard.signum)
            for p in points:  # KILLED: the requeued job continues every point
                p.run.set_tags({"interrupted_at_step": e.step})
                p.run.close(stop)
            guard.hand_over()  # SystemExit
            raise
        except BaseException as e:  # a shared failure (cache build, LM load): every point FAILED
            _close_all(points, e)
            raise
    for p, outcome in zip(points, outcomes):
        if isinstance(outcome, BaseException):
            p.run.close(outcome)  # this point FAILED, with the reason
            log.error("%s FAILED (run %s): %s: %s", names[p.key], p.run.run_id, type(outcome).__name__, outcome)
            results[p.key] = {"status": "failed", "run_id": p.run.run_id, "run_key": p.key,
                              "error": f"{type(outcome).__name__}: {outcome}", "exception": outcome}
        else:
            p.run.close()
            log.info("%s FINISHED (run %s)", names[p.key], p.run.run_id)
            results[p.key] = {"status": "finished", "run_id": p.run.run_id, "run_key": p.key}
    return results


def _close_all(points: Sequence[Any], error: BaseException) -> None:
    for p in points:
        p.run.close(error)


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
