"""Throughput of LR/HR pair synthesis (Real-ESRGAN degradation + PNG I/O), 1 vs N workers.

Each row runs ``synthesize_pairs`` on the same synthetic photos (one crop each, the photo
being exactly ``hr_size``) once in-process and once with a process pool, and checks that both
runs wrote byte-identical pairs. The fork server is started once before timing; its start-up
cost is reported separately.

    python bench/bench_degradation.py [--sizes 128 256 512] [--workers 2] [--seconds 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

os.environ.setdefault("TQDM_DISABLE", "1")  # a table, not progress bars

from tvt.data.manifest import sha256_file, write_manifest
from tvt.degradation import synthesize_pairs

CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"
# Rough serial cost per image on one core, to size each row to about --seconds.
SECONDS_PER_IMAGE = {128: 0.03, 256: 0.1, 512: 0.45}


def make_manifest(folder: Path, size: int, count: int) -> Path:
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(size)
    rows = []
    for i in range(count):
        # Smooth gradients plus texture: roughly photo-like PNG and unique-value statistics.
        yy, xx = np.mgrid[:size, :size] / size
        base = np.stack([yy, xx, (yy + xx) / 2], -1) * 200
        pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / "images" / f"img{i:03d}.png"
        Image.fromarray(pixels).save(path)
        rows.append({"id": path.stem, "path": f"images/{path.name}", "sha256": sha256_file(path),
                     "split": "train", "kind": "photo"})
    return write_manifest(rows, folder / "manifest.csv", columns=tuple(rows[0]))


def timed_run(manifest: Path, out_dir: Path, cfg: dict, workers: int) -> tuple[float, float, bytes]:
    """Wall seconds, this process's CPU seconds (all of it when workers == 1), pairs.csv."""
    wall, cpu = time.perf_counter(), time.process_time()
    pairs_csv = synthesize_pairs(manifest, out_dir, cfg, seed=0, workers=workers)
    return time.perf_counter() - wall, time.process_time() - cpu, pairs_csv.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0, help="target serial time per row")
    args = parser.parse_args()
    base = yaml.safe_load(CONFIG.read_text())["degrade"]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        warm = make_manifest(tmp / "warm", 64, 2)
        start = time.perf_counter()
        synthesize_pairs(warm, tmp / "warm" / "out", {**base, "hr_size": 64}, seed=0, workers=args.workers)
        print(f"fork-server start-up (imports torch + basicsr once): {time.perf_counter() - start:.1f} s\n")

        parallel_title = f"{args.workers} workers img/s"
        header = (f"{'hr_size':>7} {'images':>6} {'CPU ms/img':>10} {'1 worker img/s':>15} "
                  f"{parallel_title:>16} {'speed-up':>8}")
        print(header)
        print("-" * len(header))
        for size in args.sizes:
            count = max(4, round(args.seconds / SECONDS_PER_IMAGE.get(size, 0.45 * (size / 512) ** 2)))
            cfg = {**base, "hr_size": size, "crops_per_image": 1}
            manifest = make_manifest(tmp / f"s{size}", size, count)
            serial, cpu, serial_csv = timed_run(manifest, tmp / f"s{size}" / "w1", cfg, 1)
            parallel, _, parallel_csv = timed_run(manifest, tmp / f"s{size}" / "wn", cfg, args.workers)
            if serial_csv != parallel_csv:
                raise SystemExit(f"hr_size {size}: outputs differ between 1 and {args.workers} workers")
            print(f"{size:>7} {count:>6} {1000 * cpu / count:>10.0f} {count / serial:>15.1f} {count / parallel:>16.1f} "
                  f"{serial / parallel:>7.2f}x")
        print(f"\nCPU cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; outputs identical for 1 and "
              f"{args.workers} workers. Speed-ups need idle cores; CPU ms/img does not.")


if __name__ == "__main__":
    main()
