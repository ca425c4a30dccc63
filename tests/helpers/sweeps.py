"""A sweep with known values in a real MLflow store, written through Tracker the way the app writes
one: a parent and its children with the app's tags, params, metrics and artifacts."""

from __future__ import annotations

import itertools
import math

import pytest

from sae_sweep.tracking.runs import Tracker

EV = "core/reconstruction_quality/explained_variance"
KL = "core/model_behavior_preservation/kl_div_score"
CE = "core/model_performance_preservation/ce_loss_score"
L0 = "core/sparsity/l0"
L1 = "core/sparsity/l1"
ABS = "absorption/mean/mean_absorption_fraction_score"
FAKE = "fake_features/fake_features/fake_feature_ratio"
SHARED = "crossseed/shared_feature_ratio"
EV_CENTRED = "core/reconstruction_quality/explained_variance_centred"
CE_WITH = "core/model_performance_preservation/ce_loss_with_sae"
CE_WITHOUT = "core/model_performance_preservation/ce_loss_without_sae"
KL_WITH = "core/model_behavior_preservation/kl_div_with_sae"

SEEDS = (42, 49)
DATASETS = ("builtin", "faithful")
SEED_GROUP = {
    ("builtin", "topk"): "aaaa1111deadbeef",
    ("faithful", "topk"): "bbbb2222deadbeef",
    ("builtin", "relu"): "cccc3333deadbeef",
    ("faithful", "relu"): "dddd4444deadbeef",
}


def known_metrics(dataset: str, seed: int, trainer: str = "topk", full: bool = True, k: int = 8, seeds=SEEDS) -> dict:
    """Distinct, hand-checkable values: faithful is better on EV/KL/CE, lower absorption; a larger
    k has a larger L0 and reconstructs better (the frontier)."""
    s = seeds.index(seed)
    d = DATASETS.index(dataset)
    t = 0.0 if trainer == "topk" else -0.05
    lk = math.log2(k / 8)
    m = {
        EV: 0.80 + 0.10 * d + 0.04 * s + t,
        EV_CENTRED: 0.75 + 0.10 * d + 0.04 * s + t + 0.02 * lk,
        KL: 0.70 + 0.20 * d - 0.03 * s + t,
        CE: 0.60 + 0.05 * d + 0.02 * s,
        CE_WITHOUT: 3.0,
        CE_WITH: 3.2 - 0.05 * d + 0.01 * s - 0.03 * lk,
        KL_WITH: 0.15 - 0.04 * d + 0.005 * s - 0.02 * lk,
        L0: (32.0 - 2 * s + d) * k / 8,
        L1: 50.0 + 10 * s - 5 * d,
    }
    if full:
        m.update(
            {
                ABS: 0.30 - 0.15 * d + 0.05 * s,
                "absorption/mean/mean_full_absorption_score": 0.1 - 0.05 * d,
                FAKE: 0.02 + 0.01 * d + 0.005 * s,
                SHARED: 0.40 + 0.30 * d,
                "downstream/mean/sae_acc": 0.7 + 0.05 * d,
                **{
                    f"sparse_probing/sae/sae_top_{k}_test_accuracy": 0.55 + 0.1 * math.log2(k) / 5 + 0.02 * d
                    for k in (1, 5, 20)
                },
                **{f"sparse_probing/llm/llm_top_{k}_test_accuracy": 0.6 + 0.1 * math.log2(k) / 5 for k in (1, 5, 20)},
            }
        )
    return m


def make_sweep(
    tracker: Tracker,
    experiment: str,
    trainers=("topk",),
    full: bool = True,
    failed: bool = True,
    seeds=SEEDS,
    ks=(8,),
    datasets=DATASETS,
):
    """A parent and one child per (k, dataset, trainer, seed) with the app's tags, params, metrics,
    training history and (full) the absorption JSON and cross-seed parent metrics."""
    overrides = "seed=" + ",".join(map(str, seeds)) + (" sae.k=" + ",".join(map(str, ks)) if len(ks) > 1 else "")
    parent = tracker.start_parent(experiment, "sweep-test", {"sweep_name": experiment, "overrides": overrides})
    children = []
    for k, trainer, dataset, seed in itertools.product(ks, trainers, datasets, seeds):
        name = f"tiny_blocks.2.hook_resid_post_512_{trainer}_{k}_0.001_{seed}_{dataset}_64_100"
        group = SEED_GROUP[(dataset, trainer)] + ("" if k == 8 else f"k{k}")
        with tracker.child(experiment, name, f"key-{dataset}-{trainer}-{seed}-{k}", parent) as run:
            run.set_tags(
                {
                    "model": "tiny",
                    "layer": "2",
                    "hook": "resid_post",
                    "dataset": dataset,
                    "seed": str(seed),
                    "trainer": trainer,
                    "seed_group": group,
                }
            )
            run.log_params({"seed": seed, "sae.k": k, "trainer.lr": 0.001, "dataset.name": dataset})
            for step in range(0, 60, 10):
                run.log_metrics(
                    {
                        "train/loss": 10.0 / (step + 1) + seed * 1e-3,
                        "train/explained_variance": 1 - 1 / (step + 2),
                        "train/l0": 8.0,
                    },
                    step=step,
                )
            m = known_metrics(dataset, seed, trainer, full, k, seeds)
            run.log_metrics({**m, "core/seconds": 1.0})
            if full:
                details = [
                    {"first_letter": c, "mean_absorption_fraction": m[ABS] + 0.01 * i} for i, c in enumerate("abcdef")
                ]
                run.log_json(
                    {"eval_type_id": "absorption_first_letter", "eval_result_details": details},
                    "evals/absorption_first_letter.json",
                )
        children.append(run.run_id)
    if full:
        pm = {}
        for (dataset, trainer), g in SEED_GROUP.items():
            if trainer in trainers and dataset in datasets:
                pm[f"crossseed/{g[:8]}/seed_42_vs_49/shared_feature_ratio"] = 0.40 + 0.30 * DATASETS.index(dataset)
        tracker.log_metrics(parent, pm)
    if failed:
        with pytest.raises(RuntimeError):
            with tracker.child(experiment, "broken", "key-broken", parent) as run:
                run.set_tags(
                    {
                        "model": "tiny",
                        "layer": "2",
                        "hook": "resid_post",
                        "dataset": "builtin",
                        "seed": "51",
                        "trainer": trainers[0],
                        "seed_group": "eeee5555",
                    }
                )
                run.log_metrics({EV: -5.0})  # must not leak into the statistics
                raise RuntimeError("boom")
    tracker.end(parent, "FINISHED")
    return parent, children
