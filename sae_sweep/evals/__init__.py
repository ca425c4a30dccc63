"""SAE evaluations, one module per eval; each returns a :class:`~sae_sweep.evals.schema.EvalOutput`.

Evals depend on the LM only through ``activations`` / ``logits_with_splice`` and on the SAE only
through ``sae(x) -> (x_hat, f)`` (duck typing), and never on tracking or launch code.
"""

from sae_sweep.evals.schema import EvalOutput, FlatMetrics, flatten_metrics, to_saebench_json, write_json

__all__ = ["EvalOutput", "FlatMetrics", "flatten_metrics", "to_saebench_json", "write_json"]
