"""How sure a speed-up is: bootstrap intervals over tasks, and which differences are real.

A benchmark's figure is a ratio of sums over its tasks (tokens per second of a method
over plain decoding's, on the same generations). Tasks differ far more than the noise
of one machine: a summary that copies its source and one that does not. So the
interval resamples *tasks* (a multi-turn task's turns stay together), with
replacement, and recomputes the ratio of sums on each resample; the 5th and 95th
percentiles give a 90% interval. Two methods are compared on the same resampled
tasks (a paired bootstrap): their ratio's interval excludes 1 when, and only when, the
difference is more than the spread of the tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.90


@dataclass(frozen=True)
class Interval:
    value: float  # the figure on the tasks as run
    low: float
    high: float

    @property
    def real(self) -> bool:
        """A ratio whose interval lies wholly above or below 1."""
        return self.low > 1 or self.high < 1

    def as_list(self) -> list[float]:
        return [round(self.value, 3), round(self.low, 3), round(self.high, 3)]


def ratio_interval(num: tuple[np.ndarray, np.ndarray], den: tuple[np.ndarray, np.ndarray],
                   resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """(sum a / sum b) / (sum c / sum d) over tasks, where num = (a, b) and den = (c, d) are
    per-task arrays aligned by task (e.g. tokens and seconds of a method, then of plain).
    Seeded: the same records give the same interval."""
    a, b = (np.asarray(x, dtype=float) for x in num)
    c, d = (np.asarray(x, dtype=float) for x in den)
    if not len(a) == len(b) == len(c) == len(d) or len(a) == 0:
        raise ValueError("ratio_interval: four per-task arrays of one non-zero length")
    if b.sum() <= 0 or c.sum() <= 0 or d.sum() <= 0:
        raise ValueError("ratio_interval: sums must be positive")
    value = (a.sum() / b.sum()) / (c.sum() / d.sum())
    pick = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (a[pick].sum(1) / b[pick].sum(1)) / (c[pick].sum(1) / d[pick].sum(1))
    ratios = ratios[np.isfinite(ratios)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))
