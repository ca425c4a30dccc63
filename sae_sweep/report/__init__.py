"""Sweep report: the answer to a sweep's question in one place, as tables and pictures.

``build_report(tracker, parent_run_id, out_dir)`` reads the sweep's runs from MLflow (through
``Tracker`` only), writes into ``out_dir``

    report.md              the report (sections below), plots embedded
    summary.csv            every result metric per variant: n, mean, std (ddof=1), min, max, seeds
    runs.csv               one row per run: grid tags, status and every result metric
    compare_dataset.csv    pairwise dataset comparison per cell: a - b, 95 % interval over seeds,
                           verdict, seeds needed, per-seed values (``uncertainty``)
    compare_trainer.csv    pairwise trainer comparison, the same columns
    shared_features.csv    cross-seed shared-feature ratio per seed group
    run_ids.json           the runs the report covers (a re-run's skipped points included)
    plots/*.png            metrics_grid, absorption_per_letter, probing_vs_k, shared_features,
                           training_curves (each skipped with a note when its data is absent)
    plots/frontier_*.png   the sparsity–fidelity frontier per (model, layer, hook, dataset), and .svg

and logs the folder to the parent run as artifacts under ``report/``. ``report_hook`` is the
sweep-end hook form (``SWEEP_END_HOOKS``); it never raises. CLI: ``python -m sae_sweep.report``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import pandas as pd

from sae_sweep.report import plots, tables, uncertainty
from sae_sweep.report.data import SweepData, collect, eval_metric_keys, headline_specs, spec_for
from sae_sweep.report.metrics import lookup

log = logging.getLogger("sae_sweep.report")

__all__ = ["build_report", "report_hook", "ReportResult"]

ABSORPTION_ARTIFACT = "evals/absorption_first_letter.json"
# Files this module writes; only these are replaced when a report is rebuilt in the same folder.
_OUTPUTS = (
    "report.md",
    "summary.csv",
    "runs.csv",
    "compare_dataset.csv",
    "compare_trainer.csv",
    "shared_features.csv",
    "run_ids.json",
)


@dataclass
class ReportResult:
    out_dir: Path
    markdown: Path
    csvs: Dict[str, Path]
    plots: Dict[str, Path]
    skipped_plots: Dict[str, str] = field(default_factory=dict)
    logged: bool = False


def report_hook(
    tracker: Any, parent_run_id: str, points: Sequence[Any], results: Sequence[Any], sweep_dir: Any
) -> Optional[ReportResult]:
    """Sweep-end hook: write the report into ``<sweep_dir>/report`` and log it to the parent run.
    Register it after the cross-seed hook, so its metrics are in the report. Never raises."""
    try:
        ids = [r["run_id"] for r in results or () if isinstance(r, dict) and r.get("run_id")]
        res = build_report(tracker, parent_run_id, Path(sweep_dir) / "report", extra_run_ids=ids)
        log.info(
            "sweep report: %s (logged to run %s under report/: %s)",
            res.markdown,
            parent_run_id,
            tracker.ui_link(parent_run_id, "artifacts"),
        )
        return res
    except Exception as e:  # the report must never turn a finished sweep into a failed one
        log.exception("sweep report failed: %s", e)
        return None


def build_report(
    tracker: Any, parent_run_id: str, out_dir: Path, *, extra_run_ids: Iterable[str] = (), log_to_mlflow: bool = True
) -> ReportResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir)
    extra = list(extra_run_ids) + _previous_run_ids(tracker, parent_run_id)
    data = collect(tracker, parent_run_id, extra)
    runs = data.finished
    variants = list(dict.fromkeys(runs["variant"])) if not runs.empty else []
    keys = eval_metric_keys(data.metric_keys)
    specs = headline_specs(keys)

    stats = tables.variant_stats(runs, keys)
    if not stats.empty:
        stats.insert(stats.columns.get_loc("metric") + 1, "headline", stats["metric"].isin({s.key for s in specs}))
    shared = tables.shared_features(runs, data.parent_metrics)
    comparisons = {f: tables.pairwise(runs, f, specs) for f in ("dataset", "trainer")}

    csvs = {
        "summary": _write_csv(stats, out_dir / "summary.csv"),
        "runs": _write_csv(_runs_csv(data.runs, keys), out_dir / "runs.csv"),
        "compare_dataset": _write_csv(comparisons["dataset"], out_dir / "compare_dataset.csv"),
        "compare_trainer": _write_csv(comparisons["trainer"], out_dir / "compare_trainer.csv"),
        "shared_features": _write_csv(shared, out_dir / "shared_features.csv"),
    }
    (out_dir / "run_ids.json").write_text(
        json.dumps(sorted(data.runs["run_id"]) if not data.runs.empty else [], indent=1)
    )

    made, skipped = _make_plots(tracker, runs, variants, shared, out_dir / "plots")
    md = _markdown(
        data,
        runs,
        variants,
        specs,
        stats,
        shared,
        comparisons,
        made,
        skipped,
        out_dir,
        ui=tracker.ui_link(parent_run_id),
    )
    md += _browser_link(tracker, parent_run_id)
    (out_dir / "report.md").write_text(md)
    result = ReportResult(out_dir, out_dir / "report.md", csvs, made, skipped)
    if log_to_mlflow:
        tracker.log_artifact_dir(parent_run_id, out_dir, "report")
        result.logged = True
    return result


def _browser_link(tracker: Any, parent_run_id: str) -> str:
    """A section linking the cross-seed feature browser when the sweep has one (the browser hook runs
    before this one); the link is relative: report/ and crossseed/ are siblings on disk and in MLflow."""
    from sae_sweep.report.crossseed_browser import BROWSER_ARTIFACT

    if BROWSER_ARTIFACT not in tracker.list_artifacts(parent_run_id, "crossseed"):
        return ""
    return (
        "\n## Cross-seed feature browser\n\n"
        f"Matched, unmatched and fake latents of each seed group with their contexts: [{BROWSER_ARTIFACT}]"
        f"(../{BROWSER_ARTIFACT}) (artifacts of the sweep's run: {tracker.ui_link(parent_run_id, 'artifacts')}).\n"
    )


def _clear_previous(out_dir: Path) -> None:
    for name in _OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)
    for pattern in ("*.png", "*.svg"):
        for old in (out_dir / "plots").glob(pattern):
            old.unlink()


def _previous_run_ids(tracker: Any, parent_run_id: str) -> List[str]:
    """Run ids an earlier report of this parent covered (the hook knows the skipped points; a later
    CLI rebuild learns them from here)."""
    try:
        if "report/run_ids.json" not in tracker.list_artifacts(parent_run_id, "report"):
            return []
        with tempfile.TemporaryDirectory() as d:
            p = tracker.download(parent_run_id, "report/run_ids.json", Path(d))
            return list(json.loads(Path(p).read_text()))
    except Exception as e:
        log.debug("no previous run list for %s: %s", parent_run_id, e)
        return []


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path


def _runs_csv(runs: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    meta = [
        "run_id",
        "run_name",
        "status",
        "variant",
        "model",
        "layer",
        "hook",
        "dataset",
        "trainer",
        "seed",
        "seed_group",
        "error",
    ]
    return runs[[c for c in meta if c in runs] + [k for k in keys if k in runs]]


def _absorption_letters(tracker: Any, runs: pd.DataFrame) -> Dict[str, Dict[str, List[float]]]:
    """variant -> letter -> per-seed absorption fraction, from each run's SAEBench-schema JSON."""
    out: Dict[str, Dict[str, List[float]]] = {}
    with tempfile.TemporaryDirectory() as d:
        for r in runs.itertuples():
            try:
                if ABSORPTION_ARTIFACT not in tracker.list_artifacts(r.run_id, "evals"):
                    continue
                path = tracker.download(r.run_id, ABSORPTION_ARTIFACT, Path(d) / r.run_id)
                doc = json.loads(Path(path).read_text())
            except Exception as e:
                log.warning("report: absorption details of run %s unreadable: %s", r.run_id, e)
                continue
            for row in doc.get("eval_result_details") or []:
                letter, v = row.get("first_letter"), row.get("mean_absorption_fraction")
                if letter is not None and isinstance(v, (int, float)) and math.isfinite(v):
                    out.setdefault(r.variant, {}).setdefault(letter, []).append(float(v))
    return out


