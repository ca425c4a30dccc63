"""`temporal_ortho`: TopK SAE with a co-activation penalty weighted by how stable each pair is.

loss = ||x - x_hat||^2 + auxk_alpha * AuxK + l1_coeff * L1(f) + ortho_coeff * sum_{i != j} w_ij |f_i^T f_j| / B

where f_i is latent i's activations over the batch. Per pair, c_ij is the co-activation rate in
the current window of `window` steps and c̄_ij a running average updated at each window's end with
rate alpha_ij = min(0.1, freq_ij / 1000) (freq_ij: windows in which the pair co-fired). The pair
weight is w_ij = c_ij (1 + |c_ij - c̄_ij| / max(c_ij, c̄_ij)): frequent pairs are discouraged,
more so when their co-activation is unstable.

Memory. The original keeps dense d_sae x d_sae matrices (16 GiB each at d_sae 65536, fp32). Here
`CoactivationTable` keeps, per latent, a fixed number `cap` of partner slots (partner id, current
count, running average, frequency, weight): O(d_sae * cap) whatever d_sae is. When a latent's
slots are full, a new partner evicts the weakest resident (expected count this window) only if it
co-fired more often in the batch. Pairs never tracked have weight 0 (not penalised).

Fixes to the original description:
- i == j is excluded (f_i^T f_i is an L2 penalty on activations, not a co-activation);
- the penalty is divided by the batch size (otherwise its scale changes with batch_size);
- weights are statistics (no gradient) and come from the last completed window, so the penalty
  does not move while a window fills;
- a pair's first observed rate initialises c̄ (with c̄ = 0 and alpha ~ 1/1000, every new pair
  would look maximally unstable and c̄ would take thousands of windows to mean anything).
Pairs are found by binary search in a sorted key index (row * d_sae + partner), rebuilt when
partners change, so per-step transients are O(B k^2) and the index O(d_sae * cap). Tracking needs
host syncs (boolean indexing, unique) once per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae_sweep.config import setting

from .autoencoder import SparseAutoencoder
from .trainer import StepOutput, mse_loss
from .registry import register_sae, register_trainer
from .topk import TopKParams, TopKSAE, TopKTrainer


class CoactivationTable:
    """Bounded per-latent table of co-activating partners (see module docstring)."""

    FIELDS = ("partner", "cur", "avg", "freq", "weight")

    def __init__(self, d_sae: int, cap: int, device: Any = "cpu"):
        self.d_sae, self.cap = int(d_sae), int(cap)
        shape = (self.d_sae, self.cap)
        self.partner = torch.full(shape, -1, dtype=torch.int32, device=device)  # -1: empty slot
        self.cur = torch.zeros(shape, dtype=torch.float32, device=device)  # co-fire count, this window
        self.avg = torch.zeros(shape, dtype=torch.float32, device=device)  # c̄: running average rate
        self.freq = torch.zeros(shape, dtype=torch.int32, device=device)  # windows the pair co-fired
        self.weight = torch.zeros(shape, dtype=torch.float32, device=device)  # w from the last window
        self.window_tokens = 0
        self._rebuild_index()

    def nbytes(self) -> int:
        """Persistent tracking state: the slot fields plus the sorted lookup index."""
        return sum(getattr(self, f).nbytes for f in self.FIELDS) + self._sorted.nbytes + self._perm.nbytes

    @torch.no_grad()
    def observe(self, idx: Tensor, active: Tensor) -> None:
        """Count co-activations of a batch's codes: idx [B, k] latent ids, active [B, k] bool."""
        B, k = idx.shape
        self.window_tokens += B
        eye = torch.eye(k, dtype=torch.bool, device=idx.device)
        ok = active[:, :, None] & active[:, None, :] & ~eye
        keys = (idx[:, :, None].long() * self.d_sae + idx[:, None, :].long())[ok]
        if keys.numel() == 0:
            return
        uniq, counts = keys.unique(return_counts=True)
        counts = counts.float()
        found, flat = self._lookup(uniq)
        self.cur.view(-1).index_add_(0, flat[found], counts[found])
        new = ~found
        self._insert(uniq[new] // self.d_sae, (uniq[new] % self.d_sae).to(torch.int32), counts[new])

    def _rebuild_index(self) -> None:
        """Sorted pair keys (row * d_sae + partner) -> flat slot, for O(log) lookups without a
        d_sae x d_sae structure. Rebuilt whenever partners change."""
        rows = torch.arange(self.d_sae, device=self.partner.device, dtype=torch.long)[:, None]
        keys = torch.where(self.partner >= 0, rows * self.d_sae + self.partner.long(),
                           torch.full_like(rows, self.d_sae * self.d_sae))  # sentinel: past any key
        self._sorted, self._perm = keys.flatten().sort()

    def _lookup(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """(tracked? bool, flat slot index) for pair keys of any shape."""
        pos = torch.searchsorted(self._sorted, keys).clamp_max(self._sorted.numel() - 1)
        return self._sorted[pos] == keys, self._perm[pos]

    def _insert(self, rows: Tensor, cols: Tensor, counts: Tensor) -> None:
        """Place new pairs into their row's weakest slots, best newcomers first."""
        if rows.numel() == 0:
            return
        # sort by row, then count descending; rank = position within the row's run
        order = torch.argsort(rows * (counts.max().long() + 1) + (counts.max().long() - counts.long()))
        rows, cols, counts = rows[order], cols[order], counts[order]
        urows, inverse, per_row = rows.unique_consecutive(return_inverse=True, return_counts=True)
        first = torch.cumsum(per_row, 0) - per_row
        rank = torch.arange(rows.numel(), device=rows.device) - first[inverse]
        keep = rank < self.cap
        rows, cols, counts, rank, inverse = rows[keep], cols[keep], counts[keep], rank[keep], inverse[keep]
        # resident strength: expected count this window; empty slots lose to anything
        strength = torch.where(self.partner[urows] < 0, torch.full_like(self.cur[urows], -1.0),
                               self.cur[urows] + self.avg[urows] * self.window_tokens)
        weakest = strength.argsort(dim=1)  # [R, cap], weakest first
        slot = weakest[inverse, rank]
        win = counts > strength[inverse, slot]
        rows, cols, counts, slot = rows[win], cols[win], counts[win], slot[win]
        self.partner[rows, slot] = cols
        self.cur[rows, slot] = counts
        self.avg[rows, slot] = 0.0
        self.freq[rows, slot] = 0
        self.weight[rows, slot] = 0.0
        self._rebuild_index()

    @torch.no_grad()
    def end_window(self, max_alpha: float = 0.1, alpha_div: float = 1000.0) -> None:
        """Close the window: weights from this window's rates, then update the running averages."""
        valid = self.partner >= 0
        c = self.cur / max(1, self.window_tokens)
        seen = self.cur > 0
        first = valid & seen & (self.freq == 0)
        c_bar = torch.where(first, c, self.avg)
        denom = torch.maximum(c, c_bar).clamp_min(1e-12)
        self.weight = torch.where(valid, c * (1 + (c - c_bar).abs() / denom), torch.zeros_like(c))
        self.freq += (valid & seen).int()
        alpha = (self.freq.float() / alpha_div).clamp(max=max_alpha)
        self.avg = torch.where(first, c, torch.where(valid, (1 - alpha) * self.avg + alpha * c, self.avg))
        self.cur.zero_()
        self.window_tokens = 0

    def pair_weights(self, idx: Tensor) -> Tensor:
        """w for every ordered pair of a token's latents: idx [B, k] -> [B, k, k] (0 if untracked, i==j)."""
        keys = idx[:, :, None].long() * self.d_sae + idx[:, None, :].long()
        hit, flat = self._lookup(keys)
        w = torch.where(hit, self.weight.view(-1)[flat], torch.zeros((), device=idx.device))
        return w * ~torch.eye(idx.shape[1], dtype=torch.bool, device=idx.device)

    def state_dict(self) -> dict[str, Any]:
        return {**{f: getattr(self, f).clone() for f in self.FIELDS}, "window_tokens": self.window_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in self.FIELDS:
            setattr(self, f, state[f].to(getattr(self, f).device))
        self.window_tokens = int(state["window_tokens"])
        self._rebuild_index()


def ortho_penalty(vals: Tensor, idx: Tensor, table: CoactivationTable) -> Tensor:
    """sum_{i != j} w_ij f_i^T f_j / B over a TopK code (vals, idx [B, k]); grads flow into vals."""
    w = table.pair_weights(idx)
    v = vals.float()
    return (w * v[:, :, None] * v[:, None, :]).sum() / vals.shape[0]


@register_sae("temporal_ortho")
class TemporalOrthoSAE(TopKSAE):
    """A TopK SAE saved under its own architecture name (TopKSAE.forward takes [..., d_in])."""


@dataclass
class TemporalOrthoParams(TopKParams):
    ortho_coeff: float = setting(1.0, allowed="a float >= 0 (lambda2, co-activation penalty)", check=lambda v: v >= 0)
    l1_coeff: float = setting(0.0, allowed="a float >= 0 (lambda1, L1 on activations)", check=lambda v: v >= 0)
    window: int = setting(20, allowed="an integer >= 1 (steps per co-activation window)", check=lambda v: v >= 1)
    cap: int = setting(32, allowed="an integer >= 1 (tracked partners per latent)", check=lambda v: v >= 1)


@register_trainer("temporal_ortho")
class TemporalOrthoTrainer(TopKTrainer):
    params_cls = TemporalOrthoParams

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.table = CoactivationTable(self.d_sae, self.params.cap, self.device)

    def build_sae(self, generator: torch.Generator) -> SparseAutoencoder:
        return TemporalOrthoSAE(self.d_in, self.d_sae, int(self.sae_cfg["k"]), generator=generator)

    def compute_loss(self, x: Tensor) -> StepOutput:
        sae: TemporalOrthoSAE = self.sae  # type: ignore[assignment]
        vals, idx, pre = sae.encode_sparse(x)
        active = vals > 0
        self.table.observe(idx, active)
        if (self.step_count + 1) % self.params.window == 0:
            self.table.end_window()
        x_hat = sae.decode_sparse(vals, idx)
        mse = mse_loss(x, x_hat)
        l1 = vals.float().sum(-1).mean()
        ortho = ortho_penalty(vals, idx, self.table)
        fired = torch.zeros(self.d_sae, device=x.device).scatter_add_(
            0, idx.reshape(-1), active.float().reshape(-1)) > 0
        if self.params.auxk_alpha > 0 and self.tokens_seen >= self.params.dead_tokens:
            auxk = self.auxk_loss(x - x_hat.detach(), pre, self.dead_mask())
        else:
            auxk = torch.zeros((), device=x.device)
        p = self.params
        loss = mse + p.auxk_alpha * auxk + p.l1_coeff * l1 + p.ortho_coeff * ortho
        return StepOutput(loss=loss, x_hat=x_hat, l0=active.float().sum(-1).mean(), fired=fired,
                          parts={"auxk": auxk, "l1": l1, "ortho": ortho,
                                 "tracked_pairs": (self.table.partner >= 0).float().sum()})

    def extra_state(self) -> dict[str, Any]:
        return {"table": self.table.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            self.table.load_state_dict(state["table"])


def measure_memory(d_sae: int = 65536, cap: int = 32, batch: int = 1024, k: int = 32, steps: int = 5,
                   seed: int = 0) -> dict[str, Any]:
    """Tracking memory at `d_sae`: state bytes, and peak RSS growth over `steps` observe + window +
    penalty (forward and backward) updates on random TopK codes; no SAE is built or trained.
    Run it in a fresh process so the peak is not some earlier allocation's."""
    import resource

    def maxrss_mib() -> float:  # ru_maxrss is KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def run(n: int, n_steps: int) -> CoactivationTable:
        g = torch.Generator().manual_seed(seed)
        table = CoactivationTable(n, cap)
        for _ in range(n_steps):
            # uniform random codes: ~B k^2 new pairs per step, so slots fill and then evict
            idx = torch.randint(0, n, (batch, k), generator=g)
            vals = torch.rand(batch, k, generator=g, requires_grad=True)
            table.observe(idx, vals > 0)
            table.end_window()
            ortho_penalty(vals, idx, table).backward()
        return table

    run(1024, 2)  # warm-up: lazy kernel/library initialisation is not tracking memory
    before = maxrss_mib()
    table = run(d_sae, steps)
    after = maxrss_mib()
    return {
        "d_sae": d_sae, "cap": cap, "batch": batch, "k": k,
        "state_MiB": table.nbytes() / 2**20,
        "tracked_pairs": int((table.partner >= 0).sum()),
        "peak_rss_growth_MiB": after - before,
        "peak_rss_MiB": after,
        "dense_one_matrix_MiB": d_sae * d_sae * 4 / 2**20,
    }
