"""Statistics that survive a noisy machine: medians with their interquartile range, a
distribution-free confidence interval for each median, and for each ratio of two providers the
interval of the per-round ratio (the providers are interleaved round by round, so pairing the
samples of one round cancels the drift both of them saw).

The median's interval comes from order statistics (the number of samples below the true median is
Binomial(n, 1/2)), so it assumes nothing about the shape of the timing distribution, which on a
busy machine is skewed and heavy-tailed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

CONFIDENCE = 0.95
# A row whose interquartile range exceeds this fraction of its median is flagged as noisy.
NOISY_RELATIVE_IQR = 0.2
# The copy bandwidth measured at the start and at the end of a run may differ by this much before
# the run is flagged: the machine's speed changed under the measurement.
BANDWIDTH_DRIFT_LIMIT = 0.10


@dataclass(frozen=True)
class Summary:
    """One provider's samples (µs): median, quartiles and the median's confidence interval."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    count: int

    @property
    def relative_iqr(self) -> float:
        return (self.q3 - self.q1) / self.median if self.median > 0 else math.inf

    @property
    def relative_half_width(self) -> float:
        """Half the median's interval over the median: how well the median is pinned down."""
        return (self.high - self.low) / (2 * self.median) if self.median > 0 else math.inf

    @property
    def noisy(self) -> bool:
        return self.relative_iqr > NOISY_RELATIVE_IQR

    def as_dict(self) -> dict:
        return {
            "median": self.median,
            "q1": self.q1,
            "q3": self.q3,
            "low": self.low,
            "high": self.high,
            "count": self.count,
        }


def _median_rank_bounds(count: int, confidence: float) -> tuple[int, int]:
    """0-based ranks (lower, upper) of the sorted samples whose span covers the median with at
    least `confidence`; the whole range when there are too few samples for that.

    With B ~ Binomial(count, 1/2) the number of samples below the median, the 1-based order
    statistics x_(j) and x_(count + 1 - j) bracket it with probability 1 - 2 P(B < j): take the
    largest j with P(B < j) <= (1 - confidence) / 2.
    """
    tail = (1 - confidence) / 2
    j = 1
    below = math.comb(count, 0) / 2**count  # P(B < 1)
    while j < (count + 1) // 2:
        below_next = below + math.comb(count, j) / 2**count  # P(B < j + 1)
        if below_next > tail:
            break
        below, j = below_next, j + 1
    return j - 1, count - j


def summarize(samples: list[float], confidence: float = CONFIDENCE) -> Summary:
    if not samples:
        raise ValueError("summarize: no samples")
    ordered = sorted(samples)
    count = len(ordered)
    if count == 1:
        value = ordered[0]
        return Summary(value, value, value, value, value, 1)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    lower, upper = _median_rank_bounds(count, confidence)
    return Summary(statistics.median(ordered), q1, q3, ordered[lower], ordered[upper], count)


@dataclass(frozen=True)
class Ratio:
    """baseline time / candidate time, from the samples of the same rounds: > 1 means the
    candidate is faster. `verdict` claims a difference only when the interval excludes 1."""

    median: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        if self.low > 1:
            return "faster"
        if self.high < 1:
            return "slower"
        return "same"

    def as_dict(self) -> dict:
        return {"median": self.median, "low": self.low, "high": self.high, "verdict": self.verdict}

    def text(self) -> str:
        """1.23x [1.18-1.30]; a tie is written with '~' so that no speed-up is claimed."""
        mark = "~" if self.verdict == "same" else ""
        return f"{mark}{self.median:.2f}x [{self.low:.2f}-{self.high:.2f}]"


def ratio(baseline: list[float], candidate: list[float], confidence: float = CONFIDENCE) -> Ratio:
    """Per-round ratios baseline[i] / candidate[i] (samples taken in the same interleaved round),
    their median and its interval."""
    count = min(len(baseline), len(candidate))
    if count == 0:
        raise ValueError("ratio: no samples")
    per_round = [b / c for b, c in zip(baseline[:count], candidate[:count], strict=True) if c > 0]
    summary = summarize(per_round, confidence)
    return Ratio(summary.median, summary.low, summary.high)


def bandwidth_drift(start_gbps: float, end_gbps: float) -> float:
    """Relative change of the copy bandwidth between the start and the end of a run."""
    return abs(end_gbps - start_gbps) / max(start_gbps, end_gbps)
