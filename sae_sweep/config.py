"""Job configuration: structured schemas, validation with clear errors, and identity keys.

The schema (registered in Hydra's ConfigStore as ``job_schema``) makes Hydra reject unknown keys
and wrong types at compose time. ``validate`` then checks values that depend on each other
(layer vs. the model's depth, k vs. d_sae, a trainer's own hyperparameters) and collects every
problem into one ``ConfigError`` that names the key, the value and what is allowed.

Identity: ``cache_spec`` is everything that changes the activation cache; ``run_key`` adds the SAE,
trainer, training budget and seed. Paths, launcher, tracking and logging keys are not identity.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

HOOK_TYPES = ("resid_pre", "resid_post", "mlp_out", "attn_out")
DATASET_KINDS = ("builtin", "faithful", "hub", "local", "synthetic")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A job configuration that cannot run. The message lists every problem found."""

    def __init__(self, message: str, problems: Optional[List[str]] = None):
        super().__init__(message)
        self.problems = problems or [message]


# --------------------------------------------------------------------------------------------
# Structured schema. Every node a user may override is typed here; `trainer` and `eval` are
# open dicts because each trainer/eval declares its own parameters (validated below).
# --------------------------------------------------------------------------------------------
@dataclass
class ModelSAEDefaults:
    expansion_factor: int = 8
    k: int = 32
    lr: float = 3e-4
    context_size: int = 128
    train_tokens: int = 1_000_000
    d_sae: Optional[int] = None


@dataclass
class ModelConfig:
    name: str = MISSING
    hf_id: str = MISSING
    revision: Optional[str] = None
    family: Optional[str] = None
    d_model: int = MISSING
    n_layers: int = MISSING
    default_layer: int = MISSING
    dtype: str = "auto"
    sae: ModelSAEDefaults = field(default_factory=ModelSAEDefaults)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    batch_size: int = 64
    seed: int = 0


@dataclass
class DatasetConfig:
    name: str = MISSING
    kind: str = MISSING
    hf_id: Optional[str] = None
    hf_config: Optional[str] = None
    split: str = "train"
    text_column: str = "text"
    data_files: Optional[List[str]] = None
    streaming: bool = True
    context_size: int = 128
    tokens: int = 100_000
    eval_tokens: int = 8192
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # synthetic (planted dictionary) source, used by dataset=synthetic
    synthetic: Optional[Dict[str, Any]] = None


@dataclass
class SAEConfig:
    d_sae: Optional[int] = None
    expansion_factor: int = 8
    k: int = 32


@dataclass
class TrainConfig:
    tokens: int = 1_000_000
    checkpoint_every: int = 50
    log_every: int = 10


@dataclass
class PathsConfig:
    output_dir: str = "./outputs"
    cache_dir: str = "~/.cache/sae_sweep"


@dataclass
class TrackingConfig:
    uri: Optional[str] = None
    experiment: str = "default"
    parent_run_id: Optional[str] = None
    skip_finished: bool = True


@dataclass
class SweepConfig:
    name: str = "default"
    pack: bool = False


@dataclass
class JobConfig:
    seed: int = 42
    layer: int = MISSING
    hook: str = "resid_post"
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    trainer: Dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: Dict[str, Any] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def register_schema() -> None:
    ConfigStore.instance().store(name="job_schema", node=JobConfig)


register_schema()


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------
def output_dir(cfg: DictConfig) -> Path:
    """`paths.output_dir` made absolute against the directory the user launched from."""
    p = Path(os.path.expanduser(str(cfg.paths.output_dir)))
    if not p.is_absolute():
        try:
            from hydra.utils import get_original_cwd

            p = Path(get_original_cwd()) / p
        except ValueError:  # not inside a Hydra app (tests, `python -m sae_sweep.evaluate`)
            p = Path.cwd() / p
    return p.resolve()


