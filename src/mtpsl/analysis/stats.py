"""Seed statistics: is method A better than method B, and how sure can one be?

Every interval is a two-sided 95% Student-t interval, ``mean ± t(0.975, n-1) · s / √n`` with
the sample standard deviation ``s`` (ddof=1). A comparison of A against a baseline B is
*paired*: the differences ``A_seed − B_seed`` over the seeds both ran (same seed, same split;
the caller checks), and it is called significant when the interval of the mean difference
excludes 0, which is the two-sided paired t-test at the 5% level. With fewer than
:data:`MIN_SEEDS` seeds no conclusion is drawn, whatever the interval says: two seeds give an
interval, but one so dependent on the normality assumption that it says little.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
MIN_SEEDS = 3
TEST = "two-sided paired t-test, 5% level (95% Student-t interval of the mean difference)"


@dataclass(frozen=True)
class Summary:
    """n values: their mean, sample std and 95% interval of the mean (NaN where undefined)."""

    n: int
    mean: float
    std: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def conclusive(self) -> bool:
        """Enough values for the interval to carry a conclusion (:data:`MIN_SEEDS`)."""
        return self.n >= MIN_SEEDS and math.isfinite(self.low)

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (and there are enough values to say so)."""
        return self.conclusive and (self.low > 0 or self.high < 0)


def summarise(values: Sequence[float]) -> Summary:
    """Mean, sample std (ddof=1) and the 95% Student-t interval of the mean of ``values``."""
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, float("nan"), float("nan"), float("nan"))
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[Summary, list[int]]:
    """The summary of ``a[s] - b[s]`` over the keys (seeds) both have, and those keys."""
    shared = [s for s in a if s in b]
    return summarise([a[s] - b[s] for s in shared]), shared


def verdict(summary: Summary, better_if_positive: bool = True) -> str:
    """What a paired difference supports, in words."""
    if summary.n < MIN_SEEDS:
        return f"no conclusion ({summary.n} paired seed{'s' * (summary.n != 1)}, need "\
               f"{MIN_SEEDS})"
    if not summary.significant:
        return "not significant"
    better = (summary.mean > 0) == better_if_positive
    return f"significantly {'better' if better else 'worse'}"
