"""Real small disks for the tests (root only; skipped, with the reason, elsewhere): a tmpfs of a
given size, made read-only (``chmod`` does not stop root, a read-only mount does) or kept full."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "16m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (made if missing), unmounted on exit."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path}: {r.stderr.strip()}")
    try:
        yield path
    finally:
        # lazy: a file a finished job's child left open must not leave the mount behind
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


def read_only(path: Path) -> None:
    """Remount the tmpfs at ``path`` read-only."""
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


@contextlib.contextmanager
def kept_full(path: Path, every_s: float = 0.01) -> Iterator[None]:
    """The file system of ``path`` filled to its last byte, and refilled as soon as anything frees
    space (a failed write removing its temp file), until exit; the filler files are then removed."""
    fillers: list[Path] = []

    def fill() -> None:
        free = shutil.disk_usage(path).free
        if free == 0:
            return
        filler = path / f".filler-{len(fillers)}"
        fillers.append(filler)
        fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
        try:
            os.posix_fallocate(fd, 0, free)
        except OSError:  # whatever fitted stays
            pass
        finally:
            os.close(fd)

    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(every_s):
            fill()

    fill()
    thread = threading.Thread(target=keep, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for f in fillers:
            f.unlink(missing_ok=True)
