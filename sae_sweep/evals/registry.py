"""Which evals exist, their settings, and the one signature a job calls them with.

Each eval module decorates its entry point with ``@register_eval(name, SettingsDataclass, METRICS)``:
the name users put in ``eval.run``, the schema of ``eval.<name>`` (registered with
``sae_sweep.config.register_schema``, so a bad setting fails at validation like any other key), and
the metrics the eval logs, declared beside its code (:class:`sae_sweep.util.metrics.Metric`; keys
are the flattened ``<name>/<category>/<metric>`` names a job logs). The package ``__init__`` imports
every eval module so that the decorators run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from sae_sweep.config import parse, register_schema
from sae_sweep.util.metrics import Metric


@dataclass
class EvalContext:
    """What a job hands every eval. ``settings`` is the eval's node ``eval.<name>`` (a mapping or
    an instance of its settings dataclass)."""

    lm: Any  # sae_sweep.models.lm.LanguageModel (None for synthetic activations)
    sae: torch.nn.Module
    tokens: Optional[torch.Tensor]  # held-out token windows [N, ctx] (never training tokens)
    layer: int
    hook: str
    seed: int
    settings: Any = None
    sae_cfg: Dict[str, Any] = field(default_factory=dict)
    cache_dir: Optional[str] = None
    progress: bool = True
    # dataset=synthetic only: held-out activations [N, d] and the planted dictionary
    activations: Optional[torch.Tensor] = None
    planted: Any = None
    # the outputs of the evals this job ran before this one, by eval name (e.g. the dashboards show
    # the fake features when fake_features ran first)
    earlier: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalSpec:
    name: str
    run: Callable[[EvalContext], Any]  # -> EvalOutput
    settings: type
    metrics: Tuple[Metric, ...]  # what the eval logs, flattened with prefix ``name``


_EVALS: Dict[str, EvalSpec] = {}


def check_eval_metrics(name: str, metrics: Sequence[Metric]) -> Tuple[Metric, ...]:
    """The declarations of eval ``name`` as a tuple, after checking that each is a
    ``<name>/<category>/<metric>`` key (what ``flatten_metrics(output, prefix=name)`` logs) and
    that no key is declared twice."""
    metrics = tuple(metrics)
    if not metrics:
        raise ValueError(f"eval {name!r} declares no metrics: list what it logs (sae_sweep.util.metrics.Metric)")
    seen = set()
    for m in metrics:
        if not isinstance(m, Metric):
            raise TypeError(f"eval {name!r}: {m!r} is not a Metric")
        parts = m.key.split("/")
        if parts[0] != name or len(parts) != 3 or not all(parts):
            raise ValueError(f"eval {name!r}: metric key {m.key!r} must read '{name}/<category>/<metric>'")
        if m.key in seen:
            raise ValueError(f"eval {name!r}: metric {m.key!r} is declared twice")
        seen.add(m.key)
    return metrics


def register_eval(name: str, settings: type, metrics: Sequence[Metric]) -> Callable:
    """Function decorator: make ``fn(EvalContext) -> EvalOutput`` available as ``eval.run: [name]``
    with ``settings`` (a dataclass) as the schema of ``eval.<name>`` and ``metrics`` as the
    declarations of what it logs."""
    declared = check_eval_metrics(name, metrics)

    def deco(fn: Callable) -> Callable:
        _EVALS[name] = EvalSpec(name, fn, settings, declared)
        register_schema("eval", name, settings)
        return fn

    return deco


def eval_names() -> List[str]:
    return sorted(_EVALS)


def eval_metrics(name: str) -> Tuple[Metric, ...]:
    """The metrics eval ``name`` declares."""
    return get_eval(name).metrics


def get_eval(name: str) -> EvalSpec:
    if name not in _EVALS:
        raise ValueError(f"eval {name!r} is unknown: allowed values are {', '.join(eval_names())}")
    return _EVALS[name]


def settings_dict(cls: type, node: Any, key: str) -> Dict[str, Any]:
    """An eval's settings node checked against its dataclass, defaults filled in, as a dict (what
    the eval reads, and what its SAEBench JSON records as its config)."""
    return dataclasses.asdict(parse(cls, node, key))
