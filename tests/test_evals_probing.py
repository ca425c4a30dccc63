"""Sparse probing, downstream probing and fake features: known answers on constructed inputs, chance
flagging, and the offline (stdlib-docstring) tasks end to end on an embedding-only toy LM."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sae_sweep.evals import downstream, fake_features, probes, sparse_probing
from sae_sweep.evals.schema import flatten_metrics, to_saebench_json

pytestmark = pytest.mark.unit

PACKAGES = ["asyncio", "email", "logging"]


def test_top_k_by_mean_diff_abs_and_signed():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(50, int), np.zeros(50, int)]
    x = rng.normal(size=(100, 20))
    x[:, 13] += 3 * y  # fires more on positives
    x[:, 4] -= 4 * y  # fires LESS on positives: SAEBench's |difference| ranks it first
    assert probes.top_k_by_mean_diff(x, y, 1).tolist() == [4]
    assert sorted(probes.top_k_by_mean_diff(x, y, 2).tolist()) == [4, 13]
    assert probes.top_k_by_mean_diff(x, y, 1, "signed").tolist() == [13]
    assert 4 not in probes.top_k_by_mean_diff(x, y, 10, "signed")


def _saebench_top_k_mean_diff_mask(acts, labels, k):
    """SAEBench get_top_k_mean_diff_mask (sae_bench/evals/sparse_probing/probe_training.py:91-108)."""
    pos = acts[labels == 1].mean(dim=0)
    neg = acts[labels == 0].mean(dim=0)
    top = torch.argsort((pos - neg).abs(), descending=True)[:k]
    mask = torch.ones(acts.shape[1], dtype=torch.bool)
    mask[top] = False
    return mask


@pytest.mark.filterwarnings("ignore:.penalty. was deprecated")
def test_top_k_and_sklearn_probe_match_saebench_transcription():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    x = (np.abs(rng.normal(size=(300, 40))) * (rng.random((300, 40)) < 0.3)).astype(np.float32)
    x[:, 7] += 0.8 * y
    x[:, 21] += 1.5 * (1 - y) * (rng.random(300) < 0.7)
    for k in (1, 2, 5):
        mask = _saebench_top_k_mean_diff_mask(torch.tensor(x[:200]), torch.tensor(y[:200]), k)
        assert sorted(probes.top_k_by_mean_diff(x[:200], y[:200], k).tolist()) == np.flatnonzero(~mask.numpy()).tolist()
    # train_sklearn_probe (probe_training.py:134-182): LogisticRegression(penalty="l2", C=1.0, max_iter=1000),
    # default lbfgs, raw float32 inputs, accuracy_score(test, predict)
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score

    ref = LogisticRegression(penalty="l2", C=1.0, max_iter=1000).fit(x[:200], y[:200])
    ours = probes.fit_sklearn_probe_raw(x[:200], y[:200], x[200:], y[200:])
    assert ours["acc"] == accuracy_score(y[200:], ref.predict(x[200:]))


def _saebench_train_probe_gpu(xtr, ytr, xte, yte, dim, batch_size, epochs, lr, g, l1_penalty=None, patience_max=10):
    """SAEBench train_probe_gpu / test_probe_gpu (probe_training.py:199-304) written out; the only change
    is that the init and the epoch permutations draw from generator ``g`` instead of the global one."""
    probe = torch.nn.Linear(dim, 1, bias=True)
    bound = 1.0 / dim**0.5
    with torch.no_grad():  # nn.Linear's default init distribution, drawn from g
        probe.weight.copy_((torch.rand(1, dim, generator=g) * 2 - 1) * bound)
        probe.bias.copy_((torch.rand(1, generator=g) * 2 - 1) * bound)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr)
    criterion = torch.nn.BCEWithLogitsLoss()
    best_test_accuracy, patience_counter = 0.0, 0
    for _epoch in range(epochs):
        indices = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch_size):
            b = indices[i : i + batch_size]
            loss = criterion(probe(xtr[b]).squeeze(-1), ytr[b].float())
            if l1_penalty is not None:
                loss += l1_penalty * torch.sum(torch.abs(probe.weight))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            test_accuracy = ((probe(xte).squeeze(-1) > 0.0).long() == yte).float().mean().item()
        if test_accuracy > best_test_accuracy:
            best_test_accuracy, patience_counter = test_accuracy, 0
        else:
            patience_counter += 1
        if patience_counter >= patience_max:
            break
    return best_test_accuracy


@pytest.mark.parametrize("l1", [None, 1e-3])
def test_torch_probe_matches_saebench_transcription(l1):
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 400)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    x[:, 3] += 0.7 * y
    ref = _saebench_train_probe_gpu(
        torch.tensor(x[:300]),
        torch.tensor(y[:300]),
        torch.tensor(x[300:]),
        torch.tensor(y[300:]),
        16,
        16,
        20,
        1e-2,
        torch.Generator().manual_seed(9),
        l1,
    )
    ours = probes.train_probe_torch(
        x[:300], y[:300], x[300:], y[300:], batch_size=16, epochs=20, lr=1e-2, seed=9, l1_penalty=l1
    )
    assert 0.6 < ref < 0.95  # learned something, not trivially
    assert ours["acc"] == pytest.approx(ref, abs=1e-9)


def test_abs_selection_finds_a_latent_that_fires_less_on_the_class():
    # Known answer: latent 0 is ON for every negative and OFF for every positive (a perfect probe by
    # itself); latent 1 fires a little more on positives. SAEBench's |mean difference| picks latent 0:
    # top-1 accuracy 1.0; the signed rule picks latent 1: about 0.6.
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(200, int), np.zeros(200, int)]
    x = np.zeros((400, 2), np.float32)
    x[:, 0] = 1 - y
    x[:, 1] = (rng.random(400) < np.where(y == 1, 0.6, 0.4)).astype(np.float32)
    tr, te = np.r_[0:150, 200:350], np.r_[150:200, 350:400]
    acc = {}
    for mode in ("abs", "signed"):
        cols = probes.top_k_by_mean_diff(x[tr], y[tr], 1, mode)
        acc[mode] = probes.fit_sklearn_probe_raw(x[tr][:, cols], y[tr], x[te][:, cols], y[te])["acc"]
    assert acc["abs"] == 1.0 and acc["signed"] < 0.75


def test_chance_bound_and_flag():
    # 0.5 + 2 * sqrt(0.25 / 100) = 0.6
    assert probes.chance_bound(100, 0.5) == pytest.approx(0.6)
    assert probes.at_chance([0.5, 0.55, 0.58], 100, 0.5)
    assert not probes.at_chance([0.5, 0.55, 0.9], 100, 0.5)  # one k learned something
    assert not probes.at_chance([], 100, 0.5)


def test_probe_data_is_balanced_with_stratified_negatives():
    labels = np.array(["a"] * 30 + ["b"] * 50 + ["c"] * 20)
    splits = sparse_probing.class_splits(labels, ["a", "b", "c"], 40, 20, np.random.default_rng(0))
    for c, (tr, te) in splits.items():
        assert not set(tr) & set(te) and (labels[tr] == c).all() and (labels[te] == c).all()
    assert len(splits["a"][0]) == 20 and len(splits["a"][1]) == 10  # train/2, test/2 per class
    assert len(splits["c"][0]) + len(splits["c"][1]) == 20  # a small class shrinks in proportion
    idx, y = sparse_probing.prepare_probe_data({c: v[0] for c, v in splits.items()}, "a", np.random.default_rng(1))
    assert y.sum() * 2 == len(y) == 40
    neg = labels[idx[y == 0]]
    # SAEBench: ceil(20 / 2) = 10 drawn from EACH other class, then 20 of those 20
    assert (neg == "b").sum() == 10 and (neg == "c").sum() == 10


def test_fake_feature_counts_hand_computed():
    # 4 latents, 2 sequences x 50 scored positions = 100 positions, nominal n_tokens 128.
    # FaithfulSAE: proportion = count(f > 1) / 128 > 0.1  -> counts 12 (0.094 no), 13 (0.102 yes), 0, 100
    # notes' design: sequences with sum_t f_t > 1 over 2 sequences > 5% -> latents 0, 1, 3 (1/2, 2/2, 2/2)
    # ours: count(f != 0) / 100 positions > 5% -> 5 (no, not MORE than 5%), 6, 0, 100
    c = fake_features.FiringCounts(
        above=torch.tensor([12, 13, 0, 100]),
        nonzero=torch.tensor([5, 6, 0, 100]),
        seq_sum_above=torch.tensor([1, 2, 0, 2]),
        n_positions=100,
        n_sequences=2,
        l0_sum=111.0,
    )
    s = dataclasses.asdict(fake_features.FakeFeatureSettings())
    m = fake_features.fake_feature_metrics(c, s, 128)
    assert m["fake_feature_count"] == 2 and m["fake_feature_ratio"] == pytest.approx(0.5)
    assert m["fake_feature_count_sequence"] == 3 and m["fake_feature_ratio_sequence"] == pytest.approx(0.75)
    assert m["fake_feature_count_nonzero"] == 2 and m["mean_random_token_l0"] == pytest.approx(1.11)
    # dividing by the positions processed instead of the nominal count: 12/100 > 0.1 too
    assert fake_features.fake_feature_metrics(c, {**s, "denominator": "processed"}, 128)["fake_feature_count"] == 3


class _OneHotLM:
    """Activations are one-hot token ids, so which latent fires on which token is known exactly."""

    def __init__(self, vocab=101):
        self.vocab = vocab
        self.tokenizer = list(range(vocab))  # only len() is used
        self.model = None
        self.device = torch.device("cpu")
        self.bos_token_id = 0
        self.special_token_ids = {0}

    def activations(self, ids, layer, hook):
        return torch.nn.functional.one_hot(ids, self.vocab).float()


class _SetSAE(torch.nn.Module):
    """Latent j fires (with ``values[j]``, default 1) exactly on the token ids in sets[j]."""

    def __init__(self, sets, vocab=101, values=None):
        super().__init__()
        w = torch.zeros(vocab, len(sets))
        for j, s in enumerate(sets):
            w[list(s), j] = 1.0 if values is None else values[j]
        self.W_enc = torch.nn.Parameter(w)
        self.W_dec = torch.nn.Parameter(w.T.clone())

    def forward(self, x):
        f = x @ self.W_enc
        return f @ self.W_dec, f


def test_fake_features_on_constructed_latents():
    # 101 token ids (0 = BOS), drawn uniformly from the full vocabulary (FaithfulSAE) after position 0.
    # latent 0 fires with value 2 on 10 tokens (~10% of positions: near the 0.1 cut), latent 1 with
    # value 2 on 30 (~30%: fake), latent 2 with value 0.5 on every token (never > 1.0: not fake by
    # FaithfulSAE's rule, fake by the nonzero rule), latent 3 never.
    sae = _SetSAE([set(range(1, 11)), set(range(1, 31)), set(range(0, 101)), set()], values=[2.0, 2.0, 0.5, 1.0])
    out = fake_features.run_fake_features(
        _OneHotLM(), sae, 0, "resid_post", 3, {"n_tokens": 64 * 256, "context_size": 64}
    )
    m = out.metrics["fake_features"]
    assert m["fake_feature_ratio_nonzero"] == 0.75  # latents 0, 1, 2
    assert out.config["n_sequences"] == 256 and out.config["n_positions_scored"] == 256 * 63
    props = [d["proportion_above_activation_threshold"] for d in out.details]
    assert props[1] == pytest.approx(30 / 101 * 63 / 64, abs=0.01) and props[2] == 0.0 and props[3] == 0.0
    assert 1.0 <= m["fake_feature_count"] <= 2.0 and m["fake_feature_ratio"] >= 0.25
    # sequence sums over 63 tokens: latent 2 sums to 31.5 > 1 in every sequence
    assert m["fake_feature_count_sequence"] == 3
    ids = fake_features.random_token_sequences(101, {0}, 8, 16, 0, seed=3, pool="non_special")
    assert (ids[:, 0] == 0).all() and (ids[:, 1:] != 0).all()
    assert torch.equal(ids, fake_features.random_token_sequences(101, {0}, 8, 16, 0, seed=3, pool="non_special"))
    full = fake_features.random_token_sequences(101, {0}, 64, 64, 0, seed=3)
    assert (full[:, 1:] == 0).any()  # the full vocabulary includes the special ids, as FaithfulSAE's pool


def _faithfulsae_get_fake_features(lm, sae, token_batches, n_tokens, threshold):
    """FaithfulSAE ``get_fake_features`` (scripts/feat_match.py @a98b2637, github.com/seonglae/FaithfulSAE),
    written out for given token batches: per sequence drop position 0, ``features = sae.encode(acts)``,
    ``(features > 1.0).sum(0)`` accumulated, ``proportions = counts / n_tokens``, fake iff > threshold."""
    counts = torch.zeros(sae.W_dec.shape[0])
    for batch in token_batches:
        hidden = lm.activations(batch, 0, "resid_post")
        for seq in range(batch.shape[0]):
            features = sae(hidden[seq, 1:])[1]
            counts += (features > 1.0).float().sum(dim=0)
    proportions = counts / n_tokens
    return int((proportions > threshold).sum()), proportions


def test_fake_features_match_faithfulsae_transcription():
    sae = _SetSAE(
        [set(range(1, 11)), set(range(1, 31)), set(range(0, 101)), {5, 6, 7}, set(range(40, 52))],
        values=[2.0, 2.0, 0.5, 3.0, 1.5],
    )
    lm = _OneHotLM()
    n_tokens, ctx = 100 * 32, 32
    out = fake_features.run_fake_features(
        lm, sae, 0, "resid_post", 11, {"n_tokens": n_tokens, "context_size": ctx, "batch_size": 4}
    )
    ids = fake_features.random_token_sequences(101, lm.special_token_ids, n_tokens // ctx, ctx, 0, seed=11)
    n_fake, props = _faithfulsae_get_fake_features(lm, sae, ids.split(4), n_tokens, 0.1)
    assert out.metrics["fake_features"]["fake_feature_count"] == n_fake
    assert out.metrics["fake_features"]["fake_feature_ratio"] == n_fake / 5
    ours = [d["proportion_above_activation_threshold"] for d in out.details]
    assert ours == pytest.approx(props.tolist(), rel=1e-6)  # float32 counts / n_tokens there
    assert 1 <= n_fake <= 4  # not a trivial case


class _EmbeddingLM:
    """An "LM" whose activation is a fixed random embedding of each token (d=128): mean-pooling gives
    a random projection of the bag of words, which separates the stdlib tasks well. The probing
    code only sees the LanguageModel contract (tokenizer, activations, special ids)."""

    def __init__(self, tokenizer, d=128):
        self.tokenizer = tokenizer
        self.model = None
        self.device = torch.device("cpu")
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.pad_token_id
        self.special_token_ids = {tokenizer.bos_token_id, tokenizer.pad_token_id}
        self.emb = torch.randn(len(tokenizer), d, generator=torch.Generator().manual_seed(0))

    def activations(self, input_ids, layer, hook):
        return self.emb[input_ids]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("evals_cache"))


@pytest.fixture(scope="module")
def lm(cache_dir):
    docs = [t for t, _p, _k in probes.stdlib_labelled_docs(PACKAGES, cache_dir)]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        docs, trainers.WordLevelTrainer(vocab_size=1500, special_tokens=["<bos>", "<pad>", "<unk>"])
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>")
    return _EmbeddingLM(hf)


class _ProjSAE(torch.nn.Module):
    """ReLU of a fixed random projection; reconstruction = identity (so recon probes match the LM's)."""

    def __init__(self, d_in=128, d_sae=256, scale=1.0):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=g) * scale)
        self.W_dec = torch.nn.Parameter(torch.randn(d_sae, d_in, generator=g))

    def forward(self, x):
        return x, torch.relu(x @ self.W_enc)


