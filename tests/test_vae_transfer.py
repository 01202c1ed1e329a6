"""Transfer VAE Training: losses, the decoder and encoder stages, ablation T1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tvt import compat

compat.apply()

from diffusers import AutoencoderKL
from safetensors.torch import load_file
from training_support import RecordingRun, make_pairs_dir, one_thread  # noqa: F401

from tvt.metrics import perceptual
from tvt.models.sd_configs import MINI_VAE_D4, MINI_VAE_D8
from tvt.models.vae_d4 import VAED4
from tvt.training.losses import (
    LDM_ADAM_BETAS,
    PatchDiscriminator,
    ReconstructionLoss,
    adaptive_gan_weight,
    generator_adversarial_loss,
    hinge_discriminator_loss,
)
from tvt.training.vae_transfer import (
    check_factors,
    run_decoder_transfer,
    run_encoder_transfer,
    transfer_latents,
)

HR = 32


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    make_pairs_dir(root / "pairs", HR, {"train": 8, "val": 2}, seed=0, n_photos=4)
    torch.manual_seed(0)
    AutoencoderKL(**MINI_VAE_D8).save_pretrained(root / "sd" / "vae")  # an 8x "SD" VAE
    return root


pytestmark = pytest.mark.usefixtures("random_lpips")  # tests/conftest.py


def stage_cfg(**decoder):
    common = {"batch_size": 2, "lr": 1e-3, "pixel_loss": "l2", "lpips_weight": 1.0, "lpips_net": "alex",
              "log_every": 2, "checkpoint_every": 2, "sample_every": 0}
    return {
        "mode": "mini", "seed": 3,
        "decoder_transfer": {**common, "architecture": "mini", "transfer": True, "steps": 8, "disc_start": 4,
                             "disc_weight": 0.5, "disc_channels": 8, "disc_layers": 3, "kl_weight": 1e-6,
                             **decoder},
        "encoder_transfer": {**common, "steps": 8},
    }


def initial_weights(workdir: Path, cfg: dict) -> dict[str, torch.Tensor]:
    """VAE-D4 as the decoder stage initialises it (a zero-step run publishes the initialisation)."""
    out = workdir / "initial"
    if not out.exists():
        zero = {**cfg, "decoder_transfer": {**cfg["decoder_transfer"], "steps": 0}}
        run_decoder_transfer(zero, workdir / "pairs", workdir / "sd", out, workdir / "ckpt-initial", None)
    return load_file(out / "diffusion_pytorch_model.safetensors")


# ---- losses ---------------------------------------------------------------------------


def test_adaptive_gan_weight_matches_hand_computation():
    last = torch.tensor([[0.5, -1.0]], requires_grad=True)  # the "last layer" weight
    x = torch.tensor([3.0, 4.0])  # |x| = 5
    out = last @ x  # 1.5 - 4 = -2.5
    rec = ((out - 1.0) ** 2).sum()  # d/dw = 2(out - 1) x  -> norm 2 * 3.5 * 5 = 35
    gan = (3.0 * out).sum()  # d/dw = 3 x              -> norm 15
    weight = adaptive_gan_weight(rec, gan, last, disc_weight=0.5)
    assert weight.item() == pytest.approx(35 / (15 + 1e-4) * 0.5, rel=1e-6)
    assert not weight.requires_grad
    # a GAN loss that does not reach the layer: 35 / 1e-4 is clamped to 1e4
    flat = adaptive_gan_weight(rec, 0.0 * out.sum(), last, disc_weight=1.0)
    assert flat.item() == pytest.approx(1e4)


def test_hinge_losses_and_patch_discriminator():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25 ; fake: relu(1-2)=0, relu(1+0)=1 -> 0.5
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert generator_adversarial_loss(fake).item() == pytest.approx(1.0)
    disc = PatchDiscriminator(base_channels=8, n_layers=3)
    logits = disc(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6: a grid of patch verdicts
    widths = [m.out_channels for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [8, 16, 32, 64, 1]


def test_reconstruction_loss_terms():
    target = torch.zeros(1, 3, 32, 32)
    pred = torch.full_like(target, 0.5)
    plain = ReconstructionLoss(None, pixel="l1", lpips_weight=0.0)
    assert plain(pred, target)["rec"].item() == pytest.approx(0.5)
    assert ReconstructionLoss(None, pixel="l2", lpips_weight=0.0)(pred, target)["l2"].item() == pytest.approx(0.25)
    full = ReconstructionLoss(perceptual.load_lpips("alex"), pixel="l2", lpips_weight=2.0)
    terms = full(pred, target)
    assert terms["lpips"].item() > 0
    assert terms["rec"].item() == pytest.approx(0.25 + 2.0 * terms["lpips"].item(), rel=1e-5)
    assert full(target, target)["rec"].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="pixel loss 'l3'"):
        ReconstructionLoss(None, pixel="l3", lpips_weight=0.0)
    with pytest.raises(ValueError, match="needs an LPIPS module"):
        ReconstructionLoss(None, pixel="l2", lpips_weight=1.0)


# ---- latent geometry ------------------------------------------------------------------


def test_transfer_latents_are_quarter_size():
    torch.manual_seed(0)
    e8, d4 = AutoencoderKL(**MINI_VAE_D8), VAED4(**MINI_VAE_D4)
    x = torch.rand(1, 3, 48, 64) * 2 - 1
    z = transfer_latents(e8, x).mode()
    assert z.shape == (1, 4, 12, 16)  # H/4 x W/4 from an 8x encoder
    assert d4.decode(z).sample.shape == x.shape
    small_e8 = AutoencoderKL(**{**MINI_VAE_D8, "down_block_types": ("DownEncoderBlock2D",) * 3,
                                "up_block_types": ("UpDecoderBlock2D",) * 3, "block_out_channels": (32, 64, 64)})
    with pytest.raises(ValueError, match="downsamples 2x more than VAE-D4 \\(8x\\); the one given downsamples 4x"):
        check_factors(small_e8, d4)


# ---- the stages -----------------------------------------------------------------------


@pytest.mark.slow
def test_decoder_then_encoder_transfer(workdir):
    cfg = stage_cfg()
    run = RecordingRun()
    decoder_dir = workdir / "d4-decoder"
    metrics = run_decoder_transfer(cfg, workdir / "pairs", workdir / "sd", decoder_dir, workdir / "ckpt-dec", run)
    rec = run.series("decoder_transfer/rec")
    assert len(rec) == 4 and rec[-1] < rec[0], rec
    gan_weights = run.series("decoder_transfer/gan_weight")
    assert len(gan_weights) == 2 and all(w > 0 for w in gan_weights)  # steps 5-8 only (disc_start 4)
    assert np.isfinite(metrics["val_psnr_vae_d4"]) and np.isfinite(metrics["val_psnr_vae_d8"])
    assert not decoder_dir.with_name("d4-decoder.tmp").exists()
    trained = VAED4.from_pretrained(decoder_dir)
    assert trained.config.scaling_factor == AutoencoderKL.from_pretrained(workdir / "sd" / "vae").config.scaling_factor

    encoder_dir = workdir / "d4"
    run = RecordingRun()
    run_encoder_transfer(cfg, workdir / "pairs", decoder_dir, encoder_dir, workdir / "ckpt-enc", run)
    rec = run.series("encoder_transfer/rec")
    assert rec[-1] < rec[0], rec
    before, after = load_file(decoder_dir / "diffusion_pytorch_model.safetensors"), \
        load_file(encoder_dir / "diffusion_pytorch_model.safetensors")
    frozen = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    trained = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # D4 untouched by stage 2
    assert not all(torch.equal(before[k], after[k]) for k in trained)  # E4 learnt
    # stage 1 trained the decoder only: the encoder is still its initialisation
    initial = initial_weights(workdir, cfg)
    assert all(torch.equal(before[k], initial[k]) for k in trained)
    assert not all(torch.equal(before[k], initial[k]) for k in frozen)


@pytest.mark.slow
def test_decoder_stage_resume_matches_uninterrupted(workdir):
    cfg = stage_cfg(steps=6, disc_start=2, lpips_weight=0.0)
    run_decoder_transfer(cfg, workdir / "pairs", workdir / "sd", workdir / "full", workdir / "ckpt-full", None)
    short = stage_cfg(steps=4, disc_start=2, lpips_weight=0.0)  # "killed" after step 4 ...
    run_decoder_transfer(short, workdir / "pairs", workdir / "sd", workdir / "part", workdir / "ckpt-part", None)
    run_decoder_transfer(cfg, workdir / "pairs", workdir / "sd", workdir / "part", workdir / "ckpt-part", None)
    full = load_file(workdir / "full" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(workdir / "part" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)  # ... and resumed to the same weights


@pytest.mark.slow
def test_ablation_t1_trains_the_whole_vae_from_scratch(workdir):
    cfg = stage_cfg(transfer=False, steps=4, disc_start=100, lpips_weight=0.0)
    run = RecordingRun()
    metrics = run_decoder_transfer(cfg, workdir / "pairs", workdir / "sd", workdir / "t1", workdir / "ckpt-t1", run)
    assert run.series("decoder_transfer/kl") and not run.series("decoder_transfer/gan")
    assert np.isfinite(metrics["val_psnr_vae_d4"])
    trained = load_file(workdir / "t1" / "diffusion_pytorch_model.safetensors")
    initial = initial_weights(workdir, cfg)
    for prefix in ("encoder.", "decoder."):  # end to end: both halves learnt
        assert not all(torch.equal(trained[k], initial[k]) for k in trained if k.startswith(prefix)), prefix


def _latent_gap(vae_dir: Path, workdir: Path) -> float:
    """MSE between a trained VAE-D4's latent mean and VAE-D8's latent of the x2 image, on fixed photos."""
    torch.manual_seed(5)
    x = torch.rand(2, 3, HR, HR) * 2 - 1
    e8 = AutoencoderKL.from_pretrained(workdir / "sd" / "vae")
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(VAED4.from_pretrained(vae_dir).encode(x).latent_dist.mean,
                                                  transfer_latents(e8, x).mean))


@pytest.mark.slow
def test_ablation_t2_aligns_the_latent_with_vae_d8s(workdir):
    """T2 = T1's end-to-end training + an L2 between the VAE-D4 latent and VAE-D8's: the term is logged,
    and the same run without it (T1) ends with a latent farther from VAE-D8's."""
    common = {"transfer": False, "steps": 6, "disc_start": 100, "lpips_weight": 0.0, "lr": 3e-3}
    run = RecordingRun()
    run_decoder_transfer(stage_cfg(**common, latent_l2=10.0), workdir / "pairs", workdir / "sd", workdir / "t2",
                         workdir / "ckpt-t2", run)
    aligned = run.series("decoder_transfer/latent_l2")
    assert len(aligned) == 3 and all(np.isfinite(aligned)), aligned
    run_decoder_transfer(stage_cfg(**common), workdir / "pairs", workdir / "sd", workdir / "t1-ref",
                         workdir / "ckpt-t1-ref", None)
    t2, t1 = _latent_gap(workdir / "t2", workdir), _latent_gap(workdir / "t1-ref", workdir)
    assert t2 < 0.5 * t1, (t2, t1)


