"""Checksums of the files the tool trusts later, and the stat check that avoids re-hashing them.

Two ideas, each written once here:

* ``StatMemo``: per file, a value (e.g. its sha256, or "its checksum matched") remembered together
  with the (size, mtime_ns, inode) the file had then. While the stat is unchanged the value is
  reused (a stat per file, ~2 µs); any change to one of the three re-computes it. The activation
  cache remembers which shards matched their manifest this way, and the LM weights their sha256.
* ``SHA256SUMS.json`` beside files written with ``atomic_write(..., record_sha256=True)``: the
  sha256 of each file as it was written. ``verify_recorded`` refuses a file whose bytes changed
  since (``ChecksumMismatch`` names the file, the digests and the record). Checkpoints and the SAE
  artifact are written this way.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from sae_sweep.util.files import Content, atomic_write, atomic_write_json, sha256_file

__all__ = [
    "SUMS_FILE",
    "ChecksumMismatch",
    "StatMemo",
    "file_stamp",
    "files_sha256",
    "read_recorded",
    "record_sha256",
    "verify_recorded",
    "write_with_sha256",
]

log = logging.getLogger(__name__)

SUMS_FILE = "SHA256SUMS.json"


def file_stamp(path: str | os.PathLike) -> List[int]:
    """(size, mtime_ns, inode) of ``path`` (symlinks followed): what changes when its bytes do,
    unless someone restores all three on purpose."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class StatMemo:
    """Values computed from files, remembered in one JSON file with each file's stamp
    (``file_stamp``) at the time. ``get`` returns the remembered value while the stamp is the same,
    else computes, remembers and returns it; ``save`` writes the memo back (only when it changed;
    a read-only place is logged, not fatal: the next process computes again)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries = self._read()
        self._changed = False

    def _read(self) -> Dict[str, Dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        # entries of another shape (an older memo) are left out: their files are checked again
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict) and "stamp" in v and "value" in v}

    def cached(self, key: str, path: str | os.PathLike) -> Optional[Any]:
        """The value remembered for ``key`` if ``path`` still has the stamp it had then."""
        entry = self._entries.get(key)
        return entry["value"] if entry is not None and entry["stamp"] == file_stamp(path) else None

    def remember(self, key: str, path: str | os.PathLike, value: Any) -> None:
        entry = {"stamp": file_stamp(path), "value": value}
        if self._entries.get(key) != entry:
            self._entries[key] = entry
            self._changed = True

    def get(self, key: str, path: str | os.PathLike, compute: Callable[[Path], Any]) -> Any:
        found = self.cached(key, path)
        if found is None:
            found = compute(Path(path))
            self.remember(key, path, found)
        return found

    def keep_only(self, keys: Iterable[str]) -> None:
        """Forget entries not in ``keys`` (files that are no longer there)."""
        keep = set(keys)
        gone = [k for k in self._entries if k not in keep]
        for k in gone:
            del self._entries[k]
        self._changed = self._changed or bool(gone)

    def save(self) -> None:
        if not self._changed:
            return
        try:
            atomic_write_json(self.path, self._entries, sort_keys=True)
            self._changed = False
        except OSError as e:  # read-only: the files are still checked, just not remembered
            log.info("cannot record file checks in %s (%s)", self.path, e)


def files_sha256(paths: Iterable[str | os.PathLike], memo_path: str | os.PathLike) -> Dict[str, str]:
    """sha256 of each file (by absolute path, symlinks resolved: a hub snapshot links to its blobs),
    hashed once and remembered in the ``StatMemo`` at ``memo_path`` until its size, mtime or inode
    changes."""
    memo = StatMemo(memo_path)
    out: Dict[str, str] = {}
    for p in paths:
        real = Path(p).resolve()
        out[str(p)] = memo.get(str(real), real, sha256_file)
    memo.save()
    return out


# -- checksums written with a file -------------------------------------------------------------


class ChecksumMismatch(RuntimeError):
    """A file's bytes differ from the sha256 recorded when it was written."""


def read_recorded(directory: str | os.PathLike) -> Optional[Dict[str, List[str]]]:
    """``<directory>/SHA256SUMS.json`` (file name -> accepted sha256s), None when there is none."""
    path = Path(directory) / SUMS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ChecksumMismatch(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    return {str(k): [str(d) for d in (v if isinstance(v, list) else [v])] for k, v in data.items()}


def record_sha256(directory: str | os.PathLike, digests: Dict[str, List[str]]) -> None:
    """Merge ``digests`` (file name -> accepted sha256s; none: the name is dropped) into
    ``<directory>/SHA256SUMS.json``."""
    sums = read_recorded(directory) or {}
    for name, ds in digests.items():
        sums[name] = list(dict.fromkeys(d for d in ds if d))
        if not sums[name]:
            del sums[name]
    atomic_write_json(Path(directory) / SUMS_FILE, sums, sort_keys=True)


def write_with_sha256(
    path: str | os.PathLike,
    content: Content,
    keep_previous: str | os.PathLike | None = None,
    needed: int | None = None,
) -> Path:
    """``atomic_write`` that records the new file's sha256 in its directory's ``SHA256SUMS.json``.

    The record is updated before the renames so that whatever a crash leaves is accepted: while
    the renames run, ``path`` may hold the old or the new bytes and ``keep_previous`` the old
    previous or the old ``path``, so the record accepts both for each name; once both renames are
    done it is narrowed to the one file each name holds. ``keep_previous`` must be in ``path``'s
    directory. ``needed``: as for ``atomic_write`` (a write that runs out of space says so)."""
    path = Path(path)
    prev = Path(keep_previous) if keep_previous is not None else None
    if prev is not None and prev.parent != path.parent:
        raise ValueError(f"keep_previous={prev} must be in the directory of {path}")
    final: Dict[str, List[str]] = {}

    def record(tmp: Path) -> None:
        sums = read_recorded(path.parent) or {}
        new, old = sha256_file(tmp), sums.get(path.name, []) if path.exists() else []
        during = {path.name: [new, *old]}
        final[path.name] = [new]
        if prev is not None and path.exists():  # old is [] for a file written before records: unverifiable
            during[prev.name] = [*old, *sums.get(prev.name, [])]
            final[prev.name] = old
        record_sha256(path.parent, during)

    atomic_write(path, content, keep_previous=prev, before_rename=record, needed=needed)
    record_sha256(path.parent, final)
    return path


def verify_recorded(path: str | os.PathLike, what: str = "") -> bool:
    """Check ``path`` against the sha256 recorded beside it. True when it matches; False when its
    directory has no record at all (a file written before records existed: read as before, with a
    warning); ``ChecksumMismatch`` when the record lacks the file or its bytes changed. ``what``
    (e.g. "run 1a2b") is named in the message."""
    path = Path(path)
    sums = read_recorded(path.parent)
    where = f" ({what})" if what else ""
    if sums is None:
        log.warning("%s%s has no recorded checksum (%s is missing): not verified", path, where, SUMS_FILE)
        return False
    if path.name not in sums:
        raise ChecksumMismatch(f"{path}{where}: no checksum recorded for it in {path.parent / SUMS_FILE}")
    actual = sha256_file(path)
    if actual not in sums[path.name]:
        raise ChecksumMismatch(
            f"{path}{where} changed after it was written: sha256 {actual[:16]}..., recorded "
            f"{', '.join(d[:16] + '...' for d in sums[path.name])} in {SUMS_FILE}"
        )
    return True
