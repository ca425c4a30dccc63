"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training: keep the k*B largest ReLU'd pre-activations over the whole batch [B, d_sae], so the
average L0 is k but a token may use more or fewer latents. That rule depends on the batch, so for
inference the SAE keeps a single learned threshold: a running average (EMA) of the smallest
activation that survived the batch top-k. In eval mode, `encode` keeps pre-activations above it
(a JumpReLU with one shared threshold), which is per-token and batch independent.
Loss = ||x - x_hat||^2 + auxk_alpha * AuxK (the TopK trainer's dead-latent auxiliary loss).

FaithfulSAE evaluates its BatchTopK SAEs as per-token TopK SAEs of the same k (its
``scripts/convert.py:29-47`` loads every SAE into SAELens as ``architecture="topk"`` with
``k = top_k``): :func:`per_token_topk` gives that inference rule for the length of an eval, so the
metrics under FaithfulSAE's names come from the latents FaithfulSAE's code would see.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae_sweep.config import setting

from .autoencoder import SparseAutoencoder
from .registry import register_sae, register_trainer
from .topk import TopKParams, TopKSAE, TopKTrainer
from .trainer import StepOutput, mse_loss


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """Dense code keeping the k * B largest ReLU'd entries of `pre` [B, d_sae] (others 0)."""
    acts = pre.relu()
    flat = acts.flatten()
    vals, idx = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)


@register_sae("batchtopk")
class BatchTopKSAE(TopKSAE):
    activation_fn_str = "batchtopk"
    threshold: Tensor  # a registered buffer (saved with the weights)

    def __init__(self, d_in: int, d_sae: int, k: int, **kwargs: Any):
        super().__init__(d_in, d_sae, k, **kwargs)
        # < 0 until the trainer has an estimate; saved with the weights (it is part of the model)
        p = self.W_dec
        self.register_buffer("threshold", torch.tensor(-1.0, device=p.device, dtype=torch.float32))

    # "threshold": the learned threshold (this SAE's inference rule); "topk": per-token TopK of k
    inference: str = "threshold"

    def activation(self, pre: Tensor) -> Tensor:
        if self.training:
            return batch_topk(pre, self.k)
        if self.inference == "topk" or float(self.threshold) < 0:  # never calibrated: per-token TopK
            return super().activation(pre)
        return pre * (pre > self.threshold.to(pre.dtype))

    def saelens_form(self) -> tuple[str, str, dict, Tensor | None]:
        # Inference is the eval-mode rule: one learned threshold on every latent (a JumpReLU);
        # never calibrated, or a per-token TopK inner rule (matryoshka): TopK.
        if getattr(self, "inner", "batchtopk") == "topk" or float(self.threshold) < 0:
            return "topk", "topk", {"k": self.k}, None
        return "jumprelu", "relu", {}, torch.full((self.d_sae,), float(self.threshold), dtype=self.W_dec.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.encode(x)  # dense: the batch rule does not give a fixed k per row
        return self.decode(f), f

    @torch.no_grad()
    def update_threshold_(self, f: Tensor, beta: float) -> None:
        """EMA of the smallest positive activation kept in this batch (no host sync)."""
        smallest = f.masked_fill(f <= 0, float("inf")).min()
        ok = torch.isfinite(smallest)
        new = torch.where(self.threshold < 0, smallest, beta * self.threshold + (1 - beta) * smallest)
        self.threshold.copy_(torch.where(ok, new, self.threshold))


@contextmanager
def per_token_topk(sae: Any) -> Iterator[None]:
    """Inside the block a BatchTopK SAE (matryoshka included) encodes as a per-token TopK of its k, as
    FaithfulSAE evaluates it; any other SAE is unchanged."""
    if not isinstance(sae, BatchTopKSAE):
        yield
        return
    before = sae.inference
    sae.inference = "topk"
    try:
        yield
    finally:
        sae.inference = before


@dataclass
class BatchTopKParams(TopKParams):
    threshold_beta: float = setting(
        0.99, allowed="a float in [0, 1) (EMA decay of the inference threshold)", check=lambda v: 0 <= v < 1
    )
    threshold_start: float = setting(
        0.1,
        allowed="a float in [0, 1] (fraction of training before the threshold estimate starts)",
        check=lambda v: 0 <= v <= 1,
    )


@register_trainer("batchtopk")
class BatchTopKTrainer(TopKTrainer):
    params_cls = BatchTopKParams
    sae_cls: type = BatchTopKSAE
    sae: BatchTopKSAE  # built by build_sae

    def build_sae(self, generator: torch.Generator) -> SparseAutoencoder:
        return self.sae_cls(self.d_in, self.d_sae, int(self.sae_cfg["k"]), generator=generator)

    def threshold_active(self) -> bool:
        # early codes change fast; an EMA started then would be dominated by stale values
        return self.step_count >= self.params.threshold_start * self.total_steps

    def encode_train(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pre [B, d_sae], f [B, d_sae]) under the batch top-k rule; updates the threshold."""
        sae: BatchTopKSAE = self.sae
        pre = sae.pre_acts(x)
        f = batch_topk(pre, sae.k)
        if self.threshold_active():
            sae.update_threshold_(f.detach().float(), self.params.threshold_beta)
        return pre, f

    def aux_parts(self, x: Tensor, x_hat: Tensor, pre: Tensor) -> Tensor:
        if self.params.auxk_alpha > 0 and self.tokens_seen >= self.params.dead_tokens:
            return self.auxk_loss(x - x_hat.detach(), pre, self.dead_mask())
        return torch.zeros((), device=x.device)

    def compute_loss(self, x: Tensor) -> StepOutput:
        pre, f = self.encode_train(x)
        x_hat = self.sae.decode(f)
        mse = mse_loss(x, x_hat)
        auxk = self.aux_parts(x, x_hat, pre)
        active = f > 0
        return StepOutput(
            loss=mse + self.params.auxk_alpha * auxk,
            x_hat=x_hat,
            l0=active.float().sum(-1).mean(),
            fired=active.any(0),
            parts={"auxk": auxk, "threshold": self.sae.threshold.detach().clone()},
        )
