"""Time of the tables' bootstrap at paper scale: a 3,000-image test set × 12 metrics × 6 methods.

Variants, side by side on the same synthetic scores (NIQE-like NaNs included):

* ``loop``      — textbook: for every series and every resample, gather the drawn values and average;
* ``gather``    — the same draws as one fancy-indexing gather per chunk of resamples (numpy, vectorised);
* ``scipy``     — ``scipy.stats.bootstrap`` (percentile) once per series, as a library user would call it;
* ``counts``    — ours (:func:`tvt.stats.bootstrap_means`): resamples as a counts matrix, one matmul;
* ``analyse``   — ours, everything the tables need: intervals of all 72 series and all 180 paired tests.

``loop`` and ``scipy`` are timed on a few series and scaled to 72 (they are linear in the series);
``gather`` and ``counts`` must give the same means (same draws), which is checked.

    PYTHONPATH=. python bench/bench_bootstrap.py                  # 3000 images, 1000 resamples
    PYTHONPATH=. python bench/bench_bootstrap.py --resamples 2000 --images 3000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.stats

from tvt import stats

METRICS, METHODS = 12, 6


def _scores(images: int, seed: int = 0) -> np.ndarray:
    """(metrics, methods, images): a per-image difficulty shared by the methods, plus method noise."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0.0, 1.0, (METRICS, 1, images))
    values = difficulty + rng.normal(0.0, 0.3, (METRICS, METHODS, images)) + rng.normal(0.0, 0.1, (METRICS, METHODS, 1))
    values[-1, :, : images // 10] = np.nan  # one metric not scored on small images (NIQE)
    return values


def _timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def loop(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    flat = values.reshape(-1, values.shape[-1])
    return np.array([[np.nanmean(series[draw]) for draw in index] for series in flat])


def gather(values: np.ndarray, index: np.ndarray, chunk: int = 100) -> np.ndarray:
    flat = values.reshape(-1, values.shape[-1])
    return np.concatenate(
        [np.nanmean(flat[:, index[i : i + chunk]], axis=-1) for i in range(0, len(index), chunk)], axis=1
    )


def scipy_percentile(values: np.ndarray, resamples: int, seed: int) -> list:
    flat = values.reshape(-1, values.shape[-1])
    return [
        scipy.stats.bootstrap(
            (s[np.isfinite(s)],), np.mean, n_resamples=resamples, method="percentile", rng=np.random.default_rng(seed)
        ).confidence_interval
        for s in flat
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--sampled-series", type=int, default=4, help="series timed for loop/scipy, then scaled")
    args = parser.parse_args()
    seed, series = 0, METRICS * METHODS
    values = _scores(args.images)
    index = np.random.default_rng(seed).integers(0, args.images, size=(args.resamples, args.images))
    few = values.reshape(series, 1, -1)[: args.sampled_series]

    t_loop, _ = _timed(lambda: loop(few, index))
    t_scipy, _ = _timed(lambda: scipy_percentile(few, args.resamples, seed))
    t_gather, by_gather = _timed(lambda: gather(values, index))
    t_counts, by_counts = _timed(
        lambda: stats.bootstrap_means(values, stats.resample_counts(args.images, args.resamples, seed)), repeat=3
    )
    bootstrap = stats.Bootstrap(resamples=args.resamples, seed=seed)
    t_analyse, result = _timed(
        lambda: stats.analyse(values, [f"m{i}" for i in range(METHODS)], [f"k{i}" for i in range(METRICS)], bootstrap),
        repeat=3,
    )
    same = np.nanmax(np.abs(by_gather - by_counts.reshape(series, -1)))
    tests = sum(len(s.comparisons) for s in result.values())

    scale = series / args.sampled_series
    rows = [
        (
            "loop",
            f"{series} series, python loop over resamples (timed on {args.sampled_series}, ×{scale:g})",
            t_loop * scale,
        ),
        (
            "scipy",
            f"{series} × scipy.stats.bootstrap percentile (timed on {args.sampled_series}, ×{scale:g})",
            t_scipy * scale,
        ),
        ("gather", f"{series} series, chunked fancy-index gather", t_gather),
        ("counts", f"{series} series, counts matrix @ values (ours)", t_counts),
        ("analyse", f"ours: {series} intervals + {tests} paired tests", t_analyse),
    ]
    print(f"bootstrap of {METRICS} metrics × {METHODS} methods × {args.images} images, {args.resamples} resamples")
    print(f"{'variant':<9} {'what':<72} {'seconds':>9} {'× counts':>9}")
    for name, what, seconds in rows:
        print(f"{name:<9} {what:<72} {seconds:9.3f} {seconds / t_counts:9.1f}")
    print(f"gather vs counts, same draws: max |Δ mean| = {same:.2e}")


if __name__ == "__main__":
    main()
