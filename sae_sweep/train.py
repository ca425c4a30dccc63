"""The SAE training loop: resumable checkpoints, windowed metrics, failure detection, progress.

Knows nothing about MLflow or SLURM: metrics leave through `on_log`, preemption enters through
`should_stop`. One host sync per log window (metrics are accumulated on device).
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

CKPT_NAME = "latest.pt"
CKPT_FORMAT = 1


class TrainingFailed(RuntimeError):
    """The run cannot produce a usable SAE; `reason` says why (NaN at step N, zero steps, ...)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Interrupted(Exception):
    """`should_stop()` asked the loop to stop; a checkpoint at `step` was written (if ckpt_dir)."""

    def __init__(self, step: int, checkpoint: Optional[Path]):
        super().__init__(f"training stopped at step {step}" + (f"; checkpoint {checkpoint}" if checkpoint else ""))
        self.step = step
        self.checkpoint = checkpoint


class StopRequest:
    """"Stop at the next step", asked from outside the loop: a signal handler (SLURM preemption or
    time limit, see app.py) cannot reach the `should_stop` of a loop it did not start, so every
    train() loop in the process also polls this one. `loops` (loops running now) and `seen` (a
    loop acted on the request) tell the handler whether anybody will act on it."""

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


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(ckpt_dir: str | os.PathLike) -> Path:
    return Path(ckpt_dir) / CKPT_NAME


