"""Run evals on runs that already finished, and add the results to those runs.

    python -m sae_sweep.evaluate <run id | parent run id | sweep dir> [eval overrides] [--tracking-uri URI]

* a run id: that run; a parent (sweep) run id or a sweep directory (``<output>/sweeps/<name>/<time>``):
  every FINISHED child of the sweep.
* overrides: ``eval=<name>`` picks ``conf/eval/<name>.yaml``; ``eval.<key>=<value>`` changes one
  setting (``eval.run=[absorption,fake_features]``, ``eval.absorption.max_words=500``);
  ``device=<cpu|cuda|auto>``. Nothing else can change: the SAE is already trained.

For each run: its config (artifact ``config/config.yaml``) and SAE (artifact ``sae/``) are
downloaded, the LM is loaded with ``load_lm``, and the selected evals run on the run's held-out
text exactly as at the end of a job (``pipeline.run_evals``): metrics ``<eval>/<category>/<metric>``,
the SAEBench JSON ``evals/<eval_type_id>.json`` and status tags are added to the run. The run's
status is not changed. A metric the run already had that this evaluation gives no finite value for
(a NaN/inf result) is not left showing its old value as current: it is logged as NaN (the old value
stays in its history), listed with its old value in the tag ``evaluate.stale``, and the command
exits 1. A changed SAE artifact (its sha256 differs from the one recorded at save) is refused.

The tracking store: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else for a sweep directory the
store its sweep used (``tracking.uri`` of its ``multirun.yaml`` or ``<output_dir>/mlflow.db``), else
``./outputs/mlflow.db``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, cast

from omegaconf import DictConfig, OmegaConf, open_dict

import sae_sweep.evals  # noqa: F401  (registers the evals' settings schemas)

log = logging.getLogger("sae_sweep.evaluate")

from sae_sweep.config import CONF_DIR  # noqa: E402
from sae_sweep.tracking.status import RunStatus  # noqa: E402

RUN_EVAL = "_evaluated_run_"  # the run's own eval node, as a temporary option of the eval group


class EvaluateError(RuntimeError):
    """A target or override that cannot be evaluated, with the reason."""


# Overrides


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The run's config with its eval selection/settings (and device) changed, composed by Hydra
    from ``conf/``: ``eval=<preset>`` picks a preset, ``eval.<key>=<value>`` changes a setting of
    the run's own evals (or of the preset). Only ``eval``, ``eval.*`` and ``device`` may change;
    anything else would describe a different SAE than the one trained."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from sae_sweep import config as C

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise EvaluateError(f"overrides {' '.join(overrides)!r}: {e}") from None
    for o in parsed:
        key = o.key_or_group
        if not (key == "eval" or key.startswith("eval.") or key == "device"):
            raise EvaluateError(
                f"override {o.input_line!r}: only eval=<preset>, eval.<key>=<value> and "
                f"device=<device> can change for a trained run"
            )
    picks_preset = any(o.key_or_group == "eval" for o in parsed)
    # Without a preset, the run's own eval node is the base the eval.* overrides apply to.
    ConfigStore.instance().store(
        group="eval",
        name=RUN_EVAL,
        node=OmegaConf.create(OmegaConf.to_container(cfg.eval, resolve=True)),
        provider="sae_sweep.evaluate",
    )
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            composed = compose("config", overrides=([] if picks_preset else [f"eval={RUN_EVAL}"]) + list(overrides))
    except HydraException as e:
        raise EvaluateError(str(e)) from None
    cfg = cfg.copy()
    with open_dict(cfg):
        # unresolved: a preset's ${dataset...} interpolations resolve against this run's config
        cfg.eval = OmegaConf.to_container(composed.eval, resolve=False)
        cfg.device = composed.device
    problems = C.eval_problems(cast(Dict[str, Any], OmegaConf.to_container(cfg.eval, resolve=True)))
    if problems:
        raise EvaluateError("; ".join(problems))
    return cfg


# Targets


def resolve_runs(tracker: Any, target: str) -> Tuple[List[str], Optional[str]]:
    """(run ids to evaluate, parent run id or None)."""
    from sae_sweep.tracking.runs import untrained_reason

    if Path(target).is_dir():
        pid_file = Path(target) / "parent_run_id"
        if not pid_file.exists():
            raise EvaluateError(f"{target} is a directory without a parent_run_id file: not a sweep directory")
        target = pid_file.read_text().strip()
    try:
        run = tracker.get_run(target)
    except Exception as e:
        raise EvaluateError(f"no run {target!r} in tracking store {tracker.uri} ({type(e).__name__}: {e})") from None
    if run.data.tags.get("sae_sweep.kind") == "sweep":
        children = tracker.find_runs(run.info.experiment_id, parent_run_id=target, statuses=[RunStatus.FINISHED])
        if not children:
            raise EvaluateError(f"sweep run {target} has no FINISHED child runs to evaluate")
        return sorted(r.info.run_id for r in children), target
    why = untrained_reason(run)
    if why is not None:
        raise EvaluateError(why)
    return [target], None


# One run


def evaluate_run(tracker: Any, run_id: str, overrides: Sequence[str] = ()) -> Dict[str, float]:
    """Download the run's config and SAE, run the selected evals, log them to the run."""
    from sae_sweep import config as C
    from sae_sweep.job.execute import run_evals
    from sae_sweep.models.lm import load_lm
    from sae_sweep.sae import SparseAutoencoder
    from sae_sweep.tracking.runs import ArtifactsUnavailable, ChildRun
    from sae_sweep.util.digests import ChecksumMismatch

    with tempfile.TemporaryDirectory() as d:
        try:
            cfg_path, sae_dir = tracker.fetch_trained(run_id, ["config/config.yaml", "sae"], Path(d))
        except (ArtifactsUnavailable, ChecksumMismatch) as e:
            raise EvaluateError(str(e)) from None
        cfg = apply_overrides(cast(DictConfig, OmegaConf.load(cfg_path)), overrides)
        device = C.resolve_device(cfg.get("device", "auto"))
        try:
            sae = SparseAutoencoder.load(sae_dir, device=device, origin=f"artifact sae/ of run {run_id}").eval()
        except ChecksumMismatch as e:
            raise EvaluateError(f"refusing to evaluate run {run_id}: {e}") from None
        sae_cfg = json.loads((Path(sae_dir) / "cfg.json").read_text())
    names = list(cfg.eval.get("run") or [])
    if not names:
        log.info("run %s: eval.run is empty, nothing to do", run_id)
        return {}
    lm = load_lm(cfg.model, C.cache_dir(cfg), device)
    run = ChildRun(tracker, run_id)  # not entered: the run's status stays as it is
    before = dict(tracker.get_run(run_id).data.metrics)
    t0 = time.perf_counter()
    metrics = run_evals(cfg, run, lm, sae, sae_cfg, device)
    stale = stale_metrics(before, metrics, names)
    run.set_tags(
        {
            "evaluate.last": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "evaluate.evals": ",".join(names),
            "evaluate.overrides": " ".join(overrides),
            STALE_TAG: ", ".join(f"{k} (was {v:.6g})" for k, v in sorted(stale.items()))[:4900],
        }
    )
    if stale:
        # the old values stay in each metric's history; the one shown as current is NaN
        run.log_metrics({k: float("nan") for k in stale})
    log.info("run %s: %s in %.1fs", run_id, ", ".join(names), time.perf_counter() - t0)
    if stale:
        raise StaleMetrics(
            f"run {run_id}: this evaluation gave no finite value for {len(stale)} metric(s) the run had "
            f"({', '.join(sorted(stale))}); they now read NaN (the old values stay in their history) and "
            f"the run is tagged {STALE_TAG}"
        )
    return metrics


