"""SAEBench's ``absorption_first_letter`` eval (Chanin et al.'s feature absorption, with Till's
absorption fraction).

Reference: SAEBench 0.6.0 ``sae_bench/evals/absorption/`` (``main.py``, ``probing.py``,
``k_sparse_probing.py``, ``feature_absorption_calculator.py``, ``vocab.py``, ``prompting.py``;
github.com/adamkarvonen/SAEBench @8042bb38). By default each step is SAEBench's:

1. Vocabulary (``vocab.get_alpha_tokens``): every token that decodes to ASCII letters after at most
   one leading space -- no minimum length, no cap (``min_word_length``, ``max_words`` can change
   that); 80 / 20 train / test split.
2. Prompts: ``"\n"`` then ``n_icl_examples`` (10) examples ``"{word} has the first letter: X"``
   joined by newlines, then ``"\n{word} has the first letter:"``; train words take their examples
   from the train words, test words from the test words. The LM activation is read AT THE WORD
   TOKEN (prompts are assembled from token ids; SAEBench's position -6 is that token when the text
   after the word is 5 tokens, as for GPT-2, Gemma and SmolLM2 tokenizers), at the SAE's hook
   (SAEBench: always ``hook_resid_post``, i.e. the same for resid_post SAEs).
3. Ground truth (``gt_probe="saebench"``): one 26-output linear probe (``train_multi_probe``): BCE
   with ``pos_weight = n_neg / n_pos`` per letter, Adam lr 1e-2 with weight decay 1e-4, decayed
   exponentially per epoch to 1e-5, batch 64, 50 epochs; test F1 per letter at logit > 0. A letter
   counts when F1 ``>`` ``min_GT_probe_f1`` (strict); fewer than ``min_feats_for_eval`` letters ->
   "skipped" with the per-letter F1s (SAEBench stops there).
4. k-sparse probes: the same multi-probe on SAE latents with ``+ 0.01 * mean_letter(sum|w|)``, weight
   decay 1e-6, batch 4096, 50 epochs ranks latents (largest SIGNED weight); for k = 1..10 an sklearn
   ``LogisticRegression(max_iter=500, class_weight="balanced")`` (lbfgs) on the RAW latents of the
   top k, test F1; the main ("split") latents are the top-k set reached while F1 jumps by more than
   ``f1_jump_threshold``.
5. Absorption for each test word the probe detects (true positive), on a NEW prompt whose examples
   come from the whole vocabulary: u = unit probe direction, cos_i = cos(W_dec[i], u), projection of
   latent i p_i = f_i * cos_i (``projection="cosine"``), a = x . u;
   * absorption fraction: 0 if main >= a or A / a < 0.4; 1 if main <= 0; else
     min(A, a - main) / (min(A, a - main) + main), with A = the sum of the top 3 p_i of non-main
     latents with cos_i >= 0.1 and p_i > 0;
   * full absorption: every main latent < 1e-8, the top projecting latent has cos >= 0.025, a >= 0
     and p_top / a >= 0.4.
   Per letter: sums over true positives / their count; across letters: mean and sample std.

Named options beside the reference: ``gt_probe="sklearn"`` (per-letter balanced sklearn logistic
regression on x / mean||x||), ``k_sparse_probe="standardised"`` (standardised newton-cholesky fits),
``projection="decoder_dot"`` (p_i = f_i * (W_dec[i] . u), the true share of a's projection for
non-unit decoder rows). Remaining differences: prompts, splits and probe inits are seeded (SAEBench
seeds nothing here); probes stay float32 (SAEBench reloads the LM probe in bf16 on CUDA); a letter
with no training word gets pos_weight 1 instead of SAEBench's infinite weight; a == 0 gives
fraction 0 and no full absorption (SAEBench divides by zero).

Metrics (category ``mean``, SAEBench names): ``mean_absorption_fraction_score``,
``mean_full_absorption_score``, ``mean_num_split_features`` and their ``std_dev_*``; details: one
row per scored letter. A letter whose k-sparse probe F1 is no better than always answering "yes"
for every k is flagged (chance level).
"""

from __future__ import annotations

import logging
import math
import string
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sae_sweep.config import choice, setting
from sae_sweep.evals.probes import few_threads, stable_seed
from sae_sweep.evals.registry import register_eval, settings_dict
from sae_sweep.evals.schema import EvalOutput
from sae_sweep.util.metrics import Metric

