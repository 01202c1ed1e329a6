"""VSD fake score: the official scope (mid-block/conv_out adapter only) vs LoRA on every layer, in mini mode.

The official TVT/OSEDiff code builds its fake score with three LoRA adapters and leaves only
the last one added, ``default_others``, active (docs/training-recipe.md). ``fake_lora_scope``
reproduces that (``official``) or activates all three (``full``). This trains the same ISR
variant twice from the same seed, once per scope, on a finished mini pipeline's inputs, and
prints the two side by side: validation PSNR/LPIPS of the saved restorer, the training losses,
the fake score's ε-MSE and the wall time.

Inputs: the outputs of the mini stages ``degrade`` and ``prior`` (``resources/pairs``,
``resources/models/sd-base``), and for TVT variants also ``encoder_transfer``
(``resources/models/vae-d4``), e.g.

    for s in data degrade prior; do python -m tvt stage $s; done
    PYTHONPATH=. python bench/bench_fake_lora_scope.py --variant osediff
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

from tvt import compat

compat.apply()

from tvt import stages
from tvt.config import load
from tvt.training.isr import run_isr
from tvt.training.vsd import FAKE_LORA_SCOPES


class _Run:
    """Keeps the metrics a stage logs."""

    def __init__(self):
        self.metrics: list[tuple[int | None, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def series(self, key: str) -> list[float]:
        return [m[key] for _, m in self.metrics if key in m]

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _late_mean(run: _Run, stage: str, key: str) -> float:
    """Mean of a logged term over the run's last three logging windows."""
    return statistics.fmean(run.series(f"{stage}/{key}")[-3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--variant", default="tvt")
    parser.add_argument("--steps", type=int, help="training steps (default: the config's)")
    args = parser.parse_args()
    cfg = load(args.config)
    section = cfg["isr"][args.variant]
    if args.steps:
        section["steps"] = args.steps
    section["sample_every"] = 0
    rows = {}
    with tempfile.TemporaryDirectory(prefix="fake-scope-") as tmp:
        for scope in FAKE_LORA_SCOPES:
            section["fake_lora_scope"] = scope
            run = _Run()
            start = time.perf_counter()
            metrics = run_isr(
                cfg,
                args.variant,
                Path(stages.PAIRS_DIR),
                Path(stages.SD_DIR),
                Path(stages.VAE_D4_DIR),
                Path(tmp) / f"out-{scope}",
                Path(tmp) / f"ckpt-{scope}",
                run,
            )
            late = functools.partial(_late_mean, run, f"isr_{args.variant}")
            rows[scope] = {
                "val PSNR sr (dB)": metrics["val_psnr_sr"],
                "val LPIPS sr": metrics["val_lpips_sr"],
                "train loss, first window": metrics["train_loss_first"],
                "train loss, last 3 windows": late("loss"),
                "VSD term, last 3 windows": late("vsd"),
                "fake-score eps-MSE, last 3": late("fake_score"),
                "wall s": time.perf_counter() - start,
            }
    print(f"\nisr.{args.variant}, {section['steps']} steps, seed {cfg['seed']}: fake_lora_scope official vs full")
    print(f"{'':30s} {'official':>10s} {'full':>10s} {'full/official':>14s}")
    for key in rows["official"]:
        a, b = rows["official"][key], rows["full"][key]
        print(f"{key:30s} {a:10.4f} {b:10.4f} {b / a if a else float('nan'):14.3f}")
    print(f"val bicubic: PSNR {metrics['val_psnr_bicubic']:.4f} dB, LPIPS {metrics['val_lpips_bicubic']:.4f}")


if __name__ == "__main__":
    main()
