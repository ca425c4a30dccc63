"""SAE architectures and trainer variants behind one registry (`trainer=<name>`).

Every module in this package is imported here so that its `@register_trainer` /
`@register_sae` decorators run: adding a variant means adding one file, nothing else.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (
    SparseAutoencoder,
    StepOutput,
    Trainer,
    TrainerParams,
    explained_variance,
    geometric_median,
    hparam,
    mse_loss,
    resolve_d_sae,
    sparse_decode,
)
from .registry import (
    get_sae_class,
    get_trainer,
    register_sae,
    register_trainer,
    sae_architectures,
    trainer_names,
    validate_trainer_cfg,
)

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")

from .topk import TopKSAE, TopKTrainer  # noqa: E402

__all__ = [
    "SparseAutoencoder", "StepOutput", "Trainer", "TrainerParams", "TopKSAE", "TopKTrainer",
    "explained_variance", "geometric_median", "hparam", "mse_loss", "resolve_d_sae", "sparse_decode",
    "get_sae_class", "get_trainer", "register_sae", "register_trainer", "sae_architectures",
    "trainer_names", "validate_trainer_cfg",
]
