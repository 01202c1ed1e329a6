"""Transfer VAE Training (docs/method.md §1.2): give a compact 4× VAE (VAE-D4) SD's latent space.

* **Stage 1 — decoder transfer.** x → bicubic ×2 → *frozen* SD encoder E8 → latent at H/4
  → trainable D4 decoder → x̂ (H×W). E8 on a 2× image yields SD latents at twice the spatial
  density; D4 learns to decode them back at the original size. Loss: L2 (or L1) + LPIPS +
  λ·GAN against a PatchGAN, λ adaptive (LDM), switched on after ``disc_start`` updates.
* **Stage 2 — encoder transfer.** D4 frozen; a fresh encoder E4 learns x → latent at H/4
  that D4 decodes (L2 + LPIPS, no GAN: it destabilises). E4 thereby lands in the space D4
  learnt from E8(up2(x)): SD's latent space, so SD's UNet keeps working on it.
* **Ablation T1** (``transfer: false``): VAE-D4 trained from scratch end to end (KL + the
  same reconstruction and GAN terms), with no link to SD's latent space.
* **Ablation S3's VAE** (``architecture: d8_c8, transfer: false``): not a VAE-D4 but SD's VAE-D8
  widened to 8 latent channels aligned with its 4 (:func:`tvt.models.wide_latent.widen_vae`),
  fine-tuned end to end with T1's loss so that the new channels learn to carry detail.
* **Ablation T2** (``transfer: false, latent_l2: w``): T1's end-to-end training plus
  w·MSE(μ_E4(x), μ_E8(up2(x))), an L2 that pulls VAE-D4's latent (posterior mean) onto the
  frozen VAE-D8's latent of the ×2 image — the same target the two-stage transfer decodes, here
  imposed on the encoder instead of learnt through a frozen decoder (docs/ablations.md).
"""

from __future__ import annotations

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from tvt.config import WIDE_D8
from tvt.models.sd_configs import (
    MINI_VAE_D4,
    MINI_VAE_D4_V1,
    MINI_VAE_D4_V2,
    VAE_D4_PAPER,
    VAE_D4_V1,
    VAE_D4_V2,
)
from tvt.models.vae_d4 import VAED4
from tvt.models.wide_latent import widen_vae
from tvt.training.data import PAIRS_FILE, PairDataset, random_crop_flip
from tvt.training.engine import Call, TrainConfig, Trainer, files_digest, frozen, mean_psnr
from tvt.training.losses import (
    LDM_ADAM_BETAS,
    PatchDiscriminator,
    adaptive_gan_weight,
    autoencoder_adam_betas,
    configured_reconstruction_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    kl_loss,
)

#: VAE-D4 variants by config name (paper's model, its V1/V2 ablations, mini mode's toy size)
ARCHITECTURES = {"paper": VAE_D4_PAPER, "v1": VAE_D4_V1, "v2": VAE_D4_V2, "mini": MINI_VAE_D4,
                 "mini_v1": MINI_VAE_D4_V1, "mini_v2": MINI_VAE_D4_V2}

PREVIEW_IMAGES = 2


def upsample2(images: torch.Tensor) -> torch.Tensor:
    """Bicubic ×2, clamped to the image range [-1, 1]."""
    return F.interpolate(images, scale_factor=2, mode="bicubic", align_corners=False).clamp(-1, 1)


def transfer_latents(e8: AutoencoderKL, images: torch.Tensor):
    """E8's posterior over the ×2 image: SD latents at H/4 × W/4, what D4 learns to decode."""
    return e8.encode(upsample2(images)).latent_dist


def _decode(vae: VAED4, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents).sample


def _encode_decode(vae: VAED4, images: torch.Tensor):
    posterior = vae.encode(images).latent_dist
    return vae.decode(posterior.sample()).sample, posterior


def check_factors(e8: AutoencoderKL, vae: VAED4) -> None:
    """E8 on a 2× image must give latents of D4's size: E8 must downsample exactly twice as much."""
    e8_factor = 2 ** (len(e8.config.block_out_channels) - 1)
    if e8_factor != 2 * vae.downsample_factor:
        raise ValueError(
            f"decoder transfer needs an SD VAE that downsamples 2x more than VAE-D4 "
            f"({2 * vae.downsample_factor}x); the one given downsamples {e8_factor}x"
        )


def _preview_batch(dataset: PairDataset, device: torch.device) -> torch.Tensor:
    return torch.stack([dataset[i]["hr"] for i in range(min(PREVIEW_IMAGES, len(dataset)))]).to(device)


