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

import contextlib
import functools
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

import sae_sweep.data.sources  # noqa: F401  (registers every text source: the allowed dataset.kind values)
import sae_sweep.evals  # noqa: F401  (registers every eval's settings schema before Hydra composes)
import sae_sweep.sae  # noqa: F401  (registers every trainer's schema)
from sae_sweep import config as C
from sae_sweep.config import CONF_DIR
from sae_sweep.data.sources import dataset_problems, is_text, source_for
from sae_sweep.job.disk import disk_problems, explain_disk_full, writable_problems
from sae_sweep.tracking.status import RunStatus
from sae_sweep.util.disk import DiskFull
from sae_sweep.util.files import atomic_write

log = logging.getLogger("sae_sweep")


def _git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or "unknown"
        )
    except Exception:
        return "unknown"


def run_name(cfg: DictConfig, d_sae: int, steps: int) -> str:
    """FaithfulSAE-style name, readable in the MLflow UI."""
    from sae_sweep.models.lm import hook_name

    lr = cfg.trainer.get("lr")
    k = cfg.sae.k
    if cfg.dataset.kind == "synthetic":  # no model, no hook: name the planted dictionary instead
        syn = cfg.dataset.synthetic
        return (
            f"planted-d{syn.d}-n{syn.n_features}_{d_sae}_{cfg.trainer.name}_{k}_{lr}_{cfg.seed}_"
            f"{cfg.dataset.name}_{steps}"
        )
    return (
        f"{cfg.model.name}_{hook_name(cfg.layer, cfg.hook)}_{d_sae}_{cfg.trainer.name}_{k}_{lr}_"
        f"{cfg.seed}_{cfg.dataset.name}_{cfg.dataset.context_size}_{steps}"
    )


def job_tags(cfg: DictConfig, key: str, weights: Optional[Any] = None) -> Dict[str, str]:
    """The run's tags; ``weights``: the point's ``ResolvedWeights`` (None: no LM, dataset=synthetic)."""
    tags = {
        "model": cfg.model.name,
        "layer": str(cfg.layer),
        "hook": cfg.hook,
        "dataset": cfg.dataset.name,
        "seed": str(cfg.seed),
        "trainer": cfg.trainer.name,
        "config_hash": key,
        "seed_group": C.seed_group_key(cfg, point_identity(cfg, weights)),
        "git_commit": _git_commit(),
        # which weights ran: the hub's, a local copy, the built-in model, or a GGUF stand-in (its label)
        "model_weights": weights.label if weights is not None else str(cfg.model.weights),
    }
    try:
        from hydra.core.hydra_config import HydraConfig

        hc: Any = HydraConfig.get()  # a DictConfig at run time (typed as its dataclass)
    except ValueError:  # not inside a Hydra app
        return tags
    # select: "" where a value is unset (a single run has no job num/id; a composed config no runtime)
    for tag, key in (
        ("hydra_job_num", "job.num"),
        ("hydra_job_id", "job.id"),
        ("hydra_output_dir", "runtime.output_dir"),
    ):
        tags[tag] = str(OmegaConf.select(hc, key, default=""))
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
        self.timer: Optional[Any] = None  # the resend of the first signal; cancelled on exit
        self.installed = threading.Lock()  # held while handlers are restored or a signal resent

    def __enter__(self) -> PreemptionGuard:
        import signal

        if self.active:
            from sae_sweep.training.loop import STOP

            STOP.clear()
            for sig in (self.usr, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> Literal[False]:
        import signal

        # A resend outliving the guard would hit a process whose handler is restored, and kill it.
        with self.installed:
            if self.timer is not None:
                self.timer.cancel()
            for sig, handler in self.saved.items():
                signal.signal(sig, handler)
            self.saved.clear()
        return False

    def _on_signal(self, signum: int, frame: Any) -> None:
        from sae_sweep.training.loop import STOP

        if self.requeuing or (self.lingering and signum != self.usr):
            log.warning("got %s while handing over: ignored", signal_name(signum))
            return
        first = self.signum is None
        self.signum = self.signum or signum
        self.requeue = self.requeue or signum == self.usr
        if STOP.seen:  # the loop has stopped and checkpointed: run_points records that, then hands over
            log.warning("got %s: handing over once the runs are recorded", signal_name(signum))
            return
        if self.force or STOP.loops == 0:
            self.hand_over(frame)  # raises
        log.warning("got %s: stopping training at the next step to checkpoint", signal_name(signum))
        STOP.request()
        if first:
            self.timer = threading.Timer(self.ACT_WITHIN_S, self._resend_if_unseen, (signum,))
            self.timer.daemon = True
            self.timer.start()

    def _resend_if_unseen(self, signum: int) -> None:
        from sae_sweep.training.loop import STOP

        with self.installed:
            if self.saved and not STOP.seen:  # still installed: our handler gets it
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


def model_shape(cfg: DictConfig, weights: Optional[Any] = None) -> C.ModelShape:
    """The real depth and width of the point's model (config.json or the built-in model's recipe;
    no weights loaded); for ``dataset=synthetic``, no layers and the planted dimension."""
    if cfg.dataset.kind == "synthetic":
        from sae_sweep.activations.synthetic import synthetic_params

        return C.ModelShape(None, int(synthetic_params(cfg.dataset)["d"]))
    from sae_sweep.models.lm import model_shape as lm_shape

    return C.ModelShape(*lm_shape(cfg.model, C.cache_dir(cfg), weights))


def point_identity(cfg: DictConfig, weights: Optional[Any]) -> Optional[Dict[str, Any]]:
    """What a point's weights add to its run key: those of the weights it loads (``weights``, from
    ``validate_point``); for ``dataset=synthetic`` (no LM loaded) those its config names."""
    if weights is None and cfg.dataset.kind == "synthetic":
        from sae_sweep.models.weights import resolve

        return resolve(cfg.model, C.cache_dir(cfg), check=False).identity
    return None if weights is None else weights.identity


def point_weights(cfg: DictConfig) -> Any:
    """The weights a point's job loads (``models.weights.ResolvedWeights``), checked to be available
    here; resolved once per model per process (a grid asks often). ModelUnavailable when none."""
    return _model_check(
        json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True), str(C.cache_dir(cfg))
    )


