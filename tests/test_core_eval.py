"""Core eval: every metric against hand-computed values, the schema, and an end-to-end run on a real
(tiny, random) Hugging Face GPT-2 with identity / zero / shrinking "SAEs"."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from helpers.splice_lm import HFResidPostLM, LinearSAE
from sae_sweep.evals import core
from sae_sweep.evals.core import CoreAccumulator, run_core_eval
from sae_sweep.evals.schema import EvalOutput, flatten_metrics, to_saebench_json, write_json

pytestmark = pytest.mark.unit

T = torch.tensor


def _accumulate(x, x_hat, f=None, keep=None):
    """One batch of tokens [n, d] through the accumulator as a single sequence [1, n, d]."""
    x, x_hat = T(x, dtype=torch.float64)[None], T(x_hat, dtype=torch.float64)[None]
    f = torch.zeros(1, x.shape[1], 4) if f is None else T(f, dtype=torch.float32)[None]
    keep = torch.ones(1, x.shape[1], dtype=torch.bool) if keep is None else T(keep)[None]
    acc = CoreAccumulator()
    acc.update_reconstruction(x, x_hat, f, keep)
    return acc


def _kl(clean, patched):
    return core.kl_div_from_logprobs(clean.log_softmax(-1), patched.log_softmax(-1))


def test_kl_div_per_token_hand_computed():
    # p = softmax([0, 0]) = (1/2, 1/2); q = softmax([ln 3, 0]) = (3/4, 1/4)
    # KL(p||q) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    clean = T([[0.0, 0.0]])
    patched = T([[math.log(3.0), 0.0]])
    assert _kl(clean, patched).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # identical distributions -> exactly 0
    assert _kl(patched, patched).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_div_score_hand_computed():
    # (KL_abl - KL_sae) / KL_abl = (0.5 - 0.1) / 0.5 = 0.8
    assert core.kl_div_score(0.5, 0.1) == pytest.approx(0.8)
    assert core.kl_div_score(0.5, 0.0) == 1.0  # perfect SAE
    assert core.kl_div_score(0.5, 0.5) == 0.0  # as bad as zero-ablation
    assert math.isnan(core.kl_div_score(0.0, 0.0))  # undefined, not silently 0 or 1


def test_next_token_ce_hand_computed():
    # position 0 predicts token[1] = 1 with p = softmax([ln 3, 0]) = (3/4, 1/4): CE = -ln(1/4) = ln 4
    # position 1 predicts token[2] = 0 with p = softmax([0, 0]) = (1/2, 1/2): CE = ln 2
    logits = T([[[math.log(3.0), 0.0], [0.0, 0.0], [5.0, 5.0]]])
    tokens = T([[0, 1, 0]])
    ce = core.ce_from_logprobs(logits.log_softmax(-1), tokens)
    assert ce.shape == (1, 2)  # the last position has no target
    assert ce[0].tolist() == pytest.approx([math.log(4.0), math.log(2.0)], rel=1e-6)


def test_ce_loss_score_hand_computed():
    # (CE_abl - CE_sae) / (CE_abl - CE_clean) = (3.0 - 2.5) / (3.0 - 2.0) = 0.5
    assert core.ce_loss_score(3.0, 2.5, 2.0) == pytest.approx(0.5)
    assert core.ce_loss_score(3.0, 2.0, 2.0) == 1.0
    assert core.ce_loss_score(3.0, 3.0, 2.0) == 0.0
    assert math.isnan(core.ce_loss_score(2.0, 2.0, 2.0))


def test_centred_explained_variance_differs_from_saebench_and_legacy():
    # x = (0,0), (1,0), (5,0); x_hat = x except token 1 reconstructed as (1,1): residuals 0, 1, 0.
    # mean x = (2, 0); ||x_t - mean||^2 = 4, 1, 9 (sum 14); ||x_t||^2 = 0, 1, 25 (sum 26).
    # centred   EV = 1 - 1/14 = 13/14 = 0.928571...
    # SAEBench 0.6.0 (one batch): S = 26/3, R = 1/3, m = S/d_in = 13/3, S - m^2 = 78/9 - 169/9 = -91/9
    #           EV = 1 - (1/3)/(-91/9) = 1 + 3/91 = 1.0329...  (> 1: its denominator is not a variance)
    # legacy    EV = mean(1 - 0/4, 1 - 1/1, 1 - 0/9) = (1 + 0 + 1)/3 = 2/3
    x = [[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]]
    x_hat = [[0.0, 0.0], [1.0, 1.0], [5.0, 0.0]]
    m = _accumulate(x, x_hat).compute()["reconstruction_quality"]
    assert m["explained_variance_centred"] == pytest.approx(13 / 14)
    assert m["explained_variance"] == pytest.approx(1 + 3 / 91)
    assert m["explained_variance_legacy"] == pytest.approx(2 / 3)
    legacy = core.explained_variance_legacy_per_token(T(x), T(x_hat))
    assert legacy.tolist() == pytest.approx([1.0, 0.0, 1.0])


def test_predicting_the_mean_explains_nothing():
    # x = (1,0), (3,0); x_hat = mean = (2,0) for both: residual 1 + 1 = 2, SST about mean = 1 + 1 = 2.
    # centred EV = 1 - 2/2 = 0, whereas the uncentred form would say 1 - 2/(1 + 9) = 0.8.
    m = _accumulate([[1.0, 0.0], [3.0, 0.0]], [[2.0, 0.0], [2.0, 0.0]]).compute()["reconstruction_quality"]
    assert m["explained_variance_centred"] == pytest.approx(0.0, abs=1e-12)


def test_explained_variance_uses_the_global_mean_across_batches():
    # batch A: x = (0,0), (2,0); batch B: x = (4,0), (6,0); x_hat = x + (0,1): residual 1 per token (4).
    # global mean (3,0): SST = 9 + 1 + 1 + 9 = 20 -> centred EV = 1 - 4/20 = 0.8.
    # Centring per batch would give SST = (1+1) + (1+1) = 4 -> EV 0; legacy (per-batch mean) is
    # 1 - 1/1 = 0 for every token -> 0.
    acc = CoreAccumulator()
    for xs in ([[0.0, 0.0], [2.0, 0.0]], [[4.0, 0.0], [6.0, 0.0]]):
        x = T(xs)[None]
        acc.update_reconstruction(x, x + T([0.0, 1.0]), torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool))
    m = acc.compute()["reconstruction_quality"]
    assert m["explained_variance_centred"] == pytest.approx(0.8)
    assert m["explained_variance_legacy"] == pytest.approx(0.0, abs=1e-12)
    # SAEBench: S = mean(2, 26) = 14 (batch means of ||x||^2: (0+4)/2, (16+36)/2), R = 1, m = 14/2 = 7:
    # EV = 1 - 1/(14 - 49) = 1 + 1/35
    assert m["explained_variance"] == pytest.approx(1 + 1 / 35)
    # the same from the pure function and raw sums: sum x = (12, 0), sum ||x||^2 = 56, n = 4:
    # SST = 56 - 144/4 = 20
    assert core.explained_variance_centred(T([12.0, 0.0]), 56.0, 4.0, 4) == pytest.approx(0.8)


def test_mse_three_normalisations():
    # batch A: x = (1,2), (0,0), (0,1); x_hat = 0: per-token squared errors 5, 0, 1
    # batch B: x = (2,0); x_hat = 0: squared error 4
    # SAEBench (per token / tokens in its batch, then the mean over tokens):
    #   (5/3 + 0/3 + 1/3 + 4/1) / 4 = 6/4 = 1.5
    # SAELens 6.54.12 (per-token sum, mean over tokens): (5 + 0 + 1 + 4)/4 = 2.5
    # per element: 10 / (4 tokens x 2 dims) = 1.25
    acc = CoreAccumulator()
    for xs in ([[1.0, 2.0], [0.0, 0.0], [0.0, 1.0]], [[2.0, 0.0]]):
        x = T(xs)[None]
        acc.update_reconstruction(
            x, torch.zeros_like(x), torch.zeros(1, len(xs), 3), torch.ones(1, len(xs), dtype=torch.bool)
        )
    m = acc.compute()["reconstruction_quality"]
    assert m["mse"] == pytest.approx(1.5)
    assert m["mse_per_token"] == pytest.approx(2.5)
    assert m["mse_per_element"] == pytest.approx(1.25)


def test_cossim_hand_computed():
    # cos((1,0), (0,2)) = 0; cos((1,1), (2,2)) = 1 -> mean 0.5
    x, x_hat = [[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [2.0, 2.0]]
    assert core.cosine_sim_per_token(T(x), T(x_hat)).tolist() == pytest.approx([0.0, 1.0])
    assert _accumulate(x, x_hat).compute()["reconstruction_quality"]["cossim"] == pytest.approx(0.5)
    # a zero reconstruction has no cosine: NaN, as SAEBench (no epsilon), so the metric is flagged
    assert math.isnan(core.cosine_sim_per_token(T([[1.0, 1.0]]), T([[0.0, 0.0]])).item())


def test_l2_norms_and_ratio_hand_computed():
    # token 0: x = (3,4) (norm 5), x_hat = (0,2.5) (norm 2.5): ratio 0.5
    # token 1: x = (0,0) (norm 0 < 1e-4, so divide by 1), x_hat = (0,3) (norm 3): ratio 3
    # l2_norm_in = (5 + 0)/2 = 2.5; l2_norm_out = (2.5 + 3)/2 = 2.75; l2_ratio = (0.5 + 3)/2 = 1.75
    m = _accumulate([[3.0, 4.0], [0.0, 0.0]], [[0.0, 2.5], [0.0, 3.0]]).compute()["shrinkage"]
    assert m["l2_norm_in"] == pytest.approx(2.5)
    assert m["l2_norm_out"] == pytest.approx(2.75)
    assert m["l2_ratio"] == pytest.approx(1.75)


def test_relative_reconstruction_bias_hand_computed():
    # E||x_hat||^2 / E[x . x_hat] over one batch.
    # x = (2,0), (0,1); x_hat = (1,1), (0,3): sum ||x_hat||^2 = 2 + 9 = 11; sum x.x_hat = 2 + 3 = 5
    # -> 11/5 = 2.2 (a mean of per-token ratios would give (2/2 + 9/3)/2 = 2; E[x.x_hat]/E||x||^2 = 5/5 = 1)
    m = _accumulate([[2.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 3.0]]).compute()["shrinkage"]
    assert m["relative_reconstruction_bias"] == pytest.approx(2.2)
    assert m["relative_reconstruction_bias_global"] == pytest.approx(2.2)
    assert core.relative_reconstruction_bias(11.0, 5.0) == pytest.approx(2.2)
    # Two batches: SAEBench averages the per-batch ratios; _global is one ratio of sums.
    # batch A as above (11/5); batch B: x = (1,0), x_hat = (1,0): 1/1. SAEBench (2.2 + 1)/2 = 1.6;
    # global (11 + 1)/(5 + 1) = 2.0
    acc = CoreAccumulator()
    for xs, xh in (([[2.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 3.0]]), ([[1.0, 0.0]], [[1.0, 0.0]])):
        acc.update_reconstruction(
            T(xs)[None], T(xh)[None], torch.zeros(1, len(xs), 2), torch.ones(1, len(xs), dtype=torch.bool)
        )
    m = acc.compute()["shrinkage"]
    assert m["relative_reconstruction_bias"] == pytest.approx(1.6)
    assert m["relative_reconstruction_bias_global"] == pytest.approx(2.0)
    assert math.isnan(core.relative_reconstruction_bias(0.0, 0.0))


def test_l0_l1_hand_computed_and_token_weighted():
    # batch A, 2 tokens: f = (0, 2, -1, 0) -> l0 2, l1 1 (SAEBench sums f without abs); (0, 0, 0, 3) -> 1, 3
    # batch B, 1 token:  f = (1, 1, 1, 1)  -> l0 4, l1 4
    # token means: l0 = (2 + 1 + 4)/3 = 7/3, l1 = (1 + 3 + 4)/3 = 8/3
    # (a mean of batch means would give l0 = (1.5 + 4)/2 = 2.75)
    acc = CoreAccumulator()
    acc.update_reconstruction(
        torch.ones(1, 2, 2),
        torch.ones(1, 2, 2),
        T([[[0.0, 2.0, -1.0, 0.0], [0.0, 0.0, 0.0, 3.0]]]),
        torch.ones(1, 2, dtype=torch.bool),
    )
    acc.update_reconstruction(
        torch.ones(1, 1, 2) * 2, torch.ones(1, 1, 2), torch.ones(1, 1, 4), torch.ones(1, 1, dtype=torch.bool)
    )
    m = acc.compute()["sparsity"]
    assert m["l0"] == pytest.approx(7 / 3)
    assert m["l1"] == pytest.approx(8 / 3)


def test_density_metrics_hand_computed():
    # densities 0, 0.005, 0.02, 0.5: alive 3/4; > 1%: 2/4; > 10%: 1/4;
    # normalized: (0.02 + 0.5)/0.525 = 0.990476..., 0.5/0.525 = 0.952380...
    m = core.density_metrics(T([0.0, 0.005, 0.02, 0.5]))
    assert m["frac_alive"] == pytest.approx(0.75)
    assert m["freq_over_1_percent"] == pytest.approx(0.5)
    assert m["freq_over_10_percent"] == pytest.approx(0.25)
    assert m["normalized_freq_over_1_percent"] == pytest.approx(0.52 / 0.525)
    assert m["normalized_freq_over_10_percent"] == pytest.approx(0.5 / 0.525)
    assert core.density_metrics(torch.zeros(3))["normalized_freq_over_1_percent"] == 0.0


def test_frac_alive_and_frequency_thresholds_from_firings():
    # 200 tokens in 2 sequences of 100. latent 0 never fires; latent 1 fires on 2 tokens
    # (1% exactly: NOT over 1%); latent 2 on 3 tokens (1.5%); latent 3 on 21 tokens (10.5% > 10%).
    # frac_alive 3/4, freq_over_1_percent 2/4, freq_over_10_percent 1/4.
    f = torch.zeros(2, 100, 4)
    f[0, :2, 1] = 1.0
    f[1, :3, 2] = 0.5
    f[0, :21, 3] = 2.0
    acc = CoreAccumulator()
    x, keep = torch.ones(2, 100, 2), torch.ones(2, 100, dtype=torch.bool)
    acc.update_reconstruction(x, x, f, keep)
    m = acc.compute()["misc_metrics"]
    assert m["frac_alive"] == pytest.approx(0.75)
    assert m["freq_over_1_percent"] == pytest.approx(0.5)
    assert m["freq_over_10_percent"] == pytest.approx(0.25)
    assert acc.feature_density().tolist() == pytest.approx([0.0, 0.01, 0.015, 0.105])
    # consistent activation heuristic: firings per sequence fired in: 2/1, 3/1, 21/1; NaN when dead
    cah = acc.consistent_activation_heuristic()
    assert math.isnan(cah[0]) and cah[1:].tolist() == pytest.approx([2.0, 3.0, 21.0])


def test_max_cosine_sim_hand_computed():
    # v0 = (1,0), v1 = (0,1), v2 = (1,1), v3 = (-1,0)
    # v0: cos with v1 0, v2 1/sqrt2, v3 -1 -> 1/sqrt2; v1: 0, 1/sqrt2, 0 -> 1/sqrt2
    # v2: 1/sqrt2, 1/sqrt2, -1/sqrt2 -> 1/sqrt2;        v3: -1, 0, -1/sqrt2 -> 0
    vecs = T([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    s = 1 / math.sqrt(2)
    assert core.max_cosine_sim(vecs, chunk=3).tolist() == pytest.approx([s, s, s, 0.0], abs=1e-6)


def test_special_token_masks():
    tokens = T([[0, 5, 6, 0, 7]])
    keep = core.keep_mask(tokens, {0, None})
    assert keep.tolist() == [[False, True, True, False, True]]
    # CE at position t predicts t+1. SAEBench: scored when the INPUT is non-special (5 -> 6, 6 -> BOS);
    # both_non_special: only 5 -> 6
    assert core.ce_keep_mask(keep).tolist() == [[False, True, True, False]]
    assert core.ce_keep_mask(keep, "both_non_special").tolist() == [[False, True, False, False]]
    with pytest.raises(ValueError, match="ce_positions"):
        core.ce_keep_mask(keep, "nope")
    assert core.keep_mask(tokens, set()).all()


def test_special_tokens_excluded_from_every_average():
    # BOS positions carry a huge activation, a bad reconstruction, firing latents and a huge KL/CE:
    # if any leaked into an average, the values below would be far off.
    tokens = T([[0, 5, 6, 0, 7]])
    keep = core.keep_mask(tokens, {0})
    x = T([[[100.0, 0.0], [3.0, 4.0], [3.0, 4.0], [100.0, 0.0], [3.0, 4.0]]])
    x_hat = x.clone()
    x_hat[0, 0] = x_hat[0, 3] = -50.0
    f = torch.zeros(1, 5, 2)
    f[0, 0, 0] = f[0, 3, 0] = 1.0  # latent 0 fires only on BOS -> dead on scored tokens
    f[0, 1:3, 1] = 1.0  # latent 1 fires on 2 of 3 scored tokens
    acc = CoreAccumulator()
    acc.update_reconstruction(x, x_hat, f, keep)
    kl = T([[9.0, 0.1, 0.3, 9.0, 0.2]])  # mean over scored positions 1, 2, 4 = 0.2
    ce = T([[9.0, 1.0, 1.0, 9.0]])  # positions 1 (5 -> 6) and 2 (6 -> BOS) score: 1.0
    acc.update_downstream(keep, kl, kl * 2, ce, ce * 1.5, ce * 2)
    m = acc.compute()
    assert m["shrinkage"]["l2_norm_in"] == pytest.approx(5.0)
    assert m["reconstruction_quality"]["mse"] == pytest.approx(0.0)
    assert m["sparsity"]["l0"] == pytest.approx(2 / 3)
    assert m["misc_metrics"]["frac_alive"] == pytest.approx(0.5)
    assert m["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(0.2)
    assert m["model_behavior_preservation"]["kl_div_with_ablation"] == pytest.approx(0.4)
    # CE: clean 1.0, sae 1.5, ablation 2.0 -> score (2 - 1.5)/(2 - 1) = 0.5
    assert m["model_performance_preservation"]["ce_loss_without_sae"] == pytest.approx(1.0)
    assert m["model_performance_preservation"]["ce_loss_score"] == pytest.approx(0.5)
    assert acc.n_tokens == 3 and acc.n_ce == 2


def test_splice_keeps_special_positions():
    act = T([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    keep = T([[False, True, True]])
    out = core.splice_keep_special(act, keep, torch.zeros_like(act))
    assert out.tolist() == [[[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]]


def _toy_output(**kw):
    metrics = {
        "model_behavior_preservation": {"kl_div_score": 0.9, "kl_div_with_sae": float("nan")},
        "sparsity": {"l0": 12, "l1": float("inf")},
    }
    return EvalOutput(eval_type_id=kw.pop("eval_type_id", "core"), config={"n_tokens": 10}, metrics=metrics, **kw)


def test_flatten_metrics_names_and_nonfinite():
    out = _toy_output()
    flat = flatten_metrics(out)
    assert flat == {"core/model_behavior_preservation/kl_div_score": 0.9, "core/sparsity/l0": 12.0}
    assert flat.dropped == ["core/model_behavior_preservation/kl_div_with_sae", "core/sparsity/l1"]
    assert out.flags["nonfinite_metrics"] == ["model_behavior_preservation/kl_div_with_sae", "sparsity/l1"]
    abs_out = _toy_output(eval_type_id="absorption_first_letter")
    assert "absorption/sparsity/l0" in flatten_metrics(abs_out, prefix="absorption")
    assert "absorption_first_letter/sparsity/l0" in flatten_metrics(abs_out)


def test_tensor_scalars_become_numbers():
    out = EvalOutput("core", {}, {"sparsity": {"l0": torch.tensor(3.0), "l1": torch.tensor(float("nan"))}})
    assert flatten_metrics(out) == {"core/sparsity/l0": 3.0} and out.flags["nonfinite_metrics"] == ["sparsity/l1"]


def test_eval_output_validation_and_skipped():
    with pytest.raises(ValueError, match="skip_reason"):
        _toy_output(status="skipped")
    with pytest.raises(ValueError, match="status"):
        _toy_output(status="weird", skip_reason="x")
    skipped = EvalOutput.skipped("absorption_first_letter", {}, "tokenizer has no single-letter tokens")
    assert skipped.status == "skipped" and flatten_metrics(skipped) == {}


def test_saebench_json_schema(tmp_path):
    sae_cfg = {"d_in": 32, "d_sae": 64}
    doc = to_saebench_json(_toy_output(), sae_cfg, sae_id="blocks.0.hook_resid_post", model_name="tiny")
    assert set(doc) == {
        "eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
        "eval_result_details", "eval_result_unstructured", "sae_bench_commit_hash", "sae_lens_id",
        "sae_lens_release_id", "sae_lens_version", "sae_cfg_dict",
    }  # fmt: skip
    assert doc["eval_config"]["model_name"] == "tiny" and doc["sae_bench_commit_hash"] is None
    assert doc["eval_result_metrics"]["sparsity"]["l1"] is None  # inf -> null, never -1
    assert doc["eval_result_unstructured"]["status"] == "ok"
    json.dumps(doc, allow_nan=False)  # strict JSON
    path = write_json(doc, tmp_path / "sub" / "core.json")
    assert json.loads(path.read_text())["eval_id"] == doc["eval_id"]
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32,
        initializer_range=0.2, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return HFResidPostLM(GPT2LMHeadModel(cfg))


@pytest.fixture(scope="module")
def tokens(lm):
    # Sample the contexts from the model itself (low temperature), so clean CE is well below the
    # ~ln(100) of the near-uniform zero-ablated model and the CE score has a real denominator.
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(1, 100, (6, 1), generator=g)
    with torch.no_grad():
        while toks.shape[1] < 16:
            logits = lm.model(toks).logits[:, -1].clone()
            logits[:, 0] = -math.inf  # keep id 0 free to play BOS
            nxt = torch.multinomial(torch.softmax(logits / 0.5, dim=-1), 1, generator=g)
            toks = torch.cat([toks, nxt], dim=1)
    return toks


def test_end_to_end_identity_sae_scores_one(lm, tokens):
    toks = tokens.clone()
    toks[:, 0] = 0  # BOS at the start of each context, excluded and kept un-spliced
    out = run_core_eval(lm, LinearSAE(scale=1.0), toks, layer=0, hook="resid_post", batch_size=4,
                        special_token_ids={0}, progress=False)  # fmt: skip
    m = out.metrics
    assert out.status == "ok" and out.eval_type_id == "core"
    assert m["model_behavior_preservation"]["kl_div_with_ablation"] > 1e-3  # the test means something
    mpp = m["model_performance_preservation"]
    assert mpp["ce_loss_with_ablation"] > mpp["ce_loss_without_sae"] + 0.1
    assert m["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert m["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert m["reconstruction_quality"]["explained_variance_legacy"] == pytest.approx(1.0, abs=1e-9)
    assert m["reconstruction_quality"]["cossim"] == pytest.approx(1.0)
    assert m["shrinkage"]["l2_ratio"] == pytest.approx(1.0)
    assert m["shrinkage"]["relative_reconstruction_bias"] == pytest.approx(1.0)
    assert m["token_stats"]["scored_tokens"] == 6 * 15
    assert m["token_stats"]["scored_ce_positions"] == 6 * 14
    assert m["token_stats"]["total_tokens_eval_reconstruction"] == 6 * 16
    assert 0 < m["sparsity"]["l0"] < 48
    assert "average_max_decoder_cosine_sim" in m["misc_metrics"]
    assert len(out.details) == 48 and set(out.details[0]) >= {"index", "feature_density", "max_decoder_cosine_sim"}
    assert out.config["exclude_special"] is True and out.config["ablation"] == "zero"
    assert out.config["n_tokens"] == 96 and out.config["context_size"] == 16
    flat = flatten_metrics(out)
    assert "core/model_behavior_preservation/kl_div_score" in flat and not flat.dropped
    json.dumps(to_saebench_json(out, {"d_sae": 48}, "test", "tiny-gpt2"), allow_nan=False)


def test_end_to_end_zero_sae_scores_zero(lm, tokens):
    class ZeroSAE(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x), torch.zeros(*x.shape[:-1], 8)

    # No special tokens: the zero SAE is then exactly the zero-ablation.
    out = run_core_eval(lm, ZeroSAE(), tokens, layer=0, hook="resid_post", batch_size=4,
                        special_token_ids=set(), progress=False)  # fmt: skip
    m = out.metrics
    assert m["model_behavior_preservation"]["kl_div_score"] == pytest.approx(0.0, abs=1e-6)
    assert m["model_performance_preservation"]["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(m["reconstruction_quality"]["cossim"])  # SAEBench: no cosine with a zero vector
    assert m["sparsity"]["l0"] == 0.0 and m["misc_metrics"]["frac_alive"] == 0.0
    # x_hat = 0: EV = 1 - E||x||^2 / E||x - mean||^2 = -||mean||^2 / Var < 0
    x = lm.activations(tokens, 0, "resid_post").reshape(-1, 32).double()
    expected = 1 - x.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert m["reconstruction_quality"]["explained_variance_centred"] == pytest.approx(expected.item(), rel=1e-9)
    # relative reconstruction bias is 0/0 for a zero output: dropped, listed, flagged
    assert "shrinkage/relative_reconstruction_bias" in out.flags["nonfinite_metrics"]
    assert "core/shrinkage/relative_reconstruction_bias" in flatten_metrics(out).dropped


def test_end_to_end_matches_direct_computation_and_is_batch_size_invariant(lm, tokens):
    # x_hat = 0.5 x at layer 0's output: block 1 then adds its own output to a shrunk residual, so
    # the splice really changes the logits (KL score ~0.84). At the last block's output the final
    # LayerNorm cancels a pure rescaling, KL with the SAE is ~0 and its sign is rounding noise.
    sae = LinearSAE(scale=0.5)
    # batch_size 4 on 6 contexts: batches of 4 and 2, so a mean of batch means would differ
    runs = {bs: run_core_eval(lm, sae, tokens, 0, "resid_post", bs, set(), progress=False).metrics
            for bs in (4, 6)}  # fmt: skip
    for bs in (4,):
        for cat, group in runs[6].items():
            for name, value in group.items():
                if name in ("explained_variance_legacy", "explained_variance", "mse") or cat == "token_stats":
                    continue  # SAEBench's per-batch formulas depend on the batch by definition
                assert runs[bs][cat][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (bs, cat, name)
    m = runs[6]
    # x_hat = 0.5 x: everything below follows from the activations directly
    x = lm.activations(tokens, 0, "resid_post").reshape(-1, 32).double()
    resid = (0.5 * x).pow(2).sum()
    sst = (x - x.mean(0)).pow(2).sum()
    assert m["reconstruction_quality"]["explained_variance_centred"] == pytest.approx(1 - (resid / sst).item())
    assert m["reconstruction_quality"]["mse_per_element"] == pytest.approx((resid / x.numel()).item())
    assert m["reconstruction_quality"]["mse_per_token"] == pytest.approx((resid / x.shape[0]).item())
    assert m["shrinkage"]["l2_ratio"] == pytest.approx(0.5)
    assert m["shrinkage"]["relative_reconstruction_bias"] == pytest.approx(0.5)  # 0.25 ||x||^2 / 0.5 ||x||^2
    assert m["reconstruction_quality"]["cossim"] == pytest.approx(1.0)
    # CE without the SAE agrees with Hugging Face's own mean next-token loss
    hf_loss = lm.model(tokens, labels=tokens).loss.item()
    assert m["model_performance_preservation"]["ce_loss_without_sae"] == pytest.approx(hf_loss, rel=1e-5)
    mbp = m["model_behavior_preservation"]
    assert mbp["kl_div_with_sae"] > 1e-3  # the splice changes the output: the score is not rounding noise
    assert 0.5 < mbp["kl_div_score"] < 0.95
    assert 0.5 < m["model_performance_preservation"]["ce_loss_score"] < 0.95


def test_run_core_eval_rejects_bad_input(lm):
    with pytest.raises(ValueError, match="special"):
        all_bos = torch.zeros(2, 4, dtype=torch.long)
        run_core_eval(lm, LinearSAE(), all_bos, 0, "resid_post", 2, {0}, progress=False)
    with pytest.raises(ValueError, match="tokens"):
        run_core_eval(lm, LinearSAE(), torch.zeros(4), 0, "resid_post", 2, set(), progress=False)


def test_end_to_end_bf16_model_with_fp32_sae(tokens):
    # A bf16 LM with an fp32 SAE: activations are cast to the SAE's dtype and the reconstruction
    # back to the LM's, and logits are scored in fp32.
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32,
        initializer_range=0.2, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    lm16 = HFResidPostLM(GPT2LMHeadModel(cfg).to(torch.bfloat16))
    out = run_core_eval(lm16, LinearSAE(scale=1.0), tokens, 0, "resid_post", 3, set(), progress=False)
    m = out.metrics
    assert m["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert not out.flags.get("nonfinite_metrics")


# Transcriptions of the reference on identical inputs


def _saebench_sparsity_and_variance(batches, d_sae):
    """SAEBench 0.6.0 ``get_sparsity_and_variance_metrics``, written out from
    sae_bench/evals/core/main.py:437-636 (pip sae-bench==0.6.0; github.com/adamkarvonen/SAEBench
    @8042bb38): per batch, flatten, keep non-ignored tokens, append per-token values (and the
    three per-batch EV pieces), then ``torch.cat(...).mean()`` -- float32 as in its runs."""
    metric = {
        k: []
        for k in (
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
    }
    mean_sum_of_squares, mean_act_per_dimension, mean_sum_of_resid_squared = [], [], []
    total_feature_acts, total_feature_prompts, total_tokens = torch.zeros(d_sae), torch.zeros(d_sae), 0
    for x, x_hat, f, mask in batches:
        flat_mask = mask.flatten()
        xs = x.flatten(0, 1)[flat_mask]
        fs = f.flatten(0, 1)[flat_mask]
        xh = x_hat.flatten(0, 1)[flat_mask]
        l2_in, l2_out = torch.norm(xs, dim=-1), torch.norm(xh, dim=-1)  # main.py:539-543
        div = l2_in.clone()
        div[torch.abs(div) < 0.0001] = 1
        metric["l2_norm_in"].append(l2_in)
        metric["l2_norm_out"].append(l2_out)
        metric["l2_ratio"].append(l2_out / div)
        metric["relative_reconstruction_bias"].append(  # main.py:547-551
            ((torch.norm(xh, dim=-1) ** 2).mean() / (xs * xh).sum(dim=-1).mean()).unsqueeze(0)
        )
        metric["l0"].append((fs != 0).sum(dim=-1).float())  # main.py:561-562
        metric["l1"].append(fs.sum(dim=-1))
        rss = (xs - xh).pow(2).sum(dim=-1)  # main.py:567-578
        metric["mse"].append(rss / flat_mask.sum())
        metric["explained_variance_legacy"].append(1 - rss / (xs - xs.mean(dim=0)).pow(2).sum(dim=-1))
        mean_sum_of_squares.append(xs.pow(2).sum(dim=-1).mean(dim=0))  # main.py:582-590
        mean_act_per_dimension.append(xs.pow(2).mean(dim=0))
        mean_sum_of_resid_squared.append(rss.mean(dim=0))
        metric["cossim"].append(  # main.py:592-598
            (xs / torch.norm(xs, dim=-1, keepdim=True) * (xh / torch.norm(xh, dim=-1, keepdim=True))).sum(dim=-1)
        )
        fired = ((f * mask.unsqueeze(-1)) > 0).float()  # main.py:603-609
        total_feature_acts += fired.sum(dim=1).sum(dim=0)
        total_feature_prompts += (fired.sum(dim=1) > 0).sum(dim=0)
        total_tokens += mask.sum()
    out = {k: torch.cat(v).mean().item() for k, v in metric.items()}  # main.py:612-627
    total_variance = torch.stack(mean_sum_of_squares).mean(dim=0) - torch.cat(mean_act_per_dimension).mean(dim=0) ** 2
    out["explained_variance"] = (1 - torch.stack(mean_sum_of_resid_squared).mean(dim=0) / total_variance).item()
    return out, total_feature_acts / total_tokens, total_feature_acts / total_feature_prompts


def test_sparsity_and_variance_metrics_match_saebench_transcription():
    # 3 batches of different sizes, random activations with a non-zero mean (so centred and SAEBench EV
    # differ), reconstructions with error, TopK-like latents, and a few ignored (special) positions.
    g = torch.Generator().manual_seed(5)
    d_in, d_sae = 8, 12
    batches, acc = [], CoreAccumulator()
    for b, t in ((4, 6), (4, 6), (2, 6)):
        x = torch.randn(b, t, d_in, generator=g) * 3 + 1.5
        x_hat = x * 0.8 + 0.3 * torch.randn(b, t, d_in, generator=g)
        f = torch.relu(torch.randn(b, t, d_sae, generator=g) - 0.5)
        mask = torch.rand(b, t, generator=g) > 0.15
        mask[:, 0] = False  # BOS
        batches.append((x, x_hat, f, mask))
        acc.update_reconstruction(x, x_hat, f, mask)
    ref, density, cah = _saebench_sparsity_and_variance(batches, d_sae)
    m = acc.compute()
    ours = {**m["reconstruction_quality"], **m["shrinkage"], **m["sparsity"]}
    assert abs(ours["explained_variance"] - ours["explained_variance_centred"]) > 0.01  # the test can tell them apart
    assert abs(ours["relative_reconstruction_bias"] - ours["relative_reconstruction_bias_global"]) > 1e-4
    for name, value in ref.items():
        assert ours[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert acc.feature_density().tolist() == pytest.approx(density.tolist(), rel=1e-6)
    assert acc.consistent_activation_heuristic().tolist() == pytest.approx(cah.tolist(), rel=1e-6)


def test_kl_ce_aggregation_matches_saebench_transcription():
    # SAEBench 0.6.0 get_downstream_reconstruction_metrics (sae_bench/evals/core/main.py:404-432): each
    # per-position tensor is masked by `tokens not in ignore_tokens`; for CE ([B, T-1]) the mask is
    # truncated as mask[:, :-1]; every metric is torch.cat(...).mean() over batches; then the scores.
    g = torch.Generator().manual_seed(6)
    ignore = {0, 1}
    ref = {
        k: []
        for k in (
            "kl_div_with_sae",
            "kl_div_with_ablation",
            "ce_loss_without_sae",
            "ce_loss_with_sae",
            "ce_loss_with_ablation",
        )
    }
    acc = CoreAccumulator()
    for b in (3, 2):
        tokens = torch.randint(0, 6, (b, 7), generator=g)
        tokens[:, 0] = 0
        vals = {
            "kl_div_with_sae": torch.rand(b, 7, generator=g),
            "kl_div_with_ablation": 2 + torch.rand(b, 7, generator=g),
            "ce_loss_without_sae": torch.rand(b, 6, generator=g),
            "ce_loss_with_sae": 1 + torch.rand(b, 6, generator=g),
            "ce_loss_with_ablation": 3 + torch.rand(b, 6, generator=g),
        }
        mask = torch.logical_not(torch.any(torch.stack([tokens == t for t in ignore], dim=0), dim=0))
        for name, v in vals.items():
            m = mask[:, :-1] if v.shape[1] != mask.shape[1] else mask
            ref[name].append(v[m])
        acc.update_downstream(
            core.keep_mask(tokens, ignore),
            vals["kl_div_with_sae"],
            vals["kl_div_with_ablation"],
            vals["ce_loss_without_sae"],
            vals["ce_loss_with_sae"],
            vals["ce_loss_with_ablation"],
        )
        acc.update_reconstruction(
            torch.ones(b, 7, 2), torch.ones(b, 7, 2), torch.ones(b, 7, 2), torch.ones(b, 7, dtype=torch.bool)
        )
    ref = {k: torch.cat(v).mean().item() for k, v in ref.items()}
    ref["kl_div_score"] = (ref["kl_div_with_ablation"] - ref["kl_div_with_sae"]) / ref["kl_div_with_ablation"]
    ref["ce_loss_score"] = (ref["ce_loss_with_ablation"] - ref["ce_loss_with_sae"]) / (
        ref["ce_loss_with_ablation"] - ref["ce_loss_without_sae"]
    )
    m = acc.compute()
    ours = {**m["model_behavior_preservation"], **m["model_performance_preservation"]}
    for name, value in ref.items():
        assert ours[name] == pytest.approx(value, rel=1e-6), name


def test_splice_option_reconstructs_special_positions_too(lm, tokens):
    # SAEBench's default exclude_special_tokens_from_reconstruction=False reconstructs EVERY position;
    # an SAE whose error is a fixed offset then also changes the BOS position, which later positions
    # attend to, so KL with the SAE grows. (A pure rescaling would be undone by the next LayerNorm.)
    class OffsetSAE(LinearSAE):
        def forward(self, x):
            offset = torch.linspace(-1.0, 1.0, x.shape[-1], dtype=x.dtype)
            return x + offset, torch.relu(x @ self.W_enc + self.b_enc)

    toks = tokens.clone()
    toks[:, 0] = 0
    keep = run_core_eval(lm, OffsetSAE(), toks, 0, "resid_post", 6, {0}, progress=False)
    every = run_core_eval(
        lm, OffsetSAE(), toks, 0, "resid_post", 6, {0}, progress=False, exclude_special_tokens_from_reconstruction=False
    )
    assert every.config["exclude_special_tokens_from_reconstruction"] is False
    kl_keep = keep.metrics["model_behavior_preservation"]["kl_div_with_sae"]
    kl_every = every.metrics["model_behavior_preservation"]["kl_div_with_sae"]
    assert kl_every > kl_keep * 1.01
    # reconstruction metrics do not depend on the splice
    assert every.metrics["reconstruction_quality"] == keep.metrics["reconstruction_quality"]


def test_saebench_special_ids_are_bos_eos_pad():
    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, None
        all_special_ids = [0, 1, 2, 7]

    assert core.saebench_special_ids(Tok()) == [1, 2]


def test_downstream_in_chunks_equals_whole_batch_log_probs(monkeypatch):
    """KL and CE from chunks of positions (any chunk size) are the whole-batch fp32 log-prob values."""
    g = torch.Generator().manual_seed(3)
    clean = (torch.randn(3, 7, 50, generator=g) * 3).to(torch.bfloat16)
    patched = (clean.float() + torch.randn(3, 7, 50, generator=g)).to(torch.bfloat16)
    toks = torch.randint(0, 50, (3, 7), generator=g)
    lc, lp = clean.float().log_softmax(-1), patched.float().log_softmax(-1)
    want = (core.kl_div_from_logprobs(lc, lp), core.ce_from_logprobs(lc, toks), core.ce_from_logprobs(lp, toks))
    assert want[0].shape == (3, 7) and want[1].shape == (3, 6) and float(want[0].mean()) > 0.01
    # one position, 4 (chunks across contexts, a short last one), 7 (one context), an odd size, everything
    for chunk in (50, 4 * 50, 7 * 50, 5 * 50 + 13, 1 << 24):
        monkeypatch.setattr(core, "LOGIT_CHUNK_ELEMS", chunk)
        got = core.downstream_per_position(clean, patched, toks)
        for a, b in zip(got, want):
            assert a.dtype == torch.float32 and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _BigVocabLM:
    """A stand-in with Gemma-2's 256k vocabulary: bf16 logits from a fixed unembedding."""

    vocab = 256_000

    def __init__(self, d=8):
        g = torch.Generator().manual_seed(0)
        self.embed = torch.randn(self.vocab, d, generator=g).to(torch.bfloat16)
        self.unembed = torch.randn(d, self.vocab, generator=g).to(torch.bfloat16)
        self.device = torch.device("cpu")

    def activations(self, ids, layer, hook):
        return self.embed[ids]

    def logits_with_splice(self, ids, layer, hook, fn):
        act = self.embed[ids]
        if fn is not None:
            act = fn(act).to(act.dtype)
        return act @ self.unembed


