"""ReLU SAE with an L1 penalty (Bricken et al. 2023; Conerly et al. 2024 "April update").

f(x) = ReLU((x - b_dec) @ W_enc + b_enc); loss = ||x - x_hat||^2 + l1_coeff(t) * sum_i f_i * w_i,
where l1_coeff ramps linearly from 0 over the first `l1_warmup` fraction of training (a full
penalty from step 0 kills latents before they find features) and w_i = 1, or ||W_dec[i]|| when
`decoder_norm_l1` (the April update: decoder rows are then left free and the penalty is on the
latent's contribution to x_hat, so shrinking f while growing the row no longer dodges it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from sae_sweep.config import setting

from .autoencoder import SparseAutoencoder
from .registry import register_sae, register_trainer
from .trainer import StepOutput, Trainer, TrainerParams, mse_loss


@register_sae("relu")
class ReLUSAE(SparseAutoencoder):
    activation_fn_str = "relu"

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def saelens_form(self) -> tuple[str, str, dict, Tensor | None]:
        return "standard", "relu", {}, None

    @torch.no_grad()
    def fold_decoder_norms_(self) -> None:
        """Make decoder rows unit norm without changing x_hat (scale f by the row norms instead).

        ReLU is positively homogeneous, so f_i * W_dec[i] == (n_i f_i) * (W_dec[i] / n_i).
        """
        n = self.W_dec.norm(dim=1).clamp_min(1e-8)
        self.W_enc.mul_(n)
        self.b_enc.mul_(n)
        self.W_dec.div_(n[:, None])

    def save(self, directory: str | os.PathLike, cfg: Mapping[str, Any] | None = None) -> Path:
        # Saved SAEs have unit-norm decoder rows (SAELens/SAEBench convention) even when trained free.
        self.fold_decoder_norms_()
        return super().save(directory, cfg)


@dataclass
class ReLUParams(TrainerParams):
    l1_coeff: float = setting(0.1, allowed="a float >= 0", check=lambda v: v >= 0)
    l1_warmup: float = setting(0.05, allowed="a float in [0, 1] (fraction of training)", check=lambda v: 0 <= v <= 1)
    decoder_norm_l1: bool = setting(False, allowed="true or false")


def linear_ramp(step: int, total_steps: int, frac: float) -> float:
    """0 -> 1 linearly over the first `frac` of `total_steps` (1 throughout when frac == 0)."""
    n = frac * total_steps
    return 1.0 if n <= 0 else min(1.0, (step + 1) / n)


@register_trainer("relu")
class ReLUTrainer(Trainer):
    params_cls = ReLUParams
    sae_cls: type = ReLUSAE

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Free decoder norms only when the penalty accounts for them (instance attribute: the base
        # step reads self.unit_norm_decoder).
        self.unit_norm_decoder = not self.params.decoder_norm_l1

    def build_sae(self, generator: torch.Generator) -> SparseAutoencoder:
        return self.sae_cls(self.d_in, self.d_sae, generator=generator)

    def l1_coeff(self) -> float:
        """Coefficient for the current step (host float: a function of the step count only)."""
        return self.params.l1_coeff * linear_ramp(self.step_count, self.total_steps, self.params.l1_warmup)

    def l1_term(self, f: Tensor) -> Tensor:
        """Mean over tokens of sum_i f_i * w_i (w_i = decoder row norm when decoder_norm_l1)."""
        if self.params.decoder_norm_l1:
            return (f * self.sae.W_dec.norm(dim=1)).sum(-1).mean()
        return f.sum(-1).mean()

    def compute_loss(self, x: Tensor) -> StepOutput:
        x_hat, f = self.sae(x)
        mse = mse_loss(x, x_hat)
        l1 = self.l1_term(f)
        coeff = self.l1_coeff()
        active = f > 0
        return StepOutput(
            loss=mse + coeff * l1,
            x_hat=x_hat,
            l0=active.float().sum(-1).mean(),
            fired=active.any(0),
            parts={"l1": l1, "l1_coeff": torch.full((), coeff, device=x.device)},  # a fill: no upload
        )
