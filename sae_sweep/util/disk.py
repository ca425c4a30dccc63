"""Disk space and writability: what a preflight compares, and the one error a full disk gives.

A write that fails because its file system is full becomes ``DiskFull`` ("disk full: <path>,
<free> free, <needed> needed") wherever it happens (cache shards, checkpoints, SAE files, the
tracking store), never a library's own message: torch's zip writer loses the errno and says
"unexpected pos 11072 vs 10966", SQLite says "database or disk is full".
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how the same condition reads where the errno is not kept (SQLite through SQLAlchemy, C++ writers)
NO_SPACE_TEXTS = ("no space left on device", "database or disk is full", "disk quota exceeded")


def existing(path: str | os.PathLike) -> Path:
    """``path``, or its nearest ancestor that exists (where a directory still to be made lives)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes this user can still write on the file system of ``path`` (or of its nearest ancestor)."""
    return shutil.disk_usage(existing(path)).free


def file_system(path: str | os.PathLike) -> int:
    """The device id of the file system ``path`` is (or will be) on: places that share it share its space."""
    return os.stat(existing(path)).st_dev


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units: ``512 B``, ``3.2 MB``, ``121.4 GB``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n)} B"


class DiskFull(RuntimeError):
    """A write did not fit on its file system; names the place, its free space and what was needed."""

    def __init__(self, path: str | os.PathLike, free: int, needed: int):
        self.path, self.free, self.needed = Path(path), int(free), int(needed)
        super().__init__(f"disk full: {self.path}, {human_bytes(self.free)} free, {human_bytes(self.needed)} needed")

    def __reduce__(self):  # a job's error travels back to the sweeper pickled
        return (DiskFull, (self.path, self.free, self.needed))


def out_of_space(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, is a file system running out of space."""
    seen = set()
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFull) or (isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS):
            return True
        if any(t in str(e).lower() for t in NO_SPACE_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full(error: BaseException, path: str | os.PathLike, needed: int) -> Optional[DiskFull]:
    """``error``, raised while writing ``needed`` bytes under ``path``, as ``DiskFull`` when it is
    one: no space in its chain, or less than ``needed`` free after the failed write (a writer that
    loses the errno); None for any other failure."""
    if isinstance(error, DiskFull):
        return error
    try:
        free = free_bytes(path)
    except OSError:
        return None
    if out_of_space(error) or free < needed:
        return DiskFull(path, free, needed)
    return None


def unwritable(path: str | os.PathLike) -> Optional[str]:
    """Why the directory ``path`` (made if missing) cannot take a new file (``cannot write in <dir>
    (<reason>)``), or None: a real create and delete, which sees read-only mounts, permissions and
    NFS root squash alike (``os.access`` trusts permission bits)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return f"cannot write in {e.filename or path} ({e.strerror})"
    return None
