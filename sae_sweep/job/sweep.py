"""The grid: validate every point before launching any, run the parent MLflow run, keep going past
failed points, and close the sweep with counts.

Hydra's sweeper plugin (``hydra_plugins/sae_sweep_sweeper``) is a thin shell around ``GridSweep``.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from sae_sweep import config as C
from sae_sweep.job.app import model_shape, pack_file, pinned, point_identity, validate_point, write_pack
from sae_sweep.job.disk import disk_problems
from sae_sweep.tracking.status import RunStatus

log = logging.getLogger("sae_sweep.job.sweep")


class SweepFailed(RuntimeError):
    """Raised after a sweep in which some points failed (all the others still ran)."""


@dataclass
class GridPoint:
    index: int
    overrides: List[str]
    run_key: str
    seed_group: str
    cfg: DictConfig
    weights: Any = None  # models.weights.ResolvedWeights it was validated with (None: no LM)


@dataclass
class SweepSummary:
    finished: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: int = 0  # points without a result when the sweep itself was interrupted
    failures: List[str] = field(default_factory=list)

    def as_metrics(self) -> Dict[str, float]:
        return {
            "sweep/finished": self.finished,
            "sweep/failed": self.failed,
            "sweep/skipped": self.skipped,
            "sweep/interrupted": self.interrupted,
            "sweep/points": self.finished + self.failed + self.skipped + self.interrupted,
        }


# Work that runs once at the end of a sweep. Each hook gets
# (tracker, parent_run_id, points, results, sweep_dir) and must not raise into the sweep.
# Cross-seed metrics and the browser come first so the report includes and links them. Imported
# lazily: a sweep that fails validation never pays for scipy/matplotlib.
def _crossseed_hook(*args: Any) -> None:
    from sae_sweep.report.crossseed import crossseed_hook

    crossseed_hook(*args)


def _browser_hook(*args: Any) -> None:
    from sae_sweep.report.crossseed_browser import browser_hook

    browser_hook(*args)


def _report_hook(*args: Any) -> None:
    from sae_sweep.report import report_hook

    report_hook(*args)


SWEEP_END_HOOKS: List[Callable[..., None]] = [_crossseed_hook, _browser_hook, _report_hook]


@dataclass
class LaunchFailed:
    """A launcher that could not start a batch of jobs: what it (submitit, sbatch) said."""

    reason: str


def compose_points(
    load: Callable[[List[str]], DictConfig],
    batches: Sequence[Sequence[Sequence[str]]],
    resources: Optional[Dict[str, Any]] = None,
) -> List[GridPoint]:
    """Compose and validate every grid point (its values, and whether the jobs can have what it
    asks for: ``resources`` from the launcher); raise ConfigError naming each bad point."""
    resources = resources or {"runs_here": True, "memory_gb": None, "gpus_per_node": None}
    points, errors = [], []
    seen: Dict[str, int] = {}
    idx = 0
    swept = _swept_keys(batches)
    for batch in batches:
        for overrides in batch:
            overrides = list(overrides)
            shown = " ".join(o for o in overrides if o.split("=", 1)[0] in swept) or " ".join(overrides) or "(defaults)"
            try:
                cfg = load(overrides)
                job = _job_view(cfg)
                weights = validate_point(job, **resources)
                key = C.run_key(job, point_identity(job, weights))
            except C.ConfigError as e:
                errors.append(f"  grid point #{idx} [{shown}]: " + "; ".join(e.problems))
                idx += 1
                continue
            if key in seen:
                log.warning(
                    "grid point #%d [%s] is the same run as #%d (same run key); it will be skipped",
                    idx,
                    shown,
                    seen[key],
                )
            seen.setdefault(key, idx)
            if (
                weights is not None
                and weights.source in ("hub", "gguf")
                and not any(o.startswith("model.weights=") for o in overrides)
            ):
                overrides = overrides + [f"model.weights={weights.source}"]  # jobs load what was validated
            seed_group = C.seed_group_key(job, point_identity(job, weights))
            points.append(GridPoint(idx, overrides, key, seed_group, job, weights))
            idx += 1
    if errors:
        raise C.ConfigError(
            f"{len(errors)} of {idx} grid points are invalid; nothing was launched:\n" + "\n".join(errors)
        )
    unique = list({p.run_key: p for p in points}.values())
    C.fail_if(
        disk_problems([p.cfg for p in unique], [model_shape(p.cfg, p.weights) for p in unique]),
        "what the grid writes does not fit on its disks; nothing was launched",
    )
    return points


def _swept_keys(batches: Sequence[Sequence[Sequence[str]]]) -> set:
    """Keys that take more than one value across the grid (what tells points apart)."""
    values: Dict[str, set] = {}
    for batch in batches:
        for overrides in batch:
            for o in overrides:
                k, _, v = o.partition("=")
                values.setdefault(k, set()).add(v)
    return {k for k, v in values.items() if len(v) > 1}


def _job_view(cfg: DictConfig) -> DictConfig:
    """The job's own config (without the `hydra` node, whose interpolations need a running job)."""
    job = cfg.copy()
    with open_dict(job):
        job.pop("hydra", None)
    return job


