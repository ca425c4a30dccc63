"""Throughput benchmarks: every figure is a ratio of two things measured in the same run.

    python -m sae_sweep.bench perf [--out bench_results/bench.json] [--peer-venvs bench_results/venvs]
    python -m sae_sweep.bench            # the same (perf is the default subcommand)
    make bench                           # creates the peers' venvs first (make bench-peers), then the above

1. TopK training at d_in 768, d_sae 12288, k 16, batch 4096, fp32 and bf16 autocast (bf16 where
   the machine runs it natively): our step, the peers' own code installed from the index
   (dictionary_learning 0.1.0's `TopKTrainer.update`, sparsify 1.3.3's `SparseCoder` trained as
   their trainer does) and the encoder matmul (the roofline: tokens/s if a step were one encoder
   matmul in the best dtype), each in its own process (`step_worker.py`), warmed up, then timed in
   interleaved rounds of consecutive steps (see `fig_topk`). Plus quality: explained variance on
   the planted dictionary, sparse vs dense backward and bf16 vs fp32.
2. cache build: tokens/s building an activation cache (pipeline.build_activation_cache, the job's
   own code) vs a bare forward to the hooked layer on the same windows; early exit vs full forward.
   Model: the offline `builtin:tiny` (4-layer GPT-2 architecture, d_model 128), built once into
   the cache dir -- small, so write overhead weighs more than it would on a real model;
   `--cache-model smollm2-135m` (with `--cache-dataset postgres_manual`) times a real one.
3. cache reader: shuffled batches/s from a d_in 768 cache on disk vs TopK training steps/s.
4. sweep amortization: LM forward tokens of a 2 seeds x 2 trainers sweep (builds.log) vs one
   cache per job; packing: the same sweep's training loop packed vs one point at a time.
5. memory: peak RSS of each TopK implementation's step (from its worker) and of temporal_ortho's
   tracking.
6. GPU: the same figures run on CUDA when one is available (`--device auto`); the TopK figure
   there times ours and the roofline matmul on the GPU (absolute tokens/s; `--d-in/--d-sae/--k`
   set its dims), the peer comparison runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

D_IN, D_SAE, K, BATCH = 768, 12288, 16, 4096
SMOKE_DIMS = (64, 512, 8, 256)  # --smoke: (d_in, d_sae, k, batch)


# timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Fastest of `reps` timed calls after `warmup` calls (the least-disturbed on a shared machine)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_flops(dtype: torch.dtype, device: torch.device, m: int, k: int, n: int, reps: int = 3) -> float:
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)  # the compute ceiling: no allocation in the timing
    return 2 * m * k * n / best_seconds(lambda: torch.mm(a, b, out=out), device, reps)


def bf16_probe(device: torch.device, reps: int) -> dict[str, Any]:
    """bf16 vs fp32 matmul on a small shape. Without native bf16 (e.g. AVX2-only CPUs) bf16 runs
    orders of magnitude slower, and the bf16 steps at full size would take minutes: they are run
    only where this ratio is >= 0.5. The roofline itself is timed in the TopK rounds (fig_topk)."""
    from sae_sweep.sae.trainer import detect_bf16

    probe32 = matmul_flops(torch.float32, device, 256, D_IN, 1024, reps)
    probe16 = matmul_flops(torch.bfloat16, device, 256, D_IN, 1024, reps)
    support = detect_bf16(device)
    return {
        "bf16_vs_fp32_small": probe16 / probe32,
        "run_bf16": probe16 >= 0.5 * probe32,
        "native_bf16": support.native,
        "native_bf16_why": support.why,
    }


# The TopK step of every implementation, each in its own worker process (step_worker.py)

WORKER = Path(__file__).with_name("step_worker.py")


@dataclass
class Peer:
    """A peer's own code, installed from the index into a venv that `make bench-peers` creates."""

    venv: str  # directory under --peer-venvs
    label: str  # what is timed ({version} filled in)
    env: dict[str, str] = field(default_factory=dict)


PEERS = {
    "dictionary_learning": Peer("dictionary_learning", "dictionary_learning {version}: TopKTrainer.update"),
    "sparsify": Peer(
        "sparsify",
        "sparsify {version}: SparseCoder fwd + bwd + Adam + decoder renorm",
        {"SPARSIFY_DISABLE_TRITON": "1"},
    ),
}
OURS_LABEL = "sae_sweep {version}: trainer=topk step (sparse backward)"


QUIET = 0.05  # a step is quiet when its threads waited for a core less than 5 % of its time


def quiet_steps(times: list[dict[str, float]]) -> list[dict[str, float]]:
    """The steps during which the worker's threads waited for a core less than QUIET of the wall time."""
    return [t for t in times if t["runq_wait"] < QUIET * t["wall"]]


def round_order(keys: list[str], r: int, rounds: int, has_quiet: Callable[[str], bool]) -> list[str]:
    """The variants that run in round `r` (0-based), in their order: every variant in the first
    `rounds` rounds, then only those without a quiet step yet ([] = no more rounds needed); the
    order rotates by one from round to round, so no variant always runs right after the same one."""
    todo = list(keys) if r < rounds else [k for k in keys if not has_quiet(k)]
    if not todo:
        return []
    shift = r % len(todo)
    return todo[shift:] + todo[:shift]


