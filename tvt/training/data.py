"""Training datasets: fixed pairs written by the degradation stage, or pairs degraded online.

Layout: ``<pairs_dir>/pairs.csv`` (columns include ``pair_id, split, kind, hr_path,
lr_path``, paths relative to ``pairs_dir``) and the PNGs it names. Items are deterministic
(no random augmentation inside the dataset): with the engine's (seed, epoch)-keyed order,
this is what makes a resumed run bit-identical to an uninterrupted one.

Augmentation happens on the batch instead, inside a stage's step function
(:func:`random_crop_flip`): it draws from torch's global RNG, whose state every engine
checkpoint stores, so a resumed run still draws the same crops. A fresh crop and flip per
sample and step turns a few dozen fixed crops into an effectively unlimited stream of
patches — what the tiny autoencoders of mini mode need to learn more than their training set.

:class:`OnlinePairDataset` is the official ISR recipe instead: each draw of a training image
gets a fresh crop, flip and Real-ESRGAN degradation (:func:`tvt.degradation.sample_online`),
keyed on (seed, epoch, index) — a pure function, so loader workers, restarts and skipped
batches cannot change what a step sees.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tvt.data.manifest import TRAINING_KINDS, read_manifest
from tvt.degradation import (
    crop_flip,
    degrade_online,
    image_seed,
    online_seed,
    sample_online,
    validate_config,
)

PAIRS_FILE = "pairs.csv"
SPLITS = ("train", "val", "test")


def load_image(path: Path) -> torch.Tensor:
    """An RGB image file as a float (3, H, W) tensor in [-1, 1] (the range SD's VAE expects)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


_NO_FIXED_TRAIN = (": the degrade stage writes fixed train pairs only for a config whose trainers read them "
                   "(tvt.stages.fixed_train_pairs); set the trainer's `data: fixed` (isr.<name>.data, "
                   "stablesr.sft.data, stablesr.cfw.data) and rerun its degrade stage, or keep `data: online`")


class PairDataset(Dataset):
    """One split of a pairs folder: items ``{"hr", "lr", "pair_id"}`` (``lr`` only if ``with_lr``).

    Training uses the photo crops (``kinds``), as the paper trains on LSDIR/FFHQ photos, and in
    mini mode the crops of rendered text pages (``data.text.train_pages``): all crops share one
    size, so they batch; the rendered text lines keep their own sizes and stay a held-out
    fine-structure benchmark.
    """

    def __init__(self, pairs_dir: Path, split: str, *, with_lr: bool = True, kinds: tuple[str, ...] = TRAINING_KINDS):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        self.root = Path(pairs_dir)
        table = self.root / PAIRS_FILE
        if not table.is_file():
            raise FileNotFoundError(f"{table} not found: run the 'degrade' stage first")
        with open(table, newline="", encoding="utf-8") as fh:
            self.rows = [row for row in csv.DictReader(fh) if row["split"] == split and row["kind"] in kinds]
        if not self.rows:
            raise ValueError(f"{table}: no pairs of kind {'/'.join(kinds)} in split {split!r}"
                             + (_NO_FIXED_TRAIN if split == "train" else ""))
        if with_lr and any(not row["lr_path"] for row in self.rows):
            raise ValueError(f"{table}: split {split!r} holds HR crops only (no LR degraded)" + _NO_FIXED_TRAIN)
        self.split = split
        self.with_lr = with_lr

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def pair_ids(self) -> list[str]:
        return [row["pair_id"] for row in self.rows]

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


ONLINE_CROPS = ("random", "window", "resize")
"""How a training source becomes HR crops (``data.datasets.<name>.train_crop.mode``): ``random`` a
fresh window per draw; ``window`` every ``size``² window at ``stride`` (TVT's LSDIR: README
"Train TVTSR", Step 1, stride 64), one item each; ``resize`` the whole image resized to ``size``²
(TVT's FFHQ, same step)."""


def _window_grid(width: int, height: int, size: int, stride: int) -> tuple[int, int]:
    """Windows per row and column of a ``size``² sliding window at ``stride`` (none where it does not fit)."""
    if width < size or height < size:
        return 0, 0
    return (width - size) // stride + 1, (height - size) // stride + 1


class OnlinePairDataset(Dataset):
    """Training pairs degraded online from the data manifest's training photos.

    Item ``index`` of epoch ``e`` (set by the engine through :meth:`set_epoch`) is
    ``{"hr", "lr", "lr_up", "pair_id", "recipe"}``: the HR crop in [-1, 1], its LR at 1/scale and
    the LR brought back to the HR size (``resize_bak``, what the official generator is fed), and
    the JSON recipe that :meth:`replay` turns into the same tensors. With ``degrade=False`` the
    loader only crops and flips: the item carries the uint8 crop (``hr_u8``) in place of ``hr``, and
    :func:`degrade_batch` applies the recipe (USM, blur, noise, JPEG) on the training process's GPU.

    ``crops`` maps a manifest ``source`` (a dataset name in paper mode) to its
    ``{"mode": ONLINE_CROPS, "stride": int}``; unnamed sources crop at random.
    """

    def __init__(self, manifest: Path, cfg: Mapping, seed: int, *, crops: Mapping[str, Mapping] | None = None,
                 degrade: bool = True):
        validate_config(cfg)
        manifest = Path(manifest)
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found: run the 'data' stage first")
        self.root, self.cfg, self.seed, self.degrade = manifest.parent, dict(cfg), int(seed), degrade
        self.size, self.scale = cfg["hr_size"], cfg["scale"]
        self.rows = [r for r in read_manifest(manifest) if r["split"] == "train" and r["kind"] in TRAINING_KINDS]
        crops = crops or {}
        self.modes, counts = [], []
        for row in self.rows:
            spec = dict(crops.get(row.get("source"), {}))
            mode = spec.get("mode", "random")
            if mode not in ONLINE_CROPS:
                raise ValueError(f"train_crop.mode of {row.get('source')!r}: {mode!r} is not one of {ONLINE_CROPS}")
            grid = (1, 1)
            if mode == "window":
                grid = _window_grid(row["width"], row["height"], self.size, spec.get("stride", 64))
            self.modes.append((mode, spec.get("stride", 64), grid))
            counts.append(grid[0] * grid[1])
        self.ends = np.cumsum(counts)
        if not len(self.rows) or self.ends[-1] == 0:
            raise ValueError(f"{manifest}: no training photo gives a {self.size}² crop")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.ends[-1])

    def _source(self, index: int) -> tuple[dict, np.ndarray]:
        """The manifest row of item ``index`` and the uint8 region its crops are drawn from."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        r = int(np.searchsorted(self.ends, index, side="right"))
        row, (mode, stride, (nx, _)) = self.rows[r], self.modes[r]
        with Image.open(self.root / row["path"]) as opened:
            image = opened.convert("RGB")
        if mode == "resize":  # TVT resizes FFHQ; its own transforms (build_transform) resize with Lanczos
            image = image.resize((self.size, self.size), Image.Resampling.LANCZOS)
        elif mode == "random" and min(image.size) < self.size:  # as the degrade stage: short side up to size
            short = min(image.size)
            image = image.resize((max(self.size, round(image.width * self.size / short)),
                                  max(self.size, round(image.height * self.size / short))),
                                 Image.Resampling.BICUBIC)
        pixels = np.asarray(image)
        if mode == "window":
            j = index - (int(self.ends[r - 1]) if r else 0)
            y, x = (j // nx) * stride, (j % nx) * stride
            pixels = pixels[y:y + self.size, x:x + self.size]
        return row, pixels

    def recipe(self, index: int, epoch: int | None = None) -> dict:
        """Every random choice of item ``index`` in ``epoch`` (default: the current one)."""
        return self._recipe(index, self.epoch if epoch is None else int(epoch), *self._source(index))

    def _recipe(self, index: int, epoch: int, row: dict, pixels: np.ndarray) -> dict:
        crop_range = (pixels.shape[0] - self.size + 1, pixels.shape[1] - self.size + 1)
        recipe = sample_online(self.cfg, online_seed(self.seed, epoch, index), crop_range=crop_range)
        return {"source_id": row["id"], "epoch": epoch, "index": int(index), **recipe}

    def replay(self, recipe: Mapping) -> dict:
        """The item a recipe describes (e.g. one read back from a log), recomputed from its source."""
        _, pixels = self._source(recipe["index"])
        return self._item(pixels, recipe, degrade=True)

    def _item(self, pixels: np.ndarray, recipe: Mapping, degrade: bool) -> dict:
        hr = torch.tensor(crop_flip(pixels, recipe, self.size)).permute(2, 0, 1).contiguous()
        item = {"recipe": json.dumps(recipe, sort_keys=True), "pair_id": self.pair_id(recipe["index"], recipe["epoch"])}
        if not degrade:
            return {**item, "hr_u8": hr}
        hr, lr, lr_up = degrade_online(hr[None].float() / 255.0, recipe)
        return {**item, "hr": hr[0] * 2 - 1, "lr": lr[0] * 2 - 1, "lr_up": lr_up[0] * 2 - 1}

    def __getitem__(self, index: int) -> dict:
        return self.draw(index, self.epoch)

    def draw(self, index: int, epoch: int) -> dict:
        """Item ``index`` as epoch ``epoch`` draws it, whatever the current epoch."""
        row, pixels = self._source(index)
        return self._item(pixels, self._recipe(index, int(epoch), row, pixels), self.degrade)

    def pair_id(self, index: int, epoch: int) -> str:
        """The ``pair_id`` of item ``index`` in ``epoch``, without reading or degrading its image."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        row = self.rows[int(np.searchsorted(self.ends, index, side="right"))]
        return f"{row['id']}@e{int(epoch)}i{int(index)}"


