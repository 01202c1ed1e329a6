"""What every converter shares: strict loading of diffusers folders, and the SD snapshot's parts."""

from __future__ import annotations

import json
from pathlib import Path

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import torch
from diffusers import DDPMScheduler
from diffusers.models.model_loading_utils import load_state_dict
from safetensors.torch import load_file

from tvt.models.prompts import NullPrompt
from tvt.models.restorer import OneStepRestorer
from tvt.models.sd_weights import PROMPT_EMBEDS
from tvt.official.checkpoint import OfficialFormatError, require_shapes

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def read_model_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of a diffusers model folder; ``.bin`` files load with ``weights_only``."""
    folder = Path(folder)
    config_file = folder / "config.json"
    weights = next((folder / name for name in WEIGHT_NAMES if (folder / name).is_file()), None)
    if not config_file.is_file() or weights is None:
        raise OfficialFormatError(
            f"{folder}: not a diffusers model folder (needs config.json and one of {', '.join(WEIGHT_NAMES)})"
        )
    return json.loads(config_file.read_text()), load_state_dict(weights)


def build_strict(model_class, config: dict, state: dict[str, torch.Tensor], what: str):
    """``model_class`` from ``config`` holding exactly ``state`` (every key, every shape), in eval mode."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = model_class.from_config(config)
    require_shapes(what, state, model.state_dict())
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, assign=True, strict=True)
    return model.eval()


def load_model_folder(model_class, folder: Path):
    """A diffusers model from its folder, refusing missing or unexpected weights (``from_pretrained`` only warns)."""
    config, state = read_model_folder(folder)
    return build_strict(model_class, config, state, str(folder))


def sd_prompt_embedding(sd_dir: Path) -> torch.Tensor:
    """The null-prompt embedding (1, 77, D) stored with the SD snapshot (tvt/models/sd_weights.py)."""
    path = Path(sd_dir) / PROMPT_EMBEDS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the SD snapshot folder must come from the prior/sd stage")
    return load_file(path)["prompt_embeds"]


def sd_scheduler(sd_dir: Path) -> DDPMScheduler:
    return DDPMScheduler.from_pretrained(Path(sd_dir) / "scheduler")


def save_one_step_restorer(vae, unet, *, method: str, timestep: int, sd_dir: Path, out_dir: Path) -> Path:
    """A converted VAE + UNet as a :class:`~tvt.models.restorer.OneStepRestorer` folder, with the SD
    snapshot's scheduler and null-prompt embedding (the official codes' tagged prompts come at test time:
    ``tvt sr --tagger``)."""
    restorer = OneStepRestorer(
        vae,
        unet,
        method=method,
        timestep=timestep,
        prompt=NullPrompt(sd_prompt_embedding(sd_dir)),
        scheduler=sd_scheduler(sd_dir),
    )
    with torch.no_grad():
        return restorer.save_pretrained_dir(out_dir)
