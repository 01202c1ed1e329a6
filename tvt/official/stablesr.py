"""StableSR's released checkpoints → a ``stablesr_official`` restorer folder (:class:`StableSRRestorer`).

Two Lightning files (IceClear/StableSR, configs ``stableSRNew/v2-finetune_text_T_512.yaml`` and
``autoencoder/autoencoder_kl_64x64x4_resi.yaml``):

* ``stablesr_000117.ckpt`` (or ``stablesr_turbo.ckpt``), ``["state_dict"]`` of
  ``LatentDiffusionSRTextWT``:

  - ``structcond_stage_model.*`` — the time-aware encoder (``openaimodel.py::EncoderUNetModelWT``),
    converted to :class:`~tvt.models.stablesr.TimeAwareEncoder`: ``time_embed.{0,2}``,
    ``input_blocks`` (ResBlocks ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``,
    ``skip_connection``; ``AttentionBlock`` ``norm``, ``qkv``, ``proj_out``; ``Downsample.op``),
    ``middle_block.{0,1,2}`` and ``fea_tran.i``. The attention's ``qkv`` is a 1×1 conv1d whose
    3C outputs ``QKVAttentionLegacy`` reads *per head* as [q, k, v] blocks of C / heads rows
    (``use_new_attention_order: False``); it is split into ``to_q``/``to_k``/``to_v`` head by
    head (:func:`split_legacy_qkv`).
  - ``model.diffusion_model.*.spade.*`` — the SPADE heads of the 22 ``ResBlockDual`` (input
    blocks, middle block 0 and 2, output blocks) → the conditioner's SFT heads
    (``param_free_norm`` → ``norm``, ``mlp_shared.0`` → ``shared.0``, ``mlp_gamma`` → ``scale``,
    ``mlp_beta`` → ``shift``).
  - the rest of ``model.diffusion_model.*`` and ``first_stage_model.*`` — SD 2.1-base's UNet and
    VAE, which StableSR keeps frozen: they are taken from the SD snapshot, and the import proves
    that the file's copies are the snapshot's tensors byte for byte
    (:func:`~tvt.official.checkpoint.require_same_tensors`).
  - ``betas``, ``alphas_cumprod`` (checked against the snapshot's scheduler), ``scale_factor``
    (checked against the VAE's); the other schedule buffers are derived from ``betas``, and
    ``cond_stage_model.*`` is SD 2.1's frozen OpenCLIP text encoder (StableSR samples with the
    empty prompt, whose embedding the snapshot stores): both listed as ignored.

* ``vqgan_cfw_00011.ckpt``, ``["state_dict"]`` of ``AutoencoderKLResi``: ``decoder.fusion_layer_{i}``
  (``Fuse_sft_block_RRDB``: ``encode_enc_1`` ResBlock, ``encode_enc_2`` RRDBs, ``encode_enc_3``
  ResBlock, whose 1×1 shortcut is ``conv_out``) → :class:`~tvt.models.cfw.CFWModule` at level
  i; the VAE itself (frozen, ``freeze_dec``) is checked against the snapshot like above;
  ``loss.*`` (LPIPS and discriminator) is training-only.
"""

from __future__ import annotations

import re
from pathlib import Path

from tvt import compat

compat.apply()

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from tvt.models.cfw import CFWModule
from tvt.models.prompts import NullPrompt
from tvt.models.sd_configs import STABLESR_ENCODER_PAPER
from tvt.models.stablesr import StableSRConditioner, _sft_key
from tvt.models.stablesr_restorer import StableSRRestorer
from tvt.official.checkpoint import (
    KeyLedger,
    OfficialFormatError,
    load_checkpoint,
    require_same_tensors,
    require_shapes,
)
from tvt.official.common import load_model_folder, sd_prompt_embedding, sd_scheduler

