"""`dataset=synthetic`: activations drawn from a planted sparse dictionary, no LM involved.

x = codes @ D + noise, codes sparse and >= 0. With n_features > d the features are in
superposition; an SAE trained on the samples should find decoder rows aligned with the rows of D
(the `recovery` eval scores it). The samples go through the same activation cache and shuffled
reader as LM activations, so every trainer is exercised on exactly the training path real runs
take, against a known answer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterator, Tuple

import torch
from omegaconf import DictConfig

from sae_sweep.config import SyntheticConfig, parse


class PlantedDictionary:
    """`n_features` random unit vectors in R^d (rows of `.dictionary`), seeded."""

    def __init__(self, d: int, n_features: int, seed: int = 0):
        self.d, self.n_features = int(d), int(n_features)
        # Offset the seed so the dictionary never coincides with an SAE initialised from the same
        # integer seed (torch.randn with equal seeds would plant the answer in the init).
        self.generator = torch.Generator().manual_seed(int(seed) + 0x5EED_D1C7)  # also drives `sample`
        D = torch.randn(self.n_features, self.d, generator=self.generator)
        self.dictionary = D / D.norm(dim=1, keepdim=True)

    def sample(
        self,
        n: int,
        l0: float = 4.0,
        *,
        correlated_groups: int = 0,
        correlation: float = 0.5,
        noise: float = 0.0,
        magnitude: tuple[float, float] = (0.5, 1.5),
        generator: torch.Generator | None = None,
        return_codes: bool = False,
    ) -> Any:
        """`n` samples [n, d] (float32), each a sparse non-negative mix of dictionary rows.

        - `l0`: expected number of active features per sample (each fires with p = l0 / n_features).
        - `correlated_groups`: split features into this many contiguous groups; with probability
          `correlation` a feature copies its group's shared coin instead of its own, so features
          in a group co-fire while every feature keeps the marginal rate p (0 = independent).
        - `magnitude`: active coefficients ~ Uniform(magnitude).
        - `noise`: std of isotropic Gaussian noise added to x.
        Returns x, or (x, codes [n, n_features]) with `return_codes`.
        """
        if not 0 < l0 <= self.n_features:
            raise ValueError(f"l0={l0} must be in (0, n_features={self.n_features}]")
        g = generator if generator is not None else self.generator
        p = l0 / self.n_features
        active = torch.rand(n, self.n_features, generator=g) < p
        if correlated_groups > 0:
            if not 0 <= correlation <= 1:
                raise ValueError(f"correlation={correlation} must be in [0, 1]")
            group_of = torch.arange(self.n_features) * correlated_groups // self.n_features
            group_on = torch.rand(n, correlated_groups, generator=g) < p
            copy = torch.rand(n, self.n_features, generator=g) < correlation
            active = torch.where(copy, group_on[:, group_of], active)
        lo, hi = magnitude
        mags = lo + (hi - lo) * torch.rand(n, self.n_features, generator=g)
        codes = torch.where(active, mags, torch.zeros(()))
        x = codes @ self.dictionary
        if noise > 0:
            x = x + noise * torch.randn(n, self.d, generator=g)
        return (x, codes) if return_codes else x


# Different generator streams for the two splits: held-out samples are a separate draw.
_SPLIT_OFFSET = {"train": 0, "eval": 1_000_003}


def synthetic_params(dataset_cfg: DictConfig) -> Dict[str, Any]:
    """`dataset.synthetic` with its defaults (`config.SyntheticConfig`) filled in."""
    return dataclasses.asdict(parse(SyntheticConfig, dataset_cfg.synthetic, "dataset.synthetic"))


def planted(dataset_cfg: DictConfig) -> PlantedDictionary:
    p = synthetic_params(dataset_cfg)
    return PlantedDictionary(int(p["d"]), int(p["n_features"]), int(p["seed"]))


def sample(dataset_cfg: DictConfig, split: str, n: int) -> torch.Tensor:
    """`n` activations [n, d] of the given split (deterministic in the dataset's seed)."""
    p = synthetic_params(dataset_cfg)
    g = torch.Generator().manual_seed(int(p["seed"]) * 7919 + _SPLIT_OFFSET[split])
    return planted(dataset_cfg).sample(
        n,
        float(p["l0"]),
        correlated_groups=int(p["correlated_groups"]),
        correlation=float(p["correlation"]),
        noise=float(p["noise"]),
        generator=g,
    )


def cache_spec(dataset_cfg: DictConfig, n_tokens: int) -> Dict[str, Any]:
    return {
        "source": "synthetic",
        "params": synthetic_params(dataset_cfg),
        "context_size": int(dataset_cfg.context_size),
        "tokens": int(n_tokens),
        "storage_dtype": "float32",
        "split": "train",
    }


def build_fn(dataset_cfg: DictConfig, n_tokens: int, chunk_seqs: int = 256):
    """Chunks of (token_ids, acts) for the cache: `context_size` samples form one 'sequence'."""
    ctx = int(dataset_cfg.context_size)
    n_seqs = max(1, -(-int(n_tokens) // ctx))

    def build() -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        x = sample(dataset_cfg, "train", n_seqs * ctx).view(n_seqs, ctx, -1)
        for i in range(0, n_seqs, chunk_seqs):
            acts = x[i : i + chunk_seqs]
            # No tokens here; id 0 everywhere and no special ids, so every position is trained on.
            yield torch.zeros(acts.shape[:2], dtype=torch.long), acts

    return build
