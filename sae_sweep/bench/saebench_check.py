"""Side-by-side check (not in CI): SAEBench 0.6.0's own functions and sae_sweep's evals on the same
tensors, one process, printing each metric from both and their difference.

It needs SAEBench installed next to sae_sweep's dependencies, which pull different versions than
the project's, so it runs in its own virtual environment (docs/evals.md says how)::

    /tmp/saebench-venv/bin/python -m sae_sweep.bench.saebench_check      # from the repository root

What it runs, all on CPU in seconds: a small random TransformerLens ``HookedTransformer`` and a ReLU
SAE with random weights;
* core: ``get_downstream_reconstruction_metrics`` and ``get_sparsity_and_variance_metrics`` on token
  batches with BOS / separator tokens (``exclude_special_tokens_from_reconstruction=True``) vs
  ``run_core_eval`` on the same model (through an adapter) and tokens;
* sparse probing: ``get_top_k_mean_diff_mask``, ``train_sklearn_probe`` and ``train_probe_gpu`` vs
  ``top_k_by_mean_diff``, ``fit_sklearn_probe_raw`` and ``train_probe_torch`` (the torch probes draw
  from different random generators, so their accuracies agree only statistically);
* SCR/TPP: ``get_effects_per_class_precomputed_acts`` and ``ablated_precomputed_activations`` vs
  ``node_effects`` and the linear-decoder ablation.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import numpy as np
import torch


class RefSAE(torch.nn.Module):
    """A ReLU SAE both sides can use: SAEBench duck-types ``cfg``, ``encode``, ``decode``, ``W_dec``."""

    def __init__(self, d_in: int, d_sae: int, layer: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in))
        self.b_enc = torch.nn.Parameter(torch.randn(d_sae, generator=g) * 0.1 - 0.2)
        self.W_dec = torch.nn.Parameter(torch.nn.functional.normalize(self.W_enc.detach().T.clone(), dim=-1))
        self.b_dec = torch.nn.Parameter(torch.randn(d_in, generator=g) * 0.05)
        self.cfg = SimpleNamespace(
            hook_name=f"blocks.{layer}.hook_resid_post", hook_layer=layer, hook_head_index=None, d_sae=d_sae, d_in=d_in
        )
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec

    def forward(self, x):  # sae_sweep's contract: (reconstruction, latents)
        f = self.encode(x)
        return self.decode(f), f


class FixedTokens:
    """Feeds SAEBench's eval loops the same token batches sae_sweep gets (its ActivationsStore's two
    calls the loops make)."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.pos = tokens, 0

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        out = self.tokens[self.pos : self.pos + n]
        self.pos += n
        return out

    def reset_input_dataset(self) -> None:
        self.pos = 0


class TLAdapter:
    """sae_sweep's LM contract (``activations``, ``logits_with_splice``) on a TransformerLens model."""

    def __init__(self, model):
        self.model, self.device = model, torch.device("cpu")

    @property
    def dtype(self):
        return self.model.cfg.dtype

    def activations(self, ids, layer, hook):
        name = f"blocks.{layer}.hook_{hook}"
        return self.model.run_with_cache(ids, names_filter=[name], prepend_bos=False)[1][name]

    def logits_with_splice(self, ids, layer, hook, fn):
        name = f"blocks.{layer}.hook_{hook}"
        hooks = [] if fn is None else [(name, lambda act, hook: fn(act))]
        return self.model.run_with_hooks(ids, fwd_hooks=hooks, prepend_bos=False)


def _row(name: str, ref: float, ours: float) -> float:
    diff = abs(ref - ours) if math.isfinite(ref) and math.isfinite(ours) else float("nan")
    print(f"  {name:42s} saebench {ref: .9g}   sae_sweep {ours: .9g}   |diff| {diff:.2e}")
    return diff