def pinned(cfg: DictConfig, weights: Optional[Any]) -> DictConfig:
    """A copy of ``cfg`` naming the weights source it was validated with (``model.weights``): what a
    job records (config artifact, params) and what a job started elsewhere loads."""
    if weights is None:
        return cfg
    out = cfg.copy()
    with open_dict(out):
        out.model.weights = weights.source
    return out


def validate_point(
    cfg: DictConfig,
    check_availability: bool = True,
    runs_here: bool = True,
    memory_gb: Optional[float] = None,
    gpus_per_node: Optional[int] = None,
) -> Optional[Any]:
    """Raise ConfigError listing every problem of a grid point: its values (``config.validate``,
    given the model's real shape) and, with ``check_availability``, whether its model, dataset and
    tracking store can be used, and whether the job can have what it asks for: a GPU for
    ``device=cuda`` (on this machine when ``runs_here``, else ``gpus_per_node`` from the launcher)
    and the memory its budgets need (``memory_gb``: the launcher's; default, when it runs here:
    what this machine has available). Returns the point's ``ResolvedWeights`` when availability
    was checked and the point loads a model, else None."""
    problems: List[str] = []
    weights = None
    try:
        shape: Optional[C.ModelShape] = model_shape(cfg)
    except C.ConfigError:  # a bad model node: config.validate names each bad key
        shape = None
    except Exception as e:  # an unavailable model: lm.py's message says how to point at local files
        shape = None
        problems.append(str(e))
    try:
        C.validate(cfg, shape)
    except C.ConfigError as e:
        problems = e.problems + problems
    problems += dataset_problems(cfg.dataset)  # its kind (registered sources) and the settings that kind needs
    if check_availability and not problems:
        problems += writable_problems(cfg)
        problems += _device_problems(cfg, runs_here, gpus_per_node)
        problems += _memory_problems(
            cfg, shape, memory_gb if memory_gb is not None or not runs_here else available_memory_gb()
        )
        if not problems and is_text(cfg.dataset.kind):  # synthetic: no LM, no text
            try:
                weights = point_weights(cfg)
            except Exception as e:  # the weights source's message says how to get them
                problems.append(str(e))
        if not problems and is_text(cfg.dataset.kind):
            problems += _unavailable(cfg)
        if not problems:
            problems += _store_problems(C.tracking_uri(cfg), store_wait_s(cfg))
        if not problems and shape is not None:
            problems += disk_problems([cfg], [shape])
    C.fail_if(problems)
    return weights


