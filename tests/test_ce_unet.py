"""CE-UNet (replicas at 2x around SD's UNet at 1x) and the LoRA / trainable-parameter selection."""

from __future__ import annotations

from tvt import compat

compat.apply()

import pytest
import torch
from diffusers import UNet2DConditionModel

from tvt.models.ce_unet import CEUNet
from tvt.models.lora import (
    OSEDIFF_UNET_TRAINABLE,
    UNET_LORA_TARGETS,
    add_unet_lora,
    set_trainable,
    trainable_parameter_names,
)
from tvt.models.sd_configs import MINI_UNET, SD21_BASE_UNET

PROMPT_DIM = MINI_UNET["cross_attention_dim"]


def _mini_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**MINI_UNET).eval()


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return _mini_unet()


@pytest.fixture(scope="module")
def ce(unet) -> CEUNet:
    return CEUNet.from_unet(unet).eval()


def _inputs(height: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, 4, height, width, generator=generator)
    prompt = torch.randn(1, 7, PROMPT_DIM, generator=generator)
    return latent, prompt


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict()


def test_replicas_equal_the_originals_at_init(unet, ce):
    original = _state(unet)
    for end in ("conv_in", "conv_norm_out", "conv_out"):
        for key, value in _state(getattr(ce, end)).items():
            assert torch.equal(value, original[f"{end}.{key}"]), f"{end}.{key}"
    for key, value in _state(ce.down_block).items():
        assert torch.equal(value, original[f"down_blocks.0.{key}"]), key
    last = f"up_blocks.{len(unet.up_blocks) - 1}."
    for key, value in _state(ce.up_block).items():
        # the first ResNet takes [upsampled C0 | skip C0], the layout of the original's second ResNet
        source = key.replace("resnets.0.", "resnets.1.") if key.startswith("resnets.0.") else key
        assert torch.equal(value, original[last + source]), key
    inner = _state(ce.unet)
    assert set(inner) == {k for k in original if not k.startswith(("conv_in.", "conv_norm_out.", "conv_out."))}
    assert all(torch.equal(value, original[key]) for key, value in inner.items())


def test_inner_unet_shares_weights_and_replicas_are_copies(unet, ce):
    shared = ce.unet.down_blocks[0].resnets[0].conv1.weight
    assert shared.data_ptr() == unet.down_blocks[0].resnets[0].conv1.weight.data_ptr()
    assert ce.down_block.resnets[0].conv1.weight.data_ptr() != shared.data_ptr()
    assert ce.conv_in.weight.data_ptr() != unet.conv_in.weight.data_ptr()
    assert ce.unet.conv_in is None and ce.unet.conv_out is None  # moved to the 2x ends, not duplicated


