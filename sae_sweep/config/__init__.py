"""Job configuration: schema (typed nodes, one checker), derived values, validation, identity.

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
on the model's shape (``shape`` is passed in: this package loads no model).

Identity: ``run_key`` hashes everything that changes a trained SAE (not paths, launcher, tracking,
logging or evals); runs that differ only in seed share a ``seed_group_key``.
"""

from pathlib import Path

from sae_sweep.config.checks import ModelShape, eval_problems, sae_problems, shape_problems, validate  # noqa: F401
from sae_sweep.config.derived import (  # noqa: F401
    SPECIAL_MARGIN,
    cache_dir,
    cache_tokens,
    d_sae_for,
    default_tracking_uri,
    find_tracking_uri,
    heldout_every_steps,
    output_dir,
    resolve_device,
    total_steps,
    tracking_uri,
)
from sae_sweep.config.identity import (  # noqa: F401
    DATASET_LABELS,
    batch_source,
    canonical,
    flat_params,
    generation_identity,
    run_identity,
    run_key,
    seed_group_key,
    stable_hash,
    stream_key,
)
from sae_sweep.config.job import (  # noqa: F401
    CACHE_DTYPES,
    DATASET_KEYED_ONLY_IF_NOT,
    DEAD_TOKENS,
    GENERATION_KEYED_ONLY_IF_NOT,
    GENERATION_SAMPLERS,
    HOOK_TYPES,
    MODEL_DTYPES,
    WEIGHTS,
    CacheConfig,
    DatasetConfig,
    GenerationConfig,
    GGUFWeights,
    JobConfig,
    ModelConfig,
    ModelSAEDefaults,
    PathsConfig,
    SAEConfig,
    SweepConfig,
    SyntheticConfig,
    TrackingConfig,
    TrainConfig,
)
from sae_sweep.config.schema import (  # noqa: F401
    ConfigError,
    choice,
    fail_if,
    nearest,
    parse,
    problems,
    register_schema,
    schema,
    schema_names,
    setting,
)

# The presets: inside an installed wheel they are package data (sae_sweep/conf); in a source checkout
# they are the repository's top-level conf/.
_PACKAGED = Path(__file__).resolve().parents[1] / "conf"
CONF_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[2] / "conf"
