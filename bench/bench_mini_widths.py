"""Seconds per training update of mini mode's autoencoders at two sets of widths, side by side.

Every VAE stage of mini mode is compute-bound on a CPU (the conv backward pass is ~60 % of an
update), so the cost of one update decides how many updates fit in the demo's minutes. This
times the updates the stages make, on random data (timing only; quality is what
``bench/bench_mini_vae.py`` and ``bench/bench_mini_claims.py`` measure):

* ``prior`` VAE-D8: encode → sample → decode → L1, backward, Adam (``tvt.training.prior.train_vae``);
* ``decoder_transfer``: frozen E8 on the 2× upsampled batch (the stage's ``transfer_latents``), then
  D4 decode → L2, backward, Adam;
* ``encoder_transfer``: E4 → frozen D4 → L2, backward through D4, Adam on E4.

Rows alternate between the variants (``--repeats`` rounds), so machine noise hits both alike;
the table gives the median seconds and the ratio to the shipped widths.

    python bench/bench_mini_widths.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from tvt import compat

compat.apply()

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from tvt.models.sd_configs import MINI_VAE_D4, MINI_VAE_D8
from tvt.models.vae_d4 import VAED4
from tvt.training.vae_transfer import transfer_latents

#: the widths mini mode shipped before 2026-12-02 (SD's VAE had a 1:2:2:2 shape in miniature)
PREVIOUS = {
    "vae_d8": {**MINI_VAE_D8, "block_out_channels": (32, 64, 64, 64)},
    "vae_d4": {**MINI_VAE_D4, "encoder_channels": (32, 64, 64), "decoder_channels": (64, 64, 32)},
}
SHIPPED = {"vae_d8": MINI_VAE_D8, "vae_d4": MINI_VAE_D4}


def _updates(widths: dict, batch: torch.Tensor) -> dict[str, Callable[[], None]]:
    """One closure per stage that makes one training update of that stage's trainable network."""
    torch.manual_seed(0)
    d8 = AutoencoderKL(**widths["vae_d8"])
    d4 = VAED4(**widths["vae_d4"])
    e8 = AutoencoderKL(**widths["vae_d8"]).eval().requires_grad_(False)
    d4_frozen = VAED4(**widths["vae_d4"]).requires_grad_(False)
    e4 = VAED4(**widths["vae_d4"])
    opt_d8 = torch.optim.Adam(d8.parameters(), 1e-4)
    opt_d4 = torch.optim.Adam(d4.decoder.parameters(), 1e-4)
    opt_e4 = torch.optim.Adam(e4.encoder.parameters(), 1e-4)

    def prior_vae():
        posterior = d8.encode(batch).latent_dist
        loss = F.l1_loss(d8.decode(posterior.sample()).sample, batch)
        opt_d8.zero_grad()
        loss.backward()
        opt_d8.step()

    def decoder_transfer():
        with torch.no_grad():
            z = transfer_latents(e8, batch).sample()
        loss = F.mse_loss(d4.decode(z).sample, batch)
        opt_d4.zero_grad()
        loss.backward()
        opt_d4.step()

    def encoder_transfer():
        loss = F.mse_loss(d4_frozen.decode(e4.encode(batch).latent_dist.sample()).sample, batch)
        opt_e4.zero_grad()
        loss.backward()
        opt_e4.step()

    return {"prior (VAE-D8)": prior_vae, "decoder_transfer": decoder_transfer, "encoder_transfer": encoder_transfer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (mini stages run on one core each)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="HR crop side (degrade.hr_size)")
    parser.add_argument("--repeats", type=int, default=5, help="timed updates per stage and variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    variants = {"previous": _updates(PREVIOUS, batch), "shipped": _updates(SHIPPED, batch)}
    seconds: dict[tuple[str, str], list[float]] = {}
    for stage in variants["shipped"]:
        for updates in variants.values():  # one warm-up update each
            updates[stage]()
        for _ in range(args.repeats):
            for name, updates in variants.items():
                start = time.perf_counter()
                updates[stage]()
                seconds.setdefault((stage, name), []).append(time.perf_counter() - start)
    print(f"{args.batch} × {args.size}², {args.threads} thread(s), median of {args.repeats} updates")
    print(f"previous widths: D8 {PREVIOUS['vae_d8']['block_out_channels']}, D4 {PREVIOUS['vae_d4']['encoder_channels']}; "
          f"shipped: D8 {MINI_VAE_D8['block_out_channels']}, D4 {MINI_VAE_D4['encoder_channels']}")
    print("| stage | previous s/update | shipped s/update | previous / shipped |")
    print("|---|---:|---:|---:|")
    for stage in variants["shipped"]:
        before, now = (statistics.median(seconds[(stage, name)]) for name in variants)
        print(f"| {stage} | {before:.3f} | {now:.3f} | {before / now:.2f}× |")


if __name__ == "__main__":
    main()
