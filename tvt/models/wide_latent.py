"""Ablation S3: VAE-D8 with an 8-channel latent, aligned with SD's 4-channel one by channel interpolation.

The paper's Table 7 says only "VAE-D8 with 8 latent channels, aligned with VAE-D8 by interpolating
its channels" (2.27 T FLOPs, as S1); the official repository (Joyies/TVT) has no code for it. Our
reading, the smallest that reuses SD's prior exactly:

* **The alignment** is a fixed linear map P (``new × old``): linear interpolation along the channel
  axis with the end channels on the end channels (``F.interpolate(..., mode="linear",
  align_corners=True)``; 4 → 8: new channel k sits at old position 3k/7). An 8-channel latent is
  *aligned* with SD's when it is P z for SD's latent z.
* **Layers that write latent channels** (VAE encoder ``conv_out``'s mean and log-variance rows,
  ``quant_conv``, ``post_quant_conv``, the UNet's ``conv_out``) get their output rows interpolated:
  W' = P W, b' = P b. **Layers that read them** (``quant_conv``, ``post_quant_conv``, the decoder's
  ``conv_in``, the UNet's ``conv_in``) get P's left inverse P⁺ = (PᵀP)⁻¹Pᵀ on their input columns:
  W' = W P⁺, so W' (P z) = W z. Interpolating the input columns as well (W Pᵀ) would not read P z
  as z; P⁺ is the one linear read-out that does.
* So, untrained, the widened VAE's posterior mean is P times SD's, its decoder decodes P z as SD's
  decodes z, and the widened UNet predicts P ε for P z: the S3 restorer starts as S1, exactly up
  to float rounding (``tests/test_ablations.py``). Training (:mod:`tvt.training.vae_transfer`,
  architecture ``d8_c8``) then lets the four extra channels carry what SD's four do not. The VSD
  teacher stays SD's 4-channel UNet: it scores P⁺ ẑ (:func:`narrow_latent`), the 4-channel latent
  that the 8-channel one is aligned with.

The posterior *sample* is not interpolated exactly (the widened VAE draws independent noise on all
eight channels); its mean is.
"""

from __future__ import annotations

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import functools

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

#: S3's latent width (the paper's "8 latent channels")
S3_LATENT_CHANNELS = 8


@functools.cache
def channel_interpolation(old: int, new: int) -> torch.Tensor:
    """P (``new × old``, float64): linear interpolation along the channel axis, ends on ends."""
    if not 0 < old <= new:
        raise ValueError(f"channel_interpolation widens: expected 0 < old <= new, got old={old}, new={new}")
    eye = torch.eye(old, dtype=torch.float64)[None]  # (1, old channels as "length", old)
    return F.interpolate(eye, size=new, mode="linear", align_corners=True)[0].T.contiguous()


def _maps(old: int, new: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    interp = channel_interpolation(old, new)
    return interp.to(like), torch.linalg.pinv(interp).to(like)  # P, P⁺ (P⁺ P = I)


def _write(weight: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Output rows interpolated: P W (any conv kernel)."""
    return torch.einsum("no,o...->n...", p, weight)


def _read(weight: torch.Tensor, p_inv: torch.Tensor) -> torch.Tensor:
    """Input columns through P⁺: W P⁺, which reads P z as W reads z."""
    return torch.einsum("co...,on->cn...", weight, p_inv)


def narrow_latent(z: torch.Tensor, channels: int) -> torch.Tensor:
    """P⁺ z: the ``channels``-channel latent that ``z`` is aligned with (the SD teacher's input)."""
    if z.shape[1] == channels:
        return z
    _, p_inv = _maps(channels, z.shape[1], z)
    return torch.einsum("on,bn...->bo...", p_inv, z)


def widen_latent(z: torch.Tensor, channels: int) -> torch.Tensor:
    """P z: ``z`` interpolated to ``channels`` latent channels."""
    p, _ = _maps(z.shape[1], channels, z)
    return torch.einsum("no,bo...->bn...", p, z)


@torch.no_grad()
def widen_vae(vae: AutoencoderKL, channels: int = S3_LATENT_CHANNELS) -> AutoencoderKL:
    """A new AutoencoderKL with ``channels`` latent channels aligned with ``vae``'s (module docstring);
    every other weight is ``vae``'s. ``vae`` is left unchanged."""
    old = vae.config.latent_channels
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    wide = AutoencoderKL(**{**config, "latent_channels": channels}).to(vae.device)
    state = vae.state_dict()
    p, p_inv = _maps(old, channels, state["decoder.conv_in.weight"])
    both, both_inv = torch.block_diag(p, p), torch.block_diag(p_inv, p_inv)  # mean and log-variance halves
    new = {
        "encoder.conv_out.weight": _write(state["encoder.conv_out.weight"], both),
        "encoder.conv_out.bias": both @ state["encoder.conv_out.bias"],
        "decoder.conv_in.weight": _read(state["decoder.conv_in.weight"], p_inv),
    }
    if vae.config.use_quant_conv:
        new["quant_conv.weight"] = _read(_write(state["quant_conv.weight"], both), both_inv)
        new["quant_conv.bias"] = both @ state["quant_conv.bias"]
    if vae.config.use_post_quant_conv:
        new["post_quant_conv.weight"] = _read(_write(state["post_quant_conv.weight"], p), p_inv)
        new["post_quant_conv.bias"] = p @ state["post_quant_conv.bias"]
    wide.load_state_dict({**state, **new}, strict=True)  # every key accounted for
    return wide if wide.dtype == vae.dtype else wide.to(dtype=vae.dtype)


def _conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int, weight, bias) -> nn.Conv2d:
    out = nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding).to(conv.weight)
    out.weight.copy_(weight)
    out.bias.copy_(bias)
    return out


@torch.no_grad()
def widen_unet(unet: UNet2DConditionModel, channels: int = S3_LATENT_CHANNELS) -> UNet2DConditionModel:
    """Give ``unet`` (in place) a ``conv_in`` reading and a ``conv_out`` writing ``channels`` latent channels,
    aligned with its own by :func:`channel_interpolation`; its config says the new widths, so it saves
    and reloads with diffusers. Returns ``unet``."""
    old = unet.config.in_channels
    if unet.config.out_channels != old:
        raise ValueError(f"widen_unet: in ({old}) and out ({unet.config.out_channels}) channels differ")
    conv_in, conv_out = unet.conv_in, unet.conv_out
    p, p_inv = _maps(old, channels, conv_in.weight)
    unet.conv_in = _conv_like(conv_in, channels, conv_in.out_channels, _read(conv_in.weight, p_inv), conv_in.bias)
    unet.conv_out = _conv_like(conv_out, conv_out.in_channels, channels, _write(conv_out.weight, p), p @ conv_out.bias)
    unet.register_to_config(in_channels=channels, out_channels=channels)
    return unet
