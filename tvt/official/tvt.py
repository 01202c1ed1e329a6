"""TVT's released weights → a ``tvt_official`` restorer folder (VAE-D4 + CE-UNet at t = 1).

The release (Joyies/TVT, ``ckp/``) has three parts, read as the official
``TVT/modelfile/TVTModel.py::TVT.__init__`` reads them:

* ``vae.ckpt`` — a Lightning checkpoint; ``["state_dict"]`` holds VAE-D4 with every key
  prefixed ``vaeDe4.`` (the official code keeps only those keys and strips the prefix before
  a strict load into ``VAED4/config2.json``'s model, which has our ``VAE_D4_PAPER`` layout).
  Keys of other training-time modules are listed as ignored in the report.
* ``TVTUNet/unet/`` — a diffusers ``UNet2DConditionModel`` folder with **five** levels: SD's
  four plus a replica of its first down block in front (``down_blocks.0``) and of its last up
  block behind (``up_blocks.4``), ``up_blocks.3`` gaining the ×2 upsampler between them.
* ``model_TVT.pkl`` — ``TVT.save_model``'s dict: three peft LoRA adapters
  (``default_encoder``/``default_decoder``/``default_others``, module lists + ``rank_unet``)
  and the fully trained weights (``down_blocks.0``, ``up_blocks.3.upsamplers.0``,
  ``up_blocks.4``, ``conv_in``, ``conv_out``), all in peft's names (:mod:`tvt.official.lora`).

The five-level UNet is our :class:`~tvt.models.ce_unet.CEUNet` under other names (its
docstring); :func:`five_level_to_ce_unet` renames it, and the CE-UNet's inner SD UNet config
is the five-level config without its first level.
"""

from __future__ import annotations

import re
from pathlib import Path

from tvt import compat

compat.apply()

from diffusers import UNet2DConditionModel

from tvt.models.ce_unet import CEUNet
from tvt.models.restorer import TVT_TIMESTEP
from tvt.models.sd_configs import VAE_D4_PAPER
from tvt.models.vae_d4 import VAED4
from tvt.official.checkpoint import KeyLedger, OfficialFormatError, load_checkpoint, require_keys
from tvt.official.common import build_strict, read_model_folder, save_one_step_restorer
from tvt.official.lora import merge_lora_state

METHOD = "tvt_official"
VAE_PREFIX = "vaeDe4."
PKL_KEYS = {
    "unet_lora_encoder_modules",
    "unet_lora_decoder_modules",
    "unet_lora_others_modules",
    "rank_unet",
    "state_dict_unet",
}
ADAPTERS = {
    "default_encoder": "unet_lora_encoder_modules",
    "default_decoder": "unet_lora_decoder_modules",
    "default_others": "unet_lora_others_modules",
}
# five-level config entries with one value per level: the inner UNet drops the first level
_PER_LEVEL = (
    "block_out_channels",
    "down_block_types",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "layers_per_block",
    "only_cross_attention",
)


