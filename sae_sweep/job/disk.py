"""The disk a job writes: refused before work when it cannot be written or will not hold what the
grid writes, and named when it fills up during the work.

What a point writes, by place: its activation cache (``paths.cache_dir``, unless already built or
streamed), its checkpoints (``<output_dir>/checkpoints``: ``CHECKPOINTS_ON_DISK`` copies of the SAE
with its Adam moments), its SAE files (``<output_dir>/saes``) and, for a sqlite store, the SAE again
as a run artifact (``<db dir>/mlartifacts``). Places on one file system share its free space, so
needs are summed per file system, not per directory.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sae_sweep import config as C
from sae_sweep.util.disk import DiskFull, file_system, free_bytes, human_bytes, out_of_space, unwritable

log = logging.getLogger("sae_sweep")


@dataclass(frozen=True)
class DiskNeed:
    place: str  # the setting that chose the place, with its value: paths.output_dir=/x
    path: Path
    what: str  # "activation cache", "checkpoints", ...
    bytes: int


def cache_bytes(cfg: DictConfig, d_model: int) -> int:
    """Disk a point's activation cache takes: tokens x d_model x the storage dtype's size, plus its
    int32 token ids."""
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[str(cfg.cache.dtype)]
    tokens = C.cache_tokens(cfg)
    return tokens * int(d_model) * itemsize + tokens * 4


def sae_bytes(cfg: DictConfig, d_model: int) -> int:
    """One fp32 copy of a point's SAE (W_enc, W_dec, b_enc, b_dec)."""
    d_sae = C.d_sae_for(cfg.sae, d_model)
    return (2 * d_model * d_sae + d_sae + d_model) * 4


def _built(cfg: DictConfig) -> bool:
    """Whether a cache for these activations is already on disk (matched on what the manifest
    records: model, layer, hook, dataset kind, context size, budget, dtype -- a cheap test that
    never loads the model; the real key is checked when the job opens it)."""
    root = C.cache_dir(cfg) / "activations"
    want = (
        int(cfg.layer),
        str(cfg.hook),
        int(cfg.dataset.context_size),
        C.cache_tokens(cfg),
        str(cfg.cache.dtype),
        str(cfg.dataset.kind),
    )
    for manifest in root.glob("*/manifest.json"):
        try:
            spec = json.loads(manifest.read_text())["spec"]
        except (OSError, ValueError, KeyError):
            continue
        got = (
            spec.get("layer"),
            spec.get("hook"),
            spec.get("context_size"),
            spec.get("tokens"),
            spec.get("storage_dtype"),
            (spec.get("dataset") or {}).get("kind"),
        )
        model = spec.get("model") or {}
        if got == want and model.get("name") == cfg.model.name:
            return True
    return False


def _cache_ident(cfg: DictConfig) -> tuple:
    """What makes two points share one activation cache (a cheap stand-in for its key)."""
    return (
        cfg.model.name,
        str(cfg.model.get("weights")),
        cfg.layer,
        cfg.hook,
        cfg.dataset.name,
        C.cache_tokens(cfg),
        cfg.dataset.context_size,
        cfg.cache.dtype,
    )


def point_needs(cfg: DictConfig, d_model: int, with_cache: bool = True) -> List[DiskNeed]:
    """What one point writes, by place (its cache only when ``with_cache`` and still to build)."""
    from sae_sweep.tracking.runs import sqlite_path
    from sae_sweep.training.loop import CHECKPOINTS_ON_DISK

    out = C.output_dir(cfg)
    sae = sae_bytes(cfg, d_model)
    needs = [
        # a checkpoint holds the SAE and Adam's two moments
        DiskNeed(
            f"paths.output_dir={out}",
            out / "checkpoints",
            f"checkpoints ({CHECKPOINTS_ON_DISK} x)",
            CHECKPOINTS_ON_DISK * 3 * sae,
        ),
        DiskNeed(f"paths.output_dir={out}", out / "saes", "SAE files", sae),
    ]
    uri = C.tracking_uri(cfg)
    db = sqlite_path(uri)
    if db is not None:  # a server's artifact store is not ours to measure
        needs.append(DiskNeed(f"tracking.uri={uri}", db.parent / "mlartifacts", "run artifacts (SAE)", sae))
    if with_cache and cfg.cache.mode != "stream" and cfg.dataset.kind != "synthetic" and not _built(cfg):
        cache = C.cache_dir(cfg)
        needs.append(DiskNeed(f"paths.cache_dir={cache}", cache, "activation cache", cache_bytes(cfg, d_model)))
    return needs


