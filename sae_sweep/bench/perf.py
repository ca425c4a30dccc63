"""Throughput benchmarks: every figure is a ratio of two things measured in the same run.

    python -m sae_sweep.bench perf [--out bench_results/bench.json] [--steps 3] [--device auto]
    python -m sae_sweep.bench            # the same (perf is the default subcommand); `make bench`

1. cache build: tokens/s building an activation cache (pipeline.build_activation_cache, the job's
   own code) vs a bare forward to the hooked layer on the same windows; early exit vs full forward.
   Model: the offline `builtin:tiny` (4-layer GPT-2 architecture, d_model 128), built once into
   the cache dir -- small, so write overhead weighs more than it would on a real model.
2. cache reader: shuffled batches/s from a d_in 768 cache on disk vs TopK training steps/s.
3. TopK training at d_in 768, d_sae 12288, k 16, batch 4096: tokens/s vs the encoder-only
   roofline (one [B, d_in] x [d_in, d_sae] matmul per step at this machine's best measured matmul
   throughput) and vs a re-implementation of dictionary_learning's reference TopKTrainer step.
   Plus quality: explained variance of the fast and the dense step on the planted dictionary.
4. sweep amortization: LM forward tokens of a 2 seeds x 2 trainers sweep (builds.log) vs one
   cache per job; packing: the same sweep's training loop packed vs one point at a time.
5. memory: peak RSS of one training step (fresh process) and of temporal_ortho's tracking.
6. GPU: the same figures run on CUDA when one is available (`--device auto`).
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
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

D_IN, D_SAE, K, BATCH = 768, 12288, 16, 4096


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


def best_matmul(device: torch.device, reps: int) -> dict[str, Any]:
    """Measured matmul throughput at the encoder's shape, fp32 and bf16. bf16 is first probed on a
    small shape: without native support (e.g. AVX2-only CPUs) it runs orders of magnitude slower,
    and the full-size measurement would take minutes."""
    out: dict[str, Any] = {"fp32_flops": matmul_flops(torch.float32, device, BATCH, D_IN, D_SAE, reps)}
    probe32 = matmul_flops(torch.float32, device, 256, D_IN, 1024, reps)
    probe16 = matmul_flops(torch.bfloat16, device, 256, D_IN, 1024, reps)
    out["bf16_probe_ratio"] = probe16 / probe32
    if probe16 >= 0.5 * probe32:
        out["bf16_flops"] = matmul_flops(torch.bfloat16, device, BATCH, D_IN, D_SAE, reps)
    else:
        out["bf16_flops"] = probe16  # measured on the probe shape; far below fp32 either way
    out["best_dtype"] = "bf16" if out["bf16_flops"] > out["fp32_flops"] else "fp32"
    out["best_flops"] = max(out["bf16_flops"], out["fp32_flops"])
    return out


# the baseline: dictionary_learning's reference TopK step, re-implemented


class ReferenceTopK:
    """A re-implementation (not their code) of saprmarks/dictionary_learning's
    `trainers/top_k.py` TopKTrainer.update, as that trainer runs on CPU (fp32):
    nn.Linear encoder/decoder, dense [B, d_sae] code (scatter of the top-k ReLU'd
    pre-activations) decoded by a dense matmul, AuxK over dead latents (top d_in/2 dead
    pre-activations, normalised by the residual's variance; a host sync to count dead latents),
    gradient component parallel to decoder columns removed, grad-norm clip 1.0, Adam,
    decoder columns renormalised, and `loss.item()` each step."""

    def __init__(self, d_in: int, d_sae: int, k: int, device: torch.device, lr: float = 1e-4, seed: int = 0):
        torch.manual_seed(seed)
        self.k, self.d_in, self.d_sae = k, d_in, d_sae
        self.decoder = nn.Linear(d_sae, d_in, bias=False).to(device)
        with torch.no_grad():
            self.decoder.weight.div_(self.decoder.weight.norm(dim=0, keepdim=True))
        self.encoder = nn.Linear(d_in, d_sae).to(device)
        with torch.no_grad():
            self.encoder.weight.copy_(self.decoder.weight.T)
            self.encoder.bias.zero_()
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))
        self.params = [*self.encoder.parameters(), *self.decoder.parameters(), self.b_dec]
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999))
        self.num_tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.dead_feature_threshold = 10_000_000
        self.top_k_aux = d_in // 2
        self.auxk_alpha = 1 / 32

    def _auxk(self, residual: torch.Tensor, post_relu: torch.Tensor) -> torch.Tensor:
        dead = self.num_tokens_since_fired >= self.dead_feature_threshold
        n_dead = int(dead.sum())  # host sync, as in the reference
        if n_dead == 0:
            return torch.tensor(0.0, device=residual.device)
        acts, idx = torch.where(dead[None], post_relu, -torch.inf).topk(min(self.top_k_aux, n_dead), sorted=False)
        aux = self.decoder(torch.zeros_like(post_relu).scatter_(-1, idx, acts))
        l2 = (residual - aux).pow(2).sum(-1).mean()
        denom = (residual - residual.mean(0)).pow(2).sum(-1).mean()
        return (l2 / denom).nan_to_num(0.0)

    def step(self, x: torch.Tensor) -> float:
        post_relu = torch.relu(self.encoder(x - self.b_dec))
        top = post_relu.topk(self.k, sorted=False, dim=-1)
        f = torch.zeros_like(post_relu).scatter_(-1, top.indices, top.values)
        x_hat = self.decoder(f) + self.b_dec
        e = x - x_hat
        fired = torch.zeros_like(self.num_tokens_since_fired, dtype=torch.bool)
        fired[top.indices.flatten()] = True
        self.num_tokens_since_fired += x.shape[0]
        self.num_tokens_since_fired[fired] = 0
        loss = e.pow(2).sum(-1).mean() + self.auxk_alpha * self._auxk(e.detach(), post_relu)
        loss.backward()
        W, g = self.decoder.weight, self.decoder.weight.grad
        normed = W / W.norm(dim=0, keepdim=True)
        g.sub_((g * normed).sum(0, keepdim=True) * normed)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            W.div_(W.norm(dim=0, keepdim=True))
        return loss.item()


def fast_trainer(device: torch.device, bf16: bool = False, sparse: bool = True, seed: int = 0):
    from sae_sweep.sae.topk import TopKTrainer

    cfg = {"name": "topk", "batch_size": BATCH, "lr": 1e-4, "autocast_bf16": bf16, "sparse_backward": sparse}
    return TopKTrainer(D_IN, {"d_sae": D_SAE, "k": K}, cfg, total_steps=10_000, seed=seed, device=device)


# figures


def fig_topk(device: torch.device, reps: int, mm: dict[str, Any]) -> dict[str, Any]:
    """Fast trainer vs the roofline and vs the reference step; steps interleaved per repetition so
    that both see the same background load."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(BATCH, D_IN, generator=g) * torch.linspace(0.2, 2.0, D_IN)).to(device)
    variants: dict[str, Callable[[], Any]] = {}
    fast = fast_trainer(device, bf16=False)
    fast.init_from_data(x[:1024])
    variants["fast_fp32"] = lambda: fast.step(x)["loss"].item()
    if mm["best_dtype"] == "bf16":
        fast16 = fast_trainer(device, bf16=True)
        fast16.init_from_data(x[:1024])
        variants["fast_bf16"] = lambda: fast16.step(x)["loss"].item()
    ref = ReferenceTopK(D_IN, D_SAE, K, device)
    variants["reference"] = lambda: ref.step(x)
    for fn in variants.values():  # warm-up step each
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    tok = {name: BATCH / min(ts) for name, ts in times.items()}
    best = max((n for n in tok if n.startswith("fast")), key=tok.get)
    roofline = mm["best_flops"] / (2 * D_IN * D_SAE)  # tokens/s if the step were one encoder matmul
    return {"tokens_per_s": tok, "fast_variant": best, "roofline_tokens_per_s": roofline,
            "roofline_dtype": mm["best_dtype"], "vs_roofline": tok[best] / roofline,
            "vs_reference": tok[best] / tok["reference"], "step_seconds": {n: min(t) for n, t in times.items()}}


def fig_quality(seeds: int = 2) -> dict[str, Any]:
    """Explained variance on the planted dictionary (bench.trainers' topk recipe), sparse vs dense
    backward, over `seeds` seeds: the fast step must not cost quality."""
    from sae_sweep.bench.trainers import RECIPES, PlantedSetup, planted_data, train_planted
    from dataclasses import replace

    setup = PlantedSetup()
    data = planted_data(setup)
    out: dict[str, Any] = {}
    for sparse in (True, False):
        recipe = replace(RECIPES["topk"], overrides={**RECIPES["topk"].overrides, "sparse_backward": sparse})
        evs = [train_planted("topk", recipe, setup, seed=s, data=data)[1]["explained_variance"] for s in range(seeds)]
        out["sparse" if sparse else "dense"] = evs
    out["max_abs_diff"] = max(abs(a - b) for a, b in zip(out["sparse"], out["dense"]))
    return out


def _synthetic_cache(root: Path, d: int, n_tokens: int, ctx: int = 128):
    from sae_sweep.cache import get_or_build

    n_seqs = n_tokens // ctx

    def build():
        g = torch.Generator().manual_seed(0)
        for i in range(0, n_seqs, 64):
            b = min(64, n_seqs - i)
            yield torch.zeros(b, ctx, dtype=torch.long), torch.randn(b, ctx, d, generator=g)

    cache, _ = get_or_build({"bench": "reader", "d": d, "n_tokens": n_tokens}, root, build, special_token_ids=[])
    return cache


def fig_reader(root: Path, device: torch.device, train_steps_per_s: float, n_batches: int) -> dict[str, Any]:
    from sae_sweep.reader import ShuffledReader

    cache = _synthetic_cache(root, D_IN, 16 * BATCH)
    with ShuffledReader(cache, BATCH, seed=0, device=device) as reader:
        next(reader)  # start the prefetch workers
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(reader)
        _sync(device)
        rate = n_batches / (time.perf_counter() - t0)
    return {"batches_per_s": rate, "train_steps_per_s": train_steps_per_s, "ratio": rate / train_steps_per_s,
            "cache_mib": cache.n_tokens * D_IN * 4 / 2**20}


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

    from sae_sweep.app import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def fig_cache_build(cache_dir: Path, device: torch.device, n_tokens: int, reps: int) -> dict[str, Any]:
    from sae_sweep.lm import load_lm
    from sae_sweep.pipeline import CACHE_BUILD_BATCH, build_activation_cache
    from sae_sweep.text import token_windows

    with _cache_root(cache_dir / "models") as root:
        cfg = _compose([f"paths.cache_dir={root}", f"dataset.tokens={n_tokens}", f"device={device.type}"])
        lm = load_lm(cfg.model, root, str(device))
        windows = token_windows(cfg.dataset, lm, "train", n_tokens, root)  # tokenised once, cached on disk
        layer, hook = int(cfg.layer), str(cfg.hook)
        batches = [windows[i:i + CACHE_BUILD_BATCH].to(device) for i in range(0, len(windows), CACHE_BUILD_BATCH)]

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
        t = {}
        for _ in range(reps):  # interleaved, best of each
            for name, fn in (("bare_forward", bare), ("cache_build", build), ("full_forward", full)):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                t[name] = min(t.get(name, float("inf")), time.perf_counter() - t0)
    tps = {k: tokens / v for k, v in t.items()}
    return {"model": "builtin:tiny", "layer": layer, "n_layers": lm.n_layers, "d_model": lm.d_model,
            "tokens": tokens, "tokens_per_s": tps, "build_vs_bare": tps["cache_build"] / tps["bare_forward"],
            "early_exit_vs_full": tps["bare_forward"] / tps["full_forward"]}


def fig_sweep(cache_dir: Path, device: torch.device, n_tokens: int) -> dict[str, Any]:
    """2 seeds x 2 trainers through the job's own cache code; LM forward tokens from builds.log."""
    from sae_sweep.cache import ActivationCache, read_builds_log
    from sae_sweep.lm import load_lm
    from sae_sweep.pipeline import build_activation_cache

    points = [(s, t) for s in (1, 2) for t in ("topk", "relu")]
    with _cache_root(cache_dir / "models") as root:
        lm = None
        for seed, trainer in points:
            cfg = _compose([f"paths.cache_dir={root}", f"dataset.tokens={n_tokens}", f"seed={seed}",
                            f"trainer={trainer}", f"device={device.type}"])
            lm = lm or load_lm(cfg.model, root, str(device))
            build_activation_cache(cfg, lm, device)
        builds = read_builds_log(root)
        spent = sum(ActivationCache.open(root / "activations" / b["key"]).n_tokens for b in builds)
        per_job = ActivationCache.open(root / "activations" / builds[0]["key"]).n_tokens * len(points)
    return {"points": len(points), "cache_builds": len(builds), "forward_tokens": spent,
            "forward_tokens_one_cache_per_job": per_job, "ratio": per_job / spent}


def fig_packing(root: Path, device: torch.device, steps: int, reps: int, d_sae: int = 1536) -> dict[str, Any]:
    """One pack (shared seed and batch size) of 2 topk sizes + relu + batchtopk at d_in 768 vs the
    same four trained one after another, each with its own reader (as separate jobs read)."""
    from sae_sweep.reader import ShuffledReader
    from sae_sweep.train import Member, train_members
    from sae_sweep.sae.registry import get_trainer
    from sae_sweep.train import train

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
    return {"members": [f"{n}/{d}" for n, d, _ in specs], "steps": steps, "seconds_one_at_a_time": alone,
            "seconds_packed": packed, "speedup": alone / packed,
            "note": "training loops only, same process: packing saves the reads (the reader is far faster "
                    "than training here) and each job's fixed costs (process start, LM/cache open, MLflow "
                    "set-up), not the per-SAE compute"}


def fig_packing_jobs(cache_dir: Path, device: torch.device, train_tokens: int = 51_200) -> dict[str, Any]:
    """Job level: 4 grid points (2 trainers x 2 sizes, one seed) as 4 fresh `python -m sae_sweep`
    processes run one after another (what one job per point costs: start-up, LM and cache open,
    MLflow set-up, training, core eval each) vs one `-m ... sweep.pack=true` process. The cache is
    built beforehand, so neither side pays for it; the packed side also pays the sweep-end work
    (cross-seed check, report), so the ratio is conservative."""
    from sae_sweep.lm import load_lm
    from sae_sweep.pipeline import build_activation_cache

    grid = {"trainer": ["topk", "batchtopk"], "sae.expansion_factor": ["4", "8"]}
    with _cache_root(cache_dir / "models") as root:
        common = [f"paths.cache_dir={root}", f"paths.output_dir={root / 'outputs'}", "eval=core_only",
                  f"train.tokens={train_tokens}", "dataset.tokens=20000", f"device={device.type}"]
        cfg = _compose(common)
        build_activation_cache(cfg, load_lm(cfg.model, root, device), device)

        def run(args: list[str]) -> float:
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "sae_sweep", *args, *common], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"`python -m sae_sweep {' '.join(args)}` exited {res.returncode}:\n{res.stderr[-2000:]}")
            return time.perf_counter() - t0

        alone = sum(run([f"trainer={t}", f"sae.expansion_factor={e}", "sweep.name=alone"])
                    for t in grid["trainer"] for e in grid["sae.expansion_factor"])
        packed = run(["-m", *(f"{k}={','.join(v)}" for k, v in grid.items()), "sweep.pack=true", "sweep.name=packed"])
    return {"points": 4, "train_tokens": train_tokens, "seconds_one_job_per_point": alone,
            "seconds_packed_job": packed, "speedup": alone / packed}


