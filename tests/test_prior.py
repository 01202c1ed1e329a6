"""The mini prior: a tiny SD (VAE-D8 + UNet) trained on the train split, saved like an SD snapshot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvt import compat

compat.apply()

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from training_support import RecordingRun, make_pairs_dir, one_thread  # noqa: F401

from tvt.models.sd_configs import MINI_VAE_D8
from tvt.models.sd_weights import PROMPT_EMBEDS
from tvt.training.data import PairDataset
from tvt.training.engine import mean_psnr
from tvt.training.losses import LDM_ADAM_BETAS
from tvt.training.prior import (
    SD_SCALING_FACTOR,
    narrow_posterior,
    run_prior,
    scaling_factor_for,
    sd_noise_scheduler,
)

pytestmark = pytest.mark.usefixtures("random_lpips")  # tests/conftest.py


def prior_cfg(vae_steps=60, unet_steps=40):
    engine = {"log_every": 5, "checkpoint_every": 20, "sample_every": 0}
    return {"mode": "mini", "seed": 5, "prior": {
        "mixed_precision": "no",
        "vae": {**engine, "steps": vae_steps, "batch_size": 4, "lr": 2e-3, "kl_weight": 1e-6,
                "lpips_weight": 1.0, "lpips_net": "alex"},
        "unet": {**engine, "steps": unet_steps, "batch_size": 4, "lr": 2e-3, "weight_decay": 1e-2},
    }}


def test_sd_noise_schedule():
    scheduler = sd_noise_scheduler()
    assert scheduler.betas[0].item() == pytest.approx(0.00085)
    assert scheduler.betas[-1].item() == pytest.approx(0.012)
    assert len(scheduler.betas) == 1000
    assert scheduler.alphas_cumprod[1].item() == pytest.approx(0.998296, abs=1e-6)  # TVT's t = 1 (docs/method.md §1.4)


def test_a_narrow_posterior_starts_at_the_given_log_variance_for_any_input_and_still_trains():
    torch.manual_seed(0)
    vae = AutoencoderKL(**MINI_VAE_D8)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    wide = vae.encode(images).latent_dist
    assert wide.std.mean() > 0.5  # diffusers' default: std near 1, as wide as the latents
    mean_before = wide.mean.detach().clone()

    narrow_posterior(vae, -6.0)
    posterior = vae.encode(images).latent_dist
    assert torch.equal(posterior.logvar, torch.full_like(posterior.logvar, -6.0))  # every input, every value
    assert torch.equal(posterior.mean, mean_before)  # the mean channels are untouched
    # the log-variance rows keep their gradient: the KL term moves them from the first update on
    posterior.logvar.sum().backward()
    assert vae.quant_conv.weight.grad[MINI_VAE_D8["latent_channels"]:].abs().sum() > 0


def test_the_prior_vae_takes_its_optimiser_and_posterior_from_the_config(tmp_path, monkeypatch):
    """adam_betas reach Adam and posterior_logvar_init the model the stage trains (not only the schema)."""
    from tvt.training import prior

    seen = {}

    def register(self, models, optimisers):
        seen["betas"] = optimisers["vae"].param_groups[0]["betas"]
        vae = models["vae"].model
        seen["logvar"] = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.logvar
        raise RuntimeError("stop after register")

    monkeypatch.setattr(prior.Trainer, "register", register)
    pairs = make_pairs_dir(tmp_path / "pairs", 32, {"train": 4, "val": 2}, seed=1, n_photos=2)
    train, val = PairDataset(pairs, "train", with_lr=False), PairDataset(pairs, "val", with_lr=False)
    section = prior_cfg()["prior"]
    with pytest.raises(RuntimeError, match="stop after register"):
        prior.train_vae(section, 5, train, val, tmp_path / "ckpt", None, "x")
    assert seen["betas"] == LDM_ADAM_BETAS and seen["logvar"].abs().max() < 3  # defaults: LDM's
    section["vae"].update(adam_betas=[0.9, 0.999], posterior_logvar_init=-6.0)
    with pytest.raises(RuntimeError, match="stop after register"):
        prior.train_vae(section, 5, train, val, tmp_path / "ckpt2", None, "x")
    assert seen["betas"] == (0.9, 0.999) and torch.equal(seen["logvar"], torch.full_like(seen["logvar"], -6.0))


def test_scaling_factor_rule():
    assert scaling_factor_for(1 / 0.19) == SD_SCALING_FACTOR  # within 10 %: keep SD's number
    assert scaling_factor_for(2.0) == 0.5  # far off: measured 1 / std


@pytest.mark.slow
def test_prior_trains_and_is_saved_like_an_sd_snapshot(tmp_path):
    pairs = make_pairs_dir(tmp_path / "pairs", 64, {"train": 12, "val": 4}, seed=1, n_photos=6)
    run = RecordingRun()
    out = tmp_path / "sd"
    metrics = run_prior(prior_cfg(), pairs, out, tmp_path / "ckpt", run)

    vae_loss, unet_loss = run.series("prior_vae/loss"), run.series("prior_unet/loss")
    assert vae_loss[-1] < 0.8 * vae_loss[0], vae_loss
    assert np.mean(unet_loss[-2:]) < np.mean(unet_loss[:2]), unet_loss  # the denoising loss curve falls
    assert metrics["unet_train_loss_last"] < metrics["unet_train_loss_first"]
    # 60 steps reconstruct better than the VAE the stage started from (same seed, same val crops)
    torch.manual_seed(prior_cfg()["seed"])
    untrained = AutoencoderKL(**MINI_VAE_D8).eval()
    start = mean_psnr(lambda b: untrained(b["hr"]).sample, PairDataset(pairs, "val", with_lr=False),
                      batch_size=4, device="cpu")
    assert metrics["vae_val_psnr"] > start + 1, (metrics, start)
    assert 0 < metrics["unet_val_loss"] < 1.5

    assert sorted(p.name for p in out.iterdir()) == [PROMPT_EMBEDS, "scheduler", "unet", "vae"]
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    assert vae.config.scaling_factor == scaling_factor_for(metrics["latent_std"])
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    scheduler = DDPMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.prediction_type == "epsilon"
    prompt = load_file(out / PROMPT_EMBEDS)["prompt_embeds"]
    assert prompt.shape == (1, 77, unet.config.cross_attention_dim) and not prompt.any()
    # the saved pieces fit together: image -> latent -> UNet -> same-shape ε
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode() * vae.config.scaling_factor
        eps = unet(z, torch.tensor([10]), encoder_hidden_states=prompt).sample
    assert z.shape == (1, 4, 8, 8) and eps.shape == z.shape

    # a rerun resumes from the finished checkpoints: nothing retrained, identical output
    again = run_prior(prior_cfg(), pairs, tmp_path / "sd-again", tmp_path / "ckpt", RecordingRun())
    assert again["scaling_factor"] == metrics["scaling_factor"]
    assert again["unet_val_loss"] == pytest.approx(metrics["unet_val_loss"], rel=1e-6)
    assert "unet_train_loss_first" not in again  # no step was trained


def test_prior_refuses_paper_mode(tmp_path):
    cfg = {**prior_cfg(), "mode": "paper"}
    with pytest.raises(ValueError, match="paper mode uses the downloaded SD 2.1-base"):
        run_prior(cfg, tmp_path, tmp_path / "out", tmp_path / "ckpt", None)


def _online_prior_cfg(tmp_path, vae_steps=6):
    import yaml
    from training_support import make_manifest

    from tvt.config import REPO_ROOT

    data = make_manifest(tmp_path / "data", [("astronaut", (96, 80), "mini", "train"),
                                             ("coffee", (90, 70), "mini", "train"),
                                             ("rocket", (70, 70), "mini", "val")]).parent
    degrade = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())["degrade"]
    cfg = prior_cfg(vae_steps=vae_steps, unet_steps=2)
    cfg["prior"]["vae"].update(data="online", batch_size=2, lpips_weight=0.0)
    return {**cfg, "degrade": {**degrade, "hr_size": 32}, "data": {"source": "mini"}}, data


def test_online_prior_crops_are_fresh_each_epoch_and_replay_under_the_same_key(tmp_path):
    """`prior.vae.data: online`: each draw is a new crop of a training image (never the val photo),
    a pure function of (seed, epoch, index), in the range the fixed crops have."""
    from tvt.training.data import OnlineCrops, online_dataset

    cfg, data = _online_prior_cfg(tmp_path)
    crops = OnlineCrops(online_dataset(cfg, cfg["degrade"], data / "manifest.csv", degrade_in_loader=False))
    assert len(crops) == 2  # the two training photos
    first = crops[0]["hr"]
    assert first.shape == (3, 32, 32) and -1 <= first.min() < first.max() <= 1
    assert torch.equal(crops[0]["hr"], first)  # same epoch, same crop
    crops.set_epoch(1)
    assert not torch.equal(crops[0]["hr"], first)  # a new epoch draws anew
    crops.set_epoch(0)
    assert torch.equal(crops[0]["hr"], first)
    with pytest.raises(ValueError, match="degrade=False"):
        OnlineCrops(online_dataset(cfg, cfg["degrade"], data / "manifest.csv", degrade_in_loader=True))


def test_the_online_prior_stage_reads_the_data_stage_and_trains_its_vae_there(tmp_path, monkeypatch):
    from tvt import config, stages
    from tvt.training import prior
    from tvt.training.data import OnlineCrops

    cfg, data = _online_prior_cfg(tmp_path)
    pairs = make_pairs_dir(tmp_path / "pairs", 32, {"train": 4, "val": 2}, seed=1, n_photos=2)
    with pytest.raises(ValueError, match="prior.vae.data: online needs the data stage"):
        run_prior(cfg, pairs, tmp_path / "x", tmp_path / "ckpt-x", None)
    seen = {}
    real_train_vae = prior.train_vae

    def train_vae(section, seed, train, *args):
        seen["train"] = train
        return real_train_vae(section, seed, train, *args)

    monkeypatch.setattr(prior, "train_vae", train_vae)
    run = RecordingRun()
    run_prior(cfg, pairs, tmp_path / "sd", tmp_path / "ckpt", run, data_dir=data)
    assert isinstance(seen["train"], OnlineCrops) and len(seen["train"]) == 2  # the manifest's 2 train photos
    losses = run.series("prior_vae/loss")
    assert losses and np.isfinite(losses).all()
    assert AutoencoderKL.from_pretrained(tmp_path / "sd" / "vae").config.scaling_factor > 0
    # the stage reads the data stage only when its VAE trains online
    shipped = config.load(config.REPO_ROOT / "config" / "config.yaml")
    assert stages.stage_by_name(shipped, "prior").needs == ("degrade",)
    shipped["prior"]["vae"]["data"] = "online"
    config.validate(shipped)
    assert stages.stage_by_name(shipped, "prior").needs == ("data", "degrade")
