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
    PYTHONPATH=. python bench/bench_precision.py --device cuda --sd-scale --sd-size 512   # on a GPU
    PYTHONPATH=. python bench/bench_precision.py --weights resources/models/tvt resources/models/osediff \
        --pairs resources/store/degrade/<key>/pairs.csv   # the ground-truth check on trained restorers

Default run: a few minutes on 2 CPU cores.

``--weights`` is the second half of the default rule: each trained restorer restores the test split
(``split == test`` in the degrade stage's pairs.csv) under each candidate option; the table gives
the mean PSNR-Y against the HR images (the evaluation's convention: 8-bit outputs, ``--crop-border``
pixels off each side), its change from fp32 and the worst image's PSNR against the fp32 output.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from skimage import data

from tvt import compat

compat.apply()

from bench_latency import build_pair  # bench/ is on sys.path when run as a script
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.nn.attention import SDPBackend, sdpa_kernel

from tvt import config
from tvt.evaluate import load_image, load_test_pairs
from tvt.inference import InferenceOptions, prepare_for_inference
from tvt.metrics.fidelity import quantise, y_channel_metric
from tvt.models.cfw import CFWModule
from tvt.models.prompts import NullPrompt
from tvt.models.restorer import sd_noise_scheduler
from tvt.models.saved import load_restorer as load_saved
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
    ("", InferenceOptions(precision="bf16", channels_last=True), None),
]

