"""StableSR stage B (docs/method.md §1.5): train CFW to pull fidelity from the LR image into SD's decoder.

Stage A's diffusion model, sampled with w = 0 on every training LR image, gives a latent z
(SD-scaled, as the UNet produces it). Here, per (LR, z, HR) triple:

    LR → bicubic to the HR size → frozen E8 → F_e;   z / scaling_factor → frozen D8 with CFW at w = 1 → x̂,

and x̂ is trained towards HR with L1 + LPIPS + λ·hinge-GAN against a PatchGAN, switched on
after ``disc_start`` updates (the decoder-transfer losses of :mod:`tvt.training.losses`), both
networks with Adam (0.5, 0.9) as LDM's autoencoder (``ldm/models/autoencoder.py``
``configure_optimizers``).

**What trains: the CFW module only** — StableSR's released configuration
(``AutoencoderKLResi(freeze_dec=True)``: only ``fusion_layer*`` and the discriminator get
gradients). It is also what makes w a dial: with SD's decoder untouched, w = 0 *is* the
generative decoder the diffusion prior was trained with, and only the fused residual moves
the output towards the LR image.

**The GAN weight λ** (``gan_weight``). LDM computes λ = ‖∇L_rec‖ / ‖∇L_GAN‖ at the decoder's
``conv_out`` (``LPIPSWithDiscriminator.calculate_adaptive_weight``). StableSR passes that layer
too, but it is frozen there, so ``torch.autograd.grad`` raises and StableSR's
``except RuntimeError`` branch (``ldm/modules/losses/contperceptual.py``,
``LPIPSWithDiscriminator.forward``) uses ``disc_weight`` itself: λ is the constant 0.025 of
``configs/autoencoder/autoencoder_kl_64x64x4_resi.yaml``. ``gan_weight: fixed`` trains that way (the paper
configuration); ``gan_weight: adaptive`` keeps LDM's rule on a layer that does train — the
final conv of the fusion block at the finest fused resolution (:attr:`CFWModule.last_layer`),
the trainable weight nearest the image — times ``disc_weight``.
"""

from __future__ import annotations

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import save_file

from tvt.atomic import fsync_dir
from tvt.models.cfw import STABLESR_GROWTH_CHANNELS, STABLESR_RRDB_BLOCKS, CFWAutoencoder, CFWModule
from tvt.training.data import PAIRS_FILE, PairDataset
from tvt.training.engine import Call, TrainConfig, Trainer, files_digest, frozen, mean_psnr
from tvt.training.losses import (
    PatchDiscriminator,
    adaptive_gan_weight,
    configured_reconstruction_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
)
from tvt.training.vae_transfer import ADAM_BETAS

PREVIEW_IMAGES = 2
PREVIEW_WEIGHTS = (0.0, 0.5, 1.0)


