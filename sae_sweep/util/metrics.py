"""The declaration of a logged metric: what its MLflow key means and which way is better.

Every stage that logs metrics declares them beside the code that logs them (each eval module next
to its ``run``, the training loop, the cross-seed hook). The sweep report reads label, direction
and unit from these declarations, and ``docs/metrics.md`` is generated from them
(``python -m sae_sweep.report.metrics_doc``). The type lives here, at the left end of the stage
order, so that every stage can declare with it.

A declaration's ``key`` is the flattened name as logged (``core/sparsity/l0``). A key whose code
logs a family of names (one per ``k`` of sparse probing, one per task of downstream probing)
holds placeholders: ``sparse_probing/sae/sae_top_{k}_test_accuracy``. Each placeholder has a fixed
pattern (:data:`PLACEHOLDERS`), so a family never swallows another declaration's key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Sequence, Tuple

__all__ = ["BETTER", "PLACEHOLDERS", "Metric", "find_metric"]

BETTER = ("higher", "lower", None)

# Placeholder -> the regular expression one segment of a key must match. Category names that an eval
# uses for its own aggregates (``mean``, ``flags``) are never a task.
PLACEHOLDERS: Dict[str, str] = {
    "k": r"\d+",  # sparse probing: latents / dimensions a probe may use
    "n": r"\d+",  # SCR / TPP: latents ablated
    "task": r"(?!(?:mean|flags)/)[^/]+",  # downstream probing: a task name as a category
    "group": r"[^/]+",  # cross-seed: the first 8 characters of a seed group
    "seed": r"[^/]+",  # cross-seed: the other run's seed tag
    "a": r"[^/_]+",  # cross-seed: the first seed of a pair
    "b": r"[^/_]+",  # cross-seed: the second seed of a pair
    "run": r"[0-9a-f]{8}",  # cross-seed: the other run's id, first 8 characters
}

_FIELD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Metric:
    """One logged metric (or one family of them, when ``key`` holds placeholders).

    key:       the MLflow key as logged, ``{placeholder}`` for the variable parts of a family
    label:     a short name for table headers and plot axes (may use the key's placeholders)
    better:    "higher", "lower", or None when neither is better (L0, a count, a setting)
    unit:      what the number counts, e.g. "fraction of latents", "nats per token"
    meaning:   what is computed, on what data, and why its better direction is what it is
    reference: whose definition it follows ("SAEBench 0.6.0 core", "FaithfulSAE", "this project (...)")
    """

    key: str
    label: str
    better: Optional[str]
    unit: str
    meaning: str
    reference: str
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.better not in BETTER:
            raise ValueError(f"metric {self.key!r}: better={self.better!r}, allowed values are {BETTER}")
        for name in ("key", "label", "unit", "meaning", "reference"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"metric {self.key!r}: {name} must not be empty")
        names = self.placeholders
        unknown = sorted(set(names) - set(PLACEHOLDERS))
        if unknown:
            raise ValueError(f"metric {self.key!r}: unknown placeholder(s) {unknown}; known: {sorted(PLACEHOLDERS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"metric {self.key!r}: a placeholder appears twice")
        stray = sorted(set(_FIELD.findall(self.label)) - set(names))
        if stray:
            raise ValueError(f"metric {self.key!r}: label {self.label!r} uses {stray}, which the key does not have")
        pattern, pos = [], 0
        for m in _FIELD.finditer(self.key):
            pattern.append(re.escape(self.key[pos : m.start()]))
            pattern.append(f"(?P<{m[1]}>{PLACEHOLDERS[m[1]]})")
            pos = m.end()
        pattern.append(re.escape(self.key[pos:]))
        object.__setattr__(self, "_regex", re.compile("".join(pattern)))

    @property
    def placeholders(self) -> Tuple[str, ...]:
        return tuple(_FIELD.findall(self.key))

    @property
    def is_family(self) -> bool:
        return bool(self.placeholders)

    @property
    def direction(self) -> int:
        """+1 higher is better, -1 lower is better, 0 neither."""
        return {"higher": 1, "lower": -1, None: 0}[self.better]

    def match(self, key: str) -> Optional[Dict[str, str]]:
        """The placeholder values when ``key`` is this metric (``{}`` for a plain key), else None."""
        m = self._regex.fullmatch(key)
        return m.groupdict() if m else None

    def label_for(self, key: str) -> str:
        """The label of one member of the family (placeholders filled in from ``key``)."""
        values = self.match(key)
        if values is None:
            raise ValueError(f"{key!r} is not {self.key!r}")
        return self.label.format(**values) if values else self.label


def find_metric(key: str, metrics: Iterable[Metric]) -> Optional[Metric]:
    """The declaration ``key`` belongs to: an exact declaration first, else the one family that
    matches; None when nothing declares it. Two families matching one key is a declaration error."""
    metrics = list(metrics)
    for m in metrics:
        if not m.is_family and m.key == key:
            return m
    found: Sequence[Metric] = [m for m in metrics if m.is_family and m.match(key) is not None]
    if len(found) > 1:
        raise ValueError(f"{key!r} matches several declared families: {[m.key for m in found]}")
    return found[0] if found else None
