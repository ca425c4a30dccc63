"""Cross-seed comparison at the end of a sweep: FaithfulSAE's shared-feature ratio between the SAEs
of runs that differ only in seed, read from and logged to MLflow.

:func:`crossseed_hook` groups a sweep's FINISHED runs by their ``seed_group`` tag and logs
``crossseed/...`` metrics to the parent and to each run; :func:`compare_runs` does the same for any
two run ids later. The metric itself is ``sae_sweep.evals.shared_features``; this module only moves
decoders and numbers between it and the tracking store (through the tracker object it is given).
"""

from __future__ import annotations

import itertools
import logging
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from sae_sweep.config import parse
from sae_sweep.evals.shared_features import CrossSeedSettings, shared_feature_ratio
from sae_sweep.tracking.status import RunStatus
from sae_sweep.util.metrics import Metric

log = logging.getLogger(__name__)

# What this module logs. ``shared_feature_ratio`` (evals/shared_features.py) compares the decoders of
# two SAEs A and B (A: the lower seed), each matched pair counted once; its results, by name:
_FS = "FaithfulSAE feat_match"
_PAIR: Dict[str, tuple] = {
    "shared_feature_ratio": (
        "shared-feature ratio",
        "higher",
        "fraction of latents",
        _FS,
        "Decoder rows of the two SAEs are matched one-to-one to maximise the total cosine (Hungarian; sparse "
        "candidate matching above eval.crossseed.dense_max latents); the ratio is the number of matched pairs "
        "with cosine > eval.crossseed.threshold (0.7) over min(d_sae_A, d_sae_B). Higher: the seeds learn the "
        "same features",
    ),
    "top1_ratio": (
        "top-1 ratio",
        "higher",
        "fraction of latents",
        _FS,
        "The fraction of B's latents whose most similar decoder row in A has cosine > threshold (no one-to-one "
        "constraint; FaithfulSAE's direction)",
    ),
    "top1_ratio_symmetric": (
        "top-1 ratio (symmetric)",
        "higher",
        "fraction of latents",
        "this project (named option)",
        "The mean of the top-1 ratios in both directions (A->B and B->A)",
    ),
    "mean_matched_cos": (
        "mean matched cosine",
        "higher",
        "cosine",
        "this project",
        "The sum of the matched pairs' decoder cosines over min(d_sae_A, d_sae_B) (latents left unmatched by the "
        "sparse method count as 0)",
    ),
}
# compare_runs also logs the rest of shared_feature_ratio's result
_PAIR_EXTRA: Dict[str, tuple] = {
    "top1_ratio_a": (
        "top-1 ratio A->B",
        "higher",
        "fraction of latents",
        "this project",
        "The fraction of A's latents whose best decoder row in B has cosine > threshold",
    ),
    "top1_ratio_b": (
        "top-1 ratio B->A",
        "higher",
        "fraction of latents",
        _FS,
        "The fraction of B's latents whose best decoder row in A has cosine > threshold (= top1_ratio)",
    ),
    "n_shared": (
        "shared latents",
        None,
        "latents",
        _FS,
        "The number of matched pairs with cosine > threshold (grows with d_sae)",
    ),
    "n_latents": ("latents compared", None, "latents", _FS, "min(d_sae_A, d_sae_B)"),
    "threshold": ("cosine threshold", None, "cosine", _FS, "The cosine threshold the counts used (a setting)"),
}


def _declare(key: str, label: str, spec: tuple, scope: str) -> Metric:
    base_label, better, unit, ref, what = spec
    return Metric(key, f"{base_label}{label}", better, unit, f"{what}. {scope}.", ref)


