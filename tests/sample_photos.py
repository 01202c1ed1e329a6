"""Real photographs for the tests, taken from installed wheels so that every clone has them.

The suite needs natural images (textures, edges, faces) wherever a metric, a tiling seam or a
training loss is checked: noise would hide exactly the structure those tests are about. The
photos come from the same wheel-shipped set as mini mode's data (``tvt.data.photos``:
scikit-image, scikit-learn, matplotlib), so the suite depends on nothing beside the checkout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tvt.data.photos import WHEEL_PHOTOS, locate

#: short name -> photo id in ``tvt.data.photos.WHEEL_PHOTOS``
_IDS = {photo.id.rsplit("-", 1)[-1]: photo for photo in WHEEL_PHOTOS}

#: colour photographs with at least 300 px on each side, in a fixed order (training-test crops)
COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "china", "flower", "motorcycle_left")


def photo_path(name: str) -> Path:
    """The file of one wheel photo; a missing package is a broken environment, not a skip."""
    if name not in _IDS:
        raise KeyError(f"unknown test photo {name!r} (known: {', '.join(sorted(_IDS))})")
    path = locate(_IDS[name])
    if path is None:
        raise FileNotFoundError(f"test photo {name!r} not found: is {_IDS[name].package} installed?")
    return path


def photo(name: str, side: int | None = None) -> Image.Image:
    """One wheel photo as RGB; with ``side``, its central ``side``×``side`` crop."""
    with Image.open(photo_path(name)) as image:
        image = image.convert("RGB")
    if side is None:
        return image
    if min(image.size) < side:
        raise ValueError(f"test photo {name!r} is {image.size}, smaller than a {side}² crop")
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def photo_array(name: str, side: int | None = None) -> np.ndarray:
    """Like :func:`photo`, as an (H, W, 3) uint8 array."""
    return np.asarray(photo(name, side))
