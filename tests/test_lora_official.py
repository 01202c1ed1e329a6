"""The official LoRA grouping (three adapters) on SD-style UNets and CE-UNet, and which adapters act."""

from __future__ import annotations

import pytest
import torch

from tvt import compat

compat.apply()

from diffusers import UNet2DConditionModel
from peft.tuners.lora import LoraLayer

from tvt.models.ce_unet import CEUNet
from tvt.models.lora import (
    LORA_GROUPS,
    OSEDIFF_UNET_TRAINABLE,
    TVT_UNET_TRAINABLE,
    active_lora_pattern,
    add_official_unet_lora,
    official_lora_groups,
    official_unet_name,
    set_trainable,
)
from tvt.models.sd_configs import MINI_UNET, SD21_BASE_UNET


def mini_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**MINI_UNET)


def lora_modules(model) -> dict[str, list[str]]:
    """module name -> the adapters it holds."""
    return {name: sorted(module.lora_A) for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def test_groups_follow_the_official_rule_on_sd_unet():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_BASE_UNET)
    groups = official_lora_groups(unet)
    # counts of SD 2.1-base's targeted layers (measured): every conv, attention projection, MLP
    assert {group: len(names) for group, names in groups.items()} == {"encoder": 94, "decoder": 147, "others": 17}
    assert "conv_in" in groups["encoder"] and "conv_out" in groups["others"]
    assert all(n.startswith("down_blocks.") for n in groups["encoder"] if n != "conv_in")
    assert all(n.startswith("up_blocks.") for n in groups["decoder"])
    assert all(n.startswith("mid_block.") for n in groups["others"] if n != "conv_out")
    targeted = {n for names in groups.values() for n in names}
    assert not any("norm" in n for n in targeted)  # conv_norm_out, GroupNorms, LayerNorms: no LoRA
    assert not any(n.startswith("time_embedding") or "time_emb_proj" in n for n in targeted)
    assert "down_blocks.0.downsamplers.0.conv" in groups["encoder"]
    assert "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj" in groups["others"]


def test_osediff_groups_conv_out_with_the_decoder():
    """The one difference between the two official code bases (osediff.py initialize_unet)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**MINI_UNET)
    tvt, osediff = official_lora_groups(unet, "tvt"), official_lora_groups(unet, "osediff")
    assert "conv_out" in tvt["others"] and "conv_out" in osediff["decoder"]
    assert osediff["others"] == [n for n in tvt["others"] if n != "conv_out"]
    assert osediff["encoder"] == tvt["encoder"]
    with pytest.raises(ValueError, match="unknown LoRA grouping"):
        official_lora_groups(unet, "stablesr")


def test_ce_unet_names_map_to_the_official_five_level_unet():
    with torch.device("meta"):
        ce = CEUNet(unet_config=MINI_UNET)
    n_up = len(ce.unet.up_blocks)
    assert official_unet_name(ce, "down_block.resnets.0.conv1.weight") == "down_blocks.0.resnets.0.conv1.weight"
    assert official_unet_name(ce, "unet.down_blocks.0.resnets.0.conv1.weight") == "down_blocks.1.resnets.0.conv1.weight"
    assert official_unet_name(ce, "upsample.conv.weight") == f"up_blocks.{n_up - 1}.upsamplers.0.conv.weight"
    assert official_unet_name(ce, "up_block.resnets.1.conv2.bias") == f"up_blocks.{n_up}.resnets.1.conv2.bias"
    assert official_unet_name(ce, "unet.mid_block.resnets.0.conv1.weight") == "mid_block.resnets.0.conv1.weight"
    assert official_unet_name(ce, "conv_out.weight") == "conv_out.weight"
    groups = official_lora_groups(ce)
    assert "down_block.resnets.0.conv1" in groups["encoder"]  # the replicas get LoRA too, as officially
    assert "upsample.conv" in groups["decoder"] and "up_block.resnets.0.conv1" in groups["decoder"]
    assert "conv_in" in groups["encoder"] and "conv_out" in groups["others"]
    # a 1:1 map: distinct official names, one per targeted module
    official = [official_unet_name(ce, n) for names in groups.values() for n in names]
    assert len(set(official)) == len(official)


def test_adapters_are_named_and_placed_as_in_the_official_state():
    unet = mini_unet()
    groups = add_official_unet_lora(unet, rank=2)
    held = lora_modules(unet)
    for group, names in groups.items():
        for name in names:
            assert held[name] == [f"default_{group}"], name
    assert set(held) == {n for names in groups.values() for n in names}
    keys = [k for k in unet.state_dict() if ".lora_" in k]
    assert "conv_in.lora_A.default_encoder.weight" in keys and "conv_out.lora_B.default_others.weight" in keys
    assert all(p.requires_grad is False for p in unet.parameters())  # what trains is set_trainable's job


def test_only_the_active_adapters_act():
    """The fake score's official scope: default_others is active, the other two are inert."""
    unet = mini_unet().eval()
    add_official_unet_lora(unet, rank=2, active=["others"])
    x = torch.randn(1, 4, 16, 16)
    text = torch.randn(1, 77, MINI_UNET["cross_attention_dim"])

    def output():
        with torch.no_grad():
            return unet(x, 10, text).sample

    reference = output()
    for name, parameter in unet.named_parameters():
        if ".lora_B.default_encoder" in name or ".lora_B.default_decoder" in name:
            parameter.data.normal_()
    assert torch.equal(output(), reference)  # inactive adapters: no effect
    for name, parameter in unet.named_parameters():
        if ".lora_B.default_others" in name:
            parameter.data.normal_()
    assert not torch.allclose(output(), reference, atol=1e-4)
    trainable = set_trainable(unet, [active_lora_pattern(unet)])
    assert trainable and all(".default_others." in n for n in trainable)


@pytest.mark.slow
def test_trainable_sets_of_tvt_and_osediff():
    with torch.device("meta"):
        ce = CEUNet(unet_config=MINI_UNET)
        plain = UNet2DConditionModel(**MINI_UNET)
    add_official_unet_lora(ce, rank=2)
    tvt = set(set_trainable(ce, TVT_UNET_TRAINABLE))
    assert not any(n.startswith("conv_norm_out") for n in tvt)  # official TVT keeps it frozen
    assert {"conv_out.base_layer.weight", "conv_in.base_layer.weight", "upsample.conv.base_layer.weight"} <= tvt
    assert not any(n.startswith("unet.") and ".lora_" not in n for n in tvt)  # inner SD weights: LoRA only
    assert any(n.startswith("unet.mid_block.") and ".default_others." in n for n in tvt)
    add_official_unet_lora(plain, rank=2)
    osediff = set(set_trainable(plain, OSEDIFF_UNET_TRAINABLE))
    assert {n for n in osediff if ".lora_" not in n} == {"conv_in.base_layer.weight", "conv_in.base_layer.bias"}
    assert {n.split(".")[-2] for n in osediff if ".lora_" in n} == {f"default_{g}" for g in LORA_GROUPS}


def test_misuse_names_the_problem():
    unet = mini_unet()
    with pytest.raises(ValueError, match="subset of"):
        add_official_unet_lora(unet, active=["middle"])
    add_official_unet_lora(unet)
    with pytest.raises(ValueError, match="without LoRA adapters"):
        official_lora_groups(unet)
