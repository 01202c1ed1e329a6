"""Uncertainty of the evaluation tables: bootstrap intervals and paired tests over images (or text lines).

Every table cell is a mean over the same test items for every method, so one set of
bootstrap resamples of the *items* serves every metric and every method at once:

* **interval** — the percentile bootstrap (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13): resample the
  items with replacement ``resamples`` times, take the mean of each resample, and report the
  ``(1 − confidence)/2`` and ``(1 + confidence)/2`` quantiles of those means;
* **paired test** — the same resamples give, for two methods A and B, the bootstrap
  distribution of ``mean(A) − mean(B)`` on identical items (the pairing that an image-wise
  comparison needs: hard images are hard for every method). The two-sided p-value is
  ``min(1, 2·min(P*(Δ ≤ 0), P*(Δ ≥ 0)))``: the smallest α at which the percentile interval of
  Δ excludes 0. A difference is *significant* when ``p < 1 − confidence``.

Vectorised: a resample is a vector of counts (how often each item was drawn), so the means of
all resamples of all (metric, method) series are one matrix product ``values @ countsᵀ``.
Items a metric does not score (NaN: NIQE on images under 96 px) drop out of numerator and
denominator alike, and the pairing is kept because the counts are shared.

:func:`marks` turns means and significance into the tables' best / second / tied marks.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

#: a table's interval of a cell: (low, high)
Interval = tuple[float, float]


@dataclass(frozen=True)
class Bootstrap:
    """How intervals and tests are computed (stored with the results, so a table says how it was made)."""

    resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if self.resamples < 1000:
            raise ValueError(
                f"bootstrap: {self.resamples} resamples; at least 1000 are needed for stable 95 % percentile bounds"
            )
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"bootstrap: confidence {self.confidence} is not in [0.5, 1)")

    def describe(self) -> dict:
        return {
            "interval": "percentile bootstrap over test items",
            "test": "paired bootstrap of the difference of means over the same items (two-sided)",
            "resamples": self.resamples,
            "confidence": self.confidence,
            "seed": self.seed,
        }


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) float64: how often each of ``n`` items is drawn in each resample of size ``n``.

    Drawn as ``n`` uniform indices per resample and counted with one ``bincount``: the same
    draws as index resampling, without materialising the resampled values.
    """
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(resamples, n))
    index += np.arange(resamples)[:, None] * n
    return np.bincount(index.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def bootstrap_means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Means of every series under every resample: ``values`` (..., n) with NaN for unscored items,
    ``counts`` (B, n) → (..., B); NaN where a resample drew no scored item."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[-1]
    flat = values.reshape(-1, n)
    scored = np.isfinite(flat)
    sums = np.where(scored, flat, 0.0) @ counts.T
    weights = np.full_like(sums, float(n))  # a fully scored series: n items in every resample
    partial = ~scored.all(axis=1)
    if partial.any():  # a second product only for the series with unscored items
        weights[partial] = scored[partial].astype(np.float64) @ counts.T
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / weights
    return means.reshape(*values.shape[:-1], counts.shape[0])


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper percentile bounds along the last axis (NaN resamples ignored)."""
    tail = (1.0 - confidence) / 2
    if not np.isnan(samples).any():  # the usual case, and much faster than nanquantile
        low, high = np.quantile(samples, [tail, 1.0 - tail], axis=-1)
        return low, high
    with _all_nan_is_nan():
        low, high = np.nanquantile(samples, [tail, 1.0 - tail], axis=-1)
    return low, high


@contextmanager
def _all_nan_is_nan():
    """numpy warns on an all-NaN series (a row without any scored item): its NaN result is the answer."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@dataclass(frozen=True)
class Comparison:
    """``mean(a) − mean(b)`` over the items both score, its interval and two-sided p-value."""

    a: str
    b: str
    diff: float
    low: float
    high: float
    p: float

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "diff": self.diff, "ci": [self.low, self.high], "p": self.p}

    @classmethod
    def from_json(cls, doc: Mapping) -> Comparison:
        return cls(doc["a"], doc["b"], doc["diff"], *doc["ci"], doc["p"])


@dataclass(frozen=True)
class SeriesStats:
    """Statistics of one metric over the rows of one table: point means, intervals, pairwise tests."""

    means: dict[str, float]
    intervals: dict[str, Interval]
    comparisons: list[Comparison]

    def to_json(self) -> dict:
        """Intervals and comparisons as stored in ``metrics.json`` (the means are the table's values)."""
        return {
            "intervals": {row: [_finite_or_none(v) for v in bounds] for row, bounds in self.intervals.items()},
            "comparisons": [c.to_json() for c in self.comparisons],
        }


def _finite_or_none(value: float) -> float | None:
    return value if np.isfinite(value) else None


