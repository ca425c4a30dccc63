"""The trainer base class: what every variant shares.

A variant supplies a params dataclass (its ``trainer.*`` keys, defaults and allowed ranges, in the
one config mechanism of ``sae_sweep.config``), ``build_sae`` and ``compute_loss``; Adam, the
warmup + linear-decay schedule, gradient clipping, unit-norm decoder rows, autocast, dead-latent
counters and checkpoint state live here so that a variant's file stays small.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch
from torch import Tensor

from sae_sweep.activations.normalize import mask_high_norm
from sae_sweep.config import (
    DEAD_TOKENS,
    ConfigError,
    SAEConfig,
    d_sae_for,
    parse,
    problems,
    sae_problems,
    setting,
    shape_problems,
)
from sae_sweep.util.devices import fast_matmul

from .autoencoder import SparseAutoencoder


@dataclass
class TrainerParams:
    """`trainer.*` keys shared by every trainer. Subclass (as a dataclass) to add a variant's keys."""

    name: str = ""
    lr: float = setting(1e-3, allowed="a float > 0", check=lambda v: v > 0)
    batch_size: int = setting(1024, allowed="an integer >= 1", check=lambda v: v >= 1)
    warmup_steps: int = setting(20, allowed="an integer >= 0", check=lambda v: v >= 0)
    decay_start: float = setting(0.8, allowed="a float in [0, 1] (fraction of training)", check=lambda v: 0 <= v <= 1)
    grad_clip: float = setting(1.0, allowed="a float >= 0 (0 disables clipping)", check=lambda v: v >= 0)
    dead_tokens: int = setting(DEAD_TOKENS, allowed="an integer >= 1", check=lambda v: v >= 1)
    # auto: bf16 where the device multiplies bf16 natively (resolve_bf16), fp32 elsewhere
    autocast_bf16: Any = setting(
        "auto", allowed="auto, true or false", check=lambda v: v == "auto" or isinstance(v, bool)
    )


NATIVE_BF16_ENV = "SAE_SWEEP_NATIVE_BF16"


@dataclass(frozen=True)
class Bf16Support:
    """Whether a device multiplies bf16 natively, and what says so (for the record)."""

    native: bool
    why: str


@functools.cache
def _cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's native-bf16 matmul features: AVX512_BF16 and AMX-BF16 (torch's own checks where
    this torch has them, else /proc/cpuinfo's flags)."""
    cpu = getattr(torch, "cpu", None)
    checks = {
        "avx512_bf16": getattr(cpu, "_is_avx512_bf16_supported", None),
        "amx_bf16": getattr(cpu, "_is_amx_tile_supported", None),
    }
    if all(callable(c) for c in checks.values()):
        return tuple(name for name, check in checks.items() if callable(check) and check())
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        flags = []
    return tuple(name for name in ("avx512_bf16", "amx_bf16") if name in flags)


