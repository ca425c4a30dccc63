"""Text sources and packing into fixed-length, BOS-prefixed token windows.

``token_windows(dataset_cfg, lm, split, n_tokens, cache_dir)`` returns a ``LongTensor[n_seqs,
context_size]``, ``n_seqs = ceil(n_tokens / context_size)``, drawn from one of the sources
(``dataset.kind``):

* ``builtin``  the standard-library docstring corpus (offline, see ``corpus.py``);
* ``faithful`` text the model generates itself from BOS-only prompts, cached on disk in chunks
               (``faithful.py``);
* ``hub``      a Hugging Face dataset, streamed until the budget is met (``hf_id`` may also be a local
               directory holding a copy of the dataset's files: the same loading code, offline);
* ``local``    jsonl/json/parquet/csv/txt files through the matching ``datasets`` builder, or HTML
               pages (one document per prose paragraph, ``html_prose.py``).

BOS handling (recorded in every fingerprint as ``packing``): documents are tokenized without
special tokens and joined into one stream with EOS after each document; the stream is cut into
chunks of ``context_size - 1`` tokens, each prefixed by BOS. A chunk never starts with the
separator, so every window starts with exactly one BOS; EOS separators inside a window (which for
GPT-2-style tokenizers is the same token as BOS) are special tokens that the activation cache masks.

Splits: every document goes to ``train`` or ``eval`` by a stable hash of its content (~10% eval),
so the two splits are disjoint for every source and every budget.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch

from sae_sweep.config import stable_hash
from sae_sweep.data.faithful import GENERATION_DEFAULTS, Generations
from sae_sweep.data.faithful import VERSION as FAITHFUL_VERSION
from sae_sweep.util.files import REPAIRED, atomic_write
from sae_sweep.data.html_prose import RULES as HTML_RULES
from sae_sweep.data.html_prose import read_paragraphs
from sae_sweep.util.hub import hub_offline
from sae_sweep.data.corpus import (
    EVAL_FRACTION_PERCENT,
    WindowPacker,
    builtin_corpus_id,
    builtin_documents,
    doc_split,
)

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

# Builders of the `datasets` library by file extension (compression suffixes are ignored).
# "html" is ours (html_prose.py: one document per prose paragraph); the others are `datasets` builders.
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
             ".html": "html", ".htm": "html"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")

_TOKENIZE_BATCH = 128


class DatasetUnavailable(RuntimeError):
    """The dataset cannot be read here (offline hub id, missing local files)."""


class NotEnoughText(ValueError):
    """The source ran out before the requested number of tokens for a split."""


# Config access
def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    try:
        value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    except Exception:
        value = default
    return default if value is None else value


def _plain(node: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, (DictConfig, ListConfig)):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return node


def generations(dataset_cfg: Any, lm: Any, cache_dir: str | os.PathLike) -> Generations:
    """The chunks of model-generated text a ``faithful`` dataset reads (see ``faithful.py``)."""
    gen = _get(dataset_cfg, "generation", {}) or {}
    settings = {k: _plain(_get(gen, k, v)) for k, v in GENERATION_DEFAULTS.items()}
    return Generations(lm, settings, cache_dir)


def _data_files(dataset_cfg: Any) -> List[str]:
    files = _plain(_get(dataset_cfg, "data_files", None))
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    out: List[str] = []
    for f in files:
        pattern = os.path.expanduser(str(f))
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        out.extend(matches)
    return out


def _builder_for(path: str) -> Optional[str]:
    name = path.lower()
    for comp in _COMPRESSION:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return _BUILDERS.get(os.path.splitext(name)[1])


def _local_help() -> str:
    return "use local files instead: dataset=local dataset.data_files=[/path/a.jsonl,...] (dataset.text_column=text)"


# Availability and fingerprints
def check_dataset_available(dataset_cfg: Any, timeout: float = 10.0, documents: bool = True) -> None:
    """Fail fast (before any work) when the dataset cannot be read here.

    hub: offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) unless a non-streaming copy is in the HF
    cache, or the hub does not answer a metadata request within ``timeout`` seconds.
    local: every data file exists and has a supported extension; with ``documents``, the files
    are read far enough to show both splits get text (``check_local_documents``).
    """
    kind = _get(dataset_cfg, "kind")
    if kind == "hub":
        hf_id = _get(dataset_cfg, "hf_id")
        if not hf_id:
            raise DatasetUnavailable("dataset.kind=hub needs dataset.hf_id")
        if _hub_local_dir(dataset_cfg):
            if not _local_dir_files(hf_id):
                raise DatasetUnavailable(
                    f"dataset.hf_id={hf_id!r} is a local directory without data files "
                    f"({', '.join(_BUILDERS)}, optionally compressed)")
            return
        streaming = bool(_get(dataset_cfg, "streaming", True))
        if hub_offline("dataset"):
            if not streaming and _hub_dataset_cached(hf_id, _get(dataset_cfg, "revision")):
                return
            raise DatasetUnavailable(
                f"dataset {hf_id!r} is on the Hugging Face Hub and this machine is offline "
                f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); {_local_help()}")
        try:
            from huggingface_hub import HfApi

            HfApi().dataset_info(hf_id, revision=_get(dataset_cfg, "revision"), timeout=timeout)
        except Exception as e:  # DNS/connect errors, timeouts, 404, gated
            raise DatasetUnavailable(
                f"dataset {hf_id!r} is not reachable on the Hugging Face Hub ({type(e).__name__}: {e}); "
                f"{_local_help()}") from e
    elif kind == "local":
        files = _data_files(dataset_cfg)
        hint = _get(dataset_cfg, "how_to_get")
        hint = f"; {hint}" if hint else ""
        if not files and _plain(_get(dataset_cfg, "data_files")):
            raise DatasetUnavailable(f"dataset.data_files={_plain(_get(dataset_cfg, 'data_files'))}: no file matches{hint}")
        if not files:
            raise DatasetUnavailable(f"dataset.kind=local needs dataset.data_files=[...] ({', '.join(_BUILDERS)})")
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise DatasetUnavailable(f"dataset.data_files: no such file(s): {', '.join(missing)}{hint}")
        builders = {f: _builder_for(f) for f in files}
        bad = [f for f, b in builders.items() if b is None]
        if bad:
            raise DatasetUnavailable(
                f"dataset.data_files: unsupported extension for {', '.join(bad)}; "
                f"allowed: {', '.join(_BUILDERS)} (optionally compressed: {', '.join(_COMPRESSION)})")
        if len(set(builders.values())) > 1:
            raise DatasetUnavailable(f"dataset.data_files mixes formats ({sorted(set(builders.values()))}); use one format")
        if documents:
            check_local_documents(dataset_cfg, files)


def check_local_documents(dataset_cfg: Any, files: List[str]) -> None:
    """Read local files as a job would (file by file, so a problem names its file) until both
    splits have text: an empty or undecodable file, a missing text column, or a source that puts
    everything in one split is refused now, before any LM work. Reading stops once the held-out
    split has ``dataset.eval_tokens`` characters (a token is at least one character), so a large
    corpus is not read to its end."""
    column = _get(dataset_cfg, "text_column", "text")
    need_eval = int(_get(dataset_cfg, "eval_tokens", 1))
    chars = {"train": 0, "eval": 0}
    docs = {"train": 0, "eval": 0}
    for f in files:
        if os.path.getsize(f) == 0:
            raise DatasetUnavailable(f"dataset.data_files: {f} is empty")
        seen = 0
        try:
            for text in _rows_text(_read_files([f]), column, f"dataset.data_files: {f}"):
                if not isinstance(text, str) or not text.strip():
                    continue
                seen += 1
                split = doc_split(text)
                docs[split] += 1
                chars[split] += len(text)
                if docs["train"] and chars["eval"] >= need_eval:
                    return
        except UnicodeDecodeError as e:
            raise DatasetUnavailable(f"dataset.data_files: {f} is not UTF-8 text ({e.reason} at byte {e.start}); "
                                     f"convert it to UTF-8") from None
        except DatasetUnavailable:
            raise
        except ValueError as e:  # a missing text column (our message)
            raise DatasetUnavailable(str(e)) from None
        except Exception as e:  # empty file (StopIteration inside the reader), malformed json/csv/parquet
            raise DatasetUnavailable(f"dataset.data_files: cannot read {f} as {_builder_for(f)} "
                                     f"({type(e).__name__}: {e or 'no rows'})") from None
        if seen == 0 and _builder_for(f) != "html":  # an HTML page without prose paragraphs is normal
            raise DatasetUnavailable(f"dataset.data_files: {f} holds no text (no non-empty {column!r} values)")
    if not any(docs.values()):
        raise DatasetUnavailable(f"dataset.data_files: {', '.join(files)} hold no text (HTML: no paragraph reads "
                                 f"as prose, see sae_sweep/html_prose.py)")
    if docs["eval"] == 0 or docs["train"] == 0:
        missing = "held-out (eval)" if docs["eval"] == 0 else "training"
        raise DatasetUnavailable(
            f"dataset.data_files: the {sum(docs.values())} document(s) in {', '.join(files)} all fall in one split, "
            f"so there is no {missing} text. Documents are split train/held-out (~{EVAL_FRACTION_PERCENT}%) by "
            f"a hash of their content: give the files more documents (txt: one per line)")
    raise DatasetUnavailable(
        f"dataset.data_files: the held-out split of {', '.join(files)} has only {chars['eval']} characters, "
        f"fewer than dataset.eval_tokens={need_eval} tokens need; add text or lower dataset.eval_tokens")


def _hub_local_dir(dataset_cfg: Any) -> Optional[str]:
    """A hub dataset's files mirrored into a local directory (``dataset.hf_id=/data/fineweb``): the
    same ``datasets.load_dataset(hf_id, ...)`` call reads it, with no network."""
    hf_id = os.path.expanduser(str(_get(dataset_cfg, "hf_id", "")))
    return hf_id if hf_id and os.path.isdir(hf_id) else None


def _local_dir_files(root: str) -> List[str]:
    return sorted(str(p) for p in Path(root).rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
                  and _builder_for(str(p)) is not None)


def _hub_dataset_cached(hf_id: str, revision: Any) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(hf_id, repo_type="dataset", revision=revision, local_files_only=True)
        return True
    except Exception:
        return False


_FILE_HASHES: Dict[tuple, str] = {}


def _file_hash(path: str) -> str:
    """sha1 of a data file's bytes, memoised per (path, size, mtime) within the process."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha1()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def dataset_fingerprint(dataset_cfg: Any, lm: Any = None) -> Dict[str, Any]:
    """Everything that changes the token windows except the budget and context size.

    ``lm`` adds the tokenizer (hash, BOS/EOS ids); for ``faithful`` it is required, since the model
    itself is the source.
    """
    kind = _get(dataset_cfg, "kind")
    fp: Dict[str, Any] = {"kind": kind, "packing": PACKING}
    if kind == "builtin":
        fp["corpus"] = builtin_corpus_id()
    elif kind == "hub":
        fp.update(hf_id=_get(dataset_cfg, "hf_id"), hf_config=_get(dataset_cfg, "hf_config"),
                  split=_get(dataset_cfg, "split", "train"), text_column=_get(dataset_cfg, "text_column", "text"),
                  revision=_get(dataset_cfg, "revision"))
        local = _hub_local_dir(dataset_cfg)
        if local:  # a mirror's content, not its path, decides the tokens
            fp.update(hf_id=None, data_files=[_file_hash(f) for f in _local_dir_files(local)])
    elif kind == "local":
        files = _data_files(dataset_cfg)
        fp.update(text_column=_get(dataset_cfg, "text_column", "text"),
                  data_files=[_file_hash(f) if os.path.isfile(f) else f"missing:{f}" for f in files])
        if files and _builder_for(files[0]) == "html":
            fp["html"] = HTML_RULES
    elif kind == "faithful":
        if lm is None:
            raise ValueError("dataset_fingerprint of a faithful dataset needs the LanguageModel")
        gens = generations(dataset_cfg, lm, ".")
        fp.update(model=dict(lm.fingerprint), generation=gens.identity, version=FAITHFUL_VERSION)
    else:
        raise ValueError(f"dataset.kind={kind!r} is not a text source (builtin, faithful, hub, local)")
    if lm is not None:
        fp.update(tokenizer_hash=lm.fingerprint.get("tokenizer_hash"), bos_token_id=lm.bos_token_id,
                  sep_token_id=lm.eos_token_id)
    return fp


