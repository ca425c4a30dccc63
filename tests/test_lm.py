"""lm.py: the offline tiny model and hook points on real HF architectures (tiny random configs)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network in tests

import pytest
import torch

from sae_sweep.config import ModelConfig
from sae_sweep.models import tiny
from sae_sweep.models.lm import (
    HOOK_TYPES,
    ModelUnavailable,
    hook_name,
    load_lm,
    model_shape,
    resolve_dtype,
    weights_sha256,
)
from sae_sweep.models.weights import builtin, resolve
from sae_sweep.util.locks import read_owner


@pytest.fixture(scope="session")
def small_tokenizer():
    """A byte-level BPE with distinct BOS/EOS/PAD (like Llama), trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>"
    )


FAMILY_CONFIGS = {
    "gpt2": lambda V: __import__("transformers").GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=3, n_head=4
    ),
    "gpt_neox": lambda V: __import__("transformers").GPTNeoXConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        use_parallel_residual=True,
    ),
    "gpt_neox_sequential": lambda V: __import__("transformers").GPTNeoXConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        use_parallel_residual=False,
    ),
    "llama": lambda V: __import__("transformers").LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ),
    "gemma2": lambda V: __import__("transformers").Gemma2Config(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
        sliding_window=8,
    ),
    "mistral": lambda V: __import__("transformers").MistralConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ),
}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, small_tokenizer):
    """One save_pretrained directory per architecture, random weights, shared small tokenizer."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for name, make in FAMILY_CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make(len(small_tokenizer)))
        # Random init leaves Gemma-2's sandwich norms at weight 0 (scale 1); perturb all params a
        # bit so that no sub-block output is accidentally zero or symmetric.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        d = root / name
        model.save_pretrained(d)
        small_tokenizer.save_pretrained(d)
        dirs[name] = d
    return dirs


# The norm in front of each block's MLP, and the final norm (HF applies it to hidden_states[-1]).
MLP_NORM = {
    "gpt2": "ln_2",
    "gpt_neox": "post_attention_layernorm",
    "gpt_neox_sequential": "post_attention_layernorm",
    "llama": "post_attention_layernorm",
    "mistral": "post_attention_layernorm",
    "gemma2": "pre_feedforward_layernorm",
}
FINAL_NORM = {
    "gpt2": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
    "gpt_neox_sequential": "gpt_neox.final_layer_norm",
    "llama": "model.norm",
    "mistral": "model.norm",
    "gemma2": "model.norm",
}


def _get(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _load_family(family_dirs, name, cache_dir):
    return load_lm(ModelConfig(name=name, hf_id=str(family_dirs[name]), dtype="float32"), cache_dir, "cpu")


# Hook points on each architecture
@pytest.mark.integration
@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_hook_points_match_hf_hidden_states(family_dirs, tmp_path, name):
    lm = _load_family(family_dirs, name, tmp_path)
    assert lm.n_layers == 3 and lm.d_model == 32
    ids = torch.randint(3, lm.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = lm.bos_token_id

    with torch.no_grad():
        hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hs) == lm.n_layers + 1

    # Block outputs from a plain full forward, for the last layer (HF's hidden_states[-1] is normed).
    block_out = {}
    handles = [
        blk.register_forward_hook(lambda m, a, o, i=i: block_out.__setitem__(i, o if torch.is_tensor(o) else o[0]))
        for i, blk in enumerate(lm._layers)
    ]
    with torch.no_grad():
        lm.model(input_ids=ids)
    for h in handles:
        h.remove()
    # Input of the MLP's norm in each block, from a plain full forward.
    mid_in = {}
    handles = [
        _get(blk, MLP_NORM[name]).register_forward_hook(lambda m, a, o, i=i: mid_in.__setitem__(i, a[0]))
        for i, blk in enumerate(lm._layers)
    ]
    with torch.no_grad():
        lm.model(input_ids=ids)
    for h in handles:
        h.remove()

    for layer in range(lm.n_layers):
        pre = lm.activations(ids, layer, "resid_pre")
        post = lm.activations(ids, layer, "resid_post")
        attn = lm.activations(ids, layer, "attn_out")
        mlp = lm.activations(ids, layer, "mlp_out")
        for act in (pre, post, attn, mlp):
            assert act.shape == (2, 12, 32)
        torch.testing.assert_close(pre, hs[layer], rtol=1e-5, atol=1e-6)
        if layer < lm.n_layers - 1:
            torch.testing.assert_close(post, hs[layer + 1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(post, block_out[layer], rtol=1e-5, atol=1e-6)
        # attn_out and mlp_out are exactly what the block adds to the residual stream
        # (sequential, parallel residual and Gemma-2 sandwich norms alike).
        torch.testing.assert_close(post - pre, attn + mlp, rtol=1e-4, atol=1e-5)
        assert attn.abs().max() > 0 and mlp.abs().max() > 0
        # attn_out on its own: the MLP's input norm reads pre + attn_out (sequential blocks) or
        # pre (parallel residual), so mlp_out is the rest.
        torch.testing.assert_close(mid_in[layer], pre if name == "gpt_neox" else pre + attn, rtol=1e-5, atol=1e-6)
    # The last layer's resid_post is HF's last hidden state before the final norm.
    last = lm.activations(ids, lm.n_layers - 1, "resid_post")
    with torch.no_grad():
        torch.testing.assert_close(_get(lm.model, FINAL_NORM[name])(last), hs[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_early_exit_and_splice(family_dirs, tmp_path, name):
    lm = _load_family(family_dirs, name, tmp_path)
    ids = torch.randint(3, lm.model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = lm.bos_token_id
    clean = lm.logits_with_splice(ids, 0, "resid_post", None)
    assert clean.shape == (2, 10, lm.model.config.vocab_size)

    # Count calls of the layers after the hooked one: early exit must skip them.
    calls = {i: 0 for i in range(lm.n_layers)}
    handles = [
        blk.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, blk in enumerate(lm._layers)
    ]
    try:
        for hook in HOOK_TYPES:
            for layer in (0, lm.n_layers - 1):
                for k in calls:
                    calls[k] = 0
                early = lm.activations(ids, layer, hook)
                assert all(calls[i] == 0 for i in range(layer + 1, lm.n_layers)), (hook, layer, calls)

                seen = []
                ident = lm.logits_with_splice(ids, layer, hook, lambda a: seen.append(a.clone()) or a)  # noqa: B023
                assert torch.equal(early, seen[0]), f"early exit differs from full forward at {hook_name(layer, hook)}"
                assert torch.equal(ident, clean), f"identity splice changed logits at {hook_name(layer, hook)}"

                zeroed = lm.logits_with_splice(ids, layer, hook, torch.zeros_like)
                assert not torch.allclose(zeroed, clean), (
                    f"zero splice left logits unchanged at {hook_name(layer, hook)}"
                )
    finally:
        for h in handles:
            h.remove()


@pytest.mark.integration
@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_sae_splice_changes_only_downstream(family_dirs, tmp_path, name):
    """Splicing an SAE's reconstruction in at layer L leaves every block input up to L as it was
    and changes what comes after; splicing the original activation back gives the clean logits."""
    from sae_sweep.sae.topk import TopKSAE

    lm = _load_family(family_dirs, name, tmp_path)
    ids = torch.randint(3, lm.model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = lm.bos_token_id
    sae = TopKSAE(lm.d_model, 4 * lm.d_model, k=4, generator=torch.Generator().manual_seed(0))

    def block_io(fn, layer, hook):
        ins, outs = {}, {}
        # Registered before the splice, so a resid_pre splice at L shows up in block L's output only.
        handles = [
            blk.register_forward_pre_hook(lambda m, a, i=i: ins.__setitem__(i, a[0].clone()))
            for i, blk in enumerate(lm._layers)
        ]
        handles += [
            blk.register_forward_hook(
                lambda m, a, o, i=i: outs.__setitem__(i, (o if torch.is_tensor(o) else o[0]).clone())
            )
            for i, blk in enumerate(lm._layers)
        ]
        try:
            logits = lm.logits_with_splice(ids, layer, hook, fn)
        finally:
            for h in handles:
                h.remove()
        return logits, ins, outs

    clean, clean_in, clean_out = block_io(None, 0, "resid_post")
    for hook in HOOK_TYPES:
        for layer in range(lm.n_layers):
            spliced, ins, outs = block_io(lambda a: sae(a)[0], layer, hook)
            for i in range(layer + 1):
                assert torch.equal(ins[i], clean_in[i]), (hook, layer, i)
            # (A resid_post splice replaces block L's output after the capture hook saw it.)
            for i in range(layer + (hook == "resid_post"), lm.n_layers):
                assert not torch.allclose(outs[i], clean_out[i]), (hook, layer, i)
            assert not torch.allclose(spliced, clean)
            assert torch.equal(lm.logits_with_splice(ids, layer, hook, lambda a: a.clone()), clean)


@pytest.mark.integration
def test_bad_hook_and_layer(family_dirs, tmp_path):
    lm = _load_family(family_dirs, "gpt2", tmp_path)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="hook="):
        lm.activations(ids, 0, "resid_mid")
    with pytest.raises(ValueError, match="layer=3"):
        lm.activations(ids, 3, "resid_post")


@pytest.mark.integration
def test_fingerprint_and_shape_of_local_dir(family_dirs, tmp_path):
    cfg = ModelConfig(name="llama-rand", hf_id=str(family_dirs["llama"]), dtype="float32", n_layers=99, d_model=1)
    assert model_shape(cfg, tmp_path) == (3, 32)  # from config.json, not the yaml values
    lm = load_lm(cfg, tmp_path, "cpu")
    fp = lm.fingerprint
    assert fp["path"] == str(family_dirs["llama"].resolve())
    assert fp["dtype"] == "float32" and fp["family"] == "llama"
    assert len(fp["config_hash"]) == 16 and len(fp["tokenizer_hash"]) == 16
    assert lm.bos_token_id != lm.eos_token_id
    assert {lm.bos_token_id, lm.eos_token_id, lm.pad_token_id} <= set(lm.special_token_ids)
    lm16 = load_lm(dataclasses.replace(cfg, dtype="bfloat16"), tmp_path, "cpu")
    assert lm16.dtype == torch.bfloat16 and lm16.fingerprint["dtype"] == "bfloat16"
    assert lm16.fingerprint["tokenizer_hash"] == fp["tokenizer_hash"]


@pytest.mark.unit
def test_dtype_resolution():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="model.dtype"):
        resolve_dtype("int8", "cpu")


@pytest.mark.unit
def test_offline_hub_model_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty HF cache
    cfg = ModelConfig(
        name="pythia-70m", hf_id="EleutherAI/pythia-70m", revision="step143000", n_layers=6, d_model=512, dtype="auto"
    )
    assert model_shape(cfg, tmp_path) == (6, 512)  # falls back to the yaml values
    t0 = time.time()
    with pytest.raises(ModelUnavailable) as err:
        load_lm(cfg, tmp_path, "cpu")
    assert time.time() - t0 < 30
    assert "EleutherAI/pythia-70m" in str(err.value) and "model.hf_id=/path/to/local/dir" in str(err.value)
    with pytest.raises(ModelUnavailable):
        resolve(cfg, tmp_path)
    with pytest.raises(ModelUnavailable, match="no such local directory"):
        load_lm(ModelConfig(name="x", hf_id=str(tmp_path / "missing")), tmp_path, "cpu")


# The tiny model
@pytest.mark.integration
def test_tiny_is_built_once_and_loads_like_a_hub_model(tiny_lm, tiny_cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    path = builtin.tiny_model_dir(tiny_cache_dir)
    assert path.name == tiny.TINY_VERSION
    assert (tiny_lm.n_layers, tiny_lm.d_model) == (4, 128)  # conf/model/tiny.yaml
    assert model_shape(ModelConfig(hf_id="builtin:tiny"), tiny_cache_dir) == (4, 128)
    assert isinstance(tiny_lm.model, GPT2LMHeadModel)
    assert 0.9 * tiny.TINY_VOCAB <= len(tiny_lm.tokenizer) <= tiny.TINY_VOCAB + 2
    assert tiny_lm.tokenizer.eos_token == "<|endoftext|>" and tiny_lm.tokenizer.bos_token == "<|endoftext|>"
    assert tiny_lm.tokenizer.pad_token is not None and tiny_lm.pad_token_id != tiny_lm.eos_token_id
    assert tiny_lm.fingerprint["weights_sha256"] == weights_sha256(path, tiny_cache_dir)  # from the files
    assert "path" not in tiny_lm.fingerprint  # cache keys must survive a moved cache_dir

    # The second load reuses the build (no rebuild: same directory, same files).
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    t0 = time.time()
    again = load_lm(ModelConfig(name="tiny", hf_id="builtin:tiny", dtype="auto"), tiny_cache_dir, "cpu")
    assert time.time() - t0 < 20
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert again.fingerprint == tiny_lm.fingerprint
    # Nothing of ours is left behind. Other xdist workers share this cache and may hold the lock
    # for a moment (a waiter takes it, sees the build complete, releases it), so only our pid counts.
    v = tiny.TINY_VERSION
    assert not list(path.parent.glob(f".{v}.tmp-{socket.gethostname()}-{os.getpid()}-*"))
    owner = read_owner(path.parent / f"{v}.lock")
    assert owner is None or owner.get("pid") != os.getpid(), owner

    # Plain HF loading works on the directory.
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("hello world")["input_ids"] == tiny_lm.tokenizer("hello world")["input_ids"]
    for a, b in zip(model.state_dict().values(), tiny_lm.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.integration
def test_tiny_has_learned_text(tiny_lm, tiny_cache_dir):
    info = json.loads((builtin.tiny_model_dir(tiny_cache_dir) / "build_info.json").read_text())
    # Held-out loss well below the unigram entropy: it uses context, not just token frequencies.
    assert info["eval_loss"] < info["unigram_entropy"] - 0.5, info

    torch.manual_seed(0)
    bos = torch.full((8, 1), tiny_lm.bos_token_id, dtype=torch.long)
    out = tiny_lm.model.generate(
        bos, do_sample=True, top_k=0, top_p=0.9, max_new_tokens=64, pad_token_id=tiny_lm.pad_token_id
    )
    text = " ".join(tiny_lm.tokenizer.decode(o[1:], skip_special_tokens=True) for o in out)
    words = text.split()
    assert len(words) > 80
    # Mostly real words from the corpus vocabulary (a random-weight model scores near 0 here).
    from sae_sweep.data.corpus import builtin_documents

    vocab = {w.strip(".,:;()[]'\"`").lower() for d in builtin_documents(tiny_cache_dir) for w in d.split()}
    known = sum(w.strip(".,:;()[]'\"`").lower() in vocab for w in words) / len(words)
    assert known > 0.5, (known, text[:500])


@pytest.mark.integration
def test_weights_load_straight_onto_the_device(tiny_cache_dir, monkeypatch):
    """On a GPU from_pretrained places the weights as it reads them (device_map), so a model never
    passes through host memory; forced on the CPU, that route loads the same model."""
    import sae_sweep.models.lm as lm_mod

    assert lm_mod.placement(torch.device("cpu")) == {}
    assert lm_mod.placement(torch.device("cuda")) == {"device_map": {"": "cuda:0"}}
    assert lm_mod.placement(torch.device("cuda:1")) == {"device_map": {"": "cuda:1"}}
    cfg = ModelConfig(name="tiny", hf_id="builtin:tiny")
    plain = load_lm(cfg, tiny_cache_dir, "cpu")
    monkeypatch.setattr(lm_mod, "placement", lambda dev: {"device_map": {"": "cpu"}})
    mapped = load_lm(cfg, tiny_cache_dir, "cpu")
    ids = torch.tensor([[plain.bos_token_id, 5, 6, 7, 8]])
    assert torch.equal(plain.logits_with_splice(ids, 1, "resid_post"), mapped.logits_with_splice(ids, 1, "resid_post"))
