"""The mini prior's VAE-D8 under several training recipes, side by side: s/step and held-out PSNR-Y.

Every later stage inherits this autoencoder (issue 12: the claims need D8 ≥ 22 dB on held-out
256² photo windows), so its recipe is the first lever of mini mode. Each row trains the VAE
exactly as the ``prior`` stage does (:func:`tvt.training.prior.train_vae`) on the pairs of a
finished ``degrade`` stage, with some keys of ``prior.vae`` overridden, then scores it as the
claims table does (:func:`tvt.claims.vae_psnr` on the test photos' 256² windows, and on the same
windows bicubic ×2: the gain there says whether the VAE is limited by its downsampling). Rows run
one after another in one process, so their seconds are comparable with each other (on a
shared machine, as upper bounds). ``--seeds K`` trains every variant K times (seeds seed … seed+K-1)
and prints the mean and the range: after ~100 updates one seed says little (docs/mini-mode.md).

    python bench/bench_mini_vae.py '{}' '{"lr_warmup": 10, "lr_decay": "cosine"}' \\
        '{"steps": 200, "crop_size": 64, "batch_size": 8}'
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # a table, not progress bars

import numpy as np
import torch

from tvt import claims, config
from tvt.stages import stage_by_name
from tvt.training.data import PairDataset
from tvt.training.engine import files_digest
from tvt.training.prior import train_vae


def _spread(values) -> str:
    """``mean`` for one value, ``mean (min–max)`` for several."""
    mean = float(np.mean(values))
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({min(values):.2f}–{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=["{}"], help="JSON objects overriding prior.vae keys")
    parser.add_argument("--config", default="config/config.yaml", help="the config whose data/degrade stages ran")
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root holding resources/")
    parser.add_argument("--heldout-photos", type=Path, help="also score on a folder of never-used photographs")
    parser.add_argument("--seeds", type=int, default=1, help="train each variant with this many seeds")
    args = parser.parse_args()

    cfg = config.load(args.config)
    pairs_dir = args.root / stage_by_name(cfg, "degrade").folder
    data_dir = args.root / stage_by_name(cfg, "data").folder
    train = PairDataset(pairs_dir, "train", with_lr=False)
    val = PairDataset(pairs_dir, "val", with_lr=False)
    crops = claims.test_photo_crops(data_dir)
    heldout = []
    if args.heldout_photos:
        photos = claims.folder_photos(args.heldout_photos, cfg["data"]["photos"]["max_side"])
        heldout = [w for p in photos for w in claims.windows(p, claims.VAE_CROP, claims.VAE_CROPS_PER_PHOTO)]
    digest = files_digest(pairs_dir / "pairs.csv")
    print(
        f"{len(train)} training crops, {len(crops)} test windows of {claims.VAE_CROP}², {len(heldout)} held-out; "
        f"{torch.get_num_threads()} threads"
    )

    # the same windows drawn 2× larger: a VAE limited by its 8× downsampling (TVT's premise) gains here,
    # one limited by its fit does not (the `vae_d8_2x_psnr` claim)
    crops_2x = claims.upscale2(crops)
    header = "| overrides | steps | batch | crop | seeds | s/step | val PSNR | test PSNR-Y | test at 2× | held-out PSNR-Y |"
    rows = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for text in args.variants:
        overrides = json.loads(text)
        section = copy.deepcopy(cfg["prior"])
        section["vae"].update(overrides)
        vae_cfg = section["vae"]
        per_seed = []
        for seed in range(cfg["seed"], cfg["seed"] + args.seeds):
            with tempfile.TemporaryDirectory() as ckpt:
                start = time.perf_counter()
                vae, trainer, val_psnr = train_vae(section, seed, train, val, Path(ckpt), None, digest)
                seconds = time.perf_counter() - start
            test = claims.vae_psnr(vae, crops, trainer.device)
            test_2x = claims.vae_psnr(vae, crops_2x, trainer.device)
            held = claims.vae_psnr(vae, heldout, trainer.device) if heldout else float("nan")
            per_seed.append((seconds / vae_cfg["steps"], val_psnr, test, test_2x, held))
            print(f"  {json.dumps(overrides)} seed {seed}: test {test:.2f} (at 2×: {test_2x:.2f}), "
                  f"held-out {held:.2f} dB", flush=True)
        columns = list(zip(*per_seed))
        rows.append(
            f"| `{json.dumps(overrides)}` | {vae_cfg['steps']} | {vae_cfg['batch_size']} | "
            f"{vae_cfg.get('crop_size', '—')} | {args.seeds} | {np.mean(columns[0]):.2f} | "
            + " | ".join(_spread(c) for c in columns[1:]) + " |"
        )
        print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
