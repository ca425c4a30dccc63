"""Progress a cluster user can follow: with output sent to a file (not a terminal), every long
stage logs ``done/total, rate, ETA`` lines on a timer (SAE_SWEEP_PROGRESS_EVERY_S)."""

import logging
import re
import subprocess
import time

import pytest

from helpers.cli import cli_argv, cli_env
from sae_sweep.util import progress as P

# A progress message; in a job's log it follows the logger's "[sae_sweep.progress][INFO] - ".
LINE = re.compile(
    r"(?:^|\] - )(?P<desc>[^:\]]+): (?P<n>\d+)/(?P<total>\d+) \w+ \(\d+%\), [\d.e+-]+ \w+/s, elapsed [\d:]+, "
    r"ETA [\d:?]+"
)


@pytest.mark.unit
def test_lines_on_a_timer_with_done_total_rate_and_eta(monkeypatch, caplog):
    monkeypatch.setenv(P.EVERY_ENV, "0.05")
    caplog.set_level(logging.INFO, logger="sae_sweep.progress")
    assert not P.to_terminal()  # pytest captures stderr: the log-line form
    with P.Progress("train", total=40, unit="step") as p:
        for _ in range(20):
            time.sleep(0.02)
            p.update(2)
            p.set_postfix({"loss": "0.5"})
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "train: started (40 step)"
    ticks = [m for m in map(LINE.match, lines[1:]) if m]
    assert len(ticks) >= 4, lines  # ~0.4 s of work at one line per 0.05 s, plus the last line
    done = [int(m["n"]) for m in ticks]
    assert done == sorted(done) and done[-1] == 40 and all(m["total"] == "40" for m in ticks)
    assert lines[-1].endswith("| loss=0.5 (done)")


@pytest.mark.unit
def test_a_step_longer_than_the_interval_still_reports(monkeypatch, caplog):
    monkeypatch.setenv(P.EVERY_ENV, "0.05")
    caplog.set_level(logging.INFO, logger="sae_sweep.progress")
    with pytest.raises(RuntimeError):
        with P.Progress("eval absorption", unit="batch"):
            time.sleep(0.3)  # one long step: the timer reports while it runs
            raise RuntimeError("boom")
    lines = [r.getMessage() for r in caplog.records]
    assert sum(ln.startswith("eval absorption: 0 batch, 0 batch/s, elapsed") for ln in lines) >= 3, lines
    assert lines[-1].endswith("(stopped)")


@pytest.mark.unit
def test_iterables_disabled_and_bad_interval(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sae_sweep.progress")
    assert list(P.progress_iter(range(3), "core eval", unit="batch")) == [0, 1, 2]
    assert caplog.records[-1].getMessage().startswith("core eval: 3/3 batch (100%)")
    caplog.clear()
    with P.Progress("quiet", total=3, enabled=False) as p:
        p.update(3)
    assert not caplog.records
    monkeypatch.setenv(P.EVERY_ENV, "soon")
    with pytest.raises(ValueError, match=r"SAE_SWEEP_PROGRESS_EVERY_S='soon': allowed: a positive number"):
        P.every_s()
    monkeypatch.delenv(P.EVERY_ENV)
    assert P.every_s() == P.DEFAULT_EVERY_S <= 60


@pytest.mark.integration
@pytest.mark.slow
def test_a_job_logged_to_a_file_reports_every_long_stage(tmp_path, fresh_cache):
    """A job on a fresh cache (tokenizing, cache build, training, evals) with its output sent to a
    file, as under SLURM: each stage's progress lines are in the log. Faithful generation reports
    through the same tokenizing progress (its documents count into it); it is left out here because
    the tiny model generates only a few tokens a second on two busy cores."""
    out = tmp_path / "out"
    cache = fresh_cache(tmp_path)
    log_file = tmp_path / "job.log"
    args = [
        "dataset=builtin",
        "eval=core_only",
        "dataset.tokens=1024",
        "dataset.eval_tokens=512",
        "train.tokens=1024",
        "trainer.batch_size=128",
        "sweep.name=progress",
    ]
    with log_file.open("w") as f:
        r = subprocess.run(
            cli_argv(out, *args),
            stdout=f,
            stderr=subprocess.STDOUT,
            env=cli_env(cache, {P.EVERY_ENV: "0.2"}),
            cwd=tmp_path,
            timeout=600,
        )
    text = log_file.read_text()
    assert r.returncode == 0, text[-4000:]
    assert "caching activations" not in "".join(ln for ln in text.splitlines() if "\r" in ln)  # no bar of ours
    for stage in ("tokenizing builtin/train", "caching activations", "train", "core eval", "evals"):
        lines = [m for m in map(LINE.search, text.splitlines()) if m and m["desc"].startswith(stage)]
        assert lines, f"no progress line for {stage!r}:\n{text[-3000:]}"
        assert int(lines[-1]["n"]) >= int(lines[-1]["total"]), lines[-1].group(0)  # the last line: all done
