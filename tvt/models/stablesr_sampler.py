"""StableSR's sampling: DDPM with respaced steps from the noised LR latent, aggregated over latent tiles.

    z_lr                                       LR latent (bicubic-upsampled LR → E8, scaled)
    z_T = √ᾱ_T · z_lr + √(1−ᾱ_T) · ε           T = 999, the first respaced step
    for t in T … 0 (``num_steps`` respaced timesteps):
        ε̂ = ε_θ(z_t, t, c; z_lr)               on overlapping latent tiles, Gaussian-blended
        z_{t'} = DDPM posterior step(z_t, ε̂)   t' = the next respaced timestep
    → z_0

Starting from the *noised LR latent* rather than from pure noise is StableSR's choice; at
T = 999 (ᾱ ≈ 0.0047) it keeps only a faint trace of the LR's low frequencies, the SFT
conditioning carries the rest.

Aggregation sampling: at every step ε̂ is computed tile by tile — the tile function sees
``cat([z_t, z_lr])`` so each tile gets its own piece of both — and the tiles' predictions are
merged with Gaussian weights (:func:`tvt.models.tiling.tiled_apply`). Blending ε̂, not z, at
every step lets neighbouring tiles agree on one trajectory, so no seam can grow over the steps.
"""

from __future__ import annotations

import functools

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from tqdm.auto import tqdm

from tvt.models.restorer import sd_noise_scheduler
from tvt.models.stablesr import SFTConditionedUNet
from tvt.models.tiling import NORM_STATS_MODES, crop_to, pad_to_multiple, tiled_apply, tiled_encode

#: respaced DDPM steps of StableSR's paper results
PAPER_SAMPLING_STEPS = 200


def respaced_scheduler(num_steps: int, scheduler: DDPMScheduler | None = None) -> DDPMScheduler:
    """A fresh DDPM scheduler with ``scheduler``'s noise schedule (default: SD's) and ``num_steps`` timesteps.

    Spacing ``"linspace"`` (``round(linspace(0, 999, n))``, descending) is guided-diffusion's
    ``space_timesteps`` that StableSR respaces with: it contains both ends, T = 999 — the
    timestep StableSR noises the LR latent to, and the noisiest one the UNet was trained on —
    and t = 0, whose step returns the posterior mean without noise. diffusers' default
    ``"leading"`` would start at 995 for 200 steps (1000 // 200 · 199), ``"trailing"`` ends at
    t = 4. The given scheduler is not modified.
    """
    base = scheduler if scheduler is not None else sd_noise_scheduler()
    last = base.config.num_train_timesteps - 1
    if not 2 <= num_steps <= base.config.num_train_timesteps:
        raise ValueError(f"num_steps must be in [2, {base.config.num_train_timesteps}] (sampling runs from "
                         f"t={last} down to t=0), got {num_steps}")
    if base.config.prediction_type != "epsilon":
        raise ValueError(f"StableSR's UNet predicts ε; the scheduler is configured for "
                         f"{base.config.prediction_type!r}")
    respaced = DDPMScheduler.from_config(base.config, timestep_spacing="linspace")
    respaced.set_timesteps(num_steps)
    return respaced


def encode_lr_latent(vae: nn.Module, lr: torch.Tensor, scale: int, *, tile: int | None = None,
                     overlap: int | None = None) -> torch.Tensor:
    """z_lr: the scaled posterior mean of the bicubic-×``scale`` LR (in [-1, 1]) under SD's VAE.

    The upsampled sides should be multiples of the VAE's factor. ``tile``/``overlap`` (pixels
    of the upsampled image) encode by pixel tiles (:func:`tvt.models.tiling.tiled_encode`).
    """
    upsampled = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)
    if tile:
        mean = tiled_encode(vae, upsampled, tile, overlap if overlap is not None else tile // 4)
    else:
        mean = vae.encode(upsampled).latent_dist.mode()
    return mean * vae.config.scaling_factor


@torch.no_grad()
def sample_latents(
    model: SFTConditionedUNet,
    z_lr: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    num_steps: int,
    scheduler: DDPMScheduler | None = None,
    generator: torch.Generator | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    norm_stats: str = "tile",
    progress: bool = False,
) -> torch.Tensor:
    """z_0 (B, 4, h, w) restored from LR latents ``z_lr`` (B, 4, h, w) by StableSR's sampling.

    Args:
        model: the conditioned UNet (ε-prediction).
        z_lr: scaled LR latents (:func:`encode_lr_latent`); any h, w — they are reflect-padded
            to the UNet's latent multiple and the result is cropped back.
        prompt_embeds: (1 or B, L, D) text embeddings.
        num_steps: respaced DDPM steps (StableSR: 200, :data:`PAPER_SAMPLING_STEPS`).
        scheduler: supplies the noise schedule (default: SD's); see :func:`respaced_scheduler`.
        generator: makes the initial and the per-step noise reproducible.
        tile, overlap: latent tile side and minimal overlap for aggregation sampling
            (None: untiled; overlap defaults to half a tile, StableSR's 32 of 64).
        norm_stats: GroupNorm statistics per ``"tile"`` (StableSR) or of the whole ``"image"``
            (:mod:`tvt.models.tiling`).
        progress: show a tqdm bar over the steps.
    """
    if norm_stats not in NORM_STATS_MODES:
        raise ValueError(f"unknown norm_stats {norm_stats!r}; expected one of {NORM_STATS_MODES}")
    scheduler = respaced_scheduler(num_steps, scheduler)
    height, width = z_lr.shape[-2:]
    z_lr = pad_to_multiple(z_lr.float(), model.latent_multiple)
    batch, channels = z_lr.shape[:2]
    if prompt_embeds.shape[0] not in (1, batch):
        raise ValueError(f"prompt_embeds has batch {prompt_embeds.shape[0]}, expected 1 or {batch}")
    prompt_embeds = prompt_embeds.to(z_lr.device, model.dtype).expand(batch, -1, -1)
    first = scheduler.timesteps[:1]
    noise = randn_tensor(z_lr.shape, generator=generator, device=z_lr.device, dtype=z_lr.dtype)
    z_t = scheduler.add_noise(z_lr, noise, first)

    def predict_eps(stacked: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """ε of a (tile of) ``cat([z_t, z_lr])``: tiling cuts both latents alike."""
        sample, lr_latent = stacked.to(model.dtype).split([channels, stacked.shape[1] - channels], dim=1)
        return model(sample, timesteps, prompt_embeds, lr_latent).float()

    for t in tqdm(scheduler.timesteps, desc="StableSR sampling", disable=not progress, leave=False):
        predict = functools.partial(predict_eps, timesteps=t.to(z_lr.device).expand(batch))
        stacked = torch.cat([z_t, z_lr], dim=1)
        if tile:
            eps = tiled_apply(predict, stacked, tile, overlap if overlap is not None else tile // 2,
                              multiple=model.latent_multiple, norm_module=model, norm_stats=norm_stats)
        else:
            eps = predict(stacked)
        z_t = scheduler.step(eps, t, z_t, generator=generator).prev_sample
    return crop_to(z_t, height, width)
