"""Shared-feature ratio: known answers (permuted copy, random decoders, a constructed many-to-one
case) for both matchers, and the sweep-end hook against a real MLflow sqlite store."""

from __future__ import annotations

import pytest
import torch

from helpers.mlflow_store import tracker_at
from sae_sweep.evals.shared_features import shared_feature_ratio
from sae_sweep.report.crossseed import compare_runs, crossseed_hook
from sae_sweep.sae import get_sae_class

pytestmark = pytest.mark.unit

METHODS = ["dense", "sparse"]


@pytest.mark.parametrize("method", METHODS)
def test_permuted_copy_shares_every_feature(method):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(600, 48, generator=g)
    perm = torch.randperm(600, generator=g)
    res = shared_feature_ratio(w, 2.5 * w[perm], 0.7, method=method)  # row scale must not matter
    assert res["shared_feature_ratio"] == 1.0 and res["top1_ratio"] == 1.0
    assert res["mean_matched_cos"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_random_decoders_share_almost_nothing(method):
    g = torch.Generator().manual_seed(1)
    res = shared_feature_ratio(torch.randn(600, 48, generator=g), torch.randn(600, 48, generator=g), 0.7, method=method)
    assert res["shared_feature_ratio"] < 0.01 and res["top1_ratio"] < 0.01


@pytest.mark.parametrize("method", METHODS)
def test_one_to_one_matching_versus_top1(method):
    # A's latents 0 and 1 both point (almost) along B's latent 0; only one of them can be MATCHED to
    # it, but both have a partner above 0.7 (top-1). Latent 2 of each is unrelated.
    e = torch.eye(4)
    a = torch.stack([e[0], e[0] + 0.1 * e[1], e[2]])
    b = torch.stack([e[0], e[3], -e[2]])
    res = shared_feature_ratio(a, b, 0.7, method=method)
    assert res["shared_feature_ratio"] == pytest.approx(1 / 3)
    assert res["top1_ratio_a"] == pytest.approx(2 / 3) and res["top1_ratio_b"] == pytest.approx(1 / 3)
    assert res["top1_ratio"] == pytest.approx(1 / 3)  # FaithfulSAE's direction: B's latents -> A
    assert res["top1_ratio_symmetric"] == pytest.approx(0.5)


def _faithfulsae_feat_match(w_dec1, w_dec2, threshold=0.7):
    """FaithfulSAE's SFR and top-1 ratio, written out from scripts/feat_match.py
    (github.com/seonglae/FaithfulSAE @486a874, lines 32-36 `weight_sim`, 47-68
    `compute_similarity_matrix`, 162-179 in `feat_match`; SAE1 = seed 42, SAE2 = seed 49)."""
    from scipy.optimize import linear_sum_assignment

    top4 = torch.stack(
        [
            torch.nn.functional.cosine_similarity(w_dec1, w_dec2[i, :], dim=1).topk(4).values
            for i in range(w_dec2.shape[0])
        ]
    ).to(torch.float32)
    top1_ratio = (top4[:, 0] > threshold).float().mean().item()
    s = (w_dec1 / w_dec1.norm(dim=1, keepdim=True)) @ (w_dec2 / w_dec2.norm(dim=1, keepdim=True)).T
    rows, cols = linear_sum_assignment(-s.numpy())
    matched = s[rows, cols]
    margin = min((matched - threshold).abs().min().item(), (top4[:, 0] - threshold).abs().min().item())
    return {
        "shared_feature_ratio": (matched > threshold).float().mean().item(),
        "top1_ratio": top1_ratio,
        "margin": margin,
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_faithfulsae_transcription(seed):
    # decoders that share about half their directions, with noise so cosines spread around 0.7
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(120, 24, generator=g)
    w1 = torch.cat([base[:60] + 0.35 * torch.randn(60, 24, generator=g), torch.randn(60, 24, generator=g)])
    w2 = torch.cat([base[:60], torch.randn(70, 24, generator=g)])[torch.randperm(130, generator=g)]
    ref = _faithfulsae_feat_match(w1, w2)
    ours = shared_feature_ratio(w1, w2, 0.7, method="dense")
    assert 0.1 < ref["shared_feature_ratio"] < 0.6 and 0.1 < ref["top1_ratio"] < 0.6  # not a trivial case
    # a cosine within rounding of 0.7 could flip between float32 and float64; none is that close here
    assert ref["margin"] > 1e-5
    assert ours["shared_feature_ratio"] == pytest.approx(ref["shared_feature_ratio"], abs=1e-6)
    assert ours["top1_ratio"] == pytest.approx(ref["top1_ratio"], abs=1e-6)


@pytest.mark.parametrize("seed", [0, 2])
def test_default_matching_above_dense_max_equals_the_hungarian_one_on_clustered_decoders(seed):
    """Every real SAE has more than 2,048 latents, where ``auto`` takes the sparse matching. Clustered
    decoders (150 directions, each latent a noisy copy of one: many near-ties) are the hard case: with
    32 candidates per latent seed 2 came out 3 shared latents away from FaithfulSAE's dense Hungarian
    matching; the default (128) equals it, count and mean cosine."""
    g = torch.Generator().manual_seed(100 + seed)
    centers = torch.nn.functional.normalize(torch.randn(150, 64, generator=g), dim=-1)

    def clustered(s):
        gs = torch.Generator().manual_seed(s)
        return centers[torch.randint(0, 150, (3000,), generator=gs)] + 0.12 * torch.randn(3000, 64, generator=gs)

    a, b = clustered(2 * seed + 1), clustered(2 * seed + 2)
    dense = shared_feature_ratio(a, b, method="dense", device="cpu")
    auto = shared_feature_ratio(a, b, device="cpu")  # 3,000 > dense_max: sparse, default candidates
    assert 150 < dense["n_shared"] < 400  # not a trivial case
    assert auto["n_shared"] == dense["n_shared"]
    assert auto["mean_matched_cos"] == pytest.approx(dense["mean_matched_cos"], abs=1e-6)


def test_different_widths_and_half_shared():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(200, 32, generator=g)
    other = torch.cat([base[:100], torch.randn(150, 32, generator=g)])  # 250 latents, 100 shared
    for method in METHODS:
        res = shared_feature_ratio(base, other, 0.7, method=method)
        assert res["n_latents"] == 200 and res["shared_feature_ratio"] == pytest.approx(0.5)


def test_rejects_mismatched_spaces():
    with pytest.raises(ValueError, match="different spaces"):
        shared_feature_ratio(torch.randn(4, 8), torch.randn(4, 9))


def _save_sae(w_dec: torch.Tensor, path):
    sae = get_sae_class("topk")(w_dec.shape[1], w_dec.shape[0], k=4)
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(w_dec, dim=-1))
    sae.save(path, {"model_name": "test"})
    return path


def test_crossseed_hook_logs_groups_pairs_and_children(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts land under ./mlruns
    tracker = tracker_at(tmp_path)
    parent = tracker.start_parent("xs", "sweep", {"sweep_name": "xs"})
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 16, generator=g)
    decoders = {
        ("g1", 1): w,
        ("g1", 2): w[torch.randperm(64, generator=g)],
        ("g1", 3): torch.randn(64, 16, generator=g),
        ("g2", 1): torch.randn(64, 16, generator=g),
    }
    ids = {}
    for (group, seed), dec in decoders.items():
        run = tracker.child("xs", f"{group}-{seed}", f"key-{group}-{seed}", parent)
        run.set_tags({"seed_group": group * 8, "seed": seed})
        run.log_artifact_dir(_save_sae(dec, tmp_path / f"sae-{group}-{seed}"), "sae")
        run.close()
        ids[(group, seed)] = run.run_id
    results = [{"status": "finished", "run_id": i} for i in ids.values()]
    out = crossseed_hook(tracker, parent, [], results, tmp_path)

    pm = tracker.get_run(parent).data.metrics
    assert pm["crossseed/g1g1g1g1/seed_1_vs_2/shared_feature_ratio"] == 1.0
    assert pm["crossseed/g1g1g1g1/seed_1_vs_3/shared_feature_ratio"] < 0.1
    assert pm["crossseed/n_pairs"] == 3  # g1 has 3 seeds -> 3 pairs; g2 has one run -> none
    assert not any(k.startswith("crossseed/g2g2g2g2") for k in pm)
    assert out["crossseed/shared_feature_ratio_mean"] == pytest.approx(pm["crossseed/shared_feature_ratio_mean"])
    c1 = tracker.get_run(ids[("g1", 1)]).data.metrics
    assert c1["crossseed/vs_seed_2/shared_feature_ratio"] == 1.0
    assert c1["crossseed/shared_feature_ratio"] == pytest.approx(
        (1.0 + c1["crossseed/vs_seed_3/shared_feature_ratio"]) / 2
    )
    assert "crossseed/shared_feature_ratio" not in tracker.get_run(ids[("g2", 1)]).data.metrics

    # later, for any two runs
    res = compare_runs(tracker, ids[("g1", 1)], ids[("g1", 2)])
    assert res["shared_feature_ratio"] == 1.0
    b = ids[("g1", 2)]
    assert tracker.get_run(ids[("g1", 1)]).data.metrics[f"crossseed/vs_{b[:8]}/shared_feature_ratio"] == 1.0