log = logging.getLogger(__name__)

EVAL_TYPE_ID = "absorption_first_letter"
LETTERS = string.ascii_lowercase


@dataclass
class AbsorptionSettings:
    """``eval.absorption``: SAEBench's AbsorptionEvalConfig names and defaults, then
    FeatureAbsorptionCalculator's thresholds, then sizes for small machines (ours)."""

    f1_jump_threshold: float = setting(0.03, allowed="a float >= 0", check=lambda v: v >= 0)
    max_k_value: int = setting(10, allowed="an integer >= 1", check=lambda v: v >= 1)
    prompt_template: str = setting(
        "{word} has the first letter:", allowed="a string containing {word}", check=lambda v: "{word}" in v
    )
    k_sparse_probe_l1_decay: float = setting(0.01, allowed="a float >= 0", check=lambda v: v >= 0)
    k_sparse_probe_batch_size: int = setting(4096, allowed="an integer >= 1", check=lambda v: v >= 1)
    k_sparse_probe_num_epochs: int = setting(50, allowed="an integer >= 1", check=lambda v: v >= 1)
    min_GT_probe_f1: float = setting(0.6, allowed="a float in [0, 1]", check=lambda v: 0 <= v <= 1)
    min_feats_for_eval: int = setting(
        20, allowed="an integer in [1, 26] (letters that must pass the F1 threshold)", check=lambda v: 1 <= v <= 26
    )
    llm_batch_size: int = setting(32, allowed="an integer >= 1", check=lambda v: v >= 1)
    n_icl_examples: int = setting(10, allowed="an integer >= 0 (SAEBench: 10)", check=lambda v: v >= 0)
    gt_probe: str = choice("saebench", ("saebench", "sklearn"))
    gt_probe_batch_size: int = setting(64, allowed="an integer >= 1 (SAEBench: 64)", check=lambda v: v >= 1)
    gt_probe_num_epochs: int = setting(50, allowed="an integer >= 1 (SAEBench: 50)", check=lambda v: v >= 1)
    gt_probe_lr: float = setting(1e-2, allowed="a float > 0 (SAEBench: 0.01)", check=lambda v: v > 0)
    gt_probe_weight_decay: float = setting(1e-4, allowed="a float >= 0 (SAEBench: 1e-4)", check=lambda v: v >= 0)
    k_sparse_probe_l2_decay: float = setting(1e-6, allowed="a float >= 0 (SAEBench: 1e-6)", check=lambda v: v >= 0)
    k_sparse_probe: str = choice("saebench", ("saebench", "standardised"))
    projection: str = choice("cosine", ("cosine", "decoder_dot"))
    full_absorption_probe_cos_sim_threshold: float = 0.025
    absorption_fraction_probe_cos_sim_threshold: float = 0.1
    probe_projection_proportion_threshold: float = 0.4
    absorption_fraction_max_absorbing_latents: int = setting(3, allowed="an integer >= 1", check=lambda v: v >= 1)
    max_words: Optional[int] = setting(
        None,
        allowed="null (every alphabetic token, SAEBench) or an integer >= 26 (a seeded random subset)",
        check=lambda v: v >= 26,
    )
    test_fraction: float = setting(0.2, allowed="a float in (0, 1)", check=lambda v: 0 < v < 1)
    min_word_length: int = setting(1, allowed="an integer >= 1 (SAEBench: 1)", check=lambda v: v >= 1)
    min_letter_examples: int = setting(
        1, allowed="an integer >= 1 (train words a letter needs to be probed)", check=lambda v: v >= 1
    )


EPS = 1e-8


# Vocabulary and prompts


def alpha_vocab(tokenizer: Any, special_ids: Sequence[int], min_length: int = 1) -> List[Tuple[int, str]]:
    """(token id, word) for every token that decodes to an ASCII alphabetic word, leading space allowed."""
    special = {int(t) for t in special_ids if t is not None}
    out = []
    for tid in range(len(tokenizer)):
        if tid in special:
            continue
        text = tokenizer.decode([tid])
        word = text.lstrip(" ")
        if len(word) >= min_length and word.isascii() and word.isalpha() and len(text) - len(word) <= 1:
            out.append((tid, word))
    return out


