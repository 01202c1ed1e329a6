"""The one-step diffusion restorer shared by TVT and OSEDiff (docs/method.md §1.4).

    LR (B, 3, h, w) in [0, 1]
      → bicubic ×scale, reflect-padded to what VAE and UNet need
      → z_L = E(x) · scaling_factor           (posterior mean: deterministic)
      → ε = UNet(z_L, t, c)                   (one call, fixed timestep t)
      → ẑ_H = (z_L − √(1−ᾱ_t) ε) / √ᾱ_t       (the DDPM x₀-prediction, closed form)
      → D(ẑ_H / scaling_factor), cropped, colour-fixed against the upsampled LR, clamped
    SR (B, 3, scale·h, scale·w) in [0, 1]

TVT is VAE-D4 + CE-UNet at t = 1; OSEDiff is SD's VAE-D8 + UNet at t = 999. The two are the
same module with other parts and config values, so every ablation is a configuration too.
The pieces (:meth:`~OneStepRestorer.encode_lr`, :meth:`~OneStepRestorer.denoise`,
:meth:`~OneStepRestorer.decode`) keep gradients for the training stages. With ``tile`` set,
encoder and decoder run on pixel/latent tiles and the UNet on latent tiles (tiling.py), so
any image size fits in memory.

A restorer is stored as a folder in diffusers' pipeline layout — ``vae/``, ``unet/``,
``scheduler/`` (``save_pretrained``, safetensors) — plus ``restorer.json`` (its ``prompt``: the
:class:`~tvt.models.prompts.PromptRecipe` of a restorer trained on tags, else null) and, for a fixed
prompt, ``prompt_embedding.safetensors``. LoRA adapters are merged into the stored weights,
so a saved restorer loads without peft.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from tvt.models.ce_unet import CEUNet
from tvt.models.color_fix import COLOR_FIX_MODES, apply_color_fix
from tvt.models.prompts import NullPrompt, PromptProvider, PromptRecipe
from tvt.models.pruned_unet import PrunedUNet
from tvt.models.skip_vae import SkipAutoencoderKL
from tvt.models.tiling import (
    NORM_STATS_MODES,
    crop_to,
    pad_to_multiple,
    tiled_apply,
    tiled_decode,
    tiled_encode,
    vae_downsample_factor,
)
from tvt.models.vae_d4 import VAED4

TVT_TIMESTEP = 1  # official TVT code; ᾱ_1 ≈ 0.9983
OSEDIFF_TIMESTEP = 999
RESTORER_CONFIG = "restorer.json"
PROMPT_EMBEDDING_FILE = "prompt_embedding.safetensors"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' name, so from_pretrained finds it
_MODEL_CLASSES = {
    cls.__name__: cls for cls in (AutoencoderKL, SkipAutoencoderKL, VAED4, UNet2DConditionModel, CEUNet, PrunedUNet)
}


def sd_noise_scheduler() -> DDPMScheduler:
    """Stable Diffusion's training schedule: 1000 steps, scaled-linear betas 0.00085 → 0.012, ε-prediction."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def predict_x0(z_t: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """Clean latent from a noisy one and its predicted noise: (z_t − √(1−ᾱ) ε) / √ᾱ."""
    return (z_t - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)


def _unet_config(unet: nn.Module):
    """The config of the SD UNet itself (CE-UNet and the pruned UNet of ablation S5 wrap one)."""
    return unet.unet.config if isinstance(unet, CEUNet | PrunedUNet) else unet.config


def unet_latent_multiple(unet: nn.Module) -> int:
    """Latent side multiple at which the UNet's downsamplings need no padding."""
    if isinstance(unet, CEUNet):
        return 2 * unet.inner_size_multiple  # the 2x stem halves the latent first
    return 2**unet.num_upsamplers


