"""Faithful generation throughput: `dataset.generation.sampler=hf` (transformers' generate) against
`exact_topk_first` (sampling.py), through the code a chunk is made with (`Generations._generate`),
for every combination of dtype, torch threads and batch size asked for. The two samplers run one
after the other on each combination (repeats interleave them), so load from other processes hits
both alike.

    python -m sae_sweep.bench generation [--model smollm2-135m] [--dtypes float32,bfloat16]
        [--threads 1,2] [--batches 64,128] [--new-tokens 128] [--repeats 1] [--cache-dir DIR]
        [--device cpu|cuda] [--out results.json]

Per run: `tok` = the tokens the chunk keeps (each document + its EOS), `pos` = batch x decode
steps computed; rates per wall second and per CPU-second of this process (`time.process_time`,
every thread; on a shared machine the CPU-second rate is the fair one); the 1-minute load average
before and after. The summary gives the medians, exact_topk_first / hf, and the hours one such
process would take for FaithfulSAE's 100M tokens at its median wall rate (on a GPU: GPU-hours; a
projection from this run's rate, so it holds for the batch size and model measured). Set
OMP_WAIT_POLICY in the environment to measure its effect (printed in the header).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any, Dict, List

import torch

SAMPLERS = ("hf", "exact_topk_first")
PROJECTED_TOKENS = 100_000_000  # FaithfulSAE's generated tokens per model


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="a conf/model/<name>.yaml")
    p.add_argument("--dtypes", type=_csv(str), default=["float32"], help="comma-separated: float32,bfloat16")
    p.add_argument("--threads", type=_csv(int), default=[1], help="torch threads, comma-separated")
    p.add_argument("--batches", type=_csv(int), default=[64, 128], help="dataset.generation.batch_size values")
    p.add_argument("--new-tokens", type=int, default=128, help="dataset.generation.max_new_tokens")
    p.add_argument("--samplers", type=_csv(str), default=list(SAMPLERS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--cache-dir",
        default=os.environ.get("SAE_SWEEP_CACHE", "~/.cache/sae_sweep"),
        help="where the model is (or is converted to)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] (default: %(default)s)")
    p.add_argument("--out", default=None, help="also write every run and the medians here as JSON")


def _load(model: str, dtype: str, cache_dir: str, device: str):
    from omegaconf import OmegaConf

    from sae_sweep.job.app import CONF_DIR
    from sae_sweep.models.lm import load_lm

    cfg = OmegaConf.load(os.path.join(CONF_DIR, "model", f"{model}.yaml"))
    cfg.dtype = dtype
    return load_lm(cfg, os.path.expanduser(cache_dir), device)


def measure(lm: Any, sampler: str, batch: int, new_tokens: int, chunk: int = 0) -> Dict[str, float]:
    from sae_sweep.data.faithful import Generations

    settings = {"batch_size": batch, "max_new_tokens": new_tokens, "sampler": sampler}
    gens = Generations(lm, settings, tempfile.gettempdir())  # _generate writes nothing
    load0 = os.getloadavg()[0]
    c0, t0 = time.process_time(), time.perf_counter()
    docs = gens._generate(chunk)  # token lists on the host: the device's work is done
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(d) + 1 for d in docs)
    steps = min(new_tokens, max(len(d) + 1 for d in docs))
    return {
        "tok": tokens,
        "pos": batch * steps,
        "wall": wall,
        "cpu": cpu,
        "load0": load0,
        "load1": os.getloadavg()[0],
        "tok_s": tokens / wall,
        "tok_cpu_s": tokens / cpu,
        "pos_cpu_s": batch * steps / cpu,
    }


def main(args: argparse.Namespace) -> int:
    device = str(args.device)
    where = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else f"{os.cpu_count()} CPUs"
    print(
        f"# generation: model {args.model} on {device} ({where}), {args.new_tokens} new tokens, torch {torch.__version__}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
        f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    results: Dict[tuple, List[Dict[str, float]]] = {}
    for dtype in args.dtypes:
        lm = _load(args.model, dtype, args.cache_dir, device)
        torch.set_num_threads(1)
        for sampler in args.samplers:  # warm-up: first-call costs out of the figures
            measure(lm, sampler, 2, 4)
        for rep in range(args.repeats):
            for threads in args.threads:
                torch.set_num_threads(threads)
                for batch in args.batches:
                    for sampler in args.samplers:
                        r = measure(lm, sampler, batch, args.new_tokens, chunk=rep)
                        results.setdefault((dtype, threads, batch, sampler), []).append(r)
                        print(
                            f"{dtype:8s} threads {threads} batch {batch:4d} {sampler:16s} "
                            f"{r['tok']:6d} tok {r['pos']:6d} pos  {r['wall']:7.1f} s wall {r['cpu']:7.1f} s CPU  "
                            f"{r['tok_s']:6.1f} tok/s  {r['tok_cpu_s']:6.1f} tok/CPU-s  {r['pos_cpu_s']:6.1f} pos/CPU-s  "
                            f"load {r['load0']:.2f}->{r['load1']:.2f}",
                            flush=True,
                        )
        del lm
    print(
        f"\n# medians; ratio = exact_topk_first / hf; hours for {PROJECTED_TOKENS:,} tokens at the faster "
        f"sampler's median wall rate (one process{', one GPU' if device.startswith('cuda') else ''})"
    )
    print(
        "dtype    threads batch | hf tok/s  tok/CPU-s | exact_topk_first tok/s  tok/CPU-s | ratio wall  CPU | "
        "h per 100M tok"
    )
    summary = []
    for dtype in args.dtypes:
        for threads in args.threads:
            for batch in args.batches:
                med = {
                    s: {
                        k: statistics.median(r[k] for r in results.get((dtype, threads, batch, s), []))
                        for k in ("tok_s", "tok_cpu_s")
                    }
                    for s in args.samplers
                    if results.get((dtype, threads, batch, s))
                }
                line = f"{dtype:8s} {threads:7d} {batch:5d} |"
                for s in SAMPLERS:
                    line += f" {med[s]['tok_s']:8.1f} {med[s]['tok_cpu_s']:10.1f} |" if s in med else " - |"
                if len(med) == 2:
                    line += (
                        f" {med['exact_topk_first']['tok_s'] / med['hf']['tok_s']:10.2f}"
                        f" {med['exact_topk_first']['tok_cpu_s'] / med['hf']['tok_cpu_s']:4.2f} |"
                    )
                else:
                    line += " - |"
                hours = PROJECTED_TOKENS / max(m["tok_s"] for m in med.values()) / 3600 if med else None
                line += f" {hours:,.1f}" if hours is not None else " -"
                print(line)
                summary.append(
                    {"dtype": dtype, "threads": threads, "batch": batch, "medians": med, "hours_per_100M_tokens": hours}
                )
    if args.out:
        runs = [
            {"dtype": k[0], "threads": k[1], "batch": k[2], "sampler": k[3], **r}
            for k, rs in results.items()
            for r in rs
        ]
        with open(args.out, "w") as f:
            json.dump(
                {
                    "model": args.model,
                    "device": device,
                    "where": where,
                    "new_tokens": args.new_tokens,
                    "runs": runs,
                    "summary": summary,
                },
                f,
                indent=2,
            )
    return 0
