"""Peak memory, time and fidelity of tiled vs untiled inference as the output grows (CPU).

Each case runs in a fresh subprocess, which resets its peak-RSS counter
(``/proc/self/clear_refs``) after imports and model building, so "working MB" is the memory
the inference itself needed; "CPU seconds" (process time) is what the work cost even when
other jobs share the cores and stretch the wall-clock "seconds". With tiling it should stay ~flat as the image grows. Tiled runs
come in two flavours: ``tile`` (Gaussian-blended tiles, per-tile GroupNorm statistics) and
``exact`` (tiled_vae.py: statistics pooled over all tiles). "PSNR" compares a tiled output
with the untiled one (peak = the untiled output's range; random weights).

    PYTHONPATH=. python bench/bench_tiling.py          # mini VAE-D4 decoder, 512² .. 2048²
    PYTHONPATH=. python bench/bench_tiling.py --model sd-decoder --sizes 512 1024 2048 --max-untiled 512
    PYTHONPATH=. python bench/bench_tiling.py --model vae --max-untiled 2048
    PYTHONPATH=. python bench/bench_tiling.py --model cfw-decoder --sizes 512 1024 --modes exact
    PYTHONPATH=. python bench/bench_tiling.py --model sd-cfw-decoder --sizes 512 --modes exact
    PYTHONPATH=. python bench/bench_tiling.py --model restorer --sizes 256 512   # slow

Default run: a few minutes on 2 CPU cores (untiled runs stop at 1024² by default); the
SD-size decoder takes tens of seconds per 512² of output.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "decoder": "mini VAE-D4 decoder (the largest activations: full resolution, most channels)",
    "d4-decoder": "paper-size VAE-D4 decoder (TVT)",
    "sd-decoder": "SD 2.1 VAE-D8 decoder (OSEDiff, StableSR; attention in the mid-block)",
    "cfw-decoder": "mini VAE-D8 decoder + StableSR's CFW (2 RRDBs per level, w = 1; exact tiling only)",
    "sd-cfw-decoder": "SD 2.1 VAE-D8 decoder + StableSR's CFW (2 RRDBs per level, w = 1; exact tiling only)",
    "vae": "mini VAE-D4 encoder + decoder",
    "restorer": "whole mini TVT restorer (encoder, CE-UNet, decoder; slow)",
}
CFW_MODELS = ("cfw-decoder", "sd-cfw-decoder")  # exact tiling only: CFW has no blended-tile path


def _status_mb(key: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) / 1024


def _photo_latent(size: int):
    """A structured stand-in latent: skimage's astronaut (RGB + grey) at the latent size, in [-2, 2]."""
    import torch
    import torch.nn.functional as F
    from skimage import data

    rgb = torch.from_numpy(data.astronaut().copy()).permute(2, 0, 1)[None].float() / 255
    rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return torch.cat([rgb, rgb.mean(1, keepdim=True)], 1) * 4 - 2


