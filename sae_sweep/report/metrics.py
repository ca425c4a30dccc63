"""Every declared metric, gathered from where it is declared, in one catalogue.

Declarations live beside the code that logs them: each eval's ``METRICS`` (registered with
``@register_eval``), the training loop's ``METRICS`` (``train/...``), the held-out curves'
``METRICS`` (``heldout/...``, ``evals/heldout.py``) and the cross-seed hook's
``METRICS`` (``crossseed/...``). The report reads labels, better directions and units from here;
``sae_sweep.report.metrics_doc`` renders the same catalogue as ``docs/metrics.md``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from sae_sweep.util.metrics import Metric, find_metric

__all__ = ["MetricGroup", "declared_metrics", "lookup", "metric_groups"]


@dataclass(frozen=True)
class MetricGroup:
    name: str  # the keys' first segment: an eval's name, "train" or "crossseed"
    title: str  # a heading for the docs
    source: str  # the module that declares (and logs) them
    metrics: Tuple[Metric, ...]


@functools.cache
def metric_groups() -> Tuple[MetricGroup, ...]:
    """The evals in name order, then training, then the cross-seed comparison."""
    from sae_sweep.evals import eval_names, get_eval, heldout
    from sae_sweep.report import crossseed
    from sae_sweep.training import loop

    groups = []
    for name in eval_names():
        spec = get_eval(name)
        groups.append(MetricGroup(name, f"Eval `{name}`", spec.run.__module__, spec.metrics))
    groups.append(MetricGroup("train", "Training", loop.__name__, loop.METRICS))
    groups.append(MetricGroup("heldout", "Held-out curves during training", heldout.__name__, heldout.METRICS))
    groups.append(MetricGroup("crossseed", "Cross-seed comparison", crossseed.__name__, crossseed.METRICS))
    seen: Dict[str, str] = {}
    for g in groups:
        for m in g.metrics:
            if m.key.split("/", 1)[0] != g.name:
                raise ValueError(f"{g.source}: metric {m.key!r} must start with {g.name + '/'!r}")
            if m.key in seen:
                raise ValueError(f"metric {m.key!r} is declared by {seen[m.key]} and {g.source}")
            seen[m.key] = g.source
    return tuple(groups)


def declared_metrics() -> Tuple[Metric, ...]:
    return tuple(m for g in metric_groups() for m in g.metrics)


@functools.lru_cache(maxsize=4096)
def lookup(key: str) -> Optional[Metric]:
    """The declaration of a logged key (a family's, for one of its members); None if undeclared."""
    group = key.split("/", 1)[0]
    for g in metric_groups():
        if g.name == group:
            return find_metric(key, g.metrics)
    return None
