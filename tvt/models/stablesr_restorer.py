"""The StableSR baseline as one restorer (docs/method.md §1.5), with the same face as the one-step ones.

    LR (B, 3, h, w) in [0, 1]
      → bicubic ×scale, reflect-padded to what VAE and UNet need
      → z_lr = E8(x) · scaling_factor                       (posterior mean)
      → z_0 = StableSR sampling: DDPM over ``steps`` respaced timesteps from the noised z_lr,
              SD's frozen UNet steered by the time-aware encoder + SFT (tiles blended every step)
      → D8 with CFW: decoder features fused with E8's features of x, weight ``w``
        (E8 and D8 + CFW tiled exactly when ``tile`` is set)
      → cropped, colour-fixed against the upsampled LR, clamped
    SR (B, 3, scale·h, scale·w) in [0, 1]

``w`` is StableSR's fidelity–realism dial: 0 is SD's own decoder (the generative prior's
output), 1 pulls the decoder towards the LR image. The sampling noise comes from a CPU
generator seeded with ``seed`` on every call, so an image restores to the same bytes on any
device and in any batch position.

Saved like :class:`~tvt.models.restorer.OneStepRestorer` (``vae/``, ``unet/``,
``scheduler/``, ``restorer.json``, the prompt embedding) plus ``conditioner/`` and ``cfw/``;
``restorer.json`` names the class, so :func:`tvt.models.saved.load_restorer` picks it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from tvt.models.cfw import CFWAutoencoder, CFWModule
from tvt.models.color_fix import COLOR_FIX_MODES, apply_color_fix
from tvt.models.prompts import NullPrompt
from tvt.models.restorer import PROMPT_EMBEDDING_FILE, RESTORER_CONFIG
from tvt.models.stablesr import SFTConditionedUNet, StableSRConditioner
from tvt.models.stablesr_sampler import sample_latents
from tvt.models.tiling import crop_to, pad_to_multiple, tiled_encode, vae_downsample_factor

CLASS_NAME = "StableSRRestorer"


class StableSRRestorer(nn.Module):
    """E8 → StableSR's multi-step SFT-conditioned sampling → CFW decoder (w) → colour fix."""

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        conditioner: StableSRConditioner,
        cfw: CFWModule,
        *,
        scheduler: DDPMScheduler,
        prompt: NullPrompt,
        steps: int,
        w: float = 0.5,
        scale: int = 4,
        color_fix: str = "adain",
        seed: int = 0,
        tile: int | None = None,
        tile_overlap: int | None = None,
        method: str = "stablesr",
    ):
        """
        Args:
            vae, unet: SD's frozen VAE-D8 and UNet; conditioner, cfw: StableSR's trained parts.
            scheduler: the prior's noise schedule (respaced to ``steps`` when sampling).
            prompt: the fixed (null) prompt StableSR was trained with.
            steps: respaced DDPM steps (StableSR's paper results: 200).
            w: CFW weight in [0, 1].
            color_fix: "adain", "wavelet" or "none" (StableSR offers the first two).
            seed: seed of the sampling noise, drawn anew for every call.
            tile, tile_overlap: output pixels (a multiple of :attr:`pixel_multiple`) of the
                pixel tiles of encoder and CFW decoder; latent tiles for the sampling are these
                over 8, overlapping by ``tile_overlap`` over 8 and blended (None: untiled;
                overlap defaults to a quarter tile). Encoder and CFW decoder tile exactly
                (GroupNorm statistics pooled over tiles, halos from the receptive field:
                tiled_vae.py, :meth:`CFWAutoencoder.tiled_decode`), so only the sampling's
                blended tiles make the tiled output differ from the untiled one.
        """
        super().__init__()
        if color_fix not in COLOR_FIX_MODES:
            raise ValueError(f"unknown colour fix {color_fix!r}; expected one of {COLOR_FIX_MODES}")
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"CFW weight w must be in [0, 1], got {w}")
        conditioner.check_unet(unet)
        self.vae, self.unet, self.conditioner, self.cfw = vae, unet, conditioner, cfw
        self.scheduler = scheduler
        self.prompt = prompt
        self.steps, self.w, self.scale, self.color_fix, self.seed = steps, float(w), scale, color_fix, seed
        self.method = method
        self.denoiser = SFTConditionedUNet(unet, conditioner)
        self.autoencoder = CFWAutoencoder(vae, cfw)
        if tile is not None and tile % self.pixel_multiple:
            raise ValueError(f"tile must be a multiple of {self.pixel_multiple} px, got {tile}")
        self.tile = tile
        self.tile_overlap = tile_overlap if tile_overlap is not None else (tile or 0) // 4
        self.tile_memory: int | None = None  # exact tiling's RAM budget for tile states (bytes; None: the device's)

    @property
    def vae_factor(self) -> int:
        return vae_downsample_factor(self.vae)

    @property
    def pixel_multiple(self) -> int:
        return self.vae_factor * self.denoiser.latent_multiple

    def upsample_lr(self, lr: torch.Tensor) -> torch.Tensor:
        """Bicubic ×scale, clamped back to [0, 1]."""
        return F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(0, 1)

    @torch.no_grad()
    def forward(self, lr: torch.Tensor, *, w: float | None = None, progress: bool = False) -> torch.Tensor:
        """SR (B, 3, scale·h, scale·w) in [0, 1] from LR in [0, 1]; ``w`` overrides the stored weight."""
        w = self.w if w is None else w
        height, width = lr.shape[-2] * self.scale, lr.shape[-1] * self.scale
        lr_up = self.upsample_lr(lr)
        image = pad_to_multiple(lr_up, self.pixel_multiple) * 2 - 1
        factor, scaling = self.vae_factor, self.vae.config.scaling_factor
        dtype = self.vae.dtype  # VAE and CFW; the denoiser casts its own inputs (sample_latents)
        if self.tile:
            mean = tiled_encode(self.vae, image.to(dtype), self.tile, self.tile_overlap, norm_stats="exact",
                                resident_bytes=self.tile_memory)
        else:
            mean = self.vae.encode(image.to(dtype)).latent_dist.mode()
        latent_tile = self.tile and self.tile // factor
        z_0 = sample_latents(
            self.denoiser,
            mean.float() * scaling,
            self.prompt(lr),
            num_steps=self.steps,
            scheduler=self.scheduler,
            generator=torch.Generator().manual_seed(self.seed),
            tile=latent_tile or None,
            overlap=(self.tile_overlap // factor) if latent_tile else None,
            progress=progress,
        )
        latents = (z_0 / scaling).to(dtype)
        if self.tile:
            decoded = self.autoencoder.tiled_decode(latents, image.to(dtype), w, latent_tile,
                                                    resident_bytes=self.tile_memory)
        else:
            features = self.autoencoder.encoder_features(image.to(dtype)) if w > 0 else None
            decoded = self.autoencoder.decode(latents, features, w)
        sr = crop_to((decoded.float() + 1) / 2, height, width)
        return apply_color_fix(self.color_fix, sr, lr_up).clamp(0, 1)

    # ---- storage ----

    def save_pretrained_dir(self, path: str | Path) -> Path:
        """Write vae/, unet/, conditioner/, cfw/, scheduler/, the prompt and restorer.json under ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name in ("vae", "unet", "conditioner", "cfw"):
            getattr(self, name).save_pretrained(path / name)
        self.scheduler.save_pretrained(path / "scheduler")
        save_file({"embedding": self.prompt.embedding.contiguous()}, path / PROMPT_EMBEDDING_FILE)
        config = {
            "class": CLASS_NAME,
            "method": self.method,
            "scale": self.scale,
            "steps": self.steps,
            "w": self.w,
            "color_fix": self.color_fix,
            "seed": self.seed,
            "prompt_embedding": PROMPT_EMBEDDING_FILE,
        }
        (path / RESTORER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained_dir(cls, path: str | Path, **options: object) -> StableSRRestorer:
        """Load what :meth:`save_pretrained_dir` wrote; ``options`` (``w``, ``steps``, ``tile``…)
        override restorer.json."""
        path = Path(path)
        config = json.loads((path / RESTORER_CONFIG).read_text())
        if config.pop("class", None) != CLASS_NAME:
            raise ValueError(f"{path / RESTORER_CONFIG}: not a {CLASS_NAME}")
        embedding = load_file(path / config.pop("prompt_embedding"))["embedding"]
        return cls(
            AutoencoderKL.from_pretrained(path / "vae"),
            UNet2DConditionModel.from_pretrained(path / "unet"),
            StableSRConditioner.from_pretrained(path / "conditioner"),
            CFWModule.from_pretrained(path / "cfw"),
            scheduler=DDPMScheduler.from_pretrained(path / "scheduler"),
            prompt=NullPrompt(embedding),
            **{**config, **options},
        )
