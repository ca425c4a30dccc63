"""The weights-source protocol, its registry and the resolver.

A source is one way of getting a model's weights onto this machine: the built-in tiny model (built
from its recipe), a local ``save_pretrained`` directory, the Hugging Face Hub, or a GGUF stand-in
shipped in a Python package. Each is a ``WeightsSource`` registered under the name ``model.weights``
uses for it. ``resolve(model, cache_dir)`` picks the source a model's weights come from and returns
a ``ResolvedWeights``: the choice, where the loadable directory is, and what the choice adds to the
run key. Nothing is written back into the config.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from sae_sweep.config import ModelConfig, parse

__all__ = [
    "ModelUnavailable",
    "WeightsSource",
    "ResolvedWeights",
    "Loaded",
    "register_weights",
    "weights_source",
    "weights_sources",
    "id_kind",
    "model_config",
    "resolve",
    "unavailable_message",
]

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded here (offline, not cached, missing directory or package)."""


def unavailable_message(hf_id: str, revision: Any, reason: str) -> str:
    rev = f" (revision {revision})" if revision else ""
    return (
        f"model {hf_id!r}{rev} is not available here: {reason}. "
        f"Download it on a machine with network access (e.g. `huggingface-cli download {hf_id}` into "
        f"the shared HF cache, or `save_pretrained` into a directory) and point the config at it "
        f"with model.hf_id=/path/to/local/dir"
    )


def read_json(path: Path) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def model_config(node: Any) -> ModelConfig:
    """``node`` (a ``model`` config node: DictConfig, dict, or already a ModelConfig) as a ModelConfig;
    ConfigError naming each bad key otherwise."""
    return node if isinstance(node, ModelConfig) else parse(ModelConfig, node, "model")


def id_kind(hf_id: str) -> str:
    """Which kind of id ``model.hf_id`` is: "builtin" (``builtin:<name>``), "path" (an existing
    directory, or something shaped like a path), or "hub" (``name`` or ``org/name``)."""
    if hf_id.startswith("builtin:"):
        return "builtin"
    if os.path.isdir(os.path.expanduser(hf_id)) or hf_id.startswith(("/", "./", "../", "~")) or hf_id.count("/") > 1:
        return "path"
    return "hub"


@dataclass
class Loaded:
    """What a source's ``load`` gives: tokenizer, model, its part of the model's fingerprint, and the
    config.json whose hash joins the fingerprint (None: the loaded config's own JSON is hashed)."""

    tokenizer: Any
    model: Any
    fingerprint: Dict[str, Any]
    config_path: Optional[Path]


class WeightsSource:
    """One source of weights. ``reads`` is the kind of ``model.hf_id`` it loads (see ``id_kind``);
    several sources may read the same kind (the hub and its GGUF stand-in), tried in registration
    order when ``model.weights=auto``."""

    name: str = ""
    reads: str = ""

    def offers(self, model: ModelConfig) -> bool:
        """Whether this source can serve ``model`` at all (e.g. the stand-in needs ``model.gguf``)."""
        return True

    def locate(self, model: ModelConfig) -> str:
        """What it loads ``model`` from: the hub id, or the absolute local directory; ModelUnavailable
        when ``model.hf_id`` names nothing it could load."""
        return model.hf_id

    def check(self, model: ModelConfig, where: str, cache_dir: Path, timeout: float) -> None:
        """Raise ModelUnavailable (naming model id and revision, and how to get it) when ``load``
        could not get the weights here. Built-on-demand weights are available."""

    def identity(self, model: ModelConfig) -> Dict[str, Any]:
        """What these weights add to the run key besides ``model.hf_id`` / ``revision`` / ``dtype``:
        nothing for the model's own weights; substitute weights (a GGUF stand-in) name themselves."""
        return {}

    def label(self, model: ModelConfig) -> str:
        """Which weights ran, for people (the run tag ``model_weights``)."""
        return self.name

    def directory(self, model: ModelConfig, where: str, cache_dir: Path) -> Optional[Path]:
        """Where the loadable ``save_pretrained`` directory is (or will be once built); None when
        the weights are loaded by hub id."""
        return None

    def config_json(self, r: ResolvedWeights) -> Optional[dict]:
        """The model's config.json without loading weights, None when it is not on disk yet."""
        return read_json(r.directory / "config.json") if r.directory else None

    def prepare(self, r: ResolvedWeights) -> Path:
        """The loadable directory, built (once) if it has to be."""
        if r.directory is None:
            raise NotImplementedError(f"weights source {self.name!r} has no directory to prepare")
        return r.directory

    def fingerprint(self, r: ResolvedWeights, path: Path) -> Dict[str, Any]:
        """This source's part of the loaded model's fingerprint (part of activation cache keys): what
        the weights are, never where the cache directory lives."""
        return {}

    def load(self, r: ResolvedWeights, **from_pretrained: Any) -> Loaded:
        """Tokenizer and model from the prepared directory."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = self.prepare(r)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), **from_pretrained)
        return Loaded(tokenizer, model, self.fingerprint(r, path), path / "config.json")


_SOURCES: Dict[str, WeightsSource] = {}


def register_weights(name: str, reads: str):
    """Class decorator: register a ``WeightsSource`` under ``name`` (a value of ``model.weights``)."""
    if reads not in ("builtin", "path", "hub"):
        raise ValueError(f"reads={reads!r}: allowed values are builtin, path, hub")

    def wrap(cls: type) -> type:
        source = cls()
        source.name, source.reads = name, reads
        _SOURCES[name] = source
        return cls

    return wrap


def weights_source(name: str) -> WeightsSource:
    if name not in _SOURCES:
        raise KeyError(f"weights source {name!r}: registered are {', '.join(_SOURCES)}")
    return _SOURCES[name]


# The order model.weights=auto tries the sources that read the same kind of id: a model's real weights
# before a stand-in for them. Stated here, not left to import order (which a formatter may sort).
AUTO_ORDER = ("builtin", "local", "hub", "gguf")


def weights_sources() -> List[str]:
    """The registered sources in the order ``auto`` tries them (others after, as registered)."""
    rank = {name: i for i, name in enumerate(AUTO_ORDER)}
    return sorted(_SOURCES, key=lambda name: rank.get(name, len(rank)))


@dataclass(frozen=True)
class ResolvedWeights:
    """Where one model's weights come from, decided once (``resolve``) and passed down: the model's
    config, the chosen source, what it loads (hub id or absolute local directory), the loadable
    directory (None: by hub id), the weights' run-key identity and label, and the cache root."""

    model: ModelConfig
    source: str
    where: str
    directory: Optional[Path]
    identity: Dict[str, Any]
    label: str
    cache_dir: Path

    @property
    def impl(self) -> WeightsSource:
        return weights_source(self.source)

    def config_json(self) -> Optional[dict]:
        return self.impl.config_json(self)

    def prepare(self) -> Path:
        return self.impl.prepare(self)

    def load(self, **from_pretrained: Any) -> Loaded:
        return self.impl.load(self, **from_pretrained)


