"""A non-editable install carries everything a job needs: the presets (conf/ as sae_sweep/conf) and
the Hydra sweeper plugin (the hydra_plugins namespace package), found from any directory."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # builds the wheel in a subprocess

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_presets_and_the_sweeper_plugin(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("sae_sweep-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {str(p.relative_to(ROOT)) for p in (ROOT / "conf").rglob("*.yaml")}
    assert presets and {f"sae_sweep/{p}" for p in presets} <= names
    assert "hydra_plugins/sae_sweep_sweeper/sae_sweep_sweeper.py" in names
    assert {"sae_sweep/__main__.py", "sae_sweep/job/app.py", "sae_sweep/data/sources/registry.py"} <= names
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)
