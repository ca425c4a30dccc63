"""Whether the Hugging Face Hub is switched off here (the one place that reads the variables).

``HF_HUB_OFFLINE`` switches off every download; ``TRANSFORMERS_OFFLINE`` only models and
``HF_DATASETS_OFFLINE`` only datasets, as in the libraries themselves.
"""

from __future__ import annotations

import os
from typing import Literal

_TRUE = ("1", "true", "yes", "on")
_LIBRARY_VARIABLE = {"model": "TRANSFORMERS_OFFLINE", "dataset": "HF_DATASETS_OFFLINE"}


def hub_offline(kind: Literal["model", "dataset"]) -> bool:
    """True when the environment forbids downloading a ``kind`` from the Hub."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", _LIBRARY_VARIABLE[kind]))
