"""FaithfulSAE's shared-feature ratio: how many latents two SAEs that differ only in seed share.

Decoder rows of the two SAEs are matched one-to-one by cosine similarity (Hungarian matching,
maximising the total cosine); the *shared-feature ratio* is the fraction of matched pairs whose
cosine exceeds ``threshold`` (0.7, as in Paulo & Belrose 2025 and FaithfulSAE). The *top-1 ratio*
is the fraction of latents whose best cosine to ANY latent of the other SAE exceeds the threshold
(no one-to-one constraint), averaged over both directions.

Matching, efficiently for d_sae up to ~16k:

* ``dense`` (small SAEs): the full cosine matrix and ``scipy.optimize.linear_sum_assignment``
  (a perfect matching). Exact, but O(n^3) and n^2 memory: seconds at 2k latents, minutes at 16k.
* ``sparse`` (default above ``dense_max`` latents): the cosine matrix is computed in row chunks on
  the accelerator and only each row's and each column's ``candidates`` best partners are kept. The
  maximum-weight matching on that sparse graph (unmatched latents allowed, so negative-cosine pairs
  are never forced) is solved with ``scipy.sparse.csgraph.min_weight_full_bipartite_matching``.
  A pair above 0.7 is almost always within a latent's top few partners, so the shared count matches
  the dense one while memory is O(n * candidates).

The sweep-end hook :func:`crossseed_hook` groups a sweep's FINISHED runs by their ``seed_group``
tag and logs ``crossseed/...`` metrics to the parent and to each run; :func:`compare_runs` does the
same for any two run ids later. Both talk to MLflow only through the tracker object they are given.
"""

from __future__ import annotations

import itertools
import logging
import math
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = ["shared_feature_ratio", "compare_runs", "crossseed_hook", "crossseed_groups"]

DEFAULT_THRESHOLD = 0.7


def _unit_rows(w: Any, device: torch.device) -> torch.Tensor:
    w = torch.as_tensor(w).detach().to(device=device, dtype=torch.float32)
    return F.normalize(w, dim=-1)


