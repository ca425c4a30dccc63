"""Export to SAELens's layout: tensors named and shaped as SAELens expects, unit-norm decoder rows,
and SAELens's own encode/decode rule on the exported tensors reproduces SparseAutoencoder.load."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers.mlflow_store import tracker_at
from sae_sweep.cli.export import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, export_dir, export_run
from sae_sweep.cli.export import main as export_main
from sae_sweep.sae import SparseAutoencoder
from sae_sweep.sae.batchtopk import BatchTopKSAE
from sae_sweep.sae.jumprelu import JumpReLUSAE
from sae_sweep.sae.matryoshka import MatryoshkaSAE
from sae_sweep.sae.relu import ReLUSAE
from sae_sweep.sae.topk import TopKSAE

pytestmark = pytest.mark.unit

D_IN, D_SAE, K = 12, 48, 4
RUN_CFG = {
    "model_name": "tiny",
    "model_hf_id": "builtin:tiny",
    "hook_name": "blocks.2.hook_resid_post",
    "hook_layer": 2,
    "hook_type": "resid_post",
    "context_size": 64,
    "dataset_path": "builtin",
    "seed": 42,
    "dtype": "float32",
    "device": "cpu",
    "run_key": "abc123",
}


def _randomise(sae: SparseAutoencoder, seed: int) -> SparseAutoencoder:
    """Trained-looking parameters: non-zero biases, thresholds near the pre-activation scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=g))
        sae.b_dec.copy_(0.5 * torch.randn(sae.b_dec.shape, generator=g))
        sae.normalize_decoder_()
    return sae


def make_saes():
    g = torch.Generator().manual_seed(0)
    topk = _randomise(TopKSAE(D_IN, D_SAE, K, generator=g), 1)
    relu = _randomise(ReLUSAE(D_IN, D_SAE, generator=g), 2)
    jump = _randomise(JumpReLUSAE(D_IN, D_SAE, generator=g, threshold_init=0.2), 3)
    with torch.no_grad():  # per-latent thresholds, and decoder rows that are NOT unit norm (folded on export)
        jump.log_threshold.copy_(torch.linspace(-3, 0, D_SAE))
        jump.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])
    btk = _randomise(BatchTopKSAE(D_IN, D_SAE, K, generator=g), 4)
    btk.threshold.fill_(0.35)
    btk_uncal = _randomise(BatchTopKSAE(D_IN, D_SAE, K, generator=g), 5)  # threshold < 0: per-token TopK
    mat_topk = _randomise(MatryoshkaSAE(D_IN, D_SAE, K, inner="topk", generator=g), 6)
    return {
        "topk": (topk, "topk"),
        "relu": (relu, "standard"),
        "jumprelu": (jump, "jumprelu"),
        "batchtopk": (btk, "jumprelu"),
        "batchtopk_uncalibrated": (btk_uncal, "topk"),
        "matryoshka_topk": (mat_topk, "topk"),
    }


def saelens_encode_decode(w: dict, cfg: dict, x: torch.Tensor):
    """SAELens's inference forward (standard / topk / jumprelu), written from its definition."""
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        f = pre.relu()
    elif cfg["architecture"] == "topk":
        k = cfg["activation_fn_kwargs"]["k"]
        vals, idx = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    elif cfg["architecture"] == "jumprelu":
        f = pre.relu() * (pre > w["threshold"])
    else:
        raise AssertionError(cfg["architecture"])
    return f, f @ w["W_dec"] + w["b_dec"]


def _clear_of_boundaries(sae, x, rel=1e-4):
    """The rows of x whose active latents do not change under a relative nudge of the input.

    The exported form computes the same thresholds in another order (e.g. folded decoder norms),
    so an input whose pre-activation sits within rounding of a threshold (or of a top-k tie) may
    fire in one form and not the other, depending on the CPU's rounding: such rows are left out.
    """
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        active = sae.encode(x) > 0
        stable = torch.ones(x.shape[0], dtype=torch.bool)
        for _ in range(4):
            nudged = x * (1 + rel * torch.randn(x.shape, generator=g))
            stable &= ((sae.encode(nudged) > 0) == active).all(dim=1)
    assert stable.float().mean() > 0.9, "most inputs must be clear of a threshold for the check to mean something"
    return x[stable]


def check_export(out_dir, original_dir, expected_arch):
    w = load_file(str(out_dir / SAE_WEIGHTS_FILENAME))
    cfg = json.loads((out_dir / SAE_CFG_FILENAME).read_text())
    assert cfg["architecture"] == expected_arch
    expected = {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}
    if expected_arch == "jumprelu":
        expected["threshold"] = (D_SAE,)
    assert {k: tuple(v.shape) for k, v in w.items()} == expected
    assert torch.allclose(w["W_dec"].norm(dim=1), torch.ones(D_SAE), atol=1e-5)
    for field in (
        "d_in",
        "d_sae",
        "dtype",
        "device",
        "model_name",
        "hook_name",
        "hook_layer",
        "hook_head_index",
        "activation_fn_str",
        "activation_fn_kwargs",
        "context_size",
        "dataset_path",
        "prepend_bos",
        "normalize_activations",
        "apply_b_dec_to_input",
        "finetuning_scaling_factor",
        "sae_lens_training_version",
        "neuronpedia_id",
        "model_from_pretrained_kwargs",
        "dataset_trust_remote_code",
    ):
        assert field in cfg, field
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["hook_name"], cfg["hook_layer"]) == (
        D_IN,
        D_SAE,
        "float32",
        "blocks.2.hook_resid_post",
        2,
    )
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    if expected_arch == "topk":
        assert cfg["activation_fn_str"] == "topk" and cfg["activation_fn_kwargs"] == {"k": K} and cfg["k"] == K
    else:
        assert cfg["activation_fn_str"] == "relu"

    ref = SparseAutoencoder.load(original_dir).eval()
    x = _clear_of_boundaries(ref, 2.0 * torch.randn(256, D_IN, generator=torch.Generator().manual_seed(7)))
    with torch.no_grad():
        f_ref = ref.encode(x)
        x_hat_ref, _ = ref(x)
        f, x_hat = saelens_encode_decode(w, cfg, x)
    assert (f > 0).sum(dim=1).float().mean() >= 1.0  # latents do fire: the comparison is not vacuous
    # the folded (jumprelu) latents are rescaled by the row norm; what a latent decodes to is not
    assert torch.equal(f > 0, f_ref > 0)
    assert torch.allclose(x_hat, x_hat_ref, atol=1e-5)
    assert torch.allclose(f @ w["W_dec"], f_ref @ ref.W_dec, atol=1e-5)
    return cfg


