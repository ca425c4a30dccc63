"""Disk-cache readers compared on a cache the page cache does not hold: `cache.reader=random` (one
global permutation, a read per row) against `cache.reader=blocks` (sequential block reads shuffled
in memory), each cold (the cache's pages dropped with posix_fadvise(DONTNEED) before the run: what
a cache larger than RAM, or a first read from a network file system, gives) and warm (every page
in memory).

    python -m sae_sweep.bench readers [--gb 4] [--d-in 768] [--batch 4096] [--seconds 20] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gb", type=float, default=4.0, help="cache size in GB (bfloat16 storage)")
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--batch", type=int, default=4096, help="training batch (rows)")
    p.add_argument("--block-tokens", type=int, default=1 << 17, help="cache.block_tokens of the blocks reader")
    p.add_argument("--seconds", type=float, default=20.0, help="time per measurement")
    p.add_argument("--dir", default=None, help="where the cache is built (default: a temp dir, removed after)")


def build_cache(root: Path, d_in: int, gb: float, ctx: int = 128):
    """A bfloat16 activation cache of ~``gb`` GB through the real build path (shards, checksums)."""
    from sae_sweep.activations.cache import get_or_build

    n_seqs = int(gb * 1e9 / (ctx * d_in * 2))

    def build():
        g = torch.Generator().manual_seed(0)
        for i in range(0, n_seqs, 256):
            b = min(256, n_seqs - i)
            yield torch.zeros(b, ctx, dtype=torch.long), torch.randn(b, ctx, d_in, generator=g)

    cache, _ = get_or_build(
        {"bench": "readers", "d": d_in, "n_seqs": n_seqs, "storage_dtype": "bfloat16"},
        root,
        build,
        special_token_ids=[],
        storage_dtype="bfloat16",
    )
    return cache


def drop_pages(cache) -> None:
    """Evict the cache's files from the page cache (clean pages: no privileges needed)."""
    for path in cache.path.glob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_pages(cache) -> None:
    for path in cache.path.glob("*.npy"):
        with open(path, "rb") as fh:
            while fh.read(64 << 20):
                pass


def resident_fraction(cache) -> float | None:
    """Share of the cache's bytes in the page cache (util-linux ``fincore``), or None without it."""
    if shutil.which("fincore") is None:
        return None
    files = [str(p) for p in cache.path.glob("acts-*.npy")]
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *files], capture_output=True, text=True
    )
    if out.returncode != 0:
        return None
    res = size = 0
    for line in out.stdout.split("\n"):
        if line.strip():
            r, s = line.split()
            res, size = res + int(r), size + int(s)
    return res / size if size else None


def measure(reader, seconds: float, batch: int, d_in: int, max_batches: int) -> Dict[str, Any]:
    """Batches/s for ``seconds`` or ``max_batches`` (less than one pass over the cache: a second
    pass would read pages the first one brought in), whichever ends first."""
    next(reader)  # first batch: opens files, starts prefetching
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and n < max_batches:
        next(reader)
        n += 1
    dt = time.perf_counter() - t0
    return {"batches": n, "tokens_per_s": n * batch / dt, "mb_per_s": n * batch * d_in * 2 / dt / 1e6}


def run(root: Path, args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    from sae_sweep.activations.reader import BlockReader, DiskBlocks, ShuffledReader

    readers: Dict[str, Callable[[Any], Any]] = {
        "random": lambda cache: ShuffledReader(cache, args.batch, seed=0),
        "blocks": lambda cache: BlockReader(DiskBlocks(cache, args.block_tokens), args.batch, seed=0),
    }
    out: Dict[str, Dict[str, Any]] = {}
    for state in ("cold", "warm"):
        for name, make in readers.items():
            gc.collect()  # the previous reader's memory maps: pages still mapped cannot be dropped
            cache = build_cache(root, args.d_in, args.gb)  # opened afresh (built on the first call only)
            drop_pages(cache) if state == "cold" else load_pages(cache)
            before = resident_fraction(cache)
            with make(cache) as reader:
                fig = measure(reader, args.seconds, args.batch, cache.d_in, int(0.8 * cache.n_tokens / args.batch))
            del reader, cache
            fig["resident_before"] = before
            out[f"{name}/{state}"] = fig
            print(
                f"  {name:6s} {state}: {fig['tokens_per_s']:>12,.0f} tok/s  {fig['mb_per_s']:>8,.0f} MB/s "
                f"({fig['batches']} batches; {'' if before is None else f'{before:.0%} in page cache before'})",
                flush=True,
            )
    return out


def main(args: argparse.Namespace) -> int:
    tmp = None
    root = Path(args.dir) if args.dir else Path(tmp := tempfile.mkdtemp(prefix="sae_sweep_readers_"))
    try:
        t0 = time.perf_counter()
        cache = build_cache(root, args.d_in, args.gb)
        size = sum(p.stat().st_size for p in cache.path.glob("acts-*.npy")) / 1e9
        print(
            f"cache: {cache.n_tokens:,} tokens x d_in {cache.d_in}, bfloat16, {size:.2f} GB "
            f"({time.perf_counter() - t0:.0f} s to build or open); batch {args.batch}, "
            f"blocks of {args.block_tokens:,} tokens, {args.seconds:.0f} s per figure"
        )
        del cache
        figs = run(root, args)
        for state in ("cold", "warm"):
            r, b = figs[f"random/{state}"], figs[f"blocks/{state}"]
            print(f"{state}: blocks / random = {b['tokens_per_s'] / r['tokens_per_s']:.1f}x")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0
