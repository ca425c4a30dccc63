"""Owned, recoverable file locks for builds shared between jobs (possibly on different hosts).

``OwnedLock`` creates the lock file atomically (``O_CREAT | O_EXCL``) and writes who holds it:
``{host, pid, slurm_job_id, started, token}``.  While held, a daemon thread refreshes the file's
mtime every ``stale_after / 4`` seconds.  A waiter takes the lock over when its owner is dead:

* same host and the owner's pid no longer exists, or
* the file's mtime is older than ``stale_after`` (the owner, maybe on another host, stopped
  heart-beating: killed by SLURM, node lost, ...).

Taking over is serialised through a short-lived guard file and re-checked under it, so two waiters
can never both remove the same stale lock, nor one of them remove the fresh lock the other just made.
The stale file is renamed aside (atomic) before deletion.

Works on local disks and on shared file systems with atomic ``O_EXCL`` create and rename (NFSv3+,
Lustre, GPFS). mtime-based staleness assumes the hosts' clocks agree to well within ``stale_after``.

Why not a library: ``filelock.FileLock`` is an ``flock``/``fcntl`` lock, unreliable on NFS and
invisible to a person looking for who holds it; ``filelock.SoftFileLock`` (an ``O_EXCL`` file, like
this one) never recovers a lock whose owner was killed, which on a cluster (SLURM kills, node
failures) would block a cache build forever; ``flufl.lock`` recovers only after a fixed lifetime,
does not notice at once that an owner on the same host is gone, and records no SLURM job id. The
owner record is what the error messages and the docs (docs/reliability.md) point people at.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["OwnedLock", "LockTimeout", "read_owner", "describe_owner"]

log = logging.getLogger(__name__)

# A takeover guard older than this is left over from a process that died mid-takeover.
_GUARD_STALE_S = 10.0
# While waiting, repeat the "waiting for ..." log line this often.
_WAIT_LOG_EVERY_S = 60.0


class LockTimeout(TimeoutError):
    """Raised when a lock could not be acquired within its timeout; the message names the owner."""

    def __init__(self, path: Path, owner: dict[str, Any] | None, waited: float):
        self.path = Path(path)
        self.owner = owner
        self.waited = waited
        super().__init__(
            f"timed out after {waited:.1f}s waiting for lock {path} held by {describe_owner(owner)}; "
            f"if that owner is gone and the lock is not released within its stale period, "
            f"delete {path} by hand"
        )


def read_owner(path: str | os.PathLike) -> dict[str, Any] | None:
    """The owner info stored in a lock file, or None if it is missing or not (yet) readable JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError):
        return None
    return data if isinstance(data, dict) else None


def describe_owner(owner: dict[str, Any] | None) -> str:
    """Human-readable owner, e.g. ``host=node3 pid=4242 slurm_job_id=1234 started=2026-...``."""
    if not owner:
        return "an unknown owner (lock file empty or unreadable)"
    started = owner.get("started")
    if isinstance(started, (int, float)):
        started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))
    return f"host={owner.get('host')} pid={owner.get('pid')} slurm_job_id={owner.get('slurm_job_id')} started={started}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OverflowError, ValueError):
        return False
    return True


