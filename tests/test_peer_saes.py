"""SAEs written by SAELens, sparsify and dictionary_learning with their own code
(tests/data/peer_saes/make_fixtures.py), loaded here: the same latents and reconstruction as the
library's own encode/decode gave on the same inputs (stored beside each SAE)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_sweep.sae.peer_formats import PeerFormatError, detect_format, load_peer_sae

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parent / "data" / "peer_saes"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())


def test_every_library_has_a_fixture():
    libraries = {c.split("_")[0] for c in CASES}
    assert {"saelens", "sparsify", "dictionary"} <= libraries, CASES


@pytest.mark.parametrize("case", CASES)
def test_peer_sae_encodes_and_decodes_as_its_library(case):
    sae, meta = load_peer_sae(FIXTURES / case)
    ref = load_file(str(FIXTURES / case / "reference.safetensors"))
    with torch.no_grad():
        x_hat, f = sae(ref["x"])
    assert (f != 0).sum() > 0 and meta["library"] in case.replace("dictionary_learning", "dictionary_learning")
    torch.testing.assert_close(f, ref["f"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, ref["x_hat"], rtol=1e-5, atol=1e-5)


def test_saelens_hook_name_is_read():
    _, meta = load_peer_sae(FIXTURES / "saelens_topk")
    assert meta["hook_name"] == "blocks.1.hook_resid_post" and meta["architecture"] == "topk"


def test_unloadable_folders_are_refused_with_the_reason(tmp_path):
    with pytest.raises(PeerFormatError, match="not an SAE folder of a known library"):
        detect_format(tmp_path)
    scaled = tmp_path / "scaled"
    shutil.copytree(FIXTURES / "saelens_topk", scaled)
    cfg = json.loads((scaled / "cfg.json").read_text())
    (scaled / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "expected_average_only_in"}))
    with pytest.raises(PeerFormatError, match="normalize_activations='expected_average_only_in'"):
        load_peer_sae(scaled)
    other = tmp_path / "other"
    shutil.copytree(FIXTURES / "saelens_topk", other)
    (other / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(PeerFormatError, match="allowed: standard, topk, jumprelu"):
        load_peer_sae(other)


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_an_exported_sae_loads_back_with_the_same_outputs(arch, tmp_path):
    """sae_sweep.export writes SAELens' layout; read back as SAELens encodes it, the SAE is the same."""
    from sae_sweep.cli.export import export_sae
    from sae_sweep.sae import get_sae_class

    torch.manual_seed(0)
    sae = get_sae_class(arch)(16, 48, **({"k": 5} if arch == "topk" else {})).eval()
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(20, 16)
    with torch.no_grad():
        want = sae(x)
    out = export_sae(sae, {"architecture": arch, "d_in": 16, "d_sae": 48, "k": 5}, tmp_path / arch)
    loaded, meta = load_peer_sae(out)
    assert meta["library"] == "saelens"
    with torch.no_grad():
        got = loaded(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
