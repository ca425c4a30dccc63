"""`dataset=synthetic`: activations drawn from a planted sparse dictionary, no LM involved.

The samples go through the same activation cache and shuffled reader as LM activations, so every
trainer is exercised on exactly the training path real runs take, against a known answer.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from sae_sweep.sae.synthetic import PlantedDictionary

# Different generator streams for the two splits: held-out samples are a separate draw.
_SPLIT_OFFSET = {"train": 0, "eval": 1_000_003}


def synthetic_params(dataset_cfg: DictConfig) -> Dict[str, Any]:
    p = OmegaConf.to_container(dataset_cfg.synthetic, resolve=True) if dataset_cfg.synthetic else {}
    return {"d": 64, "n_features": 192, "l0": 4.0, "correlated_groups": 0, "correlation": 0.5,
            "noise": 0.0, "seed": 0, **p}


def planted(dataset_cfg: DictConfig) -> PlantedDictionary:
    p = synthetic_params(dataset_cfg)
    return PlantedDictionary(int(p["d"]), int(p["n_features"]), int(p["seed"]))


def sample(dataset_cfg: DictConfig, split: str, n: int) -> torch.Tensor:
    """`n` activations [n, d] of the given split (deterministic in the dataset's seed)."""
    p = synthetic_params(dataset_cfg)
    g = torch.Generator().manual_seed(int(p["seed"]) * 7919 + _SPLIT_OFFSET[split])
    return planted(dataset_cfg).sample(n, float(p["l0"]), correlated_groups=int(p["correlated_groups"]),
                                       correlation=float(p["correlation"]), noise=float(p["noise"]), generator=g)


def cache_spec(dataset_cfg: DictConfig) -> Dict[str, Any]:
    return {"source": "synthetic", "params": synthetic_params(dataset_cfg),
            "context_size": int(dataset_cfg.context_size), "tokens": int(dataset_cfg.tokens),
            "storage_dtype": "float32", "split": "train"}


def build_fn(dataset_cfg: DictConfig, chunk_seqs: int = 256):
    """Chunks of (token_ids, acts) for the cache: `context_size` samples form one 'sequence'."""
    ctx = int(dataset_cfg.context_size)
    n_seqs = max(1, -(-int(dataset_cfg.tokens) // ctx))

    def build() -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        x = sample(dataset_cfg, "train", n_seqs * ctx).view(n_seqs, ctx, -1)
        for i in range(0, n_seqs, chunk_seqs):
            acts = x[i:i + chunk_seqs]
            # No tokens here; id 0 everywhere and no special ids, so every position is trained on.
            yield torch.zeros(acts.shape[:2], dtype=torch.long), acts

    return build