class OnlineDraws(Dataset):
    """A fixed, bounded set of ``count`` draws of an :class:`OnlinePairDataset`, in shuffled order.

    What StableSR's CFW data generation takes from its online dataset (``scripts/generate_vqgan_data.py``
    ``main``: a shuffled ``DataLoader`` over ``RealESRGANDataset``, stopped after a bounded number of
    samples). Draw ``k`` is item ``order[k % n]`` of epoch ``k // n`` (``n`` items, one permutation per
    epoch, seeded by ``seed``), so a count beyond one pass draws fresh crops and degradations of the same
    photos. Each draw is a pure function of (seed, k): nothing is stored, an item is recomputed (or
    replayed from its ``recipe``) bit-identically, and :meth:`recipes` lists them all for the record.
    There is no ``set_epoch``: the engine's epochs revisit the same draws, as StableSR's CFW training
    reads the same generated set every epoch.
    """

    def __init__(self, online: OnlinePairDataset, count: int, seed: int):
        if count < 1:
            raise ValueError(f"OnlineDraws: count must be at least 1, got {count}")
        self.online, self.count = online, int(count)
        n, epochs = len(online), -(-int(count) // len(online))
        orders = [np.random.default_rng(image_seed(seed, f"draws/epoch{e}")).permutation(n) for e in range(epochs)]
        self.draws = [(k // n, int(orders[k // n][k % n])) for k in range(self.count)]  # (epoch, index)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> dict:
        epoch, index = self.draws[k]
        return self.online.draw(index, epoch)

    @property
    def pair_ids(self) -> list[str]:
        return [self.online.pair_id(index, epoch) for epoch, index in self.draws]

    def recipes(self) -> list[dict]:
        """Every draw's recipe (reads each source photo, degrades nothing)."""
        return [self.online.recipe(index, epoch) for epoch, index in self.draws]


class OnlineCrops(Dataset):
    """The HR side of an :class:`OnlinePairDataset` built with ``degrade=False``: a fresh crop and flip of a
    training image per draw, keyed on (seed, epoch, index), in [-1, 1] as :class:`PairDataset` gives it.
    What an autoencoder trains on (``prior.vae.data: online``): it needs no LR, so nothing is degraded."""

    def __init__(self, online: OnlinePairDataset):
        if online.degrade:
            raise ValueError("OnlineCrops reads the uint8 crops of an OnlinePairDataset built with degrade=False")
        self.online = online

    def set_epoch(self, epoch: int) -> None:
        self.online.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.online)

    def __getitem__(self, index: int) -> dict:
        item = self.online[index]
        return {"hr": item["hr_u8"].float() / 127.5 - 1.0, "pair_id": item["pair_id"]}


def degrade_batch(batch: Mapping, device: torch.device | str) -> dict:
    """Add ``lr``/``lr_up`` to a batch of :class:`OnlinePairDataset` built with ``degrade=False``, applying each
    sample's recipe on ``device`` (Real-ESRGAN degrades its batches on the GPU: ``RealESRGANModel.feed_data``).
    A batch that has them already is returned as it is."""
    if "lr" in batch:
        return dict(batch)
    hr = batch["hr_u8"].to(device).float() / 255.0
    done = [degrade_online(hr[i:i + 1], json.loads(r)) for i, r in enumerate(batch["recipe"])]
    hr, lr, lr_up = (torch.cat(parts) * 2 - 1 for parts in zip(*done))
    return {**batch, "hr": hr, "lr": lr, "lr_up": lr_up}


def online_manifest(data_dir: Path | None, section: str) -> Path:
    """The data stage's manifest that ``<section>.data: online`` trains from (named in the error if absent)."""
    if data_dir is None:
        raise ValueError(f"{section}.data: online needs the data stage's folder (its manifest.csv)")
    manifest = Path(data_dir) / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{section}.data: online: {manifest} not found; run the 'data' stage first")
    return manifest


def online_dataset(cfg: Mapping, degrade_cfg: Mapping, manifest: Path, *, degrade_in_loader: bool) -> OnlinePairDataset:
    """The online training set of a stage: ``degrade_cfg`` (``degrade`` or ``stablesr.degrade``) on the
    manifest's training photos, cropped per dataset as ``data.datasets.<name>.train_crop`` says."""
    crops = {name: spec["train_crop"] for name, spec in cfg["data"].get("datasets", {}).items()
             if "train_crop" in spec}
    return OnlinePairDataset(manifest, degrade_cfg, cfg["seed"], crops=crops, degrade=degrade_in_loader)
