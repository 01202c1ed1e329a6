"""Losses of the autoencoder stages, as in LDM/taming (docs/method.md §1.2).

* :class:`ReconstructionLoss` — pixel L2 (or L1) + weighted LPIPS, on images in [-1, 1];
* :class:`PatchDiscriminator` — the 3-layer PatchGAN (pix2pix ``NLayerDiscriminator``) that
  LDM trains its VAEs against; none of the installed libraries ships one (basicsr's variant
  is spectral-normalised with different padding), so it is written here, 20 lines;
* hinge losses and LDM's **adaptive GAN weight**, which rescales the adversarial gradient
  at the decoder's last layer to the size of the reconstruction gradient, so the GAN term
  neither vanishes nor swamps the reconstruction whatever the loss scales;
* :func:`kl_loss` — the VAE's KL term, normalised so that LDM's weight (1e-6) keeps its meaning.
"""

from __future__ import annotations

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from tvt.metrics import perceptual

PIXEL_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}

#: Adam betas of LDM/taming's autoencoder and discriminator optimisers (``AutoencoderKL.configure_optimizers``).
#: A stage's ``adam_betas`` overrides the autoencoder's: mini mode's ~100-update runs swing by several dB
#: with beta1 = 0.5 (docs/mini-mode.md); discriminators always keep these.
LDM_ADAM_BETAS = (0.5, 0.9)


def autoencoder_adam_betas(section: dict) -> tuple[float, float]:
    """The Adam betas of a stage's autoencoder optimiser: its ``adam_betas``, else LDM's."""
    return tuple(section.get("adam_betas", LDM_ADAM_BETAS))


class ReconstructionLoss(nn.Module):
    """``pixel(pred, target) + lpips_weight · LPIPS(pred, target)``; returns every term.

    ``lpips`` is an LPIPS module (e.g. ``tvt.metrics.perceptual.load_lpips()``) taking images
    in [-1, 1]; it is frozen here. ``None`` (with weight 0) drops the LPIPS term.
    """

    def __init__(self, lpips: nn.Module | None, pixel: str = "l2", lpips_weight: float = 1.0):
        super().__init__()
        if pixel not in PIXEL_LOSSES:
            raise ValueError(f"pixel loss {pixel!r} is not one of {sorted(PIXEL_LOSSES)}")
        if lpips is None and lpips_weight > 0:
            raise ValueError(f"lpips_weight={lpips_weight} needs an LPIPS module (lpips=None given)")
        self.pixel_name = pixel
        self.lpips_weight = lpips_weight
        self.lpips = lpips.eval().requires_grad_(False) if lpips is not None else None

    def train(self, mode: bool = True) -> ReconstructionLoss:
        super().train(mode)
        if self.lpips is not None:  # LPIPS has dropout layers: keep them off
            self.lpips.eval()
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {self.pixel_name: PIXEL_LOSSES[self.pixel_name](pred.float(), target.float())}
        rec = terms[self.pixel_name]
        if self.lpips is not None and self.lpips_weight > 0:
            terms["lpips"] = self.lpips(pred, target).mean()
            rec = rec + self.lpips_weight * terms["lpips"]
        terms["rec"] = rec
        return terms


def configured_reconstruction_loss(section: dict, device: torch.device,
                                   pixel: str | None = None) -> ReconstructionLoss:
    """The reconstruction loss a stage section asks for (``pixel_loss``, ``lpips_weight``,
    ``lpips_net``), with the official LPIPS weights; ``pixel`` overrides ``pixel_loss``."""
    weight = section["lpips_weight"]
    lpips = perceptual.load_lpips(net=section["lpips_net"], device=device) if weight > 0 else None
    return ReconstructionLoss(lpips, pixel=pixel or section["pixel_loss"], lpips_weight=weight).to(device)


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """PatchGAN: a grid of real/fake logits, one per ~70×70 receptive field (for ``n_layers=3``).

    conv(4, s2) → LeakyReLU, then ``n_layers`` × [conv(4) → BatchNorm → LeakyReLU] doubling the
    width up to 8×, the last one with stride 1, then conv(4, s1) to one channel. Initialised
    N(0, 0.02) as in pix2pix/taming.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = base_channels
        for n in range(1, n_layers + 1):
            out = base_channels * min(2**n, 8)
            layers += [nn.Conv2d(width, out, 4, 2 if n < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½·(E[relu(1 − D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """−E[D(x̂)]: the generator side of the hinge GAN."""
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        disc_weight: float, max_weight: float = 1e4) -> torch.Tensor:
    """λ = ‖∇_last L_rec‖ / (‖∇_last L_GAN‖ + 1e-4), clamped to [0, max_weight], × disc_weight.

    ``last_layer`` is the decoder's last weight (``decoder.conv_out.weight``). The result is
    detached: λ scales the GAN gradient, it is not optimised.
    """
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach() * disc_weight


def kl_loss(posterior, images: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) ‖ N(0, I)) summed over the latent, averaged over the batch, divided by the
    number of values per image.

    LDM sums both its pixel and KL terms per image; our pixel terms are means, so the KL is
    divided by C·H·W to keep LDM's ratio and thus the meaning of its weight (1e-6).
    """
    return posterior.kl().mean() / images[0].numel()
