"""A Hugging Face Hub model id (``org/name``) at ``model.revision``: from the local HF cache when it
is there (no network), else from the hub unless HF_HUB_OFFLINE is set."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from sae_sweep.config import ModelConfig
from sae_sweep.models.weights.base import (
    Loaded,
    ModelUnavailable,
    ResolvedWeights,
    WeightsSource,
    read_json,
    register_weights,
    unavailable_message,
)
from sae_sweep.util.hub import hub_offline

__all__ = ["hub_cached_config"]

_OFFLINE = "HF_HUB_OFFLINE is set and it is not in the HF cache"


def hub_cached_config(hf_id: str, revision: Optional[str]) -> Optional[Path]:
    """config.json of a hub model if it is in the local HF cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(hf_id, "config.json", revision=revision or None)
    except Exception:
        return None
    return Path(path) if isinstance(path, str) else None


@register_weights("hub", reads="hub")
class Hub(WeightsSource):
    def check(self, model: ModelConfig, where: str, cache_dir: Path, timeout: float) -> None:
        revision = model.revision
        if hub_cached_config(where, revision) is not None:
            return
        if hub_offline("model"):
            raise ModelUnavailable(unavailable_message(where, revision, _OFFLINE))
        try:
            from huggingface_hub import HfApi

            HfApi().model_info(where, revision=revision or None, timeout=timeout)
        except Exception as e:  # network errors, repository not found, gated
            raise ModelUnavailable(unavailable_message(where, revision, f"{type(e).__name__}: {e}")) from e

    def config_json(self, r: ResolvedWeights) -> Optional[dict]:
        path = hub_cached_config(r.where, r.model.revision)
        return read_json(path) if path else None

    def load(self, r: ResolvedWeights, **from_pretrained: Any) -> Loaded:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ident, revision = r.where, r.model.revision

        def _load(**extra: Any):
            tok = AutoTokenizer.from_pretrained(ident, revision=revision, **extra)
            mdl = AutoModelForCausalLM.from_pretrained(ident, revision=revision, **from_pretrained, **extra)
            return tok, mdl

        # Cache first (fast, no network); then the hub unless we are offline.
        try:
            tokenizer, model = _load(local_files_only=True)
        except Exception as cached_err:
            if hub_offline("model"):
                raise ModelUnavailable(unavailable_message(ident, revision, _OFFLINE)) from cached_err
            try:
                tokenizer, model = _load()
            except Exception as e:
                raise ModelUnavailable(unavailable_message(ident, revision, f"{type(e).__name__}: {e}")) from e
        fingerprint = {"hf_id": ident, "revision": revision, "commit": getattr(model.config, "_commit_hash", None)}
        return Loaded(tokenizer, model, fingerprint, hub_cached_config(ident, revision))
