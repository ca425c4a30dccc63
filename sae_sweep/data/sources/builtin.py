"""``builtin``: docstrings of the Python standard library (offline, ``corpus.py``)."""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Tuple

from sae_sweep.data.corpus import builtin_corpus_id, builtin_documents
from sae_sweep.data.sources.registry import TextSource, register_source


@register_source("builtin")
class BuiltinSource(TextSource):
    settings = ()

    def fingerprint(self, lm: Any) -> Dict[str, Any]:
        return {"corpus": builtin_corpus_id()}

    def record_source(self, lm: Any) -> Tuple[str, Dict[str, Any]]:
        return "code", {"tags": {"sae_sweep.dataset": "builtin", "corpus": builtin_corpus_id()}}

    def texts(self, cache_dir: str | os.PathLike) -> Iterable[Any]:
        return builtin_documents(cache_dir)