def test_core_eval_memory_at_gemma_vocabulary(monkeypatch):
    """No fp32 [B, T, vocab] log-probs: the downstream part holds the clean and one patched bf16
    logits tensor and chunk-sized fp32 temporaries. (The old form kept fp32 log-probs of the clean
    and the patched forward plus the patched logits: >= 5 bf16 logits' worth; 59 GB for Gemma-2 at
    16 x 1024 tokens.) Peak bytes counted per allocation (devices.LiveBytes)."""
    from sae_sweep.util.devices import LiveBytes

    monkeypatch.setattr(core, "LOGIT_CHUNK_ELEMS", 1 << 20)
    lm = _BigVocabLM()
    B, Tn = 2, 32
    toks = torch.randint(3, 1000, (B, Tn), generator=torch.Generator().manual_seed(1))
    toks[:, 0] = 0
    logits_bytes = B * Tn * lm.vocab * 2
    with LiveBytes() as mem:
        run_core_eval(
            lm,
            LinearSAE(d_in=8, d_sae=16, scale=0.5),
            toks,
            layer=0,
            hook="resid_post",
            batch_size=B,
            special_token_ids={0},
            progress=False,
            weight_metrics=False,
            feature_details=False,
        )
    assert mem.peak <= 2 * logits_bytes + 8 * (1 << 20) * 4, f"peak {mem.peak / 2**20:.0f} MiB"


