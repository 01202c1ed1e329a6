"""StableSR's conditioning of a frozen SD UNet: a time-aware LR encoder steering SFT layers (docs/method.md §1.5).

StableSR (Wang et al., 2023) keeps SD's UNet frozen and lets the LR image in through a small
trainable network::

    z_lr (B, 4, h, w): the SD latent of the bicubic-upsampled LR image, scaled
    t    (B,):         the UNet's own timestep
      → TimeAwareEncoder(z_lr, t)   a half UNet with a time embedding (StableSR's
                                    ``EncoderUNetModelWT``); one feature map per UNet level:
                                    h×w, h/2×w/2, h/4×w/4, h/8×w/8 for SD's four levels
      → SFT at every ResNet of the UNet's down, mid and up blocks, with the feature of that
        ResNet's resolution c:   F' = (1 + α(c)) ⊙ F + β(c)

α and β are convolutions of c (StableSR's ``SPADE`` heads: a shared 3×3 conv + ReLU, then one
3×3 conv each). Their last convolutions start at zero, so before training the conditioned UNet
*is* SD's UNet — bit for bit — and training starts from the prior instead of from a
perturbation of it.

Where F is taken: the official ``ResBlockDual`` modulates the residual branch — the output of
the block's last convolution, before the skip connection is added (diffusers'
``ResnetBlock2D.conv2``) — so the skip path carries the unmodified features. We do the same.
The official head is SPADE (IceClear/StableSR ``ldm/modules/spade.py::SPADE``): an affine
GroupNorm(32) of F *first*, then ``× (1 + γ) + β`` — so F' = GN(F) ⊙ (1 + γ(c)) + β(c). With
``sft_norm_groups=32`` (:data:`~tvt.models.sd_configs.STABLESR_CONDITIONER_PAPER`, and what the
official-weights importer builds) our head computes exactly that. The price: with γ = β = 0
the head is GN(F), not F, so a fresh conditioner *perturbs* SD's UNet (as the official one
does at the start of its training). ``sft_norm_groups=None`` (the mini configuration, and any
conditioner saved before this option existed) applies the paper's SFT equation to F itself:
zero-initialised γ, β then make the conditioned UNet SD's UNet bit for bit, so the mini
StableSR stage starts exactly from the prior.

The SFT layers enter diffusers' UNet through forward hooks on those convolutions (no copied
UNet code), registered only for the duration of :meth:`SFTConditionedUNet.forward`: the same
UNet object, called directly, stays SD's UNet (e.g. as a teacher elsewhere).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from torch import nn

from tvt.models.restorer import unet_latent_multiple

#: StableSR's SFT hidden width (its ``SPADE``'s hard-coded ``nhidden``)
SFT_HIDDEN_CHANNELS = 128


def _batch_timesteps(timestep: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """A (batch,) tensor of timesteps from a scalar or a per-sample tensor."""
    timesteps = torch.as_tensor(timestep, device=device)
    if timesteps.dim() == 0:
        return timesteps.expand(batch)
    if timesteps.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or have shape ({batch},), got {tuple(timesteps.shape)}")
    return timesteps


class TimeAwareEncoder(ModelMixin, ConfigMixin):
    """StableSR's time-aware encoder (``EncoderUNetModelWT``) from diffusers' UNet blocks.

    conv_in → one down block per level (ResNets with the time embedding, optional attention,
    a stride-2 conv after every level but the last) → a mid-block (ResNet, attention, ResNet).
    The features are taken where the resolution is about to change — each level's output
    before its downsampler, and the mid-block's output for the coarsest level — and each is
    mapped to ``out_channels`` by a time-conditioned ResNet (StableSR's ``fea_tran``).
    The time embedding is SD's (sinusoidal, cos first, then a 2-layer MLP to 4× the base
    width), so the encoder knows how noisy the latent is that its features will modulate.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        block_out_channels: Sequence[int] = (256, 256, 512, 512),
        down_block_types: Sequence[str] = ("AttnDownBlock2D",) * 3 + ("DownBlock2D",),
        layers_per_block: int = 2,
        out_channels: int = 256,
        num_attention_heads: int = 4,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        act_fn: str = "silu",
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
    ):
        super().__init__()
        if len(down_block_types) != len(block_out_channels):
            raise ValueError(f"{len(down_block_types)} down_block_types for {len(block_out_channels)} levels "
                             f"(block_out_channels={tuple(block_out_channels)})")
        for channels in (*block_out_channels, out_channels):
            if channels % norm_num_groups or channels % num_attention_heads:
                raise ValueError(f"{channels} channels do not split into {norm_num_groups} norm groups and "
                                 f"{num_attention_heads} attention heads")
        base = block_out_channels[0]
        time_dim = 4 * base
        self.conv_in = nn.Conv2d(in_channels, base, kernel_size=3, padding=1)
        self.time_proj = Timesteps(base, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(base, time_dim, act_fn=act_fn)
        self.down_blocks = nn.ModuleList()
        previous = base
        for level, (block_type, channels) in enumerate(zip(down_block_types, block_out_channels)):
            self.down_blocks.append(get_down_block(
                block_type,
                num_layers=layers_per_block,
                in_channels=previous,
                out_channels=channels,
                temb_channels=time_dim,
                add_downsample=level < len(block_out_channels) - 1,
                resnet_eps=norm_eps,
                resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups,
                downsample_padding=1,
                attention_head_dim=channels // num_attention_heads,
            ))
            previous = channels
        self.mid_block = UNetMidBlock2D(
            in_channels=previous,
            temb_channels=time_dim,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            attention_head_dim=previous // num_attention_heads,
        )
        self.feature_heads = nn.ModuleList(
            ResnetBlock2D(in_channels=channels, out_channels=out_channels, temb_channels=time_dim,
                          groups=norm_num_groups, eps=norm_eps, non_linearity=act_fn)
            for channels in block_out_channels
        )

    @property
    def num_levels(self) -> int:
        return len(self.down_blocks)

    def forward(self, lr_latent: torch.Tensor, timestep: torch.Tensor | int) -> list[torch.Tensor]:
        """Features (B, out_channels, h / 2**level, w / 2**level), finest level first.

        Sides round up at each level (stride-2 convs with padding 1), as in SD's UNet.
        """
        timesteps = _batch_timesteps(timestep, lr_latent.shape[0], lr_latent.device)
        temb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))
        hidden = self.conv_in(lr_latent.to(self.dtype))
        features = []
        for block in self.down_blocks:
            hidden, states = block(hidden, temb)
            if block.downsamplers is not None:
                features.append(states[-2])  # the level's output before its stride-2 conv
        features.append(self.mid_block(hidden, temb))
        return [head(feature, temb) for head, feature in zip(self.feature_heads, features)]


