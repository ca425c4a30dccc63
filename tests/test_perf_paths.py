"""The fast TopK paths compute the same step as straightforward dense autograd; the precision
default; the bench's TopK harness (no timings asserted)."""
import sys

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


def test_bench_step_worker_runs_our_step_and_reports_each_step(tmp_path):
    """The bench's TopK harness (no timing asserted: benchmarks print figures, tests check the
    harness): a worker process sets up our step at tiny dims, warms up, answers blocks of steps."""
    from sae_sweep.bench import perf

    python, env = perf.ours_python()
    worker = perf.StepWorker(python, "sae_sweep", "fp32", threads=1, warmup=1, env=env, dims=(16, 64, 4, 32))
    try:
        worker.run(2)
        worker.run(1)
    finally:
        worker.close()
    assert worker.proc.returncode == 0
    assert worker.ready["impl"] == "sae_sweep" and worker.ready["precision"] == "fp32"
    summary = worker.summary(tokens=32)
    assert summary["steps_timed"] == 3 and [t["in_block"] for t in summary["steps"]] == [0, 1, 0]
    assert summary["tokens_per_s"] == 32 / summary["best_seconds"] and summary["best_seconds"] > 0
    assert {"cpu", "runq_wait", "minflt"} <= set(summary["steps"][0])


def test_bench_says_a_peer_without_its_venv_is_not_measured(tmp_path):
    from sae_sweep.bench import perf

    with pytest.raises(RuntimeError, match="exited"):
        perf.StepWorker(perf.ours_python()[0], "no_such_impl", "fp32", threads=1, warmup=0)
    assert perf.peer_python("sparsify", tmp_path) is None
    (tmp_path / "sparsify" / "bin").mkdir(parents=True)
    (tmp_path / "sparsify" / "bin" / "python").symlink_to(sys.executable)
    assert perf.peer_python("sparsify", tmp_path) == tmp_path / "sparsify" / "bin" / "python"
    why = {"dictionary_learning": "not measured: no venv at x (`make bench-peers` creates it)"}
    text = perf.table({"machine": perf.machine(), "topk": {"not_run": why}})
    assert "| TopK train vs dictionary_learning | not measured: no venv at x (`make bench-peers` creates it) |" in text
