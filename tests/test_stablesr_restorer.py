"""The StableSR restorer: its pieces composed exactly, deterministic, stored and loaded by class,
tiled like untiled; stage B end to end (latents cached, CFW trained, restorer published)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tvt import compat

compat.apply()

from diffusers import AutoencoderKL, UNet2DConditionModel
from training_support import RecordingRun, make_pairs_dir, one_thread, save_tiny_prior  # noqa: F401

from tvt.models.cfw import CFWModule
from tvt.models.color_fix import apply_color_fix
from tvt.models.prompts import NullPrompt
from tvt.models.restorer import sd_noise_scheduler
from tvt.models.saved import load_restorer, restorer_class_name
from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D8, STABLESR_CONDITIONER_MINI
from tvt.models.stablesr import SFTConditionedUNet, StableSRConditioner
from tvt.models.stablesr_restorer import StableSRRestorer
from tvt.models.stablesr_sampler import sample_latents
from tvt.training.prior import null_prompt_embeds


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-zero SFT / CFW outputs (both start as exact no-ops), so the tests see their effect."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module


@pytest.fixture(scope="module")
def restorer() -> StableSRRestorer:
    torch.manual_seed(0)
    vae, unet = AutoencoderKL(**MINI_VAE_D8).eval(), UNet2DConditionModel(**MINI_UNET).eval()
    conditioner = _perturb(StableSRConditioner.for_unet(unet, **STABLESR_CONDITIONER_MINI), 1).eval()
    cfw = _perturb(CFWModule.for_vae(vae, num_rrdb_blocks=1, growth_channels=8), 2).eval()
    return StableSRRestorer(
        vae,
        unet,
        conditioner,
        cfw,
        scheduler=sd_noise_scheduler(),
        prompt=NullPrompt(null_prompt_embeds(MINI_UNET["cross_attention_dim"])),
        steps=3,
        w=0.5,
        scale=4,
        color_fix="adain",
        seed=7,
    )


def lr_image(height=16, width=24, seed=0) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_w0_is_the_sampler_then_sds_plain_decoder(restorer):
    lr = lr_image(16, 32)  # 64 x 128 upsampled: multiples of 64, no padding
    lr_up = restorer.upsample_lr(lr)
    z_lr = restorer.vae.encode(lr_up * 2 - 1).latent_dist.mode() * restorer.vae.config.scaling_factor
    z_0 = sample_latents(
        SFTConditionedUNet(restorer.unet, restorer.conditioner),
        z_lr,
        restorer.prompt(lr),
        num_steps=3,
        scheduler=restorer.scheduler,
        generator=torch.Generator().manual_seed(7),
    )
    with torch.no_grad():
        decoded = restorer.vae.decode(z_0 / restorer.vae.config.scaling_factor).sample
    expected = apply_color_fix("adain", (decoded + 1) / 2, lr_up).clamp(0, 1)
    assert torch.equal(restorer(lr, w=0.0), expected)


def test_output_shape_determinism_and_the_w_dial(restorer):
    lr = lr_image(13, 21)  # odd sides: padded for VAE and UNet, cropped back
    out = restorer(lr)
    assert out.shape == (1, 3, 52, 84) and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, restorer(lr))  # the noise is re-seeded on every call
    for w in (0.0, 1.0):
        assert (restorer(lr, w=w) - out).abs().mean() > 1e-4
    other = lr_image(13, 21, seed=1)
    assert (restorer(other) - out).abs().mean() > 1e-3


def test_the_seed_changes_the_sample(restorer):
    lr = lr_image()
    reseeded = StableSRRestorer(
        restorer.vae,
        restorer.unet,
        restorer.conditioner,
        restorer.cfw,
        scheduler=restorer.scheduler,
        prompt=restorer.prompt,
        steps=3,
        w=0.5,
        seed=8,
    )
    assert (reseeded(lr) - restorer(lr)).abs().mean() > 1e-4


def test_one_tile_covering_the_image_equals_untiled(restorer):
    lr = lr_image(16, 16)
    untiled = restorer(lr)
    restorer.tile, restorer.tile_overlap = 64, 16
    try:
        assert torch.equal(restorer(lr), untiled)
        restorer.tile = 32  # 4 x 4 latent tiles of a 8 x 8 latent: real aggregation sampling
        tiled = restorer(lr)
    finally:
        restorer.tile, restorer.tile_overlap = None, 0
    assert tiled.shape == untiled.shape
    assert (tiled - untiled).abs().mean() < 0.1  # random tiny model; seams would be far larger


def test_tiled_encoder_and_cfw_decoder_equal_untiled(restorer, monkeypatch):
    """The sampling held fixed (z_0 = z_lr; its UNet tiles are blended, so never exact): the
    tiled restorer's encoder and CFW decoder then give the untiled output to float rounding."""
    from tvt.models import stablesr_restorer, tiled_vae

    monkeypatch.setattr(stablesr_restorer, "sample_latents", lambda _denoiser, z_lr, *_args, **_kwargs: z_lr)
    budgets, close = [], tiled_vae._TileStore.close
    monkeypatch.setattr(tiled_vae._TileStore, "close", lambda store: (budgets.append(store.budget), close(store)))
    lr = lr_image(24, 40)  # 96 x 160 output: 2 x 3 pixel tiles of 64, latent tiles 8 of 12 x 20
    untiled = restorer(lr, w=1.0)
    restorer.tile = 64
    try:
        tiled = restorer(lr, w=1.0)
        restorer.tile_memory = 1 << 10  # 1 KiB: every tile state and the encoder's features go to disk
        spilled = restorer(lr, w=1.0)
    finally:
        restorer.tile, restorer.tile_memory = None, None
    # measured: max abs difference 5.8e-6 (7.7e-6 at w = 0.5), output in [0, 1]
    assert (tiled - untiled).abs().max() <= 3e-5
    assert torch.equal(spilled, tiled)  # the budget moves memory, not values
    assert budgets[-2:] == [1 << 10] * 2 and (128 << 20) in budgets  # encoder and CFW decoder got it
    assert (untiled - restorer(lr, w=0.0)).abs().mean() > 1e-3  # the fusion is in what was compared


