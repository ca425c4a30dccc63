"""Packed training: several SAEs that share an activation stream train in one process.

Grid points with the same activation cache, reader seed and batch size see exactly the same
batch sequence when trained alone, so one `ShuffledReader` can feed them all: each batch is read
once and handed to every member in turn. Each member's result equals training it alone with
`train.train` (same batches, same step code, its own RNG stream, its own checkpoints in the same
format, so a packed run can resume alone and vice versa). Points that differ in seed or batch size
read different streams and belong to different packs (`pack_key`).

Knows nothing about MLflow: metrics leave through each member's `on_log`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from sae_sweep.train import STOP, Interrupted, TrainResult, TrainingFailed, load_checkpoint, save_checkpoint


def pack_key(cache_key: str, seed: int, batch_size: int) -> tuple[str, int, int]:
    """Points with equal pack keys read the same batch stream (see the module docstring)."""
    return (str(cache_key), int(seed), int(batch_size))


@dataclass
class Member:
    """One SAE of a pack: its trainer, step budget, checkpoint dir and metric sink."""

    trainer: Any
    total_steps: int
    ckpt_dir: Optional[Path] = None
    checkpoint_every: int = 0
    log_every: int = 10
    on_log: Optional[Callable[[int, dict[str, float]], None]] = None
    rng: Optional[torch.Tensor] = None  # torch RNG state at its start (default: the current one)
    # filled while training
    result: Optional[TrainResult] = None
    error: Optional[BaseException] = None
    _rng: Optional[torch.Tensor] = None
    _acc: dict = field(default_factory=dict)
    _window: int = 0
    _t0: float = 0.0
    _lr: float = 0.0
    _last: dict = field(default_factory=dict)
    _resumed: Optional[int] = None
    _start: float = 0.0

    @property
    def active(self) -> bool:
        return self.error is None and self.trainer.step_count < self.total_steps


class _Position:
    """A reader state at an arbitrary step (what a member's checkpoint records as its position)."""

    def __init__(self, reader: Any, step: int):
        self.state = dict(reader.state_dict())
        bpe = reader.batches_per_epoch
        self.state.update(epoch=step // bpe, batch_in_epoch=step % bpe)

    def state_dict(self) -> dict:
        return self.state


def train_packed(members: Sequence[Member], reader: Iterator[torch.Tensor], progress: bool = True,
                 should_stop: Optional[Callable[[], bool]] = None) -> list[Member]:
    """Train every member on the shared `reader` (positioned at its start; it is moved to the
    earliest member's resume point). A member that fails (NaN, dead SAE) records `error` and
    drops out; the others go on. Returns the members with `result` or `error` set.

    Requires every member's trainer to consume one reader batch per step (all trainers do).
    """
    t_start = time.perf_counter()
    for m in members:
        if m.trainer.total_steps != m.total_steps:
            raise ValueError(f"total_steps={m.total_steps} but the trainer was built for {m.trainer.total_steps}")
        m._start = t_start
        m._rng = m.rng if m.rng is not None else torch.get_rng_state()  # its own stream, as if alone
        state = load_checkpoint(m.ckpt_dir) if m.ckpt_dir is not None else None
        if state is not None:
            m.trainer.load_state_dict(state["trainer"])
            m._rng = state["rng"]["torch"]
            m._resumed = int(state["step"])
            m._last = dict(state.get("last_metrics", {}))
        m._lr = m.trainer.current_lr()
    if not members:
        return []
    # The shared stream starts at the least-advanced member; members ahead skip batches they saw.
    start = min(m.trainer.step_count for m in members)
    reader.load_state_dict(_Position(reader, start).state_dict())
    position = start
    end = max(m.total_steps for m in members)
    bar = tqdm(total=end, initial=start, desc=f"train x{len(members)}", unit="step", dynamic_ncols=True,
               disable=None if progress else True)
    for m in members:
        m._t0 = time.perf_counter()
    STOP.loops += 1
    try:
        while any(m.active for m in members):
            if STOP.requested or (should_stop is not None and should_stop()):
                STOP.seen = True
                for m in members:
                    _flush(m)
                    _checkpoint(m, reader)
                raise Interrupted(position, None)
            x = next(reader)
            position += 1
            for m in members:
                if not m.active or m.trainer.step_count >= position:
                    continue
                _step(m, x)
                if m.error is None and m.trainer.step_count < m.total_steps and m.checkpoint_every > 0 \
                        and m.trainer.step_count % m.checkpoint_every == 0:
                    _checkpoint(m, reader)
            bar.update(1)
        for m in members:
            if m.error is None and m.result is None:
                _finish(m, reader)
    finally:
        STOP.loops -= 1
        bar.close()
    return list(members)


def _step(m: Member, x: torch.Tensor) -> None:
    trainer = m.trainer
    try:
        torch.set_rng_state(m._rng)
        if not trainer.data_initialized:
            trainer.init_from_data(x)
        m._lr = trainer.current_lr()
        out = trainer.step(x)
        m._rng = torch.get_rng_state()
        for name, value in out.items():
            m._acc[name] = m._acc[name] + value if name in m._acc else value.clone()
        m._window += 1
        step = trainer.step_count
        if step % max(1, m.log_every) == 0 or step == m.total_steps:
            _flush(m)
    except TrainingFailed as e:
        m.error = e


def _flush(m: Member) -> None:
    """One host sync per log window, as in `train.train`; a non-finite window fails the member."""
    if m._window == 0:
        return
    names = list(m._acc)
    values = (torch.stack([m._acc[n] for n in names]) / m._window).tolist()
    metrics = dict(zip(names, values))
    if not math.isfinite(metrics.get("loss", 0.0)):
        m.error = TrainingFailed(f"non-finite loss (NaN/inf) in the log window ending at step {m.trainer.step_count}")
        return
    elapsed = max(time.perf_counter() - m._t0, 1e-9)
    metrics["lr"] = m._lr
    metrics["tokens_per_s"] = m._window * m.trainer.params.batch_size / elapsed
    m._last = metrics
    if m.on_log is not None:
        m.on_log(m.trainer.step_count, metrics)
    m._acc, m._window, m._t0 = {}, 0, time.perf_counter()


def _checkpoint(m: Member, reader: Any) -> None:
    if m.ckpt_dir is None or m.error is not None:
        return
    # save_checkpoint records the process RNG: present the member's own stream while it does
    process_rng = torch.get_rng_state()
    torch.set_rng_state(m._rng)
    try:
        save_checkpoint(m.ckpt_dir, m.trainer, _Position(reader, m.trainer.step_count),
                        {"tokens": m.trainer.tokens_seen, "last_metrics": m._last})
    finally:
        torch.set_rng_state(process_rng)


def _finish(m: Member, reader: Any) -> None:
    _flush(m)
    if m.error is not None:
        return
    _checkpoint(m, reader)
    trainer = m.trainer
    try:
        if trainer.step_count == 0:
            raise TrainingFailed("zero steps trained")
        dead = trainer.dead_mask()
        if bool(dead.all()):
            raise TrainingFailed(f"all {dead.numel()} latents are dead at the end of training (none fired in "
                                 f"the last {trainer.params.dead_tokens} tokens)")
        if m._last.get("l0", 1.0) == 0.0:
            raise TrainingFailed("no latent fired in the final log window (l0 = 0)")
    except TrainingFailed as e:
        m.error = e
        return
    m.result = TrainResult(steps=trainer.step_count, tokens=trainer.tokens_seen, metrics=m._last,
                           resumed_from_step=m._resumed, seconds=time.perf_counter() - m._start)


# ---------------------------------------------------------------------------------------------
# a packed job: several grid points' runs, one cache, one reader
# ---------------------------------------------------------------------------------------------


def run_pack(cfgs: Sequence[Any], runs: Sequence[Any], keys: Sequence[str], device: str) -> list[Any]:
    """The work of `pipeline.execute` for grid points that share a pack key, with one cache open
    and one reader; returns per point its eval metrics or the exception that failed it.
    Shared failures (the cache build, an interrupt) raise."""
    from sae_sweep import pipeline

    torch.manual_seed(int(cfgs[0].seed))
    lm, cache = pipeline.open_cache(cfgs[0], runs[0], device)
    members, readers = [], []
    for cfg, run, key in zip(cfgs, runs, keys):
        if run is not runs[0]:
            run.set_tags({"cache_key": cache.key, "cache_built": "false", "device": device})
        run.set_tags({"pack.size": len(cfgs), "pack.leader": keys[0]})
        torch.manual_seed(int(cfg.seed))  # as the point's own job would seed it
        trainer, reader, ckpt_dir, steps = pipeline.make_trainer(cfg, cache, key, device)
        readers.append(reader)

        def on_log(step: int, metrics: dict[str, float], run: Any = run) -> None:
            run.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=step)

        members.append(Member(trainer, steps, ckpt_dir, int(cfg.train.checkpoint_every), int(cfg.train.log_every),
                              on_log, rng=torch.get_rng_state()))
    try:
        train_packed(members, readers[0])
    finally:
        for r in readers:
            r.close()
    outcomes: list[Any] = []
    for cfg, run, key, m in zip(cfgs, runs, keys, members):
        if m.error is not None:
            outcomes.append(m.error)
            continue
        try:
            outcomes.append(pipeline.finish(cfg, run, key, lm, m.trainer, m.result, device))
        except Exception as e:  # one member's eval failure fails that member only
            outcomes.append(e)
    return outcomes


def pack_file(output_dir: Path, parent_run_id: str, leader_key: str) -> Path:
    """Where the sweeper leaves a pack's member configs for the pack's (leader's) job."""
    return Path(output_dir) / "packs" / str(parent_run_id) / f"{leader_key}.yaml"


def write_pack(path: Path, cfgs: Sequence[Any]) -> None:
    from omegaconf import OmegaConf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create({"members": [OmegaConf.to_container(c, resolve=True)
                                                                  for c in cfgs]})))
    tmp.replace(path)


def read_pack(path: Path) -> list[Any]:
    from omegaconf import OmegaConf

    return list(OmegaConf.load(path).members)
