"""`adaptive_ortho`: an SAE with a decoder orthogonality loss that allows controlled sharing.

Write-up 002: "Adaptive Orthogonal Feature Learning for Optimal Knowledge Separation" (not part
of the repository; `002:L24` is its line 24 as `cat -n` numbers it). It has no code
and no formula, and none of its runs trained: every result, the baseline's included, logs
`'training_steps': 0, 'final_loss': None` (L10, L14, L23, L32, L34, L44, L54, L64, L74, L84), yet
the prose reports training and its effects (L18, L26-27). What it does fix is the design of Runs
1-2: the base SAE is ReLU + L1 (`'activation_fn_str': 'relu'`, `'sparsity_penalty': 0.04`,
`'dict_size': 2304`, `'layer': 19`, `'learning_rate': 0.0003` in every result line); "the
orthogonality constraint was applied to decoder weights" (L16); and alpha is the orthogonality
*loss weight*: "Adaptive Orthogonality Loss (α=0.1)" (L13), "Reduced orthogonality loss weight to
α=0.05 to allow more feature sharing" (L24), "Feature sharing was controlled through α" (L17).

`trainer.mode=published` is that design, with these readings:

- loss = mean_tokens |x - x_hat|_2 + 0.04 * mean_tokens sum_i f_i + alpha * O, alpha = ortho_coeff 0.1
  (Run 1; Run 2: 0.05). The reconstruction term is the *unsquared* norm: the 0.04 is the
  `sparsity_penalty` of the ReLU trainer ('Custom', L10) of the template these logs were produced
  with, whose loss is `linalg.norm(x - x_hat, dim=-1).mean() + l1_penalty * |f|_1`; the write-up's
  sibling 001 confirms the scale (its ReLU baseline's final loss 100.09, 001:L34, is the unsquared
  norm of its MSE: sqrt(4.4375 x 2304) = 101).
- O = mean over ordered pairs i != j of cos^2(W_dec[i], W_dec[j]) (the formula is never given:
  the plainest "orthogonality loss on decoder weights").
- alpha fixed: the title's "adaptive" first appears as Run 5's dynamic alpha, whose rule is not
  given (L45, L49). No grouping: "batch-wise feature grouping with periodic updates" (L3, Run 3,
  L31-32) is described by no rule or period. No AuxK (a TopK mechanism).

The default `trainer.mode=corrected` is the project's variant (a TopK SAE; penalty computed inside
groups of similar decoder directions, with a free band for sharing, on latents active in the batch,
with an adaptive per-latent strength):

    O = sum over pairs (i, j) in the same group, at least one of them active in the batch, of
        s_ij * relu(|cos(W_dec[i], W_dec[j])| - sharing)^2, divided by d_sae.

Each difference is a key (null = the mode's value; an explicit value overrides either mode):

- `base` `topk` (published `relu`): L0 is set by k instead of found by an L1 coefficient that the
  write-up never trained (0 steps); AuxK revives dead latents. `l1_coeff` null means 0.04 with
  `base=relu`, 0 with `base=topk`. Measured on the planted dictionary of `sae_sweep.bench.trainers`
  (d 32, 64 features, d_sae 128, 600 steps): the published design comes out dense (L0 56.6 of 128,
  no planted feature recovered); published with `base=topk` recovers all of them. On the tiny
  model (default budget) the published SAE has L0 222 of 512.
- `recon` `sum_sq` (published `l2_norm`): sum_d (x - x_hat)^2, the loss of every other trainer here;
  the unsquared norm's gradient has unit size whatever the error.
- `sharing` 0.3 (published 0): decoder cosines below `sharing` are not penalised, so the term acts
  on near-duplicates only. With d_sae > d_in the rows cannot all be orthogonal: the mean of cos^2
  over pairs is at least (d_sae - d_in) / (d_in (d_sae - 1)) (the Welch bound, about 1/d_in, which
  random directions already nearly meet), so the published O mostly pushes on the many small
  overlaps that features in superposition need. Note the direction: a larger `sharing` allows more
  sharing, while in the write-up a smaller alpha does (L24). Planted: corrected with `sharing=0`
  recovers 95 % of the features and explains 0.83 of the variance, against 100 % and 0.87 with 0.3.
- `ortho_coeff` 1.0 (published alpha = 0.1): the weight of the project's penalty, on its own scale.
- `grouping` true (published false): a full d_sae x d_sae Gram matrix is 16 GiB at d_sae 65,536
  (`grouping=false` is refused above d_sae 8,192). Latents are grouped by decoder direction (a few
  spherical k-means iterations, then cut into equal chunks of `group_size` in cluster order),
  refreshed every `regroup_every` steps; the loss is computed inside groups only, where the
  near-duplicates are, averaged with a second chunking shifted by half a group so a chunk boundary
  never hides a pair of neighbours.
- `batchwise` true (published false): only pairs with a latent active in the batch count, so
  latents that get no reconstruction gradient are not pushed around by this term alone.
- `adaptive` true (published false): s_ij = mean of s_i, s_j, s_i = clamp(r_i / mean r, 0.1, 10), r
  an EMA (`rate_beta`) of firing rates: overlapping latents that fire often interfere most.
- `ortho_reduce` `per_latent` (published `pair_mean`): the sum over pairs divided by d_sae rather than
  by the number of pairs, so the term does not shrink as groups grow.

Logged (`train/<name>`): ortho, alpha (the weight in use), ortho_weighted, l1 (ReLU base), auxk
(TopK base), the decoder cosines within groups (group_cos_mean, group_cos_max: all pairs when not
grouping; share_above, the share of pairs above `sharing`), n_groups, regroups (cumulative),
strength_mean and strength_max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_sweep.config import setting

from .autoencoder import SparseAutoencoder
from .modes import Correction, by_mode, mode_setting, resolve
from .registry import register_sae, register_trainer
from .topk import TopKParams, TopKSAE, TopKTrainer
from .trainer import StepOutput, mse_loss

UNGROUPED_MAX_D_SAE = 8192  # grouping=false: d_sae x d_sae cosines and their gradient (256 MiB each here)
BASES = ("relu", "topk")

CORRECTIONS = {
    "base": Correction("relu", "topk", "L0 set by k instead of an L1 coefficient the write-up never trained"),
    "recon": Correction(
        "l2_norm",
        "sum_sq",
        "the squared error of every other trainer; the norm's gradient has unit size whatever the error",
    ),
    "sharing": Correction(
        0.0, 0.3, "with d_sae > d_in rows cannot all be orthogonal (Welch bound): penalise near-duplicates only"
    ),
    "ortho_coeff": Correction(0.1, 1.0, "the weight of the project's penalty, on its own scale"),
    "grouping": Correction(False, True, "a full Gram matrix is 16 GiB at d_sae 65,536"),
    "batchwise": Correction(False, True, "do not move latents that get no reconstruction gradient"),
    "adaptive": Correction(False, True, "Run 5's dynamic alpha has no rule; strength from firing rates"),
    "ortho_reduce": Correction("pair_mean", "per_latent", "the term does not shrink as groups grow"),
}


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


def grouped_ortho_terms(
    W_dec: Tensor, order: Tensor, group_size: int, sharing: float, weight: Tensor, active: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(sum over ordered same-group pairs i != j of weight_ij * active_ij * relu(|cos_ij| - sharing)^2,
    number of such pairs, [mean |cos|, max |cos|, share above sharing] over them, no gradient).

    weight [d_sae]: per-latent strength s (pair strength is its mean); active [d_sae] bool."""
    n, d = W_dec.shape
    n_groups = math.ceil(n / group_size)
    pad = n_groups * group_size - n
    Wn = F.normalize(W_dec.float(), dim=1)[order]
    s, a = weight[order].float(), active[order].float()
    real = torch.ones(n, device=W_dec.device)
    if pad:
        Wn = torch.cat([Wn, Wn.new_zeros(pad, d)])  # zero rows: cosine 0, never penalised
        s, a, real = (torch.cat([t, t.new_zeros(pad)]) for t in (s, a, real))
    Wg = Wn.view(n_groups, group_size, d)
    cos = Wg @ Wg.transpose(1, 2)  # [G, g, g]
    excess = (cos.abs() - sharing).relu().pow(2)
    sg, ag, rg = s.view(n_groups, group_size), a.view(n_groups, group_size), real.view(n_groups, group_size)
    pair_w = 0.5 * (sg[:, :, None] + sg[:, None, :])
    pair_on = torch.maximum(ag[:, :, None], ag[:, None, :])
    pairs = rg[:, :, None] * rg[:, None, :] * (1.0 - torch.eye(group_size, device=W_dec.device))
    total = (excess * pair_w * pair_on * pairs).sum()
    n_pairs = pairs.sum()
    with torch.no_grad():
        c = cos.detach().abs() * pairs
        stats = torch.stack(
            [c.sum() / n_pairs.clamp_min(1), c.max(), ((c > sharing).float() * pairs).sum() / n_pairs.clamp_min(1)]
        )
    return total, n_pairs, stats


