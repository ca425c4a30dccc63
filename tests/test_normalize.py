"""Activation normalisation (SAELens's expected_average_only_in) and outlier masking
(dictionary_learning's max_activation_norm_multiple): the estimate, the mask, training on the
normalised batches, the fold, checkpoints, and run keys that stay put while both are off."""

import pytest
import torch

from helpers.config import compose_config
from sae_sweep.activations.normalize import estimate_norm_scaling_factor, mask_high_norm
from sae_sweep.config import ConfigError, run_identity, run_key
from sae_sweep.job.app import validate_point
from sae_sweep.sae import get_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.unit
def test_scaling_factor_is_sqrt_d_in_over_the_mean_of_batch_mean_norms():
    a = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5, 1: batch mean 3
    b = torch.tensor([[6.0, 8.0], [0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])  # norms 10, 2, 2, 2: batch mean 4
    c = torch.full((2, 2), 100.0)  # beyond n_batches: not read
    assert estimate_norm_scaling_factor(iter([a, b, c]), 2, n_batches_for_norm_estimate=2) == pytest.approx(
        2**0.5 / 3.5
    )
    # masking first, as training does: torch's median of an even count is the lower middle value
    # (dictionary_learning's too), so a keeps norm 1 (5 > 1 x 3) and b its rows of norm 2
    assert estimate_norm_scaling_factor([a, b], 2, 2, max_activation_norm_multiple=3) == pytest.approx(2**0.5 / 1.5)
    with pytest.raises(ValueError, match="no batches"):
        estimate_norm_scaling_factor([], 2)


@pytest.mark.unit
def test_mask_keeps_rows_up_to_the_median_norm_times_the_multiple():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 40.0], [0.0, 2.0]])  # median norm 2
    assert torch.equal(mask_high_norm(x, 10.0), x[[0, 1, 2, 4]])
    assert torch.equal(mask_high_norm(x, 20.0), x)
    assert mask_high_norm(x, None) is x


def _trainer(total=20):
    return get_trainer("topk")(
        16, {"d_sae": 64, "k": 4}, {"name": "topk", "lr": 1e-3, "warmup_steps": 2}, total, seed=0
    )


@pytest.mark.unit
def test_trainer_trains_on_normalised_batches_and_its_inference_sae_reads_raw_activations():
    g = torch.Generator().manual_seed(0)
    data = 30.0 * torch.randn(640, 16, generator=g) + 5.0
    data[::64] *= 50  # massive-activation positions
    s = estimate_norm_scaling_factor(data.split(64), 16, max_activation_norm_multiple=10)
    trainer = _trainer()
    trainer.max_activation_norm_multiple, trainer.norm_scaling_factor = 10.0, s
    prepared = trainer.prepare_batch(data[:64])
    assert prepared.shape[0] == 63  # the outlier row is masked out
    assert prepared.norm(dim=-1).mean() == pytest.approx(16**0.5, rel=0.1)  # scaled to ~sqrt(d_in)
    trainer.init_from_data(data)
    for batch in data.split(32)[:20]:
        trainer.step(batch)
    folded = trainer.inference_sae()
    assert folded is not trainer.sae and trainer.sae.W_enc.data_ptr() != folded.W_enc.data_ptr()
    x = data[1:64]
    with torch.no_grad():
        expected = trainer.sae.eval()(x * s)[0] / s
        assert torch.allclose(folded.eval()(x)[0], expected, rtol=1e-4, atol=1e-3)
    # checkpoints keep both settings: a resumed trainer goes on normalising the same way
    resumed = _trainer()
    resumed.load_state_dict(trainer.state_dict())
    assert (resumed.norm_scaling_factor, resumed.max_activation_norm_multiple) == (s, 10.0)
    plain = _trainer()
    assert plain.inference_sae() is plain.sae  # off: nothing to fold


@pytest.mark.unit
def test_run_keys_stay_put_while_off_and_move_when_on():
    base = compose_config()
    assert not {"normalize_activations", "max_activation_norm_multiple"} & set(run_identity(base))
    scaled = compose_config("train.normalize_activations=expected_average_only_in")
    masked = compose_config("train.max_activation_norm_multiple=10")
    fewer = compose_config(
        "train.normalize_activations=expected_average_only_in", "train.n_batches_for_norm_estimate=100"
    )
    keys = {run_key(c) for c in (base, scaled, masked, fewer)}
    assert len(keys) == 4
    # the estimate's batch count only matters with the scaling on
    assert run_key(compose_config("train.n_batches_for_norm_estimate=100")) == run_key(base)


@pytest.mark.unit
@pytest.mark.parametrize(
    "override,words",
    [
        ("train.normalize_activations=layer_norm", ["train.normalize_activations", "expected_average_only_in"]),
        ("train.max_activation_norm_multiple=0.5", ["train.max_activation_norm_multiple", "> 1"]),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        validate_point(compose_config(override))
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.integration
def test_a_normalised_job_saves_the_folded_sae_and_logs_its_heldout_curve(tmp_path):
    """A job on planted activations (no LM) with the scaling and the mask on: the scaling factor is
    logged, the saved SAE reads raw activations (cfg.json records what was folded), and its held-out
    curve (reconstruction metrics only, no LM) is on the raw scale like the final eval."""
    import json

    from helpers.cli import run_cli
    from helpers.mlflow_store import store_client, store_runs

    out = tmp_path / "out"
    r = run_cli(
        out,
        "dataset=synthetic",
        "dataset.tokens=16384",
        "dataset.eval_tokens=2048",
        "train.tokens=16384",
        "trainer.batch_size=512",
        "sae.d_sae=128",
        "sae.k=4",
        "eval=core_only",
        "train.normalize_activations=expected_average_only_in",
        "train.max_activation_norm_multiple=10",
        "sweep.name=normalised",
        "tracking.system_metrics=false",
        cache=tmp_path / "cache",
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    client = store_client(out)
    (run,) = store_runs(out, "normalised", kind="job", client=client)
    assert run.info.status == "FINISHED"
    s = run.data.metrics["train/norm_scaling_factor"]
    assert s > 0 and s != 1.0
    saved = json.loads(next((out / "saes").glob("*/cfg.json")).read_text())
    assert saved["norm_scaling_factor"] == pytest.approx(s) and saved["normalize_activations"] == "none"
    assert saved["max_activation_norm_multiple"] == 10.0
    curve = client.get_metric_history(run.info.run_id, "heldout/explained_variance")
    assert sorted(m.step for m in curve) == [8, 16, 24, 32]
    final = run.data.metrics["recovery/reconstruction_quality/explained_variance"]
    # 32 steps: far from converged (measured 0.27), but on the final eval's scale, not the scaled one
    assert final > 0.1 and max(curve, key=lambda m: m.step).value == pytest.approx(final, abs=0.05)