class SFTHead(nn.Module):
    """F' = N(F) ⊙ (1 + α(c)) + β(c) with α, β convolutions of the condition c (StableSR's SFT/SPADE head).

    N is StableSR's affine GroupNorm (``norm_groups`` groups, ε 1e-5, computed in fp32 like its
    ``GroupNorm32``) or, with ``norm_groups=None``, the identity. The α and β convolutions start
    at zero, so without the norm the head is the identity until it is trained.
    """

    def __init__(self, condition_channels: int, hidden_channels: int, feature_channels: int,
                 norm_groups: int | None = None):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, feature_channels, eps=1e-5) if norm_groups else None
        self.shared = nn.Sequential(nn.Conv2d(condition_channels, hidden_channels, 3, padding=1), nn.ReLU())
        self.scale = nn.Conv2d(hidden_channels, feature_channels, 3, padding=1)
        self.shift = nn.Conv2d(hidden_channels, feature_channels, 3, padding=1)
        for conv in (self.scale, self.shift):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, feature: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        hidden = self.shared(condition)
        alpha, beta = self.scale(hidden), self.shift(hidden)
        if self.norm is not None:
            feature = self.norm(feature.float()).to(feature.dtype)
        return feature * (1 + alpha).to(feature.dtype) + beta.to(feature.dtype)


