"""FaithfulSAE's downstream probing: how much task information survives the SAE?

For each text-classification task, texts become three representations: the LM activation at the
SAE's hook, the SAE latents, and the SAE reconstruction, each mean-pooled over the text; a linear
probe is trained on each and scored on held-out texts. Metrics, per task (category = task name) and
averaged (category ``mean``): ``baseline_acc`` (LM activation), ``sae_acc`` (latents), ``recon_acc``
(reconstruction) and the macro-F1 of each (``baseline_f1``, ``sae_f1``, ``recon_f1``).

Reference: FaithfulSAE ``scripts/feat_match.py`` ``prove_performance`` (github.com/seonglae/FaithfulSAE
@a98b2637). ``procedure="faithfulsae"`` (default, for numbers next to FaithfulSAE's tables; a BatchTopK
SAE is encoded as a per-token TopK of its k, as FaithfulSAE's ``scripts/convert.py`` loads it):

* data: the dataset's own train and test splits (sst2 / cola: validation as test), each shuffled
  (seed 42) and cut to ``dataset_limit`` (10,000); offline tasks: a stratified ``test_fraction``
  split of the task (they have no published split);
* batches of ``probe_batch_size`` (4) texts -- train shuffled, test in order -- tokenized with the
  tokenizer's defaults (its own BOS, if any), padded to the longest text of the batch (pad = EOS, the
  tokenizer's padding side), truncated to ``max_length`` (the model's ``max_position_embeddings``);
  the LM runs WITHOUT an attention mask; SAE latents and reconstruction at every position;
* pooling: the mean over the LAST n_i positions of the padded row, n_i = (real tokens - 1) for
  training texts and n_i = real tokens for test texts (FaithfulSAE's slices, kept as they are);
* three ``nn.Linear(d, n_labels)`` probes (default init), cross-entropy, ``Adam(probe_lr=1e-3)``, ONE
  epoch over the training batches, raw features; accuracy = correct / total, macro F1 (sklearn).

Differences that remain: probes run in float32 (FaithfulSAE: the model dtype, bf16 except GPT-2);
shuffling and init are seeded; FaithfulSAE averages the two SAEs of a seed pair (one run here per SAE).

``procedure="standardised"`` (sae_sweep's earlier procedure): one pass of mean-pooling over
non-special tokens of ``[BOS] + context_size - 1`` tokens, a stratified ``test_fraction`` split of at
most ``max_examples`` texts, and a converged standardised logistic regression per representation.

Tasks by name: ``sst2``, ``cola``, ``ag_news``, ``yelp_polarity`` from the hub (reported unavailable
offline), and the offline ``stdlib_package`` / ``stdlib_kind`` tasks. A probe within luck of the
majority-class rate is flagged. The status is "failed" (and the run fails) only when the SAE lost
the information: the latent AND the reconstruction probes are at chance on every task while the
LM-activation probe is not on some task (when it is at chance too, the probe procedure learned
nothing -- one epoch of FaithfulSAE's probe on a small task can -- and that is flagged). Latent probes
alone at chance while the reconstruction keeps the information (it is a linear map of the latents)
are a probing result on a small task, flagged but not a broken SAE.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sae_sweep.config import parse, setting
from sae_sweep.evals.probes import (
    DEFAULT_PACKAGES,
    HUB_TASKS,
    OFFLINE_TASKS,
    TaskUnavailable,
    TextTask,
    at_chance,
    encode_texts,
    few_threads,
    fit_probe,
    load_task,
    pooled_features,
    stable_seed,
)
from sae_sweep.evals.registry import register_eval, settings_dict
from sae_sweep.evals.schema import EvalOutput
from sae_sweep.sae.batchtopk import per_token_topk
from sae_sweep.util.metrics import Metric

log = logging.getLogger(__name__)

EVAL_TYPE_ID = "downstream"  # FaithfulSAE's procedure, under FaithfulSAE's metric names
STANDARDISED_TYPE_ID = "downstream_standardised"  # ours, under its own names

# FaithfulSAE's test split per task (prove_performance's test_split arguments in feat_match)
HUB_TEST_SPLIT = {
    "sst2": "validation",
    "cola": "validation",
    "ag_news": "test",
    "fancyzhx/ag_news": "test",
    "yelp_polarity": "test",
}


@dataclass
class DownstreamSettings:
    """``eval.downstream``."""

    tasks: List[str] = setting(
        default_factory=lambda: ["stdlib_package", "stdlib_kind"],
        allowed="a list of task names (stdlib_package, stdlib_kind; hub: sst2, cola, ag_news, yelp_polarity)",
    )
    # eval.downstream is FaithfulSAE's procedure only, so its metric names mean FaithfulSAE's numbers;
    # the standardised procedure is the eval downstream_standardised
    procedure: str = setting(
        "faithfulsae",
        allowed="faithfulsae (the standardised procedure is the eval downstream_standardised)",
        check=lambda v: v == "faithfulsae",
    )
    # faithfulsae
    dataset_limit: int = setting(
        10000, allowed="an integer >= 2 (texts per split; FaithfulSAE: 10,000)", check=lambda v: v >= 2
    )
    max_length: Optional[int] = setting(
        None,
        allowed="null (the model's max_position_embeddings, FaithfulSAE) or an integer >= 2",
        check=lambda v: v >= 2,
    )
    probe_batch_size: int = setting(4, allowed="an integer >= 1 (FaithfulSAE: 4)", check=lambda v: v >= 1)
    probe_lr: float = setting(1e-3, allowed="a float > 0 (FaithfulSAE: Adam 1e-3)", check=lambda v: v > 0)
    # standardised (and the offline tasks' split in both)
    context_size: int = setting(128, allowed="an integer >= 2", check=lambda v: v >= 2)
    max_examples: int = setting(1000, allowed="an integer >= 2 (texts per task)", check=lambda v: v >= 2)
    test_fraction: float = setting(0.3, allowed="a float in (0, 1)", check=lambda v: 0 < v < 1)
    batch_size: int = setting(32, allowed="an integer >= 1", check=lambda v: v >= 1)
    packages: List[str] = setting(
        default_factory=lambda: list(DEFAULT_PACKAGES), allowed="a list of stdlib packages (the offline tasks)"
    )
    C: float = setting(1.0, allowed="a float > 0", check=lambda v: v > 0)
    max_iter: int = setting(1000, allowed="an integer >= 1", check=lambda v: v >= 1)
    chance_z: float = setting(2.0, allowed="a float >= 0", check=lambda v: v >= 0)


@dataclass
class StandardisedDownstreamSettings(DownstreamSettings):
    """``eval.downstream_standardised``: the same tasks and representations, probed with converged
    standardised logistic regression on mean-pooled features (the procedure that learns the small
    offline tasks, where FaithfulSAE's one epoch of batch-4 Adam stays near chance)."""

    procedure: str = setting(
        "standardised",
        allowed="standardised (FaithfulSAE's procedure is the eval downstream)",
        check=lambda v: v == "standardised",
    )


_SETTINGS = {
    "faithfulsae": (DownstreamSettings, EVAL_TYPE_ID),
    "standardised": (StandardisedDownstreamSettings, STANDARDISED_TYPE_ID),
}


_REPS = (("baseline", "llm"), ("sae", "sae"), ("recon", "recon"))


def _category(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator):
    tr, te = [], []
    for c in sorted(set(labels.tolist())):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_te = max(1, int(round(len(idx) * test_fraction)))
        if len(idx) - n_te < 1:
            raise TaskUnavailable(f"class {c!r} has {len(idx)} example(s): too few for a train/test split")
        te.append(idx[:n_te])
        tr.append(idx[n_te:])
    return np.concatenate(tr), np.concatenate(te)


def probe_task(feats: Dict[str, np.ndarray], labels: np.ndarray, s: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """The ``standardised`` procedure on pooled features of one task."""
    rng = np.random.default_rng(seed)
    tr, te = stratified_split(labels, float(s["test_fraction"]), rng)
    out: Dict[str, Any] = {"n_train": int(len(tr)), "n_test": int(len(te)), "n_classes": int(len(set(labels)))}
    majority = max(np.mean(labels[te] == c) for c in set(labels[te].tolist()))
    out["chance_acc"] = float(majority)
    for name, key in _REPS:
        res = fit_probe(
            feats[key][tr],
            labels[tr],
            feats[key][te],
            labels[te],
            seed=seed,
            C=float(s["C"]),
            max_iter=int(s["max_iter"]),
        )
        out[f"{name}_acc"], out[f"{name}_f1"] = res["acc"], res["f1"]
        out[f"{name}_at_chance"] = at_chance([res["acc"]], len(te), majority, float(s["chance_z"]))
    return out


# The FaithfulSAE procedure


def load_task_splits(name: str, s: Dict[str, Any], seed: int, cache_dir: Optional[str]) -> Tuple[TextTask, TextTask]:
    """(train, test) texts of a task: a hub task's own splits, shuffled with seed 42 and cut to
    ``dataset_limit`` (FaithfulSAE); an offline task split ``test_fraction`` stratified."""
    limit = int(s["dataset_limit"])
    if name in OFFLINE_TASKS:
        task = load_task(
            name, seed=seed, cache_dir=cache_dir, max_examples=int(s["max_examples"]), packages=s["packages"]
        )
        labels = np.array(task.labels)
        tr, te = stratified_split(labels, float(s["test_fraction"]), np.random.default_rng(stable_seed(seed, name)))

        def pick(idx):
            return TextTask(name, [task.texts[i] for i in idx], [task.labels[i] for i in idx], task.source)

        return pick(tr[:limit]), pick(te[:limit])
    if name not in HUB_TASKS:
        raise ValueError(
            f"unknown downstream task {name!r}: allowed values are {', '.join(list(OFFLINE_TASKS) + sorted(HUB_TASKS))}"
        )
    hub_id, config, text_col, label_col, _classes = HUB_TASKS[name]
    test_split = HUB_TEST_SPLIT.get(name, "test")
    try:
        import datasets
        from datasets import load_dataset

        from sae_sweep.evals.probes import _hub_reachable

        if not datasets.config.HF_HUB_OFFLINE and not _hub_reachable():
            datasets.config.HF_HUB_OFFLINE = True
            datasets.config.HF_DATASETS_OFFLINE = True
        out = []
        for split in ("train", test_split):
            ds = load_dataset(hub_id, config, split=split)
            ds = ds.shuffle(seed=42).select(range(min(limit, len(ds))))
            out.append(TextTask(name, list(ds[text_col]), [str(y) for y in ds[label_col]], hub_id))
    except Exception as e:  # offline, gated, renamed: say which dataset and why
        raise TaskUnavailable(
            f"hub dataset {hub_id}{'/' + config if config else ''} for task {name!r} "
            f"could not be loaded ({type(e).__name__}: {str(e)[:200]}); "
            f"offline, use the built-in tasks {', '.join(OFFLINE_TASKS)}"
        ) from None
    return out[0], out[1]


def _tokenize_batch(tok: Any, texts: Sequence[str], max_length: int, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``tokenizer(texts, padding=True, truncation=True, max_length=...)`` with pad = EOS: ids and
    attention mask, padded on the tokenizer's padding side to the longest text of the batch."""
    rows = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    left = getattr(tok, "padding_side", "right") == "left"
    for i, r in enumerate(rows):
        if r:
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
    return ids, mask


def trailing_mean(values: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """FaithfulSAE's pooling: row i is ``values[i, -n_i:].mean(0)`` (Python slicing: n_i = 0 takes
    the whole row)."""
    return torch.stack([values[i, -int(n[i]) :].mean(dim=0) for i in range(values.shape[0])])


@torch.no_grad()
def faithfulsae_batch_features(
    lm: Any, sae: Any, texts: Sequence[str], layer: int, hook: str, max_length: int, train: bool
) -> Dict[str, torch.Tensor]:
    """Pooled (LM activation, latents, reconstruction) of one batch, FaithfulSAE's way (module doc)."""
    p = next(iter(sae.parameters()))
    pad = getattr(lm, "eos_token_id", None)  # FaithfulSAE: tokenizer.pad_token = tokenizer.eos_token
    pad = pad if pad is not None else lm.tokenizer.pad_token_id
    ids, mask = _tokenize_batch(lm.tokenizer, texts, max_length, pad)
    acts = lm.activations(ids.to(lm.device), layer, hook)
    b, t, d = acts.shape
    x_hat, f = sae(acts.reshape(b * t, d).to(device=p.device, dtype=p.dtype))
    n = mask.sum(dim=1) - (1 if train else 0)
    return {
        "llm": trailing_mean(acts.float().cpu(), n),
        "sae": trailing_mean(f.reshape(b, t, -1).float().cpu(), n),
        "recon": trailing_mean(x_hat.reshape(b, t, -1).float().cpu(), n),
    }


def faithfulsae_probe_task(
    lm: Any, sae: Any, train: TextTask, test: TextTask, layer: int, hook: str, s: Dict[str, Any], seed: int
) -> Dict[str, Any]:
    """``prove_performance``: three probes trained in lockstep for one epoch, then scored."""
    from sklearn.metrics import f1_score

    classes = sorted(set(train.labels) | set(test.labels))
    y_tr = torch.tensor([classes.index(y) for y in train.labels])
    y_te = np.array([classes.index(y) for y in test.labels])
    model_cfg = getattr(getattr(lm, "model", None), "config", None)
    max_length = int(s["max_length"] or getattr(model_cfg, "max_position_embeddings", 0) or 0)
    if max_length < 2:
        raise ValueError("eval.downstream.max_length: the model has no max_position_embeddings; set max_length")
    bs = int(s["probe_batch_size"])
    g = torch.Generator().manual_seed(int(seed))
    d_sae, d_in = sae.W_dec.shape
    dims = {"llm": d_in, "sae": d_sae, "recon": d_in}
    with torch.inference_mode(False), torch.enable_grad():
        probes = {k: torch.nn.Linear(d, len(classes)) for k, d in dims.items()}
        for k, probe in probes.items():  # nn.Linear's default init, drawn from the seeded generator
            bound = 1.0 / dims[k] ** 0.5
            with torch.no_grad():
                probe.weight.copy_((torch.rand(probe.weight.shape, generator=g) * 2 - 1) * bound)
                probe.bias.copy_((torch.rand(probe.bias.shape, generator=g) * 2 - 1) * bound)
        opts = {k: torch.optim.Adam(pr.parameters(), lr=float(s["probe_lr"])) for k, pr in probes.items()}
        order = torch.randperm(len(train.texts), generator=g)  # DataLoader(shuffle=True), one epoch
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            feats = faithfulsae_batch_features(lm, sae, [train.texts[j] for j in idx], layer, hook, max_length, True)
            for k, probe in probes.items():
                loss = torch.nn.functional.cross_entropy(probe(feats[k].clone()), y_tr[idx])
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()
    preds: Dict[str, List[int]] = {k: [] for k in probes}
    with torch.no_grad():
        for i in range(0, len(test.texts), bs):  # DataLoader(shuffle=False)
            feats = faithfulsae_batch_features(lm, sae, test.texts[i : i + bs], layer, hook, max_length, False)
            for k, probe in probes.items():
                preds[k] += probe(feats[k]).argmax(dim=1).tolist()
    out: Dict[str, Any] = {"n_train": len(train.texts), "n_test": len(test.texts), "n_classes": len(classes)}
    majority = max(np.mean(y_te == c) for c in set(y_te.tolist()))
    out["chance_acc"] = float(majority)
    for name, key in _REPS:
        pred = np.array(preds[key])
        out[f"{name}_acc"] = float((pred == y_te).sum() / len(y_te))
        out[f"{name}_f1"] = float(f1_score(y_te, pred, average="macro"))
        out[f"{name}_at_chance"] = at_chance([out[f"{name}_acc"]], len(y_te), majority, float(s["chance_z"]))
    return out


def run_downstream(
    lm: Any, sae: Any, layer: int, hook: str, seed: int, settings: Dict[str, Any], cache_dir: str | None = None
) -> EvalOutput:
    procedure = settings.get("procedure") if isinstance(settings, dict) else getattr(settings, "procedure", None)
    cls, type_id = _SETTINGS.get(procedure or "faithfulsae", (DownstreamSettings, EVAL_TYPE_ID))
    s = settings_dict(cls, settings, f"eval.{type_id}")
    config = {
        **s,
        "layer": layer,
        "hook": hook,
        "random_seed": seed,
        "reference": "FaithfulSAE scripts/feat_match.py prove_performance (a98b2637)",
    }
    metrics: Dict[str, Dict[str, float]] = {}
    details: List[Dict[str, Any]] = []
    unavailable: Dict[str, str] = {}
    for name in s["tasks"]:
        try:
            if s["procedure"] == "faithfulsae":
                train, test = load_task_splits(name, s, seed, cache_dir)
                source = train.source
                with few_threads():
                    res = faithfulsae_probe_task(lm, sae, train, test, layer, hook, s, stable_seed(seed, name))
            else:
                task = load_task(
                    name, seed=seed, cache_dir=cache_dir, max_examples=int(s["max_examples"]), packages=s["packages"]
                )
                source = task.source
                labels = np.array(task.labels)
                ids, keep = encode_texts(lm, task.texts, int(s["context_size"]))
                feats = pooled_features(lm, sae, ids, keep, layer, hook, int(s["batch_size"]))
                with few_threads():
                    res = probe_task(feats, labels, s, stable_seed(seed, name))
        except TaskUnavailable as e:
            log.warning("downstream: %s", e)
            unavailable[name] = str(e)
            continue
        metrics[_category(name)] = {
            k: res[k]
            for k in ("baseline_acc", "sae_acc", "recon_acc", "baseline_f1", "sae_f1", "recon_f1", "chance_acc")
        }
        details.append({"task": name, "source": source, **res})
    if not details:
        return EvalOutput.skipped(
            type_id, config, "no downstream task available: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items())
        )
    keys = ("baseline_acc", "sae_acc", "recon_acc", "baseline_f1", "sae_f1", "recon_f1")
    metrics["mean"] = {k: float(np.mean([d[k] for d in details])) for k in keys}
    sae_chance = [d["task"] for d in details if d["sae_at_chance"]]
    metrics["flags"] = {
        "sae_at_chance_fraction": len(sae_chance) / len(details),
        "baseline_at_chance_fraction": float(np.mean([d["baseline_at_chance"] for d in details])),
    }
    flags: Dict[str, Any] = {}
    if sae_chance:
        flags["sae_at_chance_tasks"] = sae_chance
    if unavailable:
        flags["unavailable"] = sorted(unavailable)
    status, reason = "ok", None
    baseline_learned = [d["task"] for d in details if not d["baseline_at_chance"]]
    if len(sae_chance) == len(details) and all(d["recon_at_chance"] for d in details):
        if baseline_learned:  # the LM's activation carried the task and the SAE lost it
            status, reason = (
                "failed",
                (
                    "SAE-latent and reconstruction probes are at chance level on every task "
                    f"({', '.join(sae_chance)}) while the LM-activation probe is not "
                    f"({', '.join(baseline_learned)})"
                ),
            )
        else:  # the probes learned nothing from any representation: a probing result, not a broken SAE
            flags["all_probes_at_chance"] = True
    return EvalOutput(
        eval_type_id=type_id,
        config=config,
        metrics=metrics,
        details=details,
        status=status,
        skip_reason=reason,
        flags=flags,
        unstructured={"unavailable": unavailable},
    )


# What the eval logs (flattened as downstream/<category>/<metric>): one category per task (its name
# with characters other than letters, digits, '_', '.', '-' replaced by '_'), their mean, and flags.
# Accuracies and macro F1 are on the task's held-out texts; the three probes see the same texts.
_FS = "FaithfulSAE prove_performance"
_REP = {
    "baseline": (
        "LM",
        None,
        "the mean-pooled LM activation at the SAE's hook: the reference the "
        "other two are read against; it does not depend on the SAE, so no better direction",
    ),
    "sae": ("SAE", "higher", "the mean-pooled SAE latents: higher keeps more of the task's information in the latents"),
    "recon": (
        "recon",
        "higher",
        "the mean-pooled SAE reconstruction: higher keeps more of the task's "
        "information in what the SAE writes back to the model",
    ),
}


_PROBES = {
    EVAL_TYPE_ID: ("one epoch of batch-4 Adam on a linear layer over the raw features (FaithfulSAE's procedure)", _FS),
    STANDARDISED_TYPE_ID: (
        "converged logistic regression on standardised mean-pooled features (this "
        "project's procedure: it learns the small offline tasks)",
        "this project",
    ),
}


def _downstream_metrics(ev: str) -> tuple:
    stats = (("acc", "acc", "test accuracy", "accuracy"), ("f1", "F1", "macro F1", "macro F1"))
    probe, ref = _PROBES[ev]
    out = []
    for rep, (what, better, why) in _REP.items():
        for stat, short, unit, name in stats:
            out.append(
                Metric(
                    f"{ev}/{{task}}/{rep}_{stat}",
                    f"{what} probe {short} ({{task}})",
                    better,
                    unit,
                    f"Test {name} of a linear probe, {probe}, on {why}.",
                    ref,
                )
            )
    out.append(
        Metric(
            f"{ev}/{{task}}/chance_acc",
            "majority-class rate ({task})",
            None,
            "test accuracy",
            "Accuracy of always answering the test split's most frequent class: the chance level the "
            "probe accuracies of this task are read against.",
            "this project",
        )
    )
    for rep, (what, better, _why) in _REP.items():
        for stat, short, unit, name in stats:
            out.append(
                Metric(
                    f"{ev}/mean/{rep}_{stat}",
                    f"{ev} {what} {short}",
                    better,
                    unit,
                    f"Mean over the available tasks of the per-task {rep}_{stat} (the {what} probe's test "
                    f"{name}; one value per task, unweighted).",
                    ref,
                )
            )
    out.append(
        Metric(
            f"{ev}/flags/sae_at_chance_fraction",
            "SAE tasks at chance",
            "lower",
            "fraction of tasks",
            "Fraction of tasks whose SAE-latent probe accuracy is at most the majority-class rate plus "
            "chance_z binomial standard errors.",
            "this project",
        )
    )
    out.append(
        Metric(
            f"{ev}/flags/baseline_at_chance_fraction",
            "LM tasks at chance",
            None,
            "fraction of tasks",
            "The same for the LM-activation probe: tasks the probe procedure learns nothing on at all.",
            "this project",
        )
    )
    return tuple(out)


METRICS = _downstream_metrics(EVAL_TYPE_ID)
STANDARDISED_METRICS = _downstream_metrics(STANDARDISED_TYPE_ID)


def _settings(ctx: Any, cls: type) -> Any:
    return ctx.settings if isinstance(ctx.settings, cls) else parse(cls, ctx.settings or {}, "eval")


@register_eval(EVAL_TYPE_ID, DownstreamSettings, METRICS)
def run(ctx: Any) -> EvalOutput:
    with per_token_topk(ctx.sae):  # FaithfulSAE's inference rule for BatchTopK SAEs (scripts/convert.py)
        return run_downstream(
            ctx.lm, ctx.sae, ctx.layer, ctx.hook, ctx.seed, _settings(ctx, DownstreamSettings), ctx.cache_dir
        )


@register_eval(STANDARDISED_TYPE_ID, StandardisedDownstreamSettings, STANDARDISED_METRICS)
def run_standardised(ctx: Any) -> EvalOutput:
    return run_downstream(
        ctx.lm, ctx.sae, ctx.layer, ctx.hook, ctx.seed, _settings(ctx, StandardisedDownstreamSettings), ctx.cache_dir
    )
