"""StableSR stage B (docs/method.md §1.5): train CFW to pull fidelity from the LR image into SD's decoder.

Stage A's diffusion model, sampled with w = 0 on the LR of every training pair, gives a latent z
(SD-scaled, as the UNet produces it). The pairs are StableSR's own (``data: online``, paper mode): a
bounded set drawn once with ``stablesr.degrade``, as ``scripts/generate_vqgan_data.py`` ``main`` generates
them (:func:`cfw_training_pairs`); or the degrade stage's fixed train pairs (``data: fixed``).
Here, per (LR, z, HR) triple:

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
from accelerate import PartialState
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from tvt.atomic import fsync_dir
from tvt.models.cfw import STABLESR_GROWTH_CHANNELS, STABLESR_RRDB_BLOCKS, CFWAutoencoder, CFWModule
from tvt.training.data import (
    PAIRS_FILE,
    OnlineDraws,
    PairDataset,
    degrade_batch,
    online_dataset,
    online_manifest,
)
from tvt.training.engine import Call, TrainConfig, Trainer, files_digest, frozen, mean_psnr
from tvt.training.losses import (
    LDM_ADAM_BETAS,
    PatchDiscriminator,
    adaptive_gan_weight,
    configured_reconstruction_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
)

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


def write_draws(recipes: list[str], path: Path) -> None:
    """Record the recipes of drawn training pairs, one JSON object a line (none drawn: no file).
    :meth:`tvt.training.data.OnlinePairDataset.replay` turns a line back into its pair."""
    if not recipes:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{r}\n" for r in recipes), encoding="utf-8")
    os.replace(tmp, path)


class LatentPairDataset(Dataset):
    """The items (``hr``, ``lr``, ``pair_id``) of ``pairs`` plus ``latent``: stage A's SD-scaled latent for
    that pair, read from ``latents_file`` (see :func:`write_latents`). ``pairs`` is a
    :class:`PairDataset` split or the drawn pairs of :func:`cfw_training_pairs` (anything with ``pair_ids``)."""

    def __init__(self, pairs: Dataset, latents_file: Path):
        self.pairs, self.latents_file = pairs, Path(latents_file)
        if not self.latents_file.is_file():
            raise FileNotFoundError(f"{self.latents_file} not found: generate the stage-A latents "
                                    "(StableSR sampling with w = 0) first")
        with safe_open(self.latents_file, framework="pt") as fh:
            stored = set(fh.keys())
        ids = pairs.pair_ids
        missing = [pair_id for pair_id in ids if pair_id not in stored]
        if missing:
            raise KeyError(f"{self.latents_file} has no latent for {len(missing)} of the {len(ids)} "
                           f"'{getattr(pairs, 'split', 'drawn')}' pairs (e.g. {missing[:3]}); regenerate it for "
                           "these pairs")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        item = self.pairs[index]
        with safe_open(self.latents_file, framework="pt") as fh:  # memory-mapped: reads one tensor
            item["latent"] = fh.get_tensor(item["pair_id"]).float()
        return item


def cfw_training_pairs(cfg: Mapping, pairs_dir: Path, data_dir: Path | None, *,
                       degrade_in_loader: bool = True) -> tuple[Dataset, tuple[Path, ...]]:
    """Stage B's training pairs and the files they are made from (for the digests that key them).

    ``stablesr.cfw.data: online`` (paper mode) draws ``stablesr.cfw.pairs`` pairs once from the data
    stage's training photos with StableSR's own ``stablesr.degrade`` (USM ground truth and undegraded
    draws included), as ``scripts/generate_vqgan_data.py`` ``main`` does (:class:`OnlineDraws`);
    ``fixed`` (the default, mini mode) takes the degrade stage's fixed train split, as stage A does there.
    With ``degrade_in_loader=False`` items carry the uint8 crop and :func:`degrade_batch` degrades them.
    """
    section = cfg["stablesr"]["cfw"]
    if section.get("data", "fixed") != "online":
        return PairDataset(pairs_dir, "train"), (Path(pairs_dir) / PAIRS_FILE,)
    if "degrade" not in cfg["stablesr"]:
        raise ValueError("stablesr.cfw.data: online draws with StableSR's own degradation: add a stablesr.degrade "
                         "section (config/paper.yaml has StableSR's)")
    if "pairs" not in section:
        raise ValueError("stablesr.cfw.data: online needs stablesr.cfw.pairs, the number of pairs to draw "
                         "(StableSR's scripts/generate_vqgan_data.py: 5004)")
    manifest = online_manifest(data_dir, "stablesr.cfw")
    online = online_dataset(cfg, cfg["stablesr"]["degrade"], manifest, degrade_in_loader=degrade_in_loader)
    return OnlineDraws(online, section["pairs"], cfg["seed"]), (Path(pairs_dir) / PAIRS_FILE, manifest)


def upsample_to(lr: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bicubic upsampling of ``lr`` to the size of ``like``, clamped to [-1, 1] (StableSR's LR input)."""
    return F.interpolate(lr, size=like.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


def build_cfw(vae: AutoencoderKL, section: Mapping) -> CFWModule:
    """The CFW for ``vae`` with the section's fusion depth (StableSR's defaults otherwise)."""
    return CFWModule.for_vae(vae, num_rrdb_blocks=section.get("num_rrdb_blocks", STABLESR_RRDB_BLOCKS),
                             growth_channels=section.get("growth_channels", STABLESR_GROWTH_CHANNELS))


def run_stablesr_cfw(cfg: dict, pairs_dir: Path, sd_dir: Path, latents_file: Path, out_dir: Path, ckpt_dir: Path,
                     run, data_dir: Path | None = None) -> dict:
    """Stage B: train the CFW module on (LR, stage-A latent, HR) triples; save it to ``out_dir``.

    ``cfg["stablesr"]["cfw"]`` holds the engine's keys (:class:`TrainConfig`) and ``lr``,
    ``pixel_loss``, ``lpips_weight``, ``lpips_net``, ``disc_start``, ``disc_weight``,
    ``disc_channels``, ``disc_layers``; optionally ``num_rrdb_blocks`` / ``growth_channels`` and
    ``gan_weight`` (``adaptive``, the default, or ``fixed``: module docstring).
    The training pairs are :func:`cfw_training_pairs` (``data``, ``pairs``; ``data_dir`` is the data
    stage's folder, read with ``data: online``); validation uses the degrade stage's fixed val split.
    Returns validation PSNRs of w = 0 (the plain decoder), w = 1 and bicubic upsampling.
    """
    section = cfg["stablesr"]["cfw"]
    pairs_dir, sd_dir, latents_file = Path(pairs_dir), Path(sd_dir), Path(latents_file)
    # the Trainer's device (accelerate's process state): on a GPU the step degrades drawn pairs, not the loader
    pairs, sources = cfw_training_pairs(cfg, pairs_dir, data_dir, degrade_in_loader=PartialState().device.type != "cuda")
    trainer = Trainer(TrainConfig.from_section(section), name="stablesr_cfw", seed=cfg["seed"], ckpt_dir=ckpt_dir,
                      run=run, fingerprint={**section, "inputs": files_digest(*sources, sd_dir / "vae", latents_file)})
    device = trainer.device
    train = LatentPairDataset(pairs, latents_file)
    val = LatentPairDataset(PairDataset(pairs_dir, "val"), latents_file)
    vae = AutoencoderKL.from_pretrained(sd_dir / "vae").to(device).eval().requires_grad_(False)
    cfw = build_cfw(vae, section)
    autoencoder = CFWAutoencoder(vae, cfw)  # holds the same cfw object that is registered below
    discriminator = PatchDiscriminator(base_channels=section["disc_channels"], n_layers=section["disc_layers"])
    models = trainer.register(
        {"cfw": Call(cfw, lambda _cfw, latents, features: autoencoder.decode(latents, features, w=1.0)),
         "disc": discriminator},
        {"cfw": torch.optim.Adam(cfw.parameters(), lr=section["lr"], betas=LDM_ADAM_BETAS),
         "disc": torch.optim.Adam(discriminator.parameters(), lr=section["lr"], betas=LDM_ADAM_BETAS)},
    )
    disc = trainer.unwrap("disc")
    last_layer = trainer.unwrap("cfw").model.last_layer
    reconstruction = configured_reconstruction_loss(section, device)
    scaling = vae.config.scaling_factor
    adaptive_weight = section.get("gan_weight", "adaptive") == "adaptive"

    def step(batch):
        batch = degrade_batch(batch, device)  # drawn pairs degraded on the GPU; other batches as they are
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
def generate_latents(model, vae: AutoencoderKL, datasets: list[Dataset], prompt: torch.Tensor, *, scale: int,
                     num_steps: int, scheduler, seed: int, batch_size: int,
                     device: torch.device) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Stage A's restored latent for every pair of ``datasets``: StableSR sampling (the decoder,
    hence w, plays no part), noise from one CPU generator seeded with ``seed``. Also returns the
    recipes (JSON) of the drawn pairs among them, in order: what :func:`write_draws` records."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from tvt.models.stablesr_sampler import encode_lr_latent, sample_latents

    generator = torch.Generator().manual_seed(seed)
    latents: dict[str, torch.Tensor] = {}
    recipes: list[str] = []
    for dataset in datasets:
        for batch in tqdm(DataLoader(dataset, batch_size=batch_size), desc="stage-A latents", unit="batch"):
            batch = degrade_batch(batch, device)
            z_lr = encode_lr_latent(vae, batch["lr"].to(device), scale)
            z_0 = sample_latents(model, z_lr, prompt, num_steps=num_steps, scheduler=scheduler, generator=generator)
            latents.update(zip(batch["pair_id"], z_0.cpu()))
            recipes += batch.get("recipe", [])
    return latents, recipes


