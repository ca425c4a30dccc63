"""Content-addressed activation cache: build once under a lock, open with checks.

Layout under ``<cache_root>/activations/``::

    <key>/manifest.json          written last; its presence (and validity) marks a complete cache
    <key>/acts-00000.npy         [n_seqs_in_shard, context_size, d_in], storage dtype (see shards.py)
    <key>/tokens-00000.npy       [n_seqs_in_shard, context_size], int32 token ids
    <key>.lock                   OwnedLock held while <key> is being built
    .tmp-<key>-<host>-<pid>-<random>/  a build in progress (renamed to <key>/ when complete)
    builds.log                   one JSON line per completed build (key, host, pid, job id, time)

The key is a hash of everything that changes the activations (``cache_key``); the same key is
reused, never recomputed. Builds (``util.build.build_once``) write into a private temp directory
that is renamed into place only when complete, so a killed build never leaves something that looks
like a cache. Batches for training come from ``sae_sweep.activations.reader``.

This module knows nothing about SAEs; it only stores (token ids, activations) pairs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sae_sweep.activations.shards import STORAGE_DTYPES, ShardWriter, decode, shard_digest_ok, storage
from sae_sweep.config import canonical, stable_hash
from sae_sweep.util.build import build_once
from sae_sweep.util.digests import StatMemo
from sae_sweep.util.files import atomic_write_json, fsync_dir
from sae_sweep.util.progress import Progress

__all__ = ["ActivationCache", "CacheError", "SHARD_BYTES", "cache_key", "get_or_build", "read_builds_log"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SHARD_BYTES = 256 * 2**20  # target size of one activation shard file
MANIFEST = "manifest.json"
VERIFIED = "verified.json"  # util.digests.StatMemo: per shard file, its stat when its checksum last matched
VERIFY_MODES = ("changed", "full")
QUARANTINE = "quarantine"
BUILDS_LOG = "builds.log"

BuildFn = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class CacheError(RuntimeError):
    """An activation cache is missing, incomplete, corrupt or inconsistent with its manifest."""


def cache_key(spec: Mapping) -> str:
    """``config.stable_hash`` of ``spec``: everything that changes the activations and nothing
    else (model fingerprint, layer, hook, dataset fingerprint, context size, token budget, storage
    dtype). Key order and Mapping type do not matter."""
    return stable_hash(spec)


def _host_info() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def read_builds_log(cache_root: str | os.PathLike) -> list[dict[str, Any]]:
    """Entries of ``<cache_root>/activations/builds.log`` (one per completed build), oldest first."""
    path = Path(cache_root) / "activations" / BUILDS_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ActivationCache:
    """A complete, read-only activation cache directory. Create with ``ActivationCache.open``."""

    def __init__(self, path: Path, manifest: dict[str, Any], acts: list[np.memmap], tokens: list[np.memmap]):
        self.path = path
        self.manifest = manifest
        self.key: str = manifest["key"]
        self.spec: dict[str, Any] = manifest["spec"]
        self.n_seqs: int = manifest["n_seqs"]
        self.n_tokens: int = manifest["n_tokens"]
        self.d_in: int = manifest["d_in"]
        self.context_size: int = manifest["context_size"]
        self.storage_dtype: str = manifest["storage_dtype"]
        self.special_token_ids: list[int] = list(manifest["special_token_ids"])
        self.n_special: int = manifest["n_special"]
        self._acts = acts
        self._tokens = tokens
        # first global sequence index of each shard (+ total at the end)
        self._seq_bounds = np.cumsum([0] + [a.shape[0] for a in acts])
        self._token_ids: np.ndarray | None = None
        self._special_mask: np.ndarray | None = None
        self.replaced: str | None = None  # why an unusable cache of this key was replaced by this build

    @classmethod
    def open(cls, path: str | os.PathLike, verify: str | bool | None = None) -> ActivationCache:
        """Open a complete cache, checking its files against the manifest's checksums:
        ``verify="changed"`` hashes only the files that changed (size, mtime, inode) since their
        checksum last matched (a stat per file otherwise), ``"full"`` hashes every file, None
        checks shapes only (``True``/``False``: ``"full"``/None).

        Raises ``CacheError`` naming what is wrong when the directory is missing, incomplete
        (no manifest: an interrupted or in-progress build), inconsistent with its manifest or
        corrupt (a checksum mismatch).
        """
        verify = {True: "full", False: None}.get(verify, verify) if isinstance(verify, bool) else verify
        if verify not in (None, *VERIFY_MODES):
            raise ValueError(f"verify={verify!r}: allowed values are None, {', '.join(VERIFY_MODES)}")
        path = Path(path)
        hint = f"delete {path} and rerun to rebuild it"
        if not path.is_dir():
            raise CacheError(f"no activation cache at {path}")
        mpath = path / MANIFEST
        if not mpath.exists():
            raise CacheError(
                f"activation cache at {path} is incomplete: {MANIFEST} is missing "
                f"(an interrupted or unfinished build); {hint}"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CacheError(f"activation cache at {path}: unreadable {MANIFEST} ({exc}); {hint}") from exc
        required = (
            "format_version",
            "key",
            "spec",
            "n_seqs",
            "n_tokens",
            "d_in",
            "context_size",
            "storage_dtype",
            "shards",
            "special_token_ids",
            "n_special",
        )
        missing = [k for k in required if k not in manifest]
        if missing:
            raise CacheError(f"activation cache at {path}: manifest lacks {missing}; {hint}")
        if manifest["format_version"] != FORMAT_VERSION:
            raise CacheError(
                f"activation cache at {path} has format_version {manifest['format_version']}, "
                f"this code reads {FORMAT_VERSION}; {hint}"
            )
        if cache_key(manifest["spec"]) != manifest["key"]:
            raise CacheError(f"activation cache at {path}: manifest key does not match its spec; {hint}")
        if manifest["storage_dtype"] not in STORAGE_DTYPES:
            raise CacheError(f"activation cache at {path}: unknown storage dtype {manifest['storage_dtype']!r}; {hint}")
        np_dtype = STORAGE_DTYPES[manifest["storage_dtype"]][1]
        ctx, d = manifest["context_size"], manifest["d_in"]
        # which files matched their checksum, with the (size, mtime, inode) they had then
        verified = StatMemo(path / VERIFIED) if verify else None
        acts: list[np.memmap] = []
        tokens: list[np.memmap] = []
        total = 0
        for shard in manifest["shards"]:
            n = shard["n_seqs"]
            for fname, dtype, shape, is_tokens in (
                (shard["file"], np_dtype, (n, ctx, d), False),
                (shard["tokens_file"], np.dtype(np.int32), (n, ctx), True),
            ):
                fpath = path / fname
                if not fpath.exists():
                    raise CacheError(f"activation cache at {path}: shard {fname} is missing; {hint}")
                try:
                    arr = np.load(fpath, mmap_mode="r")
                except Exception as exc:  # truncated file, bad header, ...
                    raise CacheError(f"activation cache at {path}: cannot map {fname} ({exc}); {hint}") from exc
                if arr.shape != shape or arr.dtype != dtype:
                    raise CacheError(
                        f"activation cache at {path}: {fname} is {arr.dtype}{list(arr.shape)}, "
                        f"manifest says {dtype}{list(shape)}; {hint}"
                    )
                if verified is not None and (verify == "full" or verified.cached(fname, fpath) is None):
                    if not shard_digest_ok(fpath, shard, is_tokens):
                        raise CacheError(
                            f"activation cache at {path}: checksum mismatch in {fname} "
                            f"(corrupt: the file changed after the build)"
                        )
                    verified.remember(fname, fpath, True)
                (acts if fname == shard["file"] else tokens).append(arr)
            total += n
        if total != manifest["n_seqs"] or manifest["n_tokens"] != total * ctx:
            raise CacheError(
                f"activation cache at {path}: shards hold {total} sequences, manifest says {manifest['n_seqs']}; {hint}"
            )
        if verified is not None:
            verified.save()  # what matched now need not be hashed again (a read-only cache: logged)
        return cls(path, manifest, acts, tokens)

    def __repr__(self) -> str:
        return (
            f"ActivationCache({str(self.path)!r}, n_seqs={self.n_seqs}, ctx={self.context_size},"
            f" d_in={self.d_in}, dtype={self.storage_dtype}, shards={len(self._acts)})"
        )

    @property
    def n_shards(self) -> int:
        return len(self._acts)

    def shard_activations(self) -> list[np.memmap]:
        """Per-shard read-only memmaps ``[n_seqs_in_shard, ctx, d_in]`` in the storage dtype."""
        return list(self._acts)

    def activations(self) -> np.memmap | list[np.memmap]:
        """The activations as stored: one memmap ``[n_seqs, ctx, d_in]`` when the cache has a
        single shard, otherwise the list of per-shard memmaps (see ``shard_activations``).

        The dtype is the storage dtype; bfloat16 caches hold ``uint16`` bit patterns, so use
        ``to_tensor`` or ``iter_sequences`` to get floats.
        """
        return self._acts[0] if len(self._acts) == 1 else list(self._acts)

    def to_tensor(self, raw: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Stored activations (any slice of ``activations()``) -> a float torch tensor (a copy)."""
        return decode(raw, self.storage_dtype, dtype)

    def token_ids(self) -> np.ndarray:
        """Token ids ``[n_seqs, ctx]`` int32 (a memmap for one shard, else loaded in memory)."""
        if self._token_ids is None:
            self._token_ids = self._tokens[0] if len(self._tokens) == 1 else np.concatenate(self._tokens, axis=0)
        return self._token_ids

    def special_mask(self) -> np.ndarray:
        """Bool ``[n_seqs, ctx]``: True where the token is special (BOS/EOS/PAD...)."""
        if self._special_mask is None:
            ids = np.asarray(self.special_token_ids, dtype=np.int32)
            self._special_mask = np.isin(self.token_ids(), ids)
        return self._special_mask

    def sequences(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences ``[start, stop)`` in storage order: (LongTensor [n, ctx], Tensor [n, ctx, d])."""
        start, stop = max(0, start), min(self.n_seqs, stop)
        if stop <= start:
            raise IndexError(f"empty sequence range [{start}, {stop}) of {self.n_seqs}")
        toks, acts = [], []
        for s in range(self.n_shards):
            lo, hi = int(self._seq_bounds[s]), int(self._seq_bounds[s + 1])
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                toks.append(torch.from_numpy(self._tokens[s][a - lo : b - lo].astype(np.int64)))
                acts.append(decode(self._acts[s][a - lo : b - lo], self.storage_dtype, dtype))
        if len(toks) == 1:
            return toks[0], acts[0]
        return torch.cat(toks), torch.cat(acts)

    def iter_sequences(
        self, batch_size: int, dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All sequences in storage order, ``batch_size`` at a time (the last batch may be short):
        yields (token ids LongTensor [b, ctx], activations Tensor [b, ctx, d_in])."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        for start in range(0, self.n_seqs, batch_size):
            yield self.sequences(start, start + batch_size, dtype)


def _raise_failed(futures: Sequence[Future]) -> None:
    """Surface a background shard finish's error now rather than at the end of the build."""
    for f in futures:
        if f.done() and f.exception() is not None:
            raise f.exception()  # type: ignore[misc]


def _check_chunk(i: int, tokens: torch.Tensor, acts: torch.Tensor) -> None:
    if not (isinstance(tokens, torch.Tensor) and isinstance(acts, torch.Tensor)):
        raise TypeError(
            f"build_fn chunk {i}: expected (token_ids, acts) tensors, "
            f"got ({type(tokens).__name__}, {type(acts).__name__})"
        )
    if tokens.dim() != 2 or acts.dim() != 3 or tuple(acts.shape[:2]) != tuple(tokens.shape):
        raise ValueError(
            f"build_fn chunk {i}: token_ids must be [b, ctx] and acts [b, ctx, d] with "
            f"matching b, ctx; got {list(tokens.shape)} and {list(acts.shape)}"
        )


def _build(
    tmp: Path,
    spec: Mapping,
    key: str,
    build_fn: BuildFn,
    storage_dtype: str,
    special_ids: list[int],
    progress_total: int | None,
    shard_bytes: int,
    meta: Mapping[str, Any],
) -> None:
    """Run ``build_fn`` and write shards + manifest (last) into the empty directory ``tmp``."""
    torch_dtype, np_dtype = storage(storage_dtype)
    t0 = time.time()
    special = np.asarray(special_ids, dtype=np.int64)
    writer: ShardWriter | None = None
    ctx = d = None
    n_seqs = n_special = 0
    expected_ctx = spec.get("context_size")
    # A full shard is finished (flushed, fsynced, hashed: I/O bound) on a background thread while
    # the next chunks are computed; shards finish in order, so the manifest lists them in order.
    finishing: list[Future] = []
    writes: deque[Future] = deque()
    with (
        ThreadPoolExecutor(1, thread_name_prefix="cache-shard") as io,
        Progress(f"caching activations {key}", total=progress_total, unit="seq") as bar,
    ):
        for i, chunk in enumerate(build_fn()):
            tokens, acts = chunk
            _check_chunk(i, tokens, acts)
            if ctx is None:
                ctx, d = int(acts.shape[1]), int(acts.shape[2])
                if isinstance(expected_ctx, int) and expected_ctx != ctx:
                    raise ValueError(f"build_fn yields context size {ctx}, spec says {expected_ctx}")
                per_shard = max(1, shard_bytes // (ctx * d * np_dtype.itemsize))
            elif (acts.shape[1], acts.shape[2]) != (ctx, d):
                raise ValueError(
                    f"build_fn chunk {i}: shape {list(acts.shape)} differs from the first chunk's [*, {ctx}, {d}]"
                )
            # Convert on the source device (a GPU's chunk crosses to the host in the storage dtype,
            # not widened), then check what will be stored there: fp16 overflows to inf on models
            # with large residual norms.
            a = acts.detach().to(torch_dtype)
            if not bool(torch.isfinite(a).all()):
                hint = " (fp16 overflow? use storage_dtype=bfloat16)" if storage_dtype == "float16" else ""
                raise ValueError(f"build_fn chunk {i}: activations contain NaN/inf{hint}")
            a = a.cpu().contiguous()
            if a.data_ptr() == acts.data_ptr():  # written later, on the I/O thread: own the memory
                a = a.clone()
            acts_np = a.view(torch.uint16).numpy() if storage_dtype == "bfloat16" else a.numpy()
            tokens_np = tokens.detach().cpu().to(torch.int32).numpy()
            n_special += int(np.isin(tokens_np, special).sum())
            off, b = 0, len(tokens_np)
            while off < b:
                if writer is None:
                    assert ctx is not None and d is not None  # set by the first chunk
                    cap = per_shard
                    if progress_total:  # an exactly-sized last shard when the size is known
                        cap = min(cap, max(1, progress_total - n_seqs - off))
                    writer = ShardWriter(tmp, len(finishing), cap, ctx, d, np_dtype)
                k = writer.take(b - off)
                writes.append(io.submit(writer.append, tokens_np[off : off + k], acts_np[off : off + k]))
                off += k
                if writer.full:
                    finishing.append(io.submit(writer.finish))
                    writer = None
            # back-pressure: at most a few chunks in flight; errors surface here, not at the end
            while len(writes) > 4 or (writes and writes[0].done()):
                writes.popleft().result()
            _raise_failed(finishing)
            n_seqs += b
            bar.update(b)
        if writer is not None:
            finishing.append(io.submit(writer.finish))
        for f in writes:
            f.result()  # re-raises a failed write
        shards = [f.result() for f in finishing]  # re-raises a failed finish
    if n_seqs == 0:
        raise ValueError("build_fn yielded no activations; refusing to write an empty cache")
    assert ctx is not None  # set by the first chunk
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "spec": canonical(spec),
        "d_in": d,
        "context_size": ctx,
        "n_seqs": n_seqs,
        "n_tokens": n_seqs * ctx,
        "storage_dtype": storage_dtype,
        "numpy_dtype": np_dtype.name,  # bf16 is stored as raw uint16 bit patterns
        "shards": shards,
        "special_token_ids": special_ids,
        "n_special": n_special,
        "meta": canonical(meta),
        "build": {
            **_host_info(),
            "seconds": round(time.time() - t0, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    atomic_write_json(tmp / MANIFEST, manifest, sort_keys=True)  # last: marks the directory complete
    fsync_dir(tmp)


def _try_open(path: Path, verify: str) -> tuple[ActivationCache | None, str | None]:
    """(the cache, None), or (None, why it is unusable) -- (None, None) when there is none."""
    if not (path / MANIFEST).exists():
        return None, None
    try:
        return ActivationCache.open(path, verify=verify), None
    except CacheError as exc:
        log.warning("unusable activation cache: %s", exc)
        return None, str(exc)


def _quarantine(path: Path, reason: str) -> Path:
    """Move an unusable cache out of the way (kept for inspection) and say why, in reason.txt."""
    aside = path.parent / QUARANTINE / f"{path.name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    aside.parent.mkdir(exist_ok=True)
    os.rename(path, aside)
    (aside / "reason.txt").write_text(reason + "\n")
    log.warning("moved unusable activation cache to %s (delete it once inspected): %s", aside, reason)
    return aside


def get_or_build(
    spec: Mapping,
    cache_root: str | os.PathLike,
    build_fn: BuildFn,
    meta: Mapping[str, Any] | None = None,
    *,
    special_token_ids: Iterable[int] | None = None,
    storage_dtype: str | None = None,
    progress_total: int | None = None,
    lock_timeout: float | None = None,
    shard_bytes: int = SHARD_BYTES,
    verify: str = "changed",
) -> tuple[ActivationCache, bool]:
    """Open the cache for ``spec`` or build it once; returns ``(cache, built_now)``.

    ``build_fn()`` yields ``(token_ids LongTensor [b, ctx], acts Tensor [b, ctx, d])`` chunks; it
    is only called by the one process that holds ``<cache_root>/activations/<key>.lock``.
    ``special_token_ids`` (BOS/EOS/PAD ids, excluded from training batches) and
    ``storage_dtype`` ("float32" | "bfloat16" | "float16"; default: ``spec["storage_dtype"]`` or
    float32) may also be passed in ``meta``; explicit keywords win. ``progress_total`` is the
    expected number of sequences (progress bar total, and shard sizing). Remaining ``meta``
    entries are recorded in the manifest but do not change the key.
    """
    meta = dict(meta or {})
    if special_token_ids is None:
        special_token_ids = meta.pop("special_token_ids", None)
    else:
        meta.pop("special_token_ids", None)
    if special_token_ids is None:
        raise TypeError("get_or_build needs special_token_ids (BOS/EOS/PAD ids; [] if none)")
    special = sorted({int(t) for t in special_token_ids})
    storage_dtype = storage_dtype or meta.pop("storage_dtype", None) or spec.get("storage_dtype") or "float32"
    meta.pop("storage_dtype", None)
    storage(storage_dtype)  # validate early
    # The key must cover the stored dtype, or caches of two dtypes would share one key.
    if spec.get("storage_dtype", "float32") != storage_dtype:
        raise ValueError(
            f"storage_dtype={storage_dtype!r} disagrees with the spec's "
            f"storage_dtype={spec.get('storage_dtype')!r}; put the storage dtype "
            f"in the spec so that it is part of the cache key"
        )
    if progress_total is None:
        progress_total = meta.pop("progress_total", None)
    meta.pop("progress_total", None)

    key = cache_key(spec)
    root = Path(cache_root).expanduser().absolute() / "activations"
    final = root / key

    def _reuse(cache: ActivationCache) -> ActivationCache:
        if cache.special_token_ids != special:
            log.warning(
                "activation cache %s was built with special_token_ids=%s, caller has %s; using the cache's",
                key,
                cache.special_token_ids,
                special,
            )
        log.info("reusing activation cache %s", final)
        return cache

    found: dict[str, Any] = {}

    def ready(path: Path) -> ActivationCache | None:
        cache, found["unusable"] = _try_open(path, verify)
        return _reuse(cache) if cache is not None else None

    def discard(path: Path) -> None:  # an unusable or incomplete cache is kept aside, with why
        found["replaced"] = found.get("unusable") or "incomplete (no manifest)"
        _quarantine(path, found["replaced"])

    def build(tmp: Path) -> None:
        log.info("building activation cache %s (%s)", key, storage_dtype)
        found["t0"] = time.time()
        _build(tmp, spec, key, build_fn, storage_dtype, special, progress_total, shard_bytes, meta)

    def finish(path: Path) -> ActivationCache:
        seconds = round(time.time() - found["t0"], 3)
        entry = {
            "key": key,
            **_host_info(),
            "seconds": seconds,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        # One short O_APPEND write per build: lines from concurrent builders never interleave.
        fd = os.open(root / BUILDS_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        finally:
            os.close(fd)
        verified = StatMemo(path / VERIFIED)
        for name in _shard_files(path):  # hashed as written: the first reuse need not hash again
            verified.remember(name, path / name, True)
        verified.save()
        cache = ActivationCache.open(path)
        cache.replaced = found.get("replaced")
        log.info("built activation cache %s: %d tokens x %d in %.1fs", key, cache.n_tokens, cache.d_in, seconds)
        return cache

    return build_once(
        final,
        build,
        ready=ready,
        finish=finish,
        discard=discard,
        lock_timeout=lock_timeout,
        temp_prefix=f".tmp-{key}-",
        leftovers=[f".trash-{key}-*"],
    )


def _shard_files(path: Path) -> list[str]:
    manifest = json.loads((path / MANIFEST).read_text())
    return [name for shard in manifest["shards"] for name in (shard["file"], shard["tokens_file"])]


def quarantine(cache: ActivationCache, reason: str) -> Path:
    """Take a cache found bad while in use (e.g. NaN in a batch) out of service: the next job
    that needs it rebuilds it."""
    return _quarantine(cache.path, reason)
