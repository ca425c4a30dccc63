"""What the probing evals share: labelled text tasks, mean-pooled activations, logistic-regression
probes, and the chance-level test.

Tasks come from two places:

* Hugging Face Hub datasets by name (SAEBench's sparse-probing sets, FaithfulSAE's downstream
  sets). Offline they raise :class:`TaskUnavailable` with the hub id and the reason, and the eval
  reports them as skipped instead of dropping them silently.
* Offline tasks built from the standard library, the same source as the built-in corpus: every
  docstring is labelled by the package it comes from (``stdlib_package``) and by what it documents,
  a class or a function/method (``stdlib_kind``). No network, same content on every machine with
  the same Python build.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import json
import logging
import math
import os
import pkgutil
import re
import warnings
import zlib
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "HUB_TASKS",
    "OFFLINE_TASKS",
    "TaskUnavailable",
    "TextTask",
    "at_chance",
    "chance_bound",
    "few_threads",
    "encode_texts",
    "fit_probe",
    "load_task",
    "pooled_features",
    "stable_seed",
    "fit_sklearn_probe_raw",
    "stdlib_labelled_docs",
    "top_k_by_mean_diff",
    "train_probe_torch",
]


class TaskUnavailable(RuntimeError):
    """A probing task whose data cannot be had here (hub dataset offline, too few examples)."""


@dataclass
class TextTask:
    name: str
    texts: List[str]
    labels: List[str]
    source: str  # "stdlib" or the hub id


def stable_seed(seed: int, *parts: Any) -> int:
    """A seed derived from ``seed`` and names, stable across processes (``hash()`` is salted)."""
    return (int(seed) * 1_000_003 + zlib.crc32("/".join(map(str, parts)).encode())) % (2**31)


@contextmanager
def few_threads(n: int = 1):
    """Run many SMALL ops (probe fits, a tiny Adam loop) on ``n`` threads, then restore.

    On a shared CPU, torch's and BLAS's thread pools spin-wait on each small op; measured here,
    100 Adam steps on a 26x60 probe took 2.5 s on 2 threads under load and 0.23 s on one.
    """
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


# Offline tasks from the standard library

DEFAULT_PACKAGES = ("asyncio", "email", "xml", "multiprocessing", "logging")
_MIN_DOC_CHARS = 40  # same floor as the corpus: shorter docstrings are mostly boilerplate
_SKIP = re.compile(r"(^|\.)(__main__|_?tests?|test_\w*)($|\.)")


def _clean(doc: Any) -> Optional[str]:
    if not isinstance(doc, str):
        return None
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in inspect.cleandoc(doc).splitlines())).strip()
    return text if len(text) >= _MIN_DOC_CHARS else None


def _walk_package(top: str) -> List[str]:
    mod = importlib.import_module(top)
    names = [top]
    if hasattr(mod, "__path__"):
        for info in pkgutil.walk_packages(mod.__path__, top + ".", onerror=lambda _n: None):
            if not _SKIP.search(info.name):
                names.append(info.name)
    return sorted(names)


def _collect(packages: Sequence[str]) -> List[Tuple[str, str, str]]:
    """(text, package, kind) for each docstring defined in ``packages``; kind in module/class/function."""
    rows: Dict[str, Tuple[str, str]] = {}
    conflicted: set = set()
    sink = io.StringIO()

    def add(text: Optional[str], package: str, kind: str) -> None:
        if text is None:
            return
        if text in rows and rows[text] != (package, kind):
            conflicted.add(text)  # same docstring in two places with different labels: unusable
        rows.setdefault(text, (package, kind))

    for top in packages:
        with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
            warnings.simplefilter("ignore")
            names = _walk_package(top)
            modules = []
            for name in names:
                try:
                    modules.append((name, importlib.import_module(name)))
                except BaseException as e:  # platform-specific modules, optional C extensions
                    if isinstance(e, KeyboardInterrupt):
                        raise
        for name, module in modules:
            add(_clean(module.__doc__), top, "module")
            for _attr, obj in sorted(vars(module).items()):
                try:
                    if getattr(obj, "__module__", None) != name:
                        continue
                    if inspect.isclass(obj):
                        add(_clean(obj.__doc__), top, "class")
                        for _m, member in sorted(vars(obj).items()):
                            if isinstance(member, (classmethod, staticmethod)):
                                member = member.__func__
                            if isinstance(member, property):
                                member = member.fget
                            if inspect.isroutine(member) and getattr(member, "__module__", name) == name:
                                add(_clean(member.__doc__), top, "function")
                    elif inspect.isroutine(obj):
                        add(_clean(obj.__doc__), top, "function")
                except Exception:  # objects whose attribute access raises
                    continue
    out = [(t, p, k) for t, (p, k) in rows.items() if t not in conflicted]
    out.sort(key=lambda r: hashlib.sha1(r[0].encode()).digest())  # order independent of import order
    return out


def stdlib_labelled_docs(
    packages: Sequence[str] = DEFAULT_PACKAGES, cache_dir: Optional[str] = None
) -> List[Tuple[str, str, str]]:
    """Labelled docstrings ``(text, package, kind)``, cached as JSON under ``<cache_dir>/text/``."""
    import sys

    packages = tuple(sorted(packages))
    key = hashlib.sha1(json.dumps([sys.version, packages, "v1"]).encode()).hexdigest()[:12]
    path = Path(os.path.expanduser(cache_dir)) / "text" / f"stdlib-probe-docs-{key}.json" if cache_dir else None
    if path is not None and path.exists():
        return [tuple(r) for r in json.loads(path.read_text())]
    rows = _collect(packages)
    if path is not None:
        from sae_sweep.util.files import atomic_write

        atomic_write(path, json.dumps(rows))
    return rows


OFFLINE_TASKS = ("stdlib_package", "stdlib_kind")

# name -> (hub id, config, text column, label column, classes to keep or None for all).
# SAEBench's sparse-probing sets and FaithfulSAE's downstream sets; offline these raise TaskUnavailable.
HUB_TASKS: Dict[str, Tuple[str, Optional[str], str, str, Optional[List[int]]]] = {
    "LabHC/bias_in_bios_class_set1": ("LabHC/bias_in_bios", None, "hard_text", "profession", [0, 1, 2, 6, 9]),
    "LabHC/bias_in_bios_class_set2": ("LabHC/bias_in_bios", None, "hard_text", "profession", [11, 13, 14, 18, 19]),
    "LabHC/bias_in_bios_class_set3": ("LabHC/bias_in_bios", None, "hard_text", "profession", [20, 21, 22, 25, 26]),
    "fancyzhx/ag_news": ("fancyzhx/ag_news", None, "text", "label", None),
    "ag_news": ("fancyzhx/ag_news", None, "text", "label", None),
    "sst2": ("nyu-mll/glue", "sst2", "sentence", "label", None),
    "cola": ("nyu-mll/glue", "cola", "sentence", "label", None),
    "yelp_polarity": ("fancyzhx/yelp_polarity", None, "text", "label", None),
}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds instead of in HTTP retry loops."""
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub_task(name: str, max_examples: int, seed: int) -> TextTask:
    hub_id, config, text_col, label_col, classes = HUB_TASKS[name]
    try:
        import datasets
        from datasets import load_dataset

        if not datasets.config.HF_HUB_OFFLINE and not _hub_reachable():
            # Unreachable hub: read the local datasets cache only (raises if the set is not there).
            datasets.config.HF_HUB_OFFLINE = True
            datasets.config.HF_DATASETS_OFFLINE = True
        ds = load_dataset(hub_id, config, split="train")
    except Exception as e:  # offline, gated, renamed: say which dataset and why
        raise TaskUnavailable(
            f"hub dataset {hub_id}{'/' + config if config else ''} for task {name!r} "
            f"could not be loaded ({type(e).__name__}: {str(e)[:200]}); "
            f"offline, use the built-in tasks {', '.join(OFFLINE_TASKS)}"
        ) from None
    rng = np.random.default_rng(stable_seed(seed, name))
    idx = rng.permutation(len(ds))[: max_examples * 4]
    rows = ds.select(sorted(idx.tolist()))
    texts, labels = [], []
    for t, y in zip(rows[text_col], rows[label_col]):
        if classes is None or int(y) in classes:
            texts.append(t)
            labels.append(str(y))
    return TextTask(name, texts[:max_examples], labels[:max_examples], hub_id)


