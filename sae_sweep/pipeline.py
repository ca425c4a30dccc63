"""One job's work, left to right: LM + text -> activation cache -> SAE training -> evals.

A job trains one grid point or a pack of points that read the same batch stream
(``config.stream_key``: same activation cache, seed and batch size): the cache is opened once and
every batch is handed to each point's SAE (``train.train_members``). Each point keeps its own
run, checkpoints, SAE artifact and evals; a single point is a pack of one.

``execute`` reports through the run objects it is given (tags, params, metrics, artifacts) and
never imports MLflow; ``app.py`` owns the runs' lifecycle.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from sae_sweep import config as C

log = logging.getLogger("sae_sweep")

CACHE_BUILD_BATCH = 32  # contexts per forward pass while caching


class RunFailed(RuntimeError):
    """The job ran but its result is not a result (zero steps, NaN, dead SAE, evals at chance)."""


@dataclass
class Point:
    """A grid point inside a job: its config, run key and (tracking) run."""

    cfg: DictConfig
    key: str
    run: Any  # set_tags, log_params, log_metrics, log_json, log_artifact_dir


def _storage_dtype(device: torch.device) -> str:
    # bf16 halves cache size on GPU runs; on CPU keep fp32 so small-model tests stay exact.
    return "bfloat16" if device.type == "cuda" else "float32"


def cache_spec(cfg: DictConfig, lm: Any, device: torch.device) -> Dict[str, Any]:
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


def open_cache(cfg: DictConfig, device: torch.device) -> Tuple[Any, Any, bool, float]:
    """The LM (None for synthetic data) and the activation cache of this job's (model, layer,
    hook, dataset), built once and shared by every job with the same cache key:
    (lm, cache, built_now, seconds)."""
    from sae_sweep.cache import get_or_build

    t0 = time.perf_counter()
    if cfg.dataset.kind == "synthetic":  # planted-dictionary activations: no LM, same cache and reader
        from sae_sweep import synthetic_data

        cache, built = get_or_build(synthetic_data.cache_spec(cfg.dataset), C.cache_dir(cfg),
                                    synthetic_data.build_fn(cfg.dataset), special_token_ids=[],
                                    storage_dtype="float32", verify=cfg.cache.verify)
        return None, cache, built, time.perf_counter() - t0
    from sae_sweep.lm import load_lm

    lm = load_lm(cfg.model, C.cache_dir(cfg), device)
    cache, built = build_activation_cache(cfg, lm, device)
    return lm, cache, built, time.perf_counter() - t0


def build_activation_cache(cfg: DictConfig, lm: Any, device: torch.device) -> Tuple[Any, bool]:
    """(ActivationCache, built_now) for this job's (model, layer, hook, dataset)."""
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
                        storage_dtype=spec["storage_dtype"], verify=cfg.cache.verify)


def make_member(p: Point, cache: Any, device: torch.device) -> Any:
    """The point's trainer (data-initialised unless resuming) as a training-loop member. Its
    checkpoints are keyed by run key, so a requeued or re-run job resumes them."""
    from sae_sweep.reader import ShuffledReader
    from sae_sweep.sae.registry import get_trainer
    from sae_sweep.train import Member, checkpoint_path, rng_state

    cfg = p.cfg
    torch.manual_seed(int(cfg.seed))  # as if the point were alone in its process
    steps = C.total_steps(cfg)
    trainer = get_trainer(cfg.trainer.name)(cache.d_in, cfg.sae, cfg.trainer, steps, int(cfg.seed), device)
    p.run.set_tags({"trainer.precision": trainer.precision})  # what trainer.autocast_bf16 resolved to
    ckpt_dir = C.output_dir(cfg) / "checkpoints" / p.key
    if not checkpoint_path(ckpt_dir).exists():
        # Initialisation sample from its own stream so the training order is untouched.
        # Specials are excluded from batches, so a small cache has fewer usable tokens than n_tokens.
        init_reader = ShuffledReader(cache, min(4096, cache.n_tokens - cache.n_special), int(cfg.seed) + 7919,
                                     device=device)
        trainer.init_from_data(next(iter(init_reader)))
        init_reader.close()

    def on_log(step: int, metrics: Dict[str, float]) -> None:
        p.run.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=step)

    return Member(trainer, steps, ckpt_dir, int(cfg.train.checkpoint_every), int(cfg.train.log_every), on_log,
                  rng=rng_state())


