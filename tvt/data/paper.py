"""Paper-mode dataset: a manifest over the verified downloads in ``resources/datasets``.

Training datasets (role ``train``: LSDIR, FFHQ) feed the degradation stage; test datasets
(role ``test``) are evaluated. ``limit`` keeps the first N images in sorted order (FFHQ:
the first 10k faces, as OSEDiff). Images are referenced where the download stage put them
(paths relative to the manifest), never copied.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from tvt.data.manifest import sha256_file, write_manifest

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def dataset_images(root: Path, limit: int | None = None) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return files[:limit] if limit else files


def assemble_paper_dataset(data_cfg: Mapping, out_dir: Path, datasets_dir: Path) -> Path:
    """Write ``out_dir/manifest.csv`` listing every image of every configured dataset."""
    rows = []
    for name, spec in sorted(data_cfg["datasets"].items()):
        root = datasets_dir / name
        if not (root / ".complete").exists():
            raise FileNotFoundError(f"{root}: dataset {name!r} is not downloaded (run the download_{name} stage)")
        split = "train" if spec["role"] == "train" else "test"
        for path in tqdm(dataset_images(root, spec.get("limit")), desc=f"index {name}", unit="img"):
            with Image.open(path) as im:
                width, height = im.size
            rel = path.relative_to(root).with_suffix("").as_posix()
            rows.append({
                "id": f"{name}/{rel}", "path": Path(os.path.relpath(path, out_dir)).as_posix(),
                "width": width, "height": height, "sha256": sha256_file(path), "split": split,
                "source": name, "licence": spec.get("licence", "see dataset page"), "kind": "photo",
                "text": "", "text_px": None, "font": "", "lang": "", "background": "",
            })
    if not rows:
        raise ValueError("no images found in the configured datasets")
    return write_manifest(rows, out_dir / "manifest.csv")
