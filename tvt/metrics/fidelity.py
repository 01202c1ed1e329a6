"""PSNR and SSIM in the convention of SR papers, through pyiqa.

Both are computed on the Y channel of YCbCr (ITU-R BT.601, MATLAB's ``rgb2ycbcr``), on
8-bit images, after removing ``crop_border`` pixels on every side. pyiqa's default colour
space for "Y" is YIQ, so YCbCr is asked for explicitly; pyiqa then rounds Y to integers,
as MATLAB does. BasicSR keeps Y fractional: its PSNR agrees to ~1e-4 dB, its SSIM is
~1e-3 higher on bicubic outputs (tests/test_metrics_suite.py measures both).
"""

from __future__ import annotations

import tvt.compat

tvt.compat.apply()

import pyiqa
import torch

Y_CHANNEL = {"test_y_channel": True, "color_space": "ycbcr"}


def quantise(image: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] values to the 256 levels a saved PNG holds: every method is scored as saved."""
    return (image.clamp(0, 1) * 255).round() / 255


def y_channel_metric(name: str, crop_border: int, device: str | torch.device = "cpu"):
    """pyiqa's ``psnr`` or ``ssim`` on Y of YCbCr; call it on (N, 3, H, W) batches in [0, 1]."""
    if name not in ("psnr", "ssim"):
        raise ValueError(f"y_channel_metric: 'psnr' or 'ssim' expected, got {name!r}")
    metric = pyiqa.create_metric(name, crop_border=crop_border, device=device, as_loss=False, **Y_CHANNEL)

    @torch.no_grad()
    def score(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        if sr.shape != hr.shape:
            raise ValueError(f"{name}_y: SR shape {tuple(sr.shape)} != HR shape {tuple(hr.shape)}")
        return metric(sr.double(), hr.double())

    return score