def check_core(dtype: torch.dtype = torch.float32) -> float:
    """The core metrics of one model, SAE and token set from SAEBench and from sae_sweep; returns
    the worst difference (relative in fp32; absolute in bf16, where SAEBench's means are rounded to
    bf16 and sae_sweep's must equal them). In bf16 SAEBench gets the SAE cast to bf16, as its
    ``multiple_evals`` casts it (``main.py:1013``); sae_sweep gets the fp32 SAE and casts it itself,
    and its float64 results are printed beside, under ``<name>_fp32``."""
    import copy

    from sae_bench.evals.core import main as sb_core
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sae_sweep.evals.core import FP32_SUFFIX, run_core_eval

    torch.manual_seed(0)
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_vocab=64, act_fn="gelu", normalization_type="LN"
        )
    )
    model.eval()
    model.to(dtype)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, 64, (48, 32), generator=g)
    tokens[:, 0] = 0  # BOS
    tokens[torch.rand(48, 32, generator=g) < 0.05] = 1  # document separators (EOS)
    sae = RefSAE(32, 96, layer=0)
    sae_ref = copy.deepcopy(sae).to(dtype)
    sae_ref.dtype = dtype
    ignore = {0, 1}
    n_batches = 3  # of 16 contexts, SAEBench's batch_size_prompts
    with torch.no_grad():
        ref = sb_core.get_downstream_reconstruction_metrics(
            sae_ref,
            model,
            FixedTokens(tokens),
            compute_kl=True,
            compute_ce_loss=True,
            n_batches=n_batches,
            eval_batch_size_prompts=16,
            ignore_tokens=ignore,
            exclude_special_tokens_from_reconstruction=True,
        )
        ref_sv, ref_feat = sb_core.get_sparsity_and_variance_metrics(
            sae_ref,
            model,
            FixedTokens(tokens),
            n_batches,
            compute_l2_norms=True,
            compute_sparsity_metrics=True,
            compute_variance_metrics=True,
            compute_featurewise_density_statistics=True,
            eval_batch_size_prompts=16,
            model_kwargs={},
            ignore_tokens=ignore,
        )
    ref.update(ref_sv)
    ours_out = run_core_eval(TLAdapter(model), sae, tokens, 0, "resid_post", 16, ignore, progress=False)
    ours = {k: v for group in ours_out.metrics.values() for k, v in group.items()}
    low = dtype != torch.float32
    print(
        f"core, {str(dtype).replace('torch.', '')} model (SAEBench 0.6.0 evals/core/main.py vs sae_sweep.evals.core), "
        "48 contexts x 32 tokens:"
    )
    worst = 0.0
    for name in sorted(ref):
        if name in ours:
            d = _row(name, float(ref[name]), float(ours[name]))
            if low:
                print(f"  {'':42s} sae_sweep {name + FP32_SUFFIX} {float(ours[name + FP32_SUFFIX]): .9g}")
            worst = max(worst, d if low else d / max(1e-12, abs(float(ref[name]))))
    dens = torch.tensor(ref_feat["feature_density"])
    diff = float((dens - torch.tensor([d["feature_density"] for d in ours_out.details])).abs().max())
    worst = max(worst, diff)
    print(f"  feature_density: max |diff| over {len(dens)} latents {diff:.2e}")
    return worst


def check_sparse_probing() -> None:
    from sae_bench.evals.sparse_probing import probe_training as pt

    from sae_sweep.evals.probes import fit_sklearn_probe_raw, top_k_by_mean_diff, train_probe_torch

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 600)
    x = (np.abs(rng.normal(size=(600, 64))) * (rng.random((600, 64)) < 0.3)).astype(np.float32)
    x[:, 5] += 0.6 * y
    x[:, 40] += 0.9 * (1 - y) * (rng.random(600) < 0.6)
    xt, yt = torch.tensor(x), torch.tensor(y, dtype=torch.int)
    print("sparse probing (probe_training.py vs sae_sweep.evals.probes), 400 train / 200 test:")
    for k in (1, 2, 5):
        mask = pt.get_top_k_mean_diff_mask(xt[:400], yt[:400], k)
        ref_cols = sorted(np.flatnonzero(~mask.numpy()).tolist())
        ours_cols = sorted(top_k_by_mean_diff(x[:400], y[:400], k).tolist())
        _, ref_acc = pt.train_sklearn_probe(
            pt.apply_topk_mask_reduce_dim(xt[:400], mask),
            yt[:400],
            pt.apply_topk_mask_reduce_dim(xt[400:], mask),
            yt[400:],
        )
        ours_acc = fit_sklearn_probe_raw(x[:400][:, ours_cols], y[:400], x[400:][:, ours_cols], y[400:])["acc"]
        print(f"  top-{k}: columns saebench {ref_cols} sae_sweep {ours_cols}; accuracy {ref_acc:.4f} vs {ours_acc:.4f}")
    torch.manual_seed(0)
    _, ref_acc = pt.train_probe_gpu(xt[:400], yt[:400], xt[400:], yt[400:], dim=64, batch_size=250, epochs=100, lr=1e-2)
    ours = train_probe_torch(x[:400], y[:400], x[400:], y[400:], batch_size=250, epochs=100, lr=1e-2, seed=0)
    print(
        f"  full-dimension probe (best test accuracy; different RNG streams): saebench {ref_acc:.4f} "
        f"sae_sweep {ours['acc']:.4f}"
    )