def _device_problems(cfg: DictConfig, runs_here: bool, gpus_per_node: Optional[int]) -> List[str]:
    device = str(cfg.device)
    if not device.startswith("cuda"):
        return []
    if runs_here:
        try:
            C.resolve_device(device)
        except C.ConfigError as e:
            return [str(e)]
        return []
    if not gpus_per_node:
        return [
            f"device={device!r}: the launcher asks for no GPU (hydra.launcher.gpus_per_node={gpus_per_node}); "
            f"set hydra.launcher.gpus_per_node=1 or device=auto"
        ]
    return []


def available_memory_gb() -> Optional[float]:
    """Memory this machine can still give a job (MemAvailable), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def memory_needed_gb(cfg: DictConfig, d_in: int) -> Dict[str, float]:
    """The biggest host allocations a job's budgets imply (a floor: the LM's weights and the
    framework come on top): its token windows (int64 while packed, plus the int32 file buffer),
    and the SAE with its gradients and Adam moments plus the [batch, d_sae] pre-activations."""
    d_sae = C.d_sae_for(cfg.sae, d_in)
    return {
        "token windows": (C.cache_tokens(cfg) + int(cfg.dataset.eval_tokens)) * 12 / 2**30,
        "SAE training": (2 * d_in * d_sae * 4 * 4 + int(cfg.trainer.batch_size) * d_sae * 4) / 2**30,
    }


def _memory_problems(cfg: DictConfig, shape: Optional[C.ModelShape], limit_gb: Optional[float]) -> List[str]:
    if limit_gb is None or shape is None:
        return []
    need = memory_needed_gb(cfg, shape.d_model)
    if sum(need.values()) <= limit_gb:
        return []
    parts = ", ".join(f"{k} {v:,.1f} GB" for k, v in need.items())
    key = (
        f"dataset.tokens={C.cache_tokens(cfg)}"
        if need["token windows"] >= need["SAE training"]
        else f"sae.d_sae={C.d_sae_for(cfg.sae, shape.d_model)} (trainer.batch_size={cfg.trainer.batch_size})"
    )
    return [
        f"{key}: the job needs at least {sum(need.values()):,.1f} GB of memory ({parts}); it may use "
        f"{limit_gb:,.1f} GB (hydra.launcher.mem_gb, or what this machine has free); lower the budget or "
        f"ask for more memory"
    ]


def memory_use() -> Dict[str, str]:
    """The job's peak memory (VmHWM) and, under SLURM, its memory limit, as run tags; a job that
    came within 20% of its limit says so (``memory.near_limit``): size the preset up."""
    tags: Dict[str, str] = {}
    try:
        with open("/proc/self/status") as fh:
            peak_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return tags
    peak = peak_kb / 2**20
    tags["memory.peak_gb"] = f"{peak:.2f}"
    per_node, per_cpu = os.environ.get("SLURM_MEM_PER_NODE"), os.environ.get("SLURM_MEM_PER_CPU")
    limit = None
    if per_node:
        limit = int(per_node) / 1024
    elif per_cpu:
        limit = int(per_cpu) * int(os.environ.get("SLURM_CPUS_ON_NODE", "1")) / 1024
    if limit:
        tags["memory.limit_gb"] = f"{limit:.2f}"
        if peak > 0.8 * limit:
            tags["memory.near_limit"] = "true"
            log.warning(
                "peak memory %.2f GB is within 20%% of the job's %.2f GB limit: raise hydra.launcher.mem_gb",
                peak,
                limit,
            )
    return tags


def store_wait_s(cfg: DictConfig) -> float:
    """How long this process waits for a tracking server that does not answer: a sweep's job
    (its driver reached the server, so the server is likely restarting) waits; anything else fails
    at once."""
    from sae_sweep.tracking.runs import SERVER_RESTART_WAIT_S

    return SERVER_RESTART_WAIT_S if cfg.tracking.parent_run_id else 0.0


def _store_problems(uri: str, wait_s: float) -> List[str]:
    from sae_sweep.tracking.runs import TrackingStoreError, check_store

    try:
        check_store(uri, wait_s=wait_s)
    except TrackingStoreError as e:
        return [str(e)]
    return []


def _unavailable(cfg: DictConfig) -> List[str]:
    """Why the point's dataset cannot be read here, or cannot supply its training budget."""
    try:
        source = source_for(cfg.dataset)
        problems = list(source.availability())
        if problems:
            return problems
        if cfg.cache.mode == "stream":  # read once, no cache: the training tokens themselves
            return list(source.supply_problems(int(cfg.train.tokens), f"train.tokens={cfg.train.tokens} (streamed)"))
        budget = (
            f"dataset.tokens={cfg.dataset.tokens}"
            if cfg.dataset.tokens is not None
            else f"train.tokens={cfg.train.tokens} over train.epochs={cfg.train.epochs} pass(es) "
            f"(+{C.SPECIAL_MARGIN:.0%} for BOS/EOS)"
        )
        return list(source.supply_problems(C.cache_tokens(cfg), budget))
    except Exception as e:  # a source whose check itself fails: its reason, not a traceback
        return [f"dataset={cfg.dataset.name}: {type(e).__name__}: {e}"]


