"""Packed training gives each SAE exactly the result of training it alone."""

import pytest
import torch

from helpers.cli import run_cli
from helpers.config import compose_config
from helpers.mlflow_store import store_runs
from sae_sweep.activations.cache import get_or_build
from sae_sweep.activations.reader import ShuffledReader
from sae_sweep.sae.registry import get_trainer
from sae_sweep.training.loop import Member, train, train_members

pytestmark = pytest.mark.usefixtures("one_thread")

D, CTX, N_SEQS = 16, 32, 24


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    def build():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N_SEQS, CTX, D, generator=g) * torch.linspace(0.3, 2.0, D)
        yield torch.zeros(N_SEQS, CTX, dtype=torch.long), x

    c, _ = get_or_build({"test": "packing", "d": D}, tmp_path_factory.mktemp("cache"), build, special_token_ids=[])
    return c


# Different trainers, SAE sizes and k; one seed and batch size (one pack).
POINTS = [("topk", 64, 4, 20), ("topk", 32, 2, 20), ("relu", 64, None, 14), ("batchtopk", 48, 4, 20)]
SEED, BATCH = 5, 64


def make(cache, name, d_sae, k, steps):
    cfg = {"name": name, "batch_size": BATCH, "lr": 3e-3, "warmup_steps": 2, "dead_tokens": 640}
    sae = {"d_sae": d_sae, **({"k": k} if k else {})}
    trainer = get_trainer(name)(D, sae, cfg, steps, SEED)
    trainer.init_from_data(ShuffledReader(cache, 256, SEED + 7919, prefetch=0).batch(0, 0))
    return trainer


def solo(cache, tmp_path, i, point):
    trainer = make(cache, *point)
    logs = []
    reader = ShuffledReader(cache, BATCH, SEED)
    train(
        trainer,
        reader,
        point[3],
        tmp_path / f"solo{i}",
        log_every=5,
        on_log=lambda s, m: logs.append((s, m)),
        progress=False,
    )
    reader.close()
    return trainer, logs


@pytest.mark.unit
def test_packed_members_equal_solo_runs_and_resume_alone(cache, tmp_path):
    members, logs = [], []
    for i, point in enumerate(POINTS):
        log = []
        logs.append(log)
        members.append(
            Member(
                make(cache, *point),
                point[3],
                tmp_path / f"packed{i}",
                checkpoint_every=7,
                log_every=5,
                on_log=lambda s, m, log=log: log.append((s, m)),
            )
        )
    reader = ShuffledReader(cache, BATCH, SEED)
    train_members(members, reader, progress=False)
    reader.close()

    for i, (point, m) in enumerate(zip(POINTS, members)):
        assert m.error is None and m.result is not None and m.result.steps == point[3]
        alone, alone_logs = solo(cache, tmp_path, i, point)
        for (name, p), q in zip(alone.sae.named_parameters(), m.trainer.sae.parameters()):
            assert torch.equal(p, q), f"{point}: {name} differs from the solo run"
        assert [s for s, _ in alone_logs] == [s for s, _ in logs[i]]
        for (_, a), (_, b) in zip(alone_logs, logs[i]):
            assert {k: v for k, v in a.items() if k != "tokens_per_s"} == {
                k: v for k, v in b.items() if k != "tokens_per_s"
            }
        # the packed checkpoint is a normal one: a solo train() sees it as complete
        again = make(cache, *point)
        res = train(again, ShuffledReader(cache, BATCH, SEED), point[3], tmp_path / f"packed{i}", progress=False)
        assert res.resumed_from_step == point[3]
        assert torch.equal(again.sae.W_dec, m.trainer.sae.W_dec)


@pytest.mark.unit
def test_stream_key_groups_points_that_read_the_same_activations():
    """Points differing in trainer, SAE size, lr or seed read the same activations (each in its
    own seed's order); batch size or the activations themselves (layer, dataset, hook) differ."""
    from sae_sweep.config import stream_key

    def key(*overrides):
        return stream_key(compose_config(*overrides))

    base = key()
    assert key("trainer=relu") == key("sae.expansion_factor=8") == key("trainer.lr=0.01") == key("seed=49") == base
    for other in ("trainer.batch_size=512", "layer=1", "dataset=faithful", "hook=mlp_out", "cache.mode=stream"):
        assert key(other) != base, other


