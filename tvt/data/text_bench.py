"""The mini claims' text test set: rendered lines whose low-resolution version is hard, not hopeless.

The pipeline's own text test lines (:mod:`tvt.data.mini`) get the full Real-ESRGAN degradation
at 12–32 px: every method, bicubic included, then reads nothing, so the set cannot rank
methods. Here each line is rendered afresh (strings no training line has) and degraded in
one of two ways:

* ``bicubic``: plain ×scale antialiased bicubic downscaling (the classic SR setting) — at
  16–28 px the ×4 LR lines are 4–7 px high: readable with effort, not at a glance;
* ``realesrgan``: the pipeline's own second-order degradation (``degrade`` section) on larger
  lines, where some text survives it.

Fonts: :func:`tvt.data.text_render.latin_fonts` (the training fonts, new strings) and a
held-out font that training never renders, STIX General from matplotlib's wheel.
"""

from __future__ import annotations

import importlib.resources
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tvt.data.text_render import FontSpec, latin_fonts, line_margin, random_line, render_text_line

DEGRADATIONS = ("bicubic", "realesrgan")
HELDOUT_FONT_FILE = "mpl-data/fonts/ttf/STIXGeneral.ttf"


@dataclass(frozen=True)
class TextLine:
    """One benchmark line: HR and LR as H×W×3 uint8, with what it says."""

    id: str
    text: str
    px: int
    font: str
    degradation: str
    hr: np.ndarray
    lr: np.ndarray


def heldout_font() -> FontSpec:
    """STIX General (a Times-like serif in matplotlib's wheel): a face no training line uses."""
    path = Path(str(importlib.resources.files("matplotlib").joinpath(HELDOUT_FONT_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"held-out font {path} is missing from the matplotlib install")
    return FontSpec("STIX General", path)


def bicubic_down(hr: np.ndarray, scale: int) -> np.ndarray:
    """×1/scale antialiased bicubic (torch's, as ``F.interpolate(..., antialias=True)``), 8-bit."""
    x = torch.tensor(hr).permute(2, 0, 1)[None].float() / 255
    lr = F.interpolate(x, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)
    return (lr[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def render_lines(
    *,
    fonts: Sequence[FontSpec],
    sizes: Sequence[int],
    lines_per_size: int,
    width: int,
    degradation: str,
    scale: int,
    seed: int,
    degrade_cfg: Mapping | None = None,
) -> list[TextLine]:
    """``lines_per_size`` lines per size (fonts cycling), black on white, ``width`` px wide.

    Strings come from ``random.Random(f"{seed}/textbench/...")``: salted apart from the
    pipeline's lines, so no benchmark line repeats a training line.
    """
    if degradation not in DEGRADATIONS:
        raise ValueError(f"text benchmark degradation {degradation!r} is not one of {DEGRADATIONS}")
    if degradation == "realesrgan" and degrade_cfg is None:
        raise ValueError("the realesrgan text benchmark needs the pipeline's `degrade` config section")
    lines = []
    for px in sizes:
        for i in range(lines_per_size):
            font = fonts[i % len(fonts)]
            line_id = f"textbench-{degradation}-{font.name.replace(' ', '_')}-{px:02d}px-{i:02d}"
            rng = random.Random(f"{seed}/textbench/{line_id}")
            text = random_line(rng, "en", font.load(px), width - 2 * line_margin(px))
            hr = np.asarray(render_text_line(text, font, px, width))
            if degradation == "bicubic":
                lr = bicubic_down(hr, scale)
            else:
                from tvt.degradation import degrade, image_seed

                lr, _ = degrade(hr, degrade_cfg, image_seed(seed, line_id))
            lines.append(TextLine(line_id, text, px, font.name, degradation, hr, lr))
    return lines


def training_fonts() -> list[FontSpec]:
    """The Latin fonts the pipeline renders its training and test lines with."""
    return latin_fonts()
