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
(AVX512-BF16 / AMX) and fp16 only on GPUs, so the defaults of ``tvt sr``
(:func:`fastest_exact_options`) are set from measurements (docs/inference.md), not assumed.
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


#: A reduced-precision denoiser is a default only where its ε error is not amplified into the latent
#: (OneStepRestorer.eps_error_gain): bf16 keeps 8 significant bits, and at OSEDiff's gain of 14.6 its
#: output lands 37 dB from fp32 at SD size (bench/bench_precision.py), under the 40 dB bar.
MAX_EPS_ERROR_GAIN = 1.0


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): elsewhere bf16 only adds casts.

    torch has the probes only as private ``torch.cpu`` functions; without them, the answer is no."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def fastest_exact_options(restorer: nn.Module, device: torch.device | str) -> InferenceOptions:
    """``tvt sr``'s default (``--dtype auto``): the fastest options whose output stays exact, as measured
    (bench/bench_precision.py, docs/inference.md).

    * channels-last always: fp32 reordering only (> 75 dB from the contiguous output), faster everywhere measured;
    * on CUDA an fp16 denoiser (the VAE fp32), the precision the official inference runs in (OSEDiff's
      ``test_osediff.py`` ``--mixed_precision``, StableSR's ``sr_val_ddpm_text_T_vqganfin_old.py`` autocast);
    * on a CPU with bf16 units a bf16 denoiser, for restorers whose ε error is not amplified
      (:data:`MAX_EPS_ERROR_GAIN`; TVT but not OSEDiff, not StableSR's multi-step sampler);
    * fp32 otherwise.
    """
    device = torch.device(device)
    gain = getattr(restorer, "eps_error_gain", None)
    if device.type == "cuda":
        precision = "fp16"
    elif device.type == "cpu" and cpu_has_bf16_units() and gain is not None and gain <= MAX_EPS_ERROR_GAIN:
        precision = "bf16"
    else:
        precision = "fp32"
    return InferenceOptions(precision=precision, channels_last=True)


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


def describe(restorer: nn.Module) -> str:
    """What a prepared restorer runs in, read off its weights (whatever chose the options), e.g.
    ``denoiser bf16, VAE fp32, channels-last``."""
    names = {dtype: name for name, dtype in PRECISIONS.items()}
    denoiser, vae = (next(m.parameters()).dtype for m in (denoiser_of(restorer), restorer.vae))
    conv = next((m.weight for m in restorer.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)), None)
    layout = "channels-last" if conv is not None and conv.is_contiguous(memory_format=torch.channels_last) else "contiguous"
    return f"denoiser {names[denoiser]}, VAE {names[vae]}, {layout}"