def cache_dir(cfg: DictConfig) -> Path:
    return Path(os.path.expanduser(str(cfg.paths.cache_dir))).resolve()


def tracking_uri(cfg: DictConfig) -> str:
    if cfg.tracking.uri:
        return str(cfg.tracking.uri)
    return f"sqlite:///{output_dir(cfg) / 'mlflow.db'}"


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def resolved_d_sae(cfg: DictConfig, d_model: int) -> int:
    if cfg.sae.d_sae is not None:
        return int(cfg.sae.d_sae)
    return int(cfg.sae.expansion_factor) * int(d_model)


def _check_positive_int(errors: List[str], key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        errors.append(f"{key}={value!r}: must be a positive integer")


def validate(cfg: DictConfig, check_availability: bool = True) -> None:
    """Raise ConfigError listing every invalid value in a composed job config.

    With ``check_availability`` the model and dataset are also checked to be loadable here
    (an offline hub id fails now, before any run or cache exists).
    """
    from sae_sweep.lm import model_shape  # noqa: PLC0415  (lm is to the right of config)
    from sae_sweep.sae.registry import get_trainer, trainer_names

    errors: List[str] = []

    if cfg.hook not in HOOK_TYPES:
        errors.append(f"hook={cfg.hook!r}: allowed values are {', '.join(HOOK_TYPES)}")
    if cfg.model.dtype not in MODEL_DTYPES:
        errors.append(f"model.dtype={cfg.model.dtype!r}: allowed values are {', '.join(MODEL_DTYPES)}")
    if cfg.dataset.kind not in DATASET_KINDS:
        errors.append(f"dataset.kind={cfg.dataset.kind!r}: allowed values are {', '.join(DATASET_KINDS)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(cfg.device)):
        errors.append(f"device={cfg.device!r}: allowed values are auto, cpu, cuda, cuda:N")

    if cfg.dataset.kind == "local" and (OmegaConf.is_missing(cfg.dataset, "data_files") or not cfg.dataset.data_files):
        errors.append("dataset.data_files is required for dataset=local: a list of jsonl/json/parquet/csv/txt "
                      "paths, e.g. 'dataset.data_files=[/data/a.jsonl]'")
    for key in ("train.tokens", "dataset.tokens", "dataset.eval_tokens", "train.checkpoint_every",
                "train.log_every"):
        _check_positive_int(errors, key, OmegaConf.select(cfg, key))
    ctx = cfg.dataset.context_size
    if not isinstance(ctx, int) or ctx < 2:
        errors.append(f"dataset.context_size={ctx!r}: must be an integer >= 2 (BOS + at least one token)")

    # The model's depth and width: cheap (config.json or the model yaml), no weights loaded.
    d_model: Optional[int] = None
    if cfg.dataset.kind == "synthetic":
        d_model = int((cfg.dataset.synthetic or {}).get("d", cfg.model.d_model))
        n_layers = None
    else:
        try:
            n_layers, d_model = model_shape(cfg.model, cache_dir(cfg))
        except Exception as e:  # unavailable model: a clear message from lm.py
            errors.append(str(e))
            n_layers = None
    if n_layers is not None:
        if not isinstance(cfg.layer, int) or not 0 <= cfg.layer < n_layers:
            hint = ""
            if n_layers != cfg.model.n_layers:
                # A local model.hf_id shallower than its yaml: the yaml's default_layer does not fit it.
                hint = (f" (read from {cfg.model.hf_id}; the {cfg.model.name!r} yaml says {cfg.model.n_layers} "
                        f"layers and default_layer={cfg.model.default_layer}: pass layer=N explicitly)")
            errors.append(
                f"layer={cfg.layer!r}: model {cfg.model.name!r} has {n_layers} layers, "
                f"allowed values are 0..{n_layers - 1}{hint}"
            )

    if d_model is not None:
        if cfg.sae.d_sae is not None:
            _check_positive_int(errors, "sae.d_sae", cfg.sae.d_sae)
        else:
            _check_positive_int(errors, "sae.expansion_factor", cfg.sae.expansion_factor)
        try:
            d_sae = resolved_d_sae(cfg, d_model)
        except (TypeError, ValueError):
            d_sae = None
        if d_sae and d_sae > 0:
            k = cfg.sae.k
            if not isinstance(k, int) or not 0 < k < d_sae:
                errors.append(f"sae.k={k!r}: must be an integer with 0 < k < d_sae ({d_sae})")

    name = cfg.trainer.get("name") if isinstance(cfg.trainer, DictConfig) else None
    if name not in trainer_names():
        errors.append(f"trainer.name={name!r}: allowed values are {', '.join(trainer_names())}")
    else:
        # One message per key: the trainer's own check of a key reported above is dropped.
        reported = {e.split("=", 1)[0] for e in errors}
        errors.extend(e for e in get_trainer(name).validate_params(cfg.trainer, cfg.sae, d_model)
                      if e.split("=", 1)[0] not in reported)

    from sae_sweep.evals.registry import eval_names, eval_settings_errors  # noqa: PLC0415

    for ev in cfg.eval.get("run", []) or []:
        if ev not in eval_names():
            errors.append(f"eval.run contains {ev!r}: allowed values are {', '.join(eval_names())}")
        else:
            errors.extend(eval_settings_errors(ev, cfg.eval.get(ev)))

    if check_availability and not errors and cfg.dataset.kind != "synthetic":
        err = _model_unavailable(cfg)
        if err:
            errors.append(err)
    if check_availability and not errors and cfg.dataset.kind in ("hub", "local"):
        from sae_sweep.text import check_dataset_available  # noqa: PLC0415

        try:
            check_dataset_available(cfg.dataset)
        except Exception as e:
            errors.append(str(e))

    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors), errors)


