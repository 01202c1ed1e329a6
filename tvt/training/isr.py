"""Stage 3: one-step real-world ISR with VSD — TVT, the OSEDiff baseline and the UNet ablations (docs/method.md §1.3–1.5).

One stage, one code path; a variant is a config section ``isr.<variant>``:

=============  =======  ======  ==========  =========================================
variant        method   unet    vae_encoder what trains
=============  =======  ======  ==========  =========================================
TVT            tvt      ce      frozen      LoRA + CE-UNet's 2x ends, conv_in, conv_out
S4 (ablation)  tvt      full    frozen      UNet LoRA + conv_in, the UNet at 2x latents
OSEDiff (=S1)  osediff  full    lora        UNet LoRA + conv_in, VAE-D8 encoder LoRA
S5 (ablation)  tvt      pruned  frozen      LoRA + conv_in of SD's UNet, 25 % pruned
S2 (ablation)  osediff  full    lora        OSEDiff's + the VAE-D8 skips (``vae_skips``)
S3 (ablation)  osediff  full    lora        OSEDiff's + conv_out, on an 8-channel VAE-D8 (``vae``)
=============  =======  ======  ==========  =========================================

``vae: <name>`` (method tvt) reads the VAE-D4 of a ``vae_variants`` entry (V1, V2, T1, T2)
instead of the main one; the stage registry (:func:`tvt.stages.isr_vae_stage`) says which.
S5's UNet is :class:`~tvt.models.pruned_unet.PrunedUNet` (how it prunes: its docstring).
``vae_skips: true`` (S2) gives SD's VAE-D8 zero-initialised encoder-to-decoder skips
(:class:`~tvt.models.skip_vae.SkipAutoencoderKL`), trained with the restorer. ``vae: <name>`` with
method osediff (S3) reads that variant's 8-channel VAE-D8 (architecture ``d8_c8``); the UNet's
``conv_in``/``conv_out`` are widened to match (:mod:`tvt.models.wide_latent`) and both train, and the
4-channel VSD teacher and fake score see the 4-channel latent that ẑ_H is aligned with.

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

Prompts (``prompt``; docs/training-recipe.md "Prompts"): ``null`` (default) conditions generator,
teacher and fake score on the SD snapshot's fixed embedding, with its stored negative for VSD's
CFG. A tagger name (``ram`` as the official scripts, or the weight-free ``colour``) tags every
training HR once (:func:`training_tags`, cached in the checkpoint folder; with ``data: online``
every draw is a new crop, so each batch is tagged at its step, as the official loops do), and each
step encodes the batch's prompts (:func:`tvt.models.prompts.training_prompt`) and the negative prompt
(``negative_prompt``, default the official one of ``method``) with the snapshot's CLIP text
encoder, as the official training loops do (Joyies/TVT ``train.py``, cswry/OSEDiff
``train_osediff.py``).

Output: the trained restorer, LoRA merged (``OneStepRestorer.save_pretrained_dir``),
which evaluation and ``tvt sr`` load with ``from_pretrained_dir``; it stores the null prompt and,
trained on tags, its :class:`~tvt.models.prompts.PromptRecipe` (``restorer.json`` ``prompt``: the
tagger and the code base's test-time positive prompt), which ``tvt sr`` follows by default; the
evaluation prompts as ``evaluate.tagger`` says.
"""

from __future__ import annotations

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import functools
import json
import os
from collections.abc import Callable, Mapping
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
from tvt.models.prompts import (
    OFFICIAL_NEGATIVE_PROMPTS,
    NullPrompt,
    PromptRecipe,
    default_positive_prompt,
    load_text_encoder,
    make_tagger,
    training_prompt,
)
from tvt.models.pruned_unet import PRUNED_UNET_TRAINABLE, PrunedUNet
from tvt.models.restorer import OneStepRestorer
from tvt.models.sd_weights import PROMPT_EMBEDS
from tvt.models.skip_vae import SkipAutoencoderKL
from tvt.models.vae_d4 import VAED4
from tvt.models.wide_latent import narrow_latent, widen_unet
from tvt.training.data import (
    PAIRS_FILE,
    PairDataset,
    degrade_batch,
    online_dataset,
    online_manifest,
    random_crop_flip,
)
from tvt.training.engine import Call, TrainConfig, Trainer, files_digest, forked_rng, psnr
from tvt.training.losses import ReconstructionLoss
from tvt.training.vsd import VSDLoss, fake_score_unet, unet_sharing_weights
from tvt.weights import METRIC_LPIPS_NET

