"""`tvt sr` throughput and memory: images/s and peak RSS for TVT and OSEDiff, side by side.

Runs the tool's own path (read PNG -> restorer -> write PNG, :func:`tvt.sr.restore_batch`)
on crops of the photos that ship inside installed wheels (``tvt.data.photos``) at each output size, with the
tool's default tiling decision. Each method runs in a fresh subprocess: the restorer from
``resources/models/<method>`` when the pipeline trained one, else built from the MINI configs
with random weights (the table says which; throughput and memory do not depend on the
weights' values). Peak RSS is reset (``/proc/self/clear_refs``) before every size.

    PYTHONPATH=. python bench/bench_sr.py
    PYTHONPATH=. python bench/bench_sr.py --sizes 256 512 --images 4

Default run: about 4 minutes on 2 busy CPU cores, most of it TVT at 1024² (its CE-UNet
attends over 256² latent tokens at 2x resolution). Tiled vs untiled memory: bench_tiling.py.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("tvt", "osediff")


def _status_mb(key: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def _restorer_dir(method: str, scratch: Path) -> tuple[Path, str]:
    """The trained restorer of the pipeline, else a MINI-config one with random weights saved to ``scratch``."""
    from tvt.stages import method_model_dir

    trained = Path(method_model_dir(method))
    if (trained / "restorer.json").exists():
        return trained, f"trained ({trained})"
    from tvt import compat

    compat.apply()  # diffusers imports peft -> transformers -> torchvision
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from tvt.models.restorer import build_osediff_restorer, build_tvt_restorer
    from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D4, MINI_VAE_D8
    from tvt.models.vae_d4 import VAED4

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**MINI_UNET)
    restorer = (build_tvt_restorer(VAED4(**MINI_VAE_D4), unet) if method == "tvt"
                else build_osediff_restorer(AutoencoderKL(**MINI_VAE_D8), unet))
    return restorer.save_pretrained_dir(scratch / method), "random (MINI configs)"


def _lr_images(folder: Path, side: int, count: int) -> list[Path]:
    """``count`` LR PNGs of ``side``²: area-downscaled centre crops of the wheel photos."""
    from PIL import Image

    from tvt.data.photos import WHEEL_PHOTOS, locate

    photos = [path for path in map(locate, WHEEL_PHOTOS) if path is not None]
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        image = Image.open(photos[i % len(photos)]).convert("RGB")
        crop = min(image.size)
        left, top = (image.width - crop) // 2, (image.height - crop) // 2
        image = image.crop((left, top, left + crop, top + crop)).resize((side, side), Image.Resampling.BOX)
        paths.append(folder / f"lr{i}.png")
        image.save(paths[-1])
    return paths


def run_method(method: str, sizes: list[int], images: int) -> list[dict]:
    """Child side: load the restorer as the tool does, then restore ``images`` images per output size."""
    from tvt import sr

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        weights, origin = _restorer_dir(method, scratch)
        restorer = sr.load_restorer(weights, device="cpu")
        options = sr.BatchOptions(overwrite=True)
        warmup = _lr_images(scratch / "warmup", 16, 1)  # first-call costs (thread pools, allocator)
        sr.restore_batch(restorer, [sr.BatchItem(warmup[0], scratch / "warmup-out.png")], options, progress=False)
        for size in sorted(sizes):
            count = max(1, images * 256**2 // size**2)  # fewer of the big ones: the default run stays short
            inputs = _lr_images(scratch / f"in{size}", size // restorer.scale, count)
            items = [sr.BatchItem(p, scratch / f"out{size}" / p.name) for p in inputs]
            before = _status_mb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            start = time.perf_counter()
            results = sr.restore_batch(restorer, items, options, progress=False)
            seconds = time.perf_counter() - start
            failed = [r.message for r in results if r.status != "restored"]
            if failed:
                raise RuntimeError(f"{method} at {size}²: {failed[0]}")
            rows.append({"method": method, "weights": origin, "size": size, "images": count,
                         "tile": results[0].tile, "images_per_s": count / seconds,
                         "peak_mb": _status_mb("VmHWM"), "working_mb": _status_mb("VmHWM") - before})
    return rows


def spawn(method: str, sizes: list[int], images: int) -> list[dict]:
    command = [sys.executable, __file__, "--child", method, "--sizes", *map(str, sizes), "--images", str(images)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{method} failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024], help="output sides (multiples of 4)")
    parser.add_argument("--images", type=int, default=2,
                        help="images per size at 256² (scaled down by area for larger sizes, at least 1)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_method(args.child, args.sizes, args.images)))
        return

    start = time.perf_counter()
    rows = {method: {row["size"]: row for row in spawn(method, args.sizes, args.images)} for method in METHODS}
    for method in METHODS:
        print(f"{method}: {next(iter(rows[method].values()))['weights']}")
    header = ("output", "images", "tile", "TVT img/s", "OSEDiff img/s", "TVT/OSEDiff",
              "TVT peak MB", "OSEDiff peak MB", "TVT work MB", "OSEDiff work MB", "TVT/OSEDiff MB")
    print(" | ".join(f"{h:>13}" for h in header))
    for size in sorted(args.sizes):
        tvt, osediff = rows["tvt"][size], rows["osediff"][size]
        tiles = "/".join(str(r["tile"] or "-") for r in (tvt, osediff))
        cells = [f"{size}²", str(tvt["images"]), tiles,
                 f"{tvt['images_per_s']:.3f}", f"{osediff['images_per_s']:.3f}",
                 f"{tvt['images_per_s'] / osediff['images_per_s']:.2f}",
                 f"{tvt['peak_mb']:.0f}", f"{osediff['peak_mb']:.0f}",
                 f"{tvt['working_mb']:.0f}", f"{osediff['working_mb']:.0f}",
                 f"{tvt['working_mb'] / max(osediff['working_mb'], 1):.2f}"]
        print(" | ".join(f"{c:>13}" for c in cells))
    print("img/s: read + restore + write, batch 1, CPU. peak MB: process peak RSS (weights, imports included); "
          "work MB: peak above the RSS before that size. tile: TVT/OSEDiff tile side, - untiled (auto policy).")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
