"""sampling.py (dataset.generation.sampler=exact_topk_first) draws from the distribution HF's own
processors give: same kept tokens, same renormalised probabilities, on random logits (rows whose
nucleus is wider than the candidates included) and on the tiny model's real generate() steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from sae_sweep.config import stable_hash
from sae_sweep.data import sampling
from sae_sweep.data.faithful import VERSION, Generations
from sae_sweep.data.text import dataset_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

BOUNDARY = 1e-4  # a token whose mass-before is this close to top_p may fall either side by float32 rounding


def _hf_probs(logits, history, temperature, top_p, penalty):
    """HF's processors, built as generate() builds them for do_sample, top_k=0 (utils.py
    _get_logits_processor), then softmax as in _sample."""
    procs = LogitsProcessorList()
    if penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty))
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p, min_tokens_to_keep=1))
    return torch.softmax(procs(history, logits.clone()), dim=-1)


def _compare(ours, hf, scores, top_p):
    """Same kept tokens, except tokens so close to the nucleus boundary (their mass-before, in
    float64, within BOUNDARY of top_p) that rounding decides; same probabilities relative to the
    row's most probable token (independent of how the boundary tokens fell). Returns the number of
    rows whose kept set is identical."""
    p = torch.softmax(scores.double(), -1)
    order = p.argsort(-1, descending=True)
    p_sorted = p.gather(-1, order)
    before = torch.empty_like(p).scatter_(-1, order, p_sorted.cumsum(-1) - p_sorted)
    sure = (before - top_p).abs() >= BOUNDARY if top_p < 1.0 else torch.ones_like(p, dtype=torch.bool)
    kept_ours, kept_hf = ours > 0, hf > 0
    assert torch.equal(kept_ours & sure, kept_hf & sure)
    both = kept_ours & kept_hf
    rel_ours = ours / ours.max(-1, keepdim=True).values
    rel_hf = hf / hf.max(-1, keepdim=True).values
    assert torch.allclose(rel_ours[both], rel_hf[both], rtol=1e-4, atol=1e-7)
    same = (kept_ours == kept_hf).all(-1)
    assert torch.allclose(ours[same], hf[same], rtol=1e-4, atol=1e-7)
    return int(same.sum())


def _random_logits(gen, rows, vocab):
    """Peaked rows (a nucleus of a few tokens) and flat rows (a nucleus of thousands)."""
    scale = torch.cat([torch.full((rows // 2,), 6.0), torch.full((rows - rows // 2,), 0.3)])
    return torch.randn(rows, vocab, generator=gen) * scale[:, None] + torch.randn(rows, 1, generator=gen)


@pytest.mark.parametrize(
    "temperature, top_p, penalty",
    [
        (1.0, 0.9, 1.1),  # the faithful defaults
        (0.7, 0.5, 1.3),
        (1.5, 0.95, 1.0),  # no penalty
        (1.0, 1.0, 1.1),  # no top-p: the whole distribution
    ],
)
@pytest.mark.unit
def test_nucleus_equals_hf_processors_on_random_logits(temperature, top_p, penalty):
    gen = torch.Generator().manual_seed(0)
    rows, vocab, candidates = 64, 3000, 64
    logits = _random_logits(gen, rows, vocab)
    history = torch.randint(0, vocab, (rows, 40), generator=gen)
    history[:, 1] = history[:, 0]  # repeated ids are penalised once, as in HF
    history[:, -1] = logits.argmax(-1)  # the most likely token was already used: the penalty moves the nucleus

    scores = sampling.process(logits, history, temperature, penalty)
    groups = sampling.nucleus(scores, top_p, candidates)
    if top_p < 1.0:  # the flat rows' nucleus is wider than 64 candidates: the full-sort fallback ran
        assert len(groups) == 2 and 0 < len(groups[1][0]) < rows
    hf = _hf_probs(logits, history, temperature, top_p, penalty)
    assert _compare(sampling.nucleus_probs(scores, top_p, candidates), hf, scores, top_p) >= rows - 4
    # Without the fallback (candidates = the vocabulary) the answer is the same.
    assert _compare(sampling.nucleus_probs(scores, top_p, vocab), hf, scores, top_p) >= rows - 4


@pytest.mark.unit
def test_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    history = torch.tensor([[0, 1, 1]])
    assert torch.equal(sampling.penalize_repeats(logits, history, 2.0), torch.tensor([[1.0, -4.0, 1.0, -1.0]]))


@pytest.mark.unit
def test_sample_next_draws_the_nucleus_distribution():
    """Frequencies of 20k draws match the nucleus probabilities (fallback rows included)."""
    gen = torch.Generator().manual_seed(1)
    logits = _random_logits(gen, 2, 400)[[0, 1]]
    logits[0, :5] += torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5]) * 4  # peaked: a few tokens
    draws = 20000
    rows = logits.repeat_interleave(draws, 0)
    history = torch.zeros(len(rows), 1, dtype=torch.long)
    picked = sampling.sample_next(
        rows,
        history,
        temperature=1.0,
        top_p=0.9,
        repetition_penalty=1.1,
        generator=torch.Generator().manual_seed(2),
        candidates=32,
    )
    probs = sampling.nucleus_probs(sampling.process(logits, history[:2], 1.0, 1.1), 0.9, 32)
    for r in range(2):
        freq = torch.bincount(picked[r * draws : (r + 1) * draws], minlength=400).double() / draws
        assert set(torch.nonzero(freq).flatten().tolist()) <= set(torch.nonzero(probs[r]).flatten().tolist())
        assert (freq - probs[r]).abs().max() < 0.02  # ~6 standard errors of the largest probability


def hf_generate_agreement(lm, device="cpu", bs=16, steps=12):
    """(rows x steps agreeing, rows x steps): HF generate's own processed scores (output_scores) at
    every step against ours on the raw logits of the same step, on ``device``."""
    prompt = torch.full((bs, 1), lm.bos_token_id, dtype=torch.long, device=device)
    torch.manual_seed(0)
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            temperature=1.0,
            top_p=0.9,
            top_k=0,
            repetition_penalty=1.1,
            max_new_tokens=steps,
            min_new_tokens=0,
            eos_token_id=lm.eos_token_id,
            pad_token_id=lm.pad_token_id,
            use_cache=True,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    same = 0
    for t, (raw, processed) in enumerate(zip(out.logits, out.scores)):
        assert raw.device.type == torch.device(device).type
        scores = sampling.process(raw, out.sequences[:, : 1 + t], 1.0, 1.1)
        ours = sampling.nucleus_probs(scores, 0.9, candidates=16)  # 16: the full-sort fallback runs too
        assert ours.device.type == torch.device(device).type
        same += _compare(ours.cpu(), torch.softmax(processed, -1).cpu(), scores.cpu(), 0.9)
    return same, bs * len(out.scores)


@pytest.mark.integration
def test_generate_steps_equal_hf_generate_processors_on_the_tiny_model(tiny_lm):
    """HF generate's own processed scores at every step, against ours on the raw logits of the same
    step: this checks HF's processor list and order for the faithful settings."""
    same, total = hf_generate_agreement(tiny_lm)
    assert same >= 0.9 * total


