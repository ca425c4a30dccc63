"""`hierarchical`: a ReLU SAE with a scheduled + adaptive L1 and dictionary maintenance.

Mechanisms (each switched by a trainer key):
- `l1_decay`: L1 coefficient falls linearly from `l1_start` (0 means 1/sqrt(d_sae)) over training.
  Fix: it stops at `l1_end_frac * l1_start`, not at zero -- with no penalty at the end a ReLU SAE
  turns dense in its last steps and the saved model is not sparse.
- windowed activation rates: per-latent firing rate over the last complete window of
  `rate_window` steps (logged as `mean_rate`, used to pick the survivor of a merge).
- `resample`: every `resample_every` steps, latents that have not fired for more than
  `resample_after` steps are re-initialised towards the residuals (x - x_hat) of the batch's
  highest-loss inputs, and their Adam moments (rows of W_dec, columns of W_enc, b_enc) are zeroed
  so stale moments do not immediately undo the new direction.
- `adaptive_sparsity`: the penalty is scaled by clamp(target_fvu / fvu, 0.1, 2.0), fvu an EMA of
  the batch fraction of variance unexplained. Fix: the original scaled by recon / target, which
  raises the penalty exactly when reconstruction is already too poor (a runaway to the clamp);
  this way the penalty relaxes when reconstruction misses its target and tightens when it beats it.
- `merge`: every `merge_every` steps, pairs of latents whose decoder rows have cosine >
  `merge_threshold` are merged: decoder directions averaged; encoder weights and biases summed
  (for duplicates that co-fire, f_i + f_j == ReLU((w_i + w_j) x + b_i + b_j), so the merged latent
  keeps their joint contribution -- averaging would halve it); the merged-away latent is
  re-initialised (or, with resampling off, silenced and marked dead).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae_sweep.config import setting

from .autoencoder import SparseAutoencoder
from .trainer import StepOutput, Trainer, TrainerParams, mse_loss
from .registry import register_sae, register_trainer
from .relu import ReLUSAE


@register_sae("hierarchical")
class HierarchicalSAE(ReLUSAE):
    pass


@torch.no_grad()
def reset_adam_state_(optimizer: torch.optim.Optimizer, param: Tensor, index: Tensor, dim: int) -> None:
    """Zero Adam's moments of `param` at `index` along `dim` (rows of W_dec, columns of W_enc)."""
    state = optimizer.state.get(param)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].index_fill_(dim, index, 0.0)


@torch.no_grad()
def high_cosine_pairs(W: Tensor, threshold: float, chunk: int = 4096) -> list[tuple[int, int, float]]:
    """Pairs (i < j) of rows of W [n, d] with cosine > threshold, best first, chunked (no n x n matrix)."""
    Wn = W.float() / W.float().norm(dim=1, keepdim=True).clamp_min(1e-8)
    n = Wn.shape[0]
    found = []
    for start in range(0, n, chunk):
        cos = Wn[start:start + chunk] @ Wn.T
        rows = torch.arange(start, min(start + chunk, n), device=W.device)
        cos = cos.masked_fill(torch.arange(n, device=W.device)[None, :] <= rows[:, None], -2.0)  # j > i only
        i, j = (cos > threshold).nonzero(as_tuple=True)
        found += [(int(a) + start, int(b), float(c)) for a, b, c in zip(i, j, cos[i, j])]
    return sorted(found, key=lambda t: -t[2])


@dataclass
class HierarchicalParams(TrainerParams):
    l1_start: float = setting(0.0, allowed="a float >= 0 (0: 1/sqrt(d_sae))", check=lambda v: v >= 0)
    l1_decay: bool = setting(True, allowed="true or false")
    l1_end_frac: float = setting(0.1, allowed="a float in [0, 1] (final coefficient / l1_start)", check=lambda v: 0 <= v <= 1)
    l1_warmup: float = setting(0.05, allowed="a float in [0, 1] (fraction of training)", check=lambda v: 0 <= v <= 1)
    rate_window: int = setting(100, allowed="an integer >= 1 (steps)", check=lambda v: v >= 1)
    resample: bool = setting(True, allowed="true or false")
    resample_after: int = setting(200, allowed="an integer >= 1 (steps without firing)", check=lambda v: v >= 1)
    resample_every: int = setting(100, allowed="an integer >= 1 (steps)", check=lambda v: v >= 1)
    adaptive_sparsity: bool = setting(True, allowed="true or false")
    target_fvu: float = setting(0.1, allowed="a float in (0, 1] (target fraction of variance unexplained)", check=lambda v: 0 < v <= 1)
    merge: bool = setting(True, allowed="true or false")
    merge_every: int = setting(100, allowed="an integer >= 1 (steps)", check=lambda v: v >= 1)
    merge_threshold: float = setting(0.9, allowed="a float in (0, 1) (decoder cosine)", check=lambda v: 0 < v < 1)


