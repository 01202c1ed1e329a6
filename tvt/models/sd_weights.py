"""Stable Diffusion 2.1-base weights for paper mode, in the layout every stage reads.

Paper mode downloads the snapshot once (``huggingface_hub.snapshot_download`` at a
configured revision, safetensors only) into ``resources/models/sd-base``; mini mode's
prior stage trains tiny models and saves them into the same layout. Later stages only
ever call ``from_pretrained(sd_dir, subfolder=...)``, so they cannot tell the two apart.

The text encoder is used once, here, to embed the null and negative prompts into
``prompt_embeds.safetensors``: training and inference with a fixed prompt then need no
CLIP at all (DAPE prompts, when configured, are computed by their own extractor).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

#: what a stage needs from the SD snapshot (no EMA/fp16/ckpt duplicates)
SD_ALLOW_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "vae/*.json", "vae/diffusion_pytorch_model.safetensors",
    "unet/*.json", "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/*.json", "text_encoder/model.safetensors",
    "tokenizer/*",
]
PROMPT_EMBEDS = "prompt_embeds.safetensors"
SOURCE_FILE = "SOURCE.json"  # where the weights came from (repo, commit), for people and MLflow


def check_sd_architecture(sd_dir: Path) -> None:
    """Refuse a snapshot whose UNet or VAE is not SD 2.1-base's architecture.

    A mirror or a mistyped repo can serve another model (SD 1.5, SD 2.1-768 with
    v-prediction…) whose weights would load into the same classes and silently change every
    result; the config.json files say which architecture the weights are for.
    """
    from tvt.models.sd_configs import SD21_BASE_UNET, SD21_BASE_VAE

    for sub, expected in (("unet", SD21_BASE_UNET), ("vae", SD21_BASE_VAE)):
        path = Path(sd_dir) / sub / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the SD snapshot")
        found = json.loads(path.read_text())
        wrong = [f"{key}={found.get(key)!r} (expected {value!r})" for key, value in expected.items()
                 if key != "sample_size" and _plain(found.get(key)) != _plain(value)]
        if wrong:
            raise ValueError(f"{path}: not SD 2.1-base's {sub}: " + "; ".join(wrong[:4])
                             + (f" and {len(wrong) - 4} more" if len(wrong) > 4 else ""))


def _plain(value):
    """JSON has lists where the Python configs have tuples."""
    return list(map(_plain, value)) if isinstance(value, (list, tuple)) else value


def embed_prompts(text_encoder, tokenizer, prompts: Mapping[str, str]) -> dict:
    """CLIP embeddings (1, 77, dim) of each named prompt, as SD's pipelines compute them."""
    import torch

    out = {}
    for name, prompt in prompts.items():
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out[name] = text_encoder(ids)[0].contiguous()
    return out


def fetch_sd_base(spec: Mapping, out_dir: Path) -> Path:
    """Download SD 2.1-base at ``spec['revision']`` into ``out_dir`` and embed the prompts."""
    from huggingface_hub import snapshot_download
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    snapshot_download(spec["repo_id"], revision=spec["revision"], local_dir=out_dir,
                      allow_patterns=SD_ALLOW_PATTERNS)
    check_sd_architecture(out_dir)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(out_dir, subfolder="text_encoder", use_safetensors=True)
    # same file and key as the mini prior's (tvt/training/prior.py), plus the CFG negative
    embeds = embed_prompts(text_encoder, tokenizer, {"prompt_embeds": "",
                                                     "negative_prompt_embeds": spec.get("negative_prompt", "")})
    save_file(embeds, str(out_dir / PROMPT_EMBEDS))
    (out_dir / SOURCE_FILE).write_text(json.dumps({"repo_id": spec["repo_id"], "revision": spec["revision"]}) + "\n")
    cache = out_dir / ".cache"  # huggingface_hub's download metadata, not part of the weights
    if cache.exists():
        shutil.rmtree(cache)
    os.sync()
    return out_dir
