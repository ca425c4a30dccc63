"""Feature dashboards: a constructed model whose latent 0 fires only on one token (with a known
activation) and whose decoder direction promotes / suppresses known tokens; the one-pass streaming
top-k against a direct computation; the page and its data file."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.models import train_tokenizer
from sae_sweep.evals.dashboards import collect_latent_stats, fake_latents, output_tokens, run_dashboards
from sae_sweep.evals.schema import EvalOutput
from sae_sweep.models.lm import LanguageModel
from sae_sweep.sae import get_sae_class

pytestmark = pytest.mark.unit

DOCS = ["the cat sat on the mat and the dog ran to the park", "a bird sang in the tree while the sun rose"] * 20
D = 64  # d_model
ACT = 9.0  # latent 0's activation on its token: embedding 10 * e_0, encoder e_0, bias -1


@pytest.fixture(scope="module")
def setup():
    import transformers as T

    tok = train_tokenizer("llama", DOCS)
    cfg = T.LlamaConfig(
        vocab_size=len(tok), hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg)
    cat, promoted, suppressed = (tok.convert_tokens_to_ids(t) for t in ("Ġcat", "Ġpark", "Ġtree"))
    with torch.no_grad():
        # resid_pre of layer 0 is the token embedding: only "cat" has a component along e_0
        emb = model.get_input_embeddings().weight
        emb[:, 0] = 0
        emb[cat, 0] = 10.0
        head = model.get_output_embeddings().weight
        head[:, 0] = 0
        head[promoted, 0], head[suppressed, 0] = 5.0, -5.0
    lm = LanguageModel(model, tok, "cpu", {"name": "constructed"})
    sae = get_sae_class("relu")(D, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.W_enc[0, :] = 0  # no latent but 0 reads e_0 ...
        sae.W_enc[:, 0] = torch.nn.functional.one_hot(torch.tensor(0), D).float()
        sae.b_enc[0] = -1.0
        sae.W_dec[0] = sae.W_enc[:, 0]  # ... and latent 0 writes it
    ids = [tok.encode(d, add_special_tokens=False) for d in DOCS]
    flat = [i for d in ids for i in d]
    T_ = 16
    windows = [[lm.bos_token_id] + flat[s : s + T_ - 1] for s in range(0, len(flat) - T_, T_ - 1)]
    tokens = torch.tensor(windows)
    return dict(lm=lm, sae=sae, tokens=tokens, tok=tok, cat=cat, promoted=promoted, suppressed=suppressed)


def test_constructed_latent_fires_on_its_token_only(setup):
    lm, sae, tokens, cat = setup["lm"], setup["sae"], setup["tokens"], setup["cat"]
    out = run_dashboards(lm, sae, tokens, 0, "resid_pre", 0, {"n_frequent": 4, "n_random": 2})
    data = json.loads(out.files["dashboard/latents.json"])
    lat = data["latents"]["0"]
    n_cat = int((tokens[:, 1:] == cat).sum())
    assert lat["density"] == pytest.approx(n_cat / data["n_tokens"])
    assert lat["max_activation"] == pytest.approx(ACT, rel=1e-4)
    assert len(lat["contexts"]) == 4  # json_contexts: "cat" is in far more than 4 windows
    for c in lat["contexts"]:
        assert c["ids"][c["peak"]] == cat
        assert c["acts"][c["peak"]] == pytest.approx(ACT, rel=1e-4)
        assert all(a == 0 for i, a in zip(c["ids"], c["acts"]) if i != cat)  # the shading is the latent's own
    tokens_out = output_tokens(lm, sae, [0], 3)[0]
    tok = setup["tok"]
    assert tokens_out["promoted"][0] == tok.decode([setup["promoted"]])
    assert tokens_out["suppressed"][0] == tok.decode([setup["suppressed"]])


def test_streaming_top_k_matches_a_direct_computation_at_any_batch_size(setup):
    lm, sae, tokens = setup["lm"], setup["sae"], setup["tokens"]
    acts = lm.activations(tokens, 0, "resid_pre")
    f = sae.encode(acts.reshape(-1, D)).reshape(tokens.shape[0], tokens.shape[1], -1).detach()
    f[:, 0] = 0  # BOS positions are not scored
    peaks = f.max(dim=1).values  # [N, d]: each window's peak per latent
    want = peaks.topk(5, dim=0).values.clamp_min(0)
    for batch_size in (1, 3, 64):
        s = collect_latent_stats(lm, sae, tokens, 0, "resid_pre", 5, 3, 2, batch_size)
        assert torch.allclose(s.top_values.clamp_min(0), want, atol=1e-5)
        assert torch.equal(s.fires, (f > 0).sum(dim=(0, 1)))
        assert torch.equal(s.hist.sum(1), s.fires)  # every firing lands in one histogram bin
        # the span's centre is the peak itself
        has = s.top_values > 0
        assert torch.allclose(s.top_span[:, :, 3][has], s.top_values[has])
    # the state is sized by latents and contexts, not by the amount of text
    assert s.top_span.shape == (5, 32, 6) and s.hist.shape[0] == 32


def test_fake_features_from_an_earlier_eval_are_shown(setup):
    lm, sae, tokens = setup["lm"], setup["sae"], setup["tokens"]
    details = [{"index": i, "proportion_above_activation_threshold": p} for i, p in [(3, 0.5), (5, 0.05), (7, 0.9)]]
    fake = EvalOutput("fake_features", {"threshold": 0.1}, {"fake_features": {"x": 0.0}}, details=details)
    assert fake_latents({"fake_features": fake}) == [7, 3]
    assert fake_latents({}) is None
    out = run_dashboards(lm, sae, tokens, 0, "resid_pre", 0, {"n_frequent": 1, "n_random": 0}, {"fake_features": fake})
    html = out.files["dashboard/dashboard.html"]
    import os

    if os.environ.get("DUMP"):
        open(os.environ["DUMP"], "w").write(html)
    assert 'data-latent="7"' in html and 'data-latent="3"' in html and "Fake features" in html
    assert json.loads(out.files["dashboard/latents.json"])["fake"] == [7, 3]


def test_bad_setting_names_the_key():
    from sae_sweep.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="eval.dashboards.n_contexts"):
        run_dashboards(None, None, None, 0, "resid_pre", 0, {"n_contexts": 0})