def _histories(tracker: Any, runs: pd.DataFrame) -> Dict[str, Dict[str, list]]:
    keys = [c for c in runs.columns if isinstance(c, str) and c.startswith("train/") and runs[c].notna().any()]
    chosen = [k for k in plots.CURVE_PREFERENCE if k in keys] or sorted(keys)
    out: Dict[str, Dict[str, list]] = {}
    for r in runs.itertuples():
        out[r.run_id] = {k: tracker.metric_history(r.run_id, k) for k in chosen[:4] if not pd.isna(runs.at[r.Index, k])}
    return out


def _make_plots(tracker: Any, runs: pd.DataFrame, variants: List[str], shared: pd.DataFrame, plot_dir: Path):
    colors = plots.variant_colors(variants)
    made: Dict[str, Path] = {}
    skipped: Dict[str, str] = {}
    jobs = {
        "metrics_grid": lambda p: plots.metrics_grid(runs, variants, colors, p),
        "absorption_per_letter": lambda p: plots.absorption_per_letter(
            _absorption_letters(tracker, runs), variants, colors, p
        ),
        "probing_vs_k": lambda p: plots.probing_vs_k(runs, variants, colors, p),
        "shared_features": lambda p: plots.shared_features(shared, variants, colors, p),
        "training_curves": lambda p: plots.training_curves(_histories(tracker, runs), runs, colors, p),
    }
    for name, make in jobs.items():
        if runs.empty:
            skipped[name] = "no FINISHED runs"
            continue
        try:
            made[name] = make(plot_dir / f"{name}.png")
        except plots.NoData as e:
            skipped[name] = str(e)
        except Exception as e:  # one broken figure must not cost the rest of the report
            log.exception("report: plot %s failed", name)
            skipped[name] = f"failed: {type(e).__name__}: {e}"
    if runs.empty:
        skipped["frontier"] = "no FINISHED runs"
    for (model, layer, hook, dataset), sub in [] if runs.empty else runs.groupby(list(FRONTIER_GROUP), sort=False):
        name = "frontier_" + re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{model}_L{layer}_{hook}_{dataset}")
        try:
            png, _svg = plots.frontier(sub, f"{model}, layer {layer} ({hook}), {dataset}", plot_dir / name)
            made[name] = png
        except plots.NoData as e:
            skipped[name] = str(e)
        except Exception as e:
            log.exception("report: plot %s failed", name)
            skipped[name] = f"failed: {type(e).__name__}: {e}"
    return made, skipped


