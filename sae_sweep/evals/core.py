"""SAEBench's "core" eval: reconstruction, sparsity and downstream-preservation metrics.

Metric and category names are SAEBench's (``sae_bench/evals/core/main.py`` and its
``eval_output.py``), so flattened names read ``core/model_behavior_preservation/kl_div_score``.
Everything is streamed over batches of contexts and accumulated as float64 sums, so every mean is
a mean over scored TOKENS of the whole eval set, never a mean of per-batch means.

Reference: SAEBench 0.6.0 ``sae_bench/evals/core/main.py`` (``get_downstream_reconstruction_metrics``
lines 367-434, ``get_recons_loss`` 639-788, ``get_sparsity_and_variance_metrics`` 437-636). Every
metric under a SAEBench name is SAEBench's formula on the same tokens, batched as SAEBench batches
(``batch_size`` contexts = its ``batch_size_prompts``), including the two formulas SAELens fixed in
2026 and SAEBench 0.6.0 still has:

* ``explained_variance``: SAEBench's ``1 - R / (S - m^2)`` (R, S: means over batches of the per-batch
  mean squared residual / squared norm; m = S / d_in). Close to the UNCENTRED explained variance.
  The centred ``1 - E||x - x_hat||^2 / E||x - E[x]||^2`` over the whole eval set (SAELens 6.54.12,
  PR #665) is ``explained_variance_centred``; the per-token form of SAEBench's paper is
  ``explained_variance_legacy``.
* ``mse``: SAEBench's per-token squared error divided by the number of scored tokens in its batch
  (it scales as 1 / tokens per batch). ``mse_per_token`` is SAELens 6.54.12's (PR #711:
  ``E||x - x_hat||^2``); ``mse_per_element`` is that divided by ``d_in``.
* ``relative_reconstruction_bias``: the mean over batches of per-batch ratios, as SAEBench;
  ``relative_reconstruction_bias_global`` is one ratio of sums over all tokens.

Other means are over scored tokens of the whole eval set (SAEBench ``torch.cat(...).mean()``), in
float64. Scored tokens: positions whose token is in SAEBench's ignore set {BOS, EOS, PAD}
(``special_tokens="saebench"``) are left out of every average; CE position t (predicting t+1) is
scored when its INPUT token is scored (``ce_positions="saebench"``). The SAE splice keeps special
positions' original activation (``exclude_special_tokens_from_reconstruction``, on in SAEBench's
published runs); zero ablation zeroes every position. Named options beside these are in
:class:`CoreSettings`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F

from sae_sweep.config import choice, parse, setting
from sae_sweep.evals.core_model_dtype import LOW_PRECISION, ModelDtypeAccumulator, per_position_in_dtype
from sae_sweep.evals.registry import register_eval
from sae_sweep.evals.schema import EvalOutput
from sae_sweep.util.metrics import Metric
from sae_sweep.util.progress import progress_iter

__all__ = [
    "EVAL_TYPE_ID",
    "CoreAccumulator",
    "ce_keep_mask",
    "ce_loss_score",
    "cosine_sim_per_token",
    "density_metrics",
    "explained_variance_centred",
    "explained_variance_legacy_per_token",
    "explained_variance_saebench",
    "keep_mask",
    "kl_div_score",
    "l2_ratio_per_token",
    "max_cosine_sim",
    "relative_reconstruction_bias",
    "run_core_eval",
    "splice_keep_special",
]

EVAL_TYPE_ID = "core"

# SAEBench's guard: inputs with a smaller norm count as norm 1 in the l2 ratio.
_L2_RATIO_MIN_NORM = 1e-4
# Below these the score denominators are numerically meaningless; we flag, not hide, them.
_TINY_KL = 1e-9
_TINY_CE_GAP = 1e-9


class SpliceLM(Protocol):
    """What the core eval needs from a language model (``sae_sweep.models.lm.LanguageModel`` has it)."""

    def activations(self, input_ids: torch.Tensor, layer: int, hook: str) -> torch.Tensor: ...

    def logits_with_splice(
        self,
        input_ids: torch.Tensor,
        layer: int,
        hook: str,
        fn: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> torch.Tensor: ...


# Pure metric functions (per token or from sums); the accumulator and the tests use these.


def keep_mask(tokens: torch.Tensor, special_token_ids: Iterable[int | None]) -> torch.Tensor:
    """Bool mask, True where the token is scored (not BOS/EOS/PAD). ``None`` ids are ignored."""
    ids = sorted({int(t) for t in special_token_ids if t is not None})
    if not ids:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))


CE_POSITIONS = ("saebench", "both_non_special")


def ce_keep_mask(keep: torch.Tensor, mode: str = "saebench") -> torch.Tensor:
    """Mask ``[B, T-1]`` for next-token CE (position t predicts t+1).

    ``saebench``: t is scored when its INPUT token is scored (SAEBench ``main.py:404-416`` truncates
    the token mask as ``mask[:, :-1]``; SAELens ``evals.py:363-391`` does the same), so predicting a
    BOS separator or an EOS counts. ``both_non_special``: the input AND the target must be scored.
    """
    if mode == "saebench":
        return keep[:, :-1]
    if mode == "both_non_special":
        return keep[:, :-1] & keep[:, 1:]
    raise ValueError(f"ce_positions={mode!r}: allowed values are {', '.join(CE_POSITIONS)}")


def kl_div_from_logprobs(clean_logp: torch.Tensor, patched_logp: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(clean || patched) = sum_v p_v (log p_v - log q_v)`` from log-probs."""
    p = clean_logp.exp()
    # Where p == 0 the term is 0 even if both log-probs are -inf (masked vocab rows): avoid 0 * nan.
    terms = torch.where(p > 0, p * (clean_logp - patched_logp), torch.zeros_like(p))
    return terms.sum(-1)


# Positions whose log-probs are computed at once (x vocab elements): 64 MiB per fp32 temporary.
LOGIT_CHUNK_ELEMS = 1 << 24


