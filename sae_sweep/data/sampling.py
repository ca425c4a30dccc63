"""Exact nucleus sampling without sorting the vocabulary: ``dataset.generation.sampler=exact_topk_first``.

HF ``generate(do_sample=True, top_p=p, top_k=0, repetition_penalty=r, temperature=t)`` applies, to the
float32 logits of each step, in this order (``GenerationMixin._get_logits_processor``):

1. ``RepetitionPenaltyLogitsProcessor(r)``: every token id already in the row (the BOS prompt
   included) has its logit divided by ``r`` when positive, multiplied by ``r`` when negative;
2. ``TemperatureLogitsWarper(t)`` (only when ``t != 1``): logits / t;
3. ``TopPLogitsWarper(p, min_tokens_to_keep=1)`` (only when ``p < 1``): sorts the whole vocabulary
   and keeps the smallest set of most probable tokens whose mass reaches ``p``: a token is kept
   when the tokens more probable than it hold less than ``p``; the most probable one always;

then samples ``multinomial(softmax(kept logits))``; a row that has emitted EOS emits ``pad`` from
then on, and generation stops when every row has ended or after ``max_new_tokens``.

Step 3's full sort of a 49k vocabulary per row per step is most of HF's cost on a CPU.
``sample_next`` gives the same distribution from ``torch.topk`` candidates instead: it takes the
``CANDIDATES`` most probable tokens, their true probabilities (from the full-vocabulary
log-sum-exp), applies the same keep rule, and samples among them. When the candidates hold less
than ``p`` (plus ``MARGIN``, so that float32 rounding of their sum cannot decide it) of the mass,
the nucleus may be wider than them, and that row (rare: the flattest steps) falls back to the full
sort: the nucleus is never cut at the candidates. Nothing is approximated; what differs from HF is only the
random-number path (a different draw for the same seed) and tie order and float rounding at the
exact nucleus boundary, where HF's own result depends on an unstable sort.

``generate`` is the decode loop: a KV cache, one token per row per step, the sampler above.
"""

from __future__ import annotations

import inspect
from typing import Any, List, Optional, Tuple

import torch

CANDIDATES = 1024  # top-k candidates looked at before falling back to the full sort
# The candidates must hold at least top_p + MARGIN of the mass for the full sort to be skipped: the
# float32 cumulative sum of 1024 probabilities is off by far less than this, so a token outside the
# candidates is outside the nucleus in exact arithmetic too, never cut by rounding in the sum.
MARGIN = 1e-4


def penalize_repeats(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's ``RepetitionPenaltyLogitsProcessor``: ``scores [B, V]`` with the logit of every id in
    ``history [B, T]`` divided by ``penalty`` when positive, multiplied when negative."""
    if penalty == 1.0:
        return scores
    seen = scores.gather(1, history)
    return scores.scatter(1, history, torch.where(seen < 0, seen * penalty, seen / penalty))


def _keep(probs_desc: torch.Tensor, top_p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weights: the probabilities with the dropped tokens zeroed, cumulative mass), for
    probabilities sorted in descending order. A token is kept when the tokens before it hold less
    than ``top_p``: the first one always (min_tokens_to_keep=1)."""
    cum = probs_desc.cumsum(-1)
    return probs_desc * ((cum - probs_desc) < top_p), cum


def nucleus(
    scores: torch.Tensor, top_p: float, candidates: int = CANDIDATES
) -> List[Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]]:
    """The top-p nucleus of each row of ``scores [B, V]`` (float32 logits after penalty and
    temperature), as groups ``(rows, token_ids [n, K], weights [n, K])``: the weights are the
    tokens' true probabilities, zero for tokens outside the nucleus (``multinomial`` normalises).
    ``rows`` is None for a group of every row."""
    lse = torch.logsumexp(scores, -1, keepdim=True)
    vocab = scores.shape[-1]
    if top_p >= 1.0:  # HF adds no top-p warper: the whole distribution
        ids = torch.arange(vocab, device=scores.device).expand_as(scores)
        return [(None, ids, torch.exp(scores - lse))]
    top, ids = torch.topk(scores, min(candidates, vocab), dim=-1)  # sorted, most probable first
    weights, cum = _keep(torch.exp(top - lse), top_p)
    # The nucleus may be wider than the candidates (the first token left out has less than top_p
    # before it): full sort on those rows, so the nucleus is never cut short.
    short = cum[:, -1] < min(top_p + MARGIN, 1.0)
    if not bool(short.any()):
        return [(None, ids, weights)]
    rows = short.nonzero().squeeze(1)
    full, full_ids = torch.sort(scores[rows], dim=-1, descending=True)
    full_weights, _ = _keep(torch.exp(full - lse[rows]), top_p)
    keep = (~short).nonzero().squeeze(1)
    return [(keep, ids[keep], weights[keep]), (rows, full_ids, full_weights)]