class _LossySAE(torch.nn.Module):
    """Every latent 0 and a constant reconstruction: no information survives."""

    def __init__(self, d_in=128, d_sae=256):
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.zeros(d_in, d_sae))
        self.W_dec = torch.nn.Parameter(torch.zeros(d_sae, d_in))

    def forward(self, x):
        return torch.zeros_like(x), torch.zeros(*x.shape[:-1], self.W_enc.shape[1])


FAST = {"context_size": 64, "max_examples": 300, "packages": PACKAGES, "batch_size": 64}
STD = {**FAST, "procedure": "standardised"}


def test_stdlib_tasks_have_labels_from_structure(cache_dir):
    rows = probes.stdlib_labelled_docs(PACKAGES, cache_dir)
    assert {p for _t, p, _k in rows} == set(PACKAGES)
    assert {"class", "function"} <= {k for _t, _p, k in rows}
    task = probes.load_task("stdlib_package", seed=0, cache_dir=cache_dir, max_examples=90, packages=PACKAGES)
    assert sorted(set(task.labels)) == sorted(PACKAGES) and len(task.texts) == 90


def test_sparse_probing_end_to_end(lm, cache_dir):
    settings = {
        **FAST,
        "datasets": ["stdlib_package"],
        "k_values": [1, 5],
        "probe_train_set_size": 150,
        "probe_test_set_size": 50,
    }
    out = sparse_probing.run_sparse_probing(lm, _ProjSAE(), 0, "resid_post", 0, settings, cache_dir)
    assert out.status == "ok", out.skip_reason
    assert set(out.metrics["llm"]) == {"llm_test_accuracy", "llm_top_1_test_accuracy", "llm_top_5_test_accuracy"}
    assert set(out.metrics["sae"]) == {"sae_test_accuracy", "sae_top_1_test_accuracy", "sae_top_5_test_accuracy"}
    assert out.metrics["llm"]["llm_test_accuracy"] > 0.7  # bag of words separates stdlib packages
    assert out.details[0]["dataset_name"] == "stdlib_package" and len(out.details[0]["classes"]) == 3
    flat = flatten_metrics(out, prefix="sparse_probing")
    assert "sparse_probing/sae/sae_top_1_test_accuracy" in flat
    json.dumps(to_saebench_json(out, {}, "blocks.0.hook_resid_post", "test"), allow_nan=False)
    # same seed -> same result
    again = sparse_probing.run_sparse_probing(lm, _ProjSAE(), 0, "resid_post", 0, settings, cache_dir)
    assert again.metrics == out.metrics