PREVIEW_IMAGES = 2
#: section keys that only change the saved restorer, not training: editing them republishes
#: from the finished checkpoint instead of retraining
OUTPUT_ONLY_KEYS = frozenset({"color_fix"})
TAGS_FILE = "tags.json"  # in the checkpoint folder: the training HRs' tags, computed once


def load_prompts(sd_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, negative prompt) embeddings (1, 77, D) stored with the prior.

    Mini mode stores only the null prompt, which then serves as both (VSD's CFG is the identity).
    """
    embeds = load_file(Path(sd_dir) / PROMPT_EMBEDS)
    prompt = embeds["prompt_embeds"]
    return prompt, embeds.get("negative_prompt_embeds", prompt)


def check_section(variant: str, section: Mapping, vae_d4_dir: Path | None) -> None:
    """Refuse combinations that the schema cannot express, naming the key to change."""
    if section["method"] == "tvt" and vae_d4_dir is None:
        raise ValueError(f"isr.{variant}: method 'tvt' needs the VAE-D4 of the 'encoder_transfer' stage "
                         "(vae_d4_dir is None)")
    if "vae" in section and vae_d4_dir is None:
        raise ValueError(f"isr.{variant}.vae: needs the output of the VAE variant's stage (vae_d4_dir is None)")
    if section.get("vae_skips") and section["method"] != "osediff":
        raise ValueError(f"isr.{variant}.vae_skips: the skips are S2's, on SD's VAE-D8 (method 'osediff')")
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
    if isinstance(vae, SkipAutoencoderKL):  # S2: the skips train with the restorer
        vae.skips.requires_grad_(True)
    if section["unet"] == "ce":
        unet = CEUNet.from_unet(teacher)
        trainable = TVT_UNET_TRAINABLE
    elif section["unet"] == "pruned":  # S5: a pruned copy, initialised from the kept prior weights
        unet = PrunedUNet.from_unet(teacher)
        trainable = PRUNED_UNET_TRAINABLE
    else:
        unet = unet_sharing_weights(teacher, own=("conv_in.",))
        trainable = OSEDIFF_UNET_TRAINABLE
        latent = vae.config.latent_channels
        if latent != teacher.config.in_channels:  # S3: the UNet's ends widened to the VAE's latent, both trained
            widen_unet(unet, latent)
            trainable = (*trainable, r"^conv_out\.")
    # all three adapters active (TVT train.py / OSEDiff osediff.py OSEDiff_test.load_ckpt: set_adapter)
    add_official_unet_lora(unet, rank=rank, codebase=section["method"])
    set_trainable(unet, trainable)
    # trained on tags: the saved restorer says so, and `tvt sr` prompts it with tags of the same tagger and its
    # code base's official test-time positive prompt by default (tvt.models.prompts.PromptRecipe)
    recipe = None
    if section.get("prompt"):
        recipe = PromptRecipe(section["prompt"], default_positive_prompt(section["method"]))
    return OneStepRestorer(vae, unet, method=variant, timestep=section["timestep"], scale=scale,
                           color_fix=section["color_fix"], prompt=NullPrompt(prompt), prompt_recipe=recipe,
                           scheduler=scheduler).train()


def generate(restorer: OneStepRestorer, lr: torch.Tensor, lr_up: torch.Tensor | None = None,
             prompt_embeds: torch.Tensor | None = None, *,
             sample_posterior: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The training forward: LR in [-1, 1] → (SR clamped to [-1, 1], no colour fix; ẑ_H).

    ``lr_up`` (online data): the LR already brought back to the HR size by the dataset's
    randomly chosen interpolation (Real-ESRGAN's ``resize_bak``), which the official code feeds
    the encoder in place of the bicubic upsampling inference uses.
    ``prompt_embeds`` (B, 77, D): the batch's tagged prompts; None: the restorer's own (null) prompt.

    As the official training forwards (TVT ``TVTModel.py`` ``TVT.forward``, OSEDiff
    ``osediff.py`` ``OSEDiff_gen.forward``): the UNet sees a *sample* of the encoder's posterior
    (``sample_posterior``; the restorer's inference uses its mean) and the losses see the decoded
    image clamped to [-1, 1], so pixels already beyond the range get no gradient.
    """
    lr = (lr + 1) / 2
    lr_up = restorer.upsample_lr(lr) if lr_up is None else (lr_up + 1) / 2
    z_l, skips = restorer.encode_lr_with_skips(lr_up, sample=sample_posterior)
    z_h = restorer.denoise(z_l, restorer.prompt(lr) if prompt_embeds is None else prompt_embeds)
    return (restorer.decode(z_h, skips) * 2 - 1).clamp(-1, 1), z_h


def training_tags(dataset: PairDataset, make: Callable[[], Callable], cache: Path, identity: Mapping, *,
                  batch_size: int, device: torch.device) -> dict[str, str]:
    """Tags of every training HR by ``pair_id``, computed once per image and kept in ``cache``.

    The official loops tag each HR crop again at every step (Joyies/TVT ``train.py``, cswry/OSEDiff
    ``train_osediff.py``); the tags of a frozen tagger do not change, so a resumed or repeated run
    reads them back when ``cache`` was written for the same ``identity`` (tagger, weights, data) and
    covers every pair. The tagger (``make()``) is built only when something is missing.
    """
    ids = [row["pair_id"] for row in dataset.rows]
    if cache.is_file():
        stored = json.loads(cache.read_text(encoding="utf-8"))
        if stored.get("identity") == dict(identity) and set(ids) <= stored["tags"].keys():
            return {i: stored["tags"][i] for i in ids}
    tagger, tags = make(), {}
    with forked_rng(device), torch.no_grad():  # tagging must not shift the training random stream
        for batch in DataLoader(dataset, batch_size=batch_size):
            tags.update(zip(batch["pair_id"], tagger((batch["hr"].to(device) + 1) / 2), strict=True))
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f".{cache.name}.partial")
    partial.write_text(json.dumps({"identity": dict(identity), "tags": tags}, indent=1, ensure_ascii=False) + "\n",
                       encoding="utf-8")
    os.replace(partial, cache)
    return tags


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
            ckpt_dir: Path, run, data_dir: Path | None = None) -> dict:
    """Train variant ``cfg["isr"][variant]``; save the restorer to ``out_dir``; return val metrics.

    ``vae_d4_dir``: the output of the VAE stage the variant reads (:func:`tvt.stages.isr_vae_stage`: a
    VAE-D4, or S3's 8-channel VAE-D8); None for the prior's VAE-D8.

    ``data: online`` trains on :class:`~tvt.training.data.OnlinePairDataset` over ``data_dir``'s
    manifest (the data stage) with the ``degrade`` section; validation uses the fixed pairs either way.
    """
    section = cfg["isr"][variant]
    pairs_dir, sd_dir = Path(pairs_dir), Path(sd_dir)
    vae_d4_dir = None if vae_d4_dir is None else Path(vae_d4_dir)
    check_section(variant, section, vae_d4_dir)
    vae_source = vae_d4_dir if section["method"] == "tvt" or "vae" in section else sd_dir / "vae"
    tagger_name = section.get("prompt")
    text_inputs = (sd_dir / "tokenizer", sd_dir / "text_encoder") if tagger_name else ()
    online = section.get("data", "fixed") == "online"
    data_inputs = (online_manifest(data_dir, f"isr.{variant}"),) if online else ()
    inputs = files_digest(pairs_dir / PAIRS_FILE, *data_inputs, sd_dir / "unet", sd_dir / "scheduler",
                          sd_dir / PROMPT_EMBEDS, vae_source, *text_inputs)
    name = f"isr_{variant}"
    trajectory = {k: v for k, v in section.items() if k not in OUTPUT_ONLY_KEYS}
    trainer = Trainer(TrainConfig.from_section(section), name=name, seed=cfg["seed"], ckpt_dir=ckpt_dir, run=run,
                      fingerprint={**trajectory, "inputs": inputs})
    device = trainer.device
    val = PairDataset(pairs_dir, "val")
    if online:  # a fresh crop, flip and degradation per draw, as the official datasets
        train = online_dataset(cfg, cfg["degrade"], data_inputs[0], degrade_in_loader=device.type != "cuda")
        scale, hr_side = train.scale, (train.size, train.size)
    else:
        train = PairDataset(pairs_dir, "train")
        first = train[0]
        scale, hr_side = first["hr"].shape[-1] // first["lr"].shape[-1], tuple(first["hr"].shape[-2:])

    teacher = UNet2DConditionModel.from_pretrained(sd_dir / "unet").to(device).eval().requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(sd_dir / "scheduler")
    prompt, negative = load_prompts(sd_dir)
    sd_vae_factor = 2 ** (len(AutoencoderKL.load_config(sd_dir / "vae")["block_out_channels"]) - 1)
    vae = VAED4.from_pretrained(vae_source) if section["method"] == "tvt" else AutoencoderKL.from_pretrained(vae_source)
    if section.get("vae_skips"):
        vae = SkipAutoencoderKL.from_vae(vae)
    restorer = build_generator(variant, section, vae.to(device), teacher, scheduler, prompt, scale)
    crop = (section["crop_size"],) * 2 if section.get("crop_size") and not online else hr_side
    if crop[0] % restorer.pixel_multiple or crop[1] % restorer.pixel_multiple:
        raise ValueError(f"isr.{variant}: training crops of {crop} are not multiples of "
                         f"{restorer.pixel_multiple}, the side this restorer takes without padding")
    fake = fake_score_unet(teacher, rank=section["fake_lora_rank"], scope=section.get("fake_lora_scope", "official"),
                           codebase=section["method"]).train()

    posterior = section.get("encoder_posterior", "sample")
    encode_text = tags = tag_batch = None
    if tagger_name:
        encode_text = load_text_encoder(sd_dir, device)
        negative = encode_text([section.get("negative_prompt", OFFICIAL_NEGATIVE_PROMPTS[section["method"]])])
        weights = {"ram_weights": section["ram_weights"]} if "ram_weights" in section else {}
        if online:  # every draw is a new crop: tag it at each step, as the official loops do
            tag_batch = make_tagger(tagger_name, **weights, device=device)
        else:  # fixed crops: tag each training HR once, cached beside the checkpoints
            identity = {"tagger": tagger_name, **weights, "pairs": files_digest(pairs_dir / PAIRS_FILE)}
            cache = Path(ckpt_dir) / TAGS_FILE
            if trainer.is_main_process:
                training_tags(PairDataset(pairs_dir, "train", with_lr=False),
                              lambda: make_tagger(tagger_name, **weights, device=device), cache, identity,
                              batch_size=trainer.config.batch_size, device=device)
            trainer.accelerator.wait_for_everyone()
            tags = json.loads(cache.read_text(encoding="utf-8"))["tags"]

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
    sd_channels = teacher.config.in_channels  # S3: the scores see the 4-channel latent ẑ_H is aligned with

    def step(batch):
        if online:
            batch = degrade_batch(batch, device)
            hr, lr, lr_up = batch["hr"], batch["lr"], batch["lr_up"]
        else:
            (hr, lr), lr_up = random_crop_flip(batch["hr"], batch["lr"], size=section.get("crop_size")), None
        tagged, batch_tags = None, None
        if tag_batch is not None:
            with forked_rng(device), torch.no_grad():  # a frozen tagger must not shift the random stream
                batch_tags = list(tag_batch((hr + 1) / 2))
        elif tags is not None:
            batch_tags = [tags[i] for i in batch["pair_id"]]
        if batch_tags is not None:  # this batch's prompts through the frozen text encoder, as the official loops
            tagged = encode_text([training_prompt(t, section["method"]) for t in batch_tags])
        sr, z_h = models["generator"](lr, lr_up, tagged)
        lr = (lr + 1) / 2  # the generator's prompt, for the scores too
        prompt_embeds = restorer.prompt(lr) if tagged is None else tagged
        negative_embeds = negative_prompt(lr)
        with trainer.accelerator.autocast():
            terms = reconstruction(sr, hr)
            del terms["rec"]  # the stage weighs l2 and lpips itself
            loss = section["lambda_l2"] * terms["l2"] + lpips_weight * terms.get("lpips", 0.0)
            if lambda_vsd > 0:
                terms["vsd"] = vsd(narrow_latent(z_h, sd_channels), prompt_embeds, negative_embeds)
                loss = loss + lambda_vsd * terms["vsd"]
        trainer.optimise("generator", loss)
        if lambda_vsd > 0:  # the fake score follows the generator's new output distribution
            with trainer.accelerator.autocast():
                terms["fake_score"] = vsd.fake_score_loss(narrow_latent(z_h, sd_channels), prompt_embeds)
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
