"""StableSR stage A: train the time-aware encoder and the SFT layers against SD's frozen UNet (docs/method.md §1.5).

Per batch (images in [-1, 1], the frozen SD VAE E8 and UNet from ``sd_dir``)::

    z_lr = E8(bicubic ×scale(LR)).mode() · s         the condition
    z_0  = E8(HR).mode() · s                          the target
    t ~ U[0, 1000), ε ~ N(0, I), z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε
    loss = ‖ε_θ(z_t, t, c_null; z_lr) − ε‖²           ε_θ: SD's UNet steered by the conditioner

Only the conditioner (:class:`~tvt.models.stablesr.StableSRConditioner`) trains; its SFT heads
start as the identity, so step 0 is the prior itself. ``c_null`` is the null prompt saved with
the prior (StableSR trains with empty captions, too).

Config section ``cfg["stablesr"]["sft"]``: the engine's keys (:class:`TrainConfig`: ``steps``,
``batch_size``, ``grad_accum``, ``mixed_precision``, ``checkpoint_every``, ``keep_checkpoints``,
``log_every``, ``sample_every``, optionally ``grad_clip``, ``gradient_checkpointing``) and

* ``lr`` — AdamW learning rate (StableSR: 5e-5), ``weight_decay`` optional (AdamW's 1e-2, as LDM);
* ``encoder`` — ``"paper"`` or ``"mini"`` (:data:`CONDITIONERS`);
* ``sample_steps`` — respaced DDPM steps of the preview grids and the final val PSNR.

Output: the conditioner (``save_pretrained``); load the whole model with
``SFTConditionedUNet.from_pretrained(sd_dir / "unet", out_dir)``.
"""

from __future__ import annotations

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch.utils.data import DataLoader, Dataset

from tvt.models.sd_configs import STABLESR_CONDITIONER_MINI, STABLESR_CONDITIONER_PAPER
from tvt.models.sd_weights import PROMPT_EMBEDS
from tvt.models.stablesr import SFTConditionedUNet, StableSRConditioner
from tvt.models.stablesr_sampler import encode_lr_latent, sample_latents
from tvt.models.tiling import vae_downsample_factor
from tvt.training.data import PAIRS_FILE, PairDataset, degrade_batch, online_dataset, online_manifest
from tvt.training.engine import Call, TrainConfig, Trainer, files_digest, mean_psnr
from tvt.training.isr import load_prompts

