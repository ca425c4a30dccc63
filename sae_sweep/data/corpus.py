"""Shared low-level text helpers: the built-in offline corpus, the stable train/eval split and
BOS-prefixed window packing.

The built-in corpus is the docstrings of the Python standard library: every Python install has
it, it needs no network, and it is English prose mixed with code, which is enough to train the
`tiny` model and to give SAEs something text-like to look at. Its content depends on the exact
Python build, so the on-disk cache and all fingerprints are keyed by ``sys.version``.

This module sits below both ``lm.py`` (the tiny model is trained on the corpus) and ``text.py``
(which serves it as a dataset), so it imports neither.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import json
import logging
import os
import pkgutil
import re
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence

import torch

from sae_sweep.util.files import atomic_write

__all__ = [
    "CORPUS_VERSION",
    "EVAL_FRACTION_PERCENT",
    "builtin_corpus_id",
    "builtin_documents",
    "collect_stdlib_docstrings",
    "doc_split",
    "WindowPacker",
]

log = logging.getLogger(__name__)

# Bump when the collection rules change: the cache file name and every fingerprint follow it.
CORPUS_VERSION = "v1"

# ~10% of documents go to the held-out split.
EVAL_FRACTION_PERCENT = 10

# Modules whose import has side effects (opens a browser, prints, starts a REPL), needs a
# display, or is test scaffolding rather than documentation.
_SKIP_TOP = {
    "antigravity",
    "this",
    "__hello__",
    "__phello__",
    "idlelib",
    "tkinter",
    "_tkinter",
    "turtle",
    "turtledemo",
    "test",
    "lib2to3",
    "ensurepip",
    "venv",
    "readline",
    "pydoc_data",
    "xxsubtype",
    "xxlimited",
    "xxlimited_35",
    "msvcrt",
    "winreg",
    "winsound",
    "nt",
    "_winapi",
    "_overlapped",
    "_msi",
    "msilib",
    "__future__",
    "encodings",
    "sre_compile",
    "sre_parse",
    "sre_constants",
}
_SKIP_PART = re.compile(r"(^|\.)(__main__|_?tests?|_test\w*|test_\w*|idle_test)($|\.)")

# Docstrings shorter than this are mostly auto-generated one-liners ("Return self==value.").
_MIN_DOC_CHARS = 40


# The built-in corpus
def builtin_corpus_id() -> str:
    """Identifies the corpus content without building it: rules version + exact Python build."""
    ver = hashlib.sha1(sys.version.encode()).hexdigest()[:10]
    return f"stdlib-docstrings-{CORPUS_VERSION}-py{sys.version_info.major}{sys.version_info.minor}-{ver}"


def _normalise(doc: str) -> str:
    """Dedent (cleandoc), strip trailing spaces, collapse runs of blank lines."""
    text = inspect.cleandoc(doc)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _module_names() -> List[str]:
    """A fixed, sorted list of importable stdlib modules and their submodules (not imported yet)."""
    names: List[str] = []
    for top in sorted(sys.stdlib_module_names):
        if top in _SKIP_TOP or _SKIP_PART.search(top):
            continue
        names.append(top)
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        # iter_modules lists a package directory without importing anything; recurse by hand so
        # that the walk never imports a package we would skip.
        stack = [(top, list(spec.submodule_search_locations))]
        while stack:
            pkg, paths = stack.pop()
            for info in sorted(pkgutil.iter_modules(paths), key=lambda m: m.name):
                full = f"{pkg}.{info.name}"
                if _SKIP_PART.search(full):
                    continue
                names.append(full)
                if info.ispkg:
                    stack.append((full, [os.path.join(p, info.name) for p in paths]))
    return sorted(set(names))


def _object_docs(modname: str, module: Any) -> Iterator[Optional[str]]:
    """Docstrings of a module, its functions, its classes and their methods/properties.

    Only objects defined in this module (``__module__`` matches), so re-exports are not walked twice;
    ``__doc__`` directly rather than ``inspect.getdoc`` so inherited docstrings are not repeated.
    """
    yield getattr(module, "__doc__", None)
    try:
        members = sorted(vars(module).items())
    except TypeError:
        return
    for _name, obj in members:
        try:
            if getattr(obj, "__module__", None) != modname:
                continue
            if inspect.isroutine(obj):
                yield obj.__doc__
            elif inspect.isclass(obj):
                yield obj.__doc__
                for _attr, member in sorted(vars(obj).items()):
                    if isinstance(member, (classmethod, staticmethod)):
                        member = member.__func__
                    if isinstance(member, property):
                        member = member.fget
                    # Skip methods patched in by third-party packages (e.g. transformers adds
                    # methods to logging.Logger), so the corpus does not depend on imports.
                    owner = getattr(member, "__module__", None)
                    if isinstance(owner, str) and owner != modname:
                        continue
                    if inspect.isroutine(member):
                        yield member.__doc__
        except Exception:  # exotic objects whose attribute access raises: skip them
            continue


def collect_stdlib_docstrings() -> List[str]:
    """Walk the standard library in a fixed order; normalised, deduplicated docstrings in hash order."""
    seen: set = set()
    docs: List[str] = []
    sink = io.StringIO()
    for modname in _module_names():
        try:
            # Silence modules that print or warn (deprecations) on import.
            with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
                warnings.simplefilter("ignore")
                module = importlib.import_module(modname)
        except BaseException as e:  # ImportError, platform-specific failures, SystemExit
            if isinstance(e, KeyboardInterrupt):
                raise
            continue
        with warnings.catch_warnings():  # deprecated aliases (typing.io) warn on attribute access
            warnings.simplefilter("ignore")
            raws = list(_object_docs(modname, module))
        for raw in raws:
            if not isinstance(raw, str):
                continue
            text = _normalise(raw)
            if len(text) < _MIN_DOC_CHARS or text in seen:
                continue
            seen.add(text)
            docs.append(text)
    # Canonical order by content hash: which module a shared docstring is first met in can depend
    # on what the process imported before, the set of documents does not.
    docs.sort(key=lambda d: hashlib.sha1(d.encode("utf-8")).digest())
    return docs


def builtin_documents(cache_dir: str | os.PathLike) -> List[str]:
    """The built-in corpus (list of documents), built once and cached under ``<cache_dir>/text/``.

    Concurrent builders produce identical content, so an atomic rename is enough (no lock).
    """
    path = Path(os.path.expanduser(str(cache_dir))) / "text" / f"{builtin_corpus_id()}.jsonl"
    if path.exists():
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    docs = collect_stdlib_docstrings()
    n_chars = sum(len(d) for d in docs)
    log.info("built-in corpus: %d docstrings, %d characters -> %s", len(docs), n_chars, path)
    blob = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    atomic_write(path, blob)
    return docs


# Train / eval split
def doc_split(doc: str | bytes) -> str:
    """``"eval"`` for ~10% of documents, ``"train"`` otherwise, by a stable hash of the content.

    Content-addressed (not positional), so the split of a document never depends on which source,
    order or budget produced it, and identical documents always land on the same side.
    """
    data = doc.encode("utf-8") if isinstance(doc, str) else bytes(doc)
    bucket = int.from_bytes(hashlib.sha1(data).digest()[:8], "big") % 100
    return "eval" if bucket < EVAL_FRACTION_PERCENT else "train"


# Packing
class WindowPacker:
    """Packs tokenized documents into ``[BOS] + (context_size - 1)`` token windows.

    Documents (tokenized without special tokens) are joined into one stream with ``sep_id`` after
    each document; the stream is cut into chunks of ``context_size - 1`` tokens and each chunk is
    prefixed with BOS. A chunk never starts with the separator (it is dropped there), so every
    window starts with exactly one BOS even for models where BOS == EOS (GPT-2, Pythia, tiny);
    separators inside a window mark document boundaries and are special tokens for the cache.
    """

    def __init__(self, bos_id: int, sep_id: int, context_size: int, n_seqs: int):
        if context_size < 2:
            raise ValueError(f"context_size must be >= 2 (BOS + at least one token), got {context_size}")
        self.bos_id = int(bos_id)
        self.sep_id = int(sep_id)
        self.body = context_size - 1
        self.n_seqs = int(n_seqs)
        self.out = torch.empty((self.n_seqs, context_size), dtype=torch.long)
        self.out[:, 0] = self.bos_id
        self.row = 0
        self._buf: List[int] = []

    @property
    def full(self) -> bool:
        return self.row >= self.n_seqs

    def add(self, token_ids: Sequence[int]) -> None:
        """Append one document (ids without special tokens); empty documents are ignored."""
        if self.full or len(token_ids) == 0:
            return
        self._buf.extend(int(t) for t in token_ids)
        self._buf.append(self.sep_id)
        self._cut()

    def _cut(self) -> None:
        """Fill windows from the buffered stream while it holds a whole window body."""
        buf, pos = self._buf, 0
        while not self.full:
            # No window body starts with the separator: drop it at a chunk boundary.
            while pos < len(buf) and buf[pos] == self.sep_id:
                pos += 1
            if len(buf) - pos < self.body:
                break
            self.out[self.row, 1:] = torch.tensor(buf[pos : pos + self.body], dtype=torch.long)
            pos += self.body
            self.row += 1
        del buf[:pos]

    def continue_from(self, other: WindowPacker) -> None:
        """Continue ``other``'s stream (a full packer): its leftover tokens come first, so a stream
        cut into several packers gives the windows one large packer would."""
        self._buf = list(other._buf)
        self._cut()

    def add_many(self, docs: Iterable[Sequence[int]]) -> None:
        for d in docs:
            if self.full:
                break
            self.add(d)

    def result(self) -> torch.Tensor:
        if not self.full:
            raise ValueError(f"only {self.row} of {self.n_seqs} windows filled")
        return self.out
