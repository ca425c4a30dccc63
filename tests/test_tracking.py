"""tracking.py on a real sqlite store: the links it prints, experiments marked as model-training
ones, dataset inputs (the runs table's Dataset column) and the system-metrics monitor of a job run,
which every way of closing the run stops before the run ends."""

import json
import logging
import threading
import time

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from helpers.mlflow_store import tracker_at
from sae_sweep.tracking.runs import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ui_command, ui_url

CPU = "system/cpu_utilization_percentage"


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    return tracker_at(tmp_path_factory.mktemp("tracking"))


def _monitor_threads():
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]


def _dataset(name, digest, context="train", tokens=100):
    return {
        "name": name,
        "digest": digest,
        "source_type": "code",
        "source": {"tags": {"sae_sweep.dataset": name}},
        "schema": None,
        "profile": {"tokens": tokens},
        "context": context,
    }


@pytest.mark.unit
def test_links_open_the_model_training_view():
    # MLflow 3.17's UI opens experiments on the GenAI pages unless the link picks "Model training"
    assert (
        ui_url("http://login01:5000/", "7") == "http://login01:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    assert ui_url("http://h:1", "7", "abc") == "http://h:1/#/experiments/7/runs/abc?workflowType=machine_learning"
    assert (
        ui_url("https://h", "7", "abc", "system-metrics")
        == "https://h/#/experiments/7/runs/abc/system-metrics?workflowType=machine_learning"
    )
    # a local store: `mlflow ui`'s default address, and the command that serves it there
    assert ui_url("sqlite:////x/mlflow.db", "3").startswith("http://127.0.0.1:5000/#/experiments/3/runs?")
    assert ui_command("sqlite:////x/mlflow.db") == "mlflow ui --backend-store-uri sqlite:////x/mlflow.db"
    assert ui_command("http://h:1") is None


@pytest.mark.unit
def test_a_link_that_cannot_be_made_is_a_warning_not_an_error(tracker, caplog):
    with tracker.child("links", "linked", "key-link", None) as run:
        assert (
            run.url
            == tracker.run_url(run.run_id)
            == ui_url(tracker.uri, tracker.get_run(run.run_id).info.experiment_id, run.run_id)
        )
    missing = "0" * 32  # the store has no such run: get_run raises
    with pytest.raises(MlflowException):
        tracker.run_url(missing)
    with caplog.at_level(logging.WARNING, logger="sae_sweep.tracking.runs"):
        text = tracker.ui_link(missing)
    assert text.startswith("(no UI link: ") and missing in text
    assert any(missing in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.unit
def test_experiments_are_marked_as_model_training(tracker):
    exp_id = tracker.experiment_id("made_here")
    assert tracker.client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # an experiment made before the tag existed gets it when its next sweep starts
    old = tracker.client.create_experiment("made_before")
    assert EXPERIMENT_KIND_TAG not in tracker.client.get_experiment(old).tags
    parent = tracker.start_parent("made_before", "sweep-x", {})
    assert tracker.client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert tracker.run_url(parent) == ui_url(tracker.uri, old, parent)
    tracker.end(parent, "FINISHED")


@pytest.mark.unit
@pytest.mark.parametrize(
    "error, status", [(None, "FINISHED"), (RuntimeError("boom"), "FAILED"), (SystemExit(143), "KILLED")]
)
def test_every_close_stops_the_system_metrics_monitor_first(tracker, error, status):
    before = len(_monitor_threads())
    run = tracker.child("sysmetrics", f"run-{status}", f"key-{status}", None, system_metrics_s=0.2)
    assert len(_monitor_threads()) == before + 1
    time.sleep(1.5)  # a few samples
    run.close(error)
    assert len(_monitor_threads()) == before  # no thread outlives its run
    r = tracker.get_run(run.run_id)
    assert r.info.status == status
    history = tracker.metric_history(run.run_id, CPU)
    assert len(history) >= 2, history
    for key in ("system/system_memory_usage_megabytes", "system/disk_usage_percentage"):
        assert key in r.data.metrics
    # finish() flushed everything before the run ended: nothing arrives afterwards
    time.sleep(0.5)
    assert len(tracker.metric_history(run.run_id, CPU)) == len(history)


@pytest.mark.unit
def test_a_continued_run_goes_on_with_its_system_metric_steps(tracker):
    run = tracker.child("sysmetrics", "resumed", "key-resumed", None, system_metrics_s=0.2)
    time.sleep(1.0)
    run.close(SystemExit(143))  # preempted: KILLED, continued by the requeued job
    first = [s for s, _ in tracker.metric_history(run.run_id, CPU)]
    again = tracker.child("sysmetrics", "resumed", "key-resumed", None, resume_run_id=run.run_id, system_metrics_s=0.2)
    time.sleep(1.0)
    again.close()
    steps = [s for s, _ in tracker.metric_history(run.run_id, CPU)]
    assert tracker.get_run(run.run_id).info.status == "FINISHED"
    assert len(steps) > len(first) and len(set(steps)) == len(steps), steps  # no step logged twice


@pytest.mark.unit
def test_no_monitor_when_system_metrics_are_off(tracker):
    before = len(_monitor_threads())
    with tracker.child("sysmetrics", "off", "key-off", None) as run:
        assert run.monitor is None and len(_monitor_threads()) == before
    assert not any(k.startswith("system/") for k in tracker.get_run(run.run_id).data.metrics)


@pytest.mark.unit
def test_datasets_are_run_inputs_and_the_parent_names_the_sweeps_training_sets(tracker):
    parent = tracker.start_parent("datasets", "sweep-d", {})
    kids = []
    for name, digest in (("builtin", "1a2b3c4d"), ("faithful", "5e6f7a8b"), ("builtin", "1a2b3c4d")):
        with tracker.child("datasets", f"{name}-{len(kids)}", f"key-d{len(kids)}", parent) as run:
            run.log_dataset(_dataset(name, digest))
            run.log_dataset(_dataset(name, digest))  # a resumed run logs it again: still one input
            run.log_dataset(_dataset(name, "0e0e0e0e", context="eval"))
            kids.append(run.run_id)
    inputs = tracker.get_run(kids[0]).inputs.dataset_inputs
    assert sorted((d.dataset.name, d.dataset.digest, d.tags[0].value) for d in inputs) == [
        ("builtin", "0e0e0e0e", "eval"),
        ("builtin", "1a2b3c4d", "train"),
    ]
    assert tracker.log_child_datasets(parent) == 2
    got = tracker.get_run(parent).inputs.dataset_inputs
    assert sorted((d.dataset.name, d.dataset.digest) for d in got) == [
        ("builtin", "1a2b3c4d"),
        ("faithful", "5e6f7a8b"),
    ]
    assert all([(t.key, t.value) for t in d.tags] == [("mlflow.data.context", "train")] for d in got)
    tracker.end(parent, "FINISHED")


@pytest.mark.integration
def test_a_datasets_digest_is_its_token_windows_key(tiny_lm, tmp_path):
    """The digest the UI shows names the windows a run used: the key in their file name under
    <cache>/tokens/, different for the held-out split and for another budget."""
    from sae_sweep.data.text import token_windows
    from sae_sweep.job.execute import dataset_record

    cfg = OmegaConf.create({"dataset": {"name": "builtin", "kind": "builtin", "context_size": 32}})
    windows = token_windows(cfg.dataset, tiny_lm, "eval", 512, tmp_path)
    rec = dataset_record(cfg, tiny_lm, "eval", 512, {"tokens": int(windows.numel())})
    (path,) = (tmp_path / "tokens").glob("builtin-eval-*.npy")
    assert len(rec["digest"]) == 8 and path.stem.split("-")[-1].startswith(rec["digest"])
    assert rec["name"] == "builtin" and rec["context"] == "eval" and rec["source_type"] == "code"
    assert rec["profile"] == {"split": "eval", "context_size": 32, "tokens": 512}
    assert dataset_record(cfg, tiny_lm, "train", 512, {})["digest"] != rec["digest"]
    assert dataset_record(cfg, tiny_lm, "eval", 1024, {})["digest"] != rec["digest"]


@pytest.mark.integration
def test_a_runs_dataset_inputs_as_mlflow_gives_them_back(tiny_lm, tmp_path, tracker):
    """What the runs table's Dataset column reads: the inputs of the run, through a client of its own."""
    from sae_sweep.job.execute import dataset_record, log_dataset_input

    cfg = OmegaConf.create({"dataset": {"name": "builtin", "kind": "builtin", "context_size": 32}})
    train = dataset_record(cfg, tiny_lm, "train", 2048, {"tokens": 2048, "windows": 64})
    held_out = dataset_record(cfg, tiny_lm, "eval", 512, {"tokens": 512, "windows": 16})
    with tracker.child("datasets_real", "builtin-run", "key-real", None) as run:
        assert log_dataset_input(run, lambda: train) and log_dataset_input(run, lambda: held_out)
    got = MlflowClient(tracker.uri).get_run(run.run_id).inputs.dataset_inputs
    by_context = {[t.value for t in d.tags if t.key == "mlflow.data.context"][0]: d.dataset for d in got}
    assert sorted(by_context) == ["eval", "train"]
    for context, rec in (("train", train), ("eval", held_out)):
        ds = by_context[context]
        assert (ds.name, ds.digest, ds.source_type) == ("builtin", rec["digest"], "code")
        assert len(ds.digest) == 8 and int(ds.digest, 16) >= 0
        assert json.loads(ds.source)["tags"]["sae_sweep.dataset"] == "builtin"
        assert json.loads(ds.profile) == rec["profile"]
        spec = json.loads(json.loads(ds.schema)["mlflow_tensorspec"]["features"])[0]
        assert spec["tensor-spec"] == {"dtype": "int32", "shape": [-1, 32]}
    assert by_context["train"].digest != by_context["eval"].digest


@pytest.mark.unit
def test_a_dataset_input_that_fails_is_a_warning_and_a_tag_and_the_job_goes_on(tracker, caplog):
    from sae_sweep.job.execute import dataset_record, log_dataset_input

    # a record that cannot be made: a faithful dataset's identity needs the LM that generated it
    cfg = OmegaConf.create({"dataset": {"name": "faithful", "kind": "faithful", "context_size": 32}})
    with caplog.at_level(logging.WARNING, logger="sae_sweep"):
        with tracker.child("datasets_bad", "no-lm", "key-bad", None) as run:
            assert log_dataset_input(run, lambda: dataset_record(cfg, None, "train", 100, {})) is False
            run.log_metrics({"train/loss": 1.0})  # the job goes on
    r = tracker.get_run(run.run_id)
    assert r.info.status == "FINISHED" and r.data.metrics["train/loss"] == 1.0
    assert "needs the LanguageModel" in r.data.tags["dataset_input_error"]
    assert not r.inputs.dataset_inputs
    assert any(
        run.run_id in m.getMessage() and "dataset input not logged" in m.getMessage()
        for m in caplog.records
        if m.levelno == logging.WARNING
    )

    # a store that refuses the input (the run was deleted under the job): warned, not raised
    gone = tracker.child("datasets_bad", "deleted", "key-gone", None)
    tracker.client.delete_run(gone.run_id)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sae_sweep"):
        assert log_dataset_input(gone, lambda: _dataset("builtin", "1a2b3c4d")) is False
    assert any(gone.run_id in m.getMessage() for m in caplog.records if m.levelno == logging.WARNING)


@pytest.mark.unit
def test_a_local_dataset_of_many_files_is_logged_with_its_patterns(tmp_path, tracker):
    """The PostgreSQL manual is ~1,200 HTML pages: listing each in the source would pass MLflow's
    64 kB limit on a dataset source and lose the input. The source names the configured glob."""
    from mlflow.utils.validation import MAX_DATASET_SOURCE_SIZE

    from sae_sweep.data.text import dataset_source

    pages = tmp_path / "a_rather_long_directory_name_like_usr_share_doc_postgresql_doc_15_html"
    pages.mkdir()
    for i in range(1500):
        (pages / f"sql-createtable-page-number-{i:05d}.html").write_text(f"<p>Page {i}.</p>")
    cfg = OmegaConf.create({"name": "manual", "kind": "local", "data_files": [str(pages / "*.html")]})
    kind, source = dataset_source(cfg)
    assert kind == "local" and source == {"uri": str(pages), "data_files": [str(pages / "*.html")], "n_files": 1500}
    assert len(json.dumps(source)) < MAX_DATASET_SOURCE_SIZE
    with tracker.child("datasets_local", "manual", "key-manual", None) as run:
        run.log_dataset(
            {
                "name": "manual",
                "digest": "abcdef12",
                "source_type": kind,
                "source": source,
                "schema": None,
                "profile": {},
                "context": "train",
            }
        )
    (got,) = MlflowClient(tracker.uri).get_run(run.run_id).inputs.dataset_inputs
    assert json.loads(got.dataset.source)["n_files"] == 1500


@pytest.mark.unit
def test_only_a_sweeps_job_waits_for_a_silent_tracking_server():
    """A job with a parent run was submitted by a driver that reached the server: it waits for a restart.
    A single run or the driver's own check waits for nothing."""
    from helpers.config import compose_config
    from sae_sweep.job.app import store_wait_s
    from sae_sweep.tracking.runs import SERVER_RESTART_WAIT_S

    assert store_wait_s(compose_config("tracking.uri=http://127.0.0.1:5000")) == 0.0
    job = compose_config("tracking.uri=http://127.0.0.1:5000", "tracking.parent_run_id=abc123")
    assert store_wait_s(job) == SERVER_RESTART_WAIT_S >= 120


@pytest.mark.unit
def test_mlflow_retries_a_refused_connection_as_often_as_it_allows():
    """A server being restarted: the jobs' MLflow client rides it out for the longest MLflow allows."""
    from mlflow.environment_variables import _MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT, MLFLOW_HTTP_REQUEST_MAX_RETRIES

    import sae_sweep.tracking.runs  # noqa: F401  (sets the default on import)

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == _MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT.get()
