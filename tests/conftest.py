"""Shared test set-up: offline Hugging Face, one model/cache directory per test session."""

import os

import pytest

# Nothing in the suite may reach the Hub: every model and dataset is built or written locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory):
    """SAE_SWEEP_CACHE for the whole session: the tiny model is built once, in a temp dir,
    unless the caller already points SAE_SWEEP_CACHE somewhere (reuse across runs)."""
    if "SAE_SWEEP_CACHE" not in os.environ:
        os.environ["SAE_SWEEP_CACHE"] = str(tmp_path_factory.mktemp("sae_sweep_cache"))
    return os.environ["SAE_SWEEP_CACHE"]


@pytest.fixture(scope="session")
def tiny_cache_dir(session_cache_dir):
    """The session cache as a Path: the tiny model is built there once for every test file."""
    from pathlib import Path

    return Path(session_cache_dir)


@pytest.fixture(scope="session")
def tiny_lm(tiny_cache_dir):
    """The offline tiny model, loaded once per session (shared by test_lm and test_text)."""
    from sae_sweep.lm import load_lm

    return load_lm({"name": "tiny", "hf_id": "builtin:tiny", "dtype": "auto"}, tiny_cache_dir, "cpu")
