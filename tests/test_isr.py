"""Stage 3, one-step ISR with VSD: TVT and OSEDiff train what they should, resume exactly, and save a usable restorer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tvt import compat

compat.apply()

from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from training_support import (  # noqa: F401
    RecordingRun,
    make_manifest,
    make_pairs_dir,
    one_thread,
    save_tiny_prior,
)

from tvt.metrics import perceptual
from tvt.models.ce_unet import CEUNet
from tvt.models.restorer import OneStepRestorer, sd_noise_scheduler
from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D4
from tvt.models.vae_d4 import VAED4
from tvt.training import isr
from tvt.training.data import PairDataset

HR = 64  # the smallest side both restorers take unpadded (VAE factor x UNet multiple)
STEPS = 4


pytestmark = pytest.mark.usefixtures("random_lpips")  # tests/conftest.py


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Pairs, an SD-snapshot-like prior (random mini VAE-D8 + UNet) and a random mini VAE-D4."""
    root = tmp_path_factory.mktemp("isr")
    make_pairs_dir(root / "pairs", HR, {"train": 2, "val": 2}, seed=2, n_photos=4)  # one batch: steps comparable
    save_tiny_prior(root / "sd")
    VAED4(**MINI_VAE_D4).save_pretrained(root / "d4")
    return root


def isr_cfg(variant: str, **overrides) -> dict:
    sections = {
        "tvt": {"method": "tvt", "unet": "ce", "vae_encoder": "frozen", "timestep": 1, "t_vsd": [250, 750]},
        "osediff": {"method": "osediff", "unet": "full", "vae_encoder": "lora", "timestep": 999,
                    "t_vsd": [20, 980]},
    }
    common = {"lora_rank": 4, "fake_lora_rank": 4, "lr": 1e-3, "fake_lr": 1e-3, "weight_decay": 1e-2,
              "lambda_l2": 1.0, "lambda_lpips": 2.0, "lambda_vsd": 1.0, "lpips_net": "alex", "cfg_scale": 7.5,
              "color_fix": "adain", "steps": 6, "batch_size": 2, "grad_clip": 1.0, "log_every": 1,
              "checkpoint_every": 2, "keep_checkpoints": 2, "sample_every": 0}
    return {"mode": "mini", "seed": 7, "isr": {variant: {**common, **sections[variant], **overrides}}}


def train(workdir: Path, variant: str, tag: str, run=None, **overrides) -> dict:
    return isr.run_isr(isr_cfg(variant, **overrides), variant, workdir / "pairs", workdir / "sd", workdir / "d4",
                       workdir / f"out-{tag}", workdir / f"ckpt-{tag}", run)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v for part in ("vae", "unet")
            for k, v in load_file(folder / part / "diffusion_pytorch_model.safetensors").items()}