def grid_needs(cfgs: Sequence[DictConfig], shapes: Sequence[C.ModelShape]) -> Dict[int, List[DiskNeed]]:
    """What a grid writes, by file system; an activation cache shared by points is counted once."""
    caches = set()
    by_fs: Dict[int, List[DiskNeed]] = {}
    for cfg, shape in zip(cfgs, shapes):
        ident = _cache_ident(cfg)
        for need in point_needs(cfg, shape.d_model, with_cache=ident not in caches):
            by_fs.setdefault(file_system(need.path), []).append(need)
        caches.add(ident)
    return by_fs


def _summary(needs: Sequence[DiskNeed]) -> str:
    """``activation cache 1.2 GB, checkpoints (3 x) 4.0 MB, ...``: each kind summed over points."""
    parts: Dict[str, int] = {}
    counts: Dict[str, int] = {}
    for n in needs:
        parts[n.what] = parts.get(n.what, 0) + n.bytes
        counts[n.what] = counts.get(n.what, 0) + 1
    return ", ".join(
        f"{what}{f' of {counts[what]} points' if counts[what] > 1 else ''} {human_bytes(b)}"
        for what, b in parts.items()
    )


def _places(needs: Sequence[DiskNeed]) -> str:
    """``paths.output_dir=/x, tracking.uri=sqlite:///...``: the settings that chose the places, each once."""
    return ", ".join(dict.fromkeys(n.place for n in needs))


def disk_problems(cfgs: Sequence[DictConfig], shapes: Sequence[C.ModelShape]) -> List[str]:
    """What a grid writes, summed per file system (activation caches still to build, checkpoints,
    SAE files, store artifacts), against its free space: refused before any work with the numbers
    and the ways out."""
    problems = []
    for needs in grid_needs(cfgs, shapes).values():
        total = sum(n.bytes for n in needs)
        free = free_bytes(needs[0].path)
        if total <= free:
            continue
        caches = [n for n in needs if n.what == "activation cache"]
        ways = []
        if caches:
            wide = any(str(cfg.cache.dtype) == "float32" for cfg in cfgs)
            ways.append(
                "cache.mode=stream (nothing on disk), a smaller train.tokens / dataset.tokens, "
                f"{'cache.dtype=bfloat16, ' if wide else ''}another paths.cache_dir"
            )
        if len(caches) < len(needs):
            ways.append("a smaller sae.d_sae, another paths.output_dir (or tracking.uri)")
        what = (
            f"the {len(caches)} activation cache(s) to build"
            + (" and the runs' files" if len(caches) < len(needs) else "")
            if caches
            else "the runs' files"
        )
        problems.append(
            f"{_places(needs)}: {what} need {human_bytes(total)} on this disk ({_summary(needs)}), "
            f"{human_bytes(free)} are free. Use {'; or '.join(ways)}, or free space there"
        )
    return problems


def writable_problems(cfg: DictConfig) -> List[str]:
    """The directories a job writes that cannot be written (read-only mount, permissions): refused
    in seconds, naming the path, before any work."""
    places = (("paths.output_dir", C.output_dir(cfg)), ("paths.cache_dir", C.cache_dir(cfg)))
    return [p for p in (_unwritable_place(key, path) for key, path in places) if p]


def _unwritable_place(key: str, path: Path) -> Optional[str]:
    why = unwritable(path)
    return f"{key}={path}: {why}; choose a writable place" if why else None


def explain_disk_full(
    error: BaseException, cfg: DictConfig, d_model: int, where: Optional[Path] = None
) -> BaseException:
    """``error`` as ``DiskFull`` when a full file system caused it and it does not say so yet (a
    raw ENOSPC from a cache shard or an artifact copy, SQLite's "database or disk is full"): the
    place it failed on (the file the error names, else ``where``, else the output directory), its
    free space, and what the point writes on that file system. Any other error is returned as is."""
    if isinstance(error, DiskFull) or not out_of_space(error):
        return error
    where = _failed_path(error) or where or C.output_dir(cfg)
    try:
        fs = file_system(where)
        needed = sum(n.bytes for n in point_needs(cfg, d_model) if file_system(n.path) == fs)
        full = DiskFull(where, free_bytes(where), needed)
    except OSError:
        return error
    full.__cause__ = error
    return full


def _failed_path(error: BaseException) -> Optional[Path]:
    """The file an error (or one it was raised from) names, if any."""
    e: Optional[BaseException] = error
    for _ in range(10):
        if e is None:
            return None
        if isinstance(e, OSError) and e.filename:
            return Path(str(e.filename)).parent
        e = e.__cause__ or e.__context__
    return None


class RefuseUnwritableOutput(Callback):
    """Hydra callback: a single run whose ``paths.output_dir`` cannot be written is refused before
    Hydra makes its run directory there (which fails with a raw OSError). A multirun needs none:
    its sweeper validates every point (``writable_problems``) before anything is written."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = _unwritable_place("paths.output_dir", C.output_dir(config))
        if problem:
            print(f"sae_sweep: invalid configuration:\n  - {problem}", file=sys.stderr)
            sys.exit(2)