def dataset_source(dataset_cfg: Any, lm: Any = None) -> tuple:
    """(source_type, source) of a text dataset in MLflow's dataset-source vocabulary, for the run
    page's dataset view: ``hugging_face`` (hub id, config, split, revision), ``local`` (a mirror
    directory or the data files), ``code`` (text this package makes: the built-in corpus, the
    model's own generations)."""
    kind = _get(dataset_cfg, "kind")
    if kind == "hub":
        local = _hub_local_dir(dataset_cfg)
        if local:
            return "local", {"uri": os.path.abspath(local)}
        return "hugging_face", {"path": _get(dataset_cfg, "hf_id"), "config_name": _get(dataset_cfg, "hf_config"),
                                "split": _get(dataset_cfg, "split", "train"), "revision": _get(dataset_cfg, "revision")}
    if kind == "local":
        # The configured paths/globs, not every file they match: MLflow refuses a source over 64 kB
        # (the PostgreSQL manual is ~1,200 pages). Which files, and their contents, are in the digest.
        files = [os.path.abspath(f) for f in _data_files(dataset_cfg)]
        uri = files[0] if len(files) == 1 else os.path.commonpath(files) if files else ""
        patterns = _plain(_get(dataset_cfg, "data_files", None)) or []
        patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else patterns
        return "local", {"uri": uri, "data_files": [os.path.abspath(os.path.expanduser(str(f))) for f in patterns],
                         "n_files": len(files)}
    if kind == "builtin":
        return "code", {"tags": {"sae_sweep.dataset": "builtin", "corpus": builtin_corpus_id()}}
    if kind == "faithful":
        gen = _get(dataset_cfg, "generation") or {}
        tags = {"sae_sweep.dataset": "faithful", "version": str(FAITHFUL_VERSION),
                **{f"generation.{k}": str(_plain(_get(gen, k, v))) for k, v in GENERATION_DEFAULTS.items()}}
        if lm is not None:
            tags["model"] = str(lm.fingerprint.get("name", ""))
        return "code", {"tags": tags}
    raise ValueError(f"dataset.kind={kind!r} is not a text source (builtin, faithful, hub, local)")


