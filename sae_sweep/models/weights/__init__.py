"""Where a model's weights come from: one module per source, registered under the ``model.weights``
name that picks it (``base.py`` holds the protocol, the registry and the resolver).

* ``builtin``: ``model.hf_id=builtin:tiny``, built once per machine from ``models/tiny.py``;
* ``local``: a ``save_pretrained`` directory (``model.hf_id=/path/to/dir``);
* ``hub``: a hub id at ``model.revision`` (HF cache first);
* ``gguf``: a hub model's offline stand-in, a GGUF file shipped in a Python package (``model.gguf``).

``resolve(model, cache_dir)`` decides once which of them a model's weights come from and returns a
``ResolvedWeights`` (source, loadable directory, run-key identity, label) that is passed down to
whatever loads, names or keys the model.
"""

# Importing the modules registers the sources (base.AUTO_ORDER says in which order auto tries them).
from sae_sweep.models.weights import builtin, gguf, hub, local  # noqa: E402,F401
from sae_sweep.models.weights.base import (  # noqa: F401
    Loaded,
    ModelUnavailable,
    ResolvedWeights,
    WeightsSource,
    id_kind,
    model_config,
    register_weights,
    resolve,
    unavailable_message,
    weights_source,
    weights_sources,
)
