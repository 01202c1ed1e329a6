"""Do the trained mini models show the paper's effects? Scores a finished mini pipeline on held-out data.

Run from the repository root after ``make demo`` (or ``snakemake --cores 2 all``): it loads
``resources/models/`` (the mini SD's VAE-D8, the transferred VAE-D4, the TVT / OSEDiff /
StableSR restorers, T1 when trained), measures every claim of :mod:`tvt.claims` on the test
split and on freshly rendered text lines, prints one table and writes ``results/claims.json``
(plain floats). The evaluation stage prints the same table at the end of ``metrics.md``.

Generalisation to photographs the pipeline never sees: pass a folder of them, e.g. Debian's
MATE nature wallpapers (GPL-2+, see the package's copyright file)::

    apt-get download mate-backgrounds && dpkg -x mate-backgrounds_*.deb /tmp/mate
    python bench/bench_mini_claims.py --heldout-photos /tmp/mate/usr/share/backgrounds/mate/nature
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # a table, not progress bars

import torch

from tvt import claims, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/config.yaml", help="the config the pipeline ran with")
    parser.add_argument("--heldout-photos", type=Path, help="folder of photographs never used by the pipeline")
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root holding resources/")
    parser.add_argument("--out", type=Path, help="claims.json location (default <root>/results/claims.json)")
    args = parser.parse_args()

    cfg = config.load(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    measured = claims.measure_claims(cfg, heldout_photos=args.heldout_photos, device=device, root=args.root)
    seconds = time.perf_counter() - start
    path = claims.write_claims(
        measured,
        args.out.parent if args.out else args.root / "results",
        name=args.out.name if args.out else claims.CLAIMS_FILE,
    )
    print(claims.claims_markdown(measured))
    print(f"{len(measured)} numbers in {seconds:.0f} s on {device} -> {path}")


if __name__ == "__main__":
    main()
