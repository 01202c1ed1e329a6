"""StableSR's CFW module: placement and shapes, the w = 0 identity, scoped hooks, exact tiling."""

from __future__ import annotations

import pytest
import torch

from tvt import compat

compat.apply()

from diffusers import AutoencoderKL
from training_support import one_thread  # noqa: F401

from tvt.models.cfw import CFWAutoencoder, CFWModule
from tvt.models.sd_configs import MINI_VAE_D8, SD21_BASE_VAE


def perturbed(module: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> torch.nn.Module:
    """Weights moved off their initialisation, standing in for a trained CFW."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return module


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    vae = AutoencoderKL(**MINI_VAE_D8).eval().requires_grad_(False)
    cfw = perturbed(CFWModule.for_vae(vae)).eval()
    return CFWAutoencoder(vae, cfw)


def inputs(latent_size: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, latent_size, latent_size, generator=generator)
    image = torch.rand(batch, 3, 8 * latent_size, 8 * latent_size, generator=generator) * 2 - 1
    return latents, image


def stablesr_fusion_params(c: int, g: int = 32, rrdbs: int = 2) -> int:
    """Parameters of StableSR's Fuse_sft_block_RRDB(c), counted by hand from its definition."""

    def resblock(i: int, o: int) -> int:  # norm1, conv1, norm2, conv2, 1x1 shortcut when widths differ
        return 2 * i + (9 * i * o + o) + 2 * o + (9 * o * o + o) + (i * o + o if i != o else 0)

    rdb = sum(9 * (c + k * g) * g + g for k in range(4)) + 9 * (c + 4 * g) * c + c
    return resblock(2 * c, c) + rrdbs * 3 * rdb + resblock(c, c)


def test_placement_and_shapes_mini(mini):
    # SD 2.1's (256, 512) at the mini VAE's 1/8 widths
    assert mini.cfw.levels == (1, 2) and tuple(mini.cfw.config.channels) == (32, 64)
    latents, image = inputs(4)
    features = mini.encoder_features(image)
    assert [tuple(f.shape) for f in features] == [(2, 32, 16, 16), (2, 64, 8, 8)]  # ½ and ¼ of 32²
    with torch.no_grad():
        assert mini(latents, image, 1.0).shape == (2, 3, 32, 32)


def test_placement_and_parameters_sd21_on_meta():
    with torch.device("meta"):
        vae = AutoencoderKL(**SD21_BASE_VAE)
        autoencoder = CFWAutoencoder(vae, CFWModule.for_vae(vae))
        features = autoencoder.encoder_features(torch.empty(1, 3, 64, 64))
        out = autoencoder.decode(torch.empty(1, 4, 8, 8), features, 1.0)
    assert autoencoder.cfw.levels == (1, 2) and tuple(autoencoder.cfw.config.channels) == (256, 512)
    assert [tuple(f.shape) for f in features] == [(1, 256, 32, 32), (1, 512, 16, 16)]
    assert out.shape == (1, 3, 64, 64)
    counts = [sum(p.numel() for p in fusion.parameters()) for fusion in autoencoder.cfw.fusions]
    assert counts == [stablesr_fusion_params(256), stablesr_fusion_params(512)]
    assert sum(counts) == 44_393_728


def test_w0_is_exactly_the_plain_decoder(mini):
    latents, image = inputs(4)
    with torch.no_grad():
        plain = mini.vae.decode(latents).sample
        assert torch.equal(mini(latents, image, 0.0), plain)
        assert torch.equal(mini.decode(latents, mini.encoder_features(image), 0), plain)
        assert torch.equal(mini.decode(latents, None, 0.0), plain)


def test_w_and_lr_steer_the_output_only_inside_the_call(mini):
    latents, image = inputs(4)
    _, other_image = inputs(4, seed=7)
    with torch.no_grad():
        plain = mini.vae.decode(latents).sample
        half, full = mini(latents, image, 0.5), mini(latents, image, 1.0)
        assert (half - plain).abs().mean() > 1e-3 and (full - half).abs().mean() > 1e-3
        assert (mini(latents, other_image, 1.0) - full).abs().mean() > 1e-3  # the LR image matters at w > 0
        assert torch.equal(mini(latents, other_image, 0.0), plain)  # ... and not at all at w = 0
        assert torch.equal(mini.vae.decode(latents).sample, plain)  # hooks are gone after a call
        with pytest.raises(ValueError, match="upsampled to 8x the latent size"):
            mini.decode(latents, mini.encoder_features(image[..., :16, :16]), 1.0)
        assert torch.equal(mini.vae.decode(latents).sample, plain)  # ... also after a failing one
    taps = [*mini._encoder_taps, *mini._decoder_taps]
    assert not any(tap._forward_hooks for tap in taps)
    with pytest.raises(ValueError, match=r"w must lie in \[0, 1\]"):
        mini(latents, image, 1.5)
    with pytest.raises(ValueError, match="upsample it first"):
        mini(latents, image[..., :16, :16], 1.0)


def test_cfw_gradients_reach_every_fusion(mini):
    latents, image = inputs(4)
    cfw = CFWModule.for_vae(mini.vae)
    autoencoder = CFWAutoencoder(mini.vae, cfw)
    with torch.no_grad():
        features = autoencoder.encoder_features(image)
    autoencoder.decode(latents, features, 1.0).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cfw.parameters())
    assert cfw.last_layer is cfw.fusions[0].out.conv2.weight  # level 1: the finest fused level
    assert not any(p.grad is not None for p in mini.vae.parameters())


