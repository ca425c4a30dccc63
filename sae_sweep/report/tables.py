"""The report's numbers: per-variant statistics over seeds, pairwise comparisons, shared features.

All functions take the runs table of ``data.collect`` (FINISHED runs only) and return pandas
DataFrames that are written as CSV unchanged and rendered as Markdown here.
Standard deviations are sample standard deviations (ddof=1) over seeds; NaN with a single seed.
Comparisons carry their uncertainty over seeds (``uncertainty``: the statistic, written once).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from sae_sweep.report import uncertainty
from sae_sweep.report.data import GROUP_COLS, MetricSpec, spec_for

VARIANT_COLS = ("variant", *GROUP_COLS)


def _seed_list(sub: pd.DataFrame) -> str:
    return ",".join(str(s) for s in sub["seed"])


def variant_stats(runs: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Long table: one row per (variant, metric) with n, mean, std, min, max over seeds.

    Runs missing a metric (an eval that was off or skipped) are left out of that metric's n."""
    rows = []
    if runs.empty:
        return pd.DataFrame(
            columns=[
                *VARIANT_COLS,
                "metric",
                "label",
                "direction",
                "unit",
                "n",
                "mean",
                "std",
                "min",
                "max",
                "seeds",
                "run_ids",
            ]
        )
    for vals, sub in runs.groupby(list(VARIANT_COLS), sort=False, dropna=False):
        ident = dict(zip(VARIANT_COLS, vals))
        for key in keys:
            if key not in sub:
                continue
            have = sub[sub[key].notna()]
            if have.empty:
                continue
            x = have[key].astype(float).to_numpy()
            spec = spec_for(key)
            rows.append(
                {
                    **ident,
                    "metric": key,
                    "label": spec.label,
                    "direction": spec.direction,
                    "unit": spec.unit,
                    "n": len(x),
                    "mean": float(x.mean()),
                    "std": float(x.std(ddof=1)) if len(x) > 1 else math.nan,
                    "min": float(x.min()),
                    "max": float(x.max()),
                    "seeds": _seed_list(have),
                    "run_ids": ",".join(have["run_id"]),
                }
            )
    return pd.DataFrame(rows)


COMPARE_COLS = (
    "factor",
    "a",
    "b",
    "cell",
    "model",
    "metric",
    "label",
    "direction",
    "n_seeds",
    "paired",
    "mean_diff",
    "ci_low",
    "ci_high",
    "sd",
    "verdict",
    "better",
    "seeds_needed",
    "per_seed",
)
_CELL_COLS = ("model", "layer", "hook", "dataset", "trainer", "extra")


def _cell_label(row: Dict[str, object], factor: str) -> str:
    other = "trainer" if factor == "dataset" else "dataset"
    parts = [str(row["model"]), f"L{row['layer']}.{row['hook']}", str(row[other])]
    return "/".join(parts) + (f" [{row['extra']}]" if row.get("extra") else "")


def pairwise(runs: pd.DataFrame, factor: str, specs: Sequence[MetricSpec]) -> pd.DataFrame:
    """Every level of ``factor`` (dataset or trainer) against every other, cell by cell.

    A cell is the runs that match on every other grid coordinate (model, layer, hook, the other
    factor, swept params). Per cell and metric: a - b over seeds with its 95 % interval and verdict
    (``uncertainty.compare``: paired over shared seeds, Welch otherwise), the side that is better
    when the difference is resolved and the metric has a direction, the seeds a difference of the
    size seen would need, and the per-seed values."""
    if runs.empty or factor not in runs or runs[factor].nunique() < 2:
        return pd.DataFrame(columns=list(COMPARE_COLS))
    match_cols = [c for c in _CELL_COLS if c != factor]
    rows = []
    levels = sorted(runs[factor].unique(), key=str)
    for cell_vals, cell in runs.groupby(match_cols, sort=False, dropna=False):
        ident = dict(zip(match_cols, cell_vals))
        for a, b in itertools.combinations(levels, 2):
            side_a, side_b = cell[cell[factor] == a], cell[cell[factor] == b]
            if side_a.empty or side_b.empty:
                continue
            for spec in specs:
                if spec.key not in cell:
                    continue
                va, vb = _per_seed(side_a, spec.key), _per_seed(side_b, spec.key)
                if not va or not vb:
                    continue
                d = uncertainty.compare(va, vb)
                better = ""
                if d.verdict == uncertainty.RESOLVED and spec.direction:
                    better = a if d.mean_diff * spec.direction > 0 else b
                rows.append(
                    {
                        "factor": factor,
                        "a": a,
                        "b": b,
                        "cell": _cell_label({**ident, factor: ""}, factor),
                        "model": ident["model"],
                        "metric": spec.key,
                        "label": spec.label,
                        "direction": spec.direction,
                        "n_seeds": d.n,
                        "paired": d.paired,
                        "mean_diff": d.mean_diff,
                        "ci_low": d.low,
                        "ci_high": d.high,
                        "sd": d.sd,
                        "verdict": d.verdict,
                        "better": better,
                        "seeds_needed": d.seeds_needed,
                        "per_seed": uncertainty.per_seed_text(va, vb, fmt),
                    }
                )
    df = pd.DataFrame(rows, columns=list(COMPARE_COLS))
    df["seeds_needed"] = df["seeds_needed"].astype("Int64")
    return df


def _per_seed(side: pd.DataFrame, key: str) -> Dict[object, float]:
    have = side[side[key].notna()]
    return {s: float(v) for s, v in zip(have["seed"], have[key])}


_PAIR = re.compile(r"crossseed/(?P<g>[^/]+)/seed_(?P<a>[^/]+)_vs_(?P<b>[^/]+)/(?P<m>[^/]+)")


