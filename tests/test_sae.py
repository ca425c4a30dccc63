"""SAE modules, registry, validation, TopK trainer pieces (fast, CPU, fp32)."""

import dataclasses
import json

import pytest
import torch
from omegaconf import OmegaConf

from helpers.config import compose_config
from sae_sweep.activations.synthetic import PlantedDictionary
from sae_sweep.evals.recovery import recovery_metrics
from sae_sweep.sae import (
    SparseAutoencoder,
    TopKSAE,
    TopKTrainer,
    geometric_median,
    get_trainer,
    register_trainer,
    trainer_names,
)

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]

SAE_CFG = {"d_sae": None, "expansion_factor": 4, "k": 4}


def make_trainer(d_in=16, sae_cfg=SAE_CFG, total_steps=50, seed=0, **overrides):
    cfg = {"name": "topk", "lr": 1e-3, **overrides}
    return get_trainer("topk")(d_in, sae_cfg, cfg, total_steps, seed=seed)


def test_save_load_round_trip(tmp_path):
    sae = TopKSAE(16, 64, k=4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    meta = {
        "model_name": "tiny",
        "hook_name": "blocks.2.hook_resid_post",
        "hook_layer": 2,
        "context_size": 64,
        "dataset_path": "builtin",
        "k": 4,
    }
    sae.save(tmp_path, meta)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (tmp_path / "sae.safetensors").exists()
    for key, value in {
        "architecture": "topk",
        "d_in": 16,
        "d_sae": 64,
        "k": 4,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "tiny",
        "hook_name": "blocks.2.hook_resid_post",
        "hook_layer": 2,
        "context_size": 64,
        "dataset_path": "builtin",
        "normalize_activations": "none",
        "apply_b_dec_to_input": True,
        "activation_fn_kwargs": {"k": 4},
    }.items():
        assert cfg[key] == value, key
    loaded = SparseAutoencoder.load(tmp_path)
    assert type(loaded) is TopKSAE and loaded.k == 4
    for name, p in sae.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name
    x = torch.randn(8, 16)
    assert torch.equal(sae(x)[0], loaded(x)[0])


def test_save_rejects_contradicting_cfg(tmp_path):
    sae = TopKSAE(16, 64, k=4)
    with pytest.raises(ValueError, match="d_sae"):
        sae.save(tmp_path, {"d_sae": 32})


def test_param_shapes():
    sae = TopKSAE(16, 64, k=4)
    assert sae.W_enc.shape == (16, 64) and sae.W_dec.shape == (64, 16)
    assert sae.b_enc.shape == (64,) and sae.b_dec.shape == (16,)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_topk_exactly_k_nonzeros_and_sparse_decode_matches_dense():
    sae = TopKSAE(16, 128, k=5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 16)
    x_hat, f = sae(x)
    assert ((f != 0).sum(-1) == 5).all()
    assert (f >= 0).all()
    torch.testing.assert_close(f, sae.encode(x))
    torch.testing.assert_close(x_hat, sae.decode(f), rtol=1e-5, atol=1e-5)


def test_decoder_unit_norm_after_steps():
    t = make_trainer(lr=1e-2)
    x = torch.randn(32, 16) * 3
    t.init_from_data(x)
    for _ in range(10):
        t.step(x)
    torch.testing.assert_close(t.sae.W_dec.norm(dim=1), torch.ones(t.d_sae))


def test_step_returns_device_scalars():
    t = make_trainer()
    out = t.step(torch.randn(32, 16))
    assert set(out) == {"loss", "mse", "auxk", "l0", "explained_variance", "dead_frac"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in out.values())
    assert out["l0"].item() == 4


def test_auxk_zero_without_dead_and_positive_with_dead():
    t = make_trainer(dead_tokens=64)
    x = torch.randn(32, 16)
    vals, idx, pre = t.sae.encode_sparse(x)
    resid = x - t.sae.decode_sparse(vals, idx)
    none_dead = torch.zeros(t.d_sae, dtype=torch.bool)
    assert t.auxk_loss(resid, pre, none_dead).item() == 0.0
    some_dead = none_dead.clone()
    some_dead[: t.d_sae // 2] = True
    assert t.auxk_loss(resid, pre, some_dead).item() > 0.0
    # through step(): no latent can be dead yet -> auxk 0; force half dead -> auxk > 0 with grads
    assert t.step(x)["auxk"].item() == 0.0
    t.tokens_seen = 10_000
    t.tokens_since_fired[: t.d_sae // 2] = 10_000
    out = t.step(x)
    assert out["auxk"].item() > 0.0 and out["dead_frac"].item() > 0.0


def test_geometric_median_known_answers():
    # A point of multiplicity w is the median when the unit vectors to the others sum to <= w.
    c = torch.tensor([1.0, -2.0, 3.0])
    outliers = torch.tensor([[50.0, 0, 0], [0, 80.0, 0], [10.0, 10.0, 90.0]])
    pts = torch.cat([c.repeat(10, 1), outliers])
    torch.testing.assert_close(geometric_median(pts), c, atol=1e-4, rtol=0)
    # Symmetric cloud: the centre; robust where the mean is dragged away.
    g = torch.Generator().manual_seed(0)
    cloud = torch.randn(200, 8, generator=g)
    cloud = torch.cat([cloud, -cloud]) + 5.0
    torch.testing.assert_close(geometric_median(cloud), torch.full((8,), 5.0), atol=1e-3, rtol=0)
    # Minimiser check: sum of distances is lower than at the mean and at nearby points.
    x = torch.randn(300, 4, generator=g) ** 3
    m = geometric_median(x)

    def obj(y):
        return (x - y).norm(dim=1).sum()

    assert obj(m) <= obj(x.mean(0))
    for _ in range(20):
        assert obj(m) <= obj(m + 1e-2 * torch.randn(4, generator=g)) + 1e-4


def test_init_from_data_sets_b_dec():
    t = make_trainer()
    x = torch.randn(256, 16) + 7
    t.init_from_data(x)
    torch.testing.assert_close(t.sae.b_dec.detach(), geometric_median(x))
    assert t.data_initialized


def test_lr_schedule_warmup_and_decay():
    t = make_trainer(total_steps=100, warmup_steps=10, decay_start=0.8, lr=1.0)
    assert t.current_lr() == pytest.approx(0.1)  # the scheduler starts at the first multiplier
    lrs = [t.schedule(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[50] == pytest.approx(1.0) and lrs[79] == pytest.approx(1.0)
    assert lrs[90] == pytest.approx(0.5) and 0 < lrs[99] < 0.06


def test_registry():
    assert "topk" in trainer_names()
    assert get_trainer("topk") is TopKTrainer
    with pytest.raises(ValueError, match="topk"):
        get_trainer("nope")


def test_register_conflicting_name_fails():
    with pytest.raises(ValueError, match="already registered"):

        @register_trainer("topk")
        class Other(TopKTrainer):
            pass


def test_composed_trainer_node_is_the_params_dataclass():
    """conf/trainer/topk.yaml extends the dataclass's schema: the composed node has exactly its
    keys, the dataclass's defaults where the yaml is silent, and the model's values it interpolates."""
    node = compose_config("trainer=topk").trainer
    fields = {f.name for f in dataclasses.fields(TopKTrainer.params_cls)}
    assert set(node.keys()) == fields
    assert node.auxk_alpha == TopKTrainer.params_cls.auxk_alpha and node.lr == 1e-3  # default; tiny's lr
    assert TopKTrainer.problems(node, OmegaConf.create(SAE_CFG), d_in=128) == []
    t = TopKTrainer(128, OmegaConf.create(SAE_CFG), node, total_steps=10)
    assert t.params.dead_tokens == 50000 and t.params.auxk_alpha == pytest.approx(1 / 32)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"lr": -1.0}, "trainer.lr=-1.0"),
        ({"lr": "fast"}, "trainer.lr='fast'"),
        ({"decay_start": 1.5}, "trainer.decay_start=1.5"),
        ({"batch_size": 0}, "trainer.batch_size=0"),
        ({"autocast_bf16": "yes"}, "trainer.autocast_bf16='yes'"),
        ({"auxk_alpha": -0.1}, "trainer.auxk_alpha=-0.1"),
        ({"bogus": 1}, "trainer.bogus"),
    ],
)
def test_validation_messages_name_key_value_and_range(override, key):
    errors = TopKTrainer.problems({"name": "topk", **override}, SAE_CFG, 16)
    assert len(errors) == 1 and errors[0].startswith(key), errors
    assert "allowed" in errors[0]
    with pytest.raises(ValueError, match="invalid trainer"):
        make_trainer(**override)


def test_validation_sae_k():
    errors = TopKTrainer.problems({"name": "topk"}, {"d_sae": 32, "k": 64}, 16)
    assert errors == ["sae.k=64: must be an integer with 0 < k < d_sae (32)"]
    assert TopKTrainer.problems({"name": "topk"}, {"d_sae": None, "expansion_factor": 4, "k": 0}, 16)
    with pytest.raises(ValueError) as e:
        get_trainer("nope")
    assert str(e.value) == f"trainer.name='nope' is not a registered trainer; allowed: {', '.join(trainer_names())}"


def test_planted_dictionary_sampling():
    pd = PlantedDictionary(16, 64, seed=3)
    torch.testing.assert_close(pd.dictionary.norm(dim=1), torch.ones(64))
    x, codes = pd.sample(20000, l0=4, return_codes=True)
    assert x.shape == (20000, 16) and (codes >= 0).all()
    assert (codes > 0).sum(-1).float().mean().item() == pytest.approx(4, rel=0.05)
    torch.testing.assert_close(x, codes @ pd.dictionary)
    # correlated groups keep the marginal rate but make group members co-fire
    _, cc = pd.sample(20000, l0=4, correlated_groups=8, correlation=0.9, return_codes=True)
    on = (cc > 0).float()
    assert on.sum(-1).mean().item() == pytest.approx(4, rel=0.05)
    same_group = (on[:, 0] * on[:, 1]).mean() / (on[:, 0].mean() * on[:, 1].mean())
    assert same_group > 5  # independent features would give ~1
    assert PlantedDictionary(16, 64, seed=3).sample(5).equal(PlantedDictionary(16, 64, seed=3).sample(5))


def test_recovery_metrics_known_values():
    pd = PlantedDictionary(8, 4, seed=0)
    perfect = torch.cat([pd.dictionary[[2, 0, 3, 1]] * 3.0, torch.randn(4, 8)])
    m = recovery_metrics(perfect, pd)
    assert m["mean_max_cos"] == pytest.approx(1.0) and m["frac_recovered_0.9"] == 1.0
    eye = torch.eye(4)
    m = recovery_metrics(torch.stack([eye[0], eye[1]]), eye)  # recovers 2 of 4 exactly, 0 for the rest
    assert m["mean_max_cos"] == pytest.approx(0.5) and m["frac_recovered_0.9"] == 0.5


def test_sparse_decode_paths_agree_with_grads():
    from sae_sweep.sae import sparse_decode

    W = torch.randn(32, 4, dtype=torch.double, requires_grad=True)
    vals = torch.rand(3, 3, dtype=torch.double, requires_grad=True)
    idx = torch.stack([torch.randperm(32)[:3] for _ in range(3)])
    dense = torch.zeros(3, 32, dtype=torch.double).scatter(-1, idx, vals.detach()) @ W.detach()
    for dense_above in (1.0, 0.0):  # embedding_bag path, then dense scatter + matmul path

        def fn(v, w, dense_above=dense_above):
            return sparse_decode(v, idx, w, dense_above=dense_above)

        torch.testing.assert_close(fn(vals, W), dense)
        assert torch.autograd.gradcheck(fn, (vals, W))


def test_release_training_state_frees_gradients_and_adam_moments_and_keeps_the_sae():
    t = make_trainer(lr=1e-2)
    x = torch.randn(32, 16) * 3
    t.init_from_data(x)
    for _ in range(3):
        t.step(x)
    assert t.optimizer.state and all(p.grad is not None for p in t.sae.parameters())
    with torch.no_grad():
        before = t.sae.eval()(x)[0].clone()
    t.release_training_state()
    assert not t.optimizer.state and all(p.grad is None for p in t.sae.parameters())
    with torch.no_grad():
        assert torch.equal(t.sae(x)[0], before)
