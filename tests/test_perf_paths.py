"""The fast TopK paths compute the same step as straightforward dense autograd; the precision
default. (The bench's TopK harness: test_bench_protocol.py.)"""

import pytest
import torch

from sae_sweep.sae.kernels import SparseDecode, TopKEncode
from sae_sweep.sae.topk import TopKTrainer

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def dense_topk(x, W_enc, b_enc, b_dec, k):
    pre = (x - b_dec) @ W_enc + b_enc
    vals, idx = pre.topk(k, dim=-1)
    return vals.relu(), idx


def test_topk_encode_matches_dense_autograd_with_auxk():
    g = torch.Generator().manual_seed(0)
    B, d, n, k, k_aux = 12, 6, 20, 3, 4
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    params = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((d, n), (n,), (d,))]
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::3] = True
    w_main, w_aux = (
        torch.randn(B, k, generator=g, dtype=torch.float64),
        torch.randn(B, k_aux, generator=g, dtype=torch.float64),
    )

    vals, idx, aux_vals, aux_idx = TopKEncode.apply(x, *params, k, dead, k_aux, torch.float64)
    ((vals * w_main).sum() + (aux_vals * w_aux).sum()).backward()
    fast = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    pre = (x - params[2]) @ params[0] + params[1]
    ref_vals = pre.gather(1, idx).relu()
    ref_aux = pre.gather(1, aux_idx).relu()
    torch.testing.assert_close(vals, ref_vals)
    assert set(aux_idx.unique().tolist()) <= set(dead.nonzero().flatten().tolist())
    ref_top = pre.masked_fill(~dead, float("-inf")).topk(k_aux, -1).values.relu()
    torch.testing.assert_close(aux_vals.sort(-1).values, ref_top.sort(-1).values)
    ((ref_vals * w_main).sum() + (ref_aux * w_aux).sum()).backward()
    for a, b in zip(fast, params):
        torch.testing.assert_close(a, b.grad)


def test_topk_encode_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    be = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    bd = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(x, W, be, bd):
        return TopKEncode.apply(x, W, be, bd, 2, None, 0, torch.float64)[0]

    assert torch.autograd.gradcheck(fn, (x, W, be, bd))


def test_sparse_decode_gradcheck():
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 10, (6, 3), generator=g)
    vals = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(10, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: SparseDecode.apply(v, idx, w), (vals, W))


def make(sparse: bool, dead_tokens: int = 10_000_000):
    cfg = {
        "name": "topk",
        "lr": 3e-3,
        "batch_size": 64,
        "warmup_steps": 2,
        "dead_tokens": dead_tokens,
        "sparse_backward": sparse,
    }
    return TopKTrainer(16, {"d_sae": 256, "k": 4}, cfg, total_steps=40, seed=3)


@pytest.mark.parametrize("dead_tokens", [10_000_000, 128])  # AuxK off; AuxK on after 2 steps
def test_fast_trainer_steps_equal_dense_steps(dead_tokens):
    g = torch.Generator().manual_seed(4)
    data = torch.randn(40, 64, 16, generator=g) * torch.linspace(0.2, 2.0, 16)
    fast, dense = make(True, dead_tokens), make(False, dead_tokens)
    for t in (fast, dense):
        t.init_from_data(data[0])
    auxk_seen = 0.0
    for x in data:
        mf, md = fast.step(x), dense.step(x)
        auxk_seen = max(auxk_seen, float(md["auxk"]))
        for name in md:
            torch.testing.assert_close(mf[name], md[name], rtol=1e-4, atol=1e-5, msg=name)
    for name, p in dense.sae.named_parameters():
        torch.testing.assert_close(dict(fast.sae.named_parameters())[name], p, rtol=1e-4, atol=1e-5, msg=name)
    if dead_tokens == 128:  # AuxK actually contributed
        assert auxk_seen > 0


