"""The registry of text sources: ``dataset.kind`` names one.

A source is a class registered under a kind with ``@register_source("kind")``. It is made from the
typed ``DatasetConfig`` (parsed once, ``dataset_config``) and says:

* ``settings``      the ``dataset.*`` keys it reads besides the ones every source reads (name, kind,
                    context_size, tokens, eval_tokens, how_to_get); a key only some source reads
                    (``revision``) set for another is refused at validation;
* ``Options``       a dataclass checking ``dataset.options`` (sources from outside this package keep
                    their own settings there), or None;
* ``config_problems()``   what is wrong with its settings, before anything is read;
* ``availability(documents)``  why it cannot be read here (offline hub, missing files), as messages;
* ``supply_problems(cache_tokens, budget)``  why its training split is too small for the budget;
* ``fingerprint(lm)``      what decides its text (merged into the dataset fingerprint: cache keys);
* ``record_source(lm)``    MLflow's (source_type, source) for the run's dataset input;
* ``texts(cache_dir)``     its documents as strings in a fixed order, or ``documents(lm, split,
                           cache_dir, progress)`` token ids of one split directly (``faithful``).

A source of your own lives in a module of your own: register it there and name it as
``module:kind`` in the dataset yaml (``kind: my_sources:reversed``). Validation imports ``module``
(it must be importable in the job's process: on ``PYTHONPATH`` or installed) and looks ``kind`` up
among what it registered; nothing in this package changes. Its ``Options`` dataclass checks
``dataset.options`` the way the package's own schemas check theirs.

``synthetic`` is a kind too, but not a text source: planted activations, no text
(``sae_sweep.activations.synthetic``).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Type

from sae_sweep.config import DatasetConfig, nearest, parse, problems
from sae_sweep.data.corpus import doc_split

__all__ = [
    "DatasetUnavailable",
    "TextSource",
    "register_source",
    "source_kinds",
    "source_class",
    "source_for",
    "dataset_config",
    "dataset_problems",
    "is_text",
    "NOT_TEXT",
]

# Kinds that are datasets but not text: handled where their activations are made.
NOT_TEXT = {"synthetic": "planted-dictionary activations, no text (sae_sweep.activations.synthetic)"}
# Keys every source reads (the budget and windows around whatever text it gives).
COMMON = ("name", "kind", "context_size", "tokens", "eval_tokens", "how_to_get")

_TOKENIZE_BATCH = 128


class DatasetUnavailable(RuntimeError):
    """The dataset cannot be read here (offline hub id, missing local files)."""


class TextSource:
    """One kind of text. Subclasses set ``settings`` (and ``Options``) and implement ``texts`` (or
    ``documents``), ``fingerprint`` and ``record_source``; ``config_problems`` and
    ``availability`` default to none."""

    kind: str = ""  # set by register_source (a source from your own module: module:kind, as the yaml names it)
    settings: Tuple[str, ...] = ()
    Options: Optional[type] = None

    def __init__(self, ds: DatasetConfig):
        self.ds = ds
        self.options = parse(self.Options, ds.options, "dataset.options") if self.Options is not None else None

    # Checks
    def config_problems(self) -> List[str]:
        return []

    def availability(self, documents: bool = True) -> List[str]:
        return []

    def supply_problems(self, cache_tokens: int, budget: str) -> List[str]:
        """Why its training split cannot give ``cache_tokens`` distinct tokens (the activation
        cache's, or a stream's training tokens; ``budget``: the settings that ask for them, for the
        message), judged before any tokenizer is loaded; [] when it can or cannot tell (the default)."""
        return []

    # Identity and records
    def fingerprint(self, lm: Any) -> Dict[str, Any]:
        raise NotImplementedError

    def record_source(self, lm: Any) -> Tuple[str, Dict[str, Any]]:
        raise NotImplementedError

    # Text
    def texts(self, cache_dir: str | os.PathLike) -> Iterable[Any]:
        raise NotImplementedError

    def documents(self, lm: Any, split: str, cache_dir: str | os.PathLike, progress: Any = None) -> Iterator[List[int]]:
        """Token ids (no special tokens) of the documents of ``split``, in the source's order: each
        text goes to ``train`` or ``eval`` by a hash of its content (``corpus.doc_split``)."""
        for batch in texts_in_split(self.texts(cache_dir), split):
            for ids in tokenize(lm, batch):
                if progress is not None:
                    progress.update(len(ids) + 1)
                yield ids


_SOURCES: Dict[str, Type[TextSource]] = {}


def register_source(kind: str) -> Callable[[Type[TextSource]], Type[TextSource]]:
    """Class decorator: ``@register_source("hub") class HubSource(TextSource)``. A class from a
    module outside this package is registered as ``<its module>:<kind>``, the name a yaml gives it.
    A kind is registered once; a second class under the same kind is an error naming both."""

    def add(cls: Type[TextSource]) -> Type[TextSource]:
        nonlocal kind
        if not cls.__module__.startswith("sae_sweep."):
            kind = f"{cls.__module__}:{kind}"
        if kind in NOT_TEXT:
            raise ValueError(f"register_source({kind!r}): {kind!r} is reserved ({NOT_TEXT[kind]})")
        have = _SOURCES.get(kind)
        if have is not None and (have.__module__, have.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"register_source({kind!r}): already registered by {have.__module__}.{have.__qualname__}")
        _SOURCES[kind] = cls
        cls.kind = kind
        return cls

    return add


def source_kinds() -> List[str]:
    """Every allowed ``dataset.kind`` of this package: the registered text sources and ``synthetic``."""
    return sorted([*(k for k in _SOURCES if ":" not in k), *NOT_TEXT])


def _allowed() -> str:
    return f"{', '.join(source_kinds())}, or module:kind for a source your own module registers"


def _lookup(kind: str) -> Tuple[Optional[Type[TextSource]], Optional[str]]:
    """(source class, None), (None, None) for a kind that is not text, or (None, why not)."""
    if kind in NOT_TEXT:
        return None, None
    if kind in _SOURCES:
        return _SOURCES[kind], None
    if not isinstance(kind, str) or not kind:
        return None, f"dataset.kind={kind!r}: required; allowed: {_allowed()}"
    if ":" not in kind:
        return None, f"dataset.kind={kind!r}: unknown kind{nearest(kind, source_kinds())}; allowed: {_allowed()}"
    module, _, name = kind.partition(":")
    try:
        importlib.import_module(module)
    except Exception as e:  # not on the path, or it fails on import
        return None, (
            f"dataset.kind={kind!r}: cannot import module {module!r} ({type(e).__name__}: {e}); it must be "
            f"importable in the job's process (PYTHONPATH or installed); allowed: {_allowed()}"
        )
    cls = _SOURCES.get(kind)
    if cls is None:
        mine = sorted(k.partition(":")[2] for k in _SOURCES if k.partition(":")[0] == module)
        return None, (
            f"dataset.kind={kind!r}: module {module!r} registers no text source {name!r} (it registers: "
            f"{', '.join(mine) or 'none'}; @register_source(name) on a TextSource subclass)"
        )
    return cls, None


def source_class(kind: str) -> Type[TextSource]:
    """The source class of ``kind``; ValueError naming the key, the value and the allowed kinds."""
    cls, why = _lookup(kind)
    if cls is None:
        raise ValueError(why or f"dataset.kind={kind!r} is not a text source ({NOT_TEXT[kind]})")
    return cls


def is_text(kind: str) -> bool:
    return kind not in NOT_TEXT


def dataset_config(node: Any) -> DatasetConfig:
    """The ``dataset`` node as the typed ``DatasetConfig`` (defaults from the schema, filled in
    once); a ``DatasetConfig`` is returned as it is."""
    return parse(DatasetConfig, node, "dataset")


def source_for(node: Any) -> TextSource:
    """The text source a ``dataset`` node (DatasetConfig, DictConfig or dict) names."""
    ds = dataset_config(node)
    return source_class(ds.kind)(ds)


def dataset_problems(node: Any) -> List[str]:
    """What is wrong with a ``dataset`` node beyond its types (those are ``config.validate``'s): an
    unknown kind, settings its source does not read or needs, bad ``dataset.options``."""
    if problems(DatasetConfig, node, "dataset"):
        return []  # config.validate reports them
    ds = dataset_config(node)
    cls, why = _lookup(ds.kind)
    if why:
        return [why]
    if cls is None:  # not text
        return (
            []
            if ds.revision is None
            else [
                f"dataset.revision={ds.revision!r}: dataset.kind={ds.kind} does not "
                f"read it; allowed: null (a revision pins hub datasets)"
            ]
        )
    found: List[str] = []
    if ds.revision is not None and "revision" not in cls.settings:
        readers = sorted(k for k, c in _SOURCES.items() if "revision" in c.settings)
        found.append(
            f"dataset.revision={ds.revision!r}: dataset.kind={ds.kind} does not read it; allowed: null "
            f"(a revision pins datasets of kind {', '.join(readers)})"
        )
    if cls.Options is None:
        if ds.options:
            found.append(f"dataset.options={ds.options!r}: dataset.kind={ds.kind} takes no options; allowed: {{}}")
    else:
        found += problems(cls.Options, ds.options, "dataset.options")
    if found:
        return found
    return cls(ds).config_problems()


# Helpers for sources
def texts_in_split(texts: Iterable[Any], split: str) -> Iterator[List[str]]:
    """Batches of non-empty texts that belong to ``split``."""
    batch: List[str] = []
    for text in texts:
        if not isinstance(text, str) or not text.strip() or doc_split(text) != split:
            continue
        batch.append(text)
        if len(batch) >= _TOKENIZE_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize(lm: Any, texts: List[str]) -> List[List[int]]:
    if not texts:
        return []
    return lm.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def rows_text(rows: Iterable[dict], column: str, source: str) -> Iterator[Any]:
    """The ``column`` of each row; a row without it is a ValueError naming the columns it has."""
    for row in rows:
        if column not in row:
            raise ValueError(f"{source}: no column {column!r} (columns: {', '.join(row)}); set dataset.text_column")
        yield row[column]
