"""``python -m sae_sweep.report <sweep dir | experiment name | parent run id>``

  sweep dir        a multirun directory (holds ``parent_run_id`` and ``multirun.yaml``); the report
                   goes to ``<sweep dir>/report``
  parent run id    the sweep's parent MLflow run
  experiment name  the latest sweep (parent run) of that experiment (= ``sweep.name``)

The MLflow store is ``--tracking-uri`` if given, else ``MLFLOW_TRACKING_URI``, else the sweep's
own (``tracking.uri`` or ``<paths.output_dir>/mlflow.db`` from ``multirun.yaml``), else
``sqlite:///./outputs/mlflow.db`` as the app's default ``paths.output_dir``
(``sae_sweep.config.find_tracking_uri``, shared with ``evaluate`` and ``export``).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Optional, Tuple

DEFAULT_OUTPUT_DIR = "./outputs"
_RUN_ID = re.compile(r"[0-9a-f]{32}")


class TargetError(RuntimeError):
    pass


def resolve(target: str, tracking_uri: Optional[str]) -> Tuple[str, str, Optional[Path]]:
    """(tracking uri, parent run id, sweep dir or None) for a CLI target."""
    from sae_sweep.config import find_tracking_uri
    from sae_sweep.tracking.runs import Tracker

    path = Path(target).expanduser()
    if path.is_dir():
        pid_file = path / "parent_run_id"
        if not pid_file.exists():
            raise TargetError(
                f"{path} is not a sweep directory: it has no parent_run_id file "
                "(written by the sweeper at the start of a multirun)"
            )
        uri = find_tracking_uri(str(path), tracking_uri)
        return uri, pid_file.read_text().strip(), path.resolve()
    uri = find_tracking_uri(None, tracking_uri)
    tracker = Tracker(uri)
    if _RUN_ID.fullmatch(target):
        try:
            tracker.get_run(target)
            return uri, target, _existing_dir(tracker, target)
        except Exception:
            pass  # not a run here: maybe an experiment that happens to look like an id
    exp_id = tracker.experiment_id(target, create=False)
    if exp_id is None:
        raise TargetError(
            f"{target!r} is neither a directory, a run id nor an experiment in {uri} "
            "(pass --tracking-uri for another store)"
        )
    parents = tracker.find_runs(exp_id, extra_filter="tags.`sae_sweep.kind` = 'sweep'")
    if not parents:
        raise TargetError(f"experiment {target!r} in {uri} has no sweep (parent) run")
    pid = parents[0].info.run_id  # find_runs orders newest first
    return uri, pid, _existing_dir(tracker, pid)


def _existing_dir(tracker, run_id: str) -> Optional[Path]:
    d = tracker.get_run(run_id).data.tags.get("sweep_dir")
    return Path(d) if d and Path(d).is_dir() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sae_sweep.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("target", help="sweep directory, experiment name or parent run id")
    ap.add_argument(
        "--tracking-uri",
        help="MLflow store (default: MLFLOW_TRACKING_URI, else the sweep's, else sqlite:///./outputs/mlflow.db)",
    )
    ap.add_argument(
        "--out", type=Path, help="output folder (default: <sweep dir>/report, else ./outputs/reports/<parent run id>)"
    )
    ap.add_argument("--no-log", action="store_true", help="do not log the report to the parent MLflow run")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from sae_sweep.report import build_report
    from sae_sweep.tracking.runs import Tracker

    try:
        uri, parent, sweep_dir = resolve(args.target, args.tracking_uri)
    except TargetError as e:
        print(f"sae_sweep.report: {e}", file=sys.stderr)
        return 2
    out = args.out or (sweep_dir / "report" if sweep_dir else Path(DEFAULT_OUTPUT_DIR) / "reports" / parent)
    tracker = Tracker(uri)
    res = build_report(tracker, parent, out, log_to_mlflow=not args.no_log)
    print(f"report: {res.markdown}")
    for name, p in res.plots.items():
        print(f"plot {name}: {p}")
    for name, why in res.skipped_plots.items():
        print(f"plot {name} skipped: {why}")
    if res.logged:
        print(f"logged to run {parent} under report/ ({uri})")
    from sae_sweep.tracking.runs import ui_command

    cmd = ui_command(uri)
    print(
        f"MLflow UI: {tracker.ui_link(parent, 'artifacts' if res.logged else None)}"
        + (f" (serve it with: {cmd})" if cmd else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
