"""Ablation S2: SD's VAE-D8 with skip connections from its encoder to its decoder (docs/ablations.md).

The paper's Table 7 says only "VAE-D8 with skip connections" (2.27 T FLOPs, as S1 = OSEDiff); the
official repository (Joyies/TVT) has no code for it. In the one-step restorer the encoder sees the
upsampled LR image, so skips can carry the LR's detail past the 8× latent to the decoder. Our
smallest design that keeps S2 an ablation of S1 alone:

* **Where**: at every resolution level i of the VAE (SD 2.1's: 512², 256², 128², 64² at a 512²
  output), the output of the encoder's last ResNet of ``down_blocks[i]`` (before its downsampler)
  is added to the output of the decoder's last ResNet of ``up_blocks[n − 1 − i]`` (before its
  upsampler), the decoder level of the same size and width. These are the taps of StableSR's CFW
  (:mod:`tvt.models.cfw`; IceClear/StableSR ``Encoder(return_fea=True)`` / ``Decoder_Mix``),
  which fuses at the two middle levels with an RRDB block; S2 takes every level with the smallest
  fusion, a 1×1 convolution.
* **Zero-initialised** (weight and bias, as ControlNet's zero convolutions): untrained, every skip
  adds exactly 0, so the network *is* SD's VAE-D8 and S2 starts where S1 starts; the skips learn
  only what the restorer's loss asks of them (their weights' gradient is nonzero at zero).
* **Cost**: the four 1×1 convs add 14 G MACs at 512² to the restorer's 2120 G (+0.7 %), so S2's
  cost stays S1's, as the paper's 2.27 T for both says.

Features reach the decoder with forward hooks on diffusers' own modules, installed only for the
duration of one call (:func:`tvt.models.cfw.forward_hooks`), so no VAE code is copied and
``decode(z)`` without skips is SD's plain decoder.
"""

from __future__ import annotations

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import functools
from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput
from torch import nn

from tvt.models.cfw import captured_outputs, forward_hooks


class SkipAutoencoderKL(AutoencoderKL):
    """``AutoencoderKL`` plus ``skips``: one zero-initialised 1×1 conv per resolution level (module docstring).

    Its config is AutoencoderKL's (the skips follow from ``block_out_channels``), so it saves and
    loads with diffusers' ``save_pretrained`` / ``from_pretrained``. Build it from SD's VAE with
    :meth:`from_vae`; encode with :meth:`encode_with_skips` and pass the features to ``decode``.
    """

    #: the hooks live for one call; a checkpointed decoder would recompute without them in backward
    _supports_gradient_checkpointing = False

    @functools.wraps(AutoencoderKL.__init__)  # AutoencoderKL's signature: diffusers' config reads it
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skips = nn.ModuleList(nn.Conv2d(width, width, 1) for width in self.config.block_out_channels)
        for conv in self.skips:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        levels = len(self.skips)
        self._encoder_taps = [self.encoder.down_blocks[i].resnets[-1] for i in range(levels)]
        self._decoder_taps = [self.decoder.up_blocks[levels - 1 - i].resnets[-1] for i in range(levels)]

    @classmethod
    def from_vae(cls, vae: AutoencoderKL) -> SkipAutoencoderKL:
        """``vae`` with zero skips added (``vae`` is left unchanged): every one of its weights is loaded, and
        the skips are the only weights it lacks."""
        config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
        out = cls(**config).to(vae.device)
        missing, unexpected = out.load_state_dict(vae.state_dict(), strict=False)
        stray = [k for k in missing if not k.startswith("skips.")] + list(unexpected)
        if stray:
            raise ValueError(f"SkipAutoencoderKL.from_vae: the VAE's weights do not match its config: {stray[:5]}")
        return out if out.dtype == vae.dtype else out.to(dtype=vae.dtype)

    def _check_whole(self, what: str) -> None:
        if self.use_slicing or self.use_tiling:
            raise ValueError(
                f"SkipAutoencoderKL: {what} needs the whole batch and image in one pass; "
                "disable the VAE's slicing/tiling"
            )

    def encode_with_skips(self, x: torch.Tensor) -> tuple[AutoencoderKLOutput, list[torch.Tensor]]:
        """``encode(x)`` and the encoder's feature at every level, finest first (what ``decode`` adds)."""
        self._check_whole("encoding for the skips")
        return captured_outputs(self._encoder_taps, lambda: self.encode(x))

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator=None, *, skips: Sequence[torch.Tensor] | None = None
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """AutoencoderKL's ``decode``; with ``skips`` (from :meth:`encode_with_skips`), level i's decoder
        feature gains ``self.skips[i](skips[i])``. Without them: SD's plain decoder."""
        if skips is None:
            return super().decode(z, return_dict=return_dict, generator=generator)
        self._check_whole("decoding with skips")
        if len(skips) != len(self.skips):
            raise ValueError(f"SkipAutoencoderKL.decode: {len(skips)} skip features for {len(self.skips)} levels")

        def add(index):
            def hook(_module, _inputs, output):
                feature = skips[index]
                if feature.shape != output.shape:
                    raise ValueError(
                        f"SkipAutoencoderKL level {index}: encoder feature {tuple(feature.shape)} does "
                        f"not match decoder feature {tuple(output.shape)}; encode the image the "
                        "latent came from"
                    )
                return output + self.skips[index](feature.to(output.dtype))

            return hook

        with forward_hooks([(tap, add(i)) for i, tap in enumerate(self._decoder_taps)]):
            return super().decode(z, return_dict=return_dict, generator=generator)
