"""Absorption: known answers on constructed latents, and the eval end to end on a tiny random GPT-2
whose word embeddings carry a planted first-letter direction."""

from __future__ import annotations

import dataclasses
import string

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from sae_sweep.evals import absorption as A

pytestmark = pytest.mark.unit

S = dataclasses.asdict(A.AbsorptionSettings())


def _word(act_proj, acts, main, cos=None):
    acts = torch.tensor(acts, dtype=torch.float32)
    cos = torch.tensor(cos if cos is not None else [1.0] * len(acts), dtype=torch.float32)
    return A.word_absorption(act_proj, acts, cos, cos, main, S)


def test_absorption_fraction_hand_computed():
    # probe projection 1.0; main latent 0 carries 0.25, latent 1 (aligned, cos 0.5) carries 0.5*1.2 = 0.6
    # absorbers 0.6 / 1.0 >= 0.4; unaccounted = 1 - 0.25 = 0.75; absorbed = min(0.6, 0.75) = 0.6
    # fraction = 0.6 / (0.6 + 0.25) = 0.70588...
    frac, full = _word(1.0, [0.25, 1.2, 0.0], [0], cos=[1.0, 0.5, 0.0])
    assert frac == pytest.approx(0.6 / 0.85)
    assert full is False  # the main latent fired


def test_full_absorption_when_main_latent_silent():
    # main latent 0 silent; latent 2 (cos 0.9) projects 0.9 * 1.0 = 0.9 of a 1.0 projection
    frac, full = _word(1.0, [0.0, 0.0, 1.0], [0], cos=[1.0, 0.0, 0.9])
    assert frac == 1.0 and full is True


def test_no_absorption_when_main_latents_carry_the_projection():
    frac, full = _word(1.0, [1.0, 0.3, 0.0], [0], cos=[1.0, 0.5, 0.0])
    assert frac == 0.0 and full is False  # main projection 1.0 >= act projection


def test_weak_absorber_below_proportion_threshold_is_not_absorption():
    # latent 1 projects 0.2 * 1.0 = 0.2 < 0.4 of the projection
    frac, full = _word(1.0, [0.5, 1.0, 0.0], [0], cos=[1.0, 0.2, 0.0])
    assert frac == 0.0 and full is False


def test_split_features_follow_f1_jumps():
    ks = [
        {"k": 1, "feats": [5], "f1": 0.5},
        {"k": 2, "feats": [5, 9], "f1": 0.7},
        {"k": 3, "feats": [5, 9, 1], "f1": 0.72},
        {"k": 4, "feats": [5, 9, 1, 2], "f1": 0.9},
    ]
    assert A.split_features(ks, 0.03) == [5, 9]  # stops at the first jump below 0.03


def test_planted_letter_feature_is_found_by_k_sparse_probe():
    # 600 words, 26 letters; latent 7 fires exactly on words starting with 'c' (index 2), the rest is noise
    rng = np.random.default_rng(0)
    y = rng.integers(0, 26, 600)
    f = np.abs(rng.normal(0, 0.3, (600, 40))) * (rng.random((600, 40)) < 0.2)
    f[:, 7] = (y == 2) * (1.0 + rng.random(600))
    f_t = torch.tensor(f, dtype=torch.float32)
    # SAEBench batch 4096 is one Adam step per epoch on 450 words: too few to move off the random init
    w = A.rank_latents_l1(f_t[:450], y[:450], 26, l1_decay=0.01, num_epochs=50, batch_size=64, seed=0)
    assert int(w[2].argmax()) == 7
    res = A.k_sparse_probes(f[:450], y[:450] == 2, f[450:], y[450:] == 2, w[2].numpy(), [1, 2, 3], seed=0)
    assert res[0]["feats"] == [7] and res[0]["f1"] == pytest.approx(1.0)
    assert A.split_features(res, 0.03) == [7]


def _planted_lm(n_per_letter=12, d=32, signal=4.0, seed=0):
    """Word-level tokenizer over made-up words; each word's embedding = signal * letter direction + noise."""
    rng = np.random.default_rng(seed)
    specials = ["<bos>", "<pad>"]
    template = ["has", "the", "first", "letter:"] + [c.upper() for c in string.ascii_lowercase] + ["\n"]
    words = sorted(
        {c + "".join(rng.choice(list("aeioulnrst"), 4)) for c in string.ascii_lowercase for _ in range(n_per_letter)}
    )
    vocab = {t: i for i, t in enumerate(specials + template + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=1, n_embd=d, n_head=4, vocab_size=len(vocab), n_positions=128, bos_token_id=0, eos_token_id=0
        )
    ).eval()
    letter_dirs = torch.nn.functional.normalize(torch.randn(26, d), dim=-1)
    with torch.no_grad():
        for w in words:
            model.transformer.wte.weight[vocab[w]] = signal * letter_dirs[ord(w[0]) - 97] + 0.3 * torch.randn(d)
    return _LM(model, hf_tok), letter_dirs


