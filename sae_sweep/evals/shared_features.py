"""FaithfulSAE's shared-feature ratio: how many latents two SAEs that differ only in seed share.

Decoder rows of the two SAEs are matched one-to-one by cosine similarity (Hungarian matching,
maximising the total cosine); the *shared-feature ratio* is the fraction of matched pairs whose
cosine exceeds ``threshold`` (0.7, as in Paulo & Belrose 2025 and FaithfulSAE). The *top-1 ratio*
is the fraction of latents whose best cosine to ANY latent of the other SAE exceeds the threshold
(no one-to-one constraint).

Reference: FaithfulSAE ``scripts/feat_match.py`` (github.com/seonglae/FaithfulSAE, ``feat_match``,
``weight_sim``, ``compute_similarity_matrix``; lines 32-68 and 162-179 at 486a874). There SAE1 is the
seed-42 SAE and SAE2 the seed-49 one:

* ``shared_feature_ratio``: ``linear_sum_assignment`` on the full cosine matrix, pairs with cos > 0.7
  over min(n1, n2) -- the ``dense`` method here, exactly.
* ``top1_ratio``: FaithfulSAE's ONE direction, SAE2 -> SAE1: the fraction of the SECOND SAE's latents
  whose best partner in the FIRST SAE has cos > 0.7 (``top1_ratio_b`` with ``a`` = the lower seed,
  as the sweep orders runs). ``top1_ratio_symmetric`` (ours) averages both directions.

Matching, efficiently for d_sae up to ~16k:

* ``dense`` (small SAEs): the full cosine matrix and ``scipy.optimize.linear_sum_assignment``
  (a perfect matching). Exact, but O(n^3) and n^2 memory: seconds at 2k latents, minutes at 16k.
* ``sparse`` (default above ``dense_max`` latents): the cosine matrix is computed in row chunks on
  the accelerator and only each row's and each column's ``candidates`` best partners are kept. The
  maximum-weight matching on that sparse graph (unmatched latents allowed, so negative-cosine pairs
  are never forced) is solved with ``scipy.sparse.csgraph.min_weight_full_bipartite_matching``.
  With ``candidates`` 128 (the default) the shared count equals the dense one in every case measured,
  clustered decoders included, while memory is O(n * candidates); it is not a proof of optimality:
  ``method=dense`` is exact at any size that fits n^2 float64 in memory.

This module computes on decoder matrices only; reading runs and logging the results is the
sweep report's job (``sae_sweep.report.crossseed``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from sae_sweep.config import choice, register_schema, setting

log = logging.getLogger(__name__)

__all__ = ["CrossSeedSettings", "Matching", "match_latents", "shared_feature_ratio"]

DEFAULT_THRESHOLD = 0.7
# Partners kept per latent by the sparse matching. With 32, clustered decoders (many near-duplicate
# directions) came out up to 3 shared latents of 3,000 away from the dense Hungarian matching, 2 of
# 16,384 at d_in 576; with 128 every case measured equals it (tests/test_evals_shared_features.py),
# at ~1.6x the time (65 s vs 40 s at 16,384 latents on 2 cores).
DEFAULT_CANDIDATES = 128


def _unit_rows(w: Any, device: torch.device) -> torch.Tensor:
    w = torch.as_tensor(w).detach().to(device=device, dtype=torch.float32)
    return F.normalize(w, dim=-1)


def _dense_match(
    a: torch.Tensor, b: torch.Tensor, chunk: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    from scipy.optimize import linear_sum_assignment

    sims = np.empty((a.shape[0], b.shape[0]), dtype=np.float64)
    for s in range(0, a.shape[0], chunk):
        sims[s : s + chunk] = (a[s : s + chunk] @ b.T).double().cpu().numpy()
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
        sims = a[s : s + chunk] @ b.T
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


@dataclass
class Matching:
    """The one-to-one matching of two decoders' latents: pair ``i`` is latent ``rows[i]`` of A with
    latent ``cols[i]`` of B at decoder cosine ``cos[i]``; ``best_a`` / ``best_b``: each latent's best
    cosine to any latent of the other SAE."""

    rows: np.ndarray
    cols: np.ndarray
    cos: np.ndarray
    best_a: torch.Tensor
    best_b: torch.Tensor
    n_a: int
    n_b: int


@torch.no_grad()
def match_latents(
    W_dec_a: Any,
    W_dec_b: Any,
    *,
    method: str = "auto",
    dense_max: int = 2048,
    candidates: int = 32,
    chunk: int = 2048,
    device: Optional[str] = None,
) -> Matching:
    """Match the rows of two decoders ``[d_sae, d_in]`` (any scale) one-to-one by cosine, by the
    module docstring's ``dense`` or ``sparse`` method (``auto``: dense up to ``dense_max`` latents)."""
    if method not in ("auto", "dense", "sparse"):
        raise ValueError(f"method={method!r}: allowed values are auto, dense, sparse")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    a, b = _unit_rows(W_dec_a, dev), _unit_rows(W_dec_b, dev)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"decoders live in different spaces: d_in {a.shape[1]} vs {b.shape[1]}")
    if method == "auto":
        method = "dense" if max(a.shape[0], b.shape[0]) <= dense_max else "sparse"
    if method == "dense":
        rows, cols, cos, best_a, best_b = _dense_match(a, b, chunk)
    else:
        rows, cols, cos, best_a, best_b = _sparse_match(a, b, chunk, candidates)
    return Matching(np.asarray(rows), np.asarray(cols), np.asarray(cos), best_a, best_b, a.shape[0], b.shape[0])


