"""``faithful``: text the configured model generates itself from BOS-only prompts (FaithfulSAE),
kept on disk in chunks (``sae_sweep/data/faithful.py``); ``dataset.generation`` says how."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Iterator, List, Tuple

from sae_sweep.data.faithful import VERSION, Generations
from sae_sweep.data.sources.registry import TextSource, register_source


@register_source("faithful")
class FaithfulSource(TextSource):
    settings = ("generation",)

    def generations(self, lm: Any, cache_dir: str | os.PathLike) -> Generations:
        return Generations(lm, self.ds.generation, cache_dir)

    def fingerprint(self, lm: Any) -> Dict[str, Any]:
        if lm is None:
            raise ValueError("dataset_fingerprint of a faithful dataset needs the LanguageModel")
        return {"model": dict(lm.fingerprint), "generation": self.generations(lm, ".").identity, "version": VERSION}

    def record_source(self, lm: Any) -> Tuple[str, Dict[str, Any]]:
        tags = {
            "sae_sweep.dataset": "faithful",
            "version": str(VERSION),
            **{f"generation.{k}": str(v) for k, v in dataclasses.asdict(self.ds.generation).items()},
        }
        if lm is not None:
            tags["model"] = str(lm.fingerprint.get("name", ""))
        return "code", {"tags": tags}

    def documents(self, lm: Any, split: str, cache_dir: str | os.PathLike, progress: Any = None) -> Iterator[List[int]]:
        yield from self.generations(lm, cache_dir).documents(split, progress)
