"""Which evals exist, and the one signature a job calls them with.

Each eval module exposes a function taking an ``EvalContext`` and returning an ``EvalOutput``;
this registry maps the names users put in ``eval.run`` to those functions, imported lazily so a
job only pays for the evals it runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

# name -> "module:function"; the function takes an EvalContext and returns an EvalOutput.
_EVALS: Dict[str, str] = {
    "core": "sae_sweep.evals.registry:_core",
    "recovery": "sae_sweep.evals.recovery:run_from_context",
    "absorption": "sae_sweep.evals.absorption:run",
    "sparse_probing": "sae_sweep.evals.sparse_probing:run",
    "fake_features": "sae_sweep.evals.fake_features:run",
    "downstream": "sae_sweep.evals.downstream:run",
}


@dataclass
class EvalContext:
    """What a job hands every eval. ``settings`` is the eval's own node of ``eval.<name>``."""

    lm: Any                      # sae_sweep.lm.LanguageModel (None for synthetic activations)
    sae: torch.nn.Module
    tokens: Optional[torch.Tensor]  # held-out token windows [N, ctx] (never training tokens)
    layer: int
    hook: str
    seed: int
    settings: Dict[str, Any] = field(default_factory=dict)
    sae_cfg: Dict[str, Any] = field(default_factory=dict)
    cache_dir: Optional[str] = None
    progress: bool = True
    # dataset=synthetic only: held-out activations [N, d] and the planted dictionary
    activations: Optional[torch.Tensor] = None
    planted: Any = None


def register_eval(name: str, target: str) -> None:
    _EVALS[name] = target


def eval_names() -> List[str]:
    return sorted(_EVALS)


def get_eval(name: str) -> Callable[[EvalContext], Any]:
    if name not in _EVALS:
        raise ValueError(f"eval {name!r} is unknown: allowed values are {', '.join(eval_names())}")
    module, func = _EVALS[name].split(":")
    return getattr(importlib.import_module(module), func)


def _core(ctx: EvalContext) -> Any:
    from sae_sweep.evals.core import run_core_eval

    tokens = ctx.tokens
    n_tokens = ctx.settings.get("n_tokens")
    if n_tokens:  # evaluate on the first ceil(n_tokens / ctx) held-out windows
        n_seqs = max(1, -(-int(n_tokens) // tokens.shape[1]))
        tokens = tokens[:n_seqs]
    return run_core_eval(ctx.lm, ctx.sae, tokens, ctx.layer, ctx.hook,
                         batch_size=int(ctx.settings.get("batch_size", 16)),
                         special_token_ids=ctx.lm.special_token_ids, progress=ctx.progress,
                         feature_details=bool(ctx.settings.get("feature_details", True)),
                         weight_metrics=bool(ctx.settings.get("weight_metrics", True)))


def eval_settings_errors(name: str, settings: Any) -> List[str]:
    """Unknown keys in ``eval.<name>`` as messages (evals that declare a DEFAULTS dict)."""
    module = importlib.import_module(_EVALS[name].split(":")[0])
    defaults = getattr(module, "DEFAULTS", None)
    if defaults is None or settings is None:
        return []
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        return [f"eval.{name}: unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(defaults))}"]
    return []