def downstream_per_position(
    clean: torch.Tensor, patched: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL(clean || patched) [B, T], clean CE [B, T-1], patched CE [B, T-1]) from two forwards'
    logits [B, T, vocab] as the model gives them (bf16 on a GPU).

    Log-probs are taken in >= fp32 a chunk of positions at a time (``LOGIT_CHUNK_ELEMS``), so no
    fp32 copy of the batch's logits exists: for Gemma-2's 256k vocabulary at 16 x 1024 tokens the
    batch's bf16 logits are 8.4 GB each, an fp32 log-prob copy 17 GB."""
    B, T, V = clean.shape
    dtype = torch.promote_types(clean.dtype, torch.float32)
    flat_c, flat_p = clean.reshape(B * T, V), patched.reshape(B * T, V)
    # the next token of each position; a row's last position has none (a placeholder, dropped)
    target = torch.cat([tokens[:, 1:], tokens[:, :1]], 1).reshape(B * T, 1).to(clean.device)
    kl = torch.empty(B * T, dtype=dtype, device=clean.device)
    ce_c, ce_p = torch.empty_like(kl), torch.empty_like(kl)
    rows = max(1, LOGIT_CHUNK_ELEMS // V)
    for s in range(0, B * T, rows):
        lc = F.log_softmax(flat_c[s : s + rows].to(dtype), dim=-1)
        lp = F.log_softmax(flat_p[s : s + rows].to(dtype), dim=-1)
        kl[s : s + rows] = kl_div_from_logprobs(lc, lp)
        ce_c[s : s + rows] = -lc.gather(-1, target[s : s + rows]).squeeze(-1)
        ce_p[s : s + rows] = -lp.gather(-1, target[s : s + rows]).squeeze(-1)
    return kl.view(B, T), ce_c.view(B, T)[:, :-1], ce_p.view(B, T)[:, :-1]


def ce_from_logprobs(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy ``[B, T-1]``: ``-log p(tokens[t+1] | prefix up to t)``."""
    return -logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)


def kl_div_score(kl_with_ablation: float, kl_with_sae: float) -> float:
    """SAEBench: ``(KL_abl - KL_sae) / KL_abl``; 1 = SAE preserves the output distribution, 0 = as bad
    as zeroing the activation. NaN when ablation does not change the output at all."""
    if kl_with_ablation == 0:
        return math.nan
    return (kl_with_ablation - kl_with_sae) / kl_with_ablation


def ce_loss_score(ce_with_ablation: float, ce_with_sae: float, ce_without_sae: float) -> float:
    """SAEBench: ``(CE_abl - CE_sae) / (CE_abl - CE_clean)``: the fraction of the loss increase from
    zero-ablation that the SAE recovers. NaN when ablation costs nothing."""
    gap = ce_with_ablation - ce_without_sae
    if gap == 0:
        return math.nan
    return (ce_with_ablation - ce_with_sae) / gap


def explained_variance_centred(sum_x: torch.Tensor, sum_sq_norm: float, sum_resid_sq: float, n: int) -> float:
    """``1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2`` from streaming sums.

    ``sum_x`` is ``sum_t x_t`` (a vector), ``sum_sq_norm`` is ``sum_t ||x_t||^2``; the total sum of
    squares about the global mean is ``sum_sq_norm - ||sum_x||^2 / n``. Pass sums of ``x - c`` for
    any fixed shift ``c`` (the accumulator does, for numerical stability): the result is unchanged.
    """
    sum_x = sum_x.to(torch.float64)
    total = float(sum_sq_norm) - float(sum_x.dot(sum_x)) / n
    if total <= 0:
        return math.nan
    return 1.0 - float(sum_resid_sq) / total


def explained_variance_legacy_per_token(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """SAEBench's ``explained_variance_legacy`` for ONE batch of scored tokens ``[n, d]``.

    Per token: ``1 - ||x_t - x_hat_t||^2 / ||x_t - mean_batch(x)||^2``, where the mean is over the
    scored tokens of this batch (SAEBench: ``batch_size_prompts`` contexts, flattened, special tokens
    removed). The eval reports the mean over all tokens of these values. It depends on the batch
    size and is dominated by tokens near the batch mean, hence "legacy".
    """
    x = x.to(torch.float64)
    x_hat = x_hat.to(torch.float64)
    resid = (x - x_hat).pow(2).sum(-1)
    spread = (x - x.mean(0)).pow(2).sum(-1)
    return 1.0 - resid / spread


def cosine_sim_per_token(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``cos(x_t, x_hat_t)`` per token, SAEBench's ``x/||x|| . x_hat/||x_hat||`` (``main.py:592-598``):
    NaN when either vector is zero (SAEBench then reports the metric as NaN, written as -1)."""
    x = x.to(torch.float64)
    x_hat = x_hat.to(torch.float64)
    return (x / x.norm(dim=-1, keepdim=True) * (x_hat / x_hat.norm(dim=-1, keepdim=True))).sum(-1)


def l2_ratio_per_token(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``||x_hat_t|| / ||x_t||`` per token; inputs with norm < 1e-4 divide by 1 (SAEBench's guard)."""
    norm_in = x.to(torch.float64).norm(dim=-1)
    norm_out = x_hat.to(torch.float64).norm(dim=-1)
    return norm_out / torch.where(norm_in < _L2_RATIO_MIN_NORM, torch.ones_like(norm_in), norm_in)


def relative_reconstruction_bias(sum_xhat_sq: float, sum_dot: float) -> float:
    """``E||x_hat||^2 / E[x . x_hat]`` (Gated SAE paper, eq. 10) from sums over one set of tokens.

    It is the ``1/gamma`` minimising ``E||x_hat / gamma - x||^2``: 1 means no systematic shrinkage,
    < 1 means the SAE shrinks its output. NaN when the reconstruction is orthogonal/zero on average.
    SAEBench computes it per batch and averages the batches' ratios (``main.py:547-551``); over all
    tokens at once it is ``relative_reconstruction_bias_global``.
    """
    if sum_dot == 0:
        return math.nan
    return float(sum_xhat_sq) / float(sum_dot)


def explained_variance_saebench(batch_sq_norm: list[float], batch_resid_sq: list[float], d_in: int) -> float:
    """SAEBench 0.6.0's ``explained_variance`` (``main.py:565-591, 616-627``), from per-batch means.

    ``batch_sq_norm[b]`` = mean over the batch's scored tokens of ``||x_t||^2`` (its ``x.pow(2).sum(-1)
    .mean(0)``), ``batch_resid_sq[b]`` = the same of ``||x_t - x_hat_t||^2``. SAEBench stacks these,
    and ``torch.cat`` of the per-dimension second moments ``x.pow(2).mean(0)`` flattens them to one
    scalar m = mean_b(batch_sq_norm) / d_in, so the result is ``1 - R / (S - m^2)``: not centred
    (the comment in SAEBench intends ``S - ||E x||^2``; SAELens PR #665 fixed the same code).
    """
    S = sum(batch_sq_norm) / len(batch_sq_norm)
    R = sum(batch_resid_sq) / len(batch_resid_sq)
    total = S - (S / d_in) ** 2
    return 1.0 - R / total if total != 0 else math.nan


def density_metrics(density: torch.Tensor) -> dict[str, float]:
    """SAEBench's misc metrics from per-latent firing frequencies (fraction of scored tokens).

    frac_alive: latents that fired at least once; freq_over_1/10_percent: fraction of latents firing
    on more than 1% / 10% of tokens; normalized_freq_over_*: their share of all firings (0 when
    nothing fired, as SAEBench).
    """
    density = density.to(torch.float64)
    total = float(density.sum())

    def share(threshold: float) -> float:
        return float(density[density > threshold].sum()) / total if total > 0 else 0.0

    return {
        "frac_alive": float((density > 0).double().mean()),
        "freq_over_1_percent": float((density > 0.01).double().mean()),
        "freq_over_10_percent": float((density > 0.1).double().mean()),
        "normalized_freq_over_1_percent": share(0.01),
        "normalized_freq_over_10_percent": share(0.1),
    }


def max_cosine_sim(vectors: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each row of ``vectors [F, d]``, the largest cosine similarity with any OTHER row.

    Chunked so an ``F x F`` matrix is never built. Returns ``[F]`` float32 on the input's device.
    """
    unit = F.normalize(vectors.detach().float(), dim=-1)
    n = unit.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=unit.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sims = unit[start:stop] @ unit.T
        rows = torch.arange(stop - start, device=unit.device)
        sims[rows, rows + start] = -math.inf  # a latent is not its own nearest neighbour
        out[start:stop] = sims.max(dim=1).values
    return out


def splice_keep_special(act: torch.Tensor, keep: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    """``replacement`` at scored positions, the original ``act`` at special ones (``keep [B, T]``)."""
    return torch.where(keep[..., None], replacement.to(act.dtype), act)


# Streaming accumulation


class CoreAccumulator:
    """Float64 running sums for every core metric; ``compute()`` turns them into SAEBench metrics.

    Feed it batch by batch: ``update_reconstruction`` with the activations, reconstruction and
    latents of a batch, ``update_downstream`` with per-position KL and CE values. Batches may have
    different sizes; all means are over scored tokens.
    """

    def __init__(self, ce_positions: str = "saebench") -> None:
        ce_keep_mask(torch.ones(1, 2, dtype=torch.bool), ce_positions)  # a bad mode fails here, not mid-eval
        self.ce_positions = ce_positions
        self.n_tokens = 0  # scored tokens seen by the reconstruction metrics
        self.n_sequences = 0
        self.d_in: int | None = None
        self.d_sae: int | None = None
        self._shift: torch.Tensor | None = None  # first batch's mean, keeps the EV sums well scaled
        self.sum_x: torch.Tensor | None = None  # sum of (x - shift)
        self.sum_sq = 0.0  # sum ||x - shift||^2
        self.sum_resid_sq = 0.0  # sum ||x - x_hat||^2
        self.sum_ev_legacy = 0.0
        self.sum_cossim = 0.0
        self.sum_norm_in = 0.0
        self.sum_norm_out = 0.0
        self.sum_l2_ratio = 0.0
        self.sum_xhat_sq = 0.0
        self.sum_dot = 0.0
        # SAEBench's per-batch quantities (one entry per update_reconstruction call)
        self.sum_mse_saebench = 0.0  # sum_t ||x_t - x_hat_t||^2 / n_b
        self.batch_sq_norm: list[float] = []  # mean_t ||x_t||^2 per batch
        self.batch_resid_sq: list[float] = []  # mean_t ||x_t - x_hat_t||^2 per batch
        self.batch_rrb: list[float] = []  # mean_t ||x_hat||^2 / mean_t x . x_hat per batch
        self.sum_l0 = 0.0
        self.sum_l1 = 0.0
        self.fire_counts: torch.Tensor | None = None  # [d_sae] scored tokens each latent fired on
        self.fire_seqs: torch.Tensor | None = None  # [d_sae] sequences each latent fired in
        # downstream
        self.n_kl = 0
        self.sum_kl_sae = 0.0
        self.sum_kl_abl = 0.0
        self.n_ce = 0
        self.sum_ce_clean = 0.0
        self.sum_ce_sae = 0.0
        self.sum_ce_abl = 0.0

    @torch.no_grad()
    def update_reconstruction(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, keep: torch.Tensor) -> None:
        """One batch (SAEBench: ``batch_size_prompts`` contexts): ``x, x_hat [B, T, d_in]``,
        ``f [B, T, d_sae]``, ``keep [B, T]`` (True = scored)."""
        if x.shape != x_hat.shape or x.shape[:2] != keep.shape or f.shape[:2] != keep.shape:
            raise ValueError(
                f"shape mismatch: x {tuple(x.shape)}, x_hat {tuple(x_hat.shape)}, "
                f"f {tuple(f.shape)}, keep {tuple(keep.shape)}"
            )
        keep = keep.to(x.device)
        if self.d_sae is None:
            self.d_in, self.d_sae = x.shape[-1], f.shape[-1]
            self.fire_counts = torch.zeros(self.d_sae, dtype=torch.int64, device=f.device)
            self.fire_seqs = torch.zeros(self.d_sae, dtype=torch.int64, device=f.device)
        assert self.fire_counts is not None and self.fire_seqs is not None  # set by the first batch
        # Latent statistics straight from the [B, T, d_sae] tensor: no float copy of f is made.
        # l0 counts f != 0; SAEBench's densities count f > 0 (main.py:561, 603-609).
        f_keep = keep.to(f.device)
        self.sum_l0 += float(((f != 0) & f_keep[..., None]).sum())
        fired = (f > 0) & f_keep[..., None]
        self.fire_counts += fired.sum(dim=(0, 1))
        self.fire_seqs += fired.any(dim=1).sum(dim=0)
        del fired
        # per-token L1 = sum_i f_i WITHOUT abs, as SAEBench (main.py:562; the same for non-negative
        # latents), summed in >= float32 (bf16 latents would round it), then over tokens in float64
        l1_dtype = torch.promote_types(f.dtype, torch.float32)
        self.sum_l1 += float(f.sum(-1, dtype=l1_dtype)[f_keep].sum(dtype=torch.float64))
        self.n_sequences += x.shape[0]

        xs = x[keep].to(torch.float64)  # [n, d_in], scored tokens only
        xh = x_hat.to(x.device)[keep].to(torch.float64)
        n = xs.shape[0]
        if n == 0:
            return
        if self._shift is None:
            self._shift = xs.mean(0)
            self.sum_x = torch.zeros_like(self._shift)
        assert self.sum_x is not None  # set with the shift
        centred = xs - self._shift
        self.sum_x += centred.sum(0)
        self.sum_sq += float(centred.pow(2).sum())
        resid = (xs - xh).pow(2).sum(-1)  # [n] per-token squared error
        self.sum_resid_sq += float(resid.sum())
        self.sum_mse_saebench += float(resid.sum()) / n
        self.batch_sq_norm.append(float(xs.pow(2).sum(-1).mean()))
        self.batch_resid_sq.append(float(resid.mean()))
        dot = float((xs * xh).sum())
        self.batch_rrb.append(float(xh.pow(2).sum()) / dot if dot != 0 else math.nan)
        if n > 1:
            self.sum_ev_legacy += float(explained_variance_legacy_per_token(xs, xh).sum())
        else:
            # One scored token: its own batch mean, so 0/0 as in SAEBench; keep the NaN visible.
            self.sum_ev_legacy = math.nan
        self.sum_cossim += float(cosine_sim_per_token(xs, xh).sum())
        self.sum_norm_in += float(xs.norm(dim=-1).sum())
        self.sum_norm_out += float(xh.norm(dim=-1).sum())
        self.sum_l2_ratio += float(l2_ratio_per_token(xs, xh).sum())
        self.sum_xhat_sq += float(xh.pow(2).sum())
        self.sum_dot += dot
        self.n_tokens += n

    @torch.no_grad()
    def update_downstream(
        self,
        keep: torch.Tensor,
        kl_sae: torch.Tensor,
        kl_abl: torch.Tensor,
        ce_clean: torch.Tensor,
        ce_sae: torch.Tensor,
        ce_abl: torch.Tensor,
    ) -> None:
        """``keep [B, T]``; ``kl_* [B, T]`` per position; ``ce_* [B, T-1]`` per next-token prediction."""
        kl_keep = keep.to(kl_sae.device)
        self.n_kl += int(kl_keep.sum())
        self.sum_kl_sae += float(kl_sae[kl_keep].sum(dtype=torch.float64))
        self.sum_kl_abl += float(kl_abl[kl_keep].sum(dtype=torch.float64))
        ce_keep = ce_keep_mask(keep, self.ce_positions).to(ce_clean.device)
        self.n_ce += int(ce_keep.sum())
        self.sum_ce_clean += float(ce_clean[ce_keep].sum(dtype=torch.float64))
        self.sum_ce_sae += float(ce_sae[ce_keep].sum(dtype=torch.float64))
        self.sum_ce_abl += float(ce_abl[ce_keep].sum(dtype=torch.float64))

    def feature_density(self) -> torch.Tensor:
        """Per-latent firing frequency over scored tokens, float64 on CPU."""
        if self.fire_counts is None or self.n_tokens == 0:
            raise ValueError("no scored tokens were accumulated")
        return self.fire_counts.cpu().to(torch.float64) / self.n_tokens

    def consistent_activation_heuristic(self) -> torch.Tensor:
        """SAEBench: firings per sequence the latent fires in (NaN for latents that never fire)."""
        if self.fire_counts is None or self.fire_seqs is None:
            raise ValueError("no scored tokens were accumulated")
        counts = self.fire_counts.cpu().to(torch.float64)
        seqs = self.fire_seqs.cpu().to(torch.float64)
        return torch.where(seqs > 0, counts / seqs.clamp_min(1), torch.full_like(counts, math.nan))

    def compute(self) -> dict[str, dict[str, float]]:
        """SAEBench's metric categories (``misc_metrics`` without the weight-based averages)."""
        n, d_in, sum_x = self.n_tokens, self.d_in, self.sum_x
        if n == 0 or d_in is None or sum_x is None:
            raise ValueError("no scored tokens were accumulated")

        def mean(total: float, count: int) -> float:
            return total / count if count else math.nan

        kl_sae, kl_abl = mean(self.sum_kl_sae, self.n_kl), mean(self.sum_kl_abl, self.n_kl)
        ce_clean, ce_sae, ce_abl = (
            mean(self.sum_ce_clean, self.n_ce),
            mean(self.sum_ce_sae, self.n_ce),
            mean(self.sum_ce_abl, self.n_ce),
        )
        return {
            "model_behavior_preservation": {
                "kl_div_score": kl_div_score(kl_abl, kl_sae),
                "kl_div_with_ablation": kl_abl,
                "kl_div_with_sae": kl_sae,
            },
            "model_performance_preservation": {
                "ce_loss_score": ce_loss_score(ce_abl, ce_sae, ce_clean),
                "ce_loss_with_ablation": ce_abl,
                "ce_loss_with_sae": ce_sae,
                "ce_loss_without_sae": ce_clean,
            },
            "reconstruction_quality": {
                "explained_variance": explained_variance_saebench(self.batch_sq_norm, self.batch_resid_sq, d_in),
                "explained_variance_centred": explained_variance_centred(sum_x, self.sum_sq, self.sum_resid_sq, n),
                "explained_variance_legacy": self.sum_ev_legacy / n,
                "mse": self.sum_mse_saebench / n,
                "mse_per_token": self.sum_resid_sq / n,
                "mse_per_element": self.sum_resid_sq / (n * d_in),
                "cossim": self.sum_cossim / n,
            },
            "shrinkage": {
                "l2_norm_in": self.sum_norm_in / n,
                "l2_norm_out": self.sum_norm_out / n,
                "l2_ratio": self.sum_l2_ratio / n,
                "relative_reconstruction_bias": sum(self.batch_rrb) / len(self.batch_rrb),
                "relative_reconstruction_bias_global": relative_reconstruction_bias(self.sum_xhat_sq, self.sum_dot),
            },
            "sparsity": {"l0": self.sum_l0 / n, "l1": self.sum_l1 / n},
            "misc_metrics": density_metrics(self.feature_density()),
        }


# The eval


def _param_dtype(module: Any) -> torch.dtype | None:
    """The floating dtype of the SAE's parameters, so LM activations (maybe bf16) can be cast to it."""
    params = getattr(module, "parameters", None)
    if params is None:
        return None
    for p in params():
        if p.is_floating_point():
            return p.dtype
    return None


def _sae_in_dtype(sae: Any, dtype: torch.dtype) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A copy of the SAE in ``dtype`` (SAEBench runs the SAE in the LM's dtype, ``main.py:1013``)."""
    if not isinstance(sae, torch.nn.Module):
        raise TypeError(
            f"the core eval of a {dtype} LM runs the SAE in {dtype}, as SAEBench does: it needs a torch.nn.Module "
            f"it can cast, got {type(sae).__name__}"
        )
    return copy.deepcopy(sae).to(dtype)


def _weight_metrics(sae: Any) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """SAEBench's weight-based latent metrics when the SAE exposes ``W_enc [d_in, d_sae]`` and
    ``W_dec [d_sae, d_in]`` (our ``SparseAutoencoder`` does); empty otherwise."""
    w_enc, w_dec = getattr(sae, "W_enc", None), getattr(sae, "W_dec", None)
    if not (torch.is_tensor(w_enc) and torch.is_tensor(w_dec)) or w_enc.shape[1] < 2:
        return {}, {}
    enc = w_enc.detach().T.float()  # [d_sae, d_in]: one encoder direction per latent
    dec = w_dec.detach().float()
    max_enc, max_dec = max_cosine_sim(enc), max_cosine_sim(dec)
    per_latent = {
        "encoder_norm": enc.norm(dim=-1),
        "encoder_decoder_cosine_sim": F.cosine_similarity(enc, dec, dim=-1),
        "max_encoder_cosine_sim": max_enc,
        "max_decoder_cosine_sim": max_dec,
    }
    b_enc = getattr(sae, "b_enc", None)
    if torch.is_tensor(b_enc) and b_enc.shape == (enc.shape[0],):
        per_latent["encoder_bias"] = b_enc.detach().float()
    averages = {
        "average_max_encoder_cosine_sim": float(max_enc.double().mean()),
        "average_max_decoder_cosine_sim": float(max_dec.double().mean()),
    }
    return averages, {k: v.cpu() for k, v in per_latent.items()}


def _density_histogram(density: torch.Tensor) -> dict[str, Any]:
    """Histogram of log10 firing frequency of the live latents (half-decade bins), plus the dead count."""
    edges = [x / 2 for x in range(-16, 1)]  # 1e-8 .. 1
    alive = density[density > 0]
    logd = alive.log10().clamp(min=edges[0], max=edges[-1])
    counts = torch.histc(logd.float(), bins=len(edges) - 1, min=edges[0], max=edges[-1]) if alive.numel() else None
    return {
        "log10_bin_edges": edges,
        "counts": [int(c) for c in counts.tolist()] if counts is not None else [0] * (len(edges) - 1),
        "n_dead": int((density == 0).sum()),
        "n_latents": int(density.numel()),
    }


@torch.no_grad()
def run_core_eval(
    lm: SpliceLM,
    sae: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    tokens: torch.Tensor,
    layer: int,
    hook: str,
    batch_size: int,
    special_token_ids: Iterable[int | None] | None = None,
    progress: bool = True,
    *,
    feature_details: bool = True,
    weight_metrics: bool = True,
    ce_positions: str = "saebench",
    exclude_special_tokens_from_reconstruction: bool = True,
) -> EvalOutput:
    """Run SAEBench's core eval of ``sae`` at ``(layer, hook)`` of ``lm`` on ``tokens [N, ctx]``.

    Per batch of ``batch_size`` contexts: activations ``x`` and ``(x_hat, f) = sae(x)`` give the
    reconstruction/sparsity sums; three full forwards give clean logits, logits with the SAE
    reconstruction spliced in (special positions keep their activation) and logits with the
    activation zeroed, for the KL and CE metrics.

    ``special_token_ids`` (BOS/EOS/PAD) are excluded from every average; ``None`` means the LM's
    ``special_token_ids`` attribute if it has one. ``ce_positions``: see :func:`ce_keep_mask`.
    ``exclude_special_tokens_from_reconstruction`` (SAEBench's flag, on in its published runs):
    special positions keep their activation in the splice; off, every position is reconstructed
    (SAEBench's default ``main.py:658-684``). ``feature_details`` adds SAEBench's per-latent
    list to ``details``; ``weight_metrics`` adds the encoder/decoder cosine metrics when the SAE
    exposes ``W_enc``/``W_dec``. Returns an :class:`EvalOutput` with ``eval_type_id="core"``.
    """
    if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an integer tensor [N, ctx], got {tuple(tokens.shape)} {tokens.dtype}")
    n_seqs, ctx = tokens.shape
    if n_seqs == 0 or ctx < 2:
        raise ValueError(f"need at least one context of >= 2 tokens for next-token CE, got {tuple(tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if special_token_ids is None:
        special_token_ids = getattr(lm, "special_token_ids", None) or ()
    special = sorted({int(t) for t in special_token_ids if t is not None})

    device = getattr(lm, "device", None)
    sae_dtype = _param_dtype(sae)
    tokens = tokens.long()

    def run_sae(act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sae(act.to(sae_dtype) if sae_dtype is not None else act)

    acc = CoreAccumulator(ce_positions)
    # A bf16/fp16 LM: SAEBench's names get SAEBench's arithmetic in that dtype (core_model_dtype),
    # with the SAE cast to it; the float64 results are logged beside them as ``<name>_fp32``.
    acc_lm: ModelDtypeAccumulator | None = None
    sae_lm: Any = None

    def splice_with(run: Callable, keep: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(act: torch.Tensor) -> torch.Tensor:
            if not exclude_special_tokens_from_reconstruction:
                return run(act)[0].to(act.dtype)
            return splice_keep_special(act, keep.to(act.device), run(act)[0])

        return fn

    starts = range(0, n_seqs, batch_size)
    for start in progress_iter(starts, "core eval", unit="batch", enabled=progress):
        batch = tokens[start : start + batch_size]
        if device is not None:
            batch = batch.to(device)
        keep = keep_mask(batch, special)

        # Reconstruction, shrinkage, sparsity and latent statistics.
        x = lm.activations(batch, layer, hook)
        if acc_lm is None and x.dtype in LOW_PRECISION:
            acc_lm, sae_lm = ModelDtypeAccumulator(lambda k: ce_keep_mask(k, ce_positions)), _sae_in_dtype(sae, x.dtype)
        x_hat, f = run_sae(x)
        acc.update_reconstruction(x, x_hat, f, keep)
        del x_hat, f
        if acc_lm is not None:
            x_hat, f = sae_lm(x)
            acc_lm.update_reconstruction(x, x_hat, f, keep)
            del x_hat, f
        del x

        # Downstream: compare the spliced forwards against the clean one, position by position,
        # from logits in the model's dtype (log-probs a chunk at a time: downstream_per_position).
        # At most two [B, T, vocab] logits tensors are alive at once.
        clean = lm.logits_with_splice(batch, layer, hook, None)
        if acc_lm is not None:
            lm_logits = lm.logits_with_splice(batch, layer, hook, splice_with(sae_lm, keep))
            kl_sae_lm, ce_clean_lm, ce_sae_lm = per_position_in_dtype(clean, lm_logits, batch, LOGIT_CHUNK_ELEMS)
            del lm_logits
        sae_logits = lm.logits_with_splice(batch, layer, hook, splice_with(run_sae, keep))
        kl_sae, ce_clean, ce_sae = downstream_per_position(clean, sae_logits, batch)
        del sae_logits
        abl_logits = lm.logits_with_splice(batch, layer, hook, torch.zeros_like)
        kl_abl, _, ce_abl = downstream_per_position(clean, abl_logits, batch)
        if acc_lm is not None:
            kl_abl_lm, _, ce_abl_lm = per_position_in_dtype(clean, abl_logits, batch, LOGIT_CHUNK_ELEMS)
            acc_lm.update_downstream(keep, kl_sae_lm, kl_abl_lm, ce_clean_lm, ce_sae_lm, ce_abl_lm)
        del abl_logits, clean
        acc.update_downstream(keep, kl_sae, kl_abl, ce_clean, ce_sae, ce_abl)

    if acc.n_tokens == 0:
        raise ValueError(f"every token of the eval set is special ({special}); nothing to score")

    metrics = acc.compute()
    density, activation_heuristic = acc.feature_density(), acc.consistent_activation_heuristic()
    if acc_lm is not None:
        for category, values in acc_lm.compute().items():
            for name, value in values.items():
                metrics[category][name + FP32_SUFFIX] = metrics[category][name]
                metrics[category][name] = value
        density, activation_heuristic = acc_lm.firing()
        metrics["misc_metrics"] = density_metrics(density)
    averages, per_latent = _weight_metrics(sae) if weight_metrics else ({}, {})
    metrics["misc_metrics"].update(averages)
    metrics["token_stats"] = {
        # SAEBench's meaning: tokens fed through the model (special ones included).
        "total_tokens_eval_reconstruction": n_seqs * ctx,
        "total_tokens_eval_sparsity_variance": n_seqs * ctx,
        # What the averages are actually over.
        "scored_tokens": acc.n_tokens,
        "scored_ce_positions": acc.n_ce,
    }

    details: list[dict[str, Any]] = []
    if feature_details:
        columns = {
            "feature_density": density,
            "consistent_activation_heuristic": activation_heuristic,
            **per_latent,
        }
        lists = {k: v.tolist() for k, v in columns.items()}
        details = [{"index": i, **{k: col[i] for k, col in lists.items()}} for i in range(density.numel())]

    flags: dict[str, Any] = {}
    mbp, mpp = metrics["model_behavior_preservation"], metrics["model_performance_preservation"]
    if not mbp["kl_div_with_ablation"] > _TINY_KL:
        flags["kl_div_with_ablation_tiny"] = True  # kl_div_score's denominator is ~0
    if not mpp["ce_loss_with_ablation"] - mpp["ce_loss_without_sae"] > _TINY_CE_GAP:
        flags["ce_ablation_not_worse"] = True  # zero-ablation does not hurt: ce_loss_score is meaningless
    if acc.n_ce == 0:
        flags["no_ce_positions"] = True

    config = {
        "layer": layer,
        "hook": hook,
        "n_tokens": n_seqs * ctx,
        "n_sequences": n_seqs,
        "context_size": ctx,
        "batch_size": batch_size,
        "exclude_special": True,
        "special_token_ids": special,
        "ablation": "zero",
        "ce_positions": ce_positions,
        # SAEBench's CoreEvalConfig names for the same settings.
        "batch_size_prompts": batch_size,
        "n_eval_reconstruction_batches": len(starts),
        "n_eval_sparsity_variance_batches": len(starts),
        "exclude_special_tokens_from_reconstruction": bool(exclude_special_tokens_from_reconstruction),
        "compute_featurewise_density_statistics": True,
        "compute_featurewise_weight_based_metrics": bool(averages),
        # how the metrics under SAEBench's names were computed (core_model_dtype)
        "saebench_arithmetic": "llm dtype" if acc_lm is not None else "float64 sums",
    }
    return EvalOutput(
        eval_type_id=EVAL_TYPE_ID,
        config=config,
        metrics=metrics,
        details=details,
        flags=flags,
        unstructured={"feature_density_histogram": _density_histogram(density)},
    )


def saebench_special_ids(tokenizer: Any) -> list[int]:
    """SAEBench's ``ignore_tokens`` = {pad, eos, bos} ids of the tokenizer (``main.py:1101-1105``)."""
    ids = (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(tokenizer, "bos_token_id", None),
    )
    return sorted({int(i) for i in ids if i is not None})


@dataclass
class CoreSettings:
    """``eval.core``. Defaults give SAEBench 0.6.0's numbers with its published CLI settings
    (``--batch_size_prompts 16 --exclude_special_tokens_from_reconstruction``)."""

    batch_size: int = setting(
        16,
        allowed="an integer >= 1 (contexts per batch; SAEBench's batch_size_prompts: "
        "16; the per-batch metrics depend on it)",
        check=lambda v: v >= 1,
    )
    n_tokens: Optional[int] = setting(
        None, allowed="null (every held-out window) or an integer >= 1", check=lambda v: v >= 1
    )
    feature_details: bool = True  # per-latent densities in the JSON (large at big d_sae)
    weight_metrics: bool = True  # max encoder/decoder cosine sims (an O(d_sae^2) pass)
    # saebench: {BOS, EOS, PAD} of the tokenizer; all_special: also every other special token the
    # tokenizer declares (unk, mask, chat-template tokens)
    special_tokens: str = choice("saebench", ("saebench", "all_special"))
    ce_positions: str = choice("saebench", CE_POSITIONS)
    exclude_special_tokens_from_reconstruction: bool = True


# What the core eval logs (flattened as core/<category>/<metric>). "Scored tokens": positions whose
# token is not BOS/EOS/PAD (``special_tokens``); every mean is over the scored tokens of the whole
# held-out set (``eval.core.n_tokens``), unless it says per batch (``batch_size`` contexts).
_SB = "SAEBench 0.6.0 core"
METRICS: tuple[Metric, ...] = (
    Metric(
        "core/model_behavior_preservation/kl_div_score",
        "KL score",
        "higher",
        "fraction of KL recovered",
        "(KL_abl - KL_sae) / KL_abl, with KL_sae and KL_abl the kl_div_with_sae and kl_div_with_ablation "
        "below. 1: splicing in the SAE's reconstruction leaves the next-token distribution unchanged; 0: it "
        "is as bad as zeroing the activation; negative: worse. Not logged when ablation changes nothing "
        "(KL_abl = 0).",
        _SB,
    ),
    Metric(
        "core/model_behavior_preservation/kl_div_with_ablation",
        "KL with ablation",
        None,
        "nats per token",
        "Mean over scored positions of KL(clean || ablated) between the LM's next-token distributions without "
        "and with the hooked activation zeroed at every position. A property of the LM and layer (the "
        "denominator of the KL score), not of the SAE.",
        _SB,
    ),
    Metric(
        "core/model_behavior_preservation/kl_div_with_sae",
        "KL with SAE",
        "lower",
        "nats per token",
        "Mean over scored positions of KL(clean || spliced), the spliced forward replacing the hooked "
        "activation by the SAE's reconstruction at scored positions (special positions keep their "
        "activation unless exclude_special_tokens_from_reconstruction is off). Lower: the SAE changes the "
        "LM's predictions less.",
        _SB,
    ),
    Metric(
        "core/model_performance_preservation/ce_loss_score",
        "CE score",
        "higher",
        "fraction of CE recovered",
        "(CE_abl - CE_sae) / (CE_abl - CE_clean): the share of the next-token loss increase caused by zeroing "
        "the activation that the SAE's reconstruction avoids. 1: no loss increase; 0: as bad as ablation. Not "
        "logged when ablation costs nothing (CE_abl = CE_clean).",
        _SB,
    ),
    Metric(
        "core/model_performance_preservation/ce_loss_with_ablation",
        "CE with ablation",
        None,
        "nats per token",
        "Mean next-token cross-entropy with the hooked activation zeroed at every position, over scored CE "
        "positions (ce_positions: saebench scores position t when its input token is scored). A property "
        "of the LM and layer.",
        _SB,
    ),
    Metric(
        "core/model_performance_preservation/ce_loss_with_sae",
        "CE with SAE",
        "lower",
        "nats per token",
        "Mean next-token cross-entropy with the SAE's reconstruction spliced in, over scored CE positions. "
        "Lower: the SAE costs less of the LM's next-token performance (compare ce_loss_without_sae).",
        _SB,
    ),
    Metric(
        "core/model_performance_preservation/ce_loss_without_sae",
        "CE clean",
        None,
        "nats per token",
        "The LM's own mean next-token cross-entropy on the held-out windows, over scored CE positions. A "
        "property of the LM and data, not of the SAE.",
        _SB,
    ),
    Metric(
        "core/reconstruction_quality/explained_variance",
        "explained variance",
        "higher",
        "fraction of variance (SAEBench's formula)",
        "SAEBench 0.6.0's formula 1 - R / (S - m^2): R and S are the means over batches of each batch's mean "
        "||x - x_hat||^2 and mean ||x||^2 over scored tokens, m = S / d_in. Close to the UNCENTRED explained "
        "variance; above 1 when S exceeds d_in^2 (layers with massive activations). "
        "explained_variance_centred is the variance about the mean.",
        _SB,
    ),
    Metric(
        "core/reconstruction_quality/explained_variance_centred",
        "explained variance (centred)",
        "higher",
        "fraction of variance about the mean",
        "1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2 over every scored token of the eval set "
        "(one global mean). 1: perfect reconstruction; 0: no better than the mean activation (a run at or "
        "below 0 fails).",
        "this project (named option; SAELens 6.54.12's centred formula)",
    ),
    Metric(
        "core/reconstruction_quality/explained_variance_legacy",
        "explained variance (legacy)",
        "higher",
        "fraction of variance (per token)",
        "Mean over scored tokens of 1 - ||x_t - x_hat_t||^2 / ||x_t - mean_batch(x)||^2, the mean taken over "
        "the scored tokens of the token's batch. SAEBench's per-token form from its paper: it depends on the "
        "batch size and is dominated by tokens near the batch mean.",
        _SB,
    ),
    Metric(
        "core/reconstruction_quality/mse",
        "MSE (SAEBench)",
        "lower",
        "squared norm / tokens per batch",
        "SAEBench's mse: the sum over batches of (mean over the batch's scored tokens of ||x_t - x_hat_t||^2) "
        "divided by the number of scored tokens, i.e. about mse_per_token / scored tokens per batch. Compare "
        "it only at equal batch sizes; mse_per_token does not depend on them.",
        _SB,
    ),
    Metric(
        "core/reconstruction_quality/mse_per_token",
        "MSE per token",
        "lower",
        "squared activation norm",
        "Mean over scored tokens of ||x_t - x_hat_t||^2 (summed over d_in).",
        "this project (named option; SAELens 6.54.12's mse)",
    ),
    Metric(
        "core/reconstruction_quality/mse_per_element",
        "MSE per element",
        "lower",
        "squared activation",
        "mse_per_token / d_in: the mean squared error of one activation dimension.",
        "this project (named option)",
    ),
    Metric(
        "core/reconstruction_quality/cossim",
        "cosine(x, x_hat)",
        "higher",
        "cosine",
        "Mean over scored tokens of the cosine similarity between the activation and its reconstruction; "
        "not logged when some token has a zero activation or reconstruction.",
        _SB,
    ),
    Metric(
        "core/shrinkage/l2_norm_in",
        "input norm",
        None,
        "activation norm",
        "Mean over scored tokens of the activation's L2 norm (the scale the other numbers are in).",
        _SB,
    ),
    Metric(
        "core/shrinkage/l2_norm_out",
        "reconstruction norm",
        None,
        "activation norm",
        "Mean over scored tokens of the reconstruction's L2 norm.",
        _SB,
    ),
    Metric(
        "core/shrinkage/l2_ratio",
        "norm ratio",
        None,
        "ratio",
        "Mean over scored tokens of ||x_hat_t|| / ||x_t|| (inputs with norm < 1e-4 divide by 1). 1 is ideal: "
        "below 1 the SAE shrinks its output, above 1 it inflates it; neither side is better.",
        _SB,
    ),
    Metric(
        "core/shrinkage/relative_reconstruction_bias",
        "relative reconstruction bias",
        None,
        "ratio",
        "Mean over batches of E||x_hat||^2 / E[x . x_hat] over the batch's scored tokens (Gated SAE paper, "
        "eq. 10): 1/gamma for the gamma minimising E||x_hat / gamma - x||^2. 1 is ideal (no systematic "
        "shrinkage); below 1 the SAE shrinks its output.",
        _SB,
    ),
    Metric(
        "core/shrinkage/relative_reconstruction_bias_global",
        "relative reconstruction bias (global)",
        None,
        "ratio",
        "The same ratio computed once over every scored token of the eval set instead of averaged over "
        "batches. 1 is ideal.",
        "this project (named option)",
    ),
    Metric(
        "core/sparsity/l0",
        "L0",
        None,
        "active latents per token",
        "Mean over scored tokens of the number of latents with a non-zero activation. A budget (TopK sets it "
        "to k), not a score: compare other metrics at equal L0.",
        _SB,
    ),
    Metric(
        "core/sparsity/l1",
        "L1",
        None,
        "sum of latent activations per token",
        "Mean over scored tokens of the sum of the latent activations (without absolute values, as SAEBench; "
        "the same as L1 for non-negative latents). Scale-dependent; no better direction.",
        _SB,
    ),
    Metric(
        "core/misc_metrics/frac_alive",
        "alive latents",
        "higher",
        "fraction of latents",
        "Fraction of latents that fire (activation > 0) on at least one scored token of the eval set. Dead "
        "latents are wasted capacity (a run with 0 fails).",
        _SB,
    ),
    Metric(
        "core/misc_metrics/freq_over_1_percent",
        "latents > 1% density",
        None,
        "fraction of latents",
        "Fraction of latents that fire on more than 1% of scored tokens. Descriptive: dense latents may be "
        "legitimate or a sign of poorly separated features.",
        _SB,
    ),
    Metric(
        "core/misc_metrics/freq_over_10_percent",
        "latents > 10% density",
        None,
        "fraction of latents",
        "Fraction of latents that fire on more than 10% of scored tokens (very dense latents).",
        _SB,
    ),
    Metric(
        "core/misc_metrics/normalized_freq_over_1_percent",
        "firings from latents > 1% density",
        None,
        "fraction of firings",
        "Share of all latent firings on scored tokens that come from latents firing on more than 1% of "
        "tokens (0 when nothing fired).",
        _SB,
    ),
    Metric(
        "core/misc_metrics/normalized_freq_over_10_percent",
        "firings from latents > 10% density",
        None,
        "fraction of firings",
        "Share of all latent firings on scored tokens that come from latents firing on more than 10% of "
        "tokens (0 when nothing fired).",
        _SB,
    ),
    Metric(
        "core/misc_metrics/average_max_encoder_cosine_sim",
        "mean max encoder cosine",
        None,
        "cosine",
        "Mean over latents of the largest cosine similarity between the latent's encoder direction (column of "
        "W_enc) and any other latent's. Logged when weight_metrics is on and the SAE exposes W_enc/W_dec. "
        "High values mean near-duplicate encoders; no better direction is declared.",
        _SB,
    ),
    Metric(
        "core/misc_metrics/average_max_decoder_cosine_sim",
        "mean max decoder cosine",
        None,
        "cosine",
        "Mean over latents of the largest cosine similarity between the latent's decoder row and any other "
        "latent's (weight_metrics on). High values mean redundant dictionary directions.",
        _SB,
    ),
    Metric(
        "core/token_stats/total_tokens_eval_reconstruction",
        "tokens fed (reconstruction)",
        None,
        "tokens",
        "Tokens fed through the LM for the reconstruction metrics: windows x context size, special tokens "
        "included (SAEBench's meaning).",
        _SB,
    ),
    Metric(
        "core/token_stats/total_tokens_eval_sparsity_variance",
        "tokens fed (sparsity)",
        None,
        "tokens",
        "Tokens fed through the LM for the sparsity and variance metrics (the same windows here).",
        _SB,
    ),
    Metric(
        "core/token_stats/scored_tokens",
        "scored tokens",
        None,
        "tokens",
        "Tokens every reconstruction and sparsity mean is over (special tokens left out).",
        "this project",
    ),
    Metric(
        "core/token_stats/scored_ce_positions",
        "scored CE positions",
        None,
        "positions",
        "Next-token predictions the KL and CE means are over (ce_positions decides which).",
        "this project",
    ),
)


# On a bf16/fp16 LM the names above are SAEBench's arithmetic in that dtype (core_model_dtype); the
# float64 value of each name SAEBench computes per token is logged beside it with this suffix.
FP32_SUFFIX = "_fp32"


def _fp32_twin(m: Metric) -> Metric:
    return Metric(
        m.key + FP32_SUFFIX,
        m.label + " (fp32)",
        m.better,
        m.unit,
        "Logged when the LM runs in bf16 or fp16: the same quantity with the SAE in float32 and every sum in "
        f"float64 (log-probs in float32). {m.key.split('/')[-1]} itself is then SAEBench's arithmetic: the SAE "
        "cast to the LM's dtype, per-token values and their means in that dtype.",
        "this project (named option)",
    )


METRICS = METRICS + tuple(
    _fp32_twin(m) for m in METRICS if m.reference == _SB and m.key.split("/")[1] not in ("misc_metrics", "token_stats")
)


@register_eval("core", CoreSettings, METRICS)
def run(ctx: Any) -> EvalOutput:
    s = parse(CoreSettings, ctx.settings, "eval.core")
    tokens = ctx.tokens
    if s.n_tokens:  # the first ceil(n_tokens / ctx) held-out windows
        tokens = tokens[: max(1, -(-s.n_tokens // tokens.shape[1]))]
    special = saebench_special_ids(ctx.lm.tokenizer) if s.special_tokens == "saebench" else ctx.lm.special_token_ids
    return run_core_eval(
        ctx.lm,
        ctx.sae,
        tokens,
        ctx.layer,
        ctx.hook,
        batch_size=s.batch_size,
        special_token_ids=special,
        progress=ctx.progress,
        feature_details=s.feature_details,
        weight_metrics=s.weight_metrics,
        ce_positions=s.ce_positions,
        exclude_special_tokens_from_reconstruction=s.exclude_special_tokens_from_reconstruction,
    )
