"""Known-answer eval for `dataset=synthetic`: how well the SAE recovers the planted dictionary.

Reports, on held-out samples: mean max cosine between true features and learned decoder rows,
the fraction of features recovered above 0.9, explained variance (centred), L0 and dead fraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae_sweep.activations.synthetic import PlantedDictionary
from sae_sweep.evals.registry import register_eval
from sae_sweep.evals.schema import EvalOutput
from sae_sweep.util.metrics import Metric


@dataclass
class RecoverySettings:
    """``eval.recovery`` (no settings: held-out samples come from ``dataset.eval_tokens``)."""


# What the eval logs (flattened as recovery/<category>/<metric>), on dataset.eval_tokens held-out
# samples of the planted (synthetic) distribution.
_THIS = "this project (known-answer eval)"
METRICS = (
    Metric(
        "recovery/recovery/mean_max_cos",
        "planted recovery (mean max cos)",
        "higher",
        "cosine",
        "Mean over the planted dictionary's features of the best cosine similarity with any learned decoder "
        "row. 1: every planted feature has a matching latent.",
        _THIS,
    ),
    Metric(
        "recovery/recovery/frac_recovered_0_9",
        "planted features recovered (cos > 0.9)",
        "higher",
        "fraction of planted features",
        "Fraction of planted features whose best decoder-row cosine exceeds 0.9.",
        _THIS,
    ),
    Metric(
        "recovery/recovery/frac_recovered_0_7",
        "planted features recovered (cos > 0.7)",
        "higher",
        "fraction of planted features",
        "Fraction of planted features whose best decoder-row cosine exceeds 0.7.",
        _THIS,
    ),
    Metric(
        "recovery/reconstruction_quality/explained_variance",
        "explained variance (centred)",
        "higher",
        "fraction of variance about the mean",
        "1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the held-out samples (a run at or below 0 fails).",
        _THIS,
    ),
    Metric(
        "recovery/reconstruction_quality/mse",
        "MSE per element",
        "lower",
        "squared activation",
        "Mean over samples and dimensions of (x - x_hat)^2.",
        _THIS,
    ),
    Metric(
        "recovery/sparsity/l0",
        "L0",
        None,
        "active latents per sample",
        "Mean over held-out samples of the number of latents with activation > 0. Compare with the planted "
        "L0 (dataset.l0).",
        _THIS,
    ),
    Metric(
        "recovery/misc_metrics/frac_alive",
        "alive latents",
        "higher",
        "fraction of latents",
        "Fraction of latents with activation > 0 on at least one held-out sample.",
        _THIS,
    ),
    Metric(
        "recovery/misc_metrics/dead_fraction",
        "dead latents",
        "lower",
        "fraction of latents",
        "1 - frac_alive: latents that never fire on the held-out samples.",
        _THIS,
    ),
)


@register_eval("recovery", RecoverySettings, METRICS)
def run(ctx: Any) -> EvalOutput:
    x = ctx.activations
    if x is None or ctx.planted is None:
        return EvalOutput.skipped("synthetic_recovery", {}, "no planted dictionary: dataset is not synthetic")
    x = x.float()
    x_hat, f = ctx.sae(x)
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    fired = f > 0
    rec = recovery_metrics(ctx.sae.W_dec, ctx.planted, thresholds=(0.9, 0.7))
    metrics = {
        "recovery": {
            "mean_max_cos": rec["mean_max_cos"],
            "frac_recovered_0_9": rec["frac_recovered_0.9"],
            "frac_recovered_0_7": rec["frac_recovered_0.7"],
        },
        "reconstruction_quality": {
            "explained_variance": float(1 - resid / total),
            "mse": float((x - x_hat).pow(2).mean()),
        },
        "sparsity": {"l0": float(fired.sum(1).float().mean())},
        "misc_metrics": {
            "frac_alive": float(fired.any(0).float().mean()),
            "dead_fraction": float(1 - fired.any(0).float().mean()),
        },
    }
    config = {"n_samples": int(x.shape[0]), "n_features": int(ctx.planted.n_features), "d": int(ctx.planted.d)}
    return EvalOutput("synthetic_recovery", config, metrics)


@torch.no_grad()
def recovery_metrics(
    W_dec_learned: Tensor, true_dict: Tensor | PlantedDictionary, thresholds: tuple[float, ...] = (0.9,)
) -> dict[str, float]:
    """How well learned decoder rows [d_sae, d] recover the true features [n_features, d].

    For every true feature, its best cosine similarity with any learned row:
    `mean_max_cos` averages it; `frac_recovered_<t>` is the fraction with max cos > t.
    """
    true = true_dict.dictionary if isinstance(true_dict, PlantedDictionary) else true_dict
    learned = W_dec_learned.detach().float().cpu()
    true = true.detach().float().cpu()
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    true = true / true.norm(dim=1, keepdim=True).clamp_min(1e-12)
    max_cos = (true @ learned.T).max(dim=1).values
    out = {"mean_max_cos": float(max_cos.mean())}
    for t in thresholds:
        out[f"frac_recovered_{t}"] = float((max_cos > t).float().mean())
    return out
