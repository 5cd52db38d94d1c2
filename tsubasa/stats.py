"""Bootstrap confidence intervals for per-question scores: a system's mean, and the paired difference
between two systems answering the same questions (resampling questions, not rows of either system).
Used by the evaluation harness (LoCoMo F1) and by the reading wing's internalisation measure."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel


class Interval(BaseModel):
    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def bootstrap_mean(values: Sequence[float], n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of `values`."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    a = (1 - level) / 2
    return Interval(mean=float(x.mean()), lo=float(np.quantile(means, a)), hi=float(np.quantile(means, 1 - a)),
                    n=int(x.size), level=level)


def paired_difference(a: Sequence[float], b: Sequence[float], n_boot: int = 10_000, level: float = 0.95,
                      seed: int = 0) -> Interval:
    """Interval of mean(a - b) over the same questions, in the same order (a paired bootstrap)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores differ in length: {len(a)} vs {len(b)}")
    return bootstrap_mean(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), n_boot, level, seed)
