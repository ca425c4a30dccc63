"""`hierarchical`: a ReLU SAE with a scheduled + adaptive L1 and dictionary maintenance.

Write-up 000: "Simple Hierarchical Learning for Feature Absorption Prevention" (not part of the
repository; `000:L75` is its line 75 as `cat -n` numbers it). It has no code listing;
its method is Runs 1-5, each adding one mechanism to the last:

- Run 1 (L73-78): L1 coefficient "decreases linearly from initial value (1/sqrt(dict_size)) to near
  zero"; "window-based tracking of feature activations to monitor sparsity patterns"; d_sae = d_in
  = 2304; lr 3e-4. Run 2 (L89-92): "resampling check every 1000 steps"; "Dead features (inactive for
  >500 steps) are reinitialized using high-loss input examples". (There is no Run 3.) Run 4
  (L113-118): L1 adjusted "based on reconstruction loss ratio", "Target reconstruction loss set to
  2.5", "Adaptive factor clamped between 0.1-2.0", "Base L1 penalty still follows linear schedule
  but gets modulated". Run 5 (L137-143): "merging of highly similar features (threshold 0.9)",
  "weight averaging for merged features", "clustering check every 100 training steps", all
  previous mechanisms kept.

`trainer.mode=published` is that method; where the text is silent, this reading:

- loss = sum_d (x - x_hat)^2 (mean over tokens) + l1(t) * sum_i f_i. The squared sum is what the
  reported losses imply: Run 2's loss 4,675 with a per-element MSE of 2.656 (L96, L99) is on the
  d_in x MSE scale (2.656 x 2304 = 6,119), far above an unsquared norm (sqrt(6,119) = 78).
- l1(t) = l1_start * (1 - t / (T - 1)) * factor: l1_start = 1/sqrt(d_sae) (L75; the "base sparsity
  penalty (0.04)" of L78 is the TopK baseline's logged, unused `sparsity_penalty` argument, L70:
  `trainer.l1_start=0.04` uses it instead); "near zero" read as exactly 0 at the last step; no L1
  warm-up (none is mentioned).
- factor = clamp(R / recon_target, 0.1, 2.0), recon_target 2.5, R = the batch's per-element MSE,
  recomputed every step. The direction (loss / target) is the literal "reconstruction loss
  ratio" (L115). The scale is per-element because 2.5 sits beside the write-up's per-element MSE
  (2.656, L99); against its training loss (~4,700, L96) the factor would sit at the 2.0 clamp from
  the first step. `recon_ratio` (R / target, unclamped) is logged, so a pinned factor shows.
- resampling: after every 1000th step, latents that fired on no token for more than 500
  consecutive steps get decoder row x/|x| and encoder column x * 0.2 * (mean alive encoder-column
  norm) -- the raw input x, as the template's `resample_neurons` (dictionary_learning's
  StandardTrainer) sets it -- b_enc 0, their Adam moments zeroed; the inputs x are sampled with probability
  proportional to |x - x_hat| without replacement, at most one batch of them per check ("high-loss
  input examples" says neither top-n nor sampled; sampling is the `resample_neurons` of the
  template these logs were produced with).
- merging: after every 100th step, disjoint pairs of latents whose decoder rows have cosine > 0.9,
  best first; the lower index keeps the average of the two encoder columns and biases and the
  renormalised average decoder row; the other is silenced (encoder column 0, bias -1: it cannot
  fire) until the resampler revives it (the write-up does not say what happens to it).
- window tracking is monitoring only (L76, L87); its size and unit ("proportional", L62) are not
  given: per-latent firing rates over the last `rate_window` steps, logged.

The default `trainer.mode=corrected` changes these keys (null = the mode's value; an explicit
value overrides either mode). "Planted" below is the planted-dictionary problem of
`sae_sweep.bench.trainers` (d 32, 64 features, d_sae 128, 600 steps of 256, l1_start 0.5), on which
the corrected mode recovers every feature (L0 13.8) and the published mode none (L0 59.7 of 128);
`python -m sae_sweep.bench trainers --corrections --only hierarchical` prints every figure below.

- `l1_end_frac` 0.1 (published 0): with no penalty left at the end a ReLU SAE turns dense, so the
  saved model is not sparse. The write-up's own result is that: L0 1,735-1,782 of 2,304 latents
  (L84, L105), 75-77 % active per token. Planted (the bench recipe's floor is 0.5): decaying to 0
  instead gives L0 31.3 and 73 % of features recovered, against 13.8 and 100 %.
- `l1_warmup` 0.05 (published 0): ramp the penalty in over the first 5 % of training, the project's
  ReLU default (relu.py: a full penalty from step 0 can kill latents before they find features).
  Planted: no measurable difference (L0 13.7 vs 13.8, both recover every feature).
- `adaptive_rule` `fvu` (published `loss_ratio`): factor = clamp(target_fvu / fvu, 0.1, 2.0), fvu an
  EMA (0.95) of the batch's fraction of variance unexplained. The published rule is positive
  feedback (it raises the penalty exactly when reconstruction is poor, until the clamp), and its
  raw-loss target does not transfer between models: planted, the per-element MSE is ~1e-4 of 2.5, so
  the factor sits at its 0.1 clamp and the SAE comes out dense (the largest single difference there:
  published + `adaptive_rule=fvu` gives L0 31 and 75 % of features recovered; corrected +
  `adaptive_rule=loss_ratio` gives L0 50 and none).
  FVU is scale-free.
- `resample_every` / `resample_after` 100 / 200 steps (published 1000 / 500): the published period
  is longer than the default budgets (195 steps on the tiny model), where it would never fire.
- `resample_source` `residual` (published `input`): the new direction is what the SAE misses on
  those tokens (x - x_hat), not the input, which the alive latents already partly reconstruct.
- `resample_encoder` `unit` (published `input`): the revived encoder column is the sampled vector's
  unit direction x 0.2 x the mean alive encoder norm. With the raw vector (the template) the new
  latent's pre-activation on that token is 0.2 a |x|^2 for alive norm a, so its scale follows the
  activation norm squared: at Gemma-2's residual norms (~300) it is ~300x the unit form; the unit
  form starts it at the scale of a live latent's pre-activations (a |x|).
- `resample_pick` `top` (published `sample`): the highest-loss tokens, deterministic (no RNG draw),
  every dead latent at once (cycling through the batch when more are dead than tokens).
- `merge_op` `sum` (published `average`): for duplicates that co-fire, f_i + f_j = ReLU((w_i + w_j) x
  + b_i + b_j), so summing keeps the pair's joint contribution to x_hat; averaging halves it
  (tests/test_trainers_published.py).
- `merge_keep` `busier` (published `first`): the survivor is the latent with the higher firing rate
  over the last window (the write-up does not say which survives).
- `merge_drop` `resample` (published `silence`): the merged-away latent is resampled at once
  instead of staying silent until a resample check (with `resample=false` it is silenced either way).

The resampling and merging keys are choices, not repairs: planted, they barely act (corrected: no
resample and 1 merge in 600 steps; published: neither), and reverting any one of them changes
recovery and explained variance by less than 0.01 and L0 by less than 0.05.

Logged (`train/<name>`): l1, l1_base (scheduled coefficient), l1_coeff (after the factor),
sparsity_scale (the factor), recon_ratio, fvu_ema, mean_rate and active_frac (the last window's
mean firing rate and fraction of latents that fired in it), resampled and merged (cumulative),
dead_at_check (latents dead at the last resample check), max_decoder_cos (largest cosine between
two decoder rows at the last merge check: shows whether the threshold is ever reached); the last
four only when their mechanism is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from sae_sweep.config import setting

from .autoencoder import SparseAutoencoder
from .modes import Correction, by_mode, mode_setting, resolve
from .registry import register_sae, register_trainer
from .relu import ReLUSAE
from .trainer import StepOutput, Trainer, TrainerParams, mse_loss

CORRECTIONS = {
    "l1_end_frac": Correction(
        0.0, 0.1, "with the L1 gone at the end a ReLU SAE turns dense (the write-up's own L0 is 1,782 of 2,304)"
    ),
    "l1_warmup": Correction(0.0, 0.05, "a full penalty from step 0 kills latents before they find features"),
    "adaptive_rule": Correction(
        "loss_ratio",
        "fvu",
        "loss/target is positive feedback and a raw-loss target does not transfer between models (pinned at a clamp)",
    ),
    "resample_every": Correction(1000, 100, "1000 steps exceeds the default budgets: resampling would never run"),
    "resample_after": Correction(500, 200, "scaled with resample_every"),
    "resample_source": Correction("input", "residual", "point new latents at what the SAE misses on those tokens"),
    "resample_pick": Correction("sample", "top", "deterministic, and every dead latent at once"),
    "resample_encoder": Correction(
        "input",
        "unit",
        "the raw vector makes a revived latent's pre-activation 0.2 a |x|^2: ~300x the unit form at Gemma-2 norms",
    ),
    "merge_op": Correction(
        "average", "sum", "summing keeps a co-firing duplicate pair's joint output; averaging halves it"
    ),
    "merge_keep": Correction("first", "busier", "keep the latent that fires more"),
    "merge_drop": Correction("silence", "resample", "reuse the freed latent at once"),
}


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
def high_cosine_pairs(W: Tensor, threshold: float, chunk: int = 4096) -> tuple[list[tuple[int, int, float]], float]:
    """(pairs (i < j) of rows of W [n, d] with cosine > threshold, best first; the largest cosine
    between two distinct rows), chunked (no n x n matrix). One transfer to the host per chunk,
    whatever the number of pairs (on CUDA each element read alone would sync)."""
    Wn = W.float() / W.float().norm(dim=1, keepdim=True).clamp_min(1e-8)
    n = Wn.shape[0]
    found = []
    best = -1.0
    for start in range(0, n, chunk):
        cos = Wn[start : start + chunk] @ Wn.T
        rows = torch.arange(start, min(start + chunk, n), device=W.device)
        cos = cos.masked_fill(torch.arange(n, device=W.device)[None, :] <= rows[:, None], -2.0)  # j > i only
        i, j = (cos > threshold).nonzero(as_tuple=True)
        c = cos[i, j]
        host = torch.cat([cos.max().reshape(1).double(), (i + start).double(), j.double(), c.double()]).tolist()
        best = max(best, host[0])
        m = i.numel()
        found += [
            (int(a), int(b), float(v)) for a, b, v in zip(host[1 : 1 + m], host[1 + m : 1 + 2 * m], host[1 + 2 * m :])
        ]
    return sorted(found, key=lambda t: -t[2]), best


@dataclass
class HierarchicalParams(TrainerParams):
    mode: str = mode_setting()
    l1_start: float = setting(0.0, allowed="a float >= 0 (0: 1/sqrt(d_sae))", check=lambda v: v >= 0)
    l1_decay: bool = setting(True, allowed="true or false")
    l1_end_frac: Optional[float] = by_mode(
        CORRECTIONS, "l1_end_frac", "a float in [0, 1] (final coefficient / l1_start)", check=lambda v: 0 <= v <= 1
    )
    l1_warmup: Optional[float] = by_mode(
        CORRECTIONS, "l1_warmup", "a float in [0, 1] (fraction of training)", check=lambda v: 0 <= v <= 1
    )
    rate_window: int = setting(100, allowed="an integer >= 1 (steps)", check=lambda v: v >= 1)
    resample: bool = setting(True, allowed="true or false")
    resample_after: Optional[int] = by_mode(
        CORRECTIONS, "resample_after", "an integer >= 1 (steps without firing)", check=lambda v: v >= 1
    )
    resample_every: Optional[int] = by_mode(
        CORRECTIONS, "resample_every", "an integer >= 1 (steps)", check=lambda v: v >= 1
    )
    resample_source: Optional[str] = by_mode(CORRECTIONS, "resample_source", "", options=("input", "residual"))
    resample_pick: Optional[str] = by_mode(CORRECTIONS, "resample_pick", "", options=("sample", "top"))
    resample_encoder: Optional[str] = by_mode(CORRECTIONS, "resample_encoder", "", options=("input", "unit"))
    adaptive_sparsity: bool = setting(True, allowed="true or false")
    adaptive_rule: Optional[str] = by_mode(CORRECTIONS, "adaptive_rule", "", options=("loss_ratio", "fvu"))
    target_fvu: float = setting(
        0.1,
        allowed="a float in (0, 1] (adaptive_rule=fvu: target fraction of variance unexplained)",
        check=lambda v: 0 < v <= 1,
    )
    recon_target: float = setting(
        2.5, allowed="a float > 0 (adaptive_rule=loss_ratio: target per-element MSE)", check=lambda v: v > 0
    )
    merge: bool = setting(True, allowed="true or false")
    merge_every: int = setting(100, allowed="an integer >= 1 (steps)", check=lambda v: v >= 1)
    merge_threshold: float = setting(0.9, allowed="a float in (0, 1) (decoder cosine)", check=lambda v: 0 < v < 1)
    merge_op: Optional[str] = by_mode(CORRECTIONS, "merge_op", "", options=("average", "sum"))
    merge_keep: Optional[str] = by_mode(CORRECTIONS, "merge_keep", "", options=("first", "busier"))
    merge_drop: Optional[str] = by_mode(CORRECTIONS, "merge_drop", "", options=("silence", "resample"))


@register_trainer("hierarchical")
class HierarchicalTrainer(Trainer):
    params_cls = HierarchicalParams

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.opt = resolve(self.params, CORRECTIONS)
        dev = self.device
        self.steps_since_fired = torch.zeros(self.d_sae, dtype=torch.long, device=dev)
        self.window_counts = torch.zeros(self.d_sae, device=dev)
        self.window_tokens = 0
        self.rates = torch.zeros(self.d_sae, device=dev)  # last complete window
        self.fvu_ema = torch.ones((), device=dev)
        self.recon_ratio = torch.ones((), device=dev)  # this step's per-element MSE / recon_target
        self.n_resampled = 0
        self.n_merged = 0
        # logged values that change only at a check (rebuilt there, never per step):
        # resampled, merged, dead_at_check, max_decoder_cos
        self.check_log = torch.zeros(4, device=dev)
        self._last: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # (x, resid, per-token loss, fired)

    def build_sae(self, generator: torch.Generator) -> SparseAutoencoder:
        return HierarchicalSAE(self.d_in, self.d_sae, generator=generator)

    def l1_base(self) -> float:
        """The scheduled coefficient at this step (host float: a function of the step count only)."""
        p, o = self.params, self.opt
        start = p.l1_start if p.l1_start > 0 else 1.0 / math.sqrt(self.d_sae)
        t = self.step_count / max(1, self.total_steps - 1)
        coeff = start * (1 - (1 - o.l1_end_frac) * t) if p.l1_decay else start
        warm = o.l1_warmup * self.total_steps
        return coeff * (min(1.0, (self.step_count + 1) / warm) if warm > 0 else 1.0)

    def sparsity_scale(self) -> Tensor:
        """The adaptive factor on the L1 coefficient (device scalar)."""
        if not self.params.adaptive_sparsity:
            return torch.ones((), device=self.device)
        if self.opt.adaptive_rule == "loss_ratio":
            return self.recon_ratio.clamp(0.1, 2.0)
        return (self.params.target_fvu / self.fvu_ema.clamp_min(1e-8)).clamp(0.1, 2.0)

    def compute_loss(self, x: Tensor) -> StepOutput:
        x_hat, f = self.sae(x)
        mse = mse_loss(x, x_hat)
        l1 = f.sum(-1).mean()
        with torch.no_grad():
            resid = x - x_hat.float()
            sq = resid.pow(2)
            fvu = sq.sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
            self.fvu_ema.mul_(0.95).add_(0.05 * fvu)
            self.recon_ratio = sq.mean() / self.params.recon_target
            scale = self.sparsity_scale()
            base = self.l1_base()
            coeff = base * scale
        active = f > 0
        fired = active.any(0)
        with torch.no_grad():
            self.window_counts += active.float().sum(0)
            self._last = (x, resid.detach(), sq.sum(-1), fired)
        parts = {
            "l1": l1,
            "l1_base": torch.full((), base, device=x.device),
            "l1_coeff": coeff,
            "sparsity_scale": scale,
            "recon_ratio": self.recon_ratio,
            "fvu_ema": self.fvu_ema.clone(),
            "mean_rate": self.rates.mean(),
            "active_frac": (self.rates > 0).float().mean(),
        }
        if self.params.resample:  # a mechanism that is off logs nothing (not a misleading 0)
            parts.update(resampled=self.check_log[0], dead_at_check=self.check_log[2])
        if self.params.merge:
            parts.update(merged=self.check_log[1], max_decoder_cos=self.check_log[3])
        return StepOutput(
            loss=mse + coeff * l1, x_hat=x_hat, l0=active.float().sum(-1).mean(), fired=fired, parts=parts
        )

    def after_optimizer_step(self) -> None:
        assert self._last is not None
        x, resid, loss_per_token, fired = self._last
        o = self.opt
        done = self.step_count + 1  # steps completed including this one
        self.steps_since_fired.add_(1).masked_fill_(fired, 0)
        self.window_tokens += resid.shape[0]
        if done % self.params.rate_window == 0:
            self.rates = self.window_counts / max(1, self.window_tokens)
            self.window_counts.zero_()
            self.window_tokens = 0
        merge_now = self.params.merge and done % self.params.merge_every == 0
        resample_now = self.params.resample and done % o.resample_every == 0
        log = self.check_log.tolist() if merge_now or resample_now else None  # host sync at checks only
        if merge_now:
            assert log is not None
            _, log[3] = self.merge_duplicates(x, resid, loss_per_token, fired)
        if resample_now:
            assert log is not None
            dead = (self.steps_since_fired > o.resample_after).nonzero().flatten()
            log[2] = float(dead.numel())
            if dead.numel():
                self.resample_(dead, x, resid, loss_per_token)
        if log is not None:
            log[0], log[1] = float(self.n_resampled), float(self.n_merged)
            self.check_log = torch.tensor(log, device=self.device)
        self._last = None

    @torch.no_grad()
    def reset_optimizer_rows_(self, idx: Tensor) -> None:
        sae = self.sae
        reset_adam_state_(self.optimizer, sae.W_dec, idx, 0)
        reset_adam_state_(self.optimizer, sae.W_enc, idx, 1)
        reset_adam_state_(self.optimizer, sae.b_enc, idx, 0)

    @torch.no_grad()
    def resample_(self, idx: Tensor, x: Tensor, resid: Tensor, loss_per_token: Tensor, count: bool = True) -> int:
        """Point latents `idx` at high-loss tokens (their input or residual, per `resample_source`)
        and reset their Adam moments; returns how many were resampled.

        `resample_pick=top`: the highest-loss tokens, cycling when there are more latents than
        tokens. `sample`: tokens drawn with probability proportional to |x - x_hat| without
        replacement, so at most one batch of latents per call (the rest stay dead)."""
        sae = self.sae
        o = self.opt
        n_tokens = loss_per_token.numel()
        if o.resample_pick == "top":
            order = loss_per_token.argsort(descending=True)
            pick = order[torch.arange(idx.numel(), device=order.device) % n_tokens]
        else:
            idx = idx[:n_tokens]
            # seeded by step: reproducible, and identical after a resume
            g = torch.Generator(device=loss_per_token.device).manual_seed(self.seed * 1_000_003 + self.step_count)
            pick = torch.multinomial(
                loss_per_token.sqrt().clamp_min(1e-12), idx.numel(), replacement=False, generator=g
            )
        n = idx.numel()
        src = resid if o.resample_source == "residual" else x
        vecs = src[pick].float()
        dirs = vecs / vecs.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive = torch.ones(self.d_sae, dtype=torch.bool, device=self.device)
        alive[idx] = False
        # the template's resample_neurons (dictionary_learning StandardTrainer): encoder column = the
        # sampled vector x 0.2 x the mean alive encoder norm (`input`); `unit` uses its direction instead
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.ones((), device=self.device)
        enc = vecs if o.resample_encoder == "input" else dirs
        sae.W_dec[idx] = dirs.to(sae.W_dec.dtype)
        sae.W_enc[:, idx] = (enc.T * 0.2 * enc_norm).to(sae.W_enc.dtype)
        sae.b_enc[idx] = 0.0
        self.reset_optimizer_rows_(idx)
        self.steps_since_fired[idx] = 0
        self.tokens_since_fired[idx] = 0
        if count:
            self.n_resampled += n
        return n

    @torch.no_grad()
    def merge_duplicates(
        self, x: Tensor, resid: Tensor, loss_per_token: Tensor, fired: Tensor | None = None
    ) -> tuple[list[tuple[int, int]], float]:
        """Merge every disjoint pair with decoder cosine > merge_threshold, best first; returns
        ((kept, removed) pairs, the largest decoder cosine seen).

        `fired` is this step's StepOutput.fired, which the base step applies to the dead-latent
        counters after this hook: silenced latents are cleared from it so they stay marked dead.
        """
        sae = self.sae
        o = self.opt
        used: set[int] = set()
        merged: list[tuple[int, int]] = []
        pairs, max_cos = high_cosine_pairs(sae.W_dec, self.params.merge_threshold)
        rates = self.rates.tolist() if pairs and o.merge_keep == "busier" else None  # one transfer
        for i, j, _ in pairs:
            if i in used or j in used:
                continue
            used.update((i, j))
            if rates is not None:
                keep, drop = (i, j) if rates[i] >= rates[j] else (j, i)
            else:
                keep, drop = i, j  # i < j
            merged.append((keep, drop))
        if not merged:
            return merged, max_cos
        # the pairs are disjoint: every merge at once, one upload of the indices
        both = torch.tensor(merged, device=self.device)
        keep_idx, drop_idx = both[:, 0], both[:, 1]
        d = sae.W_dec[keep_idx] + sae.W_dec[drop_idx]
        sae.W_dec[keep_idx] = d / d.norm(dim=1, keepdim=True).clamp_min(1e-8)  # the average's direction
        if o.merge_op == "sum":
            sae.W_enc[:, keep_idx] += sae.W_enc[:, drop_idx]
            sae.b_enc[keep_idx] += sae.b_enc[drop_idx]
        else:
            sae.W_enc[:, keep_idx] = 0.5 * (sae.W_enc[:, keep_idx] + sae.W_enc[:, drop_idx])
            sae.b_enc[keep_idx] = 0.5 * (sae.b_enc[keep_idx] + sae.b_enc[drop_idx])
        self.reset_optimizer_rows_(keep_idx)
        if o.merge_drop == "resample" and self.params.resample:
            n = self.resample_(drop_idx, x, resid, loss_per_token, count=False)  # counted as merges
            drop_idx = drop_idx[n:]  # `sample` reaches at most a batch of them: silence the rest
        if drop_idx.numel():  # silence: zero encoder -> never fires; counted dead until something revives it
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
        return merged, max_cos

    def extra_state(self) -> dict[str, Any]:
        return {
            "steps_since_fired": self.steps_since_fired.clone(),
            "window_counts": self.window_counts.clone(),
            "window_tokens": self.window_tokens,
            "rates": self.rates.clone(),
            "fvu_ema": self.fvu_ema.clone(),
            "n_resampled": self.n_resampled,
            "n_merged": self.n_merged,
            "check_log": self.check_log.clone(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        for key in ("steps_since_fired", "window_counts", "rates", "fvu_ema"):
            getattr(self, key).copy_(state[key].to(self.device))
        self.window_tokens = int(state["window_tokens"])
        self.n_resampled = int(state["n_resampled"])
        self.n_merged = int(state["n_merged"])
        if "check_log" in state:
            self.check_log = state["check_log"].to(self.device)
