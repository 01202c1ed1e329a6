"""Stage 3: one-step real-world ISR with VSD — TVT, the OSEDiff baseline and the UNet ablations (docs/method.md §1.3–1.5).

One stage, one code path; a variant is a config section ``isr.<variant>``:

=============  =======  ======  ==========  =========================================
variant        method   unet    vae_encoder what trains
=============  =======  ======  ==========  =========================================
TVT            tvt      ce      frozen      LoRA + CE-UNet's 2x ends, conv_in, conv_out
S4 (ablation)  tvt      full    frozen      UNet LoRA + conv_in, the UNet at 2x latents
OSEDiff (=S1)  osediff  full    lora        UNet LoRA + conv_in, VAE-D8 encoder LoRA
S5 (ablation)  tvt      pruned  frozen      LoRA + conv_in of SD's UNet, 25 % pruned
=============  =======  ======  ==========  =========================================

``vae: <name>`` (method tvt) reads the VAE-D4 of a ``vae_variants`` entry (V1, V2, T1, T2)
instead of the main one; the stage registry (:func:`tvt.stages.isr_vae_stage`) says which.
S5's UNet is :class:`~tvt.models.pruned_unet.PrunedUNet` (how it prunes: its docstring).

LoRA is the official three adapters (encoder / decoder / others) on every targeted layer,
replicas included, all active (:func:`tvt.models.lora.add_official_unet_lora`); TVT keeps
``conv_norm_out`` frozen. docs/training-recipe.md gives the official reference of each choice.

``method`` picks the VAE: ``tvt`` the transferred VAE-D4 (encoder-transfer output), frozen as
in the official TVT code, which trains no VAE weight (``vae_encoder: lora`` would add an
encoder adapter); ``osediff`` SD's own VAE-D8, whose encoder OSEDiff fine-tunes with LoRA
while the decoder stays frozen.

Generator: LR → bicubic ×scale → E → z_L → one UNet step at ``timestep`` → ẑ_H → D → SR
(:class:`~tvt.models.restorer.OneStepRestorer`'s pieces; as in the official code: no colour fix
while training, a posterior *sample* of E, SR clamped to [-1, 1]: :func:`generate`). Its loss is
λ_l2·MSE + λ_lpips·LPIPS on SR vs HR (images in [-1, 1]) +
λ_vsd·VSD on ẑ_H (:mod:`tvt.training.vsd`). In the same step the VSD fake score takes one
update of its own optimiser on the detached ẑ_H; which of its adapters learn is
``fake_lora_scope`` (:func:`tvt.training.vsd.fake_score_unet`).

All SD-sized UNets here share one set of frozen weights: the teacher, the fake score's base
and the generator's (CE-UNet's inner UNet; OSEDiff's UNet apart from its trainable conv_in).

Output: the trained restorer, LoRA merged (``OneStepRestorer.save_pretrained_dir``),
which evaluation and ``tvt sr`` load with ``from_pretrained_dir``.
"""

from __future__ import annotations

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import functools
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tvt.metrics import perceptual
from tvt.models.ce_unet import CEUNet
from tvt.models.lora import (
    LORA_PATTERN,
    OSEDIFF_UNET_TRAINABLE,
    TVT_UNET_TRAINABLE,
    add_official_unet_lora,
    add_vae_encoder_lora,
    set_trainable,
)
from tvt.models.prompts import NullPrompt
from tvt.models.pruned_unet import PRUNED_UNET_TRAINABLE, PrunedUNet
from tvt.models.restorer import OneStepRestorer
from tvt.models.vae_d4 import VAED4
from tvt.training.data import PAIRS_FILE, PairDataset, random_crop_flip
from tvt.training.engine import Call, TrainConfig, Trainer, files_digest, forked_rng, psnr
from tvt.training.losses import ReconstructionLoss
from tvt.training.prior import PROMPT_EMBEDS_FILE
from tvt.training.vsd import VSDLoss, fake_score_unet, unet_sharing_weights

PREVIEW_IMAGES = 2
#: section keys that only change the saved restorer, not training: editing them republishes
#: from the finished checkpoint instead of retraining
OUTPUT_ONLY_KEYS = frozenset({"color_fix"})
METRIC_LPIPS_NET = "alex"  # the LPIPS that SR papers report (the training loss may use VGG)


