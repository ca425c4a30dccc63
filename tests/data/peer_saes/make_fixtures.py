"""Write the peer-library SAE fixtures that tests/test_peer_saes.py loads, with each library's OWN code.

Each fixture folder holds the SAE exactly as its library saves it, plus ``reference.safetensors``:
inputs ``x`` [32, d_in] and the library's own ``f = encode(x)`` and ``x_hat = decode(f)``. Run it in a
virtual environment that has the library (the bench's peer venvs, ``make bench-peers``; SAELens from
the index), from this folder:

    <venv with sae-lens==6.54.12>/bin/python make_fixtures.py saelens
    bench_results/venvs/sparsify/bin/python make_fixtures.py sparsify
    bench_results/venvs/dictionary_learning/bin/python make_fixtures.py dictionary_learning
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
D_IN, D_SAE, K = 16, 48, 5


def _randomise(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _reference(out: Path, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
    save_file(
        {"x": x.contiguous(), "f": f.detach().contiguous(), "x_hat": x_hat.detach().contiguous()},
        str(out / "reference.safetensors"),
    )


def _inputs(seed: int = 7) -> torch.Tensor:
    return torch.randn(32, D_IN, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def saelens() -> None:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    common = dict(d_in=D_IN, d_sae=D_SAE, dtype="float32", device="cpu", normalize_activations="none")
    for name, sae in (
        ("saelens_topk", TopKSAE(TopKSAEConfig(k=K, apply_b_dec_to_input=True, **common))),
        ("saelens_standard_no_b_dec_in", StandardSAE(StandardSAEConfig(apply_b_dec_to_input=False, **common))),
        ("saelens_jumprelu", JumpReLUSAE(JumpReLUSAEConfig(apply_b_dec_to_input=True, **common))),
    ):
        _randomise([sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec], seed=len(name))
        if name == "saelens_jumprelu":
            with torch.no_grad():
                sae.threshold.copy_(torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)) * 1.5)
        sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
        out = HERE / name
        out.mkdir(exist_ok=True)
        sae.save_model(out)
        x = _inputs()
        with torch.no_grad():
            f = sae.encode(x)
            _reference(out, x, f, sae.decode(f))
        print("wrote", out)


def sparsify() -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K), device="cpu", dtype=torch.float32)
    _randomise([sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec], seed=11)
    out = HERE / "sparsify_topk"
    sae.save_to_disk(out)
    x = _inputs()
    with torch.no_grad():
        top_acts, top_indices, _pre = sae.encode(x)
        f = torch.zeros(x.shape[0], D_SAE).scatter(-1, top_indices, top_acts)
        _reference(out, x, f, sae.decode(top_acts, top_indices))
    print("wrote", out)


def dictionary_learning() -> None:
    import json

    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    ae = AutoEncoderTopK(D_IN, D_SAE, K)
    _randomise([ae.encoder.weight, ae.encoder.bias, ae.decoder.weight, ae.b_dec], seed=13)
    out = HERE / "dictionary_learning_topk"
    out.mkdir(exist_ok=True)
    torch.save(ae.state_dict(), out / "ae.pt")
    # the trainer's config as dictionary_learning's training loop writes it next to ae.pt
    trainer_cfg = {
        "dict_class": "AutoEncoderTopK",
        "trainer_class": "TopKTrainer",
        "activation_dim": D_IN,
        "dict_size": D_SAE,
        "k": K,
        "layer": 1,
        "lm_name": "tiny",
        "submodule_name": "resid_post_layer_1",
    }
    (out / "config.json").write_text(json.dumps({"trainer": trainer_cfg}, indent=2))
    x = _inputs()
    with torch.no_grad():
        f = ae.encode(x)
        _reference(out, x, f, ae.decode(f))
    print("wrote", out)


if __name__ == "__main__":
    {"saelens": saelens, "sparsify": sparsify, "dictionary_learning": dictionary_learning}[sys.argv[1]]()
