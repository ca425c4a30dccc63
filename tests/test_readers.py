"""Batch streams at scale: the block reader (large sequential reads), the LM stream (nothing on
disk, one LM pass for every seed of a pack), and packs that mix seeds -- each SAE exactly the SAE
it would be alone."""

import pytest
import torch

from helpers.config import compose_config
from sae_sweep.activations.cache import get_or_build
from sae_sweep.activations.reader import BlockReader, DiskBlocks
from sae_sweep.activations.stream import StreamBlocks, StreamReader
from sae_sweep.sae.registry import get_trainer
from sae_sweep.training.loop import Interrupted, Member, train, train_members

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]

D, CTX, N_SEQS, BOS = 8, 16, 80, 1


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    def build():
        g = torch.Generator().manual_seed(0)
        toks = torch.randint(2, 100, (N_SEQS, CTX), generator=g)
        toks[:, 0] = BOS
        # row value = its global position, so a batch tells which positions it holds
        x = torch.arange(N_SEQS * CTX, dtype=torch.float32)[:, None].repeat(1, D).reshape(N_SEQS, CTX, D)
        yield toks, x

    c, _ = get_or_build({"test": "readers"}, tmp_path_factory.mktemp("cache"), build, special_token_ids=[BOS])
    return c


def positions(x):
    return x[:, 0].long().tolist()


def test_block_reader_visits_every_usable_position_once_per_epoch_in_a_seed_fixed_order(cache):
    src = DiskBlocks(cache, block_rows=100)
    r = BlockReader(src, 32, seed=3)
    epoch = [positions(next(r)) for _ in range(r.batches_per_epoch)]
    flat = [p for b in epoch for p in b]
    bos = set(range(0, N_SEQS * CTX, CTX))
    assert len(flat) == len(set(flat)) and not (set(flat) & bos)  # each once, specials never
    assert len(flat) >= N_SEQS * (CTX - 1) - src.n_blocks * 32  # only each block's partial batch dropped
    assert r.state_dict()["epoch"] == 1
    again = BlockReader(src, 32, seed=3)
    assert [positions(next(again)) for _ in range(5)] == epoch[:5]
    other = BlockReader(src, 32, seed=4)
    assert [positions(next(other)) for _ in range(5)] != epoch[:5]
    # within a batch: one block, so reads are contiguous runs of the cache
    for b in epoch:
        assert max(b) - min(b) < 100


def test_any_valid_seed_orders_the_data(cache):
    """Seeds up to the schema's limit (2**63) give an order: the derived per-epoch and per-block seeds
    are reduced into torch's range (they overflowed it from seed ~9e6 on)."""
    from sae_sweep.config.job import SEED_LIMIT

    src = DiskBlocks(cache, block_rows=100)
    for seed in (SEED_LIMIT - 1, 10**12):
        r = BlockReader(src, 32, seed=seed)
        assert positions(next(r)) == positions(BlockReader(src, 32, seed=seed).batch_at(0))


def test_block_reader_resumes_exactly_and_finds_any_step(cache):
    src = DiskBlocks(cache, block_rows=100)
    r = BlockReader(src, 32, seed=5)
    head = [next(r) for _ in range(17)]  # crosses blocks and the epoch boundary
    state = r.state_dict()
    tail = [next(r) for _ in range(30)]
    fresh = BlockReader(src, 32, seed=5)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, next(fresh)) for a in tail)
    assert all(torch.equal(BlockReader(src, 32, seed=5).batch_at(i), x) for i, x in enumerate(head + tail))
    with pytest.raises(ValueError, match="seed"):
        BlockReader(src, 32, seed=6).load_state_dict(state)


# -- the LM stream -------------------------------------------------------------------------------


class CountingLM:
    """A stand-in with the LanguageModel surface the stream uses: activations = an embedding of the
    ids (so a row tells which token it came from); counts forward tokens."""

    d_model = D
    device = torch.device("cpu")
    special_token_ids = {BOS}

    def __init__(self):
        self.forwarded = 0

    def activations(self, ids, layer, hook):
        self.forwarded += ids.numel()
        return ids[..., None].float().repeat(1, 1, D)


def windows(n_chunks=40, chunk=4, seed=0):
    def make():
        g = torch.Generator().manual_seed(seed)
        for _ in range(n_chunks):
            w = torch.randint(2, 1000, (chunk, CTX), generator=g)
            w[:, 0] = BOS
            yield w

    return make


def test_stream_resumes_exactly_without_redoing_earlier_blocks():
    lm = CountingLM()
    src = StreamBlocks(lm, windows(), 0, "resid_post", block_windows=12, forward_batch=4)
    r = StreamReader(src, 16, seed=1)
    head = [next(r) for _ in range(25)]
    state = r.state_dict()
    tail = [next(r) for _ in range(20)]
    lm2 = CountingLM()
    src2 = StreamBlocks(lm2, windows(), 0, "resid_post", block_windows=12, forward_batch=4)
    resumed = StreamReader(src2, 16, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)) for a in tail)
    assert lm2.forwarded < lm.forwarded  # blocks before the resume point were tokenized, not forwarded
    assert all(torch.equal(StreamReader(src, 16, seed=1).batch_at(i), x) for i, x in enumerate(head[:5]))