# One frontier figure per (model, layer, hook, dataset): the trainers and k values are its lines.
FRONTIER_GROUP = ("model", "layer", "hook", "dataset")
PLOT_TITLES = {
    "metrics_grid": "Core metrics (explained variance, KL score, L0, L1) per variant",
    "absorption_per_letter": "Absorption per first letter",
    "probing_vs_k": "Sparse-probing accuracy vs k (LM and SAE)",
    "shared_features": "Cross-seed shared-feature ratio per dataset",
    "training_curves": "Training curves",
}


def _findings(comparisons: Dict[str, pd.DataFrame]) -> tuple:
    """Markdown bullets: (resolved differences, each with its interval; per pair, the differences
    that stayed open: too few seeds, or an interval that covers zero, with what would resolve them).
    Only metrics with a better direction are findings."""
    resolved: List[str] = []
    still_open: List[str] = []
    for factor, cmp in comparisons.items():
        scored = cmp[cmp["direction"] != 0] if not cmp.empty else cmp
        for (a, b, cell), pair in scored.groupby(["a", "b", "cell"], sort=False):
            head = f"- **{a} vs {b}** ({factor}s; {cell}; {int(pair['n_seeds'].max())} seeds):"
            won = pair[pair["better"] != ""]
            if not won.empty:
                resolved.append(head)
                resolved += [
                    f"    - {r.better} better on {r.label}: a − b = {tables.diff_text(r)}" for r in won.itertuples()
                ]
            rest = pair[pair["better"] == ""]
            if not rest.empty:
                still_open.append(head)
                still_open += [
                    f"    - {r.label}: a − b = {tables.diff_text(r)}, {tables.verdict_text(r)}"
                    for r in rest.itertuples()
                ]
    return resolved, still_open


