"""Packing the documents of a text source into fixed-length, BOS-prefixed token windows.

``token_windows(dataset, lm, split, n_tokens, cache_dir)`` returns a ``LongTensor[n_seqs,
context_size]``, ``n_seqs = ceil(n_tokens / context_size)``, drawn from the source ``dataset.kind``
names (``sae_sweep.data.sources``: builtin, local, hub, faithful, or one of your own). ``dataset``
is the typed ``DatasetConfig`` (a DictConfig or dict is parsed into one, once, on the way in).

BOS handling (recorded in every fingerprint as ``packing``): documents are tokenized without
special tokens and joined into one stream with EOS after each document; the stream is cut into
chunks of ``context_size - 1`` tokens, each prefixed by BOS. A chunk never starts with the
separator, so every window starts with exactly one BOS; EOS separators inside a window (which for
GPT-2-style tokenizers is the same token as BOS) are special tokens that the activation cache masks.

Splits: every document goes to ``train`` or ``eval`` by a stable hash of its content (~10% eval),
so the two splits are disjoint for every source and every budget.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Generator, Iterator, List, Optional

import numpy as np
import torch

from sae_sweep.config import DatasetConfig, stable_hash
from sae_sweep.data.corpus import EVAL_FRACTION_PERCENT, WindowPacker
from sae_sweep.data.faithful import Generations
from sae_sweep.data.sources import DatasetUnavailable, dataset_config, source_for
from sae_sweep.util.files import REPAIRED, atomic_write
from sae_sweep.util.progress import Progress

__all__ = [
    "SPLITS",
    "DatasetUnavailable",
    "NotEnoughText",
    "check_dataset_available",
    "dataset_fingerprint",
    "token_windows",
    "iter_split_documents",
    "generations",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
# Bump when packing or the split rule changes: window caches and fingerprints follow it.
PACKING = f"bos+(ctx-1) stream tokens, eos after each doc, no sep at window start; split sha1%100<{EVAL_FRACTION_PERCENT}=eval; v1"


class NotEnoughText(ValueError):
    """The source ran out before the requested number of tokens for a split."""


def generations(dataset: Any, lm: Any, cache_dir: str | os.PathLike) -> Generations:
    """The chunks of model-generated text a ``faithful`` dataset reads (see ``faithful.py``)."""
    return Generations(lm, dataset_config(dataset).generation, cache_dir)


def check_dataset_available(dataset: Any, documents: bool = True) -> None:
    """Fail fast (before any work) when the dataset cannot be read here: DatasetUnavailable with
    its source's messages (offline hub, missing or unreadable files); see each source's
    ``availability``."""
    problems = source_for(dataset).availability(documents=documents)
    if problems:
        raise DatasetUnavailable("\n".join(problems))


def dataset_fingerprint(dataset: Any, lm: Any = None) -> Dict[str, Any]:
    """Everything that changes the token windows except the budget and context size: the kind,
    the packing and what the source says decides its text.

    ``lm`` adds the tokenizer (hash, BOS/EOS ids); for ``faithful`` it is required, since the model
    itself is the source.
    """
    source = source_for(dataset)
    fp: Dict[str, Any] = {"kind": source.ds.kind, "packing": PACKING, **source.fingerprint(lm)}
    if lm is not None:
        fp.update(
            tokenizer_hash=lm.fingerprint.get("tokenizer_hash"),
            bos_token_id=lm.bos_token_id,
            sep_token_id=lm.eos_token_id,
        )
    return fp


def dataset_source(dataset: Any, lm: Any = None) -> tuple:
    """(source_type, source) of a text dataset in MLflow's dataset-source vocabulary, for the run
    page's dataset view: ``hugging_face`` (hub id, config, split, revision), ``local`` (a mirror
    directory or the data files), ``code`` (text this package makes: the built-in corpus, the
    model's own generations)."""
    return source_for(dataset).record_source(lm)


def iter_split_documents(
    dataset: Any, lm: Any, split: str, cache_dir: str | os.PathLike, progress: Any = None
) -> Generator[List[int], None, None]:
    """Token ids (no special tokens) of the documents of ``split``, in the source's order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed values are {', '.join(SPLITS)}")
    yield from source_for(dataset).documents(lm, split, cache_dir, progress)


# Windows
def windows_key(dataset: Any, lm: Any, split: str, n_tokens: Optional[int]) -> str:
    """The identity of a split's token windows: dataset fingerprint (source, tokenizer), split,
    budget (None: the whole split, streamed) and context size. It names the windows' file under
    ``<cache_dir>/tokens/``; its first 8 characters are the dataset digest shown in MLflow."""
    ds = dataset_config(dataset)
    return stable_hash(
        {"dataset": dataset_fingerprint(ds, lm), "split": split, "n_tokens": n_tokens, "context_size": ds.context_size}
    )


def _windows_path(ds: DatasetConfig, lm: Any, split: str, n_tokens: int, cache_dir: str | os.PathLike) -> Path:
    key = windows_key(ds, lm, split, n_tokens)
    name = ds.name.replace("/", "_")
    return Path(os.path.expanduser(str(cache_dir))) / "tokens" / f"{name}-{split}-{key}.npy"


def token_windows(dataset: Any, lm: Any, split: str, n_tokens: int, cache_dir: str | os.PathLike) -> torch.Tensor:
    """``LongTensor[ceil(n_tokens / context_size), context_size]`` windows of ``split``.

    Each window is BOS followed by ``context_size - 1`` tokens of the split's document stream.
    Cached on disk (keyed by the dataset fingerprint, split, budget and context size), since evals
    ask for the same windows again.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed values are {', '.join(SPLITS)}")
    ds = dataset_config(dataset)
    ctx = ds.context_size
    n_tokens = int(n_tokens)
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    path = _windows_path(ds, lm, split, n_tokens, cache_dir)
    if path.exists():
        windows = _load_windows(path)
        if windows is not None:
            return windows

    n_seqs = math.ceil(n_tokens / ctx)
    packer = WindowPacker(lm.bos_token_id, lm.eos_token_id, ctx, n_seqs)
    desc = f"tokenizing {ds.name}/{split}"
    with Progress(desc, total=n_seqs * (ctx - 1), unit="tok") as bar:
        docs = iter_split_documents(ds, lm, split, cache_dir, progress=bar)
        try:
            for ids in docs:
                packer.add(ids)
                if packer.full:
                    break
        finally:
            docs.close()  # releases a faithful generation lock, stops a stream
    if not packer.full:
        have = packer.row * ctx
        raise NotEnoughText(
            f"dataset {ds.name!r} has only ~{have} tokens "
            f"in its {split!r} split ({packer.row} windows of {ctx}), {n_tokens} requested; "
            f"lower dataset.tokens / dataset.eval_tokens or use a larger source"
        )
    windows = packer.result()
    buf = io.BytesIO()
    np.save(buf, windows.numpy().astype(np.int32))
    data = buf.getvalue()
    # The checksum goes in first: windows without a matching one are rebuilt, never used.
    meta = {
        "dataset": dataset_fingerprint(ds, lm),
        "split": split,
        "n_tokens": n_tokens,
        "context_size": ctx,
        "n_seqs": n_seqs,
        "bos_token_id": lm.bos_token_id,
        "sep_token_id": lm.eos_token_id,
        "packing": PACKING,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    atomic_write(path.with_suffix(".json"), json.dumps(meta, indent=2, default=str))
    atomic_write(path, data)
    return windows


def iter_windows(
    dataset: Any, lm: Any, split: str, cache_dir: str | os.PathLike, chunk: int = 256
) -> Iterator[torch.Tensor]:
    """The windows of ``split`` as a stream: LongTensors of ``chunk`` windows (the last may be
    shorter) until the source runs out. The same windows, in the same order, as ``token_windows``
    (which packs a fixed budget at once): the packer's leftover tokens carry over between chunks."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed values are {', '.join(SPLITS)}")
    ds = dataset_config(dataset)
    ctx = ds.context_size
    packer = WindowPacker(lm.bos_token_id, lm.eos_token_id, ctx, chunk)
    docs = iter_split_documents(ds, lm, split, cache_dir)
    try:
        for ids in docs:
            packer.add(ids)
            while packer.full:  # a long document can fill more than one chunk
                yield packer.result()
                full, packer = packer, WindowPacker(lm.bos_token_id, lm.eos_token_id, ctx, chunk)
                packer.continue_from(full)
    finally:
        docs.close()
    if packer.row:
        yield packer.out[: packer.row]


def _load_windows(path: Path) -> Optional[torch.Tensor]:
    """Cached windows, or None (after a warning) when the file does not match its recorded checksum."""
    why = None
    try:
        expected = json.loads(path.with_suffix(".json").read_text()).get("sha256")
        data = path.read_bytes()
        if expected is None:
            why = "no checksum recorded (written before windows were checksummed)"
        elif hashlib.sha256(data).hexdigest() != expected:
            why = "checksum mismatch (the file changed after it was written)"
        else:
            return torch.from_numpy(np.load(io.BytesIO(data)).astype(np.int64))
    except (OSError, ValueError) as e:
        why = f"unreadable ({type(e).__name__}: {e})"
    log.warning("token windows %s: %s; rebuilding them", path, why)
    REPAIRED.append(f"{path.name}: {why}")
    path.unlink(missing_ok=True)
    return None
