"""The SAE module: x_hat = f(x) @ W_dec + b_dec, saved and loaded the way SAELens/SAEBench read it.

A variant subclasses ``SparseAutoencoder`` (``activation``, maybe ``encode``), registers its
``architecture`` name with ``@register_sae`` (the ``architecture`` field of a saved ``cfg.json``)
and says how SAELens runs it at inference (``saelens_form``, used by ``sae_sweep.export``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor, nn

from sae_sweep.util.digests import verify_recorded, write_with_sha256

from .registry import get_sae_class

# cfg.json fields SAELens / SAEBench read, with neutral defaults; the caller's cfg fills in the
# model/hook/dataset ones.
SAELENS_CFG_DEFAULTS: dict[str, Any] = {
    "model_name": None,
    "hook_name": None,
    "hook_layer": None,
    "hook_head_index": None,
    "context_size": None,
    "dataset_path": None,
    "dataset_trust_remote_code": False,
    "prepend_bos": True,
    "normalize_activations": "none",
    "apply_b_dec_to_input": True,
    "finetuning_scaling_factor": False,
    "model_from_pretrained_kwargs": {},
    "sae_lens_training_version": None,
    "neuronpedia_id": None,
}


class SparseAutoencoder(nn.Module):
    """x_hat = f(x) @ W_dec + b_dec, f(x) = act((x - b_dec) @ W_enc + b_enc).

    Parameter names and shapes follow SAELens: W_enc [d_in, d_sae], b_enc [d_sae],
    W_dec [d_sae, d_in] with unit-norm rows, b_dec [d_in]. Subclasses set `architecture`
    (via `@register_sae`), implement `activation`, and list constructor arguments that are
    saved in cfg.json in `extra_cfg_keys` (e.g. ("k",)).
    """

    architecture: ClassVar[str] = "base"
    activation_fn_str: str = "relu"  # a class default; an instance may set its own (adaptive_ortho's base)
    extra_cfg_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        generator: torch.Generator | None = None,
        device: Any = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.d_in, self.d_sae = int(d_in), int(d_sae)
        # Random unit decoder rows, encoder tied to the decoder at init (Gao et al.; Conerly et al.)
        w = torch.randn(self.d_sae, self.d_in, generator=generator, dtype=torch.float32)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.to(device=device, dtype=dtype))
        self.W_enc = nn.Parameter(w.T.clone().to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in, device=device, dtype=dtype))

    def pre_acts(self, x: Tensor) -> Tensor:
        # apply_b_dec_to_input=True: centre the input on the decoder bias (SAELens convention)
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        return self.activation(self.pre_acts(x))

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def saelens_form(self) -> tuple[str, str, dict, Tensor | None]:
        """How SAELens runs this SAE at inference: (architecture, activation_fn_str,
        activation_fn_kwargs, per-latent threshold or None). Used by ``sae_sweep.export``."""
        raise ValueError(f"SAE architecture {self.architecture!r} has no SAELens equivalent")

    @torch.no_grad()
    def fold_activation_norm_scaling_factor_(self, scaling_factor: float) -> None:
        """Make an SAE trained on ``x * s`` read raw ``x`` (in place), as SAELens's
        ``fold_activation_norm_scaling_factor``: W_enc * s, W_dec / s, b_dec / s. Pre-activations,
        latents and thresholds are unchanged; the output is the old one divided by s."""
        self.W_enc.mul_(scaling_factor)
        self.W_dec.div_(scaling_factor)
        self.b_dec.div_(scaling_factor)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (in place)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out the gradient component along each (unit) decoder row.

        With rows renormalised after every step, that component only changes the norm and would
        be undone; removing it keeps Adam's moment estimates about directions only.
        """
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        # g -= <g, w> w row-wise without [d_sae, d_in] temporaries (einsum: a batched dot)
        g.addcmul_(torch.einsum("ij,ij->i", g, w).unsqueeze(1), w, value=-1)

    def config_dict(self) -> dict[str, Any]:
        """Structural fields: what `load` needs to rebuild this module."""
        cfg: dict[str, Any] = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae}
        for key in self.extra_cfg_keys:
            cfg[key] = getattr(self, key)
        return cfg

    def save(self, directory: str | os.PathLike, cfg: Mapping[str, Any] | None = None) -> Path:
        """Write `sae.safetensors` + `cfg.json` (SAELens/SAEBench field names) into `directory`.

        `cfg` (model_name, hook_name, hook_layer, context_size, dataset_path, ...) is merged over
        the defaults; structural fields (architecture, d_in, d_sae, k, ...) come from the module
        and a caller value that contradicts them is an error. Each file is written atomically.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        structural = self.config_dict()
        caller = dict(cfg or {})
        for key, value in structural.items():
            if key in caller and caller[key] != value:
                raise ValueError(f"cfg[{key!r}]={caller[key]!r} contradicts the SAE's {key}={value!r}")
        p = next(self.parameters())
        full = {
            **SAELENS_CFG_DEFAULTS,
            "dtype": str(p.dtype).removeprefix("torch."),
            "device": str(p.device),
            "activation_fn_str": self.activation_fn_str,
            "activation_fn_kwargs": {k: structural[k] for k in self.extra_cfg_keys},
            **caller,
            **structural,
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        # sha256 of both recorded beside them (SHA256SUMS.json): `load` refuses either once changed
        write_with_sha256(
            directory / "sae.safetensors",
            lambda path: save_file(tensors, str(path)),
            needed=sum(t.numel() * t.element_size() for t in tensors.values()),
        )
        text = json.dumps(full, indent=2, sort_keys=True, default=str)
        write_with_sha256(directory / "cfg.json", text)
        return directory

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **kwargs: Any) -> SparseAutoencoder:
        extra = {k: cfg[k] for k in cls.extra_cfg_keys}
        return cls(int(cfg["d_in"]), int(cfg["d_sae"]), **extra, **kwargs)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: Any = "cpu", origin: str = "") -> SparseAutoencoder:
        """Rebuild a saved SAE; returns the subclass named by cfg.json's `architecture`.
        ``ChecksumMismatch`` (naming the file, and ``origin``: e.g. the run it came from) when
        sae.safetensors or cfg.json changed after `save`."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in ("cfg.json", "sae.safetensors"):
            verify_recorded(directory / name, origin)
        cfg = json.loads((directory / "cfg.json").read_text())
        sae_cls = get_sae_class(cfg["architecture"])
        if not issubclass(sae_cls, cls):
            raise TypeError(f"{directory} holds a {sae_cls.__name__}, not a {cls.__name__}")
        state = load_file(str(directory / "sae.safetensors"), device=str(device))
        dtype = next(iter(state.values())).dtype
        sae = sae_cls.from_config(cfg, device=device, dtype=dtype)
        sae.load_state_dict(state, strict=True)
        return sae


def forward_tokens(forward: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor) -> tuple[Tensor, Tensor]:
    """Apply a [N, d_in] -> ([N, d_in], [N, d_sae]) forward to x [..., d_in] (evals pass [B, T, d];
    the sparse decode's embedding_bag takes 2-D input only)."""
    if x.dim() == 2:
        return forward(x)
    lead = x.shape[:-1]
    x_hat, f = forward(x.reshape(-1, x.shape[-1]))
    return x_hat.reshape(*lead, x_hat.shape[-1]), f.reshape(*lead, f.shape[-1])
