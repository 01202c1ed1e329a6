"""CE-UNet: SD's UNet at 2x latent density for the price of its ends (docs/method.md §1.3).

VAE-D4 latents have twice SD's spatial density (128² for a 512² image). Running the whole
SD UNet at 128² would cost ~1.35 T MACs; CE-UNet runs only a *replica of SD's first down
block and last up block* at 128² and lets the original UNet work at 64² in between:

    sample (B, 4, 2h, 2w)
      conv_in                      new, init = SD conv_in                       2h × 2w
      down_block                   new, init = SD down_blocks[0] (2 ResNets +   2h × 2w
                                   attention, then its stride-2 conv)      →    h × w
      ── inner SD UNet (``.unet``, LoRA only) ──────────────────────────────────  h × w
      down_blocks[0..-1], mid_block, up_blocks[0..-1] — all of them, unchanged.
      Its conv_in / conv_norm_out / conv_act / conv_out are *moved out* to the 2x
      ends (they are not duplicated): the output of ``down_block``'s stride-2 conv
      enters down_blocks[0] and is up_blocks[-1]'s outermost skip, exactly where
      SD's conv_in output would be.
      ─────────────────────────────────────────────────────────────────────────
      upsample                     new: nearest ×2 + 3×3 conv (identity init)   2h × 2w
      up_block                     new, init = SD up_blocks[-1]; its skips are  2h × 2w
                                   conv_in's and down_block's ResNet outputs
      conv_norm_out/act/conv_out   new, init = SD's                             2h × 2w

This is the official TVT network (a 5-level UNet whose ``down_blocks.0`` / ``up_blocks.4``
are the replicas and whose ``up_blocks.3`` gained an upsampler), written as a wrapper so
that SD's weights load unchanged into ``.unet``. One difference from a literal copy: the
replica up block's first ResNet receives 2·C0 channels (upsampled features + skip) instead
of SD's C1 + C0, so it is initialised from SD's *second* ResNet of that block, which has
exactly that input layout.

Accepted sizes: latent sides must be even (the replica stem halves them). The inner UNet
needs sides divisible by ``2 ** unet.num_upsamplers`` (8 for SD); other sizes are padded
(replicate, bottom/right) before the inner UNet and cropped after it, so e.g. a 36×52
latent works. Odd sides raise ``ValueError``.

The paper's other UNet ablations need no class: S1 (VAE-D8 + UNet, = OSEDiff) and S4
(VAE-D4 + the full UNet at 128²) use a plain ``UNet2DConditionModel`` — only the VAE and
the latent size differ, which the restorer's configuration chooses.
"""

from __future__ import annotations

import copy
import re

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.models.upsampling import Upsample2D
from torch import nn

from tvt.models.lora import LORA_PATTERN

_MOVED_ENDS = ("conv_in", "conv_norm_out", "conv_act", "conv_out")
_UNSUPPORTED_CONDITIONING = (
    "class_embed_type",
    "num_class_embeds",
    "addition_embed_type",
    "encoder_hid_dim",
    "time_cond_proj_dim",
)


def _call_block(block: nn.Module, hidden_states, temb, context: dict, **kwargs):
    """Call a diffusers UNet block, passing the text context only to blocks that attend to it."""
    if getattr(block, "has_cross_attention", False):
        kwargs.update(context)
    return block(hidden_states=hidden_states, temb=temb, **kwargs)


def _check_supported(unet: UNet2DConditionModel) -> None:
    extra = {key: unet.config[key] for key in _UNSUPPORTED_CONDITIONING if unet.config.get(key)}
    if extra or unet.config.center_input_sample:
        raise ValueError(f"CEUNet supports SD-style UNets (time + text conditioning only); this one sets {extra}")
    if unet.down_blocks[0].downsamplers is None:
        raise ValueError("CEUNet needs a UNet whose first down block downsamples (it becomes the 2x stem)")
    if len(unet.up_blocks[-1].resnets) < 2:
        raise ValueError("CEUNet needs layers_per_block >= 1 (the replica up block's first ResNet copies its second)")


def _identity_conv_(conv: nn.Conv2d) -> None:
    nn.init.dirac_(conv.weight)
    nn.init.zeros_(conv.bias)


