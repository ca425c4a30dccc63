"""One TopK training step, the implementation's own code, timed step by step in its own process.

    <python> step_worker.py --impl sae_sweep|dictionary_learning|sparsify --precision fp32|bf16

`--device cuda[:N]` (ours and the matmul only; the peers' steps are written for the CPU): the
batch and the SAE on the GPU, each timed step ending when the GPU has finished it (ours reads its
loss back, the matmul synchronizes), fp32 matmuls on TF32 as sae_sweep's trainer runs them.

`perf.fig_topk` starts one worker per (implementation, precision), each with the Python of the
environment that has that implementation installed (sae_sweep's own for ours; the venvs that
`make bench-peers` creates for the peers), so every step is timed by the same harness at the same
dims on the same data. This file imports only torch and the standard library at the top: it runs
in the peers' venvs, where sae_sweep is not installed.

Protocol (stdin/stdout, one JSON object a line; stdout lines of ours start with MARK, the rest is
the libraries' own chatter): after set-up and `--warmup` steps the worker prints
`MARK {"ready": {...}}`; each `{"steps": n}` runs n consecutive steps and answers
`MARK {"steps": [{"wall", "cpu", "runq_wait", "minflt"}, ...]}`; `{"quit": true}` ends it.

Per step: wall seconds; CPU seconds of the process (user + sys, all threads); seconds its threads
spent runnable but waiting for a core (`/proc/self/task/*/schedstat`, Linux: a loaded machine shows
here, not in the CPU time); minor page faults.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import time
from typing import Callable

MARK = "@@step_worker@@"


def run_queue_wait() -> float:
    """Seconds all threads of this process have spent waiting on a run queue (0.0 where unknown)."""
    total = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):
            pass  # a thread that ended meanwhile
    return total / 1e9


def timed(fn: Callable[[], object]) -> dict[str, float]:
    r0, w0, t0 = resource.getrusage(resource.RUSAGE_SELF), run_queue_wait(), time.perf_counter()
    fn()
    t1, w1, r1 = time.perf_counter(), run_queue_wait(), resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall": t1 - t0,
        "cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        "runq_wait": w1 - w0,
        "minflt": r1.ru_minflt - r0.ru_minflt,
    }


def data(batch: int, d_in: int):
    """The batch every implementation trains on: feature scales from 0.2 to 2 (seed 0)."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, d_in, generator=g) * torch.linspace(0.2, 2.0, d_in)


def autocast(bf16: bool):
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# One function per implementation: (version, step) where step() runs one training step including
# the host sync each library's own loop makes (a loss read back as a Python float).


def sae_sweep_step(args, x):
    """sae_sweep's `trainer=topk` step (Trainer.step: sparse fast path, fused Adam, decoder renorm)."""
    from importlib.metadata import PackageNotFoundError, version

    from sae_sweep.sae.topk import TopKTrainer

    cfg = {"name": "topk", "batch_size": args.batch, "lr": 1e-4, "autocast_bf16": args.precision == "bf16"}
    trainer = TopKTrainer(
        args.d_in, {"d_sae": args.d_sae, "k": args.k}, cfg, total_steps=100_000, seed=0, device=args.device
    )
    trainer.init_from_data(x[:1024])
    try:
        v = version("sae_sweep")
    except PackageNotFoundError:
        v = "source"
    return v, lambda: trainer.step(x)["loss"].item()


def dictionary_learning_step(args, x):
    """dictionary_learning's `TopKTrainer.update(step, x)`, their code unchanged. bf16: the update
    inside `torch.autocast(bfloat16)`, as their `trainSAE` wraps it on CUDA (on CPU their loop
    leaves autocast off)."""
    from importlib.metadata import version

    from dictionary_learning.trainers.top_k import TopKTrainer

    trainer = TopKTrainer(
        steps=100_000,
        activation_dim=args.d_in,
        dict_size=args.d_sae,
        k=args.k,
        layer=0,
        lm_name="bench",
        lr=1e-4,
        seed=0,
        device="cpu",
    )
    count = [0]

    def step():
        with autocast(args.precision == "bf16"):
            loss = trainer.update(count[0], x)  # step 0 (a warm-up step) sets b_dec to the median
        count[0] += 1
        return loss

    return version("dictionary-learning"), step


