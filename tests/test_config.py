"""Bad configs fail before anything runs, with the key, the value and what is allowed."""

import pytest

from helpers.cli import run_cli
from helpers.config import compose_config
from sae_sweep import config as C
from sae_sweep.job.app import validate_point


def _errors(*overrides) -> str:
    cfg = compose_config(*overrides)
    with pytest.raises(C.ConfigError) as e:
        validate_point(cfg)
    return str(e.value)


@pytest.mark.unit
def test_defaults_are_valid():
    cfg = compose_config()
    validate_point(cfg)
    assert cfg.model.name == "tiny" and cfg.trainer.name == "topk"


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["sae.k=0"], ["sae.k=0", "0 < k < d_sae (512)"]),
        (["sae.k=512"], ["sae.k=512", "0 < k < d_sae (512)"]),
        (["layer=4"], ["layer=4", "allowed values are 0..3"]),
        (["seed=99999999999999999999"], ["seed=99999999999999999999", "out of range", "[0, 2**63)"]),
        (["seed=-1"], ["seed=-1", "[0, 2**63)"]),
        (["layer=-1"], ["layer=-1", "0..3"]),
        (["hook=resid_mid"], ["hook='resid_mid'", "resid_pre, resid_post, mlp_out, attn_out"]),
        (["train.tokens=0"], ["train.tokens=0", "positive integer"]),
        (["dataset.tokens=-5"], ["dataset.tokens=-5", "positive integer"]),
        (["dataset.context_size=1"], ["dataset.context_size=1", ">= 2"]),
        (["sae.d_sae=64", "sae.k=64"], ["sae.k=64", "d_sae (64)"]),
        (["device=tpu"], ["device='tpu'", "auto, cpu, cuda"]),
        (["trainer.lr=-1"], ["trainer.lr"]),
        (
            ["dataset=faithful", "dataset.generation.sampler=fast"],
            ["dataset.generation.sampler", "fast", "hf, exact_topk_first"],
        ),
        (["dataset=faithful", "dataset.generation.temperature=0"], ["dataset.generation.temperature", "> 0"]),
        (["tracking.system_metrics_interval_s=0"], ["tracking.system_metrics_interval_s=0", "a number of seconds > 0"]),
        (
            ["tracking.system_metrics_interval_s=-2.5"],
            ["tracking.system_metrics_interval_s=-2.5", "a number of seconds > 0"],
        ),
    ],
)
@pytest.mark.unit
def test_invalid_values_name_key_value_and_allowed(overrides, needles):
    msg = _errors(*overrides)
    for n in needles:
        assert n in msg, msg


@pytest.mark.unit
def test_all_problems_reported_at_once():
    msg = _errors("sae.k=0", "layer=9", "hook=x")
    assert "sae.k=0" in msg and "layer=9" in msg and "hook='x'" in msg


@pytest.mark.unit
def test_unknown_option_lists_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as e:
        compose_config("model=nope")
    assert "tiny" in str(e.value)  # Hydra lists the available options


@pytest.mark.unit
def test_unknown_key_rejected_by_schema():
    from hydra.errors import ConfigCompositionException as HCE

    with pytest.raises(HCE):
        compose_config("sae.kk=3")


@pytest.mark.unit
def test_system_metrics_interval_must_be_a_number():
    from hydra.errors import ConfigCompositionException as HCE

    with pytest.raises(HCE) as e:  # the schema's float type, at compose time
        compose_config("tracking.system_metrics_interval_s=often")
    assert "system_metrics_interval_s" in str(e.value) and "often" in str(e.value)


@pytest.mark.unit
def test_run_key_ignores_paths_and_tracking_but_not_seed():
    a = compose_config()
    b = compose_config(
        "paths.output_dir=/elsewhere",
        "tracking.uri=sqlite:////x.db",
        "train.log_every=3",
        "dataset.how_to_get='a reworded hint'",
        "tracking.system_metrics=false",
        "tracking.system_metrics_interval_s=0.5",
    )
    c = compose_config("seed=49")
    assert C.run_key(a) == C.run_key(b)
    assert C.run_key(a) != C.run_key(c)
    assert C.seed_group_key(a) == C.seed_group_key(c)


@pytest.mark.unit
def test_the_cache_settings_that_change_the_batches_are_in_the_run_key_and_only_those():
    """A stream, another reader, storage dtype or block size trains on other batches: another run,
    never "already FINISHED" as the disk run (that hid a stream run behind a disk run's key)."""
    base = compose_config()
    for other in ("cache.mode=stream", "cache.reader=random", "cache.dtype=bfloat16", "cache.block_tokens=65536"):
        assert C.run_key(compose_config(other)) != C.run_key(base), other
    # settings a mode does not read do not split runs
    assert C.run_key(compose_config("cache.reader=random")) == C.run_key(
        compose_config("cache.reader=random", "cache.block_tokens=65536")
    )
    stream = compose_config("cache.mode=stream")
    assert C.run_key(stream) == C.run_key(
        compose_config("cache.mode=stream", "cache.reader=random", "cache.dtype=bfloat16")
    )
    assert C.run_key(stream) != C.run_key(compose_config("cache.mode=stream", "cache.block_tokens=65536"))
    assert C.run_identity(stream)["batches"] == {"mode": "stream", "block_tokens": 131072}
    # the cache verification policy changes nothing trained
    assert C.run_key(compose_config("cache.verify=full")) == C.run_key(base)


