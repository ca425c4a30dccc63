"""End-to-end jobs on the offline defaults, through the real CLI, a real MLflow store and the
real tiny model: the backbone's done-when list, at small token budgets."""

import signal
from pathlib import Path

import pytest

from helpers.cli import run_cli, start_cli_until_checkpoint
from helpers.mlflow_store import store_client, store_runs
from sae_sweep.activations.cache import read_builds_log

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Small budgets: each job trains ~40 steps on a 20k-token cache and evaluates on 2k held-out tokens.
# Small caches trained over many times, on purpose: train.epochs says so (the default refuses repeated data).
SMALL = [
    "dataset.tokens=20000",
    "train.epochs=50",
    "dataset.eval_tokens=2048",
    "train.tokens=40000",
    "trainer.batch_size=1000",
    "train.checkpoint_every=5",
    "sweep.name=e2e",
    "tracking.system_metrics_interval_s=0.5",
]


def _cli(out: Path, *args, cache=None):
    return run_cli(out, *args, cache=cache, timeout=900)


def _runs(out: Path):
    client = store_client(out)
    return client, store_runs(out, "e2e", client=client)


@pytest.fixture(scope="module")
def sweep_out(tmp_path_factory, fresh_cache):
    """The 2-seed sweep, on an activation cache of its own (so that it is built here, once)."""
    out = tmp_path_factory.mktemp("e2e") / "out"
    out.parent.mkdir(exist_ok=True)
    cache = fresh_cache(out.parent)
    r = _cli(out, "-m", "seed=42,49", *SMALL, cache=cache)
    assert r.returncode == 0, r.stderr[-4000:]
    (out.parent / "cli.log").write_text(r.stdout + r.stderr)
    return out, cache


