"""The CUDA path on a real GPU (docs/cuda.md): marked ``cuda`` and skipped where CUDA is absent, so
``pytest -m cuda`` (``make gpu-check`` runs it) is the one command that settles them on a GPU node.
Their CPU counterparts (the CUDA branches forced on CPU) are in test_device_paths.py."""

import pytest
import torch

from helpers.config import trainer_params

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by make gpu-check on a GPU)"),
]


def _topk(device, d_in=64, d_sae=512, k=8, batch=128, steps=20):
    from sae_sweep.sae.registry import get_trainer

    # AuxK on from the second step (dead_tokens = one batch)
    cfg = trainer_params("topk", batch_size=batch, warmup_steps=2, dead_tokens=batch)
    return get_trainer("topk")(d_in, {"d_sae": d_sae, "k": k}, cfg, total_steps=steps, seed=0, device=device)


def _data(steps=20, batch=128, d_in=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(steps, batch, d_in, generator=g) * torch.linspace(0.2, 2.0, d_in)


def test_lm_weights_load_onto_the_gpu(tiny_cache_dir):
    """device_map placement: every weight is on the GPU, and the hooked activations match the CPU's."""
    from sae_sweep.config import ModelConfig
    from sae_sweep.models.lm import load_lm

    cfg = ModelConfig(name="tiny", hf_id="builtin:tiny", dtype="float32")
    gpu, cpu = load_lm(cfg, tiny_cache_dir, "cuda"), load_lm(cfg, tiny_cache_dir, "cpu")
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    ids = torch.tensor([[cpu.bos_token_id, 5, 6, 7, 8, 9]])
    a_gpu = gpu.activations(ids.cuda(), 2, "resid_post").cpu()
    torch.testing.assert_close(a_gpu, cpu.activations(ids, 2, "resid_post"), rtol=2e-2, atol=2e-2)


def test_bf16_reader_widens_on_the_gpu(tmp_path):
    """A bf16 cache's batches cross to the GPU in bf16 and are widened there: exactly the host batches."""
    from sae_sweep.activations.cache import get_or_build
    from sae_sweep.activations.reader import ShuffledReader

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 50, (16, 32), generator=g)
    acts = torch.randn(16, 32, 48, generator=g).cuda().to(torch.bfloat16)  # a GPU LM's chunk
    spec = {"model": "gpu-test", "context_size": 32, "storage_dtype": "bfloat16"}
    cache, _ = get_or_build(
        spec, tmp_path, lambda: iter([(tokens, acts)]), special_token_ids=[], storage_dtype="bfloat16"
    )
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
    from sae_sweep.util.devices import cuda_syncs

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
    """The determinism decision (docs/cuda.md, "Determinism"): same seed, same batches -> the same bits."""

    def run():
        t = _topk("cuda")
        data = _data().cuda()
        t.init_from_data(data[0])
        for x in data:
            t.step(x)
        return {k: v.cpu() for k, v in t.sae.state_dict().items()}

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# -- stream mode (cache.mode=stream) on the GPU ----------------------------------------------------


def _lm(cache_dir, device, dtype="float32"):
    from sae_sweep.config import ModelConfig
    from sae_sweep.models.lm import load_lm

    return load_lm(ModelConfig(name="tiny", hf_id="builtin:tiny", dtype=dtype), cache_dir, device)


def _windows(lm, n_chunks=6, chunk=4, ctx=32, seed=0):
    """Token windows as text.iter_windows gives them (BOS first), from ids the tiny model knows."""
    vocab = lm.model.config.vocab_size

    def make():
        g = torch.Generator().manual_seed(seed)
        for _ in range(n_chunks):
            w = torch.randint(3, vocab, (chunk, ctx), generator=g)
            w[:, 0] = lm.bos_token_id
            yield w

    return make


def _stream(lm, windows):
    from sae_sweep.activations.stream import StreamBlocks

    return StreamBlocks(lm, windows, 2, "resid_post", block_windows=8, forward_batch=4)


def test_stream_from_a_gpu_lm_gives_the_cpu_s_batches_without_host_syncs(tiny_cache_dir):
    """The LM's stream on the GPU: blocks stay on the GPU, each seed's batches are the CPU stream's
    (same rows, same order; activations within the GPU/CPU tolerance), the LM work is the same, and
    a batch of an already computed block is handed out without a host sync."""
    from sae_sweep.activations.stream import StreamReader
    from sae_sweep.util.devices import cuda_syncs

    gpu_lm, cpu_lm = _lm(tiny_cache_dir, "cuda"), _lm(tiny_cache_dir, "cpu")
    windows = _windows(cpu_lm)
    gpu_src, cpu_src = _stream(gpu_lm, windows), _stream(cpu_lm, windows)
    assert gpu_src.block(0).device.type == "cuda"
    for seed in (1, 2):
        gpu, cpu = list(StreamReader(gpu_src, 64, seed, device="cuda")), list(StreamReader(cpu_src, 64, seed))
        assert len(gpu) == len(cpu) >= 8  # both end where the data does
        for a, b in zip(gpu, cpu):
            assert a.device.type == "cuda" and a.dtype == torch.float32 and a.shape == b.shape
            torch.testing.assert_close(a.cpu(), b, rtol=2e-2, atol=2e-2)
    assert gpu_src.forward_tokens == cpu_src.forward_tokens
    reader = StreamReader(gpu_src, 16, 3, device="cuda")
    next(reader)  # computes block 0 (its NaN check waits for the GPU once per block)
    torch.cuda.synchronize()
    with cuda_syncs() as found:
        batches = [next(reader) for _ in range(4)]
    torch.cuda.synchronize()
    assert reader.block_pos == 0 and found == [], "\n".join(found)
    assert all(torch.isfinite(x).all() for x in batches)