def test_save_pretrained_round_trip(mini, tmp_path):
    mini.cfw.save_pretrained(tmp_path / "cfw")
    loaded = CFWModule.from_pretrained(tmp_path / "cfw").eval()
    settings = ("levels", "channels", "num_rrdb_blocks", "growth_channels", "norm_num_groups")
    assert all(
        list(loaded.config[k]) == list(mini.cfw.config[k])
        if isinstance(mini.cfw.config[k], tuple)
        else loaded.config[k] == mini.cfw.config[k]
        for k in settings
    )
    reference = mini.cfw.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in loaded.state_dict().items())
    latents, image = inputs(4)
    with torch.no_grad():
        assert torch.equal(CFWAutoencoder(mini.vae, loaded)(latents, image, 1.0), mini(latents, image, 1.0))


def test_mismatched_vae_is_refused(mini):
    with pytest.raises(ValueError, match="do not match the VAE"):
        CFWAutoencoder(mini.vae, CFWModule(levels=(1, 2), channels=(128, 64), norm_num_groups=8))
    shallow = AutoencoderKL(
        **{
            **MINI_VAE_D8,
            "block_out_channels": (32, 64),
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
        }
    )
    with pytest.raises(ValueError, match="has none"):
        CFWModule.for_vae(shallow)


@pytest.fixture(scope="module")
def three_level():
    """A factor-4 VAE with one fused level (½ size) and a one-RRDB CFW, small enough that an image
    of several tiles each way stays wider than the CFW decoder's halo (21 latent px), so every
    tile really lacks context. The CFW weights are moved off their initialisation (scale 0.2)
    so that w matters (at scale 1 it would not: C dwarfs F_d, and the next GroupNorm normalises
    F_d + w · C to C's shape for any w). With the RRDB's radius left out of the halo the error
    below is 0.24, not 5e-6 (measured)."""
    torch.manual_seed(0)
    vae = (
        AutoencoderKL(
            **{
                **MINI_VAE_D8,
                "block_out_channels": (16, 32, 32),
                "down_block_types": ("DownEncoderBlock2D",) * 3,
                "up_block_types": ("UpDecoderBlock2D",) * 3,
            }
        )
        .eval()
        .requires_grad_(False)
    )
    cfw = perturbed(CFWModule.for_vae(vae, num_rrdb_blocks=1, growth_channels=8), scale=0.2).eval()
    return CFWAutoencoder(vae, cfw)


@pytest.mark.parametrize(("w", "resident_bytes"), [(0.0, 1 << 30), (0.5, 1 << 30), (1.0, 1 << 30), (1.0, 0)])
def test_exact_tiled_decode_equals_untiled(three_level, w, resident_bytes):
    """30 x 38 latents on tiles of 8: 4 x 5 tiles, uneven. resident_bytes=0 puts every tile state
    and the encoder features on disk; 1 GiB keeps them in RAM."""
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 30, 38, generator=generator)
    image = torch.rand(1, 3, 120, 152, generator=generator) * 2 - 1
    encoder_calls = []
    hook = three_level.vae.encoder.conv_in.register_forward_hook(lambda *_: encoder_calls.append(1))
    try:
        tiled = three_level.tiled_decode(latents, image, w, 8, resident_bytes=resident_bytes)
    finally:
        hook.remove()
    with torch.no_grad():
        whole = three_level(latents, image, w)
    # measured: max abs difference 4.2e-6 (w = 0), 4.8e-6 (0.5), 5.4e-6 (1); outputs within ±2.2
    error = (tiled - whole).abs().max()
    assert error <= 1.5e-5, error
    assert bool(encoder_calls) == (w > 0)  # w = 0 skips the encoder


def test_exact_tiled_decode_fuses_the_lr_features(three_level):
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 4, 12, 20, generator=generator)  # a batch: every item its own statistics
    image, other = (torch.rand(2, 3, 48, 80, generator=generator) * 2 - 1 for _ in range(2))
    plain, half, full = (three_level.tiled_decode(latents, image, w, 6) for w in (0.0, 0.5, 1.0))
    assert (half - plain).abs().mean() > 1e-2 and (full - half).abs().mean() > 1e-2
    assert (three_level.tiled_decode(latents, other, 1.0, 6) - full).abs().mean() > 1e-2
    with torch.no_grad():
        torch.testing.assert_close(full[1:], three_level(latents[1:], image[1:], 1.0), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="upsample it first"):
        three_level.tiled_decode(latents, image[..., :40], 1.0, 6)
    with pytest.raises(ValueError, match=r"w must lie in \[0, 1\]"):
        three_level.tiled_decode(latents, image, -0.5, 6)
