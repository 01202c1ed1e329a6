"""TVT vs OSEDiff restorer latency, side by side in one process, next to their MAC ratio.

Both restorers restore the same LR batch at the same output size; runs alternate between
them (so machine load hits both alike) and the median is reported. MACs are counted by
``tvt.complexity.count_macs`` on the very same forward pass (convolutions + linear layers;
attention-score matmuls separately). Random weights: latency does not depend on them.

    PYTHONPATH=. python bench/bench_latency.py                # mini models, 256² and 512²
    PYTHONPATH=. python bench/bench_latency.py --sd-scale     # + SD-scale models at 256²

SD scale = SD 2.1-base UNet and VAE-D8 for OSEDiff; the paper's VAE-D4 and CE-UNet (sharing
the UNet's weights) for TVT. It needs ~5 GB of free memory (skipped otherwise) and takes
2-5 minutes on 2 CPU cores, so it is opt-in. Default run: under a minute.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import torch

from tvt import compat

compat.apply()

from diffusers import AutoencoderKL, UNet2DConditionModel

from tvt.complexity import count_macs
from tvt.models.restorer import OneStepRestorer, build_osediff_restorer, build_tvt_restorer
from tvt.models.sd_configs import (
    MINI_UNET,
    MINI_VAE_D4,
    MINI_VAE_D8,
    SD21_BASE_UNET,
    SD21_BASE_VAE,
    VAE_D4_PAPER,
)
from tvt.models.vae_d4 import VAED4

SD_SCALE_MIN_FREE_GB = 5


def build_pair(scale: str) -> dict[str, OneStepRestorer]:
    """TVT and OSEDiff restorers sharing one SD UNet ("mini" or "sd" sizes), random weights."""
    torch.manual_seed(0)
    vae_d4, vae_d8, unet = (
        (VAED4(**MINI_VAE_D4), AutoencoderKL(**MINI_VAE_D8), UNet2DConditionModel(**MINI_UNET))
        if scale == "mini"
        else (VAED4(**VAE_D4_PAPER), AutoencoderKL(**SD21_BASE_VAE), UNet2DConditionModel(**SD21_BASE_UNET))
    )
    return {
        "TVT": build_tvt_restorer(vae_d4, unet).eval(),  # CE-UNet shares the UNet's tensors
        "OSEDiff": build_osediff_restorer(vae_d8, unet).eval(),
    }


def measure(restorers: dict[str, OneStepRestorer], output_size: int, repeats: int) -> dict[str, dict]:
    """Median latency (s) and MACs of each restorer at ``output_size``², runs interleaved."""
    lr = torch.rand(1, 3, output_size // 4, output_size // 4, generator=torch.Generator().manual_seed(0))
    results = {name: {"seconds": []} for name in restorers}
    with torch.inference_mode():
        for name, restorer in restorers.items():  # the counted pass doubles as warm-up
            results[name]["gmacs"], results[name]["attn_gmacs"] = (
                m / 1e9 for m in count_macs(lambda r=restorer: r(lr))
            )
        for _ in range(repeats):
            for name, restorer in restorers.items():
                start = time.perf_counter()
                restorer(lr)
                results[name]["seconds"].append(time.perf_counter() - start)
    for result in results.values():
        result["median_s"] = statistics.median(result.pop("seconds"))
    return results


def free_memory_gb() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+) kB", text).group(1)) / 2**20


def print_rows(label: str, output_size: int, results: dict[str, dict]) -> None:
    tvt, osediff = results["TVT"], results["OSEDiff"]
    print(
        f"{label:>9} | {output_size:>5}² | {tvt['median_s']:8.3f} | {osediff['median_s']:8.3f} "
        f"| {tvt['median_s'] / osediff['median_s']:11.2f} | {tvt['gmacs']:9.1f} | {osediff['gmacs']:9.1f} "
        f"| {tvt['gmacs'] / osediff['gmacs']:9.2f} | {tvt['attn_gmacs']:8.1f} | {osediff['attn_gmacs']:8.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mini-sizes", type=int, nargs="+", default=[256, 512], help="output sides, mini models")
    parser.add_argument("--sd-size", type=int, default=256, help="output side for SD-scale models")
    parser.add_argument("--sd-scale", action="store_true", help="also run SD-scale models (slow)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(
        f"CPU, {torch.get_num_threads()} threads, batch 1, median of {args.repeats} interleaved runs; "
        "MACs = conv + linear, attn = attention-score matmuls (G)"
    )
    print(
        "    scale |  output |    TVT s | OSEDiff s | TVT/OSEDiff |  TVT GMAC |  OSE GMAC | MAC ratio "
        "| TVT attn | OSE attn"
    )
    mini = build_pair("mini")
    for size in args.mini_sizes:
        print_rows("mini", size, measure(mini, size, args.repeats))
    if not args.sd_scale:
        return
    if free_memory_gb() < SD_SCALE_MIN_FREE_GB:
        print(f"SD scale skipped: {free_memory_gb():.1f} GB free, needs {SD_SCALE_MIN_FREE_GB} GB")
        return
    print_rows("SD 2.1", args.sd_size, measure(build_pair("sd"), args.sd_size, max(1, args.repeats - 1)))


if __name__ == "__main__":
    main()
