"""Build a directory once, shared by every process that needs it (jobs on several hosts included).

``build_once(final, build, ready=...)`` returns what ``ready(final)`` finds when the directory is
already there; otherwise it takes ``<parent>/<name>.lock`` (an ``OwnedLock``: it records host, pid
and SLURM job id, and is taken over when its owner is dead), checks again (another process may have
finished while this one waited), removes what dead builders left behind, builds into a temp
directory beside ``final`` and renames it into place, so the directory appears complete or not at
all. The activation cache, the tiny model and the GGUF conversion are built this way.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, TypeVar

from sae_sweep.util.files import fsync_dir
from sae_sweep.util.locks import OwnedLock

__all__ = ["build_once"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def _remove(path: Path) -> None:
    shutil.rmtree(path)


def build_once(
    final: str | os.PathLike,
    build: Callable[[Path], None],
    *,
    ready: Callable[[Path], Optional[T]],
    finish: Optional[Callable[[Path], T]] = None,
    discard: Callable[[Path], None] = _remove,
    lock_timeout: Optional[float] = None,
    temp_prefix: Optional[str] = None,
    leftovers: Sequence[str] = (),
) -> Tuple[T, bool]:
    """``(thing, built_now)`` for the directory ``final``, built at most once at a time.

    ``ready(path)``: the finished thing at ``path`` (e.g. the path itself, or an opened cache), or
    None while there is none there (missing, incomplete, unusable). ``build(tmp)`` fills the empty
    directory ``tmp``; an exception removes it and propagates. ``finish(final)`` runs after the
    rename while the lock is still held (build logs, stamps) and gives the result (default:
    ``ready(final)``). ``discard(final)`` disposes of a directory at ``final`` that ``ready``
    refused (default: delete it). Temp directories are named ``<temp_prefix><host>-<pid>-<random>``
    (default prefix ``.<name>.tmp-``); under the lock, every directory matching
    ``<temp_prefix>*`` or one of the ``leftovers`` globs belongs to a dead builder and is removed.
    ``lock_timeout``: see ``OwnedLock`` (None waits for as long as the owner lives).
    """
    final = Path(final)
    found = ready(final)
    if found is not None:
        return found, False
    parent, name = final.parent, final.name
    prefix = temp_prefix if temp_prefix is not None else f".{name}.tmp-"
    parent.mkdir(parents=True, exist_ok=True)
    with OwnedLock(parent / f"{name}.lock", timeout=lock_timeout):
        found = ready(final)  # another process may have built it while we waited
        if found is not None:
            return found, False
        # We hold the lock: any temp directory of this build is left over from a builder that died.
        for pattern in (f"{prefix}*", *leftovers):
            for stale in parent.glob(pattern):
                log.info("removing leftover build directory %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            discard(final)
        tmp = parent / f"{prefix}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            build(tmp)
            os.rename(tmp, final)  # atomic: the directory appears complete or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(parent)
        if finish is not None:
            return finish(final), True
        done = ready(final)
        if done is None:
            raise RuntimeError(f"{final}: built, but its build did not leave it complete")
        return done, True
