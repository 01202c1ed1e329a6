"""Which weights train: peft LoRA adapters and exact trainable-parameter selection (docs/method.md §1.3, §1.5).

* TVT: LoRA (rank 4, Gaussian init, PEFT's default alpha 8) on the SD UNet that CE-UNet
  wraps; CE-UNet's 2x-resolution ends train in full (``CEUNet.TRAINABLE_PATTERNS``).
* OSEDiff: LoRA on the SD UNet plus a fully trainable ``conv_in``
  (:data:`OSEDIFF_UNET_TRAINABLE`), and LoRA on the VAE-D8 encoder only.

Adapters are added with diffusers' ``add_adapter`` (peft), which freezes every base weight;
:func:`set_trainable` then states explicitly which parameters train, by regular expression
on parameter names, and refuses patterns that select nothing (a typo must not silently
freeze a module).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tvt import compat

compat.apply()  # peft imports transformers -> torchvision

import torch
from peft import LoraConfig

# Module-name suffixes that receive LoRA in the official OSEDiff/TVT code: attention
# projections, ResNet and resampling convolutions, transformer in/out projections, MLPs.
UNET_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "conv",
    "conv1",
    "conv2",
    "conv_shortcut",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
)

# Encoder convolutions and attention projections, plus quant_conv (as OSEDiff's VAE LoRA);
# a full-match regex, so nothing in the decoder or post_quant_conv is touched.
VAE_ENCODER_LORA_TARGETS = (
    r"^(encoder\..*\.(conv|conv1|conv2|conv_shortcut|to_q|to_k|to_v|to_out\.0)"
    r"|encoder\.(conv_in|conv_out)|quant_conv)$"
)

LORA_PATTERN = r"\.lora_"  # peft's lora_A / lora_B (and lora_magnitude_vector) parameters
OSEDIFF_UNET_TRAINABLE = (LORA_PATTERN, r"^conv_in\.")


def _lora_config(rank: int, alpha: float | None, init: str | bool, target_modules) -> LoraConfig:
    alpha_kwargs = {} if alpha is None else {"lora_alpha": alpha}
    return LoraConfig(r=rank, init_lora_weights=init, target_modules=target_modules, **alpha_kwargs)


def add_unet_lora(
    unet: torch.nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    init: str | bool = "gaussian",
    adapter_name: str = "default",
) -> torch.nn.Module:
    """Add a LoRA adapter on :data:`UNET_LORA_TARGETS` of a diffusers UNet, in place; return it.

    ``alpha=None`` keeps PEFT's default (8, so the LoRA scale is 8 / rank). After this call
    only the adapter's weights require gradients.
    """
    unet.add_adapter(_lora_config(rank, alpha, init, list(UNET_LORA_TARGETS)), adapter_name=adapter_name)
    return unet


def add_vae_encoder_lora(
    vae: torch.nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    init: str | bool = "gaussian",
    adapter_name: str = "default",
) -> torch.nn.Module:
    """Add a LoRA adapter to the encoder side (encoder + quant_conv) of an AutoencoderKL or VAED4; return it."""
    vae.add_adapter(_lora_config(rank, alpha, init, VAE_ENCODER_LORA_TARGETS), adapter_name=adapter_name)
    return vae


def set_trainable(model: torch.nn.Module, patterns: Iterable[str]) -> list[str]:
    """Train exactly the parameters whose name matches one of ``patterns`` (``re.search``); freeze the rest.

    Returns the trainable names. Raises ``ValueError`` naming any pattern that matches nothing.
    """
    compiled = [re.compile(pattern) for pattern in patterns]
    used = set()
    for name, parameter in model.named_parameters():
        hits = {c.pattern for c in compiled if c.search(name)}
        used |= hits
        parameter.requires_grad_(bool(hits))
    unused = [c.pattern for c in compiled if c.pattern not in used]
    if unused:
        raise ValueError(f"set_trainable: no parameter of {type(model).__name__} matches {unused}")
    return trainable_parameter_names(model)


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that currently require gradients, in module order."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]
