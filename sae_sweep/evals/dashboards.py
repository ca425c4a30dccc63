"""Feature dashboards: what a sample of an SAE's latents respond to, as one self-contained HTML page.

One pass over the held-out windows encodes every token with the SAE and keeps, for EVERY latent,
bounded running state (memory O(d_sae * (contexts * context length + histogram bins)), whatever the
amount of text):

* how often it fires (its density) and a histogram of log10 of its non-zero activations;
* its top-activating contexts, streamed as a top-k per latent: at most one context per window (the
  window's largest activation of the latent), with the latent's activation on each token of a short
  span around that peak (``context_before`` / ``context_after`` tokens).

BOS/EOS/PAD positions are left out (the core eval's ``keep_mask``): their activations are outliers
that say nothing about the text.

The page shows latents chosen to be useful: the ``n_frequent`` most frequent ones, ``n_random``
random alive ones (seeded by the run's seed) and, when the ``fake_features`` eval ran earlier in the
same job, up to ``n_fake`` of its fake features (the most often firing on random tokens first). The
cross-seed matched latents are known only at the end of a sweep: the sweep report's cross-seed
browser shows them, from the data file below. For each shown latent the page has its contexts with
per-token shading, its histogram, and the tokens its decoder direction promotes and suppresses:
``LanguageModel.direction_logits`` reads the direction through the model's final norm (applied to
the direction, biases removed) and the unembedding, the logit lens of a direction.

Artifacts (``EvalOutput.files``, logged by the job): ``dashboard/dashboard.html`` (the page) and
``dashboard/latents.json`` (for every alive latent: density, largest activation and its top
``json_contexts`` contexts as token ids and activations, with the texts of those ids), which the
cross-seed browser reads instead of running the LM again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from sae_sweep.config import setting
from sae_sweep.evals.core import keep_mask
from sae_sweep.evals.dashboard_html import histogram_svg, latent_card, page
from sae_sweep.evals.registry import register_eval, settings_dict
from sae_sweep.evals.schema import EvalOutput
from sae_sweep.util.metrics import Metric

__all__ = ["DashboardSettings", "LatentStats", "collect_latent_stats", "run_dashboards"]

EVAL_TYPE_ID = "dashboards"
PAGE_ARTIFACT = "dashboard/dashboard.html"
DATA_ARTIFACT = "dashboard/latents.json"
DATA_VERSION = 1
# log10 of a non-zero activation, binned over [HIST_LOW, HIST_HIGH) in HIST_BINS bins (ends clipped)
HIST_LOW, HIST_HIGH, HIST_BINS = -3.0, 3.0, 48


def _at_least(n: int) -> Any:
    return lambda v: v >= n


@dataclass
class DashboardSettings:
    """``eval.dashboards``: which latents the page shows and how much of each."""

    n_frequent: int = setting(8, allowed="an integer >= 0 (most frequent latents shown)", check=_at_least(0))
    n_random: int = setting(8, allowed="an integer >= 0 (random alive latents shown)", check=_at_least(0))
    n_fake: int = setting(
        8, allowed="an integer >= 0 (fake features shown, when fake_features ran first)", check=_at_least(0)
    )
    n_contexts: int = setting(8, allowed="an integer >= 1 (top contexts per shown latent)", check=_at_least(1))
    json_contexts: int = setting(
        4, allowed="an integer >= 1 (top contexts per alive latent in latents.json)", check=_at_least(1)
    )
    context_before: int = setting(12, allowed="an integer >= 0 (tokens shown before the peak)", check=_at_least(0))
    context_after: int = setting(4, allowed="an integer >= 0 (tokens shown after the peak)", check=_at_least(0))
    n_output_tokens: int = setting(
        8, allowed="an integer >= 1 (promoted and suppressed tokens per latent)", check=_at_least(1)
    )
    max_windows: Optional[int] = setting(
        None, allowed="null (every held-out window) or an integer >= 1", check=_at_least(1)
    )
    batch_size: int = setting(8, allowed="an integer >= 1 (windows per forward pass)", check=_at_least(1))


@dataclass
class LatentStats:
    """What one pass over held-out text leaves per latent (``d`` latents, ``k`` kept contexts, span ``L``)."""

    fires: torch.Tensor  # [d] scored tokens where the latent is non-zero
    hist: torch.Tensor  # [d, HIST_BINS] counts of log10(activation)
    top_values: torch.Tensor  # [k, d] the peak activation of each kept context (<= 0: no context)
    top_window: torch.Tensor  # [k, d] its window
    top_pos: torch.Tensor  # [k, d] the peak's position in the window
    top_span: torch.Tensor  # [k, d, L] the latent's activation at peak - before .. peak + after
    n_tokens: int  # scored tokens read
    n_windows: int


@torch.no_grad()
def collect_latent_stats(
    lm: Any,
    sae: Any,
    tokens: torch.Tensor,
    layer: int,
    hook: str,
    keep: int,
    before: int,
    after: int,
    batch_size: int,
    progress: bool = False,
) -> LatentStats:
    """The module docstring's one pass over ``tokens [N, T]``; ``keep`` contexts per latent."""
    p = next(iter(sae.parameters()))
    d = int(sae.W_dec.shape[0])
    n, t = tokens.shape
    span = torch.arange(-before, after + 1)
    fires = torch.zeros(d, dtype=torch.int64)
    hist = torch.zeros(d * HIST_BINS, dtype=torch.int64)
    top_v = torch.full((keep, d), -1.0)
    top_w = torch.zeros((keep, d), dtype=torch.int64)
    top_p = torch.zeros((keep, d), dtype=torch.int64)
    top_s = torch.zeros((keep, d, len(span)))
    n_scored = 0
    for start in tqdm(range(0, n, batch_size), desc="dashboards", disable=not progress, leave=False):
        ids = tokens[start : start + batch_size]
        b = ids.shape[0]
        acts = lm.activations(ids.to(lm.device), layer, hook)
        f = sae.encode(acts.reshape(b * t, -1).to(device=p.device, dtype=p.dtype)).float().cpu().reshape(b, t, d)
        scored = keep_mask(ids, lm.special_token_ids)
        f = f * scored[:, :, None]
        n_scored += int(scored.sum())
        on = f > 0
        fires += on.sum(dim=(0, 1))
        _, _, j = on.nonzero(as_tuple=True)
        vals = f[on]
        bins = ((vals.log10() - HIST_LOW) / (HIST_HIGH - HIST_LOW) * HIST_BINS).floor().clamp(0, HIST_BINS - 1)
        hist += torch.bincount(j * HIST_BINS + bins.long(), minlength=d * HIST_BINS)
        # streaming top-k: each window's peak per latent competes with the kept ones; only latents
        # whose best new peak beats their k-th kept one are merged (after a few batches, few are)
        win_v, win_p = f.max(dim=1)  # [b, d]
        v, w = win_v.topk(min(keep, b), dim=0)  # [kk, d]
        cols = (v[0] > top_v[-1]).nonzero().squeeze(1)
        if len(cols) == 0:
            continue
        v, w = v[:, cols], w[:, cols]
        pos = win_p[:, cols].gather(0, w)
        at = pos[:, :, None] + span  # [kk, c, L]
        inside = (at >= 0) & (at < t)
        s = f[w[:, :, None].expand_as(at), at.clamp(0, t - 1), cols[None, :, None].expand_as(at)] * inside
        all_v = torch.cat([top_v[:, cols], v])
        best = all_v.topk(keep, dim=0).indices
        top_v[:, cols] = all_v.gather(0, best)
        top_w[:, cols] = torch.cat([top_w[:, cols], w + start]).gather(0, best)
        top_p[:, cols] = torch.cat([top_p[:, cols], pos]).gather(0, best)
        top_s[:, cols] = torch.cat([top_s[:, cols], s]).gather(0, best[:, :, None].expand(-1, -1, len(span)))
    return LatentStats(fires, hist.reshape(d, HIST_BINS), top_v, top_w, top_p, top_s, n_scored, n)


