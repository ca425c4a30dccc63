"""Full disks and read-only places, on real ones (a tmpfs of a few MB, filled or remounted
read-only): refused before any work when they cannot take what the job writes, and named when they
fill up during it, with the run ended FAILED -- or, when the store itself was on the full disk,
closed by the next start of the point. Root only (mounts); skipped with the reason elsewhere."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.cli import cli_argv, cli_env, run_cli
from helpers.config import compose_config
from helpers.disks import kept_full, read_only, tmpfs
from helpers.mlflow_store import store_client, store_runs

# planted-dictionary data: no LM, a job starts training in seconds; a checkpoint every step
SYNTH = [
    "dataset=synthetic",
    "dataset.tokens=32768",
    "dataset.eval_tokens=2048",
    "train.tokens=32768",
    "trainer.batch_size=256",
    "sae.d_sae=256",
    "sae.k=4",
    "eval=core_only",
    "sweep.name=disk",
    "train.checkpoint_every=1",
    "tracking.system_metrics=false",
]


@contextlib.contextmanager
def _job(out: Path, *args: str, cache: Path | None = None) -> Iterator[subprocess.Popen]:
    """The CLI running in the background (stderr piped); killed on exit if still running, so a
    failed test leaves no job writing on its mounts."""
    proc = subprocess.Popen(
        cli_argv(out, *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=out.parent,
        env=cli_env(cache),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the job ended first: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.unit
def test_out_of_space_is_recognised_through_the_error_chain_and_travels_pickled(tmp_path):
    import errno
    import pickle

    from sae_sweep.util.disk import DiskFull, disk_full, out_of_space

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from e
    except RuntimeError as e:
        chained = e
    assert out_of_space(chained) and out_of_space(RuntimeError("(sqlite3.OperationalError) database or disk is full"))
    assert not out_of_space(RuntimeError("unexpected pos 64 vs 0")) and not out_of_space(OSError(errno.EACCES, "no"))
    full = disk_full(chained, tmp_path, 10)
    assert (
        isinstance(full, DiskFull) and str(full).startswith(f"disk full: {tmp_path}, ") and "10 B needed" in str(full)
    )
    assert disk_full(ValueError("a bug"), tmp_path, 10) is None  # a failed write with room to spare: not a full disk
    assert str(pickle.loads(pickle.dumps(full))) == str(full)  # a job's error returns to the sweeper pickled


@pytest.mark.integration
def test_a_read_only_output_dir_is_refused_in_seconds_naming_it(tmp_path):
    with tmpfs(tmp_path / "ro") as mnt:
        out = mnt / "out"
        out.mkdir()
        read_only(mnt)
        for mode in ([], ["-m"]):
            t0 = time.time()
            r = run_cli(out, *mode, *SYNTH)
            assert r.returncode == 2, r.stderr[-3000:]
            assert f"paths.output_dir={out}" in r.stderr and "Read-only file system" in r.stderr, r.stderr[-3000:]
            assert "Traceback" not in r.stderr
            assert time.time() - t0 < 60


@pytest.mark.integration
def test_a_read_only_cache_dir_or_store_is_refused_at_validation_naming_it(tmp_path):
    from sae_sweep.config import ConfigError
    from sae_sweep.job.app import validate_point

    out = tmp_path / "out"
    with tmpfs(tmp_path / "ro") as mnt:
        read_only(mnt)
        for setting, needle in (
            (f"paths.cache_dir={mnt / 'cache'}", f"paths.cache_dir={mnt / 'cache'}: cannot write in"),
            (f"tracking.uri=sqlite:///{mnt}/mlflow.db", f"tracking.uri=sqlite:///{mnt}/mlflow.db: cannot write in"),
        ):
            with pytest.raises(ConfigError) as e:
                validate_point(compose_config(*SYNTH, setting, f"paths.output_dir={out}"), memory_gb=1e6)
            assert needle in str(e.value) and "Read-only file system" in str(e.value), str(e.value)


@pytest.mark.integration
def test_an_output_disk_too_small_for_the_checkpoints_is_refused_before_work(tmp_path):
    from sae_sweep.config import ConfigError
    from sae_sweep.job.app import validate_point

    with tmpfs(tmp_path / "small", size="1m") as mnt:
        cfg = compose_config(*SYNTH, "sae.d_sae=4096", f"paths.output_dir={mnt / 'out'}")
        with pytest.raises(ConfigError) as e:
            validate_point(cfg, memory_gb=1e6)
    msg = str(e.value)
    assert f"paths.output_dir={mnt / 'out'}" in msg and "checkpoints (3 x)" in msg and "are free" in msg, msg


@pytest.mark.integration
def test_an_output_disk_that_fills_mid_job_ends_the_run_failed_saying_so(tmp_path):
    store = tmp_path / "store"  # on another disk: the job can still record its failure
    with tmpfs(tmp_path / "disk") as mnt:
        out = mnt / "out"
        with _job(out, *SYNTH, f"tracking.uri=sqlite:///{store / 'mlflow.db'}") as proc:
            _wait_for(proc, lambda: bool(list((out / "checkpoints").glob("*/latest.pt"))))
            with kept_full(mnt):
                _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert f"sae_sweep: disk full: {out}" in err and " free, " in err and " needed" in err, err[-3000:]
    assert "unexpected pos" not in err and "Traceback" not in err, err[-3000:]
    (run,) = store_runs(store, "disk", "job")
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith(f"DiskFull: disk full: {out}"), run.data.tags["error"]


@pytest.mark.integration
def test_a_run_whose_store_filled_up_is_closed_failed_by_the_next_start(tmp_path):
    with tmpfs(tmp_path / "disk") as mnt:
        out = mnt / "out"  # the store is <out>/mlflow.db: on the disk that fills
        with _job(out, *SYNTH) as proc:
            _wait_for(proc, lambda: bool(list((out / "checkpoints").glob("*/latest.pt"))))
            with kept_full(mnt):
                _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1 and f"disk full: {out}" in err, err[-3000:]
        client = store_client(out)
        (left,) = store_runs(out, "disk", "job", client)
        if left.info.status != "RUNNING":
            # sqlite sometimes finds free pages in its own file and closes the run on the full disk;
            # then put the store in the state an unwritable store leaves (the run still RUNNING)
            assert left.info.status == "FAILED" and "disk full" in left.data.tags["error"], left.data.tags
            client.update_run(left.info.run_id, status="RUNNING")
        again = run_cli(out, *SYNTH)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "was left RUNNING" in again.stdout + again.stderr
        (run,) = store_runs(out, "disk", "job", client)
    assert run.info.run_id == left.info.run_id and run.info.status == "FINISHED"  # closed, then continued
    closed = run.data.tags["closed_stale"]
    assert f"pid={left.data.tags['pid']}" in closed and "ended without closing it" in closed, closed


@pytest.mark.integration
def test_a_cache_disk_that_fills_while_the_cache_is_built_fails_saying_so(tmp_path, fresh_cache, tiny_lm):
    # 262,144 tokens x d_model 128 x 4 bytes = 134 MB of activations: seconds of building even on a quiet
    # machine, so the disk is filled (polled every 10 ms) while the build is under way
    with tmpfs(tmp_path / "disk", size="256m") as mnt:
        # the tiny model (built by tiny_lm) stays on the shared cache; token windows and activations go here
        cache = fresh_cache(mnt)
        out = tmp_path / "out"
        args = ["dataset=builtin", "dataset.tokens=262144", "train.tokens=65536", "eval=core_only", "sweep.name=disk"]
        with _job(out, *args, cache=cache) as proc:
            _wait_for(proc, lambda: bool(list((cache / "activations").glob(".tmp-*"))))
            with kept_full(mnt):
                _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert f"sae_sweep: disk full: {cache}" in err, err[-3000:]
    assert "Traceback" not in err and "Errno 28" not in err, err[-3000:]
    (run,) = store_runs(out, "disk", "job")
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith(f"DiskFull: disk full: {cache}")
