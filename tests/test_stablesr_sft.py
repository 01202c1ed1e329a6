"""StableSR stage A: the conditioner learns against a frozen prior, is saved loadable, and resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tvt import compat

compat.apply()

from diffusers import AutoencoderKL
from safetensors.torch import load_file
from training_support import RecordingRun, make_manifest, make_pairs_dir, one_thread, save_tiny_prior  # noqa: F401

from tvt.models.restorer import sd_noise_scheduler
from tvt.models.sd_configs import MINI_UNET
from tvt.models.stablesr import SFTConditionedUNet
from tvt.training import stablesr_sft
from tvt.training.data import PairDataset
from tvt.training.prior import null_prompt_embeds

HR = 64  # 8x8 latents: the smallest side the mini UNet takes unpadded
STEPS = 24
NAME = stablesr_sft.NAME


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Pairs and a prior in SD-snapshot layout (random mini VAE-D8 + UNet, SD's scheduler, null prompt)."""
    root = tmp_path_factory.mktemp("stablesr_sft")
    make_pairs_dir(root / "pairs", HR, {"train": 4, "val": 2}, seed=3, n_photos=4)
    save_tiny_prior(root / "sd")
    return root


def sft_cfg(**overrides) -> dict:
    section = {"encoder": "mini", "lr": 2e-3, "steps": STEPS, "batch_size": 2, "grad_accum": 1,
               "mixed_precision": "no", "checkpoint_every": 6, "keep_checkpoints": 2, "log_every": 4,
               "sample_every": 0, "sample_steps": 3}
    return {"mode": "mini", "seed": 5, "stablesr": {"sft": {**section, **overrides}}}


def train(workdir: Path, tag: str, run=None, **overrides) -> dict:
    return stablesr_sft.run_stablesr_sft(sft_cfg(**overrides), workdir / "pairs", workdir / "sd",
                                         workdir / f"out-{tag}", workdir / f"ckpt-{tag}", run)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def trained(workdir):
    run = RecordingRun()
    return train(workdir, "full", run, sample_every=STEPS), run


@pytest.mark.slow
def test_the_conditioner_learns_to_denoise_better_than_the_prior(trained):
    metrics, run = trained
    loss = run.series(f"{NAME}/loss")  # means over windows of 4 steps (random t: single steps are noisy)
    assert len(loss) == STEPS // 4 and max(loss[-2:]) < min(loss[:2]), loss
    # held-out, with the same noise and timesteps for both: the SFT layers beat the prior alone
    assert metrics["val_eps_mse"] < 0.95 * metrics["val_eps_mse_prior"], metrics  # measured: 0.87x
    assert set(metrics) >= {"val_psnr_sr", "val_psnr_bicubic", "train_loss_first", "train_loss_last"}
    assert metrics["val_psnr_sr"] != metrics["val_psnr_bicubic"]
    assert run.series(f"{NAME}/val_eps_mse") == [metrics["val_eps_mse"]]
    assert run.figures == [f"{NAME}/samples/step_{STEPS:06d}.png"]


@pytest.mark.slow
def test_the_published_conditioner_loads_and_reproduces_the_metrics(workdir, trained):
    metrics, _ = trained
    out = workdir / "out-full"
    model = SFTConditionedUNet.from_pretrained(workdir / "sd" / "unet", out)
    assert not any(p.requires_grad for p in model.unet.parameters())
    vae = AutoencoderKL.from_pretrained(workdir / "sd" / "vae")
    prompt = null_prompt_embeds(MINI_UNET["cross_attention_dim"])
    val = PairDataset(workdir / "pairs", "val")
    eps_mse = stablesr_sft.denoising_mse(lambda z_t, t, z_lr: model(z_t, t, prompt.expand(len(z_t), -1, -1), z_lr),
                                         vae, val, sd_noise_scheduler(), scale=4, batch_size=2, device="cpu")
    assert eps_mse == pytest.approx(metrics["val_eps_mse"], rel=1e-4)
    lr = val[0]["lr"][None]
    sr = stablesr_sft.restore(model, vae, lr, prompt, scale=4, num_steps=3, scheduler=sd_noise_scheduler())
    assert sr.shape == (1, 3, HR, HR) and sr.abs().max() <= 1


@pytest.mark.slow
def test_a_resumed_run_continues_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(workdir, trained):
    run = RecordingRun()
    train(workdir, "resumed", steps=STEPS // 2)
    assert sorted(p.name for p in (workdir / "ckpt-resumed").iterdir()) == ["checkpoint-12", "checkpoint-6"]
    train(workdir, "resumed", run, steps=STEPS)  # `steps` is bookkeeping: the same trajectory, continued
    logged_steps = [step for step, m in run.metrics if f"{NAME}/loss" in m]
    assert logged_steps == [16, 20, 24]
    resumed, full = weights(workdir / "out-resumed"), weights(workdir / "out-full")
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)


@pytest.mark.slow
def test_online_data_degrades_with_stablesrs_own_block(workdir, tmp_path, monkeypatch):
    """`stablesr.sft.data: online` trains on the data manifest's photos degraded per draw with
    `stablesr.degrade` (USM ground truth included), not with the shared `degrade` section."""
    data = make_manifest(tmp_path / "data", [("astronaut", (96, 80), "mini", "train"),
                                             ("coffee", (90, 70), "mini", "train")])
    paper = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "paper.yaml").read_text())
    cfg = sft_cfg(data="online", steps=2, log_every=1)
    cfg["stablesr"]["degrade"] = {**paper["stablesr"]["degrade"], "hr_size": HR}
    cfg["data"] = {"source": "mini"}
    built, original = [], stablesr_sft.online_dataset

    def recording(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(stablesr_sft, "online_dataset", recording)
    run = RecordingRun()
    stablesr_sft.run_stablesr_sft(cfg, workdir / "pairs", workdir / "sd", tmp_path / "out", tmp_path / "ckpt", run,
                                  data_dir=data.parent)
    assert len(run.series(f"{NAME}/loss")) == 2
    (train_set,) = built
    recipe = train_set.recipe(0)
    assert recipe["usm_gt"] and train_set.cfg["first"]["noise_range"] == [1.0, 15.0]  # StableSR's, not OSEDiff's
    with pytest.raises(ValueError, match="stablesr.sft.data: online needs the data stage"):
        stablesr_sft.run_stablesr_sft(cfg, workdir / "pairs", workdir / "sd", tmp_path / "x", tmp_path / "y", None)
