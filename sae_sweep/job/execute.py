"""One job's work, left to right: LM + text -> activation cache -> SAE training -> evals.

A job trains one grid point or a pack of points that read the same batch stream
(``config.stream_key``: same activation cache, seed and batch size): the cache is opened once and
every batch is handed to each point's SAE (``train.train_members``). Each point keeps its own
run, checkpoints, SAE artifact and evals; a single point is a pack of one.

``execute`` reports through the run objects it is given (tags, params, metrics, artifacts) and
never imports MLflow; ``app.py`` owns the runs' lifecycle.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from sae_sweep import config as C
from sae_sweep.data.sources import dataset_config, is_text
from sae_sweep.util.progress import Progress

if TYPE_CHECKING:
    from sae_sweep.activations.reader import DiskBlocks

log = logging.getLogger("sae_sweep")

CACHE_BUILD_BATCH = 32  # contexts per forward pass while caching


class RunFailed(RuntimeError):
    """The job ran but its result is not a result (zero steps, NaN, dead SAE, evals at chance)."""


@dataclass
class Point:
    """A grid point inside a job: its config, run key, (tracking) run and the weights its LM loads."""

    cfg: DictConfig
    key: str
    run: Any  # set_tags, log_params, log_metrics, log_json, log_artifact_dir
    weights: Any = None  # models.weights.ResolvedWeights (None: no LM, or resolved when loaded)
    d_in: int = 0  # the model's width: what the point writes on disk (job.disk) depends on it


def cache_spec(cfg: DictConfig, lm: Any, device: torch.device) -> Dict[str, Any]:
    from sae_sweep.data.text import dataset_fingerprint

    ds = dataset_config(cfg.dataset)
    return {
        "model": lm.fingerprint,
        "layer": int(cfg.layer),
        "hook": cfg.hook,
        "dataset": dataset_fingerprint(ds, lm),
        "context_size": ds.context_size,
        "tokens": C.cache_tokens(cfg),
        "storage_dtype": str(cfg.cache.dtype),
        "split": "train",
    }


DIGEST_CHARS = 8  # MLflow's own dataset digests are 8 hex characters


def dataset_record(
    cfg: DictConfig, lm: Any, split: str, n_tokens: Optional[int], profile: Dict[str, Any]
) -> Dict[str, Any]:
    """A split's data as an MLflow dataset input (``run.log_dataset``): the dataset's name, a
    digest that identifies exactly the windows used (``text.windows_key``: source, tokenizer,
    split, budget, context size; ``n_tokens`` None for a stream), where it comes from, the
    windows' shape and ``profile`` (token counts). The runs table shows "name (digest) Train"."""
    ctx = int(cfg.dataset.context_size)
    if not is_text(cfg.dataset.kind):  # planted activations: no tokens, a [n, d] float stream
        from sae_sweep.activations.synthetic import synthetic_params

        params = synthetic_params(cfg.dataset)
        digest = C.stable_hash({"synthetic": params, "split": split, "n_tokens": n_tokens, "context_size": ctx})
        source_type, source = (
            "code",
            {"tags": {"sae_sweep.dataset": "synthetic", **{k: str(v) for k, v in params.items()}}},
        )
        schema = _tensor_schema("activations", "float32", [-1, int(params["d"])])
    else:
        from sae_sweep.data.text import dataset_source, windows_key

        ds = dataset_config(cfg.dataset)
        digest = windows_key(ds, lm, split, n_tokens)
        source_type, source = dataset_source(ds, lm)
        schema = _tensor_schema("input_ids", "int32", [-1, ctx])
    return {
        "name": str(cfg.dataset.name),
        "digest": digest[:DIGEST_CHARS],
        "source_type": source_type,
        "source": source,
        "schema": schema,
        "context": split,
        "profile": {"split": split, "context_size": ctx, **profile},
    }


def log_dataset_input(run: Any, make_record: Callable[[], Dict[str, Any]]) -> bool:
    """Log the dataset input ``make_record()`` describes. Never fails the job that calls it: a
    record that cannot be made or a store that refuses it is a warning in the job's log and a
    ``dataset_input_error`` tag on the run (where the store takes it), so it is not hidden.
    Returns whether the input was logged."""
    try:
        run.log_dataset(make_record())
        return True
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        log.warning("run %s: dataset input not logged (the job goes on): %s", run.run_id, msg)
        try:
            run.set_tags({"dataset_input_error": msg[:4900]})
        except Exception as e2:
            log.warning(
                "run %s: could not tag the dataset-input error either: %s: %s", run.run_id, type(e2).__name__, e2
            )
        return False


