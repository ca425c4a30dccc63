"""Metric declarations: the type, no drift between what the code logs and what it declares, the
report reading them, and docs/metrics.md being the generator's output.

The drift tests run every registered eval through the registry on small offline set-ups and flatten
its output as a job does (``flatten_metrics(output, prefix=name)``); the training loop and the
cross-seed hook run as in their own tests. Every key they produce must be declared, and every
declaration must be produced by some run here."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from sae_sweep.evals import eval_names, get_eval
from sae_sweep.evals.registry import EvalContext, check_eval_metrics
from sae_sweep.evals.schema import flatten_metrics
from sae_sweep.report import crossseed
from sae_sweep.report.data import HEADLINE, headline_specs, spec_for
from sae_sweep.report.metrics import declared_metrics, lookup, metric_groups
from sae_sweep.report.metrics_doc import COMMAND, render
from sae_sweep.training import loop
from sae_sweep.util.metrics import Metric, find_metric

pytestmark = pytest.mark.integration  # runs every eval on the trained tiny LM

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["asyncio", "email", "logging", "xml"]


def _m(key, label="x", better=None):
    return Metric(key, label, better, "unit", "meaning", "reference")


# The declaration type


def test_family_keys_match_their_members_only():
    m = _m("sparse_probing/sae/sae_top_{k}_test_accuracy", "SAE probe top-{k}", "higher")
    assert m.is_family and m.placeholders == ("k",) and m.direction == 1
    assert m.match("sparse_probing/sae/sae_top_20_test_accuracy") == {"k": "20"}
    assert m.label_for("sparse_probing/sae/sae_top_20_test_accuracy") == "SAE probe top-20"
    assert m.match("sparse_probing/sae/sae_top_x_test_accuracy") is None
    assert m.match("sparse_probing/sae/sae_test_accuracy") is None
    task = _m("downstream/{task}/sae_acc")
    assert task.match("downstream/stdlib_package/sae_acc") == {"task": "stdlib_package"}
    # the eval's own aggregate categories are never a task
    assert task.match("downstream/mean/sae_acc") is None and task.match("downstream/flags/sae_acc") is None
    plain = _m("core/sparsity/l0")
    assert plain.match("core/sparsity/l0") == {} and plain.direction == 0
    assert _m("a/b/c", better="lower").direction == -1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(key="a/b/c", better="up"), "better="),
        (dict(key="a/{nope}/c"), "unknown placeholder"),
        (dict(key="a/b/c", label="top-{k}"), "which the key does not have"),
        (dict(key="a/{k}/{k}"), "appears twice"),
        (dict(key="a/b/c", meaning=" "), "meaning must not be empty"),
    ],
)
def test_bad_declarations_fail_at_declaration(kwargs, message):
    args = dict(key="a/b/c", label="x", better=None, unit="u", meaning="m", reference="r") | kwargs
    with pytest.raises(ValueError, match=message):
        Metric(**args)


def test_find_metric_prefers_the_exact_key_and_refuses_ambiguous_families():
    exact, family = _m("x/mean/acc"), _m("x/{task}/acc")
    assert find_metric("x/mean/acc", [family, exact]) is exact
    assert find_metric("x/t1/acc", [family, exact]) is family
    assert find_metric("x/t1/other", [family, exact]) is None
    with pytest.raises(ValueError, match="several declared families"):
        find_metric("x/1/acc", [_m("x/{k}/acc"), _m("x/{n}/acc")])


def test_register_eval_checks_the_declared_keys():
    with pytest.raises(ValueError, match="declares no metrics"):
        check_eval_metrics("e", ())
    with pytest.raises(ValueError, match="must read 'e/<category>/<metric>'"):
        check_eval_metrics("e", [_m("other/cat/m")])
    with pytest.raises(ValueError, match="must read"):
        check_eval_metrics("e", [_m("e/m")])
    with pytest.raises(ValueError, match="declared twice"):
        check_eval_metrics("e", [_m("e/c/m"), _m("e/c/m")])
    assert len(check_eval_metrics("e", [_m("e/c/m"), _m("e/c/{k}")])) == 2


def test_catalogue_has_every_eval_training_and_crossseed():
    groups = {g.name: g for g in metric_groups()}
    assert set(groups) == set(eval_names()) | {"train", "crossseed", "heldout"}
    assert groups["core"].source == "sae_sweep.evals.core" and groups["train"].metrics == loop.METRICS
    keys = [m.key for m in declared_metrics()]
    assert len(keys) == len(set(keys))


# No drift: what the evals log is what they declare


def _tiny_sae(d_in, d_sae=256, k=8, seed=0):
    from sae_sweep.sae import get_sae_class

    torch.manual_seed(seed)
    return get_sae_class("topk")(d_in, d_sae, k=k).eval()


@pytest.fixture(scope="module")
def eval_keys(tiny_lm, tmp_path_factory):
    """eval name -> every key its run here produced (non-finite ones included: they are declared
    keys whose value was dropped before logging)."""
    from sae_sweep.activations.synthetic import PlantedDictionary
    from test_evals_absorption import _planted_lm, _ReLUSAE

    cache = str(tmp_path_factory.mktemp("metrics_cache"))
    d = tiny_lm.d_model
    sae = _tiny_sae(d)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, len(tiny_lm.tokenizer), (4, 32), generator=g)
    tokens[:, 0] = tiny_lm.bos_token_id
    probing = {"context_size": 32, "max_examples": 150, "packages": PACKAGES, "batch_size": 32}
    # scr_metric_threshold_{n} is logged only when the biased probe's clean accuracies on the class and on
    # the spurious data differ: these sizes give that on the stdlib pair (smaller ones can tie)
    scr_tpp = {
        "dataset_names": ["stdlib"],
        "train_set_size": 160,
        "test_set_size": 80,
        "context_size": 32,
        "probe_epochs": 10,
        "probe_lr": 1e-2,
        "n_values": [2, 8],
        "packages": PACKAGES,
        "stdlib_pairs": [["asyncio", "email"]],
    }
    lm_ctx = dict(
        lm=tiny_lm, sae=sae, tokens=tokens, layer=1, hook="resid_post", seed=0, cache_dir=cache, progress=False
    )
    planted = PlantedDictionary(32, 64, seed=0)
    abs_lm, dirs = _planted_lm(n_per_letter=16, d=64, signal=5.0)
    contexts = {
        "core": EvalContext(**lm_ctx, settings={"batch_size": 2}),
        "fake_features": EvalContext(**lm_ctx, settings={"n_tokens": 512, "context_size": 16}),
        "sparse_probing": EvalContext(
            **lm_ctx,
            settings={
                **probing,
                "datasets": ["stdlib_package"],
                "k_values": [1, 2],
                "probe_train_set_size": 80,
                "probe_test_set_size": 40,
                "full_probe_epochs": 20,
            },
        ),
        "downstream": EvalContext(
            **lm_ctx, settings={**probing, "dataset_limit": 60, "max_length": 32, "tasks": ["stdlib_package"]}
        ),
        "downstream_standardised": EvalContext(**lm_ctx, settings={**probing, "tasks": ["stdlib_package"]}),
        "scr": EvalContext(**lm_ctx, settings=scr_tpp),
        "dashboards": EvalContext(**lm_ctx, settings={"n_frequent": 2, "n_random": 2}),
        "tpp": EvalContext(**lm_ctx, settings=scr_tpp),
        # the known-answer absorption set-up of test_evals_absorption (letters the LM represents linearly)
        "absorption": EvalContext(
            lm=abs_lm,
            sae=_ReLUSAE(dirs),
            tokens=None,
            layer=0,
            hook="resid_post",
            seed=0,
            progress=False,
            settings={
                "min_feats_for_eval": 20,
                "n_icl_examples": 3,
                "max_k_value": 4,
                "gt_probe_batch_size": 16,
                "k_sparse_probe_batch_size": 32,
            },
        ),
        "recovery": EvalContext(
            lm=None,
            sae=_tiny_sae(32, 64, 4),
            tokens=None,
            layer=0,
            hook="resid_post",
            seed=0,
            settings={},
            activations=planted.sample(512, l0=4),
            planted=planted,
        ),
    }
    assert set(contexts) == set(eval_names()), "a new eval needs a set-up here that makes it log its metrics"
    out = {}
    for name, ctx in contexts.items():
        with torch.no_grad():
            output = get_eval(name).run(ctx)
        assert output.status != "skipped", f"{name}: {output.skip_reason}"
        flat = flatten_metrics(output, prefix=name)
        out[name] = set(flat) | set(flat.dropped)
    # on a bf16 LM the core eval also logs the float64 twins (<name>_fp32) of SAEBench's per-token names
    lm16 = copy.deepcopy(tiny_lm)
    lm16.model.to(torch.bfloat16)
    with torch.no_grad():
        flat = flatten_metrics(get_eval("core").run(EvalContext(**{**lm_ctx, "lm": lm16})), prefix="core")
    out["core"] |= set(flat) | set(flat.dropped)
    return out


@pytest.mark.parametrize("name", eval_names())
def test_every_logged_eval_metric_is_declared_and_every_declaration_logged(eval_keys, name):
    declared = get_eval(name).metrics
    keys = eval_keys[name]
    undeclared = sorted(k for k in keys if find_metric(k, declared) is None)
    assert not undeclared, f"eval {name!r} logs metrics it does not declare (add them to its METRICS): {undeclared}"
    produced = {find_metric(k, declared).key for k in keys}
    never = sorted(m.key for m in declared if m.key not in produced)
    assert not never, f"eval {name!r} declares metrics its run did not log: {never}"
    # each logged key is found through the catalogue the report reads, under the same declaration
    assert all(lookup(k) is find_metric(k, declared) for k in keys)


def test_training_loop_metrics_are_declared():
    from sae_sweep.sae import get_trainer
    from sae_sweep.training.loop import train

    trainer = get_trainer("topk")(
        16, {"d_sae": 64, "k": 4}, {"name": "topk", "lr": 1e-3, "warmup_steps": 2}, 12, seed=0
    )
    data = torch.randn(12 * 32, 16, generator=torch.Generator().manual_seed(0))
    batches = iter(data.split(32))

    class Reader:
        def __next__(self):
            return next(batches)

        def __iter__(self):
            return self

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    logs = []
    train(trainer, Reader(), 12, log_every=5, on_log=lambda step, m: logs.append(m), progress=False)
    parts = set(trainer.compute_loss(data[:32].to(trainer.device)).parts)  # the variant's own loss terms
    logged = {f"train/{k}" for m in logs for k in m}  # as the job logs them
    # logged only when train.normalize_activations is on (tests/test_normalize.py reads it back)
    conditional = {"train/norm_scaling_factor"}
    declared = {m.key for m in loop.METRICS}
    assert logged - {f"train/{p}" for p in parts} == declared - conditional


def test_crossseed_metrics_are_declared(tmp_path, monkeypatch):
    from sae_sweep.sae import get_sae_class
    from sae_sweep.tracking.runs import Tracker

    monkeypatch.chdir(tmp_path)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.start_parent("xs", "sweep", {"sweep_name": "xs"})
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 16, generator=g)
    ids = []
    for seed, dec in ((42, w), (49, w[torch.randperm(64, generator=g)])):
        sae = get_sae_class("topk")(16, 64, k=4)
        with torch.no_grad():
            sae.W_dec.copy_(torch.nn.functional.normalize(dec, dim=-1))
        sae.save(tmp_path / f"sae{seed}", {"model_name": "test"})
        run = tracker.child("xs", f"s{seed}", f"key-{seed}", parent)
        run.set_tags({"seed_group": "abcdef0123456789", "seed": seed})
        run.log_artifact_dir(tmp_path / f"sae{seed}", "sae")
        run.close()
        ids.append(run.run_id)
    crossseed.crossseed_hook(tracker, parent, [], [{"run_id": i} for i in ids], tmp_path)
    crossseed.compare_runs(tracker, ids[0], ids[1])
    keys = {k for rid in (parent, *ids) for k in tracker.get_run(rid).data.metrics}
    assert keys, "the hook logged nothing"
    undeclared = sorted(k for k in keys if find_metric(k, crossseed.METRICS) is None)
    assert not undeclared, f"crossseed logs undeclared metrics: {undeclared}"
    produced = {find_metric(k, crossseed.METRICS).key for k in keys}
    assert not sorted(m.key for m in crossseed.METRICS if m.key not in produced)


# The report reads the declarations


def test_report_takes_label_direction_and_unit_from_the_declarations():
    declared = {m.key for m in declared_metrics()}
    assert not [key for key in HEADLINE if key not in declared], "every headline metric is a declared key"
    spec = spec_for("absorption/mean/mean_absorption_fraction_score")
    m = lookup("absorption/mean/mean_absorption_fraction_score")
    assert (spec.label, spec.direction, spec.unit) == (m.label, -1, m.unit)
    assert spec_for("sparse_probing/sae/sae_top_5_test_accuracy").label == "SAE probe top-5"
    # neither way is better: no direction, whatever the name suggests
    assert spec_for("core/shrinkage/relative_reconstruction_bias").direction == 0
    assert spec_for("sparse_probing/llm/llm_top_1_test_accuracy").direction == 0
    # undeclared keys: shown by name, never guessed
    assert spec_for("some/new/accuracy_score") == type(spec)(
        "some/new/accuracy_score", "some/new/accuracy_score", 0, ""
    )
    keys = [
        "sparse_probing/sae/sae_top_20_test_accuracy",
        "sparse_probing/sae/sae_top_5_test_accuracy",
        "core/sparsity/l0",
        "downstream/mean/sae_acc",
        "downstream/stdlib_package/sae_acc",
    ]
    assert [s.key for s in headline_specs(keys)] == [
        "core/sparsity/l0",
        "sparse_probing/sae/sae_top_5_test_accuracy",
        "sparse_probing/sae/sae_top_20_test_accuracy",
        "downstream/mean/sae_acc",
    ]


def test_report_defines_its_headline_metrics_from_the_declarations(tmp_path, monkeypatch):
    from sae_sweep.report import build_report
    from sae_sweep.tracking.runs import Tracker
    from test_report import EV, L0, make_sweep

    monkeypatch.chdir(tmp_path)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, _ = make_sweep(tracker, "defs", full=False, failed=False)
    md = build_report(tracker, parent, tmp_path / "report", log_to_mlflow=False).markdown.read_text()
    section = md.split("## Metric definitions", 1)[1].split("\n## ", 1)[0]
    ev, l0 = lookup(EV), lookup(L0)
    assert f"| {ev.label} | `{EV}` | higher | {ev.unit} | {ev.meaning.replace('|', chr(92) + '|')} |" in section
    assert f"| {l0.label} | `{L0}` | — | {l0.unit} |" in section
    assert "absorption" not in section  # only the headline metrics the runs have


# docs/metrics.md


def test_committed_metrics_page_is_the_generated_one():
    page = ROOT / "docs" / "metrics.md"
    expected = render()
    assert page.exists() and page.read_text() == expected, (
        f"docs/metrics.md is not what the metric declarations give: regenerate it with `make metrics-doc` ({COMMAND})"
    )
    lines = expected.splitlines()
    assert lines[0] == "# Metrics" and sum(line.startswith("# ") for line in lines) == 1
    assert "generated" in expected.split("\n\n")[1]
    for m in declared_metrics():
        assert f"| `{m.key}` |" in expected
    for table in expected.split("| key | label | better | unit | meaning | reference |")[1:]:
        rows = [r for r in table.strip().splitlines() if r.startswith("|")]
        # every row has six cells (pipes inside a cell are escaped)
        assert all(len(r.replace("\\|", "").strip("|").split("|")) == 6 for r in rows)
