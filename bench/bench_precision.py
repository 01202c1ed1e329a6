"""The fastest exact restorer: latency of each inference option vs fp32, and how far its output moves.

For TVT, OSEDiff and StableSR (random weights, same LR photo: skimage's astronaut), every option
of :class:`tvt.inference.InferenceOptions` — reduced precision with an fp32 VAE, channels-last,
the SDPA kernel, torch.compile, thread count — restores the same input. The table gives the
median latency, the speed-up over fp32 and the PSNR of the output against the fp32 output
(outputs in [0, 1]; ∞ = identical). An option may become ``tvt sr``'s default only if it is
≥ 40 dB from fp32 (and within 0.1 dB of fp32's PSNR against ground truth on trained weights).

    PYTHONPATH=. python bench/bench_precision.py                     # mini models, 256² output
    PYTHONPATH=. python bench/bench_precision.py --compile           # + torch.compile (minutes)
    PYTHONPATH=. python bench/bench_precision.py --sd-scale --sd-size 256   # SD-size TVT/OSEDiff

Default run: a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from skimage import data

from tvt import compat

compat.apply()

from bench_latency import build_pair  # bench/ is on sys.path when run as a script
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.nn.attention import SDPBackend, sdpa_kernel

from tvt.inference import InferenceOptions, prepare_for_inference
from tvt.models.cfw import CFWModule
from tvt.models.prompts import NullPrompt
from tvt.models.restorer import sd_noise_scheduler
from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D8, STABLESR_CONDITIONER_MINI
from tvt.models.stablesr import StableSRConditioner
from tvt.models.stablesr_restorer import StableSRRestorer
from tvt.training.prior import null_prompt_embeds

# (label suffix, options, SDPA kernel or None for PyTorch's choice)
OPTIONS = [
    ("", InferenceOptions(), None),
    ("", InferenceOptions(channels_last=True), None),
    (", SDPA math", InferenceOptions(), SDPBackend.MATH),
    ("", InferenceOptions(threads=1), None),
    ("", InferenceOptions(precision="bf16"), None),
    ("", InferenceOptions(precision="bf16", vae_fp32=False), None),
    ("", InferenceOptions(precision="fp16"), None),
]


def mini_stablesr(steps: int) -> StableSRRestorer:
    torch.manual_seed(0)
    vae, unet = AutoencoderKL(**MINI_VAE_D8), UNet2DConditionModel(**MINI_UNET)
    conditioner = StableSRConditioner.for_unet(unet, **STABLESR_CONDITIONER_MINI)
    cfw = CFWModule.for_vae(vae, num_rrdb_blocks=1, growth_channels=8)
    with torch.no_grad():  # SFT and CFW start as exact no-ops; give them an effect
        for p in (*conditioner.parameters(), *cfw.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    prompt = NullPrompt(null_prompt_embeds(MINI_UNET["cross_attention_dim"]))
    return StableSRRestorer(vae, unet, conditioner, cfw, scheduler=sd_noise_scheduler(), prompt=prompt, steps=steps)


def photo_lr(side: int) -> torch.Tensor:
    image = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(image, size=(side, side), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    mse = (reference.double() - other.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def run(restorer, lr, repeats: int, kernel) -> tuple[float, torch.Tensor]:
    """Median seconds over ``repeats`` calls after one warm-up (which also compiles), and the output."""
    context = sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext()
    with torch.inference_mode(), context:
        out = restorer(lr).float()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            restorer(lr)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), out


def bench(name: str, reference, lr, options, repeats: int) -> None:
    threads = torch.get_num_threads()
    base_seconds = base_out = None
    for suffix, option, kernel in options:
        restorer = prepare_for_inference(copy.deepcopy(reference), option)
        try:  # the input in the VAE's dtype, as tvt sr feeds it
            seconds, out = run(restorer, lr.to(restorer.vae.dtype), repeats, kernel)
        except RuntimeError as exc:  # an op without a kernel for this dtype on this device
            print(f"{name:>9} | {option.label + suffix:<34} | failed: {str(exc).splitlines()[0][:60]}", flush=True)
            continue
        finally:
            torch.set_num_threads(threads)
        if base_out is None:
            base_seconds, base_out = seconds, out
        agreement = psnr(base_out, out)
        print(
            f"{name:>9} | {option.label + suffix:<34} | {seconds:9.3f} | {base_seconds / seconds:8.2f}x "
            f"| {agreement:9.1f} dB | {'yes' if agreement >= 40 else 'no':>7}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="output side, mini models")
    parser.add_argument("--stablesr-steps", type=int, default=2, help="StableSR sampling steps (paper: 200)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (compiles first: minutes)")
    parser.add_argument("--sd-scale", action="store_true", help="also SD-size TVT and OSEDiff (slow)")
    parser.add_argument("--sd-size", type=int, default=256, help="output side for SD-size models")
    args = parser.parse_args()
    options = OPTIONS + ([("", InferenceOptions(compile=True), None)] if args.compile else [])

    cpu = torch.backends.cpu.get_cpu_capability()
    print(
        f"CPU ({cpu}), {torch.get_num_threads()} threads, batch 1, median of {args.repeats}; "
        f"mini models at {args.size}² output; StableSR {args.stablesr_steps} steps"
    )
    print(f"{'method':>9} | {'option':<34} | {'seconds':>9} | {'speed-up':>9} | {'vs fp32':>12} | {'≥ 40 dB':>7}")
    lr = photo_lr(args.size // 4)
    restorers = {**build_pair("mini"), "StableSR": mini_stablesr(args.stablesr_steps)}
    for name, restorer in restorers.items():
        bench(name, restorer, lr, options, args.repeats)
    if args.sd_scale:
        sd_options = [o for o in options if o[1].threads is None and o[2] is None and o[1].vae_fp32]
        for name, restorer in build_pair("sd").items():
            bench(f"SD {name}", restorer, photo_lr(args.sd_size // 4), sd_options, max(1, args.repeats - 2))


if __name__ == "__main__":
    main()