def _crossseed_metrics() -> Tuple[Metric, ...]:
    out: List[Metric] = []
    for name, spec in _PAIR.items():
        out += [
            _declare(
                f"crossseed/{name}",
                "",
                spec,
                "Logged on each run by the sweep-end hook: the mean over the pairs the run is in (the run and "
                "each other FINISHED run of its seed group)",
            ),
            _declare(
                f"crossseed/vs_seed_{{seed}}/{name}",
                " (vs seed {seed})",
                spec,
                "Logged on each run: the value for the run and the run of its seed group with seed {seed}",
            ),
            _declare(
                f"crossseed/{{group}}/seed_{{a}}_vs_{{b}}/{name}",
                " ({group}, seed {a} vs {b})",
                spec,
                "Logged on the sweep's parent run: the value for seeds {a} < {b} of the seed group whose id "
                "starts with {group}",
            ),
            _declare(
                f"crossseed/{{group}}/{name}_mean",
                " ({group} mean)",
                spec,
                "Logged on the sweep's parent run: the mean over the seed pairs of the seed group whose id "
                "starts with {group}",
            ),
            _declare(
                f"crossseed/{name}_mean",
                " (sweep mean)",
                spec,
                "Logged on the sweep's parent run: the mean over every pair the sweep compared",
            ),
        ]
    for name, spec in {**_PAIR, **_PAIR_EXTRA}.items():
        out.append(
            _declare(
                f"crossseed/vs_{{run}}/{name}",
                " (vs run {run})",
                spec,
                "Logged on both runs by compare_runs: the value for this run and the run whose id starts with {run}",
            )
        )
    out.append(
        Metric(
            "crossseed/n_pairs",
            "seed pairs compared",
            None,
            "pairs",
            "Logged on the sweep's parent run: the number of seed pairs the sweep-end hook compared (every pair "
            "of FINISHED runs that differ only in seed).",
            "this project",
        )
    )
    return tuple(out)


METRICS = _crossseed_metrics()


def load_decoder(tracker: Any, run_id: str, workdir: Path) -> torch.Tensor:
    from sae_sweep.sae import SparseAutoencoder

    path = tracker.download(run_id, "sae", workdir / run_id)
    return SparseAutoencoder.load(path).W_dec.detach()


def compare_runs(
    tracker: Any,
    run_id_a: str,
    run_id_b: str,
    threshold: float = CrossSeedSettings.threshold,
    log_to_runs: bool = True,
    **kwargs: Any,
) -> Dict[str, float]:
    """Shared-feature metrics between the SAEs of two runs (artifact ``sae/``), at any time.

    With ``log_to_runs`` each run gets ``crossseed/vs_<other run id[:8]>/<metric>``.
    """
    with tempfile.TemporaryDirectory() as d:
        wa = load_decoder(tracker, run_id_a, Path(d))
        wb = load_decoder(tracker, run_id_b, Path(d))
    res = shared_feature_ratio(wa, wb, threshold, **kwargs)
    if log_to_runs:
        for me, other in ((run_id_a, run_id_b), (run_id_b, run_id_a)):
            tracker.log_metrics(me, {f"crossseed/vs_{other[:8]}/{k}": v for k, v in res.items()})
    return res


def crossseed_groups(runs: Sequence[Any]) -> Dict[str, List[Any]]:
    """FINISHED runs with a ``seed_group`` tag, grouped by it, each group sorted by seed then id."""
    groups: Dict[str, List[Any]] = defaultdict(list)
    for r in runs:
        g = r.data.tags.get("seed_group")
        if g and r.info.status == RunStatus.FINISHED:
            groups[g].append(r)

    def order(r: Any) -> Tuple[int, str]:
        try:
            return int(r.data.tags.get("seed", 0)), r.info.run_id
        except ValueError:
            return 0, r.info.run_id

    return {g: sorted(rs, key=order) for g, rs in groups.items()}


def crossseed_settings(points: Sequence[Any]) -> CrossSeedSettings:
    """``eval.crossseed`` of the sweep (its first point's config; every point shares the sweep's)."""
    node = next((getattr(p, "cfg", None) for p in points if getattr(p, "cfg", None) is not None), None)
    return parse(CrossSeedSettings, node.eval.get("crossseed") if node is not None else None, "eval.crossseed")


