"""SAE architectures and trainer variants behind one registry (`trainer=<name>`).

Every module in this package is imported here so that its `@register_trainer` / `@register_sae`
decorators run: adding a variant means adding one file, nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from .autoencoder import SparseAutoencoder
from .kernels import sparse_decode
from .registry import get_sae_class, get_trainer, register_sae, register_trainer, sae_architectures, trainer_names
from .trainer import StepOutput, Trainer, TrainerParams, explained_variance, geometric_median, mse_loss

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")

from .topk import TopKSAE, TopKTrainer  # noqa: E402  (the baseline, used by name across the project)

__all__ = [
    "SparseAutoencoder",
    "StepOutput",
    "Trainer",
    "TrainerParams",
    "explained_variance",
    "geometric_median",
    "mse_loss",
    "sparse_decode",
    "get_sae_class",
    "get_trainer",
    "register_sae",
    "register_trainer",
    "sae_architectures",
    "trainer_names",
    "TopKSAE",
    "TopKTrainer",
]
