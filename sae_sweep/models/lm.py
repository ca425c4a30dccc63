"""Causal LMs and tokenizers, and hook points per architecture.

``load_lm(model, cache_dir, device)`` loads the weights ``models.weights.resolve`` picks for the
model (the built-in tiny model, a local directory, a hub id at ``model.revision``, or a hub model's
GGUF stand-in: one module per source in ``models/weights/``) and wraps them in a ``LanguageModel``.

Hook points (``blocks.{L}.hook_{hook}``, TransformerLens-style names):

* ``resid_pre``  input of decoder layer L (== ``hidden_states[L]`` of HF's output);
* ``resid_post`` output of decoder layer L (before the final norm);
* ``attn_out``   what the attention sub-block adds to the residual stream;
* ``mlp_out``    what the MLP sub-block adds to the residual stream.

All four are forward (pre-)hooks on modules, so they work for sequential blocks (GPT-2, Llama,
Mistral), parallel residual (GPT-NeoX/Pythia) and Gemma-2's sandwich norms alike: for Gemma-2 the
sub-block output added to the residual is the output of the post-attention / post-feed-forward
RMSNorm, so those norms are hooked instead of ``self_attn`` / ``mlp``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from sae_sweep.config import ModelConfig, resolve_device
from sae_sweep.models.weights import ModelUnavailable, ResolvedWeights, model_config, resolve
from sae_sweep.util.digests import files_sha256
from sae_sweep.util.files import sha1_file

__all__ = [
    "HOOK_TYPES",
    "FAMILIES",
    "ModelUnavailable",
    "UnsupportedModel",
    "LanguageModel",
    "hook_name",
    "load_lm",
    "model_shape",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

HOOK_TYPES = ("resid_pre", "resid_post", "mlp_out", "attn_out")


class _RightPaddingIsFine(logging.Filter):
    """transformers warns "we strongly recommend passing in an attention_mask" whenever a batch
    holds pad ids. Ours are right-padded (probing and absorption prompts): a causal model's
    activations at the real positions never see the padding, so the warning does not apply, and
    printing it once per job buries the job's own story."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "passing in an `attention_mask`" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_RightPaddingIsFine())


def hook_name(layer: int, hook: str) -> str:
    """TransformerLens-style name of a hook point, e.g. ``blocks.3.hook_resid_post``."""
    return f"blocks.{layer}.hook_{hook}"


class UnsupportedModel(ValueError):
    """The model's architecture has no hook-point mapping."""


# Architectures
@dataclass(frozen=True)
class Family:
    """Where a family keeps its decoder layers and which sub-modules produce attn_out / mlp_out.

    ``attn``/``mlp`` name the sub-module (inside one decoder layer) whose output (or the first
    element of its output tuple) is exactly what is added to the residual stream.
    """

    name: str
    layers: str  # dotted path from the *ForCausalLM model to the ModuleList of decoder layers
    attn: str
    mlp: str
    final_norm: str  # dotted path to the norm between the last layer and the unembedding


_LLAMA_LIKE = dict(layers="model.layers", attn="self_attn", mlp="mlp", final_norm="model.norm")
_GEMMA2_LIKE = dict(
    layers="model.layers", attn="post_attention_layernorm", mlp="post_feedforward_layernorm", final_norm="model.norm"
)

# Keyed by `config.model_type`. GPT-NeoX's attention/MLP outputs pass through dropout before the
# residual add, which is the identity in eval mode.
FAMILIES: Dict[str, Family] = {
    "gpt2": Family("gpt2", layers="transformer.h", attn="attn", mlp="mlp", final_norm="transformer.ln_f"),
    "gpt_neox": Family(
        "gpt_neox", layers="gpt_neox.layers", attn="attention", mlp="mlp", final_norm="gpt_neox.final_layer_norm"
    ),
    "llama": Family("llama", **_LLAMA_LIKE),
    "mistral": Family("mistral", **_LLAMA_LIKE),
    "qwen2": Family("qwen2", **_LLAMA_LIKE),
    "qwen3": Family("qwen3", **_LLAMA_LIKE),
    "gemma": Family("gemma", **_LLAMA_LIKE),
    "gemma2": Family("gemma2", **_GEMMA2_LIKE),
    "gemma3_text": Family("gemma3_text", **_GEMMA2_LIKE),
}


