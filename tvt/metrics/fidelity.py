"""Full-reference fidelity metrics, through pyiqa, in the convention of SR papers.

PSNR and SSIM are computed on the Y channel of YCbCr (ITU-R BT.601, as MATLAB's
``rgb2ycbcr`` and BasicSR), on 8-bit-quantised images, after removing ``crop_border``
pixels on every side. Note pyiqa's default colour space for the Y channel is YIQ; we ask
for YCbCr explicitly so that numbers match published tables.
"""

from __future__ import annotations

from functools import lru_cache

import tvt.compat

tvt.compat.apply()

import pyiqa  # noqa: E402
import torch  # noqa: E402

#: metric name -> (pyiqa name, extra kwargs, higher is better)
FIDELITY_METRICS = {
    "psnr_y": ("psnr", {"test_y_channel": True, "color_space": "ycbcr"}, True),
    "ssim_y": ("ssim", {"test_y_channel": True, "color_space": "ycbcr"}, True),
}


@lru_cache(maxsize=None)
def _metric(name: str, crop_border: int):
    pyiqa_name, kwargs, _ = FIDELITY_METRICS[name]
    return pyiqa.create_metric(pyiqa_name, crop_border=crop_border, device="cpu", as_loss=False, **kwargs)


def higher_is_better(name: str) -> bool:
    return FIDELITY_METRICS[name][2]


@torch.no_grad()
def score(name: str, sr: torch.Tensor, hr: torch.Tensor, crop_border: int) -> float:
    """One metric for one image pair; tensors (1,3,H,W) or (3,H,W) in [0,1]."""
    if name not in FIDELITY_METRICS:
        raise KeyError(f"unknown metric {name!r} (known: {', '.join(FIDELITY_METRICS)})")
    if sr.shape != hr.shape:
        raise ValueError(f"{name}: SR shape {tuple(sr.shape)} != HR shape {tuple(hr.shape)}")
    sr = sr[None] if sr.dim() == 3 else sr
    hr = hr[None] if hr.dim() == 3 else hr
    quantise = lambda t: (t.clamp(0, 1) * 255).round() / 255  # noqa: E731 - 8-bit like saved images
    return float(_metric(name, crop_border)(quantise(sr).double(), quantise(hr).double()).item())
