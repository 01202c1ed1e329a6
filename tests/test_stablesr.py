"""StableSR's diffusion side: time-aware encoder, SFT hooks on a frozen SD UNet, respaced DDPM and aggregation sampling."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from tvt import compat

compat.apply()

from diffusers import UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from training_support import one_thread  # noqa: F401

from tvt.models.restorer import sd_noise_scheduler
from tvt.models.sd_configs import MINI_UNET, STABLESR_CONDITIONER_MINI, STABLESR_ENCODER_MINI
from tvt.models.stablesr import SFTConditionedUNet, StableSRConditioner, TimeAwareEncoder
from tvt.models.stablesr_sampler import respaced_scheduler, sample_latents

PROMPT = torch.zeros(1, 77, MINI_UNET["cross_attention_dim"])


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**MINI_UNET).eval().requires_grad_(False)


def perturbed(conditioner: StableSRConditioner, seed: int = 1) -> StableSRConditioner:
    """The conditioner with non-zero α/β convolutions, as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in conditioner.sft.values():
            for conv in (head.scale, head.shift):
                conv.weight.copy_(0.05 * torch.randn(conv.weight.shape, generator=generator))
                conv.bias.copy_(0.05 * torch.randn(conv.bias.shape, generator=generator))
    return conditioner


@pytest.fixture(scope="module")
def model(unet):
    """A conditioned mini UNet whose SFT layers are not the identity."""
    torch.manual_seed(1)
    return SFTConditionedUNet(unet, perturbed(StableSRConditioner.for_unet(unet, **STABLESR_CONDITIONER_MINI))).eval()