# A bf16 LM: SAEBench's names carry SAEBench's arithmetic in bf16, the float64 values sit beside them


def test_bf16_sparsity_and_variance_equal_saebench_arithmetic_exactly():
    """On bf16 activations, reconstructions and latents (the SAE ran in bf16, as SAEBench casts it,
    main.py:1013), ModelDtypeAccumulator's values are SAEBench's bit for bit: the same operations in
    the same dtype (transcription above, main.py:437-636)."""
    from sae_sweep.evals.core_model_dtype import ModelDtypeAccumulator

    g = torch.Generator().manual_seed(7)
    d_in, d_sae = 8, 12
    batches, acc = [], ModelDtypeAccumulator(lambda k: core.ce_keep_mask(k, "saebench"))
    for b, t in ((4, 6), (4, 6), (2, 6)):
        x = (torch.randn(b, t, d_in, generator=g) * 3 + 1.5).to(torch.bfloat16)
        x_hat = (x.float() * 0.8 + 0.3 * torch.randn(b, t, d_in, generator=g)).to(torch.bfloat16)
        f = torch.relu(torch.randn(b, t, d_sae, generator=g) - 0.5).to(torch.bfloat16)
        mask = torch.rand(b, t, generator=g) > 0.15
        mask[:, 0] = False
        batches.append((x, x_hat, f, mask))
        acc.update_reconstruction(x, x_hat, f, mask)
    ref, density, cah = _saebench_sparsity_and_variance(batches, d_sae)
    for b in range(2):  # downstream values, so compute() has every metric
        keep = torch.ones(1, 3, dtype=torch.bool)
        acc.update_downstream(
            keep,
            *(torch.ones(1, 3, dtype=torch.bfloat16),) * 2,
            *(torch.ones(1, 2, dtype=torch.bfloat16) * (b + 1),) * 3,
        )
    m = acc.compute()
    ours = {**m["reconstruction_quality"], **m["shrinkage"], **m["sparsity"]}
    for name, value in ref.items():
        assert ours[name] == value, name
    got_density, got_cah = acc.firing()
    assert got_density.tolist() == pytest.approx(density.tolist(), rel=1e-6)
    assert got_cah.tolist() == pytest.approx(cah.tolist(), rel=1e-6, nan_ok=True)


