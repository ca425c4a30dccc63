"""Causal LMs and tokenizers, hook points per architecture, and the offline ``tiny`` model.

``load_lm(model_cfg, cache_dir, device)`` resolves ``model.hf_id``:

* ``builtin:tiny``: a 4-layer GPT-2 (d_model 128) with a byte-level BPE tokenizer, both trained
  on the built-in corpus; built once per machine into ``<cache_dir>/models/tiny-v2/`` and then
  loaded through ``AutoModelForCausalLM`` / ``AutoTokenizer`` exactly like a hub model;
* an existing local directory: loaded from it;
* anything else: a hub id, loaded at ``model.revision`` (from the HF cache when it is there).

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

from sae_sweep.models import gguf, tiny
from sae_sweep.models.tiny import TINY_ARCH, TINY_VERSION
from sae_sweep.config import resolve_device
from sae_sweep.util.build import build_once
from sae_sweep.util.hub import hub_offline

__all__ = [
    "HOOK_TYPES",
    "FAMILIES",
    "TINY_HF_ID",
    "TINY_VERSION",
    "ModelUnavailable",
    "UnsupportedModel",
    "LanguageModel",
    "hook_name",
    "load_lm",
    "model_shape",
    "check_model_available",
    "resolve_dtype",
    "ensure_tiny",
    "tiny_model_dir",
]

log = logging.getLogger(__name__)

HOOK_TYPES = ("resid_pre", "resid_post", "mlp_out", "attn_out")

TINY_HF_ID = "builtin:tiny"


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


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded here (offline, not cached, missing directory)."""


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


_LLAMA_LIKE = dict(layers="model.layers", attn="self_attn", mlp="mlp")
_GEMMA2_LIKE = dict(layers="model.layers", attn="post_attention_layernorm", mlp="post_feedforward_layernorm")