def execute(points: Sequence[Point], device: torch.device) -> List[Any]:
    """Train and evaluate ``points`` (one stream key) in this process from one reader. Returns per
    point its eval metrics or the exception that failed it; shared failures (the cache build, an
    interrupt) raise."""
    from sae_sweep.reader import ShuffledReader
    from sae_sweep.train import train_members

    cfg0 = points[0].cfg
    lm, cache, built, seconds = open_cache(cfg0, device)
    for i, p in enumerate(points):
        p.run.set_tags({"cache_key": cache.key, "cache_built": str(built and i == 0).lower(), "device": str(device)})
        if built and cache.replaced:  # a corrupt or incomplete cache was quarantined and rebuilt
            p.run.set_tags({"cache_replaced": cache.replaced[:4900]})
        p.run.log_metrics({"cache/n_tokens": cache.n_tokens, "cache/seconds": seconds})
        if len(points) > 1:
            p.run.set_tags({"pack.size": len(points), "pack.leader": points[0].key})
    members = [make_member(p, cache, device) for p in points]
    reader = ShuffledReader(cache, int(cfg0.trainer.batch_size), int(cfg0.seed), device=device)
    try:
        train_members(members, reader)
        _blame_cache_for_nan(members, reader, cache)
    finally:
        reader.close()
    outcomes: List[Any] = []
    for p, m in zip(points, members):
        if m.error is not None:
            outcomes.append(m.error)
            continue
        try:
            outcomes.append(finish(p, lm, m.trainer, m.result, device))
        except Exception as e:  # one point's eval failure fails that point only
            outcomes.append(e)
    return outcomes


class CacheCorrupt(RuntimeError):
    """The activation cache itself holds bad values; it was quarantined and will be rebuilt."""


def _blame_cache_for_nan(members: Sequence[Any], reader: Any, cache: Any) -> None:
    """A NaN/inf loss from a batch that itself holds NaN/inf is the cache's fault, not the SAE's:
    quarantine the cache (the next run rebuilds it) and say so instead of failing every rerun."""
    from sae_sweep.cache import quarantine
    from sae_sweep.train import TrainingFailed

    for m in members:
        step = getattr(m.error, "nonfinite_step", None) if isinstance(m.error, TrainingFailed) else None
        if step is None:
            continue
        epoch, batch = divmod(step - 1, reader.batches_per_epoch)
        if bool(torch.isfinite(reader.batch(epoch, batch)).all()):
            continue  # the data was fine: the SAE diverged
        reason = f"activation cache {cache.key} holds NaN/inf values (in the batch of step {step})"
        if cache.path.exists():
            where = quarantine(cache, reason)
            reason += f"; moved to {where}: the next run rebuilds it"
        for other in members:
            if isinstance(other.error, TrainingFailed) and other.error.nonfinite_step is not None:
                other.error = CacheCorrupt(reason)
        return


def finish(p: Point, lm: Any, trainer: Any, result: Any, device: torch.device) -> Dict[str, float]:
    """Log the training result, save the SAE as an artifact, run the evals."""
    from sae_sweep.lm import hook_name

    cfg, run = p.cfg, p.run
    run.set_tags({"trainer.precision": trainer.precision})  # a resumed run keeps its checkpoint's
    run.log_metrics({"train/steps": result.steps, "train/tokens": result.tokens, "train/seconds": result.seconds})
    if result.resumed_from_step is not None:  # a requeued / re-run job continued a checkpoint
        run.set_tags({"resumed_from_step": result.resumed_from_step})
    if result.checkpoint_fallback:  # latest.pt was damaged: training went on from previous.pt
        run.set_tags({"checkpoint_fallback": result.checkpoint_fallback[:4900]})
    sae = trainer.sae.eval()
    sae_cfg_dict = {
        "d_in": trainer.d_in, "d_sae": trainer.d_sae, "k": int(cfg.sae.k), "architecture": cfg.trainer.name,
        "model_name": cfg.model.name, "model_hf_id": cfg.model.hf_id, "hook_name": hook_name(cfg.layer, cfg.hook),
        "hook_layer": int(cfg.layer), "hook_type": cfg.hook, "context_size": int(cfg.dataset.context_size),
        "dataset_path": cfg.dataset.get("hf_id") or cfg.dataset.name, "seed": int(cfg.seed),
        "dtype": "float32", "device": str(device), "run_key": p.key,
    }
    sae_dir = C.output_dir(cfg) / "saes" / p.key
    sae.save(sae_dir, sae_cfg_dict)
    run.log_artifact_dir(sae_dir, "sae")
    metrics = run_evals(cfg, run, lm, sae, sae_cfg_dict, device)
    from sae_sweep.text import REPAIRED

    if REPAIRED:  # damaged token windows / generated chunks this process found and rebuilt
        run.set_tags({"text_repaired": "; ".join(REPAIRED)[:4900]})
    check_result(metrics)
    return metrics


def run_evals(cfg: DictConfig, run: Any, lm: Any, sae: torch.nn.Module, sae_cfg: Dict[str, Any],
              device: torch.device) -> Dict[str, float]:
    """The evals of ``eval.run`` on the point's held-out data, logged to ``run``."""
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
            output = get_eval(name).run(ctx)
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
    # the centred EV (SAEBench's `explained_variance` is close to the uncentred one, see evals/core.py)
    ev = metrics.get("core/reconstruction_quality/explained_variance_centred",
                     metrics.get("recovery/reconstruction_quality/explained_variance"))
    if ev is not None and ev <= 0.0:
        raise RunFailed(f"explained_variance={ev:.4f}: the SAE reconstructs no better than the mean activation")
    alive = metrics.get("core/misc_metrics/frac_alive")
    if alive is not None and alive <= 0.0:
        raise RunFailed("every latent is dead on held-out text (frac_alive=0)")
