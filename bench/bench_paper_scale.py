"""Every paper-mode training stage, 2 optimiser steps each, at SD 2.1-base size on CPU.

The mini pipeline proves the code paths on tiny networks; this proves them at the scale a
cluster run meets: SD 2.1-base's VAE and UNet (random weights, built from
``tvt/models/sd_configs.py``), the paper's VAE-D4, CE-UNet, the StableSR conditioner and CFW,
512² crops (128² VAE-D4 latents, cut into four 64² patches for VSD), batch 1, the real stage
functions with ``config/paper.yaml``'s sections. Each stage runs in two subprocesses: the first
trains step 1 and checkpoints it, the second resumes from that checkpoint, trains step 2 and
publishes the stage's output — so shapes, LoRA, VSD patching, lean checkpoints and resumption
are all exercised at full size. Per stage the table gives the seconds of each step (the
engine's own ``samples_per_s`` of that step) and each process's peak RSS.

Each stage reads its upstream stage's output when that has run, else a random paper-size
VAE-D4, so the stages run in any order (most informative first). Before the stages it prints the trainable-parameter counts of the ISR networks next to the
counts the official grouping gives on the same (meta-device) UNet (:func:`lora_counts`).

Overrides of paper.yaml, all for CPU time only (none changes a network or a loss): batch 1,
fp32 (``mixed_precision: "no"``), 2 steps, GANs switched on from step 2 (``disc_start: 1``) so
their memory path is measured, and 2 sampling steps where StableSR samples (stage A's
previews/val, stage B's latent generation) instead of 50/200, and 2 drawn CFW training pairs
instead of 5004. The online trainers draw from two photos (``data/``), one per paper training
dataset, so that both of paper.yaml's crop modes (LSDIR windows, FFHQ resize) run. The ISR
stages tag each draw with the weight-free ``colour`` tagger instead of RAM (its weights are on
the hub, so RAM's own Swin-L forward is not in the figures); the tags still go through a
random SD 2.1-size CLIP text encoder every step, as with RAM.

    PYTHONPATH=. nice -n 10 python bench/bench_paper_scale.py --workdir /tmp/tvt-paper-scale
    PYTHONPATH=. python bench/bench_paper_scale.py --counts-only
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from tvt import compat

compat.apply()

ROOT = Path(__file__).resolve().parents[1]
# Most informative first (VSD at 128² latents, SD-size LoRA); each stage reads a finished
# upstream output when there is one, else the random paper-size VAE-D4 of prepare().
STAGES = ("isr_tvt", "isr_osediff", "stablesr_sft", "stablesr_cfw", "decoder_transfer", "encoder_transfer")
HR = 512  # the paper's crop
SCALE = 4


# ------------------------------------------------------------------------------------------
# Trainable-parameter counts: ours vs the official grouping
# ------------------------------------------------------------------------------------------

# What the official optimisers collect, by substring of the official parameter name:
# TVT train.py `layers_to_opt`, OSEDiff train_osediff.py (LoRA + conv_in), VSD `layers_to_opt_disc`.
OFFICIAL_SELECTIONS = {
    "tvt": ("lora", "down_blocks.0", "up_blocks.3.upsamplers.0", "up_blocks.4", "conv_in", "conv_out"),
    "osediff": ("lora", "conv_in"),
    "fake_score": ("lora",),
}


def lora_counts() -> list[tuple[str, int, int, str]]:
    """(network, ours, official, note) on SD 2.1-base's UNet, built on the meta device."""
    from diffusers import UNet2DConditionModel

    from tvt.models.ce_unet import CEUNet
    from tvt.models.lora import (
        OSEDIFF_UNET_TRAINABLE,
        TVT_UNET_TRAINABLE,
        add_official_unet_lora,
        official_unet_name,
        set_trainable,
    )
    from tvt.models.sd_configs import SD21_BASE_UNET
    from tvt.training.vsd import fake_score_unet

    def official(model, selection, only_adapter=None) -> int:
        total = 0
        for name, parameter in model.named_parameters():
            name = official_unet_name(model, name)
            if any(s in name for s in OFFICIAL_SELECTIONS[selection]) and (
                only_adapter is None or ".lora_" not in name or only_adapter in name
            ):
                total += parameter.numel()
        return total

    def ours(model) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    rows = []
    with torch.device("meta"):
        tvt = CEUNet(unet_config=SD21_BASE_UNET)
        osediff = UNet2DConditionModel(**SD21_BASE_UNET)
        teacher = UNet2DConditionModel(**SD21_BASE_UNET)
    add_official_unet_lora(tvt, codebase="tvt")
    set_trainable(tvt, TVT_UNET_TRAINABLE)
    rows.append(("TVT generator (CE-UNet)", ours(tvt), official(tvt, "tvt"), "TVT train.py layers_to_opt"))
    add_official_unet_lora(osediff, codebase="osediff")
    set_trainable(osediff, OSEDIFF_UNET_TRAINABLE)
    rows.append(
        (
            "OSEDiff generator (UNet)",
            ours(osediff),
            official(osediff, "osediff"),
            "OSEDiff LoRA + conv_in (its VAE-encoder LoRA not counted)",
        )
    )
    for codebase, scope in (("tvt", "official"), ("osediff", "official"), ("tvt", "full")):
        with torch.device("meta"):
            fake = fake_score_unet(teacher, scope=scope, codebase=codebase)
        if scope == "official":  # the official optimiser holds all three adapters; default_others alone acts
            theirs, note = official(fake, "fake_score", only_adapter="default_others"), "only default_others acts"
        else:
            theirs, note = official(fake, "fake_score"), "all three adapters act (no official counterpart)"
        rows.append((f"VSD fake score, {codebase} grouping, {scope}", ours(fake), theirs, note))
    return rows


