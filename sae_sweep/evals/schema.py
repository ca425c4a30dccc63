"""The common result type of every eval, and its two outward forms.

Every eval (core, absorption, sparse probing, ...) returns an :class:`EvalOutput`. From it:

* :func:`flatten_metrics` gives the flat ``"<prefix>/<category>/<metric>": float`` mapping that
  tracking logs as MLflow metrics (``core/model_behavior_preservation/kl_div_score``). Non-finite
  values are dropped (MLflow and JSON cannot hold them honestly) and listed in ``.dropped``.
* :func:`to_saebench_json` gives a dict in SAEBench's eval-output schema (``BaseEvalOutput``:
  eval_type_id, eval_config, eval_id, datetime_epoch_millis, eval_result_metrics,
  eval_result_details, eval_result_unstructured, sae_bench_commit_hash, sae_lens_id,
  sae_lens_release_id, sae_lens_version, sae_cfg_dict), written as an artifact next to the run.

This module is pure Python (no torch, no MLflow) so any eval and any consumer can import it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from numbers import Number
from pathlib import Path
from typing import Any

__all__ = [
    "STATUSES",
    "EvalOutput",
    "FlatMetrics",
    "flatten_metrics",
    "to_saebench_json",
    "write_json",
]

# "ok": metrics are meaningful; "skipped": the eval does not apply (e.g. a tokenizer without
# single-letter tokens for absorption); "failed": it ran but the result must not be trusted.
STATUSES = ("ok", "skipped", "failed")


def _is_finite_number(value: Any) -> bool:
    # bool is a Number too; treat it as 0/1 like float(True) does.
    return isinstance(value, Number) and not isinstance(value, complex) and math.isfinite(float(value))  # type: ignore[arg-type]  # a real Number


@dataclass
class EvalOutput:
    """What one eval produced for one SAE.

    eval_type_id: SAEBench's id of the eval ("core", "absorption_first_letter", ...).
    config:       the settings that produced the result (SAEBench's ``eval_config``).
    metrics:      category -> metric -> scalar, with SAEBench's category and metric names.
    details:      SAEBench's ``eval_result_details`` (e.g. one dict per latent for core).
    status:       one of :data:`STATUSES`; anything but "ok" needs a ``skip_reason``.
    flags:        machine-readable warnings a caller may act on (e.g. a degenerate denominator);
                  ``nonfinite_metrics`` is filled in automatically.
    unstructured: SAEBench's ``eval_result_unstructured`` (free-form extras, e.g. histograms).
    files:        artifact path -> text the job logs beside the run (e.g. an HTML page); not part
                  of the SAEBench JSON.
    """

    eval_type_id: str
    config: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    details: list | dict = field(default_factory=list)
    status: str = "ok"
    skip_reason: str | None = None
    flags: dict[str, Any] = field(default_factory=dict)
    unstructured: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.eval_type_id or "/" in self.eval_type_id:
            raise ValueError(f"eval_type_id must be a non-empty name without '/', got {self.eval_type_id!r}")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.status != "ok" and not self.skip_reason:
            raise ValueError(f"status {self.status!r} needs a skip_reason saying why")
        for category, group in self.metrics.items():
            if not isinstance(group, dict):
                raise TypeError(f"metrics[{category!r}] must be a dict of metric -> value, got {type(group).__name__}")
            # Scalars handed over as 0-d tensors / numpy values become plain numbers, so a tensor
            # is never mistaken for a non-finite value further down.
            for name, value in group.items():
                if not isinstance(value, Number) and hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
                    group[name] = value.item()
            if "/" in category or any("/" in name for name in group):
                raise ValueError(f"metric category and names may not contain '/': {category!r}: {list(group)}")
        # Record bad values where every consumer sees them, not only in the flattened form.
        bad = self.nonfinite_metrics()
        if bad:
            self.flags["nonfinite_metrics"] = bad
        else:
            self.flags.pop("nonfinite_metrics", None)

    @classmethod
    def skipped(cls, eval_type_id: str, config: dict[str, Any], reason: str) -> EvalOutput:
        """An eval that does not apply to this SAE/model: no metrics, a reason."""
        return cls(eval_type_id=eval_type_id, config=config, metrics={}, status="skipped", skip_reason=reason)

    def nonfinite_metrics(self) -> list[str]:
        """``"category/metric"`` for every value that is NaN, ±inf, None or not a number."""
        return [
            f"{category}/{name}"
            for category, group in self.metrics.items()
            for name, value in group.items()
            if not _is_finite_number(value)
        ]


class FlatMetrics(dict):
    """A ``{name: float}`` dict that also says which names were dropped as non-finite."""

    def __init__(self, values: dict[str, float], dropped: list[str]):
        super().__init__(values)
        self.dropped = dropped


def flatten_metrics(output: EvalOutput, prefix: str | None = None) -> FlatMetrics:
    """``{"<prefix>/<category>/<metric>": float}``; ``prefix`` defaults to ``output.eval_type_id``.

    Evals whose SAEBench id is long pass a short prefix (``prefix="absorption"`` for
    ``absorption_first_letter``), matching the metric names in DESIGN.md. Non-finite values are left
    out; their full names are in the result's ``.dropped`` list.
    """
    prefix = output.eval_type_id if prefix is None else prefix.strip("/")
    if not prefix:
        raise ValueError("prefix must be non-empty")
    flat: dict[str, float] = {}
    dropped: list[str] = []
    for category, group in output.metrics.items():
        for name, value in group.items():
            key = f"{prefix}/{category}/{name}"
            if _is_finite_number(value):
                flat[key] = float(value)
            else:
                dropped.append(key)
    return FlatMetrics(flat, dropped)


def _jsonable(obj: Any) -> Any:
    """Strict-JSON form: non-finite floats -> None, tensors/arrays -> lists, tuples/sets -> lists."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [_jsonable(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, Path):
        return str(obj)
    # torch tensors and numpy arrays/scalars, without importing either here.
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    if isinstance(obj, Number):
        return _jsonable(float(obj))  # type: ignore[arg-type]  # a real Number
    # OmegaConf containers and other mappings.
    if hasattr(obj, "items"):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    return str(obj)


def to_saebench_json(
    output: EvalOutput,
    sae_cfg: dict[str, Any],
    sae_id: str,
    model_name: str,
    *,
    release_id: str | None = None,
    sae_lens_version: str | None = None,
) -> dict[str, Any]:
    """The eval in SAEBench's output-JSON schema, ready for ``json.dump``.

    ``model_name`` goes into ``eval_config.model_name`` as SAEBench's configs carry it. Non-finite
    metric values become ``null`` (SAEBench writes -1, which reads like a real value). Our own
    status, skip reason and flags ride in ``eval_result_unstructured`` since SAEBench has no fields
    for them; ``sae_bench_commit_hash`` is null because SAEBench did not run this eval.
    """
    unstructured = dict(output.unstructured or {})
    unstructured.update(
        {"status": output.status, "skip_reason": output.skip_reason, "flags": output.flags, "producer": "sae_sweep"}
    )
    doc = {
        "eval_type_id": output.eval_type_id,
        "eval_config": {"model_name": model_name, **output.config},
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": output.metrics,
        "eval_result_details": output.details,
        "eval_result_unstructured": unstructured,
        "sae_bench_commit_hash": None,
        "sae_lens_id": sae_id,
        "sae_lens_release_id": release_id,
        "sae_lens_version": sae_lens_version,
        "sae_cfg_dict": sae_cfg,
    }
    return _jsonable(doc)


def write_json(doc: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``doc`` as strict JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(_jsonable(doc), fh, indent=2, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
