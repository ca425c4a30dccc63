"""Activation normalisation and outlier masking, named as the libraries their users know name them.

* ``normalize_activations="expected_average_only_in"`` (SAELens): the SAE trains on ``x * s`` with
  one fixed ``s = sqrt(d_in) / E||x||``, estimated before training as the mean over
  ``n_batches_for_norm_estimate`` training batches (SAELens: 1000) of each batch's mean norm, so
  that the scaled activations have norm ~ sqrt(d_in) (E||x||^2 ~ d_in). SAELens's
  ``ActivationScaler.estimate_scaling_factor`` / ``ActivationsStore.estimate_norm_scaling_factor``;
  after training it folds ``s`` into the weights (``fold_activation_norm_scaling_factor``), so the
  saved SAE reads raw activations.
* ``max_activation_norm_multiple`` (dictionary_learning's ``ActivationBuffer``): positions whose norm
  exceeds the median norm times this multiple are left out of training (massive-activation sinks
  such as BOS-like positions). dictionary_learning takes the median over each buffer refresh; here
  over each training batch (the cache's positions arrive shuffled). The trained SAE still reads
  every position, so there is nothing to fold.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from itertools import islice
from typing import Optional

import torch
from torch import Tensor

from sae_sweep.config.job import N_BATCHES_FOR_NORM_ESTIMATE


def mask_high_norm(x: Tensor, max_activation_norm_multiple: Optional[float]) -> Tensor:
    """The rows of ``x [n, d]`` whose norm is at most ``median norm * max_activation_norm_multiple``
    (all rows when the multiple is None)."""
    if max_activation_norm_multiple is None:
        return x
    norms = x.float().norm(dim=-1)
    return x[norms <= norms.median() * float(max_activation_norm_multiple)]


@torch.no_grad()
def estimate_norm_scaling_factor(
    batches: Iterable[Tensor],
    d_in: int,
    n_batches_for_norm_estimate: int = N_BATCHES_FOR_NORM_ESTIMATE,
    max_activation_norm_multiple: Optional[float] = None,
) -> float:
    """SAELens's estimate: ``sqrt(d_in)`` over the mean, across the first ``n_batches_for_norm_estimate``
    of ``batches``, of each batch's mean token norm (after outlier masking, which training applies
    first)."""
    norms = [
        float(mask_high_norm(x, max_activation_norm_multiple).float().norm(dim=-1).mean())
        for x in islice(batches, n_batches_for_norm_estimate)
    ]
    if not norms:
        raise ValueError("no batches to estimate the activation norm scaling factor from")
    mean_norm = statistics.mean(norms)
    if not mean_norm > 0:
        raise ValueError(f"mean activation norm is {mean_norm}: cannot normalise activations to sqrt(d_in)")
    return d_in**0.5 / mean_norm