def test_stream_from_a_cpu_lm_reaches_the_gpu_exactly():
    """A CPU LM's stream read on the GPU (through pinned memory, non-blocking): the same bits."""
    from sae_sweep.activations.stream import StreamBlocks, StreamReader

    class EmbedLM:  # activations = a fixed embedding of the ids (a host LM)
        d_model, device, special_token_ids = 48, torch.device("cpu"), {1}
        table = torch.randn(1000, 48, generator=torch.Generator().manual_seed(0))

        def activations(self, ids, layer, hook):
            return self.table[ids]

    def windows():
        g = torch.Generator().manual_seed(0)
        for _ in range(6):
            w = torch.randint(2, 1000, (4, 32), generator=g)
            w[:, 0] = 1
            yield w

    src = StreamBlocks(EmbedLM(), windows, 0, "resid_post", block_windows=8)
    gpu, cpu = StreamReader(src, 32, 5, device="cuda"), StreamReader(src, 32, 5)
    pairs = list(zip(gpu, cpu))
    assert len(pairs) >= 10
    assert all(a.device.type == "cuda" and torch.equal(a.cpu(), b) for a, b in pairs)


def test_a_pack_on_one_gpu_stream_equals_its_solo_runs(tiny_cache_dir, tmp_path):
    """2 seeds x TopK/ReLU trained on the GPU from one stream of the GPU LM: one LM pass for the
    pack, and each SAE bit-identical to its solo run (the determinism decision, stream mode)."""
    from sae_sweep.activations.stream import StreamReader
    from sae_sweep.sae.registry import get_trainer
    from sae_sweep.training.loop import Member, train_members

    lm = _lm(tiny_cache_dir, "cuda")
    points, steps = [("topk", 256, 8, 1), ("relu", 256, None, 1), ("topk", 256, 8, 2)], 12

    def run(selected, root):
        src = _stream(lm, _windows(lm, n_chunks=12))
        readers = {seed: StreamReader(src, 64, seed, device="cuda") for seed in {p[3] for p in selected}}
        members = []
        for i, (name, d_sae, k, seed) in enumerate(selected):
            cfg = {"name": name, "batch_size": 64, "lr": 3e-3, "warmup_steps": 2, "dead_tokens": 640}
            t = get_trainer(name)(
                lm.d_model, {"d_sae": d_sae, **({"k": k} if k else {})}, cfg, steps, seed, device="cuda"
            )
            t.init_from_data(next(StreamReader(src, 128, seed + 7919, device="cuda")))
            members.append(Member(t, steps, root / f"m{i}", checkpoint_every=5, stream=seed))
        train_members(members, readers, progress=False)
        return members, src.forward_tokens

    packed, forwarded = run(points, tmp_path / "packed")
    assert all(m.error is None and m.result.steps == steps for m in packed)
    for point, m in zip(points, packed):
        (alone,), alone_forwarded = run([point], tmp_path / f"alone-{point[0]}-{point[3]}")
        assert forwarded == alone_forwarded
        for (name, p), q in zip(alone.trainer.sae.named_parameters(), m.trainer.sae.parameters()):
            assert p.device.type == "cuda" and torch.isfinite(p).all()
            assert torch.equal(p, q), f"{point}: {name} differs from its solo run"


# -- faithful generation on the GPU ----------------------------------------------------------------


def test_faithful_generation_on_the_gpu_is_text_and_reproducible(tiny_cache_dir, tmp_path):
    """Generations with the exact_topk_first sampler on the GPU (bf16, as dtype=auto loads it there):
    rows cut at EOS, within max_new_tokens, ids of the vocabulary, word-like text, the same chunk
    for the same (seed, chunk) and another for another chunk."""
    import numpy as np

    from sae_sweep.data.faithful import Generations

    lm = _lm(tiny_cache_dir, "cuda", dtype="auto")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    settings = {
        "max_new_tokens": 32,
        "temperature": 1.0,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
        "batch_size": 16,
        "seed": 4,
        "sampler": "exact_topk_first",
    }
    gens = Generations(lm, settings, tmp_path)
    first, other = gens._generate(0), gens._generate(1)
    vocab = lm.model.config.vocab_size
    for doc in first + other:
        assert doc.dtype == np.int32 and len(doc) <= 32 and lm.eos_token_id not in doc
        assert ((doc >= 0) & (doc < vocab)).all()
    assert len(first) == 16 and all(np.array_equal(x, y) for x, y in zip(first, gens._generate(0)))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(first, other))
    words = " ".join(lm.tokenizer.decode(d) for d in first + other).split()
    alpha = sum(w.strip(".,:;()[]'\"`").isalpha() for w in words) / len(words)
    assert len(words) > 50 and alpha > 0.5, " ".join(words)[:400]


def test_sampler_steps_equal_hf_processors_on_the_gpu(tiny_cache_dir):
    """HF generate's processed scores at every step on the GPU against ours (sampling.nucleus_probs)
    on the same raw logits, on the GPU: same kept tokens and probabilities within tolerance."""
    from test_sampling import hf_generate_agreement

    same, total = hf_generate_agreement(_lm(tiny_cache_dir, "cuda"), "cuda")
    assert same >= 0.9 * total
