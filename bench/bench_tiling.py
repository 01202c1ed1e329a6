"""Peak memory and time of tiled vs untiled inference as the output grows (mini models, CPU).

Each case runs in a fresh subprocess, which resets its peak-RSS counter
(``/proc/self/clear_refs``) after imports and model building, so "working MB" is the memory
the inference itself needed. With tiling it should stay ~flat as the image grows.

    PYTHONPATH=. python bench/bench_tiling.py          # mini VAE-D4 decoder, 512² .. 2048²
    PYTHONPATH=. python bench/bench_tiling.py --model vae --max-untiled 2048
    PYTHONPATH=. python bench/bench_tiling.py --model restorer --sizes 256 512   # slow

Default run: about 2 minutes on 2 CPU cores (untiled runs stop at 1024² by default).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

MODELS = {
    "decoder": "mini VAE-D4 decoder (the largest activations: full resolution, most channels)",
    "vae": "mini VAE-D4 encoder + decoder",
    "restorer": "whole mini TVT restorer (encoder, CE-UNet, decoder; slow)",
}


def _status_mb(key: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) / 1024


def run_case(model: str, size: int, tile: int | None) -> dict:
    """Child side: build the mini model, run it for one ``size``² output, report memory and time."""
    import torch

    from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D4
    from tvt.models.tiling import tiled_decode, tiled_encode
    from tvt.models.vae_d4 import VAED4

    torch.manual_seed(0)
    vae = VAED4(**MINI_VAE_D4).eval()
    factor = vae.downsample_factor
    if model == "decoder":
        latent = torch.randn(1, 4, size // factor, size // factor)

        def work():
            if tile is None:
                return vae.decode(latent).sample
            return tiled_decode(vae, latent, tile // factor, tile // factor // 4)

    elif model == "vae":
        image = torch.rand(1, 3, size, size) * 2 - 1

        def work():
            if tile is None:
                return vae.decode(vae.encode(image).latent_dist.mode()).sample
            latent = tiled_encode(vae, image, tile, tile // 4)
            return tiled_decode(vae, latent, tile // factor, tile // factor // 4)

    else:
        from diffusers import UNet2DConditionModel

        from tvt.models.restorer import build_tvt_restorer

        restorer = build_tvt_restorer(vae, UNet2DConditionModel(**MINI_UNET), tile=tile).eval()
        lr = torch.rand(1, 3, size // 4, size // 4)

        def work():
            return restorer(lr)

    baseline = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    with torch.inference_mode():
        out = work()
    seconds = time.perf_counter() - start
    assert out.shape[-2:] == (size, size), out.shape
    return {"seconds": seconds, "peak_mb": _status_mb("VmHWM"), "working_mb": _status_mb("VmHWM") - baseline}


def spawn(model: str, size: int, tile: int | None) -> dict:
    command = [sys.executable, __file__, "--child", model, str(size), str(tile or 0)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="decoder", help="what runs tiled")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="output sides")
    parser.add_argument("--tile", type=int, default=256, help="tile side in output pixels")
    parser.add_argument(
        "--max-untiled",
        type=int,
        default=1024,
        help="skip untiled runs above this side (they would exceed memory or time)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, size, tile = args.child
        print(json.dumps(run_case(model, int(size), int(tile) or None)))
        return

    print(f"model: {MODELS[args.model]}, tile {args.tile} px (overlap {args.tile // 4}), batch 1, CPU")
    header = ("output", "untiled s", "untiled MB", "tiled s", "tiled MB", "tiled/untiled MB", "tiled/untiled s")
    print(" | ".join(f"{h:>16}" for h in header))
    for size in args.sizes:
        untiled = spawn(args.model, size, None) if size <= args.max_untiled else {"error": "skipped"}
        tiled = spawn(args.model, size, args.tile)
        cells = [f"{size}²"]
        for result in (untiled, tiled):
            if "error" in result:
                cells += [result["error"][:16], "-"]
            else:
                cells += [f"{result['seconds']:.2f}", f"{result['working_mb']:.0f}"]
        if "error" not in untiled and "error" not in tiled:
            cells += [
                f"{tiled['working_mb'] / untiled['working_mb']:.2f}",
                f"{tiled['seconds'] / untiled['seconds']:.2f}",
            ]
        else:
            cells += ["-", "-"]
        print(" | ".join(f"{c:>16}" for c in cells), flush=True)
    print("MB: peak RSS of the inference above the process's RSS before it (imports and weights excluded).")


if __name__ == "__main__":
    main()
