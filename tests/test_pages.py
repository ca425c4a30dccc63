"""The feature dashboard and the cross-seed browser as a person sees them: headless chromium renders
each page from a real MLflow store's artifacts, and the tests assert on the DOM it built -- the
contexts, the highlighted tokens, the matched pairs. The model is the constructed one of
``helpers.feature_model``: latent 0 fires on " cat" only, so where it must show up is known."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from helpers.browser import rendered_dom, screenshot
from helpers.feature_model import ACT, D_SAE, constructed
from helpers.mlflow_store import tracker_at
from sae_sweep.evals import flatten_metrics
from sae_sweep.evals.dashboards import DATA_ARTIFACT, PAGE_ARTIFACT, run_dashboards
from sae_sweep.report.crossseed_browser import BROWSER_ARTIFACT, browser_hook

pytestmark = pytest.mark.integration  # headless chromium runs as a child process

ALL = {"n_frequent": D_SAE, "n_random": 0}  # every alive latent on the page


@pytest.fixture(scope="module")
def model():
    return constructed()


def _on_tokens(card) -> list:
    return [s.text_content() for s in card.find_all("span", cls="on")]


def test_dashboard_dom_shows_the_latent_on_its_token(model, tmp_path):
    out = run_dashboards(model["lm"], model["sae"], model["tokens"], 0, "resid_pre", 0, ALL)
    page = tmp_path / "dashboard.html"
    page.write_text(out.files[PAGE_ARTIFACT])
    dom = rendered_dom(page)
    (card,) = dom.find_all("div", cls="card", data_latent="0")
    contexts = card.find_all("div", cls="ctx")
    assert len(contexts) == 8  # n_contexts: " cat" is in more windows than that
    for ctx in contexts:
        on = ctx.find_all("span", cls="on")
        assert [s.text_content() for s in on] == [" cat"]  # highlighted: the latent's token, nothing else
        assert "peak" in on[0].classes and float(on[0].attrs["data-act"]) == pytest.approx(ACT, rel=1e-3)
        assert len(ctx.find_all("span", cls="tok")) > 5  # with the text around it
    promoted = card.find_all("div", cls="promoted")[0].find_all("span")
    suppressed = card.find_all("div", cls="suppressed")[0].find_all("span")
    assert promoted[0].text_content().startswith(" park") and suppressed[0].text_content().startswith(" tree")
    assert card.find_all("svg", cls="hist")  # its activation histogram, inline
    png = screenshot(page, tmp_path / "dashboard.png")
    assert png.stat().st_size > 10_000


def test_browser_dom_pairs_the_seeds_latents_side_by_side(model, tmp_path, monkeypatch):
    """Two datasets x two seeds; seed 2's SAE is seed 1's with its latents permuted, so every latent is
    matched (cosine 1) and latent 0's partner is known. The page comes from the runs' logged dashboards."""
    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts land under ./mlruns
    tracker = tracker_at(tmp_path)
    parent = tracker.start_parent("pages", "sweep", {"sweep_name": "pages"})
    perm = torch.randperm(D_SAE, generator=torch.Generator().manual_seed(5))
    partner = int((perm == 0).nonzero())  # seed 2's latent that is seed 1's latent 0
    base = model["sae"]
    results = []
    for dataset in ("builtin", "faithful"):
        for seed in (1, 2):
            sae = constructed_copy(base, perm if seed == 2 else torch.arange(D_SAE))
            run = tracker.child("pages", f"{dataset}-{seed}", f"key-{dataset}-{seed}", parent)
            tags = dict(model="constructed", layer="0", hook="resid_pre", dataset=dataset, trainer="relu")
            run.set_tags({**tags, "seed": seed, "seed_group": f"group-{dataset}"})
            run.log_artifact_dir(sae.save(tmp_path / f"sae-{dataset}-{seed}", {"model_name": "constructed"}), "sae")
            out = run_dashboards(model["lm"], sae, model["tokens"], 0, "resid_pre", seed, ALL)
            run.log_metrics(flatten_metrics(out, "dashboards"))  # what a job logs of the eval
            for path, text in out.files.items():
                run.log_text(text, path)
            run.close()
            results.append({"run_id": run.run_id})

    # a sweep point as the hook sees it: its config's eval.crossseed (every pair on the page)
    point = SimpleNamespace(cfg=OmegaConf.create({"eval": {"crossseed": {"browser_pairs": D_SAE}}}))
    path = browser_hook(tracker, parent, [point], results, tmp_path / "sweep")
    assert path is not None and BROWSER_ARTIFACT in [
        f"crossseed/{p.rsplit('/', 1)[-1]}" for p in tracker.list_artifacts(parent, "crossseed")
    ]
    dom = rendered_dom(path)
    columns = dom.find_all("div", cls="col")
    assert [c.attrs["data-group"] for c in columns] == ["constructed/builtin/relu", "constructed/faithful/relu"]
    for col in columns:
        pairs = col.find_all("div", cls="pair")
        assert pairs and all(float(p.attrs["data-cos"]) > 0.999 for p in pairs)
        (pair,) = [p for p in pairs if p.attrs["data-pair"] == f"0-{partner}"]
        left, right = pair.find_all("div", cls="card")
        assert (left.attrs["data-latent"], right.attrs["data-latent"]) == ("0", str(partner))
        for card in (left, right):
            on = _on_tokens(card)
            assert on and set(on) == {" cat"}  # both sides show the same token lit
        assert col.find_all("div", cls="unmatched")  # sections exist even when every latent matched
    assert "0 alive latents with no partner" in columns[0].text_content()
    assert screenshot(path, tmp_path / "browser.png").stat().st_size > 10_000

    # the sweep report links the browser (the hooks' order: crossseed, browser, report)
    from sae_sweep.report import build_report

    report = build_report(tracker, parent, tmp_path / "sweep" / "report", log_to_mlflow=False)
    assert f"(../{BROWSER_ARTIFACT})" in report.markdown.read_text()
    assert (report.markdown.parent / ".." / BROWSER_ARTIFACT).resolve().exists()
    assert DATA_ARTIFACT.startswith("dashboard/")


def constructed_copy(sae, order: torch.Tensor):
    """``sae`` with its latents in ``order`` (latent j of the copy is latent order[j] of ``sae``)."""
    import copy

    out = copy.deepcopy(sae)
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc[:, order])
        out.b_enc.copy_(sae.b_enc[order])
        out.W_dec.copy_(sae.W_dec[order])
    return out