def test_bf16_kl_and_ce_per_position_equal_saebench_and_transformer_lens():
    """KL as SAEBench's ``kl`` (main.py:741-748: softmax, log, in the logits' dtype) and CE as
    TransformerLens' ``lm_cross_entropy_loss`` (utilities/lm_utils.py:32-36: log_softmax, gather),
    whatever the chunk of positions."""
    from sae_sweep.evals.core_model_dtype import per_position_in_dtype

    g = torch.Generator().manual_seed(8)
    clean = (torch.randn(3, 7, 50, generator=g) * 3).to(torch.bfloat16)
    patched = (clean.float() + torch.randn(3, 7, 50, generator=g)).to(torch.bfloat16)
    toks = torch.randint(0, 50, (3, 7), generator=g)
    p, q = torch.nn.functional.softmax(clean, dim=-1), torch.nn.functional.softmax(patched, dim=-1)
    want_kl = (p * (torch.log(p) - torch.log(q))).sum(dim=-1)

    def tl_ce(logits):
        return -torch.nn.functional.log_softmax(logits, dim=-1)[..., :-1, :].gather(dim=-1, index=toks[..., 1:, None])[
            ..., 0
        ]

    for chunk in (50, 4 * 50, 7 * 50, 1 << 24):
        kl, ce_c, ce_p = per_position_in_dtype(clean, patched, toks, chunk)
        assert kl.dtype == torch.bfloat16
        assert torch.equal(kl, want_kl) and torch.equal(ce_c, tl_ce(clean)) and torch.equal(ce_p, tl_ce(patched))


