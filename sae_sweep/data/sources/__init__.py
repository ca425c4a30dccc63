"""Text sources behind one registry: ``dataset.kind`` names one (``registry.py`` says what a
source declares, and how a source of your own is named: ``module:kind``).

One module per kind: ``builtin`` (the standard library's docstrings, offline), ``local`` (your own
files; HTML pages read as prose), ``hub`` (a Hugging Face dataset, pinned by ``dataset.revision``),
``faithful`` (the model's own generations)."""

from sae_sweep.data.sources import builtin, faithful, hub, local  # noqa: F401,E402  (register the kinds)
from sae_sweep.data.sources.registry import (  # noqa: F401
    NOT_TEXT,
    DatasetUnavailable,
    TextSource,
    dataset_config,
    dataset_problems,
    is_text,
    register_source,
    source_class,
    source_for,
    source_kinds,
)