def run_case(model: str, size: int, tile: int | None, norm_stats: str, save: str | None) -> dict:
    """Child side: build the model, run it for one ``size``² output, report memory and time."""
    import torch

    from tvt import compat

    compat.apply()
    from diffusers import AutoencoderKL

    from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D4, SD21_BASE_VAE, VAE_D4_PAPER
    from tvt.models.tiling import tiled_decode, tiled_encode
    from tvt.models.vae_d4 import VAED4

    torch.manual_seed(0)
    if model == "sd-decoder":
        vae, factor = AutoencoderKL(**SD21_BASE_VAE).eval(), 8
    elif model in CFW_MODELS:
        from tvt.models.cfw import CFWAutoencoder, CFWModule
        from tvt.models.sd_configs import MINI_VAE_D8

        vae, factor = AutoencoderKL(**(SD21_BASE_VAE if model == "sd-cfw-decoder" else MINI_VAE_D8)).eval(), 8
        autoencoder = CFWAutoencoder(vae, CFWModule.for_vae(vae).eval())
    else:
        vae = VAED4(**(VAE_D4_PAPER if model == "d4-decoder" else MINI_VAE_D4)).eval()
        factor = vae.downsample_factor
    if model in ("decoder", "d4-decoder", "sd-decoder"):
        latent = _photo_latent(size // factor)

        def work():
            if tile is None:
                return vae.decode(latent).sample
            return tiled_decode(vae, latent, tile // factor, tile // factor // 4, norm_stats=norm_stats)

    elif model in CFW_MODELS:
        latent = _photo_latent(size // factor)
        lr_image = torch.nn.functional.interpolate(latent[:, :3], scale_factor=factor, mode="bicubic") / 2

        def work():
            if tile is None:
                return autoencoder(latent, lr_image, 1.0)
            return autoencoder.tiled_decode(latent, lr_image, 1.0, tile // factor)

    elif model == "vae":
        image = torch.rand(1, 3, size, size) * 2 - 1

        def work():
            if tile is None:
                return vae.decode(vae.encode(image).latent_dist.mode()).sample
            latent = tiled_encode(vae, image, tile, tile // 4, norm_stats=norm_stats)
            return tiled_decode(vae, latent, tile // factor, tile // factor // 4, norm_stats=norm_stats)

    else:
        from diffusers import UNet2DConditionModel

        from tvt.models.restorer import build_tvt_restorer

        restorer = build_tvt_restorer(
            vae, UNet2DConditionModel(**MINI_UNET), tile=tile, tile_norm_stats=norm_stats
        ).eval()
        lr = torch.rand(1, 3, size // 4, size // 4)

        def work():
            return restorer(lr)

    baseline = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = work()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    assert out.shape[-2:] == (size, size), out.shape
    if save:
        torch.save(out, save)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_mb": _status_mb("VmHWM"),
        "working_mb": _status_mb("VmHWM") - baseline,
    }


def spawn(model: str, size: int, tile: int | None, norm_stats: str = "tile", save: Path | None = None) -> dict:
    command = [sys.executable, __file__, "--child", model, str(size), str(tile or 0), norm_stats, str(save or "")]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def psnr(reference: Path, other: Path) -> float:
    """PSNR of ``other`` against ``reference``, peak = the reference's range."""
    import torch

    ref, out = torch.load(reference, weights_only=True).double(), torch.load(other, weights_only=True).double()
    mse = (ref - out).square().mean().item()
    peak = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


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
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("tile", "exact"),
        default=["tile", "exact"],
        help="GroupNorm statistics of the tiled runs",
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, size, tile, norm_stats, save = args.child
        print(json.dumps(run_case(model, int(size), int(tile) or None, norm_stats, save or None)))
        return

    print(f"model: {MODELS[args.model]}, tile {args.tile} px (blended: overlap {args.tile // 4}), batch 1, CPU")
    header = ("output", "run", "seconds", "CPU seconds", "working MB", "PSNR vs untiled")
    print(" | ".join(f"{h:>15}" for h in header))
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            reference = Path(tmp) / f"untiled-{size}.pt"
            runs = [("untiled", None, "tile")] if size <= args.max_untiled else []
            runs += [(mode, args.tile, mode) for mode in args.modes if mode == "exact" or args.model not in CFW_MODELS]
            for label, tile, norm_stats in runs:
                save = Path(tmp) / f"{label}-{size}.pt"
                result = spawn(args.model, size, tile, norm_stats, save)
                if "error" in result:
                    cells = [result["error"][:40], "-", "-", "-"]
                else:
                    fidelity = (
                        "-" if label == "untiled" or not reference.exists() else f"{psnr(reference, save):.1f} dB"
                    )
                    cells = [
                        f"{result['seconds']:.2f}",
                        f"{result['cpu_seconds']:.2f}",
                        f"{result['working_mb']:.0f}",
                        fidelity,
                    ]
                print(" | ".join(f"{c:>15}" for c in [f"{size}²", label, *cells]), flush=True)
                if label != "untiled":
                    save.unlink(missing_ok=True)
    print("MB: peak RSS of the inference above the process's RSS before it (imports and weights excluded).")
    print("CPU seconds: the process's CPU time (all threads): on a shared machine, what the work cost.")


if __name__ == "__main__":
    main()
