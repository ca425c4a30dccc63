"""Packaging beyond what pyproject.toml can say: conf/ ships inside the wheel as sae_sweep/conf, so a
non-editable install runs from any directory; in a checkout the presets stay at the top level
(sae_sweep.config.CONF_DIR finds either)."""

from setuptools import find_namespace_packages, setup

setup(
    # hydra_plugins is a namespace package (Hydra discovers plugins in it): found as one, like sae_sweep
    packages=find_namespace_packages(include=["sae_sweep*", "hydra_plugins*"], exclude=["*__pycache__*"])
    + ["sae_sweep.conf"],
    package_dir={"sae_sweep.conf": "conf"},
    package_data={"sae_sweep.conf": ["*.yaml", "*/*.yaml", "*/*/*.yaml"]},
)
