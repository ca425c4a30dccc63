"""MLflow: the only module that talks to it.

One experiment per sweep name, a parent run per multirun, one child run per grid point. Every
call goes through an explicit ``MlflowClient`` (no fluent global state), so many jobs and threads
can write one store. Metrics and params are sent in batches: each call is a database round trip.

Idempotency: every child run carries its ``run_key`` tag; ``find_runs`` looks runs up by it.
A run is closed FINISHED only by ``ChildRun.close()``; any exception closes it FAILED with the
error as a tag, so no run is ever left RUNNING by a job that stopped. A job run's system-metrics
monitor (a thread) is stopped and flushed by that same ``close()``, before the run ends.

What a person sees in the MLflow UI: experiments are tagged as model-training ones, each job run
logs its token windows as dataset inputs (the runs table's Dataset column), and every link this
package prints goes through ``ui_url`` (MLflow 3.17's UI opens the GenAI pages otherwise).

A sqlite store is checked and initialised once, under a lock: MLflow creates and migrates its
schema on first use, and two processes doing that at once on a fresh file corrupt it (measured:
7 of 7 trials crashed a process, 1 left a half-migrated file). Its experiments keep their
artifacts next to the database (``<db dir>/mlartifacts``), not in whatever directory a job was
started from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, overload

# Artifact downloads (sweep-end cross-seed, report, export) are small and quick: a progress bar per
# download would be most of a sweep's console output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow prints "View run ... at http://..." on every set_terminated against a server, with links
# that open the GenAI pages; the links this package logs (``ui_url``) replace them.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# A tracking server being restarted: MLflow's client retries a request whose connection was refused,
# 7 times by default (backoff factor 2, sleeps capped at 120 s: ~4 min). Measured on 2 loaded cores, a
# restart of the server on PostgreSQL took over 2 min of that. 10, the most MLflow allows, rides out ~10 min.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "10")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from sae_sweep.tracking.status import RunStatus  # noqa: E402
from sae_sweep.util.digests import ChecksumMismatch  # noqa: E402
from sae_sweep.util.files import sha256_file  # noqa: E402

log = logging.getLogger(__name__)
# The monitor says "Started / Stopping / Successfully terminated" for every run at INFO.
logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.WARNING)
_GPU_HINT_GIVEN: List[bool] = []  # said once per process

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
BATCH = 900  # MLflow allows 1000 entities per log_batch call

# MLflow 3.x reads this experiment tag to open an experiment on its runs table rather than the
# GenAI overview; 3.17.2's UI ignores it (the sidebar's GenAI / Model training switch decides), so
# the links below also carry the switch's URL form.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_QUERY = "workflowType=machine_learning"
# Where `mlflow ui` serves a local (sqlite) store by default: links to such a store assume it.
LOCAL_UI = "http://127.0.0.1:5000"


def ui_url(tracking_uri: str, experiment_id: str, run_id: Optional[str] = None, page: Optional[str] = None) -> str:
    """The MLflow UI address of an experiment's runs table, or of one run (``page``: a run's tab,
    e.g. ``system-metrics``, ``artifacts``), in the form that opens the model-training view. For a
    server store it is the server's own address; for a sqlite store, `mlflow ui`'s default
    (``ui_command`` says how to start it)."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI
    path = f"#/experiments/{experiment_id}/runs"
    if run_id:
        path += f"/{run_id}" + (f"/{page}" if page else "")
    return f"{base}/{path}?{UI_QUERY}"


def ui_command(tracking_uri: str) -> Optional[str]:
    """The command that serves a local store at ``LOCAL_UI``; None for a server (it is the UI)."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def slurm_tags() -> Dict[str, str]:
    tags = {}
    for env, tag in (
        ("SLURM_JOB_ID", "slurm_job_id"),
        ("SLURM_ARRAY_JOB_ID", "slurm_array_job_id"),
        ("SLURM_ARRAY_TASK_ID", "slurm_array_task_id"),
        ("SLURM_RESTART_COUNT", "slurm_restart_count"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


SHA256_TAG = "sha256/"  # + an artifact path: its sha256 when it was logged (``Tracker.log_checked_text``)


def untrained_reason(run: Any) -> Optional[str]:
    """Why ``run`` (an MLflow run) has no trained SAE to read: its status, and for a FAILED run its
    error; None when it FINISHED."""
    status = run.info.status
    if status == RunStatus.FINISHED:
        return None
    error = run.data.tags.get("error")
    why = {
        RunStatus.RUNNING: "still running (or its process died before closing it)",
        RunStatus.KILLED: "killed before it finished",
        RunStatus.FAILED: "failed" + (f": {error}" if error else ""),
    }.get(status, str(status))
    return f"run {run.info.run_id} is {status}, {why}; only a FINISHED run has a trained SAE"


class ArtifactsUnavailable(RuntimeError):
    """A run's trained artifacts cannot be had: the run is not FINISHED, or they are missing."""


