"""Validation of a whole composed job: its keys, its trainer's and evals' settings, and the values
that depend on each other or on the model's shape (passed in: this package loads no model)."""

from __future__ import annotations

import math
from typing import Any, List, Mapping, NamedTuple, Optional, cast

from sae_sweep.config.derived import SPECIAL_MARGIN, cache_tokens, d_sae_for
from sae_sweep.config.job import JobConfig, SAEConfig
from sae_sweep.config.schema import (
    _SWEEP_LEVEL,
    _parse,
    _plain,
    fail_if,
    nearest,
    parse,
    problems,
    schema,
    schema_names,
)


# Validation of a whole job
class ModelShape(NamedTuple):
    n_layers: Optional[int]  # None: no LM (dataset=synthetic)
    d_model: int


def validate(cfg: Any, shape: Optional[ModelShape]) -> None:
    """Raise ConfigError listing every problem of a composed job config.

    ``shape`` is the model's real depth and width (``lm.model_shape``; for ``dataset=synthetic``
    ``(None, dataset.synthetic.d)``), or None when the model cannot be found -- then the problem
    that said so is expected among the caller's own.
    """
    job_node = {k: _plain(cfg[k]) for k in cfg if k != "hydra"}
    errors = problems(JobConfig, job_node, "")
    trainer = job_node.get("trainer") or {}
    name = trainer.get("name")
    if name not in schema_names("trainer"):
        errors.append(f"trainer.name={name!r}: allowed values are {', '.join(schema_names('trainer'))}")
    else:
        errors += problems(cast(type, schema("trainer", name)), trainer, "trainer")  # in schema_names: registered
    errors += eval_problems(job_node.get("eval") or {})
    if not errors:
        errors += _budget_problems(cfg)
    if shape is not None:
        errors += _shape_problems(cfg, shape)
    fail_if(errors)


def _budget_problems(cfg: Any) -> List[str]:
    """Token budgets that cannot give one training batch (they would silently become one step)."""
    batch = int(cfg.trainer.batch_size)
    errors = []
    if int(cfg.train.tokens) < batch:
        errors.append(
            f"train.tokens={cfg.train.tokens}: less than one batch; allowed: at least "
            f"trainer.batch_size={batch} (or lower trainer.batch_size)"
        )
    if cache_tokens(cfg) < batch:
        size = (
            f"dataset.tokens={cfg.dataset.tokens}"
            if cfg.dataset.tokens is not None
            else f"dataset.tokens=null (train.tokens={cfg.train.tokens} / train.epochs={cfg.train.epochs} + 5 % = "
            f"{cache_tokens(cfg)})"
        )
        errors.append(
            f"{size}: the activation cache would not hold one batch; allowed: at least "
            f"trainer.batch_size={batch} (plus the BOS/EOS positions it skips)"
        )
    if cfg.cache.mode == "stream" and int(cfg.train.epochs) != 1:
        errors.append(
            f"train.epochs={cfg.train.epochs}: cache.mode=stream trains on each streamed token once; "
            f"allowed: 1 (or cache.mode=disk to repeat cached tokens)"
        )
    passes = int(cfg.train.tokens) / cache_tokens(cfg)
    if cfg.dataset.tokens is not None and passes > int(cfg.train.epochs):
        errors.append(
            f"train.tokens={cfg.train.tokens}: {passes:.1f} passes over the dataset.tokens={cfg.dataset.tokens} "
            f"cache, but train.epochs={cfg.train.epochs}: training would repeat data. Set "
            f"train.epochs={math.ceil(passes * (1 + SPECIAL_MARGIN))} to repeat it on purpose, or raise "
            f"dataset.tokens (null: it follows train.tokens)"
        )
    return errors


def eval_problems(node: Mapping[str, Any]) -> List[str]:
    names = schema_names("eval")
    errors = []
    for key in node:
        if key != "run" and key not in names:
            errors.append(f"eval.{key}: unknown setting{nearest(key, names)}; allowed: run, {', '.join(names)}")
    runnable = [n for n in names if ("eval", n) not in _SWEEP_LEVEL]
    for ev in node.get("run") or []:
        if ev not in runnable:
            errors.append(f"eval.run contains {ev!r}: allowed values are {', '.join(runnable)}")
    for key in names:
        if key in node:
            errors += problems(cast(type, schema("eval", key)), node[key], f"eval.{key}")  # in schema_names
    return errors


def _shape_problems(cfg: Any, shape: ModelShape) -> List[str]:
    errors = []
    n_layers, d_model = shape
    if n_layers is not None:
        layer = cfg.layer
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
            hint = ""
            if n_layers != cfg.model.n_layers:
                # A local model.hf_id shallower than its yaml: the yaml's default_layer does not fit it.
                hint = (
                    f" (read from {cfg.model.hf_id}; the {cfg.model.name!r} yaml says {cfg.model.n_layers} "
                    f"layers and default_layer={cfg.model.default_layer}: pass layer=N explicitly)"
                )
            errors.append(
                f"layer={layer!r}: model {cfg.model.name!r} has {n_layers} layers, "
                f"allowed values are 0..{n_layers - 1}{hint}"
            )
    errors += sae_problems(cfg.sae, d_model, report_schema=False)
    trainer_cls = schema("trainer", str(cfg.trainer.get("name")))
    if not errors and trainer_cls is not None:
        errors += shape_problems(parse(trainer_cls, cfg.trainer, "trainer"), d_model, d_sae_for(cfg.sae, d_model))
    return errors


def shape_problems(params: Any, d_in: int, d_sae: int) -> List[str]:
    """A params dataclass's own checks of values that depend on the SAE's size (a method
    ``shape_problems(d_in, d_sae)`` on the dataclass, e.g. a tracker too big for d_sae)."""
    check = getattr(params, "shape_problems", None)
    return list(check(d_in, d_sae)) if check is not None else []


def sae_problems(sae: Any, d_in: Optional[int], report_schema: bool = True, uses_k: bool = True) -> List[str]:
    """Problems with the ``sae`` node: its schema, and with ``d_in`` the size of d_sae and (for
    trainers that use it) k < d_sae."""
    sae, errors = _parse(SAEConfig, sae, "sae")
    if errors:
        return errors if report_schema else []
    if sae.d_sae is None and sae.expansion_factor is None:
        return ["sae.d_sae and sae.expansion_factor are both null; set one of them"]
    if d_in is None:
        return [] if sae.k > 0 or not uses_k else [f"sae.k={sae.k!r}: must be an integer with 0 < k < d_sae"]
    d_sae = d_sae_for(sae, d_in)
    if d_sae < 1:
        errors.append(f"sae.expansion_factor={sae.expansion_factor!r}: gives d_sae < 1 for d_in={d_in}")
    elif uses_k and not 0 < sae.k < d_sae:
        errors.append(f"sae.k={sae.k!r}: must be an integer with 0 < k < d_sae ({d_sae})")
    return errors