def grouped_ortho_loss(
    W_dec: Tensor,
    order: Tensor,
    group_size: int,
    sharing: float,
    weight: Tensor,
    active: Tensor,
    reduce: str = "per_latent",
) -> Tensor:
    """`per_latent`: the sum over same-group pairs of weight_ij * active_ij * relu(|cos_ij| - sharing)^2
    divided by d_sae (each unordered pair counted once); `pair_mean`: the mean over ordered pairs."""
    total, n_pairs, _ = grouped_ortho_terms(W_dec, order, group_size, sharing, weight, active)
    if reduce == "pair_mean":
        return total / n_pairs.clamp_min(1)
    return total / (2 * W_dec.shape[0])


@register_sae("adaptive_ortho")
class AdaptiveOrthoSAE(TopKSAE):
    """A TopK SAE (`base=topk`) or a ReLU SAE (`base=relu`, the write-up's), saved under its own
    architecture name with `base` in cfg.json (missing in older files: topk)."""

    extra_cfg_keys = ("k", "base")

    def __init__(self, d_in: int, d_sae: int, k: int, base: str = "topk", **kwargs: Any):
        super().__init__(d_in, d_sae, k, **kwargs)
        if base not in BASES:
            raise ValueError(f"base={base!r}: allowed: {', '.join(BASES)}")
        self.base = base
        self.activation_fn_str = "topk" if base == "topk" else "relu"

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> AdaptiveOrthoSAE:
        return cls(int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["k"]), base=cfg.get("base", "topk"), **kwargs)

    def saelens_form(self) -> tuple[str, str, dict, Tensor | None]:
        return super().saelens_form() if self.base == "topk" else ("standard", "relu", {}, None)

    def activation(self, pre: Tensor) -> Tensor:
        return super().activation(pre) if self.base == "topk" else pre.relu()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return super().forward(x) if self.base == "topk" else SparseAutoencoder.forward(self, x)