def val_metrics_of(folder: Path, workdir: Path) -> dict[str, float]:
    restorer = OneStepRestorer.from_pretrained_dir(folder).eval()
    return isr.sr_metrics(restorer, PairDataset(workdir / "pairs", "val"), perceptual.load_lpips(),
                          batch_size=2, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def trained(workdir):
    """Both variants trained for STEPS steps (one sample grid): {variant: (metrics, run)}."""
    results = {}
    for variant in ("tvt", "osediff"):
        run = RecordingRun()
        results[variant] = train(workdir, variant, variant, run, steps=STEPS, sample_every=STEPS), run
    return results


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tvt", "osediff"])
def test_loss_falls_and_the_saved_restorer_reproduces_the_metrics(workdir, trained, variant):
    metrics, run = trained[variant]
    loss = run.series(f"isr_{variant}/loss")
    assert len(loss) == STEPS and loss[-1] < loss[0], loss  # the same batch at every step
    for term in ("l2", "lpips", "vsd", "fake_score"):
        assert len(run.series(f"isr_{variant}/{term}")) == STEPS, term
    assert run.series(f"isr_{variant}/vsd")[0] == 0  # the fake score starts as the teacher
    assert run.figures == [f"isr_{variant}/samples/step_{STEPS:06d}.png"]
    assert set(metrics) >= {"val_psnr_sr", "val_psnr_bicubic", "val_lpips_sr", "val_lpips_bicubic"}
    assert metrics["val_psnr_sr"] != metrics["val_psnr_bicubic"]
    assert run.series(f"isr_{variant}/val_psnr_sr") == [metrics["val_psnr_sr"]]

    out = workdir / f"out-{variant}"
    assert not out.with_name(out.name + ".tmp").exists()
    restorer = OneStepRestorer.from_pretrained_dir(out)
    assert (restorer.method, restorer.timestep, restorer.scale, restorer.color_fix) == \
        (variant, 1 if variant == "tvt" else 999, 4, "adain")
    assert isinstance(restorer.unet, CEUNet) == (variant == "tvt")
    assert isinstance(restorer.vae, VAED4) == (variant == "tvt")
    assert not any(".lora_" in k for k in weights(out))  # adapters merged: loads without peft
    reloaded = val_metrics_of(out, workdir)
    for key in ("val_psnr_sr", "val_lpips_sr"):
        assert reloaded[key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-5), key


def changed_weights(workdir: Path, variant: str, initial: dict[str, torch.Tensor]) -> set[str]:
    """Names of the saved restorer's weights that differ from ``initial`` (same names required)."""
    trained = weights(workdir / f"out-{variant}")
    assert trained.keys() == initial.keys()
    return {k for k, v in trained.items() if not torch.equal(v, initial[k])}


@pytest.mark.slow
def test_tvt_trains_the_ce_unet_ends_and_inner_lora_only(workdir, trained):
    sd_unet = UNet2DConditionModel.from_pretrained(workdir / "sd" / "unet")
    initial = {**{f"vae.{k}": v for k, v in load_file(workdir / "d4" / "diffusion_pytorch_model.safetensors").items()},
               **{f"unet.{k}": v for k, v in CEUNet.from_unet(sd_unet).state_dict().items()}}
    changed = changed_weights(workdir, "tvt", initial)
    ends = {k for k in changed if k.split(".")[1] in CEUNet.REPLICA_MODULES}
    assert ends and not any(k.startswith("vae.") for k in changed)  # VAE-D4 frozen, as in the official code
    inner = changed - ends  # LoRA, merged into the adapted weights of the inner SD UNet
    assert inner and all(k.startswith("unet.unet.") and k.endswith(".weight") for k in inner)


@pytest.mark.slow
def test_osediff_trains_encoder_lora_unet_lora_and_conv_in_only(workdir, trained):
    initial = {f"{part}.{k}": v for part in ("vae", "unet")
               for k, v in load_file(workdir / "sd" / part / "diffusion_pytorch_model.safetensors").items()}
    changed = changed_weights(workdir, "osediff", initial)
    vae = {k for k in changed if k.startswith("vae.")}
    assert vae and all(k.startswith(("vae.encoder.", "vae.quant_conv.")) and k.endswith(".weight") for k in vae)
    unet = changed - vae
    assert "unet.conv_in.bias" in unet  # conv_in trains in full, not only through LoRA
    assert all(k.endswith(".weight") for k in unet - {"unet.conv_in.bias"})  # elsewhere: merged LoRA


@pytest.mark.slow
def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(workdir, trained):
    """A run killed after step 2 and restarted ends with the uninterrupted run's weights."""
    killed = workdir / "ckpt-killed"
    shutil.copytree(workdir / "ckpt-tvt" / "checkpoint-2", killed / "checkpoint-2")
    train(workdir, "tvt", "killed", steps=STEPS, sample_every=STEPS)
    full, resumed = weights(workdir / "out-tvt"), weights(workdir / "out-killed")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.slow
def test_a_new_colour_fix_republishes_without_retraining(workdir, trained):
    shutil.copytree(workdir / "ckpt-tvt", workdir / "ckpt-refix")  # the finished run's checkpoints
    metrics = train(workdir, "tvt", "refix", steps=STEPS, color_fix="wavelet")
    assert "train_loss_first" not in metrics  # resumed at the end: no step trained
    assert OneStepRestorer.from_pretrained_dir(workdir / "out-refix").color_fix == "wavelet"
    before, after = weights(workdir / "out-tvt"), weights(workdir / "out-refix")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert metrics["val_psnr_sr"] != trained["tvt"][0]["val_psnr_sr"]  # scored with the new fix


def test_invalid_combinations_name_the_problem(workdir):
    with pytest.raises(ValueError, match="method 'tvt' needs the VAE-D4"):
        isr.run_isr(isr_cfg("tvt"), "tvt", workdir / "pairs", workdir / "sd", None, workdir / "x", workdir / "y", None)
    with pytest.raises(ValueError, match="unet 'ce' .* only VAE-D4 latents"):
        train(workdir, "osediff", "bad", unet="ce")


def _random_tvt_generator():
    """A mini TVT generator with random weights (seed 0) and one random 16² LR in [-1, 1]."""
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**MINI_UNET)
    section = {**isr_cfg("tvt")["isr"]["tvt"], "lora_rank": 2}
    prompt = torch.zeros(1, 77, MINI_UNET["cross_attention_dim"])
    restorer = isr.build_generator("tvt", section, VAED4(**MINI_VAE_D4), teacher, sd_noise_scheduler(), prompt, 4)
    return restorer, torch.rand(1, 3, 16, 16) * 2 - 1


