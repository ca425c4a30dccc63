"""The CUDA path on a real GPU (issue 17): marked ``cuda`` and skipped where CUDA is absent, so
``pytest -m cuda`` (``make gpu-check`` runs it) is the one command that settles them on a GPU node.
Their CPU counterparts (the CUDA branches forced on CPU) are in test_device_paths.py."""
import dataclasses

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by make gpu-check on a GPU)")]


def _topk(device, d_in=64, d_sae=512, k=8, batch=128, steps=20):
    from sae_sweep.sae.registry import get_trainer

    cls = get_trainer("topk")
    cfg = {f.name: f.default for f in dataclasses.fields(cls.params_cls)}
    # AuxK on from the second step (dead_tokens = one batch)
    cfg.update(name="topk", batch_size=batch, warmup_steps=2, dead_tokens=batch)
    return cls(d_in, {"d_sae": d_sae, "k": k}, cfg, total_steps=steps, seed=0, device=device)


def _data(steps=20, batch=128, d_in=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(steps, batch, d_in, generator=g) * torch.linspace(0.2, 2.0, d_in)


def test_lm_weights_load_onto_the_gpu(tiny_cache_dir):
    """device_map placement: every weight is on the GPU, and the hooked activations match the CPU's."""
    from sae_sweep.lm import load_lm

    cfg = {"name": "tiny", "hf_id": "builtin:tiny", "dtype": "float32"}
    gpu, cpu = load_lm(cfg, tiny_cache_dir, "cuda"), load_lm(cfg, tiny_cache_dir, "cpu")
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    ids = torch.tensor([[cpu.bos_token_id, 5, 6, 7, 8, 9]])
    a_gpu = gpu.activations(ids.cuda(), 2, "resid_post").cpu()
    torch.testing.assert_close(a_gpu, cpu.activations(ids, 2, "resid_post"), rtol=2e-2, atol=2e-2)


def test_bf16_reader_widens_on_the_gpu(tmp_path):
    """A bf16 cache's batches cross to the GPU in bf16 and are widened there: exactly the host batches."""
    from sae_sweep.cache import get_or_build
    from sae_sweep.reader import ShuffledReader

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 50, (16, 32), generator=g)
    acts = torch.randn(16, 32, 48, generator=g).cuda().to(torch.bfloat16)  # a GPU LM's chunk
    spec = {"model": "gpu-test", "context_size": 32, "storage_dtype": "bfloat16"}
    cache, _ = get_or_build(spec, tmp_path, lambda: iter([(tokens, acts)]), special_token_ids=[],
                            storage_dtype="bfloat16")
    reader = ShuffledReader(cache, 64, seed=1, device="cuda")
    try:
        assert reader._wire == torch.bfloat16
        for step in range(4):
            x = next(reader)
            assert x.device.type == "cuda" and x.dtype == torch.float32
            assert torch.equal(x.cpu(), reader.batch_at(step))
    finally:
        reader.close()


def test_topk_steps_with_auxk_match_the_cpu():
    """The CUDA sparse backward (no atomics) gives the CPU's weights after AuxK steps (IEEE fp32 here)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        gpu = _topk("cuda", steps=6)
        torch.backends.cuda.matmul.allow_tf32 = False  # the trainer turned TF32 on; compare IEEE with IEEE
        cpu = _topk("cpu", steps=6)
        data = _data(6)
        for t in (gpu, cpu):
            t.init_from_data(data[0])
            for x in data:
                t.step(x)
        for name, p in cpu.sae.state_dict().items():
            torch.testing.assert_close(gpu.sae.state_dict()[name].cpu(), p, rtol=1e-4, atol=1e-5, msg=name)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_training_steps_do_not_sync_the_host():
    """torch.cuda.set_sync_debug_mode: a TopK step with AuxK on queues its work and returns."""
    from sae_sweep.devices import cuda_syncs

    t = _topk("cuda")
    data = _data(8).cuda()
    t.init_from_data(data[0])
    t.step(data[0])
    t.step(data[1])  # AuxK switches on
    torch.cuda.synchronize()
    with cuda_syncs() as found:
        for x in data[2:]:
            t.step(x)
    torch.cuda.synchronize()
    assert found == [], "\n".join(found)


def test_two_identical_runs_are_bit_identical():
    """The determinism decision (README "The CUDA path"): same seed, same batches -> the same bits."""
    def run():
        t = _topk("cuda")
        data = _data().cuda()
        t.init_from_data(data[0])
        for x in data:
            t.step(x)
        return {k: v.cpu() for k, v in t.sae.state_dict().items()}

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