def _dense_match(a: torch.Tensor, b: torch.Tensor, chunk: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy.optimize import linear_sum_assignment

    sims = np.empty((a.shape[0], b.shape[0]), dtype=np.float64)
    for s in range(0, a.shape[0], chunk):
        sims[s:s + chunk] = (a[s:s + chunk] @ b.T).double().cpu().numpy()
    rows, cols = linear_sum_assignment(sims, maximize=True)
    return rows, cols, sims[rows, cols], torch.from_numpy(sims.max(1)), torch.from_numpy(sims.max(0))


def _sparse_match(a: torch.Tensor, b: torch.Tensor, chunk: int, candidates: int):
    """Max-weight matching restricted to each row's/column's top ``candidates`` partners.

    Reduction to a full matching on a doubled graph (rows R + dummy rows DR, columns C + dummy
    columns DC): R_i-C_j costs 2 - cos_ij, R_i-DC_i and DR_j-C_j ("unmatched") cost 1 + eps/2,
    DR_j-DC_i (for every candidate edge i-j) costs eps. Matching i-j then costs 2 - cos + eps
    against 2 + eps for leaving both unmatched, so the minimum-cost full matching is the
    maximum-cosine matching over pairs with cos > 0. All costs are positive (scipy drops zeros).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n_a, n_b = a.shape[0], b.shape[0]
    m_r, m_c = min(candidates, n_b), min(candidates, n_a)
    row_i, row_j, row_v = [], [], []
    col_best_v = torch.full((m_c, n_b), -math.inf, device=a.device)
    col_best_i = torch.zeros((m_c, n_b), dtype=torch.long, device=a.device)
    for s in range(0, n_a, chunk):
        sims = a[s:s + chunk] @ b.T
        v, j = sims.topk(m_r, dim=1)
        row_i.append((torch.arange(sims.shape[0], device=a.device)[:, None] + s).expand_as(j).reshape(-1))
        row_j.append(j.reshape(-1))
        row_v.append(v.reshape(-1))
        cv, ci = sims.topk(min(m_c, sims.shape[0]), dim=0)
        merged_v = torch.cat([col_best_v, cv])
        merged_i = torch.cat([col_best_i, ci + s])
        top = merged_v.topk(m_c, dim=0).indices
        col_best_v, col_best_i = merged_v.gather(0, top), merged_i.gather(0, top)
    keep = torch.isfinite(col_best_v)
    ii = torch.cat(row_i + [col_best_i[keep]]).cpu().numpy()
    jj = torch.cat(row_j + [torch.arange(n_b, device=a.device).expand_as(col_best_i)[keep]]).cpu().numpy()
    vv = torch.cat(row_v + [col_best_v[keep]]).double().cpu().numpy()
    # one edge per (i, j): the row and column candidate lists overlap
    _, first = np.unique(ii.astype(np.int64) * n_b + jj, return_index=True)
    ii, jj, vv = ii[first], jj[first], vv[first]
    pos = vv > 0
    ii, jj, vv = ii[pos], jj[pos], vv[pos]
    eps = 1e-3
    n = n_a + n_b  # rows: R (n_a) then DR (n_b); cols: C (n_b) then DC (n_a)
    r = np.concatenate([ii, np.arange(n_a), n_a + np.arange(n_b), n_a + jj])
    c = np.concatenate([jj, n_b + np.arange(n_a), np.arange(n_b), n_b + ii])
    w = np.concatenate([2.0 - vv, np.full(n_a, 1 + eps / 2), np.full(n_b, 1 + eps / 2), np.full(len(ii), eps)])
    graph = coo_matrix((w, (r, c)), shape=(n, n)).tocsr()
    rows, cols = min_weight_full_bipartite_matching(graph)
    real = (rows < n_a) & (cols < n_b)
    rows, cols = rows[real], cols[real]
    lookup = dict(zip((ii.astype(np.int64) * n_b + jj).tolist(), vv.tolist()))
    cos = np.array([lookup[int(i) * n_b + int(j)] for i, j in zip(rows, cols)], dtype=np.float64)
    # best partner of every latent, from the candidate lists already computed (row 0 = the max)
    best_a = torch.cat([v.reshape(-1, m_r)[:, 0] for v in row_v]).cpu()
    return rows, cols, cos, best_a, col_best_v[0].cpu()


@torch.no_grad()
def shared_feature_ratio(W_dec_a: Any, W_dec_b: Any, threshold: float = DEFAULT_THRESHOLD, *,
                         method: str = "auto", dense_max: int = 2048, candidates: int = 32, chunk: int = 2048,
                         device: Optional[str] = None) -> Dict[str, float]:
    """Compare two decoders ``[d_sae, d_in]`` (rows = latent directions; any scale).

    Returns ``shared_feature_ratio`` (matched pairs with cos > threshold / min(d_sae_a, d_sae_b)),
    ``top1_ratio`` (mean of ``top1_ratio_a`` and ``top1_ratio_b``), ``mean_matched_cos``,
    ``n_shared`` and ``n_latents``.
    """
    if method not in ("auto", "dense", "sparse"):
        raise ValueError(f"method={method!r}: allowed values are auto, dense, sparse")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    a, b = _unit_rows(W_dec_a, dev), _unit_rows(W_dec_b, dev)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"decoders live in different spaces: d_in {a.shape[1]} vs {b.shape[1]}")
    n = min(a.shape[0], b.shape[0])
    if method == "auto":
        method = "dense" if max(a.shape[0], b.shape[0]) <= dense_max else "sparse"
    if method == "dense":
        _rows, _cols, cos, best_a, best_b = _dense_match(a, b, chunk)
    else:
        _rows, _cols, cos, best_a, best_b = _sparse_match(a, b, chunk, candidates)
    n_shared = int((cos > threshold).sum())
    top1_a = float((best_a > threshold).double().mean())
    top1_b = float((best_b > threshold).double().mean())
    return {
        "shared_feature_ratio": n_shared / n,
        "top1_ratio": (top1_a + top1_b) / 2,
        "top1_ratio_a": top1_a,
        "top1_ratio_b": top1_b,
        # unmatched latents (sparse method) count as cosine 0
        "mean_matched_cos": float(cos.sum() / n),
        "n_shared": float(n_shared),
        "n_latents": float(n),
        "threshold": float(threshold),
    }


# --------------------------------------------------------------------------------------------
# Runs: load SAEs from the tracker, compare, log
# --------------------------------------------------------------------------------------------


def _load_decoder(tracker: Any, run_id: str, workdir: Path) -> torch.Tensor:
    from sae_sweep.sae import SparseAutoencoder

    path = tracker.download(run_id, "sae", workdir / run_id)
    return SparseAutoencoder.load(path).W_dec.detach()


def compare_runs(tracker: Any, run_id_a: str, run_id_b: str, threshold: float = DEFAULT_THRESHOLD,
                 log_to_runs: bool = True, **kwargs: Any) -> Dict[str, float]:
    """Shared-feature metrics between the SAEs of two runs (artifact ``sae/``), at any time.

    With ``log_to_runs`` each run gets ``crossseed/vs_<other run id[:8]>/<metric>``.
    """
    with tempfile.TemporaryDirectory() as d:
        wa = _load_decoder(tracker, run_id_a, Path(d))
        wb = _load_decoder(tracker, run_id_b, Path(d))
    res = shared_feature_ratio(wa, wb, threshold, **kwargs)
    if log_to_runs:
        for me, other in ((run_id_a, run_id_b), (run_id_b, run_id_a)):
            tracker.log_metrics(me, {f"crossseed/vs_{other[:8]}/{k}": v for k, v in res.items()})
    return res


def crossseed_groups(runs: Sequence[Any]) -> Dict[str, List[Any]]:
    """FINISHED runs with a ``seed_group`` tag, grouped by it, each group sorted by seed then id."""
    groups: Dict[str, List[Any]] = defaultdict(list)
    for r in runs:
        g = r.data.tags.get("seed_group")
        if g and r.info.status == "FINISHED":
            groups[g].append(r)

    def order(r: Any) -> Tuple[int, str]:
        try:
            return int(r.data.tags.get("seed", 0)), r.info.run_id
        except ValueError:
            return 0, r.info.run_id

    return {g: sorted(rs, key=order) for g, rs in groups.items()}


def _settings_from_points(points: Sequence[Any]) -> Dict[str, Any]:
    for p in points:
        node = getattr(p, "cfg", None)
        if node is None:
            continue
        try:
            from omegaconf import OmegaConf

            cs = OmegaConf.select(node, "eval.crossseed", default=None)
            return OmegaConf.to_container(cs, resolve=True) if cs is not None else {}
        except Exception:
            return {}
    return {}


def crossseed_hook(tracker: Any, parent_run_id: str, points: Sequence[Any], results: Sequence[Any],
                   sweep_dir: Any) -> Dict[str, Any]:
    """Sweep-end hook (``sae_sweep.sweep.SWEEP_END_HOOKS``): every pair of FINISHED runs that differ
    only in seed is compared. Settings from ``eval.crossseed`` (threshold, method, candidates,
    enabled). Logged to the parent: ``crossseed/<group[:8]>/seed_<a>_vs_<b>/<metric>`` per pair,
    ``crossseed/<group[:8]>/<metric>_mean`` per group, ``crossseed/<metric>_mean`` overall; to each
    run: ``crossseed/<metric>`` (mean over its pairs) and ``crossseed/vs_seed_<s>/<metric>``; and the
    whole table as the parent's artifact ``crossseed/crossseed.json``."""
    s = _settings_from_points(points)
    if not s.get("enabled", True):
        return {}
    threshold = float(s.get("threshold", DEFAULT_THRESHOLD))
    kwargs = {k: s[k] for k in ("method", "candidates", "dense_max") if k in s}

    exp_id = tracker.get_run(parent_run_id).info.experiment_id
    ids = {r["run_id"] for r in results if isinstance(r, dict) and r.get("run_id")}
    ids |= {r.info.run_id for r in tracker.find_runs(exp_id, parent_run_id=parent_run_id, statuses=["FINISHED"])}
    runs = [tracker.get_run(i) for i in sorted(ids)]
    groups = {g: rs for g, rs in crossseed_groups(runs).items() if len(rs) >= 2}
    if not groups:
        log.info("crossseed: no seed group with two FINISHED runs; nothing to compare")
        return {}

    parent_metrics: Dict[str, float] = {}
    per_run: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    run_metrics: Dict[str, Dict[str, float]] = defaultdict(dict)
    table: List[Dict[str, Any]] = []
    all_pairs: Dict[str, List[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as d:
        decoders: Dict[str, torch.Tensor] = {}

        def dec(run_id: str) -> torch.Tensor:
            if run_id not in decoders:
                decoders[run_id] = _load_decoder(tracker, run_id, Path(d))
            return decoders[run_id]

        for g, rs in sorted(groups.items()):
            gk = g[:8]
            group_vals: Dict[str, List[float]] = defaultdict(list)
            for ra, rb in itertools.combinations(rs, 2):
                a_id, b_id = ra.info.run_id, rb.info.run_id
                sa, sb = ra.data.tags.get("seed", a_id[:8]), rb.data.tags.get("seed", b_id[:8])
                try:
                    res = shared_feature_ratio(dec(a_id), dec(b_id), threshold, **kwargs)
                except Exception as e:  # one unreadable SAE must not hide the other pairs
                    log.exception("crossseed: %s vs %s failed: %s", a_id, b_id, e)
                    continue
                table.append({"seed_group": g, "run_a": a_id, "run_b": b_id, "seed_a": sa, "seed_b": sb, **res})
                for k in ("shared_feature_ratio", "top1_ratio", "mean_matched_cos"):
                    parent_metrics[f"crossseed/{gk}/seed_{sa}_vs_{sb}/{k}"] = res[k]
                    group_vals[k].append(res[k])
                    all_pairs[k].append(res[k])
                    per_run[a_id][k].append(res[k])
                    per_run[b_id][k].append(res[k])
                    run_metrics[a_id][f"crossseed/vs_seed_{sb}/{k}"] = res[k]
                    run_metrics[b_id][f"crossseed/vs_seed_{sa}/{k}"] = res[k]
            for k, v in group_vals.items():
                parent_metrics[f"crossseed/{gk}/{k}_mean"] = float(np.mean(v))
    for k, v in all_pairs.items():
        parent_metrics[f"crossseed/{k}_mean"] = float(np.mean(v))
    parent_metrics["crossseed/n_pairs"] = float(len(table))
    tracker.log_metrics(parent_run_id, parent_metrics)
    for run_id, vals in per_run.items():
        tracker.log_metrics(run_id, {**run_metrics[run_id], **{f"crossseed/{k}": float(np.mean(v)) for k, v in vals.items()}})
    tracker.log_json(parent_run_id, {"threshold": threshold, "pairs": table}, "crossseed/crossseed.json")
    log.info("crossseed: %d pair(s) in %d seed group(s); mean shared-feature ratio %.3f", len(table), len(groups),
             parent_metrics.get("crossseed/shared_feature_ratio_mean", float("nan")))
    return parent_metrics
