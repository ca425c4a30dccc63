"""Training loop: known-answer recovery, kill-and-resume, failure modes (fast, CPU, fp32)."""

import pytest
import torch

from helpers.readers import ListReader, TensorReader
from sae_sweep.activations.synthetic import PlantedDictionary
from sae_sweep.evals.recovery import recovery_metrics
from sae_sweep.sae import get_trainer
from sae_sweep.training.loop import Interrupted, TrainingFailed, load_checkpoint, train

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def topk_trainer(d_in, total_steps, sae_cfg=None, seed=0, **trainer_cfg):
    cfg = {"name": "topk", "lr": 1e-3, "warmup_steps": 5, **trainer_cfg}
    return get_trainer("topk")(d_in, sae_cfg or {"d_sae": 64, "k": 4}, cfg, total_steps, seed=seed)


# Known answer: 128 unit features in 32 dims (4x superposition), ~4 active per sample.
# Measured (seed 0, CPU fp32, 1000 steps x 256): mean_max_cos 0.992, frac_recovered_0.9 0.99.
RECOVERY_FLOOR_MEAN_MAX_COS = 0.95
RECOVERY_FLOOR_FRAC_09 = 0.90


def test_topk_recovers_planted_dictionary():
    pd = PlantedDictionary(32, 128, seed=0)
    data = pd.sample(64_000, l0=4)
    steps = 1000
    trainer = topk_trainer(
        32, steps, {"d_sae": 256, "k": 4}, lr=3e-3, warmup_steps=50, dead_tokens=5000, batch_size=256
    )
    logs = []
    result = train(
        trainer, TensorReader(data, 256), steps, log_every=100, on_log=lambda s, m: logs.append((s, m)), progress=False
    )
    rec = recovery_metrics(trainer.sae.W_dec, pd)
    print("planted-dictionary recovery:", rec, "final:", result.metrics)
    assert rec["mean_max_cos"] > RECOVERY_FLOOR_MEAN_MAX_COS
    assert rec["frac_recovered_0.9"] > RECOVERY_FLOOR_FRAC_09
    assert result.steps == steps and result.tokens == steps * 256
    assert result.metrics["explained_variance"] > 0.7
    assert [s for s, _ in logs] == list(range(100, 1001, 100))
    assert logs[-1][1]["mse"] < logs[0][1]["mse"]


def test_kill_and_resume_is_bit_identical(tmp_path):
    data = torch.randn(2000, 16) * torch.linspace(0.5, 2, 16)
    total = 60

    def fresh():
        # small dead_tokens so AuxK and the dead counters are exercised across the resume
        return topk_trainer(16, total, dead_tokens=200, auxk_alpha=0.1), TensorReader(data, 32, seed=1)

    t_full, r_full = fresh()
    full = train(t_full, r_full, total, ckpt_dir=tmp_path / "a", checkpoint_every=10, progress=False)

    t1, r1 = fresh()
    with pytest.raises(Interrupted) as exc:
        train(
            t1,
            r1,
            total,
            ckpt_dir=tmp_path / "b",
            checkpoint_every=10,
            progress=False,
            should_stop=lambda: t1.step_count >= 25,
        )  # between two periodic checkpoints
    assert exc.value.step == 25
    state = load_checkpoint(tmp_path / "b")
    assert state["step"] == 25 and set(state["rng"]) >= {"torch", "numpy", "python"}
    assert state["reader"] == {"epoch": 0, "pos": 25 * 32}

    torch.manual_seed(12345)  # a new process would have different global RNG: the checkpoint restores it
    t2, r2 = fresh()
    resumed = train(t2, r2, total, ckpt_dir=tmp_path / "b", checkpoint_every=10, progress=False)
    assert resumed.resumed_from_step == 25 and resumed.steps == total == full.steps
    for name, p in t_full.sae.state_dict().items():
        assert torch.equal(p, t2.sae.state_dict()[name]), name
    assert torch.equal(t_full.tokens_since_fired, t2.tokens_since_fired)
    assert t_full.optimizer.state_dict()["state"][0]["exp_avg"].equal(t2.optimizer.state_dict()["state"][0]["exp_avg"])
    timing = {"tokens_per_s"}
    assert {k: v for k, v in resumed.metrics.items() if k not in timing} == pytest.approx(
        {k: v for k, v in full.metrics.items() if k not in timing}, rel=1e-6
    )

    # A rerun after completion resumes at the end and trains nothing more.
    t3, r3 = fresh()
    again = train(t3, r3, total, ckpt_dir=tmp_path / "b", progress=False)
    assert again.resumed_from_step == total and again.steps == total
    assert torch.equal(t3.sae.W_dec, t2.sae.W_dec)


