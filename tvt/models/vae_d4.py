"""VAE-D4: TVT's compact 4x autoencoder whose latents live in SD's latent space (docs/method.md §1.1).

SD's VAE downsamples 8x, and fine structures (small text, textures) do not survive its
latent. VAE-D4 downsamples only 4x: a 512² image becomes a 4×128×128 latent, which
Transfer VAE Training aligns with SD's latent space at twice the spatial density, so the
pre-trained SD UNet keeps its prior.

The paper's VAE-D4 has **no mid-block and no attention**, which stock
``diffusers.AutoencoderKL`` cannot express (it always builds a mid-block). The encoder and
decoder are therefore assembled here from diffusers' own ``DownEncoderBlock2D`` /
``UpDecoderBlock2D`` (ResnetBlock2D + Downsample2D / Upsample2D) and, for the V1 ablation
only, ``UNetMidBlock2D``. Module names follow ``AutoencoderKL`` exactly (``encoder.down_blocks.0
.resnets.0...``, ``quant_conv``...), so the official TVT VAE-D4 has the same keys and shapes —
its Lightning ``vae.ckpt`` prefixes each with ``vaeDe4.``, which ``tvt import tvt``
(tvt/official/tvt.py) strips before a strict load — and ``encode``/``decode``/``forward`` keep
AutoencoderKL's contract so callers can swap the two.
"""

from __future__ import annotations

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import (
    DownEncoderBlock2D,
    UNetMidBlock2D,
    UpDecoderBlock2D,
)
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

_EPS = 1e-6  # SD's VAE GroupNorm epsilon


def _mid_block(channels: int, norm_num_groups: int, attention: bool) -> UNetMidBlock2D:
    """SD-VAE's mid-block (two ResNets, optional single-head attention) — V1 ablation only."""
    return UNetMidBlock2D(
        in_channels=channels,
        temb_channels=None,
        resnet_eps=_EPS,
        resnet_act_fn="silu",
        resnet_groups=norm_num_groups,
        output_scale_factor=1,
        resnet_time_scale_shift="default",
        attention_head_dim=channels,
        add_attention=attention,
    )


class D4Encoder(nn.Module):
    """conv_in → stages of ResNets with a stride-2 downsample between stages → (mid) → norm/SiLU/conv_out.

    Outputs ``2 * latent_channels`` maps (mean and log-variance).
    """

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        channels: tuple[int, ...],
        layers_per_block: int,
        mid_block: bool,
        mid_block_attention: bool,
        norm_num_groups: int,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(
                in_channels=channels[max(i - 1, 0)],
                out_channels=out,
                num_layers=layers_per_block,
                resnet_eps=_EPS,
                resnet_act_fn="silu",
                resnet_groups=norm_num_groups,
                add_downsample=i < len(channels) - 1,
                downsample_padding=0,  # SD-VAE's asymmetric (0, 1, 0, 1) padding
            )
            for i, out in enumerate(channels)
        )
        self.mid_block = _mid_block(channels[-1], norm_num_groups, mid_block_attention) if mid_block else None
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, channels[-1], eps=_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        stages = [*self.down_blocks, *([self.mid_block] if self.mid_block is not None else [])]
        for stage in stages:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                sample = self._gradient_checkpointing_func(stage, sample)
            else:
                sample = stage(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class D4Decoder(nn.Module):
    """conv_in → (mid) → stages of ResNets with nearest-×2 + conv upsampling between stages → norm/SiLU/conv_out."""

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        channels: tuple[int, ...],
        layers_per_block: int,
        mid_block: bool,
        mid_block_attention: bool,
        norm_num_groups: int,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, channels[0], kernel_size=3, padding=1)
        self.mid_block = _mid_block(channels[0], norm_num_groups, mid_block_attention) if mid_block else None
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(
                in_channels=channels[max(i - 1, 0)],
                out_channels=out,
                num_layers=layers_per_block,
                resnet_eps=_EPS,
                resnet_act_fn="silu",
                resnet_groups=norm_num_groups,
                add_upsample=i < len(channels) - 1,
            )
            for i, out in enumerate(channels)
        )
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, channels[-1], eps=_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(latent)
        stages = [*([self.mid_block] if self.mid_block is not None else []), *self.up_blocks]
        for stage in stages:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                sample = self._gradient_checkpointing_func(stage, sample)
            else:
                sample = stage(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class VAED4(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Compact KL autoencoder with ``len(encoder_channels) - 1`` downsamples (4x for the paper's three stages).

    ``decoder_channels`` are listed in the order the decoder runs them, and
    ``decoder_layers_per_block`` is the number of ResNets per decoder stage (AutoencoderKL's
    decoder uses ``layers_per_block + 1``; here it is explicit). Images must have sides that
    are multiples of :attr:`downsample_factor`.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 4,
        encoder_channels: tuple[int, ...] = (128, 256, 256),
        encoder_layers_per_block: int = 2,
        decoder_channels: tuple[int, ...] = (256, 256, 128),
        decoder_layers_per_block: int = 3,
        mid_block: bool = False,
        mid_block_attention: bool = False,
        norm_num_groups: int = 32,
        scaling_factor: float = 0.18215,
    ):
        super().__init__()
        if len(encoder_channels) != len(decoder_channels):
            raise ValueError(
                f"VAED4 needs as many decoder stages as encoder stages (one upsample per downsample); "
                f"got encoder_channels={tuple(encoder_channels)}, decoder_channels={tuple(decoder_channels)}"
            )
        if mid_block_attention and not mid_block:
            raise ValueError("VAED4: mid_block_attention=True needs mid_block=True")
        self.encoder = D4Encoder(
            in_channels,
            latent_channels,
            tuple(encoder_channels),
            encoder_layers_per_block,
            mid_block,
            mid_block_attention,
            norm_num_groups,
        )
        self.decoder = D4Decoder(
            latent_channels,
            out_channels,
            tuple(decoder_channels),
            decoder_layers_per_block,
            mid_block,
            mid_block_attention,
            norm_num_groups,
        )
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, kernel_size=1)

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (4 for the paper's VAE-D4)."""
        return 2 ** (len(self.config.encoder_channels) - 1)

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Images in [-1, 1] (B, C, H, W) → diagonal Gaussian over (B, latent_channels, H/f, W/f)."""
        f = self.downsample_factor
        height, width = x.shape[-2:]
        if height % f or width % f:
            raise ValueError(
                f"VAED4.encode needs image sides that are multiples of {f} (its downsample factor); "
                f"got {height}x{width}. Pad or crop the image first."
            )
        posterior = DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Unscaled latents (B, latent_channels, h, w) → images (B, out_channels, h·f, w·f)."""
        sample = self.decoder(self.post_quant_conv(z))
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple:
        """Reconstruct ``sample`` through the posterior's mode (or a sample of it)."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
