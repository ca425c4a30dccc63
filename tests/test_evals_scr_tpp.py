"""SCR and TPP: the metric formulas on hand-computed accuracies, the latent effects and the ablation
against transcriptions of SAEBench's code on the same tensors, and both evals end to end on the offline
standard-library tasks (an embedding-only toy LM), plus the offline message for hub datasets."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sae_sweep.evals import probes
from sae_sweep.evals import scr_and_tpp as ST

pytestmark = pytest.mark.unit

PACKAGES = ["asyncio", "email", "logging", "xml"]  # TPP classes
B = ST.BIASED


def test_scr_scores_hand_computed():
    # clean: the biased probe reaches 0.6 on class data and 0.9 on spurious data (dir1 < dir2: the
    # metric follows dir 1); the class probe 0.95, the spurious probe 0.92 on their own data.
    clean = {
        "professor / nurse": 0.95,
        "male / female": 0.92,
        f"{B} probe on professor / nurse data": 0.6,
        f"{B} probe on male / female data": 0.9,
    }
    dir1 = {2: {f"{B} probe on professor / nurse data": 0.7}, 5: {f"{B} probe on professor / nurse data": 0.95}}
    dir2 = {2: {f"{B} probe on male / female data": 0.9005}, 5: {f"{B} probe on male / female data": 0.85}}
    out = ST.scr_scores(dir1, clean, dir2)
    # dir 1: (0.7 - 0.6) / (0.95 - 0.6) = 0.2857..., (0.95 - 0.6) / 0.35 = 1
    assert out["scr_dir1_threshold_2"] == pytest.approx(0.1 / 0.35)
    assert out["scr_dir1_threshold_5"] == pytest.approx(1.0)
    # dir 2: clean - original = 0.92 - 0.9 = 0.02 >= 0.001: (0.9005 - 0.9) / 0.02, (0.85 - 0.9) / 0.02
    assert out["scr_dir2_threshold_2"] == pytest.approx(0.025)
    assert out["scr_dir2_threshold_5"] == pytest.approx(-2.5)
    assert out["scr_metric_threshold_2"] == out["scr_dir1_threshold_2"]
    # a denominator below 0.001 scores 0; equal biased accuracies leave the metric key out
    clean2 = {**clean, f"{B} probe on male / female data": 0.6, "male / female": 0.6005}
    out2 = ST.scr_scores(dir1, clean2, dir2)
    assert out2["scr_dir2_threshold_2"] == 0.0 and "scr_metric_threshold_2" not in out2


def test_tpp_scores_hand_computed():
    clean = {"a": 0.9, "b": 0.8, "c": 0.7}
    ablated = {
        "a": {2: {"a": 0.6, "b": 0.8, "c": 0.6}},
        "b": {2: {"a": 0.9, "b": 0.5, "c": 0.7}},
        "c": {2: {"a": 0.8, "b": 0.8, "c": 0.7}},
    }
    overall, per_class = ST.tpp_scores(ablated, clean)
    # a: intended 0.3, unintended mean(0, 0.1) = 0.05 -> 0.25; b: 0.3, 0 -> 0.3; c: 0, mean(0.1, 0) -> -0.05
    assert per_class["a"]["tpp_threshold_2_total_metric"] == pytest.approx(0.25)
    assert per_class["b"]["tpp_threshold_2_intended_diff_only"] == pytest.approx(0.3)
    assert per_class["c"]["tpp_threshold_2_unintended_diff_only"] == pytest.approx(0.05)
    assert overall["tpp_threshold_2_total_metric"] == pytest.approx((0.25 + 0.3 - 0.05) / 3)
    assert ST.average_runs({"r1": {"x": 1.0, "y": 2.0}, "r2": {"x": 3.0}}) == {"x": 2.0, "y": 2.0}


class _ReLUSAE(torch.nn.Module):
    def __init__(self, d_in=8, d_sae=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=g))
        self.b_enc = torch.nn.Parameter(torch.randn(d_sae, generator=g) * 0.3)
        self.W_dec = torch.nn.Parameter(torch.randn(d_sae, d_in, generator=g) * 0.5)
        self.b_dec = torch.nn.Parameter(torch.randn(d_in, generator=g) * 0.1)

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec

    def forward(self, x):
        f = self.encode(x)
        return self.decode(f), f


def _token_acts(n=12, L=7, d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, L, d, generator=g)
    acts[:, 0] = 0.0  # BOS zeroed
    for i in range(n):
        acts[i, 3 + i % 4 :] = 0.0  # padding of different lengths
    return acts


def _saebench_effects(sae, w_probe, acts, labels, perform_scr):
    """SAEBench get_effects_per_class_precomputed_acts (sae_bench/evals/scr_and_tpp/main.py:49-135),
    written out for one batch."""
    nonzero_BL = (acts.sum(-1) != 0.0).float()
    nonzero_B = nonzero_BL.sum(-1)
    f = sae.encode(acts) * nonzero_BL[:, :, None]
    avg = f.sum(1) / nonzero_B[:, None]
    diff = avg[labels == 1].mean(0) - avg[labels == 0].mean(0)
    dot = (w_probe[None] @ sae.W_dec.T).squeeze()
    if not perform_scr:
        diff = diff.clamp(min=0.0)
    eff = diff * dot
    return eff.abs() if perform_scr else eff


def _saebench_ablated(acts, sae, to_ablate):
    """SAEBench ablated_precomputed_activations (main.py:198-234), written out."""
    nonzero_B = (acts.sum(-1) != 0.0).float().sum(-1)
    f = sae.encode(acts)
    error = acts - sae.decode(f)
    f[..., to_ablate] = 0.0
    return (sae.decode(f) + error).sum(1) / nonzero_B[:, None]


@pytest.mark.parametrize("scr", [True, False])
def test_effects_and_ablation_match_saebench_transcription(scr):
    sae = _ReLUSAE()
    acts = _token_acts()
    labels = torch.tensor([1, 0] * 6)
    w = torch.randn(8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        nonzero = (acts.sum(-1) != 0).float()
        f = sae.encode(acts)
        ours_eff = ST.node_effects(
            (f * nonzero[..., None]).sum(1) / nonzero.sum(1)[:, None], labels.numpy(), w, sae.W_dec, scr
        )
        ref_eff = _saebench_effects(sae, w, acts, labels, scr)
        assert torch.allclose(ours_eff, ref_eff, atol=1e-5)
        for n in (1, 3, 16):
            sel = ST.select_top_n(ours_eff, n)
            mask = torch.zeros(16, dtype=torch.bool)
            mask[sel] = True
            ref = _saebench_ablated(acts.clone(), sae, mask)
            meaned = acts.sum(1) / nonzero.sum(1)[:, None]
            ours = meaned - (f.sum(1)[:, sel] @ sae.W_dec[sel]) / nonzero.sum(1)[:, None]
            assert torch.allclose(ours, ref, atol=1e-4), n


def test_select_top_n_counts_non_zero_effects():
    # SAEBench select_top_n_features (main.py:160-195): k = min(n, #non-zero effects), then topk over ALL
    # effects -- so a zero effect outranks a negative one
    eff = torch.tensor([0.0, 3.0, -1.0, 2.0])
    assert sorted(ST.select_top_n(eff, 2).tolist()) == [1, 3]
    assert sorted(ST.select_top_n(eff, 10).tolist()) == [0, 1, 3]  # 3 non-zero effects -> 3 latents
    assert ST.select_top_n(torch.zeros(4), 2).numel() == 0


def test_spurious_corr_keys_structure():
    pp, pn, np_, nn = ([f"{q}{i}" for i in range(10)] for q in ("PP", "PN", "NP", "NN"))
    keys = ST.spurious_corr_keys(pp, pn, np_, nn, 3, seed=0)
    assert sorted(keys["male / female"]) == sorted(pp[:3] + pn[:3])  # spurious 1, both classes
    assert sorted(keys["female_data_only"]) == sorted(np_[:3] + nn[:3])
    assert sorted(keys["professor / nurse"]) == sorted(pp[:3] + np_[:3])  # class 1, both spurious values
    assert sorted(keys["nurse_data_only"]) == sorted(pn[:3] + nn[:3])
    assert sorted(keys[B]) == sorted(pp[:6]) and sorted(keys["female_nurse_data_only"]) == sorted(nn[:6])
    with pytest.raises(probes.TaskUnavailable):
        ST.spurious_corr_keys(pp, pn, np_, nn, 6, seed=0)  # the biased keys would need 12


class _EmbeddingLM:
    def __init__(self, tokenizer, d=128):
        self.tokenizer = tokenizer
        self.model = None
        self.device = torch.device("cpu")
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.pad_token_id
        self.special_token_ids = {tokenizer.bos_token_id, tokenizer.pad_token_id}
        self.emb = torch.randn(len(tokenizer), d, generator=torch.Generator().manual_seed(0))

    def activations(self, input_ids, layer, hook):
        return self.emb[input_ids]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("scr_cache"))


@pytest.fixture(scope="module")
def lm(cache_dir):
    docs = [t for t, _p, _k in probes.stdlib_labelled_docs(PACKAGES, cache_dir)]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        docs, trainers.WordLevelTrainer(vocab_size=1200, special_tokens=["<bos>", "<pad>", "<unk>"])
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>")
    return _EmbeddingLM(hf)


# SAEBench's probe settings except lr 1e-2 (its 1e-3 barely moves a probe in 20 epochs of ~10 steps on
# these ~160-text tasks)
FAST = {
    "dataset_names": ["stdlib"],
    "train_set_size": 160,
    "test_set_size": 80,
    "context_size": 48,
    "probe_epochs": 20,
    "probe_lr": 1e-2,
    "n_values": [2, 8],
    "packages": PACKAGES,
    "stdlib_pairs": [["asyncio", "email"]],
}


def test_scr_end_to_end_offline(lm, cache_dir):
    sae = _ReLUSAE(d_in=128, d_sae=64)
    out = ST.run_scr_or_tpp(lm, sae, 0, "resid_post", 0, FAST, True, cache_dir)
    assert out.status == "ok" and out.eval_type_id == "scr"
    m = out.metrics["scr_metrics"]
    assert {"scr_dir1_threshold_2", "scr_dir2_threshold_8"} <= set(m)
    assert all(math.isfinite(v) for v in m.values())
    clean = out.details[0]["clean_accuracies"]
    # the class and the spurious attribute (package, mentions "return") are both decodable from a bag of words
    assert clean["professor / nurse"] > 0.7 and clean["male / female"] > 0.6
    again = ST.run_scr_or_tpp(lm, sae, 0, "resid_post", 0, FAST, True, cache_dir)
    assert again.metrics == out.metrics  # seeded


def test_tpp_end_to_end_offline_and_hub_message(lm, cache_dir):
    sae = _ReLUSAE(d_in=128, d_sae=64)
    out = ST.run_scr_or_tpp(lm, sae, 0, "resid_post", 0, FAST, False, cache_dir)
    assert out.status == "ok" and out.eval_type_id == "tpp"
    m = out.metrics["tpp_metrics"]
    assert set(m) == {
        f"tpp_threshold_{n}_{k}" for n in (2, 8) for k in ("total_metric", "intended_diff_only", "unintended_diff_only")
    }
    assert set(out.details[0]["per_class"]) == set(PACKAGES)
    hub = ST.run_scr_or_tpp(
        lm, sae, 0, "resid_post", 0, {**FAST, "dataset_names": ["LabHC/bias_in_bios_class_set1"]}, True, cache_dir
    )
    assert hub.status == "skipped" and "LabHC/bias_in_bios" in hub.skip_reason and "stdlib" in hub.skip_reason
    with pytest.raises(ValueError, match="dataset_names"):
        ST.run_scr_or_tpp(lm, sae, 0, "resid_post", 0, {**FAST, "dataset_names": ["nope"]}, True, cache_dir)
