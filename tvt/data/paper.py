"""Paper-mode dataset: a manifest over the verified downloads in ``resources/datasets``,
and the table of the REAL test pairs.

A test dataset is either

* ``pairing: synthetic`` (the default; DIV2K-val, Urban100): HR images only. They go into
  ``manifest.csv`` like the training sets (LSDIR, FFHQ) and the degradation stage
  synthesises their LR with the Real-ESRGAN pipeline; or
* ``pairing: paired`` (RealSR, DRealSR, Real-CE): the LR was taken by a real camera. Running
  it through the synthetic degradation would test something else, so these sets bypass the
  manifest and are listed, LR and HR together, in ``real_pairs.csv`` (:data:`REAL_PAIR_COLUMNS`,
  the degradation stage's pair columns plus ``source`` and ``lines``), which the evaluation
  scores next to the synthetic test pairs.

Where the LR and HR of a paired set live is config (``pairs.lr`` / ``pairs.hr``: globs under
the dataset's download folder); they are matched by file stem, after an optional regex
rename of the LR stem (``pairs.lr_stem: [pattern, replacement]``, e.g. RealSR V3's
``Canon_001_LR4`` -> ``Canon_001_HR``). Every HR must be exactly ``pairs.scale`` times its
LR (StableSR's crops: 128² -> 512²), unless ``pairs.lr_resize`` says that the LR camera image
is registered to the HR at the HR's size, as in Real-CE (13 mm = LR, 52 mm = HR): then the
LR is resized to HR / scale with OpenCV's bicubic, which is Real-CE's own protocol
(``cv2.INTER_CUBIC``; the HR is cropped to a multiple of the scale).

Scene-text sets carry text-line annotations (``pairs.annotations``, a glob with ``{stem}``):
ICDAR-style lines ``x1,y1,x2,y2,x3,y3,x4,y4,transcription`` in HR pixels (Real-CE's
``annos/<name>.txt``, GBK-encoded). They are kept per pair as JSON in the ``lines`` column
(axis-aligned box, text, language, line size in px) so that the evaluation can read every
line of the restored image with OCR, like the mini mode's rendered lines. Transcriptions
``###`` (ICDAR's "illegible") and empty ones are skipped.

Images are referenced where the download stage put them (paths relative to the table),
never copied; only LR images resized here (and HR crops to a multiple of the scale) are
written, under ``real/<dataset>/``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from tvt.data.manifest import sha256_file, write_manifest

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
MANIFEST_FILE = "manifest.csv"
REAL_PAIRS_FILE = "real_pairs.csv"
REAL_PAIR_COLUMNS = (
    "pair_id", "source_id", "source", "split", "kind", "hr_path", "lr_path", "hr_sha256", "lr_sha256",
    "width", "height", "text", "text_px", "lang", "font", "lines",
)
"""Columns of ``real_pairs.csv``: pairs.csv's keys the evaluation reads, ``source`` (the
dataset), HR ``width``/``height``, and ``lines`` (JSON text-line annotations, or empty)."""

ILLEGIBLE = "###"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


class DatasetLayoutError(ValueError):
    """A downloaded dataset does not match the layout its config declares; the message names the key."""


def dataset_images(root: Path, limit: int | None = None) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return files[:limit] if limit else files


def image_id(dataset: str, rel: str) -> str:
    """``<dataset>-<path without suffix, '/' -> '__'>``, usable as a file name (the degradation
    stage names its pairs after it); characters outside ``[A-Za-z0-9._-]`` become ``_``."""
    return _UNSAFE.sub("_", f"{dataset}-{rel.replace('/', '__')}")


def is_paired(spec: Mapping) -> bool:
    return spec.get("pairing", "synthetic") == "paired"


# ------------------------------------------------------------------------------------------
# Real pairs
# ------------------------------------------------------------------------------------------


def _few(items: list[str], k: int = 3) -> str:
    return ", ".join(items[:k]) + (f", … ({len(items)} in all)" if len(items) > k else "")


def _glob_images(root: Path, pattern: str, key: str) -> list[Path]:
    files = sorted(p for p in root.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetLayoutError(f"{key}: {pattern!r} matches no image under {root}")
    return files


def _by_key(files: list[Path], root: Path, key_of, key: str) -> dict[str, Path]:
    table: dict[str, Path] = {}
    clashes = []
    for path in files:
        k = key_of(path.stem)
        if k in table:
            clashes.append(f"{table[k].relative_to(root)} / {path.relative_to(root)}")
        table[k] = path
    if clashes:
        raise DatasetLayoutError(f"{key}: several images share a stem, so pairs are ambiguous: {_few(clashes)}")
    return table


def match_pairs(name: str, root: Path, pairs: Mapping) -> list[tuple[str, Path, Path]]:
    """``(HR stem, LR path, HR path)`` for every pair of a paired dataset, sorted by stem.

    Raises DatasetLayoutError listing a few offenders when a glob matches nothing, a stem
    repeats, or an LR has no HR partner (or the other way round).
    """
    key = f"data.datasets.{name}.pairs"
    rename = pairs.get("lr_stem")
    lr_key = (lambda stem: re.sub(rename[0], rename[1], stem)) if rename else (lambda stem: stem)
    lr = _by_key(_glob_images(root, pairs["lr"], f"{key}.lr"), root, lr_key, f"{key}.lr")
    hr = _by_key(_glob_images(root, pairs["hr"], f"{key}.hr"), root, lambda stem: stem, f"{key}.hr")
    lonely_lr, lonely_hr = sorted(lr.keys() - hr.keys()), sorted(hr.keys() - lr.keys())
    if lonely_lr or lonely_hr:
        how = f"by file stem after lr_stem {rename}" if rename else "by file stem"
        problems = []
        if lonely_lr:
            problems.append(f"{len(lonely_lr)} LR image(s) without an HR partner: "
                            + _few([str(lr[k].relative_to(root)) for k in lonely_lr]))
        if lonely_hr:
            problems.append(f"{len(lonely_hr)} HR image(s) without an LR partner: "
                            + _few([str(hr[k].relative_to(root)) for k in lonely_hr]))
        raise DatasetLayoutError(f"{key}: LR and HR are matched {how}; " + "; ".join(problems))
    return [(k, lr[k], hr[k]) for k in sorted(hr)]


def read_annotations(path: Path, encoding: str, size: tuple[int, int]) -> list[dict]:
    """Text lines of one image: ``{"box": [x0, y0, x1, y1], "text", "lang", "px"}`` with the
    axis-aligned box of each quadrilateral clipped to ``size`` (HR width, height) and ``px``
    the box's short side (the line's text size)."""
    width, height = size
    lines = []
    try:
        content = path.read_text(encoding=encoding)
    except (UnicodeDecodeError, LookupError) as exc:
        raise DatasetLayoutError(f"{path}: cannot read as {encoding!r} text ({exc})") from None
    for number, raw in enumerate(content.splitlines(), start=1):
        raw = raw.strip().lstrip("\ufeff")
        if not raw:
            continue
        items = raw.split(",")
        try:
            coords = [float(v) for v in items[:8]]
        except ValueError:
            coords = []
        if len(items) < 9 or len(coords) != 8:
            raise DatasetLayoutError(f"{path}, line {number}: expected 'x1,y1,x2,y2,x3,y3,x4,y4,text', got {raw!r}")
        text = ",".join(items[8:]).strip()
        if not text or text == ILLEGIBLE:
            continue
        xs, ys = coords[0::2], coords[1::2]
        x0, y0 = max(0, math.floor(min(xs))), max(0, math.floor(min(ys)))
        x1, y1 = min(width, math.ceil(max(xs))), min(height, math.ceil(max(ys)))
        if x1 - x0 < 2 or y1 - y0 < 2:  # outside the (cropped) image
            continue
        lines.append({"box": [x0, y0, x1, y1], "text": text, "lang": "zh" if _CJK.search(text) else "en",
                      "px": min(x1 - x0, y1 - y0)})
    return lines


def _annotation_file(root: Path, template: str, stem: str, key: str) -> Path:
    found = sorted(root.glob(template.replace("{stem}", glob.escape(stem))))
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({_few([str(p.relative_to(root)) for p in found])})"
        raise DatasetLayoutError(f"{key}: {what} for image {stem!r} under {root} ({template!r})")
    return found[0]


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def real_pairs(name: str, spec: Mapping, root: Path, out_dir: Path) -> list[dict]:
    """The ``real_pairs.csv`` rows of one paired test dataset (see the module docstring)."""
    import cv2

    pairs, key = spec["pairs"], f"data.datasets.{name}.pairs"
    scale, resize = pairs["scale"], pairs.get("lr_resize", False)
    matched = match_pairs(name, root, pairs)[: spec.get("limit")]
    rows, wrong_scale = [], []
    for stem, lr_file, hr_file in tqdm(matched, desc=f"pair {name}", unit="pair"):
        pair_id = image_id(name, stem)
        with Image.open(hr_file) as hr_im, Image.open(lr_file) as lr_im:
            hr_size, lr_size = hr_im.size, lr_im.size
            if resize:
                width, height = hr_size[0] // scale * scale, hr_size[1] // scale * scale
                if not width or not height:
                    wrong_scale.append(f"{hr_file.relative_to(root)} {hr_size[0]}×{hr_size[1]} < scale")
                    continue
                lr_pixels = cv2.resize(np.asarray(lr_im.convert("RGB")), (width // scale, height // scale),
                                       interpolation=cv2.INTER_CUBIC)
                lr_file = out_dir / "real" / name / "lr" / f"{pair_id}.png"
                _save_png(lr_pixels, lr_file)
                if (width, height) != hr_size:
                    cropped = np.asarray(hr_im.convert("RGB"))[:height, :width]
                    hr_file = out_dir / "real" / name / "hr" / f"{pair_id}.png"
                    _save_png(cropped, hr_file)
                hr_size = (width, height)
            elif hr_size != (lr_size[0] * scale, lr_size[1] * scale):
                wrong_scale.append(f"{hr_file.relative_to(root)} is {hr_size[0]}×{hr_size[1]}, its LR "
                                   f"{lr_file.relative_to(root)} {lr_size[0]}×{lr_size[1]}")
                continue
        lines = None
        if pairs.get("annotations"):
            anno = _annotation_file(root, pairs["annotations"], stem, f"{key}.annotations")
            lines = read_annotations(anno, pairs.get("annotation_encoding", "utf-8"), hr_size)
        langs = {line["lang"] for line in lines or ()}
        rows.append({
            "pair_id": pair_id, "source_id": pair_id, "source": name, "split": "test",
            "kind": "text" if lines is not None else "photo",
            "hr_path": Path(os.path.relpath(hr_file, out_dir)).as_posix(),
            "lr_path": Path(os.path.relpath(lr_file, out_dir)).as_posix(),
            "hr_sha256": sha256_file(hr_file), "lr_sha256": sha256_file(lr_file),
            "width": hr_size[0], "height": hr_size[1], "text": "", "text_px": None,
            "lang": "zh" if "zh" in langs else "en" if langs else "", "font": "",
            "lines": "" if lines is None else json.dumps(lines, ensure_ascii=False, separators=(",", ":")),
        })
    if wrong_scale:
        raise DatasetLayoutError(f"{key}.scale: every HR must be {scale}× its LR in width and height; "
                                 f"{len(wrong_scale)} pair(s) are not: {_few(wrong_scale)}")
    return rows


# ------------------------------------------------------------------------------------------
# The data stage
# ------------------------------------------------------------------------------------------


def _manifest_rows(name: str, spec: Mapping, root: Path, out_dir: Path) -> list[dict]:
    split = "train" if spec["role"] == "train" else "test"
    rows = []
    for path in tqdm(dataset_images(root, spec.get("limit")), desc=f"index {name}", unit="img"):
        with Image.open(path) as im:
            width, height = im.size
        rel = path.relative_to(root).with_suffix("").as_posix()
        rows.append({
            "id": image_id(name, rel), "path": Path(os.path.relpath(path, out_dir)).as_posix(),
            "width": width, "height": height, "sha256": sha256_file(path), "split": split,
            "source": name, "licence": spec.get("licence", "see dataset page"), "kind": "photo",
            "text": "", "text_px": None, "font": "", "lang": "", "background": "",
        })
    for row in held_out(rows, spec.get("val_images", 0)):
        row["split"] = "val"
    return rows


def held_out(rows: list[dict], count: int) -> list[dict]:
    """The ``count`` rows whose ids hash lowest: a validation set that neither the listing order
    nor later additions to the dataset reshuffle (the official training loops validate on none;
    our trainers track a held-out PSNR/LPIPS, docs/training-recipe.md)."""
    if count > len(rows):
        raise DatasetLayoutError(f"val_images: {count} requested, the dataset has only {len(rows)} images")
    return sorted(rows, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())[:count]


def assemble_paper_dataset(data_cfg: Mapping, out_dir: Path, datasets_dir: Path) -> Path:
    """Write ``out_dir/manifest.csv`` (training and synthetic test images, for the degradation
    stage) and ``out_dir/real_pairs.csv`` (paired test sets, for the evaluation); return the manifest."""
    images, pairs = [], []
    for name, spec in sorted(data_cfg["datasets"].items()):
        root = datasets_dir / name
        if not (root / ".complete").exists():
            raise FileNotFoundError(f"{root}: dataset {name!r} is not downloaded (run the download_{name} stage)")
        if is_paired(spec):
            pairs += real_pairs(name, spec, root, out_dir)
        else:
            images += _manifest_rows(name, spec, root, out_dir)
    if not images and not pairs:
        raise ValueError("no images found in the configured datasets")
    write_manifest(pairs, out_dir / REAL_PAIRS_FILE, REAL_PAIR_COLUMNS)
    return write_manifest(images, out_dir / MANIFEST_FILE)