# SAEBench's sparse-probing hub sets, drawn as its dataset_utils.py draws them (0.6.0):
# name -> (hub id, text column, class column, the column balanced within each class or None,
# SAEBench's chosen classes, dataset_info.py:117-126).
SAEBENCH_PROBE_SETS: Dict[str, Tuple[str, str, str, Optional[str], List[int]]] = {
    "LabHC/bias_in_bios_class_set1": ("LabHC/bias_in_bios", "hard_text", "profession", "gender", [0, 1, 2, 6, 9]),
    "LabHC/bias_in_bios_class_set2": ("LabHC/bias_in_bios", "hard_text", "profession", "gender", [11, 13, 14, 18, 19]),
    "LabHC/bias_in_bios_class_set3": ("LabHC/bias_in_bios", "hard_text", "profession", "gender", [20, 21, 22, 25, 26]),
    "fancyzhx/ag_news": ("fancyzhx/ag_news", "text", "label", None, [0, 1, 2, 3]),
}


def saebench_class_sample(
    df: Any, class_col: str, text_col: str, group_col: Optional[str], classes: Sequence[int], n: int, seed: int
) -> Dict[str, List[str]]:
    """One split's texts per class, drawn as SAEBench draws them from a pandas frame of that split.

    ``group_col`` set (bias_in_bios: gender): ``get_balanced_dataset`` (dataset_utils.py:275-319), with
    ``n // 2`` texts per (class, group) quadrant -- SAEBench's ``set_size // 4`` for its binary tasks --
    sampled ``df.sample(n, random_state=seed)`` in the frame's group order; a class with fewer than two
    groups or a smaller quadrant is left out, as there. ``group_col`` None (ag_news):
    ``gather_dataset_from_df`` (dataset_utils.py:88-112), ``n`` texts per class."""
    out: Dict[str, List[str]] = {}
    if group_col is None:
        for c in classes:
            texts = df[df[class_col] == c][text_col].sample(n=n, random_state=seed).tolist()
            out[str(c)] = texts
        return out
    per_quadrant = n // 2
    for c in df[class_col].unique():
        if int(c) not in classes:
            continue
        class_df = df[df[class_col] == c]
        if class_df[group_col].nunique() < 2 or class_df[group_col].value_counts().min() < per_quadrant:
            continue
        texts = []
        for _, group_df in class_df.groupby(group_col):
            texts += group_df.sample(n=per_quadrant, random_state=seed)[text_col].tolist()
        out[str(c)] = texts
    return out


