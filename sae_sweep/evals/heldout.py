"""Held-out curves during training: the core eval's numbers on a small fixed held-out batch.

The job measures a :class:`HeldoutBatch` every ``train.eval_every_tokens`` training tokens (through the
training loop's ``on_eval`` seam: the loop never imports evals) and logs the result as ``heldout/*``
at the training step, so overfitting to a repeated cache or a late collapse shows as a curve. Every
number is the core eval's own definition (its ``CoreAccumulator``, splice and per-position KL/CE,
as ``run_core_eval`` on the first ``train.heldout_tokens`` tokens of the eval split in one batch);
on planted activations (no LM) only the reconstruction and sparsity ones apply.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Optional

import torch

from sae_sweep.evals.core import CoreAccumulator, downstream_per_position, keep_mask, splice_keep_special
from sae_sweep.sae.autoencoder import forward_tokens
from sae_sweep.util.metrics import Metric

# heldout/<name> <- core/<category>/<metric>
FROM_CORE = {
    "explained_variance": ("reconstruction_quality", "explained_variance_centred"),
    "mse_per_token": ("reconstruction_quality", "mse_per_token"),
    "l0": ("sparsity", "l0"),
    "kl_div_score": ("model_behavior_preservation", "kl_div_score"),
    "ce_loss_score": ("model_performance_preservation", "ce_loss_score"),
}
# What an SAE's reconstruction alone gives (planted activations: no LM, no CE/KL).
RECONSTRUCTION_ONLY = ("explained_variance", "mse_per_token", "l0")

_THIS = "this project (held-out curves; the core eval's definitions)"
_WHEN = (
    " Measured every train.eval_every_tokens training tokens on the first train.heldout_tokens tokens of the "
    "eval split (the same batch each time), logged at the training step."
)
METRICS = (
    Metric(
        "heldout/explained_variance",
        "held-out explained variance",
        "higher",
        "fraction of variance about the mean",
        "core/reconstruction_quality/explained_variance_centred on the held-out batch." + _WHEN,
        _THIS,
    ),
    Metric(
        "heldout/mse_per_token",
        "held-out MSE per token",
        "lower",
        "squared activation norm",
        "core/reconstruction_quality/mse_per_token on the held-out batch." + _WHEN,
        _THIS,
    ),
    Metric(
        "heldout/l0",
        "held-out L0",
        None,
        "active latents per token",
        "core/sparsity/l0 on the held-out batch (the SAE in inference mode)." + _WHEN,
        _THIS,
    ),
    Metric(
        "heldout/dead_frac",
        "latents silent on the held-out batch",
        "lower",
        "fraction of latents",
        "1 - core/misc_metrics/frac_alive on the held-out batch: latents that fire on none of its tokens. "
        "A small batch leaves rare latents silent too, so compare it along the curve, not with train/dead_frac."
        + _WHEN,
        _THIS,
    ),
    Metric(
        "heldout/kl_div_score",
        "held-out KL score",
        "higher",
        "fraction of KL recovered",
        "core/model_behavior_preservation/kl_div_score on the held-out batch (LM data only)." + _WHEN,
        _THIS,
    ),
    Metric(
        "heldout/ce_loss_score",
        "held-out CE score",
        "higher",
        "fraction of CE recovered",
        "core/model_performance_preservation/ce_loss_score on the held-out batch (LM data only)." + _WHEN,
        _THIS,
    ),
    Metric(
        "heldout/seconds",
        "held-out evaluation time",
        None,
        "seconds",
        "Wall time of one held-out evaluation (left out of train/tokens_per_s).",
        _THIS,
    ),
)


def _picked(core: dict[str, dict[str, float]], names: tuple[str, ...]) -> dict[str, float]:
    out = {name: float(core[cat][key]) for name, (cat, key) in FROM_CORE.items() if name in names}
    out["dead_frac"] = 1.0 - float(core["misc_metrics"]["frac_alive"])
    return {k: v for k, v in out.items() if math.isfinite(v)}  # NaN never reaches the store


class HeldoutBatch:
    """A fixed held-out batch and what on it does not depend on the SAE, computed once: the hooked
    activations, and with an LM the clean logits and the zero-ablation KL and CE. Each
    :meth:`measure` then pays for the SAE and one spliced forward only. The numbers are the core
    eval's on this batch (``run_core_eval`` with ``batch_size`` = the batch's windows).

    ``tokens [N, ctx]`` through ``lm`` at ``(layer, hook)``, ``special_token_ids`` left out of every
    average (the core eval's default: SAEBench's BOS/EOS/PAD); or, with no LM, ``activations
    [n, d_in]`` (planted data: reconstruction and sparsity only)."""

    @torch.no_grad()
    def __init__(
        self,
        lm: Any = None,
        tokens: Optional[torch.Tensor] = None,
        layer: int = 0,
        hook: str = "resid_post",
        special_token_ids: Iterable[int] = (),
        activations: Optional[torch.Tensor] = None,
    ):
        self.lm, self.layer, self.hook = lm, layer, hook
        self.tokens: Optional[torch.Tensor] = None  # None: planted activations, no LM
        if lm is not None and tokens is not None:
            self.tokens = tokens.long().to(getattr(lm, "device", None) or tokens.device)
            self.keep = keep_mask(self.tokens, special_token_ids)
            self.x = lm.activations(self.tokens, layer, hook)
            self.clean = lm.logits_with_splice(self.tokens, layer, hook, None)
            ablated = lm.logits_with_splice(self.tokens, layer, hook, torch.zeros_like)
            self.kl_abl, self.ce_clean, self.ce_abl = downstream_per_position(self.clean, ablated, self.tokens)
        elif activations is not None:
            self.x = activations[None]  # one "context" of every row, all scored
            self.keep = torch.ones(self.x.shape[:2], dtype=torch.bool, device=activations.device)
        else:
            raise ValueError("a held-out batch needs an LM with tokens, or activations")

    @torch.no_grad()
    def measure(self, sae: Any) -> dict[str, float]:
        """``heldout/<name>`` values (without the prefix) of ``sae`` in inference mode; the SAE's
        train/eval mode is restored."""
        was_training = sae.training
        sae.eval()
        try:
            dtype = next(sae.parameters()).dtype

            def run_sae(act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return forward_tokens(sae, act.to(dtype))

            acc = CoreAccumulator()
            x_hat, f = run_sae(self.x)
            acc.update_reconstruction(self.x, x_hat, f, self.keep)
            del x_hat, f
            if self.tokens is None:
                return _picked(acc.compute(), RECONSTRUCTION_ONLY)

            def splice(act: torch.Tensor) -> torch.Tensor:
                return splice_keep_special(act, self.keep.to(act.device), run_sae(act)[0])

            spliced = self.lm.logits_with_splice(self.tokens, self.layer, self.hook, splice)
            kl_sae, _, ce_sae = downstream_per_position(self.clean, spliced, self.tokens)
            acc.update_downstream(self.keep, kl_sae, self.kl_abl, self.ce_clean, ce_sae, self.ce_abl)
            return _picked(acc.compute(), tuple(FROM_CORE))
        finally:
            sae.train(was_training)