def test_upsample_starts_as_nearest_neighbour_identity(ce):
    x = torch.randn(1, MINI_UNET["block_out_channels"][0], 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(ce.upsample(x), x.repeat_interleave(2, -2).repeat_interleave(2, -1))


def test_inner_unet_runs_at_half_resolution_between_the_replicas(ce):
    seen = {}

    def record(name, tensor_of):
        def hook(module, args, kwargs, output):
            seen[name] = tuple(tensor_of(kwargs, output).shape)  # returns None: the output is kept

        return hook

    modules = {
        "stem": (ce.down_block, lambda kwargs, out: kwargs["hidden_states"]),
        "inner": (ce.unet.down_blocks[0], lambda kwargs, out: kwargs["hidden_states"]),
        "head": (ce.up_block, lambda kwargs, out: out),
    }
    hooks = [m.register_forward_hook(record(name, get), with_kwargs=True) for name, (m, get) in modules.items()]
    latent, prompt = _inputs(32, 48)
    try:
        with torch.no_grad():
            ce(latent, 10, prompt)
    finally:
        for hook in hooks:
            hook.remove()
    channels = MINI_UNET["block_out_channels"][0]
    assert seen == {
        "stem": (1, channels, 32, 48),
        "inner": (1, channels, 16, 24),
        "head": (1, channels, 32, 48),
    }


@pytest.mark.parametrize("size", [(32, 32), (36, 52), (2, 6)])
def test_output_has_the_input_shape_for_even_sides(ce, size):
    """36×52 → inner 18×26, padded to 24×32 for the mini UNet's 3 downsamplers, then cropped back."""
    latent, prompt = _inputs(*size)
    with torch.no_grad():
        out = ce(latent, 10, prompt)
    assert out.sample.shape == latent.shape and torch.isfinite(out.sample).all()


def test_odd_sides_are_refused(ce):
    latent, prompt = _inputs(33, 32)
    with pytest.raises(ValueError, match=r"even latent sides.*33x32"):
        ce(latent, 10, prompt)


def test_output_depends_on_latent_prompt_and_timestep(ce):
    latent, prompt = _inputs(16, 16)
    other_latent, other_prompt = _inputs(16, 16, seed=1)
    with torch.no_grad():
        reference = ce(latent, 10, prompt).sample
        assert torch.equal(reference, ce(latent, torch.tensor([10]), prompt, return_dict=False)[0])
        assert not torch.allclose(reference, ce(other_latent, 10, prompt).sample)
        assert not torch.allclose(reference, ce(latent, 10, other_prompt).sample)
        assert not torch.allclose(reference, ce(latent, 900, prompt).sample)


def test_save_pretrained_round_trip_in_safetensors(ce, tmp_path):
    ce.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = CEUNet.from_pretrained(tmp_path).eval()
    assert loaded.config.unet_config["cross_attention_dim"] == PROMPT_DIM
    latent, prompt = _inputs(20, 28)
    with torch.no_grad():
        assert torch.equal(loaded(latent, 10, prompt).sample, ce(latent, 10, prompt).sample)


def test_from_unet_refuses_a_unet_that_already_has_lora():
    unet = add_unet_lora(_mini_unet(), rank=2)
    with pytest.raises(ValueError, match="without LoRA"):
        CEUNet.from_unet(unet)


def test_tvt_trains_exactly_the_replicas_and_the_inner_lora():
    ce = CEUNet.from_unet(_mini_unet())
    add_unet_lora(ce.unet, rank=2)
    trainable = set_trainable(ce, CEUNet.TRAINABLE_PATTERNS)
    names = [name for name, _ in ce.named_parameters()]
    expected = [n for n in names if n.split(".")[0] in CEUNet.REPLICA_MODULES or ".lora_" in n]
    assert trainable == expected == ce.trainable_parameter_names() == trainable_parameter_names(ce)
    assert not any(".lora_" in n for n in trainable if not n.startswith("unet."))  # no LoRA on the replicas
    targets = tuple(f".{t}" for t in UNET_LORA_TARGETS)
    expected_adapted = {
        f"unet.{n}"
        for n, m in _mini_unet().named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n.endswith(targets) and not n.startswith("conv_")
    }
    assert {n.split(".lora_")[0] for n in trainable if ".lora_" in n} == expected_adapted


def test_gradients_reach_replicas_and_lora_but_not_frozen_weights():
    ce = CEUNet.from_unet(_mini_unet())
    add_unet_lora(ce.unet, rank=2)
    set_trainable(ce, CEUNet.TRAINABLE_PATTERNS)
    latent, prompt = _inputs(16, 16)
    ce(latent, 10, prompt).sample.square().mean().backward()
    for name, parameter in ce.named_parameters():
        if not parameter.requires_grad:
            assert parameter.grad is None, name
        elif ".lora_A." in name:  # lora_B starts at zero, so lora_A's first gradient is zero
            assert parameter.grad is not None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_osediff_trains_unet_lora_and_conv_in():
    unet = add_unet_lora(_mini_unet(), rank=2)
    trainable = set_trainable(unet, OSEDIFF_UNET_TRAINABLE)
    assert {n for n in trainable if ".lora_" not in n} == {"conv_in.weight", "conv_in.bias"}
    assert len(trainable) > 2


def test_set_trainable_names_a_pattern_that_matches_nothing():
    with pytest.raises(ValueError, match=r"conv_inn"):
        set_trainable(_mini_unet(), [r"^conv_inn\."])


def test_sd21_unet_lora_has_4_05_million_parameters_on_meta():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_BASE_UNET)
    add_unet_lora(unet)  # rank 4
    count = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert count == 4_042_752  # docs/method.md §2: "4.05 M"
    assert abs(count / 1e6 - 4.05) < 0.01


def test_gradient_checkpointing_reaches_replicas_and_inner_blocks():
    """Checkpointed blocks recompute the same graph (covered for VAE-D4); here: every CE-UNet block opts in."""
    ce = CEUNet.from_unet(_mini_unet())
    ce.enable_gradient_checkpointing()
    blocks = [ce.down_block, ce.up_block, *ce.unet.down_blocks, ce.unet.mid_block, *ce.unet.up_blocks]
    assert all(block.gradient_checkpointing for block in blocks)
    ce.disable_gradient_checkpointing()
    assert not any(block.gradient_checkpointing for block in blocks)
