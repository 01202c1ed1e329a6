"""Mini mode's stand-in for Stable Diffusion 2.1-base: a tiny SD trained here (paper mode downloads SD).

Mini mode cannot download SD, so this stage trains the same architecture families at toy
size (``MINI_VAE_D8``, ``MINI_UNET``) on the train split's HR crops:

(a) an ``AutoencoderKL`` (8×, 4 latent channels) with L1 + LPIPS + a tiny KL, as LDM;
(b) a ``UNet2DConditionModel`` predicting ε on its latents under SD's own noise schedule
    (scaled-linear betas 0.00085…0.012, 1000 steps), conditioned on a constant null prompt.

The output has the layout of an SD snapshot — ``vae/``, ``unet/``, ``scheduler/`` — plus
``prompt_embeds.safetensors`` (the null prompt, standing in for the text encoder), so every
later stage loads the prior with the same ``from_pretrained`` calls in both modes.

The VAE's ``scaling_factor`` is measured, as SD's 0.18215 was: 1 / std of the training
latents. It is kept at SD's value when within :data:`SCALING_TOLERANCE` of it (then the
one-step formulas see exactly SD's numbers), and set to the measurement otherwise.
"""

from __future__ import annotations

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from tvt.models.restorer import sd_noise_scheduler
from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D8
from tvt.models.sd_weights import PROMPT_EMBEDS
from tvt.training.data import PAIRS_FILE, OnlineCrops, PairDataset, online_dataset, online_manifest, random_crop_flip
from tvt.training.engine import Call, TrainConfig, Trainer, files_digest, forked_rng, mean_psnr
from tvt.training.losses import autoencoder_adam_betas, configured_reconstruction_loss, kl_loss

SD_SCALING_FACTOR = 0.18215
SCALING_TOLERANCE = 0.10  # relative
PROMPT_LENGTH = 77  # CLIP's token sequence length
PREVIEW_TIMESTEP = 500


def null_prompt_embeds(cross_attention_dim: int) -> torch.Tensor:
    """The constant conditioning of the mini prior: zeros shaped like CLIP's (1, 77, dim) output."""
    return torch.zeros(1, PROMPT_LENGTH, cross_attention_dim)


def scaling_factor_for(latent_std: float) -> float:
    """1 / std of the latents, or SD's 0.18215 when that is within :data:`SCALING_TOLERANCE`."""
    measured = 1.0 / latent_std
    return SD_SCALING_FACTOR if abs(measured / SD_SCALING_FACTOR - 1) <= SCALING_TOLERANCE else round(measured, 5)


@torch.no_grad()
def narrow_posterior(vae: AutoencoderKL, logvar: float) -> None:
    """Start the posterior at log-variance ``logvar`` for every input (a narrow posterior).

    Why: with diffusers' default initialisation the posterior's std starts near 1, as wide as the
    latents' spread, so in a run of ~100 updates the decoder (and later the prior's UNet) trains on
    latents that are about half noise (docs/mini-mode.md). The moments are ``quant_conv``'s output
    (mean channels first, log-variance channels last), so zeroing the log-variance rows' weights and
    setting their bias makes the log-variance exactly ``logvar`` at step 0; the KL term and the
    reconstruction still train it from there, so the model stays LDM's KL autoencoder.
    """
    rows = slice(vae.config.latent_channels, None)
    if vae.quant_conv is None:
        raise ValueError("narrow_posterior: this AutoencoderKL has no quant_conv (use_quant_conv=False)")
    vae.quant_conv.weight[rows] = 0.0
    vae.quant_conv.bias[rows] = logvar


def _reconstruct(vae: AutoencoderKL, images: torch.Tensor):
    posterior = vae.encode(images).latent_dist
    return vae.decode(posterior.sample()).sample, posterior


@torch.no_grad()
def latent_std(vae: AutoencoderKL, dataset: Dataset, *, batch_size: int, device: torch.device) -> float:
    """Std of posterior samples over a dataset (the latents the UNet is trained on, unscaled)."""
    total, total_sq, count = 0.0, 0.0, 0
    with forked_rng(device):
        torch.manual_seed(0)
        for batch in DataLoader(dataset, batch_size=batch_size):
            z = vae.encode(batch["hr"].to(device)).latent_dist.sample().double()
            total, total_sq, count = total + z.sum().item(), total_sq + z.pow(2).sum().item(), count + z.numel()
    mean = total / count
    return (total_sq / count - mean**2) ** 0.5


