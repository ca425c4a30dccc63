"""SAEBench's ``sparse_probing`` eval: can a few SAE latents linearly decode known text labels?

For each dataset and each of its classes, a balanced one-vs-rest task: positives are texts of the
class, negatives an equal number drawn from the other classes. Each text is represented by the mean
over its non-special tokens of the LM activation and of the SAE latents. Logistic-regression probes
are trained on all dimensions and on the top-k dimensions ranked by (positive mean - negative mean)
on the training split, for k in ``k_values``. Reported (SAEBench names, categories ``llm`` / ``sae``):
``llm_test_accuracy``, ``llm_top_{k}_test_accuracy``, ``sae_test_accuracy``, ``sae_top_{k}_test_accuracy``,
each the mean over datasets of the mean over that dataset's classes.

A class task whose accuracy is within luck of chance (0.5) for the full probe AND every k is
flagged; when that holds for the SAE on every task the eval's status is "failed" (the numbers are
kept, but they do not measure the SAE).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np

from sae_sweep.evals.probes import (
    DEFAULT_PACKAGES, TaskUnavailable, at_chance, encode_texts, few_threads, fit_probe, load_task,
    pooled_features, stable_seed, top_k_by_mean_diff,
)
from sae_sweep.config import setting
from sae_sweep.evals.registry import register_eval, settings_dict
from sae_sweep.evals.schema import EvalOutput

log = logging.getLogger(__name__)

EVAL_TYPE_ID = "sparse_probing"

@dataclass
class SparseProbingSettings:
    """``eval.sparse_probing``."""

    datasets: List[str] = setting(default_factory=lambda: ["stdlib_package", "stdlib_kind"],
                                  allowed="a list of dataset names (offline tasks or hub tasks)")
    k_values: List[int] = setting(default_factory=lambda: [1, 2, 5, 10, 20, 50], allowed="a list of integers >= 1",
                                  check=lambda v: len(v) > 0 and all(k >= 1 for k in v))
    context_size: int = setting(128, allowed="an integer >= 2 (tokens per text; SAEBench: 128)", check=lambda v: v >= 2)
    max_examples: int = setting(1000, allowed="an integer >= 2 (texts loaded per dataset)", check=lambda v: v >= 2)
    probe_train_set_size: int = setting(400, allowed="an integer >= 2 (per one-vs-rest task; SAEBench: 4000)",
                                        check=lambda v: v >= 2)
    probe_test_set_size: int = setting(200, allowed="an integer >= 2 (per one-vs-rest task; SAEBench: 1000)",
                                       check=lambda v: v >= 2)
    max_classes: int = setting(5, allowed="an integer >= 1 (classes per dataset, one task each)", check=lambda v: v >= 1)
    batch_size: int = setting(32, allowed="an integer >= 1 (texts per LM forward)", check=lambda v: v >= 1)
    packages: List[str] = setting(default_factory=lambda: list(DEFAULT_PACKAGES),
                                  allowed="a list of stdlib packages (the offline tasks)")
    C: float = setting(1.0, allowed="a float > 0 (inverse L2 strength of the probes)", check=lambda v: v > 0)
    chance_z: float = setting(2.0, allowed="a float >= 0 (sigmas above chance that count as learned)",
                              check=lambda v: v >= 0)


def one_vs_rest_split(labels: np.ndarray, cls: str, n_train: int, n_test: int, rng: np.random.Generator):
    """Balanced train/test index sets for ``cls`` vs the rest; sizes shrink when a class is small."""
    pos = rng.permutation(np.flatnonzero(labels == cls))
    neg = rng.permutation(np.flatnonzero(labels != cls))
    half = min(len(pos), len(neg), (n_train + n_test) // 2)
    n_tr = max(1, round(half * n_train / (n_train + n_test)))
    if half - n_tr < 1:
        raise TaskUnavailable(f"class {cls!r} has too few examples for a train/test split ({len(pos)})")
    tr = np.concatenate([pos[:n_tr], neg[:n_tr]])
    te = np.concatenate([pos[n_tr:half], neg[n_tr:half]])
    y_tr = np.r_[np.ones(n_tr, int), np.zeros(n_tr, int)]
    y_te = np.r_[np.ones(half - n_tr, int), np.zeros(half - n_tr, int)]
    return tr, y_tr, te, y_te


def probe_class_task(feats: Dict[str, np.ndarray], labels: np.ndarray, cls: str, ks: List[int], s: Dict[str, Any],
                     seed: int) -> Dict[str, Any]:
    """Full and top-k probes on the LM and SAE features for one one-vs-rest task."""
    rng = np.random.default_rng(seed)
    tr, y_tr, te, y_te = one_vs_rest_split(labels, cls, int(s["probe_train_set_size"]), int(s["probe_test_set_size"]), rng)
    row: Dict[str, Any] = {"class": cls, "n_train": len(tr), "n_test": len(te)}
    for src in ("llm", "sae"):
        x = feats[src]
        accs = []
        full = fit_probe(x[tr], y_tr, x[te], y_te, seed=seed, C=float(s["C"]))
        row[f"{src}_test_accuracy"] = full["acc"]
        accs.append(full["acc"])
        for k in ks:
            if k > x.shape[1]:
                continue
            cols = top_k_by_mean_diff(x[tr], y_tr, k)
            res = fit_probe(x[tr][:, cols], y_tr, x[te][:, cols], y_te, seed=seed, C=float(s["C"]))
            row[f"{src}_top_{k}_test_accuracy"] = res["acc"]
            accs.append(res["acc"])
        row[f"{src}_at_chance"] = at_chance(accs, len(te), 0.5, float(s["chance_z"]))
    return row


def run_sparse_probing(lm: Any, sae: Any, layer: int, hook: str, seed: int, settings: Dict[str, Any],
                       cache_dir: str | None = None) -> EvalOutput:
    s = settings_dict(SparseProbingSettings, settings, "eval.sparse_probing")
    ks = sorted({int(k) for k in s["k_values"]})
    config = {**s, "layer": layer, "hook": hook, "random_seed": seed, "pooling": "mean_non_special",
              "top_k_selection": "mean_diff", "probe": "logistic_regression_standardised"}
    details: List[Dict[str, Any]] = []
    per_class: List[Dict[str, Any]] = []
    unavailable: Dict[str, str] = {}
    for name in s["datasets"]:
        try:
            task = load_task(name, seed=seed, cache_dir=cache_dir, max_examples=int(s["max_examples"]),
                             packages=s["packages"])
        except TaskUnavailable as e:
            log.warning("sparse_probing: %s", e)
            unavailable[name] = str(e)
            continue
        labels = np.array(task.labels)
        classes = sorted(set(task.labels), key=lambda c: (-int((labels == c).sum()), c))[: int(s["max_classes"])]
        ids, keep = encode_texts(lm, task.texts, int(s["context_size"]))
        feats = pooled_features(lm, sae, ids, keep, layer, hook, int(s["batch_size"]))
        rows = []
        for cls in sorted(classes):
            try:
                with few_threads():  # many small fits: one thread is faster on a shared CPU
                    rows.append(probe_class_task(feats, labels, cls, ks, s, stable_seed(seed, name, cls)))
            except TaskUnavailable as e:
                unavailable[f"{name}/{cls}"] = str(e)
        if not rows:
            continue
        for r in rows:
            r["dataset_name"] = name
        per_class += rows
        keys = [k for k in rows[0] if k.endswith("accuracy")]
        details.append({"dataset_name": name, "source": task.source, "classes": [r["class"] for r in rows],
                        **{k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}})
    if not details:
        return EvalOutput.skipped(EVAL_TYPE_ID, config, "no probing dataset available: " + "; ".join(
            f"{k}: {v}" for k, v in unavailable.items()))

    def mean_over_datasets(key: str) -> float:
        vals = [d[key] for d in details if key in d]
        return float(np.mean(vals)) if vals else float("nan")

    metrics = {
        "llm": {"llm_test_accuracy": mean_over_datasets("llm_test_accuracy"),
                **{f"llm_top_{k}_test_accuracy": mean_over_datasets(f"llm_top_{k}_test_accuracy") for k in ks
                   if any(f"llm_top_{k}_test_accuracy" in d for d in details)}},
        "sae": {"sae_test_accuracy": mean_over_datasets("sae_test_accuracy"),
                **{f"sae_top_{k}_test_accuracy": mean_over_datasets(f"sae_top_{k}_test_accuracy") for k in ks
                   if any(f"sae_top_{k}_test_accuracy" in d for d in details)}},
    }
    sae_chance = [f"{r['dataset_name']}/{r['class']}" for r in per_class if r["sae_at_chance"]]
    llm_chance = [f"{r['dataset_name']}/{r['class']}" for r in per_class if r["llm_at_chance"]]
    metrics["flags"] = {"sae_at_chance_fraction": len(sae_chance) / len(per_class),
                        "llm_at_chance_fraction": len(llm_chance) / len(per_class)}
    flags: Dict[str, Any] = {}
    if sae_chance:
        flags["sae_at_chance_tasks"] = sae_chance
    if llm_chance:
        flags["llm_at_chance_tasks"] = llm_chance
    if unavailable:
        flags["unavailable"] = sorted(unavailable)
    status, reason = "ok", None
    if len(sae_chance) == len(per_class):
        status = "failed"
        reason = (f"SAE probes are at chance level for every k on all {len(per_class)} tasks"
                  + (" (so are the LM probes: the tasks are not decodable at this layer)"
                     if len(llm_chance) == len(per_class) else ""))
    return EvalOutput(eval_type_id=EVAL_TYPE_ID, config=config, metrics=metrics, details=details, status=status,
                      skip_reason=reason, flags=flags,
                      unstructured={"per_class": per_class, "unavailable": unavailable})


@register_eval("sparse_probing", SparseProbingSettings)
def run(ctx: Any) -> EvalOutput:
    return run_sparse_probing(ctx.lm, ctx.sae, ctx.layer, ctx.hook, ctx.seed, ctx.settings, ctx.cache_dir)
