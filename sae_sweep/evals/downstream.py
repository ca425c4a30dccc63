"""FaithfulSAE's downstream probing: how much task information survives the SAE?

For each text-classification task, texts are mean-pooled (non-special tokens) into three
representations: the LM activation at the hooked layer, the SAE latents, and the SAE reconstruction.
A multi-class logistic-regression probe is trained on each (same stratified train/test split) and
scored on held-out texts. Metrics, per task (category = task name) and averaged (category ``mean``):
``baseline_acc`` (LM activation), ``sae_acc`` (latents), ``recon_acc`` (reconstruction) and the
macro-F1 of each (``baseline_f1``, ``sae_f1``, ``recon_f1``).

Tasks by name: ``sst2``, ``cola``, ``ag_news``, ``yelp_polarity`` from the hub (reported unavailable
offline), and the offline ``stdlib_package`` / ``stdlib_kind`` tasks. A probe within luck of the
majority-class rate is flagged. The status is "failed" (and the run fails) only when the SAE lost
the information: the latent AND the reconstruction probes are at chance on every task. Latent probes
alone at chance while the reconstruction keeps the information (it is a linear map of the latents)
are a probing result on a small task, flagged but not a broken SAE.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np

from sae_sweep.evals.probes import (
    DEFAULT_PACKAGES, TaskUnavailable, at_chance, encode_texts, few_threads, fit_probe, load_task,
    pooled_features, stable_seed,
)
from sae_sweep.config import setting
from sae_sweep.evals.registry import register_eval, settings_dict
from sae_sweep.evals.schema import EvalOutput

log = logging.getLogger(__name__)

EVAL_TYPE_ID = "downstream"

@dataclass
class DownstreamSettings:
    """``eval.downstream``."""

    tasks: List[str] = setting(default_factory=lambda: ["stdlib_package", "stdlib_kind"],
                               allowed="a list of task names (stdlib_package, stdlib_kind; hub: sst2, cola, ag_news, "
                                       "yelp_polarity)")
    context_size: int = setting(128, allowed="an integer >= 2", check=lambda v: v >= 2)
    max_examples: int = setting(1000, allowed="an integer >= 2 (texts per task)", check=lambda v: v >= 2)
    test_fraction: float = setting(0.3, allowed="a float in (0, 1)", check=lambda v: 0 < v < 1)
    batch_size: int = setting(32, allowed="an integer >= 1", check=lambda v: v >= 1)
    packages: List[str] = setting(default_factory=lambda: list(DEFAULT_PACKAGES),
                                  allowed="a list of stdlib packages (the offline tasks)")
    C: float = setting(1.0, allowed="a float > 0", check=lambda v: v > 0)
    max_iter: int = setting(1000, allowed="an integer >= 1", check=lambda v: v >= 1)
    chance_z: float = setting(2.0, allowed="a float >= 0", check=lambda v: v >= 0)


_REPS = (("baseline", "llm"), ("sae", "sae"), ("recon", "recon"))


def _category(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator):
    tr, te = [], []
    for c in sorted(set(labels.tolist())):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_te = max(1, int(round(len(idx) * test_fraction)))
        if len(idx) - n_te < 1:
            raise TaskUnavailable(f"class {c!r} has {len(idx)} example(s): too few for a train/test split")
        te.append(idx[:n_te])
        tr.append(idx[n_te:])
    return np.concatenate(tr), np.concatenate(te)


def probe_task(feats: Dict[str, np.ndarray], labels: np.ndarray, s: Dict[str, Any], seed: int) -> Dict[str, Any]:
    rng = np.random.default_rng(seed)
    tr, te = stratified_split(labels, float(s["test_fraction"]), rng)
    out: Dict[str, Any] = {"n_train": int(len(tr)), "n_test": int(len(te)), "n_classes": int(len(set(labels)))}
    majority = max(np.mean(labels[te] == c) for c in set(labels[te].tolist()))
    out["chance_acc"] = float(majority)
    for name, key in _REPS:
        res = fit_probe(feats[key][tr], labels[tr], feats[key][te], labels[te], seed=seed, C=float(s["C"]),
                        max_iter=int(s["max_iter"]))
        out[f"{name}_acc"], out[f"{name}_f1"] = res["acc"], res["f1"]
        out[f"{name}_at_chance"] = at_chance([res["acc"]], len(te), majority, float(s["chance_z"]))
    return out


def run_downstream(lm: Any, sae: Any, layer: int, hook: str, seed: int, settings: Dict[str, Any],
                   cache_dir: str | None = None) -> EvalOutput:
    s = settings_dict(DownstreamSettings, settings, "eval.downstream")
    config = {**s, "layer": layer, "hook": hook, "random_seed": seed, "pooling": "mean_non_special"}
    metrics: Dict[str, Dict[str, float]] = {}
    details: List[Dict[str, Any]] = []
    unavailable: Dict[str, str] = {}
    for name in s["tasks"]:
        try:
            task = load_task(name, seed=seed, cache_dir=cache_dir, max_examples=int(s["max_examples"]),
                             packages=s["packages"])
            labels = np.array(task.labels)
            ids, keep = encode_texts(lm, task.texts, int(s["context_size"]))
            feats = pooled_features(lm, sae, ids, keep, layer, hook, int(s["batch_size"]))
            with few_threads():
                res = probe_task(feats, labels, s, stable_seed(seed, name))
        except TaskUnavailable as e:
            log.warning("downstream: %s", e)
            unavailable[name] = str(e)
            continue
        metrics[_category(name)] = {k: res[k] for k in
                                    ("baseline_acc", "sae_acc", "recon_acc", "baseline_f1", "sae_f1", "recon_f1",
                                     "chance_acc")}
        details.append({"task": name, "source": task.source, **res})
    if not details:
        return EvalOutput.skipped(EVAL_TYPE_ID, config, "no downstream task available: " + "; ".join(
            f"{k}: {v}" for k, v in unavailable.items()))
    keys = ("baseline_acc", "sae_acc", "recon_acc", "baseline_f1", "sae_f1", "recon_f1")
    metrics["mean"] = {k: float(np.mean([d[k] for d in details])) for k in keys}
    sae_chance = [d["task"] for d in details if d["sae_at_chance"]]
    metrics["flags"] = {"sae_at_chance_fraction": len(sae_chance) / len(details),
                        "baseline_at_chance_fraction": float(np.mean([d["baseline_at_chance"] for d in details]))}
    flags: Dict[str, Any] = {}
    if sae_chance:
        flags["sae_at_chance_tasks"] = sae_chance
    if unavailable:
        flags["unavailable"] = sorted(unavailable)
    status, reason = "ok", None
    if len(sae_chance) == len(details) and all(d["recon_at_chance"] for d in details):
        status, reason = "failed", ("SAE-latent and reconstruction probes are at chance level on every task "
                                    f"({', '.join(sae_chance)})")
    return EvalOutput(eval_type_id=EVAL_TYPE_ID, config=config, metrics=metrics, details=details, status=status,
                      skip_reason=reason, flags=flags, unstructured={"unavailable": unavailable})


@register_eval("downstream", DownstreamSettings)
def run(ctx: Any) -> EvalOutput:
    return run_downstream(ctx.lm, ctx.sae, ctx.layer, ctx.hook, ctx.seed, ctx.settings, ctx.cache_dir)
