"""``local``: your own files -- jsonl / json / parquet / csv / txt through the matching ``datasets``
builder, or HTML pages read as prose (one document per prose paragraph, ``html_prose.py``).

HTML is a reader of ``local``, not a kind of its own: the format follows the files' extension, as
for every other format (the ``postgres_manual`` preset is ``kind: local`` over ``*.html``)."""

from __future__ import annotations

import glob
import hashlib
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from sae_sweep.data.corpus import EVAL_FRACTION_PERCENT, doc_split
from sae_sweep.data.html_prose import RULES as HTML_RULES
from sae_sweep.data.html_prose import read_paragraphs
from sae_sweep.data.sources.registry import DatasetUnavailable, TextSource, register_source, rows_text

# Builders of the `datasets` library by file extension (compression suffixes are ignored).
# "html" is ours (html_prose.py: one document per prose paragraph); the others are `datasets` builders.
BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".html": "html",
    ".htm": "html",
}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
# A document tokenizes to at most its UTF-8 bytes plus these: the EOS after it, and a leading-space
# token some tokenizers add (an upper bound: refusing on it never refuses text that would do).
TOKENS_PER_DOC_BEYOND_BYTES = 2


def builder_for(path: str) -> Optional[str]:
    name = path.lower()
    for comp in COMPRESSION:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return BUILDERS.get(os.path.splitext(name)[1])


def local_help() -> str:
    return "use local files instead: dataset=local dataset.data_files=[/path/a.jsonl,...] (dataset.text_column=text)"


def read_files(files: List[str]) -> Iterable[dict]:
    """Rows of local files of one format. Streaming: reads only as far as the budget needs and
    writes nothing to the HF cache."""
    builder = builder_for(files[0])
    if builder == "html":
        return ({"text": p} for f in files for p in read_paragraphs(f))
    import datasets

    return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)


_FILE_HASHES: Dict[tuple, str] = {}


def file_hash(path: str) -> str:
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


def dir_files(root: str) -> List[str]:
    """The data files (by extension) under a directory, hidden ones left out, in a fixed order."""
    return sorted(
        str(p)
        for p in Path(root).rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and builder_for(str(p)) is not None
    )


