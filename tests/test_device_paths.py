"""The CUDA branches, forced on CPU (`kernels.force_path("device")`): training steps that never make
the host wait for the device (checked op by op with `devices.SyncOps`), and CUDA-only code paths
that give what the CPU paths give."""

import pytest
import torch

from helpers.config import trainer_params
from helpers.readers import ListReader  # a finite reader with the readers' state_dict protocol
from sae_sweep.sae.kernels import force_path
from sae_sweep.sae.registry import get_trainer, trainer_names
from sae_sweep.sae.temporal_ortho import CoactivationTable
from sae_sweep.util.devices import SyncOps

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def _cfg(name, **over):
    return trainer_params(name, batch_size=64, warmup_steps=2, dead_tokens=128, **over)  # AuxK on from step 3


VARIANTS = [(n, {}) for n in trainer_names()] + [
    ("temporal_ortho", {"tracker": "dense"}),
    ("temporal_ortho", {"mode": "published"}),
]


@pytest.mark.parametrize(
    "name,over", VARIANTS, ids=[f"{n}{'-' + '-'.join(map(str, o.values())) if o else ''}" for n, o in VARIANTS]
)
def test_training_steps_make_no_host_sync(name, over):
    """Every trainer's step (AuxK on where it has one) runs none of the ops that sync on CUDA, so a
    step queues its work and returns; the host waits only at log windows (train.Member.flush)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(8, 64, 16, generator=g) * torch.linspace(0.2, 2.0, 16)
    t = get_trainer(name)(16, {"d_sae": 128, "k": 4}, _cfg(name, **over), total_steps=40, seed=0)
    t.init_from_data(data[0])
    with force_path("device"):
        t.step(data[0])
        with SyncOps() as ops:
            for x in data[1:]:
                t.step(x)
    assert ops.count == 0, ops.report()


def test_hierarchical_checks_sync_a_bounded_number_of_times():
    """At a merge check the host reads the duplicate pairs once (not once per pair)."""

    def syncs_at_check(n_dups):
        t = get_trainer("hierarchical")(
            16, {"d_sae": 128}, _cfg("hierarchical", merge_every=2, resample=False), total_steps=40, seed=0
        )
        with torch.no_grad():  # n_dups exact duplicate decoder rows
            t.sae.W_dec[64 : 64 + n_dups] = t.sae.W_dec[:n_dups]
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
        t.init_from_data(x)
        with force_path("device"):
            t.step(x)
            with SyncOps() as ops:
                t.step(x)  # step 2: merge check
        assert t.n_merged >= n_dups
        return ops.count

    assert syncs_at_check(2) == syncs_at_check(30) <= 8


@pytest.mark.parametrize("cap", [3, 200])  # evictions; room for every pair
@pytest.mark.parametrize("cbar_init", ["first", "zero"])
def test_coactivation_table_device_update_equals_cpu_update(cap, cbar_init):
    g = torch.Generator().manual_seed(7)
    tables = {path: CoactivationTable(40, cap, cbar_init=cbar_init) for path in ("cpu", "device")}
    for step in range(12):
        # skewed codes: some latents far more frequent, so counts differ and slots get contested
        idx = torch.multinomial(torch.linspace(3, 0.1, 40), 5 * 32, replacement=True, generator=g).view(32, 5)
        idx = torch.stack([torch.randperm(40, generator=g)[:5] if len(set(r.tolist())) < 5 else r for r in idx])
        active = torch.rand(32, 5, generator=g) > 0.2
        for path, table in tables.items():
            with force_path(path):
                table.observe(idx, active)
                if step % 4 == 3:
                    table.end_window()
    a, b = tables["cpu"].state_dict(), tables["device"].state_dict()
    assert (a["partner"] >= 0).sum() > 0
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_training_loop_syncs_only_at_log_windows():
    """The loop's syncs (a log window's flush, the end-of-training checks) do not grow with the
    number of steps between them."""
    from sae_sweep.training.loop import train

    def syncs(steps):
        g = torch.Generator().manual_seed(0)
        data = torch.randn(steps, 64, 16, generator=g)
        t = get_trainer("topk")(16, {"d_sae": 128, "k": 4}, _cfg("topk"), total_steps=steps, seed=0)
        t.init_from_data(data[0])
        with force_path("device"), SyncOps() as ops:
            train(t, ListReader(list(data)), steps, log_every=1000, progress=False)
        return ops.count

    assert syncs(6) == syncs(12)


def test_fp32_matmuls_use_tf32_only_where_training_runs_on_cuda():
    """The precision default (docs/cuda.md): a trainer on CUDA turns on TF32 for fp32 matmuls and
    records it ("tf32", a run tag); on the CPU nothing global changes and the record says "ieee"."""
    from sae_sweep.util.devices import fast_matmul

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        t = get_trainer("topk")(16, {"d_sae": 64, "k": 4}, _cfg("topk"), total_steps=4, seed=0)
        assert t.matmul_fp32 == "ieee"
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
        assert fast_matmul("cpu") == "ieee" and torch.backends.cuda.matmul.allow_tf32 is False
        assert fast_matmul(torch.device("cuda", 0)) == "tf32"
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("dense", [False, True])
def test_coactivation_gram_route_makes_no_host_sync(dense):
    """The gram route (dense codes) on the device path: counts, table update and penalty queue
    without a host sync, like the pair route."""
    from sae_sweep.sae.temporal_ortho import ortho_penalty

    g = torch.Generator().manual_seed(0)
    table = CoactivationTable(32, 4, dense=dense, route="gram")
    codes = [torch.stack([torch.randperm(32, generator=g)[:8] for _ in range(64)]) for _ in range(3)]
    with force_path("device"):
        table.observe(codes[0], torch.ones(64, 8, dtype=torch.bool))
        table.end_window()
        with SyncOps() as ops:
            for idx in codes[1:]:
                vals = torch.rand(64, 8, generator=g, requires_grad=True)
                table.observe(idx, vals > 0.1)
                table.end_window()
                ortho_penalty(vals, idx, table, "linear").backward()
    assert ops.count == 0, ops.report()
    assert float(table.weight.sum()) > 0
