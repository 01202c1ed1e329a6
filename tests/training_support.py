"""Helpers shared by the training-stage tests (prior, VAE transfer, ISR, VSD, engine)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tvt import compat

compat.apply()

import lpips
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from sample_photos import COLOUR_PHOTOS, photo

from tvt.models.prompts import save_character_tokenizer
from tvt.models.restorer import sd_noise_scheduler
from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D8
from tvt.models.sd_weights import PROMPT_EMBEDS
from tvt.training.prior import null_prompt_embeds


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_trunk_lpips(net="alex", weights_dir=None, device="cpu"):
    """Official LPIPS architecture and linear heads, random AlexNet trunk (no download)."""
    torch.manual_seed(0)
    return lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval().to(device)


class RecordingRun:
    """Stands in for tvt.tracking.StageRun; records what a stage logs."""

    def __init__(self):
        self.metrics: list[tuple[int | None, dict]] = []
        self.figures: list[str] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_figure(self, figure, name):
        assert figure.axes, "an empty figure was logged"
        self.figures.append(name)

    def series(self, key):
        return [m[key] for _, m in self.metrics if key in m]


def make_pairs_dir(root: Path, size: int, per_split: dict[str, int], *, seed: int = 0, n_photos: int = 4) -> Path:
    """A pairs folder like the degradation stage writes: random HR crops, bicubic LR (÷4)."""
    rng = np.random.default_rng(seed)
    photos = [photo(name) for name in COLOUR_PHOTOS[:n_photos]]
    rows = []
    for split, count in per_split.items():
        for i in range(count):
            source = photos[i % len(photos)]
            x, y = rng.integers(0, source.width - size), rng.integers(0, source.height - size)
            hr = source.crop((x, y, x + size, y + size))
            pair_id = f"{split}{i:03d}"
            paths = {"hr_path": f"{split}/hr/{pair_id}.png", "lr_path": f"{split}/lr/{pair_id}.png"}
            for key, image in (("hr_path", hr), ("lr_path", hr.resize((size // 4,) * 2, Image.BICUBIC))):
                (root / paths[key]).parent.mkdir(parents=True, exist_ok=True)
                image.save(root / paths[key])
            rows.append({"pair_id": pair_id, "split": split, "kind": "photo", **paths})
    with open(root / "pairs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def make_manifest(root: Path, photos: list[tuple[str, tuple[int, int], str, str]]) -> Path:
    """A data-stage manifest (``root/manifest.csv``) over wheel photos: ``(name, (width, height), source,
    split)`` each, resized to that size and written under ``root/images``."""
    from tvt.data.manifest import sha256_file, write_manifest

    rows = []
    for i, (name, size, source, split) in enumerate(photos):
        path = root / "images" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(name).resize(size).save(path)
        rows.append({"id": f"p{i}-{name}", "path": f"images/{name}.png", "width": size[0], "height": size[1],
                     "sha256": sha256_file(path), "split": split, "source": source, "licence": "test",
                     "kind": "photo", "text": "", "text_px": None, "font": "", "lang": "", "background": ""})
    return write_manifest(rows, root / "manifest.csv")


def save_tiny_prior(sd_dir: Path) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    """A random mini "SD" (seed 0) in the layout the prior stage writes: vae/, unet/, scheduler/
    (SD's schedule) and the null prompt; returns the VAE and UNet it saved."""
    torch.manual_seed(0)
    vae, unet = AutoencoderKL(**MINI_VAE_D8), UNet2DConditionModel(**MINI_UNET)
    vae.save_pretrained(sd_dir / "vae")
    unet.save_pretrained(sd_dir / "unet")
    sd_noise_scheduler().save_pretrained(sd_dir / "scheduler")
    save_file({"prompt_embeds": null_prompt_embeds(MINI_UNET["cross_attention_dim"])}, str(sd_dir / PROMPT_EMBEDS))
    return vae, unet


def save_tiny_text_encoder(sd_dir: Path, hidden_size: int = MINI_UNET["cross_attention_dim"]):
    """A tiny CLIP tokenizer (letters, digits, a few signs: CLIP's BPE vocabulary is on the hub) and a
    random text encoder (seed 0) as an SD snapshot's ``tokenizer/`` and ``text_encoder/``; returns both."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = save_character_tokenizer(sd_dir / "tokenizer")
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, eos_token_id=1,
                                           bos_token_id=0, pad_token_id=1)).eval()
    encoder.save_pretrained(sd_dir / "text_encoder")
    return tokenizer, encoder
