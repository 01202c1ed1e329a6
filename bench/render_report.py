"""Render the Snakemake report in headless Chromium and check that every category shows its results.

    python bench/render_report.py [--project .] [--report report.html] [--out bench-out/report]

Builds ``report.html`` with ``snakemake --report`` in the project (its pipeline must have run;
skipped with ``--report``), then screenshots, with ``chromium --headless=new``, the landing page
and, per category of the report, its first result opened in the report's own viewer (the
report is a single-page app, so each view is the report plus one line of script that opens it).
A view passes when its screenshot is not blank (share of non-background pixels). Prints one row
per view with the time Chromium took. Needs Chromium (`apt-get install -y chromium`); not part of
the test suite, which checks the report's contents without a browser (tests/test_workflow.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tvt.report_assets import report_contents

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
#: opens a result in the report's viewer once React has rendered the app
OPEN_RESULT = """<script>setTimeout(function () {{ app.showCategory({category});
  new ToggleViewManager(app).handleSelectedResult({path}); }}, 300);</script></body>"""


def screenshot(browser: str, page: Path, png: Path, size=(1400, 900)) -> float:
    start = time.perf_counter()
    subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={size[0]},{size[1]}",
            "--virtual-time-budget=5000",
            f"--screenshot={png}",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return time.perf_counter() - start


def opened(browser: str, page: Path, mime: str) -> bool:
    """Whether the rendered page shows the result in the report's viewer: an <img> (images) or an
    <iframe> (HTML) whose source is an embedded data URI (``--dump-dom``: the DOM after the scripts ran)."""
    dom = subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    tag = "<iframe" if mime == "text/html" else "<img"
    return any(part.split(">", 1)[0].find('src="data:') >= 0 for part in dom.split(tag)[1:])


def ink(png: Path) -> float:
    """Share of pixels that differ from the most common colour (the background)."""
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    _, counts = np.unique(pixels, axis=0, return_counts=True)
    return 1 - counts.max() / len(pixels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=Path("."), help="project whose pipeline has run")
    parser.add_argument("--report", type=Path, help="an existing report.html (default: build one)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/report"), help="screenshots")
    parser.add_argument("--min-ink", type=float, default=0.02, help="least share of non-background pixels")
    args = parser.parse_args()
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        sys.exit("no Chromium found: apt-get install -y chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.report
    if report is None:
        report = args.out / "report.html"
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "snakemake", "--report", str(report.resolve())], cwd=args.project, check=True
        )
        print(f"snakemake --report: {time.perf_counter() - start:.1f} s, {report.stat().st_size / 1e6:.1f} MB")
    text = report.read_text(encoding="utf-8")
    results, categories = report_contents(text)
    views = [("landing page", None, None)]
    for category, subcategories in sorted(categories.items()):
        paths = [p for paths in subcategories.values() for p in paths]
        views.append((category, category, min(paths)))
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, category, path) in enumerate(views):
            page = Path(tmp) / f"view{index}.html"
            if path is not None:  # the last </body>: the embedded libraries hold the string too
                head, _, tail = text.rpartition("</body>")
                opener = OPEN_RESULT.format(category=json.dumps(category), path=json.dumps(path))
                page.write_text(head + opener + tail)
            else:
                page.write_text(text)
            png = args.out / f"{index:02d}-{name.lower().replace(' ', '-')}.png"
            seconds = screenshot(browser, page, png)
            share = ink(png)
            shown = path is None or opened(browser, page, results[path]["mime_type"])
            ok = share >= args.min_ink and shown
            failed += not ok
            rows.append(
                (
                    name,
                    Path(path).name if path else "-",
                    results[path]["mime_type"] if path else "-",
                    f"{share:.3f}",
                    f"{seconds:.1f}",
                    "ok" if ok else ("BLANK" if shown else "NOT SHOWN"),
                )
            )
    header = ("view", "result", "type", "ink", "seconds", "status")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print(f"screenshots in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
