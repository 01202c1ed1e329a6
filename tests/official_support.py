"""Synthetic releases at mini size, laid out like the official files (tests/test_official_*.py).

The module lists follow the releases' own selection rules (Joyies/TVT
``TVTModel.py::initialize_unet_TVT``, cswry/OSEDiff ``osediff.py::initialize_unet`` /
``initialize_vae``), re-stated here; the adapters are real peft adapters whose B matrices
are randomised (peft's Gaussian init leaves B = 0, which would hide a wrong merge).
"""

from __future__ import annotations

import sys
import types

import torch
from peft import LoraConfig

UNET_GREP = (
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "conv",
    "conv1",
    "conv2",
    "conv_in",
    "conv_shortcut",
    "conv_out",
    "proj_out",
    "proj_in",
    "ff.net.2",
    "ff.net.0.proj",
)
VAE_GREP = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")


def unet_lora_modules(unet, decoder_has_conv_out: bool) -> dict[str, list[str]]:
    """encoder/decoder/others module lists; TVT files conv_out under others, OSEDiff under decoder."""
    groups = {"default_encoder": [], "default_decoder": [], "default_others": []}
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in UNET_GREP:
            if pattern not in name:
                continue
            module = name.removesuffix(".weight")
            if "down_blocks" in name or "conv_in" in name:
                groups["default_encoder"].append(module)
            elif "up_blocks" in name or (decoder_has_conv_out and "conv_out" in name):
                groups["default_decoder"].append(module)
            else:
                groups["default_others"].append(module)
            break
    return groups


def vae_lora_modules(vae) -> list[str]:
    """OSEDiff's VAE list, repeats included (its loop appends once per matching pattern)."""
    modules = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in VAE_GREP:
            quant_conv = "quant_conv" in name and "post_quant_conv" not in name
            if (pattern in name and "encoder" in name) or quant_conv:
                modules.append(name.removesuffix(".weight"))
    return modules


def add_release_adapters(model, groups: dict[str, list[str]], rank: int, seed: int):
    """Real peft adapters as the releases add them, all active, with random non-zero B."""
    for adapter, modules in groups.items():
        model.add_adapter(
            LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=modules), adapter_name=adapter
        )
    model.set_adapter(list(groups))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def perturb_(model, pattern: str, seed: int) -> None:
    """Shift the parameters whose name contains ``pattern`` (stands for full fine-tuning)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if pattern in name and ".lora_" not in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def save_lightning_checkpoint(path, state_dict: dict) -> None:
    """A Lightning-style ``.ckpt``: ``state_dict`` plus loop metadata and hyper-parameters pickled as
    ``pytorch_lightning.utilities.parsing.AttributeDict`` (a stand-in class, registered only while saving)."""
    names = ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing")
    added = [name for name in names if name not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)  # pickle imports the parents too
    module = sys.modules[names[-1]]
    module.AttributeDict = type("AttributeDict", (dict,), {"__module__": module.__name__})
    try:
        torch.save(
            {
                "epoch": 3,
                "global_step": 1200,
                "pytorch-lightning_version": "1.9.4",
                "state_dict": state_dict,
                "hyper_parameters": module.AttributeDict(lr=1e-4),
            },
            path,
        )
    finally:
        for name in added:
            del sys.modules[name]
