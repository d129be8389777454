"""paired_bootstrap_ci: the R@1-difference interval that `edje-qdrant eval` reports."""
from __future__ import annotations

import numpy as np
import pytest

from edje_qdrant.evaluate import paired_bootstrap_ci


def test_identical_systems_give_zero_and_a_zero_interval():
    hits = np.random.default_rng(3).random(500) < 0.4
    delta, (lo, hi) = paired_bootstrap_ci(hits, hits)
    assert delta == 0.0 and (lo, hi) == (0.0, 0.0)


def test_better_on_every_query_gives_an_interval_above_zero():
    a = np.zeros(50)
    b = np.ones(50)
    delta, (lo, hi) = paired_bootstrap_ci(a, b)
    assert delta == 1.0 and lo > 0.0 and hi >= lo


def test_mostly_better_is_above_zero_and_brackets_the_mean():
    rng = np.random.default_rng(1)
    a = (rng.random(400) < 0.3).astype(float)
    b = np.maximum(a, rng.random(400) < 0.3)  # b finds everything a finds, and more
    delta, (lo, hi) = paired_bootstrap_ci(a, b, n=1000, seed=7)
    assert delta == pytest.approx(b.mean() - a.mean())
    assert 0.0 < lo < delta < hi


def test_same_seed_same_result_other_seed_other_draws():
    rng = np.random.default_rng(2)
    a, b = rng.random(300) < 0.5, rng.random(300) < 0.5
    assert paired_bootstrap_ci(a, b, seed=11) == paired_bootstrap_ci(a, b, seed=11)
    assert paired_bootstrap_ci(a, b, seed=11)[1] != paired_bootstrap_ci(a, b, seed=12)[1]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap_ci(np.zeros(3), np.zeros(4))
