"""OwnedLock: mutual exclusion across processes, recovery from dead owners, heartbeat, timeouts."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import socket
import threading
import time

import pytest

from helpers.processes import dead_pid
from sae_sweep.util.locks import LockTimeout, OwnedLock, read_owner

HOST = socket.gethostname()


def _write_lock(path, **owner) -> None:
    path.write_text(json.dumps(owner))


def _critical_section(lock_path: str, log_path: str, n: int) -> None:
    """Append enter/exit lines under the lock; interleaving would show a broken lock."""
    for _ in range(n):
        with OwnedLock(lock_path, poll_interval=0.01):
            with open(log_path, "a") as fh:
                fh.write(f"enter {os.getpid()}\n")
                fh.flush()
            time.sleep(0.01)
            with open(log_path, "a") as fh:
                fh.write(f"exit {os.getpid()}\n")
                fh.flush()


@pytest.mark.integration
def test_mutual_exclusion_across_processes(tmp_path):
    lock_path, log_path = tmp_path / "x.lock", tmp_path / "log.txt"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_critical_section, args=(str(lock_path), str(log_path), 8)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    lines = log_path.read_text().split("\n")[:-1]
    assert len(lines) == 3 * 8 * 2
    for enter, exit_ in zip(lines[::2], lines[1::2]):
        assert enter.startswith("enter ") and exit_ == "exit " + enter.split()[1]
    assert not lock_path.exists()


@pytest.mark.unit
def test_owner_info_and_release(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    path = tmp_path / "sub" / "a.lock"
    with OwnedLock(path) as lock:
        owner = read_owner(path)
        assert owner["host"] == HOST and owner["pid"] == os.getpid()
        assert owner["slurm_job_id"] == "4242"
        assert abs(owner["started"] - time.time()) < 60
        assert lock.is_held
    assert not path.exists() and not lock.is_held


@pytest.mark.integration
def test_dead_owner_on_same_host_is_taken_over(tmp_path, caplog):
    path = tmp_path / "a.lock"
    _write_lock(path, host=HOST, pid=dead_pid(), slurm_job_id=None, started=time.time())
    caplog.set_level(logging.WARNING, logger="sae_sweep.util.locks")
    t0 = time.monotonic()
    with OwnedLock(path, timeout=5, stale_after=600) as lock:  # mtime is fresh: pid check decides
        assert lock.is_held and read_owner(path)["pid"] == os.getpid()
    assert time.monotonic() - t0 < 2
    assert "took over stale lock" in caplog.text
    assert not list(tmp_path.iterdir())  # no stale-aside or guard files left behind


@pytest.mark.unit
def test_silent_owner_on_other_host_is_taken_over(tmp_path):
    path = tmp_path / "a.lock"
    _write_lock(path, host="some-other-node", pid=1, slurm_job_id="77", started=0)
    old = time.time() - 10
    os.utime(path, (old, old))
    with OwnedLock(path, timeout=5, stale_after=5) as lock:
        assert lock.is_held


@pytest.mark.unit
def test_live_owner_on_other_host_is_not_taken_over(tmp_path):
    path = tmp_path / "a.lock"
    _write_lock(path, host="some-other-node", pid=1, slurm_job_id="77", started=time.time())
    with pytest.raises(LockTimeout):
        OwnedLock(path, timeout=0.5, stale_after=5).acquire()
    assert read_owner(path)["host"] == "some-other-node"


@pytest.mark.unit
def test_heartbeat_keeps_live_lock(tmp_path):
    path = tmp_path / "a.lock"
    stale_after = 1.0  # heartbeat every 0.25 s; generous for a loaded 2-core machine
    holder = OwnedLock(path, stale_after=stale_after).acquire()
    try:
        mtime0 = os.stat(path).st_mtime
        # Wait well past stale_after: without the heartbeat the (live, same-host) owner's file
        # would be old enough for a waiter to steal it.
        with pytest.raises(LockTimeout):
            OwnedLock(path, timeout=2.5 * stale_after, stale_after=stale_after, poll_interval=0.02).acquire()
        assert holder.is_held
        assert os.stat(path).st_mtime > mtime0
    finally:
        holder.release()
    assert not path.exists()


@pytest.mark.unit
def test_timeout_names_owner(tmp_path):
    path = tmp_path / "a.lock"
    _write_lock(path, host="node17", pid=31337, slurm_job_id="999", started=time.time())
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as err:
        OwnedLock(path, timeout=0.3).acquire()
    assert 0.25 < time.monotonic() - t0 < 2
    msg = str(err.value)
    assert "node17" in msg and "31337" in msg and "999" in msg and str(path) in msg
    assert err.value.owner["host"] == "node17"


@pytest.mark.unit
def test_waiter_gets_lock_after_release_and_logs(tmp_path, caplog):
    path = tmp_path / "a.lock"
    caplog.set_level(logging.INFO, logger="sae_sweep.util.locks")
    holder = OwnedLock(path).acquire()
    threading.Timer(0.3, holder.release).start()
    with OwnedLock(path, timeout=5, poll_interval=0.02) as waiter:
        assert waiter.is_held
    assert "waiting for lock" in caplog.text


@pytest.mark.unit
def test_release_does_not_remove_someone_elses_lock(tmp_path):
    path = tmp_path / "a.lock"
    lock = OwnedLock(path).acquire()
    # Simulate a (wrongful) takeover by another owner while we still think we hold it.
    _write_lock(path, host="elsewhere", pid=5, slurm_job_id=None, started=time.time(), token="x")
    lock.release()
    assert read_owner(path)["host"] == "elsewhere"


@pytest.mark.integration
def test_concurrent_takeover_of_one_stale_lock(tmp_path):
    """Several threads race to take over one dead lock: exactly one holds it at any time."""
    path = tmp_path / "a.lock"
    _write_lock(path, host=HOST, pid=dead_pid(), slurm_job_id=None, started=0)
    inside, overlaps = [0], []
    guard = threading.Lock()

    def work():
        with OwnedLock(path, timeout=20, poll_interval=0.01):
            with guard:
                inside[0] += 1
                overlaps.append(inside[0])
            time.sleep(0.05)
            with guard:
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1, 1]
