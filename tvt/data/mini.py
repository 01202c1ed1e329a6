"""The mini-mode dataset: wheel-shipped photographs plus rendered text lines and pages, offline.

``build_mini_dataset`` is a pure function of (config, seed, installed packages): every
random choice comes from a generator seeded by (seed, image id), so two builds give the
same bytes, and adding or removing one image changes no other image or split.
"""

from __future__ import annotations

import hashlib
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from tvt.data.manifest import sha256_file, write_manifest
from tvt.data.photos import WHEEL_PHOTOS, folder_photos, load_photo, locate
from tvt.data.text_render import (
    FontSpec,
    fonts_for,
    line_canvas_size,
    line_margin,
    random_line,
    render_text_line,
    render_text_page,
)

TEXT_TEST_SHARE = 0.5  # the fine-structure benchmark needs most of the text lines
BACKGROUNDS = ("plain", "photo")


@dataclass(frozen=True)
class TextItem:
    """One planned text line: everything about it except its random string and backdrop."""

    id: str
    lang: str
    px: int
    font: FontSpec
    background: str  # "plain" | "photo"


def unit_hash(seed: int, item_id: str, salt: str = "") -> float:
    """A stable pseudo-random number in [0, 1) for one image (independent of all others)."""
    digest = hashlib.sha256(f"{seed}/{salt}/{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def photo_split(seed: int, item_id: str, val: float, test: float) -> str:
    """test if h < test, val if h < test + val, else train, with h = unit_hash(seed, id)."""
    h = unit_hash(seed, item_id)
    return "test" if h < test else "val" if h < test + val else "train"


def text_splits(groups: list[list[str]], seed: int, val: float, test: float) -> dict[str, str]:
    """Splits of text lines, stratified so every (language, size) group is in test.

    Rule: in each group, the ``ceil(n * max(test, 1/2))`` ids with the smallest
    ``unit_hash(seed, id)`` go to test, so at least half of the lines of every size and
    language are test lines. The others are val with probability ``val / (1 - test)``
    (the photos' val:train ratio) by an independent hash, else train.
    """
    share = max(test, TEXT_TEST_SHARE)
    val_share = val / (1.0 - test)
    splits = {}
    for ids in groups:
        ranked = sorted(ids, key=lambda i: unit_hash(seed, i))
        n_test = math.ceil(len(ranked) * share)
        for rank, item_id in enumerate(ranked):
            if rank < n_test:
                splits[item_id] = "test"
            else:
                splits[item_id] = "val" if unit_hash(seed, item_id, "val") < val_share else "train"
    return splits


def build_mini_dataset(cfg: dict, out_dir: Path, seed: int) -> Path:
    """Build photos + text lines under ``out_dir`` and return ``out_dir/manifest.csv``.

    ``cfg`` is the ``data`` config section (keys ``photos``, ``text``, ``split``); the
    optional ``photos.extra_dirs`` adds folders of photographs (e.g. Debian wallpapers),
    opt-in because what a folder holds differs between machines.
    """
    out_dir = Path(out_dir)
    val, test = float(cfg["split"]["val"]), float(cfg["split"]["test"])
    if val < 0 or test < 0 or val + test >= 1:
        raise ValueError(f"split fractions val={val}, test={test} must be >= 0 and sum below 1")

    sources = list(WHEEL_PHOTOS)
    for folder in cfg["photos"].get("extra_dirs", []):
        sources += folder_photos(folder)
    text_plan = plan_text_lines(cfg["text"])
    splits = text_splits(_text_groups(text_plan), seed, val, test)

    rows: list[dict] = []
    photos: dict[str, tuple[Image.Image, dict]] = {}
    with tqdm(total=len(sources) + len(text_plan), desc="mini dataset", unit="img") as bar:
        for photo in sources:
            bar.update()
            path = locate(photo)
            if path is None:
                continue
            image = load_photo(path, cfg["photos"]["min_side"], cfg["photos"]["max_side"])
            if image is None:
                continue
            row = _save(image, out_dir, "photos", photo.id, photo_split(seed, photo.id, val, test),
                        source=photo.source, licence=photo.licence, kind="photo")
            rows.append(row)
            photos[photo.id] = (image, row)

        for item in text_plan:
            bar.update()
            rng = random.Random(f"{seed}/{item.id}")
            row = _render_item(item, rng, splits[item.id], photos, cfg["text"]["width"], out_dir)
            rows.append(row)
        rows += _render_pages(cfg["text"], seed, photos, out_dir)

    manifest = write_manifest(rows, out_dir / "manifest.csv")
    _remove_stale_images(out_dir, {row["path"] for row in rows})
    return manifest


def plan_text_lines(text_cfg: dict) -> list[TextItem]:
    """All text lines to render: ``lines_per_size`` per (size, language).

    Fonts cycle with the line index and backgrounds with (line index + size index), so
    every size has every background and, across sizes, every font meets every background.
    Chinese is skipped, with one warning, when no CJK font is installed.
    """
    backgrounds = list(text_cfg["backgrounds"])
    unknown = set(backgrounds) - set(BACKGROUNDS)
    if unknown or not backgrounds:
        raise ValueError(f"text backgrounds {backgrounds} must be a non-empty subset of {BACKGROUNDS}")
    plan = []
    for lang in text_cfg["languages"]:
        fonts = fonts_for(lang)
        if not fonts:
            warnings.warn(f"no font for text language {lang!r} is installed; skipping it "
                          f"(for zh install Debian's fonts-wqy-microhei)", stacklevel=2)
            continue
        for s, px in enumerate(text_cfg["sizes"]):
            for i in range(text_cfg["lines_per_size"]):
                plan.append(TextItem(
                    id=f"text-{lang}-{px:02d}px-{i:03d}", lang=lang, px=px,
                    font=fonts[i % len(fonts)],
                    background=backgrounds[(i + s) % len(backgrounds)],
                ))
    return plan


def _text_groups(plan: list[TextItem]) -> list[list[str]]:
    groups: dict[tuple[str, int], list[str]] = {}
    for item in plan:
        groups.setdefault((item.lang, item.px), []).append(item.id)
    return list(groups.values())


def _render_item(item: TextItem, rng: random.Random, split: str,
                 photos: dict[str, tuple[Image.Image, dict]], width: int, out_dir: Path) -> dict:
    face = item.font.load(item.px)
    text = random_line(rng, item.lang, face, width - 2 * line_margin(item.px))
    source, licence = f"rendered: {item.font.name}", "generated by tvt (no third-party image content)"
    backdrop = None
    if item.background == "photo":
        if not photos:
            raise ValueError(f"{item.id}: photo background requested but no photo is available")
        # Backdrops come from photos of the same split, so no test image shows train pixels.
        same_split = sorted(i for i, (_, row) in photos.items() if row["split"] == split)
        photo_id = rng.choice(same_split or sorted(photos))
        photo, photo_row = photos[photo_id]
        backdrop = _random_crop(photo, line_canvas_size(item.font, item.px, width), rng)
        source += f" on a crop of {photo_id}"
        licence = f"generated by tvt on a crop of {photo_id}: {photo_row['licence']}"
    image = render_text_line(text, item.font, item.px, width, backdrop)
    return _save(image, out_dir, "text", item.id, split, source=source, licence=licence,
                 kind="text", text=text, text_px=item.px, font=item.font.name,
                 lang=item.lang, background=item.background)


def _render_pages(text_cfg: dict, seed: int, photos: dict[str, tuple[Image.Image, dict]], out_dir: Path) -> list[dict]:
    """``train_pages`` pages of stacked lines (sizes over the text sizes' range), train split only.

    Languages and backgrounds cycle with the page index; photo backdrops come from train photos,
    so no page shows a val or test pixel. Strings are salted apart from the text lines' and the
    claims benchmark's (``{seed}/page/...``), and pages use the training fonts only.
    """
    count, side = text_cfg.get("train_pages", 0), text_cfg.get("page_size", 256)
    languages = [lang for lang in text_cfg["languages"] if fonts_for(lang)]
    if not count or not languages:
        return []
    sizes = (min(text_cfg["sizes"]), max(text_cfg["sizes"]))
    train_photos = [photo for _, (photo, row) in sorted(photos.items()) if row["split"] == "train"]
    rows = []
    for i in range(count):
        page_id = f"page-{i:03d}"
        rng = random.Random(f"{seed}/page/{page_id}")
        lang, background = languages[i % len(languages)], text_cfg["backgrounds"][i % len(text_cfg["backgrounds"])]
        backdrops: list[Image.Image | None] = [None]
        if background == "photo" and train_photos:
            backdrops = [_random_crop(rng.choice(train_photos), (side, 64), rng) for _ in range(4)]
        image = render_text_page(rng, lang, fonts_for(lang), sizes, side, backdrops)
        rows.append(_save(image, out_dir, "pages", page_id, "train", source=f"rendered page ({lang})",
                          licence="generated by tvt" + (" on crops of train photos" if background == "photo" else ""),
                          kind="page", lang=lang, background=background))
    return rows


def _random_crop(photo: Image.Image, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A crop of ``size`` at the photo's own scale (upscaled only if the photo is smaller)."""
    scale = max(size[0] / photo.width, size[1] / photo.height, 1.0)
    if scale > 1.0:
        photo = photo.resize((math.ceil(photo.width * scale), math.ceil(photo.height * scale)),
                             Image.Resampling.LANCZOS)
    x = rng.randint(0, photo.width - size[0])
    y = rng.randint(0, photo.height - size[1])
    return photo.crop((x, y, x + size[0], y + size[1]))


def _save(image: Image.Image, out_dir: Path, folder: str, item_id: str, split: str,
          **columns) -> dict:
    relpath = f"{folder}/{item_id}.png"
    path = out_dir / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=6)
    text_only = {"text": "", "text_px": None, "font": "", "lang": "", "background": ""}
    return {"id": item_id, "path": relpath, "width": image.width, "height": image.height,
            "sha256": sha256_file(path), "split": split, **text_only, **columns}


def _remove_stale_images(out_dir: Path, kept: set[str]) -> None:
    """Delete PNGs of an earlier build that this build no longer lists (e.g. fewer sizes)."""
    for folder in ("photos", "text", "pages"):
        for path in (out_dir / folder).glob("*.png"):
            if path.relative_to(out_dir).as_posix() not in kept:
                path.unlink()

