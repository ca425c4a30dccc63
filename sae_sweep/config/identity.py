"""Identity of work: ``run_key`` hashes everything that changes a trained SAE (not paths, launcher,
tracking, logging or evals); runs that differ only in seed share a ``seed_group_key``."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Mapping, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from sae_sweep.config.derived import cache_tokens
from sae_sweep.config.job import DATASET_KEYED_ONLY_IF_NOT, GENERATION_KEYED_ONLY_IF_NOT
from sae_sweep.config.schema import _plain


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
    missing = object()
    for key, unset in DATASET_KEYED_ONLY_IF_NOT.items():  # e.g. a revision only once one is pinned
        if dataset.get(key, missing) == unset:
            del dataset[key]
    gen = dataset.get("generation")
    if isinstance(gen, dict):  # settings added later apply to faithful text only: no other dataset's key moves
        dataset["generation"] = (
            generation_identity(gen)
            if dataset.get("kind") == "faithful"
            else {k: v for k, v in gen.items() if k not in GENERATION_KEYED_ONLY_IF_NOT}
        )
    return dataset


def run_identity(cfg: Any, weights: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Everything that changes a trained SAE (not paths, launcher, tracking, logging, evals).

    The model is identified by its hub id or local path + revision + dtype here, plus ``weights``:
    the identity of the weights the job loads (``models.weights.resolve(...).identity``; a GGUF
    stand-in names itself, the model's own weights add nothing). The cache key adds the finer
    fingerprint (config/tokenizer hashes).
    """
    model = {k: _plain(cfg.model[k]) for k in ("name", "hf_id", "revision", "dtype")}
    model.update(_weights_identity(cfg.model, weights))
    return {
        "model": model,
        "layer": cfg.layer,
        "hook": cfg.hook,
        # name and how_to_get are labels for people: renaming a dataset or rewording its hint is no new run
        "dataset": _dataset_identity({k: v for k, v in _plain(cfg.dataset).items() if k not in DATASET_LABELS}),
        "sae": _plain(cfg.sae),
        "trainer": _plain(cfg.trainer),
        "train_tokens": cfg.train.tokens,
        **({"epochs": cfg.train.epochs} if cfg.train.epochs != 1 else {}),  # 1 keeps older keys
        **normalization_identity(cfg.train),  # off keeps older keys
        "batches": batch_source(cfg),
        "seed": cfg.seed,
    }


def normalization_identity(train: Any) -> Dict[str, Any]:
    """The activation normalisation settings that change a trained SAE, each only when it is on
    (off, the default, adds nothing: run keys from before these settings stay valid)."""
    out: Dict[str, Any] = {}
    if train.get("normalize_activations", "none") != "none":
        out["normalize_activations"] = str(train.normalize_activations)
        out["n_batches_for_norm_estimate"] = int(train.n_batches_for_norm_estimate)
    if train.get("max_activation_norm_multiple") is not None:
        out["max_activation_norm_multiple"] = float(train.max_activation_norm_multiple)
    return out


def _weights_identity(model: Any, weights: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    if weights is not None:
        return dict(weights)
    if model.get("gguf") is None:  # only the model's own weights can be loaded: they add nothing
        return {}
    raise ValueError(
        f"model {model.name!r} names a stand-in for its weights (model.gguf; model.weights="
        f"{model.get('weights')}): its run key needs the identity of the weights a job loads, "
        f"models.weights.resolve(...).identity"
    )


def batch_source(cfg: Any) -> Dict[str, Any]:
    """The cache settings that decide which batches, in which order, an SAE trains on: the mode, and
    for a disk cache its storage dtype (the values) and reader (the order; blocks: with the block
    size); for a stream its buffer size. Settings a mode does not read are left out, so they do not
    split runs that train on the same batches."""
    cache = cfg.cache  # validated: every key is there, with the schema's defaults
    mode = str(cache.mode)
    if mode == "stream":
        return {"mode": mode, "block_tokens": int(cache.block_tokens)}
    out: Dict[str, Any] = {"mode": mode, "dtype": str(cache.dtype), "reader": str(cache.reader)}
    if out["reader"] == "blocks":
        out["block_tokens"] = int(cache.block_tokens)
    return out


def run_key(cfg: Any, weights: Optional[Mapping[str, Any]] = None) -> str:
    """The run's identity hashed (``weights``: see ``run_identity``)."""
    return stable_hash(run_identity(cfg, weights))


def seed_group_key(cfg: Any, weights: Optional[Mapping[str, Any]] = None) -> str:
    """Runs that differ only in seed share this key (for cross-seed comparisons)."""
    ident = run_identity(cfg, weights)
    ident.pop("seed")
    return stable_hash(ident)


def stream_key(cfg: Any, weights: Optional[Mapping[str, Any]] = None) -> str:
    """Points with equal stream keys read the same activations: same source (model, layer, hook,
    dataset, cache mode and budget), device and batch size. They can train in one packed job, each
    in the order its own seed gives it (one LM pass for all of them in stream mode)."""
    ident = run_identity(cfg, weights)
    return stable_hash(
        {
            **{k: ident[k] for k in ("model", "layer", "hook", "dataset")},
            "cache": ident["batches"],
            "cache_tokens": cache_tokens(cfg),
            "device": str(cfg.device),
            "batch_size": int(cfg.trainer.batch_size),
        }
    )


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
    assert isinstance(container, dict)  # a job config is a mapping
    container.pop("hydra", None)
    walk("", container)
    return out