def sparsify_step(args, x):
    """sparsify's `SparseCoder` trained as their `Trainer` does with `optimizer=adam`, `loss_fn=fvu`
    (one micro-batch, no gradient accumulation; AuxK off, their default): decoder renorm, forward
    with the batch's total variance, backward of fvu, removal of the gradient parallel to the
    decoder rows, `torch.optim.Adam` (their fallback without bitsandbytes), zero_grad, the
    dead-latent counters, `float(fvu)`. bf16: the forward inside `torch.autocast(bfloat16)`, as
    their `SparseCoder.forward` decorator does on CUDA."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from importlib.metadata import version

    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(args.d_in, SparseCoderConfig(num_latents=args.d_sae, k=args.k), device="cpu", dtype=torch.float32)
    optimizer = torch.optim.Adam([{"params": sae.parameters(), "lr": 1e-4}])
    counts = torch.zeros(args.d_sae, dtype=torch.long)
    with torch.no_grad():
        sae.b_dec.data = x.mean(0)  # their first-step init

    def step():
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        with autocast(args.precision == "bf16"):
            out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)
        did_fire = torch.zeros(args.d_sae, dtype=torch.bool)
        did_fire[out.latent_indices.flatten()] = True
        fvu = float(out.fvu.detach())
        (out.fvu + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            counts.add_(x.shape[0])
            counts[did_fire] = 0
        return fvu

    return version("eai-sparsify"), step


def matmul_step(args, x):
    """The roofline's operation: the encoder's forward matmul [batch, d_in] x [d_in, d_sae] in the
    given precision, into a preallocated output (compute only), timed in the same rounds. On CUDA
    fp32 is TF32 (as the trainer's ``devices.fast_matmul`` sets it) and each step synchronizes."""
    import torch

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(1)
    a, w = x.to(dtype), torch.randn(args.d_in, args.d_sae, generator=g).to(x.device, dtype)
    out = torch.empty(args.batch, args.d_sae, dtype=dtype, device=x.device)
    if x.device.type != "cuda":
        return torch.__version__, lambda: torch.mm(a, w, out=out)
    torch.backends.cuda.matmul.allow_tf32 = True

    def step():
        torch.mm(a, w, out=out)
        torch.cuda.synchronize(x.device)

    return torch.__version__, step


IMPLS = {
    "sae_sweep": sae_sweep_step,
    "dictionary_learning": dictionary_learning_step,
    "sparsify": sparsify_step,
    "matmul": matmul_step,
}
# imported before the memory baseline, so that a peak RSS counts the step, not the library's imports
MODULES = {
    "sae_sweep": "sae_sweep.sae.topk",
    "dictionary_learning": "dictionary_learning.trainers.top_k",
    "sparsify": "sparsify",
}


def memory_mib() -> dict[str, float]:
    """VmRSS and VmHWM (peak) of this process, MiB (Linux; {} elsewhere)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS", "VmHWM")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def reply(obj: dict) -> None:
    sys.stdout.write(f"{MARK} {json.dumps(obj)}\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=sorted(IMPLS), required=True)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=12288)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] (sae_sweep and matmul only)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    x = data(args.batch, args.d_in)
    try:
        if args.device != "cpu":
            if args.impl not in ("sae_sweep", "matmul"):
                raise ValueError(f"--device {args.device}: only sae_sweep and matmul run off the CPU here")
            x = x.to(args.device)
        if args.impl == "sparsify":
            os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # read at import
        if args.impl in MODULES:
            importlib.import_module(MODULES[args.impl])
        base = memory_mib()  # after imports and data: the set-up and steps are measured from here
        impl_version, step = IMPLS[args.impl](args, x)
        warmup = [timed(step) for _ in range(args.warmup)]
    except Exception as e:  # reported to the bench, which prints it in place of the figure
        reply({"error": f"{type(e).__name__}: {e}"})
        return 1
    reply(
        {
            "ready": {
                "impl": args.impl,
                "version": impl_version,
                "precision": args.precision,
                "device": args.device,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "warmup": warmup,
                "rss_before_setup_mib": base.get("VmRSS"),
            }
        }
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        reply({"steps": [timed(step) for _ in range(int(cmd["steps"]))], "peak_rss_mib": memory_mib().get("VmHWM")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
