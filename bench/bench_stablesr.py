"""StableSR's cost next to a one-step restorer, side by side in one process (mini models, CPU).

What the table shows, per output size:

* one-step OSEDiff restorer (E8 + one UNet call + D8) — the reference, ratio 1;
* StableSR at N sampling steps, untiled: grows ~linearly in N (each step = UNet + SFT +
  time-aware encoder), so ``(t(N2) − t(N1)) / (N2 − N1)`` is the per-step cost;
* StableSR with aggregation sampling (latent tiles of half the latent side, overlap half a
  tile): the price of bounded memory;
* w = 0 vs w = 1: what CFW's fusion (and its second encoder pass) adds to decoding.

Runs alternate between the variants so machine load hits all alike; medians are reported.
Random weights: latency does not depend on them.

    PYTHONPATH=. python bench/bench_stablesr.py                 # 128² and 256² outputs
    PYTHONPATH=. python bench/bench_stablesr.py --sizes 512 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tvt import compat

compat.apply()

from diffusers import AutoencoderKL, UNet2DConditionModel

from tvt.models.cfw import CFWModule
from tvt.models.prompts import NullPrompt
from tvt.models.restorer import build_osediff_restorer, sd_noise_scheduler
from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D8, STABLESR_CONDITIONER_MINI
from tvt.models.stablesr import StableSRConditioner
from tvt.models.stablesr_restorer import StableSRRestorer


def build(steps: int, tile: int | None, w: float) -> StableSRRestorer:
    torch.manual_seed(0)
    vae, unet = AutoencoderKL(**MINI_VAE_D8).eval(), UNet2DConditionModel(**MINI_UNET).eval()
    return StableSRRestorer(
        vae, unet, StableSRConditioner.for_unet(unet, **STABLESR_CONDITIONER_MINI).eval(),
        CFWModule.for_vae(vae, num_rrdb_blocks=1, growth_channels=16).eval(), scheduler=sd_noise_scheduler(),
        prompt=NullPrompt.zeros(MINI_UNET["cross_attention_dim"]), steps=steps, w=w, tile=tile,
        tile_overlap=tile // 2 if tile else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="output sides (multiples of 64)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    for size in args.sizes:
        lr = torch.rand(1, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        variants = {
            "one-step OSEDiff (reference)": build_osediff_restorer(
                AutoencoderKL(**MINI_VAE_D8), UNet2DConditionModel(**MINI_UNET)).eval(),
            "StableSR 4 steps, w=0.5": build(4, None, 0.5),
            "StableSR 20 steps, w=0.5": build(20, None, 0.5),
            f"StableSR 20 steps, tiles {size // 2}px": build(20, size // 2, 0.5),
            "StableSR 20 steps, w=0 (no CFW)": build(20, None, 0.0),
            "StableSR 20 steps, w=1": build(20, None, 1.0),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        with torch.inference_mode():
            for model in variants.values():  # warm-up
                model(lr)
            for _ in range(args.repeats):
                for name, model in variants.items():
                    start = time.perf_counter()
                    model(lr)
                    times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(t) * 1000 for name, t in times.items()}
        reference = median["one-step OSEDiff (reference)"]
        per_step = (median["StableSR 20 steps, w=0.5"] - median["StableSR 4 steps, w=0.5"]) / 16
        print(f"\n{size}² output ({size // 4}² LR), {args.threads} thread(s), median of {args.repeats}")
        print("| variant | ms / image | × one-step |\n|---|---:|---:|")
        for name, ms in median.items():
            print(f"| {name} | {ms:.0f} | {ms / reference:.1f} |")
        print(f"| per sampling step (from 4 vs 20 steps) | {per_step:.0f} | {per_step / reference:.2f} |")


if __name__ == "__main__":
    main()
