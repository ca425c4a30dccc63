"""Held-out curves during training: the loop's on_eval seam, the metrics' definitions, and a tiny
job that logs heldout/* at several steps into a real MLflow store."""

import math

import pytest
import torch

from helpers.cli import run_cli
from helpers.config import compose_config
from helpers.mlflow_store import store_client, store_runs
from helpers.readers import TensorReader
from helpers.splice_lm import HFResidPostLM
from sae_sweep.config import heldout_every_steps, total_steps
from sae_sweep.evals.core import run_core_eval
from sae_sweep.evals.heldout import FROM_CORE, METRICS, HeldoutBatch
from sae_sweep.sae import get_trainer
from sae_sweep.training.loop import Member, train_members


def _trainer(total: int):
    cfg = {"name": "topk", "lr": 1e-3, "warmup_steps": 2, "dead_tokens": 200}
    return get_trainer("topk")(16, {"d_sae": 64, "k": 4}, cfg, total, seed=0)


@pytest.mark.unit
@pytest.mark.usefixtures("one_thread")
def test_on_eval_runs_at_its_steps_and_leaves_training_unchanged():
    data = torch.randn(2000, 16) * torch.linspace(0.5, 2, 16)
    held = HeldoutBatch(activations=torch.randn(300, 16) * torch.linspace(0.5, 2, 16))
    total = 10

    def run(with_eval: bool):
        torch.manual_seed(0)
        trainer = _trainer(total)
        seen: list[tuple[int, dict]] = []
        member = Member(
            trainer,
            total,
            log_every=5,
            eval_every=3 if with_eval else 0,
            on_eval=(lambda step: seen.append((step, held.measure(trainer.sae)))) if with_eval else None,
        )
        train_members([member], TensorReader(data, 32, seed=1), progress=False)
        assert member.error is None
        return trainer, seen

    plain, _ = run(False)
    evaluated, seen = run(True)
    assert [s for s, _ in seen] == [3, 6, 9, 10]  # every 3 steps, and the last
    for name, p in plain.sae.state_dict().items():  # evaluation never changes what is trained
        assert torch.equal(p, evaluated.sae.state_dict()[name]), name
    assert set(seen[0][1]) == {"explained_variance", "mse_per_token", "l0", "dead_frac"}  # no LM: no CE/KL
    assert seen[-1][1]["l0"] == 4.0
    assert seen[-1][1]["explained_variance"] > seen[0][1]["explained_variance"]
    assert evaluated.sae.training  # the mode training left it in


@pytest.mark.unit
def test_heldout_reconstruction_metrics_are_the_core_definitions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=g) + 3.0
    sae = _trainer(1).sae.eval()
    with torch.no_grad():
        x_hat, f = sae(x)
    got = HeldoutBatch(activations=x).measure(sae)
    xd = x.double()
    resid = (xd - x_hat.double()).pow(2).sum()
    spread = (xd - xd.mean(0)).pow(2).sum()
    assert got["explained_variance"] == pytest.approx(float(1 - resid / spread), rel=1e-9)
    assert got["mse_per_token"] == pytest.approx(float(resid / 50), rel=1e-9)
    assert got["l0"] == float((f != 0).sum()) / 50
    assert got["dead_frac"] == pytest.approx(1 - float((f > 0).any(0).double().mean()))
    declared = {m.key for m in METRICS}
    assert {f"heldout/{k}" for k in got} <= declared


@pytest.mark.unit
@pytest.mark.usefixtures("one_thread")
def test_heldout_batch_gives_the_core_evals_numbers_on_that_batch():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16, initializer_range=0.2)
    lm = HFResidPostLM(GPT2LMHeadModel(cfg))
    tokens = torch.randint(1, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 0  # BOS: left out of every average, kept un-spliced
    sae = get_trainer("topk")(16, {"d_sae": 32, "k": 4}, {"name": "topk"}, 1, seed=0).sae
    core = run_core_eval(lm, sae.eval(), tokens, 1, "resid_post", batch_size=4, special_token_ids=[0], progress=False)
    got = HeldoutBatch(lm, tokens, 1, "resid_post", [0]).measure(sae.train())
    for name, (category, key) in FROM_CORE.items():
        assert got[name] == pytest.approx(core.metrics[category][key], rel=1e-6, abs=1e-9), name
    assert got["dead_frac"] == pytest.approx(1 - core.metrics["misc_metrics"]["frac_alive"])
    assert sae.training  # measure restores the mode


@pytest.mark.unit
def test_eval_every_tokens_default_gives_four_evaluations_and_zero_heldout_tokens_turns_them_off():
    cfg = compose_config("train.tokens=40000", "trainer.batch_size=1000")
    steps, every = total_steps(cfg), heldout_every_steps(cfg)
    assert steps == 40 and every == 10
    assert len([s for s in range(1, steps + 1) if s % every == 0 or s == steps]) == 4
    assert (
        heldout_every_steps(
            compose_config("train.tokens=40000", "trainer.batch_size=1000", "train.eval_every_tokens=8000")
        )
        == 8
    )
    assert heldout_every_steps(compose_config("train.heldout_tokens=0")) == 0


@pytest.mark.integration
def test_tiny_run_logs_heldout_curves_at_several_steps(tmp_path):
    out = tmp_path / "out"
    r = run_cli(
        out,
        "dataset.tokens=20000",
        "train.epochs=3",
        "train.tokens=40000",
        "trainer.batch_size=1000",
        "dataset.eval_tokens=1024",
        "eval=core_only",
        "sweep.name=heldout",
        "tracking.system_metrics=false",
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    client = store_client(out)
    (run,) = store_runs(out, "heldout", kind="job", client=client)
    assert run.info.status == "FINISHED"
    for name in ("explained_variance", "l0", "dead_frac", "kl_div_score", "ce_loss_score", "seconds"):
        history = client.get_metric_history(run.info.run_id, f"heldout/{name}")
        assert sorted(m.step for m in history) == [10, 20, 30, 40], name
        assert all(math.isfinite(m.value) for m in history)
    ev = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "heldout/explained_variance")}
    assert ev[40] > ev[10]  # the SAE learns between the first and the last evaluation
    kl = client.get_metric_history(run.info.run_id, "heldout/kl_div_score")
    assert all(0 < m.value <= 1 + 1e-6 for m in kl)
