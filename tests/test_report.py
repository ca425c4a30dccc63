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
from sae_sweep.report import build_report, plots, report_hook
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
def test_two_seeds_leave_every_comparison_unresolved(built):
    """Two seeds give no trustworthy interval: no side is better, and the report says how many
    seeds a difference of the size seen would need (the known values differ by a constant per seed,
    so the paired spread is ~0 and the minimum of three suffices)."""
    _, _, _, res = built
    cmp = pd.read_csv(res.csvs["compare_dataset"], keep_default_na=False).set_index("metric")
    ev = cmp.loc[EV]
    assert (ev["a"], ev["b"], ev["cell"]) == ("builtin", "faithful", "tiny/L2.resid_post/topk")
    assert float(ev["mean_diff"]) == pytest.approx(-0.10)
    assert str(ev["paired"]) == "True" and int(ev["n_seeds"]) == 2
    assert (cmp["verdict"] == "unresolved").all() and (cmp["better"] == "").all()
    assert int(ev["seeds_needed"]) == 3
    assert ev["per_seed"] == "42: 0.800 vs 0.900; 49: 0.840 vs 0.940"
    md = res.markdown.read_text()
    findings = md[md.index("## Key findings") : md.index("## Differences not resolved")]
    assert "No resolved difference" in findings and "better on" not in findings
    still_open = md[md.index("## Differences not resolved") : md.index("## Headline metrics")]
    assert (
        "explained variance: a − b = -0.100 [-0.100, -0.100], unresolved, 2 seeds (~3 seeds would resolve" in still_open
    )


@pytest.mark.unit
def test_three_seeds_resolve_known_differences(store):
    tracker, d = store
    parent, _ = make_sweep(tracker, "report_three_seeds", seeds=(42, 49, 51), failed=False)
    res = build_report(tracker, parent, d / "three_seeds", log_to_mlflow=False)
    cmp = pd.read_csv(res.csvs["compare_dataset"], keep_default_na=False).set_index("metric")
    assert (cmp.loc[EV, "verdict"], cmp.loc[EV, "better"]) == ("resolved", "faithful")
    assert float(cmp.loc[EV, "ci_low"]) == pytest.approx(-0.10) == float(cmp.loc[EV, "ci_high"])
    # lower is better for absorption and the fake-feature ratio
    assert cmp.loc[ABS, "better"] == "faithful" and cmp.loc[FAKE, "better"] == "builtin"
    # L0 has no better direction: a resolved difference, no side better
    assert (cmp.loc[L0, "verdict"], cmp.loc[L0, "better"]) == ("resolved", "")
    md = res.markdown.read_text()
    findings = md[md.index("## Key findings") : md.index("## Headline metrics")]
    assert "    - faithful better on explained variance: a − b = -0.100 [-0.100, -0.100]" in findings
    assert "builtin better on fake-feature ratio" in findings and "L0" not in findings


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
        "frontier_tiny_L2_resid_post_builtin",
        "frontier_tiny_L2_resid_post_faithful",
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
    assert len(tracker.list_artifacts(parent, "report/plots")) == 5 + 2 * 2  # frontiers: PNG and SVG


@pytest.mark.unit
def test_two_trainers_pairwise(store):
    tracker, d = store
    parent, _ = make_sweep(tracker, "report_trainers", trainers=("topk", "relu"), failed=False)
    res = build_report(tracker, parent, d / "trainers", log_to_mlflow=False)
    cmp = pd.read_csv(res.csvs["compare_trainer"])
    ev = cmp[cmp["metric"] == EV]
    assert list(ev["cell"]) == ["tiny/L2.resid_post/builtin", "tiny/L2.resid_post/faithful"]  # one per dataset
    assert (ev["a"] == "relu").all() and (ev["b"] == "topk").all()
    assert ev["mean_diff"].to_numpy() == pytest.approx([-0.05, -0.05])
    ds = pd.read_csv(res.csvs["compare_dataset"])
    assert len(ds[ds["metric"] == EV]) == 2  # one cell per trainer


@pytest.mark.unit
def test_frontier_plots_show_every_k(store):
    """3 seeds x 2 k: one frontier per (model, layer, dataset), PNG and SVG, each k a named point."""
    tracker, d = store
    parent, _ = make_sweep(tracker, "report_frontier", seeds=(42, 49, 51), ks=(8, 16), full=False, failed=False)
    res = build_report(tracker, parent, d / "frontier")
    fronts = {n: p for n, p in res.plots.items() if "frontier" in n}
    assert set(fronts) == {"frontier_tiny_L2_resid_post_builtin", "frontier_tiny_L2_resid_post_faithful"}
    for png in fronts.values():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
        svg = png.with_name(png.name.replace(".png", ".svg")).read_text()
        for text in ("k=8", "k=16", "1 − explained variance (centred)", "CE-loss increase", "KL divergence"):
            assert text in svg
    logged = tracker.list_artifacts(parent, "report/plots")
    assert "report/plots/frontier_tiny_L2_resid_post_faithful.svg" in logged
    md = res.markdown.read_text()
    assert "![frontier_tiny_L2_resid_post_builtin](plots/frontier_tiny_L2_resid_post_builtin.png)" in md


@pytest.mark.unit
def test_frontier_values_come_from_the_logged_metrics():
    runs = pd.DataFrame([known_metrics("builtin", 42), known_metrics("faithful", 49, k=16)])
    vals = plots.frontier_values(runs)
    assert vals["l0"].tolist() == pytest.approx([32.0, 2 * 31.0])
    assert vals["unexplained"].tolist() == pytest.approx([0.25, 1 - (0.75 + 0.1 + 0.04 + 0.02)])
    assert vals["ce_increase"].tolist() == pytest.approx([0.2, 0.2 - 0.05 + 0.01 - 0.03])
    assert vals["kl"].tolist() == pytest.approx([0.15, 0.15 - 0.04 + 0.005 - 0.02])


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


@pytest.mark.unit
def test_frontier_draws_one_line_per_width_when_the_sweep_varies_it(tmp_path):
    rows = []
    for width in (512, 1024):
        for k in (8, 16):
            for seed in SEEDS:
                m = known_metrics("builtin", seed, k=k)
                extra = f"expansion_factor={width // 128},k={k}"
                rows.append(
                    {
                        **m,
                        "trainer": "topk",
                        "extra": extra,
                        "variant": f"tiny/builtin/topk [{extra}]",
                        "_params": {"derived.d_sae": str(width)},
                    }
                )
    runs = pd.DataFrame(rows)
    assert plots.frontier_line(runs.iloc[0], width_varies=True) == "topk [d_sae=512]"
    png, svg = plots.frontier(runs, "tiny, widths", tmp_path / "frontier_widths")
    text = svg.read_text()
    assert png.exists() and "topk [d_sae=512]" in text and "topk [d_sae=1024]" in text and "k=16" in text