def load_prompts(sd_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, negative prompt) embeddings (1, 77, D) stored with the prior.

    Mini mode stores only the null prompt, which then serves as both (VSD's CFG is the identity).
    """
    embeds = load_file(Path(sd_dir) / PROMPT_EMBEDS_FILE)
    prompt = embeds["prompt_embeds"]
    return prompt, embeds.get("negative_prompt_embeds", prompt)


def check_section(variant: str, section: Mapping, vae_d4_dir: Path | None) -> None:
    """Refuse combinations that the schema cannot express, naming the key to change."""
    if section["method"] == "tvt" and vae_d4_dir is None:
        raise ValueError(f"isr.{variant}: method 'tvt' needs the VAE-D4 of the 'encoder_transfer' stage "
                         "(vae_d4_dir is None)")
    if section["unet"] == "ce" and section["method"] != "tvt":
        raise ValueError(f"isr.{variant}: unet 'ce' runs SD's UNet at half the latent resolution, which only "
                         "VAE-D4 latents (method 'tvt') have; use unet 'full' with method 'osediff'")


def build_generator(variant: str, section: Mapping, vae: nn.Module, teacher: UNet2DConditionModel,
                    scheduler: DDPMScheduler, prompt: torch.Tensor, scale: int) -> OneStepRestorer:
    """The restorer to train, with exactly its variant's parameters trainable (module docstring's table).

    ``teacher`` is the frozen SD UNet; the generator's UNet shares its frozen weights.
    """
    rank = section["lora_rank"]
    vae.requires_grad_(False)
    if section["vae_encoder"] == "lora":
        # OSEDiff's name for its VAE adapter (osediff.py initialize_vae), so its state maps 1:1
        set_trainable(add_vae_encoder_lora(vae, rank=rank, adapter_name="default_encoder"), [LORA_PATTERN])
    if section["unet"] == "ce":
        unet = CEUNet.from_unet(teacher)
        trainable = TVT_UNET_TRAINABLE
    elif section["unet"] == "pruned":  # S5: a pruned copy, initialised from the kept prior weights
        unet = PrunedUNet.from_unet(teacher)
        trainable = PRUNED_UNET_TRAINABLE
    else:
        unet = unet_sharing_weights(teacher, own=("conv_in.",))
        trainable = OSEDIFF_UNET_TRAINABLE
    # all three adapters active (TVT train.py / OSEDiff osediff.py OSEDiff_test.load_ckpt: set_adapter)
    add_official_unet_lora(unet, rank=rank, codebase=section["method"])
    set_trainable(unet, trainable)
    return OneStepRestorer(vae, unet, method=variant, timestep=section["timestep"], scale=scale,
                           color_fix=section["color_fix"], prompt=NullPrompt(prompt), scheduler=scheduler).train()


def generate(restorer: OneStepRestorer, lr: torch.Tensor, *, sample_posterior: bool = True,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training forward: LR in [-1, 1] → (SR clamped to [-1, 1], no colour fix; ẑ_H).

    As the official training forwards (TVT ``TVTModel.py`` ``TVT.forward``, OSEDiff
    ``osediff.py`` ``OSEDiff_gen.forward``): the UNet sees a *sample* of the encoder's posterior
    (``sample_posterior``; the restorer's inference uses its mean) and the losses see the decoded
    image clamped to [-1, 1], so pixels already beyond the range get no gradient.
    """
    lr = (lr + 1) / 2
    z_l = restorer.encode_lr(restorer.upsample_lr(lr), sample=sample_posterior)
    z_h = restorer.denoise(z_l, restorer.prompt(lr))
    return (restorer.decode(z_h) * 2 - 1).clamp(-1, 1), z_h


@torch.no_grad()
def sr_metrics(restorer: OneStepRestorer, dataset: Dataset, lpips: nn.Module, *, batch_size: int,
               device: torch.device) -> dict[str, float]:
    """Mean RGB PSNR and LPIPS against HR of the restorer (as saved: colour fix, clamped) and of bicubic."""
    totals: dict[str, float] = {}
    with forked_rng(device):
        for batch in DataLoader(dataset, batch_size=batch_size):
            lr, hr = (batch["lr"].to(device) + 1) / 2, batch["hr"].to(device)
            for name, image in (("sr", restorer(lr)), ("bicubic", restorer.upsample_lr(lr))):
                image = image * 2 - 1
                for metric, values in (("psnr", psnr(image, hr)), ("lpips", lpips(image, hr).flatten())):
                    key = f"val_{metric}_{name}"
                    totals[key] = totals.get(key, 0.0) + float(values.sum())
    return {key: total / len(dataset) for key, total in totals.items()}