@pytest.mark.slow
def test_training_forward_samples_the_posterior_and_clamps_the_output():
    """As the official training forwards: a posterior sample enters the UNet, the losses see SR in [-1, 1]."""
    restorer, lr = _random_tvt_generator()
    with torch.no_grad():
        restorer.vae.decoder.conv_out.bias.fill_(3.0)  # push the raw output beyond [-1, 1]
        sampled = [isr.generate(restorer, lr, sample_posterior=True) for _ in range(2)]
        means = [isr.generate(restorer, lr, sample_posterior=False) for _ in range(2)]
    assert not torch.equal(sampled[0][1], sampled[1][1])  # a fresh posterior draw each call
    assert torch.equal(means[0][1], means[1][1])
    for sr, _ in sampled + means:
        assert sr.min() >= -1 and sr.max() == 1  # clamped, and the clamp was needed


@pytest.mark.slow
def test_generate_encodes_the_resized_back_lr_when_given():
    """Online data feeds the LR the dataset brought back to the HR size (resize_bak) instead of the
    bicubic upsampling: the same image through either path gives the same output, another one another."""
    restorer, lr = _random_tvt_generator()
    with torch.no_grad():
        bicubic = restorer.upsample_lr((lr + 1) / 2) * 2 - 1
        inside, _ = isr.generate(restorer, lr, sample_posterior=False)
        given, _ = isr.generate(restorer, lr, bicubic, sample_posterior=False)
        other, _ = isr.generate(restorer, lr, torch.nn.functional.interpolate(lr, scale_factor=4, mode="area"),
                                sample_posterior=False)
    assert torch.allclose(inside, given, atol=1e-5)
    assert (other - inside).abs().max() > 1e-3


@pytest.mark.slow
def test_online_data_trains_from_the_manifest_with_fresh_draws(workdir, tmp_path):
    """`data: online`: the training set is the data manifest's photos, degraded per draw with the
    `degrade` section; two steps train, the fixed pairs still validate; no manifest is a named error."""
    data = make_manifest(tmp_path / "data", [("astronaut", (96, 80), "mini", "train"),
                                             ("coffee", (90, 70), "mini", "train"),
                                             ("rocket", (70, 70), "mini", "val")])
    degrade = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())["degrade"]
    cfg = {**isr_cfg("osediff", data="online", steps=2), "degrade": {**degrade, "hr_size": HR},
           "data": {"source": "mini"}}
    run = RecordingRun()
    metrics = isr.run_isr(cfg, "osediff", workdir / "pairs", workdir / "sd", None, tmp_path / "out",
                          tmp_path / "ckpt", run, data_dir=data.parent)
    assert len(run.series("isr_osediff/loss")) == 2 and np.isfinite(run.series("isr_osediff/loss")).all()
    assert set(metrics) >= {"val_psnr_sr", "val_psnr_bicubic"}
    with pytest.raises(ValueError, match="isr.osediff.data: online needs the data stage"):
        isr.run_isr(cfg, "osediff", workdir / "pairs", workdir / "sd", None, tmp_path / "x", tmp_path / "y", None)
