"""Progress of a long stage (generation, cache build, training, evals), for whoever is watching.

At a terminal: a tqdm bar, as before. Anywhere else (a SLURM log, ``nohup``, a pipe): a log line
``<stage>: <done>/<total> <unit> (<pct>%), <rate> <unit>/s, elapsed <t>, ETA <t>`` when the stage
starts, every ``SAE_SWEEP_PROGRESS_EVERY_S`` seconds while it runs (a timer, so a stage whose single
step takes minutes still reports), and when it ends. One helper, used by every stage.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Dict, Iterable, Iterator, Optional, TypeVar

log = logging.getLogger("sae_sweep.progress")

EVERY_ENV = "SAE_SWEEP_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 30.0  # a SLURM log shows a line at least twice a minute

T = TypeVar("T")


def every_s() -> float:
    """Seconds between progress lines when output is not a terminal (``SAE_SWEEP_PROGRESS_EVERY_S``)."""
    raw = os.environ.get(EVERY_ENV, "").strip()
    if not raw:
        return DEFAULT_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{EVERY_ENV}={raw!r}: allowed: a positive number of seconds (default {DEFAULT_EVERY_S:g})")
    return value


def to_terminal() -> bool:
    """Whether a person watches this process's stderr live (a bar), or it goes to a file (log lines)."""
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class Progress:
    """``with Progress("train", total=steps, unit="step") as p: ... p.update(1)``.

    ``enabled=False`` shows nothing (benchmarks, nested inner loops). ``postfix`` values (e.g. the
    loss) ride along on the bar and on each log line."""

    def __init__(
        self, desc: str, total: Optional[int] = None, unit: str = "it", initial: int = 0, enabled: bool = True
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.n = self.initial = int(initial)
        self.postfix: Dict[str, Any] = {}
        self._bar: Any = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._t0 = time.monotonic()
        self._closed = not enabled
        if not enabled:
            return
        if to_terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
        else:
            interval = every_s()
            log.info("%s: started%s", desc, f" ({total} {unit})" if total else "")
            self._thread = threading.Thread(target=self._tick, args=(interval,), name="progress", daemon=True)
            self._thread.start()

    def _tick(self, interval: float) -> None:
        while not self._stop.wait(interval):
            log.info("%s", self.line())

    def line(self) -> str:
        """The progress line as it is logged now."""
        elapsed = time.monotonic() - self._t0
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        done = (
            f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
            if self.total
            else f"{self.n} {self.unit}"
        )
        parts = [f"{self.desc}: {done}", f"{rate:.3g} {self.unit}/s", f"elapsed {_clock(elapsed)}"]
        if self.total:
            left = max(0, self.total - self.n)  # a source may overshoot its estimate
            parts.append(f"ETA {_clock(left / rate)}" if rate > 0 or not left else "ETA ?")
        text = ", ".join(parts)
        if self.postfix:
            text += " | " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, values: Dict[str, Any]) -> None:
        self.postfix = dict(values)
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def close(self, ended: str = "done") -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        log.info("%s (%s)", self.line(), ended)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close("done" if exc_type is None else "stopped")


def progress_iter(
    items: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "it", enabled: bool = True
) -> Iterator[T]:
    """``items`` with a :class:`Progress` that counts each one (``total`` from ``len`` when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total=total, unit=unit, enabled=enabled) as p:
        for item in items:
            yield item
            p.update(1)
