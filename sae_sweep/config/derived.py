"""Values derived from a validated config: absolute paths, the tracking store, the device, sizes."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from sae_sweep.config.schema import ConfigError


# Paths, devices, sizes derived from a config
def output_dir(cfg: Any) -> Path:
    """``paths.output_dir`` made absolute against the directory the user launched from."""
    p = Path(os.path.expanduser(str(cfg.paths.output_dir)))
    if not p.is_absolute():
        try:
            from hydra.utils import get_original_cwd

            p = Path(get_original_cwd()) / p
        except ValueError:  # not inside a Hydra app (tests, `python -m sae_sweep.evaluate`)
            p = Path.cwd() / p
    return p.resolve()


def cache_dir(cfg: Any) -> Path:
    return Path(os.path.expanduser(str(cfg.paths.cache_dir))).resolve()


def default_tracking_uri(output: str | os.PathLike) -> str:
    """The store a job writes when ``tracking.uri`` is null: ``<output_dir>/mlflow.db``."""
    return f"sqlite:///{(Path(os.path.expanduser(str(output))) / 'mlflow.db').resolve()}"


def tracking_uri(cfg: Any) -> str:
    return str(cfg.tracking.uri) if cfg.tracking.uri else default_tracking_uri(output_dir(cfg))


def find_tracking_uri(target: Optional[str] = None, uri: Optional[str] = None) -> str:
    """The store a command-line tool (evaluate, report, export) reads: ``uri`` if given, else
    ``MLFLOW_TRACKING_URI``, else -- for a sweep directory ``<output_dir>/sweeps/<name>/<time>`` --
    the store that sweep used (its ``multirun.yaml``'s ``tracking.uri`` or ``<output_dir>/mlflow.db``),
    else ``./outputs/mlflow.db`` (the jobs' default)."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if target and Path(target).expanduser().is_dir():
        sweep_dir = Path(target).expanduser().resolve()
        try:
            master = OmegaConf.load(sweep_dir / "multirun.yaml")
        except Exception:  # no multirun.yaml (not written yet, or not a sweep dir)
            master = None
        if master is not None:
            found = OmegaConf.select(master, "tracking.uri", default=None, throw_on_resolution_failure=False)
            if found:
                return str(found)
            out = OmegaConf.select(master, "paths.output_dir", default=None, throw_on_resolution_failure=False)
            out = Path(os.path.expanduser(str(out))) if out else None
            if out is not None and out.is_absolute() and (out / "mlflow.db").exists():
                return default_tracking_uri(out)
        for up in list(sweep_dir.parents)[:4]:  # <output_dir>/sweeps/<name>/<time>
            if (up / "mlflow.db").exists():
                return default_tracking_uri(up)
    return default_tracking_uri("outputs")


def d_sae_for(sae_cfg: Any, d_in: int) -> int:
    """``sae.d_sae`` if set, else ``round(sae.expansion_factor * d_in)``."""
    d_sae = sae_cfg.get("d_sae") if isinstance(sae_cfg, (dict, DictConfig)) else getattr(sae_cfg, "d_sae", None)
    if d_sae is not None:
        return int(d_sae)
    ef = sae_cfg.get("expansion_factor") if isinstance(sae_cfg, (dict, DictConfig)) else sae_cfg.expansion_factor
    if ef is None:
        raise ValueError("sae.d_sae and sae.expansion_factor are both null; set one of them")
    return int(round(float(ef) * int(d_in)))


def total_steps(cfg: Any) -> int:
    return max(1, int(cfg.train.tokens) // int(cfg.trainer.batch_size))


# Held-out evaluations during a run when train.eval_every_tokens=0 (auto).
HELDOUT_EVALS = 4


def heldout_every_steps(cfg: Any) -> int:
    """Steps between held-out evaluations (``train.eval_every_tokens``, auto: ``HELDOUT_EVALS`` per
    run); 0 when ``train.heldout_tokens=0`` turns them off. The final step is always evaluated."""
    if int(cfg.train.heldout_tokens) == 0:
        return 0
    steps = total_steps(cfg)
    every_tokens = int(cfg.train.eval_every_tokens)
    if every_tokens == 0:
        return max(1, math.ceil(steps / HELDOUT_EVALS))
    return max(1, every_tokens // int(cfg.trainer.batch_size))


# Share of a cache's positions that are BOS/EOS/PAD (not trained on) that a derived budget adds:
# measured ~1-3 % (BOS per window, EOS between documents); a run that needs more fails before training.
SPECIAL_MARGIN = 0.05


def cache_tokens(cfg: Any) -> int:
    """The activation cache's token budget: ``dataset.tokens``, or when null enough for
    ``train.tokens`` distinct tokens per pass (``train.epochs`` passes), plus the special tokens."""
    if cfg.dataset.tokens is not None:
        return int(cfg.dataset.tokens)
    return math.ceil(int(cfg.train.tokens) / int(cfg.train.epochs) * (1 + SPECIAL_MARGIN))


def resolve_device(name: Any = "auto"):
    """``auto`` -> cuda when available, else cpu, as a ``torch.device``; ``cuda`` on a machine
    without CUDA is a ConfigError naming the key."""
    import torch

    name = "auto" if name is None else str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: CUDA is not available on this machine; allowed here: auto, cpu")
    return torch.device(name)
