"""FaithfulSAE's fake-feature ratio: latents that fire on meaningless input.

Reference: FaithfulSAE ``scripts/feat_match.py`` ``get_fake_features`` (github.com/seonglae/FaithfulSAE
at a98b2637), called from ``feat_match(fake=True)`` with ``n_tokens=1_000_000, threshold=0.1`` -- the
code that produced the fake-feature ratios FaithfulSAE reports (0.003-0.15 by model). Its procedure,
which the headline ``fake_feature_ratio`` follows by default:

* ``n_tokens // context_size`` sequences of ``context_size`` tokens (the SAE's context size), every
  token uniform over the tokenizer's FULL vocabulary (``get_vocab().values()``, special tokens
  included), position 0 overwritten with BOS;
* per sequence, position 0 is dropped, the rest encoded by the SAE; a latent *fires* at a token
  when its activation is ``> activation_threshold`` (1.0);
* proportion = firings / ``n_tokens`` (the nominal count, not the positions processed); a latent
  is fake when its proportion is ``> threshold`` (0.1). ``fake_feature_ratio`` = fake / d_sae.

A BatchTopK SAE is encoded as a per-token TopK of its k, as FaithfulSAE evaluates one
(``scripts/convert.py:29-47``: every SAE is loaded as SAELens ``topk``), not with its learned
threshold. Differences that remain: the random tokens come from a seeded torch generator (FaithfulSAE uses
unseeded ``random.choice``), and ids past the model's embedding table are not drawn (FaithfulSAE
would fail on them). The LM runs in the model's dtype (FaithfulSAE: bf16 except fp32 for GPT-2).

Two other published definitions, reported beside it on the same sequences under their own names:

* ``fake_feature_ratio_sequence`` -- the FaithfulSAE research notes' design: per sequence the
  latent's activations are SUMMED over tokens, F = sum_t f_t; it fires in the sequence when
  F > ``sequence_activation_threshold`` (1); fake when it fires in > ``sequence_threshold`` (5%)
  of the sequences (the notes use 1,000 random-token sentences). Nearly every live latent passes on
  long sequences (0.95 on SmolLM2-135M), which is why the published numbers are not this one.
* ``fake_feature_ratio_nonzero`` -- sae_sweep's earlier definition: token level, fires = ``f != 0``,
  fake when it fires on > ``nonzero_threshold`` (5%) of the random-token positions processed.

Metrics (category ``fake_features``): ``fake_feature_count``, ``fake_feature_ratio``, the
``_sequence`` and ``_nonzero`` counts and ratios, ``mean_random_token_l0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional

import torch

from sae_sweep.config import choice, setting
from sae_sweep.evals.registry import register_eval, settings_dict
from sae_sweep.evals.schema import EvalOutput
from sae_sweep.sae.batchtopk import per_token_topk
from sae_sweep.util.metrics import Metric

EVAL_TYPE_ID = "fake_features"


@dataclass
class FakeFeatureSettings:
    """``eval.fake_features``. Defaults: FaithfulSAE's ``get_fake_features`` as called for its tables."""

    n_tokens: int = setting(
        1_000_000,
        allowed="an integer >= 2 (FaithfulSAE: 1,000,000; n_tokens // context_size sequences)",
        check=lambda v: v >= 2,
    )
    context_size: Optional[int] = setting(
        None,
        allowed="null (the SAE's context size, else the held-out window length) or an integer >= 2",
        check=lambda v: v >= 2,
    )
    threshold: float = setting(
        0.1, allowed="a float in [0, 1] (FaithfulSAE: 0.1; fake above this proportion)", check=lambda v: 0 <= v <= 1
    )
    activation_threshold: float = setting(1.0, allowed="a float (FaithfulSAE: fires when activation > 1.0)")
    token_pool: str = choice("full_vocab", ("full_vocab", "non_special"))
    denominator: str = choice("nominal", ("nominal", "processed"))
    sequence_threshold: float = setting(
        0.05, allowed="a float in [0, 1] (notes' design: 5% of sequences)", check=lambda v: 0 <= v <= 1
    )
    sequence_activation_threshold: float = setting(1.0, allowed="a float (notes' design: sum over the sequence > 1)")
    nonzero_threshold: float = setting(
        0.05, allowed="a float in [0, 1] (fires = f != 0, 5% of positions)", check=lambda v: 0 <= v <= 1
    )
    batch_size: int = setting(32, allowed="an integer >= 1", check=lambda v: v >= 1)
    per_latent_details: bool = True