def _get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class _StopForward(Exception):
    """Raised by a capture hook to abandon the forward pass once the activation is taken."""


def _first(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (tensor, or tuple whose first element it is)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_first(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    return (new,) + tuple(output[1:])


# Small helpers: dtype, hashing
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: Any, device: Any) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; explicit float32/bfloat16/float16 allowed."""
    name = "auto" if dtype is None else str(dtype).replace("torch.", "")
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"model.dtype={dtype!r}: allowed values are auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _tokenizer_hash(tokenizer: Any) -> str:
    """Hash of everything that decides token ids: the full fast-tokenizer spec + special tokens."""
    h = hashlib.sha1()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:  # slow / sentencepiece tokenizers: the vocabulary is the next best thing
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps(specials, sort_keys=True).encode("utf-8"))
    return h.hexdigest()[:16]


def _shape_from_config(cfg: dict) -> Optional[Tuple[int, int]]:
    """(n_layers, d_model) from a config.json dict (nested text_config for multimodal models)."""
    if isinstance(cfg.get("text_config"), dict):
        inner = _shape_from_config(cfg["text_config"])
        if inner:
            return inner
    n = cfg.get("num_hidden_layers", cfg.get("n_layer", cfg.get("num_layers")))
    d = cfg.get("hidden_size", cfg.get("n_embd", cfg.get("d_model")))
    if isinstance(n, int) and isinstance(d, int):
        return n, d
    return None


# Shape
def model_shape(model: Any, cache_dir: str | os.PathLike, weights: Optional[ResolvedWeights] = None) -> Tuple[int, int]:
    """(n_layers, d_model) without loading weights, for validation.

    Reads the config.json of the weights ``weights`` (default: ``resolve(model, cache_dir,
    check=False)``) where it is on disk: a local directory, the built tiny model (its recipe
    before that), the converted GGUF stand-in, the HF cache; falls back to ``model.n_layers`` /
    ``model.d_model`` from the config when the model is not on disk yet.
    """
    weights = weights or resolve(model, cache_dir, check=False)
    cfg_json = weights.config_json()
    shape = _shape_from_config(cfg_json) if cfg_json else None
    if shape is None:
        n, d = weights.model.n_layers, weights.model.d_model
        if not isinstance(n, int) or not isinstance(d, int):
            raise ModelUnavailable(
                f"cannot tell the shape of model {weights.where!r}: set model.n_layers and model.d_model"
            )
        return n, d
    return shape


# Loading
WEIGHT_FILES = ("*.safetensors", "*.bin")  # what from_pretrained reads weights from
WEIGHTS_MEMO = "weights-sha256.json"  # under <cache_dir>/models/: each weight file's sha256 and stat


def weights_sha256(directory: Path, cache_dir: str | os.PathLike) -> str:
    """The identity of the weights in a model directory, from the files themselves: the sha256 of
    each weight file (hashed once per file, re-hashed when its size, mtime or inode changes:
    ``util.digests.files_sha256``), combined. Never read from a record that could go stale, so
    changed weights give new activation-cache keys."""
    files = sorted(p for pattern in WEIGHT_FILES for p in Path(directory).glob(pattern))
    if not files:
        raise ModelUnavailable(f"{directory} holds no weight files ({', '.join(WEIGHT_FILES)})")
    memo = Path(os.path.expanduser(str(cache_dir))) / "models" / WEIGHTS_MEMO
    digests = files_sha256(files, memo)
    return hashlib.sha256(json.dumps({p.name: digests[str(p)] for p in files}, sort_keys=True).encode()).hexdigest()[
        :16
    ]


def placement(device: torch.device) -> Dict[str, Any]:
    """``from_pretrained`` arguments that put the weights on ``device`` as they are read: on a GPU
    a Llama-3.1-8B never passes through host memory (16 GB of RAM in bf16 the other way, plus a
    copy). On the CPU nothing (the default)."""
    if device.type == "cpu":
        return {}
    return {"device_map": {"": str(device) if device.index is not None else f"{device.type}:0"}}


def load_lm(
    model: Any, cache_dir: str | os.PathLike, device: Any = "auto", weights: Optional[ResolvedWeights] = None
) -> LanguageModel:
    """Load the model's causal LM and tokenizer from ``weights`` (default: ``resolve(model,
    cache_dir)``, which checks that they can be had here). ``model`` is a ModelConfig (or a
    ``model`` config node, parsed into one)."""
    weights = weights or resolve(model_config(model), cache_dir)
    model_cfg: ModelConfig = weights.model
    dev = resolve_device(device)
    dtype = resolve_dtype(model_cfg.dtype, dev)
    loaded = weights.load(dtype=dtype, **placement(dev))
    fingerprint: Dict[str, Any] = {
        "name": str(model_cfg.name or weights.where),
        "source": weights.source,
        **loaded.fingerprint,
    }
    cfg_path = loaded.config_path
    fingerprint["config_hash"] = (
        sha1_file(cfg_path)
        if cfg_path and cfg_path.is_file()
        else hashlib.sha1(loaded.model.config.to_json_string().encode()).hexdigest()[:16]
    )
    if cfg_path and cfg_path.is_file():
        fingerprint["weights_sha256"] = weights_sha256(cfg_path.parent, cache_dir)
    fingerprint["dtype"] = str(dtype).replace("torch.", "")
    fingerprint["tokenizer_hash"] = _tokenizer_hash(loaded.tokenizer)
    return LanguageModel(loaded.model, loaded.tokenizer, dev, fingerprint, family=model_cfg.family)


# The wrapper
class LanguageModel:
    """A loaded causal LM with hook points. Build it with ``load_lm`` (or directly from a model)."""

    def __init__(
        self, model: Any, tokenizer: Any, device: Any, fingerprint: Dict[str, Any], family: Optional[str] = None
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.fingerprint = dict(fingerprint)

        model_type = family or getattr(model.config, "model_type", None)
        if model_type not in FAMILIES:
            raise UnsupportedModel(
                f"no hook points for model_type {model_type!r}; supported: {', '.join(FAMILIES)} "
                f"(set model.family to one of them if the architecture matches)"
            )
        self.family: str = model_type
        self._family = FAMILIES[model_type]
        self._layers = _get_path(self.model, self._family.layers)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.n_layers: int = int(cfg.num_hidden_layers)
        self.d_model: int = int(cfg.hidden_size)
        if len(self._layers) != self.n_layers:
            raise UnsupportedModel(f"{self._family.layers} has {len(self._layers)} layers, config says {self.n_layers}")

        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if bos is None and eos is None:
            raise UnsupportedModel("tokenizer has neither a BOS nor an EOS token to start windows with")
        # Models without a BOS (e.g. Qwen) start windows with EOS, as their pretraining did.
        self.bos_token_id: int = int(bos if bos is not None else eos)
        self.eos_token_id: int = int(eos if eos is not None else bos)
        pad = tokenizer.pad_token_id
        self.pad_token_id: int = int(pad if pad is not None else self.eos_token_id)
        specials = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None)
        specials |= {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        self.special_token_ids: Tuple[int, ...] = tuple(sorted(specials))
        self.fingerprint.setdefault("family", self.family)

    def __repr__(self) -> str:
        return (
            f"LanguageModel({self.fingerprint.get('name')!r}, family={self.family}, "
            f"n_layers={self.n_layers}, d_model={self.d_model}, device={self.device})"
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _check(self, layer: int, hook: str) -> None:
        if hook not in HOOK_TYPES:
            raise ValueError(f"hook={hook!r}: allowed values are {', '.join(HOOK_TYPES)}")
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer={layer!r}: model has {self.n_layers} layers, allowed 0..{self.n_layers - 1}")

    def _register(self, layer: int, hook: str, edit: Callable[[torch.Tensor], Optional[torch.Tensor]]):
        """Attach ``edit`` at a hook point. It sees the activation; a tensor it returns replaces it."""
        block = self._layers[layer]
        if hook == "resid_pre":

            def pre_hook(_module, args, kwargs):
                if args:
                    new = edit(args[0])
                    return None if new is None else ((new,) + tuple(args[1:]), kwargs)
                new = edit(kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            return block.register_forward_pre_hook(pre_hook, with_kwargs=True)

        module = (
            block
            if hook == "resid_post"
            else getattr(block, self._family.attn if hook == "attn_out" else self._family.mlp)
        )

        def post_hook(_module, _args, output):
            new = edit(_first(output))
            return None if new is None else _with_first(output, new)

        return module.register_forward_hook(post_hook)

    def _inputs(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"input_ids": input_ids.to(self.device), "use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(self.device)
        return kwargs

    @torch.inference_mode()
    def activations(
        self, input_ids: torch.Tensor, layer: int, hook: str, attention_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``[B, T, d_model]`` activations at ``hook_name(layer, hook)``, in the model's dtype.

        The forward pass is abandoned right after the hooked module runs, so later layers, the final
        norm and the unembedding cost nothing.
        """
        self._check(layer, hook)
        captured: List[torch.Tensor] = []

        def capture(act: torch.Tensor):
            captured.append(act)
            raise _StopForward

        handle = self._register(layer, hook, capture)
        try:
            self.model(**self._inputs(input_ids, attention_mask))
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"hook {hook_name(layer, hook)} did not fire")
        return captured[0]

    @torch.inference_mode()
    def logits_with_splice(
        self,
        input_ids: torch.Tensor,
        layer: int,
        hook: str,
        fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``[B, T, vocab]`` logits (model dtype) of a full forward with the activation at
        ``hook_name(layer, hook)`` replaced by ``fn(act)``; ``fn=None`` is the clean forward.

        ``fn`` gets the activation in the model's dtype; its result is cast back to that dtype, so
        the identity function gives bit-identical logits.
        """
        handle = None
        if fn is not None:
            self._check(layer, hook)

            def splice(act: torch.Tensor) -> torch.Tensor:
                new = fn(act)
                if new.shape != act.shape:
                    raise ValueError(f"splice fn returned shape {tuple(new.shape)}, expected {tuple(act.shape)}")
                return new.to(device=act.device, dtype=act.dtype)

            handle = self._register(layer, hook, splice)
        try:
            return self.model(**self._inputs(input_ids, attention_mask)).logits
        finally:
            if handle is not None:
                handle.remove()

    @torch.inference_mode()
    def direction_logits(self, directions: torch.Tensor) -> torch.Tensor:
        """``[n, vocab]``: each row of ``directions [n, d_model]`` read through the final norm and the
        unembedding as if it were the residual stream (the logit lens of a direction).

        The final norm is applied to the direction itself, so its learned scale (Gemma's ``1 + w``
        included) and LayerNorm's centring act on it; what the norm and the unembedding add to EVERY
        input (their biases: ``norm(0)`` and ``unembed(0)``) is subtracted, since it would rank the
        same tokens first for every direction. The norm's division by the input's RMS scales a row's
        logits by one positive number, so the order of tokens within a row is the direction's own.
        Soft-capping of final logits (Gemma-2) is monotonic and left out.
        """
        norm = _get_path(self.model, self._family.final_norm)
        unembed = self.model.get_output_embeddings()
        d = directions.to(device=self.device, dtype=self.dtype)
        zero = torch.zeros_like(d[:1])
        normed = norm(d) - norm(zero)
        return (unembed(normed) - unembed(torch.zeros_like(normed[:1]))).float()