def test_sae_at_chance_is_flagged_not_clean(lm, cache_dir):
    settings = {
        **FAST,
        "datasets": ["stdlib_kind"],
        "k_values": [1, 2],
        "probe_train_set_size": 80,
        "probe_test_set_size": 40,
    }
    dead = _ProjSAE(scale=0.0)  # every latent is 0: nothing to probe
    out = sparse_probing.run_sparse_probing(lm, dead, 0, "resid_post", 0, settings, cache_dir)
    assert out.status == "failed" and "chance" in out.skip_reason
    assert out.flags["sae_at_chance_tasks"] and out.metrics["flags"]["sae_at_chance_fraction"] == 1.0
    # downstream: latents at chance but the reconstruction (identity here) keeps the information:
    # flagged, not a failed SAE
    ds = downstream.run_downstream(lm, dead, 0, "resid_post", 0, {**STD, "tasks": ["stdlib_package"]}, cache_dir)
    assert ds.status == "ok" and ds.flags["sae_at_chance_tasks"] == ["stdlib_package"]
    assert ds.metrics["flags"]["sae_at_chance_fraction"] == 1.0
    assert ds.metrics["stdlib_package"]["recon_acc"] > ds.metrics["stdlib_package"]["chance_acc"]
    # ... and when the reconstruction has lost it too, the eval fails
    ds = downstream.run_downstream(lm, _LossySAE(), 0, "resid_post", 0, {**STD, "tasks": ["stdlib_package"]}, cache_dir)
    assert ds.status == "failed" and ds.flags["sae_at_chance_tasks"] == ["stdlib_package"]
    assert "reconstruction" in ds.skip_reason