def run_decoder_transfer(cfg: dict, pairs_dir: Path, sd_dir: Path, out_dir: Path, ckpt_dir: Path, run) -> dict:
    """Stage 1 (or ablation T1, T2, S3's VAE): train VAE-D4's decoder; save the whole VAE to ``out_dir``."""
    section = cfg["decoder_transfer"]
    pairs_dir, sd_dir = Path(pairs_dir), Path(sd_dir)
    transfer = section["transfer"]
    latent_l2 = section.get("latent_l2", 0.0)  # ablation T2 (end to end only; the config checks it)
    trainer = Trainer(TrainConfig.from_section(section), name="decoder_transfer", seed=cfg["seed"],
                      ckpt_dir=ckpt_dir, run=run,
                      fingerprint={**section, "inputs": files_digest(pairs_dir / PAIRS_FILE, sd_dir / "vae")})
    device = trainer.device
    e8 = AutoencoderKL.from_pretrained(sd_dir / "vae").to(device).eval().requires_grad_(False)
    if section["architecture"] == WIDE_D8:
        vae = widen_vae(e8).train().requires_grad_(True)
    else:
        vae = VAED4(**{**ARCHITECTURES[section["architecture"]], "scaling_factor": e8.config.scaling_factor})
    if transfer or latent_l2:
        check_factors(e8, vae)
    if transfer:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    discriminator = PatchDiscriminator(base_channels=section["disc_channels"], n_layers=section["disc_layers"])
    models = trainer.register(
        {"vae": Call(vae, _decode if transfer else _encode_decode), "disc": discriminator},
        {"vae": torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=section["lr"],
                                 betas=autoencoder_adam_betas(section)),
         "disc": torch.optim.Adam(discriminator.parameters(), lr=section["lr"], betas=LDM_ADAM_BETAS)},
    )
    vae, disc = trainer.unwrap("vae").model, trainer.unwrap("disc")
    last_layer = vae.decoder.conv_out.weight
    reconstruction = configured_reconstruction_loss(section, device)

    def step(batch):
        (x,) = random_crop_flip(batch["hr"], size=section.get("crop_size"))
        if transfer:
            with torch.no_grad():
                latents = transfer_latents(e8, x).sample()
            x_hat = models["vae"](latents)
        else:
            x_hat, posterior = models["vae"](x)
        terms = reconstruction(x_hat, x)
        loss = terms["rec"]
        if not transfer:
            terms["kl"] = kl_loss(posterior, x)
            loss = loss + section["kl_weight"] * terms["kl"]
        if latent_l2:
            with torch.no_grad():
                target = transfer_latents(e8, x).mean
            terms["latent_l2"] = F.mse_loss(posterior.mean, target)
            loss = loss + latent_l2 * terms["latent_l2"]
        adversarial = trainer.step > section["disc_start"]
        if adversarial:
            with frozen(disc):
                terms["gan"] = generator_adversarial_loss(disc(x_hat))
            terms["gan_weight"] = adaptive_gan_weight(terms["rec"], terms["gan"], last_layer,
                                                      section["disc_weight"])
            loss = loss + terms["gan_weight"] * terms["gan"]
        trainer.optimise("vae", loss)
        if adversarial:  # one forward for real and fake: DDP allows one per backward
            logits_real, logits_fake = models["disc"](torch.cat([x, x_hat.detach()])).chunk(2)
            terms["disc"] = hinge_discriminator_loss(logits_real, logits_fake)
            trainer.optimise("disc", terms["disc"])
        return {**terms, "loss": loss}

    val = PairDataset(pairs_dir, "val", with_lr=False)
    preview = _preview_batch(val, device)

    def d4_reconstruction(x: torch.Tensor) -> torch.Tensor:
        if transfer:
            return vae.decode(transfer_latents(e8, x).mode()).sample
        return vae(x).sample

    def samples():
        return {"HR": preview, "VAE-D8 (SD)": e8(preview).sample, "VAE-D4": d4_reconstruction(preview)}

    trainer.fit(PairDataset(pairs_dir, "train", with_lr=False), step, samples)
    vae.eval()
    metrics = {
        "val_psnr_vae_d4": mean_psnr(lambda b: d4_reconstruction(b["hr"]), val,
                                     batch_size=trainer.config.batch_size, device=device),
        "val_psnr_vae_d8": mean_psnr(lambda b: e8(b["hr"]).sample, val,
                                     batch_size=trainer.config.batch_size, device=device),
    }
    if run is not None and trainer.is_main_process:
        run.log_metrics({f"decoder_transfer/{k}": v for k, v in metrics.items()})
    trainer.publish(out_dir, vae.save_pretrained)
    return metrics


def run_encoder_transfer(cfg: dict, pairs_dir: Path, decoder_dir: Path, out_dir: Path, ckpt_dir: Path,
                         run) -> dict:
    """Stage 2: train VAE-D4's encoder against the frozen transferred decoder; save the full VAED4."""
    section = cfg["encoder_transfer"]
    pairs_dir, decoder_dir = Path(pairs_dir), Path(decoder_dir)
    trainer = Trainer(TrainConfig.from_section(section), name="encoder_transfer", seed=cfg["seed"],
                      ckpt_dir=ckpt_dir, run=run,
                      fingerprint={**section, "inputs": files_digest(pairs_dir / PAIRS_FILE, decoder_dir)})
    device = trainer.device
    vae = VAED4.from_pretrained(decoder_dir)
    vae.decoder.requires_grad_(False)
    vae.post_quant_conv.requires_grad_(False)
    models = trainer.register(
        {"vae": vae},
        {"vae": torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=section["lr"],
                                 betas=autoencoder_adam_betas(section))},
    )
    vae = trainer.unwrap("vae")
    reconstruction = configured_reconstruction_loss(section, device)

    def step(batch):
        (x,) = random_crop_flip(batch["hr"], size=section.get("crop_size"))
        terms = reconstruction(models["vae"](x, sample_posterior=True).sample, x)
        trainer.optimise("vae", terms["rec"])
        return {**terms, "loss": terms["rec"]}

    val = PairDataset(pairs_dir, "val", with_lr=False)
    preview = _preview_batch(val, device)
    trainer.fit(PairDataset(pairs_dir, "train", with_lr=False), step,
                lambda: {"HR": preview, "VAE-D4 (E4 → D4)": vae(preview).sample})
    vae.eval()
    metrics = {"val_psnr_vae_d4": mean_psnr(lambda b: vae(b["hr"]).sample, val,
                                            batch_size=trainer.config.batch_size, device=device)}
    if run is not None and trainer.is_main_process:
        run.log_metrics({f"encoder_transfer/{k}": v for k, v in metrics.items()})
    trainer.publish(out_dir, vae.save_pretrained)
    return metrics