# Keyed by `config.model_type`. GPT-NeoX's attention/MLP outputs pass through dropout before the
# residual add, which is the identity in eval mode.
FAMILIES: Dict[str, Family] = {
    "gpt2": Family("gpt2", layers="transformer.h", attn="attn", mlp="mlp"),
    "gpt_neox": Family("gpt_neox", layers="gpt_neox.layers", attn="attention", mlp="mlp"),
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


# Small helpers: config access, device, dtype, hashing
def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read a key from a DictConfig, dict or object, with a default when absent or None."""
    if cfg is None:
        return default
    try:
        value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    except Exception:  # OmegaConf struct mode / missing value
        value = default
    return default if value is None else value


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: Any, device: Any) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; explicit float32/bfloat16/float16 allowed."""
    name = "auto" if dtype is None else str(dtype).replace("torch.", "")
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"model.dtype={dtype!r}: allowed values are auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _sha1_file(path: Path, n: int = 16) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


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


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


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


def _unavailable_message(hf_id: str, revision: Any, reason: str) -> str:
    rev = f" (revision {revision})" if revision else ""
    return (
        f"model {hf_id!r}{rev} is not available here: {reason}. "
        f"Download it on a machine with network access (e.g. `huggingface-cli download {hf_id}` into "
        f"the shared HF cache, or `save_pretrained` into a directory) and point the config at it "
        f"with model.hf_id=/path/to/local/dir"
    )


def _hub_cached_config(hf_id: str, revision: Any) -> Optional[Path]:
    """config.json of a hub model if it is in the local HF cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(hf_id, "config.json", revision=revision or None)
    except Exception:
        return None
    return Path(path) if isinstance(path, str) else None


# The tiny model
def tiny_model_dir(cache_dir: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(str(cache_dir))) / "models" / TINY_VERSION


def _tiny_ready(path: Path) -> Optional[Path]:
    # build_info.json is written last, and the directory only appears by an atomic rename.
    return path if (path / "build_info.json").is_file() else None


def ensure_tiny(cache_dir: str | os.PathLike) -> Path:
    """Return the tiny model directory, building it (``tiny.build``) once per machine."""
    return build_once(tiny_model_dir(cache_dir), lambda tmp: tiny.build(tmp, cache_dir), ready=_tiny_ready)[0]


# Resolution, shape, availability
def _source(model_cfg: Any) -> Tuple[str, str]:
    """("builtin" | "local" | "hub", id-or-path)."""
    hf_id = str(_cfg_get(model_cfg, "hf_id", ""))
    if hf_id.startswith("builtin:"):
        if hf_id != TINY_HF_ID:
            raise ModelUnavailable(f"model.hf_id={hf_id!r}: the only built-in model is {TINY_HF_ID!r}")
        return "builtin", hf_id
    local = os.path.expanduser(hf_id)
    if os.path.isdir(local):
        return "local", str(Path(local).resolve())
    if hf_id.startswith(("/", "./", "../", "~")) or hf_id.count("/") > 1:
        # Looks like a path (hub ids are "name" or "org/name") but is not a directory.
        raise ModelUnavailable(f"model.hf_id={hf_id!r}: no such local directory")
    return "hub", hf_id


def model_shape(model_cfg: Any, cache_dir: str | os.PathLike) -> Tuple[int, int]:
    """(n_layers, d_model) without loading weights, for validation.

    Reads config.json of a local directory, the built tiny model or the HF cache; falls back to
    ``model.n_layers`` / ``model.d_model`` from the config when the model is not on disk yet.
    """
    kind, ident = _source(model_cfg)
    cfg_json: Optional[dict] = None
    if kind == "builtin":
        cfg_json = _read_json(tiny_model_dir(cache_dir) / "config.json")
        if cfg_json is None:  # not built yet: the recipe is fixed
            return TINY_ARCH["n_layer"], TINY_ARCH["n_embd"]
    elif kind == "local":
        cfg_json = _read_json(Path(ident) / "config.json")
        if cfg_json is None:
            raise ModelUnavailable(f"model.hf_id={ident!r}: directory has no readable config.json")
    else:
        path = _hub_cached_config(ident, _cfg_get(model_cfg, "revision"))
        cfg_json = _read_json(path) if path else None
    shape = _shape_from_config(cfg_json) if cfg_json else None
    if shape is None:
        n, d = _cfg_get(model_cfg, "n_layers"), _cfg_get(model_cfg, "d_model")
        if n is None or d is None:
            raise ModelUnavailable(f"cannot tell the shape of model {ident!r}: set model.n_layers and model.d_model")
        return int(n), int(d)
    return shape


def resolve_weights(model_cfg: Any, cache_dir: str | os.PathLike, timeout: float = 10.0) -> str:
    """Which weights ``load_lm`` will load: "builtin", "local", "hub" or "gguf" (``model.gguf``,
    a package's GGUF file: see gguf.py). ``model.weights=auto`` takes the hub's when the HF cache
    or the hub has them, else the GGUF stand-in when its package is installed; ModelUnavailable
    (with how to get either) when neither can be had."""
    kind, ident = _source(model_cfg)
    if kind != "hub":
        return kind
    want = str(_cfg_get(model_cfg, "weights", "auto"))
    spec = _cfg_get(model_cfg, "gguf")
    if want == "gguf":
        if not spec:
            raise ModelUnavailable(f"model.weights=gguf but model {ident!r} names no model.gguf package")
        if gguf.gguf_path(spec) is None:
            raise ModelUnavailable(f"model.weights=gguf: {gguf.install_hint(spec)}")
        return "gguf"
    try:
        _check_hub_model(model_cfg, ident, timeout)
        return "hub"
    except ModelUnavailable as e:
        if want == "auto" and spec and gguf.gguf_path(spec) is not None:
            log.info("model %s: the hub's weights are not available here; using the installed GGUF stand-in (%s)",
                     ident, _cfg_get(spec, "label"))
            return "gguf"
        if spec and want == "auto":
            raise ModelUnavailable(f"{e}. Or, offline: {gguf.install_hint(spec)}") from None
        raise


def check_model_available(model_cfg: Any, cache_dir: str | os.PathLike, timeout: float = 10.0) -> None:
    """Raise ModelUnavailable quickly if ``load_lm`` could not get the model here.

    builtin and local models are always available (tiny is built on demand); a hub model is if it
    is in the HF cache, or if the hub answers (not when HF_HUB_OFFLINE is set), or if its GGUF
    stand-in is installed (``model.weights`` auto or gguf).
    """
    resolve_weights(model_cfg, cache_dir, timeout)


def _check_hub_model(model_cfg: Any, ident: str, timeout: float) -> None:
    revision = _cfg_get(model_cfg, "revision")
    if _hub_cached_config(ident, revision) is not None:
        return
    if hub_offline("model"):
        raise ModelUnavailable(_unavailable_message(ident, revision, "HF_HUB_OFFLINE is set and it is not in the HF cache"))
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(ident, revision=revision or None, timeout=timeout)
    except Exception as e:  # network errors, repository not found, gated
        raise ModelUnavailable(_unavailable_message(ident, revision, f"{type(e).__name__}: {e}")) from e


# Loading
def placement(device: torch.device) -> Dict[str, Any]:
    """``from_pretrained`` arguments that put the weights on ``device`` as they are read: on a GPU
    a Llama-3.1-8B never passes through host memory (16 GB of RAM in bf16 the other way, plus a
    copy). On the CPU nothing (the default)."""
    if device.type == "cpu":
        return {}
    return {"device_map": {"": str(device) if device.index is not None else f"{device.type}:0"}}


def load_lm(model_cfg: Any, cache_dir: str | os.PathLike, device: Any = "auto") -> "LanguageModel":
    """Load the configured causal LM and tokenizer (see module docstring for how hf_id resolves)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dtype = resolve_dtype(_cfg_get(model_cfg, "dtype", "auto"), dev)
    kind, ident = _source(model_cfg)
    revision = _cfg_get(model_cfg, "revision")
    if kind == "hub" and resolve_weights(model_cfg, cache_dir) == "gguf":
        kind = "gguf"
    fingerprint: Dict[str, Any] = {"name": str(_cfg_get(model_cfg, "name", ident)), "source": kind}

    if kind == "builtin":
        path = ensure_tiny(cache_dir)
        info = _read_json(path / "build_info.json") or {}
        # No path in the fingerprint: a moved cache_dir must not change cache keys.
        fingerprint.update(hf_id=ident, build=TINY_VERSION, weights_hash=info.get("weights_hash"))
        load_from, load_kwargs = str(path), {}
    elif kind == "local":
        path = Path(ident)
        fingerprint.update(path=ident)
        load_from, load_kwargs = ident, {}
    elif kind == "gguf":
        spec = _cfg_get(model_cfg, "gguf")
        path = gguf.ensure_model_dir(spec, cache_dir)
        info = gguf.build_info(path)
        # The stand-in's identity: which file (by content), not where the cache lives.
        fingerprint.update(hf_id=ident, weights=_cfg_get(spec, "label"), gguf_sha256=info.get("sha256"),
                           conversion=info.get("conversion"))
        load_from, load_kwargs = str(path), {}
    else:
        path = None
        fingerprint.update(hf_id=ident, revision=revision)
        load_from, load_kwargs = ident, {"revision": revision}

    def _load(**extra):
        tok = AutoTokenizer.from_pretrained(load_from, **load_kwargs, **extra)
        mdl = AutoModelForCausalLM.from_pretrained(load_from, dtype=dtype, **load_kwargs, **placement(dev), **extra)
        return tok, mdl

    if kind == "hub":
        # Cache first (fast, no network); then the hub unless we are offline.
        try:
            tokenizer, model = _load(local_files_only=True)
        except Exception as cached_err:
            if hub_offline("model"):
                raise ModelUnavailable(_unavailable_message(
                    ident, revision, "HF_HUB_OFFLINE is set and it is not in the HF cache")) from cached_err
            try:
                tokenizer, model = _load()
            except Exception as e:
                raise ModelUnavailable(_unavailable_message(ident, revision, f"{type(e).__name__}: {e}")) from e
        cfg_path = _hub_cached_config(ident, revision)
        fingerprint["commit"] = getattr(model.config, "_commit_hash", None)
    else:
        tokenizer, model = _load()
        cfg_path = path / "config.json"

    fingerprint["config_hash"] = _sha1_file(cfg_path) if cfg_path and cfg_path.is_file() else \
        hashlib.sha1(model.config.to_json_string().encode()).hexdigest()[:16]
    fingerprint["dtype"] = str(dtype).replace("torch.", "")
    fingerprint["tokenizer_hash"] = _tokenizer_hash(tokenizer)
    return LanguageModel(model, tokenizer, dev, fingerprint, family=_cfg_get(model_cfg, "family"))


# The wrapper
class LanguageModel:
    """A loaded causal LM with hook points. Build it with ``load_lm`` (or directly from a model)."""

    def __init__(self, model: Any, tokenizer: Any, device: Any, fingerprint: Dict[str, Any],
                 family: Optional[str] = None):
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
        return (f"LanguageModel({self.fingerprint.get('name')!r}, family={self.family}, "
                f"n_layers={self.n_layers}, d_model={self.d_model}, device={self.device})")

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

        module = block if hook == "resid_post" else \
            getattr(block, self._family.attn if hook == "attn_out" else self._family.mlp)

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
    def activations(self, input_ids: torch.Tensor, layer: int, hook: str,
                    attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
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
    def logits_with_splice(self, input_ids: torch.Tensor, layer: int, hook: str,
                           fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                           attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
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