@dataclass
class AdaptiveOrthoParams(TopKParams):
    mode: str = mode_setting()
    base: Optional[str] = by_mode(CORRECTIONS, "base", "", options=BASES)
    recon: Optional[str] = by_mode(CORRECTIONS, "recon", "", options=("l2_norm", "sum_sq"))
    l1_coeff: Optional[float] = setting(
        None,
        allowed="null (0.04, the write-up's, with base=relu; 0 with base=topk) or a float >= 0",
        check=lambda v: v >= 0,
    )
    ortho_coeff: Optional[float] = by_mode(
        CORRECTIONS, "ortho_coeff", "a float >= 0 (the write-up's alpha)", check=lambda v: v >= 0
    )
    sharing: Optional[float] = by_mode(
        CORRECTIONS, "sharing", "a float in [0, 1) (|cos| below this is not penalised)", check=lambda v: 0 <= v < 1
    )
    ortho_reduce: Optional[str] = by_mode(CORRECTIONS, "ortho_reduce", "", options=("pair_mean", "per_latent"))
    grouping: Optional[bool] = by_mode(CORRECTIONS, "grouping", "true or false")
    group_size: int = setting(256, allowed="an integer >= 2 (latents per group)", check=lambda v: v >= 2)
    regroup_every: int = setting(100, allowed="an integer >= 1 (steps)", check=lambda v: v >= 1)
    batchwise: Optional[bool] = by_mode(CORRECTIONS, "batchwise", "true or false")
    adaptive: Optional[bool] = by_mode(CORRECTIONS, "adaptive", "true or false")
    rate_beta: float = setting(
        0.99, allowed="a float in [0, 1) (EMA decay of firing rates)", check=lambda v: 0 <= v < 1
    )

    def shape_problems(self, d_in: int, d_sae: int) -> list[str]:
        if not resolve(self, CORRECTIONS).grouping and d_sae > UNGROUPED_MAX_D_SAE:
            return [
                f"trainer.grouping={self.grouping!r} (mode={self.mode}: false) at d_sae={d_sae}: the loss then "
                f"needs d_sae x d_sae decoder cosines ({4 * d_sae**2 / 2**30:.1f} GiB each); allowed: "
                f"d_sae <= {UNGROUPED_MAX_D_SAE}, or trainer.grouping=true"
            ]
        return []


