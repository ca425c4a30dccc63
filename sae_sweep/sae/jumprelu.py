"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope).

f_i(x) = pre_i * H(pre_i - theta_i), theta_i = exp(log_threshold_i) > 0. The step H has zero
gradient almost everywhere, so theta is trained with straight-through estimators whose
pseudo-derivative uses a rectangle kernel K(u) = 1{|u| < 1/2} of width `bandwidth` eps:

    d JumpReLU / d theta = -(theta / eps) K((pre - theta) / eps)
    d H(pre - theta) / d theta = -(1 / eps) K((pre - theta) / eps)

Loss = ||x - x_hat||^2 + sparsity, with sparsity either `l0_coeff * L0` (L0 = sum_i H, the paper)
or, when `target_l0 > 0`, `l0_coeff * (L0 / target_l0 - 1)^2` (drives the mean L0 to a target).
The coefficient ramps from 0 over `sparsity_warmup` of training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sae_sweep.config import setting

from .autoencoder import SparseAutoencoder
from .registry import register_sae, register_trainer
from .relu import linear_ramp
from .trainer import StepOutput, Trainer, TrainerParams, mse_loss


def rectangle(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta); grads: H w.r.t. pre, -(theta/eps) K((pre-theta)/eps) w.r.t. theta."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        g_pre = grad * (pre > theta)
        g_theta = (grad * -(theta / eps) * rectangle((pre - theta) / eps)).sum(0)
        return g_pre, g_theta, None


class _Step(torch.autograd.Function):
    """H(pre - theta); no grad w.r.t. pre, -(1/eps) K((pre-theta)/eps) w.r.t. theta."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        g_theta = (grad * -(1.0 / eps) * rectangle((pre - theta) / eps)).sum(0)
        return None, g_theta, None


@register_sae("jumprelu")
class JumpReLUSAE(SparseAutoencoder):
    activation_fn_str = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, *, threshold_init: float = 0.05, **kwargs: Any):
        super().__init__(d_in, d_sae, **kwargs)
        p = self.W_dec
        self.log_threshold = nn.Parameter(
            torch.full((self.d_sae,), math.log(threshold_init), device=p.device, dtype=p.dtype)
        )
        self.bandwidth = 1e-3  # only used by training-time gradients; set by the trainer

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def saelens_form(self) -> tuple[str, str, dict, Tensor | None]:
        return "jumprelu", "relu", {}, self.threshold.detach().clone()

    def activation(self, pre: Tensor) -> Tensor:
        return _JumpReLU.apply(pre, self.threshold.to(pre.dtype), self.bandwidth)

    def step_fn(self, pre: Tensor) -> Tensor:
        return _Step.apply(pre, self.threshold.to(pre.dtype), self.bandwidth)


@dataclass
class JumpReLUParams(TrainerParams):
    bandwidth: float = setting(
        0.001, allowed="a float > 0 (STE kernel width, in activation units)", check=lambda v: v > 0
    )
    threshold_init: float = setting(
        0.1, allowed="a float > 0 (initial threshold, in activation units)", check=lambda v: v > 0
    )
    l0_coeff: float = setting(1.0, allowed="a float >= 0", check=lambda v: v >= 0)
    target_l0: float = setting(
        0.0, allowed="a float >= 0 (0: penalise L0 itself; > 0: penalise (L0/target - 1)^2)", check=lambda v: v >= 0
    )
    sparsity_warmup: float = setting(
        0.05, allowed="a float in [0, 1] (fraction of training)", check=lambda v: 0 <= v <= 1
    )


@register_trainer("jumprelu")
class JumpReLUTrainer(Trainer):
    params_cls = JumpReLUParams

    def build_sae(self, generator: torch.Generator) -> SparseAutoencoder:
        sae = JumpReLUSAE(self.d_in, self.d_sae, threshold_init=self.params.threshold_init, generator=generator)
        sae.bandwidth = self.params.bandwidth
        return sae

    def compute_loss(self, x: Tensor) -> StepOutput:
        sae: JumpReLUSAE = self.sae  # type: ignore[assignment]
        pre = sae.pre_acts(x)
        f = sae.activation(pre)
        x_hat = sae.decode(f)
        mse = mse_loss(x, x_hat)
        l0 = sae.step_fn(pre).sum(-1).mean()  # differentiable (STE) w.r.t. the thresholds only
        if self.params.target_l0 > 0:
            sparsity = (l0 / self.params.target_l0 - 1).pow(2)
        else:
            sparsity = l0
        coeff = self.params.l0_coeff * linear_ramp(self.step_count, self.total_steps, self.params.sparsity_warmup)
        active = f > 0
        return StepOutput(
            loss=mse + coeff * sparsity,
            x_hat=x_hat,
            l0=l0.detach(),
            fired=active.any(0),
            parts={
                "sparsity": sparsity,
                "sparsity_coeff": torch.full((), coeff, device=x.device),
                "mean_threshold": sae.threshold.detach().mean(),
            },
        )
