"""Content-addressed activation cache: build once under a lock, read back as shuffled batches.

Layout under ``<cache_root>/activations/``::

    <key>/manifest.json          written last; its presence (and validity) marks a complete cache
    <key>/acts-00000.npy         [n_seqs_in_shard, context_size, d_in], storage dtype (bf16 as uint16)
    <key>/tokens-00000.npy       [n_seqs_in_shard, context_size], int32 token ids
    <key>.lock                   OwnedLock held while <key> is being built
    .tmp-<key>-<pid>-<uuid>/     a build in progress (renamed to <key>/ when complete)
    builds.log                   one JSON line per completed build (key, host, pid, job id, time)

The key is a hash of everything that changes the activations (see ``cache_key``); the same key is
reused, never recomputed. Builds write into a private temp directory that is renamed into place
only when complete, so a killed build never leaves something that looks like a cache.

Shards are plain ``.npy`` files so they can be memory-mapped with ``np.load(mmap_mode="r")``.
numpy has no bfloat16: bf16 activations are stored as their raw 16-bit patterns (``uint16``) and
turned back into floats through a torch view (``torch.from_numpy(a).view(torch.bfloat16)``).

This module knows nothing about SAEs; it only stores (token ids, activations) pairs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_sweep.locks import OwnedLock

__all__ = [
    "ActivationCache",
    "CacheError",
    "ShuffledReader",
    "STORAGE_DTYPES",
    "SHARD_BYTES",
    "cache_key",
    "get_or_build",
    "read_builds_log",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SHARD_BYTES = 256 * 2**20  # target size of one activation shard file
MANIFEST = "manifest.json"
BUILDS_LOG = "builds.log"

# storage dtype name -> (torch dtype used for conversion, numpy dtype on disk)
STORAGE_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype(np.float32)),
    "float16": (torch.float16, np.dtype(np.float16)),
    "bfloat16": (torch.bfloat16, np.dtype(np.uint16)),  # raw bf16 bit patterns
}

BuildFn = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class CacheError(RuntimeError):
    """An activation cache is missing, incomplete, corrupt or inconsistent with its manifest."""


# --------------------------------------------------------------------------------------- keys
def _canonical(obj: Any) -> Any:
    """Plain JSON-able form of a spec (Mappings incl. OmegaConf DictConfig, sequences, paths)."""
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (str, bytes)):
        return obj.decode() if isinstance(obj, bytes) else obj
    if isinstance(obj, (set, frozenset)):
        return sorted(_canonical(v) for v in obj)
    if isinstance(obj, Sequence):
        return [_canonical(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return _canonical(obj.tolist())
    if isinstance(obj, (os.PathLike, torch.dtype, np.dtype)):
        return str(obj)
    raise TypeError(f"cache spec value {obj!r} of type {type(obj).__name__} is not JSON-able")


def _canonical_json(spec: Mapping) -> str:
    return json.dumps(_canonical(spec), sort_keys=True, separators=(",", ":"), allow_nan=False)


def cache_key(spec: Mapping) -> str:
    """First 16 hex chars of sha256 over the canonical JSON (sorted keys) of ``spec``.

    ``spec`` should hold everything that changes the activations and nothing else: model
    fingerprint (id + revision + dtype), layer, hook, dataset fingerprint, context size, token
    budget, storage dtype, tokenizer hash. Key order and Mapping type do not matter.
    """
    return hashlib.sha256(_canonical_json(spec).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ helpers
def _host_info() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def _sha256_file(path: Path, block: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _storage(name: str) -> tuple[torch.dtype, np.dtype]:
    try:
        return STORAGE_DTYPES[name]
    except KeyError:
        raise ValueError(
            f"storage_dtype={name!r} is not supported; use one of {sorted(STORAGE_DTYPES)}"
        ) from None


def _to_torch(raw: np.ndarray, storage_dtype: str, dtype: torch.dtype) -> torch.Tensor:
    """Stored activations (numpy array we may reuse/alias) -> torch tensor of ``dtype``."""
    if storage_dtype == "bfloat16":
        if dtype == torch.float32:
            # bf16 is the top half of an fp32: widening the bit pattern is exact and ~3x faster
            # than torch's bf16 -> fp32 cast on CPU.
            wide = raw.astype(np.uint32)
            wide <<= 16
            return torch.from_numpy(wide.view(np.float32))
        return torch.from_numpy(raw).view(torch.bfloat16).to(dtype)
    return torch.from_numpy(raw).to(dtype)


def _decode(raw: np.ndarray, storage_dtype: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Activations as stored (numpy, storage dtype) -> torch tensor of ``dtype`` (a copy)."""
    return _to_torch(np.array(raw), storage_dtype, dtype)  # copy: memmaps are read-only


