"""StableSR stage B: the latents file, the LR/latent dataset, CFW training with resumption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tvt import compat

compat.apply()

from diffusers import AutoencoderKL
from safetensors.torch import load_file
from training_support import RecordingRun, make_manifest, make_pairs_dir, one_thread  # noqa: F401

from tvt.models.cfw import CFWAutoencoder, CFWModule
from tvt.models.sd_configs import MINI_VAE_D8
from tvt.training.data import PairDataset
from tvt.training.stablesr_cfw import (
    LatentPairDataset,
    cfw_training_pairs,
    run_stablesr_cfw,
    upsample_to,
    write_latents,
)

HR = 32
LATENT_NOISE = 0.5  # std, in SD-scaled latent units (latents themselves have std ~1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Pairs, a random 8x "SD" VAE, and stand-in stage-A latents: E8(HR) · scaling + noise,
    so the latents hold the scene but not its detail, which the LR image can restore."""
    root = tmp_path_factory.mktemp("stablesr_cfw")
    make_pairs_dir(root / "pairs", HR, {"train": 8, "val": 4}, seed=0, n_photos=4)
    torch.manual_seed(0)
    vae = AutoencoderKL(**MINI_VAE_D8).eval()
    vae.save_pretrained(root / "sd" / "vae")
    generator = torch.Generator().manual_seed(0)
    latents = {}
    for split in ("train", "val"):
        for item in PairDataset(root / "pairs", split, with_lr=False):
            with torch.no_grad():
                mean = vae.encode(item["hr"][None]).latent_dist.mean[0] * vae.config.scaling_factor
            latents[item["pair_id"]] = mean + LATENT_NOISE * torch.randn(mean.shape, generator=generator)
    write_latents(latents, root / "latents.safetensors")
    return root


pytestmark = pytest.mark.usefixtures("random_lpips")  # tests/conftest.py


def stage_cfg(**cfw):
    section = {"steps": 30, "batch_size": 4, "grad_accum": 1, "mixed_precision": "no", "lr": 1e-3,
               "pixel_loss": "l1", "lpips_weight": 1.0, "lpips_net": "alex", "disc_start": 20, "disc_weight": 0.5,
               "disc_channels": 8, "disc_layers": 2, "num_rrdb_blocks": 1, "growth_channels": 16,
               "checkpoint_every": 10, "keep_checkpoints": 2, "log_every": 5, "sample_every": 0, **cfw}
    return {"mode": "mini", "seed": 5, "stablesr": {"cfw": section}}


def run_stage(workdir: Path, cfg: dict, name: str, run=None) -> dict:
    return run_stablesr_cfw(cfg, workdir / "pairs", workdir / "sd", workdir / "latents.safetensors",
                            workdir / name, workdir / f"ckpt-{name}", run)