def nucleus_probs(scores: torch.Tensor, top_p: float, candidates: int = CANDIDATES) -> torch.Tensor:
    """``[B, V]``: the distribution ``sample_next`` draws from (zero outside the nucleus)."""
    out = torch.zeros_like(scores)
    for rows, ids, weights in nucleus(scores, top_p, candidates):
        dense = torch.zeros(ids.shape[0], scores.shape[-1], dtype=scores.dtype, device=scores.device)
        dense.scatter_(1, ids, weights)
        if rows is None:
            out = dense
        else:
            out[rows] = dense
    return out / out.sum(-1, keepdim=True)


def process(logits: torch.Tensor, history: torch.Tensor, temperature: float, repetition_penalty: float) -> torch.Tensor:
    """HF's processors before top-p, in HF's order: repetition penalty, then temperature."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: sampling needs a temperature > 0 (HF refuses 0 as well)")
    scores = penalize_repeats(logits.float(), history, float(repetition_penalty))
    return scores / float(temperature) if temperature != 1.0 else scores


def sample_next(
    logits: torch.Tensor,
    history: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    repetition_penalty: float,
    generator: Optional[torch.Generator] = None,
    candidates: int = CANDIDATES,
) -> torch.Tensor:
    """``[B]`` next tokens drawn from HF's distribution for these settings (see the module doc)."""
    scores = process(logits, history, temperature, repetition_penalty)
    out = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    for rows, ids, weights in nucleus(scores, top_p, candidates):
        picked = ids.gather(1, torch.multinomial(weights, 1, generator=generator)).squeeze(1)
        if rows is None:
            out = picked
        else:
            out[rows] = picked
    return out


def _cache_kwarg(model: Any) -> str:
    """The name the model's forward gives the KV cache: ``cache`` (transformers >= 5) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.inference_mode()
def generate(
    model: Any,
    prompt: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    repetition_penalty: float,
    eos_token_id: int,
    pad_token_id: int,
    generator: Optional[torch.Generator] = None,
    candidates: int = CANDIDATES,
) -> torch.Tensor:
    """``[B, T + steps]``: ``prompt [B, T]`` (no padding) followed by sampled tokens, ``pad_token_id``
    after a row's EOS, as HF ``generate`` returns them; stops when every row has ended."""
    kwarg = _cache_kwarg(model)
    tokens = torch.full(
        (prompt.shape[0], prompt.shape[1] + max_new_tokens), pad_token_id, dtype=torch.long, device=prompt.device
    )
    tokens[:, : prompt.shape[1]] = prompt
    length = prompt.shape[1]
    ended = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    out = model(input_ids=prompt, use_cache=True)
    for _ in range(max_new_tokens):
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        nxt = sample_next(
            out.logits[:, -1],
            tokens[:, :length],
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            generator=generator,
            candidates=candidates,
        )
        nxt = torch.where(ended, torch.full_like(nxt, pad_token_id), nxt)
        tokens[:, length] = nxt
        length += 1
        ended |= nxt == eos_token_id
        if bool(ended.all()) or length == tokens.shape[1]:
            break
        out = model(input_ids=nxt[:, None], use_cache=True, **{kwarg: cache})
    return tokens[:, :length]