@functools.lru_cache(maxsize=64)
def _model_check(model: str, cache_root: str) -> Any:
    """``point_weights`` for one model node (JSON) and cache root."""
    from sae_sweep.models.weights import resolve

    return resolve(json.loads(model), cache_root)


GROUPS = ("model", "dataset", "trainer", "eval", "experiment")


def unknown_key_problems(argv: Sequence[str]) -> List[str]:
    """Command-line overrides of keys that do not exist (``trainer.lrr=1e-3``), with the allowed
    keys and the nearest one. Hydra would refuse them too, but only with "Key 'lrr' is not in
    struct"; this names what would work. Group choices are composed first (each value of a swept
    group), so ``trainer=relu trainer.l1_coeff=...`` is checked against the relu trainer."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException:
        return []  # Hydra's parser reports syntax errors itself
    choices = {
        o.key_or_group: (list(o.sweep_string_iterator()) if o.is_sweep_override() else [str(o.value())])
        for o in parsed
        if o.key_or_group in GROUPS
    }
    keys = [
        o.key_or_group
        for o in parsed
        if o.type.name == "CHANGE"
        and o.key_or_group not in GROUPS
        and "/" not in o.key_or_group
        and not o.key_or_group.startswith("hydra")
    ]
    if not keys:
        return []
    problems: List[str] = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        for key in keys:
            group = key.split(".", 1)[0]
            for value in choices.get(group, [None]):
                picks = [f"{g}={v[0] if g != group else value}" for g, v in choices.items() if g != group or value]
                try:
                    cfg = compose("config", overrides=picks)
                except HydraException:
                    break  # a bad group choice: Hydra lists the options
                problem = _missing_key(cfg, key)
                if problem:
                    problems.append(problem + (f" (with {group}={value})" if value else ""))
                    break
    return problems


_SCIENTIFIC = re.compile(r"(?<![\w.])([+-]?\d+(?:\.\d+)?[eE]\+?\d+)(?![\w.])")


def integral_numbers(argv: Sequence[str]) -> List[str]:
    """``argv`` with whole numbers written in scientific notation spelled as integers
    (``train.tokens=2e11`` -> ``train.tokens=200000000000``, sweeps too): Hydra reads ``2e11`` as a
    float, which an integer key refuses with OmegaConf's raw type error. Fractions (``1e-3``) and
    quoted values are left as they are; the schema then checks each value as usual."""
    from decimal import Decimal

    def whole(m: re.Match[str]) -> str:
        d = Decimal(m.group(1))
        return str(int(d)) if d == d.to_integral_value() else m.group(1)

    return [
        a
        if "=" not in a or a.startswith("-") or "'" in a or '"' in a
        else a.split("=", 1)[0] + "=" + _SCIENTIFIC.sub(whole, a.split("=", 1)[1])
        for a in argv
    ]


def scope_to_swept_groups(argv: Sequence[str]) -> List[str]:
    """``argv`` with each single value of a key inside a swept config group made a one-value sweep:
    ``-m trainer=hierarchical,adaptive_ortho trainer.mode=published`` becomes ``... trainer.mode=choice(published)``.
    Hydra composes a multirun's master config from the non-sweep overrides on the group's DEFAULT
    option (topk has no ``mode``: "Key 'mode' not in 'FastTopKParams'"); a sweep override is applied
    per point instead, where the swept option is chosen. Keys a swept option lacks are refused before
    this by ``unknown_key_problems``, naming the option."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if not any(a in ("-m", "--multirun") for a in argv):
        return list(argv)
    try:
        parsed = {
            a: OverridesParser.create().parse_overrides([a])[0] for a in argv if "=" in a and not a.startswith("-")
        }
    except HydraException:
        return list(argv)  # Hydra's parser reports syntax errors itself
    swept = {o.key_or_group for o in parsed.values() if o.key_or_group in GROUPS and o.is_sweep_override()}
    out = []
    for a in argv:
        o = parsed.get(a)
        if (
            o is not None
            and o.type.name == "CHANGE"
            and not o.is_sweep_override()
            and o.key_or_group.split(".", 1)[0] in swept
            and "." in o.key_or_group
        ):
            key, value = a.split("=", 1)
            a = f"{key}=choice({value})"
        out.append(a)
    return out


