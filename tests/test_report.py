"""Sweep report against a real sqlite MLflow store filled through Tracker with known values:
the numbers in the CSVs must be the hand-computed mean/std of the children's metrics."""

import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from helpers.mlflow_store import tracker_at
from helpers.sweeps import ABS, CE, DATASETS, EV, FAKE, KL, L0, L1, SEEDS, SHARED, known_metrics, make_sweep
from sae_sweep.report import build_report, report_hook
from sae_sweep.report.__main__ import main as report_main


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlstore")
    return tracker_at(d), d


@pytest.fixture(scope="module")
def built(store):
    tracker, d = store
    parent, children = make_sweep(tracker, "report_main")
    res = build_report(tracker, parent, d / "sweep" / "report")
    return tracker, parent, children, res


@pytest.mark.unit
def test_summary_numbers_equal_hand_computed(built):
    tracker, parent, children, res = built
    summary = pd.read_csv(res.csvs["summary"])
    assert set(summary["dataset"]) == set(DATASETS)  # the FAILED run is not a variant
    for dataset in DATASETS:
        for key in (EV, KL, CE, L0, L1, ABS, FAKE, SHARED, "sparse_probing/sae/sae_top_5_test_accuracy"):
            vals = [known_metrics(dataset, s)[key] for s in SEEDS]
            row = summary[(summary["dataset"] == dataset) & (summary["metric"] == key)]
            assert len(row) == 1, (dataset, key)
            row = row.iloc[0]
            assert row["n"] == 2
            assert row["mean"] == pytest.approx(statistics.mean(vals), abs=1e-12)
            assert row["std"] == pytest.approx(statistics.stdev(vals), abs=1e-12)
            assert row["min"] == pytest.approx(min(vals)) and row["max"] == pytest.approx(max(vals))
            assert row["seeds"] == "42,49"
    # timings and training curves are not result metrics
    assert not summary["metric"].str.endswith("/seconds").any()
    assert not summary["metric"].str.startswith("train/").any()
    # the values also equal what MLflow holds for the children (read back independently)
    for rid in children:
        r = tracker.get_run(rid)
        row = summary[(summary["dataset"] == r.data.tags["dataset"]) & (summary["metric"] == EV)].iloc[0]
        assert rid in row["run_ids"].split(",")


@pytest.mark.unit
def test_runs_csv_and_failed_runs(built):
    _, _, children, res = built
    runs = pd.read_csv(res.csvs["runs"])
    assert set(runs.loc[runs["status"] == "FINISHED", "run_id"]) == set(children)
    bad = runs[runs["status"] == "FAILED"]
    assert len(bad) == 1 and "boom" in bad.iloc[0]["error"]
    md = res.markdown.read_text()
    assert "Runs not included" in md and "boom" in md


@pytest.mark.unit
def test_dataset_comparison_wins_and_direction(built):
    _, _, _, res = built
    cmp = pd.read_csv(res.csvs["compare_dataset"])
    cmp = cmp[cmp["scope"] == "all models"].set_index("metric")
    ev = cmp.loc[EV]
    assert (ev["a"], ev["b"]) == ("builtin", "faithful")
    mean_b = statistics.mean(known_metrics("builtin", s)[EV] for s in SEEDS)
    mean_f = statistics.mean(known_metrics("faithful", s)[EV] for s in SEEDS)
    assert ev["mean_diff"] == pytest.approx(mean_b - mean_f)
    assert (ev["wins_a"], ev["wins_b"], ev["better"]) == (0, 1, "faithful")
    # lower is better for absorption and the fake-feature ratio
    assert cmp.loc[ABS, "better"] == "faithful" and cmp.loc[ABS, "wins_b"] == 1
    assert cmp.loc[FAKE, "better"] == "builtin"
    assert cmp.loc[SHARED, "better"] == "faithful"
    # L0 has no better direction: a difference, no wins
    assert pd.isna(cmp.loc[L0, "wins_a"]) and cmp.loc[L0, "mean_diff"] == pytest.approx(-1.0)
    md = res.markdown.read_text()
    line = next(ln for ln in md.splitlines() if "**builtin vs faithful**" in ln)
    assert "faithful better on explained variance (1/1)" in line and "shared-feature ratio (1/1)" in line
    assert "builtin better on fake-feature ratio (1/1)" in line


@pytest.mark.unit
def test_shared_features_table(built):
    _, _, _, res = built
    sh = pd.read_csv(res.csvs["shared_features"]).set_index("dataset")
    assert sh.loc["builtin", "shared_feature_ratio_mean"] == pytest.approx(0.40)
    assert sh.loc["faithful", "shared_feature_ratio_mean"] == pytest.approx(0.70)
    assert sh.loc["faithful", "n_pairs"] == 1 and sh.loc["faithful", "source"] == "parent pairs"


@pytest.mark.unit
def test_report_files_plots_and_parent_artifacts(built):
    tracker, parent, _, res = built
    assert set(res.plots) == {
        "metrics_grid",
        "absorption_per_letter",
        "probing_vs_k",
        "shared_features",
        "training_curves",
    }, res.skipped_plots
    for p in res.plots.values():
        assert p.exists() and p.stat().st_size > 5000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = res.markdown.read_text()
    for section in (
        "## Headline metrics per variant",
        "## Cross-seed shared-feature ratio",
        "## Dataset comparison",
        "## Trainer comparison",
        "## Per-model breakdown",
        "## Plots",
        "![",
        "## Key findings",
    ):
        assert section in md
    assert "0.820 ± 0.028" in md  # builtin EV: mean 0.82, std 0.04/sqrt(2)
    logged = tracker.list_artifacts(parent, "report")
    for name in (
        "report/report.md",
        "report/summary.csv",
        "report/runs.csv",
        "report/compare_dataset.csv",
        "report/shared_features.csv",
        "report/run_ids.json",
        "report/plots",
    ):
        assert name in logged
    assert len(tracker.list_artifacts(parent, "report/plots")) == 5


