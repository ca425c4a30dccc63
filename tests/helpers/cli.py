"""The ``python -m sae_sweep`` command line, run the way the tests run it: offline, output under
``out`` (``paths.output_dir``), from ``out``'s parent directory unless told otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


def cli_env(cache: str | os.PathLike | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, offline (``HF_HUB_OFFLINE=1``); ``cache`` sets SAE_SWEEP_CACHE."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if cache is not None:
        env["SAE_SWEEP_CACHE"] = str(cache)
    env.update(extra or {})
    return env


def cli_argv(out: Path, *args: str, module: str = "sae_sweep") -> list[str]:
    """``python -m <module> <args> paths.output_dir=<out>``."""
    return [sys.executable, "-m", module, *args, f"paths.output_dir={out}"]


def run_cli(
    out: Path,
    *args: str,
    cache: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run the CLI to completion and capture its output (text). ``env`` adds variables to
    :func:`cli_env`'s; ``cwd`` defaults to ``out.parent``."""
    return subprocess.run(
        cli_argv(out, *args),
        capture_output=True,
        text=True,
        env=cli_env(cache, env),
        timeout=timeout,
        cwd=cwd or out.parent,
    )


def start_cli_until_checkpoint(
    out: Path, *args: str, stderr=subprocess.DEVNULL, poll_s: float = 0.2, timeout: float = 600
) -> subprocess.Popen:
    """The CLI started in the background on ``out`` (stdout discarded; ``stderr`` a
    ``subprocess`` target, text), returned once its first checkpoint is on disk; fails the test
    if the job ends before that."""
    proc = subprocess.Popen(
        cli_argv(out, *args), stdout=subprocess.DEVNULL, stderr=stderr, text=True, cwd=out.parent, env=cli_env()
    )
    deadline = time.time() + timeout
    while time.time() < deadline and not list((out / "checkpoints").glob("*/latest.pt")):
        assert proc.poll() is None, "job ended before its first checkpoint"
        time.sleep(poll_s)
    return proc
