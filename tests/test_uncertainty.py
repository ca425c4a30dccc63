"""The report's one statistic for comparisons, on hand-computed numbers (Student's t quantiles from
tables: t(0.975, 2) = 4.302653, t(0.975, 3) = 3.182446, t(0.975, 4) = 2.776445)."""

import math

import pytest

from sae_sweep.report import uncertainty as U
from sae_sweep.report.tables import fmt

pytestmark = pytest.mark.unit

# d = a - b per seed: 0.5, 1.0, 2.0 -> mean 7/6, sd sqrt(7/12)
A = {1: 1.0, 2: 2.0, 3: 4.0}
B = {1: 0.5, 2: 1.0, 3: 2.0}
MEAN = 7 / 6
SD = math.sqrt(7 / 12)


def test_paired_interval_covering_zero_is_no_resolved_difference():
    d = U.compare(A, B)
    half = 4.302653 * SD / math.sqrt(3)  # 1.8974
    assert d.paired and d.n == 3
    assert d.mean_diff == pytest.approx(MEAN)
    assert d.sd == pytest.approx(SD)
    assert (d.low, d.high) == (pytest.approx(MEAN - half, abs=1e-5), pytest.approx(MEAN + half, abs=1e-5))
    assert d.verdict == U.NOT_RESOLVED
    # n=4: 3.182446 * 0.7638 / 2 = 1.215 >= 7/6; n=5: 2.776445 * 0.7638 / sqrt(5) = 0.948 < 7/6
    assert d.seeds_needed == 5
    assert U.needed_text(d) == "~5 seeds would resolve a difference this size"


def test_paired_interval_excluding_zero_is_resolved():
    b = {1: 0.9, 2: 1.8, 3: 3.9}  # d = 0.1, 0.2, 0.1: mean 0.1333, sd 0.057735
    d = U.compare(A, b)
    half = 4.302653 * 0.0577350 / math.sqrt(3)  # 0.14342: the interval covers zero
    assert d.low == pytest.approx(0.133333 - half, abs=1e-5) and d.verdict == U.NOT_RESOLVED
    d = U.compare({s: v + 1 for s, v in A.items()}, A)  # +1 on every seed: a zero-width interval
    assert (d.low, d.high, d.verdict, d.seeds_needed) == (1.0, 1.0, U.RESOLVED, None)


def test_two_seeds_are_unresolved_and_say_what_would_resolve():
    """The demo's case: a difference of 4.9e-7 beside a seed spread of 1.2e-6."""
    d = U.compare({42: 1.0 + 4.9e-7 + 6e-7, 49: 1.0 + 4.9e-7 - 6e-7}, {42: 1.0, 49: 1.0})
    assert d.n == 2 and d.verdict == U.UNRESOLVED
    assert d.mean_diff == pytest.approx(4.9e-7, rel=1e-6)
    assert d.low < 0 < d.high  # t(0.975, 1) = 12.706: far wider than the difference
    n = d.seeds_needed
    assert n is not None and n >= 3
    t = U._t(n - 1) * d.sd / math.sqrt(n)
    assert t < abs(d.mean_diff) <= U._t(n - 2) * d.sd / math.sqrt(n - 1)  # the smallest such n


def test_one_seed_has_no_interval():
    d = U.compare({42: 0.9}, {42: 0.8})
    assert d.verdict == U.UNRESOLVED and math.isnan(d.low) and d.seeds_needed is None
    assert U.needed_text(d) == "one seed: no spread to measure"
    assert "no interval" in U.describe(d, fmt)


def test_unpaired_seeds_use_welch():
    a = {1: 1.0, 2: 2.0, 3: 3.0}  # mean 2, var 1
    b = {4: 0.0, 5: 0.0, 6: 0.0, 7: 0.0}  # mean 0, var 0 -> se = sqrt(1/3), df = 2
    d = U.compare(a, b)
    assert not d.paired and d.n == 3
    half = 4.302653 * math.sqrt(1 / 3)
    assert (d.low, d.high) == (pytest.approx(2 - half, abs=1e-5), pytest.approx(2 + half, abs=1e-5))
    assert d.verdict == U.NOT_RESOLVED


def test_no_difference_needs_no_seeds():
    d = U.compare({1: 1.0, 2: 2.0, 3: 3.0}, {1: 1.0, 2: 2.0, 3: 3.0})
    assert d.seeds_needed is None and U.needed_text(d) == "no difference seen"


def test_per_seed_text_lists_every_seed_of_either_side():
    assert U.per_seed_text({42: 0.8, 49: 0.84}, {42: 0.9}, fmt) == "42: 0.800 vs 0.900; 49: 0.840 vs —"


def test_empty_side_is_an_error():
    with pytest.raises(ValueError, match="at least one seed"):
        U.compare({}, {1: 1.0})
