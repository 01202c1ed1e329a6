"""VAE-D4: architecture of the paper and ablation configs, AutoencoderKL contract, persistence, LoRA."""

from __future__ import annotations

from tvt import compat

compat.apply()

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention

from tvt.models.lora import add_vae_encoder_lora, trainable_parameter_names
from tvt.models.sd_configs import MINI_VAE_D4, MINI_VAE_D8, VAE_D4_PAPER, VAE_D4_V1, VAE_D4_V2
from tvt.models.vae_d4 import VAED4


def _meta(config: dict) -> VAED4:
    with torch.device("meta"):
        return VAED4(**config)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def mini() -> VAED4:
    torch.manual_seed(0)
    return VAED4(**MINI_VAE_D4).eval()


def test_paper_config_is_the_compact_4x_vae_of_the_paper():
    vae = _meta(VAE_D4_PAPER)
    assert vae.downsample_factor == 4
    assert vae.encoder.mid_block is None and vae.decoder.mid_block is None
    assert not any(isinstance(m, Attention) for m in vae.modules())
    assert [len(b.resnets) for b in vae.encoder.down_blocks] == [2, 2, 2]
    assert [b.resnets[-1].conv2.out_channels for b in vae.encoder.down_blocks] == [128, 256, 256]
    assert [b.downsamplers is not None for b in vae.encoder.down_blocks] == [True, True, False]
    assert [len(b.resnets) for b in vae.decoder.up_blocks] == [3, 3, 3]
    assert [b.resnets[-1].conv2.out_channels for b in vae.decoder.up_blocks] == [256, 256, 128]
    assert [b.upsamplers is not None for b in vae.decoder.up_blocks] == [True, True, False]
    assert (vae.encoder.conv_in.in_channels, vae.encoder.conv_out.out_channels) == (3, 8)
    assert (vae.decoder.conv_in.in_channels, vae.decoder.conv_out.out_channels) == (4, 3)
    assert tuple(vae.quant_conv.weight.shape) == (8, 8, 1, 1)
    assert tuple(vae.post_quant_conv.weight.shape) == (4, 4, 1, 1)
    assert vae.config.scaling_factor == 0.18215
    assert _count(vae) == 15_162_343  # regression guard: 5.81 M encoder + 9.35 M decoder


def test_ablation_variants_differ_by_width_and_mid_blocks():
    paper, v1, v2 = _meta(VAE_D4_PAPER), _meta(VAE_D4_V1), _meta(VAE_D4_V2)
    assert v1.downsample_factor == v2.downsample_factor == 4
    # V2 only widens the last stage; V1 adds SD's mid-blocks (with attention) on top of V2.
    assert _count(paper) < _count(v2) < _count(v1)
    assert _count(v1) - _count(v2) == _count(v1.encoder.mid_block) + _count(v1.decoder.mid_block)
    assert sum(isinstance(m, Attention) for m in v1.modules()) == 2
    assert not any(isinstance(m, Attention) for m in v2.modules())
    assert v2.encoder.conv_out.in_channels == 512 and v2.decoder.conv_in.out_channels == 512


def test_state_dict_layout_is_autoencoderkl_without_mid_blocks():
    """Same keys and shapes as AutoencoderKL minus its mid-blocks: official TVT checkpoints load as they are."""
    vae = _meta(MINI_VAE_D4)
    with torch.device("meta"):
        reference = AutoencoderKL(
            block_out_channels=MINI_VAE_D4["encoder_channels"],
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=MINI_VAE_D4["encoder_layers_per_block"],  # its decoder uses one more
            norm_num_groups=MINI_VAE_D4["norm_num_groups"],
        )
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if ".mid_block." not in k}
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == expected


@pytest.mark.parametrize("size", [(36, 52), (4, 8), (16, 28)])
def test_any_multiple_of_4_round_trips_in_shape(mini, size):
    x = torch.rand(1, 3, *size) * 2 - 1
    with torch.no_grad():
        posterior = mini.encode(x).latent_dist
        assert posterior.mean.shape == (1, 4, size[0] // 4, size[1] // 4)
        assert mini.decode(posterior.mode()).sample.shape == x.shape
        assert mini(x).sample.shape == x.shape


def test_sizes_that_are_not_multiples_of_4_are_refused(mini):
    with pytest.raises(ValueError, match=r"multiples of 4.*34x52"):
        mini.encode(torch.zeros(1, 3, 34, 52))


def test_encode_is_a_deterministic_distribution_whose_samples_vary(mini):
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        first, second = mini.encode(x).latent_dist, mini.encode(x).latent_dist
        assert torch.equal(first.mean, second.mean) and torch.equal(first.mode(), first.mean)
        assert (first.std > 0).all()
        draw = first.sample(generator=torch.Generator().manual_seed(1))
        again = first.sample(generator=torch.Generator().manual_seed(1))
        assert torch.equal(draw, again) and not torch.allclose(draw, first.mean)
        assert torch.equal(mini(x).sample, mini.decode(first.mean).sample)
        assert isinstance(mini.encode(x, return_dict=False)[0].mean, torch.Tensor)
        # the decoder responds to its latent
        assert not torch.allclose(mini.decode(first.mean).sample, mini.decode(first.mean + 0.5).sample)


def test_save_pretrained_round_trip_in_safetensors(mini, tmp_path):
    mini.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = VAED4.from_pretrained(tmp_path).eval()
    assert loaded.config.encoder_channels == list(MINI_VAE_D4["encoder_channels"])
    x = torch.rand(1, 3, 20, 28) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, mini(x).sample)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = VAED4(**MINI_VAE_D4)
    checkpointed = VAED4(**MINI_VAE_D4)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.encoder.gradient_checkpointing and checkpointed.decoder.gradient_checkpointing
    x = torch.rand(1, 3, 8, 8)
    for model in (plain, checkpointed):
        model(x).sample.square().mean().backward()
    grad = dict(plain.named_parameters())
    for name, parameter in checkpointed.named_parameters():
        torch.testing.assert_close(parameter.grad, grad[name].grad, msg=name)


@pytest.mark.parametrize("family", ["vae_d4", "vae_d8"])
def test_encoder_lora_touches_only_the_encoder_side(family):
    torch.manual_seed(0)
    vae = VAED4(**MINI_VAE_D4) if family == "vae_d4" else AutoencoderKL(**MINI_VAE_D8)
    add_vae_encoder_lora(vae, rank=2)
    names = trainable_parameter_names(vae)
    assert names and all(".lora_" in n for n in names)
    assert all(n.startswith(("encoder.", "quant_conv.")) for n in names)
    adapted = {n.split(".lora_")[0] for n in names}
    assert {"encoder.conv_in", "encoder.conv_out", "quant_conv"} <= adapted
    assert any(a.endswith("downsamplers.0.conv") for a in adapted)
    assert all(a.startswith("encoder.") or a == "quant_conv" for a in adapted)
    if family == "vae_d8":  # SD's encoder mid-block attention is adapted too
        assert "encoder.mid_block.attentions.0.to_q" in adapted
    # 32² input: VAE-D8's mid-block attends over 4×4 = 16 latent tokens. (At 8² it sees one
    # token, and softmax over a single token has an exactly zero gradient w.r.t. q and k.)
    # The loss weights every output value differently so that no gradient cancels by symmetry.
    latent = vae.encode(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))).latent_dist.mean
    (latent * torch.linspace(-1, 2, latent.numel()).view_as(latent)).sum().backward()
    for name, parameter in vae.named_parameters():
        if ".lora_B." in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        elif ".lora_" not in name:
            assert parameter.grad is None, name
