"""SAEBench's SCR (spurious correlation removal) and TPP (targeted probe perturbation) evals.

Reference: SAEBench 0.6.0 ``sae_bench/evals/scr_and_tpp/`` (``main.py``, ``dataset_creation.py``,
``eval_config.py``) and the probe code it shares with sparse probing (``probe_training.py``);
github.com/adamkarvonen/SAEBench @8042bb38. Both need no LLM judge.

Texts are represented as SAEBench does: token-level LM activations at the SAE's hook with
BOS/EOS/PAD positions zeroed, ``context_size`` positions per text (padding counts as zeroed
positions); a text's "meaned" activation is the sum over positions / the number of non-zero rows.

* Probes (``train_probe_gpu``): a binary linear probe per class task on the meaned activations,
  AdamW lr 1e-3, batch 16, 20 epochs, ``+ 1e-3 * sum|w|``, the best test accuracy kept.
* Latent effects (``get_effects_per_class_precomputed_acts``): on the class's TRAINING task, the mean
  over positives minus negatives of each text's mean SAE latents (non-special tokens), times
  ``w_probe . W_dec[i]``; TPP keeps positive differences only, SCR takes ``|effect|``. The top-n
  latents with non-zero effect are ablated (``select_top_n_features``).
* Ablation (``ablated_precomputed_activations``): x' = dec(f with the selected latents zeroed) + (x -
  dec(f)) at EVERY position, zeroed ones included, then sum / non-zero rows. For the linear decoders
  here that is ``mean(x) - (sum_positions f)[S] @ W_dec[S] / count``, computed that way (checked
  against the SAE's own reconstruction before use).
* SCR (``perform_scr``; ``get_scr_plotting_dict``): the data of a (class pair, spurious pair) has six
  keys: "male / female" (both classes, spurious value 1) vs "female_data_only"; "professor / nurse"
  (class 1, both spurious values) vs "nurse_data_only"; the perfectly biased "male_professor /
  female_nurse" vs "female_nurse_data_only" (``get_spurious_corr_data``, ``size // 4`` texts per
  quadrant). Ablating the latents of the "male / female" probe should make the biased probe better at
  the class ("professor / nurse" data): ``scr_dir1_threshold_n = (A_ablated - A_biased) / (A_clean -
  A_biased)`` (0 when the denominator < 0.001); dir 2 swaps the roles; ``scr_metric_threshold_n`` is
  dir 1 when the biased probe's clean accuracy on the class data is below its accuracy on the
  spurious data, dir 2 when above (absent when equal). Averaged over every (dataset, pair) run.
* TPP (``create_tpp_plotting_dict``): per class i and n, ablate class i's top-n latents; intended =
  A_clean_i - A_ablated_i, unintended = mean over j != i of A_clean_j - A_ablated_j (probe j on its own
  data); ``tpp_threshold_n_total_metric = intended - unintended``, ``..._intended_diff_only``,
  ``..._unintended_diff_only``; mean over classes, then over datasets.

Data. Hub datasets by name, as SAEBench: ``LabHC/bias_in_bios_class_set1`` (profession x gender) and
``canrager/amazon_reviews_mcauley_1and5`` (category x rating), with SAEBench's class pairs; offline
they fail with a message that names the offline task. ``stdlib`` (offline): standard-library
docstrings, class = the package (pairs from ``stdlib_pairs``), spurious attribute = whether the
docstring mentions "return" (about 40 % do), for SCR; the packages as classes for TPP.

Remaining differences: every random draw is seeded (SAEBench seeds torch's global generator once);
the negatives of a task are drawn once and shared by the clean and ablated evaluations (SAEBench
redraws them per evaluation); probes and sums run in float32 (SAEBench: the LM dtype); TPP's hub
classes take ``size / 2`` texts per class without SAEBench's gender / rating balancing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sae_sweep.config import setting
from sae_sweep.evals.probes import (
    DEFAULT_PACKAGES,
    TaskUnavailable,
    encode_texts,
    few_threads,
    load_task,
    stable_seed,
    stdlib_labelled_docs,
    train_probe_torch,
)
from sae_sweep.evals.registry import register_eval, settings_dict
from sae_sweep.evals.schema import EvalOutput
from sae_sweep.evals.sparse_probing import class_splits, prepare_probe_data
from sae_sweep.util.metrics import Metric

log = logging.getLogger(__name__)

OFFLINE = "stdlib"
_RETURN = re.compile(r"\breturn", re.IGNORECASE)  # the offline spurious attribute
# SAEBench dataset_info.PAIRED_CLASS_KEYS: key -> the key whose texts are its negatives
PAIRED = {
    "male / female": "female_data_only",
    "professor / nurse": "nurse_data_only",
    "male_professor / female_nurse": "female_nurse_data_only",
}
BIASED = "male_professor / female_nurse"

# SAEBench eval_config.column1_vals_lookup / main.COLUMN2_VALS_LOOKUP, with dataset_info's id maps
_PROFESSION = {
    "accountant": 0,
    "architect": 1,
    "attorney": 2,
    "dentist": 6,
    "filmmaker": 9,
    "journalist": 11,
    "nurse": 13,
    "professor": 21,
    "psychologist": 22,
    "surgeon": 25,
    "teacher": 26,
}
_AMAZON = {
    "Toys_and_Games": 1,
    "Cell_Phones_and_Accessories": 2,
    "Industrial_and_Scientific": 3,
    "Musical_Instruments": 5,
    "Electronics": 6,
    "Office_Products": 11,
    "Pet_Supplies": 18,
    "Books": 24,
    "CDs_and_Vinyl": 26,
    "Software": 30,
}
HUB_SCR: Dict[str, Dict[str, Any]] = {
    "LabHC/bias_in_bios_class_set1": dict(
        hub_id="LabHC/bias_in_bios",
        text="hard_text",
        col1="profession",
        col2="gender",
        col1_map=_PROFESSION,
        col2_vals=(0, 1),
        pairs=[
            ("professor", "nurse"),
            ("architect", "journalist"),
            ("surgeon", "psychologist"),
            ("attorney", "teacher"),
        ],
        tpp_classes=[0, 1, 2, 6, 9],
    ),
    "canrager/amazon_reviews_mcauley_1and5": dict(
        hub_id="canrager/amazon_reviews_mcauley_1and5",
        text="text",
        col1="category",
        col2="rating",
        col1_map=_AMAZON,
        col2_vals=(1.0, 5.0),
        pairs=[
            ("Books", "CDs_and_Vinyl"),
            ("Software", "Electronics"),
            ("Pet_Supplies", "Office_Products"),
            ("Industrial_and_Scientific", "Toys_and_Games"),
        ],
        tpp_classes=[1, 2, 3, 5, 6],
    ),
}


@dataclass
class ScrTppSettings:
    """``eval.scr`` / ``eval.tpp``. Defaults: SAEBench's ``ScrAndTppEvalConfig``."""

    dataset_names: List[str] = setting(
        default_factory=lambda: ["LabHC/bias_in_bios_class_set1", "canrager/amazon_reviews_mcauley_1and5"],
        allowed="a list of: LabHC/bias_in_bios_class_set1, canrager/amazon_reviews_mcauley_1and5 (hub), stdlib "
        "(offline)",
        check=lambda v: len(v) > 0 and all(n in HUB_SCR or n == OFFLINE for n in v),
    )
    train_set_size: int = setting(4000, allowed="an integer >= 8 (SAEBench: 4000)", check=lambda v: v >= 8)
    test_set_size: int = setting(1000, allowed="an integer >= 8 (SAEBench: 1000)", check=lambda v: v >= 8)
    context_size: int = setting(128, allowed="an integer >= 2 (SAEBench's context_length: 128)", check=lambda v: v >= 2)
    probe_train_batch_size: int = setting(16, allowed="an integer >= 1 (SAEBench: 16)", check=lambda v: v >= 1)
    probe_epochs: int = setting(20, allowed="an integer >= 1 (SAEBench: 20)", check=lambda v: v >= 1)
    probe_lr: float = setting(1e-3, allowed="a float > 0 (SAEBench: 1e-3)", check=lambda v: v > 0)
    probe_l1_penalty: float = setting(1e-3, allowed="a float >= 0 (SAEBench: 1e-3)", check=lambda v: v >= 0)
    early_stopping_patience: int = setting(20, allowed="an integer >= 1 (SAEBench: 20)", check=lambda v: v >= 1)
    n_values: List[int] = setting(
        default_factory=lambda: [2, 5, 10, 20, 50, 100, 500],
        allowed="a list of integers >= 1 (latents ablated)",
        check=lambda v: len(v) > 0 and all(n >= 1 for n in v),
    )
    llm_batch_size: int = setting(32, allowed="an integer >= 1", check=lambda v: v >= 1)
    sae_batch_size: int = setting(125, allowed="an integer >= 1 (SAEBench: 125)", check=lambda v: v >= 1)
    packages: List[str] = setting(
        default_factory=lambda: list(DEFAULT_PACKAGES), allowed="a list of stdlib packages (the offline TPP classes)"
    )
    stdlib_pairs: List[List[str]] = setting(
        default_factory=lambda: [["asyncio", "email"], ["xml", "multiprocessing"]],
        allowed="a list of [package, package] pairs (the offline SCR classes)",
        check=lambda v: len(v) > 0 and all(len(p) == 2 and p[0] != p[1] for p in v),
    )


