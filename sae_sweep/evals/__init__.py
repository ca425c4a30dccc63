"""SAEBench- and FaithfulSAE-style evals, one module each, behind one registry (``eval.run``).

Every module in this package is imported here so that its ``@register_eval`` decorator runs.
"""

import importlib
import pkgutil

from sae_sweep.evals.registry import EvalContext, eval_metrics, eval_names, get_eval
from sae_sweep.evals.schema import EvalOutput, FlatMetrics, flatten_metrics, to_saebench_json, write_json

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")

__all__ = [
    "EvalContext",
    "EvalOutput",
    "FlatMetrics",
    "eval_metrics",
    "eval_names",
    "flatten_metrics",
    "get_eval",
    "to_saebench_json",
    "write_json",
]