def random_token_sequences(
    vocab_size: int,
    special_ids: Iterable[int],
    n: int,
    context_size: int,
    bos: int,
    seed: int,
    pool: str = "full_vocab",
) -> torch.Tensor:
    """``[n, context_size]``: BOS, then tokens uniform over ids ``0..vocab_size-1`` (``full_vocab``,
    FaithfulSAE) or over the non-special ones (``non_special``); seeded."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    if pool == "non_special":
        special = [int(t) for t in special_ids if t is not None and 0 <= int(t) < vocab_size]
        allowed[torch.tensor(sorted(set(special)), dtype=torch.long)] = False
    elif pool != "full_vocab":
        raise ValueError(f"token_pool={pool!r}: allowed values are full_vocab, non_special")
    ids_pool = allowed.nonzero().squeeze(1)
    g = torch.Generator().manual_seed(int(seed))
    ids = ids_pool[torch.randint(len(ids_pool), (n, context_size), generator=g)]
    ids[:, 0] = int(bos)
    return ids


@dataclass
class FiringCounts:
    """Per-latent counts over the random sequences (BOS positions excluded)."""

    above: torch.Tensor  # tokens with f > activation_threshold
    nonzero: torch.Tensor  # tokens with f != 0
    seq_sum_above: torch.Tensor  # sequences with sum_t f_t > sequence_activation_threshold
    n_positions: int
    n_sequences: int
    l0_sum: float


def fake_feature_metrics(c: FiringCounts, s: Dict[str, Any], n_tokens_nominal: int) -> Dict[str, float]:
    """Counts and ratios of the three definitions (module docstring) from firing counts."""
    d = c.above.numel()
    denom = n_tokens_nominal if s["denominator"] == "nominal" else c.n_positions
    n_fs = int((c.above.double() / denom > s["threshold"]).sum())
    n_seq = int((c.seq_sum_above.double() / c.n_sequences > s["sequence_threshold"]).sum())
    n_nz = int((c.nonzero.double() / c.n_positions > s["nonzero_threshold"]).sum())
    return {
        "fake_feature_count": float(n_fs),
        "fake_feature_ratio": n_fs / d,
        "fake_feature_count_sequence": float(n_seq),
        "fake_feature_ratio_sequence": n_seq / d,
        "fake_feature_count_nonzero": float(n_nz),
        "fake_feature_ratio_nonzero": n_nz / d,
        "mean_random_token_l0": c.l0_sum / max(1, c.n_positions),
    }


@torch.no_grad()
def firing_counts(
    lm: Any,
    sae: torch.nn.Module,
    ids: torch.Tensor,
    layer: int,
    hook: str,
    batch_size: int,
    activation_threshold: float,
    sequence_activation_threshold: float,
) -> FiringCounts:
    p = next(iter(sae.parameters()))
    above = nonzero = seq_above = None
    l0_sum, n_pos = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size]
        acts = lm.activations(batch.to(lm.device), layer, hook)[:, 1:]  # FaithfulSAE: hidden_states[seq, 1:]
        b, t, d = acts.shape
        _, f = sae(acts.reshape(b * t, d).to(device=p.device, dtype=p.dtype))  # SAEs take [N, d_in]
        f = f.reshape(b, t, -1)
        if above is None:
            above = torch.zeros(f.shape[-1], dtype=torch.int64, device=f.device)
            nonzero, seq_above = torch.zeros_like(above), torch.zeros_like(above)
        above += (f > activation_threshold).sum(dim=(0, 1))
        nz = f != 0
        nonzero += nz.sum(dim=(0, 1))
        l0_sum += float(nz.sum())
        seq_above += (f.sum(dim=1, dtype=torch.float32) > sequence_activation_threshold).sum(0)
        n_pos += b * t
    if above is None or nonzero is None or seq_above is None:
        raise ValueError("no token sequences to count firings on")
    return FiringCounts(above.cpu(), nonzero.cpu(), seq_above.cpu(), n_pos, int(ids.shape[0]), l0_sum)


def run_fake_features(
    lm: Any,
    sae: Any,
    layer: int,
    hook: str,
    seed: int,
    settings: Dict[str, Any],
    sae_context_size: Optional[int] = None,
) -> EvalOutput:
    s = settings_dict(FakeFeatureSettings, settings, "eval.fake_features")
    ctx_size = int(s["context_size"] or sae_context_size or 128)
    vocab = len(lm.tokenizer)
    emb = getattr(lm.model, "get_input_embeddings", None)
    if emb is not None and emb() is not None:
        vocab = min(vocab, emb().num_embeddings)  # ids past the embedding table cannot be fed
    n_seqs = max(1, int(s["n_tokens"]) // ctx_size)  # FaithfulSAE: max(1, n_tokens // seq_len)
    ids = random_token_sequences(vocab, lm.special_token_ids, n_seqs, ctx_size, lm.bos_token_id, seed, s["token_pool"])
    c = firing_counts(
        lm,
        sae,
        ids,
        layer,
        hook,
        int(s["batch_size"]),
        float(s["activation_threshold"]),
        float(s["sequence_activation_threshold"]),
    )
    m = fake_feature_metrics(c, s, int(s["n_tokens"]))
    details = []
    if s["per_latent_details"]:
        denom = int(s["n_tokens"]) if s["denominator"] == "nominal" else c.n_positions
        details = [
            {
                "index": i,
                "proportion_above_activation_threshold": a / denom,
                "random_token_freq_nonzero": nz / c.n_positions,
                "random_sequence_freq_sum_above": q / n_seqs,
            }
            for i, (a, nz, q) in enumerate(zip(c.above.tolist(), c.nonzero.tolist(), c.seq_sum_above.tolist()))
        ]
    config = {
        **s,
        "context_size": ctx_size,
        "n_sequences": n_seqs,
        "n_positions_scored": c.n_positions,
        "layer": layer,
        "hook": hook,
        "random_seed": seed,
        "vocab_size": vocab,
        "reference": "FaithfulSAE scripts/feat_match.py get_fake_features (a98b2637)",
    }
    return EvalOutput(eval_type_id=EVAL_TYPE_ID, config=config, metrics={"fake_features": m}, details=details)


# What the eval logs (flattened as fake_features/fake_features/<metric>). Every count is over the
# SAE's latents; the random-token sequences are the module docstring's (BOS, then tokens uniform
# over the vocabulary, seeded), BOS positions left out.
_FS = "FaithfulSAE get_fake_features"
METRICS = (
    Metric(
        "fake_features/fake_features/fake_feature_ratio",
        "fake-feature ratio",
        "lower",
        "fraction of latents",
        "fake_feature_count / d_sae: the fraction of latents that fire (activation > activation_threshold, "
        "1.0) on more than threshold (10%) of n_tokens random-token positions (denominator=nominal: the "
        "nominal n_tokens). Lower: fewer latents respond to meaningless input.",
        _FS,
    ),
    Metric(
        "fake_features/fake_features/fake_feature_count",
        "fake features",
        None,
        "latents",
        "The number of latents the fake-feature ratio counts. It grows with d_sae; compare the ratio across widths.",
        _FS,
    ),
    Metric(
        "fake_features/fake_features/fake_feature_ratio_sequence",
        "fake-feature ratio (sequence)",
        "lower",
        "fraction of latents",
        "Fraction of latents whose activation summed over a random sequence exceeds "
        "sequence_activation_threshold (1) in more than sequence_threshold (5%) of the sequences. Nearly every "
        "live latent passes on long sequences.",
        "FaithfulSAE research notes (named option)",
    ),
    Metric(
        "fake_features/fake_features/fake_feature_count_sequence",
        "fake features (sequence)",
        None,
        "latents",
        "The number of latents fake_feature_ratio_sequence counts.",
        "FaithfulSAE research notes (named option)",
    ),
    Metric(
        "fake_features/fake_features/fake_feature_ratio_nonzero",
        "fake-feature ratio (nonzero)",
        "lower",
        "fraction of latents",
        "Fraction of latents with a non-zero activation on more than nonzero_threshold (5%) of the random-token "
        "positions processed.",
        "this project (earlier definition, named option)",
    ),
    Metric(
        "fake_features/fake_features/fake_feature_count_nonzero",
        "fake features (nonzero)",
        None,
        "latents",
        "The number of latents fake_feature_ratio_nonzero counts.",
        "this project (earlier definition, named option)",
    ),
    Metric(
        "fake_features/fake_features/mean_random_token_l0",
        "L0 on random tokens",
        None,
        "active latents per token",
        "Mean over random-token positions of the number of latents with a non-zero activation: the SAE's L0 "
        "on meaningless input, to read beside core/sparsity/l0.",
        "this project",
    ),
)


@register_eval("fake_features", FakeFeatureSettings, METRICS)
def run(ctx: Any) -> EvalOutput:
    # FaithfulSAE reads the SAE's context size; without one, the length of the held-out windows
    ctx_size = (ctx.sae_cfg or {}).get("context_size") or (ctx.tokens.shape[1] if ctx.tokens is not None else None)
    with per_token_topk(ctx.sae):  # FaithfulSAE's inference rule for BatchTopK SAEs
        return run_fake_features(ctx.lm, ctx.sae, ctx.layer, ctx.hook, ctx.seed, ctx.settings, ctx_size)
