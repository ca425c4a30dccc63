"""A sweep's runs, read from MLflow through ``Tracker``, as one pandas table.

One row per child run: run id/name/status, the grid tags the job set (model, layer, hook, dataset,
seed, trainer, seed_group), a readable ``variant`` label (everything but the seed), and one column
per metric (the latest value, as the MLflow UI's table shows it). Metric keys are discovered, never
listed here, so evals added later appear without a change.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Sequence

import pandas as pd

from sae_sweep.tracking.status import RunStatus

log = logging.getLogger(__name__)

GRID_TAGS = ("model", "layer", "hook", "dataset", "trainer", "seed", "seed_group")
# What a variant is, short of the seed (seed_group carries the rest of the run identity).
GROUP_COLS = ("model", "layer", "hook", "dataset", "trainer", "extra", "seed_group")
# Params that never distinguish variants: launch, paths, tracking, the seed itself, derived values.
_IGNORED_PARAM_PREFIXES = ("seed", "tracking.", "paths.", "hydra", "derived.", "device", "sweep.", "eval.",
                           "train.checkpoint_every", "train.log_every")
META_COLS = ("run_id", "run_name", "status", *GRID_TAGS, "variant", "extra", "error")


@dataclass
class SweepData:
    parent_run_id: str
    parent_name: str
    experiment: str
    parent_tags: Dict[str, str]
    parent_metrics: Dict[str, float]
    runs: pd.DataFrame                    # every child (any status), metric columns included
    metric_keys: List[str] = field(default_factory=list)

    @property
    def finished(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] == RunStatus.FINISHED]

    @property
    def not_finished(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] != RunStatus.FINISHED]


def collect(tracker: Any, parent_run_id: str, extra_run_ids: Iterable[str] = ()) -> SweepData:
    """Read the parent run and its children (plus ``extra_run_ids``: points a re-run skipped because
    an earlier sweep already FINISHED them; those runs hang under the earlier parent)."""
    parent = tracker.get_run(parent_run_id)
    exp_id = parent.info.experiment_id
    runs = {r.info.run_id: r for r in tracker.find_runs(exp_id, parent_run_id=parent_run_id)}
    for rid in extra_run_ids:
        if rid and rid not in runs:
            try:
                runs[rid] = tracker.get_run(rid)
            except Exception as e:  # a deleted run must not stop the report
                log.warning("report: run %s listed by the sweep is unreadable: %s", rid, e)
    rows = []
    metric_keys: set = set()
    for r in runs.values():
        tags = r.data.tags
        row: Dict[str, Any] = {
            "run_id": r.info.run_id,
            "run_name": tags.get("mlflow.runName", r.info.run_id[:8]),
            "status": r.info.status,
            "error": tags.get("error", ""),
            "start_time": r.info.start_time or 0,
        }
        for t in GRID_TAGS:
            row[t] = tags.get(t, "")
        row["seed_group"] = row["seed_group"] or _fallback_group(row)
        row["_params"] = dict(r.data.params)
        row.update(r.data.metrics)
        metric_keys.update(r.data.metrics)
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else [*META_COLS, "start_time", "_params"])
    if rows:
        df = _label_variants(df)
        df = df.sort_values(["variant", "seed", "start_time"], key=_natural_key).reset_index(drop=True)
    return SweepData(
        parent_run_id=parent_run_id,
        parent_name=parent.data.tags.get("mlflow.runName", parent_run_id[:8]),
        experiment=tracker.experiment_name(exp_id),
        parent_tags=dict(parent.data.tags),
        parent_metrics=dict(parent.data.metrics),
        runs=df,
        metric_keys=sorted(metric_keys),
    )


def _fallback_group(row: Dict[str, Any]) -> str:
    # Runs from before the seed_group tag existed: group by the grid tags short of the seed.
    return "|".join(str(row.get(t, "")) for t in ("model", "layer", "hook", "dataset", "trainer"))


def _natural_key(col: pd.Series) -> pd.Series:
    # seeds sort as numbers (9 < 42), everything else as text
    if col.name == "seed":
        return col.map(lambda v: (0, int(v), "") if str(v).lstrip("-").isdigit() else (1, 0, str(v)))
    return col


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1] if key.count(".") else key


def _label_variants(df: pd.DataFrame) -> pd.DataFrame:
    """``variant``: model/dataset/trainer, plus layer/hook when the sweep varies them, plus any
    param that tells apart seed groups which would otherwise share a label (e.g. a swept sae.k)."""
    df = df.copy()
    vary_layer = df["layer"].nunique() > 1 or df["hook"].nunique() > 1
    base = df["model"].astype(str) + "/" + df["dataset"].astype(str) + "/" + df["trainer"].astype(str)
    if vary_layer:
        base = base + "/L" + df["layer"].astype(str) + "." + df["hook"].astype(str)
    df["extra"] = ""
    # Only FINISHED runs tell variants apart: a crashed run (no params yet) must not rename them.
    done = df["status"] == RunStatus.FINISHED
    for label, idx in df[done].groupby(base[done]).groups.items():
        sub = df.loc[idx]
        if sub["seed_group"].nunique() < 2:
            continue
        # params constant within each seed group but different between them
        per_group: Dict[str, Dict[str, str]] = defaultdict(dict)
        for _, r in sub.iterrows():
            for k, v in r["_params"].items():
                if not k.startswith(_IGNORED_PARAM_PREFIXES):
                    per_group[r["seed_group"]].setdefault(k, v)
        keys = sorted({k for d in per_group.values() for k in d})
        differing = [k for k in keys if len({d.get(k) for d in per_group.values()}) > 1]
        for g, d in per_group.items():
            extra = ",".join(f"{_short(k)}={d.get(k, '?')}" for k in differing) or g[:8]
            df.loc[df["seed_group"] == g, "extra"] = extra
    df["variant"] = base + df["extra"].map(lambda e: f" [{e}]" if e else "")
    return df


# Metric discovery

@dataclass(frozen=True)
class MetricSpec:
    key: str          # the MLflow metric key
    label: str        # short name for tables and plots
    direction: int    # +1 higher is better, -1 lower is better, 0 neither (e.g. L0)
    unit: str


# The headline metrics, in report order. Patterns, not keys: evals may nest categories differently
# and sparse probing's k values come from its config. A pattern with (?P<k>..) yields one spec per k.
HEADLINE_PATTERNS: Sequence[tuple] = (
    # SAEBench's formula subtracts (S/d_in)^2, not ||E x||^2: above 1 when the mean squared norm exceeds
    # d_in^2 (Llama-family layers with massive activations). The centred one is beside it (evals/core.py).
    (r"core/reconstruction_quality/explained_variance", "explained variance", +1, "fraction of variance (SAEBench's formula)"),
    (r"core/reconstruction_quality/explained_variance_centred", "explained variance (centred)", +1,
     "fraction of variance about the mean"),
    (r"core/model_behavior_preservation/kl_div_score", "KL score", +1, "fraction of KL recovered"),
    (r"core/model_performance_preservation/ce_loss_score", "CE score", +1, "fraction of CE recovered"),
    (r"core/sparsity/l0", "L0", 0, "active latents per token"),
    (r"core/sparsity/l1", "L1", 0, "sum of latent activations per token"),
    (r"absorption/(?:.+/)?mean_absorption_fraction_score", "absorption", -1, "mean absorption fraction"),
    (r"absorption/(?:.+/)?mean_full_absorption_score", "full absorption", -1, "fraction of words"),
    (r"sparse_probing/(?:.+/)?sae_top_(?P<k>\d+)_test_accuracy", "SAE probe top-{k}", +1, "test accuracy"),
    (r"fake_features/(?:.+/)?fake_feature_ratio", "fake-feature ratio", -1, "fraction of latents"),
    (r"downstream/mean/sae_acc", "downstream SAE acc", +1, "test accuracy"),
    (r"downstream/mean/recon_acc", "downstream recon acc", +1, "test accuracy"),
    (r"crossseed/shared_feature_ratio", "shared-feature ratio", +1, "fraction of latents"),
)


def headline_specs(keys: Iterable[str]) -> List[MetricSpec]:
    keys = sorted(set(keys))
    out: List[MetricSpec] = []
    for pattern, label, direction, unit in HEADLINE_PATTERNS:
        found = []
        for key in keys:
            m = re.fullmatch(pattern, key)
            if m:
                k = m.groupdict().get("k")
                found.append((int(k) if k else 0, MetricSpec(key, label.format(k=k), direction, unit)))
        seen_labels = set()
        for _, spec in sorted(found, key=lambda kv: kv[0]):
            if spec.label not in seen_labels:  # one key per label (first in sorted order)
                seen_labels.add(spec.label)
                out.append(spec)
    return out


_LOWER = ("absorption", "fake_feature", "mse", "kl_div_with_sae", "ce_loss_with_sae", "dead", "at_chance",
          "relative_reconstruction_bias")
_HIGHER = ("score", "accuracy", "_acc", "explained_variance", "cossim", "shared_feature_ratio", "top1_ratio",
           "_f1", "frac_alive", "mean_matched_cos")


def direction_of(key: str) -> int:
    """Best guess at which way is better for a discovered metric (0: no preference)."""
    name = key.lower()
    if any(s in name for s in _LOWER):
        return -1
    if any(s in name for s in _HIGHER):
        return +1
    return 0


def eval_metric_keys(keys: Iterable[str]) -> List[str]:
    """Result metrics: everything but per-step training curves, cache stats, timings, and per-pair
    cross-seed values (``crossseed/vs_<other>/...`` differ by name between the runs of a pair; their
    group summary is ``crossseed/<metric>`` and the shared-feature table)."""
    return sorted(k for k in keys
                  if not k.startswith(("train/", "cache/", "sweep/", "crossseed/vs_")) and not k.endswith("/seconds"))


def spec_for(key: str) -> MetricSpec:
    for s in headline_specs([key]):
        return s
    return MetricSpec(key, key, direction_of(key), "")