def latent_contexts(
    stats: LatentStats, latents: Sequence[int], tokens: torch.Tensor, before: int, limit: int
) -> Dict[int, List[Dict[str, Any]]]:
    """Per latent, up to ``limit`` contexts, strongest first: token ids, activations and the index of
    the peak in them (the span cut where its window ends). Tensors become lists once, up front:
    element-wise tensor access would cost more than the pass itself at d_sae in the thousands."""
    t, span = tokens.shape[1], stats.top_span.shape[2]
    keep = min(limit, stats.top_values.shape[0])
    idx = torch.as_tensor(list(latents), dtype=torch.long)
    values = stats.top_values[:keep, idx].T.tolist()
    windows = stats.top_window[:keep, idx].T.tolist()
    positions = stats.top_pos[:keep, idx].T.tolist()
    spans = stats.top_span[:keep, idx].permute(1, 0, 2).tolist()
    token_rows = tokens.tolist()
    out: Dict[int, List[Dict[str, Any]]] = {}
    for n, j in enumerate(latents):
        rows = []
        for r in range(keep):
            if values[n][r] <= 0:
                break
            w, pos = windows[n][r], positions[n][r]
            lo, hi = max(0, pos - before), min(t, pos + span - before)
            acts = spans[n][r][lo - pos + before : hi - pos + before]
            rows.append({"ids": token_rows[w][lo:hi], "acts": [round(a, 4) for a in acts], "peak": pos - lo})
        out[int(j)] = rows
    return out