def _tensor_schema(name: str, dtype: str, shape: List[int]) -> Dict[str, Any]:
    """MLflow's tensor-spec schema JSON (what ``mlflow.data`` datasets of arrays log)."""
    return {
        "mlflow_tensorspec": {
            "features": json.dumps([{"name": name, "type": "tensor", "tensor-spec": {"dtype": dtype, "shape": shape}}]),
            "targets": None,
        }
    }


def train_dataset_record(cfg: DictConfig, acts: Activations) -> Dict[str, Any]:
    """The training split of a job's activations as a dataset input: the windows its disk cache
    holds (with their BOS/EOS/PAD positions, not trained on), or the streamed split."""
    if acts.cache is None:
        return dataset_record(cfg, acts.lm, "train", None, {"streamed": True})
    cache = acts.cache
    return dataset_record(
        cfg,
        acts.lm,
        "train",
        C.cache_tokens(cfg),
        {
            "tokens": int(cache.n_tokens),
            "windows": int(cache.n_seqs),
            "special_tokens": int(cache.n_special),
            "trainable_tokens": int(cache.n_tokens) - int(cache.n_special),
        },
    )


def open_cache(cfg: DictConfig, device: torch.device, weights: Any = None) -> Tuple[Any, Any, bool, float]:
    """The LM (None for synthetic data; loaded from ``weights``) and the activation cache of this
    job's (model, layer, hook, dataset), built once and shared by every job with the same cache key:
    (lm, cache, built_now, seconds)."""
    from sae_sweep.activations.cache import get_or_build

    t0 = time.perf_counter()
    if cfg.dataset.kind == "synthetic":  # planted-dictionary activations: no LM, same cache and reader
        from sae_sweep.activations import synthetic as synthetic_data

        n = C.cache_tokens(cfg)
        cache, built = get_or_build(
            synthetic_data.cache_spec(cfg.dataset, n),
            C.cache_dir(cfg),
            synthetic_data.build_fn(cfg.dataset, n),
            special_token_ids=[],
            storage_dtype="float32",
            verify=cfg.cache.verify,
        )
        return None, cache, built, time.perf_counter() - t0
    from sae_sweep.models.lm import load_lm

    lm = load_lm(cfg.model, C.cache_dir(cfg), device, weights)
    cache, built = build_activation_cache(cfg, lm, device)
    return lm, cache, built, time.perf_counter() - t0


def build_activation_cache(cfg: DictConfig, lm: Any, device: torch.device) -> Tuple[Any, bool]:
    """(ActivationCache, built_now) for this job's (model, layer, hook, dataset)."""
    from sae_sweep.activations.cache import get_or_build
    from sae_sweep.data.text import token_windows

    spec = cache_spec(cfg, lm, device)
    cache_root = C.cache_dir(cfg)

    ds = dataset_config(cfg.dataset)

    def build() -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        windows = token_windows(ds, lm, "train", C.cache_tokens(cfg), cache_root)
        # Before any LM work: the windows' BOS/EOS positions are known now, and the cache will not
        # train on them, so a budget that must repeat data is refused here, not after the build.
        usable = int(windows.numel()) - int(
            torch.isin(windows, torch.tensor(sorted(lm.special_token_ids), dtype=windows.dtype)).sum()
        )
        best_case = usable // int(cfg.trainer.batch_size)  # a block reader's epoch can only be shorter
        why = repeat_problem(cfg, C.total_steps(cfg) / best_case if best_case else math.inf, usable)
        if why is not None:
            raise RunFailed(why + " (refused before building the activation cache)")
        for i in range(0, windows.shape[0], CACHE_BUILD_BATCH):
            ids = windows[i : i + CACHE_BUILD_BATCH]
            # as the LM gives them (its dtype, its device): the cache casts to the storage dtype and
            # checks for NaN on that device, so only the stored bytes cross to the host
            yield ids, lm.activations(ids.to(lm.device), int(cfg.layer), cfg.hook)

    return get_or_build(
        spec,
        cache_root,
        build,
        special_token_ids=sorted(lm.special_token_ids),
        storage_dtype=spec["storage_dtype"],
        verify=cfg.cache.verify,
        progress_total=math.ceil(C.cache_tokens(cfg) / ds.context_size),  # the windows build() yields
    )