def crossseed_hook(
    tracker: Any, parent_run_id: str, points: Sequence[Any], results: Sequence[Any], sweep_dir: Any
) -> Dict[str, Any]:
    """Sweep-end hook (``sae_sweep.job.sweep.SWEEP_END_HOOKS``): every pair of FINISHED runs that differ
    only in seed is compared. Settings from ``eval.crossseed`` (threshold, method, candidates,
    enabled). Logged to the parent: ``crossseed/<group[:8]>/seed_<a>_vs_<b>/<metric>`` per pair,
    ``crossseed/<group[:8]>/<metric>_mean`` per group, ``crossseed/<metric>_mean`` overall; to each
    run: ``crossseed/<metric>`` (mean over its pairs) and ``crossseed/vs_seed_<s>/<metric>``; and the
    whole table as the parent's artifact ``crossseed/crossseed.json``."""
    s = crossseed_settings(points)
    if not s.enabled:
        return {}
    threshold = s.threshold
    kwargs: Dict[str, Any] = {"method": s.method, "candidates": s.candidates, "dense_max": s.dense_max}

    exp_id = tracker.get_run(parent_run_id).info.experiment_id
    ids = {r["run_id"] for r in results if isinstance(r, dict) and r.get("run_id")}
    ids |= {
        r.info.run_id for r in tracker.find_runs(exp_id, parent_run_id=parent_run_id, statuses=[RunStatus.FINISHED])
    }
    runs = [tracker.get_run(i) for i in sorted(ids)]
    groups = {g: rs for g, rs in crossseed_groups(runs).items() if len(rs) >= 2}
    if not groups:
        log.info("crossseed: no seed group with two FINISHED runs; nothing to compare")
        return {}

    parent_metrics: Dict[str, float] = {}
    per_run: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    run_metrics: Dict[str, Dict[str, float]] = defaultdict(dict)
    table: List[Dict[str, Any]] = []
    all_pairs: Dict[str, List[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as d:
        decoders: Dict[str, torch.Tensor] = {}

        def dec(run_id: str) -> torch.Tensor:
            if run_id not in decoders:
                decoders[run_id] = load_decoder(tracker, run_id, Path(d))
            return decoders[run_id]

        for g, rs in sorted(groups.items()):
            gk = g[:8]
            group_vals: Dict[str, List[float]] = defaultdict(list)
            for ra, rb in itertools.combinations(rs, 2):
                a_id, b_id = ra.info.run_id, rb.info.run_id
                sa, sb = ra.data.tags.get("seed", a_id[:8]), rb.data.tags.get("seed", b_id[:8])
                try:
                    res = shared_feature_ratio(dec(a_id), dec(b_id), threshold, **kwargs)
                except Exception as e:  # one unreadable SAE must not hide the other pairs
                    log.exception("crossseed: %s vs %s failed: %s", a_id, b_id, e)
                    continue
                table.append({"seed_group": g, "run_a": a_id, "run_b": b_id, "seed_a": sa, "seed_b": sb, **res})
                for k in ("shared_feature_ratio", "top1_ratio", "top1_ratio_symmetric", "mean_matched_cos"):
                    parent_metrics[f"crossseed/{gk}/seed_{sa}_vs_{sb}/{k}"] = res[k]
                    group_vals[k].append(res[k])
                    all_pairs[k].append(res[k])
                    per_run[a_id][k].append(res[k])
                    per_run[b_id][k].append(res[k])
                    run_metrics[a_id][f"crossseed/vs_seed_{sb}/{k}"] = res[k]
                    run_metrics[b_id][f"crossseed/vs_seed_{sa}/{k}"] = res[k]
            for k, v in group_vals.items():
                parent_metrics[f"crossseed/{gk}/{k}_mean"] = float(np.mean(v))
    for k, v in all_pairs.items():
        parent_metrics[f"crossseed/{k}_mean"] = float(np.mean(v))
    parent_metrics["crossseed/n_pairs"] = float(len(table))
    tracker.log_metrics(parent_run_id, parent_metrics)
    for run_id, vals in per_run.items():
        tracker.log_metrics(
            run_id, {**run_metrics[run_id], **{f"crossseed/{k}": float(np.mean(v)) for k, v in vals.items()}}
        )
    tracker.log_json(parent_run_id, {"threshold": threshold, "pairs": table}, "crossseed/crossseed.json")
    log.info(
        "crossseed: %d pair(s) in %d seed group(s); mean shared-feature ratio %.3f",
        len(table),
        len(groups),
        parent_metrics.get("crossseed/shared_feature_ratio_mean", float("nan")),
    )
    return parent_metrics
