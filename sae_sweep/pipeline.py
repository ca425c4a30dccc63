"""One grid point's work, left to right: LM + text → activation cache → SAE training → evals.

``execute`` reports through the ``run`` object it is given (params, metrics, artifacts) and never
imports MLflow itself; ``app.py`` owns the run's lifecycle.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from sae_sweep import config as C

log = logging.getLogger("sae_sweep")

CACHE_BUILD_BATCH = 32  # contexts per forward pass while caching


class RunFailed(RuntimeError):
    """The job ran but its result is not a result (zero steps, NaN, dead SAE, evals at chance)."""


def _storage_dtype(device: str) -> str:
    # bf16 halves cache size on GPU runs; on CPU keep fp32 so small-model tests stay exact.
    return "bfloat16" if device.startswith("cuda") else "float32"


def cache_spec(cfg: DictConfig, lm: Any, device: str) -> Dict[str, Any]:
    from sae_sweep.text import dataset_fingerprint

    return {
        "model": lm.fingerprint,
        "layer": int(cfg.layer),
        "hook": cfg.hook,
        "dataset": dataset_fingerprint(cfg.dataset, lm),
        "context_size": int(cfg.dataset.context_size),
        "tokens": int(cfg.dataset.tokens),
        "storage_dtype": _storage_dtype(device),
        "split": "train",
    }


def build_activation_cache(cfg: DictConfig, lm: Any, device: str):
    """Return (ActivationCache, built_now) for this job's (model, layer, hook, dataset)."""
    from sae_sweep.cache import get_or_build
    from sae_sweep.text import token_windows

    spec = cache_spec(cfg, lm, device)
    cache_root = C.cache_dir(cfg)

    def build() -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        windows = token_windows(cfg.dataset, lm, "train", int(cfg.dataset.tokens), cache_root)
        for i in range(0, windows.shape[0], CACHE_BUILD_BATCH):
            ids = windows[i:i + CACHE_BUILD_BATCH]
            acts = lm.activations(ids.to(lm.device), int(cfg.layer), cfg.hook)
            yield ids, acts.float().cpu()

    return get_or_build(spec, cache_root, build, special_token_ids=sorted(lm.special_token_ids),
                        storage_dtype=spec["storage_dtype"])


def execute(cfg: DictConfig, run: Any, key: str) -> Dict[str, float]:
    from sae_sweep.app import resolve_device
    from sae_sweep.train import train

    device = resolve_device(str(cfg.device))
    torch.manual_seed(int(cfg.seed))
    lm, cache = open_cache(cfg, run, device)
    trainer, reader, ckpt_dir, steps = make_trainer(cfg, cache, key, device)

    def on_log(step: int, metrics: Dict[str, float]) -> None:
        run.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=step)

    result = train(trainer, reader, steps, ckpt_dir, int(cfg.train.checkpoint_every), int(cfg.train.log_every),
                   on_log)
    return finish(cfg, run, key, lm, trainer, result, device)


def open_cache(cfg: DictConfig, run: Any, device: str):
    """1. LM and the activation cache (shared by every job with the same cache key): (lm, cache)."""
    from sae_sweep.cache import get_or_build
    from sae_sweep.lm import load_lm

    t0 = time.perf_counter()
    if cfg.dataset.kind == "synthetic":  # planted-dictionary activations: no LM, same cache and reader
        from sae_sweep import synthetic_data

        lm = None
        cache, built = get_or_build(synthetic_data.cache_spec(cfg.dataset), C.cache_dir(cfg),
                                    synthetic_data.build_fn(cfg.dataset), special_token_ids=[],
                                    storage_dtype="float32")
    else:
        lm = load_lm(cfg.model, C.cache_dir(cfg), device)
        cache, built = build_activation_cache(cfg, lm, device)
    run.set_tags({"cache_key": cache.key, "cache_built": str(built).lower(), "device": device})
    run.log_metrics({"cache/n_tokens": cache.n_tokens, "cache/seconds": time.perf_counter() - t0})
    return lm, cache


def make_trainer(cfg: DictConfig, cache: Any, key: str, device: str):
    """2. The trainer (data-initialised unless resuming), its reader, checkpoint dir and steps.
    Checkpoints are keyed by run key so a requeued or re-run job resumes."""
    from sae_sweep.app import total_steps
    from sae_sweep.cache import ShuffledReader
    from sae_sweep.sae.registry import get_trainer

    d_in = cache.d_in
    d_sae = C.resolved_d_sae(cfg, d_in)
    sae_cfg = OmegaConf.create({"d_sae": d_sae, "k": int(cfg.sae.k)})
    steps = total_steps(cfg)
    trainer = get_trainer(cfg.trainer.name)(d_in, sae_cfg, cfg.trainer, steps, int(cfg.seed), device)
    reader = ShuffledReader(cache, int(cfg.trainer.batch_size), int(cfg.seed), device=device)
    ckpt_dir = C.output_dir(cfg) / "checkpoints" / key
    if not (ckpt_dir / "latest.pt").exists():
        # Initialisation sample from its own stream so the training order is untouched.
        # Specials are excluded from batches, so a small cache has fewer usable tokens than n_tokens.
        init_reader = ShuffledReader(cache, min(4096, cache.n_tokens - cache.n_special), int(cfg.seed) + 7919,
                                     device=device)
        trainer.init_from_data(next(iter(init_reader)))
    return trainer, reader, ckpt_dir, steps


