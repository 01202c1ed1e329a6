"""OSEDiff's released ``osediff.pkl`` → an ``osediff_official`` restorer folder (SD 2.1-base, t = 999).

``osediff.pkl`` is the dict of cswry/OSEDiff ``osediff.py::OSEDiff_gen.save_model``: LoRA
module lists for the UNet (``unet_lora_{encoder,decoder,others}_modules``) and the VAE encoder
(``vae_lora_encoder_modules``), the ranks (``rank_unet``, ``rank_vae``) and two state dicts in
peft's names — ``state_dict_unet`` (every LoRA weight, plus ``conv_in``, trained in full) and
``state_dict_vae`` (the encoder's LoRA weights). Everything else is SD 2.1-base, which
``OSEDiff_test.load_ckpt`` loads first: we take it from the SD snapshot and fold the adapters
in (:mod:`tvt.official.lora`; scale 8 / rank, peft's default alpha).
"""

from __future__ import annotations

from pathlib import Path

from tvt import compat

compat.apply()

from diffusers import AutoencoderKL, UNet2DConditionModel

from tvt.models.restorer import OSEDIFF_TIMESTEP
from tvt.official.checkpoint import KeyLedger, load_checkpoint, require_keys
from tvt.official.common import build_strict, read_model_folder, save_one_step_restorer
from tvt.official.lora import merge_lora_state

METHOD = "osediff_official"
PKL_KEYS = {
    "unet_lora_encoder_modules",
    "unet_lora_decoder_modules",
    "unet_lora_others_modules",
    "vae_lora_encoder_modules",
    "rank_unet",
    "rank_vae",
    "state_dict_unet",
    "state_dict_vae",
}
UNET_ADAPTERS = {
    "default_encoder": "unet_lora_encoder_modules",
    "default_decoder": "unet_lora_decoder_modules",
    "default_others": "unet_lora_others_modules",
}


def import_osediff(pkl: Path, sd_dir: Path, out_dir: Path) -> tuple[Path, dict]:
    """Write the ``osediff_official`` restorer folder; returns it and the key accounting."""
    release = load_checkpoint(pkl)
    require_keys(f"{pkl} (top level)", release, PKL_KEYS)
    ledger = KeyLedger(
        str(pkl), [f"{part}.{k}" for part in ("state_dict_unet", "state_dict_vae") for k in release[part]]
    )
    models = {}
    for part, model_class, adapters, rank in (
        ("unet", UNet2DConditionModel, {a: release[k] for a, k in UNET_ADAPTERS.items()}, release["rank_unet"]),
        ("vae", AutoencoderKL, {"default_encoder": release["vae_lora_encoder_modules"]}, release["rank_vae"]),
    ):
        config, base = read_model_folder(Path(sd_dir) / part)
        merged = merge_lora_state(
            base, release[f"state_dict_{part}"], adapters, int(rank), ledger, f"state_dict_{part}."
        )
        models[part] = build_strict(model_class, config, merged, f"{pkl} merged into {sd_dir}/{part}")
    save_one_step_restorer(
        models["vae"], models["unet"], method=METHOD, timestep=OSEDIFF_TIMESTEP, sd_dir=sd_dir, out_dir=out_dir
    )
    report = ledger.close()
    report["lora"] = {"rank_unet": int(release["rank_unet"]), "rank_vae": int(release["rank_vae"]), "alpha": 8}
    return Path(out_dir), {"format": "osediff", "sources": [report]}
