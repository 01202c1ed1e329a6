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
    PYTHONPATH=. python bench/bench_fake_lora_scope.py --toy     # no pipeline: random teacher (toy())
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


def toy(steps: int, seed: int = 0, rank: int = 4, lr: float = 5e-4) -> None:
    """Without a trained prior: how far each scope lets the fake score move from the teacher.

    The teacher is a random mini UNet; the "generator" distribution is a fixed set of latents
    that the teacher did not see (a smooth random field plus an offset). The fake score trains
    its ε-MSE on them for ``steps`` AdamW updates, as in VSD; reported per scope: its ε-MSE on
    held-out noise draws (lower: it tracks the generator better), and the size of the VSD
    signal ‖x̂₀_fake − x̂₀_real‖ / ‖x̂₀_real‖ at t ∈ [250, 750) that the generator would receive.
    """
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    from tvt.models.restorer import sd_noise_scheduler
    from tvt.models.sd_configs import MINI_UNET
    from tvt.training.vsd import VSDLoss, _predict_x0, fake_score_unet

    scheduler = sd_noise_scheduler()
    torch.manual_seed(seed)
    teacher = UNet2DConditionModel(**MINI_UNET).eval()
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(32, 4, 4, 4, generator=generator)
    latents = F.interpolate(coarse, size=(16, 16), mode="bicubic") + 0.5
    prompt = torch.zeros(8, 77, MINI_UNET["cross_attention_dim"])
    print(f"toy fake score, {steps} AdamW steps (lr {lr}, rank {rank}), mini UNet, 32 latents 4x16x16")
    print(
        f"{'scope':10s} {'trainable':>10s} {'eps-MSE held-out':>17s} {'teacher eps-MSE':>16s} {'VSD signal':>11s} {'s':>7s}"
    )
    for scope in FAKE_LORA_SCOPES:
        torch.manual_seed(seed + 1)
        fake = fake_score_unet(teacher, rank=rank, scope=scope).train()
        params = [p for p in fake.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        vsd = VSDLoss(teacher, fake, scheduler)
        start = time.perf_counter()
        for step in range(steps):
            batch = latents[torch.arange(8) + 8 * (step % 4)]
            optimizer.zero_grad()
            vsd.fake_score_loss(batch, prompt).backward()
            optimizer.step()
        fake.eval()
        held = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            t = torch.randint(0, 1000, (32,), generator=held)
            noise = torch.randn(latents.shape, generator=held)
            noisy = scheduler.add_noise(latents, noise, t)
            mse = F.mse_loss(fake(noisy, t, torch.zeros(32, 77, prompt.shape[-1])).sample, noise).item()
            teacher_mse = F.mse_loss(teacher(noisy, t, torch.zeros(32, 77, prompt.shape[-1])).sample, noise).item()
            t = torch.randint(250, 750, (32,), generator=held)
            noisy = scheduler.add_noise(latents, noise, t)
            alpha_bar = scheduler.alphas_cumprod[t]
            x0_real = _predict_x0(noisy, teacher(noisy, t, torch.zeros(32, 77, prompt.shape[-1])).sample, alpha_bar)
            x0_fake = _predict_x0(noisy, fake(noisy, t, torch.zeros(32, 77, prompt.shape[-1])).sample, alpha_bar)
            signal = ((x0_fake - x0_real).norm() / x0_real.norm()).item()
        print(
            f"{scope:10s} {sum(p.numel() for p in params):10,d} {mse:17.4f} {teacher_mse:16.4f} {signal:11.4f} "
            f"{time.perf_counter() - start:7.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--variant", default="tvt")
    parser.add_argument("--steps", type=int, help="training steps (default: the config's; --toy: 200)")
    parser.add_argument("--toy", action="store_true", help="no pipeline inputs: the toy comparison of toy()")
    args = parser.parse_args()
    if args.toy:
        toy(args.steps or 200)
        return
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
