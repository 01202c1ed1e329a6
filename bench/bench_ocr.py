"""Reading the evaluation's text lines: one Tesseract process at a time vs side by side.

Each :func:`tvt.metrics.ocr.recognise` call starts a Tesseract process that spends most of its time
starting and loading its model, and the evaluation reads every text line of every method (13 rows ×
24 lines in mini mode). Variants, on the same rendered lines, in one run:

* ``serial``           — one call after another, Tesseract's default threads (before LineReader);
* ``serial, 1 thread`` — the same with ``OMP_THREAD_LIMIT=1`` (for reference: LineReader does not set it,
  since the variable would reach every later child process of the evaluation);
* ``LineReader``       — :class:`tvt.metrics.ocr.LineReader`: one Tesseract process per usable core.

Every variant must read the same strings (checked). Prints seconds per line and the ratio to ``serial``.

    PYTHONPATH=. python bench/bench_ocr.py --lines 48
"""

from __future__ import annotations

import argparse
import os
import random
import time

from tvt.data.text_render import latin_fonts, random_line, render_text_line
from tvt.metrics import ocr


def rendered_lines(count: int, seed: int = 0) -> list:
    """``count`` English lines of 16-32 px (DejaVu Sans), 384 px wide: the mini text set's shape."""
    font = next(f for f in latin_fonts() if f.name.startswith("DejaVu Sans"))
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        px = (16, 20, 24, 28, 32)[i % 5]
        lines.append(render_text_line(random_line(rng, "en", font.load(px), 384 - 2 * px), font, px, 384))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=48)
    args = parser.parse_args()
    reason = ocr.unavailable_reason(["en"])
    if reason:
        raise SystemExit(f"bench_ocr: Tesseract is {reason}")
    images = rendered_lines(args.lines)
    os.environ.pop("OMP_THREAD_LIMIT", None)

    def serial() -> list[str]:
        return [ocr.recognise(image, "en") for image in images]

    def serial_one_thread() -> list[str]:
        os.environ["OMP_THREAD_LIMIT"] = "1"
        try:
            return serial()
        finally:
            os.environ.pop("OMP_THREAD_LIMIT")

    def side_by_side() -> list[str]:
        with ocr.LineReader() as reader:
            futures = [reader.submit(image, "en") for image in images]
        return [f.result() for f in futures]

    rows, reference = [], None
    for name, variant in (("serial", serial), ("serial, 1 thread", serial_one_thread), ("LineReader", side_by_side)):
        start = time.perf_counter()
        texts = variant()
        seconds = time.perf_counter() - start
        reference = reference or texts
        if texts != reference:
            raise SystemExit(f"bench_ocr: {name} read other strings than serial")
        rows.append((name, seconds))
    print(f"{len(images)} lines, {len(os.sched_getaffinity(0))} usable cores, tesseract {ocr.tesseract_version()}")
    print(f"{'variant':18s} {'s/line':>8s} {'vs serial':>10s}")
    for name, seconds in rows:
        print(f"{name:18s} {seconds / len(images):8.3f} {rows[0][1] / seconds:9.2f}x")


if __name__ == "__main__":
    main()