def test_invalid_settings_are_named(restorer):
    parts = (restorer.vae, restorer.unet, restorer.conditioner, restorer.cfw)
    with pytest.raises(ValueError, match=r"CFW weight w must be in \[0, 1\], got 1.5"):
        StableSRRestorer(*parts, scheduler=restorer.scheduler, prompt=restorer.prompt, steps=3, w=1.5)
    with pytest.raises(ValueError, match="tile must be a multiple of 64 px"):
        StableSRRestorer(*parts, scheduler=restorer.scheduler, prompt=restorer.prompt, steps=3, tile=40)


def test_saved_restorer_loads_by_class_and_restores_identically(restorer, tmp_path):
    restorer.save_pretrained_dir(tmp_path / "stablesr")
    config = json.loads((tmp_path / "stablesr" / "restorer.json").read_text())
    assert config["class"] == "StableSRRestorer" and config["steps"] == 3 and config["w"] == 0.5
    assert restorer_class_name(tmp_path / "stablesr") == "StableSRRestorer"
    loaded = load_restorer(tmp_path / "stablesr").eval()
    lr = lr_image()
    # same weights bit for bit; the loaded tensors' memory layout may pick other kernels (measured: 1e-6)
    torch.testing.assert_close(loaded(lr), restorer(lr), atol=1e-5, rtol=0)
    assert load_restorer(tmp_path / "stablesr", w=0.0).w == 0.0  # options override restorer.json
    (tmp_path / "stablesr" / "restorer.json").write_text(json.dumps({**config, "class": "Nope"}))
    with pytest.raises(ValueError, match="unknown restorer class 'Nope'"):
        load_restorer(tmp_path / "stablesr")


# ---- stage B end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_b(tmp_path_factory):
    from tvt.training.stablesr_cfw import run_stablesr_stage_b

    root = tmp_path_factory.mktemp("stage_b")
    make_pairs_dir(root / "pairs", 64, {"train": 4, "val": 2}, seed=3, n_photos=4)
    _, unet = save_tiny_prior(root / "sd")
    StableSRConditioner.for_unet(unet, **STABLESR_CONDITIONER_MINI).save_pretrained(root / "sft")
    cfw = {
        "generate_steps": 2,
        "steps": 4,
        "batch_size": 2,
        "grad_accum": 1,
        "mixed_precision": "no",
        "lr": 1e-3,
        "pixel_loss": "l1",
        "lpips_weight": 0.0,
        "lpips_net": "alex",
        "disc_start": 2,
        "disc_weight": 0.5,
        "disc_channels": 8,
        "disc_layers": 2,
        "num_rrdb_blocks": 1,
        "growth_channels": 8,
        "checkpoint_every": 2,
        "keep_checkpoints": 1,
        "log_every": 1,
        "sample_every": 0,
    }

    def run(w=0.5, tag="", data_dir=None, **overrides):
        cfg = {"mode": "mini", "seed": 3, "stablesr": {"cfw": {**cfw, **overrides},
                                                       "sample": {"steps": 2, "w": w, "color_fix": "none"}}}
        if data_dir is not None:  # stage B draws its own pairs with StableSR's degradation
            paper = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "paper.yaml").read_text())
            cfg.update(data={"source": "mini"})
            cfg["stablesr"]["degrade"] = {**paper["stablesr"]["degrade"], "hr_size": 64}
        recorder = ArtifactRun()
        metrics = run_stablesr_stage_b(
            cfg, root / "pairs", root / "sd", root / "sft", root / f"out{tag}", root / f"ckpt{tag}", recorder,
            data_dir=data_dir,
        )
        return metrics, recorder

    return root, run


