"""Colour correction of a super-resolved image against its (upsampled) low-resolution input.

One-step diffusion SR can drift in global colour; both fixes below transfer the colour of
the reference (the bicubic-upsampled LR) while keeping the detail that the model generated.
They follow StableSR / OSEDiff (docs/method.md §1.4).

Both fixes are per-channel *affine-equivariant*: they give the same result whether images are
in [-1, 1] or [0, 1], as long as ``sr`` and ``ref`` use the same range. Inputs are (B, 3, H, W)
tensors of equal size; nothing is clamped here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIX_MODES = ("adain", "wavelet", "none")

# 3x3 binomial kernel [1, 2, 1]^T [1, 2, 1] / 16: the à-trous ("with holes") B-spline filter.
_BINOMIAL_3X3 = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0


def _check_pair(sr: torch.Tensor, ref: torch.Tensor) -> None:
    if sr.dim() != 4 or sr.shape != ref.shape:
        raise ValueError(
            f"colour fix needs sr and ref of the same (B, C, H, W) shape, got {tuple(sr.shape)} and {tuple(ref.shape)}"
        )


def adain_color_fix(sr: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Give ``sr`` the per-image, per-channel mean and standard deviation of ``ref``."""
    _check_pair(sr, ref)
    var_sr, mean_sr = torch.var_mean(sr, dim=(2, 3), keepdim=True, correction=0)
    var_ref, mean_ref = torch.var_mean(ref, dim=(2, 3), keepdim=True, correction=0)
    return (sr - mean_sr) * torch.sqrt((var_ref + eps) / (var_sr + eps)) + mean_ref


def wavelet_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """One à-trous smoothing: the binomial kernel with holes of ``dilation`` pixels.

    Replicate padding keeps constants constant at the borders (and works for any image size,
    where reflect padding would need the image to be wider than the dilation).
    """
    channels = x.shape[1]
    kernel = _BINOMIAL_3X3.to(x).expand(channels, 1, 3, 3)
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, dilation=dilation, groups=channels)


def wavelet_decompose(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` into (high, low) with ``levels`` à-trous steps, dilations 1, 2, 4, ...

    ``high`` is the sum of the detail bands, ``low`` the final residual; ``high + low == x``.
    """
    high = torch.zeros_like(x)
    low = x
    for level in range(levels):
        blurred = wavelet_blur(low, dilation=2**level)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(sr: torch.Tensor, ref: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Keep the high-frequency bands of ``sr`` and take the low-frequency residual of ``ref``."""
    _check_pair(sr, ref)
    sr_high, _ = wavelet_decompose(sr, levels)
    _, ref_low = wavelet_decompose(ref, levels)
    return sr_high + ref_low


def apply_color_fix(mode: str, sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Dispatch on a config value: ``"adain"``, ``"wavelet"`` or ``"none"``."""
    if mode == "adain":
        return adain_color_fix(sr, ref)
    if mode == "wavelet":
        return wavelet_color_fix(sr, ref)
    if mode == "none":
        return sr
    raise ValueError(f"unknown colour fix {mode!r}; expected one of {COLOR_FIX_MODES}")