# The candidates for tvt sr's default, checked against ground truth on trained weights (--weights)
CANDIDATES = [
    InferenceOptions(),
    InferenceOptions(channels_last=True),
    InferenceOptions(precision="bf16"),
    InferenceOptions(precision="bf16", channels_last=True),
    InferenceOptions(precision="fp16", channels_last=True),  # CUDA's candidate; its numbers, not its speed, here
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


def timed(restorer, lr) -> tuple[torch.Tensor, float]:
    """One call and its seconds; on a GPU, until its kernels have finished."""
    synchronize = torch.cuda.synchronize if lr.device.type == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    out = restorer(lr)
    synchronize()
    return out, time.perf_counter() - start


def run(restorer, lr, repeats: int, kernel) -> tuple[float, torch.Tensor]:
    """Median seconds over ``repeats`` calls after one warm-up (which also compiles), and the output."""
    context = sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext()
    with torch.inference_mode(), context:
        out = restorer(lr).float()
        seconds = [timed(restorer, lr)[1] for _ in range(repeats)]
    return statistics.median(seconds), out


def bench(name: str, reference, lr, options, repeats: int) -> None:
    threads = torch.get_num_threads()
    base_seconds = base_out = None
    for suffix, option, kernel in options:
        restorer = prepare_for_inference(copy.deepcopy(reference).to(lr.device), option)
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


def scored_pairs(cfg, pairs_csv: Path, kinds: list[str] | None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(pair id, LR, HR) of the pairs the evaluation scores (:func:`tvt.evaluate.load_test_pairs`),
    optionally only the given kinds."""
    root = pairs_csv.parent  # (paper mode's rows hold absolute paths, which the join keeps)
    rows = [r for r in load_test_pairs(cfg, pairs_csv) if not kinds or r["kind"] in kinds]
    if not rows:
        raise SystemExit(f"{pairs_csv}: no test pairs{f' of kind {kinds}' if kinds else ''}")
    return [(r["pair_id"], load_image(root / r["lr_path"]), load_image(root / r["hr_path"])) for r in rows]


def ground_truth_check(folders: list[Path], pairs, crop_border: int, repeats: int, device: torch.device) -> None:
    """Per trained restorer and candidate option: seconds per image, mean PSNR-Y vs HR, its change
    from fp32, and the lowest PSNR of any output against that image's fp32 output."""
    psnr_y = y_channel_metric("psnr", crop_border)
    print(f"{len(pairs)} test pairs; PSNR-Y with {crop_border} px cropped per side, outputs as 8-bit PNGs")
    print(f"{'restorer':>9} | {'option':<34} | {'s / image':>9} | {'speed-up':>9} | {'PSNR-Y':>7} "
          f"| {'Δ vs fp32':>9} | {'worst vs fp32':>13} | {'default ok':>10}")
    threads = torch.get_num_threads()
    for folder in folders:
        name = folder.name
        base = None
        for option in CANDIDATES:
            restorer = prepare_for_inference(load_saved(folder).to(device), option)
            outputs, seconds = [], []
            with torch.inference_mode():
                for index, (_, lr, _) in enumerate(pairs):
                    lr = lr.to(device, restorer.vae.dtype)
                    for attempt in range(repeats + (index == 0)):  # the first call also warms up
                        out, elapsed = timed(restorer, lr)
                        if index > 0 or attempt > 0:
                            seconds.append(elapsed)
                    outputs.append(quantise(out.float()).cpu())
            torch.set_num_threads(threads)
            score = statistics.fmean(psnr_y(o, hr).item() for o, (_, _, hr) in zip(outputs, pairs))
            per_image = statistics.fmean(seconds)
            if base is None:
                base = {"score": score, "seconds": per_image, "outputs": outputs}
            worst = min(psnr(b, o) for b, o in zip(base["outputs"], outputs))
            delta = score - base["score"]
            ok = abs(delta) <= 0.1 and worst >= 40
            print(f"{name:>9} | {option.label:<34} | {per_image:9.3f} | {base['seconds'] / per_image:8.2f}x "
                  f"| {score:7.3f} | {delta:+9.3f} | {worst:10.1f} dB | {'yes' if ok else 'no':>10}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="output side, mini models")
    parser.add_argument("--stablesr-steps", type=int, default=2, help="StableSR sampling steps (paper: 200)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (compiles first: minutes)")
    parser.add_argument("--sd-scale", action="store_true", help="also SD-size TVT and OSEDiff (slow)")
    parser.add_argument("--sd-size", type=int, default=256, help="output side for SD-size models")
    parser.add_argument("--no-mini", action="store_true", help="skip the mini models (with --sd-scale)")
    parser.add_argument("--weights", type=Path, nargs="+", metavar="DIR",
                        help="trained restorer folders: run the ground-truth check instead")
    parser.add_argument("--pairs", type=Path, help="with --weights: the degrade stage's pairs.csv")
    parser.add_argument("--config", default="config/config.yaml", help="with --weights: the config the pipeline ran")
    parser.add_argument("--kinds", nargs="+", help="with --weights: only these pair kinds (photo, text)")
    parser.add_argument("--crop-border", type=int, default=4, help="with --weights (default: 4 = scale)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads")
    if args.weights:
        if args.pairs is None:
            parser.error("--weights needs --pairs (the degrade stage's pairs.csv)")
        print(f"{where}, batch 1, mean over the test split of {args.repeats} timed calls each")
        pairs = scored_pairs(config.load(args.config), args.pairs, args.kinds)
        ground_truth_check(args.weights, pairs, args.crop_border, args.repeats, device)
        return
    options = OPTIONS + ([("", InferenceOptions(compile=True), None)] if args.compile else [])
    if device.type != "cpu":  # thread counts are a CPU setting
        options = [o for o in options if o[1].threads is None]

    print(f"{where}, batch 1, median of {args.repeats}; mini models at {args.size}² output; "
          f"StableSR {args.stablesr_steps} steps")
    print(f"{'method':>9} | {'option':<34} | {'seconds':>9} | {'speed-up':>9} | {'vs fp32':>12} | {'≥ 40 dB':>7}")
    lr = photo_lr(args.size // 4).to(device)
    if not args.no_mini:
        restorers = {**build_pair("mini"), "StableSR": mini_stablesr(args.stablesr_steps)}
        for name, restorer in restorers.items():
            bench(name, restorer, lr, options, args.repeats)
    if args.sd_scale:  # fp16 has no CPU arithmetic units: 4-10x slower than fp32 at mini size, minutes there
        sd_options = [o for o in options if o[1].threads is None and o[2] is None and o[1].vae_fp32
                      and (o[1].precision != "fp16" or device.type == "cuda")]
        repeats = args.repeats if device.type == "cuda" else max(1, args.repeats - 2)
        for name, restorer in build_pair("sd").items():
            bench(f"SD {name}", restorer, photo_lr(args.sd_size // 4).to(device), sd_options, repeats)


if __name__ == "__main__":
    main()