def latents(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def conv2_hooks(unet: nn.Module) -> int:
    return sum(len(m.conv2._forward_hooks) for m in unet.modules() if hasattr(m, "conv2"))


# ---- time-aware encoder and SFT ----


def test_encoder_gives_one_time_dependent_feature_per_unet_level():
    torch.manual_seed(0)
    encoder = TimeAwareEncoder(**STABLESR_ENCODER_MINI).eval()
    z_lr = latents(2, 4, 12, 20, seed=0)
    with torch.no_grad():
        features = encoder(z_lr, torch.tensor([10, 10]))
        other_time = encoder(z_lr, torch.tensor([900, 900]))
    channels = STABLESR_ENCODER_MINI["out_channels"]
    # SD's UNet sizes for a 12x20 latent: stride-2 convs with padding 1 round up
    assert [tuple(f.shape) for f in features] == [(2, channels, 12, 20), (2, channels, 6, 10),
                                                  (2, channels, 3, 5), (2, channels, 2, 3)]
    assert all(not torch.allclose(f, g, atol=1e-4) for f, g in zip(features, other_time))


def test_for_unet_puts_an_sft_head_on_every_resnet_with_the_feature_of_its_resolution(unet):
    conditioner = StableSRConditioner.for_unet(unet, **STABLESR_CONDITIONER_MINI)
    config = conditioner.config
    # MINI_UNET as SD: 4 down blocks x 2 ResNets, a mid-block with 2, 4 up blocks x 3
    assert len(config.sft_targets) == 4 * 2 + 2 + 4 * 3 == len(conditioner.sft)
    levels = dict(zip(config.sft_targets, config.sft_levels))
    assert levels["down_blocks.0.resnets.0"] == 0 and levels["down_blocks.3.resnets.1"] == 3
    assert levels["mid_block.resnets.1"] == 3
    assert levels["up_blocks.0.resnets.2"] == 3 and levels["up_blocks.3.resnets.0"] == 0
    for target, channels in zip(config.sft_targets, config.sft_channels):
        assert unet.get_submodule(target).out_channels == channels
    three_levels = {**STABLESR_ENCODER_MINI, "block_out_channels": (16, 16, 32),
                    "down_block_types": ("AttnDownBlock2D",) * 2 + ("DownBlock2D",)}
    with pytest.raises(ValueError, match="levels"):
        StableSRConditioner.for_unet(unet, three_levels)


def test_at_initialisation_the_conditioned_unet_is_exactly_sd_unet(unet):
    torch.manual_seed(2)
    model = SFTConditionedUNet(unet, StableSRConditioner.for_unet(unet, **STABLESR_CONDITIONER_MINI)).eval()
    z_t, z_lr = latents(2, 4, 16, 16, seed=3), latents(2, 4, 16, 16, seed=4)
    t = torch.tensor([20, 700])
    with torch.no_grad():
        assert torch.equal(model(z_t, t, PROMPT.expand(2, -1, -1), z_lr),
                           unet(z_t, t, PROMPT.expand(2, -1, -1)).sample)


def test_the_lr_latent_steers_the_unet_and_only_inside_the_conditioned_forward(unet, model):
    z_t, z_lr = latents(1, 4, 16, 16, seed=5), latents(1, 4, 16, 16, seed=6)
    with torch.no_grad():
        plain = unet(z_t, 300, PROMPT).sample
        conditioned = model(z_t, 300, PROMPT, z_lr)
        other_lr = model(z_t, 300, PROMPT, latents(1, 4, 16, 16, seed=7))
        plain_after = unet(z_t, 300, PROMPT).sample
    assert not torch.allclose(conditioned, plain, atol=1e-3)
    assert not torch.allclose(conditioned, other_lr, atol=1e-3)
    assert torch.equal(plain_after, plain)  # the same UNet object, called directly, is SD's UNet
    assert conv2_hooks(unet) == 0
    with pytest.raises(ValueError, match="lr_latent"), torch.no_grad():
        model(z_t, 300, PROMPT, latents(1, 4, 8, 8, seed=8))
    assert conv2_hooks(unet) == 0  # removed on errors too


def test_per_sample_timesteps_condition_each_sample_on_its_own_timestep(model):
    z_t, z_lr = latents(3, 4, 16, 16, seed=9), latents(3, 4, 16, 16, seed=10)
    t = torch.tensor([5, 400, 999])
    prompt = PROMPT.expand(3, -1, -1)
    with torch.no_grad():
        batched = model(z_t, t, prompt, z_lr)
        single = torch.cat([model(z_t[i : i + 1], t[i], PROMPT, z_lr[i : i + 1]) for i in range(3)])
        scalar = model(z_t, 400, prompt, z_lr)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scalar[1], batched[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scalar[0], batched[0], atol=1e-3)


def test_gradients_reach_the_zero_initialised_heads_and_never_the_frozen_unet(unet):
    torch.manual_seed(3)
    conditioner = StableSRConditioner.for_unet(unet, **STABLESR_CONDITIONER_MINI)
    model = SFTConditionedUNet(unet, conditioner)
    z_t, z_lr = latents(2, 4, 16, 16, seed=11), latents(2, 4, 16, 16, seed=12)
    model(z_t, torch.tensor([100, 800]), PROMPT.expand(2, -1, -1), z_lr).square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    for head in conditioner.sft.values():  # like zero convolutions: α/β learn first, then the rest follows
        assert head.scale.weight.grad.abs().sum() > 0 and head.shift.weight.grad.abs().sum() > 0


def test_conditioner_round_trips_through_save_and_from_pretrained(tmp_path, unet, model):
    model.conditioner.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = StableSRConditioner.from_pretrained(tmp_path).eval()
    saved_config = json.loads(model.conditioner.to_json_string())
    loaded_config = json.loads(loaded.to_json_string())
    assert loaded_config.pop("_name_or_path") == str(tmp_path)
    assert loaded_config == saved_config
    assert saved_config["encoder_config"]["block_out_channels"] == list(STABLESR_ENCODER_MINI["block_out_channels"])
    reference = model.conditioner.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in loaded.state_dict().items())
    assert loaded.state_dict().keys() == reference.keys()
    z_t, z_lr = latents(1, 4, 16, 16, seed=13), latents(1, 4, 16, 16, seed=14)
    with torch.no_grad():  # same weights; memory-mapped tensors may take other SIMD paths (~1e-6)
        torch.testing.assert_close(SFTConditionedUNet(unet, loaded)(z_t, 50, PROMPT, z_lr),
                                   model(z_t, 50, PROMPT, z_lr), atol=1e-5, rtol=1e-5)


# ---- sampling ----


