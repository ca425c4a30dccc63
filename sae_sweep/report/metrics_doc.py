"""``docs/metrics.md`` from the metric declarations: one table per eval, training, cross-seed.

    python -m sae_sweep.report.metrics_doc                          # print the page
    python -m sae_sweep.report.metrics_doc --write docs/metrics.md  # what `make metrics-doc` runs

The page is generated, never edited by hand: a test fails when the committed page differs from
what :func:`render` gives.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from sae_sweep.report.metrics import MetricGroup, metric_groups
from sae_sweep.util.metrics import PLACEHOLDERS, Metric

COMMAND = "python -m sae_sweep.report.metrics_doc --write docs/metrics.md"

_BETTER = {"higher": "higher ↑", "lower": "lower ↓", None: "—"}

_INTRO = f"""\
# Metrics

This page is generated from the metric declarations in the code; do not edit it by hand. Each
metric is declared (`Metric` in `sae_sweep/util/metrics.py`) beside the code that logs it: every
eval module next to its `run`, the training loop, the cross-seed hook. The sweep report takes each
metric's label, better direction and unit from the same declarations. After changing a declaration,
regenerate this page with `make metrics-doc` (`{COMMAND}`).

How to read the tables:

- **key** is the MLflow metric name as logged. An eval's metrics are `<eval>/<category>/<metric>`,
  with SAEBench's category and metric names where the eval follows SAEBench; the eval also writes
  its SAEBench-schema JSON as the run's artifact `evals/<eval type>.json`.
- A key with a placeholder is a family of keys: {{placeholders}}.
- **better** is the direction in which the number is better for the SAE; "—" means neither (a
  budget such as L0, a count, a property of the language model rather than of the SAE, or a value
  whose ideal is in the middle). The report names a better side only for metrics with a direction,
  and only where the difference is resolved over seeds.
- **reference** names whose definition the number follows. A "named option" is this project's
  variant of a reference metric, logged beside it under its own name.
- A value that is NaN or infinite is not logged; the run's tag `eval.<eval>.nonfinite` lists it.
  When `python -m sae_sweep.evaluate` gives no finite value for a metric the run already had, the
  old value is not left on display as current: the metric is logged as NaN (the old value stays
  in its history), the tag `evaluate.stale` lists it with its old value, and the command exits 1.
"""

_PLACEHOLDER_TEXT = {
    "k": "`{k}` the number of dimensions a sparse probe may use (`eval.sparse_probing.k_values`)",
    "n": "`{n}` the number of latents ablated (`eval.scr.n_values`, `eval.tpp.n_values`)",
    "task": "`{task}` a downstream task's name (`eval.downstream.tasks`)",
    "group": "`{group}` the first 8 characters of a seed group (runs that differ only in seed)",
    "seed": "`{seed}` the other run's seed",
    "a": "`{a}`, `{b}` the two seeds of a pair",
    "run": "`{run}` the first 8 characters of the other run's id",
}

_NOTES = {
    "train": (
        "Logged by the job as `train/<name>` at the last step of each log window "
        "(`train.log_every` steps). Trainer variants also log their own loss terms "
        "(`train/auxk`, `train/l1`, ...: the `parts` of the variant's `StepOutput` in "
        "`sae_sweep/sae/`), which are not declared here."
    ),
    "heldout": (
        "Logged by the job as `heldout/<name>` at the training step, every `train.eval_every_tokens` "
        "training tokens (0, the default: 4 times per run, the last at the final step) on the first "
        "`train.heldout_tokens` tokens of the eval split (`train.heldout_tokens=0` turns them off). "
        "Each is the core eval's definition on that one batch (`sae_sweep/evals/heldout.py`); on "
        "planted activations only the reconstruction and sparsity ones. Their cost is in "
        "[Training](trainers.md#held-out-curves-during-training)."
    ),
    "crossseed": (
        "Logged at the end of a sweep by the cross-seed hook (settings `eval.crossseed`), "
        "for every pair of FINISHED runs that differ only in seed, and by `compare_runs` for "
        "any two runs. The comparison itself is `sae_sweep/evals/shared_features.py`. Of a pair, "
        "A is the run with the lower seed (in `compare_runs`, the first run given) and B the other."
    ),
}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row(m: Metric) -> str:
    cells = [f"`{m.key}`", _cell(m.label), _BETTER[m.better], _cell(m.unit), _cell(m.meaning), _cell(m.reference)]
    return "| " + " | ".join(cells) + " |"


def _section(g: MetricGroup) -> List[str]:
    source = g.source.replace(".", "/") + ".py"
    lines = [f"## {g.title}", "", f"Declared in `{source}`."]
    if g.name in _NOTES:
        lines += ["", _NOTES[g.name]]
    lines += ["", "| key | label | better | unit | meaning | reference |", "|---|---|---|---|---|---|"]
    lines += [_row(m) for m in g.metrics]
    return lines + [""]


def render(groups: Optional[Sequence[MetricGroup]] = None) -> str:
    """The page for ``groups`` (default: every declared metric)."""
    groups = metric_groups() if groups is None else groups
    used = {p for g in groups for m in g.metrics for p in m.placeholders}
    texts = [_PLACEHOLDER_TEXT[p] for p in PLACEHOLDERS if p in used and p != "b"]
    intro = _INTRO.replace("{placeholders}", "; ".join(texts) if texts else "none are declared")
    lines = [intro]
    for g in groups:
        lines += _section(g)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sae_sweep.report.metrics_doc",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--write", type=Path, metavar="PATH", help="write the page to PATH instead of printing it")
    args = ap.parse_args(argv)
    page = render()
    if args.write is None:
        sys.stdout.write(page)
        return 0
    from sae_sweep.util.files import atomic_write

    atomic_write(args.write, page)
    print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
