"""SAE base class, trainer base class and the shared training machinery.

A variant (TopK, ReLU, JumpReLU, ...) supplies an SAE subclass (`activation`, maybe `encode`)
and a Trainer subclass (`params_cls`, `build_sae`, `compute_loss`); everything else -- Adam,
warmup + linear-decay schedule, gradient clipping, unit-norm decoder, autocast, dead-latent
counters, checkpoint state -- lives here so that a variant's file stays small.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import get_sae_class

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def as_dict(node: Any) -> dict:
    """A plain dict from a dict / OmegaConf DictConfig / dataclass / None (no omegaconf import)."""
    if node is None:
        return {}
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return dataclasses.asdict(node)
    try:  # DictConfig: resolve interpolations into plain containers
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency, but keep sae/ standalone
        pass
    return dict(node)


def resolve_d_sae(sae_cfg: Any, d_in: int) -> int:
    """`sae.d_sae` if set, else `round(sae.expansion_factor * d_in)`."""
    cfg = as_dict(sae_cfg)
    if cfg.get("d_sae") is not None:
        return int(cfg["d_sae"])
    if cfg.get("expansion_factor") is None:
        raise ValueError("sae.d_sae and sae.expansion_factor are both unset; set one of them")
    return int(round(float(cfg["expansion_factor"]) * d_in))


@torch.no_grad()
def geometric_median(x: Tensor, max_iter: int = 200, tol: float = 1e-6, eps: float = 1e-8) -> Tensor:
    """Geometric median of the rows of `x` [n, d] by Weiszfeld iterations (fp32).

    Starts at the mean; each iteration is the inverse-distance weighted mean. Distances are
    clamped at `eps` so a point coinciding with the estimate does not divide by zero.
    """
    x = x.detach().float()
    y = x.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        moved = (y_new - y).norm().item()
        y = y_new
        if moved <= tol * max(1.0, y.norm().item()):
            break
    return y


# ---------------------------------------------------------------------------------------------
# SAE
# ---------------------------------------------------------------------------------------------

# cfg.json fields SAELens / SAEBench read, with neutral defaults; the caller's cfg fills in the
# model/hook/dataset ones.
_SAELENS_DEFAULTS: dict[str, Any] = {
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
    activation_fn_str: ClassVar[str] = "relu"
    extra_cfg_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, d_in: int, d_sae: int, *, generator: torch.Generator | None = None,
                 device: Any = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.d_in, self.d_sae = int(d_in), int(d_sae)
        # Random unit decoder rows, encoder tied to the decoder at init (Gao et al.; Conerly et al.)
        w = torch.randn(self.d_sae, self.d_in, generator=generator, dtype=torch.float32)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.to(device=device, dtype=dtype))
        self.W_enc = nn.Parameter(w.T.clone().to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in, device=device, dtype=dtype))

    # -- forward ---------------------------------------------------------------------------
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

    # -- decoder geometry ----------------------------------------------------------------------
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

    # -- persistence ---------------------------------------------------------------------------
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
        caller = as_dict(cfg)
        for key, value in structural.items():
            if key in caller and caller[key] != value:
                raise ValueError(f"cfg[{key!r}]={caller[key]!r} contradicts the SAE's {key}={value!r}")
        p = next(self.parameters())
        full = {
            **_SAELENS_DEFAULTS,
            "dtype": str(p.dtype).removeprefix("torch."),
            "device": str(p.device),
            "activation_fn_str": self.activation_fn_str,
            "activation_fn_kwargs": {k: structural[k] for k in self.extra_cfg_keys},
            **caller,
            **structural,
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        _atomic_write(directory / "sae.safetensors", lambda path: save_file(tensors, str(path)))
        text = json.dumps(full, indent=2, sort_keys=True, default=str)
        _atomic_write(directory / "cfg.json", lambda path: Path(path).write_text(text))
        return directory

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **kwargs: Any) -> "SparseAutoencoder":
        extra = {k: cfg[k] for k in cls.extra_cfg_keys}
        return cls(int(cfg["d_in"]), int(cfg["d_sae"]), **extra, **kwargs)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: Any = "cpu") -> "SparseAutoencoder":
        """Rebuild a saved SAE; returns the subclass named by cfg.json's `architecture`."""
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg = json.loads((directory / "cfg.json").read_text())
        sae_cls = get_sae_class(cfg["architecture"])
        if not issubclass(sae_cls, cls):
            raise TypeError(f"{directory} holds a {sae_cls.__name__}, not a {cls.__name__}")
        state = load_file(str(directory / "sae.safetensors"), device=str(device))
        dtype = next(iter(state.values())).dtype
        sae = sae_cls.from_config(cfg, device=device, dtype=dtype)
        sae.load_state_dict(state, strict=True)
        return sae


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# trainer hyperparameters and validation
# ---------------------------------------------------------------------------------------------


