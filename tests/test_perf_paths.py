"""The fast TopK paths compute the same step as straightforward dense autograd; the precision
default. (The bench's TopK harness: test_bench_protocol.py.)"""
import pytest
import torch

from sae_sweep.sae.kernels import SparseDecode, TopKEncode
from sae_sweep.sae.topk import TopKTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


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
    w_main, w_aux = torch.randn(B, k, generator=g, dtype=torch.float64), torch.randn(B, k_aux, generator=g, dtype=torch.float64)

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
    fn = lambda x, W, be, bd: TopKEncode.apply(x, W, be, bd, 2, None, 0, torch.float64)[0]
    assert torch.autograd.gradcheck(fn, (x, W, be, bd))


def test_sparse_decode_gradcheck():
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 10, (6, 3), generator=g)
    vals = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(10, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: SparseDecode.apply(v, idx, w), (vals, W))


def make(sparse: bool, dead_tokens: int = 10_000_000):
    cfg = {"name": "topk", "lr": 3e-3, "batch_size": 64, "warmup_steps": 2, "dead_tokens": dead_tokens,
           "sparse_backward": sparse}
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
        cfg = {"name": "topk", "lr": 3e-3, "batch_size": 64, "warmup_steps": 2, "dead_tokens": 128,
               "autocast_bf16": setting}
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