@register_trainer("adaptive_ortho")
class AdaptiveOrthoTrainer(TopKTrainer):
    params_cls = AdaptiveOrthoParams

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        o = self.opt
        dev = self.device
        self.rates = torch.full((self.d_sae,), 1.0 / self.d_sae, device=dev)
        self.group = min(self.params.group_size, self.d_sae) if o.grouping else self.d_sae
        self.order = (
            group_by_direction(self.sae.W_dec, self.params.group_size, seed=self.seed)
            if o.grouping
            else torch.arange(self.d_sae, device=dev)
        )
        self.n_regroups = 0
        self._n_groups = torch.full((), float(math.ceil(self.d_sae / self.group)), device=dev)
        self._regroups = torch.zeros((), device=dev)

    @property
    def opt(self) -> Any:
        # resolved on first use: build_sae (inside Trainer.__init__) already needs `base`
        if "_opt" not in self.__dict__:
            self._opt = resolve(self.params, CORRECTIONS)
            self._opt.l1_coeff = (
                self.params.l1_coeff
                if self.params.l1_coeff is not None
                else (0.04 if self._opt.base == "relu" else 0.0)
            )
        return self._opt

    def build_sae(self, generator: torch.Generator) -> SparseAutoencoder:
        return AdaptiveOrthoSAE(self.d_in, self.d_sae, int(self.sae_cfg["k"]), base=self.opt.base, generator=generator)

    def strength(self) -> Tensor:
        if not self.opt.adaptive:
            return torch.ones(self.d_sae, device=self.device)
        return (self.rates / self.rates.mean().clamp_min(1e-12)).clamp(0.1, 10.0)

    def ortho_terms(self, fired: Tensor) -> tuple[Tensor, Tensor]:
        """(O, cosine stats). With grouping: the mean over two chunkings of the grouped order, the
        second shifted by half a group: neighbours in the order (near-duplicates sort next to each
        other) that a chunk boundary separates in one chunking share a chunk in the other."""
        o = self.opt
        g = self.group
        s = self.strength()
        on = fired if o.batchwise else torch.ones_like(fired)

        def one(order: Tensor) -> tuple[Tensor, Tensor]:
            total, n_pairs, stats = grouped_ortho_terms(self.sae.W_dec, order, g, o.sharing, s, on)
            loss = total / n_pairs.clamp_min(1) if o.ortho_reduce == "pair_mean" else total / (2 * self.d_sae)
            return loss, stats

        loss, stats = one(self.order)
        if g < self.d_sae:
            loss2, stats2 = one(self.order.roll(-(g // 2)))
            loss = 0.5 * (loss + loss2)
            stats = torch.stack(
                [0.5 * (stats[0] + stats2[0]), torch.maximum(stats[1], stats2[1]), 0.5 * (stats[2] + stats2[2])]
            )
        return loss, stats

    def ortho_loss(self, fired: Tensor) -> Tensor:
        return self.ortho_terms(fired)[0]

    def compute_loss(self, x: Tensor) -> StepOutput:
        sae: AdaptiveOrthoSAE = self.sae  # type: ignore[assignment]
        o, p = self.opt, self.params
        if o.grouping and self.step_count % p.regroup_every == 0 and self.step_count > 0:
            self.order = group_by_direction(sae.W_dec, p.group_size, seed=self.seed + self.step_count)
            self.n_regroups += 1
            self._regroups = torch.full((), float(self.n_regroups), device=x.device)
        zero = torch.zeros((), device=x.device)
        if o.base == "topk":
            vals, idx, pre = sae.encode_sparse(x)
            x_hat = sae.decode_sparse(vals, idx)
            active = vals > 0
            counts = torch.zeros(self.d_sae, device=x.device).scatter_add_(
                0, idx.reshape(-1), active.float().reshape(-1)
            )
            l1 = vals.float().sum(-1).mean()
        else:
            x_hat, f = sae(x)
            active = f > 0
            counts = active.float().sum(0)
            l1 = f.float().sum(-1).mean()
        fired = counts > 0
        recon = mse_loss(x, x_hat) if o.recon == "sum_sq" else (x.float() - x_hat.float()).norm(dim=-1).mean()
        with torch.no_grad():
            b = p.rate_beta
            self.rates.mul_(b).add_((1 - b) * counts / x.shape[0])
        ortho, cos_stats = self.ortho_terms(fired)
        if o.base == "topk" and p.auxk_alpha > 0 and self.tokens_seen >= p.dead_tokens:
            auxk = self.auxk_loss(x - x_hat.detach(), pre, self.dead_mask())
        else:
            auxk = zero
        loss = recon + p.auxk_alpha * auxk + o.l1_coeff * l1 + o.ortho_coeff * ortho
        s = self.strength()
        return StepOutput(
            loss=loss,
            x_hat=x_hat,
            l0=active.float().sum(-1).mean(),
            fired=fired,
            parts={
                "auxk": auxk,
                "l1": l1,
                "ortho": ortho,
                "alpha": torch.full((), o.ortho_coeff, device=x.device),
                "ortho_weighted": o.ortho_coeff * ortho.detach(),
                "group_cos_mean": cos_stats[0],
                "group_cos_max": cos_stats[1],
                "share_above": cos_stats[2],
                "n_groups": self._n_groups,
                "regroups": self._regroups,
                "strength_mean": s.mean(),
                "strength_max": s.max(),
            },
        )

    def extra_state(self) -> dict[str, Any]:
        return {"rates": self.rates.clone(), "order": self.order.clone(), "n_regroups": self.n_regroups}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            self.rates.copy_(state["rates"].to(self.device))
            self.order = state["order"].to(self.device)
            self.n_regroups = int(state.get("n_regroups", 0))
            self._regroups = torch.full((), float(self.n_regroups), device=self.device)