class OneStepRestorer(nn.Module):
    """VAE encoder → one UNet step at a fixed timestep → VAE decoder → colour fix."""

    def __init__(
        self,
        vae: nn.Module,
        unet: nn.Module,
        *,
        method: str,
        timestep: int,
        scale: int = 4,
        color_fix: str = "adain",
        prompt: PromptProvider | None = None,
        prompt_recipe: PromptRecipe | None = None,
        scheduler: DDPMScheduler | None = None,
        tile: int | None = None,
        tile_overlap: int | None = None,
        tile_norm_stats: str = "exact",
    ):
        """
        Args:
            vae: ``VAED4`` or ``AutoencoderKL`` (AutoencoderKL's encode/decode contract).
            unet: ``CEUNet`` or ``UNet2DConditionModel`` predicting ε.
            method: name stored with the weights ("tvt", "osediff", an ablation...).
            timestep: the fixed diffusion timestep t of the single step.
            scale: super-resolution factor; the LR is bicubic-upsampled by it first.
            color_fix: "adain", "wavelet" or "none".
            prompt: text conditioning; default: zero embeddings (:meth:`NullPrompt.zeros`).
            prompt_recipe: how it was trained to be prompted (tags of a tagger), saved as
                ``restorer.json``'s ``prompt`` for ``tvt sr``'s default; None: the null prompt.
            scheduler: gives ᾱ_t; default: :func:`sd_noise_scheduler`.
            tile, tile_overlap: tile side (a multiple of :attr:`pixel_multiple`) and overlap in
                *output* pixels (None: untiled; overlap defaults to a quarter tile). Latent
                tiles are these over the VAE factor.
            tile_norm_stats: GroupNorm statistics when tiled (tiling.py): "exact" (default) pools
                the VAE's over all tiles (tiled_vae.py; the UNet, whose attention is global at
                every level, keeps per-tile statistics); "tile" or "image" apply to both.
        """
        super().__init__()
        if color_fix not in COLOR_FIX_MODES:
            raise ValueError(f"unknown colour fix {color_fix!r}; expected one of {COLOR_FIX_MODES}")
        if tile_norm_stats not in NORM_STATS_MODES:
            raise ValueError(f"unknown tile_norm_stats {tile_norm_stats!r}; expected one of {NORM_STATS_MODES}")
        self.vae = vae
        self.unet = unet
        self.scheduler = scheduler or sd_noise_scheduler()
        steps = self.scheduler.config.num_train_timesteps
        if not 0 <= timestep < steps:
            raise ValueError(f"timestep must be in [0, {steps}), got {timestep}")
        if self.scheduler.config.prediction_type != "epsilon":
            raise ValueError("OneStepRestorer's closed-form step expects an ε-predicting UNet")
        latent_channels, unet_channels = vae.config.latent_channels, _unet_config(unet).in_channels
        if latent_channels != unet_channels:
            raise ValueError(
                f"the VAE's {latent_channels} latent channels do not match the UNet's {unet_channels} inputs"
            )
        self.method = method
        self.timestep = timestep
        self.scale = scale
        self.color_fix = color_fix
        self.prompt = prompt if prompt is not None else NullPrompt.zeros(_unet_config(unet).cross_attention_dim)
        self.prompt_recipe = prompt_recipe
        if tile is not None and tile % self.pixel_multiple:
            raise ValueError(f"tile must be a multiple of {self.pixel_multiple} px, got {tile}")
        self.tile = tile
        self.tile_overlap = tile_overlap if tile_overlap is not None else (tile or 0) // 4
        self.tile_norm_stats = tile_norm_stats
        self.tile_memory: int | None = None  # exact tiling's RAM budget for tile states (bytes; None: the device's)

    # ---- geometry ----

    @property
    def vae_factor(self) -> int:
        return vae_downsample_factor(self.vae)

    @property
    def latent_multiple(self) -> int:
        return unet_latent_multiple(self.unet)

    @property
    def pixel_multiple(self) -> int:
        """Image side multiple that VAE and UNet take without internal padding (64 for both paper models)."""
        return self.vae_factor * self.latent_multiple

    @property
    def alpha_bar(self) -> float:
        """ᾱ_t of the fixed timestep."""
        return float(self.scheduler.alphas_cumprod[self.timestep])

    @property
    def eps_error_gain(self) -> float:
        """How much an error in the UNet's ε grows in ẑ_H: √(1−ᾱ_t)/√ᾱ_t (:func:`predict_x0`).

        0.04 at TVT's t = 1, 14.6 at OSEDiff's t = 999: a reduced-precision UNet is near-exact for the
        first and not for the second (tvt.inference.fastest_exact_options)."""
        return math.sqrt(1 - self.alpha_bar) / math.sqrt(self.alpha_bar)

    # ---- pieces (differentiable; tiled when ``tile`` is set) ----

    def upsample_lr(self, lr: torch.Tensor) -> torch.Tensor:
        """Bicubic ×scale, clamped back to [0, 1] (bicubic overshoots at edges)."""
        return F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(0, 1)

    def encode_lr(self, lr_up: torch.Tensor, *, sample: bool = False) -> torch.Tensor:
        """z_L: scaled posterior mean of the upsampled LR ([0, 1], sides multiples of :attr:`pixel_multiple`);
        a posterior sample with ``sample=True`` (what the official training forward feeds the UNet)."""
        return self.encode_lr_with_skips(lr_up, sample=sample)[0]

    def encode_lr_with_skips(
        self, lr_up: torch.Tensor, *, sample: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(z_L as :meth:`encode_lr`, the encoder features that a VAE with skip connections decodes with:
        :class:`~tvt.models.skip_vae.SkipAutoencoderKL`, ablation S2; None for any other VAE).

        S2's VAE runs untiled whatever ``tile`` says (its decoder reads the encoder features of the
        whole image); its UNet is tiled as any other."""
        x, skips = lr_up * 2 - 1, None
        if isinstance(self.vae, SkipAutoencoderKL):
            posterior, skips = self.vae.encode_with_skips(x)
            mean = posterior.latent_dist.sample() if sample else posterior.latent_dist.mode()
        elif self.tile and self.tile_norm_stats == "exact" and not sample:
            mean = tiled_encode(self.vae, x, self.tile, 0, norm_stats="exact", resident_bytes=self.tile_memory)
        else:
            encode = lambda x: self.vae.encode(x).latent_dist.sample() if sample else self.vae.encode(x).latent_dist.mode()
            mean = self._tiled(encode, x, self.tile, 1 / self.vae_factor, self.vae)
        return mean * self.vae.config.scaling_factor, skips

    def denoise(self, z_l: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """ẑ_H: the x₀-prediction of one UNet call at the fixed timestep."""
        timesteps = torch.full((z_l.shape[0],), self.timestep, device=z_l.device, dtype=torch.long)
        dtype = self.unet.dtype
        predict_eps = lambda z: self.unet(z.to(dtype), timesteps, prompt_embeds.to(dtype)).sample
        tile = self.tile and self.tile // self.vae_factor
        eps = self._tiled(predict_eps, z_l, tile, 1, self.unet, multiple=self.latent_multiple)
        return predict_x0(z_l, eps.to(z_l.dtype), self.alpha_bar)

    def decode(self, z_h: torch.Tensor, skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Image in [0, 1] (not clamped, so losses see the raw output) from a scaled latent; ``skips``:
        the encoder features of :meth:`encode_lr_with_skips` (S2's decoder reads them)."""
        tile = self.tile and self.tile // self.vae_factor
        z = z_h / self.vae.config.scaling_factor
        if skips is not None:
            image = self.vae.decode(z, skips=skips).sample
        elif tile and self.tile_norm_stats == "exact":
            image = tiled_decode(self.vae, z, tile, 0, norm_stats="exact", resident_bytes=self.tile_memory)
        else:
            decode = lambda z: self.vae.decode(z).sample
            image = self._tiled(decode, z, tile, self.vae_factor, self.vae)
        return (image + 1) / 2

    def _tiled(self, fn, x, tile, scale_out, norm_module, multiple=1):
        if not tile:
            return fn(x)
        overlap = round(self.tile_overlap * tile / self.tile)
        return tiled_apply(
            fn,
            x,
            tile,
            overlap,
            scale_out,
            multiple=multiple,
            norm_module=norm_module,
            norm_stats="tile" if self.tile_norm_stats == "exact" else self.tile_norm_stats,
        )

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """SR (B, 3, scale·h, scale·w) in [0, 1] from LR (B, 3, h, w) in [0, 1]; any h, w."""
        height, width = lr.shape[-2] * self.scale, lr.shape[-1] * self.scale
        lr_up = self.upsample_lr(lr)
        z_l, skips = self.encode_lr_with_skips(pad_to_multiple(lr_up, self.pixel_multiple))
        z_h = self.denoise(z_l, self.prompt(lr))
        sr = crop_to(self.decode(z_h, skips), height, width)
        return apply_color_fix(self.color_fix, sr, lr_up).clamp(0, 1)

    # ---- storage ----

    def save_pretrained_dir(self, path: str | Path) -> Path:
        """Write vae/, unet/, scheduler/, restorer.json (and the prompt embedding) under ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, model in (("vae", self.vae), ("unet", self.unet)):
            model.save_config(path / name)
            save_file(_merged_state_dict(model), path / name / WEIGHTS_FILE)
        self.scheduler.save_pretrained(path / "scheduler")
        prompt_file = None
        if isinstance(self.prompt, NullPrompt):
            prompt_file = PROMPT_EMBEDDING_FILE
            save_file({"embedding": self.prompt.embedding.contiguous()}, path / prompt_file)
        config = {
            "method": self.method,
            "timestep": self.timestep,
            "scale": self.scale,
            "color_fix": self.color_fix,
            "prompt_embedding": prompt_file,
            "prompt": self.prompt_recipe.to_json() if self.prompt_recipe is not None else None,
        }
        (path / RESTORER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained_dir(
        cls, path: str | Path, *, prompt: PromptProvider | None = None, **options: object
    ) -> OneStepRestorer:
        """Load a restorer saved by :meth:`save_pretrained_dir`.

        ``prompt`` replaces the stored prompt; ``options`` (e.g. ``color_fix``, ``tile``)
        override restorer.json or set inference options.
        """
        path = Path(path)
        config_file = path / RESTORER_CONFIG
        if not config_file.exists():
            raise FileNotFoundError(f"{path} is not a saved restorer: {RESTORER_CONFIG} is missing")
        config = json.loads(config_file.read_text())
        models = {}
        for name in ("vae", "unet"):
            class_name = json.loads((path / name / "config.json").read_text())["_class_name"]
            if class_name not in _MODEL_CLASSES:
                raise ValueError(f"{path / name}: unknown model class {class_name!r}; known: {sorted(_MODEL_CLASSES)}")
            models[name] = _MODEL_CLASSES[class_name].from_pretrained(path / name)
        embedding_file = config.pop("prompt_embedding")
        recipe = PromptRecipe.from_json(config.pop("prompt", None))  # absent in folders saved before it: null
        if prompt is None and embedding_file is not None:
            prompt = NullPrompt(load_file(path / embedding_file)["embedding"])
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
        return cls(models["vae"], models["unet"], prompt=prompt, scheduler=scheduler,
                   **{**config, "prompt_recipe": recipe, **options})


def _merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights with active LoRA adapters folded into their base layers and peft's names removed."""
    state = model.state_dict()
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and not layer.merged and not layer.disable_adapters:
            weight = layer.get_base_layer().weight.detach().clone()
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    weight += layer.get_delta_weight(adapter).to(weight.dtype)
            state[f"{name}.base_layer.weight"] = weight
    return {key.replace(".base_layer.", "."): value.contiguous() for key, value in state.items() if ".lora_" not in key}


def build_tvt_restorer(vae_d4: nn.Module, unet: nn.Module, **options: object) -> OneStepRestorer:
    """TVT: VAE-D4 + CE-UNet at t = 1. A plain SD UNet is wrapped with :meth:`CEUNet.from_unet`."""
    if isinstance(unet, UNet2DConditionModel):
        unet = CEUNet.from_unet(unet)
    options.setdefault("timestep", TVT_TIMESTEP)
    return OneStepRestorer(vae_d4, unet, method="tvt", **options)


def build_osediff_restorer(vae_d8: nn.Module, unet: nn.Module, **options: object) -> OneStepRestorer:
    """OSEDiff: SD's VAE-D8 + SD UNet at t = 999 (the S1 ablation of the paper)."""
    options.setdefault("timestep", OSEDIFF_TIMESTEP)
    return OneStepRestorer(vae_d8, unet, method="osediff", **options)
