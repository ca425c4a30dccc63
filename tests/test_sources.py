"""data/sources: the registry that ``dataset.kind`` names, ``dataset.revision`` for hub datasets, the
keys of the presets (unchanged by both), and a source registered from a module outside the package
running a real job with nothing in the package edited."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network in tests

import pytest
from hydra import compose, initialize_config_dir

from sae_sweep import config as C
from sae_sweep.data.sources import DatasetUnavailable, dataset_problems, source_for, source_kinds
from sae_sweep.data.text import dataset_fingerprint, dataset_source, token_windows, windows_key
from sae_sweep.job.app import CONF_DIR, validate_point

pytestmark = pytest.mark.integration  # runs jobs and reads the PostgreSQL manual

TESTS = Path(__file__).resolve().parent
SHA = "9b5a1c0e6f2d4b7a8c3e5f1d2a4b6c8e0f1a2b3c"


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=list(overrides))


def _problems(cfg):
    with pytest.raises(C.ConfigError) as err:
        validate_point(cfg)
    return err.value.problems


# The registry
def test_the_allowed_kinds_come_from_the_registry():
    assert source_kinds() == ["builtin", "faithful", "hub", "local", "synthetic"]
    (msg,) = _problems(_compose("dataset.kind=hubb"))
    assert msg.startswith(
        "dataset.kind='hubb': unknown kind (did you mean 'hub'?); allowed: builtin, faithful, hub, "
        "local, synthetic, or module:kind"
    )
    (msg,) = _problems(_compose("dataset.kind=no_such_module:docs"))
    assert "dataset.kind='no_such_module:docs': cannot import module 'no_such_module'" in msg
    (msg,) = _problems(_compose("dataset.kind=source_plugin:nothing"))
    assert msg == (
        "dataset.kind='source_plugin:nothing': module 'source_plugin' registers no text source 'nothing' "
        "(it registers: sections; @register_source(name) on a TextSource subclass)"
    )


def test_a_kind_is_registered_once():
    from sae_sweep.data.sources import TextSource, register_source

    with pytest.raises(
        ValueError,
        match=r"register_source\('hub'\): already registered by "
        r"sae_sweep.data.sources.hub.HubSource",
    ):
        register_source("hub")(type("HubSource", (TextSource,), {"__module__": "sae_sweep.data.sources.other"}))
    with pytest.raises(ValueError, match=r"'synthetic' is reserved"):
        register_source("synthetic")(type("Planted", (TextSource,), {"__module__": "sae_sweep.data.sources.other"}))


def test_settings_a_kind_needs_or_does_not_read():
    (msg,) = _problems(_compose("dataset=local"))
    assert msg.startswith("dataset.data_files is required for dataset=local")
    (msg,) = _problems(_compose("dataset=fineweb", "dataset.hf_id=null"))
    assert msg.startswith("dataset.hf_id: required for dataset.kind=hub")
    (msg,) = _problems(_compose("dataset=builtin", f"dataset.revision={SHA}"))
    assert msg == (
        f"dataset.revision='{SHA}': dataset.kind=builtin does not read it; allowed: null (a revision pins "
        f"datasets of kind hub)"
    )
    (msg,) = _problems(_compose("dataset=builtin", "+dataset.options.x=1"))
    assert msg == "dataset.options={'x': 1}: dataset.kind=builtin takes no options; allowed: {}"


# dataset.revision
def test_revision_is_a_schema_key_that_the_hub_source_reads(tmp_path):
    cfg = _compose("dataset=fineweb", f"dataset.revision={SHA}")
    assert cfg.dataset.revision == SHA and _compose("dataset=fineweb").dataset.revision is None
    fp = dataset_fingerprint(cfg.dataset)
    assert fp["revision"] == SHA and fp["hf_id"] == "HuggingFaceFW/fineweb"
    assert dataset_source(cfg.dataset) == (
        "hugging_face",
        {"path": "HuggingFaceFW/fineweb", "config_name": "sample-10BT", "split": "train", "revision": SHA},
    )
    # Pinned is another dataset than the newest: another run key, cache key and windows.
    unpinned = _compose("dataset=fineweb")
    assert C.run_key(cfg) != C.run_key(unpinned)
    assert C.run_identity(cfg)["dataset"]["revision"] == SHA and "revision" not in C.run_identity(unpinned)["dataset"]
    assert dataset_fingerprint(unpinned.dataset) != fp
    assert windows_key(cfg.dataset, None, "train", 1000) != windows_key(unpinned.dataset, None, "train", 1000)
    # A local mirror has no revisions.
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    (msg,) = _problems(_compose("dataset=fineweb", f"dataset.hf_id={tmp_path}", f"dataset.revision={SHA}"))
    assert (
        msg
        == f"dataset.revision='{SHA}': dataset.hf_id={tmp_path} is a local directory, which has no revisions; allowed: null"
    )


def test_a_pinned_hub_dataset_offline_fails_naming_the_dataset_and_revision(monkeypatch, tmp_path, tiny_lm):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _compose("dataset=fineweb", f"dataset.revision={SHA}")
    (msg,) = _problems(cfg)
    assert msg.startswith(
        f"dataset 'HuggingFaceFW/fineweb' at revision '{SHA}' is on the Hugging Face Hub and this machine is offline"
    )
    with pytest.raises(DatasetUnavailable, match=f"at revision '{SHA}'"):
        token_windows(cfg.dataset, tiny_lm, "train", 1000, tmp_path)


@pytest.mark.slow
def test_the_cli_takes_a_revision_and_fails_offline_only_for_the_hub(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_sweep",
            "dataset=fineweb",
            f"dataset.revision={SHA}",
            f"paths.output_dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert r.returncode == 2, r.stderr[-3000:]
    problems = [line for line in r.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and f"dataset 'HuggingFaceFW/fineweb' at revision '{SHA}'" in problems[0], r.stderr[
        -3000:
    ]
    assert "offline" in problems[0]


# Keys of the presets: these were computed by the code before the registry and the revision key.
# Configs that do not set a revision keep their run keys, stream keys and dataset fingerprints.
KEYS_BEFORE = {
    ("dataset=builtin",): ("6e60fd925e0ef0c3", "c3e8c6486b8267ff"),
    ("dataset=faithful",): ("13c438df9b42ee1c", "497c2d981a839d56"),
    ("dataset=fineweb",): ("2d8046bfae23d2fe", "574cf6007b71d27b"),
    ("dataset=openwebtext",): ("c05b273346ea70d5", "f91a19f40d66b570"),
    ("dataset=pile-uncopyrighted",): ("f48c6f8b20043d37", "12043f76db9192e8"),
    ("dataset=synthetic",): ("0285bb7d9d29047d", "e5b95e65e4d64020"),
    ("dataset=builtin", "cache.mode=stream"): ("470b38c50bd2e79f", "30a02d2161ee79e4"),
    ("model=gpt2", "dataset=fineweb"): ("cc1fe0b9573f351d", "80ab8947a31e2040"),
    ("experiment=faithful_vs_fineweb", "dataset=faithful"): ("13c438df9b42ee1c", "497c2d981a839d56"),
}
HUB_FINGERPRINTS_BEFORE = {
    "fineweb": "ffbd979713c594d8",
    "openwebtext": "f929585109382a42",
    "pile-uncopyrighted": "62bd0421e7d73a62",
}


@pytest.mark.parametrize("overrides", list(KEYS_BEFORE), ids=" ".join)
def test_run_and_stream_keys_of_the_presets_are_unchanged(overrides):
    cfg = _compose(*overrides)
    assert (C.run_key(cfg), C.stream_key(cfg)) == KEYS_BEFORE[overrides]


def test_hub_dataset_fingerprints_are_unchanged():
    for name, key in HUB_FINGERPRINTS_BEFORE.items():
        assert C.stable_hash(dataset_fingerprint(_compose(f"dataset={name}").dataset)) == key, name


# A source from a module of its own, one yaml, a real job
def _notes(path: Path, n: int = 900) -> None:
    words = ["river", "stone", "lantern", "orchard", "harbor", "meadow", "signal", "copper", "window", "garden"]
    verbs = ["carries", "shelters", "follows", "measures", "gathers", "lights", "crosses", "keeps"]
    lines = ["# Notes\n"]
    for i in range(n):
        a, b, v = words[i % 10], words[(i * 7 + 3) % 10], verbs[(i * 3) % 8]
        lines += [
            f"## Section {i}\n",
            f"The {a} {v} the {b} near house {i}, and the {b} {verbs[i % 8]} the {a} "
            f"again before evening number {i * 13 % 97}.\n",
            "\n",
        ]
    lines += ["## Short\n", "too short\n"]
    path.write_text("".join(lines))


def _plugin_conf(root: Path, notes: Path) -> Path:
    conf = root / "conf" / "dataset"
    conf.mkdir(parents=True)
    (conf / "notes.yaml").write_text(
        "# Markdown notes, one document per section, through a source registered by source_plugin.py\n"
        "name: notes\n"
        "kind: source_plugin:sections\n"
        "context_size: ${model.sae.context_size}\n"
        "options:\n"
        f"  path: {notes}\n"
        "  min_words: 6\n"
    )
    return conf.parent


def test_a_source_from_a_module_of_its_own(tmp_path, tiny_lm):
    notes = tmp_path / "notes.md"
    _notes(notes)
    ds = {"name": "notes", "kind": "source_plugin:sections", "context_size": 32, "options": {"path": str(notes)}}
    assert dataset_problems(ds) == []
    source = source_for(ds)
    assert type(source).__module__ == "source_plugin" and source.options.min_words == 5
    texts = list(source.texts(tmp_path))
    assert len(texts) == 900 and texts[0].startswith("The river carries the orchard near house 0")
    w = token_windows(ds, tiny_lm, "train", 32 * 10, tmp_path)
    assert w.shape == (10, 32) and (w[:, 0] == tiny_lm.bos_token_id).all()
    assert dataset_fingerprint(ds)["kind"] == "source_plugin:sections"
    assert dataset_problems({**ds, "options": {"path": str(notes), "min_words": 0}}) == [
        "dataset.options.min_words=0: out of range; allowed: a positive integer"
    ]
    assert dataset_problems({**ds, "options": {"paht": "x"}})[0].startswith(
        "dataset.options.paht: unknown setting (did you mean 'path'?); allowed: path, min_words"
    )
    assert source_for({**ds, "options": {"path": str(tmp_path / "none.md")}}).availability() == [
        f"dataset.options.path='{tmp_path / 'none.md'}': no such file"
    ]


@pytest.mark.slow
def test_a_job_on_a_source_registered_outside_the_package(tmp_path):
    """The kind lives in tests/source_plugin.py, the preset in a config directory of its own: the
    job imports the module by the name the yaml gives, and runs to FINISHED."""
    from mlflow.tracking import MlflowClient

    notes = tmp_path / "notes.md"
    _notes(notes)
    conf = _plugin_conf(tmp_path, notes)
    out = tmp_path / "out"
    args = [
        f"hydra.searchpath=[file://{conf}]",
        "dataset=notes",
        "dataset.context_size=32",
        "dataset.tokens=8192",
        "dataset.eval_tokens=512",
        "train.tokens=2560",
        "trainer.batch_size=256",
        "sae.expansion_factor=4",
        "sae.k=8",
        "eval=core_only",
        "sweep.name=plugin",
        f"paths.output_dir={out}",
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    r = subprocess.run(
        [sys.executable, "-m", "sae_sweep", *args], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
    )
    assert r.returncode == 0, r.stderr[-4000:]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("plugin").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["dataset"] == "notes"
    assert run.data.params["dataset.kind"] == "source_plugin:sections"
    assert run.data.metrics["core/reconstruction_quality/explained_variance"] > 0
    inputs = {i.dataset.name: json.loads(i.dataset.source) for i in run.inputs.dataset_inputs}
    assert inputs["notes"] == {"uri": str(notes)}
