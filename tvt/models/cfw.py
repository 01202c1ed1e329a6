"""StableSR's controllable feature wrapping (CFW, docs/method.md §1.5): the LR image steers SD's decoder.

A diffusion sample is realistic but not faithful: SD's 8× decoder invents detail the LR
image contradicts. CFW feeds features of the LR image — bicubic-upsampled to the output
size and passed through the *frozen* VAE-D8 encoder — into the *frozen* decoder at the
resolutions where both networks have feature maps of the same size and width:

    F_m = F_d + w · C(F_e, F_d; θ),

with C a trainable fusion block and the scalar w ∈ [0, 1] chosen at inference (0: the
plain SD decoder, realism; 1: what CFW was trained for, fidelity).

Where the features meet (StableSR's ``Encoder(return_fea=True)`` / ``Decoder_Mix``): for a
VAE of n resolution levels, at every level i with 0 < i < n − 1 (SD's 2.1 VAE: i = 1, 2,
i.e. ½ and ¼ of the image size, 256 and 512 channels),

* F_e = output of the last ResNet of ``vae.encoder.down_blocks[i]`` (before its downsampler),
* F_d = output of the last ResNet of ``vae.decoder.up_blocks[n − 1 − i]`` (before its
  upsampler) — the decoder's level of the same size and width.

Both are reached with forward hooks on diffusers' own ``AutoencoderKL`` — no copied VAE
code — installed only for the duration of a :class:`CFWAutoencoder` call, so the same VAE
object decodes plainly everywhere else. The encoder runs whole (its last level, mid-block and
``conv_out`` are wasted work, 18 % of SD's encoder MACs at 512²) so that it stays diffusers'
forward, gradient checkpointing and all.

Large images decode exactly tiled (:meth:`CFWAutoencoder.tiled_decode`): the encoder's
features are computed once over the whole image, tile by tile, and every decoder tile reads its
window of them, so the result is the untiled one (tiled_vae.py).

Cost for SD 2.1's VAE at 512² (MACs of convolutions/linears, meta-device count): CFW has
44.4 M parameters and adds 1.24 T MACs to the decoder's 1.24 T, plus the encoder's 0.54 T.

C is StableSR's ``Fuse_sft_block_RRDB`` built from library parts: ResNet block (2C → C) on
the concatenation, ``num_rrdb_blocks`` RRDBs (basicsr, ESRGAN's block), ResNet block (C → C);
diffusers' ``ResnetBlock2D`` without a time embedding is exactly StableSR's ``ResBlock``.
"""

from __future__ import annotations

from tvt import compat

compat.apply()  # basicsr and diffusers import torchvision

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from basicsr.archs.rrdbnet_arch import RRDB
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from tvt.models.tiled_vae import (
    FeatureMap,
    Op,
    decoder_program,
    default_resident_bytes,
    encoder_program,
    exact_tiled_decode,
    module_end,
    resnet_ops,
    rrdb_op,
    run_tiled,
    run_untiled,
    split_tiled,
)
from tvt.models.tiling import vae_downsample_factor

#: StableSR's fusion depth (``num_fuse_block``) and RRDB growth channels
STABLESR_RRDB_BLOCKS = 2
STABLESR_GROWTH_CHANNELS = 32


class FusionBlock(nn.Module):
    """C(F_e, F_d): ResNet(2C → C) → RRDB × n → ResNet(C → C) (StableSR's ``Fuse_sft_block_RRDB``)."""

    def __init__(self, channels: int, num_rrdb_blocks: int, growth_channels: int, norm_num_groups: int):
        super().__init__()
        self.merge = ResnetBlock2D(
            in_channels=2 * channels, out_channels=channels, temb_channels=None, groups=norm_num_groups
        )
        self.body = nn.Sequential(*(RRDB(channels, growth_channels) for _ in range(num_rrdb_blocks)))
        self.out = ResnetBlock2D(
            in_channels=channels, out_channels=channels, temb_channels=None, groups=norm_num_groups
        )

    def forward(self, encoder_feature: torch.Tensor, decoder_feature: torch.Tensor) -> torch.Tensor:
        merged = self.merge(torch.cat([encoder_feature, decoder_feature], dim=1), None)
        return self.out(self.body(merged), None)

    def program(self, name: str) -> list[Op]:
        """:meth:`forward` after the concatenation, as exact-tiling tasks (tiled_vae.py): the ResNet
        blocks' GroupNorms pool their statistics over the tiles, the RRDBs are local."""
        return [
            *resnet_ops(self.merge, f"{name}.merge"),
            *(rrdb_op(block, f"{name}.body.{i}") for i, block in enumerate(self.body)),
            *resnet_ops(self.out, f"{name}.out"),
        ]


