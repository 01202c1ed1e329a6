"""Training datasets over the pairs folder written by the degradation stage.

Layout: ``<pairs_dir>/pairs.csv`` (columns include ``pair_id, split, kind, hr_path,
lr_path``, paths relative to ``pairs_dir``) and the PNGs it names. Items are deterministic
(no random augmentation inside the dataset): with the engine's (seed, epoch)-keyed order,
this is what makes a resumed run bit-identical to an uninterrupted one.
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