def saebench_probe_splits(
    name: str, train_set_size: int, test_set_size: int, seed: int, load: Optional[Any] = None
) -> Dict[str, Tuple[List[str], List[str]]]:
    """Per class, (train texts, test texts) of SAEBench's sparse-probing set ``name``: the train texts
    from the dataset's train split and the test texts from its test split, ``train_set_size // 2`` and
    ``test_set_size // 2`` per class (bias_in_bios balanced by gender), classes present in both
    (``ensure_shared_keys``). ``load(hub_id)`` returns the DatasetDict (default: datasets.load_dataset)."""
    hub_id, text_col, class_col, group_col, classes = SAEBENCH_PROBE_SETS[name]
    try:
        if load is None:
            import datasets
            from datasets import load_dataset

            if not datasets.config.HF_HUB_OFFLINE and not _hub_reachable():
                datasets.config.HF_HUB_OFFLINE = True
                datasets.config.HF_DATASETS_OFFLINE = True
            load = load_dataset
        ds = load(hub_id)
        train_df, test_df = ds["train"].to_pandas(), ds["test"].to_pandas()
    except Exception as e:  # offline, gated, renamed: say which dataset and why
        raise TaskUnavailable(
            f"hub dataset {hub_id} for task {name!r} could not be loaded ({type(e).__name__}: {str(e)[:200]}); "
            f"offline, use the built-in tasks {', '.join(OFFLINE_TASKS)}"
        ) from None
    try:
        train = saebench_class_sample(train_df, class_col, text_col, group_col, classes, train_set_size // 2, seed)
        test = saebench_class_sample(test_df, class_col, text_col, group_col, classes, test_set_size // 2, seed)
    except ValueError as e:  # pandas: a class smaller than the sample
        raise TaskUnavailable(f"task {name!r}: {e}") from None
    shared = sorted(set(train) & set(test), key=int)
    if len(shared) < 2:
        raise TaskUnavailable(f"task {name!r}: fewer than two classes have enough texts in both splits")
    return {c: (train[c], test[c]) for c in shared}


def load_task(
    name: str,
    *,
    seed: int,
    cache_dir: Optional[str],
    max_examples: int,
    packages: Sequence[str] = DEFAULT_PACKAGES,
    min_per_class: int = 20,
) -> TextTask:
    """A labelled text task by name: an offline ``stdlib_*`` task or a hub dataset from HUB_TASKS."""
    if name in OFFLINE_TASKS:
        rows = stdlib_labelled_docs(packages, cache_dir)
        if name == "stdlib_package":
            pairs = [(t, p) for t, p, _k in rows]
        else:  # class vs function docstrings (module docstrings are too few to balance)
            pairs = [(t, k) for t, _p, k in rows if k in ("class", "function")]
        # Cap each class so a task stays small and classes stay comparable in size.
        per_class = max(1, max_examples // max(1, len({y for _, y in pairs})))
        rng = np.random.default_rng(stable_seed(seed, name, "subsample"))
        by: Dict[str, List[str]] = {}
        for t, y in pairs:
            by.setdefault(y, []).append(t)
        texts, labels = [], []
        for y in sorted(by):
            pick = rng.permutation(len(by[y]))[:per_class]
            texts += [by[y][i] for i in sorted(pick)]
            labels += [y] * len(pick)
        small = {y: len(v) for y, v in by.items() if len(v) < min_per_class}
        if small:
            raise TaskUnavailable(f"task {name!r}: classes with fewer than {min_per_class} examples: {small}")
        return TextTask(name, texts, labels, "stdlib")
    if name in HUB_TASKS:
        return _load_hub_task(name, max_examples, seed)
    raise ValueError(
        f"unknown probing task {name!r}: allowed values are {', '.join(list(OFFLINE_TASKS) + sorted(HUB_TASKS))}"
    )


# Activations


def encode_texts(lm: Any, texts: Sequence[str], context_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[BOS] + tokens[:context_size-1]``, right-padded; returns ids and a mask of scored tokens.

    Right padding keeps a causal model's activations at real positions exact, so no attention mask
    is needed; padding and special tokens are left out of the mask (SAEBench mean-pools over
    non-special tokens).
    """
    tok = lm.tokenizer
    bos = lm.bos_token_id
    pad = (
        tok.pad_token_id
        if tok.pad_token_id is not None
        else (tok.eos_token_id if tok.eos_token_id is not None else bos)
    )
    special = {int(t) for t in lm.special_token_ids if t is not None}
    body = [tok(t, add_special_tokens=False, truncation=True, max_length=context_size - 1)["input_ids"] for t in texts]
    width = 1 + max((len(b) for b in body), default=0)
    ids = torch.full((len(texts), width), int(pad), dtype=torch.long)
    keep = torch.zeros((len(texts), width), dtype=torch.bool)
    for i, b in enumerate(body):
        ids[i, 0] = int(bos)
        if b:
            row = torch.tensor(b, dtype=torch.long)
            ids[i, 1 : 1 + len(b)] = row
            keep[i, 1 : 1 + len(b)] = ~torch.isin(row, torch.tensor(sorted(special) or [-1]))
    return ids, keep


def _sae_param(sae: torch.nn.Module) -> torch.Tensor:
    return next(iter(sae.parameters()))


# sparse_probing and downstream pool the same task texts for the same SAE: keep the last few results.
_POOL_CACHE: Dict[Tuple, Dict[str, np.ndarray]] = {}
_POOL_CACHE_SIZE = 4


def _pool_key(lm: Any, sae: torch.nn.Module, ids: torch.Tensor, keep: torch.Tensor, layer: int, hook: str) -> Tuple:
    # Object ids can be reused after garbage collection, so the SAE's weights are part of the key.
    weights = tuple(
        (n, tuple(t.shape), float(t.detach().double().sum()), float(t.detach().double().abs().sum()))
        for n, t in sae.named_parameters()
    )
    digest = hashlib.sha1(ids.numpy().tobytes() + keep.numpy().tobytes()).hexdigest()
    return (id(lm), id(sae), weights, layer, hook, digest)


@torch.no_grad()
def pooled_features(
    lm: Any, sae: torch.nn.Module, ids: torch.Tensor, keep: torch.Tensor, layer: int, hook: str, batch_size: int = 32
) -> Dict[str, np.ndarray]:
    """Mean over scored tokens of the LM activation (``llm``), the SAE latents (``sae``) and the
    SAE reconstruction (``recon``), one row per text (float32 numpy). Texts are batched by length so
    padding costs little. A text with no scored token gets zeros. Recent results are reused."""
    key = _pool_key(lm, sae, ids, keep, layer, hook)
    if key in _POOL_CACHE:
        return _POOL_CACHE[key]
    out = _pool(lm, sae, ids, keep, layer, hook, batch_size)
    while len(_POOL_CACHE) >= _POOL_CACHE_SIZE:
        _POOL_CACHE.pop(next(iter(_POOL_CACHE)))
    _POOL_CACHE[key] = out
    return out


def _pool(
    lm: Any, sae: Any, ids: torch.Tensor, keep: torch.Tensor, layer: int, hook: str, batch_size: int
) -> Dict[str, np.ndarray]:
    p = _sae_param(sae)
    d_sae, d_in = sae.W_dec.shape
    n = ids.shape[0]
    out = {
        "llm": np.zeros((n, d_in), np.float32),
        "sae": np.zeros((n, d_sae), np.float32),
        "recon": np.zeros((n, d_in), np.float32),
    }
    order = torch.argsort(keep.sum(1), descending=True)
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        b_keep = keep[rows]
        if not b_keep.any():
            continue
        width = int(b_keep.nonzero()[:, 1].max()) + 1
        b_keep = b_keep[:, :width]
        acts = lm.activations(ids[rows, :width].to(lm.device), layer, hook)
        x = acts[b_keep.to(acts.device)].to(device=p.device, dtype=p.dtype)  # [n_scored, d_in]
        x_hat, f = sae(x)
        owner = b_keep.nonzero()[:, 0].to(p.device)  # which text each scored token belongs to
        count = b_keep.sum(1).clamp_min(1).to(p.device, torch.float32)[:, None]
        for key, val in (("llm", x), ("sae", f), ("recon", x_hat)):
            pooled = torch.zeros(len(rows), val.shape[-1], device=p.device, dtype=torch.float32)
            pooled.index_add_(0, owner, val.float())
            out[key][rows.numpy()] = (pooled / count).cpu().numpy()
    return out


# Probes


NEWTON_MAX_DIM = 1024


def fit_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    seed: int,
    C: float = 1.0,
    max_iter: int = 1000,
    class_weight: Optional[str] = None,
) -> Dict[str, float]:
    """Standardised logistic regression; test accuracy and macro F1.

    Standardising makes one ``C`` sensible for LM activations, SAE latents and reconstructions whose
    scales differ by orders of magnitude; constant columns (dead latents) are left as zeros.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    # Newton steps converge in a few iterations even on (near-)separable sets, where L-BFGS crawls to
    # max_iter; its d x d Hessian is only affordable for narrow inputs.
    n_classes = len(np.unique(y_train))
    newton = x_train.shape[1] <= NEWTON_MAX_DIM and x_train.shape[1] * max(1, n_classes) <= 4 * NEWTON_MAX_DIM
    solver = "newton-cholesky" if newton else "lbfgs"
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed, class_weight=class_weight, solver=solver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on tiny, separable sets is expected
        clf.fit(scaler.transform(x_train), y_train)
    pred = clf.predict(scaler.transform(x_test))
    return {
        "acc": float(accuracy_score(y_test, pred)),
        "f1": float(f1_score(y_test, pred, average="macro")),
        "n_test": int(len(y_test)),
    }


def top_k_by_mean_diff(x: np.ndarray, y: np.ndarray, k: int, mode: str = "abs") -> np.ndarray:
    """Indices of the ``k`` columns with the largest mean difference between positives and negatives.

    ``abs`` (SAEBench ``probe_training.get_top_k_mean_diff_mask``, sae_bench/evals/sparse_probing/
    probe_training.py:91-108): ``|mean(x | y=1) - mean(x | y=0)|``, descending, so a latent that fires
    LESS on the class ranks as high as one that fires more. ``signed``: ``mean(x | y=1) - mean(x | y=0)``
    only (latents that fire more on the class). Ties keep column order (stable sort)."""
    diff = x[y == 1].mean(0) - x[y == 0].mean(0)
    if mode == "abs":
        diff = np.abs(diff)
    elif mode != "signed":
        raise ValueError(f"top-k selection {mode!r}: allowed values are abs, signed")
    k = min(k, x.shape[1])
    return np.argsort(-diff, kind="stable")[:k]


def fit_sklearn_probe_raw(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    C: float = 1.0,
    max_iter: int = 1000,
) -> Dict[str, float]:
    """SAEBench's ``train_sklearn_probe`` (probe_training.py:134-182): ``LogisticRegression(penalty="l2",
    C=1, max_iter=1000)`` with sklearn's default solver (lbfgs), on the RAW float32 features (no
    standardisation); test accuracy of ``predict``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    clf = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning, as SAEBench's runs print and ignore
        clf.fit(np.asarray(x_train, np.float32), y_train)
    pred = clf.predict(np.asarray(x_test, np.float32))
    return {
        "acc": float(accuracy_score(y_test, pred)),
        "f1": float(f1_score(y_test, pred, average="macro")),
        "n_test": int(len(y_test)),
    }


def _linear_init(d_in: int, d_out: int, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``nn.Linear``'s default init (U(-1/sqrt(d_in), 1/sqrt(d_in)) for weight and bias), seeded."""
    bound = 1.0 / math.sqrt(d_in)
    w = (torch.rand(d_out, d_in, generator=g) * 2 - 1) * bound
    b = (torch.rand(d_out, generator=g) * 2 - 1) * bound
    return w, b


def train_probe_torch(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int,
    l1_penalty: Optional[float] = None,
    early_stopping_patience: int = 10,
) -> Dict[str, Any]:
    """SAEBench's ``train_probe_gpu`` (probe_training.py:234-304): a binary ``nn.Linear(dim, 1)`` with
    default init, ``AdamW(lr)`` (weight decay 0.01), ``BCEWithLogitsLoss`` (+ ``l1_penalty * sum|w|``),
    fresh shuffling each epoch; after every epoch the TEST accuracy (logit > 0) is measured and the
    probe with the best one so far is kept; stops after ``early_stopping_patience`` epochs without
    improvement. Returns ``acc`` (that best test accuracy), ``weight [dim]``, ``bias``. Seeded (SAEBench
    draws from torch's global generator)."""
    with torch.inference_mode(False), torch.enable_grad():
        return _train_probe_torch(
            x_train, y_train, x_test, y_test, batch_size, epochs, lr, seed, l1_penalty, early_stopping_patience
        )


def _train_probe_torch(
    x_train, y_train, x_test, y_test, batch_size, epochs, lr, seed, l1_penalty, early_stopping_patience
) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(int(seed))
    xtr = torch.as_tensor(np.asarray(x_train, np.float32))
    ytr = torch.as_tensor(np.asarray(y_train)).float()
    xte = torch.as_tensor(np.asarray(x_test, np.float32))
    yte = torch.as_tensor(np.asarray(y_test)).long()
    w0, b0 = _linear_init(xtr.shape[1], 1, g)
    w, b = w0.requires_grad_(), b0.requires_grad_()
    opt = torch.optim.AdamW([w, b], lr=lr)
    best_acc, best, patience = 0.0, None, 0

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float(((x @ w.T + b).squeeze(-1) > 0.0).long().eq(y).float().mean())

    for _epoch in range(epochs):
        order = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch_size):
            idx = order[i : i + batch_size]
            logits = (xtr[idx] @ w.T + b).squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, ytr[idx])
            if l1_penalty is not None:
                loss = loss + l1_penalty * w.abs().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = accuracy(xte, yte)
        if acc > best_acc:
            best_acc, best, patience = acc, (w.detach().clone(), b.detach().clone()), 0
        else:
            patience += 1
        if patience >= early_stopping_patience:
            break
    if best is None:  # SAEBench asserts here (test accuracy never above 0)
        best = (w.detach().clone(), b.detach().clone())
    return {"acc": best_acc, "weight": best[0][0], "bias": float(best[1][0]), "n_test": int(len(yte))}


def chance_bound(n_test: int, chance: float, z: float = 2.0) -> float:
    """Highest accuracy a classifier at ``chance`` reaches by luck on ``n_test`` examples (z sigma)."""
    if n_test <= 0:
        return 1.0
    return chance + z * math.sqrt(chance * (1 - chance) / n_test)


def at_chance(accuracies: Iterable[float], n_test: int, chance: float, z: float = 2.0) -> bool:
    """True when EVERY given accuracy is within the luck bound of chance: no k learned anything."""
    bound = chance_bound(n_test, chance, z)
    accs = list(accuracies)
    return bool(accs) and all(a <= bound for a in accs)