def run_isr(cfg: dict, variant: str, pairs_dir: Path, sd_dir: Path, vae_d4_dir: Path | None, out_dir: Path,
            ckpt_dir: Path, run) -> dict:
    """Train variant ``cfg["isr"][variant]``; save the restorer to ``out_dir``; return val metrics."""
    section = cfg["isr"][variant]
    pairs_dir, sd_dir = Path(pairs_dir), Path(sd_dir)
    vae_d4_dir = None if vae_d4_dir is None else Path(vae_d4_dir)
    check_section(variant, section, vae_d4_dir)
    vae_source = vae_d4_dir if section["method"] == "tvt" else sd_dir / "vae"
    inputs = files_digest(pairs_dir / PAIRS_FILE, sd_dir / "unet", sd_dir / "scheduler",
                          sd_dir / PROMPT_EMBEDS_FILE, vae_source)
    name = f"isr_{variant}"
    trajectory = {k: v for k, v in section.items() if k not in OUTPUT_ONLY_KEYS}
    trainer = Trainer(TrainConfig.from_section(section), name=name, seed=cfg["seed"], ckpt_dir=ckpt_dir, run=run,
                      fingerprint={**trajectory, "inputs": inputs})
    device = trainer.device
    train, val = PairDataset(pairs_dir, "train"), PairDataset(pairs_dir, "val")
    first = train[0]
    scale = first["hr"].shape[-1] // first["lr"].shape[-1]

    teacher = UNet2DConditionModel.from_pretrained(sd_dir / "unet").to(device).eval().requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(sd_dir / "scheduler")
    prompt, negative = load_prompts(sd_dir)
    sd_vae_factor = 2 ** (len(AutoencoderKL.load_config(sd_dir / "vae")["block_out_channels"]) - 1)
    vae = VAED4.from_pretrained(vae_source) if section["method"] == "tvt" else AutoencoderKL.from_pretrained(vae_source)
    restorer = build_generator(variant, section, vae.to(device), teacher, scheduler, prompt, scale)
    crop = (section["crop_size"],) * 2 if section.get("crop_size") else tuple(first["hr"].shape[-2:])
    if crop[0] % restorer.pixel_multiple or crop[1] % restorer.pixel_multiple:
        raise ValueError(f"isr.{variant}: training crops of {crop} are not multiples of "
                         f"{restorer.pixel_multiple}, the side this restorer takes without padding")
    fake = fake_score_unet(teacher, rank=section["fake_lora_rank"], scope=section.get("fake_lora_scope", "official"),
                           codebase=section["method"]).train()

    posterior = section.get("encoder_posterior", "sample")

    def trainable(module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]

    models = trainer.register(
        {"generator": Call(restorer, functools.partial(generate, sample_posterior=posterior == "sample")),
         "fake_score": fake},
        {"generator": torch.optim.AdamW(trainable(restorer), lr=section["lr"], weight_decay=section["weight_decay"]),
         "fake_score": torch.optim.AdamW(trainable(fake), lr=section["fake_lr"],
                                         weight_decay=section["weight_decay"])},
    )
    restorer = trainer.unwrap("generator").model
    vsd = VSDLoss(teacher, models["fake_score"], scheduler, cfg_scale=section["cfg_scale"],
                  timestep_range=tuple(section["t_vsd"]),
                  latent_scale=sd_vae_factor // restorer.vae_factor)
    lpips_weight = section["lambda_lpips"]
    lpips = perceptual.load_lpips(net=section["lpips_net"], device=device) if lpips_weight > 0 else None
    reconstruction = ReconstructionLoss(lpips, pixel="l2", lpips_weight=lpips_weight).to(device)
    negative_prompt = NullPrompt(negative).to(device)
    lambda_vsd = section["lambda_vsd"]

    def step(batch):
        hr, lr = random_crop_flip(batch["hr"], batch["lr"], size=section.get("crop_size"))
        sr, z_h = models["generator"](lr)
        lr = (lr + 1) / 2  # the generator's prompt, for the scores too
        prompt_embeds, negative_embeds = restorer.prompt(lr), negative_prompt(lr)
        with trainer.accelerator.autocast():
            terms = reconstruction(sr, hr)
            del terms["rec"]  # the stage weighs l2 and lpips itself
            loss = section["lambda_l2"] * terms["l2"] + lpips_weight * terms.get("lpips", 0.0)
            if lambda_vsd > 0:
                terms["vsd"] = vsd(z_h, prompt_embeds, negative_embeds)
                loss = loss + lambda_vsd * terms["vsd"]
        trainer.optimise("generator", loss)
        if lambda_vsd > 0:  # the fake score follows the generator's new output distribution
            with trainer.accelerator.autocast():
                terms["fake_score"] = vsd.fake_score_loss(z_h, prompt_embeds)
            trainer.optimise("fake_score", terms["fake_score"])
        return {**terms, "loss": loss}

    preview = next(iter(DataLoader(val, batch_size=PREVIEW_IMAGES)))
    preview_lr, preview_hr = preview["lr"].to(device), preview["hr"].to(device)

    def samples():
        lr = (preview_lr + 1) / 2
        return {"LR": preview_lr, "bicubic": restorer.upsample_lr(lr) * 2 - 1, "SR": restorer(lr) * 2 - 1,
                "HR": preview_hr}

    trainer.fit(train, step, samples)
    restorer.eval()
    metric_lpips = lpips if lpips is not None and section["lpips_net"] == METRIC_LPIPS_NET else \
        perceptual.load_lpips(net=METRIC_LPIPS_NET, device=device)
    metrics = sr_metrics(restorer, val, metric_lpips, batch_size=trainer.config.batch_size, device=device)
    losses = [m["loss"] for _, m in trainer.history]
    if losses:  # absent when the run resumed from a finished checkpoint
        metrics.update(train_loss_first=losses[0], train_loss_last=losses[-1])
    if run is not None and trainer.is_main_process:
        run.log_metrics({f"{name}/{k}": v for k, v in metrics.items()})
    trainer.publish(out_dir, restorer.save_pretrained_dir)
    return metrics
