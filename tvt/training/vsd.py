"""Variational score distillation (VSD), in the DMD form of the official OSEDiff / TVT code (docs/method.md §1.4).

The one-step generator's latent x should look like a sample of the pre-trained diffusion
prior. Two score networks judge it after noising it to a random t_vsd:

* the **real** score: the frozen SD UNet (the *teacher*), with classifier-free guidance
  ε = ε(∅⁻) + s·(ε(c) − ε(∅⁻)) between the prompt c and the negative prompt ∅⁻;
* the **fake** score: the teacher's weights plus LoRA (by default, as in the official code,
  only its mid-block adapter is active: :func:`fake_score_unet`), trained alongside the
  generator with the ordinary ε-MSE on the generator's *detached* latents, so it tracks
  the distribution the generator currently produces.

With x̂₀ the clean latents both predict, the generator's gradient is

    grad = (x̂₀_fake − x̂₀_real) / mean|x − x̂₀_real|,     loss = MSE(x, stopgrad(x − grad)),

so ∂loss/∂x = 2·grad / numel: x moves away from what the fake score believes and towards
what the teacher believes, with a per-sample normalisation that makes the step size
independent of t. At the start the fake score *is* the teacher (LoRA-B is zero), so the
gradient is zero until the fake score has learnt something about the generator.

In mini mode the prompt and the negative prompt are the same null embedding: CFG is then the
identity (ε(∅) + s·(ε(∅) − ε(∅)) = ε(∅)), so the teacher's second pass is skipped.

VAE-D4 latents have twice the spatial density of the teacher's (128² for a 512² image, where
SD's UNet was trained on 64²): like the official TVT code, they are cut into teacher-sized
patches (there four 64² ones) before either score network sees them.
"""

from __future__ import annotations

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from tvt.models.lora import LORA_GROUPS, active_lora_pattern, add_official_unet_lora, set_trainable


def unet_sharing_weights(unet: UNet2DConditionModel, *, own: tuple[str, ...] = ()) -> UNet2DConditionModel:
    """A second UNet whose weights are the *same tensors* as ``unet``'s, except the
    parameters whose names start with a prefix in ``own``, which are independent copies.

    For networks that train only adapters (and ``own`` modules) on top of frozen SD weights:
    the teacher, the fake score and OSEDiff's generator then hold one UNet's weights in
    memory, not three. Adapters added to either module stay separate (peft wraps modules,
    not tensors). ``unet`` must be plain (no adapters), and the shared weights must stay frozen.
    """
    if any(".lora_" in name for name in unet.state_dict()):
        raise ValueError("unet_sharing_weights expects a UNet without LoRA adapters (share the plain one)")
    with torch.device("meta"):
        twin = UNet2DConditionModel.from_config(unet.config)
    state = {name: value.clone() if name.startswith(own) else value for name, value in unet.state_dict().items()}
    twin.load_state_dict(state, assign=True)
    return twin.train(unet.training)


#: ``fake_lora_scope``: which of the official three LoRA adapters the fake score trains
FAKE_LORA_SCOPES = {"official": ("others",), "full": LORA_GROUPS}


def fake_score_unet(teacher: UNet2DConditionModel, *, rank: int = 4, scope: str = "official",
                    codebase: str = "tvt") -> UNet2DConditionModel:
    """VSD's fake score network: the teacher's (shared) weights plus the official three LoRA
    adapters, of which those of ``scope`` are active and trainable. Starts equal to the
    teacher (LoRA-B is zero).

    ``scope="official"`` reproduces the official code: TVT's and OSEDiff's ``VSD`` build the
    fake score with ``initialize_unet`` (three ``add_adapter`` calls; diffusers activates only
    the last one added) and never call ``set_adapter`` on it, so only ``default_others`` takes
    part in the forward pass and learns: the mid-block, plus ``conv_out`` in TVT's grouping
    (``codebase``: :data:`~tvt.models.lora.CONV_OUT_GROUP`). ``"full"`` activates all three
    adapters, LoRA on every layer, as the VSD/DMD papers describe the fake score.
    """
    if scope not in FAKE_LORA_SCOPES:
        raise ValueError(f"fake_lora_scope must be one of {sorted(FAKE_LORA_SCOPES)}, got {scope!r}")
    fake = unet_sharing_weights(teacher)
    add_official_unet_lora(fake, rank=rank, active=FAKE_LORA_SCOPES[scope], codebase=codebase)
    set_trainable(fake, [active_lora_pattern(fake)])
    return fake