@dataclass
class PromptParts:
    pre: List[int]  # template text before the word
    post: List[int]  # template text after the word
    sep: List[int]  # between examples
    answers: Dict[str, List[int]]  # letter -> " X"


def prompt_parts(tokenizer: Any, template: str) -> PromptParts:
    if template.count("{word}") != 1:
        raise ValueError(f"eval.absorption.prompt_template must contain '{{word}}' once, got {template!r}")
    pre, post = template.split("{word}")

    def enc(s: str) -> List[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []

    return PromptParts(enc(pre), enc(post), enc("\n"), {c: enc(" " + c.upper()) for c in LETTERS})


def build_prompts(
    word_ids: Sequence[int],
    words: Sequence[str],
    pool: Sequence[Tuple[int, str]],
    parts: PromptParts,
    n_examples: int,
    bos: int,
    rng: np.random.Generator,
) -> Tuple[List[List[int]], List[int]]:
    """ICL prompts as id lists and the index of the target word token in each: BOS, "\n" (SAEBench's
    ``prepend_separator_to_first_example``), the examples each followed by "\n", the target."""
    prompts, positions = [], []
    for wid, _w in zip(word_ids, words):
        ids = [int(bos)] + parts.sep
        candidates = rng.choice(len(pool), size=min(len(pool), n_examples + 1), replace=False)
        examples = [pool[i] for i in candidates if pool[i][0] != wid][:n_examples]
        for eid, eword in examples:
            ids += parts.pre + [eid] + parts.post + parts.answers[eword[0].lower()] + parts.sep
        ids += parts.pre
        positions.append(len(ids))
        ids += [wid] + parts.post
        prompts.append(ids)
    return prompts, positions


@torch.no_grad()
def word_activations(
    lm: Any, prompts: List[List[int]], positions: List[int], layer: int, hook: str, batch_size: int, pad_id: int
) -> torch.Tensor:
    """LM activation at each prompt's word position, ``[n, d]`` float32 on CPU (right padding)."""
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), int(pad_id), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, : len(p)] = torch.tensor(p)
        acts = lm.activations(ids.to(lm.device), layer, hook)
        pos = torch.tensor(positions[s : s + batch_size], device=acts.device)
        out.append(acts[torch.arange(len(chunk), device=acts.device), pos].float().cpu())
    return torch.cat(out)


# Probes


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = float(np.sum(pred & y))
    denom = float(np.sum(pred) + np.sum(y))
    return 2 * tp / denom if denom > 0 else 0.0


