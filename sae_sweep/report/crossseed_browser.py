"""The cross-seed feature browser: for each seed group of a sweep, which latents two seeds share and
what they respond to, one self-contained HTML page beside the sweep report.

Per seed group (one column per variant, so the sweep's datasets stand side by side), its two lowest
seeds A and B:

* matched pairs: the decoders are matched one-to-one by cosine (``shared_features.match_latents``,
  the matching the shared-feature ratio counts); pairs above ``eval.crossseed.threshold``, strongest
  first, those where both latents fired on held-out text before the others, each with both
  latents' top contexts side by side;
* unmatched latents of each seed: alive latents with no partner above the threshold in the other
  seed's decoder (most frequent first);
* fake features of each seed (the ``fake_features`` eval), when the runs ran it before the dashboards.

The contexts come from each run's ``dashboard/latents.json`` (the ``dashboards`` eval), the decoders
from its ``sae/`` artifact: no language model runs here. The page is written to
``<sweep_dir>/crossseed/browser.html`` and logged to the parent run as ``crossseed/browser.html``.
"""

from __future__ import annotations

import html
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from sae_sweep.evals.dashboard_html import latent_card, page
from sae_sweep.evals.dashboards import DATA_ARTIFACT
from sae_sweep.evals.shared_features import CrossSeedSettings, match_latents
from sae_sweep.report.crossseed import crossseed_settings, load_decoder
from sae_sweep.report.data import collect

log = logging.getLogger(__name__)

__all__ = ["BROWSER_ARTIFACT", "browser_hook", "build_browser"]

BROWSER_ARTIFACT = "crossseed/browser.html"


@dataclass
class SeedRun:
    run_id: str
    seed: str
    data: Optional[Dict[str, Any]]  # latents.json, None when the run has no dashboard
    decoder: Any


def _contexts(data: Dict[str, Any], latent: int, limit: int) -> List[Dict[str, Any]]:
    entry = data["latents"].get(str(latent))
    if entry is None:
        return []
    texts = data["texts"]
    return [
        {"tokens": [texts[str(i)] for i in c["ids"]], "acts": c["acts"], "peak": c["peak"]}
        for c in entry["contexts"][:limit]
    ]


def _card(run: SeedRun, latent: int, tags: Sequence[str], limit: int, extra: str = "") -> str:
    assert run.data is not None
    entry = run.data["latents"].get(str(latent), {})
    density = entry.get("density", 0.0)
    scale = float(entry.get("max_activation", 0.0))
    stats = f"seed {run.seed}; density {density:.3g}; max activation {scale:.3g}{extra}"
    return latent_card(latent, [f"seed {run.seed}", *tags], stats, _contexts(run.data, latent, limit), scale)


def _group_html(label: str, a: SeedRun, b: SeedRun, s: CrossSeedSettings) -> str:
    """One column: a group's matched pairs, unmatched latents and fake features."""
    out = [f"<div class='col' data-group='{html.escape(label)}'><h2>{html.escape(label)}</h2>"]
    if a.data is None or b.data is None:
        missing = ", ".join(f"seed {r.seed}" for r in (a, b) if r.data is None)
        out.append(f"<p class='meta'>no dashboard data for {missing} (eval.run without dashboards)</p></div>")
        return "".join(out)
    m = match_latents(a.decoder, b.decoder, method=s.method, dense_max=s.dense_max, candidates=s.candidates)
    fired_a, fired_b = set(map(int, a.data["latents"])), set(map(int, b.data["latents"]))
    shared = [(int(i), int(j), float(c)) for i, j, c in zip(m.rows, m.cols, m.cos) if c > s.threshold]
    shared.sort(key=lambda p: (not (p[0] in fired_a and p[1] in fired_b), -p[2]))
    n = min(m.n_a, m.n_b)
    out.append(
        f"<p class='meta'>seeds {html.escape(a.seed)} and {html.escape(b.seed)}: {len(shared)} of {n} latents matched "
        f"with decoder cosine &gt; {s.threshold:g} (shared-feature ratio {len(shared) / max(1, n):.3f})</p>"
    )
    out.append(f"<h3>Matched pairs (top {min(s.browser_pairs, len(shared))})</h3>")
    for i, j, c in shared[: s.browser_pairs]:
        out.append(
            f"<div class='pair' data-pair='{i}-{j}' data-cos='{c:.4f}'><b>cosine {c:.3f}</b><div class='row'>"
            f"<div class='side'>{_card(a, i, ['matched'], s.browser_contexts)}</div>"
            f"<div class='side'>{_card(b, j, ['matched'], s.browser_contexts)}</div></div></div>"
        )
    for run, data, other, best in ((a, a.data, b, m.best_a), (b, b.data, a, m.best_b)):
        latents = data["latents"]
        alive = [int(k) for k in latents if latents[k]["contexts"]]
        lonely = [i for i in alive if float(best[i]) <= s.threshold]
        lonely.sort(key=lambda i: -latents[str(i)]["density"])
        out.append(
            f"<h3>Unmatched in seed {html.escape(run.seed)} ({len(lonely)} alive latents with no partner above "
            f"{s.threshold:g} in seed {html.escape(other.seed)})</h3><div class='cards unmatched'>"
        )
        out += [
            _card(run, i, ["unmatched"], s.browser_contexts, f"; best cosine {float(best[i]):.2f}")
            for i in lonely[: s.browser_unmatched]
        ]
        out.append("</div>")
    for run, data in ((a, a.data), (b, b.data)):
        fake = data.get("fake")
        out.append(f"<h3>Fake features of seed {html.escape(run.seed)}</h3><div class='cards fake'>")
        if fake is None:
            out.append("<p class='meta'>unknown: fake_features did not run before the dashboards</p>")
        elif not fake:
            out.append("<p class='meta'>none</p>")
        else:
            out.append(f"<p class='meta'>{len(fake)} fake features</p>")
            out += [_card(run, i, ["fake"], s.browser_contexts) for i in fake[: s.browser_unmatched]]
        out.append("</div>")
    out.append("</div>")
    return "".join(out)


