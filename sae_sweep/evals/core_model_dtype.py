"""SAEBench's core-eval arithmetic in the LM's own dtype, for LMs that run in bf16 or fp16.

SAEBench 0.6.0 casts the SAE to the LM's dtype (``evals/core/main.py:1013``), computes every
per-token value in that dtype (the KL as ``softmax`` then ``log``, ``main.py:741-748``; the CE as
TransformerLens' ``log_softmax`` and gather, ``utilities/lm_utils.py:32-36``; norms, errors and
cosines on the bf16 activations, ``main.py:515-598``) and averages with ``torch.cat(...).mean()`` in
that dtype (``main.py:422, 615``); the scores come from those rounded means. On a bf16 LM that moves
the scores by a few hundredths (``ce_loss_score`` 0.929 in float64 vs 0.900 SAEBench's way on the
same inputs). :class:`ModelDtypeAccumulator` does the same operations on the same tensors, so the
metrics under SAEBench's names are SAEBench's numbers; the float64 ones are logged beside them
with the suffix ``_fp32`` (the SAE in float32, sums in float64).

On an fp32 LM both ways agree to ~2e-6 relative, and the float64 sums of ``core.CoreAccumulator``
are used alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["LOW_PRECISION", "ModelDtypeAccumulator", "per_position_in_dtype"]

# LM dtypes whose core metrics are computed SAEBench's way in that dtype
LOW_PRECISION = (torch.bfloat16, torch.float16)

# SAEBench's guard: inputs with a smaller norm count as norm 1 in the l2 ratio
_L2_RATIO_MIN_NORM = 1e-4


@torch.no_grad()
def per_position_in_dtype(
    clean: torch.Tensor, patched: torch.Tensor, tokens: torch.Tensor, chunk_elems: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL(clean || patched) [B, T], clean CE [B, T-1], patched CE [B, T-1]) computed in the logits'
    dtype as SAEBench computes them: ``p = softmax(clean)``, ``KL = sum p (log p - log softmax(patched))``
    with ``log`` of the rounded probabilities; CE = ``-log_softmax(logits)[t, token[t+1]]``. Positions
    are taken ``chunk_elems // vocab`` at a time; each row's softmax is computed on its own, so the
    chunking changes no value."""
    B, T, V = clean.shape
    flat_c, flat_p = clean.reshape(B * T, V), patched.reshape(B * T, V)
    target = torch.cat([tokens[:, 1:], tokens[:, :1]], 1).reshape(B * T, 1).to(clean.device)
    kl = torch.empty(B * T, dtype=clean.dtype, device=clean.device)
    ce_c, ce_p = torch.empty_like(kl), torch.empty_like(kl)
    rows = max(1, chunk_elems // V)
    for s in range(0, B * T, rows):
        c, p = flat_c[s : s + rows], flat_p[s : s + rows]
        prob_c, prob_p = F.softmax(c, dim=-1), F.softmax(p, dim=-1)
        kl[s : s + rows] = (prob_c * (torch.log(prob_c) - torch.log(prob_p))).sum(dim=-1)
        t = target[s : s + rows]
        ce_c[s : s + rows] = -F.log_softmax(c, dim=-1).gather(-1, t).squeeze(-1)
        ce_p[s : s + rows] = -F.log_softmax(p, dim=-1).gather(-1, t).squeeze(-1)
    return kl.view(B, T), ce_c.view(B, T)[:, :-1], ce_p.view(B, T)[:, :-1]


class ModelDtypeAccumulator:
    """Per-token values in the activations' dtype, kept as SAEBench keeps them (one tensor per batch
    and metric) and averaged with ``torch.cat(...).mean()``. Small: a few scalars per scored token."""

    _PER_TOKEN = (
        "l2_norm_in",
        "l2_norm_out",
        "l2_ratio",
        "relative_reconstruction_bias",
        "l0",
        "l1",
        "explained_variance_legacy",
        "mse",
        "cossim",
    )
    _DOWNSTREAM = (
        "kl_div_with_sae",
        "kl_div_with_ablation",
        "ce_loss_with_sae",
        "ce_loss_without_sae",
        "ce_loss_with_ablation",
    )

    def __init__(self, ce_keep) -> None:
        self._ce_keep = ce_keep  # [B, T] scored mask -> [B, T-1] scored CE positions
        self.values: dict[str, list[torch.Tensor]] = {k: [] for k in self._PER_TOKEN + self._DOWNSTREAM}
        self.mean_sum_of_squares: list[torch.Tensor] = []
        self.mean_act_per_dimension: list[torch.Tensor] = []
        self.mean_sum_of_resid_squared: list[torch.Tensor] = []
        self.fire_counts: torch.Tensor | None = None  # [d_sae] scored tokens each latent fired on (f > 0)
        self.fire_seqs: torch.Tensor | None = None  # [d_sae] sequences each latent fired in
        self.n_tokens = 0

    @torch.no_grad()
    def update_reconstruction(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, keep: torch.Tensor) -> None:
        """``x`` and ``x_hat`` [B, T, d_in] in the LM's dtype (the SAE ran in it), ``f`` [B, T, d_sae]."""
        flat_keep = keep.reshape(-1).to(x.device)
        xs = x.reshape(-1, x.shape[-1])[flat_keep]
        xh = x_hat.to(x.device).reshape(-1, x.shape[-1])[flat_keep]
        fs = f.reshape(-1, f.shape[-1])[flat_keep.to(f.device)]
        fired = (f > 0) & keep.to(f.device)[..., None]  # SAEBench main.py:603-609
        if self.fire_counts is None:
            self.fire_counts = torch.zeros(f.shape[-1], dtype=torch.int64, device=f.device)
            self.fire_seqs = torch.zeros_like(self.fire_counts)
        assert self.fire_seqs is not None
        self.fire_counts += fired.sum(dim=(0, 1))
        self.fire_seqs += fired.any(dim=1).sum(dim=0)
        self.n_tokens += int(flat_keep.sum())
        del fired
        v = self.values
        norm_in, norm_out = torch.norm(xs, dim=-1), torch.norm(xh, dim=-1)
        norm_in_for_div = norm_in.clone()
        norm_in_for_div[torch.abs(norm_in_for_div) < _L2_RATIO_MIN_NORM] = 1
        v["l2_norm_in"].append(norm_in)
        v["l2_norm_out"].append(norm_out)
        v["l2_ratio"].append(norm_out / norm_in_for_div)
        xhat_sq, dot = torch.norm(xh, dim=-1) ** 2, (xs * xh).sum(dim=-1)
        v["relative_reconstruction_bias"].append((xhat_sq.mean() / dot.mean()).unsqueeze(0))
        v["l0"].append((fs != 0).sum(dim=-1).float())
        v["l1"].append(fs.sum(dim=-1))
        resid = (xs - xh).pow(2).sum(dim=-1)
        v["mse"].append(resid / flat_keep.sum())
        v["explained_variance_legacy"].append(1 - resid / (xs - xs.mean(dim=0)).pow(2).sum(dim=-1))
        self.mean_sum_of_squares.append(xs.pow(2).sum(dim=-1).mean(dim=0))
        self.mean_act_per_dimension.append(xs.pow(2).mean(dim=0))
        self.mean_sum_of_resid_squared.append(resid.mean(dim=0))
        v["cossim"].append(
            (xs / torch.norm(xs, dim=-1, keepdim=True) * (xh / torch.norm(xh, dim=-1, keepdim=True))).sum(dim=-1)
        )

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
        """Per-position values from :func:`per_position_in_dtype`; ``keep [B, T]``."""
        kl_keep = keep.to(kl_sae.device)
        ce_keep = self._ce_keep(kl_keep)
        v = self.values
        v["kl_div_with_sae"].append(kl_sae[kl_keep])
        v["kl_div_with_ablation"].append(kl_abl[kl_keep])
        v["ce_loss_without_sae"].append(ce_clean[ce_keep])
        v["ce_loss_with_sae"].append(ce_sae[ce_keep])
        v["ce_loss_with_ablation"].append(ce_abl[ce_keep])

    def firing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(firings per scored token, firings per sequence fired in) per latent, float64 on CPU: the
        SAE in the LM's dtype decides which latents fire, as in SAEBench."""
        if self.fire_counts is None or self.fire_seqs is None or self.n_tokens == 0:
            raise ValueError("no scored tokens were accumulated")
        counts, seqs = self.fire_counts.cpu().double(), self.fire_seqs.cpu().double()
        return counts / self.n_tokens, torch.where(
            seqs > 0, counts / seqs.clamp_min(1), torch.full_like(counts, torch.nan)
        )

    def compute(self) -> dict[str, dict[str, float]]:
        """SAEBench's metrics under its category names (the ones it computes per token)."""
        m = {k: torch.cat(vals).mean().item() for k, vals in self.values.items() if vals}
        total = (
            torch.stack(self.mean_sum_of_squares).mean(dim=0) - torch.cat(self.mean_act_per_dimension).mean(dim=0) ** 2
        )
        ev = (1 - torch.stack(self.mean_sum_of_resid_squared).mean(dim=0) / total).item()
        kl_abl, kl_sae = m["kl_div_with_ablation"], m["kl_div_with_sae"]
        ce_abl, ce_sae, ce_clean = m["ce_loss_with_ablation"], m["ce_loss_with_sae"], m["ce_loss_without_sae"]
        nan = float("nan")
        return {
            "model_behavior_preservation": {
                "kl_div_score": (kl_abl - kl_sae) / kl_abl if kl_abl != 0 else nan,
                "kl_div_with_ablation": kl_abl,
                "kl_div_with_sae": kl_sae,
            },
            "model_performance_preservation": {
                "ce_loss_score": (ce_abl - ce_sae) / (ce_abl - ce_clean) if ce_abl != ce_clean else nan,
                "ce_loss_with_ablation": ce_abl,
                "ce_loss_with_sae": ce_sae,
                "ce_loss_without_sae": ce_clean,
            },
            "reconstruction_quality": {
                "explained_variance": ev,
                "explained_variance_legacy": m["explained_variance_legacy"],
                "mse": m["mse"],
                "cossim": m["cossim"],
            },
            "shrinkage": {
                "l2_norm_in": m["l2_norm_in"],
                "l2_norm_out": m["l2_norm_out"],
                "l2_ratio": m["l2_ratio"],
                "relative_reconstruction_bias": m["relative_reconstruction_bias"],
            },
            "sparsity": {"l0": m["l0"], "l1": m["l1"]},
        }