def write_latents(latents: Mapping[str, torch.Tensor], path: Path) -> None:
    """Save ``pair_id -> latent`` (C, h, w), SD-scaled, as one safetensors file, atomically
    (a temporary sibling renamed into place once flushed)."""
    path = Path(path)
    bad = {key: tuple(value.shape) for key, value in latents.items() if value.dim() != 3}
    if bad:
        raise ValueError(f"latents must be (C, h, w) per pair id; got {dict(list(bad.items())[:3])}")
    if not latents:
        raise ValueError(f"no latents to write to {path}")
    tensors = {key: value.detach().cpu().contiguous() for key, value in latents.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class LatentPairDataset(PairDataset):
    """:class:`PairDataset` items (``hr``, ``lr``, ``pair_id``) plus ``latent``: stage A's
    SD-scaled latent for that pair, read from ``latents_file`` (see :func:`write_latents`)."""

    def __init__(self, pairs_dir: Path, latents_file: Path, split: str, **kwargs):
        super().__init__(pairs_dir, split, with_lr=True, **kwargs)
        self.latents_file = Path(latents_file)
        if not self.latents_file.is_file():
            raise FileNotFoundError(f"{self.latents_file} not found: generate the stage-A latents "
                                    "(StableSR sampling with w = 0) first")
        with safe_open(self.latents_file, framework="pt") as fh:
            stored = set(fh.keys())
        missing = [row["pair_id"] for row in self.rows if row["pair_id"] not in stored]
        if missing:
            raise KeyError(f"{self.latents_file} has no latent for {len(missing)} of the {len(self.rows)} "
                           f"'{split}' pairs (e.g. {missing[:3]}); regenerate it for this pairs folder")

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        with safe_open(self.latents_file, framework="pt") as fh:  # memory-mapped: reads one tensor
            item["latent"] = fh.get_tensor(item["pair_id"]).float()
        return item


def upsample_to(lr: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bicubic upsampling of ``lr`` to the size of ``like``, clamped to [-1, 1] (StableSR's LR input)."""
    return F.interpolate(lr, size=like.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


def build_cfw(vae: AutoencoderKL, section: Mapping) -> CFWModule:
    """The CFW for ``vae`` with the section's fusion depth (StableSR's defaults otherwise)."""
    return CFWModule.for_vae(vae, num_rrdb_blocks=section.get("num_rrdb_blocks", STABLESR_RRDB_BLOCKS),
                             growth_channels=section.get("growth_channels", STABLESR_GROWTH_CHANNELS))


def run_stablesr_cfw(cfg: dict, pairs_dir: Path, sd_dir: Path, latents_file: Path, out_dir: Path, ckpt_dir: Path,
                     run) -> dict:
    """Stage B: train the CFW module on (LR, stage-A latent, HR) triples; save it to ``out_dir``.

    ``cfg["stablesr"]["cfw"]`` holds the engine's keys (:class:`TrainConfig`) and ``lr``,
    ``pixel_loss``, ``lpips_weight``, ``lpips_net``, ``disc_start``, ``disc_weight``,
    ``disc_channels``, ``disc_layers``; optionally ``num_rrdb_blocks`` / ``growth_channels`` and
    ``gan_weight`` (``adaptive``, the default, or ``fixed``: module docstring).
    Returns validation PSNRs of w = 0 (the plain decoder), w = 1 and bicubic upsampling.
    """
    section = cfg["stablesr"]["cfw"]
    pairs_dir, sd_dir, latents_file = Path(pairs_dir), Path(sd_dir), Path(latents_file)
    trainer = Trainer(TrainConfig.from_section(section), name="stablesr_cfw", seed=cfg["seed"], ckpt_dir=ckpt_dir,
                      run=run, fingerprint={**section, "inputs": files_digest(pairs_dir / PAIRS_FILE, sd_dir / "vae",
                                                                               latents_file)})
    device = trainer.device
    train = LatentPairDataset(pairs_dir, latents_file, "train")
    val = LatentPairDataset(pairs_dir, latents_file, "val")
    vae = AutoencoderKL.from_pretrained(sd_dir / "vae").to(device).eval().requires_grad_(False)
    cfw = build_cfw(vae, section)
    autoencoder = CFWAutoencoder(vae, cfw)  # holds the same cfw object that is registered below
    discriminator = PatchDiscriminator(base_channels=section["disc_channels"], n_layers=section["disc_layers"])
    models = trainer.register(
        {"cfw": Call(cfw, lambda _cfw, latents, features: autoencoder.decode(latents, features, w=1.0)),
         "disc": discriminator},
        {"cfw": torch.optim.Adam(cfw.parameters(), lr=section["lr"], betas=ADAM_BETAS),
         "disc": torch.optim.Adam(discriminator.parameters(), lr=section["lr"], betas=ADAM_BETAS)},
    )
    disc = trainer.unwrap("disc")
    last_layer = trainer.unwrap("cfw").model.last_layer
    reconstruction = configured_reconstruction_loss(section, device)
    scaling = vae.config.scaling_factor
    adaptive_weight = section.get("gan_weight", "adaptive") == "adaptive"

    def step(batch):
        x = batch["hr"]
        with torch.no_grad():  # the encoder is frozen: its features are inputs, not a graph
            features = autoencoder.encoder_features(upsample_to(batch["lr"], x))
        x_hat = models["cfw"](batch["latent"] / scaling, features)
        terms = reconstruction(x_hat, x)
        loss = terms["rec"]
        adversarial = trainer.step > section["disc_start"]
        if adversarial:
            with frozen(disc):
                terms["gan"] = generator_adversarial_loss(disc(x_hat))
            terms["gan_weight"] = (adaptive_gan_weight(terms["rec"], terms["gan"], last_layer, section["disc_weight"])
                                   if adaptive_weight else torch.tensor(float(section["disc_weight"]), device=device))
            loss = loss + terms["gan_weight"] * terms["gan"]
        trainer.optimise("cfw", loss)
        if adversarial:  # one forward for real and fake: DDP allows one per backward
            logits_real, logits_fake = models["disc"](torch.cat([x, x_hat.detach()])).chunk(2)
            terms["disc"] = hinge_discriminator_loss(logits_real, logits_fake)
            trainer.optimise("disc", terms["disc"])
        return {**terms, "loss": loss}

    def restore(batch, w: float) -> torch.Tensor:
        return autoencoder(batch["latent"] / scaling, upsample_to(batch["lr"], batch["hr"]), w)

    preview = {key: torch.stack([val[i][key] for i in range(min(PREVIEW_IMAGES, len(val)))]).to(device)
               for key in ("hr", "lr", "latent")}

    def samples():
        panels = {"LR (bicubic)": upsample_to(preview["lr"], preview["hr"])}
        panels.update({f"CFW w={w:g}": restore(preview, w) for w in PREVIEW_WEIGHTS})
        return {**panels, "HR": preview["hr"]}

    trainer.fit(train, step, samples)
    cfw.eval()
    candidates = {"w0": lambda b: restore(b, 0.0), "w1": lambda b: restore(b, 1.0),
                  "bicubic": lambda b: upsample_to(b["lr"], b["hr"])}
    metrics = {f"val_psnr_{name}": mean_psnr(fn, val, batch_size=trainer.config.batch_size, device=device)
               for name, fn in candidates.items()}
    if run is not None and trainer.is_main_process:
        run.log_metrics({f"stablesr_cfw/{k}": v for k, v in metrics.items()})
    trainer.publish(out_dir, cfw.save_pretrained)
    return metrics


# ---- the whole stage: stage-A latents → CFW training → the StableSR restorer ------------------


@torch.no_grad()
def generate_latents(model, vae: AutoencoderKL, pairs_dir: Path, prompt: torch.Tensor, *, scale: int,
                     num_steps: int, scheduler, seed: int, batch_size: int, device: torch.device,
                     splits: tuple[str, ...] = ("train", "val")) -> dict[str, torch.Tensor]:
    """Stage A's restored latent for every pair of ``splits``: StableSR sampling (the decoder,
    hence w, plays no part), noise from one CPU generator seeded with ``seed``."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from tvt.models.stablesr_sampler import encode_lr_latent, sample_latents

    generator = torch.Generator().manual_seed(seed)
    latents: dict[str, torch.Tensor] = {}
    for split in splits:
        loader = DataLoader(PairDataset(pairs_dir, split), batch_size=batch_size)
        for batch in tqdm(loader, desc=f"stage-A latents ({split})", unit="batch"):
            z_lr = encode_lr_latent(vae, batch["lr"].to(device), scale)
            z_0 = sample_latents(model, z_lr, prompt, num_steps=num_steps, scheduler=scheduler, generator=generator)
            latents.update(zip(batch["pair_id"], z_0.cpu()))
    return latents


def run_stablesr_stage_b(cfg: dict, pairs_dir: Path, sd_dir: Path, sft_dir: Path, out_dir: Path, ckpt_dir: Path,
                         run) -> dict:
    """StableSR stage B end to end; ``out_dir`` gets the complete restorer (tvt.models.stablesr_restorer).

    1. Stage A's model (``sft_dir``) restores every train/val LR with ``cfw.generate_steps``
       sampling steps; the latents are cached under ``ckpt_dir`` by a digest of everything they
       depend on, so a rerun (a resumed job, a new ``sample`` setting) does not sample again.
    2. :func:`run_stablesr_cfw` trains CFW on them (checkpoints in ``ckpt_dir/train``).
    3. SD's VAE and UNet, the conditioner, CFW and the ``stablesr.sample`` inference settings
       (steps, w, colour fix) are saved together; editing ``sample`` only republishes.
    """
    from accelerate import PartialState
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from tvt.atomic import atomic_dir
    from tvt.config import params_hash
    from tvt.models.prompts import NullPrompt
    from tvt.models.stablesr import SFTConditionedUNet, StableSRConditioner
    from tvt.models.stablesr_restorer import StableSRRestorer
    from tvt.training.isr import load_prompts

    section, sample = cfg["stablesr"]["cfw"], cfg["stablesr"]["sample"]
    pairs_dir, sd_dir, sft_dir, ckpt_dir = Path(pairs_dir), Path(sd_dir), Path(sft_dir), Path(ckpt_dir)
    state = PartialState()
    device = state.device
    vae = AutoencoderKL.from_pretrained(sd_dir / "vae").to(device).eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet").to(device).eval().requires_grad_(False)
    conditioner = StableSRConditioner.from_pretrained(sft_dir).to(device).eval()
    scheduler = DDPMScheduler.from_pretrained(sd_dir / "scheduler")
    prompt, _ = load_prompts(sd_dir)
    first = PairDataset(pairs_dir, "train")[0]
    scale = first["hr"].shape[-1] // first["lr"].shape[-1]

    inputs = files_digest(pairs_dir / PAIRS_FILE, sd_dir / "vae", sd_dir / "unet", sd_dir / "scheduler", sft_dir)
    key = params_hash({"inputs": inputs, "steps": section["generate_steps"], "seed": cfg["seed"]})
    latents_file = ckpt_dir / f"latents-{key}.safetensors"
    with state.main_process_first():  # rank 0 samples, the others read its file
        if not latents_file.is_file():
            latents = generate_latents(SFTConditionedUNet(unet, conditioner), vae, pairs_dir, prompt.to(device),
                                       scale=scale, num_steps=section["generate_steps"], scheduler=scheduler,
                                       seed=cfg["seed"], batch_size=section["batch_size"], device=device)
            write_latents(latents, latents_file)
    for stale in ckpt_dir.glob("latents-*.safetensors"):
        if stale != latents_file and state.is_main_process:
            stale.unlink()

    cfw_dir = ckpt_dir / "cfw"
    metrics = run_stablesr_cfw(cfg, pairs_dir, sd_dir, latents_file, cfw_dir, ckpt_dir / "train", run)
    if state.is_main_process:
        restorer = StableSRRestorer(
            vae.cpu(), unet.cpu(), conditioner.cpu(), CFWModule.from_pretrained(cfw_dir), scheduler=scheduler,
            prompt=NullPrompt(prompt), scale=scale, steps=sample["steps"], w=sample["w"],
            color_fix=sample["color_fix"], seed=cfg["seed"])
        with atomic_dir(out_dir) as tmp:
            restorer.save_pretrained_dir(tmp)
    state.wait_for_everyone()
    return metrics