class _LM:
    """The LanguageModel contract, resid_post of block ``layer`` via a forward hook."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = torch.device("cpu")
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = {tokenizer.bos_token_id, tokenizer.pad_token_id}

    def activations(self, input_ids, layer, hook):
        seen = {}
        h = self.model.transformer.h[layer].register_forward_hook(
            lambda m, i, o: seen.__setitem__("a", o[0] if isinstance(o, tuple) else o)
        )
        try:
            self.model(input_ids)
        finally:
            h.remove()
        return seen["a"]


class _ReLUSAE(torch.nn.Module):
    def __init__(self, dirs, n_noise=34, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        noise = torch.nn.functional.normalize(torch.randn(n_noise, dirs.shape[1], generator=g), dim=-1)
        self.W_dec = torch.nn.Parameter(torch.cat([dirs, noise]))
        self.b_enc = torch.nn.Parameter(torch.full((self.W_dec.shape[0],), -1.0))

    def encode(self, x):
        return torch.relu(x @ self.W_dec.T + self.b_enc)

    def forward(self, x):
        f = self.encode(x)
        return f @ self.W_dec, f


def test_absorption_end_to_end_on_planted_letters():
    # SAEBench's probe settings, except smaller batches: on ~330 training words its batch 64 / 4096
    # give 5 / 1 Adam steps per epoch, too few to move the probes off their random init.
    lm, dirs = _planted_lm(n_per_letter=16, d=64, signal=5.0)
    sae = _ReLUSAE(dirs)
    out = A.run_absorption(
        lm,
        sae,
        0,
        "resid_post",
        0,
        {
            "min_feats_for_eval": 20,
            "n_icl_examples": 3,
            "max_k_value": 4,
            "gt_probe_batch_size": 16,
            "k_sparse_probe_batch_size": 32,
        },
    )
    assert out.status == "ok", out.skip_reason
    m = out.metrics["mean"]
    # each letter has one dedicated latent: about one split feature, no absorption
    assert m["mean_num_split_features"] < 1.5
    assert m["mean_absorption_fraction_score"] < 0.1
    assert m["mean_full_absorption_score"] < 0.1
    found = {d["first_letter"]: d["split_feats"] for d in out.details}
    assert sum(found[c] == [ord(c) - 97] for c in found) >= 0.7 * len(found)
    assert out.config["random_seed"] == 0 and out.eval_type_id == "absorption_first_letter"


def test_absorption_skips_with_reason_when_letters_are_not_represented():
    lm, dirs = _planted_lm(signal=0.0)  # embeddings carry no letter information
    out = A.run_absorption(lm, _ReLUSAE(dirs), 0, "resid_post", 0, {"n_icl_examples": 2})
    assert out.status == "skipped"
    assert "F1" in out.skip_reason and "letters" in out.skip_reason
    assert "full vocabulary" in out.skip_reason  # max_words=null: SAEBench's sample decided it
    assert out.metrics == {}


def test_a_skip_on_a_word_sample_says_the_sample_decided_not_the_model():
    lm, dirs = _planted_lm(signal=0.0)
    n_vocab = len(A.alpha_vocab(lm.tokenizer, lm.special_token_ids, 1))
    out = A.run_absorption(lm, _ReLUSAE(dirs), 0, "resid_post", 0, {"n_icl_examples": 2, "max_words": 52})
    assert out.status == "skipped" and n_vocab > 52
    assert f"random sample of 52 of the tokenizer's {n_vocab}" in out.skip_reason
    assert "max_words=null" in out.skip_reason and "cannot tell" in out.skip_reason
    assert "does not represent" not in out.skip_reason


def test_absorption_rejects_unknown_settings():
    lm, dirs = _planted_lm(n_per_letter=4)
    with pytest.raises(ValueError, match="unknown setting"):
        A.run_absorption(lm, _ReLUSAE(dirs), 0, "resid_post", 0, {"min_f1": 0.5})


def _saebench_word_absorption(act_probe_proj, sae_act_probe_proj, sae_acts, cos_sims, main_feature_ids):
    """SAEBench FeatureAbsorptionCalculator.calculate_absorption and _is_full_absorption, written out from
    sae_bench/evals/absorption/feature_absorption_calculator.py:97-121 and 170-219 (SAEBench 0.6.0,
    github.com/adamkarvonen/SAEBench @8042bb38), thresholds 0.1 / 0.4 / 3 absorbers / 0.025, EPS 1e-8."""
    main_feats_probe_proj = torch.sum(sae_act_probe_proj[main_feature_ids]).item()
    mask = torch.ones(sae_act_probe_proj.size(0), dtype=torch.bool)
    mask[main_feature_ids] = False
    mask &= cos_sims >= 0.1
    mask &= sae_act_probe_proj > 0
    absorbers = sae_act_probe_proj[mask]
    top = torch.sum(absorbers.topk(k=min(3, absorbers.numel())).values).item()
    if main_feats_probe_proj >= act_probe_proj or top / act_probe_proj < 0.4:
        fraction = 0.0
    elif main_feats_probe_proj <= 0.0:
        fraction = 1.0
    else:
        absorbed = min(top, act_probe_proj - main_feats_probe_proj)
        fraction = float(np.clip(absorbed / (absorbed + main_feats_probe_proj), 0.0, 1.0))
    top_id = int(sae_act_probe_proj.topk(10).indices[0])
    full = (
        all(sae_acts[i] < 1e-8 for i in main_feature_ids)
        and not cos_sims[top_id] < 0.025
        and not act_probe_proj < 0
        and not sae_act_probe_proj[top_id] / act_probe_proj < 0.4
    )
    return fraction, bool(full)


def test_word_absorption_matches_saebench_transcription():
    g = torch.Generator().manual_seed(0)
    d_sae, d = 24, 12
    w_dec = torch.randn(d_sae, d, generator=g) * (0.5 + torch.rand(d_sae, 1, generator=g))  # non-unit rows
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    cos = torch.nn.functional.cosine_similarity(u[None], w_dec, dim=-1)
    seen = set()
    for case in range(300):
        acts = torch.relu(torch.randn(d_sae, generator=g)) * (torch.rand(d_sae, generator=g) < 0.3)
        main = [int(i) for i in torch.randperm(d_sae, generator=g)[: 1 + case % 2]]
        if case % 3 == 0:
            acts[main] = 0.0  # main latents silent: full absorption possible
        a = float(acts @ (w_dec @ u)) + float(torch.randn(1, generator=g)) * 0.3
        if abs(a) < 1e-3:
            continue
        ref = _saebench_word_absorption(a, acts * cos, acts, cos, main)
        ours = A.word_absorption(a, acts, cos, cos, main, S)  # projection="cosine": p_i = f_i * cos_i
        assert ours[0] == pytest.approx(ref[0], abs=1e-6) and ours[1] == ref[1], case
        seen.add((ref[0] == 0.0, ref[0] == 1.0, ref[1]))
    assert len(seen) >= 4  # zero, partial, full fractions and full absorption all occurred


def _saebench_train_multi_probe(x, y_onehot, batch_size, num_epochs, lr, weight_decay, g, l1_decay=None, end_lr=1e-5):
    """SAEBench train_multi_probe / _run_probe_training (sae_bench/evals/absorption/probing.py:50-114,
    163-244) and train_sparse_multi_probe's L1 term (k_sparse_probing.py:57-92), written out; the init
    and the DataLoader's shuffle draw from generator ``g``."""
    import math

    probe = torch.nn.Linear(x.shape[1], y_onehot.shape[1])
    bound = 1 / math.sqrt(x.shape[1])
    with torch.no_grad():
        probe.weight.copy_((torch.rand(probe.weight.shape, generator=g) * 2 - 1) * bound)
        probe.bias.copy_((torch.rand(probe.bias.shape, generator=g) * 2 - 1) * bound)
    n_pos = y_onehot.sum(dim=0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(len(y_onehot) - n_pos) / n_pos)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=math.exp(math.log(end_lr / lr) / num_epochs))
    for _epoch in range(num_epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(probe(x[idx]), y_onehot[idx].float())
            if l1_decay is not None:
                loss += l1_decay * probe.weight.abs().sum(dim=-1).mean()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return probe.weight.detach(), probe.bias.detach()


@pytest.mark.parametrize("l1", [None, 0.01])
def test_multi_probe_matches_saebench_transcription(l1):
    rng = np.random.default_rng(1)
    y = np.r_[np.arange(4), rng.integers(0, 4, 196)]  # every class present
    x = torch.tensor(rng.normal(size=(200, 10)) + np.eye(4, 10)[y] * 2, dtype=torch.float32)
    wd = 1e-4 if l1 is None else 1e-6
    ref_w, ref_b = _saebench_train_multi_probe(
        x, torch.nn.functional.one_hot(torch.tensor(y), 4), 32, 5, 1e-2, wd, torch.Generator().manual_seed(3), l1
    )
    w, b = A.train_multi_probe(
        x, y, 4, batch_size=32, num_epochs=5, lr=1e-2, weight_decay=wd, seed=3, l1_decay=l1 or 0.0
    )
    assert torch.allclose(w, ref_w, atol=1e-5) and torch.allclose(b, ref_b, atol=1e-5)