def _missing_key(cfg: DictConfig, key: str) -> Optional[str]:
    node: Any = cfg
    path: List[str] = []
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            where = ".".join(path)
            allowed = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
            return (
                f"{key}: unknown setting{C.nearest(part, allowed)}; allowed"
                f"{' under ' + where if where else ''}: {', '.join(map(str, allowed))}"
            )
        node, path = node[part], path + [part]
    return None


def pack_file(output_dir: Path, parent_run_id: str, leader_key: str) -> Path:
    """Where the sweeper leaves a pack's member configs for the pack's (leader's) job."""
    return Path(output_dir) / "packs" / str(parent_run_id) / f"{leader_key}.yaml"


def write_pack(path: Path, cfgs: Sequence[DictConfig]) -> None:
    atomic_write(
        path, OmegaConf.to_yaml(OmegaConf.create({"members": [OmegaConf.to_container(c, resolve=True) for c in cfgs]}))
    )


def read_pack(path: Path) -> List[DictConfig]:
    return list(OmegaConf.load(path).members)


def run_job(cfg: DictConfig) -> Dict[str, Any]:
    """Run one grid point, or (``sweep.pack=true``, a pack file left by the sweeper) the pack the
    point leads. One point: {"status": RunStatus.FINISHED|SKIPPED|BUSY, "run_id", "run_key"}, and a
    failure raises. A pack: {"members": {run_key: that dict, or status FAILED with "error"}}: each
    member ends FINISHED or FAILED on its own."""
    cfgs = [cfg]
    if cfg.sweep.pack and cfg.tracking.parent_run_id:
        weights = None if cfg.dataset.kind == "synthetic" else point_weights(cfg)
        path = pack_file(C.output_dir(cfg), cfg.tracking.parent_run_id, C.run_key(cfg, point_identity(cfg, weights)))
        if path.exists():
            cfgs = read_pack(path)
    results = run_points(cfgs)
    if len(cfgs) > 1:  # the job's return value travels back pickled: reasons as text only
        return {"members": {k: {n: v for n, v in r.items() if n != "exception"} for k, r in results.items()}}
    (result,) = results.values()
    if result["status"] == RunStatus.FAILED:
        raise result["exception"]
    if result["status"] == RunStatus.BUSY and _run_mode():
        raise PointBusy(result["reason"])
    return result


class PointBusy(RuntimeError):
    """Another process is running this grid point now (its lock names host, pid, SLURM job)."""


def point_lock(cfg: DictConfig, key: str) -> Path:
    """The lock a process holds while it runs a grid point (beside its checkpoints)."""
    return C.output_dir(cfg) / "locks" / f"{key}.lock"


def _run_mode() -> bool:
    """A single run (python -m sae_sweep ... without -m), not a job of a multirun."""
    from hydra.core.hydra_config import HydraConfig

    try:
        mode = HydraConfig.get().mode
        return mode is not None and mode.name == "RUN"
    except ValueError:  # not inside Hydra (tests, scripts)
        return False


