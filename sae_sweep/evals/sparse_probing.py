"""SAEBench's ``sparse_probing`` eval: can a few SAE latents linearly decode known text labels?

Reference: SAEBench 0.6.0 ``sae_bench/evals/sparse_probing/`` (``main.py``, ``probe_training.py``,
``eval_config.py``; github.com/adamkarvonen/SAEBench @8042bb38). By default (``probe="saebench"``):

* data per class: ``probe_train_set_size / 2`` train and ``probe_test_set_size / 2`` test texts
  (SAEBench: 2000 / 500). The one-vs-rest task of class c (``prepare_probe_data``,
  probe_training.py:23-88): positives = all of c's texts, negatives = ``ceil(n_pos / n_other)``
  drawn from EACH other class, then ``n_pos`` of those, shuffled -- balanced, stratified negatives;
* each text is the mean over its non-{BOS, EOS, PAD} tokens of the LM activation and of the SAE
  latents (``activation_collection.py:81-91, 256-322``), BOS first as TransformerLens's tokenizer
  adds it, ``context_size`` tokens;
* top-k dimensions by the ABSOLUTE mean difference on the training task (``get_top_k_mean_diff_mask``),
  k in ``k_values`` (SAEBench: 1, 2, 5); an sklearn ``LogisticRegression(C=1, max_iter=1000)`` (lbfgs)
  on the RAW features of those k dimensions;
* ``*_test_accuracy`` (all dimensions): SAEBench's torch probe (``train_probe_gpu``: AdamW 1e-2,
  batch 250, 100 epochs, patience 10), reporting the best TEST accuracy over epochs;
* metrics: per dataset the mean over its classes, then the mean over datasets.

Named options beside it: ``top_k_selection="signed"`` (latents that fire MORE on the class only) and
``probe="standardised"`` (standardised logistic regression for every probe, sae_sweep's earlier
procedure; it does not select on the test set). Remaining differences: one negative sample per
class task is shared by every k and by the LM and SAE probes (SAEBench draws fresh negatives per
probe, unseeded); the full probe runs in float32 (SAEBench: the LM dtype). SAEBench's hub sets
(bias_in_bios class sets 1-3, ag_news) are drawn as SAEBench draws them (``probes.saebench_probe_splits``):
train texts from the dataset's train split and test texts from its test split, per class
``probe_train_set_size / 2`` and ``probe_test_set_size / 2``, bias_in_bios balanced by gender
(dataset_utils.py:88-112, 275-345), with ``random_state`` = the job's seed (SAEBench's
``random_seed``, 42); those need the Hugging Face Hub, so this machine could not compare them with
SAEBench's own draw (a test checks the draw against a transcription on a frame built here).

Reported (SAEBench names, categories ``llm`` / ``sae``): ``llm_test_accuracy``,
``llm_top_{k}_test_accuracy``, ``sae_test_accuracy``, ``sae_top_{k}_test_accuracy``.
A class task whose accuracy is within luck of chance (0.5) for the full probe AND every k is
flagged; when that holds for the SAE on every task the eval's status is "failed" (the numbers are
kept, but they do not measure the SAE).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np

from sae_sweep.config import choice, setting
from sae_sweep.evals.probes import (
    DEFAULT_PACKAGES,
    SAEBENCH_PROBE_SETS,
    TaskUnavailable,
    TextTask,
    at_chance,
    encode_texts,
    few_threads,
    fit_probe,
    fit_sklearn_probe_raw,
    load_task,
    pooled_features,
    saebench_probe_splits,
    stable_seed,
    top_k_by_mean_diff,
    train_probe_torch,
)
from sae_sweep.evals.registry import register_eval, settings_dict
from sae_sweep.evals.schema import EvalOutput
from sae_sweep.util.metrics import Metric

log = logging.getLogger(__name__)

EVAL_TYPE_ID = "sparse_probing"


@dataclass
class SparseProbingSettings:
    """``eval.sparse_probing``. Defaults: SAEBench's ``SparseProbingEvalConfig``."""

    datasets: List[str] = setting(
        default_factory=lambda: ["stdlib_package", "stdlib_kind"],
        allowed="a list of dataset names (offline tasks or hub tasks)",
    )
    k_values: List[int] = setting(
        default_factory=lambda: [1, 2, 5],
        allowed="a list of integers >= 1 (SAEBench: 1, 2, 5)",
        check=lambda v: len(v) > 0 and all(k >= 1 for k in v),
    )
    context_size: int = setting(128, allowed="an integer >= 2 (tokens per text; SAEBench: 128)", check=lambda v: v >= 2)
    max_examples: int = setting(12500, allowed="an integer >= 2 (texts loaded per dataset)", check=lambda v: v >= 2)
    probe_train_set_size: int = setting(
        4000, allowed="an integer >= 2 (per one-vs-rest task; SAEBench: 4000)", check=lambda v: v >= 2
    )
    probe_test_set_size: int = setting(
        1000, allowed="an integer >= 2 (per one-vs-rest task; SAEBench: 1000)", check=lambda v: v >= 2
    )
    max_classes: int = setting(
        5, allowed="an integer >= 1 (classes per dataset, one task each)", check=lambda v: v >= 1
    )
    batch_size: int = setting(32, allowed="an integer >= 1 (texts per LM forward)", check=lambda v: v >= 1)
    packages: List[str] = setting(
        default_factory=lambda: list(DEFAULT_PACKAGES), allowed="a list of stdlib packages (the offline tasks)"
    )
    top_k_selection: str = choice("abs", ("abs", "signed"))
    probe: str = choice("saebench", ("saebench", "standardised"))
    C: float = setting(1.0, allowed="a float > 0 (inverse L2 strength of the sklearn probes)", check=lambda v: v > 0)
    full_probe_lr: float = setting(1e-2, allowed="a float > 0 (SAEBench: 0.01)", check=lambda v: v > 0)
    full_probe_epochs: int = setting(100, allowed="an integer >= 1 (SAEBench: 100)", check=lambda v: v >= 1)
    full_probe_batch_size: int = setting(250, allowed="an integer >= 1 (SAEBench: 250)", check=lambda v: v >= 1)
    early_stopping_patience: int = setting(10, allowed="an integer >= 1 (SAEBench: 10)", check=lambda v: v >= 1)
    chance_z: float = setting(
        2.0, allowed="a float >= 0 (sigmas above chance that count as learned)", check=lambda v: v >= 0
    )


