"""Planted-dictionary data for known-answer tests: x = codes @ D + noise, codes sparse and >= 0.

With n_features > d the features are in superposition; an SAE trained on the samples should
find decoder rows aligned with the rows of D, which `recovery_metrics` scores.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class PlantedDictionary:
    """`n_features` random unit vectors in R^d (rows of `.dictionary`), seeded."""

    def __init__(self, d: int, n_features: int, seed: int = 0):
        self.d, self.n_features = int(d), int(n_features)
        # Offset the seed so the dictionary never coincides with an SAE initialised from the same
        # integer seed (torch.randn with equal seeds would plant the answer in the init).
        self.generator = torch.Generator().manual_seed(int(seed) + 0x5EED_D1C7)  # also drives `sample`
        D = torch.randn(self.n_features, self.d, generator=self.generator)
        self.dictionary = D / D.norm(dim=1, keepdim=True)

    def sample(self, n: int, l0: float = 4.0, *, correlated_groups: int = 0, correlation: float = 0.5,
               noise: float = 0.0, magnitude: tuple[float, float] = (0.5, 1.5),
               generator: torch.Generator | None = None, return_codes: bool = False) -> Any:
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


@torch.no_grad()
def recovery_metrics(W_dec_learned: Tensor, true_dict: Tensor | PlantedDictionary,
                     thresholds: tuple[float, ...] = (0.9,)) -> dict[str, float]:
    """How well learned decoder rows [d_sae, d] recover the true features [n_features, d].

    For every true feature, its best cosine similarity with any learned row:
    `mean_max_cos` averages it; `frac_recovered_<t>` is the fraction with max cos > t.
    """
    true = true_dict.dictionary if isinstance(true_dict, PlantedDictionary) else true_dict
    learned = W_dec_learned.detach().float().cpu()
    true = true.detach().float().cpu()
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    true = true / true.norm(dim=1, keepdim=True).clamp_min(1e-12)
    max_cos = (true @ learned.T).max(dim=1).values
    out = {"mean_max_cos": float(max_cos.mean())}
    for t in thresholds:
        out[f"frac_recovered_{t}"] = float((max_cos > t).float().mean())
    return out
