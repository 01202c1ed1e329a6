"""What do the mini one-step restorers' UNets add? Each trained restorer against itself without its UNet.

Run from the repository root after ``make demo``. For TVT and OSEDiff it scores, on the test pairs
(and on held-out photographs with ``--heldout-photos``), the restorer as trained and the same
restorer with its one UNet call replaced by ẑ_H = z_L (encoder, decoder and colour fix unchanged),
beside bicubic and beside the HR images sent through each autoencoder (what its decoder can
reach at best). It also prints ‖ẑ_H − z_L‖ / ‖z_L‖, how far the UNet moves the latent. Protocol:
the claims' (tvt/claims.py): 8-bit outputs, PSNR-Y / SSIM-Y with the evaluation's border, LPIPS-Alex.
Measured on run I: docs/mini-mode.md.

    python bench/bench_mini_unet.py --heldout-photos /tmp/mate/usr/share/backgrounds/mate/nature
    python bench/bench_mini_unet.py --config my-variant.yaml   # e.g. another isr.tvt.steps
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

from tvt import claims, compat, config
from tvt.evaluate import build_method
from tvt.metrics.suite import MetricSuite
from tvt.stages import method_stage

METRICS = ("psnr_y", "ssim_y", "lpips")


@contextlib.contextmanager
def latent_shift_recorded(restorer, shifts: list[float], skip_unet: bool):
    """The restorer with its ``denoise`` recording ‖ẑ_H − z_L‖ / ‖z_L‖, or (``skip_unet``) returning z_L."""
    denoise = restorer.denoise

    def recorded(z_l, prompt_embeds):
        z_h = z_l if skip_unet else denoise(z_l, prompt_embeds)
        shifts.append(float((z_h - z_l).norm() / z_l.norm()))
        return z_h

    restorer.denoise = recorded  # the instance attribute shadows the method
    try:
        yield
    finally:
        del restorer.denoise


def autoencoded_hr(vae, pairs, suite: MetricSuite, device: torch.device) -> dict[str, float]:
    """The HR images through encode (posterior mode) → decode: the decoder's ceiling for a restorer,
    scored by the claims' own loop with each HR image as its own input."""

    def autoencode(x: torch.Tensor) -> torch.Tensor:
        return (vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample + 1) / 2

    return claims.isr_scores(autoencode, [(hr, hr) for _, hr in pairs], suite, device)


def _cells(scores: dict[str, float]) -> str:
    return f"{scores['psnr_y']:.2f} / {scores['ssim_y']:.3f} / {scores['lpips']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/config.yaml", help="the config the pipeline ran with")
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root holding resources/")
    parser.add_argument("--heldout-photos", type=Path, help="folder of photographs never used by the pipeline")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    compat.apply()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    cfg = config.load(args.config)
    folder = {n: claims._stage_folder(cfg, n, args.root) for n in ("degrade", "prior", "encoder_transfer")}
    sets = {"test": claims._test_pairs(folder["degrade"])}
    if args.heldout_photos:
        photos = claims.folder_photos(args.heldout_photos, cfg["data"]["photos"]["max_side"])
        sets["held-out"] = claims._degraded_pairs(photos, cfg["degrade"], cfg["seed"])
    suite = MetricSuite(list(METRICS), cfg["evaluate"]["crop_border"], device)

    bicubic = build_method("bicubic", cfg)
    rows = [("bicubic", {s: claims.isr_scores(lambda lr: bicubic.restore(lr, ""), pairs, suite, device)
                         for s, pairs in sets.items()}, "")]
    for name in ("tvt", "osediff"):
        stage_dir = claims._stage_folder(cfg, method_stage(name), args.root)
        if stage_dir is None or not stage_dir.is_dir():
            print(f"{name}: not trained under {args.root} for this config, skipped")
            continue
        restorer = build_method(name, cfg, device, stage_dir).model
        for label, skip in (("as trained", False), ("without its UNet (ẑ_H = z_L)", True)):
            shifts: list[float] = []
            with latent_shift_recorded(restorer, shifts, skip):
                scores = {s: claims.isr_scores(restorer, pairs, suite, device) for s, pairs in sets.items()}
            rows.append((f"{name}, {label}", scores, f"{np.mean(shifts):.2f}"))
    for name, vae in claims._load_vaes(device, folder["prior"], folder["encoder_transfer"]).items():
        rows.append((f"HR through {name} (ceiling)", {"test": autoencoded_hr(vae, sets["test"], suite, device)}, ""))

    header = " | ".join(f"{s} PSNR-Y / SSIM-Y / LPIPS" for s in sets)
    print(f"| restorer | {header} | ‖ẑ_H − z_L‖ / ‖z_L‖ |")
    print("|---|" + "---|" * len(sets) + "---:|")
    for label, scores, shift in rows:
        cells = " | ".join(_cells(scores[s]) if s in scores else "" for s in sets)
        print(f"| {label} | {cells} | {shift} |")


if __name__ == "__main__":
    main()