@register_trainer("hierarchical")
class HierarchicalTrainer(Trainer):
    params_cls = HierarchicalParams

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        dev = self.device
        self.steps_since_fired = torch.zeros(self.d_sae, dtype=torch.long, device=dev)
        self.window_counts = torch.zeros(self.d_sae, device=dev)
        self.window_tokens = 0
        self.rates = torch.zeros(self.d_sae, device=dev)  # last complete window
        self.fvu_ema = torch.ones((), device=dev)
        self.n_resampled = 0
        self.n_merged = 0
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # (resid, per-token loss, fired)

    def build_sae(self, generator: torch.Generator) -> SparseAutoencoder:
        return HierarchicalSAE(self.d_in, self.d_sae, generator=generator)

    def l1_base(self) -> float:
        p = self.params
        start = p.l1_start if p.l1_start > 0 else 1.0 / math.sqrt(self.d_sae)
        t = self.step_count / max(1, self.total_steps - 1)
        coeff = start * (1 - (1 - p.l1_end_frac) * t) if p.l1_decay else start
        warm = p.l1_warmup * self.total_steps
        return coeff * (min(1.0, (self.step_count + 1) / warm) if warm > 0 else 1.0)

    def sparsity_scale(self) -> Tensor:
        if not self.params.adaptive_sparsity:
            return torch.ones((), device=self.device)
        return (self.params.target_fvu / self.fvu_ema.clamp_min(1e-8)).clamp(0.1, 2.0)

    def compute_loss(self, x: Tensor) -> StepOutput:
        x_hat, f = self.sae(x)
        mse = mse_loss(x, x_hat)
        l1 = f.sum(-1).mean()
        with torch.no_grad():
            resid = x - x_hat.float()
            fvu = resid.pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
            self.fvu_ema.mul_(0.95).add_(0.05 * fvu)
            scale = self.sparsity_scale()
            coeff = self.l1_base() * scale
        active = f > 0
        fired = active.any(0)
        with torch.no_grad():
            self.window_counts += active.float().sum(0)
            self._last = (resid.detach(), resid.pow(2).sum(-1), fired)
        counters = torch.tensor([float(self.n_resampled), float(self.n_merged)], device=x.device)
        return StepOutput(
            loss=mse + coeff * l1, x_hat=x_hat, l0=active.float().sum(-1).mean(), fired=fired,
            parts={"l1": l1, "l1_coeff": coeff, "sparsity_scale": scale, "fvu_ema": self.fvu_ema.clone(),
                   "mean_rate": self.rates.mean(), "resampled": counters[0], "merged": counters[1]},
        )

    def after_optimizer_step(self) -> None:
        assert self._last is not None
        resid, loss_per_token, fired = self._last
        done = self.step_count + 1  # steps completed including this one
        self.steps_since_fired.add_(1).masked_fill_(fired, 0)
        self.window_tokens += resid.shape[0]
        if done % self.params.rate_window == 0:
            self.rates = self.window_counts / max(1, self.window_tokens)
            self.window_counts.zero_()
            self.window_tokens = 0
        if self.params.merge and done % self.params.merge_every == 0:
            self.merge_duplicates(resid, loss_per_token, fired)
        if self.params.resample and done % self.params.resample_every == 0:
            dead = (self.steps_since_fired > self.params.resample_after).nonzero().flatten()
            if dead.numel():
                self.resample_(dead, resid, loss_per_token)
        self._last = None

    @torch.no_grad()
    def reset_optimizer_rows_(self, idx: Tensor) -> None:
        sae = self.sae
        reset_adam_state_(self.optimizer, sae.W_dec, idx, 0)
        reset_adam_state_(self.optimizer, sae.W_enc, idx, 1)
        reset_adam_state_(self.optimizer, sae.b_enc, idx, 0)

    @torch.no_grad()
    def resample_(self, idx: Tensor, resid: Tensor, loss_per_token: Tensor, count: bool = True) -> None:
        """Point latents `idx` at the residuals of the highest-loss inputs; reset their Adam moments."""
        sae = self.sae
        n = idx.numel()
        order = loss_per_token.argsort(descending=True)
        pick = order[torch.arange(n, device=order.device) % order.numel()]  # wrap if n > batch
        dirs = resid[pick].float()
        dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive = torch.ones(self.d_sae, dtype=torch.bool, device=self.device)
        alive[idx] = False
        # Anthropic: new encoder rows at 0.2 x the mean alive encoder norm, so they start small
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.ones((), device=self.device)
        sae.W_dec[idx] = dirs.to(sae.W_dec.dtype)
        sae.W_enc[:, idx] = (dirs.T * 0.2 * enc_norm).to(sae.W_enc.dtype)
        sae.b_enc[idx] = 0.0
        self.reset_optimizer_rows_(idx)
        self.steps_since_fired[idx] = 0
        self.tokens_since_fired[idx] = 0
        if count:
            self.n_resampled += n

    @torch.no_grad()
    def merge_duplicates(self, resid: Tensor, loss_per_token: Tensor,
                         fired: Tensor | None = None) -> list[tuple[int, int]]:
        """Merge every disjoint pair with decoder cosine > merge_threshold; returns (kept, removed).

        `fired` is this step's StepOutput.fired, which the base step applies to the dead-latent
        counters after this hook: removed latents are cleared from it so they stay marked dead.
        """
        sae = self.sae
        used: set[int] = set()
        merged: list[tuple[int, int]] = []
        for i, j, _ in high_cosine_pairs(sae.W_dec, self.params.merge_threshold):
            if i in used or j in used:
                continue
            used.update((i, j))
            keep, drop = (i, j) if self.rates[i] >= self.rates[j] else (j, i)
            d = sae.W_dec[keep] + sae.W_dec[drop]
            sae.W_dec[keep] = d / d.norm().clamp_min(1e-8)
            sae.W_enc[:, keep] += sae.W_enc[:, drop]
            sae.b_enc[keep] += sae.b_enc[drop]
            merged.append((keep, drop))
        if not merged:
            return merged
        keep_idx = torch.tensor([k for k, _ in merged], device=self.device)
        drop_idx = torch.tensor([d for _, d in merged], device=self.device)
        self.reset_optimizer_rows_(keep_idx)
        if self.params.resample:
            self.resample_(drop_idx, resid, loss_per_token, count=False)  # counted as merges
        else:  # silence it: zero encoder -> never fires; counted dead until something revives it
            g = torch.Generator().manual_seed(self.seed + self.step_count)  # reproducible on resume
            fresh = torch.randn(drop_idx.numel(), self.d_in, generator=g).to(sae.W_dec)
            sae.W_dec[drop_idx] = fresh / fresh.norm(dim=1, keepdim=True)  # no longer a duplicate
            sae.W_enc[:, drop_idx] = 0.0
            sae.b_enc[drop_idx] = -1.0
            self.reset_optimizer_rows_(drop_idx)
            self.tokens_since_fired[drop_idx] = self.params.dead_tokens
            if fired is not None:
                fired[drop_idx] = False
        self.n_merged += len(merged)
        return merged

    def extra_state(self) -> dict[str, Any]:
        return {"steps_since_fired": self.steps_since_fired.clone(), "window_counts": self.window_counts.clone(),
                "window_tokens": self.window_tokens, "rates": self.rates.clone(), "fvu_ema": self.fvu_ema.clone(),
                "n_resampled": self.n_resampled, "n_merged": self.n_merged}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        for key in ("steps_since_fired", "window_counts", "rates", "fvu_ema"):
            getattr(self, key).copy_(state[key].to(self.device))
        self.window_tokens = int(state["window_tokens"])
        self.n_resampled = int(state["n_resampled"])
        self.n_merged = int(state["n_merged"])
