"""VSD (DMD form): the gradient it gives, its guidance, its patches, and the fake score's updates."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tvt import compat

compat.apply()

from diffusers import UNet2DConditionModel
from training_support import one_thread  # noqa: F401

from tvt.models.restorer import sd_noise_scheduler
from tvt.models.sd_configs import MINI_UNET
from tvt.training.vsd import (
    VSDLoss,
    fake_score_unet,
    merge_patches,
    split_into_patches,
    unet_sharing_weights,
)

SCHEDULER = sd_noise_scheduler()


class PredictsX0(torch.nn.Module):
    """A toy score network whose x₀-prediction is ``target`` whatever the noisy input:
    ε = (z_t − √ᾱ_t·target) / √(1−ᾱ_t). Records what it was called with."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, z_t, timesteps, encoder_hidden_states):
        self.calls.append((z_t, timesteps, encoder_hidden_states))
        alpha_bar = SCHEDULER.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(z_t - alpha_bar.sqrt() * self.target) / (1 - alpha_bar).sqrt())


class PromptEps(torch.nn.Module):
    """ε = mean of the prompt embedding, broadcast: tells which prompt a pass used."""

    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def forward(self, z_t, timesteps, encoder_hidden_states):
        self.batches.append(len(z_t))
        return SimpleNamespace(sample=encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(z_t))


def mini_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**MINI_UNET).eval()


def test_generator_gradient_is_the_dmd_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    real, fake = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    vsd = VSDLoss(PredictsX0(real), PredictsX0(fake), SCHEDULER, timestep_range=(250, 750))
    prompt = torch.zeros(2, 77, 8)
    loss = vsd(x, prompt, prompt)
    loss.backward()

    weight = (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    grad = (fake - real) / weight
    assert loss.item() == pytest.approx(grad.pow(2).mean().item(), rel=1e-5)  # MSE(x, x − grad)
    torch.testing.assert_close(x.grad, 2 * grad / x.numel(), rtol=1e-5, atol=1e-8)
    # the step -grad moves x towards the real score's x₀ and away from the fake one's
    assert torch.sum(-x.grad * (real - fake)) > 0


def test_gradient_vanishes_when_the_fake_score_equals_the_teacher():
    teacher = mini_unet()
    fake = fake_score_unet(teacher, rank=2)  # LoRA-B starts at zero: fake == teacher
    vsd = VSDLoss(teacher, fake, SCHEDULER)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    prompt = torch.zeros(2, 77, MINI_UNET["cross_attention_dim"])
    loss = vsd(x, prompt, prompt)
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()


def test_timesteps_are_drawn_from_the_configured_range():
    net = PredictsX0(torch.zeros(64, 4, 2, 2))
    vsd = VSDLoss(net, PredictsX0(torch.zeros(64, 4, 2, 2)), SCHEDULER, timestep_range=(250, 260))
    vsd(torch.randn(64, 4, 2, 2), torch.zeros(64, 1, 1))
    timesteps = net.calls[0][1]
    assert timesteps.min() >= 250 and timesteps.max() < 260 and len(timesteps.unique()) > 1
    with pytest.raises(ValueError, match=r"VSD timestep range \[750, 250\)"):
        VSDLoss(net, net, SCHEDULER, timestep_range=(750, 250))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        VSDLoss(net, net, SCHEDULER, timestep_range=(20, 1001))


def test_classifier_free_guidance_and_its_identity_shortcut():
    teacher = PromptEps()
    vsd = VSDLoss(teacher, teacher, SCHEDULER, cfg_scale=7.5)
    z, t = torch.zeros(2, 4, 4, 4), torch.tensor([300, 400])
    prompt, negative = torch.full((2, 3, 5), 1.0), torch.full((2, 3, 5), 0.2)
    eps = vsd.real_eps(z, t, prompt, negative)
    torch.testing.assert_close(eps, torch.full_like(z, 0.2 + 7.5 * (1.0 - 0.2)))
    assert teacher.batches == [4]  # one batched pass over negative and positive
    # mini mode: the negative prompt is the null prompt itself -> guidance is the identity, one pass
    torch.testing.assert_close(vsd.real_eps(z, t, prompt, prompt.clone()), torch.full_like(z, 1.0))
    torch.testing.assert_close(vsd.real_eps(z, t, prompt, None), torch.full_like(z, 1.0))
    assert teacher.batches == [4, 2, 2]


def test_patch_split_round_trip_and_order():
    latents = torch.arange(2 * 4 * 8 * 12, dtype=torch.float32).reshape(2, 4, 8, 12)
    patches = split_into_patches(latents, (4, 6))
    assert patches.shape == (8, 4, 4, 6)
    # patch-major: top-left of image 0, top-left of image 1, then top-right of image 0, ...
    torch.testing.assert_close(patches[0], latents[0, :, :4, :6])
    torch.testing.assert_close(patches[1], latents[1, :, :4, :6])
    torch.testing.assert_close(patches[2], latents[0, :, :4, 6:])
    torch.testing.assert_close(patches[7], latents[1, :, 4:, 6:])
    torch.testing.assert_close(merge_patches(patches, 8, 12), latents)
    with pytest.raises(ValueError, match="a 8x12 latent does not split into 3x6 patches"):
        split_into_patches(latents, (3, 6))


def test_vae_d4_latents_reach_the_scores_as_teacher_sized_patches():
    real, fake = PredictsX0(torch.zeros(8, 4, 8, 8)), PredictsX0(torch.ones(8, 4, 8, 8))
    vsd = VSDLoss(real, fake, SCHEDULER, latent_scale=2)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    prompt = torch.stack([torch.zeros(77, 8), torch.ones(77, 8)])
    vsd(x, prompt).backward()
    z_t, _, embeds = real.calls[0]
    assert z_t.shape == (8, 4, 8, 8)  # 2 images x 4 patches of 8x8
    assert embeds[:, 0, 0].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]  # each patch keeps its image's prompt
    # each patch is normalised by its own mean|x - x0_real| (x0_real = 0 here)
    patch_weight = split_into_patches(x.detach(), (8, 8)).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = merge_patches(2 * (1 - 0) / patch_weight.expand(8, 4, 8, 8) / x.numel(), 16, 16)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-8)
    vsd.fake_score_loss(x, prompt)
    assert fake.calls[-1][0].shape == (8, 4, 8, 8) and not fake.calls[-1][0].requires_grad