def test_stream_ends_when_the_data_does():
    r = StreamReader(StreamBlocks(CountingLM(), windows(n_chunks=3), 0, "resid_post", block_windows=8), 16, seed=0)
    got = list(r)
    assert 0 < len(got) <= 3 * 4 * (CTX - 1) // 16


def trainer(name, d_sae, k, steps, seed):
    cfg = {"name": name, "batch_size": 32, "lr": 3e-3, "warmup_steps": 2, "dead_tokens": 640}
    return get_trainer(name)(D, {"d_sae": d_sae, **({"k": k} if k else {})}, cfg, steps, seed)


def _init(t, x):
    t.init_from_data(x)
    return t


def test_a_pack_of_seeds_on_one_stream_pays_one_lm_pass_and_each_sae_equals_its_solo_run(tmp_path):
    """2 seeds x 2 trainers from one StreamBlocks: one LM pass in all (the forward work of one
    stream), and every member bit-identical to training it alone on its own stream."""
    points = [("topk", 32, 4, 1), ("relu", 32, None, 1), ("topk", 32, 4, 2), ("relu", 32, None, 2)]
    steps = 20

    def run(selected, root):
        lm = CountingLM()
        src = StreamBlocks(lm, windows(), 0, "resid_post", block_windows=12, forward_batch=4)
        readers = {seed: StreamReader(src, 32, seed) for seed in {p[3] for p in selected}}
        members = []
        for i, (name, d_sae, k, seed) in enumerate(selected):
            torch.manual_seed(seed)
            t = _init(trainer(name, d_sae, k, steps, seed), next(StreamReader(src, 64, seed + 7919)))
            members.append(Member(t, steps, root / f"m{i}-{name}-{seed}", checkpoint_every=7, stream=seed))
        train_members(members, readers, progress=False)
        return members, lm.forwarded

    packed, forwarded = run(points, tmp_path / "packed")
    assert all(m.error is None and m.result.steps == steps for m in packed)
    for (name, d_sae, k, seed), m in zip(points, packed):
        (alone,), alone_forwarded = run([(name, d_sae, k, seed)], tmp_path / f"alone-{name}-{seed}")
        for (pname, p), q in zip(alone.trainer.sae.named_parameters(), m.trainer.sae.parameters()):
            assert torch.equal(p, q), f"{name} seed {seed}: {pname} differs from its solo run"
        assert forwarded == alone_forwarded  # the pack paid what one SAE alone pays, not four times it


def test_a_pack_of_seeds_on_one_disk_cache_equals_the_solo_runs_and_resumes(cache, tmp_path):
    points = [("topk", 32, 4, 7), ("topk", 32, 4, 8), ("batchtopk", 24, 4, 8)]
    src = DiskBlocks(cache, block_rows=100)
    steps = 30

    def make(name, d_sae, k, seed):
        torch.manual_seed(seed)
        return _init(trainer(name, d_sae, k, steps, seed), BlockReader(src, 64, seed + 7919).batch_at(0))

    members = [
        Member(make(*p), steps, tmp_path / f"p{i}", checkpoint_every=9, stream=p[3]) for i, p in enumerate(points)
    ]
    readers = {7: BlockReader(src, 32, 7), 8: BlockReader(src, 32, 8)}
    with pytest.raises(Interrupted):  # interrupted mid-way ...
        train_members(members, readers, progress=False, should_stop=lambda: members[0].trainer.step_count >= 13)
    again = [Member(make(*p), steps, tmp_path / f"p{i}", checkpoint_every=9, stream=p[3]) for i, p in enumerate(points)]
    train_members(again, {7: BlockReader(src, 32, 7), 8: BlockReader(src, 32, 8)}, progress=False)  # ... resumed
    for i, (p, m) in enumerate(zip(points, again)):
        alone = make(*p)
        train(alone, BlockReader(src, 32, p[3]), steps, tmp_path / f"alone{i}", progress=False)
        assert m.result.resumed_from_step is not None
        for a, b in zip(alone.sae.parameters(), m.trainer.sae.parameters()):
            assert torch.equal(a, b), p


def test_caches_that_do_not_fit_are_refused_before_any_work_with_the_numbers(tmp_path):
    import shutil

    from sae_sweep.config import ConfigError
    from sae_sweep.job.app import disk_problems, model_shape, validate_point

    free = shutil.disk_usage(tmp_path).free
    tokens = int(free / (128 * 4 + 4) * 1.5)  # tiny: d_model 128, fp32: 1.5x what the disk holds
    big = compose_config(f"dataset.tokens={tokens}", f"paths.cache_dir={tmp_path}")
    streamed = compose_config(
        f"dataset.tokens={tokens}", f"paths.cache_dir={tmp_path}", "cache.mode=stream", "train.epochs=1"
    )
    seeds = [
        compose_config(f"dataset.tokens={tokens // 2}", f"paths.cache_dir={tmp_path}", f"seed={s}") for s in (1, 2)
    ]
    with pytest.raises(ConfigError) as e:
        validate_point(big, check_availability=True, memory_gb=1e6)
    msg = str(e.value)
    assert f"paths.cache_dir={tmp_path}" in msg and "GB are free" in msg and "cache.mode=stream" in msg
    assert disk_problems([streamed], [model_shape(streamed)]) == []  # a stream needs no disk
    # two seeds of one dataset share one cache: counted once (3/4 of the disk fits)
    assert disk_problems(seeds, [model_shape(c) for c in seeds]) == []