# Documents of one split, as token ids
def _tokenize(lm: Any, texts: List[str]) -> List[List[int]]:
    if not texts:
        return []
    return lm.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _texts_in_split(texts: Iterable[Any], split: str) -> Iterator[List[str]]:
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


def _rows_text(rows: Iterable[dict], column: str, source: str) -> Iterator[Any]:
    for row in rows:
        if column not in row:
            raise ValueError(f"{source}: no column {column!r} (columns: {', '.join(row)}); set dataset.text_column")
        yield row[column]


def _hub_rows(dataset_cfg: Any) -> Iterable[dict]:
    import datasets

    check_dataset_available(dataset_cfg)
    kwargs = {}
    if _get(dataset_cfg, "revision"):
        kwargs["revision"] = _get(dataset_cfg, "revision")
    return datasets.load_dataset(
        _get(dataset_cfg, "hf_id"), _get(dataset_cfg, "hf_config"), split=_get(dataset_cfg, "split", "train"),
        streaming=bool(_get(dataset_cfg, "streaming", True)), **kwargs)


def _local_rows(dataset_cfg: Any) -> Iterable[dict]:
    check_dataset_available(dataset_cfg, documents=False)  # the documents were checked at validation
    return _read_files(_data_files(dataset_cfg))


def _read_files(files: List[str]) -> Iterable[dict]:
    """Rows of local files of one format. Streaming: reads only as far as the budget needs and
    writes nothing to the HF cache."""
    builder = _builder_for(files[0])
    if builder == "html":
        return ({"text": p} for f in files for p in read_paragraphs(f))
    import datasets

    return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)


