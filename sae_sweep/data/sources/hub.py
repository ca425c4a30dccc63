"""``hub``: a Hugging Face dataset (``dataset.hf_id``, ``hf_config``, ``split``), streamed until the
budget is met, pinned to ``dataset.revision`` when one is set (a commit sha, tag or branch: a live
dataset such as fineweb then reads the same text in every job). ``hf_id`` may also be a local
directory holding a copy of the dataset's files: the same loading code, offline."""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

from sae_sweep.data.sources.local import BUILDERS, dir_files, file_hash, local_help
from sae_sweep.data.sources.registry import DatasetUnavailable, TextSource, register_source, rows_text
from sae_sweep.util.hub import hub_offline

TIMEOUT_S = 10.0  # for the hub's answer to a metadata request


@register_source("hub")
class HubSource(TextSource):
    settings = ("hf_id", "hf_config", "split", "text_column", "streaming", "revision")

    def local_dir(self) -> Optional[str]:
        """A hub dataset's files mirrored into a local directory (``dataset.hf_id=/data/fineweb``): the
        same ``datasets.load_dataset(hf_id, ...)`` call reads it, with no network."""
        hf_id = os.path.expanduser(self.ds.hf_id or "")
        return hf_id if hf_id and os.path.isdir(hf_id) else None

    def what(self) -> str:
        """The dataset as messages name it: its id, and its revision when one is pinned."""
        at = f" at revision {self.ds.revision!r}" if self.ds.revision else ""
        return f"dataset {self.ds.hf_id!r}{at}"

    def config_problems(self) -> List[str]:
        if not self.ds.hf_id:
            return [
                "dataset.hf_id: required for dataset.kind=hub; allowed: a Hugging Face dataset id "
                "(HuggingFaceFW/fineweb) or a directory holding a copy of its files"
            ]
        if self.ds.revision is not None and self.local_dir():
            return [
                f"dataset.revision={self.ds.revision!r}: dataset.hf_id={self.ds.hf_id} is a local directory, "
                f"which has no revisions; allowed: null"
            ]
        return []

    def availability(self, documents: bool = True, timeout: float = TIMEOUT_S) -> List[str]:
        """Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) unless a non-streaming copy is in the HF
        cache, or the hub does not answer a metadata request within ``timeout`` seconds."""
        found = self.config_problems()
        if found:
            return found
        ds = self.ds
        if self.local_dir():
            if not dir_files(str(ds.hf_id)):
                return [
                    f"dataset.hf_id={ds.hf_id!r} is a local directory without data files "
                    f"({', '.join(BUILDERS)}, optionally compressed)"
                ]
            return []
        if hub_offline("dataset"):
            if not ds.streaming and _cached(str(ds.hf_id), ds.revision):
                return []
            return [
                f"{self.what()} is on the Hugging Face Hub and this machine is offline "
                f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); {local_help()}"
            ]
        try:
            from huggingface_hub import HfApi

            HfApi().dataset_info(str(ds.hf_id), revision=ds.revision, timeout=timeout)
        except Exception as e:  # DNS/connect errors, timeouts, 404 (also: no such revision), gated
            return [f"{self.what()} is not reachable on the Hugging Face Hub ({type(e).__name__}: {e}); {local_help()}"]
        return []

    def fingerprint(self, lm: Any) -> Dict[str, Any]:
        ds = self.ds
        fp: Dict[str, Any] = {
            "hf_id": ds.hf_id,
            "hf_config": ds.hf_config,
            "split": ds.split,
            "text_column": ds.text_column,
            "revision": ds.revision,
        }
        local = self.local_dir()
        if local:  # a mirror's content, not its path, decides the tokens
            fp.update(hf_id=None, data_files=[file_hash(f) for f in dir_files(local)])
        return fp

    def record_source(self, lm: Any) -> Tuple[str, Dict[str, Any]]:
        local = self.local_dir()
        if local:
            return "local", {"uri": os.path.abspath(local)}
        ds = self.ds
        return "hugging_face", {
            "path": ds.hf_id,
            "config_name": ds.hf_config,
            "split": ds.split,
            "revision": ds.revision,
        }

    def texts(self, cache_dir: str | os.PathLike) -> Iterable[Any]:
        import datasets

        problems = self.availability()
        if problems:
            raise DatasetUnavailable("\n".join(problems))
        ds = self.ds
        kwargs = {"revision": ds.revision} if ds.revision else {}
        rows = datasets.load_dataset(ds.hf_id, ds.hf_config, split=ds.split, streaming=ds.streaming, **kwargs)
        return rows_text(rows, ds.text_column, self.what())


def _cached(hf_id: str, revision: Optional[str]) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(hf_id, repo_type="dataset", revision=revision, local_files_only=True)
        return True
    except Exception:
        return False
