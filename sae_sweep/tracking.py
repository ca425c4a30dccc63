"""MLflow: the only module that talks to it.

One experiment per sweep name, a parent run per multirun, one child run per grid point. Every
call goes through an explicit ``MlflowClient`` (no fluent global state), so many jobs and threads
can write one store. Metrics and params are sent in batches: each call is a database round trip.

Idempotency: every child run carries its ``run_key`` tag; ``find_runs`` looks runs up by it.
A run is closed FINISHED only by ``ChildRun.close()``; any exception closes it FAILED with the
error as a tag, so no run is ever left RUNNING by a job that stopped.

A sqlite store is checked and initialised once, under a lock: MLflow creates and migrates its
schema on first use, and two processes doing that at once on a fresh file corrupt it (measured:
7 of 7 trials crashed a process, 1 left a half-migrated file). Its experiments keep their
artifacts next to the database (``<db dir>/mlartifacts``), not in whatever directory a job was
started from.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

# Artifact downloads (sweep-end cross-seed, report, export) are small and quick: a progress bar per
# download would be most of a sweep's console output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
BATCH = 900  # MLflow allows 1000 entities per log_batch call


def slurm_tags() -> Dict[str, str]:
    tags = {}
    for env, tag in (("SLURM_JOB_ID", "slurm_job_id"), ("SLURM_ARRAY_JOB_ID", "slurm_array_job_id"),
                     ("SLURM_ARRAY_TASK_ID", "slurm_array_task_id"),
                     ("SLURM_RESTART_COUNT", "slurm_restart_count")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


class TrackingStoreError(RuntimeError):
    """The tracking store cannot be used (unwritable directory, server not answering, damaged db)."""


def sqlite_path(uri: str) -> Optional[Path]:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_store(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with the path or address, when ``uri`` cannot be written (MLflow itself
    retries for minutes and then raises a database traceback)."""
    db = sqlite_path(uri)
    if db is not None:
        folder = db.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingStoreError(f"tracking.uri={uri}: cannot create {folder} ({e.strerror}); "
                                     f"choose a writable place (tracking.uri or paths.output_dir)") from None
        if not os.access(folder, os.W_OK | os.X_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingStoreError(f"tracking.uri={uri}: {db if db.exists() else folder} is not writable "
                                     f"by this user; choose a writable place (tracking.uri or paths.output_dir)")
    elif uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
        except (urllib.error.URLError, OSError) as e:
            raise TrackingStoreError(f"tracking.uri={uri}: the MLflow server does not answer "
                                     f"({getattr(e, 'reason', e)}); start it (launchers/mlflow_server.sh) "
                                     f"or point tracking.uri elsewhere") from None


def _damaged(db: Path) -> Optional[str]:
    """Why a sqlite store cannot be trusted, or None: tables left by an interrupted migration."""
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        left = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE name LIKE '_alembic_tmp_%'")]
    if left:
        return (f"{db} is half-migrated (tables {', '.join(left)} left by an interrupted schema migration, e.g. "
                f"two processes creating it at once before this was locked); move it aside and start a new store")
    return None


class Tracker:
    def __init__(self, uri: str):
        from sae_sweep.locks import OwnedLock

        self.uri = uri
        check_store(uri)
        db = sqlite_path(uri)
        if db is None:
            self.client = MlflowClient(tracking_uri=uri)
            self.artifact_root: Optional[str] = None  # the server's
            return
        # One process at a time creates / migrates the schema (MLflow does it on first use).
        with OwnedLock(db.with_name(db.name + ".init.lock"), timeout=600):
            if db.exists() and db.stat().st_size > 0 and (why := _damaged(db)):
                raise TrackingStoreError(f"tracking.uri={uri}: {why}")
            self.client = MlflowClient(tracking_uri=uri)
            self.client.search_experiments(max_results=1)  # forces the store's set-up now
        self.artifact_root = (db.parent / "mlartifacts").resolve().as_uri()

    def experiment_id(self, name: str, create: bool = True) -> Optional[str]:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        if not create:
            return None
        try:
            location = f"{self.artifact_root}/{name}" if self.artifact_root else None
            return self.client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            # Another job created it between our look-up and create.
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def find_runs(self, experiment_id: str, *, run_key: Optional[str] = None,
                  parent_run_id: Optional[str] = None, statuses: Iterable[str] = (),
                  extra_filter: str = "") -> List[Any]:
        clauses = []
        if run_key:
            clauses.append(f"tags.run_key = '{run_key}'")
        if parent_run_id:
            clauses.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
        if extra_filter:
            clauses.append(extra_filter)
        runs, token = [], None
        while True:
            page = self.client.search_runs([experiment_id], " and ".join(clauses), max_results=1000,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
        statuses = set(statuses)
        return [r for r in runs if not statuses or r.info.status in statuses]

    def start_parent(self, experiment: str, name: str, tags: Mapping[str, str]) -> str:
        exp_id = self.experiment_id(experiment)
        run = self.client.create_run(exp_id, run_name=name,
                                     tags={"sae_sweep.kind": "sweep", **{k: str(v) for k, v in tags.items()}})
        return run.info.run_id

    def child(self, experiment: str, run_name: str, run_key: str, parent_run_id: Optional[str],
              resume_run_id: Optional[str] = None) -> "ChildRun":
        exp_id = self.experiment_id(experiment)
        tags = {"run_key": run_key, "sae_sweep.kind": "job", "host": socket.gethostname(), **slurm_tags()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        if resume_run_id:
            self.client.update_run(resume_run_id, status="RUNNING")
            # The previous attempt's error no longer describes this run.
            stale = self.client.get_run(resume_run_id).data.tags
            for t in ("error", "error_type"):
                if t in stale:
                    self.client.delete_tag(resume_run_id, t)
            run_id = resume_run_id
            tags["resumed"] = "true"
            self.set_tags(run_id, tags)
        else:
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        return ChildRun(self, run_id)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(run_id, tags=items[i:i + BATCH])

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Params are immutable in MLflow: on a resumed run only the new ones are sent."""
        existing = self.client.get_run(run_id).data.params
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(run_id, params=items[i:i + BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(run_id, metrics=items[i:i + BATCH])

    def log_artifact_file(self, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_artifact_dir(self, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifacts(run_id, str(path), artifact_path)

    def log_json(self, run_id: str, obj: Any, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(artifact_file).name
            p.write_text(json.dumps(obj, indent=2, default=str))
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(run_id, str(p), None if parent == "." else parent)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def download(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))

    def get_run(self, run_id: str) -> Any:
        return self.client.get_run(run_id)

    def metric_history(self, run_id: str, key: str) -> List[tuple]:
        """[(step, value)] of one metric ordered by step: the data of the UI's metric chart."""
        return sorted(((m.step, m.value) for m in self.client.get_metric_history(run_id, key)),
                      key=lambda sv: sv[0])

    def list_artifacts(self, run_id: str, path: Optional[str] = None) -> List[str]:
        """Artifact paths directly under ``path`` of a run ([] when there are none)."""
        return [a.path for a in self.client.list_artifacts(run_id, path)]

    def experiment_name(self, experiment_id: str) -> str:
        return self.client.get_experiment(experiment_id).name


class ChildRun:
    """A job's run. ``close()`` ends it FINISHED, ``close(error)`` FAILED with the reason (KILLED for
    a SystemExit/KeyboardInterrupt: SLURM preemption, so a requeue can continue it). As a context
    manager it always ends one way or the other."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker = tracker
        self.run_id = run_id
        self.closed = False

    def __enter__(self) -> "ChildRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.closed:
            self.close(exc)
        return False

    def close(self, error: Optional[BaseException] = None) -> None:
        if error is None:
            self.tracker.end(self.run_id, "FINISHED")
            self.closed = True
            return
        reason = f"{type(error).__name__}: {error}"
        try:
            self.tracker.set_tags(self.run_id, {"error": reason[:4900], "error_type": type(error).__name__})
            self.tracker.log_text(self.run_id, "".join(traceback.format_exception(type(error), error,
                                                                                 error.__traceback__)), "error.txt")
        finally:
            self.tracker.end(self.run_id, "FAILED" if isinstance(error, Exception) else "KILLED")
            self.closed = True

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tracker.set_tags(self.run_id, tags)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker.log_params(self.run_id, params)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step)

    def log_json(self, obj: Any, artifact_file: str) -> None:
        self.tracker.log_json(self.run_id, obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.tracker.log_text(self.run_id, text, artifact_file)

    def log_artifact_dir(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.tracker.log_artifact_dir(self.run_id, path, artifact_path)

    def log_artifact_file(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.tracker.log_artifact_file(self.run_id, path, artifact_path)