@dataclass
class Activations:
    """Where a job's training batches come from: a disk cache (``cache``) or the LM's stream
    (``stream``); ``reader(seed)`` gives one seed's batch stream."""

    lm: Any
    d_in: int
    batch_size: int
    device: torch.device
    cache: Any = None
    stream: Any = None
    block_tokens: int = 1 << 17
    reader_kind: str = "blocks"
    built: bool = False
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self._blocks: Optional[DiskBlocks] = None

    def reader(self, seed: int) -> Any:
        from sae_sweep.activations.reader import BlockReader, DiskBlocks, ShuffledReader
        from sae_sweep.activations.stream import StreamReader

        if self.stream is not None:
            return StreamReader(self.stream, self.batch_size, seed, device=self.device)
        if self.reader_kind == "random":
            return ShuffledReader(self.cache, self.batch_size, seed, device=self.device)
        if self._blocks is None:  # the blocks' usable counts are read once for every seed
            self._blocks = DiskBlocks(self.cache, self.block_tokens)
        return BlockReader(self._blocks, self.batch_size, seed, device=self.device)

    def norm_scaling_factor(self, seed: int, n_batches: int, max_activation_norm_multiple: Optional[float]) -> float:
        """SAELens's activation norm scaling factor over ``n_batches`` training batches in the order
        seed ``seed`` reads them (a reader of its own: the training order is untouched), at most one
        pass over a disk cache."""
        from sae_sweep.activations.normalize import estimate_norm_scaling_factor

        reader = self.reader(seed)
        try:
            per_epoch = getattr(reader, "batches_per_epoch", None)
            n = min(n_batches, per_epoch) if per_epoch else n_batches
            return estimate_norm_scaling_factor(reader, self.d_in, n, max_activation_norm_multiple)
        finally:
            reader.close()

    def init_sample(self, seed: int) -> torch.Tensor:
        """Rows for data-dependent initialisation, from a stream of their own (seed + 7919), so
        the training order is untouched."""
        from sae_sweep.activations.reader import ShuffledReader
        from sae_sweep.activations.stream import StreamReader

        if self.stream is not None:
            first = self.stream.block(0)
            if first is None:
                raise RuntimeError("the dataset gave no windows to stream")
            return next(StreamReader(self.stream, min(4096, len(first)), seed + 7919, device=self.device))
        # Specials are excluded from batches, so a small cache has fewer usable tokens than n_tokens.
        init_reader = ShuffledReader(
            self.cache,
            min(4096, self.cache.n_tokens - self.cache.n_special),
            seed + 7919,
            device=self.device,
            prefetch=0,
        )
        return next(iter(init_reader))


