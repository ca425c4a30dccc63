"""SAEs saved by other libraries, loaded as this project's SAE classes with each library's encoding.

``load_peer_sae(path)`` reads a folder written by

* **SAELens** (``cfg.json`` + ``sae_weights.safetensors``; ``SAE.save_model``): architectures
  ``standard`` (ReLU), ``topk`` and ``jumprelu`` (``relu(pre) * (pre > threshold)``). With
  ``apply_b_dec_to_input=false`` SAELens encodes ``x @ W_enc + b_enc``; that is folded into the
  encoder bias (``b_enc + b_dec @ W_enc``) so the SAE here, which always centres on ``b_dec``, gives
  the same pre-activations. Only ``normalize_activations="none"`` is accepted: the other modes
  scale each input by a statistic the folder does not hold (``expected_average_only_in``) or
  renormalise per token (``constant_norm_rescale``, ``layer_norm``), and a silent mismatch would
  change every latent;
* **sparsify** (``cfg.json`` + ``sae.safetensors``; ``SparseCoder.save_to_disk``): a TopK of
  ``relu(encoder(x - b_dec))``, decoded from ``W_dec`` and ``b_dec``;
* **dictionary_learning** (``ae.pt`` + ``config.json``): ``AutoEncoderTopK`` (TopK of
  ``relu(encoder(x - b_dec))``, decoder ``decoder.weight.T``), ``BatchTopKSAE`` (its threshold rule
  at inference) and ``AutoEncoder`` (ReLU of ``encoder(x - bias)``).

TopK: the libraries take the top k of the ReLU'd pre-activations, this project's TopK the top k
of the pre-activations then ReLU; the codes are identical. Returns the SAE and a record of what
was read (library, source architecture, hook name when the folder names one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import torch

from .autoencoder import SparseAutoencoder
from .registry import get_sae_class

__all__ = ["PeerFormatError", "detect_format", "load_peer_sae"]

FORMATS = ("saelens", "sparsify", "dictionary_learning")


class PeerFormatError(ValueError):
    """A folder that is not an SAE this module can load as its library encodes it, with the reason."""


def detect_format(path: Path) -> str:
    """Which library wrote ``path``, from the files each one writes."""
    path = Path(path)
    if (path / "sae_weights.safetensors").is_file() and (path / "cfg.json").is_file():
        return "saelens"
    if (path / "ae.pt").is_file() and (path / "config.json").is_file():
        return "dictionary_learning"
    if (path / "sae.safetensors").is_file() and (path / "cfg.json").is_file():
        cfg = json.loads((path / "cfg.json").read_text())
        if "architecture" in cfg and "run_key" in cfg:
            raise PeerFormatError(f"{path} is an SAE saved by sae_sweep itself: evaluate its run instead")
        return "sparsify"
    raise PeerFormatError(
        f"{path}: not an SAE folder of a known library; expected SAELens (cfg.json + sae_weights.safetensors), "
        f"sparsify (cfg.json + sae.safetensors) or dictionary_learning (ae.pt + config.json)"
    )


def _build(
    architecture: str, d_in: int, d_sae: int, state: Mapping[str, torch.Tensor], **extra: Any
) -> SparseAutoencoder:
    dtype = state["W_enc"].dtype
    sae = get_sae_class(architecture)(d_in, d_sae, dtype=dtype, **extra)
    sae.load_state_dict(dict(state), strict=True)
    return sae.eval()


def _log_threshold(threshold: torch.Tensor) -> torch.Tensor:
    # relu(pre) * (pre > t) == pre * (pre > max(t, 0+)): a threshold <= 0 keeps every positive value
    tiny = torch.finfo(threshold.dtype).tiny
    return threshold.clamp_min(tiny).log()


def _load_saelens(path: Path) -> Tuple[SparseAutoencoder, Dict[str, Any]]:
    from safetensors.torch import load_file

    cfg = json.loads((path / "cfg.json").read_text())
    arch = cfg.get("architecture", "standard")
    norm = cfg.get("normalize_activations", "none")
    if norm != "none":
        raise PeerFormatError(
            f"{path}: normalize_activations={norm!r}; only 'none' can be loaded (fold the scaling into the weights "
            f"first, as SAELens' fold_activation_norm_scaling_factor does)"
        )
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise PeerFormatError(f"{path}: rescale_acts_by_decoder_norm=true is not supported")
    w = load_file(str(path / "sae_weights.safetensors"))
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    b_enc = w["b_enc"]
    if not cfg.get("apply_b_dec_to_input", True):  # SAELens: pre = x @ W_enc + b_enc
        b_enc = b_enc + w["b_dec"] @ w["W_enc"]
    state = {"W_enc": w["W_enc"], "b_enc": b_enc, "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    if arch == "standard":
        sae = _build("relu", d_in, d_sae, state)
    elif arch == "topk":
        sae = _build("topk", d_in, d_sae, state, k=int(cfg["k"]))
    elif arch == "jumprelu":
        sae = _build("jumprelu", d_in, d_sae, {**state, "log_threshold": _log_threshold(w["threshold"])})
    else:
        raise PeerFormatError(f"{path}: SAELens architecture {arch!r}; allowed: standard, topk, jumprelu")
    meta = cfg.get("metadata") or {}
    return sae, {"library": "saelens", "architecture": arch, "hook_name": meta.get("hook_name") or cfg.get("hook_name")}


def _load_sparsify(path: Path) -> Tuple[SparseAutoencoder, Dict[str, Any]]:
    from safetensors.torch import load_file

    cfg = json.loads((path / "cfg.json").read_text())
    w = load_file(str(path / "sae.safetensors"))
    if cfg.get("transcode") or "W_skip" in w:
        raise PeerFormatError(f"{path}: a sparsify transcoder (or skip connection) is not an SAE of its input")
    enc_w, enc_b = w["encoder.weight"], w["encoder.bias"]  # [d_sae, d_in], [d_sae]
    d_sae, d_in = enc_w.shape
    state = {"W_enc": enc_w.T.contiguous(), "b_enc": enc_b, "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    sae = _build("topk", int(d_in), int(d_sae), state, k=int(cfg["k"]))
    return sae, {"library": "sparsify", "architecture": "topk", "hook_name": None}


def _load_dictionary_learning(path: Path) -> Tuple[SparseAutoencoder, Dict[str, Any]]:
    cfg = json.loads((path / "config.json").read_text()).get("trainer", {})
    cls = cfg.get("dict_class")
    if cls not in ("AutoEncoderTopK", "BatchTopKSAE", "AutoEncoder"):
        raise PeerFormatError(
            f"{path}: dictionary_learning dict_class {cls!r}; allowed: AutoEncoderTopK, BatchTopKSAE, AutoEncoder"
        )
    w = torch.load(path / "ae.pt", map_location="cpu", weights_only=True)
    # Linear encoder [d_sae, d_in] and bias-free decoder [d_in, d_sae]; the decoder bias is `b_dec`
    # (AutoEncoder: `bias`), subtracted from the input before encoding in all three
    enc_w = w["encoder.weight"]
    d_sae, d_in = (int(n) for n in enc_w.shape)
    state = {
        "W_enc": enc_w.T.contiguous(),
        "b_enc": w["encoder.bias"],
        "W_dec": w["decoder.weight"].T.contiguous(),
        "b_dec": w["bias"] if cls == "AutoEncoder" else w["b_dec"],
    }
    if cls == "AutoEncoder":
        sae = _build("relu", d_in, d_sae, state)
    else:
        k = int(w["k"]) if "k" in w else int(cfg["k"])
        if cls == "AutoEncoderTopK":
            sae = _build("topk", d_in, d_sae, state, k=k)
        else:  # inference: relu(pre) * (relu(pre) > threshold), the learned threshold
            threshold = w["threshold"].reshape(())
            if not math.isfinite(float(threshold)) or float(threshold) < 0:
                raise PeerFormatError(f"{path}: BatchTopKSAE without a calibrated threshold ({float(threshold)})")
            sae = _build("batchtopk", d_in, d_sae, {**state, "threshold": threshold.float()}, k=k)
    hook = cfg.get("submodule_name")
    return sae, {"library": "dictionary_learning", "architecture": cls, "hook_name": hook}


def load_peer_sae(path: str | Path) -> Tuple[SparseAutoencoder, Dict[str, Any]]:
    """The SAE in ``path`` (a folder one of SAELens, sparsify, dictionary_learning wrote) and a record
    of what was read: ``library``, ``architecture`` (the library's name for it), ``hook_name``."""
    path = Path(path)
    if not path.is_dir():
        raise PeerFormatError(f"{path}: not a folder")
    fmt = detect_format(path)
    loader = {"saelens": _load_saelens, "sparsify": _load_sparsify, "dictionary_learning": _load_dictionary_learning}
    try:
        sae, meta = loader[fmt](path)
    except KeyError as e:
        raise PeerFormatError(f"{path}: {fmt} folder without {e} in its weights or config") from None
    return sae, {**meta, "path": str(path)}