def _logreg(x: np.ndarray, y: np.ndarray, seed: int, max_iter: int = 1000, standardize: bool = False):
    """Balanced logistic regression (letters are ~1/26 of words; unweighted, a probe would rarely
    say yes). ``standardize`` speeds up convergence where only the decision matters, not the direction."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if standardize:  # few columns: Newton steps converge in a handful of iterations
        clf = make_pipeline(
            StandardScaler(),
            LogisticRegression(max_iter=max_iter, class_weight="balanced", solver="newton-cholesky", random_state=seed),
        )
    else:
        clf = LogisticRegression(max_iter=max_iter, class_weight="balanced")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(x, y)
    return clf


def letter_probes(
    x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, letters: Sequence[int], seed: int
) -> Dict[int, Dict[str, Any]]:
    """Ground-truth one-vs-rest probes on LM activations: direction (raw activation space), test
    F1 and test decision scores per letter. Inputs are divided by one global scale (not per-dim
    standardisation) so the learned weight vector IS a direction in activation space."""
    scale = float(np.linalg.norm(x_tr, axis=1).mean()) or 1.0
    out = {}
    for li in letters:
        clf = _logreg(x_tr / scale, (y_tr == li).astype(int), seed)
        scores = clf.decision_function(x_te / scale)
        out[li] = {
            "direction": clf.coef_[0].astype(np.float64),
            "f1": _f1(y_te == li, scores > 0),
            "test_scores": scores,
        }
    return out


def train_multi_probe(
    x: torch.Tensor,
    y: np.ndarray,
    n_classes: int,
    *,
    batch_size: int,
    num_epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
    l1_decay: float = 0.0,
    end_lr: float = 1e-5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAEBench's ``train_multi_probe`` (absorption/probing.py:56-114, 163-244): ``nn.Linear(d, n_classes)``
    with default init on one-hot targets, ``BCEWithLogitsLoss(pos_weight = n_neg / n_pos)`` per class
    (``+ l1_decay * mean_class(sum|w|)`` for the k-sparse ranking probe, k_sparse_probing.py:57-92),
    ``Adam(lr, weight_decay)``, shuffled batches, the LR decayed by ``(end_lr / lr)^(1 / num_epochs)``
    after every EPOCH. Returns (weight ``[n_classes, d]``, bias ``[n_classes]``). Seeded; a class
    without positives gets pos_weight 1 (SAEBench: infinite, which makes the loss NaN)."""
    with torch.inference_mode(False), torch.enable_grad(), few_threads():
        g = torch.Generator().manual_seed(int(seed))
        x = x.float().clone()  # a plain tensor: inputs made under inference_mode cannot join autograd
        yy = torch.nn.functional.one_hot(torch.as_tensor(y, dtype=torch.long), n_classes).float()
        n_pos = yy.sum(0)
        pos_weight = torch.where(n_pos > 0, (len(yy) - n_pos) / n_pos.clamp_min(1), torch.ones_like(n_pos))
        bound = 1.0 / math.sqrt(x.shape[1])
        w = ((torch.rand(n_classes, x.shape[1], generator=g) * 2 - 1) * bound).requires_grad_()
        b = ((torch.rand(n_classes, generator=g) * 2 - 1) * bound).requires_grad_()
        opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / num_epochs))
        for _ in range(num_epochs):
            order = torch.randperm(x.shape[0], generator=g)
            for s in range(0, x.shape[0], batch_size):
                idx = order[s : s + batch_size]
                logits = x[idx] @ w.T + b
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yy[idx], pos_weight=pos_weight)
                if l1_decay:
                    loss = loss + l1_decay * w.abs().sum(dim=-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
    return w.detach(), b.detach()


def gt_probes_saebench(
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_te: np.ndarray,
    y_te: np.ndarray,
    letters: Sequence[int],
    s: Dict[str, Any],
    seed: int,
) -> Dict[int, Dict[str, Any]]:
    """Ground-truth probes the SAEBench way: one 26-output multi-probe (``train_linear_probe_for_task``
    via ``train_and_save_probes``' batch 64, 50 epochs, lr 1e-2, weight decay 1e-4); per letter its
    row (direction), test F1 of logit > 0 (``build_metrics_df``) and test logits."""
    w, b = train_multi_probe(
        torch.as_tensor(x_tr, dtype=torch.float32),
        y_tr,
        26,
        batch_size=int(s["gt_probe_batch_size"]),
        num_epochs=int(s["gt_probe_num_epochs"]),
        lr=float(s["gt_probe_lr"]),
        weight_decay=float(s["gt_probe_weight_decay"]),
        seed=seed,
    )
    logits = (torch.as_tensor(x_te, dtype=torch.float32) @ w.T + b).numpy()
    return {
        li: {
            "direction": w[li].double().numpy(),
            "f1": _f1(y_te == li, logits[:, li] > 0.0),
            "test_scores": logits[:, li],
        }
        for li in letters
    }


def rank_latents_l1(
    f_tr: torch.Tensor,
    y_tr: np.ndarray,
    n_classes: int,
    *,
    l1_decay: float,
    num_epochs: int,
    batch_size: int,
    seed: int,
    lr: float = 0.01,
    end_lr: float = 1e-5,
    l2_decay: float = 1e-6,
) -> torch.Tensor:
    """SAEBench's latent ranking (``train_sparse_multi_probe``): the L1-penalised multi-probe on the SAE
    latents. Returns the weights ``[n_classes, d_sae]``; a letter's top-k latents are its k largest
    (signed) weights."""
    return train_multi_probe(
        f_tr,
        y_tr,
        n_classes,
        batch_size=batch_size,
        num_epochs=num_epochs,
        lr=lr,
        end_lr=end_lr,
        weight_decay=l2_decay,
        seed=seed,
        l1_decay=l1_decay,
    )[0]


def k_sparse_probes(
    f_tr: np.ndarray,
    y_tr: np.ndarray,
    f_te: np.ndarray,
    y_te: np.ndarray,
    ranking: np.ndarray,
    ks: Sequence[int],
    seed: int,
    mode: str = "saebench",
) -> List[Dict[str, Any]]:
    """For each k: logistic regression on the top-k ranked latents; test F1 (decision > 0).
    ``saebench`` (k_sparse_probing.py:160-179): ``LogisticRegression(max_iter=500,
    class_weight="balanced")``, lbfgs, on the raw float32 latents; ``standardised``: standardised
    inputs and newton-cholesky."""
    out = []
    order = np.argsort(-ranking, kind="stable")
    for k in ks:
        feats = order[:k]
        x_k = np.asarray(f_tr[:, feats], np.float32)
        clf = _logreg(x_k, y_tr.astype(int), seed, max_iter=500, standardize=mode == "standardised")
        pred = clf.decision_function(np.asarray(f_te[:, feats], np.float32)) > 0
        out.append({"k": int(k), "feats": feats.tolist(), "f1": _f1(y_te.astype(bool), pred)})
    return out


def split_features(k_results: Sequence[Dict[str, Any]], f1_jump_threshold: float) -> List[int]:
    """Main latents for a letter: grow k while F1 jumps by more than the threshold (SAEBench)."""
    prev, feats = -math.inf, []
    for r in k_results:
        if r["f1"] > prev + f1_jump_threshold:
            prev, feats = r["f1"], r["feats"]
        else:
            break
    return list(feats)


def word_absorption(
    act_probe_proj: float,
    sae_acts: torch.Tensor,
    dec_probe_proj: torch.Tensor,
    cos_sims: torch.Tensor,
    main_ids: Sequence[int],
    s: Dict[str, Any],
) -> Tuple[float, bool]:
    """(absorption fraction, full absorption) for one word, SAEBench's FeatureAbsorptionCalculator rules.

    ``act_probe_proj``: the activation's projection on the unit probe direction u; ``sae_acts``
    ``[d_sae]``; ``dec_probe_proj``: what each latent's activation is multiplied by -- SAEBench's
    ``cos(W_dec[i], u)`` (``FeatureScore.probe_projection``, feature_absorption_calculator.py:26-28,
    157-159) or ``W_dec[i] . u``; ``cos_sims``: cosine of each decoder row with u.
    """
    proj = sae_acts * dec_probe_proj  # each latent's contribution to the probe projection
    main = torch.zeros_like(proj, dtype=torch.bool)
    main[list(main_ids)] = True
    main_proj = float(proj[main].sum())
    # absorption fraction: aligned, positively projecting non-main latents, at most N of them
    cand = (~main) & (cos_sims >= s["absorption_fraction_probe_cos_sim_threshold"]) & (proj > 0)
    vals = proj[cand]
    top = vals.topk(min(int(s["absorption_fraction_max_absorbing_latents"]), vals.numel())).values
    absorbers = float(top.sum())
    if (
        act_probe_proj <= 0
        or main_proj >= act_probe_proj
        or absorbers / act_probe_proj < s["probe_projection_proportion_threshold"]
    ):
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        absorbed = min(absorbers, act_probe_proj - main_proj)
        fraction = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
    # full absorption: main latents silent, one aligned latent carries enough of the projection
    top_id = int(proj.argmax())
    full = bool(
        all(float(sae_acts[i]) < EPS for i in main_ids)
        and float(cos_sims[top_id]) >= s["full_absorption_probe_cos_sim_threshold"]
        and act_probe_proj > 0
        and float(proj[top_id]) / act_probe_proj >= s["probe_projection_proportion_threshold"]
    )
    return fraction, full


# The eval


@torch.no_grad()
def run_absorption(lm: Any, sae: Any, layer: int, hook: str, seed: int, settings: Dict[str, Any]) -> EvalOutput:
    s = settings_dict(AbsorptionSettings, settings, "eval.absorption")
    config = {**s, "layer": layer, "hook": hook, "random_seed": seed}
    rng = np.random.default_rng(stable_seed(seed, "absorption"))
    tok = lm.tokenizer
    vocab = alpha_vocab(tok, lm.special_token_ids, int(s["min_word_length"]))
    if len(vocab) < 26 * 4:
        return EvalOutput.skipped(
            EVAL_TYPE_ID,
            config,
            f"the tokenizer has only {len(vocab)} single-token "
            "alphabetic words; the first-letter task needs a few per letter",
        )
    n_vocab = len(vocab)  # every single-token alphabetic word: SAEBench's sample
    if s["max_words"] is not None and len(vocab) > int(s["max_words"]):
        vocab = [vocab[i] for i in sorted(rng.choice(len(vocab), int(s["max_words"]), replace=False))]
    perm = rng.permutation(len(vocab))
    n_test = max(1, int(round(len(vocab) * float(s["test_fraction"]))))
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])

    parts = prompt_parts(tok, s["prompt_template"])
    ids = [v[0] for v in vocab]
    words = [v[1] for v in vocab]
    pad = tok.pad_token_id if tok.pad_token_id is not None else lm.bos_token_id
    n_icl = int(s["n_icl_examples"])

    def activations_for(idx: np.ndarray, pool: List[Tuple[int, str]]) -> torch.Tensor:
        prompts, positions = build_prompts(
            [ids[i] for i in idx], [words[i] for i in idx], pool, parts, n_icl, lm.bos_token_id, rng
        )
        return word_activations(lm, prompts, positions, layer, hook, int(s["llm_batch_size"]), pad)

    # SAEBench: train words take their ICL examples from the train words, test words from the test words
    acts = torch.zeros(len(vocab), int(sae.W_dec.shape[1]))  # [words, d_in]
    acts[train_idx] = activations_for(train_idx, [vocab[i] for i in train_idx])
    acts[test_idx] = activations_for(test_idx, [vocab[i] for i in test_idx])
    y = np.array([LETTERS.index(w[0].lower()) for w in words])
    x = acts.numpy().astype(np.float64)

    def absorption_acts(word_idx: np.ndarray) -> torch.Tensor:
        # SAEBench scores absorption on new prompts whose examples come from the whole vocabulary
        return activations_for(word_idx, vocab)

    with few_threads():  # many small probe fits: one thread is faster on a shared CPU
        return _probe_and_score(sae, acts, x, y, train_idx, test_idx, s, config, seed, layer, n_vocab, absorption_acts)