@pytest.mark.integration
def test_generate_loop_semantics(tiny_lm):
    """Pad after EOS, stop when every row has ended or at max_new_tokens, same draw for the same seed."""
    lm = tiny_lm
    prompt = torch.full((32, 1), lm.bos_token_id, dtype=torch.long)

    def run(seed, new=24, **kw):
        return sampling.generate(
            lm.model,
            prompt,
            max_new_tokens=new,
            temperature=1.0,
            top_p=0.9,
            repetition_penalty=1.1,
            eos_token_id=lm.eos_token_id,
            pad_token_id=lm.pad_token_id,
            generator=torch.Generator().manual_seed(seed),
            **kw,
        )

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape[1] <= 1 + 24 and (a[:, 0] == lm.bos_token_id).all()
    for row in a[:, 1:]:
        ends = torch.nonzero(row == lm.eos_token_id).flatten()
        if len(ends):
            assert (row[ends[0] + 1 :] == lm.pad_token_id).all()
    # Stops at max_new_tokens unless every row has ended, then at once. Which case a 400-token run
    # reaches depends on the tiny model's weights, which its build on each CPU rounds differently.
    long = run(0, new=400)
    ended = (long[:, 1:] == lm.eos_token_id).any(1)
    if ended.all():
        last_end = max(int(torch.nonzero(row == lm.eos_token_id)[0]) for row in long[:, 1:]) + 1
        assert long.shape[1] == 1 + last_end  # no step after the last row ended
    else:
        assert long.shape[1] == 401


