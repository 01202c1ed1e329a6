"""Bootstrap intervals against closed forms, the paired test on designed differences, and the marks."""

from __future__ import annotations

import numpy as np
import pytest

from tvt import stats
from tvt.stats import Mark


def _analyse(*series: np.ndarray, bootstrap: stats.Bootstrap | None = None) -> stats.SeriesStats:
    rows = [chr(ord("a") + i) for i in range(len(series))]
    return stats.analyse(np.stack(series)[None], rows, ["m"], bootstrap or stats.Bootstrap())["m"]


def test_interval_of_a_large_normal_sample_is_the_normal_approximation():
    rng = np.random.default_rng(7)
    x = rng.normal(10.0, 3.0, 4000)
    se = x.std(ddof=1) / np.sqrt(x.size)
    low, high = _analyse(x).intervals["a"]
    assert low == pytest.approx(x.mean() - 1.959964 * se, abs=0.15 * se)
    assert high == pytest.approx(x.mean() + 1.959964 * se, abs=0.15 * se)
    low90, high90 = _analyse(x, bootstrap=stats.Bootstrap(confidence=0.90)).intervals["a"]
    assert high90 - low90 == pytest.approx(2 * 1.644854 * se, rel=0.08)


def test_interval_of_line_accuracies_is_the_binomial_one():
    """0/1 scores (OCR ACC per line): the Wald interval p ± z·sqrt(p(1−p)/n)."""
    rng = np.random.default_rng(3)
    hits = (rng.random(3000) < 0.3).astype(float)
    p = hits.mean()
    half = 1.959964 * np.sqrt(p * (1 - p) / hits.size)
    low, high = _analyse(hits).intervals["a"]
    assert (low, high) == pytest.approx((p - half, p + half), abs=0.15 * half)


def test_counts_are_resamples_with_replacement_and_seeded():
    counts = stats.resample_counts(50, 1000, seed=1)
    assert counts.shape == (1000, 50) and (counts.sum(axis=1) == 50).all()
    assert counts.max() > 1 and (counts == 0).any()  # with replacement
    assert counts.mean(axis=0) == pytest.approx(np.ones(50), abs=0.15)  # every item equally likely
    assert np.array_equal(counts, stats.resample_counts(50, 1000, seed=1))
    assert not np.array_equal(counts, stats.resample_counts(50, 1000, seed=2))


def test_vectorised_means_equal_resampling_the_values_by_index():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 2, 40))
    values[1, 0, :5] = np.nan  # a metric not scored on five items
    counts = stats.resample_counts(40, 1000, seed=5)
    index = np.random.default_rng(5).integers(0, 40, size=(1000, 40))  # the draws resample_counts makes
    drawn = values[..., index]  # (3, 2, 1000, 40)
    assert np.allclose(stats.bootstrap_means(values, counts), np.nanmean(drawn, axis=-1))


def test_rows_without_scores_are_left_out():
    scored = np.arange(20.0)
    result = _analyse(scored, np.full(20, np.nan))
    assert set(result.intervals) == {"a"} and result.comparisons == []


def test_a_small_consistent_difference_is_significant_when_paired():
    """Image difficulty varies far more than the methods differ: unpaired intervals overlap, the paired test
    still separates them because every image moves both methods alike."""
    rng = np.random.default_rng(11)
    difficulty = rng.normal(25.0, 4.0, 100)
    a = difficulty + rng.normal(0.0, 0.05, 100)
    b = a - 0.1
    result = _analyse(a, b)
    (ia_low, ia_high), (ib_low, ib_high) = result.intervals["a"], result.intervals["b"]
    assert ia_low < ib_high and ib_low < ia_high  # the marginal intervals overlap
    (comparison,) = result.comparisons
    assert (comparison.a, comparison.b) == ("a", "b")
    assert comparison.diff == pytest.approx(0.1) and comparison.low > 0 and comparison.p < 0.001


def test_a_difference_within_noise_is_not_significant():
    rng = np.random.default_rng(4)
    a = rng.normal(25.0, 4.0, 200)
    noise = rng.normal(0.0, 1.0, 100)
    b = a + np.concatenate([noise, -noise])  # mean difference exactly 0
    (comparison,) = _analyse(a, b).comparisons
    assert comparison.diff == pytest.approx(0.0, abs=1e-12)
    assert comparison.low < 0 < comparison.high and comparison.p > 0.5


def test_items_one_series_lacks_are_left_out_of_the_pair():
    a = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    b = np.array([0.0, 1.0, 2.0, 3.0, np.nan])  # b not scored on the outlier: compare on the first four
    (comparison,) = _analyse(a, b).comparisons
    assert comparison.diff == pytest.approx(1.0) and comparison.low == pytest.approx(1.0)


def test_significance_is_symmetric_and_level_dependent():
    comparisons = [stats.Comparison("a", "b", 1.0, 0.2, 1.8, 0.01), stats.Comparison("a", "c", 0.5, -0.1, 1.1, 0.2)]
    differ = stats.significance(comparisons, alpha=0.05)
    assert differ("a", "b") and differ("b", "a") and not differ("a", "c") and not differ("b", "c")
    assert stats.significance(comparisons, alpha=0.25)("c", "a")


def test_marks_best_second_and_ties():
    means = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.5}

    def separated(*pairs):
        return lambda x, y: {x, y} in [set(p) for p in pairs]

    everything = separated(*[(x, y) for x in means for y in means if x != y])
    assert stats.marks(means, True, everything) == {"a": Mark.BEST, "b": Mark.SECOND}
    assert stats.marks(means, False, everything) == {"d": Mark.BEST, "c": Mark.SECOND}
    # a not separated from b: a tie for best, nothing second
    tie = separated(("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d"))
    assert stats.marks(means, True, tie) == {"a": Mark.TIED, "b": Mark.TIED}
    # a is best, but b and c are within noise of each other: no second
    assert stats.marks(means, True, separated(("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d"))) == {
        "a": Mark.BEST
    }
    # best must beat every row, not just the runner-up: a is within noise of the (noisy) c and d
    assert stats.marks(means, True, separated(("a", "b"), ("b", "c"), ("b", "d"))) == {
        "a": Mark.TIED,
        "c": Mark.TIED,
        "d": Mark.TIED,
    }
    # two rows: the loser is not "second"
    assert stats.marks({"a": 1.0, "b": 0.0}, True, everything) == {"a": Mark.BEST}
    # exact values (no test): equal values tie
    assert stats.marks({"a": 1, "b": 1, "c": 200}, False) == {"a": Mark.TIED, "b": Mark.TIED}
    assert stats.marks({"a": float("nan"), "b": 1.0}, True) == {}


def test_bootstrap_settings_are_checked():
    with pytest.raises(ValueError, match="at least 1000"):
        stats.Bootstrap(resamples=200)
    with pytest.raises(ValueError, match="confidence 1.5"):
        stats.Bootstrap(confidence=1.5)
    assert stats.Bootstrap(seed=3).describe()["seed"] == 3


def test_series_statistics_serialise_for_metrics_json():
    result = _analyse(np.arange(10.0), np.arange(10.0) + 1)
    doc = result.to_json()
    assert set(doc["intervals"]) == {"a", "b"} and len(doc["intervals"]["a"]) == 2
    assert stats.Comparison.from_json(doc["comparisons"][0]) == result.comparisons[0]