def test_latents_file_and_dataset(workdir, tmp_path):
    dataset = LatentPairDataset(PairDataset(workdir / "pairs", "val"), workdir / "latents.safetensors")
    item = dataset[1]
    stored = load_file(workdir / "latents.safetensors")
    assert item["hr"].shape == (3, HR, HR) and item["lr"].shape == (3, HR // 4, HR // 4)
    assert torch.equal(item["latent"], stored[item["pair_id"]]) and item["latent"].shape == (4, HR // 8, HR // 8)
    assert not (workdir / "latents.safetensors.tmp").exists()

    partial = {k: v for k, v in stored.items() if k != "val002"}
    write_latents(partial, tmp_path / "partial.safetensors")
    LatentPairDataset(PairDataset(workdir / "pairs", "train"), tmp_path / "partial.safetensors")  # train is complete
    with pytest.raises(KeyError, match=r"no latent for 1 of the 4 'val' pairs \(e.g. \['val002'\]\)"):
        LatentPairDataset(PairDataset(workdir / "pairs", "val"), tmp_path / "partial.safetensors")
    with pytest.raises(FileNotFoundError, match="generate the stage-A latents"):
        LatentPairDataset(PairDataset(workdir / "pairs", "val"), tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match=r"\(C, h, w\) per pair id"):
        write_latents({"a": torch.zeros(1, 4, 2, 2)}, tmp_path / "batched.safetensors")


@pytest.mark.slow
def test_stage_trains_cfw_towards_the_lr_image(workdir):
    run = RecordingRun()
    metrics = run_stage(workdir, stage_cfg(sample_every=15), "cfw", run)
    rec = run.series("stablesr_cfw/rec")
    assert len(rec) == 6 and rec[-1] < 0.8 * rec[0], rec
    gan_weights = run.series("stablesr_cfw/gan_weight")
    assert len(gan_weights) == 2 and all(w > 0 for w in gan_weights)  # steps 21-30 only (disc_start 20)
    assert np.isfinite(metrics["val_psnr_bicubic"])
    # the fused LR features beat the plain decoder of the noisy latents (measured over seeds 5-7:
    # w = 0 11.1 dB, w = 1 15.2-16.8 dB; bicubic 29.7 dB, as the random "SD" VAE reconstructs poorly)
    assert metrics["val_psnr_w1"] > metrics["val_psnr_w0"] + 2.0, metrics
    assert run.figures == ["stablesr_cfw/samples/step_000015.png", "stablesr_cfw/samples/step_000030.png"]
    assert run.series("stablesr_cfw/val_psnr_w1") == [metrics["val_psnr_w1"]]

    vae = AutoencoderKL.from_pretrained(workdir / "sd" / "vae").eval()
    cfw = CFWModule.from_pretrained(workdir / "cfw").eval()
    assert cfw.config.num_rrdb_blocks == 1 and cfw.config.growth_channels == 16
    batch = LatentPairDataset(PairDataset(workdir / "pairs", "val"), workdir / "latents.safetensors")[0]
    latents = batch["latent"][None] / vae.config.scaling_factor
    image = upsample_to(batch["lr"][None], batch["hr"][None])
    with torch.no_grad():  # the trained CFW still leaves w = 0 the exact SD decoder
        assert torch.equal(CFWAutoencoder(vae, cfw)(latents, image, 0.0), vae.decode(latents).sample)


@pytest.mark.slow
def test_resume_matches_uninterrupted(workdir):
    cfg = stage_cfg(steps=6, disc_start=2, lpips_weight=0.0, checkpoint_every=2)
    run_stage(workdir, cfg, "full")
    run_stage(workdir, stage_cfg(steps=4, disc_start=2, lpips_weight=0.0, checkpoint_every=2), "part")  # "killed"
    assert sorted(p.name for p in (workdir / "ckpt-part").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    run_stage(workdir, cfg, "part")  # ... and resumed from step 4
    full = load_file(workdir / "full" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(workdir / "part" / "diffusion_pytorch_model.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.slow
def test_fixed_gan_weight_is_disc_weight(workdir):
    """StableSR's effective recipe: λ = disc_weight (0.025) at every adversarial step."""
    run = RecordingRun()
    cfg = stage_cfg(steps=4, disc_start=2, lpips_weight=0.0, log_every=1, disc_weight=0.025, gan_weight="fixed")
    run_stage(workdir, cfg, "fixed", run)
    assert run.series("stablesr_cfw/gan_weight") == pytest.approx([0.025, 0.025], abs=0, rel=1e-7)
    assert len(run.series("stablesr_cfw/gan")) == 2  # steps 3 and 4


def test_cfw_trains_on_its_own_drawn_pairs(workdir, tmp_path):
    """`data: online`: the trainer reads the drawn pairs (their latents keyed by the draws' pair ids, one
    per draw), not the fixed train split; a latents file without them is refused."""
    data = make_manifest(tmp_path / "data", [("astronaut", (64, 48), "mini", "train"),
                                             ("coffee", (50, 45), "mini", "train")])
    paper = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "paper.yaml").read_text())
    cfg = stage_cfg(steps=2, batch_size=2, lpips_weight=0.0, log_every=1, disc_start=5, data="online", pairs=3)
    cfg.update(data={"source": "mini"}, stablesr={**cfg["stablesr"],
                                                  "degrade": {**paper["stablesr"]["degrade"], "hr_size": HR}})
    drawn, _ = cfw_training_pairs(cfg, workdir / "pairs", data.parent)
    stored = load_file(workdir / "latents.safetensors")
    latents = {**stored, **{p: torch.zeros(4, HR // 8, HR // 8) for p in drawn.pair_ids}}
    write_latents(latents, tmp_path / "latents.safetensors")
    run = RecordingRun()
    run_stablesr_cfw(cfg, workdir / "pairs", workdir / "sd", tmp_path / "latents.safetensors", tmp_path / "cfw",
                     tmp_path / "ckpt", run, data_dir=data.parent)
    assert len(run.series("stablesr_cfw/rec")) == 2 and (tmp_path / "cfw").is_dir()
    with pytest.raises(KeyError, match=r"no latent for 3 of the 3 'drawn' pairs"):
        run_stablesr_cfw(cfg, workdir / "pairs", workdir / "sd", workdir / "latents.safetensors", tmp_path / "x",
                         tmp_path / "y", None, data_dir=data.parent)