def class_splits(
    labels: np.ndarray, classes: List[str], n_train: int, n_test: int, rng: np.random.Generator
) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Per class, disjoint train / test text indices: ``n_train // 2`` and ``n_test // 2`` (SAEBench's
    per-class sizes for a task of ``n_train`` / ``n_test``), shrunk in proportion when a class is small."""
    want_tr, want_te = max(1, n_train // 2), max(1, n_test // 2)
    out = {}
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        m = min(len(idx), want_tr + want_te)
        n_tr = min(want_tr, max(1, round(m * want_tr / (want_tr + want_te))))
        if m - n_tr < 1:
            raise TaskUnavailable(f"class {c!r} has too few examples for a train/test split ({len(idx)})")
        out[c] = (idx[:n_tr], idx[n_tr:m])
    return out


def prepare_probe_data(
    by_class: Dict[str, np.ndarray], cls: str, rng: np.random.Generator
) -> Tuple[np.ndarray, np.ndarray]:
    """SAEBench's ``prepare_probe_data`` (probe_training.py:23-88), one-vs-rest, on text indices:
    positives = every index of ``cls``; ``ceil(n_pos / n_other)`` random ones from each other class,
    then ``n_pos`` of those; labels 1/0; shuffled. Returns (indices, labels)."""
    pos = by_class[cls]
    others = [c for c in by_class if c != cls]
    if not others:
        raise TaskUnavailable(f"class {cls!r} has no other class to be told apart from")
    per = math.ceil(len(pos) / len(others))
    neg = np.concatenate([by_class[c][rng.permutation(len(by_class[c]))[:per]] for c in others])
    neg = neg[rng.permutation(len(neg))[: len(pos)]]
    if len(neg) < len(pos):
        raise TaskUnavailable(f"class {cls!r}: only {len(neg)} negatives for {len(pos)} positives")
    idx = np.concatenate([pos, neg])
    y = np.r_[np.ones(len(pos), int), np.zeros(len(neg), int)]
    order = rng.permutation(len(idx))
    return idx[order], y[order]


def probe_class_task(
    feats: Dict[str, np.ndarray],
    splits: Dict[str, Tuple[np.ndarray, np.ndarray]],
    cls: str,
    ks: List[int],
    s: Dict[str, Any],
    seed: int,
) -> Dict[str, Any]:
    """Full and top-k probes on the LM and SAE features for one one-vs-rest task."""
    rng = np.random.default_rng(seed)
    tr, y_tr = prepare_probe_data({c: v[0] for c, v in splits.items()}, cls, rng)
    te, y_te = prepare_probe_data({c: v[1] for c, v in splits.items()}, cls, rng)
    row: Dict[str, Any] = {"class": cls, "n_train": len(tr), "n_test": len(te)}
    saebench = s["probe"] == "saebench"

    def topk_probe(xtr, xte):
        if saebench:
            return fit_sklearn_probe_raw(xtr, y_tr, xte, y_te, C=float(s["C"]))
        return fit_probe(xtr, y_tr, xte, y_te, seed=seed, C=float(s["C"]))

    for src in ("llm", "sae"):
        x = feats[src]
        accs = []
        if saebench:
            full = train_probe_torch(
                x[tr],
                y_tr,
                x[te],
                y_te,
                batch_size=int(s["full_probe_batch_size"]),
                epochs=int(s["full_probe_epochs"]),
                lr=float(s["full_probe_lr"]),
                seed=seed,
                early_stopping_patience=int(s["early_stopping_patience"]),
            )
        else:
            full = fit_probe(x[tr], y_tr, x[te], y_te, seed=seed, C=float(s["C"]))
        row[f"{src}_test_accuracy"] = full["acc"]
        accs.append(full["acc"])
        for k in ks:
            if k > x.shape[1]:
                continue
            cols = top_k_by_mean_diff(x[tr], y_tr, k, s["top_k_selection"])
            res = topk_probe(x[tr][:, cols], x[te][:, cols])
            row[f"{src}_top_{k}_test_accuracy"] = res["acc"]
            accs.append(res["acc"])
        row[f"{src}_at_chance"] = at_chance(accs, len(te), 0.5, float(s["chance_z"]))
    return row


def _task_and_splits(
    name: str, s: Dict[str, Any], seed: int, cache_dir: str | None
) -> Tuple[TextTask, Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """The task's texts and, per class, train / test indices into them. SAEBench's hub sets come as
    SAEBench draws them (balanced, from the train and the test split); other tasks are split here."""
    if name in SAEBENCH_PROBE_SETS:
        by_class = saebench_probe_splits(name, int(s["probe_train_set_size"]), int(s["probe_test_set_size"]), seed)
        texts: List[str] = []
        labels: List[str] = []
        splits = {}
        for c, (train, test) in by_class.items():
            start = len(texts)
            texts += train + test
            labels += [c] * (len(train) + len(test))
            splits[c] = (np.arange(start, start + len(train)), np.arange(start + len(train), len(texts)))
        return TextTask(name, texts, labels, SAEBENCH_PROBE_SETS[name][0]), splits
    task = load_task(name, seed=seed, cache_dir=cache_dir, max_examples=int(s["max_examples"]), packages=s["packages"])
    labels_arr = np.array(task.labels)
    classes = sorted(set(task.labels), key=lambda c: (-int((labels_arr == c).sum()), c))[: int(s["max_classes"])]
    splits = class_splits(
        labels_arr,
        sorted(classes),
        int(s["probe_train_set_size"]),
        int(s["probe_test_set_size"]),
        np.random.default_rng(stable_seed(seed, name)),
    )
    return task, splits


def run_sparse_probing(
    lm: Any, sae: Any, layer: int, hook: str, seed: int, settings: Dict[str, Any], cache_dir: str | None = None
) -> EvalOutput:
    s = settings_dict(SparseProbingSettings, settings, "eval.sparse_probing")
    ks = sorted({int(k) for k in s["k_values"]})
    config = {
        **s,
        "layer": layer,
        "hook": hook,
        "random_seed": seed,
        "pooling": "mean_non_special",
        "reference": "SAEBench 0.6.0 sae_bench/evals/sparse_probing",
    }
    details: List[Dict[str, Any]] = []
    per_class: List[Dict[str, Any]] = []
    unavailable: Dict[str, str] = {}
    for name in s["datasets"]:
        try:
            task, splits = _task_and_splits(name, s, seed, cache_dir)
        except TaskUnavailable as e:
            log.warning("sparse_probing: %s", e)
            unavailable[name] = str(e)
            continue
        classes = sorted(splits)
        used = np.sort(np.concatenate([np.concatenate(v) for v in splits.values()]))
        ids, keep = encode_texts(lm, [task.texts[i] for i in used], int(s["context_size"]))
        feats = pooled_features(lm, sae, ids, keep, layer, hook, int(s["batch_size"]))
        # split indices into rows of `feats` (texts outside the splits are never encoded)
        splits = {c: (np.searchsorted(used, tr), np.searchsorted(used, te)) for c, (tr, te) in splits.items()}
        rows = []
        for cls in sorted(classes):
            try:
                with few_threads():  # many small fits: one thread is faster on a shared CPU
                    rows.append(probe_class_task(feats, splits, cls, ks, s, stable_seed(seed, name, cls)))
            except TaskUnavailable as e:
                unavailable[f"{name}/{cls}"] = str(e)
        if not rows:
            continue
        for r in rows:
            r["dataset_name"] = name
        per_class += rows
        keys = [k for k in rows[0] if k.endswith("accuracy")]
        details.append(
            {
                "dataset_name": name,
                "source": task.source,
                "classes": [r["class"] for r in rows],
                **{k: float(np.mean([r[k] for r in rows if k in r])) for k in keys},
            }
        )
    if not details:
        return EvalOutput.skipped(
            EVAL_TYPE_ID,
            config,
            "no probing dataset available: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()),
        )

    def mean_over_datasets(key: str) -> float:
        vals = [d[key] for d in details if key in d]
        return float(np.mean(vals)) if vals else float("nan")

    metrics = {
        "llm": {
            "llm_test_accuracy": mean_over_datasets("llm_test_accuracy"),
            **{
                f"llm_top_{k}_test_accuracy": mean_over_datasets(f"llm_top_{k}_test_accuracy")
                for k in ks
                if any(f"llm_top_{k}_test_accuracy" in d for d in details)
            },
        },
        "sae": {
            "sae_test_accuracy": mean_over_datasets("sae_test_accuracy"),
            **{
                f"sae_top_{k}_test_accuracy": mean_over_datasets(f"sae_top_{k}_test_accuracy")
                for k in ks
                if any(f"sae_top_{k}_test_accuracy" in d for d in details)
            },
        },
    }
    sae_chance = [f"{r['dataset_name']}/{r['class']}" for r in per_class if r["sae_at_chance"]]
    llm_chance = [f"{r['dataset_name']}/{r['class']}" for r in per_class if r["llm_at_chance"]]
    metrics["flags"] = {
        "sae_at_chance_fraction": len(sae_chance) / len(per_class),
        "llm_at_chance_fraction": len(llm_chance) / len(per_class),
    }
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
        reason = f"SAE probes are at chance level for every k on all {len(per_class)} tasks" + (
            " (so are the LM probes: the tasks are not decodable at this layer)"
            if len(llm_chance) == len(per_class)
            else ""
        )
    return EvalOutput(
        eval_type_id=EVAL_TYPE_ID,
        config=config,
        metrics=metrics,
        details=details,
        status=status,
        skip_reason=reason,
        flags=flags,
        unstructured={"per_class": per_class, "unavailable": unavailable},
    )


# What the eval logs (flattened as sparse_probing/<category>/<metric>); {k} runs over k_values (a k
# larger than the representation's width is left out). Every accuracy is on the held-out texts of a
# balanced one-vs-rest class task, averaged over the dataset's classes, then over datasets.
_SB = "SAEBench 0.6.0 sparse_probing"
METRICS = (
    Metric(
        "sparse_probing/llm/llm_test_accuracy",
        "LM probe",
        None,
        "test accuracy",
        "Probe on every dimension of the mean-pooled LM activation (probe=saebench: SAEBench's torch probe, "
        "the best test accuracy over its epochs). The ceiling the SAE probes are read against; it does not "
        "depend on the SAE, so no better direction is declared.",
        _SB,
    ),
    Metric(
        "sparse_probing/llm/llm_top_{k}_test_accuracy",
        "LM probe top-{k}",
        None,
        "test accuracy",
        "Logistic regression on the k LM-activation dimensions with the largest absolute mean difference "
        "between the task's classes (training texts). A reference for the SAE's top-k; independent of the "
        "SAE.",
        _SB,
    ),
    Metric(
        "sparse_probing/sae/sae_test_accuracy",
        "SAE probe",
        "higher",
        "test accuracy",
        "The full-width probe on the mean-pooled SAE latents: how much of the labels all latents together keep.",
        _SB,
    ),
    Metric(
        "sparse_probing/sae/sae_top_{k}_test_accuracy",
        "SAE probe top-{k}",
        "higher",
        "test accuracy",
        "Logistic regression on the k latents with the largest absolute mean difference between the task's "
        "classes (top_k_selection=signed: latents that fire more on the class). Higher: a few latents "
        "already carry the label, i.e. the SAE has latents for these concepts.",
        _SB,
    ),
    Metric(
        "sparse_probing/flags/sae_at_chance_fraction",
        "SAE tasks at chance",
        "lower",
        "fraction of tasks",
        "Fraction of class tasks on which the full SAE probe and every top-k SAE probe score at most 0.5 "
        "plus chance_z binomial standard errors (luck on a balanced task). 1 fails the eval.",
        "this project",
    ),
    Metric(
        "sparse_probing/flags/llm_at_chance_fraction",
        "LM tasks at chance",
        None,
        "fraction of tasks",
        "The same for the LM-activation probes: tasks that are not decodable at this layer at all.",
        "this project",
    ),
)


@register_eval("sparse_probing", SparseProbingSettings, METRICS)
def run(ctx: Any) -> EvalOutput:
    return run_sparse_probing(ctx.lm, ctx.sae, ctx.layer, ctx.hook, ctx.seed, ctx.settings, ctx.cache_dir)
