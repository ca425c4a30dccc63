"""``builtin:tiny``: the offline tiny model, built from its recipe (``models/tiny.py``) once per
machine into ``<cache_dir>/models/<TINY_VERSION>/`` and then loaded like any ``save_pretrained``
directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

from sae_sweep.config import ModelConfig
from sae_sweep.models import tiny
from sae_sweep.models.weights.base import ModelUnavailable, ResolvedWeights, WeightsSource, register_weights
from sae_sweep.util.build import build_once

__all__ = ["TINY_HF_ID", "tiny_model_dir", "ensure_tiny"]

TINY_HF_ID = "builtin:tiny"


def tiny_model_dir(cache_dir: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(str(cache_dir))) / "models" / tiny.TINY_VERSION


def _ready(path: Path) -> Optional[Path]:
    # build_info.json is written last, and the directory only appears by an atomic rename.
    return path if (path / "build_info.json").is_file() else None


def ensure_tiny(cache_dir: str | os.PathLike) -> Path:
    """The tiny model's directory, built once per machine (``util.build.build_once``)."""
    return build_once(tiny_model_dir(cache_dir), lambda tmp: tiny.build(tmp, cache_dir), ready=_ready)[0]


@register_weights("builtin", reads="builtin")
class Builtin(WeightsSource):
    def locate(self, model: ModelConfig) -> str:
        if model.hf_id != TINY_HF_ID:
            raise ModelUnavailable(f"model.hf_id={model.hf_id!r}: the only built-in model is {TINY_HF_ID!r}")
        return model.hf_id

    def directory(self, model: ModelConfig, where: str, cache_dir: Path) -> Optional[Path]:
        return tiny_model_dir(cache_dir)

    def config_json(self, r: ResolvedWeights) -> Optional[dict]:
        # not built yet: the recipe fixes the shape
        return super().config_json(r) or {"n_layer": tiny.TINY_ARCH["n_layer"], "n_embd": tiny.TINY_ARCH["n_embd"]}

    def prepare(self, r: ResolvedWeights) -> Path:
        return ensure_tiny(r.cache_dir)

    def fingerprint(self, r: ResolvedWeights, path: Path) -> Dict[str, Any]:
        # No path: a moved cache_dir must not change cache keys. The weights themselves are hashed
        # by load_lm (weights_sha256), not read from build_info.json, which could go stale.
        return {"hf_id": r.where, "build": tiny.TINY_VERSION}