# Data


def _hub_frame(name: str, split: str):
    """A hub dataset's split as a pandas frame; TaskUnavailable (naming the offline task) when it
    cannot be had."""
    spec = HUB_SCR[name]
    try:
        import datasets
        from datasets import load_dataset

        from sae_sweep.evals.probes import _hub_reachable

        if not datasets.config.HF_HUB_OFFLINE and not _hub_reachable():
            datasets.config.HF_HUB_OFFLINE = True
            datasets.config.HF_DATASETS_OFFLINE = True
        return load_dataset(spec["hub_id"], split=split).to_pandas()
    except Exception as e:
        raise TaskUnavailable(
            f"hub dataset {spec['hub_id']} ({name}) could not be loaded ({type(e).__name__}: "
            f"{str(e)[:200]}); offline, use dataset_names: [{OFFLINE}] (standard-library "
            "docstrings: package x docstring length)"
        ) from None


def spurious_corr_keys(
    pos_pos: List[str], pos_neg: List[str], neg_pos: List[str], neg_neg: List[str], m: int, seed: int
) -> Dict[str, List[str]]:
    """SAEBench's ``get_spurious_corr_data`` (dataset_creation.py:9-105) on the four quadrants, named as
    (class, spurious): pos_pos = (class 1, spurious 1), pos_neg = (class 0, spurious 1), neg_pos =
    (class 1, spurious 0), neg_neg = (class 0, spurious 0) -- SAEBench's variable names. ``m`` texts
    per quadrant; the biased keys take ``2m`` from their quadrant."""
    if min(len(pos_neg), len(neg_pos)) < m or min(len(pos_pos), len(neg_neg)) < 2 * m:
        raise TaskUnavailable(
            f"a quadrant has too few texts for {m} per quadrant "
            f"({len(pos_pos)}, {len(pos_neg)}, {len(neg_pos)}, {len(neg_neg)})"
        )
    rng = np.random.default_rng(seed)
    keys = {
        "male / female": pos_pos[:m] + pos_neg[:m],  # spurious 1, both classes
        "female_data_only": neg_pos[:m] + neg_neg[:m],  # spurious 0
        "professor / nurse": pos_pos[:m] + neg_pos[:m],  # class 1, both spurious values
        "nurse_data_only": pos_neg[:m] + neg_neg[:m],  # class 0
        BIASED: pos_pos[: 2 * m],
        "female_nurse_data_only": neg_neg[: 2 * m],
    }
    for v in keys.values():
        rng.shuffle(v)
    return keys


