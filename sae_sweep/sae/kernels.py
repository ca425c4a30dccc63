"""Sparse fast paths for TopK-style SAEs: gradients only for the k active latents of each token.

``TopKEncode`` (encoder + top-k selection with a sparse backward) and ``SparseDecode`` (decode
from the k active rows) make the only d_sae-wide work of a training step the encoder's forward
matmul. ``sparse_decode`` picks the dense or sparse decode by shape.

The backward products have two implementations, picked by the tensors' device:

- CPU: sparse CSR x dense products and a sampled dense-dense product (SDDMM) over the B*k
  active entries; nothing [B, d_sae] is allocated.
- other devices (CUDA): the codes are scattered into a dense block of rows of [*, d_sae] (at most
  ``DENSE_BLOCK_ELEMS`` elements at a time) and multiplied with one matmul per block. Memory is
  bounded by that block whatever k is (AuxK's k_aux = d_in/2 included: no [B*(k+k_aux), d_in]
  tensor), the matmuls run on tensor cores, nothing uses atomics (a run gives the same bits every
  time) and nothing syncs the host (no sort, no bincount).

``force_path("cpu" | "device")`` runs either one on any tensors; the tests check on CPU that the
two agree with each other and with dense autograd.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

# A dense code block holds at most this many elements (1 GiB in fp32): B 4096 x d_sae 131,072
# (Llama-3.1-8B x 32) is two blocks.
DENSE_BLOCK_ELEMS = 1 << 28

_FORCED: str | None = None  # "cpu" | "device": run that implementation whatever the tensors' device


@contextlib.contextmanager
def force_path(kind: str | None) -> Iterator[None]:
    """Run the CPU (``"cpu"``) or the CUDA (``"device"``) implementation of the backward products
    and of the dense/sparse decode switch on whatever device the tensors are (None: by device)."""
    global _FORCED
    if kind not in (None, "cpu", "device"):
        raise ValueError(f"force_path({kind!r}): allowed None, 'cpu', 'device'")
    before, _FORCED = _FORCED, kind
    try:
        yield
    finally:
        _FORCED = before


def cpu_path(t: Tensor) -> bool:
    """Whether the CPU implementation runs for tensors like ``t`` (see ``force_path``)."""
    return _FORCED == "cpu" if _FORCED is not None else t.device.type == "cpu"


def _block_rows(n_cols: int) -> int:
    return max(1, DENSE_BLOCK_ELEMS // max(1, n_cols))


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, dense_above: float | None = None) -> Tensor:
    """sum_j vals[:, j] * W_dec[idx[:, j]] (no bias) for vals/idx [B, k].

    For small k/d_sae only the k active rows are read (`SparseDecode`: embedding_bag forward). For
    large k (AuxK's k_aux = d_in/2) scattering into a dense code and using a matmul is as fast or
    faster: above k/d_sae = 1/32 on CPU (measured) and 1/256 elsewhere (a GPU's matmul outruns a
    row gather by far more). The switch is by shape and device only, so it is the same on resume.
    """
    if dense_above is None:
        dense_above = 1 / 32 if cpu_path(W_dec) else 1 / 256
    if idx.shape[-1] > dense_above * W_dec.shape[0]:
        f = torch.zeros(idx.shape[0], W_dec.shape[0], dtype=vals.dtype, device=vals.device).scatter(-1, idx, vals)
        return f @ W_dec
    return SparseDecode.apply(vals.to(W_dec.dtype), idx, W_dec)


# The CSR matrices below are internal to one backward; torch's beta notice would print per process.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class Workspace:
    """Named scratch buffers reused across steps (same shape, dtype and device -> same memory).

    Only for tensors that do not outlive the call that fills them (not saved for backward).
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.shape != torch.Size(shape) or buf.dtype != dtype or buf.device != device:
            buf = self._bufs[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf


class Codes:
    """The sparsity pattern of a batch of codes idx [B, k], transposed to CSR over latents (CPU).

    `rows_t(values) @ X` = sum_b sum_j values[b, j] * e_{idx[b, j]} X[b]: a [d_sae, d] gradient
    that visits only the B*k active entries. The pattern (one sort) is built on first use: the
    device path never builds it (on CUDA its sort and bincount would each sync the host).
    """

    def __init__(self, idx: Tensor, n_latents: int):
        self.idx = idx
        self.shape = idx.shape
        self.n_latents = n_latents
        self._csr: tuple[Tensor, Tensor, Tensor] | None = None

    def _pattern(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._csr is None:
            flat = self.idx.reshape(-1)
            order = torch.argsort(flat, stable=True)  # stable: a fixed summation order
            counts = torch.bincount(flat, minlength=self.n_latents)
            crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            col = torch.div(order, self.shape[-1], rounding_mode="floor")
            self._csr = (order, crow, col)
        return self._csr

    def rows_t(self, values: Tensor) -> Tensor:
        order, crow, col = self._pattern()
        v = values.reshape(-1)[order]
        return torch.sparse_csr_tensor(crow, col, v, (self.n_latents, self.shape[0]), check_invariants=False)

    def scatter_t(self, values: Tensor, x: Tensor) -> Tensor:
        """[n_latents, d] = sum over entries of values[b, j] * x[b] into row idx[b, j] (the
        entries of a row of idx distinct, as a top-k gives them)."""
        if cpu_path(x):
            # into an uninitialised output (beta=0 ignores it): `csr @ x` zero-fills, then copies
            out = x.new_empty(self.n_latents, x.shape[-1])
            return torch.addmm(out, self.rows_t(values.to(x.dtype)), x, beta=0, out=out)
        res, _ = dense_code_matmul([(self.idx, values)], x, self.n_latents, transpose=True)
        assert res is not None  # x is given
        return res


def dense_code_matmul(
    parts: list[tuple[Tensor, Tensor]],
    x: Tensor | None,
    n_latents: int,
    transpose: bool,
    col_sum: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """(G^T @ x [n_latents, d], or with ``transpose=False`` x^T @ G [d, n_latents]; None when x
    is None; and G's column sums [n_latents] when ``col_sum``), where G [B, n_latents] is the dense
    code sum_p scatter(idx_p, values_p) of ``parts`` (idx_p, values_p [B, k_p]; the entries of a
    row of one idx_p distinct, different parts may share a latent).

    Built ``DENSE_BLOCK_ELEMS`` at a time: memory O(rows x n_latents), one matmul per block. No
    atomics race: the first part's scatter writes each entry once and a later part adds to it at
    most once, so the result is the same run after run.
    """
    idx0, v0 = parts[0]
    B = idx0.shape[0]
    dtype = dtype or (x.dtype if x is not None else v0.dtype)
    rows = _block_rows(n_latents)
    out = sums = None
    for s in range(0, B, rows):
        e = min(B, s + rows)
        G = torch.zeros(e - s, n_latents, dtype=dtype, device=v0.device)
        for i, (idx, values) in enumerate(parts):
            (G.scatter_ if i == 0 else G.scatter_add_)(1, idx[s:e], values[s:e].to(dtype))
        if x is not None:
            xs = x[s:e]
            a, b = (G.T, xs) if transpose else (xs.T, G)
            out = a @ b if out is None else out.addmm_(a, b)
        if col_sum:
            sums = G.sum(0) if sums is None else sums.add_(G.sum(0))
    return out, sums


def _gather_dot(W: Tensor, idx: Tensor, g: Tensor) -> Tensor:
    """out[b, j] = <W[idx[b, j]], g[b]>.

    CPU: a sampled dense-dense product (SDDMM: g @ W.T evaluated only at the B*k entries), which
    reads each W row where it is used instead of materialising B*k gathered rows (~7x faster at
    B 4096, k 16, d 768). Elsewhere: g @ W.T in blocks of rows (``DENSE_BLOCK_ELEMS``), then the k
    entries gathered: a tensor-core matmul instead of B*k gathered rows of d floats (17 GB per
    512 rows at Llama-3.1-8B width for AuxK's k_aux = 2048).
    """
    if cpu_path(g) and W.dtype == g.dtype:
        B, k = idx.shape
        crow = torch.arange(0, B * k + 1, k, device=idx.device)
        pattern = torch.sparse_csr_tensor(
            crow, idx.reshape(-1), g.new_zeros(B * k), (B, W.shape[0]), check_invariants=False
        )
        return torch.sparse.sampled_addmm(pattern, g, W.T, beta=0.0).values().view(B, k)
    out = torch.empty(idx.shape, dtype=g.dtype, device=g.device)
    rows = _block_rows(W.shape[0])
    Wt = W.T.to(g.dtype)
    for s in range(0, idx.shape[0], rows):
        out[s : s + rows] = (g[s : s + rows] @ Wt).gather(1, idx[s : s + rows])
    return out


class SparseDecode(torch.autograd.Function):
    """x_hat = sum_j vals[:, j] W_dec[idx[:, j]]; backward touches only the gathered rows.

    grad vals[b, j] = <W_dec[idx[b, j]], g[b]> and grad W_dec = sum vals[b, j] g[b] into row
    idx[b, j] (on CPU a sparse-dense product, instead of the dense decode's two matmuls).
    """

    @staticmethod
    def forward(ctx, vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(vals, idx, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g: Tensor):
        vals, idx, W_dec = ctx.saved_tensors
        g = g.contiguous()
        grad_vals = _gather_dot(W_dec, idx, g).to(vals.dtype) if ctx.needs_input_grad[0] else None
        grad_W = None
        if ctx.needs_input_grad[2]:
            grad_W = Codes(idx, W_dec.shape[0]).scatter_t(vals, g.to(W_dec.dtype))
        return grad_vals, None, grad_W


class TopKEncode(torch.autograd.Function):
    """ReLU(TopK_k((x - b_dec) @ W_enc + b_enc)) as (vals [B, k], idx [B, k]), with a sparse backward.

    Only the k selected pre-activations of a token receive gradient, so on CPU grad W_enc is a
    sparse-dense product over B*k entries instead of a dense [B, d_sae] x [B, d_in] matmul (on
    CUDA: that matmul from the scattered gradient, see the module docstring), and grad b_dec is
    one mat-vec. Optionally also returns the `k_aux` largest pre-activations among
    `dead` latents (AuxK), whose gradients join the same sparse backward.
    The matmul runs in `compute_dtype` (bf16 where the hardware has it), accumulation in fp32.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        k: int,
        dead: Tensor | None,
        k_aux: int,
        compute_dtype: torch.dtype,
        workspace: Workspace | None = None,
    ):
        xc = x - b_dec
        a, w = xc.to(compute_dtype), W_enc.to(compute_dtype)
        # pre [B, d_sae] is the step's one big tensor and is not kept for backward: written into
        # a reused buffer it costs no allocation (on CPU a fresh 200 MB tensor per step pays
        # ~0.1 s of page faults at B 4096, d_sae 12288).
        buf = workspace.get("pre", (a.shape[0], w.shape[1]), compute_dtype, a.device) if workspace else None
        pre = torch.mm(a, w, out=buf).add_(b_enc.to(compute_dtype))
        top, idx = pre.topk(k, dim=-1, sorted=False)
        vals = top.to(W_enc.dtype).relu()
        if dead is not None and k_aux > 0:
            aux_top, aux_idx = pre.masked_fill_(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
            aux_vals = aux_top.to(W_enc.dtype).relu()  # -inf (fewer dead than k_aux) -> 0
        else:
            aux_vals = vals.new_zeros(x.shape[0], 0)
            aux_idx = idx.new_zeros(x.shape[0], 0)
        ctx.save_for_backward(xc, W_enc, vals, idx, aux_vals, aux_idx)
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals: Tensor, _g_idx, g_aux: Tensor, _g_aux_idx):
        xc, W_enc, vals, idx, aux_vals, aux_idx = ctx.saved_tensors
        # ReLU: no gradient where the selected pre-activation was <= 0
        g = torch.where(vals > 0, g_vals, 0.0) if g_vals is not None else torch.zeros_like(vals)
        parts = [(idx, g.to(W_enc.dtype))]
        if aux_idx.shape[1] > 0 and g_aux is not None:
            parts.append((aux_idx, torch.where(aux_vals > 0, g_aux, 0.0).to(W_enc.dtype)))
        # one list of entries (a latent may appear twice in a row: once selected, once as AuxK's)
        idx = torch.cat([p[0] for p in parts], 1) if len(parts) > 1 else parts[0][0]
        g = torch.cat([p[1] for p in parts], 1) if len(parts) > 1 else parts[0][1]
        d_sae = W_enc.shape[1]
        grad_W = grad_b_enc = grad_b_dec = grad_x = None
        if cpu_path(xc):
            col_sum = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
            if ctx.needs_input_grad[1]:
                grad_W = Codes(idx, d_sae).scatter_t(g, xc.to(W_enc.dtype)).T
        else:
            # grad W_enc [d_in, d_sae] = xc^T @ G, G the dense code gradient [B, d_sae] in row
            # blocks: no [B*(k+k_aux), d_in] tensor (36 GB at Llama-3.1-8B width, B 1024, AuxK on)
            grad_W, sums = dense_code_matmul(
                parts,
                xc.to(W_enc.dtype) if ctx.needs_input_grad[1] else None,
                d_sae,
                transpose=False,
                col_sum=True,
                dtype=W_enc.dtype,
            )
            assert sums is not None  # col_sum=True
            col_sum = sums
        if ctx.needs_input_grad[2]:
            grad_b_enc = col_sum
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[0]:
            # d pre[b, i] / d xc[b] = W_enc[:, i]; summed over the batch for b_dec (a mat-vec)
            if ctx.needs_input_grad[3]:
                grad_b_dec = -(W_enc @ col_sum)
            if ctx.needs_input_grad[0]:
                grad_x = _gather_dot_t(W_enc, idx, g)
        return grad_x, grad_W, grad_b_enc, grad_b_dec, None, None, None, None, None


def _gather_dot_t(W_enc: Tensor, idx: Tensor, g: Tensor) -> Tensor:
    """grad x[b] = sum_j g[b, j] W_enc[:, idx[b, j]] (rarely needed: inputs are data)."""
    return F.embedding_bag(idx, W_enc.T.contiguous(), per_sample_weights=g, mode="sum")