def shared_features(runs: pd.DataFrame, parent_metrics: Dict[str, float]) -> pd.DataFrame:
    """Shared-feature ratio of each seed group (FaithfulSAE's cross-seed reproducibility).

    From the parent's per-pair metrics ``crossseed/<group[:8]>/seed_<a>_vs_<b>/<metric>`` (the
    cross-seed sweep-end hook) when present, else from each run's ``crossseed/shared_feature_ratio``."""
    cols = [
        "variant",
        "model",
        "layer",
        "hook",
        "dataset",
        "trainer",
        "seed_group",
        "n_pairs",
        "shared_feature_ratio_mean",
        "shared_feature_ratio_std",
        "pairs",
        "source",
    ]
    pairs: Dict[str, List[tuple]] = {}
    for key, v in parent_metrics.items():
        m = _PAIR.fullmatch(key)
        if m and m["m"] == "shared_feature_ratio":
            pairs.setdefault(m["g"], []).append((m["a"], m["b"], float(v)))
    rows = []
    if runs.empty:
        return pd.DataFrame(columns=cols)
    for vals, sub in runs.groupby(
        ["variant", "model", "layer", "hook", "dataset", "trainer", "seed_group"], sort=False
    ):
        ident = dict(zip(["variant", "model", "layer", "hook", "dataset", "trainer", "seed_group"], vals))
        got = pairs.get(str(ident["seed_group"])[:8])
        if got:
            x = np.array([p[2] for p in got])
            src = "parent pairs"
            desc = "; ".join(f"{a} vs {b}: {v:.3f}" for a, b, v in sorted(got))
        elif "crossseed/shared_feature_ratio" in sub and sub["crossseed/shared_feature_ratio"].notna().any():
            # each run's value is its mean over the pairs it is in; their mean is the group mean
            x = sub["crossseed/shared_feature_ratio"].dropna().to_numpy(dtype=float)
            src, desc = "child runs", ""
        else:
            continue
        rows.append(
            {
                **ident,
                "n_pairs": len(got) if got else math.nan,
                "shared_feature_ratio_mean": float(x.mean()),
                "shared_feature_ratio_std": float(x.std(ddof=1)) if len(x) > 1 else math.nan,
                "pairs": desc,
                "source": src,
            }
        )
    return pd.DataFrame(rows, columns=cols)


# Markdown rendering


def fmt(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    x = float(x)
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.3g}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    if abs(x) >= 10:
        return f"{x:.2f}"
    return f"{x:.3f}"


def mean_std(mean: float, std: float) -> str:
    return fmt(mean) if not (isinstance(std, float) and math.isfinite(std)) else f"{fmt(mean)} ± {fmt(std)}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def arrow(direction: int) -> str:
    return {1: " ↑", -1: " ↓"}.get(direction, "")


def variant_table(
    stats: pd.DataFrame, specs: Sequence[MetricSpec], runs: pd.DataFrame, variants: Optional[Sequence[str]] = None
) -> str:
    """Markdown: one row per variant, one ``mean ± std`` column per headline metric."""
    if stats.empty or not specs:
        return "_no finished runs with these metrics_"
    order = list(dict.fromkeys(runs["variant"])) if variants is None else list(variants)
    by = {(r.variant, r.metric): r for r in stats.itertuples()}
    header = ["variant", "seeds", *[f"{s.label}{arrow(s.direction)}" for s in specs]]
    rows = []
    for v in order:
        seeds = ",".join(str(s) for s in runs.loc[runs["variant"] == v, "seed"])
        cells = []
        for s in specs:
            r = by.get((v, s.key))
            cells.append(mean_std(r.mean, r.std) if r is not None else "—")
        rows.append([v, seeds, *cells])
    return md_table(header, rows)


def row_difference(r) -> uncertainty.Difference:
    """A comparison row (CSV or DataFrame) back as the ``Difference`` it was written from."""
    seeds = None if pd.isna(r.seeds_needed) else int(r.seeds_needed)
    return uncertainty.Difference(r.mean_diff, r.ci_low, r.ci_high, r.paired, r.n_seeds, r.sd, r.verdict, seeds)


def verdict_text(r) -> str:
    """A comparison row's verdict in words: who is better, or why nobody is."""
    if r.verdict == uncertainty.RESOLVED:
        return f"{r.better} better" if r.better else "differs (no better direction)"
    need = uncertainty.needed_text(row_difference(r))
    if r.verdict == uncertainty.UNRESOLVED:
        return f"unresolved, {r.n_seeds} seed{'s' if r.n_seeds != 1 else ''} ({need})"
    return f"no resolved difference ({need})"


def diff_text(r) -> str:
    """``-0.100 [95 % CI -0.12, -0.08]`` for a comparison row."""
    ci = f" [{fmt(r.ci_low)}, {fmt(r.ci_high)}]" if math.isfinite(r.ci_low) else " [one seed: no interval]"
    return f"{fmt(r.mean_diff)}{ci}"


def pairwise_table(cmp: pd.DataFrame) -> str:
    if cmp.empty:
        return ""
    rows = [
        [
            f"{r.a} vs {r.b}",
            r.cell,
            f"{r.label}{arrow(r.direction)}",
            diff_text(r),
            f"{r.n_seeds}{'' if r.paired else ' (unpaired)'}",
            verdict_text(r),
            r.per_seed,
        ]
        for r in cmp.itertuples()
    ]
    header = ["pair (a vs b)", "cell", "metric", "a − b [95 % CI]", "seeds", "verdict", "per seed (a vs b)"]
    return md_table(header, rows)
