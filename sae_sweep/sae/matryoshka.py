"""Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries.

The first m_1 < m_2 < ... < m_n = d_sae latents must each reconstruct x on their own:
loss = sum_j ||x - (f[:, :m_j] @ W_dec[:m_j] + b_dec)||^2 (+ AuxK). Early latents are pushed
to carry general features and later ones refine them, which counters feature absorption.
The code f comes from BatchTopK (default) or per-token TopK over the whole dictionary; the
prefix sizes grow geometrically: m_j = d_sae / prefix_ratio^(n_prefixes - 1 - j).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae_sweep.config import choice, setting

from .autoencoder import SparseAutoencoder
from .batchtopk import BatchTopKParams, BatchTopKSAE, BatchTopKTrainer
from .registry import register_sae, register_trainer
from .trainer import StepOutput, mse_loss

INNER = ("batchtopk", "topk")


def prefix_sizes(d_sae: int, n_prefixes: int, ratio: float) -> list[int]:
    """Increasing, distinct prefix sizes ending at d_sae (duplicates from rounding dropped)."""
    sizes = [max(1, int(round(d_sae / ratio ** (n_prefixes - 1 - j)))) for j in range(n_prefixes)]
    sizes[-1] = d_sae
    return sorted(set(sizes))


@register_sae("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    """A BatchTopK SAE whose inner rule may also be per-token TopK (`inner`, saved in cfg.json)."""

    extra_cfg_keys = ("k", "inner")

    def __init__(self, d_in: int, d_sae: int, k: int, inner: str = "batchtopk", **kwargs: Any):
        super().__init__(d_in, d_sae, k, **kwargs)
        if inner not in INNER:
            raise ValueError(f"inner={inner!r}; allowed: {', '.join(INNER)}")
        self.inner = inner

    def activation(self, pre: Tensor) -> Tensor:
        if self.inner == "topk" or (self.inference == "topk" and not self.training):
            return super(BatchTopKSAE, self).activation(pre)  # TopKSAE's per-token rule
        return super().activation(pre)


@dataclass
class MatryoshkaParams(BatchTopKParams):
    inner: str = choice("batchtopk", INNER)
    n_prefixes: int = setting(4, allowed="an integer >= 1 (number of nested dictionaries)", check=lambda v: v >= 1)
    prefix_ratio: float = setting(
        2.0, allowed="a float > 1 (size ratio between consecutive prefixes)", check=lambda v: v > 1
    )


@register_trainer("matryoshka")
class MatryoshkaTrainer(BatchTopKTrainer):
    params_cls = MatryoshkaParams

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.prefixes = prefix_sizes(self.d_sae, self.params.n_prefixes, self.params.prefix_ratio)

    def build_sae(self, generator: torch.Generator) -> SparseAutoencoder:
        return MatryoshkaSAE(
            self.d_in, self.d_sae, int(self.sae_cfg["k"]), inner=self.params.inner, generator=generator
        )

    def compute_loss(self, x: Tensor) -> StepOutput:
        sae: MatryoshkaSAE = self.sae  # type: ignore[assignment]
        if sae.inner == "batchtopk":
            pre, f = self.encode_train(x)
        else:
            pre = sae.pre_acts(x)
            f = super(BatchTopKSAE, sae).activation(pre)
        # cumulative reconstructions: each prefix adds its group's contribution to the previous one
        parts: dict[str, Tensor] = {}
        loss = torch.zeros((), device=x.device)
        x_hat = sae.b_dec.expand_as(x)
        start = 0
        for m in self.prefixes:
            x_hat = x_hat + f[:, start:m] @ sae.W_dec[start:m]
            err = mse_loss(x, x_hat)
            parts[f"mse_prefix_{m}"] = err
            loss = loss + err
            start = m
        auxk = self.aux_parts(x, x_hat, pre)
        parts["auxk"] = auxk
        parts["threshold"] = sae.threshold.detach().clone()
        active = f > 0
        return StepOutput(
            loss=loss + self.params.auxk_alpha * auxk,
            x_hat=x_hat,
            l0=active.float().sum(-1).mean(),
            fired=active.any(0),
            parts=parts,
        )
