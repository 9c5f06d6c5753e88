"""Seed statistics for comparing runs (issue 13): mean, spread, a 95% t-interval and Welch's test.

Every comparison in this project trains each configuration with a few seeds (model init and data order both
follow ``seed``). A configuration's number (e.g. final validation loss) is summarised by :func:`estimate`:

- mean and sample standard deviation (ddof = 1) over the n finished seeds;
- a two-sided 95% confidence interval of the mean, mean ± t_{0.975, n−1} · std/√n (Student's t: with 3 seeds
  the multiplier is 4.30, not 1.96; an interval from 3 seeds is wide, and says so).

Two configurations are compared by :func:`welch_test`: Welch's unequal-variance t-test of the difference of the
means, with Welch–Satterthwaite degrees of freedom. A difference is marked *beyond noise* when its two-sided
p-value is below ``alpha`` (0.05), i.e. when |Δ| > t_{0.975, ν} · √(s_a²/n_a + s_b²/n_b). With fewer than two
seeds on either side there is no test (``None``), never a silent "significant".
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from scipy import stats as _scipy_stats

CONFIDENCE = 0.95
ALPHA = 0.05


def t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom (e.g. 0.975, 2 → 4.303)."""
    if not 0 < probability < 1 or not df > 0:
        raise ValueError(f"need 0 < probability < 1 and df > 0, got probability={probability}, df={df}")
    return float(_scipy_stats.t.ppf(probability, df))


@dataclass(frozen=True)
class Estimate:
    """A quantity measured once per finished seed: its mean, spread and confidence interval.

    ``std``, ``sem`` and the interval are ``None`` for a single seed (no spread can be estimated from one run).
    """

    values: tuple[float, ...]
    confidence: float = CONFIDENCE

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("an estimate needs at least one value (a configuration with no finished seed has none)")
        if not all(math.isfinite(v) for v in self.values):
            raise ValueError(f"non-finite values {self.values}: a diverged run is a failed seed, list it as such")

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return math.fsum(self.values) / self.n

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof = 1)."""
        if self.n < 2:
            return None
        return math.sqrt(math.fsum((v - self.mean) ** 2 for v in self.values) / (self.n - 1))

    @property
    def sem(self) -> float | None:
        """Standard error of the mean, std / √n."""
        return None if self.std is None else self.std / math.sqrt(self.n)

    @property
    def half_width(self) -> float | None:
        """t_{(1+confidence)/2, n−1} · sem: the interval is mean ± half_width."""
        if self.sem is None:
            return None
        return t_quantile((1 + self.confidence) / 2, self.n - 1) * self.sem

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.half_width is None:
            return None
        return self.mean - self.half_width, self.mean + self.half_width


def estimate(values: Iterable[float], confidence: float = CONFIDENCE) -> Estimate:
    """The :class:`Estimate` of ``values`` (one per finished seed)."""
    return Estimate(tuple(float(v) for v in values), confidence)


@dataclass(frozen=True)
class Difference:
    """Welch's t-test of ``b − a``: the difference, its standard error, degrees of freedom and p-value."""

    delta: float  # mean(b) − mean(a)
    se: float  # √(s_a²/n_a + s_b²/n_b)
    df: float  # Welch–Satterthwaite
    p_value: float  # two-sided
    alpha: float = ALPHA

    @property
    def beyond_noise(self) -> bool:
        """Whether |Δ| exceeds the combined uncertainty: Welch's two-sided test rejects equal means at ``alpha``."""
        return self.p_value < self.alpha


def welch_test(a: Estimate, b: Estimate, alpha: float = ALPHA) -> Difference | None:
    """Welch's unequal-variance t-test of mean(b) − mean(a); ``None`` when either side has fewer than 2 seeds."""
    if a.n < 2 or b.n < 2:
        return None
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    delta, se = b.mean - a.mean, math.sqrt(va + vb)
    if se == 0:  # identical seeds on both sides (e.g. a deterministic toy): any difference is exact
        return Difference(delta, 0.0, a.n + b.n - 2, 0.0 if delta else 1.0, alpha)
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    p_value = 2 * float(_scipy_stats.t.sf(abs(delta) / se, df))
    return Difference(delta, se, df, p_value, alpha)


__all__ = ["ALPHA", "CONFIDENCE", "Difference", "Estimate", "estimate", "t_quantile", "welch_test"]
