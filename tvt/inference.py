"""Inference speed options for a loaded restorer, each measured against fp32 (bench/bench_precision.py).

The knobs that change speed without retraining:

* **precision** of the denoiser (UNet / CE-UNet / StableSR's SFT UNet): ``bf16`` or ``fp16``.
  The VAE stays in fp32 by default (``vae_fp32``): SD's VAE decoder overflows fp16 on large
  images (OSEDiff's ``my_utils/vaehook.py`` header warns of NaNs with a half-precision VAE), and
  the VAE decides the output's last bits. The restorers cast between the two at their seams.
* **channels-last** memory format: oneDNN (CPU) and cuDNN (GPU) convolutions prefer NHWC.
* **torch.compile** of the denoiser: fuses elementwise ops; pays a compile on the first call.
* **threads**: ``torch.set_num_threads`` (CPU intra-op parallelism).

Attention already runs through PyTorch's fused ``scaled_dot_product_attention`` (diffusers'
``AttnProcessor2_0``), which picks the best available kernel itself; the benchmark compares it
with the plain math kernel to show it.

Which option wins depends on the hardware: bf16 is fast only where the CPU has bf16 units
(AVX512-BF16 / AMX) and fp16 only on GPUs, so the defaults of ``tvt sr`` are set from
measurements (docs/inference.md), not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class InferenceOptions:
    """How to run a restorer; the defaults are the exact fp32 path."""

    precision: str = "fp32"
    vae_fp32: bool = True
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {tuple(PRECISIONS)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    @property
    def label(self) -> str:
        parts = [self.precision + ("" if self.precision == "fp32" or not self.vae_fp32 else "+fp32 VAE")]
        parts += [name for name, on in (("channels-last", self.channels_last), ("compile", self.compile)) if on]
        if self.threads:
            parts.append(f"{self.threads} threads")
        return ", ".join(parts)


def denoiser_of(restorer: nn.Module) -> nn.Module:
    """The module that runs once per step: StableSR's SFT-conditioned UNet, else the (CE-)UNet."""
    return getattr(restorer, "denoiser", None) or restorer.unet


def prepare_for_inference(restorer: nn.Module, options: InferenceOptions) -> nn.Module:
    """Apply ``options`` to ``restorer`` in place (eval mode) and return it.

    Everything but the VAE takes ``options.precision``; the VAE too unless ``vae_fp32``.
    """
    if options.threads:
        torch.set_num_threads(options.threads)
    dtype = PRECISIONS[options.precision]
    restorer.eval()
    if dtype != torch.float32:  # (a no-op .to() would still make diffusers warn about fp32 modules)
        restorer.to(dtype)
        if options.vae_fp32:  # .float(): diffusers' ModelMixin.to() would warn about fp32 modules
            restorer.vae.float()
            cfw = getattr(restorer, "cfw", None)  # StableSR's CFW fuses encoder into decoder features
            if cfw is not None:
                cfw.float()
    if options.channels_last:
        restorer.to(memory_format=torch.channels_last)
    if options.compile:
        denoiser = denoiser_of(restorer)
        denoiser.forward = torch.compile(denoiser.forward, dynamic=False)
    return restorer