@pytest.mark.unit
def test_packed_resume_from_mixed_positions(cache, tmp_path):
    """Members interrupted at different steps resume in one pack and end as if never stopped."""
    point_a, point_b = POINTS[0], POINTS[2]
    members = [
        Member(make(cache, *point_a), point_a[3], tmp_path / "a"),
        Member(make(cache, *point_b), point_b[3], tmp_path / "b"),
    ]
    train_members(members[:1], ShuffledReader(cache, BATCH, SEED), progress=False)  # a finishes first
    a2, b2 = (
        Member(make(cache, *point_a), point_a[3], tmp_path / "a"),
        Member(make(cache, *point_b), point_b[3], tmp_path / "b"),
    )
    train_members([a2, b2], ShuffledReader(cache, BATCH, SEED), progress=False)  # a skips, b trains from 0
    assert a2.result.resumed_from_step == point_a[3]
    alone_b, _ = solo(cache, tmp_path, 9, point_b)
    assert torch.equal(alone_b.sae.W_enc, b2.trainer.sae.W_enc)


GRID = [
    "-m",
    "dataset=synthetic",
    "trainer=topk,relu",
    "sae.d_sae=128,96",
    "seed=3",
    "dataset.tokens=8192",
    "dataset.eval_tokens=1024",
    "train.tokens=8192",
    "trainer.batch_size=512",
    "train.checkpoint_every=8",
    "sweep.name=pack",
    "eval=core_only",
]


def _jobs_by_key(out):
    return {r.data.tags["run_key"]: r for r in store_runs(out, "pack", "job")}


def _sweep(out, *extra):
    r = run_cli(out, *GRID, *extra, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return _jobs_by_key(out)


@pytest.mark.integration
@pytest.mark.slow
def test_packed_sweep_equals_one_job_per_point(tmp_path):
    alone = _sweep(tmp_path / "alone")
    packed = _sweep(tmp_path / "packed", "sweep.pack=true")
    assert set(alone) == set(packed) and len(packed) == 4
    for key, run in packed.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["pack.size"] == "4"
        ref = alone[key].data.metrics
        for name in ("train/loss", "recovery/reconstruction_quality/explained_variance"):
            if name in ref:
                assert run.data.metrics[name] == pytest.approx(ref[name], rel=1e-6), name
        a = torch.load(tmp_path / "alone" / "checkpoints" / key / "latest.pt", weights_only=False)
        b = torch.load(tmp_path / "packed" / "checkpoints" / key / "latest.pt", weights_only=False)
        for name, t in a["trainer"]["sae"].items():
            assert torch.equal(t, b["trainer"]["sae"][name]), (key, name)


STREAM_GRID = [
    "cache.mode=stream",
    "train.tokens=12288",
    "train.epochs=1",
    "trainer.batch_size=512",
    "cache.block_tokens=4096",
    "dataset.eval_tokens=1024",
    "train.checkpoint_every=8",
    "sweep.name=pack",
    "eval=core_only",
]


@pytest.mark.integration
@pytest.mark.slow
def test_stream_pack_of_seeds_and_trainers_pays_one_lm_pass_and_equals_solo_runs(tmp_path):
    """2 seeds x 2 trainers streamed in one packed job: the LM forward work is that of one stream
    (not four), and an SAE of the second seed (its own block order) equals its solo stream run's."""

    def sweep(out, *grid):
        r = run_cli(out, "-m", *STREAM_GRID, *grid, timeout=900)
        assert r.returncode == 0, r.stderr[-4000:]
        return _jobs_by_key(out)

    packed = sweep(tmp_path / "packed", "trainer=topk,relu", "seed=3,4", "sweep.pack=true")
    alone = sweep(tmp_path / "alone", "trainer=relu", "seed=4")
    assert len(packed) == 4 and len(alone) == 1 and set(alone) <= set(packed)
    forward = {r.data.metrics["stream/forward_tokens"] for r in packed.values()}
    (solo,) = alone.values()
    assert forward == {solo.data.metrics["stream/forward_tokens"]}  # one LM pass for all four
    for run in packed.values():
        assert run.info.status == "FINISHED" and run.data.tags["pack.size"] == "4"
    (key,) = alone
    a = torch.load(tmp_path / "alone" / "checkpoints" / key / "latest.pt", weights_only=False)
    b = torch.load(tmp_path / "packed" / "checkpoints" / key / "latest.pt", weights_only=False)
    for name, t in a["trainer"]["sae"].items():
        assert torch.equal(t, b["trainer"]["sae"][name]), name
