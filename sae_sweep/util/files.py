"""Atomic file writes: a reader (or a job killed mid-write) sees the old file or the new one, never half.

Every write goes to a temp file in the target's own directory (so the rename never crosses a file
system), is flushed and fsynced, then renamed over the target with ``os.replace``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Union

Content = Union[bytes, str, Callable[[Path], None]]

# Data files this process found damaged (checksum mismatch, unreadable) and rebuilt: token windows,
# generated text chunks. A job reports them in its run's tags.
REPAIRED: List[str] = []


def atomic_write(
    path: str | os.PathLike,
    content: Content,
    keep_previous: str | os.PathLike | None = None,
    needed: int | None = None,
    before_rename: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``content`` to ``path`` atomically. ``content`` is bytes, text (UTF-8), or a function
    that writes the file at the path it is given (e.g. ``torch.save``, safetensors' ``save_file``).
    ``keep_previous``: once the new file is complete, the old ``path`` is moved there first.
    ``needed``: about how many bytes a function writes; a write that fails with less than that free
    (or with no space) raises ``util.disk.DiskFull``, whatever the writer's own error said.
    ``before_rename(tmp)`` runs on the complete temp file before any rename (e.g. to record its
    checksum, ``util.digests.write_with_sha256``)."""
    from sae_sweep.util.disk import disk_full

    path = Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename(tmp)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException as e:
        written = 0
        with contextlib.suppress(OSError):
            written = tmp.stat().st_size
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(e, Exception):
            size = len(data) if not callable(data) else needed if needed is not None else written + 1
            full = disk_full(e, path.parent, size)
            if full is not None:
                raise full from e
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """``obj`` as indented JSON (``json.dumps`` keyword arguments pass through)."""
    return atomic_write(path, json.dumps(obj, indent=2, **dumps_kwargs))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (a no-op where the file system refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, block: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def sha1_file(path: str | os.PathLike, n: int = 16) -> str:
    """First ``n`` hex characters of a file's sha1 (model and config fingerprints)."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]