def run_points(cfgs: Sequence[DictConfig]) -> Dict[str, Dict[str, Any]]:
    """The job lifecycle for points that read one batch stream; {run_key: result}. A point that
    another process is running is reported BUSY and left alone."""
    from sae_sweep.tracking.runs import Tracker

    weights = [validate_point(cfg) for cfg in cfgs]
    tracker = Tracker(C.tracking_uri(cfgs[0]), wait_s=store_wait_s(cfgs[0]))
    with contextlib.ExitStack() as held:  # one process per run key at a time, until its run is closed
        return _run_locked(cfgs, weights, tracker, held)


def _run_locked(
    cfgs: Sequence[DictConfig], weights: Sequence[Optional[Any]], tracker: Any, held: contextlib.ExitStack
) -> Dict[str, Dict[str, Any]]:
    from sae_sweep.job.execute import Point, execute
    from sae_sweep.training.loop import Interrupted
    from sae_sweep.util.locks import LockTimeout, OwnedLock, describe_owner

    results: Dict[str, Dict[str, Any]] = {}
    todo = []
    for cfg, w in zip(cfgs, weights):
        key = C.run_key(cfg, point_identity(cfg, w))
        try:
            held.enter_context(OwnedLock(point_lock(cfg, key), timeout=0))
        except LockTimeout as e:
            reason = (
                f"grid point {key} is running in another process ({describe_owner(e.owner)}); not started "
                f"here. If that process is gone, its lock ({e.path}) expires at once on the same host, "
                f"else two minutes after its last heartbeat"
            )
            log.warning("%s", reason)
            results[key] = {"status": RunStatus.BUSY, "run_key": key, "reason": reason}
            continue
        exp_id = tracker.experiment_id(cfg.tracking.experiment)
        done = (
            tracker.find_runs(exp_id, run_key=key, statuses=[RunStatus.FINISHED]) if cfg.tracking.skip_finished else []
        )
        if done:
            log.info("skipping: run key %s already FINISHED as run %s", key, done[0].info.run_id)
            results[key] = {"status": RunStatus.SKIPPED, "run_id": done[0].info.run_id, "run_key": key}
            continue
        # A run of this key that did not finish (preempted, crashed) is continued, not duplicated.
        prior = tracker.find_runs(exp_id, run_key=key, statuses=[RunStatus.RUNNING, RunStatus.KILLED, RunStatus.FAILED])
        for run in prior:
            if run.info.status == RunStatus.RUNNING:  # we hold its point's lock: no process runs it
                _close_stale(tracker, run, key)
        todo.append((cfg, w, key, prior[0].info.run_id if prior else None))
    if not todo:
        return results

    device = C.resolve_device(todo[0][0].device)
    d_in = model_shape(todo[0][0], todo[0][1]).d_model
    points: List[Point] = []
    names: Dict[str, str] = {}
    with PreemptionGuard() as guard:
        try:
            for cfg, w, key, resume_id in todo:
                steps = C.total_steps(cfg)
                name = run_name(cfg, C.d_sae_for(cfg.sae, d_in), steps)
                run = tracker.child(
                    cfg.tracking.experiment,
                    name,
                    key,
                    cfg.tracking.parent_run_id,
                    resume_id,
                    system_metrics_s=_system_metrics_s(cfg),
                )
                names[key] = name
                points.append(Point(cfg, key, run, w, d_in))
                run.set_tags(job_tags(cfg, key, w))
                ran = pinned(cfg, w)  # the config as it ran: the weights source it loads, named
                run.log_params(
                    {**C.flat_params(ran), "derived.d_sae": C.d_sae_for(cfg.sae, d_in), "derived.total_steps": steps}
                )
                run.log_checked_text(OmegaConf.to_yaml(ran, resolve=True), "config/config.yaml")  # evaluate reads it
            outcomes = execute(points, device)
        except Interrupted as e:
            if guard.signum is None:
                _close_all(points, e)
                raise
            log.warning("%s; handing over to %s", e, "submitit to requeue" if guard.requeue else "SLURM")
            stop = SystemExit(128 + guard.signum)
            for p in points:  # KILLED: the requeued job continues every point
                p.run.set_tags({"interrupted_at_step": e.step})
                p.run.close(stop)  # stops its system-metrics monitor first
                log.warning("%s KILLED for the requeue: %s", names[p.key], _url(p.run))
            guard.hand_over()  # SystemExit
            raise
        except BaseException as e:  # a shared failure (cache build, LM load): every point FAILED
            error = explain_disk_full(e, todo[0][0], d_in)
            _close_all(points, error)
            if error is not e:
                raise error from e
            raise
    memory = memory_use()
    try:
        for p, outcome in zip(points, outcomes):
            if isinstance(outcome, BaseException):
                outcome = explain_disk_full(outcome, p.cfg, d_in)
            p.run.set_tags(memory)
            if isinstance(outcome, BaseException):
                p.run.close(outcome)  # this point FAILED, with the reason
                log.error(
                    "%s FAILED (run %s): %s: %s\n  %s",
                    names[p.key],
                    p.run.run_id,
                    type(outcome).__name__,
                    outcome,
                    _url(p.run),
                )
                results[p.key] = {
                    "status": RunStatus.FAILED,
                    "run_id": p.run.run_id,
                    "run_key": p.key,
                    "error": f"{type(outcome).__name__}: {outcome}",
                    "exception": outcome,
                }
            else:
                p.run.close()
                log.info("%s FINISHED (run %s): %s", names[p.key], p.run.run_id, _url(p.run))
                results[p.key] = {"status": RunStatus.FINISHED, "run_id": p.run.run_id, "run_key": p.key}
    except BaseException as e:  # the store failed mid-way: no run (nor its monitor) is left open
        error = explain_disk_full(e, todo[0][0], d_in)
        _close_all([p for p in points if not p.run.closed], error)
        if error is not e:
            raise error from e
        raise
    return results