@pytest.mark.slow
def test_ablation_s3_fine_tunes_the_prior_vae_d8_widened_to_8_latent_channels(workdir):
    """architecture d8_c8: the stage starts from the prior's VAE-D8 with its latent interpolated to 8 channels
    (a zero-step run publishes that start: its posterior mean is P times the prior's), then trains all of it."""
    from tvt.models.wide_latent import widen_latent

    prior = AutoencoderKL.from_pretrained(workdir / "sd" / "vae").eval()
    common = {"architecture": "d8_c8", "transfer": False, "disc_start": 100}
    for steps in (0, 2):
        run_decoder_transfer(stage_cfg(**common, steps=steps), workdir / "pairs", workdir / "sd",
                             workdir / f"s3-{steps}", workdir / f"ckpt-s3-{steps}", None)
    start, trained = (AutoencoderKL.from_pretrained(workdir / f"s3-{s}").eval() for s in (0, 2))
    assert start.config.latent_channels == trained.config.latent_channels == 8
    x = torch.rand(2, 3, HR, HR) * 2 - 1
    with torch.no_grad():
        aligned = widen_latent(prior.encode(x).latent_dist.mode(), 8)
        torch.testing.assert_close(start.encode(x).latent_dist.mode(), aligned, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(start.decode(aligned).sample, prior.decode(prior.encode(x).latent_dist.mode()).sample,
                                   atol=1e-4, rtol=1e-4)
    moved = [k for k, v in trained.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert any(k.startswith("encoder.") for k in moved) and any(k.startswith("decoder.") for k in moved)


def test_both_transfer_stages_take_the_autoencoders_adam_betas_from_their_section(workdir, tmp_path, monkeypatch):
    """``adam_betas`` reaches the VAE's optimiser of either stage; the discriminator keeps LDM's."""
    from tvt.training import vae_transfer

    seen = []

    def register(self, models, optimisers):
        seen.append({name: opt.param_groups[0]["betas"] for name, opt in optimisers.items()})
        raise RuntimeError("stop after register")

    monkeypatch.setattr(vae_transfer.Trainer, "register", register)
    cfg = stage_cfg(adam_betas=[0.9, 0.999])
    cfg["encoder_transfer"]["adam_betas"] = [0.8, 0.99]
    with pytest.raises(RuntimeError, match="stop after register"):
        run_decoder_transfer(cfg, workdir / "pairs", workdir / "sd", tmp_path / "d", tmp_path / "c1", None)
    monkeypatch.undo()
    decoder_dir = tmp_path / "d4-decoder"
    run_decoder_transfer({**cfg, "decoder_transfer": {**cfg["decoder_transfer"], "steps": 0}}, workdir / "pairs",
                         workdir / "sd", decoder_dir, tmp_path / "c2", None)
    monkeypatch.setattr(vae_transfer.Trainer, "register", register)
    with pytest.raises(RuntimeError, match="stop after register"):
        run_encoder_transfer(cfg, workdir / "pairs", decoder_dir, tmp_path / "e", tmp_path / "c3", None)
    assert seen == [{"vae": (0.9, 0.999), "disc": LDM_ADAM_BETAS}, {"vae": (0.8, 0.99)}]
    assert LDM_ADAM_BETAS == (0.5, 0.9)  # the default: LDM/taming's