class TrackingStoreError(RuntimeError):
    """The tracking store cannot be used (unwritable directory, server not answering, damaged db)."""


def sqlite_path(uri: str) -> Optional[Path]:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


# How long a job of a sweep waits for a tracking server that does not answer: as long as MLflow's client
# keeps retrying a request whose connection was refused (10 retries, above: ~10 min). The sweep's driver
# reached the server before it submitted the job, so a silent server is most likely being restarted; a job
# that gave up at once would lose its grid point.
SERVER_RESTART_WAIT_S = 600.0


def check_store(uri: str, timeout: float = 5.0, wait_s: float = 0.0) -> None:
    """Fail in seconds, with the path or address, when ``uri`` cannot be written (MLflow itself
    retries for minutes and then raises a database traceback). ``wait_s``: how long to keep asking
    a server that does not answer (one restarting) before failing."""
    from sae_sweep.util.disk import unwritable

    db = sqlite_path(uri)
    if db is not None:
        folder = db.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingStoreError(
                f"tracking.uri={uri}: cannot create {folder} ({e.strerror}); "
                f"choose a writable place (tracking.uri or paths.output_dir)"
            ) from None
        why = unwritable(folder)
        if why:
            raise TrackingStoreError(
                f"tracking.uri={uri}: {why}; choose a writable place (tracking.uri or paths.output_dir)"
            )
        if db.exists() and not os.access(db, os.W_OK):
            raise TrackingStoreError(
                f"tracking.uri={uri}: {db} is not writable by this user; choose a writable place "
                f"(tracking.uri or paths.output_dir)"
            )
    elif uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + wait_s
        while True:
            try:
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
                return
            except (urllib.error.URLError, OSError) as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    waited = f" for {wait_s:.0f}s" if wait_s > 0 else ""
                    raise TrackingStoreError(
                        f"tracking.uri={uri}: the MLflow server does not answer{waited} "
                        f"({getattr(e, 'reason', e)}); start it (launchers/mlflow_server.sh) "
                        f"or point tracking.uri elsewhere"
                    ) from None
                log.warning(
                    "the MLflow server at %s does not answer (%s); asking again for %.0fs more",
                    uri,
                    getattr(e, "reason", e),
                    left,
                )
                time.sleep(min(2.0, left))


def _damaged(db: Path) -> Optional[str]:
    """Why a sqlite store cannot be trusted, or None: tables left by an interrupted migration."""
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        left = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE name LIKE '_alembic_tmp_%'")]
    if left:
        return (
            f"{db} is half-migrated (tables {', '.join(left)} left by an interrupted schema migration, e.g. "
            f"two processes creating it at once before this was locked); move it aside and start a new store"
        )
    return None