def hparam(default: Any, allowed: str, check: Callable[[Any], bool] | None = None) -> Any:
    """A dataclass field carrying its allowed range (`allowed`, shown in errors) and a check."""
    return field(default=default, metadata={"allowed": allowed, "check": check})


@dataclass
class TrainerParams:
    """`trainer.*` keys shared by every trainer. Subclass (as a dataclass) to add a variant's keys."""

    name: str = ""
    lr: float = hparam(1e-3, "a float > 0", lambda v: v > 0)
    batch_size: int = hparam(1024, "an integer >= 1", lambda v: v >= 1)
    warmup_steps: int = hparam(20, "an integer >= 0", lambda v: v >= 0)
    decay_start: float = hparam(0.8, "a float in [0, 1] (fraction of training)", lambda v: 0 <= v <= 1)
    grad_clip: float = hparam(1.0, "a float >= 0 (0 disables clipping)", lambda v: v >= 0)
    dead_tokens: int = hparam(10_000_000, "an integer >= 1", lambda v: v >= 1)
    autocast_bf16: bool = hparam(False, "true or false")


def _coerce(value: Any, typ: Any) -> Any:
    """Convert a config value to a field's declared type or raise TypeError."""
    typ = {"float": float, "int": int, "bool": bool, "str": str}.get(typ, typ) if isinstance(typ, str) else typ
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if typ is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # 5e4 in YAML is a float
            return int(value)
        raise TypeError
    if typ is float:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # "1e-3" can arrive as a string from some YAML loaders
            return float(value)
        raise TypeError
    if typ is str:
        if isinstance(value, str):
            return value
        raise TypeError
    return value


def parse_params(params_cls: type, trainer_cfg: Any, trainer_name: str) -> tuple[Any, list[str]]:
    """(params instance or None, error messages) from a `trainer` config node."""
    cfg = as_dict(trainer_cfg)
    errors: list[str] = []
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    for key in cfg:
        if key not in fields:
            errors.append(
                f"trainer.{key}: unknown key for trainer {trainer_name!r}; allowed keys: {', '.join(fields)}"
            )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in cfg:
            continue
        raw = cfg[name]
        allowed = f.metadata.get("allowed", f"a {getattr(f.type, '__name__', f.type)}")
        try:
            value = _coerce(raw, f.type)
        except (TypeError, ValueError):
            errors.append(f"trainer.{name}={raw!r} has the wrong type for trainer {trainer_name!r}; allowed: {allowed}")
            continue
        check = f.metadata.get("check")
        if check is not None and (isinstance(value, float) and not math.isfinite(value) or not check(value)):
            errors.append(f"trainer.{name}={raw!r} is out of range for trainer {trainer_name!r}; allowed: {allowed}")
            continue
        values[name] = value
    if "name" in values and values["name"] != trainer_name:
        errors.append(f"trainer.name={values['name']!r} does not match trainer class {trainer_name!r}")
    if errors:
        return None, errors
    values["name"] = trainer_name
    return params_cls(**values), []


# ---------------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    """What a variant's `compute_loss` returns; all tensors stay on device (no host sync)."""

    loss: Tensor  # scalar to minimise
    x_hat: Tensor  # [B, d_in] reconstruction
    l0: Tensor  # scalar: mean number of active latents per token
    fired: Tensor  # [d_sae] bool: latent active on at least one token of the batch
    parts: dict[str, Tensor] = field(default_factory=dict)  # extra named loss terms (auxk, l1, ...)


