"""Name -> class registries for trainer variants (`trainer=<name>`) and SAE architectures.

Trainers register with `@register_trainer("topk")`, which also registers their hyperparameter
dataclass (`params_cls`) as the schema of `trainer=topk` (Hydra's ConfigStore `schema/trainer/topk`,
checked by `sae_sweep.config.validate`). SAE classes register with `@register_sae("topk")`: the
`architecture` field of a saved `cfg.json`, used by `SparseAutoencoder.load`.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from sae_sweep.config import register_schema

T = TypeVar("T", bound=type)

_TRAINERS: dict[str, type] = {}
_SAES: dict[str, type] = {}


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[T], T]:
    def deco(cls: T) -> T:
        existing = table.get(name)
        # Re-registering the same class (module reload) is harmless; two different classes is a bug.
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"{kind} {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        table[name] = cls
        return cls

    return deco


def register_trainer(name: str) -> Callable[[T], T]:
    """Class decorator: make a `Trainer` subclass available as `trainer=<name>`."""

    def deco(cls: T) -> T:
        cls.name = name  # type: ignore[attr-defined]
        _register(_TRAINERS, "trainer", name)(cls)
        register_schema("trainer", name, cls.params_cls)  # type: ignore[attr-defined]
        return cls

    return deco


def register_sae(architecture: str) -> Callable[[T], T]:
    """Class decorator: map a cfg.json `architecture` value to a `SparseAutoencoder` subclass."""

    def deco(cls: T) -> T:
        cls.architecture = architecture  # type: ignore[attr-defined]
        return _register(_SAES, "SAE architecture", architecture)(cls)

    return deco


def get_trainer(name: str) -> Any:
    """The trainer class registered as `name`; ValueError listing the known names otherwise."""
    try:
        return _TRAINERS[name]
    except KeyError:
        raise ValueError(
            f"trainer.name={name!r} is not a registered trainer; allowed: {', '.join(trainer_names()) or '(none)'}"
        ) from None


def trainer_names() -> list[str]:
    return sorted(_TRAINERS)


def get_sae_class(architecture: str) -> Any:
    try:
        return _SAES[architecture]
    except KeyError:
        raise ValueError(
            f"SAE architecture {architecture!r} is not registered; allowed: {', '.join(sae_architectures()) or '(none)'}"
        ) from None


def sae_architectures() -> list[str]:
    return sorted(_SAES)
