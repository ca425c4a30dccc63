"""A sweep on the local SLURM cluster writing through `launchers/mlflow_server.sh postgres`: an MLflow
server on a PostgreSQL of its own. 16 grid points run as one SLURM array; mid-sweep the server is killed
(MLflow SIGKILLed, PostgreSQL shut down the way it crashes: SIGQUIT, WAL recovery on restart), kept down,
and restarted. Every point ends FINISHED, once, with all its metrics, and the runs are rows of PostgreSQL.

Setup: launchers/slurm_local.sh start (CI: .ci/install_slurm.sh), `make postgres` (Debian's postgresql;
`make test` runs it) and the `postgres` extra (psycopg2, `make install`). Under CI=true anything missing
fails instead of skipping.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers.cli import cli_argv, cli_env
from helpers.mlflow_store import store_runs
from helpers.tracking_server import free_port, postgres_state_dir, server_script

IN_CI = os.environ.get("CI", "").lower() == "true"
if shutil.which("sinfo") is None and not IN_CI:
    pytest.skip("SLURM not installed (`sinfo` not on PATH): run .ci/install_slurm.sh", allow_module_level=True)
if not IN_CI:
    pytest.importorskip("psycopg2", reason="the postgres extra: pip install -e '.[postgres]' (make install)")

# Four to eight minutes of SLURM jobs on the one-node cluster, which the other SLURM tests use one at a
# time: run by `make test-tracking-server` (CI runs it after `make test`), skipped by `make test` so the
# suite stays under 15 minutes on 2 cores.
RUN_ENV = "SAE_SWEEP_TEST_TRACKING_SERVER"
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.xdist_group("slurm"),
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        os.environ.get(RUN_ENV) != "1", reason="the tracking server under a SLURM array: make test-tracking-server"
    ),
]

SEEDS, KS = (1, 2, 3, 4), (2, 3, 4, 5)  # 16 points; crossseed compares the 4 seeds of each k
STEPS = 16  # train.tokens / trainer.batch_size
GRID = [
    "dataset=synthetic",
    "dataset.tokens=8192",
    "dataset.eval_tokens=1024",
    f"train.tokens={STEPS * 512}",
    "trainer.batch_size=512",
    "sae.d_sae=128",
    "eval=core_only",
    "sweep.name=pg",
    "hydra/launcher=slurm_local",
    "seed=" + ",".join(map(str, SEEDS)),
    "sae.k=" + ",".join(map(str, KS)),
]
DOWN_S = 20  # how long the server stays down: jobs meet it dead in the middle of their MLflow calls


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if "SLURM_CONF" not in os.environ and not Path("/etc/slurm/slurm.conf").exists():
        os.environ["SLURM_CONF"] = str(
            Path(os.environ.get("SAE_SWEEP_SLURM_DIR", "/tmp/sae_sweep_slurm")) / "slurm.conf"
        )
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    assert "UP" in ping.stdout, f"SLURM is not up ({ping.stdout}{ping.stderr}): launchers/slurm_local.sh start"


@pytest.fixture
def state_dir():
    with postgres_state_dir() as d:
        yield d


def _start(state_dir: Path, port: int) -> None:
    r = server_script(
        "--background",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "2",
        "--artifacts",
        str(state_dir / "artifacts"),
        "postgres",
        state_dir=state_dir,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == f"tracking.uri=http://127.0.0.1:{port}"


def _db(state_dir: Path):
    import psycopg2

    return psycopg2.connect(host=str(state_dir / "postgres" / "socket"), port=5432, user="mlflow", dbname="mlflow")


def _finished_jobs(state_dir: Path) -> int:
    """Job runs FINISHED so far, read from PostgreSQL itself."""
    with _db(state_dir) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'sae_sweep.kind' AND t.value = 'job' AND r.status = 'FINISHED'"
        )
        return int(cur.fetchone()[0])


def _running_jobs(out: Path) -> int:
    """The sweep's array tasks SLURM is running now (submitit's folders name the array)."""
    arrays = {p.name.split("_")[0] for p in out.glob("sweeps/*/*/.submitit/*") if p.is_dir()}
    r = subprocess.run(
        ["squeue", "-h", "-t", "RUNNING", "-o", "%i", "-j", ",".join(sorted(arrays))],
        capture_output=True,
        text=True,
        check=True,
    )
    return len(r.stdout.split())


def _kill_server(state_dir: Path) -> None:
    mlflow_pid = int((state_dir / "mlflow_server.pid").read_text())
    os.killpg(mlflow_pid, signal.SIGKILL)  # the script starts it as its own process group (workers too)
    pg_pid = int((state_dir / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
    os.kill(pg_pid, signal.SIGQUIT)  # PostgreSQL's immediate shutdown: no checkpoint, WAL recovery on restart
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pg_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError(f"PostgreSQL (pid {pg_pid}) still running 60 s after SIGQUIT")


def test_slurm_array_through_a_postgres_server_killed_and_restarted_mid_sweep(tmp_path, state_dir):
    from mlflow.tracking import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    _start(state_dir, port)
    out = tmp_path / "out"
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            cli_argv(out, "-m", *GRID, f"tracking.uri={uri}"),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=cli_env(),
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 600
        while (done := _finished_jobs(state_dir)) < 3:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no 3 points finished in 600 s"
            time.sleep(1)
        running = _running_jobs(out)
        _kill_server(state_dir)
        assert driver.poll() is None, "the sweep ended before the server was killed"
        time.sleep(DOWN_S)
        _start(state_dir, port)
        driver.wait(timeout=700)
    finally:
        if driver.poll() is None:
            driver.kill()
    log_text = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, log_text[-4000:]
    assert done < len(SEEDS) * len(KS) and running > 0, (done, running)  # the kill came mid-sweep, mid-job
    assert "16 finished, 0 failed, 0 skipped" in log_text, log_text[-4000:]

    client = MlflowClient(uri)
    jobs = store_runs(out, "pg", "job", client=client)
    # each point once: one run per point, none continued by a second attempt
    assert sorted((int(r.data.tags["seed"]), int(r.data.params["sae.k"])) for r in jobs) == sorted(
        (s, k) for s in SEEDS for k in KS
    )
    assert len({r.data.tags["run_key"] for r in jobs}) == 16
    assert all(r.info.status == "FINISHED" and "resumed" not in r.data.tags for r in jobs)
    # no metric lost: every run has the same metrics (crossseed's differ by the seeds compared) and its whole
    # training curve
    keys = [{k for k in r.data.metrics if not k.startswith(("crossseed/", "system/"))} for r in jobs]
    assert all(k == keys[0] for k in keys) and "recovery/reconstruction_quality/explained_variance" in keys[0]
    for r in jobs:
        assert r.data.metrics["train/steps"] == STEPS
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "train/loss")) == [10, STEPS]
    (parent,) = store_runs(out, "pg", "sweep", client=client)
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/finished"] == 16
    # and the runs are PostgreSQL's rows
    assert _finished_jobs(state_dir) == 16
