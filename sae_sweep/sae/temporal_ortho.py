"""`temporal_ortho`: TopK SAE with a co-activation penalty weighted by how stable each pair is.

Write-up 001: "Memory-Efficient Temporal Analysis for Feature Separation" (not part of the
repository; `001:L81` is its line 81 as `cat -n` numbers it), an aider log with the code it ran
(tracker L79-136, device fixes L262-271 and L321, loss L195-200) and one reported run (Run 1, L339).

Shared by both modes. Per pair (i, j), c_ij is the pair's co-activation rate in the current window
(co-firing tokens / tokens) and c̄_ij its running average, updated when a window closes:
c̄ <- (1 - alpha) c̄ + alpha c. The pair weight is w_ij = c_ij (1 + |c_ij - c̄_ij| / max(c_ij, c̄_ij))
("higher weight = more unstable = needs more orthogonality pressure", L134). Weights carry no
gradient. loss = ||x - x_hat||^2 + auxk_alpha * AuxK + l1_coeff * L1 + ortho_coeff * O.

`trainer.mode=published` is the code that produced Run 1:

- O = mean over all F^2 pairs (i, j), the diagonal included, of w_ij (f_i^T f_j / B)^2, where f is the
  dense [B, F] TopK code (L197-200: `feature_dots = einsum('bi,bj->ij', f, f) / B`,
  `(stability_weights * feature_dots.pow(2)).mean()`), with ortho_coeff = `ortho_weight` 0.1 (L339).
- Dense F x F tracker (`running_avg`, `current_window`, L87-88), c̄ starting at 0; window of 1000
  *samples* (`window_count += B`, L102; `window_size=1000`, L81); a token counts a pair when both
  latents are among its top k, whatever their values (`masks.scatter_(1, top_indices, 1)`, L96-100).
- alpha_i = min(0.1, p_i / 1000) per row, p_i latent i's firing rate in the closing window
  (`freq = diag(norm_coact)`, L110-111, L321): at most 1e-3, so the 0.1 cap never binds, and c̄ is
  asymmetric (row i moves at latent i's rate).
- The tracker's `update` runs inside the loss, before the penalty (L196), and the weights are
  recomputed from the state it leaves (L120-136): from the partial window if it has samples,
  else from c̄ itself.
- That last rule is the published tracker's bug. When the batch is at least the window (the
  write-up's 2048 >= 1000, and Run 2's planned 2000, L464), every update closes the window and
  resets it to empty, so `get_stability_weights` compares c̄ with itself: stability is exactly 0
  and w = c̄ at every step. c̄ is a lagged rate (after n windows of a steady rate c it is
  c (1 - (1 - alpha)^n): 8 % of c after Run 1's 2,441 steps at its mean firing rate 160/4608), so
  Run 1's penalty was weighted by a small fraction of each pair's co-activation rate, with no
  stability term at all. Below the window size the weights jump between the partial window's and
  c̄ every ceil(window / B) steps. `trainer.mode=published` reproduces this (tests pin it);
  `train/stab_zero_frac` = 1 in the logs shows it.

The idea text states a different loss, "L = L_recon + lambda_1 L_sparse + lambda_2 sum_(i,j) w_ij
|f_i^T f_j|" with "alpha_ij = min(0.1, freq_ij / 1000)" (L19); the code above is what ran.

The default `trainer.mode=corrected` changes these keys (null = the mode's value; an explicit value
overrides either mode):

- `weights_from` `closed` (published `live`): weights come from the window that just closed, compared
  with c̄ *before* that window updates it, and are held until the next window closes. Fixes the bug
  above (measured: tests/test_trainers.py reproduces w = c̄, stability 0 at B >= window, and the
  pulsing below it).
- `cbar_init` `first` (published `zero`): a pair's first observed rate initialises c̄. With c̄ = 0 and
  alpha <= 1e-3, every pair looks maximally unstable (stability ~ 1, w ~ 2c) for thousands of
  windows, so the stability factor is a constant 2 carrying no information.
- `alpha_rule` `windows` (published `rate`): alpha_ij = min(0.1, n_ij / 1000), n_ij the number of
  windows in which the pair co-fired: per pair, as the idea text writes it, so c̄ stays symmetric,
  and reaching its 0.1 cap after 100 windows instead of never.
- `window` / `window_unit` 20 `steps` (published 1000 `samples`): a window of 1000 samples is shorter
  than one batch at the write-up's batch of 2048, so there is no "window" to compare with history.
- `count` `active` (published `selected`): a pair counts on a token when both latents are active
  (value > 0), not merely selected by the top k with value 0.
- `topk_order` `pre_first` (published `relu_first`): the top k of the pre-activations, then ReLU (the
  TopK kernels' order), where the template's `AutoEncoderTopK.encode` takes the top k of the ReLU'd
  pre-activations. Codes, reconstruction and gradients are the same; when a token has fewer than k
  positive pre-activations the value-0 slots hold other latents (the largest negative ones here, the
  ties of zeros there), which `count=selected` counts as co-firing, so the published tracker's pair
  weights differ on such tokens. With `count=active` the order changes nothing.
- `ortho_form` `linear` (published `squared`): O = sum_{i != j} w_ij f_i^T f_j / B, the idea text's
  sum of w |f_i^T f_j| (|.| is the identity: f >= 0) divided by the batch size. The published mean
  over F^2 of squared dots shrinks with d_sae^2 and the batch size squared, so its coefficient does
  not transfer between widths or batch sizes.
- `include_diag` false (published true): the i == j term w_ii (sum_b f_bi^2 / B)^2 is a
  frequency-weighted penalty on activation size, not a co-activation.
- `ortho_coeff` 1.0 (published 0.1): the two forms' scales differ by orders of magnitude.
- `tracker` `table` (published `dense`): dense F x F state is infeasible at large widths (16 GiB per
  fp32 matrix at d_sae 65,536; `tracker=dense` is refused above d_sae 16,384). The table keeps, per
  latent, `cap` partner slots (partner id, current count, running average, windows co-fired,
  weight): O(d_sae * cap) whatever d_sae is (72 MiB at 65,536 with cap 32, measured by
  `measure_memory`). When a latent's slots are full, a new partner evicts the weakest resident
  (expected count this window) only if it co-fired more often in the batch; untracked pairs have
  weight 0. With `cap >= d_sae` nothing is evicted and the table reproduces the dense tracker
  under any rules (tested).

Measured. On the planted dictionary of `sae_sweep.bench.trainers` (d_sae 128, batch 256, 600 steps)
both modes recover every planted feature, and reverting any single correction changes recovery
and explained variance by less than 0.01 (`include_diag=true` raises L0 from 3.63 to 3.83, the
largest effect; `python -m sae_sweep.bench trainers --corrections --only temporal_ortho`); the
published penalty is ~1e-8 of the reconstruction loss (0.1 x O / MSE), so published Run 1 is,
in effect, a plain TopK SAE (identical figures to `topk`). On the tiny model at its default budget
(d_sae 512, batch 1024 >= the 1000-sample window, 195 steps) the published run logs stab_zero_frac
1.0 and stab_mean 0 (the bug), with 0.1 x O ~ 2 % of the MSE; the corrected penalty is larger than
the MSE there (O 43,500 vs 22,200 at the end; explained variance 0.93 vs 0.997), so `ortho_coeff`
needs tuning per model.

Logged (`train/<name>`), the write-up's planned "feature stability metrics" and "memory tracking
metrics" (L9-10, L16, L62), over pairs with a signal (max(c, c̄) > 0) as of the weights in use:
stab_mean (mean |c - c̄| / max(c, c̄)), stab_zero_frac (share with stability exactly 0: 1.0 under the
published tracker's bug), w_mean, cbar_mean, alpha_mean (at the last window close), plus ortho, l1,
auxk, tracked_pairs, windows_closed and tracker_MiB (the tracking state's size).

Two routes to the same statistics, chosen per step by `prefers_gram`: for sparse codes, per token
over its k x k active pairs, found by binary search in a sorted key index (row * d_sae + partner),
rebuilt when partners change, so per-step transients are O(B k^2) and the index O(d_sae * cap);
for dense codes (B k^2 > d_sae^2, e.g. the write-up's k 160 of 4,608), through d_sae x d_sae
products: pair counts MᵀM of the batch's 0/1 code and the penalty from the Gram matrix fᵀf. The
table ends bit-identical either way (integer counts in fp32, autocast off) and the penalty agrees to
rounding (tests). `python -m sae_sweep.bench trainers --temporal-routes` times both (`measure_routes`;
docs/research-variants.md): at B 2,048, k 160, d_sae 1,152 the gram route is 12-14x (published) / 34-37x
(table) faster; at B 4,096, k 32, d_sae 4,096 the pair route stays, 2.5-3.3x faster there.
`CoactivationTable(route=...)` forces one.

On CPU the table's update selects the batch's new pairs with boolean indexing (`unique`, or the
nonzero counts); on CUDA (and under `kernels.force_path("device")`) the same update runs on
fixed-size tensors (sentinel keys, sort, run lengths), so a step never waits for the host; tests
check that both give the same table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from sae_sweep.config import setting

from .autoencoder import SparseAutoencoder
from .kernels import cpu_path
from .modes import Correction, by_mode, mode_setting, resolve
from .registry import register_sae, register_trainer
from .topk import TopKParams, TopKSAE, TopKTrainer
from .trainer import StepOutput, mse_loss

DENSE_MAX_D_SAE = 16384  # tracker=dense: 5 fp32/int32 d_sae x d_sae tensors = 5 GiB here

CORRECTIONS = {
    "weights_from": Correction(
        "live",
        "closed",
        "the published order compares c̄ with itself once a window "
        "closes: at batch >= window, stability is 0 and w = c̄ at every step",
    ),
    "cbar_init": Correction(
        "zero",
        "first",
        "from c̄ = 0 with alpha <= 1e-3 every pair looks maximally unstable for thousands of windows (w ~ 2c)",
    ),
    "alpha_rule": Correction(
        "rate", "windows", "per pair as the idea text writes it: c̄ stays symmetric and can reach its 0.1 cap"
    ),
    "window": Correction(1000, 20, "1000 samples is less than one batch of 2048: no window to compare"),
    "window_unit": Correction("samples", "steps", "see window"),
    "count": Correction("selected", "active", "count pairs that fire, not top-k members with value 0"),
    "topk_order": Correction(
        "relu_first",
        "pre_first",
        "the same code and gradients; only which value-0 latents fill a token's k slots differs, and "
        "count=active ignores them; pre_first is the TopK kernels' order",
    ),
    "ortho_form": Correction(
        "squared",
        "linear",
        "the idea text's sum of w |f_i^T f_j| / B; the squared mean over F^2 shrinks with d_sae^2 and B^2",
    ),
    "include_diag": Correction(True, False, "f_i^T f_i is an activation-size penalty, not a co-activation"),
    "ortho_coeff": Correction(0.1, 1.0, "the forms' scales differ by orders of magnitude"),
    "tracker": Correction("dense", "table", "dense F x F state is 16 GiB per matrix at d_sae 65,536"),
}


class CoactivationTable:
    """Per-latent co-activation partners and their statistics, dense or bounded (module docstring).

    Storage: `dense=True` keeps every pair (slot j of row i is partner j: d_sae x d_sae); else
    `cap` partner slots per latent. Rules (the module docstring's keys): `weights_from` (`closed`:
    weights set when a window closes; `live`: recomputed by `live_weights` after every update, the
    published order), `cbar_init` (`first` | `zero`), `alpha_rule` (`windows` | `rate`),
    `include_diag` (track and weight i == j).
    """

    FIELDS = ("partner", "cur", "avg", "freq", "weight")

    def __init__(
        self,
        d_sae: int,
        cap: int | None = 32,
        device: Any = "cpu",
        *,
        dense: bool = False,
        weights_from: str = "closed",
        cbar_init: str = "first",
        alpha_rule: str = "windows",
        include_diag: bool = False,
        route: str = "auto",
    ):
        if route not in ("auto", "pairs", "gram"):
            raise ValueError(f"CoactivationTable route={route!r}: allowed 'auto', 'pairs', 'gram'")
        self.route = route
        self.d_sae = int(d_sae)
        self.dense = bool(dense)
        if not self.dense and cap is None:
            raise ValueError("CoactivationTable: cap=None needs dense=True (one slot per latent)")
        self.cap = self.d_sae if self.dense or cap is None else int(cap)
        self.weights_from, self.cbar_init, self.alpha_rule = weights_from, cbar_init, alpha_rule
        self.include_diag = bool(include_diag)
        shape = (self.d_sae, self.cap)
        if self.dense:
            self.partner = torch.arange(self.d_sae, dtype=torch.int32, device=device).repeat(self.d_sae, 1)
        else:
            self.partner = torch.full(shape, -1, dtype=torch.int32, device=device)  # -1: empty slot
        self.cur = torch.zeros(shape, dtype=torch.float32, device=device)  # co-fire count, this window
        self.avg = torch.zeros(shape, dtype=torch.float32, device=device)  # c̄: running average rate
        self.freq = torch.zeros(shape, dtype=torch.int32, device=device)  # windows the pair co-fired
        self.weight = torch.zeros(shape, dtype=torch.float32, device=device)  # w in use
        self.fires = torch.zeros(self.d_sae, dtype=torch.float32, device=device)  # per-latent count, this window
        self.window_tokens = 0
        self.windows_closed = 0
        # logged: stab_mean, stab_zero_frac, w_mean, cbar_mean, alpha_mean (see `_stats`)
        self.stats = torch.zeros(5, device=device)
        self._alpha_mean = torch.zeros((), device=device)
        self._rebuild_index()

    def nbytes(self) -> int:
        """Persistent tracking state: the slot fields (plus the sorted lookup index of the table)."""
        n = sum(getattr(self, f).nbytes for f in self.FIELDS) + self.fires.nbytes
        return n if self.dense else n + self._sorted.nbytes + self._perm.nbytes

    @torch.no_grad()
    def observe(self, idx: Tensor, active: Tensor) -> None:
        """Count co-activations of a batch's codes: idx [B, k] latent ids, active [B, k] bool
        (which of a token's k latents count)."""
        B, k = idx.shape
        self.window_tokens += B
        if self.uses_gram(B, k):
            self._observe_counts(idx, active)
            return
        self.fires.index_add_(0, idx.reshape(-1), active.reshape(-1).float())
        ok = active[:, :, None] & active[:, None, :]
        if not self.include_diag:
            ok = ok & ~torch.eye(k, dtype=torch.bool, device=idx.device)
        keys = idx[:, :, None].long() * self.d_sae + idx[:, None, :].long()
        if self.dense:  # every pair has its slot: no lookup, no host sync
            self.cur.view(-1).index_add_(0, keys.reshape(-1), ok.reshape(-1).float())
            return
        if not cpu_path(self.cur):
            self._observe_fixed(keys.reshape(-1), ok.reshape(-1), B)
            return
        keys = keys[ok]
        if keys.numel() == 0:
            return
        uniq, counts = keys.unique(return_counts=True)
        counts = counts.float()
        found, flat = self._lookup(uniq)
        self.cur.view(-1).index_add_(0, flat[found], counts[found])
        new = ~found
        self._insert(uniq[new] // self.d_sae, (uniq[new] % self.d_sae).to(torch.int32), counts[new])

    def uses_gram(self, batch: int, k: int) -> bool:
        """Whether a batch's statistics go through d_sae x d_sae products (`route`; auto: `prefers_gram`)."""
        return self.route == "gram" or self.route == "auto" and prefers_gram(batch, k, self.d_sae)

    def _observe_counts(self, idx: Tensor, active: Tensor) -> None:
        """`observe` through the batch's dense pair counts C = MᵀM (M [B, d_sae]: 1 where a token's
        latent counts), for dense codes where B·k² pair entries outnumber the d_sae² cells. Counts
        are integers summed in fp32 (exact below 2^24 tokens), so the table ends up identical to
        the pair route's (tested)."""
        B = idx.shape[0]
        with torch.autocast(idx.device.type, enabled=False):  # bf16 would round the counts
            m = torch.zeros(B, self.d_sae, device=idx.device).scatter_(1, idx, active.float())
            counts = m.T @ m
        self.fires += m.sum(0)
        if not self.include_diag:
            counts.fill_diagonal_(0)
        if self.dense:  # slot j of row i is partner j
            self.cur += counts
            return
        if not cpu_path(self.cur):
            keys = torch.arange(self.d_sae * self.d_sae, device=idx.device)
            flat_counts = counts.reshape(-1)
            self._observe_fixed(keys, flat_counts > 0, B, flat_counts)
            return
        valid = self.partner >= 0
        rows = torch.arange(self.d_sae, device=idx.device)[:, None].expand_as(self.partner)
        cols = self.partner.long().clamp_min(0)
        self.cur += torch.where(valid, counts[rows, cols], torch.zeros_like(self.cur))
        counts[rows[valid], cols[valid]] = 0  # what is left are the new pairs
        new_rows, new_cols = counts.nonzero(as_tuple=True)  # row-major: ascending keys, as `unique` gives
        self._insert(new_rows, new_cols.to(torch.int32), counts[new_rows, new_cols])

    def _observe_fixed(self, keys: Tensor, ok: Tensor, batch: int, weight: Optional[Tensor] = None) -> None:
        """`observe` for CUDA: the same table with fixed-size tensors only (no unique, no boolean
        indexing, no host sync). Entries that do not take part carry a sentinel key / zero weight.
        `weight`: each entry's count (default 1: a key repeated n times counts n).
        Every count is an integer in fp32, so the sums are exact whatever their order."""
        n_lat, cap = self.d_sae, self.cap
        weight = torch.ones_like(keys, dtype=torch.float) if weight is None else weight.float()
        found, flat = self._lookup(keys)
        self.cur.view(-1).index_add_(0, flat, (ok & found).float() * weight)  # untracked entries add 0
        # the new pairs, each once with its count, as `_insert` gets them from `unique`
        sentinel = n_lat * n_lat
        sk, order = torch.where(ok & ~found, keys, torch.full_like(keys, sentinel)).sort()
        first = torch.ones_like(sk, dtype=torch.bool)
        first[1:] = sk[1:] != sk[:-1]
        run = first.cumsum(0) - 1
        counts = torch.zeros(sk.numel(), device=sk.device).index_add_(0, run, weight[order])
        counts = counts[run]
        rep = first & (sk != sentinel)
        rows, cols = sk // n_lat, sk % n_lat
        # by row, then count descending, then key (a count is at most the batch size)
        big = (n_lat + 1) * (batch + 1)
        comp = torch.where(rep, rows * (batch + 1) + (batch - counts.long()), torch.full_like(rows, big))
        order = comp.argsort(stable=True)
        rows, cols, counts, rep = rows[order], cols[order], counts[order], rep[order]
        pos = torch.arange(rows.numel(), device=rows.device)
        row_start = torch.ones_like(rep)
        row_start[1:] = rows[1:] != rows[:-1]
        rank = pos - torch.where(row_start, pos, torch.zeros_like(pos)).cummax(0).values
        strength = torch.where(
            self.partner < 0, torch.full_like(self.cur, -1.0), self.cur + self.avg * self.window_tokens
        )
        weakest = strength.argsort(dim=1, stable=True)
        r, k = rows.clamp(max=n_lat - 1), rank.clamp(max=cap - 1)
        slot = weakest[r, k]
        win = rep & (rank < cap) & (counts > strength[r, slot])
        # winners land in distinct slots ((row, rank) distinct): write them with sums of one term
        target = r * cap + slot
        hit = torch.zeros(n_lat * cap, dtype=torch.int32, device=rows.device).index_add_(0, target, win.int())
        new_col = torch.zeros(n_lat * cap, dtype=torch.long, device=rows.device).index_add_(
            0, target, torch.where(win, cols, torch.zeros_like(cols))
        )
        new_cnt = torch.zeros(n_lat * cap, device=rows.device).index_add_(
            0, target, torch.where(win, counts, torch.zeros_like(counts))
        )
        m = (hit > 0).view(n_lat, cap)
        self.partner = torch.where(m, new_col.view(n_lat, cap).to(self.partner.dtype), self.partner)
        self.cur = torch.where(m, new_cnt.view(n_lat, cap), self.cur)
        self.avg = self.avg.masked_fill(m, 0.0)
        self.freq = self.freq.masked_fill(m, 0)
        self.weight = self.weight.masked_fill(m, 0.0)
        self._rebuild_index()

    def _rebuild_index(self) -> None:
        """Sorted pair keys (row * d_sae + partner) -> flat slot, for O(log) lookups without a
        d_sae x d_sae structure. Rebuilt whenever partners change. (Dense: slot = key.)"""
        if self.dense:
            return
        rows = torch.arange(self.d_sae, device=self.partner.device, dtype=torch.long)[:, None]
        keys = torch.where(
            self.partner >= 0, rows * self.d_sae + self.partner.long(), torch.full_like(rows, self.d_sae * self.d_sae)
        )  # sentinel: past any key
        self._sorted, self._perm = keys.flatten().sort()

    def _lookup(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """(tracked? bool, flat slot index) for pair keys of any shape."""
        if self.dense:
            return torch.ones_like(keys, dtype=torch.bool), keys
        pos = torch.searchsorted(self._sorted, keys).clamp_max(self._sorted.numel() - 1)
        return self._sorted[pos] == keys, self._perm[pos]

    def _insert(self, rows: Tensor, cols: Tensor, counts: Tensor) -> None:
        """Place new pairs into their row's weakest slots, best newcomers first."""
        if rows.numel() == 0:
            return
        # sort by row, then count descending; rank = position within the row's run
        order = torch.argsort(rows * (counts.max().long() + 1) + (counts.max().long() - counts.long()), stable=True)
        rows, cols, counts = rows[order], cols[order], counts[order]
        urows, inverse, per_row = rows.unique_consecutive(return_inverse=True, return_counts=True)
        first = torch.cumsum(per_row, 0) - per_row
        rank = torch.arange(rows.numel(), device=rows.device) - first[inverse]
        keep = rank < self.cap
        rows, cols, counts, rank, inverse = rows[keep], cols[keep], counts[keep], rank[keep], inverse[keep]
        # resident strength: expected count this window; empty slots lose to anything
        strength = torch.where(
            self.partner[urows] < 0,
            torch.full_like(self.cur[urows], -1.0),
            self.cur[urows] + self.avg[urows] * self.window_tokens,
        )
        weakest = strength.argsort(dim=1, stable=True)  # [R, cap], weakest first
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
        """Close the window: (`closed`) weights from this window's rates against c̄, then update c̄."""
        valid = self.partner >= 0
        n = max(1, self.window_tokens)
        c = self.cur / n
        seen = self.cur > 0
        first = valid & seen & (self.freq == 0) if self.cbar_init == "first" else torch.zeros_like(valid)
        c_bar = torch.where(first, c, self.avg)
        self.freq += (valid & seen).int()
        if self.alpha_rule == "windows":
            alpha = (self.freq.float() / alpha_div).clamp(max=max_alpha)
        else:  # row i at latent i's firing rate in this window
            alpha = (self.fires / n / alpha_div).clamp(max=max_alpha)[:, None].expand_as(c)
        sig = (valid & (torch.maximum(c, self.avg) > 0)).float()
        self._alpha_mean = (alpha * sig).sum() / sig.sum().clamp_min(1)
        if self.weights_from == "closed":
            stab = (c - c_bar).abs() / torch.maximum(c, c_bar).clamp_min(1e-12)
            self.weight = torch.where(valid, c * (1 + stab), torch.zeros_like(c))
            self.stats = self._stats(valid, c, c_bar, stab)
        self.avg = torch.where(first, c, torch.where(valid, (1 - alpha) * self.avg + alpha * c, self.avg))
        self.cur.zero_()
        self.fires.zero_()
        self.window_tokens = 0
        self.windows_closed += 1

    @torch.no_grad()
    def live_weights(self) -> None:
        """`weights_from=live` (the published order): weights from the partial window against c̄,
        or from c̄ itself when the window is empty (just closed) -- then stability is exactly 0."""
        valid = self.partner >= 0
        c = self.cur / self.window_tokens if self.window_tokens > 0 else self.avg
        stab = (c - self.avg).abs() / (torch.maximum(c, self.avg) + 1e-8)
        self.weight = torch.where(valid, c * (1 + stab), torch.zeros_like(c))
        self.stats = self._stats(valid, c, self.avg, stab)

    def _stats(self, valid: Tensor, c: Tensor, c_bar: Tensor, stab: Tensor) -> Tensor:
        """[stab_mean, stab_zero_frac, w_mean, cbar_mean, alpha_mean] over pairs with a signal."""
        sig = (valid & (torch.maximum(c, c_bar) > 0)).float()
        n = sig.sum().clamp_min(1)
        return torch.stack(
            [
                (stab * sig).sum() / n,
                ((stab == 0).float() * sig).sum() / n,
                (self.weight * sig).sum() / n,
                (c_bar * sig).sum() / n,
                self._alpha_mean,
            ]
        )

    def pair_weights(self, idx: Tensor) -> Tensor:
        """w for every ordered pair of a token's latents: idx [B, k] -> [B, k, k] (0 if untracked,
        and on i == j unless include_diag)."""
        keys = idx[:, :, None].long() * self.d_sae + idx[:, None, :].long()
        hit, flat = self._lookup(keys)
        w = torch.where(hit, self.weight.view(-1)[flat], torch.zeros((), device=idx.device))
        if self.include_diag:
            return w
        return w * ~torch.eye(idx.shape[1], dtype=torch.bool, device=idx.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            **{f: getattr(self, f).clone() for f in self.FIELDS},
            "fires": self.fires.clone(),
            "window_tokens": self.window_tokens,
            "windows_closed": self.windows_closed,
            "stats": self.stats.clone(),
            "alpha_mean": self._alpha_mean.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in self.FIELDS:
            setattr(self, f, state[f].to(getattr(self, f).device))
        self.window_tokens = int(state["window_tokens"])
        for key, attr in (("fires", "fires"), ("stats", "stats"), ("alpha_mean", "_alpha_mean")):
            if key in state:
                setattr(self, attr, state[key].to(self.cur.device))
        self.windows_closed = int(state.get("windows_closed", 0))
        self._rebuild_index()


def ortho_penalty(vals: Tensor, idx: Tensor, table: CoactivationTable, form: str = "linear") -> Tensor:
    """The co-activation penalty of a TopK code (vals, idx [B, k]); grads flow into vals.

    `linear`: sum_{i != j} w_ij f_i^T f_j / B (i == j included when table.include_diag).
    `squared` (published): sum_{i,j} w_ij (f_i^T f_j / B)^2 / d_sae^2 -- the mean over all d_sae^2
    pairs of the dense formula, computed from the k active latents per token (pairs that never
    co-fire in the batch have f_i^T f_j = 0).

    Two routes to the same number: per token over its k x k active pairs (B·k² terms: small k), or
    through the dense Gram matrix fᵀf of the [B, d_sae] code (d_sae² cells: dense codes such as the
    write-up's k 160), chosen by `table.uses_gram`."""
    B, k = idx.shape
    if table.uses_gram(B, k):
        return _ortho_penalty_gram(vals, idx, table, form)
    v = vals.float()
    prod = v[:, :, None] * v[:, None, :]  # [B, k, k]
    if form == "linear":
        return (table.pair_weights(idx) * prod).sum() / B
    keys = idx[:, :, None].long() * table.d_sae + idx[:, None, :].long()
    hit, flat = table._lookup(keys)
    if not table.include_diag:
        hit = hit & ~torch.eye(idx.shape[1], dtype=torch.bool, device=idx.device)
    # untracked pairs carry weight 0; their slot index is arbitrary, so add 0 there
    dots = torch.zeros(table.weight.numel(), device=v.device).index_add(0, flat.reshape(-1), (prod * hit).reshape(-1))
    return (table.weight.view(-1) * (dots / B).pow(2)).sum() / float(table.d_sae) ** 2


def prefers_gram(batch: int, k: int, d_sae: int) -> bool:
    """Whether the co-activation statistics go through d_sae x d_sae products instead of the batch's
    B·k² pairs: when the pairs are more (never more memory than the pair route would take)."""
    return batch * k * k > d_sae * d_sae


def _ortho_penalty_gram(vals: Tensor, idx: Tensor, table: CoactivationTable, form: str) -> Tensor:
    """`ortho_penalty` through G = fᵀf: the tracked pairs' weights as a d_sae x d_sae matrix W
    (untracked pairs 0, and the diagonal unless include_diag) times G / B (linear) or (G / B)²
    (squared, / d_sae²). fp32 whatever the autocast, like the pair route."""
    B, d = vals.shape[0], table.d_sae
    with torch.autocast(vals.device.type, enabled=False):
        f = torch.zeros(B, d, device=vals.device).scatter(1, idx, vals.float())
        gram = f.T @ f
    if table.dense:  # slot j of row i is partner j
        w = table.weight.clone()
    else:  # a row's partners are distinct, and empty slots add 0 (no boolean indexing: no host sync)
        valid = table.partner >= 0
        keys = torch.arange(d, device=vals.device)[:, None] * d + table.partner.long().clamp_min(0)
        w = (
            torch.zeros(d * d, device=vals.device)
            .index_add_(
                0, keys.reshape(-1), torch.where(valid, table.weight, torch.zeros_like(table.weight)).reshape(-1)
            )
            .view(d, d)
        )
    if not table.include_diag:
        w.fill_diagonal_(0)
    if form == "linear":
        return (w * gram).sum() / B
    return (w * (gram / B).pow(2)).sum() / float(d) ** 2


@register_sae("temporal_ortho")
class TemporalOrthoSAE(TopKSAE):
    """A TopK SAE saved under its own architecture name (TopKSAE.forward takes [..., d_in])."""


@dataclass
class TemporalOrthoParams(TopKParams):
    mode: str = mode_setting()
    ortho_coeff: Optional[float] = by_mode(
        CORRECTIONS, "ortho_coeff", "a float >= 0 (lambda2, co-activation penalty)", check=lambda v: v >= 0
    )
    ortho_form: Optional[str] = by_mode(CORRECTIONS, "ortho_form", "", options=("squared", "linear"))
    include_diag: Optional[bool] = by_mode(CORRECTIONS, "include_diag", "true or false")
    l1_coeff: float = setting(0.0, allowed="a float >= 0 (lambda1, L1 on activations)", check=lambda v: v >= 0)
    window: Optional[int] = by_mode(CORRECTIONS, "window", "an integer >= 1 (in window_unit)", check=lambda v: v >= 1)
    window_unit: Optional[str] = by_mode(CORRECTIONS, "window_unit", "", options=("samples", "steps"))
    weights_from: Optional[str] = by_mode(CORRECTIONS, "weights_from", "", options=("live", "closed"))
    cbar_init: Optional[str] = by_mode(CORRECTIONS, "cbar_init", "", options=("zero", "first"))
    alpha_rule: Optional[str] = by_mode(CORRECTIONS, "alpha_rule", "", options=("rate", "windows"))
    count: Optional[str] = by_mode(CORRECTIONS, "count", "", options=("selected", "active"))
    topk_order: Optional[str] = by_mode(CORRECTIONS, "topk_order", "", options=("relu_first", "pre_first"))
    tracker: Optional[str] = by_mode(CORRECTIONS, "tracker", "", options=("dense", "table"))
    cap: int = setting(
        32, allowed="an integer >= 1 (tracker=table: tracked partners per latent)", check=lambda v: v >= 1
    )

    def shape_problems(self, d_in: int, d_sae: int) -> list[str]:
        if resolve(self, CORRECTIONS).tracker == "dense" and d_sae > DENSE_MAX_D_SAE:
            return [
                f"trainer.tracker={self.tracker!r} (mode={self.mode}: dense) at d_sae={d_sae}: the dense "
                f"tracker keeps d_sae x d_sae state ({20 * d_sae**2 / 2**30:.1f} GiB); allowed: "
                f"d_sae <= {DENSE_MAX_D_SAE}, or trainer.tracker=table"
            ]
        return []


@register_trainer("temporal_ortho")
class TemporalOrthoTrainer(TopKTrainer):
    params_cls = TemporalOrthoParams

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        o = self.opt = resolve(self.params, CORRECTIONS)
        self.table = CoactivationTable(
            self.d_sae,
            self.params.cap,
            self.device,
            dense=o.tracker == "dense",
            weights_from=o.weights_from,
            cbar_init=o.cbar_init,
            alpha_rule=o.alpha_rule,
            include_diag=o.include_diag,
        )
        self._tracker_mib = torch.full((), self.table.nbytes() / 2**20, device=self.device)

    def build_sae(self, generator: torch.Generator) -> SparseAutoencoder:
        return TemporalOrthoSAE(self.d_in, self.d_sae, int(self.sae_cfg["k"]), generator=generator)

    def window_closes(self) -> bool:
        o = self.opt
        if o.window_unit == "samples":
            return self.table.window_tokens >= o.window
        return (self.step_count + 1) % o.window == 0

    def compute_loss(self, x: Tensor) -> StepOutput:
        sae: TemporalOrthoSAE = self.sae  # type: ignore[assignment]
        o, p = self.opt, self.params
        if o.topk_order == "relu_first":  # the template's AutoEncoderTopK.encode: ReLU, then the top k
            pre = sae.pre_acts(x)
            vals, idx = pre.relu().topk(sae.k, dim=-1, sorted=False)
        else:
            vals, idx, pre = sae.encode_sparse(x)
        active = vals > 0
        self.table.observe(idx, torch.ones_like(active) if o.count == "selected" else active)
        if self.window_closes():
            self.table.end_window()
        if o.weights_from == "live":
            self.table.live_weights()
        x_hat = sae.decode_sparse(vals, idx)
        mse = mse_loss(x, x_hat)
        l1 = vals.float().sum(-1).mean()
        ortho = ortho_penalty(vals, idx, self.table, o.ortho_form)
        fired = (
            torch.zeros(self.d_sae, device=x.device).scatter_add_(0, idx.reshape(-1), active.float().reshape(-1)) > 0
        )
        if p.auxk_alpha > 0 and self.tokens_seen >= p.dead_tokens:
            auxk = self.auxk_loss(x - x_hat.detach(), pre, self.dead_mask())
        else:
            auxk = torch.zeros((), device=x.device)
        loss = mse + p.auxk_alpha * auxk + p.l1_coeff * l1 + o.ortho_coeff * ortho
        s = self.table.stats
        return StepOutput(
            loss=loss,
            x_hat=x_hat,
            l0=active.float().sum(-1).mean(),
            fired=fired,
            parts={
                "auxk": auxk,
                "l1": l1,
                "ortho": ortho,
                "tracked_pairs": (self.table.partner >= 0).float().sum(),
                "stab_mean": s[0],
                "stab_zero_frac": s[1],
                "w_mean": s[2],
                "cbar_mean": s[3],
                "alpha_mean": s[4],
                "windows_closed": torch.full((), float(self.table.windows_closed), device=x.device),
                "tracker_MiB": self._tracker_mib,
            },
        )

    def extra_state(self) -> dict[str, Any]:
        return {"table": self.table.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            self.table.load_state_dict(state["table"])


def measure_memory(
    d_sae: int = 65536, cap: int = 32, batch: int = 1024, k: int = 32, steps: int = 5, seed: int = 0
) -> dict[str, Any]:
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
        "d_sae": d_sae,
        "cap": cap,
        "batch": batch,
        "k": k,
        "state_MiB": table.nbytes() / 2**20,
        "tracked_pairs": int((table.partner >= 0).sum()),
        "peak_rss_growth_MiB": after - before,
        "peak_rss_MiB": after,
        "dense_one_matrix_MiB": d_sae * d_sae * 4 / 2**20,
    }


ROUTE_SHAPES = ((2048, 160, 1152), (1024, 32, 512), (1024, 64, 1024), (4096, 32, 4096))  # (batch, k, d_sae)


def measure_routes(
    shapes: tuple[tuple[int, int, int], ...] = ROUTE_SHAPES, reps: int = 3, seed: int = 0
) -> list[dict[str, Any]]:
    """Seconds per step (best of `reps`) of observe + weights + penalty + backward through each route
    (`pairs`, `gram`) at each (batch, k, d_sae), for the published setup (dense tracker, squared,
    live weights) and the corrected one (table, linear), on random TopK codes; `auto` is what
    `prefers_gram` picks. No SAE is built or trained."""
    rows = []
    for batch, k, d_sae in shapes:
        g = torch.Generator().manual_seed(seed)
        idx = torch.rand(batch, d_sae, generator=g).topk(k).indices
        vals = torch.rand(batch, k, generator=g).requires_grad_(True)
        for setup, dense, form in (("published", True, "squared"), ("corrected", False, "linear")):
            row = {
                "batch": batch,
                "k": k,
                "d_sae": d_sae,
                "setup": setup,
                "auto": "gram" if prefers_gram(batch, k, d_sae) else "pairs",
            }
            for route in ("pairs", "gram"):
                table = CoactivationTable(
                    d_sae, dense=dense, include_diag=dense, weights_from="live" if dense else "closed", route=route
                )
                table.observe(idx, vals > 0)
                table.end_window()
                best = float("inf")
                for _ in range(reps):
                    t0 = time.perf_counter()
                    table.observe(idx, vals > 0)
                    if dense:
                        table.live_weights()
                    ortho_penalty(vals, idx, table, form).backward()
                    best = min(best, time.perf_counter() - t0)
                row[f"{route}_s"] = best
            rows.append(row)
    return rows