@pytest.mark.unit
def test_two_trainers_pairwise(store):
    tracker, d = store
    parent, _ = make_sweep(tracker, "report_trainers", trainers=("topk", "relu"), failed=False)
    res = build_report(tracker, parent, d / "trainers", log_to_mlflow=False)
    cmp = pd.read_csv(res.csvs["compare_trainer"])
    ev = cmp[(cmp["scope"] == "all models") & (cmp["metric"] == EV)].iloc[0]
    assert (ev["a"], ev["b"], ev["n_cells"]) == ("relu", "topk", 2)  # one cell per dataset
    assert ev["mean_diff"] == pytest.approx(-0.05) and (ev["wins_a"], ev["wins_b"]) == (0, 2)
    ds = pd.read_csv(res.csvs["compare_dataset"])
    assert ds[(ds["scope"] == "all models") & (ds["metric"] == EV)].iloc[0]["n_cells"] == 2


@pytest.mark.unit
def test_absent_metrics_skip_plots_with_notes(store):
    tracker, d = store
    parent, _ = make_sweep(tracker, "report_core_only", full=False, failed=False)
    res = build_report(tracker, parent, d / "core_only")
    assert {"metrics_grid", "training_curves"} <= set(res.plots)
    assert {"absorption_per_letter", "probing_vs_k", "shared_features"} <= set(res.skipped_plots)
    md = res.markdown.read_text()
    assert md.count("_skipped:") == 3 and "evals/absorption_first_letter.json" in md
    assert "no cross-seed metrics" in md


@pytest.mark.unit
def test_hook_never_raises_and_uses_results(store, tmp_path):
    tracker, _ = store
    assert report_hook(tracker, "0" * 32, [], [], tmp_path) is None  # unknown parent: logged, not raised
    # A re-run whose points were all skipped: its children hang under the first parent.
    first, children = make_sweep(tracker, "report_rerun", full=False, failed=False)
    second = tracker.start_parent("report_rerun", "sweep-rerun", {})
    results = [{"status": "skipped", "run_id": c, "run_key": "k"} for c in children]
    res = report_hook(tracker, second, [], results, tmp_path / "rerun")
    assert res is not None
    runs = pd.read_csv(res.csvs["runs"])
    assert set(runs["run_id"]) == set(children)
    # a later CLI rebuild of the second sweep still finds them (run_ids.json logged to the parent)
    res2 = build_report(tracker, second, tmp_path / "rebuild", log_to_mlflow=False)
    assert set(pd.read_csv(res2.csvs["runs"])["run_id"]) == set(children)


@pytest.mark.unit
def test_cli_targets(store, tmp_path, capsys):
    tracker, d = store
    parent, _ = make_sweep(tracker, "report_cli", full=False, failed=False)
    # sweep directory: the store comes from multirun.yaml
    sweep = tmp_path / "sweeps" / "report_cli" / "2026-01-01_00-00-00"
    sweep.mkdir(parents=True)
    (sweep / "parent_run_id").write_text(parent)
    (sweep / "multirun.yaml").write_text(f"tracking:\n  uri: {tracker.uri}\npaths:\n  output_dir: {tmp_path}\n")
    assert report_main([str(sweep), "--no-log"]) == 0
    assert (sweep / "report" / "report.md").exists()
    # experiment name -> its latest sweep; run id; both with --tracking-uri and --out
    assert report_main(["report_cli", "--tracking-uri", tracker.uri, "--out", str(tmp_path / "by_name")]) == 0
    assert parent in (tmp_path / "by_name" / "report.md").read_text()
    assert report_main([parent, "--tracking-uri", tracker.uri, "--out", str(tmp_path / "by_id"), "--no-log"]) == 0
    assert report_main(["no_such_experiment", "--tracking-uri", tracker.uri]) == 2
    assert "neither a directory" in capsys.readouterr().err


@pytest.mark.integration
def test_cli_module_entry_point(store, tmp_path):
    tracker, _ = store
    parent, _ = make_sweep(tracker, "report_subprocess", full=False, failed=False)
    out = subprocess.run(
        [sys.executable, "-m", "sae_sweep.report", parent, "--tracking-uri", tracker.uri, "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr
    assert "report:" in out.stdout and (tmp_path / "r" / "summary.csv").exists()
    assert "report/report.md" in tracker.list_artifacts(parent, "report")


@pytest.mark.unit
def test_an_interrupted_sweep_gets_a_report_that_says_it_is_partial(store):
    tracker, d = store
    parent, _ = make_sweep(tracker, "report_interrupted", full=False, failed=False)
    tracker.set_tags(parent, {"sweep.interrupted": "SystemExit with 2 of 6 points unfinished"})
    md = build_report(tracker, parent, d / "interrupted", log_to_mlflow=False).markdown.read_text()
    assert "Partial report: the sweep was interrupted (SystemExit with 2 of 6 points unfinished)" in md
    whole = build_report(
        tracker, make_sweep(tracker, "report_whole", full=False, failed=False)[0], d / "whole", log_to_mlflow=False
    ).markdown.read_text()
    assert "Partial report" not in whole
