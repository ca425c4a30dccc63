"""A text source from outside the package (tests/test_sources.py): markdown notes, one document per
section. It registers itself the way a user's module would; a dataset yaml names it as
``kind: source_plugin:sections`` and its settings live under ``dataset.options``."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Tuple

from omegaconf import MISSING

from sae_sweep.config import setting
from sae_sweep.data.sources import TextSource, register_source


@dataclass
class SectionsOptions:
    path: str = MISSING  # a markdown file
    min_words: int = setting(5, allowed="a positive integer", check=lambda v: v > 0)  # shorter sections are dropped


@register_source("sections")
class SectionsSource(TextSource):
    Options = SectionsOptions

    def availability(self, documents: bool = True) -> List[str]:
        path = self.options.path
        if not os.path.isfile(path):
            return [f"dataset.options.path={path!r}: no such file"]
        return []

    def fingerprint(self, lm: Any) -> Dict[str, Any]:
        with open(self.options.path, "rb") as fh:
            digest = hashlib.sha1(fh.read()).hexdigest()
        return {"file": digest, "min_words": self.options.min_words}

    def record_source(self, lm: Any) -> Tuple[str, Dict[str, Any]]:
        return "local", {"uri": os.path.abspath(self.options.path)}

    def texts(self, cache_dir: str | os.PathLike) -> Iterable[Any]:
        section: List[str] = []
        with open(self.options.path, encoding="utf-8") as fh:
            for line in [*fh, "# end\n"]:
                if line.startswith("#"):
                    text = " ".join(" ".join(section).split())
                    if len(text.split()) >= self.options.min_words:
                        yield text
                    section = []
                else:
                    section.append(line)