_MEM_CODE = """
import json, sys, torch
from sae_sweep.bench import perf
device = torch.device(sys.argv[2])
x = torch.randn(perf.BATCH, perf.D_IN, device=device)
t = perf.fast_trainer(device) if sys.argv[1] == "fast" else perf.ReferenceTopK(perf.D_IN, perf.D_SAE, perf.K, device)
for _ in range(2):
    t.step(x)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child of a big parent reports
# the parent's peak
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"peak_rss_mib": int(hwm.split()[1]) / 1024}))
"""


def fig_memory(device: torch.device, temporal_d_sae: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("fast", "reference"):
        res = subprocess.run([sys.executable, "-c", _MEM_CODE, name, str(device)], check=True,
                             capture_output=True, text=True)
        out[f"{name}_peak_rss_mib"] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    out["fast_vs_reference"] = out["fast_peak_rss_mib"] / out["reference_peak_rss_mib"]
    from sae_sweep.bench.trainers import memory_figure

    out["temporal_ortho"] = memory_figure(d_sae=temporal_d_sae)
    return out


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
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "load_avg_1m": os.getloadavg()[0], "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench_results/bench.json", help="JSON results (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions per measurement (best is kept)")
    p.add_argument("--cache-dir", default=os.environ.get("SAE_SWEEP_CACHE", "~/.cache/sae_sweep"),
                   help="where the tiny model is (built there once if missing)")
    p.add_argument("--cache-tokens", type=int, default=65536, help="tokens for the cache-build figure")
    p.add_argument("--packing-steps", type=int, default=4)
    p.add_argument("--temporal-d-sae", type=int, default=65536)
    p.add_argument("--skip", default="", help="comma-separated figures to skip: cache,reader,topk,quality,sweep,"
                   "packing,packing_jobs,memory")


