"""One typed mechanism for every config node: dataclass fields carry type, default and what is
allowed (``setting``, ``choice``); ``parse`` / ``problems`` check a node with one message shape;
``register_schema`` puts a node class in Hydra's ConfigStore as ``schema/<group>/<name>``."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration that cannot run. The message lists every problem found."""

    def __init__(self, message: str, problems: Optional[List[str]] = None):
        super().__init__(message)
        self.problems = problems or [message]


def fail_if(problems: Sequence[str], what: str = "invalid configuration") -> None:
    if problems:
        raise ConfigError(f"{what}:\n  - " + "\n  - ".join(problems), list(problems))


# The typed mechanism
def setting(
    default: Any = MISSING,
    *,
    allowed: Optional[str] = None,
    check: Optional[Callable[[Any], bool]] = None,
    default_factory: Optional[Callable[[], Any]] = None,
) -> Any:
    """A dataclass field with its allowed range: ``allowed`` is shown in messages, ``check(value)``
    decides (after the value has the field's type)."""
    meta = {"allowed": allowed, "check": check}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def choice(default: Any, options: Sequence[Any]) -> Any:
    """A field that takes one of ``options`` (an enumeration; OmegaConf holds no ``Literal``)."""
    options = tuple(options)
    return field(
        default=default, metadata={"allowed": "one of: " + ", ".join(map(str, options)), "check": options.__contains__}
    )


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " or null"
    if origin in (list, List, tuple, Sequence):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


class _Bad(Exception):
    """A value that does not have its field's type."""


def _coerce(value: Any, tp: Any, key: str, errors: List[str]) -> Any:
    """``value`` as type ``tp`` (nested dataclasses recursively, their problems collected into
    ``errors``); raises _Bad when the value itself has the wrong type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        instance, problems = _parse(tp, value, key)
        errors.extend(problems)
        return instance
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, key, errors)
            except _Bad:
                continue
        raise _Bad
    if origin in (list, List, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise _Bad
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin in (dict, Dict, Mapping):
        if not isinstance(value, dict):
            raise _Bad
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Bad
    if tp is int:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # 5e4 arrives as a float
            return int(value)
        raise _Bad
    if tp is float:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, (int, float)):
            value = float(value)
        elif isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _Bad from None
        else:
            raise _Bad
        if not math.isfinite(value):
            raise _Bad
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Bad
    return value


def _plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return dataclasses.asdict(node)
    return node


def nearest(name: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for a likely typo, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse(cls: type, node: Any, key: str) -> tuple[Any, List[str]]:
    """(instance of ``cls`` or None, problems) for a config node (dict, DictConfig, dataclass, None)."""
    if isinstance(node, cls):
        return node, []
    values = _plain(node)
    if values is None:
        values = {}
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, dict):
        return None, [f"{key}={values!r}: wrong type; allowed: a mapping with keys {', '.join(names)}"]
    hints = typing.get_type_hints(cls)
    errors: List[str] = []
    for name in values:
        if name not in names:
            errors.append(
                f"{key + '.' if key else ''}{name}: unknown setting{nearest(str(name), names)}; "
                f"allowed: {', '.join(names)}"
            )
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        full = f"{key}.{f.name}" if key else f.name
        allowed = f.metadata.get("allowed") or _describe(hints[f.name])
        raw = values.get(f.name, MISSING)
        if raw == MISSING:
            if f.name in values or (f.default == MISSING and f.default_factory is dataclasses.MISSING):
                errors.append(f"{full}: required; allowed: {allowed}")
            continue
        try:
            value = _coerce(raw, hints[f.name], full, errors)
        except _Bad:
            errors.append(f"{full}={raw!r}: wrong type; allowed: {allowed}")
            continue
        check = f.metadata.get("check")
        if check is not None and value is not None and not check(value):
            reason = (
                "out of range" if isinstance(value, (int, float)) and not isinstance(value, bool) else "not allowed"
            )
            errors.append(f"{full}={raw!r}: {reason}; allowed: {allowed}")
            continue
        out[f.name] = value
    if errors:
        return None, errors
    return cls(**out), []


def problems(cls: type, node: Any, key: str) -> List[str]:
    """Every problem with ``node`` as the dataclass ``cls`` at config path ``key``; [] when valid."""
    return _parse(cls, node, key)[1]


def parse(cls: type, node: Any, key: str) -> Any:
    """``node`` as an instance of the dataclass ``cls`` (defaults filled in); ConfigError otherwise."""
    instance, errors = _parse(cls, node, key)
    fail_if(errors, f"invalid {key or 'configuration'}")
    return instance


_SCHEMAS: Dict[str, Dict[str, type]] = {}
_SWEEP_LEVEL: set = set()  # eval settings used at the end of a sweep, not in `eval.run`


def register_schema(group: str, name: str, cls: type, sweep_level: bool = False) -> type:
    """Make ``cls`` the schema of ``<group>.<name>`` (e.g. trainer ``topk``): checked by
    ``validate``, and stored in Hydra's ConfigStore as ``schema/<group>/<name>`` for the yaml
    presets in ``conf/<group>/`` to extend. ``sweep_level``: eval settings read by the sweep's end
    (e.g. ``eval.crossseed``), not an eval a job runs."""
    from hydra.core.config_store import ConfigStore

    _SCHEMAS.setdefault(group, {})[name] = cls
    if sweep_level:
        _SWEEP_LEVEL.add((group, name))
    ConfigStore.instance().store(group=f"schema/{group}", name=name, node=cls, provider="sae_sweep")
    return cls


def schema(group: str, name: str) -> Optional[type]:
    return _SCHEMAS.get(group, {}).get(name)


def schema_names(group: str) -> List[str]:
    return sorted(_SCHEMAS.get(group, {}))


# The job's schema (conf/config.yaml and the model / dataset groups fill it in)
