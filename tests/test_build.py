"""util/build.py: build_once builds a directory once under an owned lock, atomically, and recovers
from builders that died (their lock and temp directory). The activation cache, the tiny model and
the GGUF conversion build through it (test_cache.py, test_lm.py, test_weights.py)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from sae_sweep.util.build import build_once

pytestmark = pytest.mark.integration  # a dead builder is a real, finished process


def _ready(path):
    return path if (path / "done").is_file() else None


def _builder(calls):
    def build(tmp):
        calls.append(tmp)
        assert tmp.is_dir() and not any(tmp.iterdir())  # an empty private directory
        (tmp / "data").write_text("x")
        (tmp / "done").write_text("")

    return build


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_builds_once_then_reuses(tmp_path):
    final, calls = tmp_path / "models" / "thing", []
    path, built = build_once(final, _builder(calls), ready=_ready)
    assert (path, built) == (final, True) and len(calls) == 1
    assert calls[0].parent == final.parent and calls[0].name.startswith(".thing.tmp-")
    assert sorted(p.name for p in final.parent.iterdir()) == ["thing"]  # no temp dir, no lock left
    path, built = build_once(final, _builder(calls), ready=_ready)
    assert (path, built) == (final, False) and len(calls) == 1


def test_a_failed_build_leaves_nothing_and_raises(tmp_path):
    final = tmp_path / "thing"

    def boom(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_once(final, boom, ready=_ready)
    assert list(tmp_path.iterdir()) == []
    path, built = build_once(final, _builder([]), ready=_ready)
    assert built and (path / "done").is_file()


def test_dead_builders_lock_and_leftovers_are_recovered(tmp_path):
    final = tmp_path / "thing"
    leftover = tmp_path / f".thing.tmp-{socket.gethostname()}-99999-deadbeef"
    leftover.mkdir()
    (leftover / "half").write_text("x")
    aside = tmp_path / ".trash-thing-1"
    aside.mkdir()
    (tmp_path / "thing.lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "slurm_job_id": "12", "started": 0})
    )
    final.mkdir()  # a directory without its completion marker: not ready, replaced
    seen = []
    path, built = build_once(
        final,
        _builder([]),
        ready=_ready,
        lock_timeout=10,
        leftovers=[".trash-thing-*"],
        discard=lambda p: (seen.append(p), os.rename(p, tmp_path / "kept")),
    )
    assert built and (path / "done").is_file() and seen == [final]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "thing"]


def test_finish_runs_under_the_lock_and_gives_the_result(tmp_path):
    final = tmp_path / "thing"

    def finish(path):
        owner = json.loads((tmp_path / "thing.lock").read_text())
        return owner["pid"], sorted(p.name for p in path.iterdir())

    result, built = build_once(final, _builder([]), ready=_ready, finish=finish, temp_prefix=".tmp-thing-")
    assert built and result == (os.getpid(), ["data", "done"])
