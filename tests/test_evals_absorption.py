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
    ks = [{"k": 1, "feats": [5], "f1": 0.5}, {"k": 2, "feats": [5, 9], "f1": 0.7},
          {"k": 3, "feats": [5, 9, 1], "f1": 0.72}, {"k": 4, "feats": [5, 9, 1, 2], "f1": 0.9}]
    assert A.split_features(ks, 0.03) == [5, 9]  # stops at the first jump below 0.03


def test_planted_letter_feature_is_found_by_k_sparse_probe():
    # 600 words, 26 letters; latent 7 fires exactly on words starting with 'c' (index 2), the rest is noise
    rng = np.random.default_rng(0)
    y = rng.integers(0, 26, 600)
    f = np.abs(rng.normal(0, 0.3, (600, 40))) * (rng.random((600, 40)) < 0.2)
    f[:, 7] = (y == 2) * (1.0 + rng.random(600))
    f_t = torch.tensor(f, dtype=torch.float32)
    w = A.rank_latents_l1(f_t[:450], y[:450], 26, l1_decay=0.01, num_epochs=200, batch_size=4096, seed=0)
    assert int(w[2].argmax()) == 7
    res = A.k_sparse_probes(f[:450], y[:450] == 2, f[450:], y[450:] == 2, w[2].numpy(), [1, 2, 3], seed=0)
    assert res[0]["feats"] == [7] and res[0]["f1"] == pytest.approx(1.0)
    assert A.split_features(res, 0.03) == [7]


def _planted_lm(n_per_letter=12, d=32, signal=4.0, seed=0):
    """Word-level tokenizer over made-up words; each word's embedding = signal * letter direction + noise."""
    rng = np.random.default_rng(seed)
    specials = ["<bos>", "<pad>"]
    template = ["has", "the", "first", "letter:"] + [c.upper() for c in string.ascii_lowercase] + ["\n"]
    words = sorted({c + "".join(rng.choice(list("aeioulnrst"), 4)) for c in string.ascii_lowercase
                    for _ in range(n_per_letter)})
    vocab = {t: i for i, t in enumerate(specials + template + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=d, n_head=4, vocab_size=len(vocab), n_positions=128,
                                       bos_token_id=0, eos_token_id=0)).eval()
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
            lambda m, i, o: seen.__setitem__("a", o[0] if isinstance(o, tuple) else o))
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
    lm, dirs = _planted_lm()
    sae = _ReLUSAE(dirs)
    out = A.run_absorption(lm, sae, 0, "resid_post", 0, {"min_feats_for_eval": 20, "n_icl_examples": 3,
                                                          "k_sparse_probe_num_epochs": 100, "max_k_value": 4})
    assert out.status == "ok", out.skip_reason
    m = out.metrics["mean"]
    # each letter has exactly one dedicated latent that always fires: one split feature, no absorption
    assert m["mean_num_split_features"] == pytest.approx(1.0, abs=0.2)
    assert m["mean_absorption_fraction_score"] < 0.1
    assert m["mean_full_absorption_score"] < 0.1
    found = {d["first_letter"]: d["split_feats"] for d in out.details}
    assert sum(found[c] == [ord(c) - 97] for c in found) >= 0.8 * len(found)
    assert out.config["random_seed"] == 0 and out.eval_type_id == "absorption_first_letter"


def test_absorption_skips_with_reason_when_letters_are_not_represented():
    lm, dirs = _planted_lm(signal=0.0)  # embeddings carry no letter information
    out = A.run_absorption(lm, _ReLUSAE(dirs), 0, "resid_post", 0, {"n_icl_examples": 2})
    assert out.status == "skipped"
    assert "F1" in out.skip_reason and "letters" in out.skip_reason
    assert out.metrics == {}


def test_absorption_rejects_unknown_settings():
    lm, dirs = _planted_lm(n_per_letter=4)
    with pytest.raises(ValueError, match="unknown setting"):
        A.run_absorption(lm, _ReLUSAE(dirs), 0, "resid_post", 0, {"min_f1": 0.5})