def analyse(
    values: np.ndarray, rows: Sequence[str], metrics: Sequence[str], bootstrap: Bootstrap
) -> dict[str, SeriesStats]:
    """Intervals and all pairwise paired tests for ``values`` (metrics, rows, items), NaN = not scored.

    Every (metric, row) series is resampled with the same item counts, so the differences
    between rows are paired. Rows with no scored item of a metric are left out of its stats.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.shape[:2] != (len(metrics), len(rows)):
        raise ValueError(f"analyse: values of shape {values.shape} for {len(metrics)} metrics × {len(rows)} rows")
    n = values.shape[-1]
    if n == 0:
        return {m: SeriesStats({}, {}, []) for m in metrics}
    counts = resample_counts(n, bootstrap.resamples, bootstrap.seed)
    boot = bootstrap_means(values, counts)  # (metrics, rows, B)
    scored = np.isfinite(values)
    with _all_nan_is_nan():
        point = np.nanmean(values, axis=-1)
    low, high = percentile_interval(boot, bootstrap.confidence)
    out = {}
    for m, metric in enumerate(metrics):
        present = [r for r in range(len(rows)) if scored[m, r].any()]
        pairs, diffs, observed = [], [], []
        for i, r in enumerate(present):
            for s in present[i + 1 :]:
                both = scored[m, r] & scored[m, s]
                if not both.any():
                    continue
                pairs.append((rows[r], rows[s]))
                observed.append(float(np.mean(values[m, r, both] - values[m, s, both])))
                if (scored[m, r] == scored[m, s]).all():  # same items: the resampled means pair up as they are
                    diffs.append(boot[m, r] - boot[m, s])
                else:  # restrict both to the items they share
                    diffs.append(bootstrap_means(np.where(both, values[m, r] - values[m, s], np.nan), counts))
        comparisons = _comparisons(pairs, observed, np.array(diffs), bootstrap.confidence) if pairs else []
        out[metric] = SeriesStats(
            {rows[r]: float(point[m, r]) for r in present},
            {rows[r]: (float(low[m, r]), float(high[m, r])) for r in present},
            comparisons,
        )
    return out


def _comparisons(
    pairs: list[tuple[str, str]], observed: list[float], resampled: np.ndarray, confidence: float
) -> list[Comparison]:
    """Interval and two-sided p-value of each pair's resampled differences (pairs, B); NaN resamples ignored."""
    finite = np.isfinite(resampled)
    drawn = finite.sum(axis=-1)
    below = ((resampled <= 0) & finite).sum(axis=-1) / drawn
    above = ((resampled >= 0) & finite).sum(axis=-1) / drawn
    p = np.minimum(1.0, 2.0 * np.minimum(below, above))
    low, high = percentile_interval(resampled, confidence)
    return [
        Comparison(a, b, diff, float(lo), float(hi), float(pv))
        for (a, b), diff, lo, hi, pv in zip(pairs, observed, low, high, p, strict=True)
    ]


# ------------------------------------------------------------------------------------------
# Marks: best, second, tied
# ------------------------------------------------------------------------------------------


class Mark(enum.Enum):
    """How a table cell is emphasised."""

    BEST = "best"  # better than every other row, each difference significant
    SECOND = "second"  # the same among the rows left once the best is removed
    TIED = "tied"  # the highest mean, or within noise of it: no row is significantly best


def significance(comparisons: Sequence[Comparison], alpha: float) -> Callable[[str, str], bool]:
    """``differ(a, b)``: whether the paired test separates rows a and b (symmetric; untested pairs do not)."""
    separated = {frozenset((c.a, c.b)) for c in comparisons if c.p < alpha}
    return lambda a, b: frozenset((a, b)) in separated


def marks(
    means: Mapping[str, float], higher_is_better: bool, differ: Callable[[str, str], bool] | None = None
) -> dict[str, Mark]:
    """Best / second / tied marks of one column.

    The leading group is the row with the best mean plus every row it does not significantly
    differ from (``differ``). A group of one is BEST; then the same rule on the remaining rows
    gives SECOND (nothing when that group is a tie, or when only one row is left). A leading
    group of several rows is TIED and nothing is marked second. Without ``differ`` the values are exact (parameter
    counts, steps) and equal values tie.
    """
    finite = {k: v for k, v in means.items() if np.isfinite(v)}
    if len(finite) < 2:
        return {}
    if differ is None:

        def differ(a, b):
            return finite[a] != finite[b]

    order = sorted(finite, key=lambda k: finite[k], reverse=higher_is_better)

    def lead(candidates: list[str]) -> list[str]:
        return [k for k in candidates if k == candidates[0] or not differ(candidates[0], k)]

    first = lead(order)
    if len(first) > 1:
        return dict.fromkeys(first, Mark.TIED)
    out = {first[0]: Mark.BEST}
    rest = order[1:]
    if len(rest) >= 2 and len(second := lead(rest)) == 1:  # with two rows, "second" would just mean "last"
        out[second[0]] = Mark.SECOND
    return out
