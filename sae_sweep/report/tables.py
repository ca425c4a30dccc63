"""The report's numbers: per-variant statistics over seeds, pairwise comparisons, shared features.

All functions take the runs table of ``data.collect`` (FINISHED runs only) and return pandas
DataFrames that are written as CSV unchanged and rendered as Markdown by ``render``.
Standard deviations are sample standard deviations (ddof=1) over seeds; NaN with a single seed.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

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


def cell_means(stats: pd.DataFrame) -> pd.DataFrame:
    """Wide table of seed means: one row per variant, one column per metric key."""
    if stats.empty:
        return pd.DataFrame(columns=list(VARIANT_COLS))
    wide = stats.pivot_table(index=list(VARIANT_COLS), columns="metric", values="mean", aggfunc="first", dropna=False)
    return wide.reset_index()


def pairwise(stats: pd.DataFrame, factor: str, specs: Sequence[MetricSpec]) -> pd.DataFrame:
    """FaithfulSAE-style comparison of the levels of ``factor`` (dataset or trainer).

    For each pair of levels (a, b) and each metric, the cells are the variants that match on every
    other grid coordinate (model, layer, hook, the other factor, swept params). Per metric:
    ``mean_diff`` = mean over cells of (seed-mean of a − seed-mean of b), and, when the metric has a
    direction, the number of cells each side is better in (``wins_a``, ``wins_b``, ``ties``)."""
    cols = [
        "factor",
        "a",
        "b",
        "metric",
        "label",
        "direction",
        "n_cells",
        "mean_diff",
        "wins_a",
        "wins_b",
        "ties",
        "better",
    ]
    wide = cell_means(stats)
    if wide.empty or factor not in wide or wide[factor].nunique() < 2:
        return pd.DataFrame(columns=cols)
    match_cols = [c for c in ("model", "layer", "hook", "dataset", "trainer", "extra") if c != factor]
    rows = []
    levels = sorted(wide[factor].unique(), key=str)
    for a, b in itertools.combinations(levels, 2):
        merged = wide[wide[factor] == a].merge(wide[wide[factor] == b], on=match_cols, suffixes=("_a", "_b"))
        for spec in specs:
            ka, kb = f"{spec.key}_a", f"{spec.key}_b"
            if ka not in merged or kb not in merged:
                continue
            pair = merged[[ka, kb]].dropna()
            if pair.empty:
                continue
            diff = (pair[ka] - pair[kb]).to_numpy(dtype=float)
            row = {
                "factor": factor,
                "a": a,
                "b": b,
                "metric": spec.key,
                "label": spec.label,
                "direction": spec.direction,
                "n_cells": len(diff),
                "mean_diff": float(diff.mean()),
                "wins_a": None,
                "wins_b": None,
                "ties": None,
                "better": "",
            }
            if spec.direction:
                signed = diff * spec.direction  # > 0: a is better
                row.update(
                    wins_a=int((signed > 0).sum()), wins_b=int((signed < 0).sum()), ties=int((signed == 0).sum())
                )
                mean_signed = float(signed.mean())
                row["better"] = a if mean_signed > 0 else b if mean_signed < 0 else "tie"
            rows.append(row)
    df = pd.DataFrame(rows, columns=cols)
    for c in ("wins_a", "wins_b", "ties"):  # counts; empty (not NaN floats) for direction-less metrics
        df[c] = df[c].astype("Int64")
    return df


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


def pairwise_table(cmp: pd.DataFrame) -> str:
    if cmp.empty:
        return ""
    rows = []
    for r in cmp.itertuples():
        wins = (
            f"{int(r.wins_a)}–{int(r.wins_b)}" + (f" ({int(r.ties)} ties)" if r.ties else "") if r.direction else "n/a"
        )
        rows.append(
            [f"{r.a} vs {r.b}", f"{r.label}{arrow(r.direction)}", r.n_cells, fmt(r.mean_diff), wins, r.better or "—"]
        )
    return md_table(["pair (a vs b)", "metric", "cells", "mean diff (a − b)", "wins a–b", "better"], rows)