@pytest.mark.parametrize("native", ["0", "1"])
def test_auto_precision_is_the_explicit_setting_it_resolves_to(native, monkeypatch):
    """trainer.autocast_bf16=auto trains bit for bit as false where the device has no native bf16
    (so runs on such CPUs are unchanged by the auto default) and as true where it has."""
    monkeypatch.setenv("SAE_SWEEP_NATIVE_BF16", native)
    g = torch.Generator().manual_seed(5)
    data = torch.randn(6, 64, 16, generator=g) * torch.linspace(0.2, 2.0, 16)

    def run(setting):
        cfg = {
            "name": "topk",
            "lr": 3e-3,
            "batch_size": 64,
            "warmup_steps": 2,
            "dead_tokens": 128,
            "autocast_bf16": setting,
        }
        t = TopKTrainer(16, {"d_sae": 256, "k": 4}, cfg, total_steps=6, seed=3)
        t.init_from_data(data[0])
        losses = [t.step(x)["loss"] for x in data]
        return t, torch.stack(losses)

    auto, auto_losses = run("auto")
    explicit, explicit_losses = run(native == "1")
    assert auto.precision == ("bf16" if native == "1" else "fp32")
    torch.testing.assert_close(auto_losses, explicit_losses, rtol=0, atol=0)
    for name, p in explicit.sae.named_parameters():
        torch.testing.assert_close(dict(auto.sae.named_parameters())[name], p, rtol=0, atol=0, msg=name)


# The CUDA implementation of the backward products (dense code blocks + matmuls), forced on CPU:
# it must give what the CPU implementation and dense autograd give.
from sae_sweep.sae import kernels  # noqa: E402
from sae_sweep.sae.kernels import force_path, sparse_decode  # noqa: E402
from sae_sweep.util.devices import LiveBytes  # noqa: E402


def _encode_grads(path, B, d, n, k, k_aux, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=dtype)
    params = [torch.randn(*s, generator=g, dtype=dtype, requires_grad=True) for s in ((d, n), (n,), (d,))]
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::3] = True
    w_main = torch.randn(B, k, generator=g, dtype=dtype)
    w_aux = torch.randn(B, k_aux, generator=g, dtype=dtype)
    with force_path(path):
        vals, idx, aux_vals, aux_idx = TopKEncode.apply(x, *params, k, dead, k_aux, dtype)
        ((vals * w_main).sum() + (aux_vals * w_aux).sum()).backward()
    return [p.grad for p in params], (x, params, idx, aux_idx, w_main, w_aux)


@pytest.mark.parametrize("block_elems", [1 << 28, 3 * 20])  # one block; 3 rows per block (uneven)
def test_device_path_encode_matches_cpu_path_and_dense_autograd(monkeypatch, block_elems):
    monkeypatch.setattr(kernels, "DENSE_BLOCK_ELEMS", block_elems)
    B, d, n, k, k_aux = 12, 6, 20, 3, 4
    dev, (x, params, idx, aux_idx, w_main, w_aux) = _encode_grads("device", B, d, n, k, k_aux)
    cpu, _ = _encode_grads("cpu", B, d, n, k, k_aux)
    for a, b in zip(dev, cpu):
        torch.testing.assert_close(a, b)
    # dense autograd at the same selection (a latent may be both selected and AuxK's)
    ref = [p.detach().clone().requires_grad_(True) for p in params]
    pre = (x - ref[2]) @ ref[0] + ref[1]
    ((pre.gather(1, idx).relu() * w_main).sum() + (pre.gather(1, aux_idx).relu() * w_aux).sum()).backward()
    for a, r in zip(dev, ref):
        torch.testing.assert_close(a, r.grad)


@pytest.mark.parametrize("block_elems", [1 << 28, 2 * 10])
def test_device_path_sparse_decode_gradcheck(monkeypatch, block_elems):
    monkeypatch.setattr(kernels, "DENSE_BLOCK_ELEMS", block_elems)
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randperm(10, generator=g)[:3] for _ in range(6)])  # distinct per row, as top-k
    vals = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(10, 5, generator=g, dtype=torch.float64, requires_grad=True)
    with force_path("device"):
        assert torch.autograd.gradcheck(lambda v, w: SparseDecode.apply(v, idx, w), (vals, W))