def test_downstream_end_to_end_and_hub_tasks_fail_clearly_offline(lm, cache_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = downstream.run_downstream(
        lm, _ProjSAE(), 0, "resid_post", 0, {**STD, "tasks": ["stdlib_package", "sst2"]}, cache_dir
    )
    assert out.status == "ok"
    m = out.metrics["stdlib_package"]
    assert set(m) >= {"baseline_acc", "sae_acc", "recon_acc", "baseline_f1", "sae_f1", "recon_f1"}
    assert m["recon_acc"] == pytest.approx(m["baseline_acc"])  # identity reconstruction
    assert m["baseline_acc"] > m["chance_acc"]
    assert out.flags["unavailable"] == ["sst2"] and "nyu-mll/glue" in out.unstructured["unavailable"]["sst2"]
    only_hub = downstream.run_downstream(lm, _ProjSAE(), 0, "resid_post", 0, {**FAST, "tasks": ["cola"]}, cache_dir)
    # the FaithfulSAE procedure reads the hub's own splits: offline it says which dataset and how to work offline
    fs = downstream.run_downstream(
        lm, _ProjSAE(), 0, "resid_post", 0, {**FAST, "tasks": ["sst2"], "max_length": 64}, cache_dir
    )
    assert fs.status == "skipped" and "nyu-mll/glue" in fs.skip_reason and "stdlib_package" in fs.skip_reason
    assert only_hub.status == "skipped" and "cola" in only_hub.skip_reason and "offline" in only_hub.skip_reason


def test_faithfulsae_trailing_pooling_known_answer():
    v = torch.tensor([[[1.0], [2.0], [3.0], [4.0]], [[1.0], [2.0], [3.0], [4.0]]])
    # last 2 positions: (3 + 4)/2; n = 0 takes the whole row (Python's x[-0:]): (1+2+3+4)/4
    assert downstream.trailing_mean(v, torch.tensor([2, 0])).squeeze(-1).tolist() == [3.5, 2.5]


def _faithfulsae_prove_performance(lm, sae, train, test, n_labels, g, max_length, batch_size=4, lr=1e-3):
    """FaithfulSAE ``prove_performance`` (scripts/feat_match.py @a98b2637, github.com/seonglae/FaithfulSAE)
    written out: pad = EOS, ``tokenizer(texts, padding=True, truncation=True, max_length)``, the LM without
    an attention mask, train pooling ``acts[i, -(mask.sum - 1):].mean(0)``, test pooling ``acts[i,
    -mask.sum:].mean(0)``, three nn.Linear probes with Adam(lr) and cross-entropy for one epoch of batch 4,
    argmax predictions, accuracy = correct / total, macro F1. Init and the shuffle draw from ``g``."""
    from sklearn.metrics import f1_score

    tok = lm.tokenizer
    d_sae, d_in = sae.W_dec.shape
    probes_ = {}
    for name, dim in (("baseline", d_in), ("sae", d_sae), ("recon", d_in)):
        probe = torch.nn.Linear(dim, n_labels)
        with torch.no_grad():
            bound = 1 / dim**0.5
            probe.weight.copy_((torch.rand(probe.weight.shape, generator=g) * 2 - 1) * bound)
            probe.bias.copy_((torch.rand(probe.bias.shape, generator=g) * 2 - 1) * bound)
        probes_[name] = probe
    opts = {k: torch.optim.Adam(p.parameters(), lr=lr) for k, p in probes_.items()}

    def features(texts, minus):
        enc = tok(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        acts = lm.activations(enc.input_ids, 0, "resid_post")
        recon, feats = sae(acts)
        n = enc.attention_mask.sum(dim=1) - minus

        def pool(a):
            return torch.stack([a[i, -n[i] :].mean(dim=0) for i in range(a.shape[0])])

        return {"baseline": pool(acts), "sae": pool(feats), "recon": pool(recon)}

    texts, labels = train
    order = torch.randperm(len(texts), generator=g)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        with torch.no_grad():
            f = features([texts[j] for j in idx], 1)
        for k, probe in probes_.items():
            opts[k].zero_grad()
            torch.nn.functional.cross_entropy(probe(f[k]), torch.tensor(labels)[idx]).backward()
            opts[k].step()
    preds = {k: [] for k in probes_}
    with torch.no_grad():
        for i in range(0, len(test[0]), batch_size):
            f = features(test[0][i : i + batch_size], 0)
            for k, probe in probes_.items():
                preds[k] += torch.argmax(probe(f[k]), dim=1).tolist()
    y = np.array(test[1])
    return {f"{k}_acc": float((np.array(p) == y).mean()) for k, p in preds.items()} | {
        f"{k}_f1": float(f1_score(y, p, average="macro")) for k, p in preds.items()
    }


def test_downstream_matches_faithfulsae_transcription(lm, cache_dir):
    s = dataclasses.asdict(downstream.DownstreamSettings())
    s.update({"packages": PACKAGES, "max_examples": 120, "max_length": 48})
    train, test = downstream.load_task_splits("stdlib_package", s, 0, cache_dir)
    classes = sorted(set(train.labels))
    sae = _ProjSAE(scale=0.1)
    ours = downstream.faithfulsae_probe_task(lm, sae, train, test, 0, "resid_post", s, seed=5)
    ref = _faithfulsae_prove_performance(
        lm,
        sae,
        (train.texts, [classes.index(y) for y in train.labels]),
        (test.texts, [classes.index(y) for y in test.labels]),
        len(classes),
        torch.Generator().manual_seed(5),
        48,
    )
    assert ours["n_test"] == len(test.texts) and ours["n_classes"] == 3
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, abs=1e-9), k


def test_downstream_faithfulsae_end_to_end(lm, cache_dir):
    out = downstream.run_downstream(
        lm, _ProjSAE(), 0, "resid_post", 0, {**FAST, "tasks": ["stdlib_package"], "max_length": 64}, cache_dir
    )
    m = out.metrics["stdlib_package"]
    assert out.config["procedure"] == "faithfulsae" and out.status in ("ok", "failed")
    assert set(m) >= {"baseline_acc", "sae_acc", "recon_acc", "baseline_f1", "sae_f1", "recon_f1"}
    assert out.details[0]["n_train"] + out.details[0]["n_test"] == 300
    assert m["baseline_acc"] > m["chance_acc"]  # one epoch of batch-4 Adam learns the bag of words


def test_downstream_fails_only_when_the_lm_had_the_information(lm, cache_dir):
    # The lossy SAE loses everything; whether that fails the run depends on the LM probe having learned
    # the task. FaithfulSAE's procedure with a learning rate too small to learn anything leaves every
    # probe at chance: a flag, not a failed SAE. The standardised probes learn the LM's task: failed.
    s = {**FAST, "tasks": ["stdlib_package"], "max_length": 64, "probe_lr": 1e-9}
    weak = downstream.run_downstream(lm, _LossySAE(), 0, "resid_post", 0, s, cache_dir)
    assert weak.status == "ok" and weak.flags["all_probes_at_chance"] is True
    strong = downstream.run_downstream(
        lm, _LossySAE(), 0, "resid_post", 0, {**STD, "tasks": ["stdlib_package"]}, cache_dir
    )
    assert strong.status == "failed" and "LM-activation probe is not" in strong.skip_reason


def _saelens_topk_encode(sae, x, k):
    """SAELens' ``architecture="topk"`` encode, as FaithfulSAE's ``scripts/convert.py:29-47`` loads
    every SAE (BatchTopK included): pre = (x - b_dec) @ W_enc + b_enc, keep each token's k largest,
    ReLU them (SAELens TopK activation: ``topk = x.topk(k); relu(topk.values)`` scattered)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


def test_faithfulsae_evals_encode_batchtopk_as_per_token_topk():
    from sae_sweep.evals.registry import EvalContext, get_eval
    from sae_sweep.sae import get_sae_class
    from sae_sweep.sae.batchtopk import per_token_topk

    torch.manual_seed(0)
    lm = _OneHotLM()
    sae = get_sae_class("batchtopk")(101, 64, k=6).eval()
    with torch.no_grad():
        sae.W_enc.mul_(8.0)
        sae.threshold.fill_(0.05)  # a calibrated threshold: more than k latents pass it on most tokens
    x = torch.nn.functional.one_hot(torch.arange(1, 101), 101).float()
    with torch.no_grad():
        own = sae(x)[1]
        with per_token_topk(sae):
            per_token = sae(x)[1]
        after = sae(x)[1]
    assert torch.equal(per_token, _saelens_topk_encode(sae, x, 6))
    assert ((own != 0).sum(-1) > 6).any()  # the threshold rule gives other latents: the test can tell
    assert torch.equal(after, own) and sae.inference == "threshold"  # restored
    # the registered fake_features eval (FaithfulSAE's names) sees the per-token TopK latents
    settings = {"n_tokens": 40 * 16, "context_size": 16, "activation_threshold": 0.5, "threshold": 0.05}
    ctx = EvalContext(lm=lm, sae=sae, tokens=None, layer=0, hook="resid_post", seed=3, settings=settings)
    got = get_eval("fake_features").run(ctx)
    with torch.no_grad(), per_token_topk(sae):
        want = fake_features.run_fake_features(lm, sae, 0, "resid_post", 3, settings)
    threshold_rule = fake_features.run_fake_features(lm, sae, 0, "resid_post", 3, settings)
    assert got.details == want.details
    assert threshold_rule.details != want.details


def _saebench_get_balanced_dataset(df, min_samples_per_quadrant, random_seed):
    """SAEBench 0.6.0 ``get_balanced_dataset`` (sae_bench_utils/dataset_utils.py:275-319) for
    bias_in_bios (column1 profession, column2 gender, text hard_text), written out."""
    balanced = {}
    for profession in df["profession"].unique():
        prof_df = df[df["profession"] == profession]
        if len(prof_df["gender"].unique()) < 2 or prof_df["gender"].value_counts().min() < min_samples_per_quadrant:
            continue
        texts = []
        for _, group_df in prof_df.groupby("gender"):
            texts.extend(group_df.sample(n=min_samples_per_quadrant, random_state=random_seed)["hard_text"].tolist())
        balanced[str(profession)] = texts
    return balanced


def test_saebench_hub_probe_sets_are_drawn_as_saebench_draws_them():
    """bias_in_bios: train texts from the train split, test texts from the test split, set_size // 4 per
    (profession, gender) quadrant (dataset_utils.py:322-345), chosen classes only, classes in both
    splits; ag_news: set_size // 2 per class (gather_dataset_from_df). The frames are built here (the
    hub is not reachable), through the real datasets classes."""
    import datasets
    import numpy as np

    from sae_sweep.evals.probes import saebench_probe_splits

    rng = np.random.default_rng(0)

    def frame(n):
        prof = rng.integers(0, 12, n)
        gender = (rng.random(n) < np.where(prof == 2, 0.9, 0.5)).astype(int)  # profession 2: few women
        return {"hard_text": [f"bio {i} {p} {g}" for i, (p, g) in enumerate(zip(prof, gender))],
                "profession": prof.tolist(), "gender": gender.tolist()}  # fmt: skip

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(frame(3000)), "test": datasets.Dataset.from_dict(frame(1200))}
    )
    got = saebench_probe_splits("LabHC/bias_in_bios_class_set1", 160, 80, seed=42, load=lambda hub_id: dd)
    chosen = {"0", "1", "2", "6", "9"}
    want_tr = _saebench_get_balanced_dataset(dd["train"].to_pandas(), 160 // 4, 42)
    want_te = _saebench_get_balanced_dataset(dd["test"].to_pandas(), 80 // 4, 42)
    shared = sorted(set(want_tr) & set(want_te) & chosen, key=int)
    assert sorted(got) == shared and 3 <= len(shared) < 5  # profession 2 lacks women in some split
    for c in shared:
        assert got[c] == (want_tr[c], want_te[c])
        assert len(got[c][0]) == 80 and len(got[c][1]) == 40
        assert sum(t.endswith(" 1") for t in got[c][0]) == 40  # gender-balanced
    news = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"text": [f"{split} {i}" for i in range(400)], "label": (np.arange(400) % 4).tolist()}
            )
            for split in ("train", "test")
        }
    )
    ag = saebench_probe_splits("fancyzhx/ag_news", 40, 20, seed=42, load=lambda hub_id: news)
    frame_tr = news["train"].to_pandas()
    assert ag["3"][0] == frame_tr[frame_tr["label"] == 3]["text"].sample(n=20, random_state=42).tolist()
    assert all(len(tr) == 20 and len(te) == 10 and te[0].startswith("test") for tr, te in ag.values())