def _row(name: str, value: str, target: str, ok: bool | None) -> str:
    mark = "" if ok is None else ("ok" if ok else "BELOW")
    return f"| {name} | {value} | {target} | {mark} |"


def table(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['cpu_capability']}), "
             f"{m['torch_threads']} threads, 1-min load average at start {m['load_avg_1m']:.1f}; "
             + (f"GPU: {m['gpu']}" if m["gpu"] else "no GPU available: GPU figures not measured"),
             "", "| figure | measured | target | |", "|---|---|---|---|"]
    if "matmul" in r:
        mm = r["matmul"]
        lines.append(_row("matmul 4096x768x12288", f"fp32 {mm['fp32_flops'] / 1e12:.3f} TFLOP/s, bf16 "
                          f"{mm['bf16_flops'] / 1e12:.4f} TFLOP/s -> roofline dtype {mm['best_dtype']}", "-", None))
    if "cache" in r:
        c = r["cache"]
        tps = c["tokens_per_s"]
        lines.append(_row(f"cache build vs bare forward to layer {c['layer']} ({c['model']}, {c['tokens']} tok)",
                          f"{c['build_vs_bare']:.2f}x ({tps['cache_build']:,.0f} vs {tps['bare_forward']:,.0f} tok/s)",
                          ">= 0.9x", c["build_vs_bare"] >= 0.9))
        lines.append(_row(f"early exit (layer {c['layer']} of {c['n_layers']}) vs full forward",
                          f"{c['early_exit_vs_full']:.2f}x", "> 1x", c["early_exit_vs_full"] > 1))
    if "reader" in r:
        rd = r["reader"]
        lines.append(_row("shuffled reader vs training consumption (batch 4096, d_in 768)",
                          f"{rd['ratio']:.1f}x ({rd['batches_per_s']:.2f} vs {rd['train_steps_per_s']:.3f} batches/s)",
                          ">= 5x", rd["ratio"] >= 5))
    if "topk" in r:
        t = r["topk"]
        tok = t["tokens_per_s"]
        lines.append(_row("TopK train d_in 768 d_sae 12288 k 16 B 4096 vs encoder-only roofline",
                          f"{t['vs_roofline']:.0%} ({tok[t['fast_variant']]:,.0f} vs {t['roofline_tokens_per_s']:,.0f} "
                          f"tok/s, {t['roofline_dtype']})", ">= 50%", t["vs_roofline"] >= 0.5))
        lines.append(_row("TopK train vs dictionary_learning reference step (our re-implementation, fp32)",
                          f"{t['vs_reference']:.1f}x ({tok[t['fast_variant']]:,.0f} vs {tok['reference']:,.0f} tok/s)",
                          ">= 5x", t["vs_reference"] >= 5))
    if "quality" in r:
        q = r["quality"]
        lines.append(_row("explained variance, planted dictionary: sparse vs dense backward",
                          " / ".join(f"{a:.4f} vs {b:.4f}" for a, b in zip(q["sparse"], q["dense"])),
                          "equal within noise", q["max_abs_diff"] < 0.01))
    if "sweep" in r:
        s = r["sweep"]
        lines.append(_row("LM forward tokens, 2 seeds x 2 trainers: one cache per job vs shared cache",
                          f"{s['ratio']:.1f}x ({s['forward_tokens_one_cache_per_job']:,} vs {s['forward_tokens']:,}; "
                          f"{s['cache_builds']} build)", f"{s['points']}x", s["ratio"] >= s["points"]))
    if "packing" in r:
        p = r["packing"]
        lines.append(_row(f"packing: {len(p['members'])} SAEs in one pack vs one at a time (train loops)",
                          f"{p['speedup']:.2f}x ({p['seconds_one_at_a_time']:.1f} s vs {p['seconds_packed']:.1f} s)",
                          "> 1x", p["speedup"] > 1))
    if "packing_jobs" in r:
        pj = r["packing_jobs"]
        lines.append(_row(f"packing: {pj['points']} grid points as one packed job vs one job per point (CLI "
                          "processes, tiny model, core eval)",
                          f"{pj['speedup']:.2f}x ({pj['seconds_one_job_per_point']:.0f} s vs "
                          f"{pj['seconds_packed_job']:.0f} s)", "> 1x", pj["speedup"] > 1))
    if "memory" in r:
        mem = r["memory"]
        lines.append(_row("peak RSS (VmHWM), 2 TopK steps at the size above: fast vs reference",
                          f"{mem['fast_peak_rss_mib']:,.0f} MiB vs {mem['reference_peak_rss_mib']:,.0f} MiB", "<= 1x",
                          mem["fast_vs_reference"] <= 1))
        to = mem["temporal_ortho"]
        peak = to.get("peak_rss_growth_mib", to.get("rss_growth_mib"))
        lines.append(_row(f"temporal_ortho tracking memory at d_sae {to['d_sae']}",
                          ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v:,}"
                                    for k, v in to.items() if k != "d_sae") if peak is None else f"{peak:,.1f} MiB",
                          "bounded", None))
    lines.append("")
    lines.append("The reference is a re-implementation of dictionary_learning's TopKTrainer step (fp32, dense "
                 "decode, their AuxK and decoder-norm handling), not their code.")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from sae_sweep.config import resolve_device

    device = resolve_device(args.device)
    skip = {s for s in args.skip.split(",") if s}
    cache_dir = Path(os.path.expanduser(args.cache_dir))
    r: dict[str, Any] = {"machine": machine(), "device": str(device)}
    print(f"perf bench on {r['machine']['cpu']} ({device}); "
          + ("" if r["machine"]["gpu"] else "no GPU available: CPU figures only"), flush=True)

    def stage(name: str, fn: Callable[[], Any]) -> None:
        if name in skip:
            return
        t0 = time.perf_counter()
        r[name] = fn()
        print(f"  {name}: {time.perf_counter() - t0:.0f}s", flush=True)

    # memory first: its fresh processes then start from a small parent (see _MEM_CODE)
    stage("memory", lambda: fig_memory(device, args.temporal_d_sae))
    stage("matmul", lambda: best_matmul(device, args.reps))
    stage("topk", lambda: fig_topk(device, max(args.reps, 3), r["matmul"]))  # the headline ratio: 3+ reps
    with tempfile.TemporaryDirectory(prefix="sae_sweep_bench_") as tmp:
        steps_per_s = r["topk"]["tokens_per_s"][r["topk"]["fast_variant"]] / BATCH if "topk" in r else 1.0
        stage("reader", lambda: fig_reader(Path(tmp), device, steps_per_s, n_batches=20))
        stage("packing", lambda: fig_packing(Path(tmp), device, args.packing_steps, args.reps))
    stage("quality", fig_quality)
    stage("cache", lambda: fig_cache_build(cache_dir, device, args.cache_tokens, max(args.reps, 5)))
    stage("sweep", lambda: fig_sweep(cache_dir, device, 8192))
    stage("packing_jobs", lambda: fig_packing_jobs(cache_dir, device))

    text = table(r)
    print()
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**r, "table": text}, indent=2, default=str))
    print(f"\nwrote {out}")
    return 0