@pytest.mark.unit
def test_generation_sampler_is_in_the_run_key_only_where_it_changes_the_text():
    """exact_topk_first draws other tokens than hf for the same seed (another random stream), so a
    faithful run's key follows it; at hf the key is the one of before the setting existed, and a
    dataset that generates nothing keeps its key whatever the sampler."""
    hf = compose_config("dataset=faithful", "dataset.generation.sampler=hf")
    fast = compose_config("dataset=faithful", "dataset.generation.sampler=exact_topk_first")
    assert C.run_key(hf) != C.run_key(fast)
    assert "sampler" not in C.run_identity(hf)["dataset"]["generation"]
    assert C.run_identity(fast)["dataset"]["generation"]["sampler"] == "exact_topk_first"
    assert C.stream_key(hf) != C.stream_key(fast) and C.seed_group_key(hf) != C.seed_group_key(fast)
    builtin = [compose_config("dataset=builtin", f"dataset.generation.sampler={s}") for s in C.GENERATION_SAMPLERS]
    assert C.run_key(builtin[0]) == C.run_key(builtin[1])
    assert "sampler" not in C.run_identity(builtin[1])["dataset"]["generation"]


def _cli(tmp_path, *args):
    """The CLI on tmp_path/out with an empty activation cache of its own."""
    return run_cli(tmp_path / "out", *args, cache=tmp_path / "cache", timeout=300)


@pytest.mark.integration
def test_multirun_with_one_invalid_point_runs_nothing(tmp_path):
    r = _cli(tmp_path, "-m", "sae.k=0,16")
    assert r.returncode != 0
    assert "grid point #0 [sae.k=0]" in r.stderr and "nothing was launched" in r.stderr
    assert not (tmp_path / "out" / "mlflow.db").exists()
    assert not (tmp_path / "cache" / "activations").exists()


@pytest.mark.integration
def test_offline_hub_dataset_fails_fast_with_local_files_hint(tmp_path):
    r = _cli(tmp_path, "-m", "dataset=fineweb")
    assert r.returncode != 0
    assert "HuggingFaceFW/fineweb" in r.stderr and "data_files" in r.stderr
    assert not (tmp_path / "out" / "mlflow.db").exists()


@pytest.mark.integration
def test_single_run_bad_value_exits_2_without_traceback(tmp_path):
    r = _cli(tmp_path, "layer=7")
    assert r.returncode == 2
    assert "layer=7" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "mlflow.db").exists()


@pytest.mark.unit
def test_a_real_model_config_that_would_repeat_data_is_refused_naming_the_keys():
    # gpt2 trains 100M tokens; a 1M-token cache would be cycled 100 times
    with pytest.raises(C.ConfigError) as e:
        validate_point(
            compose_config("model=gpt2", "dataset=builtin", "dataset.tokens=1000000"), check_availability=False
        )
    msg = str(e.value)
    assert "train.tokens=100000000" in msg and "dataset.tokens=1000000" in msg and "train.epochs=" in msg
    # by default the cache follows the training budget: every training token distinct
    cfg = compose_config("model=gpt2", "dataset=builtin")
    validate_point(cfg, check_availability=False)
    assert C.cache_tokens(cfg) >= cfg.train.tokens
    # repeating is allowed when asked for, and is part of the run's identity
    again = compose_config("model=gpt2", "dataset=builtin", "dataset.tokens=1000000", "train.epochs=100")
    validate_point(again, check_availability=False)
    assert C.run_key(again) != C.run_key(
        compose_config("model=gpt2", "dataset=builtin", "dataset.tokens=1000000", "train.epochs=200")
    )


@pytest.mark.unit
def test_whole_numbers_in_scientific_notation_are_read_as_integers():
    from sae_sweep.job.app import integral_numbers

    argv = integral_numbers(
        ["-m", "train.tokens=2e5", "dataset.tokens=1.5e5,3e5", "trainer.lr=3e-4", "sweep.name=a1e5"]
    )
    assert argv == ["-m", "train.tokens=200000", "dataset.tokens=150000,300000", "trainer.lr=3e-4", "sweep.name=a1e5"]
    cfg = compose_config(*integral_numbers(["train.tokens=2e5", "trainer.lr=3e-4"]))
    validate_point(cfg)
    assert cfg.train.tokens == 200_000 and cfg.trainer.lr == 3e-4


@pytest.mark.integration  # job_tags asks git for the commit
def test_job_tags_tolerate_hydra_values_a_run_does_not_have():
    """A single run has no hydra.job.num/id and a composed config no runtime.output_dir: the tags are
    empty there, never an exception (the job would fail before training)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from sae_sweep.job.app import CONF_DIR, job_tags

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    job = cfg.copy()
    with open_dict(job):
        job.pop("hydra")
    tags = job_tags(job, "k")
    assert (tags["hydra_job_num"], tags["hydra_job_id"], tags["hydra_output_dir"]) == ("", "", "")
    assert tags["model_weights"] == "auto" and tags["config_hash"] == "k"
