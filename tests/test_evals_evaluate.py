"""`python -m sae_sweep.evaluate` on a FINISHED run in a real MLflow sqlite store: the run's config
and SAE artifacts are loaded, a local (tiny, random) HF model stands in for the LM, and the new
eval metrics and SAEBench JSON land on the same run without changing its status."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from helpers.config import compose_config
from helpers.mlflow_store import tracker_at
from sae_sweep.cli import evaluate
from sae_sweep.sae import get_sae_class


def _local_model(path):
    words = (
        "the of and to a in is it for that this with as on be by are returns value object "
        "list string file module class function method argument default none true false"
    ).split()
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)] * 3, trainers.WordLevelTrainer(special_tokens=["<|endoftext|>", "<unk>"]))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(hf), n_positions=64, bos_token_id=0, eos_token_id=0)
    )
    model.save_pretrained(path)
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, session_cache_dir):
    tmp_path = tmp_path_factory.mktemp("evaluate")
    model_dir = _local_model(tmp_path / "model")
    cfg = compose_config(
        f"model.hf_id={model_dir}",
        "model.name=local",
        "model.d_model=32",
        "model.n_layers=2",
        "model.default_layer=1",
        "dataset.eval_tokens=512",
        "dataset.context_size=32",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.cache_dir={session_cache_dir}",
        "device=cpu",
        "eval.run=[core]",
    )
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    tracker = tracker_at(tmp_path)
    # an explicit artifact root: the sqlite store's default is ./mlruns in whatever the cwd is
    tracker.client.create_experiment("ev", artifact_location=str(tmp_path / "artifacts"))
    run = tracker.child("ev", "run", "key-1", None)
    tracker.log_text(run.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
    sae = get_sae_class("topk")(32, 64, k=4)
    sae.save(tmp_path / "sae", {"model_name": "local", "hook_layer": 1})
    run.log_artifact_dir(tmp_path / "sae", "sae")
    run.close()
    return tracker, run.run_id


@pytest.mark.integration
def test_evaluate_adds_metrics_to_finished_run(finished_run):
    tracker, run_id = finished_run
    rc = evaluate.main(
        [run_id, "eval.run=[fake_features]", "eval.fake_features.n_tokens=512", "--tracking-uri", tracker.uri]
    )
    assert rc == 0
    run = tracker.get_run(run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert 0.0 <= m["fake_features/fake_features/fake_feature_ratio"] <= 1.0
    assert run.data.tags["evaluate.evals"] == "fake_features"
    arts = [a.path for a in tracker.client.list_artifacts(run_id, "evals")]
    assert "evals/fake_features.json" in arts
    with tempfile.TemporaryDirectory() as d:
        doc = json.loads(tracker.download(run_id, "evals/fake_features.json", Path(d)).read_text())
    assert doc["eval_type_id"] == "fake_features" and doc["eval_config"]["n_tokens"] == 512


@pytest.mark.integration
def test_evaluate_refuses_training_overrides_and_unknown_evals(finished_run):
    tracker, run_id = finished_run
    assert evaluate.main([run_id, "sae.k=8", "--tracking-uri", tracker.uri]) == 2
    assert evaluate.main([run_id, "eval.run=[nope]", "--tracking-uri", tracker.uri]) == 2
    assert evaluate.main([run_id, "eval=nope", "--tracking-uri", tracker.uri]) == 2
    assert evaluate.main(["0123456789abcdef", "--tracking-uri", tracker.uri]) == 2


@pytest.mark.unit
def test_apply_overrides_loads_an_eval_preset():
    base = OmegaConf.create({"dataset": {"eval_tokens": 100, "context_size": 16}, "eval": {"run": ["core"]}})
    cfg = evaluate.apply_overrides(base, ["eval=full", "eval.absorption.max_words=50"])
    assert "absorption" in cfg.eval.run and cfg.eval.absorption.max_words == 50
    assert cfg.eval.core.n_tokens == 100  # the preset's interpolations resolve against the run's config
    assert base.eval.run == ["core"]  # the input is not modified
