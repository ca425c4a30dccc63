"""How sure a difference between two variants is, given the seeds each was run with.

The one statistic the report uses for every pairwise comparison (dataset vs dataset, trainer vs
trainer):

- **Paired** (both sides ran the same seeds, the usual grid): d_i = a_i - b_i per shared seed, the
  difference is mean(d) and its 95 % interval is mean(d) ± t(0.975, n-1) · sd(d) / sqrt(n) (Student's
  paired t interval; sd with ddof=1). Pairing removes what a seed does to both sides alike (data order,
  initialisation), so the interval is as narrow as the seeds allow.
- **Unpaired** (the seed sets differ): Welch's interval, mean(a) - mean(b) ± t(0.975, df) ·
  sqrt(var_a/n_a + var_b/n_b), df from the Welch–Satterthwaite equation.

A difference is **resolved** only when the interval excludes zero and there are at least
``MIN_SEEDS`` seeds on each side (an sd from two seeds has one degree of freedom: its interval is
too wide to trust and too unstable to report as narrow). Otherwise it is "no resolved difference"
(enough seeds, interval covers zero) or "unresolved" (too few seeds).

``seeds_to_resolve``: the smallest number of seeds n (at least ``MIN_SEEDS``) for which a paired
interval with the observed mean difference and sd would exclude zero, i.e. the smallest n with
t(0.975, n-1) · sd / sqrt(n) < |mean diff|. A rough guide from a noisy sd, not a power analysis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
MIN_SEEDS = 3
# Above this many seeds the guide says "more than"; a difference that small against its noise is
# not one a seed sweep will settle.
MAX_SEEDS_GUIDE = 1000

RESOLVED = "resolved"
NOT_RESOLVED = "no resolved difference"
UNRESOLVED = "unresolved"


@dataclass(frozen=True)
class Difference:
    """a - b over seeds, with its interval and what it says."""

    mean_diff: float
    low: float  # the interval's bounds (NaN when it cannot be computed, e.g. one seed)
    high: float
    paired: bool
    n: int  # paired seeds, or the smaller side's seed count when unpaired
    sd: float  # sd of the paired differences; pooled-free Welch standard error x sqrt(n) when unpaired
    verdict: str  # RESOLVED, NOT_RESOLVED or UNRESOLVED
    seeds_needed: Optional[int]  # None: no difference to resolve (mean diff 0) or more than MAX_SEEDS_GUIDE

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def _t(df: float) -> float:
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df))


def seeds_to_resolve(mean_diff: float, sd: float) -> Optional[int]:
    """Smallest n >= MIN_SEEDS with t(0.975, n-1) * sd / sqrt(n) < |mean_diff| (None: none up to
    MAX_SEEDS_GUIDE, or no difference at all)."""
    if not math.isfinite(mean_diff) or mean_diff == 0 or not math.isfinite(sd):
        return None
    for n in range(MIN_SEEDS, MAX_SEEDS_GUIDE + 1):
        if _t(n - 1) * sd / math.sqrt(n) < abs(mean_diff):
            return n
    return None


def compare(a: Mapping[object, float], b: Mapping[object, float]) -> Difference:
    """The difference a - b between two variants' per-seed values (seed -> value)."""
    if not a or not b:
        raise ValueError("compare needs at least one seed on each side")
    shared = [s for s in a if s in b]
    if len(shared) == len(a) == len(b):
        d = np.array([a[s] - b[s] for s in shared], dtype=float)
        n = len(d)
        mean = float(d.mean())
        sd = float(d.std(ddof=1)) if n > 1 else math.nan
        half = _t(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
        paired = True
    else:
        xa, xb = np.array(list(a.values()), dtype=float), np.array(list(b.values()), dtype=float)
        n = min(len(xa), len(xb))
        mean = float(xa.mean() - xb.mean())
        if len(xa) > 1 and len(xb) > 1:
            va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
            se = math.sqrt(va + vb)
            df = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1)) if se > 0 else n - 1
            half = _t(df) * se
            sd = se * math.sqrt(n)
        else:
            half = sd = math.nan
        paired = False
    low, high = mean - half, mean + half
    if n < MIN_SEEDS or not math.isfinite(half):
        verdict = UNRESOLVED
    elif low > 0 or high < 0:
        verdict = RESOLVED
    else:
        verdict = NOT_RESOLVED
    needed = seeds_to_resolve(mean, sd) if verdict != RESOLVED else None
    return Difference(mean, low, high, paired, n, sd, verdict, needed)


def describe(diff: Difference, fmt) -> str:
    """``+0.012 [95 % CI -0.003, +0.027], paired over 3 seeds`` (``fmt`` formats one number)."""
    sign = "+" if diff.mean_diff > 0 else ""
    if math.isfinite(diff.half_width):
        ci = f" [95 % CI {fmt(diff.low)}, {fmt(diff.high)}]"
    else:
        ci = " [no interval: one seed]"
    how = "paired" if diff.paired else "unpaired (Welch)"
    return f"{sign}{fmt(diff.mean_diff)}{ci}, {how} over {diff.n} seed{'s' if diff.n != 1 else ''}"


def needed_text(diff: Difference) -> str:
    """What it would take to resolve a difference of the size seen, as a phrase."""
    if diff.verdict == RESOLVED:
        return ""
    if diff.mean_diff == 0:
        return "no difference seen"
    if diff.seeds_needed is not None:
        return f"~{diff.seeds_needed} seeds would resolve a difference this size"
    if not math.isfinite(diff.sd):
        return "one seed: no spread to measure"
    return f"more than {MAX_SEEDS_GUIDE} seeds would be needed"


def per_seed_text(a: Mapping[object, float], b: Mapping[object, float], fmt) -> str:
    """``42: 0.801 vs 0.901; 49: ...`` (every seed of either side)."""
    seeds: Dict[object, None] = dict.fromkeys([*a, *b])
    return "; ".join(f"{s}: {fmt(a.get(s, math.nan))} vs {fmt(b.get(s, math.nan))}" for s in seeds)