@functools.lru_cache(maxsize=64)
def _model_check(hf_id: str, revision: Optional[str], cache_root: str) -> Optional[str]:
    from sae_sweep.lm import check_model_available  # noqa: PLC0415

    try:
        check_model_available(OmegaConf.create({"hf_id": hf_id, "revision": revision}), cache_root)
    except Exception as e:
        return str(e)
    return None


def _model_unavailable(cfg: DictConfig) -> Optional[str]:
    """A hub model that cannot be loaded here, as a message (checked once per id per process)."""
    return _model_check(str(cfg.model.hf_id), cfg.model.revision, str(cache_dir(cfg)))


# --------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------
def stable_hash(obj: Any, n: int = 16) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def run_identity(cfg: DictConfig) -> Dict[str, Any]:
    """Everything that changes a trained SAE (not paths, launcher, tracking, logging, evals).

    The model is identified by its hub id or local path + revision + dtype here; the cache
    module adds the finer fingerprint (config/tokenizer hashes) to the cache key itself.
    """
    return {
        "model": {k: _plain(cfg.model[k]) for k in ("name", "hf_id", "revision", "dtype")},
        "layer": cfg.layer,
        "hook": cfg.hook,
        "dataset": {k: v for k, v in _plain(cfg.dataset).items() if k != "name"},
        "sae": _plain(cfg.sae),
        "trainer": _plain(cfg.trainer),
        "train_tokens": cfg.train.tokens,
        "seed": cfg.seed,
    }


def run_key(cfg: DictConfig) -> str:
    return stable_hash(run_identity(cfg))


def seed_group_key(cfg: DictConfig) -> str:
    """Runs that differ only in seed share this key (for cross-seed comparisons)."""
    ident = run_identity(cfg)
    ident.pop("seed")
    return stable_hash(ident)


def flat_params(cfg: DictConfig) -> Dict[str, str]:
    """The resolved config flattened to dotted keys, as MLflow params."""
    out: Dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = json.dumps(node) if isinstance(node, (list, tuple)) else str(node)

    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    walk("", container)
    return out