def choose_latents(
    fires: torch.Tensor, fake: Sequence[int], n_frequent: int, n_random: int, n_fake: int, seed: int
) -> Dict[str, List[int]]:
    """The latents a page shows, by why: ``frequent`` (most firings), ``random`` (alive, seeded, not
    among the frequent ones), ``fake`` (given, in their order)."""
    alive = (fires > 0).nonzero().squeeze(1)
    order = alive[fires[alive].argsort(descending=True, stable=True)]
    frequent = order[:n_frequent].tolist()
    rest = order[n_frequent:]
    g = torch.Generator().manual_seed(int(seed))
    random = sorted(rest[torch.randperm(len(rest), generator=g)[:n_random]].tolist())
    return {"frequent": frequent, "random": random, "fake": list(fake)[:n_fake]}


def fake_latents(earlier: Dict[str, Any]) -> Optional[List[int]]:
    """Fake features of the ``fake_features`` eval when it ran earlier in the job (most often
    firing on random tokens first); None when it did not."""
    out = earlier.get("fake_features")
    if out is None or out.status != "ok" or not out.details:
        return None
    threshold = float(out.config["threshold"])
    rows = [r for r in out.details if r["proportion_above_activation_threshold"] > threshold]
    rows.sort(key=lambda r: -r["proportion_above_activation_threshold"])
    return [int(r["index"]) for r in rows]


def output_tokens(lm: Any, sae: Any, latents: Sequence[int], n: int) -> Dict[int, Dict[str, Any]]:
    """Per latent: the ``n`` tokens its decoder direction promotes most and suppresses most."""
    if not latents:
        return {}
    logits = lm.direction_logits(sae.W_dec[list(latents)].detach())
    n = min(n, logits.shape[1])
    top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
    out = {}
    for row, j in enumerate(latents):
        out[j] = {
            "promoted": [decode(lm, i) for i in top.indices[row].tolist()],
            "promoted_logits": [round(float(v), 3) for v in top.values[row]],
            "suppressed": [decode(lm, i) for i in bottom.indices[row].tolist()],
            "suppressed_logits": [round(float(v), 3) for v in bottom.values[row]],
        }
    return out


def decode(lm: Any, token_id: int) -> str:
    return lm.tokenizer.decode([int(token_id)])


def render_page(
    title: str,
    intro: str,
    groups: Dict[str, List[int]],
    stats: LatentStats,
    contexts: Dict[int, List[Dict[str, Any]]],
    outputs: Dict[int, Dict[str, Any]],
    texts: Dict[int, str],
) -> str:
    """The dashboard page: one section per reason a latent was chosen, each latent once (in the
    first section it belongs to, tagged with every reason)."""
    headings = {
        "frequent": "Most frequent latents",
        "random": "Random alive latents",
        "fake": "Fake features (fire on random tokens)",
    }
    reasons: Dict[int, List[str]] = {}
    for g, latents in groups.items():
        for j in latents:
            reasons.setdefault(j, []).append(g)
    max_act = stats.top_values[0].clamp_min(0)
    density = stats.fires.double() / max(1, stats.n_tokens)
    density_hist = torch.histc(density[density > 0].log10().float(), bins=40, min=-6, max=0)
    body = [
        "<h2>Density of every latent</h2>",
        histogram_svg(density_hist.tolist(), -6, 0, "log10 firing frequency (alive latents)", width=520),
    ]
    shown = set()
    for g, latents in groups.items():
        body.append(f"<h2>{headings[g]}</h2><div class='cards'>")
        if not latents:
            body.append("<p class='meta'>none</p>")
        for j in latents:
            if j in shown:
                continue
            shown.add(j)
            stats_line = (
                f"density {float(density[j]):.3g} ({int(stats.fires[j])} of {stats.n_tokens} tokens), "
                f"max activation {float(max_act[j]):.3g}"
            )
            ctxs = [{"tokens": [texts[i] for i in c["ids"]], "acts": c["acts"], "peak": c["peak"]} for c in contexts[j]]
            body.append(
                latent_card(
                    j,
                    reasons[j],
                    stats_line,
                    ctxs,
                    float(max_act[j]),
                    histogram_svg(stats.hist[j].tolist(), HIST_LOW, HIST_HIGH, "log10 activation"),
                    outputs.get(j),
                )
            )
        body.append("</div>")
    return page(title, intro, "".join(body))