def _word_sample(n_words: int, n_vocab: int, n_test: int) -> str:
    """What a skip decided: on SAEBench's full vocabulary, that the probes do not find first letters
    at this layer; on a smaller sample, only that this sample does not (too few test words per letter
    to tell), never a property of the model it did not test."""
    per_letter = n_test / 26
    if n_words >= n_vocab:
        return (
            f"probed on SAEBench's full vocabulary ({n_words} single-token alphabetic words, "
            f"~{per_letter:.0f} test words per letter): the LM's activations here do not separate first "
            f"letters linearly for enough letters"
        )
    return (
        f"probed on a random sample of {n_words} of the tokenizer's {n_vocab} single-token alphabetic words "
        f"(eval.absorption.max_words; ~{per_letter:.1f} test words per letter): this sample cannot tell "
        f"whether the LM represents first letters here; SAEBench's full vocabulary "
        f"(eval.absorption.max_words=null, as in eval=full) can, and may pass the gate"
    )


def _probe_and_score(
    sae: Any,
    acts: torch.Tensor,
    x: np.ndarray,
    y: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    s: Dict[str, Any],
    config: Dict[str, Any],
    seed: int,
    layer: int,
    n_vocab: int,
    absorption_acts: Any = None,
) -> EvalOutput:
    n_words = len(y)
    x_tr, y_tr, x_te, y_te = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    n_test = len(test_idx)

    # 1. ground-truth probes on the LM
    counts_tr = np.bincount(y_tr, minlength=26)
    counts_te = np.bincount(y_te, minlength=26)
    probed = [li for li in range(26) if counts_tr[li] >= int(s["min_letter_examples"]) and counts_te[li] >= 1]
    if s["gt_probe"] == "saebench":
        gt = gt_probes_saebench(x_tr, y_tr, x_te, y_te, probed, s, stable_seed(seed, "gt_probe"))
    else:
        gt = letter_probes(x_tr, y_tr, x_te, y_te, probed, seed)
    probe_f1 = {LETTERS[li]: round(gt[li]["f1"], 4) for li in probed}
    passing = [li for li in probed if gt[li]["f1"] > float(s["min_GT_probe_f1"])]  # SAEBench main.py:111-118: >
    if len(passing) < int(s["min_feats_for_eval"]):
        out = EvalOutput.skipped(
            EVAL_TYPE_ID,
            config,
            f"only {len(passing)} of 26 letters have a ground-truth probe with F1 > {s['min_GT_probe_f1']} "
            f"(need {s['min_feats_for_eval']}) at layer {layer}, {_word_sample(n_words, n_vocab, n_test)}. "
            f"Probe F1 per letter: {probe_f1}",
        )
        out.unstructured = {"probe_f1": probe_f1, "n_words": n_words}
        return out

    # 2. k-sparse probes on the SAE latents
    p = next(iter(sae.parameters()))
    f_all = sae.encode(acts.to(device=p.device, dtype=p.dtype)).float().cpu()
    f_tr, f_te = f_all[train_idx], f_all[test_idx]
    weights = rank_latents_l1(
        f_tr,
        y_tr,
        26,
        l1_decay=float(s["k_sparse_probe_l1_decay"]),
        num_epochs=int(s["k_sparse_probe_num_epochs"]),
        batch_size=int(s["k_sparse_probe_batch_size"]),
        seed=stable_seed(seed, "l1"),
        l2_decay=float(s["k_sparse_probe_l2_decay"]),
    )
    ks = list(range(1, int(s["max_k_value"]) + 1))
    W_dec = sae.W_dec.detach().float().cpu()
    dec_unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(EPS)

    # 3. absorption words: the probe's true positives among the test words, re-prompted with examples
    # from the whole vocabulary (SAEBench feature_absorption.py:116-153, 206-219)
    tps = {li: test_idx[(y_te == li) & (gt[li]["test_scores"] > 0)] for li in passing}
    all_tp = np.unique(np.concatenate([v for v in tps.values()] + [np.zeros(0, int)])).astype(int)
    if absorption_acts is not None and len(all_tp):
        new_x = absorption_acts(all_tp)
    else:
        new_x = acts[all_tp]
    abs_x = dict(zip(all_tp.tolist(), new_x))
    new_f = sae.encode(new_x.to(device=p.device, dtype=p.dtype)).float().cpu() if len(all_tp) else new_x
    abs_f = dict(zip(all_tp.tolist(), new_f))
    tps = {li: v.tolist() for li, v in tps.items()}

    details, chance_letters, no_tp_letters = [], [], []
    for li in passing:
        letter = LETTERS[li]
        kres = k_sparse_probes(
            f_tr.numpy(), y_tr == li, f_te.numpy(), y_te == li, weights[li].numpy(), ks, seed, s["k_sparse_probe"]
        )
        main_ids = split_features(kres, float(s["f1_jump_threshold"]))
        prevalence = float(np.mean(y_te == li))
        trivial_f1 = 2 * prevalence / (1 + prevalence)  # F1 of answering "yes" for every word
        if all(r["f1"] <= trivial_f1 for r in kres):
            chance_letters.append(letter)

        u = torch.tensor(gt[li]["direction"], dtype=torch.float32)
        u = u / u.norm().clamp_min(EPS)
        cos = dec_unit @ u
        dec_proj = cos if s["projection"] == "cosine" else W_dec @ u
        tp = tps[li]
        fractions, fulls = [], []
        for j in tp:
            act_proj = float(abs_x[j] @ u)
            frac, full = word_absorption(act_proj, abs_f[j], dec_proj, cos, main_ids, s)
            fractions.append(frac)
            fulls.append(full)
        n_tp = len(tp)
        if n_tp == 0:  # SAEBench: a letter without probe true positives has no absorption row
            no_tp_letters.append(letter)
            continue
        details.append(
            {
                "first_letter": letter,
                "mean_absorption_fraction": float(np.sum(fractions) / n_tp) if n_tp else 0.0,
                "full_absorption_rate": float(np.sum(fulls) / n_tp) if n_tp else 0.0,
                "num_full_absorption": int(np.sum(fulls)),
                "num_probe_true_positives": n_tp,
                "num_split_features": len(main_ids),
                "split_feats": main_ids,
                "probe_f1": gt[li]["f1"],
                "sparse_probe_f1": [r["f1"] for r in kres],
            }
        )

    if not details:
        out = EvalOutput.skipped(EVAL_TYPE_ID, config, "no letter has a probe true positive among the test words")
        out.unstructured = {"probe_f1": probe_f1, "n_words": n_words}
        return out

    def stats(key: str) -> Tuple[float, float]:
        vals = [d[key] for d in details]
        return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0

    maf, maf_sd = stats("mean_absorption_fraction")
    far, far_sd = stats("full_absorption_rate")
    nsf, nsf_sd = stats("num_split_features")
    metrics = {
        "mean": {
            "mean_absorption_fraction_score": maf,
            "mean_full_absorption_score": far,
            "mean_num_split_features": nsf,
            "std_dev_absorption_fraction_score": maf_sd,
            "std_dev_full_absorption_score": far_sd,
            "std_dev_num_split_features": nsf_sd,
        },
        "flags": {
            "sparse_probe_at_chance_fraction": len(chance_letters) / len(details),
            "n_letters_scored": float(len(details)),
        },
    }
    flags: Dict[str, Any] = {}
    status, reason = "ok", None
    if chance_letters:
        flags["sparse_probe_at_chance_letters"] = chance_letters
    if len(chance_letters) == len(details):
        status, reason = "failed", "the k-sparse SAE probes are at chance level for every k on every scored letter"
    return EvalOutput(
        eval_type_id=EVAL_TYPE_ID,
        config=config,
        metrics=metrics,
        details=details,
        status=status,
        skip_reason=reason,
        flags=flags,
        unstructured={
            "probe_f1": probe_f1,
            "n_words": n_words,
            "n_test_words": int(n_test),
            "letters_without_true_positives": no_tp_letters,
        },
    )