class WarmupDecay:
    """LR multiplier: linear warmup over `warmup` steps, flat, then linear decay to 0 at `total`.

    A plain object (not a lambda) so LambdaLR's state_dict can save it.
    """

    def __init__(self, warmup: int, decay_start: float, total: int):
        self.warmup = int(warmup)
        self.total = max(int(total), 1)
        self.decay_begin = min(int(decay_start * self.total), self.total - 1)

    def __call__(self, step: int) -> float:
        mult = min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else 1.0
        if step >= self.decay_begin:
            mult *= max(0.0, (self.total - step) / (self.total - self.decay_begin))
        return mult


class Trainer:
    """Base trainer. Subclasses set `params_cls`, register with `@register_trainer(name)`, and
    implement `build_sae(generator)` and `compute_loss(x) -> StepOutput`.

    Contract: `Trainer(d_in, sae_cfg, trainer_cfg, total_steps, seed, device)`, `.sae`,
    `.init_from_data(x)`, `.step(x) -> dict[str, Tensor]`, `.state_dict()`, `.load_state_dict()`.
    """

    name: ClassVar[str] = "base"
    params_cls: ClassVar[type] = TrainerParams
    unit_norm_decoder: ClassVar[bool] = True  # renormalise W_dec rows + project their grads

    def __init__(self, d_in: int, sae_cfg: Any, trainer_cfg: Any, total_steps: int,
                 seed: int = 0, device: Any = "cpu"):
        errors = self.validate_params(trainer_cfg, sae_cfg, d_in)
        if errors:
            raise ValueError("invalid trainer/sae config:\n  " + "\n  ".join(errors))
        self.params, _ = parse_params(self.params_cls, trainer_cfg, self.name)
        self.sae_cfg = as_dict(sae_cfg)
        self.d_in = int(d_in)
        self.d_sae = resolve_d_sae(self.sae_cfg, self.d_in)
        self.total_steps = int(total_steps)
        self.seed = int(seed)
        self.device = torch.device(device)

        gen = torch.Generator().manual_seed(self.seed)  # init independent of the global RNG
        self.sae: SparseAutoencoder = self.build_sae(gen).to(self.device)
        if self.unit_norm_decoder:
            self.sae.normalize_decoder_()
        self.optimizer = self.build_optimizer()
        self.schedule = WarmupDecay(self.params.warmup_steps, self.params.decay_start, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        # tokens since each latent last fired; a latent is dead once this reaches dead_tokens
        self.tokens_since_fired = torch.zeros(self.d_sae, dtype=torch.long, device=self.device)
        self.step_count = 0
        self.tokens_seen = 0
        self.data_initialized = False

    # -- hooks for variants ----------------------------------------------------------------
    def build_sae(self, generator: torch.Generator) -> SparseAutoencoder:
        raise NotImplementedError

    def compute_loss(self, x: Tensor) -> StepOutput:
        raise NotImplementedError

    def build_optimizer(self) -> torch.optim.Optimizer:
        # fused: one kernel over all parameters (measured ~8x faster than the per-tensor loop on
        # CPU at d_sae 12288); same update rule.
        fused = self.device.type in ("cpu", "cuda")
        return torch.optim.Adam(self.sae.parameters(), lr=self.params.lr, betas=(0.9, 0.999), fused=fused)

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step (after decoder renorm); e.g. to clamp parameters."""

    def extra_state(self) -> dict[str, Any]:
        """Variant-specific state to checkpoint (buffers that are not SAE parameters)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    @classmethod
    def validate_sae_cfg(cls, sae_cfg: Any, d_in: int | None) -> list[str]:
        """Problems with the `sae` node; variants extend (e.g. TopK checks sae.k)."""
        cfg = as_dict(sae_cfg)
        errors = []
        d_sae = cfg.get("d_sae")
        if d_sae is not None and (isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae < 1):
            errors.append(f"sae.d_sae={d_sae!r} is invalid; allowed: null (use expansion_factor) or an integer >= 1")
        ef = cfg.get("expansion_factor")
        if d_sae is None:
            if ef is None:
                errors.append("sae.d_sae and sae.expansion_factor are both null; set one of them")
            elif isinstance(ef, bool) or not isinstance(ef, (int, float)) or not ef > 0:
                errors.append(f"sae.expansion_factor={ef!r} is invalid; allowed: a number > 0")
            elif d_in is not None and round(ef * d_in) < 1:
                errors.append(f"sae.expansion_factor={ef!r} gives d_sae < 1 for d_in={d_in}")
        return errors

    @classmethod
    def validate_params(cls, trainer_cfg: Any, sae_cfg: Any = None, d_in: int | None = None) -> list[str]:
        """All problems with `trainer.*` (and `sae.*` when given) as messages naming key, value
        and allowed range; [] when valid. `d_in` enables checks that depend on d_sae."""
        _, errors = parse_params(cls.params_cls, trainer_cfg, cls.name)
        if sae_cfg is not None:
            errors += cls.validate_sae_cfg(sae_cfg, d_in)
        return errors

    # -- data-dependent init -----------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """b_dec := geometric median of a data sample [n, d_in] (variants may add more)."""
        self.sae.b_dec.copy_(geometric_median(x.to(self.device)).to(self.sae.b_dec.dtype))
        self.data_initialized = True

    # -- one optimisation step ---------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.params.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.params.dead_tokens

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def step(self, x: Tensor) -> dict[str, Tensor]:
        """One optimisation step on a batch [B, d_in]; returns detached 0-dim metrics on device:
        loss, mse, l0, explained_variance, dead_frac and the variant's extra parts."""
        x = x.to(self.device, torch.float32, non_blocking=True)
        self.sae.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.compute_loss(x)
        out.loss.backward()
        if self.unit_norm_decoder:
            self.sae.remove_parallel_decoder_grad_()
        if self.params.grad_clip > 0:
            # foreach norm + clamp on device: no host sync
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.params.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.unit_norm_decoder:
            self.sae.normalize_decoder_()
        self.after_optimizer_step()

        n = x.shape[0]
        with torch.no_grad():
            self.tokens_since_fired.add_(n).masked_fill_(out.fired, 0)
            metrics = {
                "loss": out.loss.detach().float(),
                "mse": mse_loss(x, out.x_hat.detach()),
                "l0": out.l0.detach().float(),
                "explained_variance": explained_variance(x, out.x_hat.detach()),
                "dead_frac": self.dead_mask().float().mean(),
            }
            metrics.update({k: v.detach().float() for k, v in out.parts.items()})
        self.step_count += 1
        self.tokens_seen += n
        return metrics

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": dataclasses.asdict(self.params),
            "sae_cfg": self.sae_cfg,
            "d_in": self.d_in,
            "total_steps": self.total_steps,
            "seed": self.seed,
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.clone(),
            "step_count": self.step_count,
            "tokens_seen": self.tokens_seen,
            "data_initialized": self.data_initialized,
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["name"] != self.name:
            raise ValueError(f"checkpoint is for trainer {state['name']!r}, not {self.name!r}")
        if state["total_steps"] != self.total_steps:
            raise ValueError(f"checkpoint has total_steps={state['total_steps']}, trainer has {self.total_steps}")
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"].to(self.device))
        self.step_count = int(state["step_count"])
        self.tokens_seen = int(state["tokens_seen"])
        self.data_initialized = bool(state["data_initialized"])
        self.load_extra_state(state.get("extra", {}))


# ---------------------------------------------------------------------------------------------
# batch metrics (device tensors, fp32)
# ---------------------------------------------------------------------------------------------


def mse_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Squared error summed over d_in, averaged over tokens (dictionary_learning / SAELens)."""
    return (x.float() - x_hat.float()).pow(2).sum(-1).mean()


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """Centred: 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 over the batch."""
    x = x.float()
    resid = (x - x_hat.float()).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return 1.0 - resid / total.clamp_min(1e-12)


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, dense_above: float = 1 / 32) -> Tensor:
    """sum_j vals[:, j] * W_dec[idx[:, j]] (no bias) for vals/idx [B, k].

    For small k/d_sae only the k active rows are touched, forward and backward (`SparseDecode`:
    embedding_bag forward, CSR backward; no [B, d_sae] tensor). For large k (AuxK's
    k_aux = d_in/2) scattering into a dense code and using a matmul is as fast or faster; the
    switch is by shape only, so it is deterministic across resumes.
    """
    if idx.shape[-1] > dense_above * W_dec.shape[0]:
        f = torch.zeros(idx.shape[0], W_dec.shape[0], dtype=vals.dtype, device=vals.device).scatter(-1, idx, vals)
        return f @ W_dec
    return SparseDecode.apply(vals.to(W_dec.dtype), idx, W_dec)


# ---------------------------------------------------------------------------------------------
# sparse fast paths: gradients only for the k active latents of each token
# ---------------------------------------------------------------------------------------------


# The CSR matrices below are internal to one backward; torch's beta notice would print per process.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class Workspace:
    """Named scratch buffers reused across steps (same shape, dtype and device -> same memory).

    Only for tensors that do not outlive the call that fills them (not saved for backward).
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.shape != torch.Size(shape) or buf.dtype != dtype or buf.device != device:
            buf = self._bufs[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf


class Codes:
    """The sparsity pattern of a batch of codes idx [B, k], transposed to CSR over latents.

    `rows_t(values) @ X` = sum_b sum_j values[b, j] * e_{idx[b, j]} X[b]: a [d_sae, d] gradient
    that visits only the B*k active entries. Built once per batch (one sort) and shared by the
    encoder and decoder gradients, which have the same pattern.
    """

    def __init__(self, idx: Tensor, n_latents: int):
        self.shape = idx.shape
        self.n_latents = n_latents
        self.flat = flat = idx.reshape(-1)
        self.order = torch.argsort(flat, stable=True)  # stable: a fixed summation order
        counts = torch.bincount(flat, minlength=n_latents)
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.col = torch.div(self.order, idx.shape[-1], rounding_mode="floor")

    def rows_t(self, values: Tensor) -> Tensor:
        v = values.reshape(-1)[self.order]
        return torch.sparse_csr_tensor(self.crow, self.col, v, (self.n_latents, self.shape[0]),
                                       check_invariants=False)

    def scatter_t(self, values: Tensor, x: Tensor) -> Tensor:
        """[n_latents, d] = sum over entries of values[b, j] * x[b] into row idx[b, j]."""
        if x.device.type == "cpu":
            # into an uninitialised output (beta=0 ignores it): `csr @ x` zero-fills, then copies
            out = x.new_empty(self.n_latents, x.shape[-1])
            return torch.addmm(out, self.rows_t(values.to(x.dtype)), x, beta=0, out=out)
        # CUDA: index_add_ (atomic adds) needs no sort and no sparse-matrix set-up
        src = (values.to(x.dtype)[..., None] * x[:, None, :]).reshape(-1, x.shape[-1])
        return x.new_zeros(self.n_latents, x.shape[-1]).index_add_(0, self.flat, src)


def _gather_dot(W: Tensor, idx: Tensor, g: Tensor, chunk: int = 512) -> Tensor:
    """out[b, j] = <W[idx[b, j]], g[b]>.

    CPU: a sampled dense-dense product (SDDMM: g @ W.T evaluated only at the B*k entries), which
    reads each W row where it is used instead of materialising B*k gathered rows (~7x faster at
    B 4096, k 16, d 768). Elsewhere: gathered rows in chunks (stay in cache) and a batched dot.
    """
    if g.device.type == "cpu" and W.dtype == g.dtype:
        B, k = idx.shape
        crow = torch.arange(0, B * k + 1, k, device=idx.device)
        pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), g.new_zeros(B * k), (B, W.shape[0]),
                                          check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, g, W.T, beta=0.0).values().view(B, k)
    out = torch.empty(idx.shape, dtype=g.dtype, device=g.device)
    for s in range(0, idx.shape[0], chunk):
        rows = W[idx[s:s + chunk]].to(g.dtype)  # [c, k, d]
        out[s:s + chunk] = torch.bmm(rows, g[s:s + chunk, :, None]).squeeze(-1)
    return out