def check_scr_tpp() -> float:
    from sae_bench.evals.scr_and_tpp import main as sb
    from sae_bench.evals.sparse_probing import probe_training as pt

    from sae_sweep.evals.scr_and_tpp import node_effects, select_top_n

    g = torch.Generator().manual_seed(2)
    sae = RefSAE(16, 48, layer=0)
    acts = torch.randn(40, 12, 16, generator=g)
    acts[:, 0] = 0.0
    for i in range(40):
        acts[i, 4 + i % 7 :] = 0.0
    probe = pt.Probe(16, torch.float32)
    print("SCR/TPP (scr_and_tpp/main.py vs sae_sweep.evals.scr_and_tpp):")
    worst = 0.0
    nonzero = (acts.sum(-1) != 0).float()
    with torch.no_grad():
        f = sae.encode(acts)
        sae_mean = (f * nonzero[..., None]).sum(1) / nonzero.sum(1)[:, None]
        for scr in (True, False):
            data = {"a": acts[:20], "b": acts[20:]}
            torch.manual_seed(3)
            ref = (
                sb.get_effects_per_class_precomputed_acts(sae, probe, "a", data, perform_scr=False, sae_batch_size=7)
                if not scr
                else None
            )
            if ref is not None:
                labels = np.r_[np.ones(20, int), np.zeros(20, int)]
                ours = node_effects(sae_mean, labels, probe.net.weight[0], sae.W_dec, scr=False)
                d = float((ref - ours).abs().max())
                print(f"  TPP effects (one-vs-rest, 2 classes): max |diff| {d:.2e}")
                worst = max(worst, d)
        eff = node_effects(sae_mean, np.r_[np.ones(20, int), np.zeros(20, int)], probe.net.weight[0], sae.W_dec, True)
        for n in (2, 10, 48):
            sel = select_top_n(eff, n)
            ref_sel = sb.select_top_n_features(eff, n, "a")
            mask = torch.zeros(48, dtype=torch.bool)
            mask[sel] = True
            ref_abl = sb.ablated_precomputed_activations(acts.clone(), sae, ref_sel, sae_batch_size=7)
            ours_abl = (
                acts.sum(1) / nonzero.sum(1)[:, None] - (f.sum(1)[:, sel] @ sae.W_dec[sel]) / nonzero.sum(1)[:, None]
            )
            d = float((ref_abl - ours_abl).abs().max())
            print(
                f"  ablation of top-{n}: same latents {bool(torch.equal(mask, ref_sel))}; meaned activations "
                f"max |diff| {d:.2e}"
            )
            worst = max(worst, d)
    return worst


def main() -> int:
    try:
        import sae_bench  # noqa: F401
    except ImportError:
        print("sae-bench is not installed in this interpreter; see README (Evals: checking against SAEBench)")
        return 2
    core_worst = check_core()
    bf16_worst = check_core(torch.bfloat16)
    check_sparse_probing()
    scr_worst = check_scr_tpp()
    print(
        f"worst relative core difference (fp32) {core_worst:.2e}; worst core difference (bf16 model) "
        f"{bf16_worst:.2e}; worst SCR/TPP difference {scr_worst:.2e}"
    )
    return 0 if core_worst < 1e-4 and bf16_worst < 1e-3 and scr_worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