@torch.no_grad()
def denoising_loss(unet: UNet2DConditionModel, vae: AutoencoderKL, dataset: Dataset, prompt: torch.Tensor, *,
                   batch_size: int, device: torch.device) -> float:
    """ε-MSE over a dataset with fixed noise and timesteps spread over [0, 1000): a comparable number."""
    scheduler = sd_noise_scheduler()
    generator = torch.Generator().manual_seed(0)
    losses = []
    for batch in DataLoader(dataset, batch_size=batch_size):
        latents = vae.encode(batch["hr"].to(device)).latent_dist.mode() * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps.to(device), encoder_hidden_states=prompt.expand(len(latents), -1, -1)).sample
        losses.append(F.mse_loss(pred.float(), noise, reduction="none").flatten(1).mean(1).cpu())
    return float(torch.cat(losses).mean())


def _preview(dataset: Dataset, device: torch.device) -> torch.Tensor:
    return torch.stack([dataset[i]["hr"] for i in range(min(2, len(dataset)))]).to(device)


def train_vae(section: dict, seed: int, train: Dataset, val: Dataset, ckpt_dir: Path, run, inputs: str):
    """Train the mini VAE-D8 from ``section["vae"]``; return it (eval mode), its trainer and its val PSNR.

    Public so that ``bench/bench_mini_vae.py`` compares recipes with exactly the stage's training.
    """
    vae_cfg = section["vae"]
    trainer = Trainer(TrainConfig.from_section(vae_cfg, mixed_precision=section["mixed_precision"]),
                      name="prior_vae", seed=seed, ckpt_dir=ckpt_dir, run=run,
                      fingerprint={**vae_cfg, "mixed_precision": section["mixed_precision"], "inputs": inputs})
    vae = AutoencoderKL(**MINI_VAE_D8)
    if vae_cfg.get("posterior_logvar_init") is not None:
        narrow_posterior(vae, vae_cfg["posterior_logvar_init"])
    models = trainer.register(
        {"vae": Call(vae, _reconstruct)},
        {"vae": torch.optim.Adam(vae.parameters(), lr=vae_cfg["lr"], betas=autoencoder_adam_betas(vae_cfg))},
    )
    vae = trainer.unwrap("vae").model
    reconstruction = configured_reconstruction_loss(vae_cfg, trainer.device, pixel="l1")  # LDM's L1

    def step(batch):
        (x,) = random_crop_flip(batch["hr"], size=vae_cfg.get("crop_size"))
        x_hat, posterior = models["vae"](x)
        terms = reconstruction(x_hat, x)
        terms["kl"] = kl_loss(posterior, x)
        loss = terms["rec"] + vae_cfg["kl_weight"] * terms["kl"]
        trainer.optimise("vae", loss)
        return {**terms, "loss": loss}

    preview = _preview(val, trainer.device)
    trainer.fit(train, step, lambda: {"HR": preview, "VAE": vae(preview).sample})
    vae.eval()
    psnr = mean_psnr(lambda b: vae(b["hr"]).sample, val, batch_size=trainer.config.batch_size,
                     device=trainer.device)
    return vae, trainer, psnr