# What the eval logs (flattened as absorption/<category>/<metric>). A letter is scored when its
# ground-truth probe has test F1 > min_GT_probe_f1 and it has at least one probe true positive among
# the test words; per-letter values are in the SAEBench JSON's details.
_SB = "SAEBench 0.6.0 absorption_first_letter"
METRICS = (
    Metric(
        "absorption/mean/mean_absorption_fraction_score",
        "absorption",
        "lower",
        "fraction",
        "Mean over scored letters of the letter's mean absorption fraction over the test words its "
        "ground-truth probe detects: the share of the word's projection on the probe direction carried by up "
        "to 3 aligned non-main latents instead of the letter's main latents (the rules: this module's "
        "docstring, step 5). "
        "Lower: the letter feature is not absorbed into other latents.",
        _SB,
    ),
    Metric(
        "absorption/mean/mean_full_absorption_score",
        "full absorption",
        "lower",
        "fraction of words",
        "Mean over scored letters of the fraction of the letter's true-positive test words on which every "
        "main latent is silent while one aligned latent carries at least 40% of the probe projection.",
        _SB,
    ),
    Metric(
        "absorption/mean/mean_num_split_features",
        "split features",
        None,
        "latents",
        "Mean over scored letters of the number of main latents: the top-k set of the k-sparse probe, grown "
        "while test F1 jumps by more than f1_jump_threshold. Describes feature splitting; no better "
        "direction.",
        _SB,
    ),
    Metric(
        "absorption/mean/std_dev_absorption_fraction_score",
        "absorption (std over letters)",
        None,
        "fraction",
        "Sample standard deviation over scored letters of the per-letter absorption fraction (0 with one letter).",
        _SB,
    ),
    Metric(
        "absorption/mean/std_dev_full_absorption_score",
        "full absorption (std over letters)",
        None,
        "fraction of words",
        "Sample standard deviation over scored letters of the per-letter full absorption rate (0 with one letter).",
        _SB,
    ),
    Metric(
        "absorption/mean/std_dev_num_split_features",
        "split features (std over letters)",
        None,
        "latents",
        "Sample standard deviation over scored letters of the number of main latents (0 with one letter).",
        _SB,
    ),
    Metric(
        "absorption/flags/sparse_probe_at_chance_fraction",
        "letters at chance",
        "lower",
        "fraction of letters",
        "Fraction of scored letters whose k-sparse SAE probe has test F1 no better than answering 'yes' for "
        "every word, for every k. 1 fails the eval: the absorption numbers then do not measure the SAE.",
        "this project",
    ),
    Metric(
        "absorption/flags/n_letters_scored",
        "letters scored",
        None,
        "letters",
        "Number of letters the means are over (at most 26).",
        "this project",
    ),
)


@register_eval("absorption", AbsorptionSettings, METRICS)
def run(ctx: Any) -> EvalOutput:
    return run_absorption(ctx.lm, ctx.sae, ctx.layer, ctx.hook, ctx.seed, ctx.settings)