def _candidates(model: ModelConfig) -> List[WeightsSource]:
    kind = id_kind(str(model.hf_id))
    return [_SOURCES[n] for n in weights_sources() if _SOURCES[n].reads == kind and _SOURCES[n].offers(model)]


def _resolved(source: WeightsSource, model: ModelConfig, where: str, cache_dir: Path) -> ResolvedWeights:
    return ResolvedWeights(
        model,
        source.name,
        where,
        source.directory(model, where, cache_dir),
        source.identity(model),
        source.label(model),
        cache_dir,
    )


def resolve(model: Any, cache_dir: str | os.PathLike, *, check: bool = True, timeout: float = 10.0) -> ResolvedWeights:
    """Which weights ``load_lm`` loads for ``model``.

    ``model.weights=auto`` takes the first source, in registration order, that reads this kind of
    ``model.hf_id`` and (with ``check``) is available here: for a hub id the hub (its cache, or the
    network unless HF_HUB_OFFLINE is set), else the GGUF stand-in when its package is installed.
    A named source must read this kind of id. ``check=False`` decides without looking (what a job
    would load where everything is available: no network, nothing built). ModelUnavailable says
    how to get the weights when none can be had.
    """
    model = model_config(model)
    cache_dir = Path(os.path.expanduser(str(cache_dir)))
    candidates = _candidates(model)
    want = str(model.weights)
    if want != "auto":
        named = [s for s in candidates if s.name == want]
        if not named:
            if want == "gguf" and id_kind(str(model.hf_id)) == "hub":
                raise ModelUnavailable(f"model.weights=gguf but model {model.hf_id!r} names no model.gguf package")
            allowed = ", ".join(["auto"] + [s.name for s in candidates])
            raise ModelUnavailable(
                f"model.weights={want!r}: not a source of model.hf_id={model.hf_id!r}; allowed: {allowed}"
            )
        candidates = named
    errors: List[Tuple[WeightsSource, ModelUnavailable]] = []
    for source in candidates:
        where = source.locate(model)
        if not check:
            return _resolved(source, model, where, cache_dir)
        try:
            source.check(model, where, cache_dir, timeout)
        except ModelUnavailable as e:
            errors.append((source, e))
            continue
        if errors:
            log.info(
                "model %s: the %s weights are not available here; using %s (%s)",
                model.hf_id,
                errors[0][0].name,
                source.name,
                source.label(model),
            )
        return _resolved(source, model, where, cache_dir)
    if want != "auto":
        raise ModelUnavailable(f"model.weights={want}: {errors[0][1]}") from errors[0][1]
    raise ModelUnavailable(str(errors[0][1]) + "".join(f". Or, offline: {e}" for _, e in errors[1:])) from errors[0][1]