def test_bf16_lm_logs_saebench_arithmetic_and_the_fp32_values_beside(tokens):
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32,
        initializer_range=0.2, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg)
    sae = LinearSAE(scale=0.7)
    out16 = run_core_eval(HFResidPostLM(model.to(torch.bfloat16)), sae, tokens, 0, "resid_post", 3, {0}, progress=False)
    assert out16.config["saebench_arithmetic"] == "llm dtype"
    m = out16.metrics
    ce = m["model_performance_preservation"]
    assert {"ce_loss_score", "ce_loss_score_fp32"} <= set(ce)
    # SAEBench's means are bf16-rounded: the value is a bf16 number; the fp32 twin is not rounded so
    assert ce["ce_loss_with_sae"] == float(torch.tensor(ce["ce_loss_with_sae"]).to(torch.bfloat16))
    assert ce["ce_loss_with_sae"] == pytest.approx(ce["ce_loss_with_sae_fp32"], rel=2e-2)
    flat = flatten_metrics(out16)
    declared = {x.key for x in core.METRICS}
    assert set(flat) <= declared
    out32 = run_core_eval(HFResidPostLM(model.float()), sae, tokens, 0, "resid_post", 3, {0}, progress=False)
    assert out32.config["saebench_arithmetic"] == "float64 sums"
    assert not any(k.endswith("_fp32") for k in flatten_metrics(out32))