def convert_vae(vae_ckpt: Path, vae_config: dict) -> tuple[VAED4, dict]:
    """VAE-D4 from the Lightning file: ``vaeDe4.*`` consumed exactly, everything else ignored by name."""
    ckpt = load_checkpoint(vae_ckpt)
    if "state_dict" not in ckpt:
        raise OfficialFormatError(
            f"{vae_ckpt}: no 'state_dict' (top-level keys: {sorted(ckpt)[:8]}); not a Lightning checkpoint"
        )
    state = ckpt["state_dict"]
    ledger = KeyLedger(str(vae_ckpt), state)
    ours = {k.removeprefix(VAE_PREFIX): v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    if not ours:
        raise OfficialFormatError(f"{vae_ckpt}: no '{VAE_PREFIX}*' keys; not TVT's vae.ckpt")
    vae = build_strict(VAED4, vae_config, ours, f"{vae_ckpt} ({VAE_PREFIX}*)")
    ledger.take(*(VAE_PREFIX + k for k in ours))
    others = ledger.pending()
    ledger.ignore(
        others,
        "Lightning module parts other than VAE-D4 (training only): "
        + ", ".join(sorted({k.split(".")[0] for k in others})),
    )
    return vae, ledger.close()


def inner_unet_config(config: dict) -> dict:
    """The SD UNet config inside a five-level TVT UNet config (its first level is the replica)."""
    levels = len(config["down_block_types"])
    if (
        levels < 3
        or config["down_block_types"][0] != config["down_block_types"][1]
        or config["block_out_channels"][0] != config["block_out_channels"][1]
    ):
        raise OfficialFormatError(
            "not TVT's UNet: its first level must replicate the second "
            f"(down_block_types={config['down_block_types']}, "
            f"block_out_channels={config['block_out_channels']})"
        )
    inner = {k: v for k, v in config.items() if not k.startswith("_")}
    for key in _PER_LEVEL:
        if isinstance(inner.get(key), (list, tuple)) and len(inner[key]) == levels:
            inner[key] = list(inner[key])[1:]
    inner["up_block_types"] = list(config["up_block_types"])[:-1]
    return inner


def five_level_to_ce_unet(key: str, levels: int) -> str:
    """Rename one key of the official five-level UNet to :class:`CEUNet`'s names."""
    last_up, upsampler = f"up_blocks.{levels - 1}.", f"up_blocks.{levels - 2}.upsamplers.0."
    if key.startswith("down_blocks.0."):
        return "down_block." + key.removeprefix("down_blocks.0.")
    if key.startswith(upsampler):
        return "upsample." + key.removeprefix(upsampler)
    if key.startswith(last_up):
        return "up_block." + key.removeprefix(last_up)
    match = re.match(r"down_blocks\.(\d+)\.(.*)", key)
    if match:
        return f"unet.down_blocks.{int(match[1]) - 1}.{match[2]}"
    if key.startswith(("up_blocks.", "mid_block.", "time_embedding.")):
        return "unet." + key
    return key  # conv_in, conv_norm_out, conv_out stay at the 2x ends


def convert_unet(unet_dir: Path, pkl: Path) -> tuple[CEUNet, dict]:
    """CE-UNet from the five-level folder with ``model_TVT.pkl``'s full weights and merged LoRA."""
    folder = Path(unet_dir) / "unet" if (Path(unet_dir) / "unet").is_dir() else Path(unet_dir)
    config, base = read_model_folder(folder)
    build_strict(UNet2DConditionModel, config, base, str(folder))  # every key and shape, before merging
    release = load_checkpoint(pkl)
    require_keys(f"{pkl} (top level)", release, PKL_KEYS)
    trained = release["state_dict_unet"]
    ledger = KeyLedger(str(pkl), [f"state_dict_unet.{k}" for k in trained])
    adapters = {name: release[key] for name, key in ADAPTERS.items()}
    merged = merge_lora_state(base, trained, adapters, int(release["rank_unet"]), ledger, "state_dict_unet.")
    levels = len(config["down_block_types"])
    renamed = {five_level_to_ce_unet(k, levels): v for k, v in merged.items()}
    ce_unet = build_strict(CEUNet, {"unet_config": inner_unet_config(config)}, renamed, f"{folder} as CE-UNet")
    report = ledger.close()
    report["lora"] = {
        "rank": int(release["rank_unet"]),
        "alpha": 8,
        "modules": {name: len(modules) for name, modules in adapters.items()},
    }
    return ce_unet, report


def import_tvt(
    vae_ckpt: Path, unet_dir: Path, pkl: Path, sd_dir: Path, out_dir: Path, vae_config: dict | None = None
) -> tuple[Path, dict]:
    """Write the ``tvt_official`` restorer folder; returns it and the key accounting."""
    vae, vae_report = convert_vae(Path(vae_ckpt), dict(vae_config or VAE_D4_PAPER))
    unet, unet_report = convert_unet(Path(unet_dir), Path(pkl))
    save_one_step_restorer(vae, unet, method=METHOD, timestep=TVT_TIMESTEP, sd_dir=sd_dir, out_dir=out_dir)
    return Path(out_dir), {"format": "tvt", "sources": [vae_report, unet_report]}