def _train_unet(section: dict, seed: int, vae: AutoencoderKL, train: Dataset, val: Dataset, ckpt_dir: Path, run,
                inputs: str):
    unet_cfg = section["unet"]
    trainer = Trainer(TrainConfig.from_section(unet_cfg, mixed_precision=section["mixed_precision"]),
                      name="prior_unet", seed=seed, ckpt_dir=ckpt_dir, run=run,
                      fingerprint={**unet_cfg, "mixed_precision": section["mixed_precision"], "inputs": inputs})
    device = trainer.device
    unet = UNet2DConditionModel(**MINI_UNET)
    models = trainer.register(
        {"unet": unet},
        {"unet": torch.optim.AdamW(unet.parameters(), lr=unet_cfg["lr"], weight_decay=unet_cfg["weight_decay"])},
    )
    unet = trainer.unwrap("unet")
    scheduler = sd_noise_scheduler()
    prompt = null_prompt_embeds(unet.config.cross_attention_dim).to(device)
    scale = vae.config.scaling_factor

    def step(batch):
        (x,) = random_crop_flip(batch["hr"], size=unet_cfg.get("crop_size"))
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample() * scale
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
        pred = models["unet"](scheduler.add_noise(latents, noise, timesteps), timesteps,
                              encoder_hidden_states=prompt.expand(len(latents), -1, -1)).sample
        loss = F.mse_loss(pred.float(), noise.float())
        trainer.optimise("unet", loss)
        return {"loss": loss}

    preview = _preview(val, device)
    alpha_bar = scheduler.alphas_cumprod[PREVIEW_TIMESTEP].item()

    def samples():
        """Noise the preview's latents to t, denoise in one step: x̂0 = (z_t − √(1−ᾱ)·ε̂) / √ᾱ."""
        latents = vae.encode(preview).latent_dist.mode() * scale
        t = torch.full((len(latents),), PREVIEW_TIMESTEP, device=device)
        noisy = scheduler.add_noise(latents, torch.randn_like(latents), t)
        eps = unet(noisy, t, encoder_hidden_states=prompt.expand(len(latents), -1, -1)).sample
        x0 = (noisy - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
        return {f"noisy (t={PREVIEW_TIMESTEP})": vae.decode(noisy / scale).sample,
                "one-step x̂0": vae.decode(x0 / scale).sample, "HR": preview}

    trainer.fit(train, step, samples)
    unet.eval()
    val_loss = denoising_loss(unet, vae, val, prompt, batch_size=trainer.config.batch_size, device=device)
    return unet, trainer, scheduler, prompt, val_loss


def run_prior(cfg: dict, pairs_dir: Path, out_dir: Path, ckpt_dir: Path, run, data_dir: Path | None = None) -> dict:
    """Train the mini prior (VAE, then UNet on its latents); save it in SD-snapshot layout.

    ``prior.vae.data: online`` trains the VAE on a fresh crop of the data stage's training images
    (``data_dir``) per draw instead of the degrade stage's fixed crops: on 10 photos and 5 pages the
    fixed 30 crops are what the mini VAE-D8 plateaus on (docs/mini-mode.md). The UNet and the
    scaling factor keep the fixed crops."""
    if cfg["mode"] != "mini":
        raise ValueError("the 'prior' stage trains mini mode's tiny SD; paper mode uses the downloaded "
                         "SD 2.1-base snapshot instead")
    section = cfg["prior"]
    pairs_dir, ckpt_dir = Path(pairs_dir), Path(ckpt_dir)
    train = PairDataset(pairs_dir, "train", with_lr=False)
    val = PairDataset(pairs_dir, "val", with_lr=False)
    data_digest = files_digest(pairs_dir / PAIRS_FILE)

    vae_train, vae_inputs = train, data_digest
    if section["vae"].get("data", "fixed") == "online":
        manifest = online_manifest(data_dir, "prior.vae")
        vae_train = OnlineCrops(online_dataset(cfg, cfg["degrade"], manifest, degrade_in_loader=False))
        vae_inputs = files_digest(manifest)
    vae, vae_trainer, vae_psnr = train_vae(section, cfg["seed"], vae_train, val, ckpt_dir / "vae", run, vae_inputs)
    device = vae_trainer.device
    vae.requires_grad_(False)
    std = latent_std(vae, train, batch_size=vae_trainer.config.batch_size, device=device)
    vae.register_to_config(scaling_factor=scaling_factor_for(std))

    # the UNet's inputs: the data and the finished VAE (its fingerprint and its scaling factor)
    unet_inputs = f"{data_digest}/{vae_trainer.fingerprint}/{vae.config.scaling_factor}"
    unet, unet_trainer, scheduler, prompt, val_loss = _train_unet(section, cfg["seed"], vae, train, val,
                                                                  ckpt_dir / "unet", run, unet_inputs)
    metrics = {"vae_val_psnr": vae_psnr, "latent_std": std, "scaling_factor": vae.config.scaling_factor,
               "unet_val_loss": val_loss}
    losses = [m["loss"] for _, m in unet_trainer.history]
    if losses:  # absent when the run resumed from a finished checkpoint
        metrics.update(unet_train_loss_first=losses[0], unet_train_loss_last=losses[-1])
    if run is not None and unet_trainer.is_main_process:
        run.log_metrics({f"prior/{k}": v for k, v in metrics.items()})

    def write(folder: Path) -> None:
        vae.save_pretrained(folder / "vae")
        unet.save_pretrained(folder / "unet")
        scheduler.save_pretrained(folder / "scheduler")
        save_file({"prompt_embeds": prompt.cpu().contiguous()}, str(folder / PROMPT_EMBEDS))

    unet_trainer.publish(out_dir, write)
    return metrics
