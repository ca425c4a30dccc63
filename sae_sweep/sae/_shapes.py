"""Shape helper for SAEs whose forward decodes sparsely (embedding_bag takes 2-D input only)."""
from __future__ import annotations

from typing import Callable

from torch import Tensor


def forward_tokens(forward: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor) -> tuple[Tensor, Tensor]:
    """Apply a [N, d_in] -> ([N, d_in], [N, d_sae]) forward to x [..., d_in] (evals pass [B, T, d])."""
    if x.dim() == 2:
        return forward(x)
    lead = x.shape[:-1]
    x_hat, f = forward(x.reshape(-1, x.shape[-1]))
    return x_hat.reshape(*lead, x_hat.shape[-1]), f.reshape(*lead, f.shape[-1])
