"""Real photographs that ship inside installed wheels: the offline HR set of mini mode.

No dataset can be downloaded here, yet the pipeline must run on real photographs, not
synthetic noise (docs/method.md §2). scikit-image, scikit-learn and matplotlib carry a few
public-domain / CC photographs; we find them through each package's install location
(``importlib.resources``), so the list works in any environment where those packages are.

Licences are quoted from the text shipped in the same wheels (the ``skimage.data``
function docstrings, ``sklearn/datasets/images/README.txt``); where the wheel states none
the licence is recorded as ``unstated``, never guessed.

Left out on purpose: ``clock_motion`` (synthetically motion-blurred: not an HR target),
``motorcycle_right`` (the stereo twin of ``motorcycle_left``: it would leak across splits),
``microaneurysms`` (102 px), microscopy (``cell``, ``ihc``) and graphics (``horse``,
``logo``, ``color``, ``chessboard_*``, ``phantom``).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class PhotoSource:
    """Where one photograph lives and under which terms."""

    id: str
    package: str  # import name of the package that ships it ("" for a plain folder)
    relpath: str  # path inside the package (or the absolute path when package == "")
    licence: str
    source: str


def _skimage(name: str, filename: str, licence: str) -> PhotoSource:
    return PhotoSource(
        id=f"photo-skimage-{name}", package="skimage", relpath=f"data/{filename}",
        licence=licence, source=f"scikit-image wheel: skimage/data/{filename}",
    )


WHEEL_PHOTOS: tuple[PhotoSource, ...] = (
    _skimage("astronaut", "astronaut.png",
             "public domain (NASA; no known copyright restrictions)"),
    _skimage("brick", "brick.png", "CC0 (CC0Textures Bricks25)"),
    _skimage("camera", "camera.png", "CC0 (photographer Lav Varshney)"),
    _skimage("chelsea", "chelsea.png", "CC0 (photographer Stefan van der Walt)"),
    _skimage("coffee", "coffee.png", "CC0 (photographer Rachel Michetti)"),
    _skimage("coins", "coins.png",
             "no known copyright restrictions (Brooklyn Museum Collection)"),
    _skimage("grass", "grass.png", "CC0 (DeviantArt linolafett Grass-01)"),
    _skimage("gravel", "gravel.png", "CC0 (CC0Textures Gravel04)"),
    _skimage("hubble_deep_field", "hubble_deep_field.jpg", "public domain (NASA)"),
    _skimage("moon", "moon.png", "unstated in the scikit-image wheel"),
    _skimage("motorcycle_left", "motorcycle_left.png",
             "unstated in the scikit-image wheel (Middlebury 2014 stereo benchmark)"),
    _skimage("page", "page.png", "unstated in the scikit-image wheel"),
    _skimage("retina", "retina.jpg",
             "CC0 1.0 (Mikael Häggström, Wikimedia Commons)"),
    _skimage("rocket", "rocket.jpg", "public domain (SpaceX)"),
    _skimage("text", "text.png",
             "public domain (Wikipedia File:Corner.png; no known copyright restrictions)"),
    PhotoSource(
        id="photo-sklearn-china", package="sklearn", relpath="datasets/images/china.jpg",
        licence="CC-BY-2.0 (Flickr, danielbuechele, photo 6061409035)",
        source="scikit-learn wheel: sklearn/datasets/images/china.jpg",
    ),
    PhotoSource(
        id="photo-sklearn-flower", package="sklearn", relpath="datasets/images/flower.jpg",
        licence="CC-BY-2.0 (Flickr, vultilion, photo 6056698931)",
        source="scikit-learn wheel: sklearn/datasets/images/flower.jpg",
    ),
    PhotoSource(
        id="photo-matplotlib-grace_hopper", package="matplotlib",
        relpath="mpl-data/sample_data/grace_hopper.jpg",
        licence="unstated in the matplotlib wheel",
        source="matplotlib wheel: matplotlib/mpl-data/sample_data/grace_hopper.jpg",
    ),
)


def locate(photo: PhotoSource) -> Path | None:
    """The file on disk, or None when the package or the file is not installed."""
    if not photo.package:
        path = Path(photo.relpath)
        return path if path.is_file() else None
    if importlib.util.find_spec(photo.package) is None:
        return None
    path = Path(str(importlib.resources.files(photo.package).joinpath(photo.relpath)))
    return path if path.is_file() else None


def folder_photos(folder: str | Path) -> list[PhotoSource]:
    """Photographs found (recursively) in an extra folder, e.g. Debian wallpapers.

    Their licence is left to the folder's own documentation (Debian keeps it in
    ``/usr/share/doc/<package>/copyright``), so it is recorded as such, not guessed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    return [
        PhotoSource(
            id=f"photo-{_slug(folder.name)}-{_slug(p.relative_to(folder).with_suffix('').as_posix())}",
            package="", relpath=str(p),
            licence=f"unstated here; see the documentation of the package that installed {folder}",
            source=f"folder: {p}",
        )
        for p in files
    ]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name)


def load_photo(path: str | Path, min_side: int, max_side: int) -> Image.Image | None:
    """RGB uint8 image whose longer side is at most ``max_side``; None if too small.

    Downscaling uses Pillow's antialiased Lanczos filter (no aliasing of fine structure,
    which would bias every fine-structure measurement downstream). The ``min_side`` test
    applies to the final image, since that is what later stages crop from.
    """
    with Image.open(path) as image:
        image = image.convert("RGB")
    longest = max(image.size)
    if longest > max_side:
        scale = max_side / longest
        size = tuple(max(1, round(side * scale)) for side in image.size)
        image = image.resize(size, Image.Resampling.LANCZOS)
    if min(image.size) < min_side:
        return None
    return image
