"""The report's figures (PNG). Matplotlib's object API with the Agg canvas: no pyplot, so importing
this never changes the backend of a notebook or GUI session that imports sae_sweep.

Every function returns the written path, or raises ``NoData`` with the reason the figure was skipped
(the report prints the reason in place of the picture).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from sae_sweep.report.data import spec_for

DPI = 110


class NoData(Exception):
    """A figure's data is absent; the message says which."""


def variant_colors(variants: Sequence[str]) -> Dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(variants) <= 10 else "tab20"]
    return {v: cmap(i % cmap.N) for i, v in enumerate(variants)}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _bars(ax, runs: pd.DataFrame, key: str, variants: Sequence[str], colors: Mapping[str, tuple]) -> bool:
    """Bar = mean over seeds, error bar = std, dots = the seeds themselves."""
    if key not in runs or runs[key].notna().sum() == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xticks([])
        return False
    for i, v in enumerate(variants):
        x = runs.loc[runs["variant"] == v, key].dropna().to_numpy(dtype=float)
        if not len(x):
            continue
        sd = x.std(ddof=1) if len(x) > 1 else 0.0
        ax.bar(i, x.mean(), yerr=sd, color=colors[v], alpha=0.75, capsize=4, edgecolor="black", linewidth=0.5)
        jitter = np.linspace(-0.15, 0.15, len(x)) if len(x) > 1 else np.zeros(1)
        ax.scatter(i + jitter, x, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(variants, rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return True


def better_text(key: str) -> str:
    """ "↑ better" / "↓ better" from the metric's declaration; "" when neither way is better."""
    return {1: "↑ better", -1: "↓ better"}.get(spec_for(key).direction, "")


def axis_label(key: str, fallback: str = "") -> str:
    """A y-axis label from the metric's declaration: its unit and which way is better."""
    spec = spec_for(key)
    unit, better = spec.unit or fallback or spec.label, better_text(key)
    return f"{unit} ({better})" if better else unit


ABSORPTION_SCORE = "absorption/mean/mean_absorption_fraction_score"
SHARED_RATIO = "crossseed/shared_feature_ratio"


GRID_PANELS = (
    "core/reconstruction_quality/explained_variance",
    "core/model_behavior_preservation/kl_div_score",
    "core/sparsity/l0",
    "core/sparsity/l1",
)


def metrics_grid(runs: pd.DataFrame, variants: Sequence[str], colors: Mapping[str, tuple], path: Path) -> Path:
    if not any(k in runs and runs[k].notna().any() for k in GRID_PANELS):
        raise NoData("no core eval metrics (core/reconstruction_quality/explained_variance, ...) in the runs")
    fig = Figure(figsize=(max(9.0, 1.2 * len(variants) + 5), 8.5))
    axes = fig.subplots(2, 2)
    for ax, key in zip(axes.flat, GRID_PANELS):
        _bars(ax, runs, key, variants, colors)
        label = spec_for(key).label
        ax.set_title(label[:1].upper() + label[1:])
        ax.set_ylabel(axis_label(key))
    fig.suptitle("Core metrics per variant (bar: mean over seeds, whisker: std, dots: seeds)")
    fig.tight_layout()
    return _save(fig, path)


def absorption_per_letter(
    per_variant: Mapping[str, Mapping[str, List[float]]],
    variants: Sequence[str],
    colors: Mapping[str, tuple],
    path: Path,
) -> Path:
    """``per_variant``: variant -> letter -> absorption fraction of each seed."""
    per_variant = {v: d for v, d in per_variant.items() if d}
    if not per_variant:
        raise NoData("no absorption eval details (artifact evals/absorption_first_letter.json) in the runs")
    letters = sorted({letter for d in per_variant.values() for letter in d})
    shown = [v for v in variants if v in per_variant]
    width = 0.8 / len(shown)
    fig = Figure(figsize=(max(10.0, 0.45 * len(letters) * max(1, len(shown) / 2)), 4.8))
    ax = fig.subplots()
    for j, v in enumerate(shown):
        xs, means, sds = [], [], []
        for i, letter in enumerate(letters):
            vals = per_variant[v].get(letter)
            if vals:
                xs.append(i - 0.4 + width * (j + 0.5))
                means.append(float(np.mean(vals)))
                sds.append(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
        ax.bar(xs, means, width=width, yerr=sds, color=colors[v], label=v, capsize=2, edgecolor="black", linewidth=0.3)
    ax.set_xticks(range(len(letters)))
    ax.set_xticklabels(letters)
    ax.set_xlabel("first letter")
    better = better_text(ABSORPTION_SCORE)  # the per-letter values it averages point the same way
    ax.set_ylabel("mean absorption fraction" + (f" ({better})" if better else ""))
    ax.set_title("Feature absorption per first letter (mean over seeds ± std)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never covers bars
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


_TOPK = re.compile(r"sparse_probing/(?:.+/)?(?P<src>llm|sae)_top_(?P<k>\d+)_test_accuracy")


def probing_vs_k(runs: pd.DataFrame, variants: Sequence[str], colors: Mapping[str, tuple], path: Path) -> Path:
    keys = {}
    for c in runs.columns:
        m = _TOPK.fullmatch(str(c)) if isinstance(c, str) else None
        if m and runs[c].notna().any():
            keys[(m["src"], int(m["k"]))] = c
    if not keys:
        raise NoData("no sparse-probing metrics (sparse_probing/.../sae_top_<k>_test_accuracy) in the runs")
    fig = Figure(figsize=(8.5, 5.2))
    ax = fig.subplots()
    for v in variants:
        sub = runs[runs["variant"] == v]
        ks = sorted(k for src, k in keys if src == "sae")
        y = [sub[keys[("sae", k)]].mean() for k in ks]
        if ks:
            ax.plot(ks, y, marker="o", color=colors[v], label=f"SAE latents: {v}")
    # The LM probe does not depend on the SAE: one curve per model, dashed.
    for model, sub in runs.groupby("model"):
        ks = sorted(k for src, k in keys if src == "llm")
        if ks:
            ax.plot(
                ks,
                [sub[keys[("llm", k)]].mean() for k in ks],
                marker="s",
                linestyle="--",
                color="black",
                alpha=0.7,
                label=f"LM activations: {model}",
            )
    ax.set_xscale("log")
    all_k = sorted({k for _, k in keys})
    ax.set_xticks(all_k)  # label the k values themselves, not powers of ten
    ax.set_xticklabels([str(k) for k in all_k])
    ax.minorticks_off()
    ax.set_xlabel("k (number of probed dimensions, log scale)")
    ax.set_ylabel("test accuracy (mean over tasks and seeds)")
    ax.set_title("Sparse probing: accuracy vs k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def shared_features(shared: pd.DataFrame, variants: Sequence[str], colors: Mapping[str, tuple], path: Path) -> Path:
    if shared.empty:
        raise NoData(
            "no cross-seed metrics (crossseed/...): a seed group needs two FINISHED seeds and the "
            "cross-seed sweep-end hook"
        )
    datasets = list(dict.fromkeys(shared["dataset"]))
    fig = Figure(figsize=(max(7.0, 1.6 * len(shared) + 3), 5.0))
    ax = fig.subplots()
    x: float = 0.0
    ticks: list = []
    for d in datasets:
        sub = shared[shared["dataset"] == d]
        for r in sub.itertuples():
            sd = (
                r.shared_feature_ratio_std
                if isinstance(r.shared_feature_ratio_std, float) and math.isfinite(r.shared_feature_ratio_std)
                else 0.0
            )
            ax.bar(
                x,
                r.shared_feature_ratio_mean,
                yerr=sd,
                color=colors.get(r.variant, "grey"),
                capsize=4,
                edgecolor="black",
                linewidth=0.5,
                label=r.variant,
            )
            ax.text(
                x,
                r.shared_feature_ratio_mean + sd + 0.01,
                f"{r.shared_feature_ratio_mean:.2f}",
                ha="center",
                fontsize=8,
            )
            ticks.append(
                (x, f"{d}\n{r.model}/{r.trainer}" + (f"\n{r.variant.split(' [')[1][:-1]}" if " [" in r.variant else ""))
            )
            x += 1
        x += 0.6  # gap between datasets
    ax.set_xticks([t for t, _ in ticks])
    ax.set_xticklabels([label for _, label in ticks], fontsize=8)
    ax.set_ylim(0, min(1.05, max(0.1, float(shared["shared_feature_ratio_mean"].max()) * 1.25 + 0.05)))
    spec, better = spec_for(SHARED_RATIO), better_text(SHARED_RATIO)
    ax.set_ylabel(f"{spec.label} ({spec.unit}" + (f", {better})" if better else ")"))
    ax.set_xlabel("dataset (model/trainer)")
    ax.set_title("Cross-seed shared-feature ratio per dataset (decoder cos > threshold after matching)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# Preferred training curves, in order; others are used when these were not logged.
CURVE_PREFERENCE = ("train/loss", "train/mse", "train/explained_variance", "train/l0", "train/dead_frac")


def training_curves(
    histories: Mapping[str, Mapping[str, List[Tuple[int, float]]]],
    runs: pd.DataFrame,
    colors: Mapping[str, tuple],
    path: Path,
) -> Path:
    """``histories``: run id -> metric key -> [(step, value)]."""
    keys = sorted({k for h in histories.values() for k, pts in h.items() if len(pts) > 1})
    if not keys:
        raise NoData("no train/* metric with more than one logged step")
    chosen = [k for k in CURVE_PREFERENCE if k in keys][:4] or keys[:4]
    ncols = 2 if len(chosen) > 1 else 1
    nrows = math.ceil(len(chosen) / ncols)
    fig = Figure(figsize=(6.0 * ncols, 3.8 * nrows))
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols)).flat)
    by_id = runs.set_index("run_id")
    seen_labels = set()
    for ax, key in zip(axes, chosen):
        for rid, h in histories.items():
            pts = h.get(key)
            if not pts or rid not in by_id.index:
                continue
            v = by_id.at[rid, "variant"]
            steps, vals = zip(*pts)
            label = v if (key, v) not in seen_labels else None
            seen_labels.add((key, v))
            ax.plot(steps, vals, color=colors.get(v, "grey"), alpha=0.8, linewidth=1.2, label=label)
        ax.set_title(key)
        ax.set_xlabel("training step")
        ax.set_ylabel(axis_label(key, fallback=key.split("/", 1)[1].replace("_", " ")))
        if key in ("train/loss", "train/mse"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes[len(chosen) :]:  # unused panels
        ax.set_visible(False)
    first = fig.axes[0]
    first.legend(fontsize=7)
    fig.suptitle("Training curves (one line per run, colour = variant)")
    fig.tight_layout()
    return _save(fig, path)


# The sparsity–fidelity frontier (SAEBench's lead plot): L0 against what the reconstruction costs.
L0_KEY = "core/sparsity/l0"
EV_CENTRED = "core/reconstruction_quality/explained_variance_centred"
CE_WITH_SAE = "core/model_performance_preservation/ce_loss_with_sae"
CE_WITHOUT_SAE = "core/model_performance_preservation/ce_loss_without_sae"
KL_WITH_SAE = "core/model_behavior_preservation/kl_div_with_sae"
# Params that move a point along a frontier line (the sparsity budget) or pick its width.
SPARSITY_PARAMS = ("k",)
WIDTH_PARAM = "derived.d_sae"
WIDTH_PARAMS = ("expansion_factor", "d_sae")


def frontier_values(runs: pd.DataFrame) -> pd.DataFrame:
    """The frontier's y values from each run's logged metrics (lower is better for all three):
    ``unexplained`` = 1 - centred explained variance, ``ce_increase`` = CE with the SAE spliced in -
    clean CE (nats), ``kl`` = KL(clean || spliced) (nats). NaN where a run did not log the inputs."""

    def col(key: str) -> pd.Series:
        return runs[key].astype(float) if key in runs else pd.Series(math.nan, index=runs.index)

    return pd.DataFrame(
        {
            "l0": col(L0_KEY),
            "unexplained": 1 - col(EV_CENTRED),
            "ce_increase": col(CE_WITH_SAE) - col(CE_WITHOUT_SAE),
            "kl": col(KL_WITH_SAE),
        },
        index=runs.index,
    )


FRONTIER_PANELS = (
    ("unexplained", "1 − explained variance (centred)", "fraction of variance (↓ better)"),
    ("ce_increase", "CE-loss increase", "nats per token (↓ better)"),
    ("kl", "KL divergence with the SAE", "nats per token (↓ better)"),
)


def frontier_line(run: pd.Series, width_varies: bool) -> str:
    """Which line a run belongs to: its trainer and every swept param except the sparsity budget
    (and its width, unless the sweep varies width: then each width is a line of its own)."""
    parts = [
        p
        for p in str(run.get("extra", "") or "").split(",")
        if p and not p.startswith(tuple(f"{k}=" for k in (*SPARSITY_PARAMS, *WIDTH_PARAMS)))
    ]
    if width_varies:
        parts.append(f"d_sae={run['_params'].get(WIDTH_PARAM, '?')}")
    return str(run["trainer"]) + (f" [{','.join(parts)}]" if parts else "")


def sparsity_label(run: pd.Series) -> str:
    """The run's sparsity budget as its variant label writes it (``k=32``), when the sweep varies it."""
    parts = str(run.get("extra", "") or "").split(",")
    return ",".join(p for p in parts if p.startswith(tuple(f"{k}=" for k in SPARSITY_PARAMS)))


def frontier(runs: pd.DataFrame, title: str, stem: Path) -> List[Path]:
    """One figure, three panels (1 − centred EV, CE-loss increase, KL) against L0 for one (model,
    layer, dataset): each seed a small point, each variant's seed mean a large marker, the means of
    one trainer line (across k, and across widths when they vary) joined. Written as PNG and SVG;
    log axes where every value is positive. ``stem``: the files' path without its suffix."""
    vals = frontier_values(runs)
    if vals["l0"].notna().sum() == 0:
        raise NoData(f"no {L0_KEY} in the runs")
    widths = {p.get(WIDTH_PARAM) for p in runs["_params"]} if "_params" in runs else set()
    width_varies = len(widths) > 1
    lines = runs.apply(lambda r: frontier_line(r, width_varies), axis=1)
    names = list(dict.fromkeys(lines))
    colors = variant_colors(names)
    fig = Figure(figsize=(15.0, 4.6))
    axes = fig.subplots(1, len(FRONTIER_PANELS))
    for ax, (col, panel_title, unit) in zip(axes, FRONTIER_PANELS):
        have = vals[col].notna() & vals["l0"].notna()
        if not have.any():
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_title(panel_title)
            continue
        for name in names:
            sub = vals[have & (lines == name)]
            if sub.empty:
                continue
            ax.scatter(sub["l0"], sub[col], color=colors[name], s=14, alpha=0.55, zorder=2)
            means = sub.groupby(runs.loc[sub.index, "variant"], sort=False)[["l0", col]].mean().sort_values("l0")
            ax.plot(means["l0"], means[col], color=colors[name], marker="o", markersize=8, linewidth=1.6, label=name)
            for variant, m in means.iterrows():  # name each mean by its sparsity budget (k=...)
                budget = sparsity_label(runs.loc[runs["variant"] == variant].iloc[0])
                if budget:
                    ax.annotate(budget, (m["l0"], m[col]), xytext=(4, 4), textcoords="offset points", fontsize=7)
        for set_scale, axis, data in (
            (ax.set_xscale, ax.xaxis, vals.loc[have, "l0"]),
            (ax.set_yscale, ax.yaxis, vals.loc[have, col]),
        ):
            if (data > 0).all():
                set_scale("log")
                axis.set_major_formatter(ScalarFormatter())  # 30, not 3 x 10^1
                axis.set_minor_formatter(ScalarFormatter())
        if ax.get_xscale() == "log":  # ticks at the variants' mean L0s: every k gets its number
            l0s = sorted({float(f"{v:.3g}") for v in vals.loc[have].groupby(runs.loc[have, "variant"])["l0"].mean()})
            ax.set_xticks(l0s, [f"{v:g}" for v in l0s])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(panel_title)
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8, title="trainer", title_fontsize=8)
    fig.suptitle(f"Sparsity–fidelity frontier: {title} (small: seeds; large: seed mean; lower-left is better)")
    fig.tight_layout()
    png = _save(fig, stem.parent / f"{stem.name}.png")
    svg = stem.parent / f"{stem.name}.svg"
    with rc_context({"svg.fonttype": "none"}):  # text stays text: selectable, searchable
        fig.savefig(svg, bbox_inches="tight")
    return [png, svg]
