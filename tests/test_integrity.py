"""Every artifact the tool later trusts carries a checksum written with it and checked before use;
the data is checked against the budget before any work. Each test is an attack that once went
through unnoticed: changed checkpoints, SAE artifacts and LM weights, stale metrics shown as
current, raw errors for runs without artifacts, and budgets the data could never supply."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers.mlflow_store import tracker_at
from sae_sweep.training.loop import load_checkpoint, train
from sae_sweep.util.digests import SUMS_FILE, ChecksumMismatch, StatMemo, files_sha256, verify_recorded

# -- the mechanisms ------------------------------------------------------------------------------


def _overwrite_inside(path: Path, needle: bytes, keep_mtime: bool = True) -> None:
    """Overwrite 64 bytes where ``needle`` (bytes of a tensor) starts: same size, same mtime."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0, "tensor bytes not found in the file"
    data[at : at + 64] = bytes(b ^ 0x5A for b in data[at : at + 64])
    with open(path, "r+b") as fh:  # in place: the inode stays too
        fh.write(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.unit
def test_a_stat_memo_recomputes_only_when_size_mtime_or_inode_change(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    calls = []

    def digest(p):
        calls.append(p)
        return p.read_bytes()[:4].hex()

    memo = StatMemo(tmp_path / "memo.json")
    assert memo.get("w", f, digest) == memo.get("w", f, digest) and len(calls) == 1
    memo.save()
    assert StatMemo(tmp_path / "memo.json").get("w", f, digest) == "61616161" and len(calls) == 1  # persisted
    replaced = tmp_path / "new.bin"
    replaced.write_bytes(b"b" * 1000)  # same size, a new file renamed over the old one: new inode
    os.replace(replaced, f)
    assert StatMemo(tmp_path / "memo.json").get("w", f, digest) == "62626262" and len(calls) == 2
    # files_sha256 is this memo over sha256
    first = files_sha256([f], tmp_path / "m2.json")
    assert first == files_sha256([f], tmp_path / "m2.json") and len(first[str(f)]) == 64


@pytest.mark.unit
def test_a_recorded_checksum_refuses_changed_bytes_and_names_the_file(tmp_path):
    from sae_sweep.util.digests import write_with_sha256

    path = write_with_sha256(tmp_path / "x.bin", b"0123456789" * 100)
    assert verify_recorded(path)
    _overwrite_inside(path, b"0123456789" * 7)
    with pytest.raises(ChecksumMismatch, match=r"x\.bin \(run abc\) changed after it was written"):
        verify_recorded(path, "run abc")
    (tmp_path / SUMS_FILE).unlink()  # a file from before records: read as before (with a warning)
    assert verify_recorded(path) is False


# -- checkpoints ---------------------------------------------------------------------------------


def _reader_and_trainer():
    from sae_sweep.sae import get_trainer

    data = torch.randn(4000, 16, generator=torch.Generator().manual_seed(3))

    class Reader:
        def __init__(self):
            self.i = 0

        def __iter__(self):
            return self

        def __next__(self):
            x = data[(self.i * 32) % 3968 : (self.i * 32) % 3968 + 32]
            self.i += 1
            return x

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, s):
            self.i = s["i"]

    def trainer(steps):
        return get_trainer("topk")(16, {"d_sae": 64, "k": 4}, {"name": "topk", "lr": 1e-3}, steps, seed=0)

    return Reader, trainer


@pytest.mark.unit
def test_a_checkpoint_changed_inside_a_tensor_is_refused_and_the_previous_one_used(tmp_path):
    """64 bytes overwritten inside a tensor of latest.pt, size and mtime kept: torch.load reads it
    without a word (it does not check the zip CRCs). It is refused by its recorded sha256; the run
    resumes from previous.pt and ends bit-identical to an uninterrupted one, and says so."""
    from sae_sweep.training.loop import Interrupted

    Reader, trainer = _reader_and_trainer()
    full = trainer(30)
    train(full, Reader(), 30, progress=False)
    partial = trainer(30)
    with pytest.raises(Interrupted):
        train(
            partial,
            Reader(),
            30,
            tmp_path,
            checkpoint_every=10,
            progress=False,
            should_stop=lambda: partial.step_count >= 25,
        )  # checkpoints at 10, 20, then 25 on the stop
    latest = tmp_path / "latest.pt"
    w_dec = partial.sae.W_dec.detach().contiguous().numpy().tobytes()
    _overwrite_inside(latest, w_dec[256:320])
    state = load_checkpoint(tmp_path)
    assert state["step"] == 20, "a changed latest.pt must not be resumed from"
    assert "latest.pt" in state["fallback_from"] and "changed after it was written" in state["fallback_from"]
    resumed = trainer(30)
    result = train(resumed, Reader(), 30, tmp_path, checkpoint_every=10, progress=False)
    assert result.resumed_from_step == 20 and "changed after it was written" in result.checkpoint_fallback
    for name, p in full.sae.state_dict().items():
        assert torch.equal(p, resumed.sae.state_dict()[name]), name
    # the refused file is kept aside, with why; it never becomes previous.pt
    assert "changed after" in (tmp_path / "latest.pt.refused.txt").read_text()
    assert (tmp_path / "latest.pt.refused").exists()
    # the record follows the files through the saves after the resume
    sums = json.loads((tmp_path / SUMS_FILE).read_text())
    assert set(sums) == {"latest.pt", "previous.pt"} and all(len(v) == 1 for v in sums.values())
    assert verify_recorded(tmp_path / "latest.pt") and verify_recorded(tmp_path / "previous.pt")


# -- the SAE artifact ----------------------------------------------------------------------------


def _run_with_sae(tmp_path, status="FINISHED"):
    from sae_sweep.sae import get_sae_class

    tracker = tracker_at(tmp_path)
    tracker.client.create_experiment("integrity", artifact_location=str(tmp_path / "artifacts"))
    run = tracker.child("integrity", "run", f"key-{status}", None)
    sae = get_sae_class("topk")(16, 32, k=4)
    sae.save(tmp_path / "sae", {"model_name": "tiny", "hook_layer": 1})
    run.log_artifact_dir(tmp_path / "sae", "sae")
    if status == "FINISHED":
        run.close()
    elif status == "FAILED":
        run.close(RuntimeError("NaN loss at step 3"))
    elif status == "KILLED":
        run.close(KeyboardInterrupt())
    (stored,) = (tmp_path / "artifacts").rglob("sae/sae.safetensors")
    return tracker, run.run_id, sae, stored


@pytest.mark.unit
def test_export_refuses_a_changed_sae_artifact_naming_the_file_and_the_run(tmp_path, capsys):
    from sae_sweep.cli.export import main as export_main

    tracker, run_id, sae, stored = _run_with_sae(tmp_path)
    assert export_main([run_id, str(tmp_path / "ok"), "--tracking-uri", tracker.uri]) == 0
    _overwrite_inside(stored, sae.W_enc.detach().contiguous().numpy().tobytes()[64:128])
    assert export_main([run_id, str(tmp_path / "bad"), "--tracking-uri", tracker.uri]) == 1
    err = capsys.readouterr().err
    assert "sae.safetensors" in err and run_id in err and "changed after it was written" in err, err
    assert not (tmp_path / "bad" / "sae_weights.safetensors").exists()


@pytest.mark.unit
def test_evaluate_refuses_a_changed_sae_artifact_naming_the_file_and_the_run(tmp_path, capsys):
    from omegaconf import OmegaConf

    from helpers.config import compose_config
    from sae_sweep.cli import evaluate

    tracker, run_id, sae, stored = _run_with_sae(tmp_path)
    cfg = compose_config("dataset=synthetic", f"paths.output_dir={tmp_path / 'out'}")
    tracker.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
    _overwrite_inside(stored, sae.W_enc.detach().contiguous().numpy().tobytes()[64:128])
    assert evaluate.main([run_id, "--tracking-uri", tracker.uri]) == 2
    err = capsys.readouterr().err
    assert "refusing to evaluate run " + run_id in err and "sae.safetensors" in err, err
    assert "changed after it was written" in err
    assert tracker.get_run(run_id).info.status == "FINISHED"  # refused: nothing logged, nothing changed
    assert "evaluate.last" not in tracker.get_run(run_id).data.tags


@pytest.mark.unit
def test_evaluate_refuses_a_changed_config_artifact(tmp_path, capsys):
    """The run's config/config.yaml (what evaluate rebuilds the evals from) carries its sha256 in
    the tag sha256/config/config.yaml, logged with it; a changed one is refused."""
    from omegaconf import OmegaConf

    from helpers.config import compose_config
    from sae_sweep.cli import evaluate

    tracker, run_id, _, stored = _run_with_sae(tmp_path)
    cfg = compose_config("dataset=synthetic", f"paths.output_dir={tmp_path / 'out'}")
    tracker.log_checked_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
    (config,) = (tmp_path / "artifacts").rglob("config/config.yaml")
    config.write_text(config.read_text().replace("seed: 42", "seed: 43"))
    assert evaluate.main([run_id, "--tracking-uri", tracker.uri]) == 2
    err = capsys.readouterr().err
    assert f"artifact config/config.yaml of run {run_id} changed after it was logged" in err, err


# -- runs without a trained SAE: the reason, not "Failed to download artifacts" --------------------


@pytest.mark.parametrize("status", ["FAILED", "RUNNING", "KILLED", "deleted"])
@pytest.mark.unit
def test_export_and_evaluate_name_the_run_status_and_what_is_missing(tmp_path, capsys, status):
    from sae_sweep.cli import evaluate
    from sae_sweep.cli.export import main as export_main

    tracker, run_id, _, stored = _run_with_sae(tmp_path, "FINISHED" if status == "deleted" else status)
    if status == "deleted":
        shutil.rmtree(stored.parent)
        needles = [f"run {run_id} (FINISHED) lacks artifact(s)", "(deleted from the artifact store?)"]
    else:
        needles = [f"run {run_id} is {status}"] + (["NaN loss at step 3"] if status == "FAILED" else [])
    assert export_main([run_id, str(tmp_path / "x"), "--tracking-uri", tracker.uri]) == 1
    assert evaluate.main([run_id, "--tracking-uri", tracker.uri]) == 2
    err = capsys.readouterr().err
    assert "Failed to download" not in err
    for n in needles:
        assert err.count(n) >= 2, (n, err)  # both commands say it


# -- the LM weights ------------------------------------------------------------------------------


@pytest.mark.integration
def test_changed_lm_weights_give_a_new_activation_cache_key(tiny_cache_dir, tmp_path):
    """One MLP weight of the tiny model scaled by 5: its build_info.json still says the old hash,
    but the model's identity comes from the weight files, so the cache key changes (the old cache
    is not reused for other weights) and comes back with the original bytes."""
    from safetensors.torch import load_file, save_file

    from helpers.config import compose_config
    from sae_sweep import config as C
    from sae_sweep.activations.cache import cache_key
    from sae_sweep.job.execute import cache_spec
    from sae_sweep.models.lm import WEIGHTS_MEMO, load_lm
    from sae_sweep.models.weights.builtin import tiny_model_dir

    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_dir(tiny_cache_dir), tiny_model_dir(cache))  # never touch the shared model
    cfg = compose_config(f"paths.cache_dir={cache}", f"paths.output_dir={tmp_path / 'out'}")

    def key():
        lm = load_lm(cfg.model, C.cache_dir(cfg), "cpu")
        return cache_key(cache_spec(cfg, lm, torch.device("cpu"))), lm.fingerprint["weights_sha256"]

    before, digest = key()
    weights = tiny_model_dir(cache) / "model.safetensors"
    original = weights.read_bytes()
    info = (tiny_model_dir(cache) / "build_info.json").read_text()
    state = load_file(str(weights))
    name = next(k for k in state if "mlp" in k and k.endswith("weight"))
    state[name] = state[name] * 5
    save_file(state, str(weights), metadata={"format": "pt"})
    after, changed = key()
    assert after != before and changed != digest
    assert (tiny_model_dir(cache) / "build_info.json").read_text() == info  # the record did not move
    weights.write_bytes(original)
    assert key() == (before, digest)
    memo = json.loads((cache / "models" / WEIGHTS_MEMO).read_text())
    assert str(weights.resolve()) in memo


