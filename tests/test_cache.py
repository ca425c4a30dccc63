"""Activation cache: keys, atomic locked builds, round trips, and the shuffled reader."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time

import numpy as np
import pytest
import torch

from helpers.processes import dead_pid
from sae_sweep.activations.cache import (
    ActivationCache,
    CacheError,
    cache_key,
    get_or_build,
    read_builds_log,
)
from sae_sweep.activations.reader import ShuffledReader

CTX, D = 16, 8
BOS, PAD = 0, 1
SPEC = {
    "model": {"name": "tiny", "revision": None, "dtype": "float32"},
    "layer": 2,
    "hook": "resid_post",
    "dataset": {"kind": "builtin", "hash": "abc"},
    "context_size": CTX,
    "tokens": 1024,
    "storage_dtype": "float32",
    "tokenizer": "tok-hash",
}


def make_data(n_seqs: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with BOS at t=0 and PAD tails; acts[..., 0] holds the global position."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, 50, (n_seqs, CTX), generator=g)
    tokens[:, 0] = BOS
    tokens[::3, -3:] = PAD
    acts = torch.randn(n_seqs, CTX, D, generator=g)
    acts[..., 0] = torch.arange(n_seqs * CTX, dtype=torch.float32).view(n_seqs, CTX)
    return tokens, acts


def chunks(tokens, acts, b=7, fail_after=None, delay=0.0):
    def build_fn():
        for i, start in enumerate(range(0, len(tokens), b)):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("boom: build interrupted")
            time.sleep(delay)
            yield tokens[start : start + b], acts[start : start + b]

    return build_fn


def build(tmp_path, spec=SPEC, n_seqs=40, **kw):
    tokens, acts = make_data(n_seqs)
    kw.setdefault("special_token_ids", [BOS, PAD])
    cache, built = get_or_build(spec, tmp_path, chunks(tokens, acts), **kw)
    return cache, built, tokens, acts


@pytest.mark.unit
def test_key_stable_and_sensitive():
    k = cache_key(SPEC)
    assert len(k) == 16 and set(k) <= set("0123456789abcdef")
    reordered = dict(reversed(list(SPEC.items())))
    reordered["model"] = dict(reversed(list(SPEC["model"].items())))
    assert cache_key(reordered) == k
    assert cache_key(json.loads(json.dumps(SPEC))) == k
    from omegaconf import OmegaConf

    assert cache_key(OmegaConf.create(SPEC)) == k
    changes = [
        ("layer", 3),
        ("hook", "mlp_out"),
        ("context_size", 32),
        ("tokens", 2048),
        ("storage_dtype", "bfloat16"),
        ("tokenizer", "other"),
        ("model", {**SPEC["model"], "revision": "main"}),
        ("dataset", {**SPEC["dataset"], "hash": "abd"}),
    ]
    keys = {cache_key({**SPEC, name: value}) for name, value in changes}
    assert len(keys) == len(changes) and k not in keys


@pytest.mark.unit
def test_round_trip_float32(tmp_path):
    cache, built, tokens, acts = build(tmp_path)
    assert built
    assert (tmp_path / "activations" / cache.key / "manifest.json").exists()
    assert cache.key == cache_key(SPEC) and cache.spec == SPEC
    assert (cache.n_seqs, cache.n_tokens, cache.d_in, cache.context_size) == (40, 640, D, CTX)
    assert cache.storage_dtype == "float32" and cache.special_token_ids == [BOS, PAD]
    special = (tokens == BOS) | (tokens == PAD)
    assert cache.n_special == int(special.sum())

    again = ActivationCache.open(cache.path, verify=True)
    arr = again.activations()
    assert isinstance(arr, np.memmap) and arr.shape == (40, CTX, D) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, acts.numpy())
    np.testing.assert_array_equal(again.token_ids(), tokens.numpy())
    np.testing.assert_array_equal(again.special_mask(), special.numpy())
    got_t, got_a = zip(*again.iter_sequences(batch_size=6))
    assert [len(t) for t in got_t] == [6] * 6 + [4]
    assert torch.equal(torch.cat(got_t), tokens) and torch.equal(torch.cat(got_a), acts)

    m = again.manifest
    assert m["n_seqs"] == 40 and m["build"]["pid"] == os.getpid()
    assert m["build"]["host"] == socket.gethostname() and "seconds" in m["build"]
    assert all(len(s["data_sha256"]) == 64 == len(s["tokens_data_sha256"]) for s in m["shards"])

    # second call reuses without calling build_fn
    def never():
        raise AssertionError("build_fn must not run for an existing cache")
        yield

    cache2, built2 = get_or_build(SPEC, tmp_path, never, special_token_ids=[BOS, PAD])
    assert not built2 and cache2.path == cache.path
    assert len(read_builds_log(tmp_path)) == 1


@pytest.mark.unit
def test_round_trip_bf16_multi_shard(tmp_path):
    spec = {**SPEC, "storage_dtype": "bfloat16"}
    # 7 sequences of ctx*d*2 bytes per shard -> 6 shards, the last one short
    cache, built, tokens, acts = build(tmp_path, spec, shard_bytes=7 * CTX * D * 2)
    assert built and cache.storage_dtype == "bfloat16" and cache.n_shards == 6
    assert cache.manifest["numpy_dtype"] == "uint16"
    shards = cache.activations()
    assert isinstance(shards, list) and [len(s) for s in shards] == [7] * 5 + [5]
    assert all(s.dtype == np.uint16 for s in shards)
    expected = acts.to(torch.bfloat16).float()  # exactly what bf16 storage can represent
    got = torch.cat([cache.to_tensor(s) for s in shards])
    assert torch.equal(got, expected)
    assert torch.allclose(got, acts, rtol=2**-8, atol=1e-6)
    t, a = cache.sequences(5, 16)  # spans three shards
    assert torch.equal(t, tokens[5:16]) and torch.equal(a, expected[5:16])
    np.testing.assert_array_equal(cache.token_ids(), tokens.numpy())
    ActivationCache.open(cache.path, verify=True)


@pytest.mark.unit
def test_float16_and_progress_total_sizing(tmp_path):
    spec = {**SPEC, "storage_dtype": "float16"}
    cache, built, _, acts = build(tmp_path, spec, progress_total=40)
    assert cache.n_shards == 1
    assert torch.equal(cache.to_tensor(cache.activations()), acts.half().float())


@pytest.mark.unit
def test_architecture_meta_form(tmp_path):
    """get_or_build(spec, root, build_fn, meta) with settings passed in meta."""
    tokens, acts = make_data(10)
    meta = {"special_token_ids": [BOS], "storage_dtype": "float32", "lm": "tiny"}
    cache, built = get_or_build(SPEC, tmp_path, chunks(tokens, acts), meta)
    assert built and cache.special_token_ids == [BOS] and cache.manifest["meta"] == {"lm": "tiny"}


@pytest.mark.unit
def test_bad_inputs(tmp_path):
    tokens, acts = make_data(4)
    with pytest.raises(TypeError, match="special_token_ids"):
        get_or_build(SPEC, tmp_path, chunks(tokens, acts))
    with pytest.raises(ValueError, match="storage_dtype"):
        get_or_build(SPEC, tmp_path, chunks(tokens, acts), special_token_ids=[], storage_dtype="int8")
    with pytest.raises(ValueError, match="disagrees"):
        get_or_build(SPEC, tmp_path, chunks(tokens, acts), special_token_ids=[], storage_dtype="bfloat16")
    no_dtype = {k: v for k, v in SPEC.items() if k != "storage_dtype"}
    with pytest.raises(ValueError, match="cache key"):
        get_or_build(no_dtype, tmp_path, chunks(tokens, acts), special_token_ids=[], storage_dtype="float16")
    with pytest.raises(ValueError, match=r"\[b, ctx, d\]"):
        get_or_build(SPEC, tmp_path, lambda: iter([(tokens, acts[:, :-1])]), special_token_ids=[])
    with pytest.raises(ValueError, match="no activations"):
        get_or_build(SPEC, tmp_path, lambda: iter([]), special_token_ids=[])
    nan = acts.clone()
    nan[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        get_or_build(SPEC, tmp_path, chunks(tokens, nan), special_token_ids=[])
    root = tmp_path / "activations"
    assert sorted(p.name for p in root.iterdir()) == []  # nothing half-built left behind


@pytest.mark.unit
def test_interrupted_build_leaves_nothing_and_next_call_builds(tmp_path):
    tokens, acts = make_data(40)
    with pytest.raises(RuntimeError, match="boom"):
        get_or_build(SPEC, tmp_path, chunks(tokens, acts, fail_after=3), special_token_ids=[BOS])
    root = tmp_path / "activations"
    assert list(root.iterdir()) == []  # no cache dir, no temp dir, no lock, no builds.log
    with pytest.raises(CacheError, match="no activation cache"):
        ActivationCache.open(root / cache_key(SPEC))
    cache, built = get_or_build(SPEC, tmp_path, chunks(tokens, acts), special_token_ids=[BOS])
    assert built and cache.n_seqs == 40 and len(read_builds_log(tmp_path)) == 1


@pytest.mark.integration
def test_leftover_tmp_dir_and_dead_lock_are_recovered(tmp_path):
    key = cache_key(SPEC)
    root = tmp_path / "activations"
    leftover = root / f".tmp-{key}-99999-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "acts-00000.npy").write_bytes(b"half a shard")
    (root / f"{key}.lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "slurm_job_id": "12", "started": 0})
    )
    cache, built, _, _ = build(tmp_path, lock_timeout=10)
    assert built and not leftover.exists()
    assert sorted(p.name for p in root.iterdir()) == sorted([key, "builds.log"])


@pytest.mark.unit
def test_incomplete_and_corrupt_caches_are_detected(tmp_path):
    cache, _, tokens, acts = build(tmp_path)
    shard = cache.path / cache.manifest["shards"][0]["file"]
    del cache
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    ActivationCache.open(shard.parent)  # cheap open checks shapes only
    with pytest.raises(CacheError, match="checksum"):
        ActivationCache.open(shard.parent, verify=True)
    shard.write_bytes(bytes(data[:-100]))  # truncated
    with pytest.raises(CacheError, match="acts-00000.npy"):
        ActivationCache.open(shard.parent)
    (shard.parent / "manifest.json").unlink()
    with pytest.raises(CacheError, match="incomplete"):
        ActivationCache.open(shard.parent)
    # get_or_build replaces the unusable directory with a fresh build
    cache, built = get_or_build(SPEC, tmp_path, chunks(tokens, acts), special_token_ids=[BOS, PAD])
    assert built
    np.testing.assert_array_equal(ActivationCache.open(cache.path, verify=True).activations(), acts.numpy())


@pytest.mark.unit
def test_caches_with_whole_file_checksums_still_verify(tmp_path):
    """Caches written before data_sha256 carry sha256 of the whole file; verify still checks them."""
    import hashlib

    cache, _, _, _ = build(tmp_path)
    mpath = cache.path / "manifest.json"
    manifest = json.loads(mpath.read_text())
    for s in manifest["shards"]:
        for prefix, fname in (("", s["file"]), ("tokens_", s["tokens_file"])):
            del s[f"{prefix}data_sha256"]
            s[f"{prefix}sha256"] = hashlib.sha256((cache.path / fname).read_bytes()).hexdigest()
    mpath.write_text(json.dumps(manifest))
    ActivationCache.open(cache.path, verify=True)
    shard = cache.path / manifest["shards"][0]["tokens_file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum"):
        ActivationCache.open(cache.path, verify=True)


def _concurrent_builder(root: str, barrier, out: str) -> None:
    tokens, acts = make_data(40)
    barrier.wait(timeout=60)  # both children have imported torch: start together
    cache, built = get_or_build(SPEC, root, chunks(tokens, acts, delay=0.25), special_token_ids=[BOS, PAD])
    with open(out, "w") as fh:
        json.dump(
            {
                "built": built,
                "path": str(cache.path),
                "sum": float(torch.cat([a for _, a in cache.iter_sequences(64)]).sum()),
            },
            fh,
        )


@pytest.mark.integration
def test_concurrent_builders_build_once(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_concurrent_builder, args=(str(tmp_path), barrier, str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    results = [json.loads(o.read_text()) for o in outs]
    assert sorted(r["built"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"] and results[0]["sum"] == results[1]["sum"]
    log = read_builds_log(tmp_path)
    assert len(log) == 1 and log[0]["key"] == cache_key(SPEC)
    assert not (tmp_path / "activations" / f"{cache_key(SPEC)}.lock").exists()


def _killed_builder(root: str, started) -> None:
    tokens, acts = make_data(40)

    def build_fn():
        for i, chunk in enumerate(chunks(tokens, acts, delay=0.05)()):
            yield chunk
            if i == 2:
                started.set()
                time.sleep(60)  # killed here, mid-build

    get_or_build(SPEC, root, build_fn, special_token_ids=[BOS, PAD])


@pytest.mark.integration
def test_builder_killed_mid_build_is_recovered(tmp_path):
    """SIGKILL leaves a lock and a temp dir behind; the next caller takes over and rebuilds."""
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    proc = ctx.Process(target=_killed_builder, args=(str(tmp_path), started))
    proc.start()
    assert started.wait(timeout=60)
    proc.kill()
    proc.join()
    root = tmp_path / "activations"
    key = cache_key(SPEC)
    assert (root / f"{key}.lock").exists() and list(root.glob(f".tmp-{key}-*"))
    assert not (root / key).exists()
    cache, built, _, acts = build(tmp_path, lock_timeout=30)
    assert built and cache.n_seqs == 40
    assert sorted(p.name for p in root.iterdir()) == sorted([key, "builds.log"])
    assert len(read_builds_log(tmp_path)) == 1


def positions_of(batch: torch.Tensor) -> np.ndarray:
    return batch[:, 0].numpy().astype(np.int64)  # acts[..., 0] encodes the global position


def take(reader, n):
    return [next(reader).clone() for _ in range(n)]


@pytest.fixture
def cache(tmp_path):
    # 40 seqs x 16 = 640 positions, 40 BOS + 14*3 PAD = 82 special -> 558 usable = 18 * 31
    return build(tmp_path, shard_bytes=9 * CTX * D * 4)[0]


@pytest.mark.unit
def test_reader_excludes_special_and_covers_each_token_once_per_epoch(cache):
    special = cache.special_mask().reshape(-1)
    usable = np.flatnonzero(~special)
    assert len(usable) == 558 and cache.n_shards == 5
    r = ShuffledReader(cache, batch_size=31, seed=3)
    assert r.batches_per_epoch == 18 and r.n_positions == 558
    for _ in range(2):
        seen = np.concatenate([positions_of(b) for b in take(r, r.batches_per_epoch)])
        assert not special[seen].any()
        np.testing.assert_array_equal(np.sort(seen), usable)  # each exactly once
    assert r.tokens_seen == 2 * 558 and r.state_dict()["epoch"] == 2
    flat = torch.cat([cache.to_tensor(a) for a in cache.shard_activations()]).reshape(-1, D)
    b = next(r)
    assert torch.equal(b, flat[positions_of(b)])  # rows are the real stored rows


@pytest.mark.unit
def test_reader_partial_batch_dropped_and_include_special(cache):
    r = ShuffledReader(cache, batch_size=100, seed=0, exclude_special=False, prefetch=0)
    assert r.n_positions == 640 and r.batches_per_epoch == 6
    seen = np.concatenate([positions_of(b) for b in take(r, 6)])
    assert len(seen) == 600 and len(np.unique(seen)) == 600
    assert cache.special_mask().reshape(-1)[seen].any()
    assert r.state_dict()["epoch"] == 1
    with pytest.raises(ValueError, match="fewer than batch_size"):
        ShuffledReader(cache, batch_size=1000, seed=0)


@pytest.mark.unit
def test_reader_determinism(cache):
    a = take(ShuffledReader(cache, 31, seed=1), 25)
    b = take(ShuffledReader(cache, 31, seed=1, prefetch=0), 25)
    c = take(ShuffledReader(cache, 31, seed=2), 25)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # epochs differ from each other too
    assert set(positions_of(a[0])) != set(positions_of(a[18]))


@pytest.mark.unit
def test_reader_resume_from_state_dict(cache):
    r = ShuffledReader(cache, 31, seed=5)
    take(r, 15)
    state = r.state_dict()
    assert state["epoch"] == 0 and state["batch_in_epoch"] == 15 and state["seed"] == 5
    rest = take(r, 10)  # crosses into epoch 1
    r.close()

    fresh = ShuffledReader(cache, 31, seed=5)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert fresh.tokens_seen == 15 * 31
    assert all(torch.equal(x, y) for x, y in zip(rest, take(fresh, 10)))
    # rewinding a reader that has prefetched ahead also works
    fresh.load_state_dict(state)
    assert torch.equal(next(fresh), rest[0])
    with pytest.raises(ValueError, match="seed"):
        ShuffledReader(cache, 31, seed=6).load_state_dict(state)


@pytest.mark.unit
def test_reader_bf16_dtype_and_cleanup(tmp_path):
    cache = build(tmp_path, {**SPEC, "storage_dtype": "bfloat16"})[0]
    r = ShuffledReader(cache, 64, seed=0, dtype=torch.float32, num_workers=2)
    x = next(r)
    assert x.shape == (64, D) and x.dtype == torch.float32
    flat = torch.cat([cache.to_tensor(a) for a in cache.shard_activations()]).reshape(-1, D)
    assert torch.equal(x, flat[r.positions(0, 0)])  # bf16 cannot hold the position exactly
    assert next(ShuffledReader(cache, 64, seed=0, dtype=torch.bfloat16)).dtype == torch.bfloat16
    threads = list(r._executor._threads)
    assert threads
    del r
    for t in threads:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in threads)  # dropping the reader stops its workers


@pytest.mark.unit
@pytest.mark.parametrize("storage_dtype", ["bfloat16", "float16", "float32"])
def test_chunks_in_the_lm_dtype_store_what_the_widened_route_stored(tmp_path, storage_dtype):
    """The job's build yields activations as the LM gives them (bf16 on a GPU), not widened to
    fp32 first: the cache casts to the storage dtype where the chunk is, and stores the same bits
    as the fp32 route did."""
    tokens, acts = make_data()
    acts16 = acts.to(torch.bfloat16)
    spec = {**SPEC, "storage_dtype": storage_dtype}
    direct, _ = get_or_build({**spec, "route": "direct"}, tmp_path, chunks(tokens, acts16), special_token_ids=[BOS])
    wide, _ = get_or_build({**spec, "route": "wide"}, tmp_path, chunks(tokens, acts16.float()), special_token_ids=[BOS])
    assert np.array_equal(np.asarray(direct.activations()), np.asarray(wide.activations()))
    bad = acts16.clone()
    bad[3, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        get_or_build({**spec, "route": "nan"}, tmp_path, chunks(tokens, bad), special_token_ids=[BOS])


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["shuffled", "blocks"])
def test_readers_send_bf16_and_widen_on_the_device(tmp_path, kind):
    """On a GPU a bf16 cache's batches cross PCIe in bf16 (half the bytes) and are widened there;
    forced on the CPU, that route gives exactly the batches of the host-widening one."""
    from sae_sweep.activations.reader import BlockReader, DiskBlocks

    cache = build(tmp_path, {**SPEC, "storage_dtype": "bfloat16"})[0]

    def make(widen):
        if kind == "shuffled":
            return ShuffledReader(cache, 64, seed=2, widen_on_device=widen)
        return BlockReader(DiskBlocks(cache, 256), 64, seed=2, widen_on_device=widen)

    host, device = make(False), make(True)
    assert device._wire == torch.bfloat16 and host._wire == torch.float32
    for _ in range(6):
        a, b = next(host), next(device)
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    for r in (host, device):
        r.close()
    assert make(None)._wire == torch.float32  # on the CPU: widened on the host (no transfer)
