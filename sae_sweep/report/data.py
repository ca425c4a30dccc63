"""A sweep's runs, read from MLflow through ``Tracker``, as one pandas table.

One row per child run: run id/name/status, the grid tags the job set (model, layer, hook, dataset,
seed, trainer, seed_group), a readable ``variant`` label (everything but the seed), and one column
per metric (the latest value, as the MLflow UI's table shows it). Metric keys are discovered, never
listed here, so evals added later appear without a change.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Sequence

import pandas as pd

from sae_sweep.report.metrics import declared_metrics, lookup
from sae_sweep.tracking.status import RunStatus

log = logging.getLogger(__name__)

GRID_TAGS = ("model", "layer", "hook", "dataset", "trainer", "seed", "seed_group")
# What a variant is, short of the seed (seed_group carries the rest of the run identity).
GROUP_COLS = ("model", "layer", "hook", "dataset", "trainer", "extra", "seed_group")
# Params that never distinguish variants: launch, paths, tracking, the seed itself, derived values.
_IGNORED_PARAM_PREFIXES = (
    "seed",
    "tracking.",
    "paths.",
    "hydra",
    "derived.",
    "device",
    "sweep.",
    "eval.",
    "train.checkpoint_every",
    "train.log_every",
    "train.eval_every_tokens",
    "train.heldout_tokens",
)
META_COLS = ("run_id", "run_name", "status", *GRID_TAGS, "variant", "extra", "error")


@dataclass
class SweepData:
    parent_run_id: str
    parent_name: str
    experiment: str
    parent_tags: Dict[str, str]
    parent_metrics: Dict[str, float]
    runs: pd.DataFrame  # every child (any status), metric columns included
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
    for _label, idx in df[done].groupby(base[done]).groups.items():
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


# Metric labels, directions and units: from the declarations beside the code that logs each metric
# (sae_sweep.report.metrics gathers them).


@dataclass(frozen=True)
class MetricSpec:
    key: str  # the MLflow metric key
    label: str  # short name for tables and plots
    direction: int  # +1 higher is better, -1 lower is better, 0 neither (e.g. L0) or undeclared
    unit: str


# The headline metrics, in report order: declared keys (a family, such as sparse probing's per-k
# accuracy, gives one headline per member it has in the runs, in order of its number).
HEADLINE: Sequence[str] = (
    "core/reconstruction_quality/explained_variance",
    "core/reconstruction_quality/explained_variance_centred",
    "core/model_behavior_preservation/kl_div_score",
    "core/model_performance_preservation/ce_loss_score",
    "core/sparsity/l0",
    "core/sparsity/l1",
    "absorption/mean/mean_absorption_fraction_score",
    "absorption/mean/mean_full_absorption_score",
    "sparse_probing/sae/sae_top_{k}_test_accuracy",
    "fake_features/fake_features/fake_feature_ratio",
    "downstream/mean/sae_acc",
    "downstream/mean/recon_acc",
    "downstream_standardised/mean/sae_acc",
    "downstream_standardised/mean/recon_acc",
    "crossseed/shared_feature_ratio",
)


def _member_order(values: Dict[str, str]) -> tuple:
    return tuple((0, int(v), "") if v.isdigit() else (1, 0, v) for _, v in sorted(values.items()))


def headline_specs(keys: Iterable[str]) -> List[MetricSpec]:
    """Specs of the headline metrics present in ``keys``, in :data:`HEADLINE` order."""
    keys = sorted(set(keys))
    declared = {m.key: m for m in declared_metrics()}
    out: List[MetricSpec] = []
    for headline in HEADLINE:
        metric = declared[headline]
        # members of a family that no exact declaration claims (lookup prefers the exact one)
        members = [
            (values, k)
            for values, k in ((metric.match(k), k) for k in keys)
            if values is not None and lookup(k) is metric
        ]
        out += [spec_for(k) for _, k in sorted(members, key=lambda vk: _member_order(vk[0]))]
    return out


def eval_metric_keys(keys: Iterable[str]) -> List[str]:
    """Result metrics: everything but per-step training curves, cache stats, timings, and per-pair
    cross-seed values (``crossseed/vs_<other>/...`` differ by name between the runs of a pair; their
    group summary is ``crossseed/<metric>`` and the shared-feature table)."""
    return sorted(
        k
        for k in keys
        if not k.startswith(("train/", "cache/", "sweep/", "crossseed/vs_")) and not k.endswith("/seconds")
    )


def spec_for(key: str) -> MetricSpec:
    """Label, direction and unit of a logged key from its declaration. An undeclared key (an older
    run's, or one logged outside the declared stages) is shown by its name, with no direction."""
    metric = lookup(key)
    if metric is None:
        return MetricSpec(key, key, 0, "")
    return MetricSpec(key, metric.label_for(key), metric.direction, metric.unit)
