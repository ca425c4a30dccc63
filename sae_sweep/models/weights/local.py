"""A local ``save_pretrained`` directory (``model.hf_id=/path/to/dir``): loaded from where it is."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

from sae_sweep.config import ModelConfig
from sae_sweep.models.weights.base import ModelUnavailable, ResolvedWeights, WeightsSource, read_json, register_weights


@register_weights("local", reads="path")
class Local(WeightsSource):
    def locate(self, model: ModelConfig) -> str:
        path = os.path.expanduser(str(model.hf_id))
        if not os.path.isdir(path):
            # Shaped like a path (hub ids are "name" or "org/name"), but not a directory.
            raise ModelUnavailable(f"model.hf_id={model.hf_id!r}: no such local directory")
        return str(Path(path).resolve())

    def directory(self, model: ModelConfig, where: str, cache_dir: Path) -> Optional[Path]:
        return Path(where)

    def config_json(self, r: ResolvedWeights) -> Optional[dict]:
        found = read_json(Path(r.where) / "config.json")
        if found is None:
            raise ModelUnavailable(f"model.hf_id={r.where!r}: directory has no readable config.json")
        return found

    def fingerprint(self, r: ResolvedWeights, path: Path) -> Dict[str, Any]:
        return {"path": r.where}