def run_dashboards(
    lm: Any,
    sae: Any,
    tokens: torch.Tensor,
    layer: int,
    hook: str,
    seed: int,
    settings: Any,
    earlier: Optional[Dict[str, Any]] = None,
    title: str = "Feature dashboard",
    progress: bool = False,
) -> EvalOutput:
    s = settings_dict(DashboardSettings, settings, "eval.dashboards")
    if lm is None or tokens is None:
        return EvalOutput.skipped(EVAL_TYPE_ID, s, "dashboards need a language model and held-out text")
    if s["max_windows"] is not None:
        tokens = tokens[: s["max_windows"]]
    keep = max(s["n_contexts"], s["json_contexts"])
    before, after = s["context_before"], s["context_after"]
    stats = collect_latent_stats(lm, sae, tokens, layer, hook, keep, before, after, s["batch_size"], progress)
    fake = fake_latents(earlier or {})
    groups = choose_latents(stats.fires, fake or [], s["n_frequent"], s["n_random"], s["n_fake"], seed)
    shown = list(dict.fromkeys(j for g in groups.values() for j in g))
    alive = (stats.fires > 0).nonzero().squeeze(1).tolist()
    # the shown latents' contexts for the page; every other alive latent's only for the data file
    contexts = latent_contexts(stats, sorted(set(alive) - set(shown)), tokens, before, s["json_contexts"])
    contexts.update(latent_contexts(stats, shown, tokens, before, keep))
    outputs = output_tokens(lm, sae, shown, s["n_output_tokens"])
    ids = sorted({i for cs in contexts.values() for c in cs for i in c["ids"]})
    texts = {i: decode(lm, i) for i in ids}
    max_act = stats.top_values[0].clamp_min(0)
    intro = (
        f"{len(shown)} latents of {stats.fires.numel()} (layer {layer}, {hook}), read on {stats.n_windows} held-out "
        f"windows ({stats.n_tokens} scored tokens). Shading: the latent's activation on each token over its "
        "largest activation in this text; outlined: the context's peak. Output tokens: the decoder direction "
        "through the final norm and the unembedding."
        + (" Fake features: the fake_features eval did not run before this one." if fake is None else "")
    )
    html_page = render_page(
        title, intro, groups, stats, {j: contexts[j][: s["n_contexts"]] for j in shown}, outputs, texts
    )
    fires, largest = stats.fires.tolist(), max_act.tolist()
    data = {
        "version": DATA_VERSION,
        "d_sae": int(stats.fires.numel()),
        "layer": layer,
        "hook": hook,
        "n_windows": stats.n_windows,
        "n_tokens": stats.n_tokens,
        "fake": fake,
        "shown": groups,
        "texts": {str(i): t for i, t in texts.items()},
        "latents": {
            str(j): {
                "density": fires[j] / max(1, stats.n_tokens),
                "max_activation": round(largest[j], 4),
                "contexts": [{k: c[k] for k in ("ids", "acts", "peak")} for c in contexts[j][: s["json_contexts"]]],
                **({"output_tokens": outputs[j]} if j in outputs else {}),
            }
            for j in sorted(set(alive) | set(shown))
        },
    }
    metrics = {
        "latents_shown": float(len(shown)),
        "alive_on_text": float(len(alive)) / max(1, stats.fires.numel()),
        "windows_read": float(stats.n_windows),
    }
    return EvalOutput(
        eval_type_id=EVAL_TYPE_ID,
        config={**s, "layer": layer, "hook": hook, "fake_known": fake is not None},
        metrics={"dashboard": metrics},
        files={PAGE_ARTIFACT: html_page, DATA_ARTIFACT: json.dumps(data, separators=(",", ":"))},
    )


METRICS = (
    Metric(
        "dashboards/dashboard/latents_shown",
        "latents on the dashboard",
        None,
        "latents",
        "The number of latents the dashboard page shows (most frequent, random alive, fake when known).",
        "this project",
    ),
    Metric(
        "dashboards/dashboard/alive_on_text",
        "alive on dashboard text",
        None,
        "fraction of latents",
        "The fraction of latents that fire at least once on the held-out windows the dashboard read "
        "(those it has contexts for; compare core/misc_metrics/frac_alive).",
        "this project",
    ),
    Metric(
        "dashboards/dashboard/windows_read",
        "dashboard windows",
        None,
        "windows",
        "Held-out windows the one pass read (all of them unless eval.dashboards.max_windows caps it).",
        "this project",
    ),
)


@register_eval("dashboards", DashboardSettings, METRICS)
def run(ctx: Any) -> EvalOutput:
    name = (ctx.sae_cfg or {}).get("run_key") or ""
    title = f"Feature dashboard {name[:12]}".strip()
    return run_dashboards(
        ctx.lm, ctx.sae, ctx.tokens, ctx.layer, ctx.hook, ctx.seed, ctx.settings, ctx.earlier, title, ctx.progress
    )
