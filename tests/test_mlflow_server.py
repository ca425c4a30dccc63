"""The MLflow UI's view of a sweep: a real ``mlflow server`` on loopback (sqlite store and proxied
artifacts in tmp), written to through Tracker, read back through the REST API the UI itself calls.
And ``launchers/mlflow_server.sh``: its own server only, on sqlite or on a PostgreSQL of its own, and
a sweep's job waiting for a server being restarted."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager

import pytest

from helpers.sweeps import EV, KL, SEEDS, make_sweep
from helpers.tracking_server import free_port, postgres_state_dir, server_script
from sae_sweep.report import build_report
from sae_sweep.tracking.runs import Tracker

pytestmark = pytest.mark.integration

START_TIMEOUT = 180  # first start migrates a fresh sqlite schema; 2 slow cores


def _get(base: str, endpoint: str, **params):
    url = f"{base}{endpoint}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def _post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{base}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@contextmanager
def mlflow_server(tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--serve-artifacts",
        "--artifacts-destination",
        str(tmp_path / "artifacts"),
    ]
    # own session: the server forks workers, and the whole group is stopped in the finally
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited ({proc.returncode}):\n" + (tmp_path / "server.log").read_text()[-3000:]
                )
            try:
                if _get(base, "/health").strip() == b"OK":
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server did not answer /health in {START_TIMEOUT}s:\n"
                    + (tmp_path / "server.log").read_text()[-3000:]
                )
            time.sleep(0.5)
        yield base
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        log.close()


@pytest.mark.timeout(600)
def test_sweep_as_the_ui_shows_it(tmp_path):
    with mlflow_server(tmp_path) as base:
        tracker = Tracker(base)
        parent, children = make_sweep(tracker, "ui_sweep")

        exp = json.loads(_get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="ui_sweep"))
        exp_id = exp["experiment"]["experiment_id"]

        # the parent: one sweep run, found by its kind tag
        found = _post(
            base,
            "/api/2.0/mlflow/runs/search",
            {"experiment_ids": [exp_id], "filter": "tags.`sae_sweep.kind` = 'sweep'", "max_results": 50},
        )["runs"]
        assert [r["info"]["run_id"] for r in found] == [parent]
        assert found[0]["info"]["run_name"] == "sweep-test"

        # the children nest under it (the UI nests by the mlflow.parentRunId tag)
        kids = _post(
            base,
            "/api/2.0/mlflow/runs/search",
            {"experiment_ids": [exp_id], "filter": f"tags.`mlflow.parentRunId` = '{parent}'", "max_results": 100},
        )["runs"]
        assert len(kids) == len(children) + 1  # + the FAILED one
        finished = [r for r in kids if r["info"]["status"] == "FINISHED"]
        assert sorted(r["info"]["run_id"] for r in finished) == sorted(children)
        failed = [r for r in kids if r["info"]["status"] == "FAILED"]
        assert len(failed) == 1 and {t["key"]: t["value"] for t in failed[0]["data"]["tags"]}["error"].endswith("boom")

        metric_sets = []
        for r in finished:
            tags = {t["key"]: t["value"] for t in r["data"]["tags"]}
            params = {p["key"]: p["value"] for p in r["data"]["params"]}
            metrics = {m["key"]: m["value"] for m in r["data"]["metrics"]}
            assert tags["mlflow.parentRunId"] == parent
            assert r["info"]["run_name"] == tags["mlflow.runName"]
            assert r["info"]["run_name"].startswith("tiny_blocks.2.hook_resid_post_512_topk_8_0.001_")
            assert r["info"]["run_name"].endswith(f"_{tags['seed']}_{tags['dataset']}_64_100")
            for key in ("model", "layer", "hook", "dataset", "seed", "trainer", "seed_group", "run_key"):
                assert tags[key], key
            assert int(tags["seed"]) in SEEDS
            assert params["sae.k"] == "8" and params["trainer.lr"] == "0.001"
            assert EV in metrics and KL in metrics
            metric_sets.append(set(metrics))
        # the compare view lines runs up by key: every child has the same metric keys
        assert all(s == metric_sets[0] for s in metric_sets)

        # a training curve as the UI's chart fetches it
        hist = json.loads(
            _get(base, "/api/2.0/mlflow/metrics/get-history", run_id=children[0], metric_key="train/loss")
        )["metrics"]
        assert [m["step"] for m in sorted(hist, key=lambda m: m["step"])] == [0, 10, 20, 30, 40, 50]

        # the report, built through the server, is in the parent's artifacts (proxied)
        res = build_report(tracker, parent, tmp_path / "report")
        listed = json.loads(_get(base, "/api/2.0/mlflow/artifacts/list", run_id=parent, path="report"))
        paths = {f["path"] for f in listed.get("files", [])}
        assert {"report/report.md", "report/summary.csv", "report/plots"} <= paths
        md = _get(base, "/get-artifact", path="report/report.md", run_uuid=parent).decode()
        assert md == res.markdown.read_text()
        png = _get(base, "/get-artifact", path="report/plots/metrics_grid.png", run_uuid=parent)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


# -- launchers/mlflow_server.sh: it reports up only for its own server --------------------------------


def _script(*args, state_dir):
    return server_script(*args, state_dir=state_dir, timeout=START_TIMEOUT + 60)


def test_server_script_refuses_a_port_another_process_answers_on(tmp_path):
    """Another HTTP server answers /health on the port: the script must not print 'up' and a
    tracking.uri for a server that is not its own."""
    import http.server
    import threading

    other = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        port = other.server_address[1]
        r = _script(
            "--background", "--host", "127.0.0.1", "--port", str(port), str(tmp_path / "db.db"), state_dir=tmp_path
        )
    finally:
        other.shutdown()
    assert r.returncode != 0
    assert f"port {port} on 127.0.0.1 is not free" in r.stderr and "tracking.uri" not in r.stdout + r.stderr
    assert not (tmp_path / "mlflow_server.pid").exists()


@pytest.mark.slow
def test_server_script_starts_and_stops_its_own_server(tmp_path):
    port = free_port()
    r = _script(
        "--background",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--artifacts",
        str(tmp_path / "art"),
        "--workers",
        "1",
        str(tmp_path / "db.db"),
        state_dir=tmp_path,
    )
    try:
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() == f"tracking.uri=http://127.0.0.1:{port}"
        assert _get(f"http://127.0.0.1:{port}", "/health")
    finally:
        stop = _script("stop", state_dir=tmp_path)
    assert stop.returncode == 0 and "stopping mlflow server" in stop.stderr
    with pytest.raises(urllib.error.URLError):
        _get(f"http://127.0.0.1:{port}", "/health")


def test_a_sweeps_job_waits_for_a_server_being_restarted(tmp_path):
    """A job of a sweep (its driver reached the server) asks again while the server is down and goes on
    once it answers; anything else, e.g. the driver's own check, is refused at once."""
    import http.server
    import threading

    from sae_sweep.tracking.runs import TrackingStoreError, check_store

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(TrackingStoreError, match=f"tracking.uri={uri}: the MLflow server does not answer \\("):
        check_store(uri)
    assert time.monotonic() - t0 < 10
    with pytest.raises(TrackingStoreError, match="does not answer for 3s"):
        check_store(uri, wait_s=3)

    servers = []

    def come_back():
        servers.append(http.server.HTTPServer(("127.0.0.1", port), Health))
        servers[0].serve_forever()

    threading.Timer(4.0, come_back).start()
    t0 = time.monotonic()
    try:
        check_store(uri, wait_s=120)
        waited = time.monotonic() - t0
    finally:
        while not servers:
            time.sleep(0.1)
        servers[0].shutdown()
    assert 4 <= waited < 30