class CEUNet(ModelMixin, ConfigMixin):
    """SD UNet (``.unet``, at 1x) framed by trainable replicas of its first and last blocks at 2x latent resolution.

    Built from ``unet_config`` (the inner ``UNet2DConditionModel``'s config), so
    ``save_pretrained`` / ``from_pretrained`` round-trip; :meth:`from_unet` initialises
    it from a pre-trained UNet. Called like ``UNet2DConditionModel``.
    """

    _supports_gradient_checkpointing = True
    REPLICA_MODULES = ("conv_in", "down_block", "upsample", "up_block", "conv_norm_out", "conv_out")
    # What TVT trains: the 2x ends in full, the inner UNet through its LoRA adapters only.
    TRAINABLE_PATTERNS = (LORA_PATTERN, rf"^({'|'.join(REPLICA_MODULES)})\.")

    @register_to_config
    def __init__(self, unet_config: dict):
        super().__init__()
        unet = UNet2DConditionModel.from_config(unet_config)
        _check_supported(unet)
        for name in _MOVED_ENDS:
            setattr(self, name, getattr(unet, name))
            setattr(unet, name, None)
        self.unet = unet
        self.down_block = copy.deepcopy(unet.down_blocks[0])
        self.upsample = Upsample2D(unet.config.block_out_channels[0], use_conv=True)
        _identity_conv_(self.upsample.conv)
        self.up_block = copy.deepcopy(unet.up_blocks[-1])
        self.up_block.resnets[0] = copy.deepcopy(self.up_block.resnets[1])

    @property
    def inner_size_multiple(self) -> int:
        """Side multiple the inner UNet needs at its own (1x) resolution; other sizes are padded."""
        return 2**self.unet.num_upsamplers

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel) -> CEUNet:
        """CE-UNet initialised from a pre-trained (plain, LoRA-free) SD UNet.

        The inner UNet *shares* the given UNet's tensors (no second 3.4 GB copy: it is only
        fine-tuned through LoRA, which adds new weights); the 2x ends are independent copies,
        and the upsample conv starts as the identity.
        """
        source = unet.state_dict()
        if any(re.search(LORA_PATTERN, key) for key in source):
            raise ValueError(
                "CEUNet.from_unet expects a UNet without LoRA adapters; add them to ce_unet.unet afterwards"
            )
        config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
        with torch.device("meta"):
            model = cls(unet_config=config)
        model.upsample.to_empty(device=unet.device).to(unet.dtype)
        _identity_conv_(model.upsample.conv)

        last_up = f"up_blocks.{len(unet.up_blocks) - 1}."
        replica_sources = (  # (CE-UNet prefix, SD UNet prefix); the first match wins
            ("up_block.resnets.0.", last_up + "resnets.1."),
            ("up_block.", last_up),
            ("down_block.", "down_blocks.0."),
            *((f"{end}.", f"{end}.") for end in _MOVED_ENDS),
        )
        state = {f"upsample.{key}": value for key, value in model.upsample.state_dict().items()}
        for key in model.state_dict():
            if key.startswith("unet."):
                state[key] = source[key.removeprefix("unet.")]
            elif not key.startswith("upsample."):
                prefix, origin = next((p, o) for p, o in replica_sources if key.startswith(p))
                state[key] = source[origin + key.removeprefix(prefix)].clone()
        model.load_state_dict(state, assign=True)
        return model.train(unet.training)

    def trainable_parameter_names(self) -> list[str]:
        """Parameters TVT trains: all of the 2x ends, plus the inner UNet's LoRA weights once added."""
        patterns = [re.compile(p) for p in self.TRAINABLE_PATTERNS]
        return [name for name, _ in self.named_parameters() if any(p.search(name) for p in patterns)]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        cross_attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple:
        """ε-prediction for latents ``sample`` (B, C, 2h, 2w); same call contract as ``UNet2DConditionModel``."""
        height, width = sample.shape[-2:]
        if height % 2 or width % 2:
            raise ValueError(
                f"CEUNet needs even latent sides (its stem halves them); got {height}x{width}. "
                "Pad the latent (or the image) first."
            )
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep))
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = {"encoder_hidden_states": encoder_hidden_states, "cross_attention_kwargs": cross_attention_kwargs}

        # 2x stem: conv_in and the replica first down block; its stride-2 conv leads to 1x.
        hidden = self.conv_in(sample)
        stem_skips = (hidden,)
        hidden, block_skips = _call_block(self.down_block, hidden, emb, context)
        stem_skips += block_skips[:-1]  # the last one is `hidden` itself, now at 1x

        # Inner SD UNet at 1x, on a grid padded to what its own downsamplers need.
        inner_h, inner_w = hidden.shape[-2:]
        multiple = self.inner_size_multiple
        hidden = F.pad(hidden, (0, -inner_w % multiple, 0, -inner_h % multiple), mode="replicate")
        skips = (hidden,)
        for block in unet.down_blocks:
            hidden, block_skips = _call_block(block, hidden, emb, context)
            skips += block_skips
        if unet.mid_block is not None:
            hidden = _call_block(unet.mid_block, hidden, emb, context)
        for block in unet.up_blocks:
            used = len(block.resnets)
            hidden = _call_block(block, hidden, emb, context, res_hidden_states_tuple=skips[-used:])
            skips = skips[:-used]
        hidden = hidden[..., :inner_h, :inner_w]

        # 2x head: upsample, the replica last up block with the stem's skips, output convs.
        hidden = self.upsample(hidden)
        hidden = _call_block(self.up_block, hidden, emb, context, res_hidden_states_tuple=stem_skips)
        if self.conv_norm_out is not None:
            hidden = self.conv_act(self.conv_norm_out(hidden))
        out = self.conv_out(hidden)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)