class OwnedLock:
    """Exclusive lock on ``path`` that records its owner and is recoverable when the owner dies.

    ``timeout=None`` waits forever; ``timeout=0`` tries once. Not re-entrant: acquiring a lock the
    same process already holds waits like any other waiter.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        timeout: float | None = None,
        poll_interval: float = 0.2,
        stale_after: float = 120.0,
    ):
        if stale_after <= 0:
            raise ValueError(f"stale_after must be > 0, got {stale_after}")
        self.path = Path(path)
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.stale_after = float(stale_after)
        self._token: str | None = None
        self._stop: threading.Event | None = None
        self._heartbeat: threading.Thread | None = None
        self._host = socket.gethostname()

    @property
    def is_held(self) -> bool:
        """True while this object holds the lock (the file exists and carries our token)."""
        if self._token is None:
            return False
        owner = read_owner(self.path)
        return owner is not None and bool(owner) and owner.get("token") == self._token

    def acquire(self) -> OwnedLock:
        if self._token is not None:
            raise RuntimeError(f"OwnedLock({self.path}) is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        last_log = None
        while True:
            if self._try_create():
                if last_log is not None:
                    log.info("acquired lock %s after %.1fs", self.path, time.monotonic() - t0)
                self._start_heartbeat()
                return self
            owner = read_owner(self.path)
            if self._is_stale(owner):
                self._take_over(owner)
                continue  # retry the create straight away
            waited = time.monotonic() - t0
            if self.timeout is not None and waited >= self.timeout:
                raise LockTimeout(self.path, owner, waited)
            if last_log is None or time.monotonic() - last_log >= _WAIT_LOG_EVERY_S:
                log.info("waiting for lock %s held by %s", self.path, describe_owner(owner))
                last_log = time.monotonic()
            sleep = self.poll_interval
            if self.timeout is not None:
                sleep = max(0.0, min(sleep, self.timeout - waited))
            time.sleep(sleep)

    def release(self) -> None:
        if self._token is None:
            return
        self._stop_heartbeat()
        owner = read_owner(self.path)
        # Only remove the file if it is still ours: someone may have (wrongly) taken it over.
        if owner is not None and owner.get("token") == self._token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        else:
            log.warning(
                "lock %s was no longer ours at release (now held by %s); leaving it",
                self.path,
                describe_owner(owner),
            )
        self._token = None

    def __enter__(self) -> OwnedLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"OwnedLock({str(self.path)!r}, held={self._token is not None})"

    def _owner_info(self, token: str) -> dict[str, Any]:
        return {
            "host": self._host,
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")
            if os.environ.get("SLURM_JOB_ID")
            else None,
            "started": time.time(),
            "token": token,
        }

    def _try_create(self) -> bool:
        token = uuid.uuid4().hex
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps(self._owner_info(token)).encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        self._token = token
        return True

    def _is_stale(self, owner: dict[str, Any] | None) -> bool:
        """Whether the lock file currently at ``path`` belongs to a dead owner."""
        if owner is not None and owner.get("host") == self._host:
            pid = owner.get("pid")
            if isinstance(pid, int) and not _pid_alive(pid):
                return True
        job = os.environ.get("SLURM_JOB_ID")
        if (
            owner is not None
            and job
            and owner.get("slurm_job_id") == job
            and owner.get("slurm_restart_count") != os.environ.get("SLURM_RESTART_COUNT", "0")
        ):
            return True  # an earlier run of this very job: SLURM ended it before requeueing it
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return False  # released meanwhile: the next create will tell
        # An empty/partial file (owner died between create and write) also ages out here.
        return age > self.stale_after

    def _take_over(self, owner: dict[str, Any] | None) -> None:
        """Remove a stale lock, serialised with other waiters through a guard file."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            # Another waiter is taking over right now; clear the guard only if its holder died.
            try:
                if time.time() - os.stat(guard).st_mtime > _GUARD_STALE_S:
                    os.unlink(guard)
            except FileNotFoundError:
                pass
            time.sleep(min(self.poll_interval, 0.05))
            return
        os.close(fd)
        try:
            # Re-check under the guard: the lock may have been released and re-created fresh.
            current = read_owner(self.path)
            if current != owner or not self._is_stale(current):
                return
            aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return
            os.unlink(aside)
            log.warning("took over stale lock %s from %s", self.path, describe_owner(owner))
        finally:
            try:
                os.unlink(guard)
            except FileNotFoundError:
                pass

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._beat,
            args=(self._stop, self._token),
            name=f"lock-heartbeat:{self.path.name}",
            daemon=True,
        )
        self._heartbeat.start()

    def _stop_heartbeat(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5.0)
        self._stop = self._heartbeat = None

    def _beat(self, stop: threading.Event, token: str) -> None:
        interval = self.stale_after / 4.0
        while not stop.wait(interval):
            owner = read_owner(self.path)
            if owner is None or owner.get("token") != token:
                log.warning("lost lock %s: it is now held by %s", self.path, describe_owner(owner))
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return