def build_browser(tracker: Any, parent_run_id: str, settings: CrossSeedSettings, extra_run_ids: Sequence[str] = ()):
    """The browser page of a sweep (None when no seed group has two FINISHED runs)."""
    sweep = collect(tracker, parent_run_id, extra_run_ids)
    runs = sweep.finished
    if runs.empty:
        return None
    columns = []
    with tempfile.TemporaryDirectory() as d:
        for (label, _group), rows in runs.groupby(["variant", "seed_group"], sort=True):
            if len(rows) < 2:
                continue
            seed_runs = []
            for _, r in rows.iloc[:2].iterrows():  # rows are sorted by seed
                data = None
                if DATA_ARTIFACT in tracker.list_artifacts(r["run_id"], "dashboard"):
                    path = tracker.download(r["run_id"], DATA_ARTIFACT, Path(d) / r["run_id"])
                    data = json.loads(Path(path).read_text())
                seed_runs.append(
                    SeedRun(r["run_id"], str(r["seed"]), data, load_decoder(tracker, r["run_id"], Path(d)))
                )
            columns.append(_group_html(str(label), seed_runs[0], seed_runs[1], settings))
    if not columns:
        return None
    intro = (
        f"Sweep {sweep.parent_name}: per seed group, the latents of its two lowest seeds matched one-to-one by "
        "decoder cosine; each latent with its top contexts on held-out text (shading: its activation over its "
        "largest one). Columns: the sweep's variants (datasets side by side)."
    )
    return page("Cross-seed feature browser", intro, f"<div class='cols'>{''.join(columns)}</div>")


def browser_hook(
    tracker: Any, parent_run_id: str, points: Sequence[Any], results: Sequence[Any], sweep_dir: Any
) -> Optional[Path]:
    """Sweep-end hook: write ``<sweep_dir>/crossseed/browser.html`` and log it to the parent run.
    Settings from ``eval.crossseed`` (``browser``: off builds nothing). Never raises."""
    try:
        s = crossseed_settings(points)
        if not (s.enabled and s.browser):
            return None
        ids = [r["run_id"] for r in results or () if isinstance(r, dict) and r.get("run_id")]
        doc = build_browser(tracker, parent_run_id, s, ids)
        if doc is None:
            log.info("crossseed browser: no seed group with two FINISHED runs; no page")
            return None
        path = Path(sweep_dir) / BROWSER_ARTIFACT
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc)
        tracker.log_artifact_file(parent_run_id, path, "crossseed")
        log.info("crossseed browser: %s (logged to run %s as %s)", path, parent_run_id, BROWSER_ARTIFACT)
        return path
    except Exception as e:  # a page must never turn a finished sweep into a failed one
        log.exception("crossseed browser failed: %s", e)
        return None