class SparseDecode(torch.autograd.Function):
    """x_hat = sum_j vals[:, j] W_dec[idx[:, j]]; backward touches only the gathered rows.

    grad vals[b, j] = <W_dec[idx[b, j]], g[b]> and grad W_dec = sum vals[b, j] g[b] into row
    idx[b, j] (a sparse-dense product), instead of the dense d_sae-wide decode's two matmuls.
    """

    @staticmethod
    def forward(ctx, vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(vals, idx, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g: Tensor):
        vals, idx, W_dec = ctx.saved_tensors
        g = g.contiguous()
        grad_vals = _gather_dot(W_dec, idx, g).to(vals.dtype) if ctx.needs_input_grad[0] else None
        grad_W = None
        if ctx.needs_input_grad[2]:
            grad_W = Codes(idx, W_dec.shape[0]).scatter_t(vals, g.to(W_dec.dtype))
        return grad_vals, None, grad_W


class TopKEncode(torch.autograd.Function):
    """ReLU(TopK_k((x - b_dec) @ W_enc + b_enc)) as (vals [B, k], idx [B, k]), with a sparse backward.

    Only the k selected pre-activations of a token receive gradient, so grad W_enc is a
    sparse-dense product over B*k entries instead of a dense [B, d_sae] x [B, d_in] matmul, and
    grad b_dec is one mat-vec. Optionally also returns the `k_aux` largest pre-activations among
    `dead` latents (AuxK), whose gradients join the same sparse backward.
    The matmul runs in `compute_dtype` (bf16 where the hardware has it), accumulation in fp32.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int,
                dead: Tensor | None, k_aux: int, compute_dtype: torch.dtype,
                workspace: Workspace | None = None):
        xc = x - b_dec
        a, w = xc.to(compute_dtype), W_enc.to(compute_dtype)
        # pre [B, d_sae] is the step's one big tensor and is not kept for backward: written into
        # a reused buffer it costs no allocation (on CPU a fresh 200 MB tensor per step pays
        # ~0.1 s of page faults at B 4096, d_sae 12288).
        buf = workspace.get("pre", (a.shape[0], w.shape[1]), compute_dtype, a.device) if workspace else None
        pre = torch.mm(a, w, out=buf).add_(b_enc.to(compute_dtype))
        top, idx = pre.topk(k, dim=-1, sorted=False)
        vals = top.to(W_enc.dtype).relu()
        if dead is not None and k_aux > 0:
            aux_top, aux_idx = pre.masked_fill_(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
            aux_vals = aux_top.to(W_enc.dtype).relu()  # -inf (fewer dead than k_aux) -> 0
        else:
            aux_vals = vals.new_zeros(x.shape[0], 0)
            aux_idx = idx.new_zeros(x.shape[0], 0)
        ctx.save_for_backward(xc, W_enc, vals, idx, aux_vals, aux_idx)
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals: Tensor, _g_idx, g_aux: Tensor, _g_aux_idx):
        xc, W_enc, vals, idx, aux_vals, aux_idx = ctx.saved_tensors
        # ReLU: no gradient where the selected pre-activation was <= 0
        g = torch.where(vals > 0, g_vals, 0.0) if g_vals is not None else torch.zeros_like(vals)
        if aux_idx.shape[1] > 0 and g_aux is not None:
            g = torch.cat([g, torch.where(aux_vals > 0, g_aux, 0.0)], 1)
            idx = torch.cat([idx, aux_idx], 1)
        d_sae = W_enc.shape[1]
        g = g.to(W_enc.dtype)
        col_sum = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        grad_W = grad_b_enc = grad_b_dec = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_W = Codes(idx, d_sae).scatter_t(g, xc.to(W_enc.dtype)).T
        if ctx.needs_input_grad[2]:
            grad_b_enc = col_sum
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[0]:
            # d pre[b, i] / d xc[b] = W_enc[:, i]; summed over the batch for b_dec (a mat-vec)
            if ctx.needs_input_grad[3]:
                grad_b_dec = -(W_enc @ col_sum)
            if ctx.needs_input_grad[0]:
                grad_x = _gather_dot_t(W_enc, idx, g)
        return grad_x, grad_W, grad_b_enc, grad_b_dec, None, None, None, None, None


def _gather_dot_t(W_enc: Tensor, idx: Tensor, g: Tensor) -> Tensor:
    """grad x[b] = sum_j g[b, j] W_enc[:, idx[b, j]] (rarely needed: inputs are data)."""
    return F.embedding_bag(idx, W_enc.T.contiguous(), per_sample_weights=g, mode="sum")