def detect_bf16(
    device: torch.device,
    cpu_flags: Sequence[str] | None = None,
    cuda_bf16: bool | None = None,
    env: Mapping[str, str] = os.environ,
) -> Bf16Support:
    """Native bf16 matmul on `device`: CUDA where torch says the GPU supports bf16 (Ampere and
    later), CPU with AVX512_BF16 or AMX-BF16. Without them (e.g. AVX2-only CPUs) bf16 is emulated
    and a matmul runs ~100x slower than fp32. `SAE_SWEEP_NATIVE_BF16=0|1` overrides the detection
    (the test suite sets 0, so that its results do not depend on the CPU it runs on).
    `cpu_flags` / `cuda_bf16` replace what the machine says (for tests)."""
    forced = env.get(NATIVE_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return Bf16Support(forced == "1", f"{NATIVE_BF16_ENV}={forced}")
    if device.type == "cuda":
        ok = cuda_bf16 if cuda_bf16 is not None else torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return Bf16Support(bool(ok), "torch.cuda.is_bf16_supported()" + ("" if ok else " is false"))
    if device.type == "cpu":
        flags = [f for f in (_cpu_bf16_flags() if cpu_flags is None else cpu_flags) if f in ("avx512_bf16", "amx_bf16")]
        return Bf16Support(bool(flags), ", ".join(flags) if flags else "no AVX512_BF16 or AMX-BF16")
    return Bf16Support(False, f"device type {device.type}: bf16 support not checked")


def resolve_bf16(setting_value: Any, device: torch.device, support: Bf16Support | None = None) -> bool:
    """`trainer.autocast_bf16` as a decision: true/false as given; auto = bf16 where the device
    multiplies bf16 natively (`support`, detected when not given)."""
    if setting_value != "auto":
        return bool(setting_value)
    return (support or detect_bf16(device)).native


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
    # renormalise W_dec rows + project their grads; a class default, an instance may set its own (relu)
    unit_norm_decoder: bool = True
    uses_k: ClassVar[bool] = False  # whether sae.k means anything to it (TopK-style trainers)

    def __init__(self, d_in: int, sae_cfg: Any, trainer_cfg: Any, total_steps: int, seed: int = 0, device: Any = "cpu"):
        errors = self.problems(trainer_cfg, sae_cfg, d_in)
        if errors:
            raise ConfigError("invalid trainer/sae config:\n  - " + "\n  - ".join(errors), errors)
        self.params = parse(self.params_cls, trainer_cfg, "trainer")
        self.sae_cfg = dataclasses.asdict(parse(SAEConfig, sae_cfg, "sae"))
        self.d_in = int(d_in)
        self.d_sae = d_sae_for(self.sae_cfg, self.d_in)
        self.total_steps = int(total_steps)
        self.seed = int(seed)
        self.device = torch.device(device)
        # the precision this trainer computes in ("bf16" autocast or "fp32"): auto is resolved
        # once, here; a checkpoint keeps the precision it was trained in (load_state_dict)
        self.bf16 = resolve_bf16(self.params.autocast_bf16, self.device)
        # what stays fp32 runs on TF32 tensor cores where training runs on CUDA ("tf32"), else "ieee"
        self.matmul_fp32 = fast_matmul(self.device)

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
        # Activation normalisation (activations.normalize), set by the job before training and kept
        # in checkpoints: outlier positions masked out of each batch, then a fixed scale applied.
        self.max_activation_norm_multiple: Optional[float] = None
        self.norm_scaling_factor: Optional[float] = None

    def build_sae(self, generator: torch.Generator) -> SparseAutoencoder:
        raise NotImplementedError

    def compute_loss(self, x: Tensor) -> StepOutput:
        raise NotImplementedError

    def build_optimizer(self) -> torch.optim.Optimizer:
        # fused: one kernel over all parameters (measured ~8x faster than the per-tensor loop on
        # CPU at d_sae 12288); same update rule.
        fused = self.device.type in ("cpu", "cuda")
        return torch.optim.Adam(self.sae.parameters(), lr=self.params.lr, betas=(0.9, 0.999), fused=fused)

    def release_training_state(self) -> None:
        """Free what only training needs (gradients, Adam's two moments: twice the SAE's size) before
        the evals, so a packed job does not hold every member's optimizer through them. The last
        checkpoint on disk keeps them for a resume."""
        self.optimizer.state.clear()
        for p in self.sae.parameters():
            p.grad = None

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step (after decoder renorm); e.g. to clamp parameters."""

    def extra_state(self) -> dict[str, Any]:
        """Variant-specific state to checkpoint (buffers that are not SAE parameters)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    @classmethod
    def problems(cls, trainer_cfg: Any, sae_cfg: Any = None, d_in: int | None = None) -> list[str]:
        """Every problem with `trainer.*` (and `sae.*` when given; `d_in` enables the checks that
        depend on d_sae) as messages naming key, value and what is allowed; [] when valid."""
        errors = problems(cls.params_cls, trainer_cfg, "trainer")
        name = (trainer_cfg or {}).get("name") if hasattr(trainer_cfg, "get") else None
        if name and name != cls.name:
            errors.append(f"trainer.name={name!r}: this is trainer {cls.name!r}")
        if sae_cfg is not None:
            errors += sae_problems(sae_cfg, d_in, uses_k=cls.uses_k)
        if not errors and sae_cfg is not None and d_in is not None:
            errors += shape_problems(parse(cls.params_cls, trainer_cfg, "trainer"), d_in, d_sae_for(sae_cfg, d_in))
        return errors

    def prepare_batch(self, x: Tensor) -> Tensor:
        """What the SAE trains on: high-norm outlier rows masked out, then the fixed scaling."""
        x = mask_high_norm(x, self.max_activation_norm_multiple)
        return x if self.norm_scaling_factor is None else x * self.norm_scaling_factor

    def inference_sae(self) -> SparseAutoencoder:
        """The SAE as it runs on raw activations: a copy with the norm scaling folded into its
        weights (SAELens's fold), or the training SAE itself when there is no scaling."""
        if self.norm_scaling_factor is None:
            return self.sae
        folded = copy.deepcopy(self.sae)
        folded.fold_activation_norm_scaling_factor_(self.norm_scaling_factor)
        return folded

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """b_dec := geometric median of a data sample [n, d_in] (variants may add more)."""
        x = self.prepare_batch(x.to(self.device, torch.float32))
        self.sae.b_dec.copy_(geometric_median(x).to(self.sae.b_dec.dtype))
        self.data_initialized = True

    @property
    def precision(self) -> str:
        """ "bf16" (matmuls in bf16 under autocast, weights and optimizer state fp32) or "fp32"."""
        return "bf16" if self.bf16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.params.dead_tokens

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def step(self, x: Tensor) -> dict[str, Tensor]:
        """One optimisation step on a batch [B, d_in]; returns detached 0-dim metrics on device:
        loss, mse, l0, explained_variance, dead_frac and the variant's extra parts."""
        x = self.prepare_batch(x.to(self.device, torch.float32, non_blocking=True))
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
            "precision": self.precision,
            "max_activation_norm_multiple": self.max_activation_norm_multiple,
            "norm_scaling_factor": self.norm_scaling_factor,
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
        self.max_activation_norm_multiple = state.get("max_activation_norm_multiple")
        self.norm_scaling_factor = state.get("norm_scaling_factor")
        if self.params.autocast_bf16 == "auto":
            # auto is decided once per run: resumed on a machine that decides otherwise, the run
            # goes on in the precision it started in
            self.bf16 = state.get("precision", "fp32") == "bf16"
        self.load_extra_state(state.get("extra", {}))


def mse_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Squared error summed over d_in, averaged over tokens (dictionary_learning / SAELens)."""
    return (x.float() - x_hat.float()).pow(2).sum(-1).mean()


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """Centred: 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 over the batch."""
    x = x.float()
    resid = (x - x_hat.float()).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return 1.0 - resid / total.clamp_min(1e-12)