STATISTIC_NOTE = (
    "Differences are a − b with a 95 % paired t interval over the seeds both sides ran (Welch's interval "
    f"when the seeds differ); a difference is resolved when the interval excludes zero with at least "
    f'{uncertainty.MIN_SEEDS} seeds. "~N seeds" is the smallest seed count whose interval would exclude zero '
    "if the mean difference and its spread stayed as observed."
)


def _markdown(
    data: SweepData,
    runs: pd.DataFrame,
    variants: List[str],
    specs,
    stats: pd.DataFrame,
    shared: pd.DataFrame,
    comparisons: Dict[str, pd.DataFrame],
    made: Dict[str, Path],
    skipped: Dict[str, str],
    out_dir: Path,
    ui: str = "",
) -> str:
    t = data.parent_tags
    all_runs = data.runs
    counts = all_runs["status"].value_counts().to_dict() if not all_runs.empty else {}
    L: List[str] = [f"# Sweep report: {data.experiment} / {data.parent_name}", ""]
    if t.get("sweep.interrupted"):
        L += [
            f"**Partial report: the sweep was interrupted ({t['sweep.interrupted']}).** Its numbers cover "
            "only the runs that ended before that; run the same command again to finish the sweep.",
            "",
        ]
    L += [
        line
        for line in [
            f"- parent run: `{data.parent_run_id}` (experiment `{data.experiment}`)",
            (f"- MLflow UI: <{ui}>" if ui.startswith("http") else f"- MLflow UI: {ui}") if ui else "",
            f"- overrides: `{t.get('overrides', '')}`" if t.get("overrides") else "",
            f"- sweep directory: `{t.get('sweep_dir', '')}`" if t.get("sweep_dir") else "",
            "- runs: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"),
        ]
        if line
    ]
    if not runs.empty:
        for col in ("model", "dataset", "trainer", "layer", "hook", "seed"):
            L.append(f"- {col}: " + ", ".join(str(v) for v in dict.fromkeys(runs[col])))
    L += [
        "",
        "Values are the mean ± sample standard deviation (ddof=1) over seeds of FINISHED runs; "
        "↑ higher is better, ↓ lower is better. Full precision in the CSV files next to this report.",
        "",
    ]

    resolved, still_open = _findings(comparisons)
    if resolved or still_open:
        L += ["## Key findings", ""]
        L += resolved or ["_No resolved difference: no comparison's 95 % interval over seeds excludes zero._"]
        L += ["", STATISTIC_NOTE, ""]
    if still_open:
        L += ["## Differences not resolved", ""]
        L += [
            "Inside the seed spread, or measured on fewer than "
            f"{uncertainty.MIN_SEEDS} seeds: not a win for either side. a − b with its 95 % interval.",
            "",
            *still_open,
            "",
        ]

    L += ["## Headline metrics per variant", ""]
    L += [tables.variant_table(stats, specs, runs) if specs else "_no result metrics logged yet_", ""]
    units = "; ".join(f"{s.label}: {s.unit}" for s in specs if s.unit)
    if units:
        L += [f"Units: {units}.", ""]

    L += ["## Cross-seed shared-feature ratio per seed group", ""]
    if shared.empty:
        L += [
            "_no cross-seed metrics: each seed group needs two FINISHED seeds, and the cross-seed hook must run "
            "before the report_",
            "",
        ]
    else:
        rows = [
            [
                r.variant,
                r.seed_group[:8],
                "—" if pd.isna(r.n_pairs) else int(r.n_pairs),
                tables.mean_std(r.shared_feature_ratio_mean, r.shared_feature_ratio_std),
                r.pairs or r.source,
            ]
            for r in shared.itertuples()
        ]
        shared_spec = spec_for("crossseed/shared_feature_ratio")
        header = f"{shared_spec.label}{tables.arrow(shared_spec.direction)}"
        L += [tables.md_table(["variant", "seed group", "pairs", header, "per pair"], rows), ""]

    for factor in ("dataset", "trainer"):
        L += [f"## {factor.capitalize()} comparison (pairwise, per matching cell)", ""]
        cmp = comparisons[factor]
        if cmp.empty:
            n = runs[factor].nunique() if not runs.empty else 0
            L += [f"_only {n} {factor}{'s' if n != 1 else ''} with finished runs: nothing to compare_", ""]
            continue
        L += [
            f"A cell is the runs that match on every other grid coordinate (model, layer, hook, "
            f"{'trainer' if factor == 'dataset' else 'dataset'}, swept params). a − b over seeds with its "
            '95 % interval; "better" only where the difference is resolved.',
            "",
        ]
        L += [tables.pairwise_table(cmp), ""]

    L += ["## Per-model breakdown", ""]
    if runs.empty:
        L += ["_no finished runs_", ""]
    for model, sub in runs.groupby("model", sort=False):
        L += [f"### {model}", ""]
        vs = list(dict.fromkeys(sub["variant"]))
        L += [tables.variant_table(stats[stats["model"] == model], specs, sub, vs), ""]

    L += ["## Plots", ""]
    L += ["### Sparsity–fidelity frontier", ""]
    fronts = [n for n in [*made, *skipped] if n.startswith("frontier")]
    L += [
        "L0 against 1 − centred explained variance, CE-loss increase and KL, per (model, layer, dataset); "
        "small points are seeds, large markers their mean, one line per trainer (SVG beside each PNG).",
        "",
    ]
    for n in fronts:
        if n in made:
            L += [f"![{n}]({made[n].relative_to(out_dir).as_posix()})", ""]
        else:
            L += [f"_{n} skipped: {skipped[n]}_", ""]
    for name, title in PLOT_TITLES.items():
        L += [f"### {title}", ""]
        if name in made:
            L += [f"![{title}]({made[name].relative_to(out_dir).as_posix()})", ""]
        else:
            L += [f"_skipped: {skipped.get(name, 'not made')}_", ""]

    bad = data.not_finished
    if not bad.empty:
        L += ["## Runs not included (not FINISHED)", ""]
        L += [
            tables.md_table(
                ["run", "status", "variant", "seed", "error"],
                [[r.run_name, r.status, r.variant, r.seed, (r.error or "")[:200]] for r in bad.itertuples()],
            ),
            "",
        ]

    if specs:  # what the headline numbers are, from the declarations beside the code that logs them
        L += [
            "## Metric definitions",
            "",
            "The headline metrics as their evals declare them (every declared metric: the project's docs/metrics.md).",
            "",
        ]
        rows = []
        for s in specs:
            m = lookup(s.key)
            rows.append(
                [
                    s.label,
                    f"`{s.key}`",
                    {1: "higher", -1: "lower"}.get(s.direction, "—"),
                    s.unit,
                    m.meaning if m else "",
                    m.reference if m else "",
                ]
            )
        L += [tables.md_table(["metric", "key", "better", "unit", "meaning", "reference"], rows), ""]

    L += [
        "## Files",
        "",
        "- `summary.csv`: every result metric per variant (n, mean, std, min, max, seeds, run ids)",
        "- `runs.csv`: one row per run with every result metric",
        "- `compare_dataset.csv`, `compare_trainer.csv`: pairwise comparisons per cell (difference, 95 % interval, "
        "verdict, seeds needed, per-seed values)",
        "- `shared_features.csv`: cross-seed shared-feature ratio per seed group",
        "",
    ]
    prefixes = sorted({k.split("/", 1)[0] for k in stats["metric"]}) if not stats.empty else []
    if prefixes:
        L += ["Result metric families found: " + ", ".join(f"`{p}/…`" for p in prefixes) + ".", ""]
    return "\n".join(L)