def test_dense_decode_switch_depends_on_path_only():
    """k/d_sae between 1/256 and 1/32: sparse on the CPU path, dense on the device path."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(1024, 8, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(1024, generator=g)[:16] for _ in range(4)])
    vals = torch.randn(4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    outs = {}
    for path in ("cpu", "device"):
        with force_path(path):
            out = sparse_decode(vals, idx, W)
            out.pow(2).sum().backward()
        outs[path] = (out.detach(), vals.grad.clone(), W.grad.clone())
        vals.grad = W.grad = None
    for a, b in zip(*outs.values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("path", ["cpu", "device"])
@pytest.mark.parametrize("dead_tokens", [10_000_000, 128])
def test_fast_trainer_steps_equal_dense_steps_on_either_path(path, dead_tokens):
    g = torch.Generator().manual_seed(4)
    data = torch.randn(12, 64, 16, generator=g) * torch.linspace(0.2, 2.0, 16)
    fast, dense = make(True, dead_tokens), make(False, dead_tokens)
    for t in (fast, dense):
        t.init_from_data(data[0])
    with force_path(path):
        for x in data:
            mf, md = fast.step(x), dense.step(x)
            for name in md:
                torch.testing.assert_close(mf[name], md[name], rtol=1e-4, atol=1e-5, msg=name)
    for name, p in dense.sae.named_parameters():
        torch.testing.assert_close(dict(fast.sae.named_parameters())[name], p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_auxk_backward_memory_at_llama_width(path):
    """Llama-3.1-8B width (d_in 4096), AuxK on (k_aux = d_in/2 = 2048): the encoder gradient needs
    its own [d_in, d_sae] output and O(B x d_sae) besides, never a [B*(k+k_aux), d_in] tensor
    (2.2 GB here at B 64; 36 GB at B 1024, d_sae 131,072). Peak bytes counted per allocation
    (devices.LiveBytes), so the figure is the same on any machine."""
    B, d, n, k, k_aux = 64, 4096, 16384, 32, 2048
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g)
    W = (torch.randn(d, n, generator=g) / d**0.5).requires_grad_(True)
    b_enc = torch.zeros(n, requires_grad=True)
    b_dec = torch.zeros(d, requires_grad=True)
    dead = torch.ones(n, dtype=torch.bool)
    w_main, w_aux = torch.randn(B, k, generator=g), torch.randn(B, k_aux, generator=g)
    with force_path(path):
        vals, idx, aux_vals, aux_idx = TopKEncode.apply(x, W, b_enc, b_dec, k, dead, k_aux, torch.float32)
        loss = (vals * w_main).sum() + (aux_vals * w_aux).sum()
        with LiveBytes() as mem:
            loss.backward()
    grad_bytes = d * n * 4
    old_cuda_path = B * (k + k_aux) * d * 4
    assert mem.largest == grad_bytes, (mem.largest, grad_bytes)
    # the CPU path's CSR product gives the gradient as [d_sae, d_in]; autograd copies it into
    # W_enc's layout (a second gradient-sized buffer for a moment)
    grads = 2 if path == "cpu" else 1
    assert mem.peak <= grads * grad_bytes + 8 * B * n * 4, f"peak {mem.peak / 2**20:.0f} MiB"
    assert mem.largest < old_cuda_path / 8  # the [B*(k+k_aux), d_in] product of the old CUDA branch
    # and the gradient is right: dense autograd at the same selection
    Wr = W.detach().clone().requires_grad_(True)
    pre = (x - b_dec.detach()) @ Wr + b_enc.detach()
    ((pre.gather(1, idx).relu() * w_main).sum() + (pre.gather(1, aux_idx).relu() * w_aux).sum()).backward()
    torch.testing.assert_close(W.grad, Wr.grad, rtol=1e-4, atol=1e-4)
