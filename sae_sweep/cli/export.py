"""Export a trained SAE in the layout SAELens and SAEBench load.

    python -m sae_sweep.export <run id | sae dir> <out dir> [--tracking-uri URI] [--model-name NAME]

writes ``<out dir>/sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]`` with unit-norm rows, ``b_dec [d_in]``, plus ``threshold [d_sae]`` for
JumpReLU) and ``<out dir>/cfg.json`` with SAELens's config field names, so that
``SAE.load_from_disk(out_dir)`` (SAELens 5 and 6, whose loader converts this pre-6 flat layout)
rebuilds the same encoder and decoder.

Our architectures map onto SAELens's inference forms (the encoder/decoder maths is unchanged):

* ``relu``, ``hierarchical`` -> ``standard`` (ReLU)
* ``topk`` (and ``matryoshka`` with a per-token TopK inner rule) -> ``topk`` with
  ``activation_fn_kwargs = {"k": k}``
* ``jumprelu`` -> ``jumprelu`` with ``threshold = exp(log_threshold)``
* ``batchtopk`` / ``matryoshka`` -> ``jumprelu`` with the learned inference threshold on every
  latent (the eval-mode rule, ``pre * (pre > threshold)``); never calibrated -> ``topk``

Decoder rows are made unit norm where that leaves outputs unchanged (ReLU and threshold rules are
positively homogeneous: the row norm moves into the encoder column, bias and threshold; TopK when
every row has the same norm, as after a folded activation scaling); a TopK SAE whose rows differ in
norm cannot be rescaled exactly and is refused. An activation normalisation the SAE was trained with
(``train.normalize_activations``) is already folded into the saved weights, so the exported
``normalize_activations`` is ``none`` and SAELens applies nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from sae_sweep.util.files import atomic_write

SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"  # SAELens's file names
SAE_CFG_FILENAME = "cfg.json"

# Ours but not SAELens's: kept under "sae_sweep" for provenance (SAELens ignores unknown fields).
_PROVENANCE = (
    "architecture",
    "run_id",
    "run_key",
    "seed",
    "model_hf_id",
    "hook_type",
    "k",
    "inner",
    "norm_scaling_factor",  # already folded into the weights: loaders apply nothing
    "max_activation_norm_multiple",  # a training-data filter: nothing to apply at inference
)
UNIT_NORM_TOL = 1e-4


def export_sae(sae: Any, cfg: Dict[str, Any], out_dir: Path, model_name: Optional[str] = None) -> Path:
    """Write ``sae`` (a loaded ``SparseAutoencoder``) with its saved ``cfg`` (our cfg.json) to ``out_dir``."""
    from safetensors.torch import save_file

    from sae_sweep.sae.autoencoder import SAELENS_CFG_DEFAULTS

    sae = sae.eval()
    arch, act, act_kwargs, threshold = sae.saelens_form()
    W_enc = sae.W_enc.detach().clone()
    b_enc = sae.b_enc.detach().clone()
    W_dec = sae.W_dec.detach().clone()
    b_dec = sae.b_dec.detach().clone()
    norms = W_dec.float().norm(dim=1)
    if (norms - 1).abs().max() > UNIT_NORM_TOL:
        # one norm for every row (a folded activation scaling) rescales every pre-activation alike:
        # the same latents stay in the top k
        if arch == "topk" and (norms / norms.max() - 1).abs().max() > UNIT_NORM_TOL:
            raise ValueError(
                "TopK SAE with decoder rows of different norms: rescaling them would change which "
                "latents are in the top k, so it cannot be exported exactly"
            )
        n = norms.clamp_min(1e-12).to(W_dec.dtype)
        W_dec = W_dec / n[:, None]
        W_enc = W_enc * n[None, :]
        b_enc = b_enc * n
        if threshold is not None:
            threshold = threshold * n
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if threshold is not None:
        tensors["threshold"] = threshold.to(W_dec.dtype)
    out = {
        **{k: cfg.get(k, v) for k, v in SAELENS_CFG_DEFAULTS.items()},
        "architecture": arch,
        "d_in": int(sae.d_in),
        "d_sae": int(sae.d_sae),
        "dtype": str(W_dec.dtype).removeprefix("torch."),
        "device": "cpu",
        "activation_fn_str": act,
        "activation_fn_kwargs": act_kwargs,
        "apply_b_dec_to_input": True,  # our encoder subtracts b_dec: (x - b_dec) @ W_enc + b_enc
        "finetuning_scaling_factor": False,
        "seqpos_slice": [None],
        "sae_sweep": {k: cfg[k] for k in _PROVENANCE if k in cfg},
    }
    if arch == "topk":
        out["k"] = act_kwargs["k"]  # SAELens 6's TopKSAEConfig field
    if model_name:
        out["model_name"] = model_name
    if out["normalize_activations"] in (None, False):
        out["normalize_activations"] = "none"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    atomic_write(out_dir / SAE_WEIGHTS_FILENAME, lambda path: save_file(tensors, str(path)))
    atomic_write(out_dir / SAE_CFG_FILENAME, json.dumps(out, indent=2, sort_keys=True, default=str))
    return out_dir


def export_dir(
    sae_dir: Path,
    out_dir: Path,
    model_name: Optional[str] = None,
    extra_cfg: Optional[Dict[str, Any]] = None,
    origin: str = "",
) -> Path:
    """Export an SAE saved by ``SparseAutoencoder.save`` (a run's ``sae/`` artifact), after checking
    its files against the checksums recorded when it was saved (``origin`` names where it came from)."""
    from sae_sweep.sae import SparseAutoencoder

    sae = SparseAutoencoder.load(sae_dir, origin=origin)  # checks cfg.json too before it is read
    cfg = json.loads((Path(sae_dir) / "cfg.json").read_text())
    cfg.update(extra_cfg or {})
    return export_sae(sae, cfg, out_dir, model_name)


def export_run(tracker: Any, run_id: str, out_dir: Path, model_name: Optional[str] = None) -> Path:
    """Download run ``run_id``'s ``sae/`` artifact and export it (``ArtifactsUnavailable``: the run
    is not FINISHED or its artifact is missing)."""
    with tempfile.TemporaryDirectory() as d:
        (sae_dir,) = tracker.fetch_trained(run_id, ["sae"], Path(d))
        origin = f"artifact sae/ of run {run_id}"
        return export_dir(sae_dir, out_dir, model_name, extra_cfg={"run_id": run_id}, origin=origin)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sae_sweep.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("source", help="MLflow run id (its sae/ artifact) or a directory saved by SparseAutoencoder.save")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument(
        "--tracking-uri",
        help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///./outputs/mlflow.db, like the app)",
    )
    ap.add_argument("--model-name", help="cfg.json model_name for SAELens (default: the run's model name)")
    args = ap.parse_args(argv)
    src = Path(args.source).expanduser()
    try:
        if src.is_dir():
            out = export_dir(src, args.out_dir, args.model_name)
        else:
            from sae_sweep.config import find_tracking_uri
            from sae_sweep.tracking.runs import Tracker

            out = export_run(
                Tracker(find_tracking_uri(uri=args.tracking_uri)), args.source, args.out_dir, args.model_name
            )
    except Exception as e:
        print(f"sae_sweep.export: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    cfg = json.loads((out / SAE_CFG_FILENAME).read_text())
    print(f"exported {cfg['architecture']} SAE d_in={cfg['d_in']} d_sae={cfg['d_sae']} to {out}")
    print(f"  load: from sae_lens import SAE; SAE.load_from_disk({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