def open_activations(cfg: DictConfig, device: torch.device, weights: Any = None) -> Activations:
    """The job's activations: its disk cache (built once, shared by every job with its cache key)
    or, with ``cache.mode=stream``, the LM's stream over the training split. ``weights``: the
    ``ResolvedWeights`` the LM loads (None: resolved here)."""
    batch = int(cfg.trainer.batch_size)
    if cfg.cache.mode != "stream" or cfg.dataset.kind == "synthetic":
        lm, cache, built, seconds = open_cache(cfg, device, weights)
        return Activations(
            lm,
            cache.d_in,
            batch,
            device,
            cache=cache,
            block_tokens=int(cfg.cache.block_tokens),
            reader_kind=str(cfg.cache.reader),
            built=built,
            seconds=seconds,
        )
    from sae_sweep.activations.stream import StreamBlocks
    from sae_sweep.data.text import iter_windows
    from sae_sweep.models.lm import load_lm

    t0 = time.perf_counter()
    lm = load_lm(cfg.model, C.cache_dir(cfg), device, weights)
    ds = dataset_config(cfg.dataset)
    ctx = ds.context_size
    source = StreamBlocks(
        lm,
        lambda: iter_windows(ds, lm, "train", C.cache_dir(cfg), chunk=CACHE_BUILD_BATCH),
        int(cfg.layer),
        cfg.hook,
        block_windows=max(1, int(cfg.cache.block_tokens) // ctx),
        forward_batch=CACHE_BUILD_BATCH,
    )
    return Activations(lm, lm.d_model, batch, device, stream=source, seconds=time.perf_counter() - t0)


def heldout_batch(cfg: DictConfig, lm: Any, device: torch.device) -> Any:
    """The job's held-out batch (``evals.heldout.HeldoutBatch``, one for every point of a pack):
    the first ``train.heldout_tokens`` tokens of the eval split, or None with held-out curves off."""
    from sae_sweep.evals.heldout import HeldoutBatch

    n = int(cfg.train.heldout_tokens)
    if n == 0:
        return None
    if cfg.dataset.kind == "synthetic":
        from sae_sweep.activations import synthetic as synthetic_data

        rows = synthetic_data.sample(cfg.dataset, "eval", min(n, int(cfg.dataset.eval_tokens)))
        return HeldoutBatch(activations=rows.to(device))
    from sae_sweep.data.text import token_windows
    from sae_sweep.evals.core import saebench_special_ids

    windows = token_windows(dataset_config(cfg.dataset), lm, "eval", int(cfg.dataset.eval_tokens), C.cache_dir(cfg))
    tokens = windows[: max(1, -(-n // int(windows.shape[1])))]  # the first ceil(n / ctx) windows, as eval.core.n_tokens
    return HeldoutBatch(lm, tokens, int(cfg.layer), cfg.hook, saebench_special_ids(lm.tokenizer))


def make_member(p: Point, acts: Activations, device: torch.device, heldout: Any = None) -> Any:
    """The point's trainer (data-initialised unless resuming) as a training-loop member. Its
    checkpoints are keyed by run key, so a requeued or re-run job resumes them. With ``heldout``,
    it logs ``heldout/*`` on that batch every ``train.eval_every_tokens`` tokens."""
    from sae_sweep.sae.registry import get_trainer
    from sae_sweep.training.loop import Member, checkpoint_path, rng_state

    cfg = p.cfg
    torch.manual_seed(int(cfg.seed))  # as if the point were alone in its process
    steps = C.total_steps(cfg)
    trainer = get_trainer(cfg.trainer.name)(acts.d_in, cfg.sae, cfg.trainer, steps, int(cfg.seed), device)
    p.run.set_tags({"trainer.precision": trainer.precision})  # what trainer.autocast_bf16 resolved to
    ckpt_dir = C.output_dir(cfg) / "checkpoints" / p.key
    if not checkpoint_path(ckpt_dir).exists():  # a resumed trainer has its normalisation in its checkpoint
        trainer.max_activation_norm_multiple = cfg.train.max_activation_norm_multiple
        if cfg.train.normalize_activations == "expected_average_only_in":
            trainer.norm_scaling_factor = acts.norm_scaling_factor(
                int(cfg.seed), int(cfg.train.n_batches_for_norm_estimate), cfg.train.max_activation_norm_multiple
            )
        trainer.init_from_data(acts.init_sample(int(cfg.seed)))

    def on_log(step: int, metrics: Dict[str, float]) -> None:
        p.run.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def on_eval(step: int) -> None:
        assert heldout is not None  # on_eval is only passed with a batch
        t0 = time.perf_counter()
        values = heldout.measure(trainer.inference_sae())
        values["seconds"] = time.perf_counter() - t0
        p.run.log_metrics({f"heldout/{k}": v for k, v in values.items()}, step=step)

    return Member(
        trainer,
        steps,
        ckpt_dir,
        int(cfg.train.checkpoint_every),
        int(cfg.train.log_every),
        on_log,
        rng=rng_state(),
        stream=int(cfg.seed),
        checkpoint_every_s=float(cfg.train.checkpoint_every_s),
        eval_every=C.heldout_every_steps(cfg) if heldout is not None else 0,
        on_eval=on_eval if heldout is not None else None,
    )


def execute(points: Sequence[Point], device: torch.device) -> List[Any]:
    """Train and evaluate ``points`` (one stream key) in this process: one cache opened (or one
    LM stream run) for all of them, each point fed in the order its own seed gives it. Returns per
    point its eval metrics or the exception that failed it; shared failures (the cache build, an
    interrupt) raise."""
    from sae_sweep.training.loop import train_members
    from sae_sweep.util.devices import fast_matmul

    cfg0 = points[0].cfg
    try:
        acts = open_activations(cfg0, device, points[0].weights)
    except Exception as e:  # what fills up here (model, token windows, cache shards) is on the cache disk
        from sae_sweep.job.disk import explain_disk_full

        full = explain_disk_full(e, cfg0, points[0].d_in, where=C.cache_dir(cfg0))
        if full is e:
            raise
        raise full from e
    for i, p in enumerate(points):
        # matmul_fp32: tf32 where training runs on CUDA (devices.fast_matmul), ieee elsewhere
        tags: Dict[str, Any] = {
            "device": str(device),
            "cache_mode": str(cfg0.cache.mode),
            "matmul_fp32": fast_matmul(device),
        }
        if acts.cache is not None:
            tags.update(cache_key=acts.cache.key, cache_built=str(acts.built and i == 0).lower())
            if acts.built and acts.cache.replaced:  # a corrupt or incomplete cache was quarantined and rebuilt
                tags["cache_replaced"] = acts.cache.replaced[:4900]
            p.run.log_metrics({"cache/n_tokens": acts.cache.n_tokens})
        p.run.set_tags(tags)
        p.run.log_metrics({"cache/seconds": acts.seconds})
        log_dataset_input(p.run, functools.partial(train_dataset_record, p.cfg, acts))
        if len(points) > 1:
            p.run.set_tags({"pack.size": len(points), "pack.leader": points[0].key})
    # one batch for the pack: its points share the dataset (stream key); train.heldout_tokens is cfg0's
    heldout = heldout_batch(cfg0, acts.lm, device)
    members = [make_member(p, acts, device, heldout) for p in points]
    readers = {seed: acts.reader(seed) for seed in dict.fromkeys(m.stream for m in members)}
    repeats = {id(m): _repeats_data(p.cfg, m, readers[m.stream]) for p, m in zip(points, members)}
    try:
        train_members([m for m in members if repeats[id(m)] is None], readers)
        if acts.cache is not None:
            _blame_cache_for_nan(members, readers, acts.cache)
    finally:
        for r in readers.values():
            r.close()
    for m in members:  # the evals need the SAEs only
        m.trainer.release_training_state()
    if acts.stream is not None:  # LM work paid for every SAE of this job together
        for p in points:
            p.run.log_metrics({"stream/forward_tokens": acts.stream.forward_tokens})
    outcomes: List[Any] = []
    for p, m in zip(points, members):
        if repeats[id(m)] is not None:
            outcomes.append(repeats[id(m)])
            continue
        if m.error is not None:
            outcomes.append(m.error)
            continue
        per_epoch = getattr(readers[m.stream], "batches_per_epoch", None)
        try:
            outcomes.append(
                finish(p, acts.lm, m.trainer, m.result, device, passes=m.total_steps / per_epoch if per_epoch else 1.0)
            )
        except Exception as e:  # one point's eval failure fails that point only
            outcomes.append(e)
    return outcomes


def _repeats_data(cfg: DictConfig, member: Any, reader: Any) -> Optional[RunFailed]:
    """A point whose training would pass over the cache more often than ``train.epochs`` allows
    (the cache's BOS/EOS positions are not trained on, so it can hold fewer usable tokens than
    its budget): the reason it fails before training, else None after recording the passes."""
    if not hasattr(reader, "batches_per_epoch"):
        return None  # a stream: one pass by construction (it fails if the data runs out)
    why = repeat_problem(cfg, member.total_steps / reader.batches_per_epoch, reader.n_positions)
    return RunFailed(why) if why is not None else None


def repeat_problem(cfg: DictConfig, passes: float, usable: int) -> Optional[str]:
    """Why ``passes`` over a cache of ``usable`` tokens (its BOS/EOS positions left out) is more
    than ``train.epochs`` allows, or None."""
    if passes <= int(cfg.train.epochs) + 1e-9:
        return None
    return (
        f"train.tokens={cfg.train.tokens}: {passes:.2f} passes over the cache's {usable} usable "
        f"tokens (after BOS/EOS), but train.epochs={cfg.train.epochs}: training would repeat data. Set "
        f"train.epochs={math.ceil(passes) if math.isfinite(passes) else 'more'} to repeat it on purpose, "
        f"or raise dataset.tokens"
    )


class CacheCorrupt(RuntimeError):
    """The activation cache itself holds bad values; it was quarantined and will be rebuilt."""


def _blame_cache_for_nan(members: Sequence[Any], readers: Dict[Any, Any], cache: Any) -> None:
    """A NaN/inf loss from a batch that itself holds NaN/inf is the cache's fault, not the SAE's:
    quarantine the cache (the next run rebuilds it) and say so instead of failing every rerun."""
    from sae_sweep.activations.cache import quarantine
    from sae_sweep.training.loop import TrainingFailed

    for m in members:
        step = getattr(m.error, "nonfinite_step", None) if isinstance(m.error, TrainingFailed) else None
        if step is None:
            continue
        if bool(torch.isfinite(readers[m.stream].batch_at(step - 1)).all()):
            continue  # the data was fine: the SAE diverged
        reason = f"activation cache {cache.key} holds NaN/inf values (in the batch of step {step})"
        if cache.path.exists():
            where = quarantine(cache, reason)
            reason += f"; moved to {where}: the next run rebuilds it"
        for other in members:
            if isinstance(other.error, TrainingFailed) and other.error.nonfinite_step is not None:
                other.error = CacheCorrupt(reason)
        return


def finish(p: Point, lm: Any, trainer: Any, result: Any, device: torch.device, passes: float) -> Dict[str, float]:
    """Log the training result (``passes``: over the cache's usable tokens), save the SAE as an
    artifact, run the evals."""
    from sae_sweep.models.lm import hook_name

    cfg, run = p.cfg, p.run
    run.set_tags({"trainer.precision": trainer.precision})  # a resumed run keeps its checkpoint's
    run.log_metrics(
        {
            "train/steps": result.steps,
            "train/tokens": result.tokens,
            "train/seconds": result.seconds,
            "train/epochs": passes,
        }
    )
    run.set_tags({"train.epochs": p.cfg.train.epochs})
    if result.resumed_from_step is not None:  # a requeued / re-run job continued a checkpoint
        run.set_tags({"resumed_from_step": result.resumed_from_step})
    if result.checkpoint_fallback:  # latest.pt was damaged: training went on from previous.pt
        run.set_tags({"checkpoint_fallback": result.checkpoint_fallback[:4900]})
    sae = trainer.inference_sae().eval()  # normalisation folded in: it reads raw activations
    sae_cfg_dict = {
        "d_in": trainer.d_in,
        "d_sae": trainer.d_sae,
        "k": int(cfg.sae.k),
        "architecture": cfg.trainer.name,
        "model_name": cfg.model.name,
        "model_hf_id": cfg.model.hf_id,
        "hook_name": hook_name(cfg.layer, cfg.hook),
        "hook_layer": int(cfg.layer),
        "hook_type": cfg.hook,
        "context_size": int(cfg.dataset.context_size),
        "dataset_path": cfg.dataset.get("hf_id") or cfg.dataset.name,
        "seed": int(cfg.seed),
        "dtype": "float32",
        "device": str(device),
        "run_key": p.key,
    }
    # provenance, only when on: the scaling is folded into the weights (SAELens's normalize_activations
    # is "none" after its fold) and the mask only filtered the training data
    if trainer.norm_scaling_factor is not None:
        sae_cfg_dict["norm_scaling_factor"] = trainer.norm_scaling_factor
        run.log_metrics({"train/norm_scaling_factor": trainer.norm_scaling_factor})
    if trainer.max_activation_norm_multiple is not None:
        sae_cfg_dict["max_activation_norm_multiple"] = trainer.max_activation_norm_multiple
    sae_dir = C.output_dir(cfg) / "saes" / p.key
    sae.save(sae_dir, sae_cfg_dict)
    run.log_artifact_dir(sae_dir, "sae")
    metrics = run_evals(cfg, run, lm, sae, sae_cfg_dict, device)
    from sae_sweep.util.files import REPAIRED

    if REPAIRED:  # damaged token windows / generated chunks this process found and rebuilt
        run.set_tags({"text_repaired": "; ".join(REPAIRED)[:4900]})
    check_result(metrics)
    return metrics


def run_evals(
    cfg: DictConfig, run: Any, lm: Any, sae: torch.nn.Module, sae_cfg: Dict[str, Any], device: torch.device
) -> Dict[str, float]:
    """The evals of ``eval.run`` on the point's held-out data, logged to ``run``."""
    from sae_sweep.data.text import token_windows
    from sae_sweep.evals.registry import EvalContext, get_eval
    from sae_sweep.evals.schema import flatten_metrics, to_saebench_json
    from sae_sweep.models.lm import hook_name

    names = list(cfg.eval.run or [])
    tokens = activations = planted = None
    if cfg.dataset.kind == "synthetic":
        # LM evals do not apply to planted activations; the known-answer eval does.
        from sae_sweep.activations import synthetic as synthetic_data

        skipped = [n for n in names if n != "recovery"]
        if skipped:
            run.set_tags({"evals.not_applicable": ",".join(skipped)})
        names = ["recovery"]
        activations = synthetic_data.sample(cfg.dataset, "eval", int(cfg.dataset.eval_tokens)).to(device)
        planted = synthetic_data.planted(cfg.dataset)
        n_eval = int(activations.shape[0])
        log_dataset_input(
            run, lambda: dataset_record(cfg, lm, "eval", int(cfg.dataset.eval_tokens), {"tokens": n_eval})
        )
    elif names:
        tokens = token_windows(dataset_config(cfg.dataset), lm, "eval", int(cfg.dataset.eval_tokens), C.cache_dir(cfg))
        shape = tuple(tokens.shape)
        log_dataset_input(
            run,
            lambda: dataset_record(
                cfg, lm, "eval", int(cfg.dataset.eval_tokens), {"tokens": shape[0] * shape[1], "windows": shape[0]}
            ),
        )
    all_metrics: Dict[str, float] = {}
    failed = []
    earlier: Dict[str, Any] = {}  # outputs of the evals run so far (the dashboards show fake features)
    with Progress("evals", total=len(names), unit="eval") as bar:
        for name in names:
            bar.set_postfix({"running": name})
            node = cfg.eval.get(name)
            settings = OmegaConf.to_container(node, resolve=True) if node is not None else {}
            ctx = EvalContext(
                lm=lm,
                sae=sae,
                tokens=tokens,
                layer=int(cfg.layer),
                hook=cfg.hook,
                seed=int(cfg.seed),
                settings=settings,
                sae_cfg=sae_cfg,
                cache_dir=str(C.cache_dir(cfg)),
                activations=activations,
                planted=planted,
                earlier=dict(earlier),
            )
            t0 = time.perf_counter()
            with torch.no_grad():
                output = get_eval(name).run(ctx)
            earlier[name] = output
            flat = flatten_metrics(output, prefix=name)
            run.log_metrics(flat)
            if flat.dropped:  # NaN/inf never reach MLflow; record which metrics they were
                run.set_tags({f"eval.{name}.nonfinite": ",".join(flat.dropped)})
            run.log_metrics({f"{name}/seconds": time.perf_counter() - t0})
            if output.status != "ok":
                run.set_tags(
                    {f"eval.{name}.status": output.status, f"eval.{name}.reason": (output.skip_reason or "")[:4900]}
                )
            if output.flags:
                run.set_tags({f"eval.{name}.flags": json.dumps(output.flags, default=str)[:4900]})
            if output.status == "failed":  # e.g. every probe at chance: logged, then the run fails
                failed.append(f"{name}: {output.skip_reason}")
            run.log_json(
                to_saebench_json(output, sae_cfg, sae_id=hook_name(cfg.layer, cfg.hook), model_name=cfg.model.name),
                f"evals/{output.eval_type_id}.json",
            )
            for path, text in output.files.items():  # pages and data an eval made for people to open
                run.log_text(text, path)
            all_metrics.update(flat)
            bar.update(1)
    if failed:
        raise RunFailed("evals failed: " + "; ".join(failed))
    return all_metrics


def check_result(metrics: Dict[str, float]) -> None:
    """Loud failure: a result that is not a result ends the run FAILED with the reason."""
    for key in ("core/reconstruction_quality/explained_variance", "core/model_behavior_preservation/kl_div_score"):
        if "core/sparsity/l0" in metrics and key not in metrics:
            raise RunFailed(f"{key} is NaN or inf")
    # the centred EV (SAEBench's `explained_variance` is close to the uncentred one, see evals/core.py)
    ev = metrics.get(
        "core/reconstruction_quality/explained_variance_centred",
        metrics.get("recovery/reconstruction_quality/explained_variance"),
    )
    if ev is not None and ev <= 0.0:
        raise RunFailed(f"explained_variance={ev:.4f}: the SAE reconstructs no better than the mean activation")
    alive = metrics.get("core/misc_metrics/frac_alive")
    if alive is not None and alive <= 0.0:
        raise RunFailed("every latent is dead on held-out text (frac_alive=0)")