def run_stablesr_stage_b(cfg: dict, pairs_dir: Path, sd_dir: Path, sft_dir: Path, out_dir: Path, ckpt_dir: Path,
                         run, data_dir: Path | None = None) -> dict:
    """StableSR stage B end to end; ``out_dir`` gets the complete restorer (tvt.models.stablesr_restorer).

    1. Stage A's model (``sft_dir``) restores the LR of every training pair (:func:`cfw_training_pairs`:
       with ``data: online``, ``pairs`` pairs drawn from ``data_dir``'s photos with ``stablesr.degrade``)
       and of every val pair with ``cfw.generate_steps`` sampling steps; the latents are cached under
       ``ckpt_dir`` by a digest of everything they depend on, so a rerun (a resumed job, a new
       ``sample`` setting) does not sample again. The drawn pairs' recipes are written beside them
       (``draws-<digest>.jsonl``, one JSON recipe a line) and logged with the run.
    2. :func:`run_stablesr_cfw` trains CFW on them (checkpoints in ``ckpt_dir/train``).
    3. SD's VAE and UNet, the conditioner, CFW and the ``stablesr.sample`` inference settings
       (steps, w, colour fix) are saved together; editing ``sample`` only republishes.
    """
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
    val = PairDataset(pairs_dir, "val")
    scale = val[0]["hr"].shape[-1] // val[0]["lr"].shape[-1]
    train, sources = cfw_training_pairs(cfg, pairs_dir, data_dir, degrade_in_loader=device.type != "cuda")
    drawn = {k: v for k, v in section.items() if k in ("data", "pairs")}
    if section.get("data") == "online":  # what the draws are made of (their sources are in `inputs`)
        drawn.update(degrade=cfg["stablesr"]["degrade"], crops=train.online.modes)

    inputs = files_digest(*sources, sd_dir / "vae", sd_dir / "unet", sd_dir / "scheduler", sft_dir)
    key = params_hash({"inputs": inputs, "steps": section["generate_steps"], "seed": cfg["seed"], **drawn})
    latents_file, draws_file = ckpt_dir / f"latents-{key}.safetensors", ckpt_dir / f"draws-{key}.jsonl"
    with state.main_process_first():  # rank 0 samples, the others read its file
        if not latents_file.is_file():
            latents, recipes = generate_latents(SFTConditionedUNet(unet, conditioner), vae, [train, val],
                                                prompt.to(device), scale=scale, num_steps=section["generate_steps"],
                                                scheduler=scheduler, seed=cfg["seed"],
                                                batch_size=section["batch_size"], device=device)
            write_draws(recipes, draws_file)
            write_latents(latents, latents_file)
    if state.is_main_process:
        for stale in [*ckpt_dir.glob("latents-*.safetensors"), *ckpt_dir.glob("draws-*.jsonl")]:
            if stale not in (latents_file, draws_file):
                stale.unlink()
        if run is not None and draws_file.is_file() and hasattr(run, "log_artifact"):
            run.log_artifact(draws_file, "stablesr_cfw")

    cfw_dir = ckpt_dir / "cfw"
    metrics = run_stablesr_cfw(cfg, pairs_dir, sd_dir, latents_file, cfw_dir, ckpt_dir / "train", run,
                               data_dir=data_dir)
    if state.is_main_process:
        restorer = StableSRRestorer(
            vae.cpu(), unet.cpu(), conditioner.cpu(), CFWModule.from_pretrained(cfw_dir), scheduler=scheduler,
            prompt=NullPrompt(prompt), scale=scale, steps=sample["steps"], w=sample["w"],
            color_fix=sample["color_fix"], seed=cfg["seed"])
        with atomic_dir(out_dir) as tmp:
            restorer.save_pretrained_dir(tmp)
    state.wait_for_everyone()
    return metrics
