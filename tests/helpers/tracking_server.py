"""``launchers/mlflow_server.sh`` as the tests run it: this interpreter's ``mlflow`` on PATH, a free
loopback port, and for ``postgres`` a state dir the ``postgres`` user can reach."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "launchers" / "mlflow_server.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_script(*args: str, state_dir: str | os.PathLike, timeout: float = 300) -> subprocess.CompletedProcess:
    """``mlflow_server.sh <args> --state-dir <state_dir>``, run to its end (``--background`` returns once
    the server answers), output captured as text."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run(
        ["bash", str(SCRIPT), *args, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@contextmanager
def postgres_state_dir() -> Iterator[Path]:
    """A state dir for the server on PostgreSQL, stopped and removed afterwards. Not under pytest's
    tmp_path: as root PostgreSQL runs as the ``postgres`` user, and pytest's directories are private."""
    d = Path(tempfile.mkdtemp(prefix="sae_sweep_pg.", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        server_script("stop", state_dir=d)
        shutil.rmtree(d, ignore_errors=True)