class OracleEps(nn.Module):
    """The ε whose x₀-prediction is the LR latent: ε = (z_t − √ᾱ_t·z_lr) / √(1−ᾱ_t); records its inputs.

    Pointwise, so tiling cannot change it; and DDPM sampling with it must end exactly at z_lr.
    """

    latent_multiple = 8
    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.alpha_bar = sd_noise_scheduler().alphas_cumprod
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states, lr_latent):
        self.calls.append((sample.clone(), timestep.clone()))
        alpha_bar = self.alpha_bar[timestep].view(-1, 1, 1, 1)
        return (sample - alpha_bar.sqrt() * lr_latent) / (1 - alpha_bar).sqrt()


@pytest.mark.parametrize("steps", [2, 4, 200])
def test_respaced_timesteps_run_from_999_to_0_strictly_decreasing(steps):
    base = sd_noise_scheduler()
    timesteps = respaced_scheduler(steps, base).timesteps.tolist()
    assert len(timesteps) == steps and timesteps[0] == 999 and timesteps[-1] == 0
    assert all(a > b for a, b in itertools.pairwise(timesteps))
    assert base.num_inference_steps is None  # the given scheduler is left alone
    with pytest.raises(ValueError, match="num_steps"):
        respaced_scheduler(1)


def test_sampling_starts_from_the_noised_lr_latent_and_ends_at_the_predicted_x0():
    z_lr = latents(2, 4, 12, 20, seed=15)  # not a multiple of 8: padded, then cropped back
    oracle = OracleEps()
    z_0 = sample_latents(oracle, z_lr, PROMPT, num_steps=4, generator=torch.Generator().manual_seed(0))
    assert z_0.shape == z_lr.shape
    torch.testing.assert_close(z_0, z_lr, atol=1e-4, rtol=1e-4)
    assert [int(t[0]) for _, t in oracle.calls] == [999, 666, 333, 0]
    first_sample, first_t = oracle.calls[0]
    assert first_t.tolist() == [999, 999]
    alpha_bar = float(sd_noise_scheduler().alphas_cumprod[999])
    noise = randn_tensor((2, 4, 16, 24), generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(z_lr, (0, 4, 0, 4), mode="reflect")
    torch.testing.assert_close(first_sample, alpha_bar**0.5 * padded + (1 - alpha_bar) ** 0.5 * noise)


def test_tiling_a_pointwise_model_changes_nothing():
    z_lr = latents(1, 4, 24, 40, seed=16)
    generator = lambda: torch.Generator().manual_seed(3)
    untiled = sample_latents(OracleEps(), z_lr, PROMPT, num_steps=3, generator=generator())
    tiled = sample_latents(OracleEps(), z_lr, PROMPT, num_steps=3, generator=generator(), tile=16, overlap=8)
    torch.testing.assert_close(tiled, untiled, atol=1e-5, rtol=1e-5)


def test_sampling_is_deterministic_for_a_seed_and_differs_between_seeds(model):
    z_lr = latents(1, 4, 16, 16, seed=17)
    run = lambda seed: sample_latents(model, z_lr, PROMPT, num_steps=3,
                                      generator=torch.Generator().manual_seed(seed))
    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again)
    assert (first - other).abs().mean() > 0.1


@pytest.mark.slow
def test_aggregation_sampling_matches_untiled_sampling(model):
    """One tile covering the latent is untiled sampling; real tiles stay far closer to it than another seed.

    A UNet sees its whole input (attention, 8x downsampling) and GroupNorm normalises per tile, so
    tiles cannot be exact. Measured on this random mini model (24x32 latent, 4 steps): 16-tiles
    with overlap 8 deviate by 4 % of the seed-to-seed difference (mean abs), 24-tiles with overlap
    16 by 1.2 %; the bounds leave 2.5x margin.
    """
    z_lr = latents(1, 4, 24, 32, seed=18)
    run = lambda seed=0, **tiling: sample_latents(model, z_lr, PROMPT, num_steps=4,
                                                  generator=torch.Generator().manual_seed(seed), **tiling)
    untiled = run()
    assert torch.equal(run(tile=32, overlap=8), untiled)
    seed_difference = (run(seed=1) - untiled).abs().mean()
    for tile, overlap, bound in ((16, 8, 0.10), (24, 16, 0.03)):
        error = (run(tile=tile, overlap=overlap) - untiled).abs().mean()
        assert 0 < error < bound * seed_difference, (tile, overlap, float(error / seed_difference))
