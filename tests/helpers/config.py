"""Configs the way the app builds them: Hydra's compose of the shipped conf/ and the trainers'
parameter dataclasses."""

from __future__ import annotations

import dataclasses
from typing import Any

from hydra import compose, initialize_config_dir


def compose_config(*overrides: str, return_hydra_config: bool = False):
    """conf/config.yaml composed with ``overrides`` (Hydra's override syntax), unresolved."""
    from sae_sweep.job.app import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def trainer_params(name: str, **overrides: Any) -> dict[str, Any]:
    """Every parameter of trainer ``name`` at its dataclass default, then ``overrides``."""
    from sae_sweep.sae import get_trainer

    cfg = {f.name: f.default for f in dataclasses.fields(get_trainer(name).params_cls)}
    cfg.update(name=name, **overrides)
    return cfg