STALE_TAG = "evaluate.stale"


class StaleMetrics(RuntimeError):
    """A re-evaluation left metrics the run had without a new finite value (they are marked)."""


def stale_metrics(before: Dict[str, float], after: Dict[str, float], names: Sequence[str]) -> Dict[str, float]:
    """Metrics of the evals ``names`` that the run had ``before`` and this evaluation did not give a
    finite value for (NaN/inf results are dropped by ``flatten_metrics``): their old values would
    otherwise stay on display as if they were the current SAE's. Timings are not results."""
    prefixes = tuple(f"{n}/" for n in names)
    return {k: v for k, v in before.items() if k.startswith(prefixes) and k not in after and not k.endswith("/seconds")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_sweep.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="run id, parent (sweep) run id, or sweep directory")
    parser.add_argument("overrides", nargs="*", help="eval=<name>, eval.<key>=<value>, device=<device>")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: see module doc)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from sae_sweep.config import find_tracking_uri
    from sae_sweep.tracking.runs import Tracker

    try:
        tracker = Tracker(find_tracking_uri(args.target, args.tracking_uri))
        run_ids, parent = resolve_runs(tracker, args.target)
    except EvaluateError as e:
        print(f"sae_sweep.evaluate: {e}", file=sys.stderr)
        return 2
    failed = []
    for run_id in run_ids:
        try:
            metrics = evaluate_run(tracker, run_id, args.overrides)
        except EvaluateError as e:
            print(f"sae_sweep.evaluate: {e}", file=sys.stderr)
            return 2
        except StaleMetrics as e:  # logged and marked; the other runs go on
            print(f"sae_sweep.evaluate: {e}", file=sys.stderr)
            failed.append(run_id)
            continue
        except Exception as e:  # keep going: one broken run must not stop the others
            log.exception("run %s: evals failed: %s", run_id, e)
            failed.append(run_id)
            continue
        print(f"run {run_id}: {len(metrics)} metrics ({tracker.ui_link(run_id)})")
        for k in sorted(metrics):
            print(f"  {k} = {metrics[k]:.6g}")
    if parent:
        print(
            f"sweep {parent}: evaluated {len(run_ids) - len(failed)} of {len(run_ids)} runs ({tracker.ui_link(parent)})"
        )
    if failed:
        print(f"sae_sweep.evaluate: evals failed for {len(failed)} run(s): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
