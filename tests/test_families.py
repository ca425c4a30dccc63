"""Every supported architecture, built here from a local config with random weights and saved with
save_pretrained next to a tokenizer in its family's style: BOS quirks, Gemma-2's soft-capped logits,
and one full job per family (cache -> train -> core eval -> MLflow) through the real CLI with
``model.hf_id=<local dir>``. Also: the offline failure of a hub model, and FaithfulSAE run names."""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network in tests

import pytest
import torch

from helpers.cli import run_cli
from helpers.config import compose_config
from helpers.mlflow_store import store_runs
from helpers.models import FAMILIES, TOKENIZER_STYLES, build_family_dir
from sae_sweep.config import ModelConfig
from sae_sweep.data.text import token_windows
from sae_sweep.models.lm import LanguageModel, load_lm


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("families")
    return {f: build_family_dir(f, root, corpus[:400]) for f in FAMILIES}


# Tokenizer quirks: BOS exactly once, whoever adds it
@pytest.mark.integration
@pytest.mark.parametrize("family", list(FAMILIES))
def test_windows_start_with_exactly_one_bos(family_dirs, family, tmp_path):
    lm = load_lm(ModelConfig(name=family, hf_id=str(family_dirs[family]), dtype="float32"), tmp_path, "cpu")
    style = TOKENIZER_STYLES[FAMILIES[family][1]]
    tok = lm.tokenizer
    assert lm.bos_token_id == tok.convert_tokens_to_ids(style["bos"])
    assert lm.eos_token_id == tok.convert_tokens_to_ids(style["eos"])
    # No pad token (GPT-2, Pythia, Llama-3): padding falls back to EOS.
    assert lm.pad_token_id == (tok.convert_tokens_to_ids(style["pad"]) if style["pad"] else lm.eos_token_id)
    # The quirk is real: this tokenizer adds BOS on its own (or does not) ...
    plain = tok("def f(x): return x")["input_ids"]
    assert (plain[0] == lm.bos_token_id) == style["adds_bos"]

    # ... and the windows still hold exactly one BOS, at position 0.
    w = token_windows(
        {"name": "builtin", "kind": "builtin", "context_size": 32}, lm, "train", 32 * 40, os.environ["SAE_SWEEP_CACHE"]
    )
    assert (w[:, 0] == lm.bos_token_id).all() and (w[:, 1] != lm.bos_token_id).all()
    if lm.bos_token_id != lm.eos_token_id:
        assert ((w == lm.bos_token_id).sum(dim=1) == 1).all()
    else:  # BOS == EOS: later occurrences are document separators, never right after BOS
        assert (w[:, 1:] == lm.eos_token_id).any()


@pytest.mark.integration
def test_gemma2_logits_are_soft_capped(family_dirs):
    """The splice returns the logits Gemma-2 samples from: cap * tanh(raw / cap)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = family_dirs["gemma2"]
    cap = 0.05  # far below the raw logits of this model, so the cap binds
    model = AutoModelForCausalLM.from_pretrained(d, final_logit_softcapping=cap, dtype=torch.float32)
    lm = LanguageModel(model, AutoTokenizer.from_pretrained(d), "cpu", {"name": "gemma2"})
    ids = torch.randint(4, lm.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = lm.bos_token_id
    logits = lm.logits_with_splice(ids, 1, "resid_post", None)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
        raw = model.lm_head(hidden)
    assert raw.abs().max() > 2 * cap
    torch.testing.assert_close(logits, cap * torch.tanh(raw / cap), rtol=1e-5, atol=1e-6)
    assert logits.abs().max() <= cap
    # An identity splice at the last layer reproduces them exactly (final norm + cap downstream).
    assert torch.equal(lm.logits_with_splice(ids, 1, "resid_post", lambda a: a), logits)


# Through the CLI
# ~10 SAE steps on an 8k-token cache, core eval on 512 held-out tokens.
TINY_BUDGET = [
    "dataset.context_size=32",
    "dataset.tokens=8192",
    "dataset.eval_tokens=512",
    "train.tokens=2560",
    "trainer.batch_size=256",
    "sae.expansion_factor=4",
    "sae.k=8",
    "eval=core_only",
    "train.checkpoint_every=5",
    "train.log_every=5",
    "sweep.name=families",
]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_job_on_local_family_dir(family_dirs, family, tmp_path):
    yaml_name, _, hook = FAMILIES[family]
    out = tmp_path / "out"
    r = run_cli(
        out, f"model={yaml_name}", f"model.hf_id={family_dirs[family]}", "layer=1", f"hook={hook}", *TINY_BUDGET
    )
    assert r.returncode == 0, r.stderr[-4000:]

    runs = store_runs(out, "families")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["model.hf_id"] == str(family_dirs[family]) and p["derived.d_sae"] == "256"  # 4 x d_model 64
    assert t["model"] == yaml_name and t["hook"] == hook and t["layer"] == "1"
    assert m["train/steps"] == 10 and m["cache/n_tokens"] > 0
    assert m["core/sparsity/l0"] == pytest.approx(8, abs=1e-6)
    assert 0 < m["core/reconstruction_quality/explained_variance"] <= 1
    for key in (
        "core/model_behavior_preservation/kl_div_score",
        "core/model_performance_preservation/ce_loss_score",
        "core/shrinkage/l2_ratio",
        "core/misc_metrics/frac_alive",
    ):
        assert key in m, key
    assert run.info.run_name.startswith(f"{yaml_name}_blocks.1.hook_{hook}_256_topk_8_")


@pytest.mark.integration
def test_local_dir_shallower_than_its_yaml_needs_an_explicit_layer(family_dirs):
    """gpt2's yaml default_layer=8 does not exist in a 2-layer local copy: the error says so."""
    from sae_sweep import config as C
    from sae_sweep.job.app import validate_point

    cfg = compose_config("model=gpt2", f"model.hf_id={family_dirs['gpt2']}")
    ok = compose_config("model=gpt2", f"model.hf_id={family_dirs['gpt2']}", "layer=1")
    with pytest.raises(C.ConfigError) as err:
        validate_point(cfg)
    msg = str(err.value)
    assert "layer=8" in msg and "has 2 layers" in msg and "0..1" in msg and "pass layer=N" in msg
    validate_point(ok)


@pytest.mark.integration
def test_offline_hub_model_fails_fast_naming_the_local_dir_override(tmp_path):
    out = tmp_path / "out"
    t0 = time.time()
    r = run_cli(out, "model=gpt2", env={"HF_HOME": str(tmp_path / "hf")})  # an empty HF cache
    assert r.returncode == 2, r.stderr[-3000:]
    assert time.time() - t0 < 120
    assert "openai-community/gpt2" in r.stderr and "model.hf_id=/path/to/local/dir" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "mlflow.db").exists()  # nothing ran


# Run names
@pytest.mark.unit
def test_run_name_is_faithfulsae_style():
    from sae_sweep import config as C
    from sae_sweep.config import total_steps
    from sae_sweep.job.app import run_name

    cfg = compose_config(
        "model=gpt2",
        "hook=resid_pre",
        "seed=42",
        "dataset=faithful",
        "trainer.batch_size=4096",
        f"train.tokens={24413 * 4096}",
    )
    steps = total_steps(cfg)
    d_sae = C.d_sae_for(cfg.sae, cfg.model.d_model)
    assert run_name(cfg, d_sae, steps) == "gpt2_blocks.8.hook_resid_pre_12288_topk_16_0.0003_42_faithful_128_24413"
