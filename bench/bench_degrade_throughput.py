"""Online degradation throughput: training pairs per second at 512², per loader worker (CPU core).

What a training run's loader delivers with ``data: online`` (tvt/training/data.py
``OnlinePairDataset``): decode a source photo, draw its (seed, epoch, index) recipe, crop, flip,
Real-ESRGAN second-order degradation, ``resize_bak`` to 512², 8-bit LR — everything on the CPU
(the loader path; the GPU path defers blur/noise/JPEG to the training process). Rows compare 1 and
N workers side by side in one run, for the OSEDiff/TVT ``degrade`` block and StableSR's
``stablesr.degrade`` (USM ground truth included), so the docs can say how many workers keep a
GPU fed: workers needed = GPU steps/s x batch per GPU / (pairs/s per worker).

    python bench/bench_degrade_throughput.py [--workers 1 2] [--pairs 24] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from tvt.data.manifest import sha256_file, write_manifest
from tvt.data.photos import WHEEL_PHOTOS, locate
from tvt.training.data import OnlinePairDataset, degrade_batch

PAPER = Path(__file__).resolve().parents[1] / "config" / "paper.yaml"
SOURCE_SIDE = 640  # a source larger than the 512² crop, so the random crop has room (LSDIR photos are ~2K)


def make_manifest(folder: Path, count: int) -> Path:
    """``count`` wheel photos resized to SOURCE_SIDE², as training sources of one split."""
    (folder / "images").mkdir(parents=True)
    rows = []
    photos = [p for p in WHEEL_PHOTOS if locate(p) is not None]
    for i in range(count):
        with Image.open(locate(photos[i % len(photos)])) as image:
            image = image.convert("RGB").resize((SOURCE_SIDE, SOURCE_SIDE), Image.Resampling.BICUBIC)
        path = folder / "images" / f"src{i:03d}.png"
        image.save(path)
        rows.append(
            {
                "id": path.stem,
                "path": f"images/{path.name}",
                "width": SOURCE_SIDE,
                "height": SOURCE_SIDE,
                "sha256": sha256_file(path),
                "split": "train",
                "source": "bench",
                "kind": "photo",
            }
        )
    return write_manifest(rows, folder / "manifest.csv", columns=tuple(rows[0]))


def pairs_per_second(data: OnlinePairDataset, workers: int, epoch: int) -> float:
    """Pairs/s over one epoch after the first batch (worker start-up and imports excluded)."""
    data.set_epoch(epoch)
    loader = DataLoader(data, batch_size=1, num_workers=workers, prefetch_factor=2 if workers else None)
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    count = sum(1 for _ in batches)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pairs", type=int, default=24, help="items per epoch (one timed pass each)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved passes per row; the best is kept")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loader's workers are single-threaded too (degradation pins it)
    paper = yaml.safe_load(PAPER.read_text())
    blocks = {"osediff/tvt degrade": paper["degrade"], "stablesr.degrade": paper["stablesr"]["degrade"]}

    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_manifest(Path(tmp), args.pairs + 1)
        header = f"{'block':<20} {'workers':>7} {'pairs/s':>8} {'per worker':>10} {'ms/pair/core':>12} {'vs 1':>6}"
        print(f"512² crops from {SOURCE_SIDE}² PNG sources, batch 1, best of {args.repeats} interleaved passes\n")
        print(header)
        print("-" * len(header))
        for name, block in blocks.items():
            data = OnlinePairDataset(manifest, {**block, "hr_size": 512}, seed=0)
            best = dict.fromkeys(args.workers, 0.0)
            for repeat in range(args.repeats):  # interleaved, so both see the same machine load
                for workers in args.workers:
                    best[workers] = max(best[workers], pairs_per_second(data, workers, epoch=repeat))
            for workers, rate in best.items():
                per_worker = rate / workers
                print(
                    f"{name:<20} {workers:>7} {rate:>8.2f} {per_worker:>10.2f} {1000 / per_worker:>12.0f} "
                    f"{rate / best[args.workers[0]]:>6.2f}"
                )
        print(
            "\nOne worker is one CPU core (the degradation runs single-threaded). Loader workers per GPU to keep "
            "it fed: GPU steps/s x batch per GPU / (pairs/s per worker)."
        )
        if torch.cuda.is_available():  # the GPU path: the loader only crops, the training process degrades
            deferred = OnlinePairDataset(
                manifest, {**blocks["osediff/tvt degrade"], "hr_size": 512}, seed=0, degrade=False
            )
            batch = default_collate([deferred[i] for i in range(min(8, len(deferred)))])
            degrade_batch(batch, "cuda")  # warm-up: kernels, DiffJPEG on the device
            torch.cuda.synchronize()
            start = time.perf_counter()
            degrade_batch(batch, "cuda")
            torch.cuda.synchronize()
            print(f"GPU degrade_batch: {len(batch['recipe']) / (time.perf_counter() - start):.1f} pairs/s")


if __name__ == "__main__":
    main()