def finish(cfg: DictConfig, run: Any, key: str, lm: Any, trainer: Any, result: Any, device: str) -> Dict[str, float]:
    """3.-4. Log the training result, save the SAE as an artifact, run the evals."""
    from sae_sweep.lm import hook_name

    run.log_metrics({"train/steps": result.steps, "train/tokens": result.tokens, "train/seconds": result.seconds})
    if result.resumed_from_step is not None:  # a requeued / re-run job continued a checkpoint
        run.set_tags({"resumed_from_step": result.resumed_from_step})
    sae = trainer.sae.eval()
    d_in, d_sae = trainer.d_in, trainer.d_sae
    sae_cfg_dict = {
        "d_in": d_in, "d_sae": d_sae, "k": int(cfg.sae.k), "architecture": cfg.trainer.name,
        "model_name": cfg.model.name, "model_hf_id": cfg.model.hf_id, "hook_name": hook_name(cfg.layer, cfg.hook),
        "hook_layer": int(cfg.layer), "hook_type": cfg.hook, "context_size": int(cfg.dataset.context_size),
        "dataset_path": cfg.dataset.get("hf_id") or cfg.dataset.name, "seed": int(cfg.seed),
        "dtype": "float32", "device": device, "run_key": key,
    }
    sae_dir = C.output_dir(cfg) / "saes" / key
    sae.save(sae_dir, sae_cfg_dict)
    run.log_artifact_dir(sae_dir, "sae")

    metrics = run_evals(cfg, run, lm, sae, sae_cfg_dict, device)
    check_result(metrics)
    return metrics


def run_evals(cfg: DictConfig, run: Any, lm: Any, sae: torch.nn.Module, sae_cfg: Dict[str, Any],
              device: str) -> Dict[str, float]:
    from sae_sweep.evals.registry import EvalContext, get_eval
    from sae_sweep.evals.schema import flatten_metrics, to_saebench_json
    from sae_sweep.lm import hook_name
    from sae_sweep.text import token_windows

    names = list(cfg.eval.get("run", []) or [])
    tokens = activations = planted = None
    if cfg.dataset.kind == "synthetic":
        # LM evals do not apply to planted activations; the known-answer eval does.
        from sae_sweep import synthetic_data

        skipped = [n for n in names if n != "recovery"]
        if skipped:
            run.set_tags({"evals.not_applicable": ",".join(skipped)})
        names = ["recovery"]
        activations = synthetic_data.sample(cfg.dataset, "eval", int(cfg.dataset.eval_tokens)).to(device)
        planted = synthetic_data.planted(cfg.dataset)
    elif names:
        tokens = token_windows(cfg.dataset, lm, "eval", int(cfg.dataset.eval_tokens), C.cache_dir(cfg))
    all_metrics: Dict[str, float] = {}
    failed = []
    for name in names:
        node = cfg.eval.get(name)
        settings = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        ctx = EvalContext(lm=lm, sae=sae, tokens=tokens, layer=int(cfg.layer), hook=cfg.hook, seed=int(cfg.seed),
                          settings=settings, sae_cfg=sae_cfg, cache_dir=str(C.cache_dir(cfg)),
                          activations=activations, planted=planted)
        t0 = time.perf_counter()
        with torch.no_grad():
            output = get_eval(name)(ctx)
        flat = flatten_metrics(output, prefix=name)
        run.log_metrics(flat)
        if flat.dropped:  # NaN/inf never reach MLflow; record which metrics they were
            run.set_tags({f"eval.{name}.nonfinite": ",".join(flat.dropped)})
        run.log_metrics({f"{name}/seconds": time.perf_counter() - t0})
        if output.status != "ok":
            run.set_tags({f"eval.{name}.status": output.status, f"eval.{name}.reason": (output.skip_reason or "")[:4900]})
        if output.flags:
            run.set_tags({f"eval.{name}.flags": json.dumps(output.flags, default=str)[:4900]})
        if output.status == "failed":  # e.g. every probe at chance: logged, then the run fails
            failed.append(f"{name}: {output.skip_reason}")
        run.log_json(to_saebench_json(output, sae_cfg, sae_id=hook_name(cfg.layer, cfg.hook),
                                      model_name=cfg.model.name), f"evals/{output.eval_type_id}.json")
        all_metrics.update(flat)
    if failed:
        raise RunFailed("evals failed: " + "; ".join(failed))
    return all_metrics


def check_result(metrics: Dict[str, float]) -> None:
    """Loud failure: a result that is not a result ends the run FAILED with the reason."""
    for key in ("core/reconstruction_quality/explained_variance", "core/model_behavior_preservation/kl_div_score"):
        if "core/sparsity/l0" in metrics and key not in metrics:
            raise RunFailed(f"{key} is NaN or inf")
    ev = metrics.get("core/reconstruction_quality/explained_variance",
                     metrics.get("recovery/reconstruction_quality/explained_variance"))
    if ev is not None and ev <= 0.0:
        raise RunFailed(f"explained_variance={ev:.4f}: the SAE reconstructs no better than the mean activation")
    alive = metrics.get("core/misc_metrics/frac_alive")
    if alive is not None and alive <= 0.0:
        raise RunFailed("every latent is dead on held-out text (frac_alive=0)")
