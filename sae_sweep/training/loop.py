"""The SAE training loop: N members fed from one batch stream; a single run is a pack of one.

Each member (an SAE with its trainer, step budget, checkpoint dir and metric sink) sees exactly
the batches it would see alone: batch i of the stream is its step i. A member keeps its own RNG
stream (swapped in around its step) and its own checkpoints, in the same format whether it trained
alone or packed, so either can resume the other. A member that fails (NaN, dead SAE) drops out with
its reason; the others go on.

Knows nothing about MLflow or SLURM: metrics leave through each member's ``on_log``, preemption
enters through ``should_stop`` or the process-wide ``STOP``. One host sync per log window
(metrics and the first non-finite step are accumulated on the device).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from sae_sweep.util.digests import verify_recorded, write_with_sha256
from sae_sweep.util.files import atomic_write
from sae_sweep.util.metrics import Metric
from sae_sweep.util.progress import Progress

log = logging.getLogger(__name__)

CKPT_NAME = "latest.pt"
PREVIOUS_NAME = "previous.pt"  # the checkpoint before latest.pt, kept until a newer one is complete
# Checkpoints of a member on disk at once, at most: previous.pt, latest.pt and the next one being written.
CHECKPOINTS_ON_DISK = 3
REFUSED_SUFFIX = ".refused"  # a latest.pt that could not be trusted, set aside when previous.pt is used
CKPT_FORMAT = 1


class TrainingFailed(RuntimeError):
    """The run cannot produce a usable SAE; `reason` says why (NaN at step N, zero steps, ...)."""

    def __init__(self, reason: str, nonfinite_step: Optional[int] = None):
        super().__init__(reason)
        self.reason = reason
        self.nonfinite_step = nonfinite_step  # the first step whose loss was NaN/inf


class Interrupted(Exception):
    """Training was asked to stop; every member's checkpoint is current (`checkpoint`: the first's)."""

    def __init__(self, step: int, checkpoint: Optional[Path]):
        super().__init__(f"training stopped at step {step}" + (f"; checkpoint {checkpoint}" if checkpoint else ""))
        self.step = step
        self.checkpoint = checkpoint


class StopRequest:
    """ "Stop at the next step", asked from outside the loop: a signal handler (SLURM preemption or
    time limit, see app.py) cannot reach the `should_stop` of a loop it did not start, so every
    loop in the process also polls this one. `loops` (loops running now) and `seen` (a loop acted
    on the request) tell the handler whether anybody will act on it."""

    def __init__(self) -> None:
        self.requested = False
        self.seen = False
        self.loops = 0

    def request(self) -> None:
        self.requested = True

    def clear(self) -> None:
        self.requested = self.seen = False


STOP = StopRequest()


@dataclass
class TrainResult:
    steps: int  # optimisation steps done in total (including before a resume)
    tokens: int  # tokens trained on in total
    metrics: dict[str, float] = field(default_factory=dict)  # averages over the last log window
    resumed_from_step: Optional[int] = None  # step of the checkpoint this call started from
    seconds: float = 0.0  # wall time of this call
    checkpoint_fallback: Optional[str] = None  # the unreadable latest.pt it resumed around, if any


# Checkpoints
def rng_state() -> dict[str, Any]:
    """The process's random state (torch, numpy, python, and CUDA once initialised)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(ckpt_dir: str | os.PathLike) -> Path:
    return Path(ckpt_dir) / CKPT_NAME


class CheckpointUnreadable(RuntimeError):
    """Neither checkpoint of a run can be read; the message names both files and why."""


def save_checkpoint(
    ckpt_dir: str | os.PathLike, trainer: Any, reader_state: dict, rng: dict[str, Any], extra: dict[str, Any]
) -> Path:
    """Write ckpt_dir/latest.pt; the one it replaces becomes previous.pt. The new file is complete
    (written to a temp file, fsynced) before either rename, so a crash at any moment leaves a
    readable checkpoint, and a latest.pt damaged later still has previous.pt behind it."""
    state = {
        "format": CKPT_FORMAT,
        "step": trainer.step_count,
        "trainer": trainer.state_dict(),
        "reader": reader_state,
        "rng": rng,
        **extra,
    }
    latest = checkpoint_path(ckpt_dir)
    # the sha256 of each file is recorded as it is written: torch.load does not check the zip CRCs,
    # so bytes changed inside a tensor would otherwise load without a word
    return write_with_sha256(
        latest,
        lambda tmp: torch.save(state, tmp),
        keep_previous=latest.with_name(PREVIOUS_NAME),
        needed=tensor_bytes(state),
    )


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state: about what ``torch.save`` writes of it."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _read(path: Path) -> dict[str, Any]:
    verify_recorded(path)  # ChecksumMismatch: changed since written
    # Our own file; it holds numpy / python RNG states, which weights_only loading refuses.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise RuntimeError(f"unknown checkpoint format {state.get('format') if isinstance(state, dict) else state!r}")
    return state


