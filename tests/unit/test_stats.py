"""Bootstrap intervals: exact on constant data, cover the mean, paired differences cancel shared noise."""

import numpy as np
import pytest

from tsubasa.stats import bootstrap_mean, paired_difference


def test_constant_scores_give_a_point_interval():
    iv = bootstrap_mean([0.5] * 20)
    assert (iv.mean, iv.lo, iv.hi, iv.n) == (0.5, 0.5, 0.5, 20)


def test_interval_covers_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small = bootstrap_mean(rng.random(30))
    large = bootstrap_mean(rng.random(3000))
    assert small.lo < small.mean < small.hi
    assert (large.hi - large.lo) < (small.hi - small.lo) / 5
    assert large.lo < 0.5 < large.hi


def test_paired_difference_sees_a_shift_that_unpaired_noise_hides():
    rng = np.random.default_rng(2)
    base = rng.random(150)  # per-question difficulty, shared by both systems
    better = base + 0.02
    d = paired_difference(better, base)
    assert d.mean == pytest.approx(0.02) and d.excludes_zero()
    assert not paired_difference(base, base).excludes_zero()
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0], [1.0, 2.0])
