"""FaithfulSAE's fake-feature ratio: latents that fire on meaningless input.

The LM reads sequences of uniformly random (non-special) tokens after a BOS, drawn from a seeded
generator. A latent is *fake* when it fires on more than ``threshold`` (default 5%) of them. "Them"
is configurable with ``unit``:

* ``token`` (default): the fraction of random-token positions where the latent fires. This is
  comparable across context lengths and to the latent's density on real text.
* ``sequence``: the fraction of random sequences in which it fires at least once. With long
  sequences nearly every live latent fires somewhere, so this is stricter; both are reported.

Metrics (category ``fake_features``): ``fake_feature_count``, ``fake_feature_ratio`` (by ``unit``),
``fake_feature_count_token`` / ``_ratio_token``, ``fake_feature_count_sequence`` / ``_ratio_sequence``,
``mean_random_token_l0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable

import torch

from sae_sweep.config import choice, setting
from sae_sweep.evals.registry import register_eval, settings_dict
from sae_sweep.evals.schema import EvalOutput

EVAL_TYPE_ID = "fake_features"

@dataclass
class FakeFeatureSettings:
    """``eval.fake_features``."""

    n_sequences: int = setting(256, allowed="an integer >= 1", check=lambda v: v >= 1)
    context_size: int = setting(64, allowed="an integer >= 2 (BOS + random tokens)", check=lambda v: v >= 2)
    threshold: float = setting(0.05, allowed="a float in [0, 1] (fires on more than this fraction: fake)",
                               check=lambda v: 0 <= v <= 1)
    unit: str = choice("token", ("token", "sequence"))
    batch_size: int = setting(32, allowed="an integer >= 1", check=lambda v: v >= 1)
    per_latent_details: bool = True


def random_token_sequences(vocab_size: int, special_ids: Iterable[int], n: int, context_size: int, bos: int,
                           seed: int) -> torch.Tensor:
    """``[n, context_size]``: BOS, then tokens uniform over the non-special vocabulary (seeded)."""
    special = torch.tensor(sorted({int(t) for t in special_ids if t is not None and 0 <= int(t) < vocab_size}),
                           dtype=torch.long)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special] = False
    pool = allowed.nonzero().squeeze(1)
    g = torch.Generator().manual_seed(int(seed))
    ids = pool[torch.randint(len(pool), (n, context_size), generator=g)]
    ids[:, 0] = int(bos)
    return ids


def fake_feature_metrics(token_fire_freq: torch.Tensor, seq_fire_freq: torch.Tensor, threshold: float,
                         unit: str) -> Dict[str, float]:
    """Counts and ratios from per-latent firing frequencies (each ``[d_sae]`` in [0, 1])."""
    d = token_fire_freq.numel()
    n_tok = int((token_fire_freq > threshold).sum())
    n_seq = int((seq_fire_freq > threshold).sum())
    main = n_tok if unit == "token" else n_seq
    return {
        "fake_feature_count": float(main),
        "fake_feature_ratio": main / d,
        "fake_feature_count_token": float(n_tok),
        "fake_feature_ratio_token": n_tok / d,
        "fake_feature_count_sequence": float(n_seq),
        "fake_feature_ratio_sequence": n_seq / d,
    }


@torch.no_grad()
def firing_frequencies(lm: Any, sae: torch.nn.Module, ids: torch.Tensor, layer: int, hook: str, batch_size: int):
    """Per-latent fraction of scored positions (all but BOS) and of sequences where it fires; mean L0."""
    p = next(iter(sae.parameters()))
    tok_counts = seq_counts = None
    l0_sum, n_pos = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start:start + batch_size]
        acts = lm.activations(batch.to(lm.device), layer, hook)[:, 1:]  # BOS is not a random token
        b, t, d = acts.shape
        _, f = sae(acts.reshape(b * t, d).to(device=p.device, dtype=p.dtype))  # SAEs take [N, d_in]
        fired = (f != 0).reshape(b, t, -1)
        if tok_counts is None:
            tok_counts = torch.zeros(fired.shape[-1], dtype=torch.int64, device=fired.device)
            seq_counts = torch.zeros_like(tok_counts)
        tok_counts += fired.sum(dim=(0, 1))
        seq_counts += fired.any(dim=1).sum(0)
        l0_sum += float(fired.sum())
        n_pos += fired.shape[0] * fired.shape[1]
    return (tok_counts.double() / n_pos).cpu(), (seq_counts.double() / ids.shape[0]).cpu(), l0_sum / n_pos


def run_fake_features(lm: Any, sae: Any, layer: int, hook: str, seed: int, settings: Dict[str, Any]) -> EvalOutput:
    s = settings_dict(FakeFeatureSettings, settings, "eval.fake_features")
    vocab = len(lm.tokenizer)
    emb = getattr(lm.model, "get_input_embeddings", None)
    if emb is not None and emb() is not None:
        vocab = min(vocab, emb().num_embeddings)  # ids past the embedding table cannot be fed
    ids = random_token_sequences(vocab, lm.special_token_ids, int(s["n_sequences"]), int(s["context_size"]),
                                 lm.bos_token_id, seed)
    tok_freq, seq_freq, l0 = firing_frequencies(lm, sae, ids, layer, hook, int(s["batch_size"]))
    m = fake_feature_metrics(tok_freq, seq_freq, float(s["threshold"]), s["unit"])
    m["mean_random_token_l0"] = l0
    details = []
    if s["per_latent_details"]:
        details = [{"index": i, "random_token_freq": a, "random_sequence_freq": b}
                   for i, (a, b) in enumerate(zip(tok_freq.tolist(), seq_freq.tolist()))]
    config = {**s, "layer": layer, "hook": hook, "random_seed": seed, "vocab_size": vocab}
    return EvalOutput(eval_type_id=EVAL_TYPE_ID, config=config, metrics={"fake_features": m}, details=details)


@register_eval("fake_features", FakeFeatureSettings)
def run(ctx: Any) -> EvalOutput:
    return run_fake_features(ctx.lm, ctx.sae, ctx.layer, ctx.hook, ctx.seed, ctx.settings)