# ------------------------------------------------------------------------------------------
# Inputs: a random SD 2.1-base snapshot and 512² pairs from scikit-image's photos
# ------------------------------------------------------------------------------------------


# SD 2.1-base's text encoder (OpenCLIP ViT-H/14's text tower, ``text_encoder/config.json`` of
# stabilityai/stable-diffusion-2-1-base): the ISR stages encode each step's tags with it.
SD21_BASE_TEXT_ENCODER = {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096,
                          "num_hidden_layers": 23, "num_attention_heads": 16, "projection_dim": 512,
                          "hidden_act": "gelu", "max_position_embeddings": 77}


def write_text_encoder(sd: Path) -> None:
    """``sd/tokenizer`` + ``sd/text_encoder``: a random SD 2.1-size CLIP text encoder (its real 49 408-row
    embedding) behind a character-level tokenizer (CLIP's BPE vocabulary is on the hub)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from tvt.models.prompts import save_character_tokenizer

    save_character_tokenizer(sd / "tokenizer")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(**SD21_BASE_TEXT_ENCODER, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(sd / "text_encoder")


def prepare(workdir: Path) -> None:
    """Write sd/ (random SD 2.1-base VAE, UNet and text encoder, SD's schedule, prompt embeddings) and pairs/."""
    import numpy as np
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from PIL import Image
    from safetensors.torch import save_file
    from skimage import data as photos

    from tvt.models.restorer import sd_noise_scheduler
    from tvt.models.sd_configs import SD21_BASE_UNET, SD21_BASE_VAE, VAE_D4_PAPER
    from tvt.models.sd_weights import PROMPT_EMBEDS
    from tvt.models.vae_d4 import VAED4

    if not (workdir / "d4").is_dir():
        torch.manual_seed(0)
        VAED4(**VAE_D4_PAPER).save_pretrained(workdir / "d4")
    sd = workdir / "sd"
    if not (sd / "unet").is_dir():
        torch.manual_seed(0)
        AutoencoderKL(**SD21_BASE_VAE).save_pretrained(sd / "vae")
        UNet2DConditionModel(**SD21_BASE_UNET).save_pretrained(sd / "unet")
        sd_noise_scheduler().save_pretrained(sd / "scheduler")
        dim = SD21_BASE_UNET["cross_attention_dim"]
        # prompt != negative prompt: the teacher runs its two-pass CFG as in paper mode
        save_file(
            {"prompt_embeds": torch.randn(1, 77, dim), "negative_prompt_embeds": torch.randn(1, 77, dim)},
            str(sd / PROMPT_EMBEDS),
        )
    if not (sd / "text_encoder").is_dir():
        write_text_encoder(sd)
    write_training_photos(workdir / "data")
    pairs = workdir / "pairs"
    if (pairs / "pairs.csv").is_file():
        return
    rows = []
    for split, name in (("train", "astronaut"), ("train", "coffee"), ("val", "chelsea")):
        image = Image.fromarray(np.asarray(getattr(photos, name)())).convert("RGB")
        image = image.resize(
            (max(HR, image.width * HR // min(image.size)), max(HR, image.height * HR // min(image.size))),
            Image.Resampling.BICUBIC,
        ).crop((0, 0, HR, HR))
        pair_id = f"{split}_{name}"
        paths = {"hr_path": f"{split}/hr/{pair_id}.png", "lr_path": f"{split}/lr/{pair_id}.png"}
        for key, picture in (
            ("hr_path", image),
            ("lr_path", image.resize((HR // SCALE,) * 2, Image.Resampling.BICUBIC)),
        ):
            (pairs / paths[key]).parent.mkdir(parents=True, exist_ok=True)
            picture.save(pairs / paths[key])
        rows.append({"pair_id": pair_id, "split": split, "kind": "photo", **paths})
    with open(pairs / "pairs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_training_photos(data: Path) -> None:
    """A data-stage folder (``manifest.csv`` + photos) for the stages that degrade online (``data: online``,
    paper mode's ISR and StableSR trainers): two training photos, one per paper training dataset, so
    both of paper.yaml's crop modes run (LSDIR: 512² windows at stride 64; FFHQ: resized to 512²)."""
    import numpy as np
    from PIL import Image
    from skimage import data as photos

    from tvt.data.manifest import COLUMNS, sha256_file, write_manifest

    if (data / "manifest.csv").is_file():
        return
    rows = []
    for source, name, size in (("lsdir", "astronaut", (HR + 64, HR)), ("ffhq", "coffee", (600, 400))):
        path = data / "train" / f"{source}_{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(getattr(photos, name)())).convert("RGB").resize(size).save(path)
        rows.append({**dict.fromkeys(COLUMNS), "id": f"{source}_{name}", "path": str(path.relative_to(data)),
                     "width": size[0], "height": size[1], "sha256": sha256_file(path), "split": "train",
                     "source": source, "licence": "skimage.data (BSD-3-Clause)", "kind": "photo"})
    write_manifest(rows, data / "manifest.csv")


# ------------------------------------------------------------------------------------------
# One stage, one process
# ------------------------------------------------------------------------------------------


class _Run:
    """Stands in for the stage's MLflow run: keeps the metrics, ignores the rest."""

    def __init__(self):
        self.metrics: list[tuple[int | None, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def paper_config(steps: int) -> dict:
    """config/paper.yaml with the CPU overrides of the module docstring."""
    from tvt.config import load

    cfg = load(ROOT / "config" / "paper.yaml")
    engine = {
        "steps": steps,
        "batch_size": 1,
        "grad_accum": 1,
        "mixed_precision": "no",
        "checkpoint_every": 1,
        "keep_checkpoints": 2,
        "log_every": 1,
        "sample_every": 0,
        "num_workers": 0,
    }
    sections = [
        cfg["decoder_transfer"],
        cfg["encoder_transfer"],
        *cfg["isr"].values(),
        cfg["stablesr"]["sft"],
        cfg["stablesr"]["cfw"],
    ]
    for section in sections:
        section.update(engine)
    for section in cfg["isr"].values():  # RAM's weights are on the hub; the text encoder still runs every step
        if section.get("prompt") == "ram":
            section["prompt"] = "colour"
    cfg["decoder_transfer"]["disc_start"] = 1
    cfg["stablesr"]["cfw"]["disc_start"] = 1
    cfg["stablesr"]["sft"]["sample_steps"] = 2
    cfg["stablesr"]["cfw"]["generate_steps"] = 2
    cfg["stablesr"]["cfw"]["pairs"] = 2  # stage B samples stage A once per drawn pair (5004 in paper mode)
    return cfg


def run_stage(stage: str, workdir: Path, steps: int) -> dict:
    """Train ``stage`` to ``steps`` (resuming from its checkpoints); return seconds per step and peak RSS."""
    cfg = paper_config(steps)
    pairs, sd, out, ckpt = workdir / "pairs", workdir / "sd", workdir / "out", workdir / "ckpt" / stage
    data = workdir / "data"
    run = _Run()
    started = time.perf_counter()

    def upstream(stage: str) -> Path:
        return out / stage if (out / stage).is_dir() else workdir / "d4"

    if stage == "decoder_transfer":
        from tvt.training.vae_transfer import run_decoder_transfer

        run_decoder_transfer(cfg, pairs, sd, out / stage, ckpt, run)
    elif stage == "encoder_transfer":
        from tvt.training.vae_transfer import run_encoder_transfer

        run_encoder_transfer(cfg, pairs, upstream("decoder_transfer"), out / stage, ckpt, run)
    elif stage.startswith("isr_"):
        from tvt.training.isr import run_isr

        run_isr(cfg, stage.removeprefix("isr_"), pairs, sd, upstream("encoder_transfer"), out / stage, ckpt, run,
                data_dir=data)
    elif stage == "stablesr_sft":
        from tvt.training.stablesr_sft import run_stablesr_sft

        run_stablesr_sft(cfg, pairs, sd, out / stage, ckpt, run, data_dir=data)
    elif stage == "stablesr_cfw":
        from tvt.training.stablesr_cfw import run_stablesr_stage_b

        run_stablesr_stage_b(cfg, pairs, sd, out / "stablesr_sft", out / stage, ckpt, run, data_dir=data)
    else:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    rates = [m[k] for _, m in run.metrics for k in m if k.endswith("/samples_per_s")]
    return {
        "stage": stage,
        "steps": steps,
        "seconds_per_step": [1 / r for r in rates],
        "process_seconds": time.perf_counter() - started,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tvt-paper-scale"))
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--counts-only", action="store_true", help="print the parameter counts and stop")
    parser.add_argument("--child", metavar="STAGE", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_stage(args.child, args.workdir, args.steps)), flush=True)
        return

    print("Trainable parameters on SD 2.1-base's UNet (meta device): ours vs the official grouping")
    print(f"{'network':42s} {'ours':>12s} {'official':>12s}  note")
    for network, mine, theirs, note in lora_counts():
        print(f"{network:42s} {mine:12,d} {theirs:12,d}  {note}")
    if args.counts_only:
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    prepare(args.workdir)
    results = []
    for stage in args.stages:
        for steps in (1, 2):  # step 1 + checkpoint; then a fresh process resumes and trains step 2
            child = subprocess.run(
                [sys.executable, __file__, "--child", stage, "--steps", str(steps), "--workdir", str(args.workdir)],
                check=False,
                capture_output=True,
                text=True,
            )
            line = next((line for line in child.stdout.splitlines() if line.startswith("RESULT ")), None)
            if child.returncode or line is None:
                tail = "\n".join(child.stderr.splitlines()[-15:])
                print(f"{stage} (steps={steps}) FAILED, exit {child.returncode}:\n{tail}", flush=True)
                results.append({"stage": stage, "steps": steps, "failed": child.returncode})
                break
            results.append(json.loads(line.removeprefix("RESULT ")))
            print(json.dumps(results[-1]), flush=True)

    print(f"\nPaper-scale training on CPU ({torch.get_num_threads()} threads), batch 1, {HR}² crops, fp32")
    print(f"{'stage':18s} {'step':>5s} {'s/step':>9s} {'process s':>10s} {'peak RSS GiB':>13s}")
    for r in results:
        if "failed" in r:
            print(f"{r['stage']:18s} {r['steps']:5d}  FAILED (exit {r['failed']})")
            continue
        for seconds in r["seconds_per_step"]:
            print(
                f"{r['stage']:18s} {r['steps']:5d} {seconds:9.1f} {r['process_seconds']:10.1f} "
                f"{r['peak_rss_gib']:13.2f}"
            )


if __name__ == "__main__":
    main()
