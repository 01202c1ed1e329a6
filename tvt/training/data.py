"""Training datasets over the pairs folder written by the degradation stage.

Layout: ``<pairs_dir>/pairs.csv`` (columns include ``pair_id, split, kind, hr_path,
lr_path``, paths relative to ``pairs_dir``) and the PNGs it names. Items are deterministic
(no random augmentation inside the dataset): with the engine's (seed, epoch)-keyed order,
this is what makes a resumed run bit-identical to an uninterrupted one.

Augmentation happens on the batch instead, inside a stage's step function
(:func:`random_crop_flip`): it draws from torch's global RNG, whose state every engine
checkpoint stores, so a resumed run still draws the same crops. A fresh crop and flip per
sample and step turns a few dozen fixed crops into an effectively unlimited stream of
patches — what the tiny autoencoders of mini mode need to learn more than their training set.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

PAIRS_FILE = "pairs.csv"
SPLITS = ("train", "val", "test")


def load_image(path: Path) -> torch.Tensor:
    """An RGB image file as a float (3, H, W) tensor in [-1, 1] (the range SD's VAE expects)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


class PairDataset(Dataset):
    """One split of a pairs folder: items ``{"hr", "lr", "pair_id"}`` (``lr`` only if ``with_lr``).

    Training uses the photo crops only (``kinds``), as the paper trains on LSDIR/FFHQ photos:
    all crops share one size, so they batch; the rendered text lines keep their own sizes and
    stay a held-out fine-structure benchmark.
    """

    def __init__(self, pairs_dir: Path, split: str, *, with_lr: bool = True, kinds: tuple[str, ...] = ("photo",)):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        self.root = Path(pairs_dir)
        table = self.root / PAIRS_FILE
        if not table.is_file():
            raise FileNotFoundError(f"{table} not found: run the 'degrade' stage first")
        with open(table, newline="", encoding="utf-8") as fh:
            self.rows = [row for row in csv.DictReader(fh) if row["split"] == split and row["kind"] in kinds]
        if not self.rows:
            raise ValueError(f"{table}: no pairs of kind {'/'.join(kinds)} in split {split!r}")
        self.split = split
        self.with_lr = with_lr

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        item = {"hr": load_image(self.root / row["hr_path"]), "pair_id": row["pair_id"]}
        if self.with_lr:
            item["lr"] = load_image(self.root / row["lr_path"])
        return item


def random_crop_flip(*images: torch.Tensor, size: int | None, flip: bool = True) -> tuple[torch.Tensor, ...]:
    """A random ``size``² window (at the first batch's resolution) and a random horizontal flip,
    drawn per sample and applied alike to every aligned batch given (HR, and LR at 1/scale).

    ``size=None`` keeps the whole image (only the flip). Windows of a lower-resolution batch
    start at the same scene point: HR offsets are drawn on the grid of the scale factor.
    """
    first = images[0]
    height, width = first.shape[-2:]
    size = size or min(height, width)
    if size > min(height, width):
        raise ValueError(f"crop_size {size} exceeds the training images ({height}x{width})")
    scales = []
    for image in images:
        factor = height // image.shape[-2]
        if factor * image.shape[-2] != height or factor * image.shape[-1] != width or size % factor:
            raise ValueError(f"random_crop_flip: {tuple(image.shape[-2:])} is not {height}x{width} / an integer "
                             f"factor dividing crop size {size}")
        scales.append(factor)
    step = max(scales)
    n = len(first)
    ys = torch.randint(0, (height - size) // step + 1, (n,)).tolist()
    xs = torch.randint(0, (width - size) // step + 1, (n,)).tolist()
    flips = (torch.rand(n) < 0.5).tolist() if flip else [False] * n
    out = []
    for image, factor in zip(images, scales):
        side = size // factor
        crops = [image[i, :, y * step // factor:y * step // factor + side, x * step // factor:x * step // factor + side]
                 for i, (y, x) in enumerate(zip(ys, xs))]
        out.append(torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flips)]))
    return tuple(out)