def iter_split_documents(dataset_cfg: Any, lm: Any, split: str, cache_dir: str | os.PathLike,
                         progress: Any = None) -> Iterator[List[int]]:
    """Token ids (no special tokens) of the documents of ``split``, in the source's order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed values are {', '.join(SPLITS)}")
    kind = _get(dataset_cfg, "kind")
    if kind == "faithful":
        yield from generations(dataset_cfg, lm, cache_dir).documents(split, progress)
        return
    if kind == "builtin":
        texts: Iterable[Any] = builtin_documents(cache_dir)
    elif kind == "hub":
        column = _get(dataset_cfg, "text_column", "text")
        texts = _rows_text(_hub_rows(dataset_cfg), column, f"dataset {_get(dataset_cfg, 'hf_id')!r}")
    elif kind == "local":
        column = _get(dataset_cfg, "text_column", "text")
        texts = _rows_text(_local_rows(dataset_cfg), column, "dataset.data_files")
    else:
        raise ValueError(f"dataset.kind={kind!r} is not a text source (builtin, faithful, hub, local)")
    for batch in _texts_in_split(texts, split):
        for ids in _tokenize(lm, batch):
            if progress is not None:
                progress.update(len(ids) + 1)
            yield ids


# Windows
def windows_key(dataset_cfg: Any, lm: Any, split: str, n_tokens: Optional[int]) -> str:
    """The identity of a split's token windows: dataset fingerprint (source, tokenizer), split,
    budget (None: the whole split, streamed) and context size. It names the windows' file under
    ``<cache_dir>/tokens/``; its first 8 characters are the dataset digest shown in MLflow."""
    return stable_hash({"dataset": dataset_fingerprint(dataset_cfg, lm), "split": split,
                        "n_tokens": n_tokens, "context_size": int(_get(dataset_cfg, "context_size"))})


def _windows_path(dataset_cfg: Any, lm: Any, split: str, n_tokens: int, cache_dir: str | os.PathLike) -> Path:
    key = windows_key(dataset_cfg, lm, split, n_tokens)
    name = str(_get(dataset_cfg, "name", _get(dataset_cfg, "kind"))).replace("/", "_")
    return Path(os.path.expanduser(str(cache_dir))) / "tokens" / f"{name}-{split}-{key}.npy"


def token_windows(dataset_cfg: Any, lm: Any, split: str, n_tokens: int,
                  cache_dir: str | os.PathLike) -> torch.Tensor:
    """``LongTensor[ceil(n_tokens / context_size), context_size]`` windows of ``split``.

    Each window is BOS followed by ``context_size - 1`` tokens of the split's document stream.
    Cached on disk (keyed by the dataset fingerprint, split, budget and context size), since evals
    ask for the same windows again.
    """
    from tqdm.auto import tqdm

    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed values are {', '.join(SPLITS)}")
    ctx = int(_get(dataset_cfg, "context_size"))
    n_tokens = int(n_tokens)
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    path = _windows_path(dataset_cfg, lm, split, n_tokens, cache_dir)
    if path.exists():
        windows = _load_windows(path)
        if windows is not None:
            return windows

    n_seqs = math.ceil(n_tokens / ctx)
    packer = WindowPacker(lm.bos_token_id, lm.eos_token_id, ctx, n_seqs)
    desc = f"tokenizing {_get(dataset_cfg, 'name', _get(dataset_cfg, 'kind'))}/{split}"
    with tqdm(total=n_seqs * (ctx - 1), desc=desc, unit="tok", disable=None) as bar:
        docs = iter_split_documents(dataset_cfg, lm, split, cache_dir, progress=bar)
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
            f"dataset {_get(dataset_cfg, 'name', _get(dataset_cfg, 'kind'))!r} has only ~{have} tokens "
            f"in its {split!r} split ({packer.row} windows of {ctx}), {n_tokens} requested; "
            f"lower dataset.tokens / dataset.eval_tokens or use a larger source")
    windows = packer.result()
    buf = io.BytesIO()
    np.save(buf, windows.numpy().astype(np.int32))
    data = buf.getvalue()
    # The checksum goes in first: windows without a matching one are rebuilt, never used.
    meta = {"dataset": dataset_fingerprint(dataset_cfg, lm), "split": split, "n_tokens": n_tokens,
            "context_size": ctx, "n_seqs": n_seqs, "bos_token_id": lm.bos_token_id,
            "sep_token_id": lm.eos_token_id, "packing": PACKING, "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write(path.with_suffix(".json"), json.dumps(meta, indent=2, default=str))
    atomic_write(path, data)
    return windows


def iter_windows(dataset_cfg: Any, lm: Any, split: str, cache_dir: str | os.PathLike,
                 chunk: int = 256) -> Iterator[torch.Tensor]:
    """The windows of ``split`` as a stream: LongTensors of ``chunk`` windows (the last may be
    shorter) until the source runs out. The same windows, in the same order, as ``token_windows``
    (which packs a fixed budget at once): the packer's leftover tokens carry over between chunks."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed values are {', '.join(SPLITS)}")
    ctx = int(_get(dataset_cfg, "context_size"))
    packer = WindowPacker(lm.bos_token_id, lm.eos_token_id, ctx, chunk)
    docs = iter_split_documents(dataset_cfg, lm, split, cache_dir)
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
        yield packer.out[:packer.row]


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