@register_source("local")
class LocalSource(TextSource):
    settings = ("data_files", "text_column")

    def files(self) -> List[str]:
        """``dataset.data_files`` with globs expanded (sorted per pattern)."""
        out: List[str] = []
        for f in self.ds.data_files or []:
            pattern = os.path.expanduser(str(f))
            out.extend(sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])
        return out

    def config_problems(self) -> List[str]:
        if not self.ds.data_files:
            return [
                "dataset.data_files is required for dataset=local: a list of jsonl/json/parquet/csv/txt "
                "paths, e.g. 'dataset.data_files=[/data/a.jsonl]'"
            ]
        return []

    def availability(self, documents: bool = True) -> List[str]:
        """Every data file exists and has a supported extension; with ``documents``, the files are
        read far enough to show both splits get text (``check_documents``)."""
        files = self.files()
        hint = f"; {self.ds.how_to_get}" if self.ds.how_to_get else ""
        if not files and self.ds.data_files:
            return [f"dataset.data_files={self.ds.data_files}: no file matches{hint}"]
        if not files:
            return [f"dataset.kind=local needs dataset.data_files=[...] ({', '.join(BUILDERS)})"]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            return [f"dataset.data_files: no such file(s): {', '.join(missing)}{hint}"]
        builders = {f: builder_for(f) for f in files}
        bad = [f for f, b in builders.items() if b is None]
        if bad:
            return [
                f"dataset.data_files: unsupported extension for {', '.join(bad)}; "
                f"allowed: {', '.join(BUILDERS)} (optionally compressed: {', '.join(COMPRESSION)})"
            ]
        if len(set(builders.values())) > 1:
            return [
                f"dataset.data_files mixes formats ({sorted(str(b) for b in set(builders.values()))}); use one format"
            ]
        if documents:
            try:
                self.check_documents(files)
            except DatasetUnavailable as e:
                return [str(e)]
        return []

    def check_documents(self, files: List[str]) -> None:
        """Read local files as a job would (file by file, so a problem names its file) until both
        splits have text: an empty or undecodable file, a missing text column, or a source that puts
        everything in one split is refused now, before any LM work. Reading stops once the held-out
        split has ``dataset.eval_tokens`` characters (a token is at least one character), so a large
        corpus is not read to its end."""
        column = self.ds.text_column
        need_eval = int(self.ds.eval_tokens)
        chars = {"train": 0, "eval": 0}
        docs = {"train": 0, "eval": 0}
        for f in files:
            if os.path.getsize(f) == 0:
                raise DatasetUnavailable(f"dataset.data_files: {f} is empty")
            seen = 0
            try:
                for text in rows_text(read_files([f]), column, f"dataset.data_files: {f}"):
                    if not isinstance(text, str) or not text.strip():
                        continue
                    seen += 1
                    split = doc_split(text)
                    docs[split] += 1
                    chars[split] += len(text)
                    if docs["train"] and chars["eval"] >= need_eval:
                        return
            except UnicodeDecodeError as e:
                raise DatasetUnavailable(
                    f"dataset.data_files: {f} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8"
                ) from None
            except DatasetUnavailable:
                raise
            except ValueError as e:  # a missing text column (our message)
                raise DatasetUnavailable(str(e)) from None
            except Exception as e:  # empty file (StopIteration inside the reader), malformed json/csv/parquet
                raise DatasetUnavailable(
                    f"dataset.data_files: cannot read {f} as {builder_for(f)} ({type(e).__name__}: {e or 'no rows'})"
                ) from None
            if seen == 0 and builder_for(f) != "html":  # an HTML page without prose paragraphs is normal
                raise DatasetUnavailable(f"dataset.data_files: {f} holds no text (no non-empty {column!r} values)")
        if not any(docs.values()):
            raise DatasetUnavailable(
                f"dataset.data_files: {', '.join(files)} hold no text (HTML: no paragraph reads "
                f"as prose, see sae_sweep/data/html_prose.py)"
            )
        if docs["eval"] == 0 or docs["train"] == 0:
            missing = "held-out (eval)" if docs["eval"] == 0 else "training"
            raise DatasetUnavailable(
                f"dataset.data_files: the {sum(docs.values())} document(s) in {', '.join(files)} all fall in one split, "
                f"so there is no {missing} text. Documents are split train/held-out (~{EVAL_FRACTION_PERCENT}%) by "
                f"a hash of their content: give the files more documents (txt: one per line)"
            )
        raise DatasetUnavailable(
            f"dataset.data_files: the held-out split of {', '.join(files)} has only {chars['eval']} characters, "
            f"fewer than dataset.eval_tokens={need_eval} tokens need; add text or lower dataset.eval_tokens"
        )

    def supply_problems(self, cache_tokens: int, budget: str) -> List[str]:
        """Refuse files whose training split cannot fill the cache, before any tokenizer is loaded:
        a token covers at least one byte of UTF-8 text, so a document gives at most its bytes plus
        its separator (EOS) and a leading-space token; each window of ``context_size`` holds BOS and
        ``context_size - 1`` of those tokens. Reading stops as soon as the bound is met."""
        ctx = int(self.ds.context_size)
        need = math.ceil(cache_tokens / ctx) * (ctx - 1)
        files, docs, nbytes = self.files(), 0, 0
        for text in rows_text(read_files(files), self.ds.text_column, "dataset.data_files"):
            if not isinstance(text, str) or not text.strip() or doc_split(text) != "train":
                continue
            docs += 1
            nbytes += len(text.encode("utf-8"))
            if nbytes + TOKENS_PER_DOC_BEYOND_BYTES * docs >= need:
                return []
        most = nbytes + TOKENS_PER_DOC_BEYOND_BYTES * docs
        return [
            f"dataset.data_files: the training split of {', '.join(files)} is {docs} document(s), {nbytes} bytes "
            f"of text: at most {most} tokens, but training needs {cache_tokens} tokens "
            f"({math.ceil(cache_tokens / ctx)} windows of {ctx}: {need} besides their BOS) for {budget}. "
            f"Add text, lower the budget, or raise train.epochs to repeat the data on purpose"
        ]

    def fingerprint(self, lm: Any) -> Dict[str, Any]:
        files = self.files()
        fp: Dict[str, Any] = {
            "text_column": self.ds.text_column,
            "data_files": [file_hash(f) if os.path.isfile(f) else f"missing:{f}" for f in files],
        }
        if files and builder_for(files[0]) == "html":
            fp["html"] = HTML_RULES
        return fp

    def record_source(self, lm: Any) -> Tuple[str, Dict[str, Any]]:
        # The configured paths/globs, not every file they match: MLflow refuses a source over 64 kB
        # (the PostgreSQL manual is ~1,200 pages). Which files, and their contents, are in the digest.
        files = [os.path.abspath(f) for f in self.files()]
        uri = files[0] if len(files) == 1 else os.path.commonpath(files) if files else ""
        patterns = [os.path.abspath(os.path.expanduser(str(f))) for f in self.ds.data_files or []]
        return "local", {"uri": uri, "data_files": patterns, "n_files": len(files)}

    def texts(self, cache_dir: str | os.PathLike) -> Iterable[Any]:
        problems = self.availability(documents=False)  # the documents were checked at validation
        if problems:
            raise DatasetUnavailable("\n".join(problems))
        return rows_text(read_files(self.files()), self.ds.text_column, "dataset.data_files")
