"""``make gpu-check`` (``python -m sae_sweep.bench.gpucheck``): what only a GPU can settle about the CUDA
path (docs/cuda.md), in one command of a few minutes, no network.

1. the CUDA-marked tests (``pytest -m cuda``: device placement, the bf16 reader, AuxK steps equal
   to the CPU's, no host sync in a step, two identical runs bit-identical, stream mode on the GPU,
   faithful generation on the GPU);
2. synthetic TopK steps with AuxK on at GPT-2 (768), Gemma-2-2B (2304) and Llama-3.1-8B (4096)
   widths, each with its model config's expansion factor and k: ms/step, tokens/s, peak memory and
   the host syncs ``torch.cuda.set_sync_debug_mode`` reports inside the timed steps;
3. two identical 20-step runs compared (bit-identical or the largest difference);
4. the core eval's KL/CE (``evals.core.downstream_per_position``) on random bf16 logits at
   Gemma-2's 256,000-token vocabulary, 16 x 1024 positions: peak GPU memory above the two logit
   tensors, against the fp32 log-prob copies it avoids, and its values at a sample of positions
   against whole-row fp32 log-probs;
5. ``python -m sae_sweep.bench perf --device cuda --d-in 768 --d-sae 24576 --k 32`` (absolute
   TopK tokens/s at the target dims, TF32 quality on the planted dictionary);
6. ``python -m sae_sweep.bench generation --device cuda --model smollm2-135m --dtypes bfloat16
   --batches 256,1024``: faithful generation tokens/s on the GPU with both samplers, and the
   GPU-hours 100M generated tokens would take at that rate.

On a machine without CUDA it runs small CPU versions of 2, 3 and 4 (a smoke test of the script)
and reports the CUDA parts as "not run (no CUDA)". Prints a table; ``--out`` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

# (name, d_in, expansion_factor, k) from conf/model/<name>.yaml
WIDTHS = [("gpt2", 768, 16, 16), ("gemma-2-2b", 2304, 8, 64), ("llama-3.1-8b", 4096, 4, 80)]
REPO = Path(__file__).resolve().parents[2]
NOT_RUN = "not run (no CUDA)"
GEMMA2_VOCAB = 256_000
BENCH_DIMS = (768, 24_576, 32)  # the target dims: d_in, d_sae, k
GENERATION_ARGS = ["--model", "smollm2-135m", "--dtypes", "bfloat16", "--batches", "256,1024", "--new-tokens", "128"]


def _trainer(device: torch.device, d_in: int, d_sae: int, k: int, batch: int, steps: int, seed: int = 0):
    import dataclasses

    from sae_sweep.sae.registry import get_trainer

    cls = get_trainer("topk")
    cfg = {f.name: f.default for f in dataclasses.fields(cls.params_cls)}
    # AuxK on from the second step: every latent may be dead after one batch's tokens
    cfg.update(name="topk", batch_size=batch, warmup_steps=2, dead_tokens=batch)
    return cls(d_in, {"d_sae": d_sae, "k": k}, cfg, total_steps=steps + 2, seed=seed, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_steps(device: torch.device, d_in: int, d_sae: int, k: int, batch: int, steps: int) -> dict[str, Any]:
    """Time ``steps`` TopK steps (AuxK on) after two warm-up steps; peak memory and host syncs."""
    from sae_sweep.util.devices import cuda_syncs

    t = _trainer(device, d_in, d_sae, k, batch, steps)
    g = torch.Generator(device=device).manual_seed(0)
    data = torch.randn(steps + 2, batch, d_in, generator=g, device=device)
    t.init_from_data(data[0])
    for x in data[:2]:  # warm-up: kernels chosen, AuxK on from here
        t.step(x)
    _sync(device)
    syncs: list[str] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if device.type == "cuda":
        with cuda_syncs() as syncs:
            for x in data[2:]:
                out = t.step(x)
    else:
        for x in data[2:]:
            out = t.step(x)
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    row = {
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "k_aux": t.k_aux,
        "batch": batch,
        "ms_per_step": round(dt * 1e3, 2),
        "tokens_per_s": round(batch / dt),
        "auxk": round(float(out["auxk"]), 5) if "auxk" in out else None,
        "host_syncs": len(syncs) if device.type == "cuda" else "n/a (CPU)",
        "sync_sites": sorted(set(syncs))[:5],
    }
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del t, data
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def identical_runs(device: torch.device, d_in: int, d_sae: int, k: int, batch: int, steps: int = 20) -> dict[str, Any]:
    """Two runs from the same seed on the same batches: bit-identical, or the largest difference."""

    def run():
        t = _trainer(device, d_in, d_sae, k, batch, steps)
        g = torch.Generator(device=device).manual_seed(1)
        data = torch.randn(steps, batch, d_in, generator=g, device=device)
        t.init_from_data(data[0])
        for x in data:
            t.step(x)
        return {n: p.detach().cpu() for n, p in t.sae.state_dict().items()}

    a, b = run(), run()
    diff = max(float((a[n].float() - b[n].float()).abs().max()) for n in a)
    return {"steps": steps, "bit_identical": all(torch.equal(a[n], b[n]) for n in a), "max_abs_diff": diff}


def core_eval_memory(device: torch.device, batch: int, seq: int, vocab: int, sample: int = 64) -> dict[str, Any]:
    """``downstream_per_position`` on random bf16 logits ``[batch, seq, vocab]``: seconds, peak
    memory above the inputs (CUDA), and the largest difference from whole-row fp32 log-probs at
    ``sample`` positions spread over the batch."""
    from sae_sweep.evals import core

    g = torch.Generator(device=device).manual_seed(0)
    clean = torch.randn(batch, seq, vocab, generator=g, device=device, dtype=torch.bfloat16) * 3
    patched = clean + torch.randn(batch, seq, vocab, generator=g, device=device, dtype=torch.bfloat16)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g, device=device)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    kl, ce_c, ce_p = core.downstream_per_position(clean, patched, tokens)
    _sync(device)
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {
        "batch": batch,
        "seq": seq,
        "vocab": vocab,
        "seconds": round(seconds, 3),
        "logits_gib": round(2 * clean.numel() * clean.element_size() / 2**30, 3),
        "fp32_logprob_copies_avoided_gib": round(2 * clean.numel() * 4 / 2**30, 3),
    }
    if device.type == "cuda":
        row["peak_above_inputs_gib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**30, 3)
    # the reference at `sample` positions (not the last of a context: CE has none there)
    pos = torch.linspace(0, batch * (seq - 1) - 1, sample, device=device).long().unique()
    b, t = pos // (seq - 1), pos % (seq - 1)
    lc, lp = clean[b, t].float().log_softmax(-1), patched[b, t].float().log_softmax(-1)
    want = (
        core.kl_div_from_logprobs(lc, lp),
        -lc.gather(-1, tokens[b, t + 1, None]).squeeze(-1),
        -lp.gather(-1, tokens[b, t + 1, None]).squeeze(-1),
    )
    got = (kl[b, t], ce_c[b, t], ce_p[b, t])
    diff = max(float((x.float() - y).abs().max()) for x, y in zip(got, want))
    row.update(
        positions_checked=len(pos),
        max_abs_diff_vs_fp32=diff,
        matches=diff <= 1e-3 * max(1.0, max(float(y.abs().max()) for y in want)),
        mean_kl=round(float(kl.mean()), 4),
    )
    del clean, patched, kl, ce_c, ce_p
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def cuda_tests() -> dict[str, Any]:
    tests = REPO / "tests" / "test_cuda.py"
    if not tests.is_file():
        return {"status": f"not run ({tests} not found: run from a checkout)"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", str(tests)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    tail = [line for line in r.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    return {
        "status": "passed" if r.returncode == 0 else f"FAILED (exit {r.returncode})",
        "summary": tail[0],
        "output_tail": r.stdout[-3000:] if r.returncode else "",
    }


def _bench_command(cmd: list[str], timeout: float) -> tuple[Any, dict[str, Any]]:
    """Run a bench subcommand from the checkout: (the finished process or None, its status record)."""
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, {"status": f"timed out after {timeout:.0f} s"}
    return r, {
        "status": "ok" if r.returncode == 0 else f"FAILED (exit {r.returncode})",
        "command": " ".join(cmd[1:]),
        "output_tail": (r.stdout + r.stderr)[-2000:],
    }


def bench(device: torch.device, timeout: float) -> dict[str, Any]:
    out = REPO / "bench_results" / "gpucheck_bench.json"
    d_in, d_sae, k = BENCH_DIMS
    cmd = [
        sys.executable,
        "-m",
        "sae_sweep.bench",
        "perf",
        "--device",
        str(device),
        "--out",
        str(out),
        "--d-in",
        str(d_in),
        "--d-sae",
        str(d_sae),
        "--k",
        str(k),
        "--skip",
        "cache,sweep,packing,packing_jobs,memory",
    ]
    r, res = _bench_command(cmd, timeout)
    if r is not None and out.is_file():
        res["results"] = str(out)
        topk = json.loads(out.read_text()).get("topk", {})
        res["topk_dims"] = topk.get("dims")
        res["topk_tokens_per_s"] = {
            name: round(v["tokens_per_s"]) for name, v in topk.get("variants", {}).items() if v.get("tokens_per_s")
        }
    return res


def generation(device: torch.device, timeout: float) -> dict[str, Any]:
    out = REPO / "bench_results" / "gpucheck_generation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "sae_sweep.bench",
        "generation",
        "--device",
        str(device),
        "--out",
        str(out),
        *GENERATION_ARGS,
    ]
    r, res = _bench_command(cmd, timeout)
    if r is not None and r.returncode == 0 and out.is_file():
        res["summary"] = json.loads(out.read_text())["summary"]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_sweep.bench.gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (auto: cuda when available)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per width on CUDA")
    p.add_argument("--batch", type=int, default=4096, help="batch size of the synthetic steps on CUDA")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: tests,steps,runs,eval,bench,generation")
    p.add_argument(
        "--eval-shape",
        default="16,1024",
        help=f"batch,seq of the core-eval logits on CUDA (vocabulary {GEMMA2_VOCAB:,}; default %(default)s)",
    )
    p.add_argument("--bench-timeout", type=float, default=300.0)
    p.add_argument("--generation-timeout", type=float, default=300.0)
    p.add_argument("--out", default=None, help="also write the results here as JSON")
    a = p.parse_args(argv)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    from sae_sweep.config import resolve_device

    device = resolve_device(a.device)
    cuda = device.type == "cuda"
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    if cuda:
        from sae_sweep.util.devices import fast_matmul

        report["matmul_fp32"] = fast_matmul(device)
    print(f"gpu-check on {report['device']} (torch {torch.__version__}, CUDA {torch.version.cuda})", flush=True)

    t0 = time.perf_counter()
    if "tests" not in skip:
        report["cuda_tests"] = cuda_tests() if cuda else {"status": NOT_RUN}
        print(f"[cuda tests] {report['cuda_tests']['status']} {report['cuda_tests'].get('summary', '')}", flush=True)
        if report["cuda_tests"].get("output_tail"):
            print(report["cuda_tests"]["output_tail"], flush=True)

    if "steps" not in skip:
        rows = {}
        if cuda:
            for name, d_in, ef, k in WIDTHS:
                try:
                    rows[name] = synthetic_steps(device, d_in, d_in * ef, k, a.batch, a.steps)
                except torch.cuda.OutOfMemoryError as e:
                    rows[name] = {"d_in": d_in, "error": f"out of memory: {str(e).splitlines()[0]}"}
                    torch.cuda.empty_cache()
        else:  # a smoke test of the script: one small CPU step size, no CUDA figures
            rows["cpu-smoke"] = synthetic_steps(device, 256, 256 * 4, 16, 256, 3)
            for name, *_ in WIDTHS:
                rows[name] = {"status": NOT_RUN}
        report["topk_steps"] = rows
        print("[topk steps, AuxK on]", flush=True)
        for name, r in rows.items():
            if "ms_per_step" in r:
                print(
                    f"  {name:14s} d_in {r['d_in']:5d} d_sae {r['d_sae']:6d} k {r['k']:3d} k_aux {r['k_aux']:4d} "
                    f"batch {r['batch']:5d}: {r['ms_per_step']:9.2f} ms/step {r['tokens_per_s']:>10,d} tok/s "
                    f"peak {r.get('peak_mem_gib', 'n/a')} GiB, host syncs {r['host_syncs']}"
                    + (f" at {r['sync_sites']}" if r["sync_sites"] else ""),
                    flush=True,
                )
            else:
                print(f"  {name:14s} {r.get('status') or r.get('error')}", flush=True)

    if "runs" not in skip:
        if cuda:
            report["identical_runs"] = identical_runs(device, 768, 768 * 16, 16, a.batch)
        else:
            report["identical_runs"] = {**identical_runs(device, 64, 256, 8, 128), "note": "CPU smoke; CUDA " + NOT_RUN}
        r = report["identical_runs"]
        print(
            f"[two identical {r['steps']}-step runs] bit-identical: {r['bit_identical']} "
            f"(max |diff| {r['max_abs_diff']:.3g}){' ' + r['note'] if 'note' in r else ''}",
            flush=True,
        )

    if "eval" not in skip:
        if cuda:
            eb, es = (int(v) for v in a.eval_shape.split(","))
            try:
                report["core_eval"] = core_eval_memory(device, eb, es, GEMMA2_VOCAB)
            except torch.cuda.OutOfMemoryError as e:
                report["core_eval"] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
                torch.cuda.empty_cache()
        else:
            report["core_eval"] = {**core_eval_memory(device, 2, 32, 8192), "note": "CPU smoke; CUDA " + NOT_RUN}
        r = report["core_eval"]
        if "error" in r:
            print(f"[core eval, vocab {GEMMA2_VOCAB:,}] {r['error']}", flush=True)
        else:
            print(
                f"[core eval KL/CE, bf16 logits {r['batch']} x {r['seq']} x {r['vocab']:,}] {r['seconds']} s, "
                f"peak above the logits {r.get('peak_above_inputs_gib', 'n/a')} GiB (logits {r['logits_gib']} GiB; "
                f"fp32 log-prob copies avoided {r['fp32_logprob_copies_avoided_gib']} GiB); vs fp32 at "
                f"{r['positions_checked']} positions: max |diff| {r['max_abs_diff_vs_fp32']:.2g} "
                f"({'ok' if r['matches'] else 'MISMATCH'}){' ' + r['note'] if 'note' in r else ''}",
                flush=True,
            )

    if "bench" not in skip:
        report["bench"] = bench(device, a.bench_timeout) if cuda else {"status": NOT_RUN}
        print(
            f"[bench perf --device {device} --d-in {BENCH_DIMS[0]} --d-sae {BENCH_DIMS[1]} --k {BENCH_DIMS[2]}] "
            f"{report['bench']['status']}",
            flush=True,
        )
        for name, tps in report["bench"].get("topk_tokens_per_s", {}).items():
            print(f"  TopK {name}: {tps:,d} tok/s at {report['bench'].get('topk_dims')}", flush=True)
        if cuda and report["bench"].get("output_tail"):
            print(report["bench"]["output_tail"], flush=True)

    if "generation" not in skip:
        report["generation"] = generation(device, a.generation_timeout) if cuda else {"status": NOT_RUN}
        print(
            f"[bench generation --device {device} {' '.join(GENERATION_ARGS)}] {report['generation']['status']}",
            flush=True,
        )
        for row in report["generation"].get("summary", []):
            rates = ", ".join(f"{s} {m['tok_s']:,.0f} tok/s" for s, m in row["medians"].items())
            print(
                f"  {row['dtype']} batch {row['batch']}: {rates}; 100M tokens: "
                f"{row['hours_per_100M_tokens']:.2f} GPU-hours",
                flush=True,
            )
        if report["generation"]["status"].startswith("FAILED"):
            print(report["generation"]["output_tail"], flush=True)

    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"gpu-check done in {report['seconds']} s", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2, default=str))
    failed = (
        report.get("cuda_tests", {}).get("status", "").startswith("FAILED")
        or any("error" in r for r in report.get("topk_steps", {}).values())
        or "error" in report.get("core_eval", {})
        or report.get("core_eval", {}).get("matches") is False
        or any(
            report.get(part, {}).get("status", "").startswith(("FAILED", "timed out"))
            for part in ("bench", "generation")
        )
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