def split_into_patches(latents: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) → (n·B, C, h, w): the n = (H/h)·(W/w) patches, patch-major
    (all images' top-left patch first, as the official code concatenates them)."""
    batch, channels, height, width = latents.shape
    ph, pw = patch_size
    if height % ph or width % pw:
        raise ValueError(f"a {height}x{width} latent does not split into {ph}x{pw} patches")
    rows, cols = height // ph, width // pw
    patches = latents.reshape(batch, channels, rows, ph, cols, pw).permute(2, 4, 0, 1, 3, 5)
    return patches.reshape(rows * cols * batch, channels, ph, pw)


def merge_patches(patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`split_into_patches` for a latent of ``height`` × ``width``."""
    count, channels, ph, pw = patches.shape
    rows, cols = height // ph, width // pw
    batch = count // (rows * cols)
    grid = patches.reshape(rows, cols, batch, channels, ph, pw).permute(2, 3, 0, 4, 1, 5)
    return grid.reshape(batch, channels, height, width)


def _predict_x0(z_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """(z_t − √(1−ᾱ_t) ε) / √ᾱ_t with one ᾱ_t per sample."""
    alpha_bar = alpha_bar.to(z_t.dtype).view(-1, *([1] * (z_t.dim() - 1)))
    return (z_t - (1 - alpha_bar).sqrt() * eps.to(z_t.dtype)) / alpha_bar.sqrt()


class VSDLoss:
    """The generator's VSD loss (:meth:`__call__`) and the fake score's ε-MSE (:meth:`fake_score_loss`).

    Args:
        teacher: the frozen pre-trained UNet (real score).
        fake: the fake score UNet (:func:`fake_score_unet`); pass the module the trainer
            registered (it may be wrapped for DDP), since :meth:`fake_score_loss` trains it.
        scheduler: the prior's noise schedule (ᾱ_t, ``add_noise``).
        cfg_scale: classifier-free guidance scale of the real score (7.5 in OSEDiff/TVT).
        timestep_range: t_vsd ~ U[low, high) (TVT 250…750, OSEDiff 20…980).
        latent_scale: how much denser the generator's latents are than the teacher's (VAE-D8
            factor / the generator VAE's factor: 2 for VAE-D4); each side is cut into this many
            patches.
    """

    def __init__(self, teacher: nn.Module, fake: nn.Module, scheduler: DDPMScheduler, *,
                 cfg_scale: float = 7.5, timestep_range: tuple[int, int] = (20, 980), latent_scale: int = 1):
        low, high = timestep_range
        steps = scheduler.config.num_train_timesteps
        if not 0 <= low < high <= steps:
            raise ValueError(f"VSD timestep range [{low}, {high}) must be a non-empty part of [0, {steps})")
        if latent_scale < 1:
            raise ValueError(f"latent_scale must be >= 1, got {latent_scale}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.fake = fake
        self.scheduler = scheduler
        self.cfg_scale = cfg_scale
        self.timestep_range = (low, high)
        self.latent_scale = latent_scale

    def teacher_sized_patches(self, latents: torch.Tensor) -> torch.Tensor:
        """The generator's latents cut into patches of the teacher's latent size (no-op at scale 1)."""
        if self.latent_scale == 1:
            return latents
        height, width = latents.shape[-2:]
        return split_into_patches(latents, (height // self.latent_scale, width // self.latent_scale))

    def _per_patch(self, latents: torch.Tensor, embeds: torch.Tensor):
        patches = self.teacher_sized_patches(latents)
        return patches, embeds.repeat(len(patches) // len(latents), 1, 1)  # patch-major, like the patches

    def _noised(self, latents: torch.Tensor, low: int, high: int):
        timesteps = torch.randint(low, high, (len(latents),), device=latents.device)
        noise = torch.randn_like(latents)
        return self.scheduler.add_noise(latents, noise, timesteps), noise, timesteps

    def _alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps]

    def real_eps(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                 negative_embeds: torch.Tensor | None) -> torch.Tensor:
        """The teacher's guided ε; one pass when guidance is the identity (no/same negative, scale 1)."""
        identity = negative_embeds is None or self.cfg_scale == 1 or torch.equal(negative_embeds, prompt_embeds)
        if identity:
            return self.teacher(noisy, timesteps, encoder_hidden_states=prompt_embeds).sample
        eps_negative, eps_prompt = self.teacher(
            torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]),
        ).sample.chunk(2)
        return eps_negative + self.cfg_scale * (eps_prompt - eps_negative)

    def __call__(self, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                 negative_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """VSD loss of the generator's (scaled) latents; gradients flow into ``latents`` only.

        ``prompt_embeds`` / ``negative_embeds``: (B, L, D), one row per latent.
        """
        patches, prompt = self._per_patch(latents, prompt_embeds)
        negative = None if negative_embeds is None else self._per_patch(latents, negative_embeds)[1]
        with torch.no_grad():
            noisy, _, timesteps = self._noised(patches, *self.timestep_range)
            alpha_bar = self._alpha_bar(timesteps)
            x0_fake = _predict_x0(noisy, self.fake(noisy, timesteps, encoder_hidden_states=prompt).sample, alpha_bar)
            x0_real = _predict_x0(noisy, self.real_eps(noisy, timesteps, prompt, negative), alpha_bar)
            weight = (patches - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
            grad = (x0_fake - x0_real) / weight
        return F.mse_loss(patches.float(), (patches - grad).detach().float())

    def fake_score_loss(self, latents: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """ε-MSE of the fake score on the *detached* generator latents, t ~ U[0, T)."""
        patches, prompt = self._per_patch(latents.detach(), prompt_embeds.detach())
        noisy, noise, timesteps = self._noised(patches, 0, self.scheduler.config.num_train_timesteps)
        eps = self.fake(noisy, timesteps, encoder_hidden_states=prompt).sample
        return F.mse_loss(eps.float(), noise.float())