@pytest.mark.unit
def test_a_checkpoint_of_another_cache_is_not_resumed(tmp_path):
    """Checkpoints are keyed by run key, which names the model but not its weights' bytes: after
    the weights change, a rerun reads a new cache (new key) and must not continue the old run's
    position over it. The reader's state names the cache it read; resuming it elsewhere is refused."""
    from sae_sweep.activations.cache import get_or_build
    from sae_sweep.activations.reader import BlockReader, DiskBlocks, ShuffledReader

    def cache(weights):
        def build():
            g = torch.Generator().manual_seed(0)
            yield torch.ones(64, 16, dtype=torch.long), torch.randn(64, 16, 8, generator=g)

        return get_or_build({"model": {"weights_sha256": weights}}, tmp_path, build, special_token_ids=[])[0]

    old, new = cache("aaaa"), cache("bbbb")
    for make in (lambda c: ShuffledReader(c, 32, 0), lambda c: BlockReader(DiskBlocks(c, 256), 32, 0)):
        reader = make(old)
        next(iter(reader))
        state = reader.state_dict()
        make(old).load_state_dict(state)  # the same cache: resumes
        with pytest.raises(ValueError, match=f"saved reading activation cache {old.key}.*reads {new.key}"):
            make(new).load_state_dict(state)
        reader.close()


