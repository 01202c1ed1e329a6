"""Ablation S5: SD's UNet with 25 % of its channels pruned, initialised from the prior (docs/ablations.md).

The paper says only "VAE-D4 + a UNet with 25 % of its channels pruned" (its Table 7, 2.00 T
FLOPs against 2.59 T for the full UNet at 128², S4). What we prune, and why:

* **Only channels that no other block reads**: the hidden channels of every ResNet (``conv1``'s
  outputs = ``norm2`` = ``conv2``'s inputs, also ``time_emb_proj``'s outputs) and the inner units
  of every transformer feed-forward (GEGLU ``ff.net.0.proj``'s value and gate rows, ``ff.net.2``'s
  inputs). The residual stream, the skip connections and the attention widths keep SD's sizes,
  so every other weight of the prior loads unchanged and no concatenation needs an index map.
* **Whole GroupNorm groups in a ResNet**: ``norm2`` normalises groups of channels; removing a
  quarter of its *groups* (SD: 8 of 32) leaves the kept groups' statistics exactly as in the
  prior, so a kept channel computes what it computed before pruning.
* **Importance = L1 norm of the weights that read a unit** (``conv2``'s input slice, summed per
  group; ``ff.net.2``'s input column): the units whose removal changes the block's output least
  to first order. The kept units keep their order and their prior weights; nothing is
  re-initialised.

The network is ``.unet``, a ``UNet2DConditionModel`` whose pruned layers were replaced by
narrower ones; :class:`PrunedUNet` (ModelMixin + ConfigMixin) rebuilds the same shapes from its
config (``unet_config``, ``keep``) so ``save_pretrained`` / ``from_pretrained`` round-trip.
"""

from __future__ import annotations

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from tvt.models.lora import LORA_PATTERN

#: what S5 trains besides LoRA: conv_in, as S4 / OSEDiff (tvt.models.lora.OSEDIFF_UNET_TRAINABLE)
PRUNED_UNET_TRAINABLE = (LORA_PATTERN, r"^unet\.conv_in\.")
PAPER_KEEP = 0.75  # "25 % of the channels pruned"


def _kept(count: int, keep: float) -> int:
    kept = round(count * keep)
    if not 0 < kept <= count:
        raise ValueError(f"PrunedUNet: keep={keep} leaves {kept} of {count} units")
    return kept


def _shrink_resnet(block: ResnetBlock2D, keep: float) -> None:
    """Replace ``block``'s hidden layers by ones with ``keep`` of its ``norm2`` groups (random weights)."""
    norm = block.norm2
    per_group = norm.num_channels // norm.num_groups
    groups = _kept(norm.num_groups, keep)
    hidden = groups * per_group
    conv1, conv2 = block.conv1, block.conv2
    block.conv1 = nn.Conv2d(conv1.in_channels, hidden, conv1.kernel_size, padding=conv1.padding)
    block.norm2 = nn.GroupNorm(groups, hidden, eps=norm.eps, affine=norm.affine)
    block.conv2 = nn.Conv2d(hidden, conv2.out_channels, conv2.kernel_size, padding=conv2.padding)
    if block.time_emb_proj is not None:
        if block.time_embedding_norm != "default":
            raise ValueError("PrunedUNet: only SD's additive time embedding ('default') is supported")
        block.time_emb_proj = nn.Linear(block.time_emb_proj.in_features, hidden)


def _shrink_feed_forward(ff: FeedForward, keep: float) -> None:
    proj, out = ff.net[0].proj, ff.net[2]
    inner = _kept(out.in_features, keep)
    ff.net[0].proj = nn.Linear(
        proj.in_features, proj.out_features // out.in_features * inner, bias=proj.bias is not None
    )
    ff.net[2] = nn.Linear(inner, out.out_features, bias=out.bias is not None)


def _prunable(unet: nn.Module):
    for name, module in unet.named_modules():
        if isinstance(module, ResnetBlock2D | FeedForward):
            yield name, module


class PrunedUNet(ModelMixin, ConfigMixin):
    """``UNet2DConditionModel(**unet_config)`` with ``keep`` of every ResNet's hidden groups and
    every feed-forward's inner units (module docstring). Use :meth:`from_unet` to prune a prior."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, unet_config: dict, keep: float = PAPER_KEEP):
        super().__init__()
        self.unet = UNet2DConditionModel(**unet_config)
        for _, module in _prunable(self.unet):
            (_shrink_resnet if isinstance(module, ResnetBlock2D) else _shrink_feed_forward)(module, keep)

    @property
    def num_upsamplers(self) -> int:
        return self.unet.num_upsamplers

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        return self.unet(sample, timestep, encoder_hidden_states, **kwargs)

    @classmethod
    @torch.no_grad()
    def from_unet(cls, unet: UNet2DConditionModel, keep: float = PAPER_KEEP) -> PrunedUNet:
        """Prune ``unet`` (left unchanged): kept units by the L1 norm of the weights that read them, in order."""
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        pruned = cls(unet_config=config, keep=keep).to(device=unet.device, dtype=unet.dtype)
        source = dict(_prunable(unet))
        state = unet.state_dict()
        for name, module in _prunable(pruned.unet):
            original = source[name]
            if isinstance(module, ResnetBlock2D):
                norm = original.norm2
                per_group = norm.num_channels // norm.num_groups
                reads = original.conv2.weight.abs().sum(dim=(0, 2, 3)).view(norm.num_groups, per_group).sum(1)
                groups = reads.topk(module.norm2.num_groups).indices.sort().values
                index = (groups[:, None] * per_group + torch.arange(per_group, device=groups.device)).flatten()
                updates = {
                    "conv1.weight": original.conv1.weight[index],
                    "conv1.bias": original.conv1.bias[index],
                    "norm2.weight": norm.weight[index],
                    "norm2.bias": norm.bias[index],
                    "conv2.weight": original.conv2.weight[:, index],
                }
                if original.time_emb_proj is not None:
                    updates |= {
                        "time_emb_proj.weight": original.time_emb_proj.weight[index],
                        "time_emb_proj.bias": original.time_emb_proj.bias[index],
                    }
            else:
                out = original.net[2]
                inner = out.in_features
                index = out.weight.abs().sum(0).topk(module.net[2].in_features).indices.sort().values
                halves = original.net[0].proj.out_features // inner  # GEGLU: value rows, then gate rows
                rows = torch.cat([index + h * inner for h in range(halves)])
                updates = {"net.0.proj.weight": original.net[0].proj.weight[rows], "net.2.weight": out.weight[:, index]}
                if original.net[0].proj.bias is not None:
                    updates["net.0.proj.bias"] = original.net[0].proj.bias[rows]
            state.update({f"{name}.{key}": value for key, value in updates.items()})
        pruned.unet.load_state_dict(state, strict=True)
        return pruned