def test_on_log_windows_and_fields():
    data = torch.randn(1000, 16)
    t = topk_trainer(16, 25)
    logs = []
    train(t, TensorReader(data, 20), 25, log_every=10, on_log=lambda s, m: logs.append((s, m)), progress=False)
    assert [s for s, _ in logs] == [10, 20, 25]  # final partial window is flushed
    assert set(logs[0][1]) == {"loss", "mse", "auxk", "l0", "explained_variance", "dead_frac", "lr", "tokens_per_s"}
    assert all(isinstance(v, float) for v in logs[0][1].values())
    assert logs[0][1]["l0"] == 4.0 and logs[0][1]["tokens_per_s"] > 0
    assert logs[-1][1]["lr"] > 0  # lr of the last step taken, not the (zero) next one


def test_nan_raises_training_failed_naming_step():
    batches = [torch.randn(16, 16) for _ in range(20)]
    batches[6] = batches[6].clone()
    batches[6][3, 2] = float("nan")
    t = topk_trainer(16, 20)
    with pytest.raises(TrainingFailed, match="step 7"):
        train(t, ListReader(batches), 20, log_every=5, progress=False)


def test_nan_never_checkpointed(tmp_path):
    batches = [torch.randn(16, 16) for _ in range(20)]
    batches[3] = torch.full((16, 16), float("inf"))
    t = topk_trainer(16, 20)
    with pytest.raises(TrainingFailed, match="step 4"):
        train(t, ListReader(batches), 20, ckpt_dir=tmp_path, checkpoint_every=5, log_every=100, progress=False)
    assert load_checkpoint(tmp_path) is None


def test_zero_steps_raise_training_failed():
    t = topk_trainer(16, 0)
    with pytest.raises(TrainingFailed, match="zero steps"):
        train(t, TensorReader(torch.randn(100, 16), 10), 0, progress=False)
    t = topk_trainer(16, 10)
    with pytest.raises(TrainingFailed, match="exhausted after 0"):
        train(t, ListReader([]), 10, progress=False)


def test_all_latents_dead_raises_training_failed():
    t = topk_trainer(16, 20, dead_tokens=100)
    with torch.no_grad():
        t.sae.b_enc.fill_(-1e6)  # no pre-activation can be positive: nothing ever fires
    with pytest.raises(TrainingFailed, match="dead"):
        train(t, TensorReader(torch.randn(500, 16), 25), 20, progress=False)


def test_bf16_autocast_trains():
    data = torch.randn(2000, 16)
    t = topk_trainer(16, 30, autocast_bf16=True)
    res = train(t, TensorReader(data, 64), 30, progress=False)
    assert res.steps == 30 and t.sae.W_enc.dtype == torch.float32
    assert res.metrics["l0"] == 4.0


@pytest.mark.parametrize("every_steps,want", [(0, [3, 6, 9, 10]), (4, [3, 4, 7, 8, 10])])
def test_checkpoints_on_a_time_interval(tmp_path, monkeypatch, every_steps, want):
    """train.checkpoint_every_s: a checkpoint after the first step at least that long after the last
    one (or the start); a step interval beside it also restarts the clock; the end always saves.
    The clock is faked: each batch takes 10 s."""
    import types

    import sae_sweep.training.loop as train_mod

    clock = [0.0]
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class SlowReader(TensorReader):
        def __next__(self):
            clock[0] += 10.0
            return super().__next__()

    saved = []
    real_save = train_mod.save_checkpoint

    def recording_save(ckpt_dir, trainer, *args, **kwargs):
        saved.append(trainer.step_count)
        return real_save(ckpt_dir, trainer, *args, **kwargs)

    monkeypatch.setattr(train_mod, "save_checkpoint", recording_save)
    t = topk_trainer(16, 10)
    train(
        t,
        SlowReader(torch.randn(400, 16), 16),
        10,
        ckpt_dir=tmp_path,
        checkpoint_every=every_steps,
        checkpoint_every_s=25.0,
        log_every=5,
        progress=False,
    )
    assert saved == want
    assert load_checkpoint(tmp_path)["step"] == 10
