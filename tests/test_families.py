"""Every supported architecture, built here from a local config with random weights and saved with
save_pretrained next to a tokenizer in its family's style: BOS quirks, Gemma-2's soft-capped logits,
and one full job per family (cache -> train -> core eval -> MLflow) through the real CLI with
``model.hf_id=<local dir>``. Also: the offline failure of a hub model, and FaithfulSAE run names."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network in tests

import pytest
import torch

from sae_sweep.config import ModelConfig
from sae_sweep.models.lm import LanguageModel, load_lm
from sae_sweep.data.text import token_windows

# Tokenizer styles, as the hub models ship them:
#   gpt2   GPT-2 / Pythia (GPT-NeoX BPE): BOS == EOS == <|endoftext|>, no pad, adds nothing itself;
#   llama  Llama-3: <|begin_of_text|> / <|end_of_text|>, no pad, adds BOS itself (add_bos_token);
#   gemma  Gemma-2: <pad>=0 <eos>=1 <bos>=2 <unk>=3, adds BOS itself (and needs it).
TOKENIZER_STYLES = {
    "gpt2": dict(specials=["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>", pad=None, adds_bos=False),
    "llama": dict(specials=["<|begin_of_text|>", "<|end_of_text|>"], bos="<|begin_of_text|>",
                  eos="<|end_of_text|>", pad=None, adds_bos=True),
    "gemma": dict(specials=["<pad>", "<eos>", "<bos>", "<unk>"], bos="<bos>", eos="<eos>", pad="<pad>",
                  adds_bos=True),
}


def _config(family: str, vocab: int, tok) -> "object":
    """2 layers, d_model 64: the smallest shapes that still exercise every code path."""
    import transformers as T

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, **ids)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128, **ids)
    if family == "pythia":  # parallel residual and partial rotary, as in Pythia
        return T.GPTNeoXConfig(intermediate_size=256, use_parallel_residual=True, rotary_pct=0.25, **common)
    if family == "llama":
        return T.LlamaConfig(num_key_value_heads=2, intermediate_size=128, **common)
    if family == "mistral":
        return T.MistralConfig(num_key_value_heads=2, intermediate_size=128, sliding_window=64, **common)
    if family == "gemma2":  # soft-capped attention and final logits, alternating sliding-window layers
        return T.Gemma2Config(num_key_value_heads=2, head_dim=16, intermediate_size=128, sliding_window=16,
                              final_logit_softcapping=30.0, attn_logit_softcapping=50.0, **common)
    raise ValueError(family)


# family -> (conf/model yaml it stands in for, tokenizer style, hook for its full job)
FAMILIES = {
    "gpt2": ("gpt2", "gpt2", "resid_pre"),
    "pythia": ("pythia-70m", "gpt2", "attn_out"),
    "llama": ("llama-3.2-1b", "llama", "mlp_out"),
    "mistral": ("tiny", "llama", "resid_post"),
    "gemma2": ("gemma-2-2b", "gemma", "resid_post"),
}


def train_tokenizer(style: str, docs):
    """A small byte-level BPE in one of the hub styles (trained in about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    s = TOKENIZER_STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=768, special_tokens=s["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    if s["adds_bos"]:
        bos_id = tok.token_to_id(s["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{s['bos']} $A", pair=f"{s['bos']} $A {s['bos']} $B", special_tokens=[(s["bos"], bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=s["bos"], eos_token=s["eos"],
                                   unk_token=s["specials"][-1] if style == "gemma" else s["eos"],
                                   pad_token=s["pad"])


def build_family_dir(family: str, root: Path, docs) -> Path:
    """save_pretrained directory (model + tokenizer) of a random-weight ``family`` model."""
    from transformers import AutoModelForCausalLM

    tok = train_tokenizer(FAMILIES[family][1], docs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, len(tok), tok))
    # Random init leaves Gemma-2's sandwich norms at scale 1 exactly; perturb every parameter so no
    # sub-block output is accidentally zero or symmetric.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    d = root / family
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def corpus(session_cache_dir):
    from sae_sweep.data.corpus import builtin_documents

    return builtin_documents(session_cache_dir)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("families")
    return {f: build_family_dir(f, root, corpus[:400]) for f in FAMILIES}


# Tokenizer quirks: BOS exactly once, whoever adds it
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
    w = token_windows({"name": "builtin", "kind": "builtin", "context_size": 32}, lm, "train", 32 * 40,
                      os.environ["SAE_SWEEP_CACHE"])
    assert (w[:, 0] == lm.bos_token_id).all() and (w[:, 1] != lm.bos_token_id).all()
    if lm.bos_token_id != lm.eos_token_id:
        assert ((w == lm.bos_token_id).sum(dim=1) == 1).all()
    else:  # BOS == EOS: later occurrences are document separators, never right after BOS
        assert (w[:, 1:] == lm.eos_token_id).any()


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
def _cli(out: Path, *args, timeout=600, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "sae_sweep", *args, f"paths.output_dir={out}"],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=out.parent)


# ~10 SAE steps on an 8k-token cache, core eval on 512 held-out tokens.
TINY_BUDGET = ["dataset.context_size=32", "dataset.tokens=8192", "dataset.eval_tokens=512", "train.tokens=2560",
               "trainer.batch_size=256", "sae.expansion_factor=4", "sae.k=8", "eval=core_only",
               "train.checkpoint_every=5", "train.log_every=5", "sweep.name=families"]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_job_on_local_family_dir(family_dirs, family, tmp_path):
    from mlflow.tracking import MlflowClient

    yaml_name, _, hook = FAMILIES[family]
    out = tmp_path / "out"
    r = _cli(out, f"model={yaml_name}", f"model.hf_id={family_dirs[family]}", "layer=1", f"hook={hook}",
             *TINY_BUDGET)
    assert r.returncode == 0, r.stderr[-4000:]

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("families").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["model.hf_id"] == str(family_dirs[family]) and p["derived.d_sae"] == "256"  # 4 x d_model 64
    assert t["model"] == yaml_name and t["hook"] == hook and t["layer"] == "1"
    assert m["train/steps"] == 10 and m["cache/n_tokens"] > 0
    assert m["core/sparsity/l0"] == pytest.approx(8, abs=1e-6)
    assert 0 < m["core/reconstruction_quality/explained_variance"] <= 1
    for key in ("core/model_behavior_preservation/kl_div_score", "core/model_performance_preservation/ce_loss_score",
                "core/shrinkage/l2_ratio", "core/misc_metrics/frac_alive"):
        assert key in m, key
    assert run.info.run_name.startswith(f"{yaml_name}_blocks.1.hook_{hook}_256_topk_8_")


def test_local_dir_shallower_than_its_yaml_needs_an_explicit_layer(family_dirs):
    """gpt2's yaml default_layer=8 does not exist in a 2-layer local copy: the error says so."""
    from hydra import compose, initialize_config_dir

    from sae_sweep import config as C
    from sae_sweep.job.app import CONF_DIR, validate_point

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["model=gpt2", f"model.hf_id={family_dirs['gpt2']}"])
        ok = compose("config", overrides=["model=gpt2", f"model.hf_id={family_dirs['gpt2']}", "layer=1"])
    with pytest.raises(C.ConfigError) as err:
        validate_point(cfg)
    msg = str(err.value)
    assert "layer=8" in msg and "has 2 layers" in msg and "0..1" in msg and "pass layer=N" in msg
    validate_point(ok)


def test_offline_hub_model_fails_fast_naming_the_local_dir_override(tmp_path):
    out = tmp_path / "out"
    t0 = time.time()
    r = _cli(out, "model=gpt2", env_extra={"HF_HOME": str(tmp_path / "hf")})  # an empty HF cache
    assert r.returncode == 2, r.stderr[-3000:]
    assert time.time() - t0 < 120
    assert "openai-community/gpt2" in r.stderr and "model.hf_id=/path/to/local/dir" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "mlflow.db").exists()  # nothing ran


# Run names
def test_run_name_is_faithfulsae_style():
    from hydra import compose, initialize_config_dir

    from sae_sweep import config as C
    from sae_sweep.job.app import CONF_DIR, run_name
    from sae_sweep.config import total_steps

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["model=gpt2", "hook=resid_pre", "seed=42", "dataset=faithful",
                                           "trainer.batch_size=4096", f"train.tokens={24413 * 4096}"])
    steps = total_steps(cfg)
    d_sae = C.d_sae_for(cfg.sae, cfg.model.d_model)
    assert run_name(cfg, d_sae, steps) == "gpt2_blocks.8.hook_resid_pre_12288_topk_16_0.0003_42_faithful_128_24413"