def save_checkpoint(ckpt_dir: str | os.PathLike, trainer: Any, reader: Any, extra: dict[str, Any]) -> Path:
    """Write ckpt_dir/latest.pt atomically: temp file in the same dir, fsync, os.replace."""
    path = checkpoint_path(ckpt_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CKPT_FORMAT,
        "step": trainer.step_count,
        "trainer": trainer.state_dict(),
        "reader": reader.state_dict(),
        "rng": _rng_state(),
        **extra,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(ckpt_dir: str | os.PathLike) -> Optional[dict[str, Any]]:
    path = checkpoint_path(ckpt_dir)
    if not path.exists():
        return None
    # Our own file; it holds numpy / python RNG states, which weights_only loading refuses.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != CKPT_FORMAT:
        raise RuntimeError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    return state


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


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
) -> TrainResult:
    """Train `trainer` on batches from `reader` until `total_steps`, resuming from ckpt_dir.

    - `reader`: iterator of [B, d_in] tensors with state_dict()/load_state_dict().
    - Checkpoints (ckpt_dir/latest.pt: trainer, reader, RNG states) every `checkpoint_every` steps
      (0: only at the end / on interrupt) and at the end; none when ckpt_dir is None.
    - `on_log(step, metrics)` every `log_every` steps (and for the final partial window) with
      averages since the last log plus `lr` and `tokens_per_s`.
    - `should_stop()` (and the process-wide `STOP.requested`) is polled before each step; when
      true the loop checkpoints and raises `Interrupted` (SLURM preemption / requeue).
    - Raises `TrainingFailed` on a non-finite loss (naming the first bad step), zero steps
      trained, or all latents dead at the end.
    """
    t_start = time.perf_counter()
    if trainer.total_steps != total_steps:
        raise ValueError(f"total_steps={total_steps} but the trainer was built for {trainer.total_steps}")
    if total_steps <= 0:
        raise TrainingFailed(f"zero steps trained: total_steps={total_steps} (too few training tokens for one batch?)")
    log_every = max(1, int(log_every))

    resumed_from: Optional[int] = None
    last_metrics: dict[str, float] = {}
    state = load_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        reader.load_state_dict(state["reader"])
        _set_rng_state(state["rng"])
        resumed_from = int(state["step"])
        last_metrics = dict(state.get("last_metrics", {}))

    device = trainer.device
    # Per-window accumulators stay on device; `bad_step` records the first step whose loss was
    # not finite (total_steps + 1 = none yet) without a host sync.
    acc: dict[str, torch.Tensor] = {}
    window_steps = 0
    window_tokens = 0
    window_t0 = time.perf_counter()
    window_lr = trainer.current_lr()
    no_bad = total_steps + 1
    bad_step = torch.full((), no_bad, dtype=torch.long, device=device)
    step_t = torch.full((), trainer.step_count, dtype=torch.long, device=device)

    def check_finite() -> None:
        first = int(bad_step.item())
        if first != no_bad:
            raise TrainingFailed(f"non-finite loss (NaN/inf) at step {first}")

    def flush_log() -> None:
        nonlocal acc, window_steps, window_tokens, window_t0, last_metrics
        if window_steps == 0:
            return
        names = list(acc)
        values = (torch.stack([acc[n] for n in names]) / window_steps).tolist()  # the one sync
        check_finite()
        elapsed = max(time.perf_counter() - window_t0, 1e-9)
        metrics = dict(zip(names, values))
        metrics["lr"] = window_lr  # lr of the window's last step (the scheduler has moved past it)
        metrics["tokens_per_s"] = window_tokens / elapsed
        last_metrics = metrics
        if on_log is not None:
            on_log(trainer.step_count, metrics)
        if bar is not None:
            bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "l0", "explained_variance") if k in metrics})
        acc, window_steps, window_tokens, window_t0 = {}, 0, 0, time.perf_counter()

    def checkpoint() -> Optional[Path]:
        if ckpt_dir is None:
            return None
        check_finite()  # never persist NaN weights
        return save_checkpoint(ckpt_dir, trainer, reader, {
            "tokens": trainer.tokens_seen,
            "last_metrics": last_metrics,
        })

    bar = tqdm(total=total_steps, initial=trainer.step_count, desc="train", unit="step",
               dynamic_ncols=True, disable=None if progress else True)
    STOP.loops += 1
    try:
        batches = iter(reader)
        while trainer.step_count < total_steps:
            if STOP.requested or (should_stop is not None and should_stop()):
                STOP.seen = True
                flush_log()
                raise Interrupted(trainer.step_count, checkpoint())
            try:
                x = next(batches)
            except StopIteration:
                flush_log()
                raise TrainingFailed(f"reader exhausted after {trainer.step_count} of {total_steps} steps") from None
            if not trainer.data_initialized:
                trainer.init_from_data(x)
            window_lr = trainer.current_lr()
            out = trainer.step(x)
            step_t += 1
            loss = out["loss"]
            bad_step = torch.where(torch.isfinite(loss) | (bad_step != no_bad), bad_step, step_t)
            for name, value in out.items():
                acc[name] = acc[name] + value if name in acc else value.clone()
            window_steps += 1
            window_tokens += int(x.shape[0])
            bar.update(1)
            step = trainer.step_count
            if step % log_every == 0 or step == total_steps:
                flush_log()
            if checkpoint_every > 0 and step % checkpoint_every == 0 and step < total_steps:
                checkpoint()
        flush_log()
        check_finite()
        checkpoint()  # final state: a rerun after completion resumes here and trains 0 more steps
    finally:
        STOP.loops -= 1
        bar.close()

    if trainer.step_count == 0:
        raise TrainingFailed("zero steps trained")
    dead = trainer.dead_mask()
    if bool(dead.all()):
        raise TrainingFailed(
            f"all {dead.numel()} latents are dead at the end of training (none fired in the last "
            f"{trainer.params.dead_tokens} tokens)"
        )
    if last_metrics.get("l0", 1.0) == 0.0:
        raise TrainingFailed("no latent fired in the final log window (l0 = 0)")
    if not math.isfinite(last_metrics.get("loss", 0.0)):
        raise TrainingFailed(f"non-finite loss in the final log window at step {trainer.step_count}")
    return TrainResult(
        steps=trainer.step_count,
        tokens=trainer.tokens_seen,
        metrics=last_metrics,
        resumed_from_step=resumed_from,
        seconds=time.perf_counter() - t_start,
    )