def _sft_key(target: str) -> str:
    return target.replace(".", "_")  # module names may not contain dots


class StableSRConditioner(ModelMixin, ConfigMixin):
    """StableSR's trainable part: the :class:`TimeAwareEncoder` and one SFT head per UNet ResNet.

    ``sft_targets`` name the UNet's ResNets (``down_blocks.0.resnets.1``, ``mid_block.resnets.0``,
    ...), ``sft_channels`` their output channels and ``sft_levels`` the encoder level whose
    feature modulates them. Build it for a UNet with :meth:`for_unet`.
    """

    @register_to_config
    def __init__(
        self,
        encoder_config: dict,
        sft_targets: Sequence[str],
        sft_channels: Sequence[int],
        sft_levels: Sequence[int],
        sft_hidden_channels: int = SFT_HIDDEN_CHANNELS,
        sft_norm_groups: int | None = None,
    ):
        super().__init__()
        if not len(sft_targets) == len(sft_channels) == len(sft_levels):
            raise ValueError(f"sft_targets, sft_channels and sft_levels differ in length: "
                             f"{len(sft_targets)}, {len(sft_channels)}, {len(sft_levels)}")
        self.encoder = TimeAwareEncoder(**encoder_config)
        levels = self.encoder.num_levels
        if not all(0 <= level < levels for level in sft_levels):
            raise ValueError(f"sft_levels {list(sft_levels)} must lie in [0, {levels}), the encoder's levels")
        condition_channels = self.encoder.config.out_channels
        self.sft = nn.ModuleDict({
            _sft_key(target): SFTHead(condition_channels, sft_hidden_channels, channels, sft_norm_groups)
            for target, channels in zip(sft_targets, sft_channels)
        })

    @classmethod
    def for_unet(cls, unet: UNet2DConditionModel, encoder_config: dict,
                 sft_hidden_channels: int = SFT_HIDDEN_CHANNELS,
                 sft_norm_groups: int | None = None) -> StableSRConditioner:
        """A conditioner for ``unet``: an SFT head for every ResNet of its down, mid and up blocks.

        ``sft_norm_groups``: 32 for StableSR's SPADE heads (GroupNorm first), None for the plain
        SFT equation that starts as the identity (module docstring).

        ``encoder_config`` (e.g. ``sd_configs.STABLESR_ENCODER_PAPER``) must have as many
        levels as the UNet and take the UNet's latent channels.
        """
        levels = len(unet.down_blocks)
        encoder_levels = len(encoder_config["block_out_channels"])
        if encoder_levels != levels:
            raise ValueError(f"the encoder has {encoder_levels} levels but the UNet {levels}: StableSR needs one "
                             f"encoder feature per UNet resolution")
        if encoder_config["in_channels"] != unet.config.in_channels:
            raise ValueError(f"the encoder takes {encoder_config['in_channels']} latent channels, the UNet "
                             f"{unet.config.in_channels}")
        blocks = [(f"down_blocks.{i}", block, i) for i, block in enumerate(unet.down_blocks)]
        blocks.append(("mid_block", unet.mid_block, levels - 1))
        blocks += [(f"up_blocks.{i}", block, levels - 1 - i) for i, block in enumerate(unet.up_blocks)]
        targets, channels, target_levels = [], [], []
        for prefix, block, level in blocks:
            for j, resnet in enumerate(block.resnets):
                targets.append(f"{prefix}.resnets.{j}")
                channels.append(resnet.out_channels)
                target_levels.append(level)
        return cls(encoder_config=dict(encoder_config), sft_targets=targets, sft_channels=channels,
                   sft_levels=target_levels, sft_hidden_channels=sft_hidden_channels,
                   sft_norm_groups=sft_norm_groups)

    def check_unet(self, unet: nn.Module) -> None:
        """Raise if ``unet`` lacks a ResNet this conditioner was built for, or its channels differ."""
        for target, channels in zip(self.config.sft_targets, self.config.sft_channels):
            try:
                resnet = unet.get_submodule(target)
            except AttributeError:
                raise ValueError(f"the UNet has no module {target!r} that this StableSR conditioner modulates; "
                                 f"build the conditioner with StableSRConditioner.for_unet(this_unet, ...)") from None
            if not isinstance(resnet, ResnetBlock2D) or resnet.out_channels != channels:
                raise ValueError(f"UNet module {target!r} is not a ResnetBlock2D with {channels} output channels")

    @contextlib.contextmanager
    def attached(self, unet: nn.Module, features: Sequence[torch.Tensor]) -> Iterator[None]:
        """Within the block, every targeted ResNet of ``unet`` applies its SFT with ``features``."""
        handles = []
        try:
            for target, level in zip(self.config.sft_targets, self.config.sft_levels):
                hook = _SFTHook(target, self.sft[_sft_key(target)], features[level])
                handles.append(unet.get_submodule(target).conv2.register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()


class _SFTHook:
    """Forward hook on a ResNet's last conv: its output (the residual branch) goes through the SFT head."""

    def __init__(self, target: str, head: SFTHead, condition: torch.Tensor):
        self.target, self.head, self.condition = target, head, condition

    def __call__(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.shape[-2:] != self.condition.shape[-2:] or output.shape[0] != self.condition.shape[0]:
            raise ValueError(f"{self.target}: UNet features {tuple(output.shape)} do not match the encoder feature "
                             f"{tuple(self.condition.shape)} of their level (sample and lr_latent must have the "
                             f"same batch and spatial size)")
        return self.head(output, self.condition)


class SFTConditionedUNet(nn.Module):
    """SD's (frozen) UNet conditioned on an LR latent through a :class:`StableSRConditioner`.

    ``forward(sample, timestep, encoder_hidden_states, lr_latent)`` returns the UNet's ε
    prediction; the SFT hooks exist only during that call.
    """

    def __init__(self, unet: UNet2DConditionModel, conditioner: StableSRConditioner):
        super().__init__()
        conditioner.check_unet(unet)
        self.unet = unet
        self.conditioner = conditioner

    @classmethod
    def from_pretrained(cls, unet_path, conditioner_path, **kwargs: object) -> SFTConditionedUNet:
        """SD's UNet (frozen, eval) and a trained conditioner, both saved with ``save_pretrained``."""
        unet = UNet2DConditionModel.from_pretrained(unet_path, **kwargs).eval().requires_grad_(False)
        return cls(unet, StableSRConditioner.from_pretrained(conditioner_path, **kwargs).eval())

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_multiple(self) -> int:
        """Latent side multiple at which the UNet (and the encoder) need no internal padding."""
        return unet_latent_multiple(self.unet)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, encoder_hidden_states: torch.Tensor,
                lr_latent: torch.Tensor) -> torch.Tensor:
        """ε (B, C, h, w) for noisy latents ``sample`` at ``timestep`` (scalar or (B,)), given ``lr_latent``."""
        if torch.is_grad_enabled() and getattr(self.unet, "is_gradient_checkpointing", False):
            raise ValueError("gradient checkpointing of the UNet recomputes its blocks during backward, after the "
                             "SFT hooks are gone; disable it on the UNet (the trainable conditioner may use it)")
        if lr_latent.shape[0] != sample.shape[0] or lr_latent.shape[-2:] != sample.shape[-2:]:
            raise ValueError(f"lr_latent {tuple(lr_latent.shape)} must match sample {tuple(sample.shape)} in batch "
                             f"and spatial size")
        timesteps = _batch_timesteps(timestep, sample.shape[0], sample.device)
        features = self.conditioner.encoder(lr_latent, timesteps)
        with self.conditioner.attached(self.unet, features):
            return self.unet(sample, timesteps, encoder_hidden_states=encoder_hidden_states).sample