def read_builds_log(cache_root: str | os.PathLike) -> list[dict[str, Any]]:
    """Entries of ``<cache_root>/activations/builds.log`` (one per completed build), oldest first."""
    path = Path(cache_root) / "activations" / BUILDS_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------- cache
class ActivationCache:
    """A complete, read-only activation cache directory. Create with ``ActivationCache.open``."""

    def __init__(self, path: Path, manifest: dict[str, Any], acts: list[np.memmap],
                 tokens: list[np.memmap]):
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

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = False) -> "ActivationCache":
        """Open a complete cache; ``verify=True`` also checks every shard's sha256.

        Raises ``CacheError`` naming what is wrong when the directory is missing, incomplete
        (no manifest: an interrupted or in-progress build) or inconsistent with its manifest.
        """
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
            raise CacheError(f"activation cache at {path}: unreadable {MANIFEST} ({exc}); {hint}")
        required = ("format_version", "key", "spec", "n_seqs", "n_tokens", "d_in", "context_size",
                    "storage_dtype", "shards", "special_token_ids", "n_special")
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
            raise CacheError(f"activation cache at {path}: unknown storage dtype "
                             f"{manifest['storage_dtype']!r}; {hint}")
        np_dtype = STORAGE_DTYPES[manifest["storage_dtype"]][1]
        ctx, d = manifest["context_size"], manifest["d_in"]
        acts, tokens, total = [], [], 0
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
                    raise CacheError(f"activation cache at {path}: cannot map {fname} ({exc}); {hint}")
                if arr.shape != shape or arr.dtype != dtype:
                    raise CacheError(
                        f"activation cache at {path}: {fname} is {arr.dtype}{list(arr.shape)}, "
                        f"manifest says {dtype}{list(shape)}; {hint}"
                    )
                if verify and not _shard_digest_ok(fpath, shard, is_tokens):
                    raise CacheError(f"activation cache at {path}: checksum mismatch in {fname} "
                                     f"(corrupt file); {hint}")
                (acts if fname == shard["file"] else tokens).append(arr)
            total += n
        if total != manifest["n_seqs"] or manifest["n_tokens"] != total * ctx:
            raise CacheError(f"activation cache at {path}: shards hold {total} sequences, "
                             f"manifest says {manifest['n_seqs']}; {hint}")
        return cls(path, manifest, acts, tokens)

    def __repr__(self) -> str:
        return (f"ActivationCache({str(self.path)!r}, n_seqs={self.n_seqs}, ctx={self.context_size},"
                f" d_in={self.d_in}, dtype={self.storage_dtype}, shards={len(self._acts)})")

    # -- raw arrays ------------------------------------------------------------------------
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
        return _decode(raw, self.storage_dtype, dtype)

    def token_ids(self) -> np.ndarray:
        """Token ids ``[n_seqs, ctx]`` int32 (a memmap for one shard, else loaded in memory)."""
        if self._token_ids is None:
            self._token_ids = (self._tokens[0] if len(self._tokens) == 1
                               else np.concatenate(self._tokens, axis=0))
        return self._token_ids

    def special_mask(self) -> np.ndarray:
        """Bool ``[n_seqs, ctx]``: True where the token is special (BOS/EOS/PAD...)."""
        if self._special_mask is None:
            ids = np.asarray(self.special_token_ids, dtype=np.int32)
            self._special_mask = np.isin(self.token_ids(), ids)
        return self._special_mask

    # -- ordered access (evals) -----------------------------------------------------------
    def sequences(self, start: int, stop: int, dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences ``[start, stop)`` in storage order: (LongTensor [n, ctx], Tensor [n, ctx, d])."""
        start, stop = max(0, start), min(self.n_seqs, stop)
        if stop <= start:
            raise IndexError(f"empty sequence range [{start}, {stop}) of {self.n_seqs}")
        toks, acts = [], []
        for s in range(self.n_shards):
            lo, hi = int(self._seq_bounds[s]), int(self._seq_bounds[s + 1])
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                toks.append(torch.from_numpy(self._tokens[s][a - lo:b - lo].astype(np.int64)))
                acts.append(_decode(self._acts[s][a - lo:b - lo], self.storage_dtype, dtype))
        if len(toks) == 1:
            return toks[0], acts[0]
        return torch.cat(toks), torch.cat(acts)

    def iter_sequences(self, batch_size: int, dtype: torch.dtype = torch.float32
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All sequences in storage order, ``batch_size`` at a time (the last batch may be short):
        yields (token ids LongTensor [b, ctx], activations Tensor [b, ctx, d_in])."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        for start in range(0, self.n_seqs, batch_size):
            yield self.sequences(start, start + batch_size, dtype)


# ------------------------------------------------------------------------------------ build
class _ShardWriter:
    """One shard's two .npy files, written sequentially with plain writes.

    The build loop (main thread) reserves rows with ``take``; ``append`` and ``finish`` run in
    order on the build's I/O thread, so writing, hashing and fsync overlap the next forward
    passes. Plain writes, not memmaps: no page fault per 4 KiB page and no msync. Each file's
    header is written for ``capacity`` rows and rewritten in place if the shard ends short. The
    manifest's ``data_sha256`` covers the bytes after the header (hashed as they are written, so
    the file is never read back).
    """

    def __init__(self, directory: Path, index: int, capacity: int, ctx: int, d: int,
                 np_dtype: np.dtype):
        self.dir, self.capacity, self.n = directory, capacity, 0
        self.files = []  # (final name, partial path, handle, dtype, row shape, hasher)
        for name, dtype, row in ((f"acts-{index:05d}.npy", np_dtype, (ctx, d)),
                                 (f"tokens-{index:05d}.npy", np.dtype(np.int32), (ctx,))):
            partial = directory / f".partial-{name}"
            fh = open(partial, "wb")
            np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                      "fortran_order": False, "shape": (capacity, *row)})
            self.files.append((name, partial, fh, dtype, row, hashlib.sha256()))

    @property
    def full(self) -> bool:
        return self.n >= self.capacity

    def take(self, available: int) -> int:
        """Reserve up to ``available`` rows (main thread); returns how many this shard takes."""
        k = min(available, self.capacity - self.n)
        self.n += k
        return k

    def append(self, tokens: np.ndarray, acts: np.ndarray) -> None:
        """Write rows reserved by ``take`` (I/O thread; file writes and hashing release the GIL)."""
        for (_, _, fh, _, _, h), arr in zip(self.files, (acts, tokens)):
            buf = memoryview(np.ascontiguousarray(arr)).cast("B")
            fh.write(buf)
            h.update(buf)

    def finish(self) -> dict[str, Any]:
        """Close, shrink if short, fsync and rename into place (I/O thread); the manifest entry."""
        entry: dict[str, Any] = {"n_seqs": self.n}
        for (name, partial, fh, dtype, row, h), key in zip(self.files, ("", "tokens_")):
            fh.close()
            if self.n < self.capacity:  # short last shard: shrink the file in place
                _shrink_npy(partial, dtype, (self.n, *row))
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
            os.replace(partial, self.dir / name)
            entry[f"{key}file" if key else "file"] = name
            entry[f"{key}data_sha256"] = h.hexdigest()
        return entry


def _skip_npy_header(fh) -> tuple[int, int]:
    """Read past a .npy file's magic and header; returns the format version. fh is then at the data."""
    version = np.lib.format.read_magic(fh)
    (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(fh)
    return version


def _shard_digest_ok(path: Path, shard: Mapping[str, Any], tokens: bool) -> bool:
    """Check a shard file against its manifest checksum: ``data_sha256`` (bytes after the .npy
    header) or, for caches written before it, ``sha256`` of the whole file."""
    prefix = "tokens_" if tokens else ""
    if f"{prefix}data_sha256" in shard:
        with open(path, "rb") as fh:
            _skip_npy_header(fh)
            h = hashlib.sha256()
            while chunk := fh.read(8 * 2**20):
                h.update(chunk)
        return h.hexdigest() == shard[f"{prefix}data_sha256"]
    return _sha256_file(path) == shard[f"{prefix}sha256"]


def _raise_failed(futures: Sequence[Future]) -> None:
    """Surface a background shard finish's error now rather than at the end of the build."""
    for f in futures:
        if f.done() and f.exception() is not None:
            raise f.exception()  # type: ignore[misc]


def _shrink_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """Cut a C-ordered .npy file down to its first shape[0] rows: rewrite the header for the new
    shape at the same length (padding, as the format allows) and truncate the data. No copy."""
    with open(path, "r+b") as fh:
        version = _skip_npy_header(fh)
        offset = fh.tell()
        len_bytes = 2 if version == (1, 0) else 4
        body = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
        room = offset - 8 - len_bytes  # magic (6) + version (2) + length field
        if len(body) + 1 > room:
            raise CacheError(f"cannot rewrite the header of {path} in place")
        header = body.ljust(room - 1) + "\n"
        fh.seek(8)
        fh.write(room.to_bytes(len_bytes, "little") + header.encode("latin1"))
        fh.truncate(offset + int(np.prod(shape)) * dtype.itemsize)


def _check_chunk(i: int, tokens: torch.Tensor, acts: torch.Tensor) -> None:
    if not (isinstance(tokens, torch.Tensor) and isinstance(acts, torch.Tensor)):
        raise TypeError(f"build_fn chunk {i}: expected (token_ids, acts) tensors, "
                        f"got ({type(tokens).__name__}, {type(acts).__name__})")
    if tokens.dim() != 2 or acts.dim() != 3 or tuple(acts.shape[:2]) != tuple(tokens.shape):
        raise ValueError(f"build_fn chunk {i}: token_ids must be [b, ctx] and acts [b, ctx, d] with "
                         f"matching b, ctx; got {list(tokens.shape)} and {list(acts.shape)}")


def _build(tmp: Path, spec: Mapping, key: str, build_fn: BuildFn, storage_dtype: str,
           special_ids: list[int], progress_total: int | None, shard_bytes: int,
           meta: Mapping[str, Any]) -> None:
    """Run ``build_fn`` and write shards + manifest (last) into the empty directory ``tmp``."""
    torch_dtype, np_dtype = _storage(storage_dtype)
    t0 = time.time()
    special = np.asarray(special_ids, dtype=np.int64)
    writer: _ShardWriter | None = None
    ctx = d = None
    n_seqs = n_special = 0
    expected_ctx = spec.get("context_size")
    # A full shard is finished (flushed, fsynced, hashed: I/O bound) on a background thread while
    # the next chunks are computed; shards finish in order, so the manifest lists them in order.
    finishing: list[Future] = []
    writes: deque[Future] = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="cache-shard") as io, \
            tqdm(total=progress_total, unit="seq", desc=f"caching activations {key}",
                 disable=None, dynamic_ncols=True) as bar:
        for i, chunk in enumerate(build_fn()):
            tokens, acts = chunk
            _check_chunk(i, tokens, acts)
            if ctx is None:
                ctx, d = int(acts.shape[1]), int(acts.shape[2])
                if isinstance(expected_ctx, int) and expected_ctx != ctx:
                    raise ValueError(f"build_fn yields context size {ctx}, spec says {expected_ctx}")
                per_shard = max(1, shard_bytes // (ctx * d * np_dtype.itemsize))
            elif (acts.shape[1], acts.shape[2]) != (ctx, d):
                raise ValueError(f"build_fn chunk {i}: shape {list(acts.shape)} differs from "
                                 f"the first chunk's [*, {ctx}, {d}]")
            # Convert on the source device (less to transfer), then check what will be stored:
            # fp16 overflows to inf on models with large residual norms.
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
                    cap = per_shard
                    if progress_total:  # an exactly-sized last shard when the size is known
                        cap = min(cap, max(1, progress_total - n_seqs - off))
                    writer = _ShardWriter(tmp, len(finishing), cap, ctx, d, np_dtype)
                k = writer.take(b - off)
                writes.append(io.submit(writer.append, tokens_np[off:off + k], acts_np[off:off + k]))
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
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "spec": _canonical(spec),
        "d_in": d,
        "context_size": ctx,
        "n_seqs": n_seqs,
        "n_tokens": n_seqs * ctx,
        "storage_dtype": storage_dtype,
        "numpy_dtype": np_dtype.name,  # bf16 is stored as raw uint16 bit patterns
        "shards": shards,
        "special_token_ids": special_ids,
        "n_special": n_special,
        "meta": _canonical(meta),
        "build": {**_host_info(), "seconds": round(time.time() - t0, 3),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    _atomic_write_json(tmp / MANIFEST, manifest)  # last: marks the directory complete
    _fsync_dir(tmp)


def _try_open(path: Path) -> ActivationCache | None:
    if not (path / MANIFEST).exists():
        return None
    try:
        return ActivationCache.open(path)
    except CacheError as exc:
        log.warning("ignoring unusable activation cache: %s", exc)
        return None


def _remove_tree(path: Path) -> None:
    """Rename aside first (atomic), so no reader ever sees a half-deleted directory."""
    aside = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


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
    storage_dtype = storage_dtype or meta.pop("storage_dtype", None) or spec.get("storage_dtype") \
        or "float32"
    meta.pop("storage_dtype", None)
    _storage(storage_dtype)  # validate early
    # The key must cover the stored dtype, or caches of two dtypes would share one key.
    if spec.get("storage_dtype", "float32") != storage_dtype:
        raise ValueError(f"storage_dtype={storage_dtype!r} disagrees with the spec's "
                         f"storage_dtype={spec.get('storage_dtype')!r}; put the storage dtype "
                         f"in the spec so that it is part of the cache key")
    if progress_total is None:
        progress_total = meta.pop("progress_total", None)
    meta.pop("progress_total", None)

    key = cache_key(spec)
    root = Path(cache_root).expanduser().absolute() / "activations"
    final = root / key

    def _reuse(cache: ActivationCache) -> tuple[ActivationCache, bool]:
        if cache.special_token_ids != special:
            log.warning("activation cache %s was built with special_token_ids=%s, caller has %s; "
                        "using the cache's", key, cache.special_token_ids, special)
        log.info("reusing activation cache %s", final)
        return cache, False

    if (cache := _try_open(final)) is not None:
        return _reuse(cache)
    root.mkdir(parents=True, exist_ok=True)
    with OwnedLock(root / f"{key}.lock", timeout=lock_timeout):
        # Someone may have finished it while we waited.
        if (cache := _try_open(final)) is not None:
            return _reuse(cache)
        # We hold the lock, so any temp dir for this key is left over from a dead build.
        for stale in [*root.glob(f".tmp-{key}-*"), *root.glob(f".trash-{key}-*")]:
            log.info("removing leftover build directory %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            log.warning("replacing unusable activation cache %s", final)
            _remove_tree(final)
        tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        log.info("building activation cache %s (%s)", key, storage_dtype)
        t0 = time.time()
        try:
            _build(tmp, spec, key, build_fn, storage_dtype, special, progress_total,
                   shard_bytes, meta)
            os.rename(tmp, final)  # atomic: the cache appears complete or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(root)
        seconds = round(time.time() - t0, 3)
        entry = {"key": key, **_host_info(), "seconds": seconds,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        # One short O_APPEND write per build: lines from concurrent builders never interleave.
        fd = os.open(root / BUILDS_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        finally:
            os.close(fd)
        cache = ActivationCache.open(final)
        log.info("built activation cache %s: %d tokens x %d in %.1fs",
                 key, cache.n_tokens, cache.d_in, seconds)
        return cache, True


# ----------------------------------------------------------------------------------- reader
class ShuffledReader:
    """Endless iterator of ``[batch_size, d_in]`` activation batches in a seed-fixed order.

    * Pool: every token position of the cache, minus special tokens when ``exclude_special``.
    * Epoch ``e`` visits the pool in the order of ``torch.randperm`` drawn from
      ``torch.Generator().manual_seed(seed * 1_000_003 + e)``; batch ``i`` is slice
      ``[i*B, (i+1)*B)`` of that permutation. The last partial batch of an epoch is DROPPED, so
      every batch has exactly ``batch_size`` rows and each position appears at most once per
      epoch (exactly once when the pool size is a multiple of ``batch_size``); a different
      permutation each epoch means different positions are dropped.
    * Within a batch, rows come in storage order (the batch's positions are sorted for fast
      memmap reads); the *set* of rows is what the permutation picks.
    * ``num_workers`` background threads read up to ``prefetch`` batches ahead (numpy releases
      the GIL while gathering, so reading overlaps training). Each prefetched batch is a
      fixed (epoch, batch) slot handed out strictly in order, so the output never depends on
      prefetching or thread timing. ``prefetch=0`` reads inline.
    * ``state_dict()`` records the position of the next batch the consumer gets (not of the
      prefetcher); ``load_state_dict()`` resumes with exactly the same subsequent batches.
    * On CUDA devices batches are pinned and copied with ``non_blocking=True``.
    """

    def __init__(
        self,
        cache: ActivationCache,
        batch_size: int,
        seed: int,
        device: str | torch.device = "cpu",
        exclude_special: bool = True,
        dtype: torch.dtype = torch.float32,
        prefetch: int = 4,
        num_workers: int = 2,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.cache = cache
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.exclude_special = exclude_special
        self.dtype = dtype
        self.prefetch = max(0, int(prefetch))
        self.num_workers = max(1, int(num_workers))
        self.d_in = cache.d_in
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()

        # Global position p = seq * ctx + t; shard s holds positions [bounds[s], bounds[s+1]).
        ctx = cache.context_size
        self._flat = [a.reshape(-1, cache.d_in) for a in cache.shard_activations()]
        self._bounds = np.asarray(cache._seq_bounds, dtype=np.int64) * ctx
        pos_dtype = np.int32 if cache.n_tokens < 2**31 else np.int64
        if exclude_special and cache.n_special > 0:
            self._pool: np.ndarray | None = np.flatnonzero(
                ~cache.special_mask().reshape(-1)).astype(pos_dtype)
            self.n_positions = int(len(self._pool))
        else:
            self._pool = None  # identity: positions are 0 .. n_tokens - 1
            self.n_positions = cache.n_tokens
        self._perm_dtype = torch.int32 if self.n_positions < 2**31 else torch.int64
        if self.n_positions < self.batch_size:
            raise ValueError(
                f"activation cache {cache.key} has {self.n_positions} usable tokens, fewer than "
                f"batch_size={self.batch_size}; build a larger cache or lower the batch size"
            )
        self.batches_per_epoch = self.n_positions // self.batch_size

        self.epoch = 0
        self.batch_in_epoch = 0
        self._perms: dict[int, torch.Tensor] = {}  # epoch -> permutation (at most two kept)
        self._perm_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[tuple[int, int], Future]] = deque()
        self._next_slot = (0, 0)

    # -- order ----------------------------------------------------------------------------
    def _perm(self, epoch: int) -> torch.Tensor:
        with self._perm_lock:  # workers straddling an epoch boundary share one draw
            perm = self._perms.get(epoch)
            if perm is None:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(self.n_positions, generator=g, dtype=self._perm_dtype)
                self._perms[epoch] = perm
                for old in [e for e in self._perms if e < epoch - 1]:
                    del self._perms[old]
            return perm

    def positions(self, epoch: int, batch: int) -> np.ndarray:
        """Sorted global token positions (``seq * ctx + t``) of batch ``batch`` of ``epoch``."""
        if not 0 <= batch < self.batches_per_epoch:
            raise IndexError(f"batch {batch} outside [0, {self.batches_per_epoch})")
        idx = self._perm(epoch)[batch * self.batch_size:(batch + 1) * self.batch_size].numpy()
        pos = self._pool[idx] if self._pool is not None else idx
        return np.sort(pos.astype(np.int64, copy=False))

    def _read(self, pos: np.ndarray) -> torch.Tensor:
        # Fancy indexing with sorted rows touches each page of the memmap at most once
        # (measured faster than np.take(..., out=) here).
        if len(self._flat) == 1:
            raw = self._flat[0][pos]
        else:
            raw = np.empty((len(pos), self.d_in), dtype=self._flat[0].dtype)
            cuts = np.searchsorted(pos, self._bounds)  # pos is sorted: one run per shard
            for s, flat in enumerate(self._flat):
                lo, hi = cuts[s], cuts[s + 1]
                if lo < hi:
                    raw[lo:hi] = flat[pos[lo:hi] - self._bounds[s]]
        t = _to_torch(raw, self.cache.storage_dtype, self.dtype)
        return t.pin_memory() if self._pin else t

    def batch(self, epoch: int, batch: int) -> torch.Tensor:
        """Batch ``batch`` of ``epoch`` on the CPU, without moving the iterator."""
        return self._read(self.positions(epoch, batch))

    # -- prefetch -------------------------------------------------------------------------
    def _advance(self, slot: tuple[int, int]) -> tuple[int, int]:
        e, b = slot
        return (e + 1, 0) if b + 1 == self.batches_per_epoch else (e, b + 1)

    def _fill(self) -> None:
        """Keep ``prefetch`` upcoming slots in flight, in order."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self.num_workers, thread_name_prefix=f"shuffled-reader-{self.cache.key}")
            self._pending.clear()
            self._next_slot = (self.epoch, self.batch_in_epoch)
        while len(self._pending) < self.prefetch:
            slot = self._next_slot
            self._pending.append((slot, self._executor.submit(self.batch, *slot)))
            self._next_slot = self._advance(slot)

    def close(self, wait: bool = True) -> None:
        """Drop prefetched batches and stop the worker threads (they restart on demand)."""
        executor, self._executor = self._executor, None
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)

    def __del__(self):
        try:
            self.close(wait=False)  # may run in a worker thread, which cannot join itself
        except Exception:
            pass

    def __enter__(self) -> "ShuffledReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> "ShuffledReader":
        return self

    def __next__(self) -> torch.Tensor:
        slot = (self.epoch, self.batch_in_epoch)
        if self.prefetch == 0:
            x = self.batch(*slot)
        else:
            self._fill()
            got, fut = self._pending.popleft()
            assert got == slot, f"prefetch out of order: {got} != {slot}"
            try:
                x = fut.result()  # re-raises a worker's exception here
            except BaseException:
                self.close()
                raise
        self.epoch, self.batch_in_epoch = self._advance(slot)
        if self.prefetch:
            self._fill()  # start the replacement read before handing out this batch
        if self.device.type != "cpu":
            x = x.to(self.device, non_blocking=self._pin)
        return x

    @property
    def tokens_seen(self) -> int:
        """Tokens handed out so far (including those before a resume)."""
        return (self.epoch * self.batches_per_epoch + self.batch_in_epoch) * self.batch_size

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch; JSON-able. Extra keys guard against a mismatched resume."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "batch_size": self.batch_size, "n_positions": self.n_positions}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state`` (from ``state_dict``); the next batches equal those that followed."""
        for name, mine in (("seed", self.seed), ("batch_size", self.batch_size),
                           ("n_positions", self.n_positions)):
            if name in state and int(state[name]) != mine:
                raise ValueError(f"reader state has {name}={state[name]}, this reader has {mine}: "
                                 f"it cannot resume the same batch sequence")
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"reader state epoch={epoch} batch_in_epoch={batch} is out of range "
                             f"(batches_per_epoch={self.batches_per_epoch})")
        self.close()
        self.epoch, self.batch_in_epoch = epoch, batch