@pytest.mark.slow
def test_stage_b_publishes_a_restorer_and_reruns_without_resampling(stage_b):
    root, run = stage_b
    metrics, recorder = run()
    assert set(metrics) == {"val_psnr_w0", "val_psnr_w1", "val_psnr_bicubic"}
    assert len(recorder.series("stablesr_cfw/loss")) == 4
    latents = list((root / "ckpt").glob("latents-*.safetensors"))
    assert len(latents) == 1
    stamp = os.stat(latents[0]).st_mtime_ns
    restorer = load_restorer(root / "out")
    assert isinstance(restorer, StableSRRestorer) and restorer.steps == 2 and restorer.w == 0.5
    out = restorer.eval()(lr_image())
    assert out.shape == (1, 3, 64, 96)

    # a new inference setting: same latents file, nothing retrained, the restorer republished
    _, recorder = run(w=1.0)
    assert os.stat(latents[0]).st_mtime_ns == stamp
    assert recorder.series("stablesr_cfw/loss") == []  # resumed at the final checkpoint
    assert load_restorer(root / "out").w == 1.0


class ArtifactRun(RecordingRun):
    def __init__(self):
        super().__init__()
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((Path(path), artifact_path))


def test_stage_b_samples_and_records_its_own_drawn_pairs(stage_b, tmp_path):
    """`cfw.data: online`: stage A samples one latent per drawn pair (and per val pair); the draws' recipes
    are written beside the latents, logged, and replay to the pairs the latents were sampled from."""
    from safetensors import safe_open
    from training_support import make_manifest

    from tvt.training.stablesr_cfw import cfw_training_pairs

    root, run = stage_b
    data = make_manifest(tmp_path / "data", [("astronaut", (96, 80), "mini", "train"),
                                             ("coffee", (90, 70), "mini", "train")]).parent
    metrics, recorder = run(tag="-online", data_dir=data, data="online", pairs=3)
    assert np.isfinite(metrics["val_psnr_w1"]) and len(recorder.series("stablesr_cfw/loss")) == 4
    (draws_file,) = (root / "ckpt-online").glob("draws-*.jsonl")
    (latents_file,) = (root / "ckpt-online").glob("latents-*.safetensors")
    assert draws_file.stem.removeprefix("draws-") == latents_file.stem.removeprefix("latents-")
    assert recorder.artifacts == [(draws_file, "stablesr_cfw")]
    recipes = [json.loads(line) for line in draws_file.read_text().splitlines()]
    cfg = {"seed": 3, "data": {"source": "mini"}, "stablesr": {
        "degrade": {**yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "paper.yaml").read_text())[
            "stablesr"]["degrade"], "hr_size": 64}, "cfw": {"data": "online", "pairs": 3}}}
    drawn, _ = cfw_training_pairs(cfg, root / "pairs", data)
    assert recipes == drawn.recipes() and len(recipes) == 3
    with safe_open(latents_file, framework="pt") as fh:
        assert set(fh.keys()) == {*drawn.pair_ids, "val000", "val001"}
    assert torch.equal(drawn.online.replay(recipes[2])["lr"], drawn[2]["lr"])


def test_tvt_sr_restores_with_a_stablesr_folder(restorer, tmp_path, capsys):
    import argparse

    import numpy as np
    from PIL import Image

    from tvt import sr

    restorer.save_pretrained_dir(tmp_path / "weights")
    Image.fromarray((np.asarray(lr_image(12, 20)[0].permute(1, 2, 0)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    parser = argparse.ArgumentParser(prog="tvt sr")
    sr.add_arguments(parser)
    args = parser.parse_args(
        [
            str(tmp_path / "a.png"),
            "-o",
            str(tmp_path / "out"),
            "--weights",
            str(tmp_path / "weights"),
            "--method",
            "stablesr",
            "--device",
            "cpu",
        ]
    )
    assert sr.main(args) == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "out" / "a.png").size == (80, 48)
    args = parser.parse_args(
        [
            str(tmp_path / "a.png"),
            "-o",
            str(tmp_path / "out2"),
            "--weights",
            str(tmp_path / "weights"),
            "--method",
            "tvt",
        ]
    )
    assert sr.main(args) == 2
    assert "holds a 'stablesr' restorer, not --method 'tvt'" in capsys.readouterr().err
