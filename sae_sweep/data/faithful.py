"""FaithfulSAE's dataset: text the model generates itself from BOS-only prompts, kept on disk in chunks.

Chunk ``i`` (``chunk_{i:06d}.npz``: ``batch_size`` samples, each cut at its first EOS) is drawn with
the seed ``(generation.seed, i)``, so it depends only on the model, the generation settings and
``i``. Any process may therefore write any chunk, in any order, and the text is the same: a
training job that reads chunks 0, 1, 2, ... and generates what is missing, or the shards of
``python -m sae_sweep.generate`` (SLURM array tasks) that fill the directory beforehand. Each chunk
is written atomically under its own lock (two writers never generate the same chunk at once); a
damaged chunk (the zip's CRC checks every byte) is generated again.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from sae_sweep.config import GenerationConfig, generation_identity, parse, stable_hash
from sae_sweep.data import sampling
from sae_sweep.data.corpus import EVAL_FRACTION_PERCENT, doc_split
from sae_sweep.util.files import REPAIRED, atomic_write
from sae_sweep.util.locks import OwnedLock

log = logging.getLogger(__name__)

VERSION = "faithful-v1"


class NoText(ValueError):
    """The model generates only empty sequences (EOS right after BOS)."""


class Generations:
    """The chunks of one (model, generation settings) under ``<cache_dir>/faithful/``.

    Not keyed by a budget: a larger budget extends the same directory and a smaller one reads a
    prefix of it."""

    def __init__(self, lm: Any, settings: GenerationConfig | Dict[str, Any], cache_dir: str | os.PathLike):
        """``settings``: ``dataset.generation`` (a mapping is checked against ``GenerationConfig``,
        whose defaults fill in what it leaves out)."""
        self.lm = lm
        self.settings = dataclasses.asdict(parse(GenerationConfig, settings, "dataset.generation"))
        key = stable_hash({"model": lm.fingerprint, "generation": self.identity, "version": VERSION})
        name = str(lm.fingerprint.get("name", "model")).replace("/", "_")
        self.root = Path(os.path.expanduser(str(cache_dir))) / "faithful" / f"{name}-{key}"

    @property
    def identity(self) -> Dict[str, Any]:
        """The settings that decide the text (the directory key, and the dataset fingerprint)."""
        return generation_identity(self.settings)

    def path(self, i: int) -> Path:
        return self.root / f"chunk_{i:06d}.npz"

    def chunk(self, i: int) -> Tuple[List[np.ndarray], bool]:
        """Chunk ``i``'s documents, generated (under the chunk's lock) when missing or damaged;
        and whether this call generated it."""
        while True:
            path = self.path(i)
            made = False
            if not path.exists():
                self.root.mkdir(parents=True, exist_ok=True)
                with OwnedLock(self.root / "locks" / f"{path.stem}.lock"):
                    if not path.exists():  # another process may have written it while we waited
                        self._write(i, self._generate(i))
                        made = True
                if made:
                    self._write_manifest()
            docs = self._read(path)
            if docs is not None:
                return docs, made
            # damaged: _read removed it; the next pass generates it again

    def documents(self, split: str, progress: Any = None) -> Iterator[List[int]]:
        """Token ids of the documents of ``split`` (by ``corpus.doc_split``), chunk 0 on, without end."""
        i = empty = 0
        while True:
            docs, _ = self.chunk(i)
            empty = 0 if any(len(d) for d in docs) else empty + 1
            if empty >= 3:
                raise NoText(f"{self.root}: the model generated only empty sequences (EOS right after BOS)")
            for doc in docs:
                if len(doc) and doc_split(doc.astype("<i4").tobytes()) == split:
                    if progress is not None:
                        progress.update(len(doc) + 1)
                    yield doc.tolist()
            i += 1

    def present(self) -> List[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.root.glob("chunk_*.npz"))

    # -- one chunk
    def _generate(self, i: int) -> List[np.ndarray]:
        s, lm = self.settings, self.lm
        seed = int(s["seed"]) * 1_000_003 + i  # chunk i is reproducible on its own
        bs = int(s["batch_size"])
        prompt = torch.full((bs, 1), lm.bos_token_id, dtype=torch.long, device=lm.device)
        if s["sampler"] == "exact_topk_first":
            out = sampling.generate(
                lm.model,
                prompt,
                max_new_tokens=int(s["max_new_tokens"]),
                temperature=float(s["temperature"]),
                top_p=float(s["top_p"]),
                repetition_penalty=float(s["repetition_penalty"]),
                eos_token_id=lm.eos_token_id,
                pad_token_id=lm.pad_token_id,
                generator=torch.Generator(device=lm.device).manual_seed(seed),
            )
        else:
            out = self._hf_generate(prompt, seed)
        docs = []
        for row in out[:, 1:].cpu().numpy():
            stop = np.nonzero(row == lm.eos_token_id)[0]
            docs.append((row[: stop[0]] if len(stop) else row).astype(np.int32))
        return docs

    def _hf_generate(self, prompt: torch.Tensor, seed: int) -> torch.Tensor:
        s, lm = self.settings, self.lm
        torch.manual_seed(seed)
        with torch.inference_mode():
            return lm.model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=float(s["temperature"]),
                top_p=float(s["top_p"]),
                top_k=0,
                repetition_penalty=float(s["repetition_penalty"]),
                max_new_tokens=int(s["max_new_tokens"]),
                min_new_tokens=0,
                eos_token_id=lm.eos_token_id,
                pad_token_id=lm.pad_token_id,
                use_cache=True,
            )

    def _write(self, i: int, docs: List[np.ndarray]) -> None:
        lengths = np.array([len(d) for d in docs], dtype=np.int32)
        tokens = np.concatenate(docs).astype(np.int32) if docs else np.zeros(0, dtype=np.int32)
        buf = io.BytesIO()
        np.savez(buf, tokens=tokens, lengths=lengths)
        atomic_write(self.path(i), buf.getvalue())

    @staticmethod
    def _read(path: Path) -> Optional[List[np.ndarray]]:
        """None (after a warning, the file removed) when the file is damaged."""
        try:
            with np.load(path) as z:
                tokens, lengths = z["tokens"], z["lengths"]
        except Exception as e:  # BadZipFile, CRC error, truncated file
            log.warning("generated chunk %s is damaged (%s: %s); generating it again", path, type(e).__name__, e)
            REPAIRED.append(f"{path.name}: {type(e).__name__}")
            path.unlink(missing_ok=True)
            return None
        return np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else []

    def _write_manifest(self) -> None:
        with OwnedLock(self.root / "locks" / "manifest.lock"):  # concurrent writers: the last one counts last
            chunks = len(self.present())
            manifest = {
                "version": VERSION,
                "model": self.lm.fingerprint,
                "generation": self.settings,
                "prompt": "BOS only",
                "chunks": chunks,
                "sequences": chunks * int(self.settings["batch_size"]),
            }
            atomic_write(self.root / "manifest.json", json.dumps(manifest, indent=2, default=str).encode())


def chunks_needed(train_tokens: int, eval_tokens: int, tokens_per_chunk: float, margin: float = 1.02) -> int:
    """Chunks whose documents cover ``train_tokens`` of the train split and ``eval_tokens`` of the
    eval split (documents go to eval with probability EVAL_FRACTION_PERCENT %), given the mean
    tokens a chunk holds (each document's tokens + its EOS separator)."""
    f = EVAL_FRACTION_PERCENT / 100
    total = max(train_tokens / (1 - f), eval_tokens / f) * margin
    return max(1, math.ceil(total / max(tokens_per_chunk, 1.0)))


def generate_shard(
    gens: Generations, shard: int, shards: int, train_tokens: int, eval_tokens: int, progress: Any = None
) -> Dict[str, Any]:
    """Make sure chunks ``shard, shard + shards, ...`` exist, up to the number the budgets need.

    That number is estimated from the chunks this shard has seen (their mean length), so shards
    may disagree by a chunk; a chunk nobody pre-generated is generated by the job that reads it."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard={shard}: allowed values are 0 .. shards-1 = {shards - 1}")
    seen = seen_tokens = made = made_tokens = 0
    seconds = 0.0
    i = shard
    needed = None
    while needed is None or i < needed:
        t0 = time.perf_counter()
        docs, generated = gens.chunk(i)
        tokens = sum(len(d) + 1 for d in docs)
        seen, seen_tokens = seen + 1, seen_tokens + tokens
        if generated:
            seconds += time.perf_counter() - t0
            made, made_tokens = made + 1, made_tokens + tokens
        needed = chunks_needed(train_tokens, eval_tokens, seen_tokens / seen)
        if progress is not None:
            progress.update(tokens)
        i += shards
    return {
        "shard": shard,
        "shards": shards,
        "chunks_needed": needed,
        "chunks_seen": seen,
        "chunks_generated": made,
        "tokens_generated": made_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(made_tokens / seconds, 1) if seconds else None,
        "mean_tokens_per_chunk": round(seen_tokens / max(seen, 1), 1),
    }