def load_checkpoint(ckpt_dir: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The newest readable checkpoint of ``ckpt_dir`` (latest.pt, else previous.pt), or None when
    there is none; CheckpointUnreadable naming the files when every one there is damaged."""
    latest = checkpoint_path(ckpt_dir)
    previous = latest.with_name(PREVIOUS_NAME)
    errors = []
    for path in (latest, previous):
        if not path.exists():
            continue
        try:
            state = _read(path)
        except Exception as e:  # changed bytes, truncated (zip) file, unpickling error, wrong format
            errors.append(f"{path} ({type(e).__name__}: {e})")
            continue
        refused = latest.with_name(latest.name + REFUSED_SUFFIX)
        why = refused.with_name(refused.name + ".txt")
        if errors:
            # set aside, with why (kept for inspection): the next save must not rotate it into
            # previous.pt, where it would replace the good checkpoint this run resumes from
            os.replace(latest, refused)
            atomic_write(why, errors[0])
            log.warning(
                "checkpoint %s is refused (moved to %s); resuming from %s (step %s)",
                errors[0],
                refused.name,
                path,
                state["step"],
            )
            state["fallback_from"] = errors[0]
        elif path == previous and why.exists():  # set aside by an earlier attempt that did not get further
            state["fallback_from"] = why.read_text()
        return state
    if errors:
        raise CheckpointUnreadable(
            f"no readable checkpoint: {'; '.join(errors)}. Delete {latest.parent} to train this point from the start"
        )
    return None


# What every member's ``on_log`` receives, declared with the keys a job logs them under
# (``train/<name>``, at the window's last step). Each value is the mean over the steps of one log
# window (``train.log_every`` steps) of the per-step value on that step's training batch, except lr
# and tokens_per_s. Trainer variants add their own loss terms (auxk, l1, ortho, ...: the ``parts``
# of their ``StepOutput``), which are logged beside these and not declared here.
_THIS = "this project (training loop)"
METRICS = (
    Metric(
        "train/loss",
        "training loss",
        "lower",
        "loss (variant-specific)",
        "The trainer variant's objective on the training batch: reconstruction error plus its sparsity and "
        "auxiliary terms (AuxK, L1, ...). Not comparable across trainer variants.",
        _THIS,
    ),
    Metric(
        "train/mse",
        "training MSE",
        "lower",
        "squared activation norm",
        "Mean over the batch's tokens of ||x - x_hat||^2 (summed over d_in) on the training batch, the SAE in "
        "training mode.",
        _THIS,
    ),
    Metric(
        "train/explained_variance",
        "training explained variance",
        "higher",
        "fraction of variance about the mean",
        "1 - sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2 over the training batch (centred on the batch's mean).",
        _THIS,
    ),
    Metric(
        "train/l0",
        "training L0",
        None,
        "active latents per token",
        "Mean over the batch's tokens of the number of active latents, as the trainer variant counts them "
        "(TopK: k). A budget, not a score.",
        _THIS,
    ),
    Metric(
        "train/dead_frac",
        "dead latents (training)",
        "lower",
        "fraction of latents",
        "Fraction of latents that have not fired in the last trainer.dead_tokens training tokens, after "
        "the step. Dead latents are wasted capacity; a run whose latents are all dead at the end fails.",
        _THIS,
    ),
    Metric(
        "train/lr",
        "learning rate",
        None,
        "learning rate",
        "The learning rate of the window's last step (warmup and decay schedule).",
        _THIS,
    ),
    Metric(
        "train/norm_scaling_factor",
        "activation scaling factor",
        None,
        "factor",
        "Logged once, by the job, with train.normalize_activations=expected_average_only_in: SAELens's s = "
        "sqrt(d_in) / E||x||, the factor the SAE's training batches were multiplied by (folded into the saved "
        "SAE). The train/* losses are on the scaled batches.",
        "SAELens (expected_average_only_in)",
    ),
    Metric(
        "train/tokens_per_s",
        "training throughput",
        "higher",
        "tokens per second",
        "This member's training tokens in the window divided by the wall-clock time since its previous "
        "log (in a pack, the other members' steps in between count too). Depends on the machine and the "
        "pack; not a property of the SAE.",
        _THIS,
    ),
)


# Members
@dataclass
class Member:
    """One SAE of a pack: its trainer, step budget, checkpoint dir and metric sink.

    - Checkpoints (ckpt_dir/latest.pt: trainer, reader position, RNG) after the first step at
      least `checkpoint_every_s` seconds after the last checkpoint (or the start), and every
      `checkpoint_every` steps (0 turns either off; both off: only at the end and on interrupt),
      and at the end; none when ckpt_dir is None. Where a checkpoint falls changes nothing a
      resume gives (it restores the exact state), so a time interval keeps runs reproducible.
    - `on_log(step, metrics)` every `log_every` steps and for the final partial window, with
      averages since the last log plus `lr` and `tokens_per_s`.
    - `on_eval(step)` every `eval_every` steps and at the last step (0: never): held-out
      measurements the job supplies (the loop knows nothing of evals). It runs after the member's
      RNG state is saved, so it cannot change training; its time is left out of `tokens_per_s`.
    - `rng`: the random state its training starts from (default: the process's when the loop starts).
    After training, `result` (a TrainResult) or `error` (why it failed) is set.
    """

    trainer: Any
    total_steps: int
    ckpt_dir: Optional[Path] = None
    checkpoint_every: int = 0
    log_every: int = 10
    on_log: Optional[Callable[[int, dict[str, float]], None]] = None
    rng: Optional[dict[str, Any]] = None
    stream: Any = None  # which batch stream feeds it (its seed, when a pack mixes seeds)
    result: Optional[TrainResult] = None
    error: Optional[BaseException] = None
    checkpoint_every_s: float = 0.0
    eval_every: int = 0
    on_eval: Optional[Callable[[int], None]] = None

    def __post_init__(self) -> None:
        self.log_every = max(1, int(self.log_every))
        self._resumed: Optional[int] = None
        self._fallback: Optional[str] = None
        self._last: dict[str, float] = {}
        self._acc: dict[str, torch.Tensor] = {}
        self._window = self._window_tokens = 0
        self._t0 = self._start = self._ckpt_t = 0.0
        self._lr = 0.0
        self._step_t: Optional[torch.Tensor] = None
        self._bad_step: Optional[torch.Tensor] = None  # first step with a non-finite loss (no sync)

    @property
    def active(self) -> bool:
        return self.error is None and self.result is None and self.trainer.step_count < self.total_steps

    def resume(self, start: float) -> Optional[dict[str, Any]]:
        """Load the member's checkpoint if it has one; returns it."""
        if self.trainer.total_steps != self.total_steps:
            raise ValueError(f"total_steps={self.total_steps} but the trainer was built for {self.trainer.total_steps}")
        self._start = start
        if self.rng is None:
            self.rng = rng_state()
        state = load_checkpoint(self.ckpt_dir) if self.ckpt_dir is not None else None
        if state is not None:
            self.trainer.load_state_dict(state["trainer"])
            self.rng = state["rng"]
            self._resumed = int(state["step"])
            self._last = dict(state.get("last_metrics", {}))
            self._fallback = state.get("fallback_from")
        device = self.trainer.device
        self._never = self.total_steps + 1
        self._bad_step = torch.full((), self._never, dtype=torch.long, device=device)
        self._step_t = torch.full((), self.trainer.step_count, dtype=torch.long, device=device)
        self._lr = self.trainer.current_lr()
        self._t0 = self._ckpt_t = time.perf_counter()
        return state

    def checkpoint_due(self, step: int) -> bool:
        """Whether the step just taken ends a checkpoint interval (steps or seconds)."""
        if self.checkpoint_every > 0 and step % self.checkpoint_every == 0:
            return True
        return self.checkpoint_every_s > 0 and time.perf_counter() - self._ckpt_t >= self.checkpoint_every_s

    def step(self, x: torch.Tensor) -> None:
        trainer = self.trainer
        assert self.rng is not None and self._step_t is not None and self._bad_step is not None, "start() first"
        set_rng_state(self.rng)
        if not trainer.data_initialized:
            trainer.init_from_data(x)
        self._lr = trainer.current_lr()
        out = trainer.step(x)
        self.rng = rng_state()
        self._step_t += 1
        self._bad_step = torch.where(
            torch.isfinite(out["loss"]) | (self._bad_step != self._never), self._bad_step, self._step_t
        )
        for name, value in out.items():
            self._acc[name] = self._acc[name] + value if name in self._acc else value.clone()
        self._window += 1
        self._window_tokens += int(x.shape[0])
        if trainer.step_count % self.log_every == 0 or trainer.step_count == self.total_steps:
            self.flush()
        if self.eval_due(trainer.step_count):
            assert self.on_eval is not None  # eval_due checks it
            t0 = time.perf_counter()
            self.on_eval(trainer.step_count)
            self._t0 += time.perf_counter() - t0  # throughput counts training only

    def eval_due(self, step: int) -> bool:
        """Whether the step just taken is one the held-out measurements are taken at."""
        if self.on_eval is None or self.eval_every <= 0:
            return False
        return step % self.eval_every == 0 or step == self.total_steps

    def check_finite(self) -> None:
        assert self._bad_step is not None, "start() first"
        first = int(self._bad_step.item())
        if first != self._never:
            raise TrainingFailed(f"non-finite loss (NaN/inf) at step {first}", nonfinite_step=first)

    def flush(self) -> None:
        """Log the window's averages (the one host sync per window)."""
        if self._window == 0:
            return
        names = list(self._acc)
        values = (torch.stack([self._acc[n] for n in names]) / self._window).tolist()
        self.check_finite()
        metrics = dict(zip(names, values))
        metrics["lr"] = self._lr  # lr of the window's last step (the scheduler has moved past it)
        metrics["tokens_per_s"] = self._window_tokens / max(time.perf_counter() - self._t0, 1e-9)
        self._last = metrics
        if self.on_log is not None:
            self.on_log(self.trainer.step_count, metrics)
        self._acc, self._window, self._window_tokens, self._t0 = {}, 0, 0, time.perf_counter()

    def checkpoint(self, reader_state: dict) -> Optional[Path]:
        """Save; `reader_state` must be the stream's position after this member's last step."""
        if self.ckpt_dir is None:
            return None
        self.check_finite()  # never persist NaN weights
        assert self.rng is not None, "start() first"
        self._ckpt_t = time.perf_counter()
        return save_checkpoint(
            self.ckpt_dir,
            self.trainer,
            reader_state,
            self.rng,
            {"tokens": self.trainer.tokens_seen, "last_metrics": self._last},
        )

    def finish(self, reader_state: Optional[dict]) -> None:
        """End of its budget: final flush, checkpoint (unless `reader_state` is None: resumed at the
        end, its checkpoint is current) and the checks that make a result a result."""
        self.flush()
        if reader_state is not None:
            self.checkpoint(reader_state)  # a rerun after completion resumes here and trains 0 more steps
        trainer = self.trainer
        dead = trainer.dead_mask()
        if bool(dead.all()):
            raise TrainingFailed(
                f"all {dead.numel()} latents are dead at the end of training (none fired in "
                f"the last {trainer.params.dead_tokens} tokens)"
            )
        if self._last.get("l0", 1.0) == 0.0:
            raise TrainingFailed("no latent fired in the final log window (l0 = 0)")
        if not math.isfinite(self._last.get("loss", 0.0)):
            raise TrainingFailed(f"non-finite loss in the final log window at step {trainer.step_count}")
        self.result = TrainResult(
            steps=trainer.step_count,
            tokens=trainer.tokens_seen,
            metrics=self._last,
            resumed_from_step=self._resumed,
            seconds=time.perf_counter() - self._start,
            checkpoint_fallback=self._fallback,
        )


# The loop
def train_members(
    members: Sequence[Member], reader: Any, progress: bool = True, should_stop: Optional[Callable[[], bool]] = None
) -> list[Member]:
    """Train every member on batches from its stream. ``reader`` is one batch stream for every
    member (an iterator of [B, d_in] tensors with state_dict()/load_state_dict(), at its start), or
    a mapping {stream key: such a reader} for members whose ``stream`` differs (one per seed: each
    member keeps the data order its seed gives it). Each stream starts at its least advanced member
    (from that member's checkpoint) and members ahead of it skip the batches they saw. Streams
    advance in lockstep, so streams that share a source (one LM pass) ask it for the same block.

    `should_stop()` (and the process-wide `STOP.requested`) is polled before each step; when true
    every member's checkpoint is brought up to date and `Interrupted` is raised. A member that fails
    records `error` (TrainingFailed: a non-finite loss naming its first step, zero steps, an
    exhausted reader, all latents dead) and drops out. Returns the members.
    """
    t_start = time.perf_counter()
    if not members:
        return []
    readers = reader if isinstance(reader, Mapping) else {m.stream: reader for m in members}
    states = []
    for m in members:
        try:
            states.append(m.resume(t_start))
        except CheckpointUnreadable as e:  # this member cannot resume; the others can
            m.error = e
            states.append(None)
        if m.total_steps <= 0:
            m.error = TrainingFailed(
                f"zero steps trained: total_steps={m.total_steps} (too few training tokens for one batch?)"
            )
    streams = {}
    for key in dict.fromkeys(m.stream for m in members if m.error is None):
        group = [(m, s) for m, s in zip(members, states) if m.error is None and m.stream == key]
        start = min(m.trainer.step_count for m, _ in group)
        lead = next((s for m, s in group if s is not None and m.trainer.step_count == start), None)
        if lead is not None:
            readers[key].load_state_dict(lead["reader"])
        streams[key] = _Stream(readers[key], [m for m, _ in group], start)
    if not streams:
        return list(members)
    start = min(st.position for st in streams.values())
    end = max(m.total_steps for m in members)
    desc = "train" if len(members) == 1 else f"train x{len(members)}"
    bar = Progress(desc, total=end, unit="step", initial=start, enabled=progress)
    STOP.loops += 1
    try:
        while any(m.active for m in members):
            if STOP.requested or (should_stop is not None and should_stop()):
                STOP.seen = True
                first = None
                for st in streams.values():
                    first = _checkpoint_in_step(st) or first
                raise Interrupted(min(st.position for st in streams.values()), first)
            advanced = False
            for st in streams.values():
                advanced = st.advance() or advanced
            if advanced:
                bar.update(1)
            if len(members) == 1 and members[0]._last:
                bar.set_postfix(
                    {
                        k: f"{members[0]._last[k]:.4g}"
                        for k in ("loss", "l0", "explained_variance")
                        if k in members[0]._last
                    }
                )
        for m in members:  # resumed at the end: nothing left to train, its checkpoint is current
            if m.error is None and m.result is None and m.trainer.step_count >= m.total_steps > 0:
                try:
                    m.finish(None)
                except TrainingFailed as e:
                    m.error = e
    finally:
        STOP.loops -= 1
        bar.close()
    return list(members)


class _Stream:
    """One batch stream and the members it feeds: ``position`` batches handed out so far."""

    def __init__(self, reader: Any, members: list[Member], position: int):
        self.reader, self.members, self.position = reader, members, position
        self.batches = iter(reader)

    def advance(self) -> bool:
        """Hand the next batch to the members in step with the stream; False when none needs one."""
        if not any(m.active for m in self.members):
            return False
        try:
            x = next(self.batches)
        except StopIteration:
            for m in self.members:
                if m.active:
                    m.error = TrainingFailed(f"reader exhausted after {m.trainer.step_count} of {m.total_steps} steps")
            return False
        self.position += 1
        for m in self.members:
            if not m.active or m.trainer.step_count >= self.position:
                continue  # done, failed, or ahead of the stream (resumed further)
            try:
                m.step(x)
                step = m.trainer.step_count
                if step == m.total_steps:
                    m.finish(self.reader.state_dict())
                elif m.checkpoint_due(step):
                    m.checkpoint(self.reader.state_dict())
            except TrainingFailed as e:
                m.error = e
        return True


def _checkpoint_in_step(stream: _Stream) -> Optional[Path]:
    """On interrupt: members in step with their stream save now (the others' checkpoints on disk
    are current); returns the first checkpoint path."""
    first = None
    for m in stream.members:
        if m.active and m.trainer.step_count == stream.position:
            try:
                m.flush()
                path = m.checkpoint(stream.reader.state_dict())
            except TrainingFailed as e:
                m.error = e
                continue
            first = first or path
    return first


def train(
    trainer: Any,
    reader: Iterator[torch.Tensor],
    total_steps: int,
    ckpt_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    log_every: int = 10,
    on_log: Optional[Callable[[int, dict[str, float]], None]] = None,
    progress: bool = True,
    should_stop: Optional[Callable[[], bool]] = None,
    checkpoint_every_s: float = 0.0,
) -> TrainResult:
    """Train one SAE (a pack of one): its TrainResult, or its TrainingFailed raised."""
    member = Member(
        trainer,
        total_steps,
        Path(ckpt_dir) if ckpt_dir is not None else None,
        checkpoint_every,
        log_every,
        on_log,
        checkpoint_every_s=checkpoint_every_s,
    )
    train_members([member], reader, progress=progress, should_stop=should_stop)
    if member.error is not None:
        raise member.error
    assert member.result is not None  # a member that ends without an error has its result
    return member.result
