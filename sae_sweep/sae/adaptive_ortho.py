"""`adaptive_ortho`: TopK SAE with a decoder orthogonality loss that allows controlled sharing.

loss = ||x - x_hat||^2 + auxk_alpha * AuxK + ortho_coeff * O, with

    O = sum over pairs (i, j) in the same group, at least one of them active in the batch, of
        s_ij * relu(|cos(W_dec[i], W_dec[j])| - sharing)^2, divided by d_sae.

- Controlled sharing: pairs whose decoder cosine is below `sharing` are not penalised, so
  features may overlap a little (true features in superposition do: d_sae >> d_in).
- Grouping: a full d_sae x d_sae Gram matrix is too big, so latents are grouped by decoder
  direction (a few spherical k-means iterations, then cut into equal chunks of `group_size` in
  cluster order), refreshed every `regroup_every` steps; the loss is computed inside groups only,
  where the near-duplicates are (averaged with a second chunking shifted by half a group, so a
  chunk boundary never hides a pair of neighbours). Batch-wise: only pairs with a latent active in the current batch
  count, so inactive latents (which get no reconstruction gradient) are not pushed around.
- Adaptive strength: with `adaptive`, s_ij = clamp((r_i + r_j) / (2 mean r), 0.1, 10) from
  per-latent firing rates r (EMA over steps): overlapping latents that fire often interfere most
  with each other's reconstructions, rare ones barely. Otherwise s_ij = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_sweep.config import setting

from .autoencoder import SparseAutoencoder
from .trainer import StepOutput, mse_loss
from .registry import register_sae, register_trainer
from .topk import TopKParams, TopKSAE, TopKTrainer


@torch.no_grad()
def group_by_direction(W: Tensor, group_size: int, iters: int = 5, seed: int = 0) -> Tensor:
    """A permutation of the rows of W [n, d] whose consecutive `group_size` chunks hold similar
    directions (spherical k-means with ceil(n / group_size) centroids, rows sorted by cluster)."""
    n = W.shape[0]
    n_groups = math.ceil(n / group_size)
    if n_groups <= 1:
        return torch.arange(n, device=W.device)
    Wn = F.normalize(W.float(), dim=1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    centroids = Wn[torch.randperm(n, generator=g)[:n_groups].to(W.device)]
    for _ in range(iters):
        assign = (Wn @ centroids.T).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, Wn)
        empty = sums.norm(dim=1) < 1e-8
        centroids = torch.where(empty[:, None], centroids, F.normalize(sums, dim=1))
    # stable sort by cluster, ties by cosine to the centroid, so chunks cut clusters coherently
    score = (Wn * centroids[assign]).sum(1)
    return torch.argsort(assign.double() * 4 - score.double())


def grouped_ortho_loss(W_dec: Tensor, order: Tensor, group_size: int, sharing: float,
                       weight: Tensor, active: Tensor) -> Tensor:
    """sum over same-group pairs of weight_ij * active_ij * relu(|cos_ij| - sharing)^2 / d_sae.

    weight [d_sae]: per-latent strength s (pair strength is its mean); active [d_sae] bool.
    """
    n, d = W_dec.shape
    n_groups = math.ceil(n / group_size)
    pad = n_groups * group_size - n
    Wn = F.normalize(W_dec.float(), dim=1)[order]
    s, a = weight[order].float(), active[order].float()
    if pad:
        Wn = torch.cat([Wn, Wn.new_zeros(pad, d)])  # zero rows: cosine 0, never penalised
        s, a = torch.cat([s, s.new_zeros(pad)]), torch.cat([a, a.new_zeros(pad)])
    Wg = Wn.view(n_groups, group_size, d)
    cos = Wg @ Wg.transpose(1, 2)  # [G, g, g]
    excess = (cos.abs() - sharing).relu().pow(2)
    sg, ag = s.view(n_groups, group_size), a.view(n_groups, group_size)
    pair_w = 0.5 * (sg[:, :, None] + sg[:, None, :])
    pair_on = torch.maximum(ag[:, :, None], ag[:, None, :])
    offdiag = 1.0 - torch.eye(group_size, device=W_dec.device)
    return (excess * pair_w * pair_on * offdiag).sum() / (2 * n)  # each unordered pair counted twice


@register_sae("adaptive_ortho")
class AdaptiveOrthoSAE(TopKSAE):
    """A TopK SAE saved under its own architecture name (TopKSAE.forward takes [..., d_in])."""


@dataclass
class AdaptiveOrthoParams(TopKParams):
    ortho_coeff: float = setting(1.0, allowed="a float >= 0", check=lambda v: v >= 0)
    sharing: float = setting(0.3, allowed="a float in [0, 1) (|cos| below this is not penalised)", check=lambda v: 0 <= v < 1)
    group_size: int = setting(256, allowed="an integer >= 2 (latents per group)", check=lambda v: v >= 2)
    regroup_every: int = setting(100, allowed="an integer >= 1 (steps)", check=lambda v: v >= 1)
    adaptive: bool = setting(True, allowed="true or false")
    rate_beta: float = setting(0.99, allowed="a float in [0, 1) (EMA decay of firing rates)", check=lambda v: 0 <= v < 1)


@register_trainer("adaptive_ortho")
class AdaptiveOrthoTrainer(TopKTrainer):
    params_cls = AdaptiveOrthoParams

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.rates = torch.full((self.d_sae,), 1.0 / self.d_sae, device=self.device)
        self.order = group_by_direction(self.sae.W_dec, self.params.group_size, seed=self.seed)

    def build_sae(self, generator: torch.Generator) -> SparseAutoencoder:
        return AdaptiveOrthoSAE(self.d_in, self.d_sae, int(self.sae_cfg["k"]), generator=generator)

    def strength(self) -> Tensor:
        if not self.params.adaptive:
            return torch.ones(self.d_sae, device=self.device)
        return (self.rates / self.rates.mean().clamp_min(1e-12)).clamp(0.1, 10.0)

    def ortho_loss(self, fired: Tensor) -> Tensor:
        """Mean over two chunkings of the grouped order, the second shifted by half a group:
        neighbours in the order (near-duplicates sort next to each other) that a chunk boundary
        separates in one chunking share a chunk in the other."""
        p = self.params
        g = min(p.group_size, self.d_sae)
        s = self.strength()
        loss = grouped_ortho_loss(self.sae.W_dec, self.order, g, p.sharing, s, fired)
        if g < self.d_sae:
            shifted = self.order.roll(-(g // 2))
            loss = 0.5 * (loss + grouped_ortho_loss(self.sae.W_dec, shifted, g, p.sharing, s, fired))
        return loss

    def compute_loss(self, x: Tensor) -> StepOutput:
        sae: AdaptiveOrthoSAE = self.sae  # type: ignore[assignment]
        if self.step_count % self.params.regroup_every == 0 and self.step_count > 0:
            self.order = group_by_direction(sae.W_dec, self.params.group_size, seed=self.seed + self.step_count)
        vals, idx, pre = sae.encode_sparse(x)
        x_hat = sae.decode_sparse(vals, idx)
        mse = mse_loss(x, x_hat)
        active = vals > 0
        counts = torch.zeros(self.d_sae, device=x.device).scatter_add_(0, idx.reshape(-1), active.float().reshape(-1))
        fired = counts > 0
        with torch.no_grad():
            b = self.params.rate_beta
            self.rates.mul_(b).add_((1 - b) * counts / x.shape[0])
        ortho = self.ortho_loss(fired)
        if self.params.auxk_alpha > 0 and self.tokens_seen >= self.params.dead_tokens:
            auxk = self.auxk_loss(x - x_hat.detach(), pre, self.dead_mask())
        else:
            auxk = torch.zeros((), device=x.device)
        loss = mse + self.params.auxk_alpha * auxk + self.params.ortho_coeff * ortho
        return StepOutput(loss=loss, x_hat=x_hat, l0=active.float().sum(-1).mean(), fired=fired,
                          parts={"auxk": auxk, "ortho": ortho})

    def extra_state(self) -> dict[str, Any]:
        return {"rates": self.rates.clone(), "order": self.order.clone()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            self.rates.copy_(state["rates"].to(self.device))
            self.order = state["order"].to(self.device)