# -- metrics a re-evaluation could not give ------------------------------------------------------


@pytest.mark.integration
def test_evaluate_that_gives_non_finite_values_marks_the_old_ones_stale(tmp_path, corpus, session_cache_dir, capsys):
    """`evaluate` on an SAE whose outputs are NaN: the run's earlier core metrics are not left on
    display as current. Each reads NaN now (its old value kept in the history), the tag lists them
    with their old values, and the command exits 1."""
    from omegaconf import OmegaConf

    from helpers.config import compose_config
    from helpers.models import build_family_dir
    from sae_sweep.cli import evaluate
    from sae_sweep.sae import get_sae_class

    model_dir = build_family_dir("gpt2", tmp_path, corpus[:200])
    cfg = compose_config(
        f"model.hf_id={model_dir}",
        "model.name=local",
        "model.d_model=64",
        "model.n_layers=2",
        "layer=1",
        "dataset.eval_tokens=512",
        "dataset.context_size=32",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.cache_dir={session_cache_dir}",
        "device=cpu",
        "eval.run=[core]",
    )
    tracker = tracker_at(tmp_path)
    tracker.client.create_experiment("stale", artifact_location=str(tmp_path / "artifacts"))
    run = tracker.child("stale", "run", "key-stale", None)
    tracker.log_text(run.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
    sae = get_sae_class("topk")(64, 128, k=4)
    sae.save(tmp_path / "sae", {"model_name": "local", "hook_layer": 1})
    run.log_artifact_dir(tmp_path / "sae", "sae")
    run.close()
    assert evaluate.main([run.run_id, "--tracking-uri", tracker.uri]) == 0
    good = tracker.get_run(run.run_id).data.metrics
    key = "core/reconstruction_quality/explained_variance"
    assert key in good and good[key] == good[key]
    with torch.no_grad():
        sae.b_dec.fill_(float("nan"))  # a new SAE saved as the run's artifact (checksums and all)
    sae.save(tmp_path / "sae_nan", {"model_name": "local", "hook_layer": 1})
    run.log_artifact_dir(tmp_path / "sae_nan", "sae")
    assert evaluate.main([run.run_id, "--tracking-uri", tracker.uri]) == 1
    assert "no finite value" in capsys.readouterr().err
    after = tracker.get_run(run.run_id)
    assert after.info.status == "FINISHED"
    assert after.data.metrics[key] != after.data.metrics[key]  # NaN is what is shown now
    assert f"{key} (was {good[key]:.6g})" in after.data.tags[evaluate.STALE_TAG]
    assert good[key] in [v for _, v in tracker.metric_history(run.run_id, key)]  # the old value kept


# -- data that cannot supply the budget: refused before the work -------------------------------------


@pytest.mark.integration
def test_local_text_far_smaller_than_the_budget_is_refused_before_any_point_starts(tmp_path):
    """A text file of ~30 kB for the tiny preset's 52,500-token cache (200k training tokens over 4
    passes): every point used to fail after 37 s with a raw NotEnoughText. Now validation refuses
    the sweep before any point starts, with the counts."""
    from helpers.cli import run_cli
    from helpers.mlflow_store import store_runs

    f = tmp_path / "small.txt"
    f.write_text("".join(f"line {i}: a short sentence of plain text for the tiny corpus\n" for i in range(500)))
    r = run_cli(
        tmp_path / "out",
        "-m",
        "dataset=local",
        f"dataset.data_files=[{f}]",
        "dataset.eval_tokens=512",
        "sweep.name=small",
        "seed=7,8",
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and str(f) in r.stderr
    for needle in ("document(s)", "bytes of text: at most", "needs 52500 tokens", "train.epochs=4"):
        assert needle in r.stderr, (needle, r.stderr[-3000:])
    assert store_runs(tmp_path / "out", "small") == []  # no point started, no run opened


@pytest.mark.integration
def test_a_budget_that_must_repeat_data_is_refused_before_the_cache_is_built(tmp_path, fresh_cache):
    """Windows of 16 tokens: one BOS in 16 positions (6 %) plus the EOS separators are more than
    the 5 % margin a derived cache budget adds, so the tiny preset's 4 passes are not enough. The
    job used to find out after building the cache; now it counts those positions in the token
    windows and refuses before any activation is computed."""
    from helpers.cli import run_cli
    from helpers.mlflow_store import store_runs

    cache = fresh_cache(tmp_path)
    r = run_cli(tmp_path / "out", "dataset.context_size=16", "sweep.name=passes", "seed=3", cache=cache)
    assert r.returncode != 0
    (run,) = store_runs(tmp_path / "out", "passes", "job")
    error = run.data.tags["error"]
    assert run.info.status == "FAILED" and "usable tokens (after BOS/EOS)" in error, error
    assert "train.epochs=4" in error and "refused before building the activation cache" in error
    assert not list((cache / "activations").glob("*/manifest.json")), "no activation cache was to be built"