def summarize(
    ready: dict[str, Any], times: list[dict[str, float]], peak_rss_mib: float | None, tokens: int
) -> dict[str, Any]:
    """One variant's figures from its worker's ready message and timed steps (each step a dict of
    wall, cpu, runq_wait, minflt and in_block: its position in its block of consecutive steps)."""
    best = min(times, key=lambda t: t["wall"])
    quiet = quiet_steps(times)
    walls = sorted(t["wall"] for t in (quiet or times))
    base = ready.get("rss_before_setup_mib")

    def median(ts: list[float]) -> float | None:
        return sorted(ts)[len(ts) // 2] if ts else None

    return {
        "version": ready["version"],
        "torch": ready["torch"],
        "steps_timed": len(times),
        "quiet_steps": len(quiet),
        "best_seconds": best["wall"],
        # the median of the quiet steps (of all steps where none was quiet)
        "median_seconds": walls[len(walls) // 2],
        "tokens_per_s": tokens / best["wall"],
        "median_tokens_per_s": tokens / walls[len(walls) // 2],
        # average number of this process's threads waiting for a core during its best step
        # (0 on a machine of its own)
        "best_step_waiting_threads": best["runq_wait"] / best["wall"],
        "best_step_cpu_seconds": best["cpu"],
        "best_step_minflt": best["minflt"],
        "warmup_seconds": [w["wall"] for w in ready["warmup"]],
        # a step right after the other variants ran vs one right after its own last step
        "median_seconds_first_in_block": median([t["wall"] for t in times if t["in_block"] == 0]),
        "median_seconds_later_in_block": median([t["wall"] for t in times if t["in_block"] > 0]),
        "steps": times,
        "peak_rss_mib": peak_rss_mib,
        "peak_rss_above_imports_mib": None if peak_rss_mib is None or base is None else peak_rss_mib - base,
    }


class StepWorker:
    """One (implementation, precision) in its own process: set up and warmed up once, then asked
    for blocks of consecutive timed steps (see step_worker.py for the protocol)."""

    def __init__(
        self,
        python: str,
        impl: str,
        precision: str,
        threads: int,
        warmup: int,
        env: dict[str, str] | None = None,
        dims: tuple[int, int, int, int] = (D_IN, D_SAE, K, BATCH),
        device: str = "cpu",
    ):
        from sae_sweep.bench.step_worker import MARK

        self.mark, self.name = MARK, f"{impl}/{precision}"
        child_env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
        self.stderr = tempfile.TemporaryFile(mode="w+")
        d_in, d_sae, k, batch = dims
        self.proc = subprocess.Popen(
            [
                python,
                str(WORKER),
                "--impl",
                impl,
                "--precision",
                precision,
                "--threads",
                str(threads),
                "--d-in",
                str(d_in),
                "--d-sae",
                str(d_sae),
                "--k",
                str(k),
                "--batch",
                str(batch),
                "--warmup",
                str(warmup),
            ]
            + (["--device", device] if device != "cpu" else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=child_env,
        )
        self.ready = self._read()
        if "error" in self.ready:
            raise RuntimeError(self.ready["error"])
        self.ready = self.ready["ready"]
        self.times: list[dict[str, float]] = []
        self.peak_rss_mib: float | None = None

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(self.mark):
                return json.loads(line[len(self.mark) :])
        self.proc.wait()
        self.stderr.seek(0)
        raise RuntimeError(f"{self.name} worker exited {self.proc.returncode}: {self.stderr.read()[-1500:]}")

    def run(self, steps: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"steps": steps}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        for i, t in enumerate(answer["steps"]):
            t["in_block"] = i  # 0: the first step after other variants ran
        self.times += answer["steps"]
        self.peak_rss_mib = answer.get("peak_rss_mib")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()

    def quiet_steps(self) -> list[dict[str, float]]:
        return quiet_steps(self.times)

    def summary(self, tokens: int) -> dict[str, Any]:
        return summarize(self.ready, self.times, self.peak_rss_mib, tokens)


def ours_python() -> tuple[str, dict[str, str]]:
    """This interpreter, with the sae_sweep that this bench imported first on its path."""
    import sae_sweep

    root = str(Path(sae_sweep.__file__).resolve().parents[1])
    return sys.executable, {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def peer_python(name: str, venvs: Path) -> Path | None:
    """The Python of the peer's venv, None where `make bench-peers` has not created it."""
    py = venvs / PEERS[name].venv / "bin" / "python"
    return py if py.exists() else None


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 10 s in which some runnable task waited for a CPU (None if unknown)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(line.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def fig_topk(
    device: torch.device,
    probe: dict[str, Any],
    venvs: Path,
    peers: list[str],
    rounds: int,
    block: int,
    warmup: int,
    threads: int,
    max_rounds: int | None = None,
    dims: tuple[int, int, int, int] = (D_IN, D_SAE, K, BATCH),
) -> dict[str, Any]:
    """Tokens/s of one TopK training step at `dims` = (d_in, d_sae, k, batch), by default d_in 768,
    d_sae 12288, k 16, batch 4096 (`--smoke`: tiny dims, to check that every worker runs): ours, each
    peer's own code (from its venv) and the encoder matmul (the roofline), fp32 and bf16 autocast.

    Each variant runs in its own process, set up and warmed up (`warmup` steps) before any timing.
    Then `rounds` rounds; in each, every variant runs `block` consecutive steps, in an order that
    rotates from round to round. So every variant is timed as training runs it (step after step in
    a process that does nothing else) and all see the same background load. A step during which a
    thread of the worker waited for a core (another process was running) is not what training on
    a machine of its own gets: with 2 threads on 2 cores, one busy neighbour makes a step several
    times slower (see docs/performance.md). So after `rounds`, the variants without a quiet step
    (waiting threads < QUIET) get more rounds, up to `max_rounds`. Reported per variant: the best
    step, the median of its quiet steps, and how many were quiet.

    On a GPU (``device`` cuda) only ours and the roofline matmul run, on the GPU (each step timed
    until the GPU has finished it; fp32 is TF32 there): absolute tokens/s at ``dims``. The peers'
    steps are timed on CPU (``--device cpu``).
    """
    on_gpu = device.type != "cpu"
    precisions = ["fp32", "bf16"] if probe["run_bf16"] else ["fp32"]
    python, env = ours_python()
    plan: list[tuple[str, str, str, dict[str, str], str]] = []  # (key, python, impl, env, precision)
    for prec in precisions:
        plan.append((f"matmul/{prec}", python, "matmul", env, prec))
        plan.append((f"sae_sweep/{prec}", python, "sae_sweep", env, prec))
    not_run: dict[str, str] = {}
    for name in peers:
        if on_gpu:
            not_run[name] = f"not measured on {device}: the peers' steps are timed on CPU (`--device cpu`)"
            continue
        py = peer_python(name, venvs)
        if py is None:
            not_run[name] = f"not measured: no venv at {venvs / PEERS[name].venv} (`make bench-peers` creates it)"
            continue
        for prec in precisions:
            plan.append((f"{name}/{prec}", str(py), name, PEERS[name].env, prec))
    workers: dict[str, StepWorker] = {}
    load, pressure = [os.getloadavg()[0]], [cpu_pressure()]
    try:
        for key, worker_py, impl, wenv, prec in plan:  # one at a time: warm-ups do not compete
            try:
                workers[key] = StepWorker(worker_py, impl, prec, threads, warmup, wenv, dims, str(device))
                print(f"    {key}: ready", flush=True)
            except RuntimeError as e:
                not_run[key] = f"not measured: {e}"
                print(f"    {key}: {not_run[key]}", flush=True)
        order, done = list(workers), 0
        for r in range(max(rounds, max_rounds or rounds)):
            todo = round_order(order, r, rounds, lambda key: bool(workers[key].quiet_steps()))
            if not todo:
                break
            for key in todo:
                workers[key].run(block)
            done += 1
            load.append(os.getloadavg()[0])
            pressure.append(cpu_pressure())
            print(f"    round {r + 1} done ({len(todo)} variants; 1-min load {load[-1]:.1f})", flush=True)
    finally:
        for w in workers.values():
            w.close()
    d_in, d_sae, _, batch = dims
    res = {key: w.summary(batch) for key, w in workers.items()}
    out: dict[str, Any] = {
        "variants": res,
        "not_run": not_run,
        "precisions": precisions,
        "dims": list(dims),
        "device": str(device),
        "rounds": done,
        "block": block,
        "warmup": warmup,
        "threads": threads,
        "load_avg_1m": load,
        "cpu_pressure_some_avg10": pressure,
    }
    flops = {
        prec: 2 * batch * d_in * d_sae / res[f"matmul/{prec}"]["best_seconds"]
        for prec in precisions
        if f"matmul/{prec}" in res
    }
    out["matmul_flops"] = flops
    if flops:
        roof_dtype = max(flops, key=lambda prec: flops[prec])
        out["roofline_dtype"] = roof_dtype
        out["roofline_tokens_per_s"] = res[f"matmul/{roof_dtype}"]["tokens_per_s"]  # one matmul per step
        ours = {prec: res[f"sae_sweep/{prec}"]["tokens_per_s"] for prec in precisions if f"sae_sweep/{prec}" in res}
        if ours:
            best = max(ours, key=lambda prec: ours[prec])
            out["ours_best_precision"] = best
            out["vs_roofline"] = ours[best] / out["roofline_tokens_per_s"]
            out["vs_peers"] = {
                f"{name}/{prec}": ours[prec] / res[f"{name}/{prec}"]["tokens_per_s"]
                for name in peers
                for prec in precisions
                if prec in ours and f"{name}/{prec}" in res
            }
    return out


def fig_quality(seeds: int = 2, bf16: bool = True) -> dict[str, Any]:
    """Explained variance on the planted dictionary (bench.trainers' topk recipe) over `seeds`
    seeds: sparse vs dense backward (fp32), and bf16 autocast vs fp32 (sparse; where bf16 runs):
    neither the fast step nor trainer.autocast_bf16=auto's bf16 may cost quality."""
    from dataclasses import replace

    from sae_sweep.bench.trainers import RECIPES, PlantedSetup, planted_data, train_planted

    setup = PlantedSetup()
    data = planted_data(setup)
    out: dict[str, Any] = {}
    runs = {"sparse": (True, False), "dense": (False, False), **({"sparse_bf16": (True, True)} if bf16 else {})}
    for label, (sparse, b16) in runs.items():
        recipe = replace(
            RECIPES["topk"], overrides={**RECIPES["topk"].overrides, "sparse_backward": sparse, "autocast_bf16": b16}
        )
        out[label] = [
            train_planted("topk", recipe, setup, seed=s, data=data)[1]["explained_variance"] for s in range(seeds)
        ]
    out["max_abs_diff"] = max(abs(a - b) for a, b in zip(out["sparse"], out["dense"]))
    if bf16:
        out["bf16_max_abs_diff"] = max(abs(a - b) for a, b in zip(out["sparse_bf16"], out["sparse"]))
    return out


def _synthetic_cache(root: Path, d: int, n_tokens: int, ctx: int = 128):
    from sae_sweep.activations.cache import get_or_build

    n_seqs = n_tokens // ctx

    def build():
        g = torch.Generator().manual_seed(0)
        for i in range(0, n_seqs, 64):
            b = min(64, n_seqs - i)
            yield torch.zeros(b, ctx, dtype=torch.long), torch.randn(b, ctx, d, generator=g)

    cache, _ = get_or_build({"bench": "reader", "d": d, "n_tokens": n_tokens}, root, build, special_token_ids=[])
    return cache


def fig_reader(root: Path, device: torch.device, train_steps_per_s: float, n_batches: int) -> dict[str, Any]:
    from sae_sweep.activations.reader import ShuffledReader

    cache = _synthetic_cache(root, D_IN, 16 * BATCH)
    with ShuffledReader(cache, BATCH, seed=0, device=device) as reader:
        next(reader)  # start the prefetch workers
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(reader)
        _sync(device)
        rate = n_batches / (time.perf_counter() - t0)
    return {
        "batches_per_s": rate,
        "train_steps_per_s": train_steps_per_s,
        "ratio": rate / train_steps_per_s,
        "cache_mib": cache.n_tokens * D_IN * 4 / 2**20,
    }


@contextmanager
def _cache_root(shared_models: Path):
    """A fresh cache root that reuses the built tiny model (symlinked), so nothing is rebuilt."""
    with tempfile.TemporaryDirectory(prefix="sae_sweep_bench_") as tmp:
        root = Path(tmp)
        shared_models.mkdir(parents=True, exist_ok=True)
        (root / "models").symlink_to(shared_models)
        yield root


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from sae_sweep.job.app import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def fig_cache_build(
    cache_dir: Path, device: torch.device, n_tokens: int, reps: int, model: str = "tiny", dataset: str = "builtin"
) -> dict[str, Any]:
    from sae_sweep.data.text import token_windows
    from sae_sweep.job.execute import CACHE_BUILD_BATCH, build_activation_cache
    from sae_sweep.models.lm import load_lm

    with _cache_root(cache_dir / "models") as root:
        cfg = _compose(
            [
                f"model={model}",
                f"dataset={dataset}",
                f"paths.cache_dir={root}",
                f"dataset.tokens={n_tokens}",
                f"device={device.type}",
            ]
        )
        lm = load_lm(cfg.model, root, str(device))
        windows = token_windows(cfg.dataset, lm, "train", n_tokens, root)  # tokenised once, cached on disk
        layer, hook = int(cfg.layer), str(cfg.hook)
        batches = [windows[i : i + CACHE_BUILD_BATCH].to(device) for i in range(0, len(windows), CACHE_BUILD_BATCH)]

        @torch.no_grad()
        def bare():
            for ids in batches:
                lm.activations(ids, layer, hook)

        @torch.no_grad()
        def full():
            for ids in batches:
                lm.model(input_ids=ids)

        def build():
            import shutil

            shutil.rmtree(root / "activations", ignore_errors=True)
            cache, built = build_activation_cache(cfg, lm, device)
            assert built

        tokens = windows.numel()
        t: dict[str, float] = {}
        for _ in range(reps):  # interleaved, best of each
            for name, fn in (("bare_forward", bare), ("cache_build", build), ("full_forward", full)):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                t[name] = min(t.get(name, float("inf")), time.perf_counter() - t0)
    tps = {k: tokens / v for k, v in t.items()}
    label = "builtin:tiny" if model == "tiny" else f"{model}, {dataset}"
    return {
        "model": label,
        "layer": layer,
        "n_layers": lm.n_layers,
        "d_model": lm.d_model,
        "tokens": tokens,
        "tokens_per_s": tps,
        "build_vs_bare": tps["cache_build"] / tps["bare_forward"],
        "early_exit_vs_full": tps["bare_forward"] / tps["full_forward"],
    }


def fig_sweep(cache_dir: Path, device: torch.device, n_tokens: int) -> dict[str, Any]:
    """2 seeds x 2 trainers through the job's own cache code; LM forward tokens from builds.log."""
    from sae_sweep.activations.cache import ActivationCache, read_builds_log
    from sae_sweep.job.execute import build_activation_cache
    from sae_sweep.models.lm import load_lm

    points = [(s, t) for s in (1, 2) for t in ("topk", "relu")]
    with _cache_root(cache_dir / "models") as root:
        lm = None
        for seed, trainer in points:
            cfg = _compose(
                [
                    f"paths.cache_dir={root}",
                    f"dataset.tokens={n_tokens}",
                    f"seed={seed}",
                    f"trainer={trainer}",
                    f"device={device.type}",
                ]
            )
            lm = lm or load_lm(cfg.model, root, str(device))
            build_activation_cache(cfg, lm, device)
        builds = read_builds_log(root)
        spent = sum(ActivationCache.open(root / "activations" / b["key"]).n_tokens for b in builds)
        per_job = ActivationCache.open(root / "activations" / builds[0]["key"]).n_tokens * len(points)
    return {
        "points": len(points),
        "cache_builds": len(builds),
        "forward_tokens": spent,
        "forward_tokens_one_cache_per_job": per_job,
        "ratio": per_job / spent,
    }


def fig_packing(root: Path, device: torch.device, steps: int, reps: int, d_sae: int = 1536) -> dict[str, Any]:
    """One pack (shared seed and batch size) of 2 topk sizes + relu + batchtopk at d_in 768 vs the
    same four trained one after another, each with its own reader (as separate jobs read)."""
    from sae_sweep.activations.reader import ShuffledReader
    from sae_sweep.sae.registry import get_trainer
    from sae_sweep.training.loop import Member, train, train_members

    cache = _synthetic_cache(root, D_IN, 16 * BATCH)
    specs = [("topk", d_sae, 16), ("topk", d_sae // 2, 16), ("relu", d_sae, None), ("batchtopk", d_sae, 16)]

    def make(name, n, k):
        cfg = {"name": name, "batch_size": BATCH, "lr": 1e-4}
        return get_trainer(name)(D_IN, {"d_sae": n, **({"k": k} if k else {})}, cfg, steps, 0, device)

    alone = packed = float("inf")
    for _ in range(reps):  # alternated, best of each: the machine's load drifts between runs
        t0 = time.perf_counter()
        for spec in specs:
            with ShuffledReader(cache, BATCH, 0, device=device) as reader:
                train(make(*spec), reader, steps, progress=False)
        alone = min(alone, time.perf_counter() - t0)
        t0 = time.perf_counter()
        with ShuffledReader(cache, BATCH, 0, device=device) as reader:
            members = train_members([Member(make(*s), steps) for s in specs], reader, progress=False)
        packed = min(packed, time.perf_counter() - t0)
        assert all(m.error is None for m in members)
    return {
        "members": [f"{n}/{d}" for n, d, _ in specs],
        "steps": steps,
        "seconds_one_at_a_time": alone,
        "seconds_packed": packed,
        "speedup": alone / packed,
        "note": "training loops only, same process: packing saves the reads (the reader is far faster "
        "than training here) and each job's fixed costs (process start, LM/cache open, MLflow "
        "set-up), not the per-SAE compute",
    }


def fig_packing_jobs(cache_dir: Path, device: torch.device, train_tokens: int = 51_200) -> dict[str, Any]:
    """Job level: 4 grid points (2 trainers x 2 sizes, one seed) as 4 fresh `python -m sae_sweep`
    processes run one after another (what one job per point costs: start-up, LM and cache open,
    MLflow set-up, training, core eval each) vs one `-m ... sweep.pack=true` process. The cache is
    built beforehand, so neither side pays for it; the packed side also pays the sweep-end work
    (cross-seed check, report), so the ratio is conservative."""
    from sae_sweep.job.execute import build_activation_cache
    from sae_sweep.models.lm import load_lm

    grid = {"trainer": ["topk", "batchtopk"], "sae.expansion_factor": ["4", "8"]}
    with _cache_root(cache_dir / "models") as root:
        common = [
            f"paths.cache_dir={root}",
            f"paths.output_dir={root / 'outputs'}",
            "eval=core_only",
            f"train.tokens={train_tokens}",
            "dataset.tokens=20000",
            f"device={device.type}",
        ]
        cfg = _compose(common)
        build_activation_cache(cfg, load_lm(cfg.model, root, device), device)

        def run(args: list[str]) -> float:
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "sae_sweep", *args, *common], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(
                    f"`python -m sae_sweep {' '.join(args)}` exited {res.returncode}:\n{res.stderr[-2000:]}"
                )
            return time.perf_counter() - t0

        alone = sum(
            run([f"trainer={t}", f"sae.expansion_factor={e}", "sweep.name=alone"])
            for t in grid["trainer"]
            for e in grid["sae.expansion_factor"]
        )
        packed = run(["-m", *(f"{k}={','.join(v)}" for k, v in grid.items()), "sweep.pack=true", "sweep.name=packed"])
    return {
        "points": 4,
        "train_tokens": train_tokens,
        "seconds_one_job_per_point": alone,
        "seconds_packed_job": packed,
        "speedup": alone / packed,
    }


def fig_memory(temporal_d_sae: int) -> dict[str, Any]:
    """temporal_ortho's tracking memory (the TopK steps' peak RSS comes from their workers)."""
    from sae_sweep.bench.trainers import memory_figure

    return {"temporal_ortho": memory_figure(d_sae=temporal_d_sae)}


# CLI


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have]
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": flags,
        "torch": torch.__version__,
        "load_avg_1m": os.getloadavg()[0],
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        default=None,
        help="JSON results (default: bench_results/bench.json; bench_results/bench_smoke.json with --smoke)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions per measurement (best is kept)")
    p.add_argument(
        "--cache-dir",
        default=os.environ.get("SAE_SWEEP_CACHE", "~/.cache/sae_sweep"),
        help="where the tiny model is (built there once if missing)",
    )
    p.add_argument("--cache-tokens", type=int, default=65536, help="tokens for the cache-build figure")
    p.add_argument("--cache-model", default="tiny", help="model= of the cache-build figure (default: %(default)s)")
    p.add_argument(
        "--cache-dataset", default="builtin", help="dataset= of the cache-build figure (default: %(default)s)"
    )
    p.add_argument("--packing-steps", type=int, default=4)
    p.add_argument("--temporal-d-sae", type=int, default=65536)
    p.add_argument(
        "--skip",
        default="",
        help="comma-separated figures to skip: cache,reader,topk,quality,sweep,packing,packing_jobs,memory",
    )
    p.add_argument(
        "--peer-venvs",
        default="bench_results/venvs",
        help="where `make bench-peers` put the peers' venvs (default: %(default)s)",
    )
    p.add_argument("--peers", default=",".join(PEERS), help="peers to time beside ours (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every TopK worker (default: %(default)s)")
    p.add_argument("--topk-rounds", type=int, default=3, help="interleaved rounds of the TopK figure")
    p.add_argument(
        "--topk-max-rounds",
        type=int,
        default=8,
        help="more rounds, for the variants without a quiet step, up to this many (default: %(default)s)",
    )
    p.add_argument("--topk-block", type=int, default=3, help="consecutive steps per variant and round")
    p.add_argument("--topk-warmup", type=int, default=2, help="untimed steps per variant before the rounds")
    p.add_argument("--d-in", type=int, default=None, help=f"the TopK figure's d_in (default: {D_IN})")
    p.add_argument("--d-sae", type=int, default=None, help=f"the TopK figure's d_sae (default: {D_SAE})")
    p.add_argument("--k", type=int, default=None, help=f"the TopK figure's k (default: {K})")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a check, not a measurement (seconds): the TopK figure only, at tiny dims "
        f"{SMOKE_DIMS}, one round of one step, every worker (ours and each peer venv's) must run; "
        "writes bench_results/bench_smoke.json unless --out is given",
    )


def topk_dims(args: argparse.Namespace) -> tuple[int, int, int, int]:
    """The TopK figure's (d_in, d_sae, k, batch): the defaults, ``--d-in/--d-sae/--k`` where given,
    or ``SMOKE_DIMS`` with ``--smoke`` (which refuses them: a smoke run is not a measurement)."""
    given = {name: getattr(args, name, None) for name in ("d_in", "d_sae", "k")}
    if getattr(args, "smoke", False):
        if any(v is not None for v in given.values()):
            raise SystemExit("--smoke runs at SMOKE_DIMS " + str(SMOKE_DIMS) + ": drop --d-in/--d-sae/--k, or --smoke")
        return SMOKE_DIMS
    d_in, d_sae, k = (dflt if (v := given[n]) is None else int(v) for n, dflt in zip(given, (D_IN, D_SAE, K)))
    for name, v in (("--d-in", d_in), ("--d-sae", d_sae), ("--k", k)):
        if v < 1:
            raise SystemExit(f"{name}={v}: must be >= 1")
    if k > d_sae:
        raise SystemExit(f"--k={k} is more than --d-sae={d_sae}")
    return d_in, d_sae, k, BATCH


def _row(name: str, value: str, target: str, ok: bool | None) -> str:
    mark = "" if ok is None else ("ok" if ok else "BELOW")
    return f"| {name} | {value} | {target} | {mark} |"


def _dims_text(t: dict[str, Any]) -> str:
    d_in, d_sae, k, batch = t.get("dims", (D_IN, D_SAE, K, BATCH))
    return f"d_in {d_in}, d_sae {d_sae}, k {k}, batch {batch}"


def topk_table(t: dict[str, Any]) -> str:
    """Every implementation's own TopK step, measured in the same run (fig_topk)."""
    v = t["variants"]
    head = (
        f"| TopK step, {_dims_text(t)} | "
        + " | ".join(f"{p} tok/s: best (median of quiet steps; quiet/timed)" for p in t["precisions"])
        + " | peak RSS above imports |"
    )
    lines = [
        f"TopK training step, each implementation's own code in its own process, {t['threads']} threads; "
        f"{t['warmup']} warm-up steps each, then {t['rounds']} interleaved rounds of {t['block']} consecutive "
        f"steps. A step is quiet when its threads waited for a core < {QUIET:.0%} of its time (1-min load "
        f"average during the rounds {min(t['load_avg_1m']):.1f}-{max(t['load_avg_1m']):.1f}):",
        "",
        head,
        "|---|" + "---|" * (len(t["precisions"]) + 1),
    ]
    labels = {
        "sae_sweep": OURS_LABEL,
        **{n: p.label for n, p in PEERS.items()},
        "matmul": "roofline: torch {version} torch.mm",
    }
    for impl in ["sae_sweep", *PEERS, "matmul"]:
        keys = [f"{impl}/{p}" for p in t["precisions"]]
        if not any(k in v for k in keys):
            continue
        version = next(v[k]["version"] for k in keys if k in v)
        cells = []
        for k in keys:
            if k not in v:
                cells.append(t["not_run"].get(k, "not run"))
                continue
            c = v[k]
            if c["quiet_steps"]:
                cells.append(
                    f"{c['tokens_per_s']:,.0f} ({c['median_tokens_per_s']:,.0f}; "
                    f"{c['quiet_steps']}/{c['steps_timed']} quiet)"
                )
            else:
                cells.append(
                    f"{c['tokens_per_s']:,.0f} (LOADED: no quiet step; "
                    f"{c['best_step_waiting_threads']:.1f} threads waiting in the best)"
                )
        rss = [v[k]["peak_rss_above_imports_mib"] for k in keys if k in v and v[k]["peak_rss_above_imports_mib"]]
        lines.append(
            f"| {labels[impl].format(version=version)} | "
            + " | ".join(cells)
            + " | "
            + (f"{max(rss):,.0f} MiB" if rss and impl != "matmul" else "-")
            + " |"
        )
    return "\n".join(lines)


def table(r: dict[str, Any]) -> str:
    m = r["machine"]

    def row(name: str, value: str, target: str, ok: bool | None) -> str:  # a smoke run has no verdicts
        return _row(name, value, target, None if r.get("smoke") else ok)

    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m.get('cpu_flags') or []) or '-'}, "
        f"torch {m['torch']} ({m['cpu_capability']}), 1-min load average at start {m['load_avg_1m']:.1f}"
        + (f", at end {r['load_avg_1m_end']:.1f}" if "load_avg_1m_end" in r else "")
        + "; "
        + (f"GPU: {m['gpu']}" if m["gpu"] else "no GPU available: GPU figures not measured"),
        "",
        "| figure | measured | target | |",
        "|---|---|---|---|",
    ]
    if r.get("smoke"):
        lines[1:1] = [
            "",
            "SMOKE RUN (--smoke): tiny dims, one step per variant; it checks that every worker "
            "runs, its figures measure nothing.",
        ]
    t = r.get("topk", {})
    if t.get("matmul_flops"):
        d_in, d_sae, _, batch = t.get("dims", (D_IN, D_SAE, K, BATCH))
        lines.append(
            row(
                f"matmul {batch}x{d_in}x{d_sae} (timed in the TopK rounds)",
                ", ".join(f"{p} {f / 1e12:.3f} TFLOP/s" for p, f in t["matmul_flops"].items())
                + f" -> roofline dtype {t['roofline_dtype']}",
                "-",
                None,
            )
        )
    elif "probe" in r and not r["probe"]["run_bf16"]:
        lines.append(
            row(
                "bf16 vs fp32 matmul (small shape)",
                f"{r['probe']['bf16_vs_fp32_small']:.3f}x: bf16 emulated here, bf16 steps not run",
                "-",
                None,
            )
        )
    if "cache" in r:
        c = r["cache"]
        tps = c["tokens_per_s"]
        lines.append(
            row(
                f"cache build vs bare forward to layer {c['layer']} ({c['model']}, {c['tokens']} tok)",
                f"{c['build_vs_bare']:.2f}x ({tps['cache_build']:,.0f} vs {tps['bare_forward']:,.0f} tok/s)",
                ">= 0.9x",
                c["build_vs_bare"] >= 0.9,
            )
        )
        lines.append(
            row(
                f"early exit (layer {c['layer']} of {c['n_layers']}) vs full forward",
                f"{c['early_exit_vs_full']:.2f}x",
                "> 1x",
                c["early_exit_vs_full"] > 1,
            )
        )
    if "reader" in r:
        rd = r["reader"]
        lines.append(
            row(
                "shuffled reader vs training consumption (batch 4096, d_in 768)",
                f"{rd['ratio']:.1f}x ({rd['batches_per_s']:.2f} vs {rd['train_steps_per_s']:.3f} batches/s)",
                ">= 5x",
                rd["ratio"] >= 5,
            )
        )
    if "vs_roofline" in t:
        v, best = t["variants"], t["ours_best_precision"]
        ours = v[f"sae_sweep/{best}"]
        loaded = [k for k, c in v.items() if not c["quiet_steps"]]
        lines.append(
            row(
                f"TopK train {_dims_text(t)} vs encoder-only roofline",
                f"{t['vs_roofline']:.0%} ({ours['tokens_per_s']:,.0f} vs {t['roofline_tokens_per_s']:,.0f} "
                f"tok/s, {best} step vs {t['roofline_dtype']} matmul)"
                + (f"; LOADED, no quiet step: {', '.join(loaded)}" if loaded else ""),
                ">= 50%",
                t["vs_roofline"] >= 0.5,
            )
        )
        for peer in PEERS:
            ratios = {k.split("/")[1]: x for k, x in t["vs_peers"].items() if k.startswith(peer + "/")}
            if ratios:
                lines.append(
                    row(
                        f"TopK train vs {peer}'s own step, same precision (same run)",
                        ", ".join(f"{p} {x:.1f}x" for p, x in ratios.items()),
                        "> 1x",
                        min(ratios.values()) > 1,
                    )
                )
    for name, why in t.get("not_run", {}).items():
        lines.append(row(f"TopK train vs {name}", why, "> 1x", None))
    if "quality" in r:
        q = r["quality"]
        lines.append(
            row(
                "explained variance, planted dictionary: sparse vs dense backward (fp32)",
                " / ".join(f"{a:.4f} vs {b:.4f}" for a, b in zip(q["sparse"], q["dense"])),
                "equal within noise",
                q["max_abs_diff"] < 0.01,
            )
        )
        if "sparse_bf16" in q:
            lines.append(
                row(
                    "explained variance, planted dictionary: bf16 autocast vs fp32 (sparse)",
                    " / ".join(f"{a:.4f} vs {b:.4f}" for a, b in zip(q["sparse_bf16"], q["sparse"])),
                    "equal within noise",
                    q["bf16_max_abs_diff"] < 0.01,
                )
            )
    if "sweep" in r:
        s = r["sweep"]
        lines.append(
            row(
                "LM forward tokens, 2 seeds x 2 trainers: one cache per job vs shared cache",
                f"{s['ratio']:.1f}x ({s['forward_tokens_one_cache_per_job']:,} vs {s['forward_tokens']:,}; "
                f"{s['cache_builds']} build)",
                f"{s['points']}x",
                s["ratio"] >= s["points"],
            )
        )
    if "packing" in r:
        p = r["packing"]
        lines.append(
            row(
                f"packing: {len(p['members'])} SAEs in one pack vs one at a time (train loops)",
                f"{p['speedup']:.2f}x ({p['seconds_one_at_a_time']:.1f} s vs {p['seconds_packed']:.1f} s)",
                "> 1x",
                p["speedup"] > 1,
            )
        )
    if "packing_jobs" in r:
        pj = r["packing_jobs"]
        lines.append(
            row(
                f"packing: {pj['points']} grid points as one packed job vs one job per point (CLI "
                "processes, tiny model, core eval)",
                f"{pj['speedup']:.2f}x ({pj['seconds_one_job_per_point']:.0f} s vs {pj['seconds_packed_job']:.0f} s)",
                "> 1x",
                pj["speedup"] > 1,
            )
        )
    if "memory" in r:
        to = r["memory"]["temporal_ortho"]
        peak = to.get("peak_rss_growth_mib", to.get("rss_growth_mib"))
        lines.append(
            row(
                f"temporal_ortho tracking memory at d_sae {to['d_sae']}",
                ", ".join(
                    f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in to.items() if k != "d_sae"
                )
                if peak is None
                else f"{peak:,.1f} MiB",
                "bounded",
                None,
            )
        )
    if "variants" in t:
        lines += ["", topk_table(t)]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from sae_sweep.config import resolve_device

    device = resolve_device(args.device)
    skip = {s for s in args.skip.split(",") if s}
    dims = topk_dims(args)
    if args.smoke:  # only the TopK figure (the others are fixed-size), tiny, once
        device = torch.device("cpu")
        skip |= {"memory", "reader", "packing", "quality", "cache", "sweep", "packing_jobs"}
        args.topk_rounds, args.topk_max_rounds, args.topk_block, args.topk_warmup = 1, 1, 1, 1
    cache_dir = Path(os.path.expanduser(args.cache_dir))
    r: dict[str, Any] = {"machine": machine(), "device": str(device), "smoke": args.smoke}
    print(
        f"perf bench on {r['machine']['cpu']} ({device}); "
        + ("" if r["machine"]["gpu"] else "no GPU available: CPU figures only"),
        flush=True,
    )

    def stage(name: str, fn: Callable[[], Any]) -> None:
        if name in skip:
            return
        t0 = time.perf_counter()
        r[name] = fn()
        print(f"  {name}: {time.perf_counter() - t0:.0f}s", flush=True)

    # the TopK rounds first: their workers then start from a small parent
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise SystemExit(f"--peers: unknown {sorted(unknown)}; known: {', '.join(PEERS)}")
    stage("probe", lambda: bf16_probe(device, args.reps))
    stage(
        "topk",
        lambda: fig_topk(
            device,
            r["probe"],
            Path(args.peer_venvs),
            peers,
            args.topk_rounds,
            args.topk_block,
            args.topk_warmup,
            args.threads,
            args.topk_max_rounds,
            dims,
        ),
    )
    stage("memory", lambda: fig_memory(args.temporal_d_sae))
    with tempfile.TemporaryDirectory(prefix="sae_sweep_bench_") as tmp:
        t = r.get("topk", {})
        steps_per_s = (
            t["variants"][f"sae_sweep/{t['ours_best_precision']}"]["tokens_per_s"] / dims[3]
            if "ours_best_precision" in t
            else 1.0
        )
        stage("reader", lambda: fig_reader(Path(tmp), device, steps_per_s, n_batches=20))
        stage("packing", lambda: fig_packing(Path(tmp), device, args.packing_steps, args.reps))
    stage("quality", lambda: fig_quality(bf16=r.get("probe", {}).get("run_bf16", False)))
    stage(
        "cache",
        lambda: fig_cache_build(
            cache_dir, device, args.cache_tokens, max(args.reps, 5), args.cache_model, args.cache_dataset
        ),
    )
    stage("sweep", lambda: fig_sweep(cache_dir, device, 8192))
    stage("packing_jobs", lambda: fig_packing_jobs(cache_dir, device))

    r["load_avg_1m_end"] = os.getloadavg()[0]
    text = table(r)
    print()
    print(text)
    out = Path(args.out or ("bench_results/bench_smoke.json" if args.smoke else "bench_results/bench.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**r, "table": text}, indent=2, default=str))
    print(f"\nwrote {out}")
    if args.smoke and r.get("topk", {}).get("not_run"):
        print(
            "smoke: not every TopK worker ran: " + "; ".join(f"{k}: {v}" for k, v in r["topk"]["not_run"].items()),
            file=sys.stderr,
        )
        return 1
    return 0