# -- launchers/mlflow_server.sh postgres: a PostgreSQL of its own, stopped with it -------------------


def _postgres_ready():
    if os.environ.get("CI", "").lower() != "true":
        pytest.importorskip("psycopg2", reason="the postgres extra: pip install -e '.[postgres]' (make install)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_postgres_server_stops_both_and_keeps_its_data_for_the_next_start():
    _postgres_ready()
    with postgres_state_dir() as state:
        _stop_and_restart(state)


def _stop_and_restart(state):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ("--background", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "postgres")
    r = _script(*args, state_dir=state)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "postgresql+psycopg2://mlflow@/mlflow?host=" in r.stderr
    run_id = Tracker(base).start_parent("pg_keep", "kept", {})
    mlflow_pid = int((state / "mlflow_server.pid").read_text())
    pg_pid = int((state / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
    # PostgreSQL listens on no TCP port: its only way in is the socket in the state dir
    assert (state / "postgres" / "socket" / ".s.PGSQL.5432").is_socket()

    stop = _script("stop", state_dir=state)
    assert stop.returncode == 0 and "stopping PostgreSQL" in stop.stderr, stop.stderr
    assert not _alive(mlflow_pid) and not _alive(pg_pid)
    with pytest.raises(urllib.error.URLError):
        _get(base, "/health")

    r = _script(*args, state_dir=state)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "initdb" not in r.stderr  # the same data dir, not a new database
    assert Tracker(base).get_run(run_id).info.run_name == "kept"


def test_postgres_server_refuses_a_state_dir_its_user_cannot_reach(tmp_path):
    """As root, PostgreSQL runs as the `postgres` user: a state dir under a private directory (pytest's
    tmp_path) is refused with the reason, and nothing is left running."""
    if os.getuid() != 0:
        pytest.skip("only root hands PostgreSQL to the postgres user")
    _postgres_ready()
    state = tmp_path / "state"
    r = _script("--background", "--host", "127.0.0.1", "--port", str(free_port()), "postgres", state_dir=state)
    assert r.returncode != 0
    assert "cannot reach" in r.stderr and "pick a --state-dir it can reach" in r.stderr, r.stderr
    assert "tracking.uri" not in r.stdout + r.stderr
    assert not (state / "mlflow_server.pid").exists() and not (state / "postgres" / "data").exists()
