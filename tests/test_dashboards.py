"""Feature dashboards: a constructed model whose latent 0 fires only on one token (with a known
activation) and whose decoder direction promotes / suppresses known tokens; the one-pass streaming
top-k against a direct computation; the page and its data file."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.feature_model import ACT, D_MODEL, constructed
from sae_sweep.evals.dashboards import collect_latent_stats, fake_latents, output_tokens, run_dashboards
from sae_sweep.evals.schema import EvalOutput

pytestmark = pytest.mark.unit

D = D_MODEL


@pytest.fixture(scope="module")
def setup():
    return constructed()


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


@pytest.mark.parametrize("preset, on", [("default", True), ("full", True), ("core_only", False)])
def test_presets_run_dashboards_except_core_only(preset, on):
    from helpers.config import compose_config

    cfg = compose_config(f"eval={preset}")
    assert ("dashboards" in cfg.eval.run) == on
    if on:  # last, so the fake features are known when it runs
        assert cfg.eval.run[-1] == "dashboards" and cfg.eval.dashboards.n_contexts == 8