NAME = "stablesr_sft"
#: conditioner architectures by the section's ``encoder`` value
CONDITIONERS = {"paper": STABLESR_CONDITIONER_PAPER, "mini": STABLESR_CONDITIONER_MINI}
ADAMW_WEIGHT_DECAY = 1e-2  # torch's AdamW default, which LDM/StableSR train with
#: section keys that only change previews and the final metrics: editing them re-evaluates
#: from the finished checkpoint instead of retraining
EVALUATION_ONLY_KEYS = frozenset({"sample_steps"})
PREVIEW_IMAGES = 2
SAMPLING_SEED = 0
#: ε → a function of (z_t, t, z_lr), so the prior alone and the conditioned UNet are scored alike
EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def bicubic(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic ×scale of images in [-1, 1], clamped (bicubic overshoots at edges)."""
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def denoising_mse(predict_eps: EpsFn, vae: AutoencoderKL, dataset: Dataset, scheduler: DDPMScheduler, *,
                  scale: int, batch_size: int, device: torch.device) -> float:
    """Mean ε-MSE over a dataset with noise and timesteps drawn from a fixed seed: comparable between models."""
    generator = torch.Generator().manual_seed(SAMPLING_SEED)
    sf = vae.config.scaling_factor
    losses = []
    for batch in DataLoader(dataset, batch_size=batch_size):
        z_lr = encode_lr_latent(vae, batch["lr"].to(device), scale)
        z_0 = vae.encode(batch["hr"].to(device)).latent_dist.mode() * sf
        noise = torch.randn(z_0.shape, generator=generator).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z_0),), generator=generator).to(device)
        eps = predict_eps(scheduler.add_noise(z_0, noise, t), t, z_lr)
        losses.append(F.mse_loss(eps.float(), noise, reduction="none").flatten(1).mean(1).cpu())
    return float(torch.cat(losses).mean())


@torch.no_grad()
def restore(model: SFTConditionedUNet, vae: AutoencoderKL, lr: torch.Tensor, prompt: torch.Tensor, *, scale: int,
            num_steps: int, scheduler: DDPMScheduler) -> torch.Tensor:
    """SR in [-1, 1] from LR in [-1, 1]: StableSR's sampling from a fixed seed, decoded by the plain SD decoder."""
    z_0 = sample_latents(model, encode_lr_latent(vae, lr, scale), prompt, num_steps=num_steps, scheduler=scheduler,
                         generator=torch.Generator().manual_seed(SAMPLING_SEED))
    return vae.decode(z_0 / vae.config.scaling_factor).sample.clamp(-1, 1)


def run_stablesr_sft(cfg: dict, pairs_dir: Path, sd_dir: Path, out_dir: Path, ckpt_dir: Path, run,
                     data_dir: Path | None = None) -> dict:
    """Train ``cfg["stablesr"]["sft"]``'s conditioner on the frozen prior; save it to ``out_dir``; return val metrics.

    ``data: online`` degrades the data stage's training photos afresh per draw with StableSR's own
    ``stablesr.degrade`` block (:class:`~tvt.training.data.OnlinePairDataset`), as its
    ``RealESRGANDataset`` + ``LatentDiffusionSRTextWT.get_input`` do; validation uses the fixed pairs.
    """
    section = cfg["stablesr"]["sft"]
    if section["encoder"] not in CONDITIONERS:
        raise ValueError(f"stablesr.sft.encoder must be one of {sorted(CONDITIONERS)}, got {section['encoder']!r}")
    pairs_dir, sd_dir = Path(pairs_dir), Path(sd_dir)
    online = section.get("data", "fixed") == "online"
    data_inputs = (online_manifest(data_dir, "stablesr.sft"),) if online else ()
    inputs = files_digest(pairs_dir / PAIRS_FILE, *data_inputs, sd_dir / "unet", sd_dir / "vae", sd_dir / "scheduler",
                          sd_dir / PROMPT_EMBEDS)
    trajectory = {k: v for k, v in section.items() if k not in EVALUATION_ONLY_KEYS}
    trainer = Trainer(TrainConfig.from_section(section), name=NAME, seed=cfg["seed"], ckpt_dir=ckpt_dir, run=run,
                      fingerprint={**trajectory, "inputs": inputs})
    device = trainer.device
    val = PairDataset(pairs_dir, "val")
    if online:
        train = online_dataset(cfg, cfg["stablesr"]["degrade"], data_inputs[0], degrade_in_loader=device.type != "cuda")
        scale, hr_side = train.scale, (train.size, train.size)
    else:
        train = PairDataset(pairs_dir, "train")
        first = train[0]
        scale, hr_side = first["hr"].shape[-1] // first["lr"].shape[-1], tuple(first["hr"].shape[-2:])

    vae = AutoencoderKL.from_pretrained(sd_dir / "vae").to(device).eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet").to(device).eval().requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(sd_dir / "scheduler")
    prompt = load_prompts(sd_dir)[0].to(device)
    factor = vae_downsample_factor(vae)
    if hr_side[0] % factor or hr_side[1] % factor:
        raise ValueError(f"stablesr.sft: training crops of {hr_side} are not multiples of "
                         f"the VAE's factor {factor}")
    conditioner = StableSRConditioner.for_unet(unet, **CONDITIONERS[section["encoder"]])
    model = SFTConditionedUNet(unet, conditioner)
    models = trainer.register(
        {"conditioner": Call(conditioner, lambda _conditioner, *args: model(*args))},
        {"conditioner": torch.optim.AdamW(conditioner.parameters(), lr=section["lr"],
                                          weight_decay=section.get("weight_decay", ADAMW_WEIGHT_DECAY))},
    )
    sf = vae.config.scaling_factor
    num_timesteps = scheduler.config.num_train_timesteps

    def step(batch):
        if online:
            batch = degrade_batch(batch, device)
        with torch.no_grad():
            z_lr = encode_lr_latent(vae, batch["lr"], scale)
            z_0 = vae.encode(batch["hr"]).latent_dist.mode() * sf
        noise = torch.randn_like(z_0)
        t = torch.randint(0, num_timesteps, (len(z_0),), device=device)
        eps = models["conditioner"](scheduler.add_noise(z_0, noise, t), t, prompt.expand(len(z_0), -1, -1), z_lr)
        loss = F.mse_loss(eps.float(), noise)
        trainer.optimise("conditioner", loss)
        return {"loss": loss}

    preview = next(iter(DataLoader(val, batch_size=PREVIEW_IMAGES)))
    preview_lr, preview_hr = preview["lr"].to(device), preview["hr"].to(device)
    sample_steps = section["sample_steps"]

    def sr(lr: torch.Tensor) -> torch.Tensor:
        return restore(model, vae, lr, prompt, scale=scale, num_steps=sample_steps, scheduler=scheduler)

    def samples():
        return {"LR": preview_lr, "bicubic": bicubic(preview_lr, scale),
                f"StableSR ({sample_steps} steps)": sr(preview_lr), "HR": preview_hr}

    trainer.fit(train, step, samples)
    conditioner.eval()
    scoring = {"scheduler": scheduler, "scale": scale, "batch_size": trainer.config.batch_size, "device": device}
    metrics = {
        "val_eps_mse": denoising_mse(lambda z_t, t, z_lr: model(z_t, t, prompt.expand(len(z_t), -1, -1), z_lr),
                                     vae, val, **scoring),
        "val_eps_mse_prior": denoising_mse(
            lambda z_t, t, z_lr: unet(z_t, t, prompt.expand(len(z_t), -1, -1)).sample, vae, val, **scoring),
    }
    for name, restored in (("sr", lambda b: sr(b["lr"])), ("bicubic", lambda b: bicubic(b["lr"], scale))):
        metrics[f"val_psnr_{name}"] = mean_psnr(restored, val, batch_size=trainer.config.batch_size, device=device)
    losses = [m["loss"] for _, m in trainer.history]
    if losses:  # absent when the run resumed from a finished checkpoint
        metrics.update(train_loss_first=losses[0], train_loss_last=losses[-1])
    if run is not None and trainer.is_main_process:
        run.log_metrics({f"{NAME}/{k}": v for k, v in metrics.items()})
    trainer.publish(out_dir, conditioner.save_pretrained)
    return metrics