METHOD = "stablesr_official"
SPADE_GROUPS = 32  # ldm.modules.diffusionmodules.util.normalization: GroupNorm32(32, channels)
ENCODER, UNET, VAE, TEXT = (
    "structcond_stage_model.",
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.",
)
SCHEDULE_CHECKED = ("betas", "alphas_cumprod")
SCHEDULE_DERIVED = (
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
_RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_SPADE = {"param_free_norm": "norm", "mlp_shared.0": "shared.0", "mlp_gamma": "scale", "mlp_beta": "shift"}
_FUSE_RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_out": "conv_shortcut"}


def split_legacy_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v weights (C, C) or biases (C,) from a legacy-order ``qkv`` (3C, C, 1) or (3C,).

    ``QKVAttentionLegacy`` reshapes the 3C channels to (heads, 3 · C/heads): head h's q, k and v
    are consecutive blocks; diffusers' ``to_q`` rows are head-major, so q = the q blocks, stacked.
    """
    rows = qkv.shape[0] // 3
    grouped = qkv.reshape(heads, 3, rows // heads, *qkv.shape[1:])
    return tuple(grouped[:, i].reshape(rows, *qkv.shape[1:]).squeeze(-1) for i in range(3))


def _encoder_blocks(config: dict) -> list[tuple[str, str, str]]:
    """(official prefix, our prefix, kind) for ``EncoderUNetModelWT`` laid out as ``config`` says."""
    blocks = [
        ("time_embed.0.", "time_embedding.linear_1.", "plain"),
        ("time_embed.2.", "time_embedding.linear_2.", "plain"),
        ("input_blocks.0.0.", "conv_in.", "plain"),
    ]
    index, levels = 1, len(config["block_out_channels"])
    for level, block_type in enumerate(config["down_block_types"]):
        for j in range(config["layers_per_block"]):
            blocks.append((f"input_blocks.{index}.0.", f"down_blocks.{level}.resnets.{j}.", "resblock"))
            if block_type.startswith("Attn"):
                blocks.append((f"input_blocks.{index}.1.", f"down_blocks.{level}.attentions.{j}.", "attention"))
            index += 1
        if level < levels - 1:
            blocks.append((f"input_blocks.{index}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", "plain"))
            index += 1
    blocks += [
        ("middle_block.0.", "mid_block.resnets.0.", "resblock"),
        ("middle_block.1.", "mid_block.attentions.0.", "attention"),
        ("middle_block.2.", "mid_block.resnets.1.", "resblock"),
    ]
    blocks += [(f"fea_tran.{i}.", f"feature_heads.{i}.", "resblock") for i in range(levels)]
    return blocks


def convert_encoder(state: dict[str, torch.Tensor], config: dict, ledger: KeyLedger) -> dict[str, torch.Tensor]:
    """``structcond_stage_model.*`` → :class:`TimeAwareEncoder` names (keys of ``state`` without the prefix)."""
    heads, ours = config["num_attention_heads"], {}
    for source, target, kind in _encoder_blocks(config):
        for key in [k for k in state if k.startswith(source)]:
            leaf = key.removeprefix(source)
            module, _, tensor = leaf.rpartition(".")
            if kind == "resblock" and module in _RESBLOCK:
                ours[f"{target}{_RESBLOCK[module]}.{tensor}"] = state[key]
            elif kind == "attention" and module == "qkv":
                for name, part in zip(("to_q", "to_k", "to_v"), split_legacy_qkv(state[key], heads)):
                    ours[f"{target}{name}.{tensor}"] = part
            elif kind == "attention" and module in ("norm", "proj_out"):
                value = state[key].squeeze(-1) if module == "proj_out" else state[key]
                ours[f"{target}{'group_norm' if module == 'norm' else 'to_out.0'}.{tensor}"] = value
            elif kind == "plain" and not module:
                ours[target + leaf] = state[key]
            else:
                continue  # left pending: the ledger names it
            ledger.take(ENCODER + key)
    return ours


def spade_targets(unet: UNet2DConditionModel) -> dict[str, str]:
    """LDM ``ResBlockDual`` prefix (with ``.spade.``) → our SFT head key, for SD's UNet layout."""
    per_level = unet.config.layers_per_block
    targets = {}
    for level in range(len(unet.down_blocks)):
        for j in range(per_level):
            targets[f"input_blocks.{1 + level * (per_level + 1) + j}.0.spade."] = f"down_blocks.{level}.resnets.{j}"
    targets["middle_block.0.spade."], targets["middle_block.2.spade."] = "mid_block.resnets.0", "mid_block.resnets.1"
    for m in range(len(unet.up_blocks) * (per_level + 1)):
        targets[f"output_blocks.{m}.0.spade."] = f"up_blocks.{m // (per_level + 1)}.resnets.{m % (per_level + 1)}"
    return targets


def _check_schedule(state, ledger, scheduler, vae) -> None:
    for name in SCHEDULE_CHECKED:
        ours = getattr(scheduler, name).float()
        if name in state and not torch.allclose(state[name].float(), ours, rtol=1e-4, atol=1e-7):
            raise OfficialFormatError(f"{ledger.source}: its '{name}' is not the SD snapshot's noise schedule")
    if "scale_factor" in state and abs(float(state["scale_factor"]) - vae.config.scaling_factor) > 1e-6:
        raise OfficialFormatError(
            f"{ledger.source}: scale_factor {float(state['scale_factor'])} is not the VAE's {vae.config.scaling_factor}"
        )
    ledger.take(*(k for k in (*SCHEDULE_CHECKED, "scale_factor") if k in state))
    ledger.ignore([k for k in SCHEDULE_DERIVED if k in state], "schedule buffers derived from betas")


def convert_diffusion(
    path: Path, unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler, encoder_config: dict
) -> tuple[StableSRConditioner, dict]:
    ckpt = load_checkpoint(path)
    if "state_dict" not in ckpt:
        raise OfficialFormatError(f"{path}: no 'state_dict'; not a StableSR Lightning checkpoint")
    state = ckpt["state_dict"]
    ledger = KeyLedger(str(path), state)
    if not any(k.startswith(ENCODER) for k in state):
        raise OfficialFormatError(
            f"{path}: no '{ENCODER}*' keys (the time-aware encoder); not StableSR's diffusion checkpoint"
        )
    encoder = convert_encoder(
        {k.removeprefix(ENCODER): v for k, v in state.items() if k.startswith(ENCODER)}, encoder_config, ledger
    )
    spade = {}
    for source, target in spade_targets(unet).items():
        for key in [k for k in state if k.startswith(UNET + source)]:
            module, _, tensor = key.removeprefix(UNET + source).rpartition(".")
            if module in _SPADE:
                spade[f"sft.{_sft_key(target)}.{_SPADE[module]}.{tensor}"] = state[key]
                ledger.take(key)
    hidden = next((v.shape[0] for k, v in spade.items() if k.endswith("shared.0.weight")), None)
    if hidden is None:
        raise OfficialFormatError(f"{path}: no SPADE heads ('{UNET}input_blocks.1.0.spade.*'); not StableSR")
    conditioner = StableSRConditioner.for_unet(
        unet, encoder_config, sft_hidden_channels=hidden, sft_norm_groups=SPADE_GROUPS
    )
    converted = {**{f"encoder.{k}": v for k, v in encoder.items()}, **spade}
    require_shapes(f"{path} as StableSRConditioner", converted, conditioner.state_dict())
    conditioner.load_state_dict(converted, strict=True)

    for prefix, model in ((UNET, unet), (VAE, vae)):
        frozen = {k: state[k] for k in ledger.pending(prefix)}
        require_same_tensors(f"{path}: {prefix}*", frozen, model.state_dict())
        ledger.take(*frozen)
    _check_schedule(state, ledger, scheduler, vae)
    ledger.ignore(
        ledger.pending(TEXT),
        "SD 2.1's frozen OpenCLIP text encoder; the empty prompt's embedding comes from the SD snapshot",
    )
    return conditioner.eval(), ledger.close()


def convert_cfw(path: Path, vae: AutoencoderKL) -> tuple[CFWModule, dict]:
    ckpt = load_checkpoint(path)
    state = ckpt.get("state_dict", ckpt)
    ledger = KeyLedger(str(path), state)
    fusion = re.compile(r"decoder\.fusion_layer_(\d+)\.(.*)")
    layers = sorted({int(m[1]) for k in state if (m := fusion.match(k))})
    if not layers:
        raise OfficialFormatError(f"{path}: no 'decoder.fusion_layer_*' keys; not StableSR's CFW checkpoint")
    rrdbs = len({m[1] for k in state if (m := re.match(r"decoder\.fusion_layer_\d+\.encode_enc_2\.(\d+)\.", k))})
    growth = next(v.shape[0] for k, v in state.items() if k.endswith("encode_enc_2.0.rdb1.conv1.weight"))
    cfw = CFWModule.for_vae(vae, num_rrdb_blocks=rrdbs, growth_channels=growth)
    if list(cfw.levels) != layers:
        raise OfficialFormatError(
            f"{path}: fusion layers at levels {layers}, the VAE's intermediate levels are {list(cfw.levels)}"
        )
    ours = {}
    for key in [k for k in state if fusion.match(k)]:
        level, leaf = fusion.match(key).groups()
        part, _, rest = leaf.partition(".")
        index = cfw.levels.index(int(level))
        if part == "encode_enc_2":
            ours[f"fusions.{index}.body.{rest}"] = state[key]
        elif part in ("encode_enc_1", "encode_enc_3") and rest.rpartition(".")[0] in _FUSE_RESBLOCK:
            module, _, tensor = rest.rpartition(".")
            ours[
                f"fusions.{index}.{'merge' if part == 'encode_enc_1' else 'out'}.{_FUSE_RESBLOCK[module]}.{tensor}"
            ] = state[key]
        else:
            continue
        ledger.take(key)
    require_shapes(f"{path} as CFWModule", ours, cfw.state_dict())
    cfw.load_state_dict(ours, strict=True)
    ledger.ignore(ledger.pending("loss."), "training-only losses (LPIPS, discriminator)")
    frozen = ledger.pending()  # what is left is SD's frozen VAE
    require_same_tensors(f"{path}: frozen VAE", {k: state[k] for k in frozen}, vae.state_dict())
    ledger.take(*frozen)
    return cfw.eval(), ledger.close()


def import_stablesr(
    ckpt: Path,
    cfw_ckpt: Path,
    sd_dir: Path,
    out_dir: Path,
    *,
    encoder_config: dict | None = None,
    steps: int = 200,
    w: float = 0.5,
) -> tuple[Path, dict]:
    """Write the ``stablesr_official`` restorer folder (SD's frozen parts from ``sd_dir``)."""
    unet = load_model_folder(UNet2DConditionModel, Path(sd_dir) / "unet").requires_grad_(False)
    vae = load_model_folder(AutoencoderKL, Path(sd_dir) / "vae").requires_grad_(False)
    scheduler = sd_scheduler(sd_dir)
    conditioner, diffusion_report = convert_diffusion(
        Path(ckpt), unet, vae, scheduler, dict(encoder_config or STABLESR_ENCODER_PAPER)
    )
    cfw, cfw_report = convert_cfw(Path(cfw_ckpt), vae)
    restorer = StableSRRestorer(
        vae,
        unet,
        conditioner,
        cfw,
        scheduler=scheduler,
        prompt=NullPrompt(sd_prompt_embedding(sd_dir)),
        steps=steps,
        w=w,
        method=METHOD,
    )
    restorer.save_pretrained_dir(out_dir)
    return Path(out_dir), {"format": "stablesr", "sources": [diffusion_report, cfw_report]}