def _close_stale(tracker: Any, run: Any, key: str) -> None:
    """End FAILED, with the reason, a RUNNING run whose job is gone without closing it (killed, or
    its store was on a full disk): the caller holds the point's lock, so no process runs it. SLURM
    shows such a job FAILED too; the run is then continued like any failed one."""
    tags = run.data.tags
    who = " ".join(f"{t}={tags[t]}" for t in ("host", "pid", "slurm_job_id") if tags.get(t))
    log_dir = tags.get("hydra_output_dir")
    reason = (
        f"its job ({who or 'unknown process'}) ended without closing it"
        f"{'; its log is in ' + log_dir if log_dir else ''}. Found RUNNING by the next start of run key {key}"
    )
    log.warning("run %s was left RUNNING: %s; marking it FAILED", run.info.run_id, reason)
    tracker.set_tags(run.info.run_id, {"error": reason, "error_type": "JobGone", "closed_stale": reason})
    tracker.end(run.info.run_id, RunStatus.FAILED)


def _close_all(points: Sequence[Any], error: BaseException) -> None:
    """Close every point's run with ``error`` (each stops its system-metrics monitor first); a run
    the store refuses to close does not keep the others open or hide ``error``."""
    for p in points:
        try:
            p.run.close(error)
        except Exception as e:
            log.error("could not close run %s: %s: %s", p.run.run_id, type(e).__name__, e)


def _system_metrics_s(cfg: DictConfig) -> Optional[float]:
    """The system-metrics sampling interval of a job's runs, None when ``tracking.system_metrics`` is off."""
    return float(cfg.tracking.system_metrics_interval_s) if cfg.tracking.system_metrics else None


def _url(run: Any) -> str:
    """Where a person opens the run (``ChildRun.url``: a link that cannot be made is a warning,
    never the failure of the job that logs it)."""
    return run.url


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> Dict[str, Any]:
    try:
        return run_job(cfg)
    except C.ConfigError as e:
        # A single run: print the message, not a traceback (multiruns validate in the sweeper).
        if _run_mode():
            print(f"sae_sweep: {e}", file=sys.stderr)
            sys.exit(2)
        raise
    except PointBusy as e:
        print(f"sae_sweep: {e}", file=sys.stderr)
        sys.exit(3)
    except DiskFull as e:
        # A single run: the place, its free space and the need, not the writer's traceback.
        if _run_mode():
            print(f"sae_sweep: {e}", file=sys.stderr)
            sys.exit(1)
        raise
