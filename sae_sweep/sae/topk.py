"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

f(x) = ReLU(TopK_k((x - b_dec) @ W_enc + b_enc)); loss = ||x - x_hat||^2 + auxk_alpha * AuxK.
AuxK: the k_aux = d_in // 2 largest pre-activations among dead latents reconstruct the residual
x - x_hat; its squared error is normalised by the residual's variance, so it is scale free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from sae_sweep.config import setting

from .autoencoder import SparseAutoencoder, forward_tokens
from .kernels import TopKEncode, Workspace, sparse_decode
from .registry import register_sae, register_trainer
from .trainer import StepOutput, Trainer, TrainerParams, mse_loss


@register_sae("topk")
class TopKSAE(SparseAutoencoder):
    activation_fn_str = "topk"
    extra_cfg_keys: ClassVar[tuple[str, ...]] = ("k",)

    def __init__(self, d_in: int, d_sae: int, k: int, **kwargs: Any):
        super().__init__(d_in, d_sae, **kwargs)
        if not 1 <= int(k) <= self.d_sae:
            raise ValueError(f"k={k} must be in [1, d_sae={self.d_sae}]")
        self.k = int(k)

    def saelens_form(self) -> tuple[str, str, dict, Tensor | None]:
        return "topk", "topk", {"k": self.k}, None

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(vals [B, k], idx [B, k], pre [B, d_sae]): the k largest pre-activations, ReLU'd."""
        pre = self.pre_acts(x)
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return vals.relu(), idx, pre

    def activation(self, pre: Tensor) -> Tensor:
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def decode_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        return sparse_decode(vals, idx, self.W_dec) + self.b_dec

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return forward_tokens(self._forward_2d, x)

    def _forward_2d(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # Decode from the k active rows only; the dense code is built for the caller.
        vals, idx, pre = self.encode_sparse(x)
        f = torch.zeros_like(pre).scatter_(-1, idx, vals)
        return self.decode_sparse(vals, idx), f


@dataclass
class TopKParams(TrainerParams):
    auxk_alpha: float = setting(1 / 32, allowed="a float >= 0 (0 disables AuxK)", check=lambda v: v >= 0)


@dataclass
class FastTopKParams(TopKParams):
    # Sparse backward (TopKEncode + SparseDecode): same step as the dense one, without any
    # d_sae-wide gradient matmul. false: the straightforward dense-autograd step (a reference).
    sparse_backward: bool = setting(True, allowed="true or false")


@register_trainer("topk")
class TopKTrainer(Trainer):
    uses_k = True
    params_cls: ClassVar[type] = FastTopKParams  # variants that subclass keep TopKParams and the dense path

    @property
    def _workspace(self) -> Workspace:
        if "_ws" not in self.__dict__:
            self._ws = Workspace()
        return self._ws

    def build_sae(self, generator: torch.Generator) -> SparseAutoencoder:
        return TopKSAE(self.d_in, self.d_sae, int(self.sae_cfg["k"]), generator=generator)

    @property
    def k_aux(self) -> int:
        return min(self.d_in // 2, self.d_sae)

    def compute_loss(self, x: Tensor) -> StepOutput:
        sae: TopKSAE = self.sae  # type: ignore[assignment]
        # A latent can only be dead after dead_tokens tokens: skip the AuxK work until then
        # (decided on host from token counts, so no sync and identical on resume).
        auxk_on = self.params.auxk_alpha > 0 and self.tokens_seen >= self.params.dead_tokens
        dead = self.dead_mask() if auxk_on else None
        if getattr(self.params, "sparse_backward", False):
            compute_dtype = torch.bfloat16 if self.bf16 else torch.float32
            # CPU: reuse the pre-activation buffer across steps (CUDA's caching allocator already does)
            workspace = self._workspace if x.device.type == "cpu" else None
            vals, idx, aux_vals, aux_idx = TopKEncode.apply(
                x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k, dead, self.k_aux if auxk_on else 0, compute_dtype, workspace
            )
            pre = None
        else:
            vals, idx, pre = sae.encode_sparse(x)
        x_hat = sae.decode_sparse(vals, idx)
        mse = mse_loss(x, x_hat)

        active = (vals > 0).float()
        l0 = active.sum(-1).mean()
        # which latents fired in this batch, via scatter-add (boolean indexing would sync)
        fired = torch.zeros(self.d_sae, device=x.device).scatter_add_(0, idx.reshape(-1), active.reshape(-1)) > 0

        if dead is None:  # AuxK off
            auxk = torch.zeros((), device=x.device)
        elif pre is None:
            auxk = self.auxk_from_codes(x - x_hat.detach(), aux_vals, aux_idx, dead)
        else:
            auxk = self.auxk_loss(x - x_hat.detach(), pre, dead)
        loss = mse + self.params.auxk_alpha * auxk
        return StepOutput(loss=loss, x_hat=x_hat, l0=l0, fired=fired, parts={"auxk": auxk})

    def auxk_loss(self, residual: Tensor, pre: Tensor, dead: Tensor) -> Tensor:
        """Normalised MSE of reconstructing `residual` [B, d_in] from the top-k_aux dead latents.

        0 when no latent is dead. Branch-free (torch.where on a device flag) to avoid host syncs.
        """
        masked = pre.masked_fill(~dead, float("-inf"))
        vals, idx = masked.topk(self.k_aux, dim=-1, sorted=False)
        return self.auxk_from_codes(residual, vals.relu(), idx, dead)  # relu: -inf (fewer dead than k_aux) -> 0

    def auxk_from_codes(self, residual: Tensor, vals: Tensor, idx: Tensor, dead: Tensor) -> Tensor:
        """AuxK's normalised error given the dead latents' (ReLU'd) top-k_aux codes."""
        aux_hat = sparse_decode(vals, idx, self.sae.W_dec)  # no b_dec: it predicts a residual
        residual = residual.float()
        err = (residual - aux_hat.float()).pow(2).sum(-1).mean()
        var = (residual - residual.mean(0)).pow(2).sum(-1).mean()
        normalised = err / var.clamp_min(1e-12)
        return torch.where(dead.any(), normalised, torch.zeros_like(normalised))