class CFWModule(ModelMixin, ConfigMixin):
    """The trainable part of CFW: one :class:`FusionBlock` per fused VAE level.

    ``levels`` are encoder level indices (see the module docstring), ``channels`` their widths.
    Build it for a VAE with :meth:`for_vae`.
    """

    @register_to_config
    def __init__(
        self,
        levels: Sequence[int] = (1, 2),
        channels: Sequence[int] = (256, 512),
        num_rrdb_blocks: int = STABLESR_RRDB_BLOCKS,
        growth_channels: int = STABLESR_GROWTH_CHANNELS,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        if len(levels) != len(channels) or not levels:
            raise ValueError(f"CFW needs one width per fused level, got levels={levels}, channels={channels}")
        self.levels = tuple(int(level) for level in levels)
        self.fusions = nn.ModuleList(
            FusionBlock(width, num_rrdb_blocks, growth_channels, norm_num_groups) for width in channels
        )

    @classmethod
    def for_vae(cls, vae: AutoencoderKL, **kwargs) -> CFWModule:
        """StableSR's placement for ``vae``: every level but the first (full size) and the last
        (latent size); ``kwargs`` override the other settings (e.g. ``num_rrdb_blocks``)."""
        widths = tuple(vae.config.block_out_channels)
        if len(widths) < 3:
            raise ValueError(
                f"CFW fuses at the VAE's intermediate resolutions; a VAE with {len(widths)} "
                f"levels (block_out_channels={widths}) has none"
            )
        levels = tuple(range(1, len(widths) - 1))
        settings = {"norm_num_groups": vae.config.norm_num_groups, **kwargs}
        return cls(levels=levels, channels=tuple(widths[i] for i in levels), **settings)

    @property
    def last_layer(self) -> torch.Tensor:
        """The trainable weight nearest the output image: the final conv of the fusion at the
        finest fused level (the layer LDM's adaptive GAN weight is computed at)."""
        finest = self.levels.index(min(self.levels))
        return self.fusions[finest].out.conv2.weight

    def fuse(self, index: int, encoder_feature: torch.Tensor, decoder_feature: torch.Tensor, w: float) -> torch.Tensor:
        """F_d + w · C(F_e, F_d) at fused level number ``index`` (in this module's dtype)."""
        dtype = self.fusions[index].merge.conv1.weight.dtype
        residual = self.fusions[index](encoder_feature.to(dtype), decoder_feature.to(dtype))
        return decoder_feature + w * residual.to(decoder_feature.dtype)


@contextlib.contextmanager
def forward_hooks(pairs) -> Iterator[None]:
    """Register ``(module, hook)`` forward hooks for the duration of a ``with`` block."""
    handles = [module.register_forward_hook(hook) for module, hook in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def captured_outputs(taps: Sequence[nn.Module], call: Callable[[], Any]) -> tuple[Any, list[torch.Tensor]]:
    """``call()``'s result and the output of every module in ``taps`` during it, in ``taps``' order
    (how encoder features are read without copying the encoder's forward)."""
    captured: dict[int, torch.Tensor] = {}

    def capture(index):
        def hook(_module, _inputs, output):
            captured[index] = output

        return hook

    with forward_hooks([(tap, capture(i)) for i, tap in enumerate(taps)]):
        result = call()
    return result, [captured[i] for i in range(len(taps))]


class CFWAutoencoder(nn.Module):
    """A frozen ``AutoencoderKL`` with a :class:`CFWModule` wired into its decoder.

    Images are in [-1, 1]; ``latents`` are *unscaled* (divide a UNet's latent by
    ``vae.config.scaling_factor`` first). The LR image must already be upsampled to the output
    size (bicubic, as StableSR).
    """

    def __init__(self, vae: AutoencoderKL, cfw: CFWModule):
        super().__init__()
        widths = tuple(vae.config.block_out_channels)
        bad = [
            (level, width)
            for level, width in zip(cfw.levels, cfw.config.channels)
            if not 0 < level < len(widths) - 1 or widths[level] != width
        ]
        if bad:
            raise ValueError(
                f"CFW levels/widths {bad} do not match the VAE (block_out_channels={widths}); "
                "build the CFW with CFWModule.for_vae(vae)"
            )
        self.vae = vae
        self.cfw = cfw
        self.factor = vae_downsample_factor(vae)
        last = len(widths) - 1
        self._encoder_taps = [vae.encoder.down_blocks[level].resnets[-1] for level in cfw.levels]
        self._decoder_taps = [vae.decoder.up_blocks[last - level].resnets[-1] for level in cfw.levels]

    def encoder_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """F_e of the (upsampled) LR ``image`` at every fused level, finest first as in ``cfw.levels``."""
        _, features = captured_outputs(self._encoder_taps, lambda: self.vae.encoder(image.to(self.vae.dtype)))
        return features

    def decode(self, latents: torch.Tensor, features: Sequence[torch.Tensor] | None, w: float = 1.0) -> torch.Tensor:
        """The image decoded from unscaled ``latents`` with F_e fused at weight ``w``.

        ``w = 0`` is the plain ``vae.decode(latents).sample``, exactly (CFW does not run, and
        ``features`` may be ``None``).
        """
        w = _checked_weight(w)
        if w == 0.0:
            return self.vae.decode(latents).sample
        if features is None or len(features) != len(self._decoder_taps):
            raise ValueError(
                f"decode with w={w} needs {len(self._decoder_taps)} encoder feature maps "
                f"(from encoder_features), got {None if features is None else len(features)}"
            )
        if self.vae.use_slicing or self.vae.use_tiling:
            raise ValueError(
                "CFW decoding needs the whole batch and image in one decoder pass: disable the "
                "VAE's slicing/tiling and use CFWAutoencoder.tiled_decode for large images"
            )
        if torch.is_grad_enabled() and self.vae.decoder.gradient_checkpointing:
            raise ValueError(
                "CFW hooks are removed after the call, so a checkpointed decoder would recompute "
                "without them; disable gradient checkpointing on the VAE decoder"
            )

        def fuse(index):
            def hook(_module, _inputs, output):
                feature = features[index]
                if feature.shape[0] != output.shape[0] or feature.shape[1:] != output.shape[1:]:
                    raise ValueError(
                        f"CFW level {self.cfw.levels[index]}: encoder feature {tuple(feature.shape)} does not match "
                        f"decoder feature {tuple(output.shape)}; the LR image must be upsampled to "
                        f"{self.factor}x the latent size"
                    )
                return self.cfw.fuse(index, feature, output, w)

            return hook

        with forward_hooks([(tap, fuse(i)) for i, tap in enumerate(self._decoder_taps)]):
            return self.vae.decode(latents).sample

    def forward(self, latents: torch.Tensor, image: torch.Tensor, w: float = 1.0) -> torch.Tensor:
        """``decode(latents, encoder_features(image), w)``; the encoder is skipped at ``w = 0``."""
        self._check_image(latents, image)
        return self.decode(latents, self.encoder_features(image) if float(w) else None, w)

    def _check_image(self, latents: torch.Tensor, image: torch.Tensor) -> None:
        expected = tuple(s * self.factor for s in latents.shape[-2:])
        if tuple(image.shape[-2:]) != expected:
            raise ValueError(
                f"the LR image is {tuple(image.shape[-2:])}, expected {expected} "
                f"({self.factor}x the latent {tuple(latents.shape[-2:])}): upsample it first"
            )

    @torch.no_grad()
    def tiled_decode(
        self,
        latents: torch.Tensor,
        image: torch.Tensor,
        w: float,
        tile: int,
        *,
        resident_bytes: int | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` on latent tiles of about ``tile`` px, exactly (tiled_vae.py), so memory
        depends on ``tile`` and ``resident_bytes`` (by default
        :func:`~tvt.models.tiled_vae.default_resident_bytes`), not on the image.

        1. The encoder up to the deepest fused level runs exactly tiled over ``image`` (tiles of
           ``tile`` x the VAE factor) and writes F_e of every fused level into a
           :class:`~tvt.models.tiled_vae.FeatureMap` — in RAM when they fit ``resident_bytes``
           together, else on disk (the tile states then get the whole budget).
        2. The decoder runs exactly tiled with F_d + w · C(F_e, F_d) as tasks after each decoder
           tap: F_e read over the tile's window, C's GroupNorms pooled over the tiles like the
           decoder's, and C's receptive radius (two 3x3 convs per ResNet block, 15 per RRDB) part
           of the halo.

        So the result is :meth:`forward`'s up to float rounding (StableSR's own tiling,
        ``scripts/sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py``, decodes each ``ImageSpliterTh``
        patch with the encoder features of that patch and per-patch statistics, and blends). At
        ``w = 0`` the encoder does not run: this is the plain exact tiled decode.
        """
        w = _checked_weight(w)
        self._check_image(latents, image)
        if resident_bytes is None:
            resident_bytes = default_resident_bytes(latents.device)
        if w == 0.0:
            return exact_tiled_decode(self.vae, latents, tile, resident_bytes=resident_bytes)
        names = {module: name for name, module in self.vae.named_modules()}
        height, width = image.shape[-2:]
        sizes = [(height >> level, width >> level) for level in self.cfw.levels]
        feature_bytes = (
            self.vae.dtype.itemsize
            * image.shape[0]
            * sum(channels * h * w_ for channels, (h, w_) in zip(self.cfw.config.channels, sizes, strict=True))
        )
        on_disk = feature_bytes > resident_bytes
        budget = resident_bytes if on_disk else resident_bytes - feature_bytes
        maps = [FeatureMap(on_disk=on_disk) for _ in self.cfw.levels]
        try:
            # the encoder up to its deepest tap, writing the shallower taps on the way
            encoder = encoder_program(self.vae)
            ends = [module_end(encoder, names[tap]) for tap in self._encoder_taps]
            deepest = max(range(len(ends)), key=ends.__getitem__)
            encoder = encoder[: ends[deepest]]
            for index in sorted(range(len(ends)), key=ends.__getitem__, reverse=True):
                if index != deepest:
                    encoder.insert(ends[index], Op("write", maps[index].write, name=f"cfw.encoder_feature.{index}"))
            run_tiled(encoder, image.to(self.vae.dtype), tile * self.factor, resident_bytes=budget, into=maps[deepest])
            # the decoder with a fusion after every tap
            decoder = decoder_program(self.vae)
            taps = [module_end(decoder, names[tap]) for tap in self._decoder_taps]
            for index in sorted(range(len(taps)), key=taps.__getitem__, reverse=True):
                decoder[taps[index] : taps[index]] = self._fusion_program(index, maps[index], w)
            head, tiled, tail = split_tiled(decoder)
            return run_untiled(tail, run_tiled(tiled, run_untiled(head, latents), tile, resident_bytes=budget))
        finally:
            for feature_map in maps:
                feature_map.close()

    def _fusion_program(self, index: int, encoder_feature: FeatureMap, w: float) -> list[Op]:
        """:meth:`CFWModule.fuse` at fused level number ``index`` as tasks, F_e read from ``encoder_feature``."""
        name = f"cfw.fusions.{index}"
        fusion_dtype, decoder_dtype = self.cfw.fusions[index].merge.conv1.weight.dtype, self.vae.dtype
        return [
            Op("save", lambda x: x, name=f"{name}.decoder_feature"),
            Op("read", encoder_feature.read, name=f"{name}.encoder_feature"),
            Op("local", lambda x: x.to(fusion_dtype), name=f"{name}.to_fusion_dtype"),
            *self.cfw.fusions[index].program(name),
            Op("local", lambda x: w * x.to(decoder_dtype), name=f"{name}.weight"),
            Op("add", name=name),  # F_d + w · C
        ]


def _checked_weight(w: float) -> float:
    w = float(w)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"CFW weight w must lie in [0, 1], got {w}")
    return w
