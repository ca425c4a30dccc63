"""The on-disk form of an activation cache shard: plain ``.npy`` files, written sequentially.

Shards can be memory-mapped with ``np.load(mmap_mode="r")``. numpy has no bfloat16: bf16
activations are stored as their raw 16-bit patterns (``uint16``) and turned back into floats
through a torch view. Each shard's manifest entry carries a sha256 of its data (the bytes after
the .npy header), hashed as it is written.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from sae_sweep.util.files import sha256_file

# storage dtype name -> (torch dtype used for conversion, numpy dtype on disk)
STORAGE_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype(np.float32)),
    "float16": (torch.float16, np.dtype(np.float16)),
    "bfloat16": (torch.bfloat16, np.dtype(np.uint16)),  # raw bf16 bit patterns
}


def storage(name: str) -> tuple[torch.dtype, np.dtype]:
    try:
        return STORAGE_DTYPES[name]
    except KeyError:
        raise ValueError(f"storage_dtype={name!r} is not supported; use one of {sorted(STORAGE_DTYPES)}") from None


def to_torch(raw: np.ndarray, storage_dtype: str, dtype: torch.dtype) -> torch.Tensor:
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


def decode(raw: np.ndarray, storage_dtype: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Activations as stored (numpy, storage dtype) -> torch tensor of ``dtype`` (a copy)."""
    return to_torch(np.array(raw), storage_dtype, dtype)  # copy: memmaps are read-only


class ShardWriter:
    """One shard's two .npy files, written sequentially with plain writes.

    The build loop (main thread) reserves rows with ``take``; ``append`` and ``finish`` run in
    order on the build's I/O thread, so writing, hashing and fsync overlap the next forward
    passes. Plain writes, not memmaps: no page fault per 4 KiB page and no msync. Each file's
    header is written for ``capacity`` rows and rewritten in place if the shard ends short. The
    manifest's ``data_sha256`` covers the bytes after the header (hashed as they are written, so
    the file is never read back).
    """

    def __init__(self, directory: Path, index: int, capacity: int, ctx: int, d: int, np_dtype: np.dtype):
        self.dir, self.capacity, self.n = directory, capacity, 0
        self.files = []  # (final name, partial path, handle, dtype, row shape, hasher)
        for name, dtype, row in (
            (f"acts-{index:05d}.npy", np_dtype, (ctx, d)),
            (f"tokens-{index:05d}.npy", np.dtype(np.int32), (ctx,)),
        ):
            partial = directory / f".partial-{name}"
            fh = open(partial, "wb")
            np.lib.format.write_array_header_1_0(
                fh, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (capacity, *row)}
            )
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
            # numpy's stubs give ndarray __buffer__ only for Python >= 3.12 (it has the buffer protocol on all)
            buf = memoryview(np.ascontiguousarray(arr)).cast("B")  # type: ignore[arg-type]
            fh.write(buf)
            h.update(buf)

    def finish(self) -> dict[str, Any]:
        """Close, shrink if short, fsync and rename into place (I/O thread); the manifest entry."""
        entry: dict[str, Any] = {"n_seqs": self.n}
        for (name, partial, fh, dtype, row, h), key in zip(self.files, ("", "tokens_")):
            fh.close()
            if self.n < self.capacity:  # short last shard: shrink the file in place
                shrink_npy(partial, dtype, (self.n, *row))
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
            os.replace(partial, self.dir / name)
            entry[f"{key}file" if key else "file"] = name
            entry[f"{key}data_sha256"] = h.hexdigest()
        return entry


def skip_npy_header(fh) -> tuple[int, int]:
    """Read past a .npy file's magic and header; returns the format version. fh is then at the data."""
    version = np.lib.format.read_magic(fh)
    (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(fh)
    return version


def shard_digest_ok(path: Path, shard: Mapping[str, Any], tokens: bool) -> bool:
    """Check a shard file against its manifest checksum: ``data_sha256`` (bytes after the .npy
    header) or, for caches written before it, ``sha256`` of the whole file."""
    prefix = "tokens_" if tokens else ""
    if f"{prefix}data_sha256" in shard:
        with open(path, "rb") as fh:
            skip_npy_header(fh)
            h = hashlib.sha256()
            while chunk := fh.read(8 * 2**20):
                h.update(chunk)
        return h.hexdigest() == shard[f"{prefix}data_sha256"]
    return sha256_file(path) == shard[f"{prefix}sha256"]


def shrink_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """Cut a C-ordered .npy file down to its first shape[0] rows: rewrite the header for the new
    shape at the same length (padding, as the format allows) and truncate the data. No copy."""
    with open(path, "r+b") as fh:
        version = skip_npy_header(fh)
        offset = fh.tell()
        len_bytes = 2 if version == (1, 0) else 4
        body = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
        room = offset - 8 - len_bytes  # magic (6) + version (2) + length field
        if len(body) + 1 > room:
            raise ValueError(f"cannot rewrite the header of {path} in place")
        header = body.ljust(room - 1) + "\n"
        fh.seek(8)
        fh.write(room.to_bytes(len_bytes, "little") + header.encode("latin1"))
        fh.truncate(offset + int(np.prod(shape)) * dtype.itemsize)