def _quadrant_size(size: int, quads: Sequence[int]) -> int:
    """``size // 4`` (SAEBench), shrunk to what the quadrants hold (the biased keys need 2m)."""
    pp, pn, np_, nn = quads
    return max(0, min(size // 4, pn, np_, pp // 2, nn // 2))


def scr_runs(
    name: str, s: Dict[str, Any], seed: int, cache_dir: Optional[str]
) -> List[Tuple[str, Dict[str, List[str]], Dict[str, List[str]]]]:
    """(run name, train keys, test keys) for every class pair of a dataset."""
    runs = []
    if name == OFFLINE:
        rows = stdlib_labelled_docs(tuple(sorted({p for pair in s["stdlib_pairs"] for p in pair})), cache_dir)
        for a, b in s["stdlib_pairs"]:
            texts = [(t, p) for t, p, _k in rows if p in (a, b)]
            if not texts:
                raise TaskUnavailable(f"no docstrings for packages {a!r}, {b!r}")
            quads: Dict[Tuple[int, int], List[str]] = {(c, sp): [] for c in (1, 0) for sp in (1, 0)}
            for t, p in texts:  # class 1 = the first package; spurious 1 = the docstring mentions "return"
                quads[(int(p == a), int(bool(_RETURN.search(t))))].append(t)
            rng = np.random.default_rng(stable_seed(seed, "scr", a, b))
            train_q, test_q = {}, {}
            for k, v in quads.items():
                v = [v[i] for i in rng.permutation(len(v))]
                cut = round(len(v) * s["train_set_size"] / (s["train_set_size"] + s["test_set_size"]))
                train_q[k], test_q[k] = v[:cut], v[cut:]
            out = []
            for q, size in ((train_q, s["train_set_size"]), (test_q, s["test_set_size"])):
                order = [q[(1, 1)], q[(0, 1)], q[(1, 0)], q[(0, 0)]]
                m = _quadrant_size(int(size), [len(x) for x in order])
                if m < 2:
                    raise TaskUnavailable(f"stdlib pair {a}/{b}: quadrants too small ({[len(x) for x in order]})")
                out.append(
                    spurious_corr_keys(order[0], order[1], order[2], order[3], m, stable_seed(seed, "scr-keys", a, b))
                )
            runs.append((f"{OFFLINE}_scr_{a}_{b}", out[0], out[1]))
        return runs
    spec = HUB_SCR[name]
    frames = {split: _hub_frame(name, split) for split in ("train", "test")}
    for c1, c0 in spec["pairs"]:
        out = []
        for split, size in (("train", s["train_set_size"]), ("test", s["test_set_size"])):
            df = frames[split]
            i1, i0 = spec["col1_map"][c1], spec["col1_map"][c0]
            s1, s0 = spec["col2_vals"]  # SAEBench's (column2_pos, column2_neg)

            def quadrant(c: Any, sp: Any, df: Any = df) -> List[str]:
                return df[(df[spec["col1"]] == c) & (df[spec["col2"]] == sp)][spec["text"]].tolist()

            order = [quadrant(i1, s1), quadrant(i0, s1), quadrant(i1, s0), quadrant(i0, s0)]
            m = _quadrant_size(int(size), [len(x) for x in order])
            out.append(spurious_corr_keys(order[0], order[1], order[2], order[3], m, seed))
        runs.append((f"{name}_scr_{c1}_{c0}", out[0], out[1]))
    return runs


def tpp_data(
    name: str, s: Dict[str, Any], seed: int, cache_dir: Optional[str]
) -> Tuple[Dict[str, List[str]], Dict[str, List[str]]]:
    """(train, test) texts per class for TPP: ``size / 2`` per class (SAEBench's sparse-probing split)."""
    if name == OFFLINE:
        task = load_task("stdlib_package", seed=seed, cache_dir=cache_dir, max_examples=10**6, packages=s["packages"])
        texts, labels = task.texts, np.array(task.labels)
    else:
        spec = HUB_SCR[name]
        frames = {split: _hub_frame(name, split) for split in ("train", "test")}
        out = []
        for split, size in (("train", s["train_set_size"]), ("test", s["test_set_size"])):
            df = frames[split]
            per = {}
            for c in spec["tpp_classes"]:
                rows = df[df[spec["col1"]] == c][spec["text"]].tolist()
                rng = np.random.default_rng(stable_seed(seed, name, split, c))
                per[str(c)] = [rows[i] for i in rng.permutation(len(rows))[: int(size) // 2]]
            out.append(per)
        return out[0], out[1]
    classes = sorted(set(labels.tolist()))
    splits = class_splits(
        labels,
        classes,
        int(s["train_set_size"]),
        int(s["test_set_size"]),
        np.random.default_rng(stable_seed(seed, "tpp", name)),
    )
    return (
        {c: [texts[i] for i in tr] for c, (tr, _te) in splits.items()},
        {c: [texts[i] for i in te] for c, (_tr, te) in splits.items()},
    )


# Activations


@dataclass
class KeyActs:
    """Per text: the meaned LM activation, the per-text mean SAE latents over non-special tokens, the
    sum of the latents over ALL ``context_size`` positions (zeroed ones included), and the count of
    non-zero positions."""

    meaned: torch.Tensor  # [N, d_in]
    sae_mean: torch.Tensor  # [N, d_sae]
    f_sum_all: torch.Tensor  # [N, d_sae]
    count: torch.Tensor  # [N]


@torch.no_grad()
def text_acts(
    lm: Any, sae: Any, texts: Sequence[str], layer: int, hook: str, context_size: int, batch_size: int
) -> KeyActs:
    p = next(iter(sae.parameters()))
    ids, keep = encode_texts(lm, texts, context_size)
    zero_f = sae.encode(torch.zeros(1, sae.W_dec.shape[1], device=p.device, dtype=p.dtype)).float().cpu()[0]
    out: Dict[str, List[Any]] = {k: [] for k in ("meaned", "sae_mean", "f_sum_all", "count")}
    for s in range(0, len(texts), batch_size):
        b_ids, b_keep = ids[s : s + batch_size], keep[s : s + batch_size]
        acts = lm.activations(b_ids.to(lm.device), layer, hook).float().cpu()
        acts = acts * b_keep[..., None]  # SAEBench zeroes BOS/EOS/PAD positions
        nonzero = (acts.sum(-1) != 0).float()  # SAEBench counts rows whose sum is non-zero
        count = nonzero.sum(1).clamp_min(1)  # a text without a scored token: zeros (SAEBench: 0/0)
        b, t, d = acts.shape
        f = sae.encode(acts.reshape(b * t, d).to(device=p.device, dtype=p.dtype)).float().cpu().reshape(b, t, -1)
        out["meaned"].append(acts.sum(1) / count[:, None])
        out["sae_mean"].append((f * nonzero[..., None]).sum(1) / count[:, None])
        # positions past this batch's width up to context_size are zeroed padding in SAEBench
        out["f_sum_all"].append(f.sum(1) + (context_size - t) * zero_f)
        out["count"].append(count)
    return KeyActs(*(torch.cat(out[k]) for k in ("meaned", "sae_mean", "f_sum_all", "count")))


def check_linear_decoder(sae: Any, d_in: int) -> None:
    """The ablation shortcut needs ``x_hat = f @ W_dec + b`` (every SAE family here); fail clearly if not."""
    p = next(iter(sae.parameters()))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, d_in, generator=g).to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        x_hat, f = sae(x)
        zero_hat, _ = sae(torch.zeros_like(x[:1]))
        f0 = sae.encode(torch.zeros_like(x[:1]))
        b = zero_hat - f0 @ sae.W_dec
        lin = f @ sae.W_dec + b
    if not torch.allclose(x_hat.float(), lin.float(), atol=1e-4, rtol=1e-4):
        raise ValueError(
            "scr/tpp: the SAE's reconstruction is not f @ W_dec + b_dec; the ablation needs a linear decoder"
        )


# Probes and the metrics


def build_task(sizes: Dict[str, int], cls: str, scr: bool, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """SAEBench ``prepare_probe_data`` on rows of the keys laid end to end (in ``sizes``' order): SCR
    negatives = the paired key's texts; TPP: one-vs-rest with stratified negatives."""
    offsets = np.cumsum([0] + list(sizes.values()))
    by = {k: offsets[i] + np.arange(n) for i, (k, n) in enumerate(sizes.items())}
    if not scr:
        return prepare_probe_data(by, cls, rng)
    pair = PAIRED.get(cls) or {v: k for k, v in PAIRED.items()}[cls]
    pos, neg = by[cls], by[pair]
    neg = neg[rng.permutation(len(neg))[: len(pos)]]
    idx = np.concatenate([pos, neg])
    y = np.r_[np.ones(len(pos), int), np.zeros(len(neg), int)]
    order = rng.permutation(len(idx))
    return idx[order], y[order]


def _cat(acts: Dict[str, KeyActs], field: str) -> torch.Tensor:
    return torch.cat([getattr(a, field) for a in acts.values()])


def probe_accuracy(w: torch.Tensor, b: float, x: torch.Tensor, y: np.ndarray) -> float:
    """SAEBench ``test_probe_gpu``: the fraction with (logit > 0) == label."""
    return float((((x @ w) + b > 0.0).long().numpy() == y).mean())


def node_effects(
    sae_mean: torch.Tensor, y: np.ndarray, w_probe: torch.Tensor, W_dec: torch.Tensor, scr: bool
) -> torch.Tensor:
    """``get_effects_per_class_precomputed_acts``: (mean_pos - mean_neg of the per-text mean latents)
    * (w_probe . W_dec[i]); TPP clamps the difference at 0 first; SCR takes |effect|."""
    yt = torch.as_tensor(y)
    diff = sae_mean[yt == 1].mean(0) - sae_mean[yt == 0].mean(0)
    dot = W_dec.float() @ w_probe.float()
    if not scr:
        diff = diff.clamp(min=0.0)
    eff = diff * dot
    return eff.abs() if scr else eff


def select_top_n(effects: torch.Tensor, n: int) -> torch.Tensor:
    """``select_top_n_features``: the top ``min(n, #non-zero)`` effects (indices)."""
    k = min(n, int((effects != 0).sum()))
    return torch.topk(effects, k).indices if k > 0 else torch.zeros(0, dtype=torch.long)


def scr_scores(
    ablated: Dict[int, Dict[str, float]], clean: Dict[str, float], ablated_dir2: Dict[int, Dict[str, float]]
) -> Dict[str, float]:
    """``get_scr_plotting_dict``: ``ablated`` = accuracies after ablating the "male / female" probe's
    latents, ``ablated_dir2`` after the "professor / nurse" probe's; both keyed by n then by
    "<probe> probe on <data> data"; ``clean`` = clean accuracies by the same names and by class."""
    out: Dict[str, float] = {}
    dir1_acc = clean[f"{BIASED} probe on professor / nurse data"]
    dir2_acc = clean[f"{BIASED} probe on male / female data"]
    for d, accs, data in ((1, ablated, "professor / nurse"), (2, ablated_dir2, "male / female")):
        for n, acc in accs.items():
            name = f"{BIASED} probe on {data} data"
            clean_acc, original = clean[data], clean[name]
            score = 0.0 if clean_acc - original < 0.001 else (acc[name] - original) / (clean_acc - original)
            out[f"scr_dir{d}_threshold_{n}"] = score
            if (dir1_acc < dir2_acc and d == 1) or (dir1_acc > dir2_acc and d == 2):
                out[f"scr_metric_threshold_{n}"] = score
    return out


def tpp_scores(
    ablated: Dict[str, Dict[int, Dict[str, float]]], clean: Dict[str, float]
) -> Tuple[Dict[str, float], Dict[str, Dict[str, float]]]:
    """``create_tpp_plotting_dict``: ablated[class][n][measured class] accuracies."""
    per_class: Dict[str, Dict[str, float]] = {}
    classes = list(clean)
    for c in classes:
        m = {}
        for n, accs in ablated[c].items():
            intended = clean[c] - accs[c]
            unintended = float(np.mean([clean[o] - accs[o] for o in classes if o != c]))
            m[f"tpp_threshold_{n}_total_metric"] = intended - unintended
            m[f"tpp_threshold_{n}_intended_diff_only"] = intended
            m[f"tpp_threshold_{n}_unintended_diff_only"] = unintended
        per_class[c] = m
    keys = next(iter(per_class.values())).keys()
    return {k: float(np.mean([m[k] for m in per_class.values()])) for k in keys}, per_class


def average_runs(results: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """``general_utils.average_results_dictionaries``: per metric, the mean over the runs that have it."""
    keys = sorted({k for r in results.values() for k in r})
    return {k: float(np.mean([r[k] for r in results.values() if k in r])) for k in keys}


def _one_run(
    lm: Any,
    sae: Any,
    layer: int,
    hook: str,
    s: Dict[str, Any],
    seed: int,
    train: Dict[str, List[str]],
    test: Dict[str, List[str]],
    scr: bool,
) -> Tuple[Dict[str, float], Dict[str, Any]]:
    ctx, lb = int(s["context_size"]), int(s["llm_batch_size"])
    tr = {k: text_acts(lm, sae, v, layer, hook, ctx, lb) for k, v in train.items()}
    te = {k: text_acts(lm, sae, v, layer, hook, ctx, lb) for k, v in test.items()}
    rng = np.random.default_rng(seed)
    probe_keys = list(train)  # SAEBench trains a probe for every key
    chosen = list(PAIRED) if scr else list(train)
    W_dec = sae.W_dec.detach().float().cpu()
    probes: Dict[str, Tuple[torch.Tensor, float]] = {}
    train_tasks, test_tasks = {}, {}
    with few_threads():
        for k in probe_keys:
            train_tasks[k] = build_task({c: len(v) for c, v in train.items()}, k, scr, rng)
            test_tasks[k] = build_task({c: len(v) for c, v in test.items()}, k, scr, rng)
            xtr = _cat(tr, "meaned")[train_tasks[k][0]]
            xte = _cat(te, "meaned")[test_tasks[k][0]]
            res = train_probe_torch(
                xtr.numpy(),
                train_tasks[k][1],
                xte.numpy(),
                test_tasks[k][1],
                batch_size=int(s["probe_train_batch_size"]),
                epochs=int(s["probe_epochs"]),
                lr=float(s["probe_lr"]),
                seed=stable_seed(seed, "probe", k),
                l1_penalty=float(s["probe_l1_penalty"]),
                early_stopping_patience=int(s["early_stopping_patience"]),
            )
            probes[k] = (res["weight"], res["bias"])

    def accuracies(meaned: torch.Tensor) -> Dict[str, float]:
        """``get_probe_test_accuracy`` (+ ``get_scr_probe_test_accuracy`` for SCR) on the test keys'
        meaned activations laid end to end."""
        out = {}
        for c in chosen:
            x = meaned[test_tasks[c][0]]
            out[c] = probe_accuracy(*probes[c], x, test_tasks[c][1])
            if scr:
                for other in chosen:
                    if other != c:
                        out[f"{other} probe on {c} data"] = probe_accuracy(*probes[other], x, test_tasks[c][1])
        return out

    te_meaned, te_f_sum, te_count = _cat(te, "meaned"), _cat(te, "f_sum_all"), _cat(te, "count")
    clean = accuracies(te_meaned)
    ablated: Dict[str, Dict[int, Dict[str, float]]] = {}
    for c in chosen:
        x_sae = _cat(tr, "sae_mean")[train_tasks[c][0]]
        eff = node_effects(x_sae, train_tasks[c][1], probes[c][0], W_dec, scr)
        ablated[c] = {}
        for n in s["n_values"]:
            sel = select_top_n(eff, int(n))
            # x' = x - sum_{i in S} f_i W_dec[i] at every position (the linear decoder), then meaned
            ablated[c][int(n)] = accuracies(te_meaned - (te_f_sum[:, sel] @ W_dec[sel]) / te_count[:, None])
    detail = {
        "clean_accuracies": clean,
        "ablated_accuracies": {c: {str(n): v for n, v in d.items()} for c, d in ablated.items()},
    }
    if scr:
        return scr_scores(ablated["male / female"], clean, ablated["professor / nurse"]), detail
    overall, per_class = tpp_scores(ablated, {c: clean[c] for c in chosen})
    detail["per_class"] = per_class
    return overall, detail


def run_scr_or_tpp(
    lm: Any, sae: Any, layer: int, hook: str, seed: int, settings: Any, scr: bool, cache_dir: Optional[str] = None
) -> EvalOutput:
    name = "scr" if scr else "tpp"
    s = settings_dict(ScrTppSettings, settings, f"eval.{name}")
    config = {
        **s,
        "layer": layer,
        "hook": hook,
        "random_seed": seed,
        "perform_scr": scr,
        "reference": "SAEBench 0.6.0 sae_bench/evals/scr_and_tpp",
    }
    if max(s["n_values"]) > sae.W_dec.shape[0]:
        raise ValueError(
            f"eval.{name}.n_values: {max(s['n_values'])} latents to ablate, the SAE has {sae.W_dec.shape[0]}"
        )
    check_linear_decoder(sae, int(sae.W_dec.shape[1]))
    results: Dict[str, Dict[str, float]] = {}
    details: List[Dict[str, Any]] = []
    unavailable: Dict[str, str] = {}
    for ds in s["dataset_names"]:
        try:
            if scr:
                runs = scr_runs(ds, s, seed, cache_dir)
            else:
                tr, te = tpp_data(ds, s, seed, cache_dir)
                runs = [(f"{ds}_tpp", tr, te)]
        except TaskUnavailable as e:
            log.warning("%s: %s", name, e)
            unavailable[ds] = str(e)
            continue
        for run_name, train, test in runs:
            res, detail = _one_run(lm, sae, layer, hook, s, stable_seed(seed, run_name), train, test, scr)
            results[run_name] = res
            details.append({"run": run_name, "dataset_name": ds, **res, **detail})
    if not results:
        return EvalOutput.skipped(
            name, config, "no dataset available: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items())
        )
    metrics = {f"{name}_metrics": average_runs(results)}
    flags = {"unavailable": sorted(unavailable)} if unavailable else {}
    return EvalOutput(
        eval_type_id=name,
        config=config,
        metrics=metrics,
        details=details,
        flags=flags,
        unstructured={"unavailable": unavailable},
    )


# What the evals log (flattened as scr/scr_metrics/<metric> and tpp/tpp_metrics/<metric>); {n} runs
# over n_values, the number of latents ablated. Every value is the mean over the runs that have it:
# SCR runs are (dataset, class pair), TPP runs are datasets (each already a mean over its classes).
_SB = "SAEBench 0.6.0 scr_and_tpp"
SCR_METRICS = (
    Metric(
        "scr/scr_metrics/scr_metric_threshold_{n}",
        "SCR top-{n}",
        "higher",
        "normalised accuracy gain",
        "SAEBench's SCR score: scr_dir1_threshold_n when the biased probe's clean accuracy on the class data is "
        "below its accuracy on the spurious data, scr_dir2_threshold_n when above (absent from a run when "
        "equal). 1: ablating n latents removes the spurious correlation as well as a probe trained on the "
        "class alone; 0: no change.",
        _SB,
    ),
    Metric(
        "scr/scr_metrics/scr_dir1_threshold_{n}",
        "SCR dir 1 top-{n}",
        "higher",
        "normalised accuracy gain",
        "(A_ablated - A_biased) / (A_class - A_biased): the accuracy on the class-only data (both spurious "
        "values) of the probe trained on perfectly biased data, after ablating the n latents with the "
        "largest |effect| on the spurious-attribute probe (A_ablated) and before (A_biased), normalised by "
        "the class probe's own clean accuracy A_class; 0 when the denominator is below 0.001.",
        _SB,
    ),
    Metric(
        "scr/scr_metrics/scr_dir2_threshold_{n}",
        "SCR dir 2 top-{n}",
        "higher",
        "normalised accuracy gain",
        "Direction 1 with the roles swapped: the biased probe's accuracy on the spurious-attribute data after "
        "ablating the n latents with the largest |effect| on the class probe, normalised by the spurious "
        "probe's clean accuracy.",
        _SB,
    ),
)
TPP_METRICS = (
    Metric(
        "tpp/tpp_metrics/tpp_threshold_{n}_total_metric",
        "TPP top-{n}",
        "higher",
        "accuracy drop",
        "intended_diff_only - unintended_diff_only: ablating a class's n latents should hurt its own probe "
        "and no other. Mean over classes, then datasets.",
        _SB,
    ),
    Metric(
        "tpp/tpp_metrics/tpp_threshold_{n}_intended_diff_only",
        "TPP intended top-{n}",
        "higher",
        "accuracy drop",
        "Clean minus ablated test accuracy of class i's one-vs-rest probe after ablating the n latents with "
        "the largest positive effect on it (mean over classes i). Higher: the latents really carry the "
        "class.",
        _SB,
    ),
    Metric(
        "tpp/tpp_metrics/tpp_threshold_{n}_unintended_diff_only",
        "TPP unintended top-{n}",
        "lower",
        "accuracy drop",
        "Mean over the other classes j of the clean minus ablated accuracy of probe j (on its own data) after "
        "ablating class i's n latents (mean over classes i). Lower: the ablation leaves other concepts "
        "alone.",
        _SB,
    ),
)


@register_eval("scr", ScrTppSettings, SCR_METRICS)
def run_scr(ctx: Any) -> EvalOutput:
    return run_scr_or_tpp(ctx.lm, ctx.sae, ctx.layer, ctx.hook, ctx.seed, ctx.settings, True, ctx.cache_dir)


@register_eval("tpp", ScrTppSettings, TPP_METRICS)
def run_tpp(ctx: Any) -> EvalOutput:
    return run_scr_or_tpp(ctx.lm, ctx.sae, ctx.layer, ctx.hook, ctx.seed, ctx.settings, False, ctx.cache_dir)