@pytest.mark.parametrize("name", list(make_saes()))
def test_export_dir_round_trip(tmp_path, name):
    sae, arch = make_saes()[name]
    src = sae.save(tmp_path / "sae", RUN_CFG)
    out = export_dir(src, tmp_path / "export")
    cfg = check_export(out, src, arch)
    assert cfg["sae_sweep"]["architecture"] == sae.architecture and cfg["model_name"] == "tiny"
    if name in ("topk", "relu", "batchtopk"):  # unit rows already: the code itself is unchanged
        w = load_file(str(out / SAE_WEIGHTS_FILENAME))
        with torch.no_grad():
            x = torch.randn(64, D_IN)
            f, _ = saelens_encode_decode(w, json.loads((out / SAE_CFG_FILENAME).read_text()), x)
            assert torch.allclose(f, SparseAutoencoder.load(src).eval().encode(x), atol=1e-5)


def test_export_from_mlflow_run_and_cli(tmp_path):
    tracker = tracker_at(tmp_path)
    sae, arch = make_saes()["topk"]
    src = sae.save(tmp_path / "sae", RUN_CFG)
    with tracker.child("export_test", "tiny_topk_run", "key-export", None) as run:
        run.log_artifact_dir(src, "sae")
    out = export_run(tracker, run.run_id, tmp_path / "from_run", model_name="gpt2")
    cfg = check_export(out, src, arch)
    assert cfg["model_name"] == "gpt2" and cfg["sae_sweep"]["run_id"] == run.run_id
    # the CLI, by run id with --tracking-uri, and by local directory
    assert export_main([run.run_id, str(tmp_path / "cli"), "--tracking-uri", tracker.uri]) == 0
    check_export(tmp_path / "cli", src, arch)
    assert export_main([str(src), str(tmp_path / "cli_dir")]) == 0
    check_export(tmp_path / "cli_dir", src, arch)
    assert export_main(["f" * 32, str(tmp_path / "nope"), "--tracking-uri", tracker.uri]) == 1


@pytest.mark.parametrize("name", ["topk", "relu", "jumprelu", "batchtopk"])
def test_activation_scaling_is_folded_into_the_saved_and_exported_weights(tmp_path, name):
    """An SAE trained on x * s (train.normalize_activations) is saved folded (SAELens's fold):
    loaded here, and exported and read by SAELens's rule, it maps RAW x to what it gave on the
    scaled x, unscaled. No loader applies anything: the export says normalize_activations none."""
    sae, arch = make_saes()[name]
    s = 0.37
    scaled = _clear_of_boundaries(sae.eval(), 2.0 * torch.randn(256, D_IN, generator=torch.Generator().manual_seed(7)))
    raw = scaled / s
    with torch.no_grad():
        x_hat_trained, f_trained = sae(scaled)
        expected = x_hat_trained / s
        sae.fold_activation_norm_scaling_factor_(s)
    src = sae.save(tmp_path / "sae", {**RUN_CFG, "norm_scaling_factor": s})
    out = export_dir(src, tmp_path / "export")
    cfg = json.loads((out / SAE_CFG_FILENAME).read_text())
    w = load_file(str(out / SAE_WEIGHTS_FILENAME))
    assert cfg["normalize_activations"] == "none" and cfg["sae_sweep"]["norm_scaling_factor"] == s
    assert torch.allclose(w["W_dec"].norm(dim=1), torch.ones(D_SAE), atol=1e-5)
    with torch.no_grad():
        x_hat_loaded, f_loaded = SparseAutoencoder.load(src).eval()(raw)
        f_export, x_hat_export = saelens_encode_decode(w, cfg, raw)
    assert (f_trained > 0).sum(dim=1).float().mean() >= 1.0  # latents fire: not vacuous
    assert torch.equal(f_loaded > 0, f_trained > 0) and torch.equal(f_export > 0, f_trained > 0)
    assert torch.allclose(x_hat_loaded, expected, rtol=1e-5, atol=1e-4)
    assert torch.allclose(x_hat_export, expected, rtol=1e-5, atol=1e-4)


def test_topk_with_rows_of_different_norms_is_refused(tmp_path):
    sae, _ = make_saes()["topk"]
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])
    src = sae.save(tmp_path / "sae", RUN_CFG)
    with pytest.raises(ValueError, match="top k"):
        export_dir(src, tmp_path / "out")