def shared_feature_ratio(
    W_dec_a: Any,
    W_dec_b: Any,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    method: str = "auto",
    dense_max: int = 2048,
    candidates: int = DEFAULT_CANDIDATES,
    chunk: int = 2048,
    device: Optional[str] = None,
) -> Dict[str, float]:
    """Compare two decoders ``[d_sae, d_in]`` (rows = latent directions; any scale).

    Returns ``shared_feature_ratio`` (matched pairs with cos > threshold / min(d_sae_a, d_sae_b)),
    ``top1_ratio`` (FaithfulSAE's: the fraction of ``b``'s latents whose best ``a`` partner has
    cos > threshold, = ``top1_ratio_b``), ``top1_ratio_a`` (the other direction),
    ``top1_ratio_symmetric`` (their mean), ``mean_matched_cos``, ``n_shared`` and ``n_latents``.
    Pass the first seed's decoder (FaithfulSAE: seed 42) as ``a``.
    """
    m = match_latents(
        W_dec_a, W_dec_b, method=method, dense_max=dense_max, candidates=candidates, chunk=chunk, device=device
    )
    cos, best_a, best_b = m.cos, m.best_a, m.best_b
    n = min(m.n_a, m.n_b)
    n_shared = int((cos > threshold).sum())
    top1_a = float((best_a > threshold).double().mean())
    top1_b = float((best_b > threshold).double().mean())
    return {
        "shared_feature_ratio": n_shared / n,
        "top1_ratio": top1_b,
        "top1_ratio_symmetric": (top1_a + top1_b) / 2,
        "top1_ratio_a": top1_a,
        "top1_ratio_b": top1_b,
        # unmatched latents (sparse method) count as cosine 0
        "mean_matched_cos": float(cos.sum() / n),
        "n_shared": float(n_shared),
        "n_latents": float(n),
        "threshold": float(threshold),
    }


@dataclass
class CrossSeedSettings:
    """``eval.crossseed``: the sweep-end comparison of runs that differ only in seed."""

    enabled: bool = True
    threshold: float = setting(
        DEFAULT_THRESHOLD, allowed="a float in (-1, 1) (decoder cosine)", check=lambda v: -1 < v < 1
    )
    method: str = choice("auto", ("auto", "dense", "sparse"))
    dense_max: int = setting(
        2048, allowed="an integer >= 1 (auto: dense Hungarian up to this many latents)", check=lambda v: v >= 1
    )
    candidates: int = setting(
        DEFAULT_CANDIDATES,
        allowed="an integer >= 1 (sparse matching: partners kept per latent)",
        check=lambda v: v >= 1,
    )
    # the cross-seed feature browser (sae_sweep/report/crossseed_browser.py), from the runs' dashboards
    browser: bool = True
    browser_pairs: int = setting(
        12, allowed="an integer >= 0 (matched pairs shown per seed group)", check=lambda v: v >= 0
    )
    browser_unmatched: int = setting(
        6, allowed="an integer >= 0 (unmatched and fake latents shown per seed)", check=lambda v: v >= 0
    )
    browser_contexts: int = setting(3, allowed="an integer >= 1 (contexts per latent shown)", check=lambda v: v >= 1)


register_schema("eval", "crossseed", CrossSeedSettings, sweep_level=True)