def _old_generate(lm, settings, i):
    """faithful.py's _generate before `sampler` existed (commit 61a84a8), verbatim."""
    s = settings
    torch.manual_seed(int(s["seed"]) * 1_000_003 + i)
    bs = int(s["batch_size"])
    prompt = torch.full((bs, 1), lm.bos_token_id, dtype=torch.long, device=lm.device)
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            temperature=float(s["temperature"]),
            top_p=float(s["top_p"]),
            top_k=0,
            repetition_penalty=float(s["repetition_penalty"]),
            max_new_tokens=int(s["max_new_tokens"]),
            min_new_tokens=0,
            eos_token_id=lm.eos_token_id,
            pad_token_id=lm.pad_token_id,
            use_cache=True,
        )
    docs = []
    for row in out[:, 1:].cpu().numpy():
        stop = np.nonzero(row == lm.eos_token_id)[0]
        docs.append((row[: stop[0]] if len(stop) else row).astype(np.int32))
    return docs


OLD = {"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.9, "repetition_penalty": 1.1, "batch_size": 8, "seed": 4}


@pytest.mark.integration
def test_sampler_hf_keeps_the_chunks_and_directories_of_before(tiny_lm, tmp_path):
    gens = Generations(tiny_lm, {**OLD, "sampler": "hf"}, tmp_path)
    old_key = stable_hash({"model": tiny_lm.fingerprint, "generation": OLD, "version": VERSION})
    assert gens.root.name.endswith(old_key) and gens.identity == OLD
    for i in (0, 3):
        assert all(np.array_equal(x, y) for x, y in zip(gens._generate(i), _old_generate(tiny_lm, OLD, i)))
    fast = Generations(tiny_lm, {**OLD, "sampler": "exact_topk_first"}, tmp_path)
    assert fast.root != gens.root and fast.identity["sampler"] == "exact_topk_first"
    # The activation cache's dataset fingerprint follows the text: unchanged at hf, another at exact_topk_first.
    fingerprint = {
        s: dataset_fingerprint({"name": "faithful", "kind": "faithful", "generation": {**OLD, "sampler": s}}, tiny_lm)
        for s in ("hf", "exact_topk_first")
    }
    assert fingerprint["hf"]["generation"] == OLD
    assert fingerprint["exact_topk_first"]["generation"] == {**OLD, "sampler": "exact_topk_first"}


@pytest.mark.integration
def test_exact_topk_first_chunks_are_deterministic_per_seed_and_chunk_and_text_like(tiny_lm, tmp_path):
    gens = Generations(
        tiny_lm, {**OLD, "max_new_tokens": 32, "batch_size": 16, "sampler": "exact_topk_first"}, tmp_path
    )
    first = gens._generate(0)
    assert all(np.array_equal(x, y) for x, y in zip(first, gens._generate(0)))
    other = gens._generate(1)
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(first, other))
    reseeded = Generations(tiny_lm, {**gens.settings, "seed": 5}, tmp_path)._generate(0)
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(first, reseeded))
    text = " ".join(tiny_lm.tokenizer.decode(d) for d in first + other)
    words = text.split()
    alpha = sum(w.strip(".,:;()[]'\"`").isalpha() for w in words) / len(words)
    assert len(words) > 50 and alpha > 0.5, text[:400]


@pytest.mark.integration
def test_the_generation_defaults_live_in_the_schema_once(tiny_lm, tmp_path):
    """GenerationConfig holds every default; the faithful preset states only what it means
    differently (batch_size 256: its demo budgets) and settings without a key get the schema's."""
    import dataclasses

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sae_sweep.config import GenerationConfig
    from sae_sweep.job.app import CONF_DIR

    defaults = dataclasses.asdict(GenerationConfig())
    assert defaults["batch_size"] == 64 and defaults["sampler"] == "exact_topk_first"
    assert OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/dataset/faithful.yaml").generation) == {"batch_size": 256}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        preset = compose("config", overrides=["dataset=faithful"]).dataset.generation
    assert OmegaConf.to_container(preset) == {**defaults, "batch_size": 256}
    assert Generations(tiny_lm, {"seed": 3}, tmp_path).settings == {**defaults, "seed": 3}
    with pytest.raises(
        ValueError,
        match=r"dataset.generation.sampler='greedy': not allowed; allowed: one of: hf, "
        r"exact_topk_first",
    ):
        Generations(tiny_lm, {"sampler": "greedy"}, tmp_path)
