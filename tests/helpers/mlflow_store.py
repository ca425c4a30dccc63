"""The sqlite MLflow store a job writes to (``<output_dir>/mlflow.db``), read with a real client."""

from __future__ import annotations

from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient


def store_uri(directory: Path) -> str:
    """The tracking URI of ``<directory>/mlflow.db``."""
    return f"sqlite:///{directory / 'mlflow.db'}"


def store_client(directory: Path) -> MlflowClient:
    return MlflowClient(store_uri(directory))


def store_runs(
    directory: Path, experiment: str, kind: str | None = None, client: MlflowClient | None = None
) -> list[Run]:
    """The runs of ``experiment`` (none when it does not exist yet), in the store's order; ``kind``
    keeps those whose ``sae_sweep.kind`` tag is ``kind`` ("job", "sweep", ...)."""
    client = client or store_client(directory)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return [r for r in runs if kind is None or r.data.tags.get("sae_sweep.kind") == kind]


def tracker_at(directory: Path):
    """A :class:`~sae_sweep.tracking.runs.Tracker` on a fresh sqlite store in ``directory``."""
    from sae_sweep.tracking.runs import Tracker

    return Tracker(store_uri(directory))