def test_two_seed_sweep_finishes_with_core_metrics(sweep_out):
    out, _ = sweep_out
    _, runs = _runs(out)
    parents = [r for r in runs if r.data.tags.get("sae_sweep.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("sae_sweep.kind") == "job"]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert parents[0].data.metrics["sweep/finished"] == 2
    # the sweep end: shared-feature ratio of the seed pair on the parent, and the report
    assert parents[0].data.metrics["crossseed/n_pairs"] == 1
    assert 0.0 <= parents[0].data.metrics["crossseed/shared_feature_ratio_mean"] <= 1.0
    sweep_dir = Path(parents[0].data.tags["sweep_dir"])
    assert (sweep_dir / "report" / "report.md").is_file()
    for c in children:
        assert c.info.status == "FINISHED"
        m = c.data.metrics
        assert m["core/reconstruction_quality/explained_variance"] > 0.3
        assert m["core/sparsity/l0"] == pytest.approx(16, abs=1e-6)  # TopK: exactly k per token
        assert any(k.startswith("sparse_probing/sae/sae_top_1_test_accuracy") for k in m)
        assert "fake_features/fake_features/fake_feature_ratio" in m and "downstream_standardised/mean/sae_acc" in m
        # eval=default probes with its own procedure, under its own name: no metric carries FaithfulSAE's
        # downstream name from another procedure
        assert not any(k.startswith("downstream/") for k in m)
        assert c.data.params.get("eval.downstream_standardised.procedure") == "standardised"
        assert (
            "absorption/mean/mean_absorption_fraction_score" in m
            or c.data.tags.get("eval.absorption.status") == "skipped"
        )
        for key in (
            "core/model_behavior_preservation/kl_div_score",
            "core/model_performance_preservation/ce_loss_score",
            "core/reconstruction_quality/explained_variance_legacy",
            "core/shrinkage/l2_ratio",
            "core/misc_metrics/frac_alive",
            "train/loss",
        ):
            assert key in m, key
        t = c.data.tags
        assert {t["seed"] for _ in [0]} <= {"42", "49"} and t["model"] == "tiny" and t["trainer"] == "topk"
        assert t["config_hash"] and t["git_commit"] and t["hook"] == "resid_post"
        assert c.data.params["trainer.lr"] == "0.001"


def test_the_ui_shows_datasets_system_metrics_and_links(sweep_out):
    """What a person sees in the MLflow UI: each run's training and held-out windows in the Dataset
    column (the parent names the sweep's training set), system metrics, and links printed to open."""
    out, _ = sweep_out
    client, runs = _runs(out)
    exp = client.get_experiment_by_name("e2e")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = next(r for r in runs if r.data.tags.get("sae_sweep.kind") == "sweep")
    digests = set()
    for c in (r for r in runs if r.data.tags.get("sae_sweep.kind") == "job"):
        inputs = client.get_run(c.info.run_id).inputs.dataset_inputs
        ctx = {[t.value for t in d.tags if t.key == "mlflow.data.context"][0]: d.dataset for d in inputs}
        assert sorted(ctx) == ["eval", "train"] and {d.name for d in ctx.values()} == {"builtin"}
        assert all(len(d.digest) == 8 for d in ctx.values()) and ctx["train"].digest != ctx["eval"].digest
        digests.add(ctx["train"].digest)
        assert "dataset_input_error" not in c.data.tags
        assert "system/cpu_utilization_percentage" in c.data.metrics  # sampled every 0.5 s
        assert "system/system_memory_usage_megabytes" in c.data.metrics
    assert len(digests) == 1  # both seeds trained on the same cached windows
    got = client.get_run(parent.info.run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in got] == [("builtin", digests.pop())]
    log = (out.parent / "cli.log").read_text()
    link = f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning"
    assert link in log and f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}" in log


def test_cache_built_once_across_seeds(sweep_out):
    out, cache = sweep_out
    _, runs = _runs(out)
    children = [r for r in runs if r.data.tags.get("sae_sweep.kind") == "job"]
    keys = {c.data.tags["cache_key"] for c in children}
    assert len(keys) == 1  # same (model, layer, hook, dataset): one cache
    assert sorted(c.data.tags["cache_built"] for c in children) == ["false", "true"]
    builds = [b for b in read_builds_log(cache) if b["key"] in keys]
    assert len(builds) == 1


def test_second_run_of_the_sweep_trains_nothing(sweep_out):
    out, cache = sweep_out
    _, before = _runs(out)
    r = _cli(out, "-m", "seed=42,49", *SMALL, cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    _, after = _runs(out)
    new_children = [
        r
        for r in after
        if r.data.tags.get("sae_sweep.kind") == "job" and r.info.run_id not in {b.info.run_id for b in before}
    ]
    assert new_children == []
    parents = sorted(
        (r for r in after if r.data.tags.get("sae_sweep.kind") == "sweep"), key=lambda r: r.info.start_time
    )
    assert parents[-1].data.metrics["sweep/skipped"] == 2 and parents[-1].data.metrics["sweep/finished"] == 0


def test_nan_training_ends_run_failed_with_reason(tmp_path):
    out = tmp_path / "out"
    r = _cli(out, *SMALL, "eval=core_only", "trainer.lr=1e30", "trainer.grad_clip=0", "trainer.warmup_steps=0")
    assert r.returncode != 0
    _, runs = _runs(out)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "TrainingFailed" in runs[0].data.tags["error_type"] or "NaN" in runs[0].data.tags["error"]


def test_killed_job_resumes_the_same_run(tmp_path):
    out = tmp_path / "out"
    proc = start_cli_until_checkpoint(
        out, *SMALL, "eval=core_only", "train.tokens=200000", "train.checkpoint_every=5", poll_s=0.5
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, runs = _runs(out)
    assert len(runs) == 1 and runs[0].info.status == "RUNNING"  # a SIGKILL leaves no chance to close it
    killed_id = runs[0].info.run_id

    r = _cli(out, *SMALL, "eval=core_only", "train.tokens=200000", "train.checkpoint_every=5")
    assert r.returncode == 0, r.stderr[-3000:]
    _, runs = _runs(out)
    assert len(runs) == 1 and runs[0].info.run_id == killed_id and runs[0].info.status == "FINISHED"
    assert int(runs[0].data.tags["resumed_from_step"]) > 0
    assert runs[0].data.metrics["train/steps"] == 200


def test_research_trainers_sweep_with_one_published_mode(tmp_path):
    """`-m trainer=a,b,c trainer.mode=published`: the single value applies to each swept trainer."""
    out = tmp_path / "out"
    grid = [
        "-m",
        "trainer=hierarchical,temporal_ortho,adaptive_ortho",
        "trainer.mode=published",
        "dataset=synthetic",
        "dataset.tokens=8192",
        "dataset.eval_tokens=1024",
        "train.tokens=8192",
        "trainer.batch_size=512",
        "sae.d_sae=128",
        "sae.k=4",
        "eval=core_only",
        "sweep.name=modes",
    ]
    r = run_cli(out, *grid)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = store_runs(out, "modes", "job")
    assert sorted(x.data.params["trainer.name"] for x in jobs) == ["adaptive_ortho", "hierarchical", "temporal_ortho"]
    assert all(x.info.status == "FINISHED" and x.data.params["trainer.mode"] == "published" for x in jobs)
