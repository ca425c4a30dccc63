"""HTML pieces of the feature pages: a context with per-token activation shading, an activation
histogram as inline SVG, a token list, and the self-contained page around them.

The ``dashboards`` eval (one SAE's latents) and the cross-seed browser of the sweep report (matched
latents of two seeds side by side) build their pages from these, so a latent reads the same on both.
Everything is inline (CSS, SVG): a page opens from disk with no network. Every text that came from
a tokenizer or a run is escaped.
"""

from __future__ import annotations

import html
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["context_html", "histogram_svg", "latent_card", "page", "token_list_html", "token_text"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.meta { color: #555; font-size: 0.9em; }
.cards { display: flex; flex-wrap: wrap; gap: 1em; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 0.7em; width: 560px; }
.card h3 { font-size: 1em; margin: 0 0 0.3em 0; }
.tag { font-size: 0.75em; background: #eef; border-radius: 3px; padding: 0 0.3em; margin-left: 0.3em; }
.ctx { font-family: ui-monospace, monospace; font-size: 0.8em; line-height: 1.6; margin: 0.15em 0;
       white-space: pre-wrap; word-break: break-all; border-bottom: 1px dotted #eee; }
.tok { border-radius: 2px; }
.tok.peak { outline: 1px solid #c40; }
.ctx .val { color: #888; font-size: 0.85em; margin-right: 0.4em; }
.toks { font-family: ui-monospace, monospace; font-size: 0.8em; }
.toks span { display: inline-block; margin: 0 0.25em 0.1em 0; padding: 0 0.2em; border-radius: 2px; }
.promoted span { background: #dfd; } .suppressed span { background: #fdd; }
.row { display: flex; gap: 1em; align-items: flex-start; }
.cols { display: flex; gap: 1.5em; align-items: flex-start; overflow-x: auto; }
.col { min-width: 600px; flex: 1; }
.pair { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 0.5em; margin: 0.6em 0; }
.pair .side { flex: 1; min-width: 0; }
.pair .card { width: auto; border: none; padding: 0.2em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 0.2em 0.5em; }
"""


def token_text(s: str) -> str:
    """A token's text as a page shows it: newlines and tabs as visible marks."""
    return s.replace("\n", "\u21b5").replace("\t", "\u21e5")


def context_html(tokens: Sequence[str], acts: Sequence[float], peak: int, scale: float) -> str:
    """One context: each token a ``span.tok`` whose orange shade is its activation over ``scale``
    (the latent's largest activation); tokens where the latent fires carry ``data-act`` and class
    ``on``, the context's largest one also ``peak``."""
    parts = [f'<span class="val">{acts[peak]:.3g}</span>' if 0 <= peak < len(acts) else ""]
    for i, (t, a) in enumerate(zip(tokens, acts)):
        text = html.escape(token_text(t))
        if a > 0:
            alpha = min(1.0, a / scale) if scale > 0 else 1.0
            cls = "tok on peak" if i == peak else "tok on"
            parts.append(
                f'<span class="{cls}" data-act="{a:.4g}" title="{a:.4g}" '
                f'style="background: rgba(255, 110, 0, {0.15 + 0.85 * alpha:.2f})">{text}</span>'
            )
        else:
            parts.append(f'<span class="tok">{text}</span>')
    return f'<div class="ctx">{"".join(parts)}</div>'


def histogram_svg(counts: Sequence[float], low: float, high: float, label: str, width: int = 260) -> str:
    """Bars of ``counts`` over equal bins from ``low`` to ``high`` (written under the axis), inline SVG."""
    height, pad = 70, 14
    top = max(counts) if len(counts) and max(counts) > 0 else 1
    n = max(1, len(counts))
    bw = width / n
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - pad - (height - pad) * c / top:.1f}" width="{max(bw - 0.5, 0.5):.1f}" '
        f'height="{(height - pad) * c / top:.1f}" fill="#e67e22"><title>{c:g}</title></rect>'
        for i, c in enumerate(counts)
        if c > 0
    )
    return (
        f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{html.escape(label)}">{bars}'
        f'<line x1="0" y1="{height - pad}" x2="{width}" y2="{height - pad}" stroke="#999"/>'
        f'<text x="0" y="{height - 2}" font-size="9">{html.escape(str(low))}</text>'
        f'<text x="{width / 2:.0f}" y="{height - 2}" font-size="9" text-anchor="middle">{html.escape(label)}</text>'
        f'<text x="{width}" y="{height - 2}" font-size="9" text-anchor="end">{html.escape(str(high))}</text></svg>'
    )


def token_list_html(kind: str, tokens: Sequence[str], values: Sequence[float]) -> str:
    """``kind`` is ``promoted`` or ``suppressed`` (the CSS class); each token with its logit."""
    items = "".join(
        f'<span title="{v:+.3g}">{html.escape(token_text(t))} <small>{v:+.2f}</small></span>'
        for t, v in zip(tokens, values)
    )
    return f'<div class="toks {kind}"><b>{kind}:</b> {items}</div>'


def latent_card(
    latent: int,
    tags: Sequence[str],
    stats: str,
    contexts: List[Dict[str, Any]],
    scale: float,
    histogram: Optional[str] = None,
    output_tokens: Optional[Dict[str, Any]] = None,
) -> str:
    """One latent: its header (index, tags, ``stats``), histogram, output tokens and contexts.
    ``contexts``: dicts with ``tokens`` (texts), ``acts`` and ``peak`` (index into them)."""
    tag_html = "".join(f'<span class="tag">{html.escape(t)}</span>' for t in tags)
    out = [f'<div class="card" id="latent-{latent}" data-latent="{latent}">']
    out.append(f"<h3>latent {latent}{tag_html}</h3><div class='meta'>{html.escape(stats)}</div>")
    if histogram:
        out.append(histogram)
    if output_tokens:
        out.append(token_list_html("promoted", output_tokens["promoted"], output_tokens["promoted_logits"]))
        out.append(token_list_html("suppressed", output_tokens["suppressed"], output_tokens["suppressed_logits"]))
    if not contexts:
        out.append("<div class='meta'>no firing in the held-out text read</div>")
    out += [context_html(c["tokens"], c["acts"], c["peak"], scale) for c in contexts]
    out.append("</div>")
    return "".join(out)


def page(title: str, intro: str, body: str) -> str:
    """A self-contained HTML document: ``intro`` is escaped text, ``body`` is HTML."""
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='meta'>{html.escape(intro)}</p>{body}</body></html>"
    )
