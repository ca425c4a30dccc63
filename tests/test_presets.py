"""Every preset composes into a valid job (as lightning-hydra-template checks its configs): each
option of every config group, with its launcher config, passes the job's own validation. A preset
that only composes on its author's machine, or a default that drifted from its schema, fails here."""

from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import OmegaConf, open_dict

from helpers.config import compose_config
from sae_sweep.config import ConfigError
from sae_sweep.job.app import CONF_DIR, validate_point

# Presets of models and datasets that live on the Hugging Face Hub cannot be loaded offline; they
# are checked for everything but availability (the offline message itself is tested elsewhere).
HUB_DATASETS = {"fineweb", "openwebtext", "pile-uncopyrighted"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def compose_job(*overrides: str):
    cfg = compose_config(*overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # the ${hydra:...} interpolations resolve as in a run
    return cfg


def job_view(cfg):
    job = cfg.copy()
    with open_dict(job):
        job.pop("hydra")
    return job


@pytest.mark.unit
def test_every_group_has_options():
    for group in ("model", "dataset", "trainer", "eval", "experiment", "hydra/launcher"):
        assert options(group), group


@pytest.mark.unit
@pytest.mark.parametrize("model", options("model"))
def test_model_presets(model):
    cfg = compose_job(f"model={model}")
    validate_point(job_view(cfg), check_availability=False)
    assert cfg.model.name == model and 0 <= cfg.layer < cfg.model.n_layers


# postgres_manual reads the PostgreSQL manual's HTML, a system package (`make test` installs it)
@pytest.mark.parametrize(
    "dataset",
    [
        pytest.param(d, marks=pytest.mark.integration if d == "postgres_manual" else pytest.mark.unit)
        for d in options("dataset")
    ],
)
def test_dataset_presets(dataset, tmp_path):
    extra = []
    if dataset == "local":  # needs its files: enough lines (documents) for both splits
        (tmp_path / "a.txt").write_text(
            "".join(f"document {i} says something about topic {i % 7}\n" for i in range(2000))
        )
        extra = [f"dataset.data_files=[{tmp_path / 'a.txt'}]", "dataset.eval_tokens=1024"]
    cfg = compose_job(f"dataset={dataset}", *extra)
    validate_point(job_view(cfg), check_availability=dataset not in HUB_DATASETS)


@pytest.mark.unit
@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_presets(trainer):
    validate_point(job_view(compose_job(f"trainer={trainer}")), check_availability=False)


@pytest.mark.unit
@pytest.mark.parametrize("preset", options("eval"))
def test_eval_presets(preset):
    cfg = compose_job(f"eval={preset}")
    validate_point(job_view(cfg), check_availability=False)
    assert set(cfg.eval.run) <= set(cfg.eval.keys())  # every eval that runs has its settings node


@pytest.mark.unit
@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_presets(experiment):
    cfg = compose_job(f"experiment={experiment}")
    validate_point(job_view(cfg), check_availability=False)
    # results land in an experiment of their own, named after the preset (runs of one write-up share one)
    assert cfg.sweep.name != "default" and experiment.startswith(cfg.sweep.name)


@pytest.mark.unit
@pytest.mark.parametrize("launcher", options("hydra/launcher"))
def test_launcher_presets(launcher):
    cfg = compose_job(f"hydra/launcher={launcher}")
    launcher_cls = get_class(cfg.hydra.launcher._target_)  # importable, and ours (gathers each job)
    assert launcher_cls.__module__ == "hydra_plugins.sae_sweep_sweeper.launchers"
    assert cfg.hydra.sweeper._target_.endswith("SaeSweepSweeper")
    assert OmegaConf.to_container(cfg.hydra.launcher, resolve=True)["timeout_min"] > 0


@pytest.mark.unit
def test_a_bad_value_in_any_group_is_one_kind_of_message():
    """A bad value in the job, a trainer or an eval: the same message shape (key=value: why; allowed)."""
    for override, key in (
        ("hook=mid", "hook='mid'"),
        ("trainer.lr=-1", "trainer.lr=-1.0"),
        ("eval.fake_features.token_pool=words", "eval.fake_features.token_pool='words'"),
        ("dataset.tokens=0", "dataset.tokens=0"),
    ):
        with pytest.raises(ConfigError) as e:
            validate_point(job_view(compose_job(override)), check_availability=False)
        (problem,) = e.value.problems
        assert problem.startswith(f"{key}: ") and "; allowed: " in problem, problem