def test_fake_score_shares_the_teachers_weights_and_trains_only_its_lora():
    teacher = mini_unet()
    fake = fake_score_unet(teacher, rank=2).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainable = [name for name, p in fake.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)
    teacher_storage = {p.data_ptr() for p in teacher.parameters()}
    base = [p for name, p in fake.named_parameters() if ".lora_" not in name]
    assert len(base) == len(teacher_storage) and all(p.data_ptr() in teacher_storage for p in base)  # no 2nd copy

    vsd = VSDLoss(teacher, fake, SCHEDULER)
    optimizer = torch.optim.AdamW([p for p in fake.parameters() if p.requires_grad], lr=1e-2)
    start = {k: v.clone() for k, v in fake.state_dict().items()}
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss = vsd.fake_score_loss(latents, torch.zeros(2, 77, MINI_UNET["cross_attention_dim"]))
    loss.backward()
    assert latents.grad is None  # trained on the detached generator latents
    optimizer.step()
    changed = [k for k, v in fake.state_dict().items() if not torch.equal(v, start[k])]
    assert changed and all(".lora_" in k for k in changed)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("scope,adapters", [("official", {"default_others"}),
                                              ("full", {"default_encoder", "default_decoder", "default_others"})])
@pytest.mark.slow
def test_fake_score_scope_decides_which_adapters_learn(scope, adapters):
    """Official: only the mid-block/conv_out adapter learns (the official fake score's active one)."""
    teacher = mini_unet()
    fake = fake_score_unet(teacher, rank=2, scope=scope).train()
    trainable = [name for name, p in fake.named_parameters() if p.requires_grad]
    assert {name.split(".")[-2] for name in trainable} == adapters
    held = {name.split(".")[-2] for name in fake.state_dict() if ".lora_" in name}
    assert held == {"default_encoder", "default_decoder", "default_others"}  # all three exist, as officially
    optimizer = torch.optim.AdamW([p for p in fake.parameters() if p.requires_grad], lr=1e-2)
    start = {k: v.clone() for k, v in fake.state_dict().items()}
    VSDLoss(teacher, fake, SCHEDULER).fake_score_loss(torch.randn(2, 4, 8, 8),
                                                       torch.randn(2, 77, MINI_UNET["cross_attention_dim"])).backward()
    optimizer.step()
    changed = {k.split(".")[-2] for k, v in fake.state_dict().items() if not torch.equal(v, start[k])}
    assert changed == adapters


@pytest.mark.slow
def test_official_fake_score_of_osediff_leaves_conv_out_alone():
    """OSEDiff groups conv_out with the decoder adapter, so its official fake score adapts the mid-block only."""
    tvt = fake_score_unet(mini_unet(), rank=2, codebase="tvt")
    osediff = fake_score_unet(mini_unet(), rank=2, codebase="osediff")

    def trainable(model):
        return {n for n, p in model.named_parameters() if p.requires_grad}

    assert any(n.startswith("conv_out.") for n in trainable(tvt))
    assert trainable(osediff) == {n for n in trainable(tvt) if not n.startswith("conv_out.")}
    assert all(n.startswith("mid_block.") for n in trainable(osediff))


def test_unknown_fake_score_scope_is_named():
    with pytest.raises(ValueError, match="fake_lora_scope.*'full', 'official'"):
        fake_score_unet(mini_unet(), scope="mid")


@pytest.mark.slow
def test_unet_sharing_weights_copies_only_what_it_owns():
    unet = mini_unet()
    twin = unet_sharing_weights(unet, own=("conv_in.",))
    source, copy = unet.state_dict(), twin.state_dict()
    assert source.keys() == copy.keys()
    for key, value in source.items():
        assert torch.equal(copy[key], value)
        assert (copy[key].data_ptr() == value.data_ptr()) == (not key.startswith("conv_in."))
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, MINI_UNET["cross_attention_dim"])
    torch.testing.assert_close(twin(x, t, c).sample, unet(x, t, c).sample)
    with pytest.raises(ValueError, match="without LoRA"):
        unet_sharing_weights(fake_score_unet(unet))