class Tracker:
    def __init__(self, uri: str, wait_s: float = 0.0):
        """``wait_s``: how long a server that does not answer is waited for (``check_store``)."""
        from sae_sweep.util.locks import OwnedLock

        self.uri = uri
        check_store(uri, wait_s=wait_s)
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

    @overload
    def experiment_id(self, name: str, create: Literal[True] = True) -> str: ...

    @overload
    def experiment_id(self, name: str, create: bool) -> Optional[str]: ...

    def experiment_id(self, name: str, create: bool = True) -> Optional[str]:
        """The experiment's id; created when missing (None instead with ``create=False``)."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        if not create:
            return None
        try:
            location = f"{self.artifact_root}/{name}" if self.artifact_root else None
            return self.client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except mlflow.exceptions.MlflowException:
            # Another job created it between our look-up and create.
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def find_runs(
        self,
        experiment_id: str,
        *,
        run_key: Optional[str] = None,
        parent_run_id: Optional[str] = None,
        statuses: Iterable[str] = (),
        extra_filter: str = "",
    ) -> List[Any]:
        clauses = []
        if run_key:
            clauses.append(f"tags.run_key = '{run_key}'")
        if parent_run_id:
            clauses.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
        if extra_filter:
            clauses.append(extra_filter)
        runs: List[Any] = []
        token = None
        while True:
            page = self.client.search_runs(
                [experiment_id],
                " and ".join(clauses),
                max_results=1000,
                order_by=["attributes.start_time DESC"],
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
        statuses = set(statuses)
        return [r for r in runs if not statuses or r.info.status in statuses]

    def start_parent(self, experiment: str, name: str, tags: Mapping[str, str]) -> str:
        exp_id = self.experiment_id(experiment)
        exp = self.client.get_experiment(exp_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:  # created before experiments were tagged
            self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        run = self.client.create_run(
            exp_id, run_name=name, tags={"sae_sweep.kind": "sweep", **{k: str(v) for k, v in tags.items()}}
        )
        return run.info.run_id

    def child(
        self,
        experiment: str,
        run_name: str,
        run_key: str,
        parent_run_id: Optional[str],
        resume_run_id: Optional[str] = None,
        system_metrics_s: Optional[float] = None,
    ) -> ChildRun:
        """A job's run, new or continued (``resume_run_id``). ``system_metrics_s``: sample the
        machine (CPU, memory, disk, network; GPUs with nvidia-ml-py) every that many seconds into
        ``system/*`` metrics until the run is closed; None: no monitor."""
        exp_id = self.experiment_id(experiment)
        tags = {
            "run_key": run_key,
            "sae_sweep.kind": "job",
            "host": socket.gethostname(),
            "pid": str(os.getpid()),  # who runs it: a RUNNING run whose process is gone is stale
            **slurm_tags(),
        }
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        if resume_run_id:
            self.client.update_run(resume_run_id, status=RunStatus.RUNNING.value)
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
        run = ChildRun(self, run_id)
        if system_metrics_s is not None:
            run.monitor = self.system_monitor(run_id, system_metrics_s, resume=resume_run_id is not None)
        return run

    def system_monitor(self, run_id: str, interval_s: float, resume: bool = False) -> Optional[Any]:
        """A started SystemMetricsMonitor for ``run_id`` (its ``finish()`` must come before the
        run ends: it buffers), or None where it cannot run (psutil missing): the run goes on
        without system metrics."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # resume_logging: a continued run's samples go on after its earlier steps
            monitor = SystemMetricsMonitor(
                run_id=run_id,
                sampling_interval=float(interval_s),
                samples_before_logging=1,
                resume_logging=resume,
                tracking_uri=self.uri,
            )
        except Exception as e:  # ImportError (psutil), or a monitor MLflow cannot build here
            log.warning("no system metrics for run %s: %s: %s", run_id, type(e).__name__, e)
            return None
        if (
            not any(type(m).__name__ in ("GPUMonitor", "ROCMMonitor") for m in monitor.monitors)
            and shutil.which("nvidia-smi")
            and not _GPU_HINT_GIVEN
        ):
            _GPU_HINT_GIVEN.append(True)
            log.warning("system metrics without GPU utilisation/memory: `pip install nvidia-ml-py` adds them")
        monitor.start()
        return monitor

    def log_dataset(self, run_id: str, dataset: Mapping[str, Any]) -> None:
        """One dataset input of a run, as the runs table's Dataset column shows it ("name (digest)"
        and a badge with ``context``). ``dataset``: name, digest, source_type, source (a dict),
        schema (a dict or None), profile (a dict), context ("train", "eval"). MLflow keeps one
        dataset per (name, digest) in an experiment and one input per dataset and run: logging it
        again (a resumed run) changes nothing."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(
            name=str(dataset["name"]),
            digest=str(dataset["digest"]),
            source_type=str(dataset["source_type"]),
            source=json.dumps(dataset["source"], default=str),
            schema=json.dumps(dataset["schema"]) if dataset.get("schema") else None,
            profile=json.dumps(dataset.get("profile") or {}, default=str),
        )
        self.client.log_inputs(
            run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", str(dataset["context"]))])]
        )

    def log_child_datasets(self, parent_run_id: str, context: str = "train") -> int:
        """Give a sweep's parent run the ``context`` datasets its child runs logged (each once), so
        the parent's row, under which the UI collapses the children, names the sweep's datasets.
        Returns how many."""
        from mlflow.entities import DatasetInput

        exp_id = self.client.get_run(parent_run_id).info.experiment_id
        found: Dict[tuple, Any] = {}
        for run in self.find_runs(exp_id, parent_run_id=parent_run_id):
            for di in run.inputs.dataset_inputs if run.inputs else ():
                if any(t.key == "mlflow.data.context" and t.value == context for t in di.tags):
                    found.setdefault((di.dataset.name, di.dataset.digest), di)
        inputs = [DatasetInput(di.dataset, tags=list(di.tags)) for _, di in sorted(found.items())]
        if inputs:
            self.client.log_inputs(parent_run_id, datasets=inputs)
        return len(inputs)

    def experiment_url(self, experiment_id: str) -> str:
        return ui_url(self.uri, experiment_id)

    def run_url(self, run_id: str, page: Optional[str] = None) -> str:
        return ui_url(self.uri, self.client.get_run(run_id).info.experiment_id, run_id, page)

    def ui_link(self, run_id: str, page: Optional[str] = None) -> str:
        """``run_url`` for a message a job, sweep or command prints: a link that cannot be made
        (the store refuses the look-up) is a warning and a "(no UI link: ...)" text in its place,
        never the failure of the work it reports on."""
        try:
            return self.run_url(run_id, page)
        except Exception as e:
            log.warning("no MLflow UI link for run %s: %s: %s", run_id, type(e).__name__, e)
            return f"(no UI link: {type(e).__name__}: {e})"

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(run_id, tags=items[i : i + BATCH])

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Params are immutable in MLflow: on a resumed run only the new ones are sent."""
        existing = self.client.get_run(run_id).data.params
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(run_id, params=items[i : i + BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + BATCH])

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

    def end(self, run_id: str, status: RunStatus) -> None:
        self.client.set_terminated(run_id, status=RunStatus(status).value)

    def download(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))

    def get_run(self, run_id: str) -> Any:
        return self.client.get_run(run_id)

    def fetch_trained(self, run_id: str, artifact_paths: Sequence[str], dst: Path) -> List[Path]:
        """Download the artifacts of a trained run (``sae``, ``config/config.yaml``, ...) into ``dst``.
        ``ArtifactsUnavailable`` says why instead of MLflow's "Failed to download artifacts": a run
        that is not FINISHED (its status and its error), or which of the paths are missing (e.g.
        deleted from the artifact store)."""
        try:
            run = self.get_run(run_id)
        except Exception as e:
            raise ArtifactsUnavailable(
                f"no run {run_id!r} in tracking store {self.uri} ({type(e).__name__}: {e})"
            ) from None
        why = untrained_reason(run)
        if why is not None:
            raise ArtifactsUnavailable(why)
        missing = [p for p in artifact_paths if not self._has_artifact(run_id, p)]
        if missing:
            raise ArtifactsUnavailable(
                f"run {run_id} (FINISHED) lacks artifact(s) {', '.join(missing)} in {run.info.artifact_uri} "
                f"(deleted from the artifact store?)"
            )
        try:
            fetched = [self.download(run_id, p, dst) for p in artifact_paths]
        except Exception as e:
            raise ArtifactsUnavailable(
                f"run {run_id}: cannot download {', '.join(artifact_paths)} from {run.info.artifact_uri} "
                f"({type(e).__name__}: {e})"
            ) from None
        for name, path in zip(artifact_paths, fetched):
            recorded = run.data.tags.get(SHA256_TAG + name)
            if recorded is not None and path.is_file() and sha256_file(path) != recorded:
                raise ChecksumMismatch(
                    f"artifact {name} of run {run_id} changed after it was logged: its sha256 is not the "
                    f"{recorded[:16]}... of tag {SHA256_TAG + name}"
                )
        return fetched

    def log_checked_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """``log_text`` that also records the text's sha256 in the tag ``sha256/<artifact_file>``,
        which ``fetch_trained`` checks (e.g. the run's ``config/config.yaml``)."""
        self.log_text(run_id, text, artifact_file)
        self.set_tags(run_id, {SHA256_TAG + artifact_file: hashlib.sha256(text.encode("utf-8")).hexdigest()})

    def _has_artifact(self, run_id: str, path: str) -> bool:
        """Whether ``path`` (a file, or a directory with files) is among the run's artifacts."""
        parent = str(Path(path).parent)
        try:
            listed = self.client.list_artifacts(run_id, None if parent == "." else parent)
        except Exception:  # the store's directory itself is gone
            return False
        entry = next((a for a in listed if a.path == path), None)
        if entry is None:
            return False
        return not entry.is_dir or bool(self.client.list_artifacts(run_id, path))

    def metric_history(self, run_id: str, key: str) -> List[tuple]:
        """[(step, value)] of one metric ordered by step: the data of the UI's metric chart."""
        return sorted(((m.step, m.value) for m in self.client.get_metric_history(run_id, key)), key=lambda sv: sv[0])

    def list_artifacts(self, run_id: str, path: Optional[str] = None) -> List[str]:
        """Artifact paths directly under ``path`` of a run ([] when there are none)."""
        return [a.path for a in self.client.list_artifacts(run_id, path)]

    def experiment_name(self, experiment_id: str) -> str:
        return self.client.get_experiment(experiment_id).name


class ChildRun:
    """A job's run. ``close()`` ends it FINISHED, ``close(error)`` FAILED with the reason (KILLED for
    a SystemExit/KeyboardInterrupt: SLURM preemption, so a requeue can continue it). As a context
    manager it always ends one way or the other."""

    def __init__(self, tracker: Tracker, run_id: str, monitor: Any = None):
        self.tracker = tracker
        self.run_id = run_id
        self.closed = False
        self.monitor = monitor  # system metrics: stopped and flushed before the run ends

    def __enter__(self) -> ChildRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        if not self.closed:
            self.close(exc)
        return False

    def stop_monitor(self) -> None:
        """Stop the system-metrics thread and send what it buffered (the run must still be open
        for that). Never raises: a lost sample must not keep a run from being closed."""
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            try:
                monitor.finish()
            except Exception as e:
                log.warning("system metrics of run %s: %s: %s", self.run_id, type(e).__name__, e)

    def close(self, error: Optional[BaseException] = None) -> None:
        try:
            self.stop_monitor()  # first: its last samples need the run still RUNNING
        finally:  # even when a signal's SystemExit lands in the monitor's join
            self._end(error)

    def _end(self, error: Optional[BaseException]) -> None:
        if error is None:
            self.tracker.end(self.run_id, RunStatus.FINISHED)
            self.closed = True
            return
        reason = f"{type(error).__name__}: {error}"
        try:
            self.tracker.set_tags(self.run_id, {"error": reason[:4900], "error_type": type(error).__name__})
            self.tracker.log_text(
                self.run_id, "".join(traceback.format_exception(type(error), error, error.__traceback__)), "error.txt"
            )
        finally:
            self.tracker.end(self.run_id, RunStatus.FAILED if isinstance(error, Exception) else RunStatus.KILLED)
            self.closed = True

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tracker.set_tags(self.run_id, tags)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker.log_params(self.run_id, params)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step)

    def log_json(self, obj: Any, artifact_file: str) -> None:
        self.tracker.log_json(self.run_id, obj, artifact_file)

    def log_dataset(self, dataset: Mapping[str, Any]) -> None:
        self.tracker.log_dataset(self.run_id, dataset)

    @property
    def url(self) -> str:
        """The run's UI link (``Tracker.ui_link``: never raises)."""
        return self.tracker.ui_link(self.run_id)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.tracker.log_text(self.run_id, text, artifact_file)

    def log_checked_text(self, text: str, artifact_file: str) -> None:
        self.tracker.log_checked_text(self.run_id, text, artifact_file)

    def log_artifact_dir(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.tracker.log_artifact_dir(self.run_id, path, artifact_path)

    def log_artifact_file(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.tracker.log_artifact_file(self.run_id, path, artifact_path)