def _ui_hint(tracker: Any) -> str:
    """How to serve a local store's UI at the printed address (nothing for a server)."""
    from sae_sweep.tracking.runs import ui_command

    cmd = ui_command(tracker.uri)
    return f" (serve it with: {cmd})" if cmd else ""


class GridSweep:
    def __init__(
        self,
        master_config: DictConfig,
        load: Callable[[List[str]], DictConfig],
        launch: Callable[[List[List[str]], int], Sequence[Any]],
        launcher: Any = None,
    ):
        self.master = master_config
        self.load = load
        self.launch = launch
        self.launcher = launcher  # its resources() and preflight(), when it has them

    def run(self, batches: Sequence[Sequence[Sequence[str]]], arguments: List[str]) -> List[Any]:
        from sae_sweep.tracking.runs import Tracker

        t0 = time.perf_counter()
        resources = getattr(self.launcher, "resources", lambda: None)()
        points = compose_points(self.load, batches, resources)
        problems: List[str] = getattr(self.launcher, "preflight", lambda: [])()
        if problems:
            C.fail_if(problems, "the launcher's request cannot be met; nothing was launched")
        log.info("validated %d grid points in %.1fs", len(points), time.perf_counter() - t0)

        job0 = points[0].cfg
        tracker = Tracker(C.tracking_uri(job0))
        sweep_dir = Path(str(self.master.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.master, sweep_dir / "multirun.yaml")
        experiment = str(job0.tracking.experiment)
        parent = tracker.start_parent(
            experiment,
            f"sweep-{job0.sweep.name}-{sweep_dir.name}",
            {
                "sweep_name": str(job0.sweep.name),
                "sweep_dir": str(sweep_dir),
                "overrides": " ".join(arguments),
                "n_points": str(len(points)),
                "host": socket.gethostname(),
                "launcher": str(OmegaConf.select(self.master, "hydra.launcher._target_", default="?")).rsplit(".", 1)[
                    -1
                ],
            },
        )
        (sweep_dir / "parent_run_id").write_text(parent)
        log.info("sweep parent run %s in experiment %r (store %s)", parent, experiment, tracker.uri)
        log.info("MLflow UI: %s%s", tracker.experiment_url(tracker.experiment_id(experiment)), _ui_hint(tracker))

        summary = SweepSummary()
        results: List[Any] = [None] * len(points)
        interrupted: Optional[BaseException] = None
        try:
            start = 0
            if bool(job0.sweep.pack):
                self._run_packed(tracker, experiment, parent, points, results, summary)
                batches = []  # every point went out in a pack
            for batch in batches:
                n = len(batch)
                chunk = points[start : start + n]
                job_overrides = [p.overrides + [f"tracking.parent_run_id={parent}"] for p in chunk]
                try:
                    rets = self.launch(job_overrides, start)
                except Exception as e:  # submission refused, jobs lost: every point of the batch failed
                    log.error("launcher raised for points %d..%d: %s", start, start + n - 1, e)
                    rets = [LaunchFailed(f"{type(e).__name__}: {e}")] * n
                for p, ret in zip(chunk, rets):
                    results[p.index] = self._classify(tracker, experiment, parent, p, ret, summary)
                start += n
        except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or SIGTERM raised as an exit by __main__
            interrupted = e
            raise
        finally:
            status = RunStatus.FINISHED if summary.failed == 0 else RunStatus.FAILED
            if interrupted is not None:  # the points without a result never ran to the end
                status = RunStatus.KILLED
                summary.interrupted = len(points) - (summary.finished + summary.failed + summary.skipped)
                tracker.set_tags(
                    parent,
                    {
                        "sweep.interrupted": f"{type(interrupted).__name__} with "
                        f"{summary.interrupted} of {len(points)} points unfinished"
                    },
                )
            tracker.log_metrics(parent, summary.as_metrics())
            try:  # the parent's row names the sweep's training datasets (its children fold under it)
                tracker.log_child_datasets(parent)
            except Exception as e:
                log.warning("could not log the sweep's datasets to its parent run: %s: %s", type(e).__name__, e)
            tracker.set_tags(
                parent,
                {
                    "sweep.finished": summary.finished,
                    "sweep.failed": summary.failed,
                    "sweep.skipped": summary.skipped,
                    "sweep.interrupted_points": summary.interrupted,
                },
            )
            for hook in SWEEP_END_HOOKS:
                try:
                    hook(tracker, parent, points, results, sweep_dir)
                except Exception as e:  # sweep-end work never hides the sweep's own outcome
                    log.exception("sweep-end hook %s failed: %s", getattr(hook, "__name__", hook), e)
            tracker.end(parent, status)
        msg = (
            f"sweep {sweep_dir}: {summary.finished} finished, {summary.failed} failed, "
            f"{summary.skipped} skipped (parent run {parent})\n  MLflow UI: {tracker.ui_link(parent)}"
            f"{_ui_hint(tracker)}"
        )
        log.info(msg)
        if summary.failed:
            raise SweepFailed(
                msg
                + "\n"
                + "\n".join(summary.failures)
                + "\nRun the same command again to run only the failed and missing points."
            )
        return results

    def _run_packed(
        self,
        tracker: Any,
        experiment: str,
        parent: str,
        points: List[GridPoint],
        results: List[Any],
        summary: SweepSummary,
    ) -> None:
        """sweep.pack=true: one job per pack of points that share activation cache, seed and batch
        size (so their batch streams are identical, `packing`); each point keeps its own run."""
        from types import SimpleNamespace

        from hydra.core.utils import JobStatus

        packs: Dict[str, List[GridPoint]] = {}
        for p in points:
            packs.setdefault(C.stream_key(p.cfg, point_identity(p.cfg, p.weights)), []).append(p)
        for members in packs.values():
            unique = {p.run_key: p for p in reversed(members)}  # a repeated point trains once
            cfgs = []
            for p in sorted(unique.values(), key=lambda q: q.index):
                cfg = pinned(p.cfg, p.weights).copy()  # jobs load what was validated
                with open_dict(cfg):
                    cfg.tracking.parent_run_id = parent
                cfgs.append(cfg)
            write_pack(pack_file(C.output_dir(members[0].cfg), parent, members[0].run_key), cfgs)
        log.info("sweep.pack: %d points in %d packed jobs", len(points), len(packs))
        groups = list(packs.values())
        try:
            rets = self.launch([g[0].overrides + [f"tracking.parent_run_id={parent}"] for g in groups], 0)
        except Exception as e:  # submission refused, jobs lost: every member of those packs failed
            log.error("launcher raised for the packed jobs: %s", e)
            rets = [LaunchFailed(f"{type(e).__name__}: {e}")] * len(groups)
        for members, ret in zip(groups, rets):
            ok = ret is not None and getattr(ret, "status", None) == JobStatus.COMPLETED
            per_member = (ret.return_value or {}).get("members", {}) if ok else {}
            for p in members:
                r = per_member.get(p.run_key)
                if r is None:
                    member_ret = ret  # the pack's job failed or was lost: so did each member
                elif r["status"] == RunStatus.FAILED:
                    member_ret = SimpleNamespace(status=JobStatus.FAILED, _return_value=r["error"])
                else:
                    member_ret = SimpleNamespace(status=JobStatus.COMPLETED, return_value=r)
                results[p.index] = self._classify(tracker, experiment, parent, p, member_ret, summary)

    def _classify(
        self, tracker: Any, experiment: str, parent: str, p: GridPoint, ret: Any, summary: SweepSummary
    ) -> Optional[Dict[str, Any]]:
        from hydra.core.utils import JobStatus

        shown = " ".join(p.overrides) or "(defaults)"
        if ret is not None and getattr(ret, "status", None) == JobStatus.COMPLETED:
            value = ret.return_value
            if isinstance(value, dict) and value.get("status") in (RunStatus.SKIPPED, RunStatus.BUSY):
                summary.skipped += 1  # FINISHED before, or being run right now by another process
            else:
                summary.finished += 1
            return value
        if isinstance(ret, LaunchFailed):
            reason = f"not started: {ret.reason}"
        elif ret is not None:
            reason = repr(getattr(ret, "_return_value", None))
        else:
            reason = "job lost (killed or node failure)"
        summary.failed += 1
        summary.failures.append(f"  point #{p.index} [{shown}]: {reason}")
        # A job killed from outside never closed its run (RUNNING), or left it KILLED for a requeue
        # that did not come (scancel): close it FAILED with the reason.
        exp_id = tracker.experiment_id(experiment)
        for r in tracker.find_runs(exp_id, run_key=p.run_key, statuses=[RunStatus.RUNNING, RunStatus.KILLED]):
            tracker.set_tags(r.info.run_id, {"error": reason[:4900]})
            tracker.end(r.info.run_id, RunStatus.FAILED)
        return None
