"""One-step restorer (TVT and OSEDiff paths), its closed-form step, tiling, storage and prompts."""

import json

import numpy as np
import pytest
import torch

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from sample_photos import photo

from tvt.models.ce_unet import CEUNet
from tvt.models.color_fix import apply_color_fix
from tvt.models.lora import add_unet_lora
from tvt.models.prompts import DAPEPrompt, NullPrompt, PromptProvider
from tvt.models.restorer import (
    OneStepRestorer,
    build_osediff_restorer,
    build_tvt_restorer,
    predict_x0,
    sd_noise_scheduler,
)
from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D4, MINI_VAE_D8
from tvt.models.tiling import crop_to, pad_to_multiple
from tvt.models.vae_d4 import VAED4


@pytest.fixture(scope="module")
def restorers():
    torch.manual_seed(0)
    tvt = build_tvt_restorer(VAED4(**MINI_VAE_D4), UNet2DConditionModel(**MINI_UNET)).eval()
    osediff = build_osediff_restorer(AutoencoderKL(**MINI_VAE_D8), UNet2DConditionModel(**MINI_UNET)).eval()
    return {"tvt": tvt, "osediff": osediff}


def _lr_photo(side: int = 48) -> torch.Tensor:
    """The 'chelsea' photo's central square, area-downscaled to side x side, (1, 3, side, side) in [0, 1]."""
    image = photo("chelsea", 300).resize((side, side), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def test_factories_assemble_the_papers_configurations(restorers):
    tvt, osediff = restorers["tvt"], restorers["osediff"]
    assert isinstance(tvt.unet, CEUNet) and isinstance(tvt.vae, VAED4)
    assert (tvt.method, tvt.timestep, tvt.vae_factor) == ("tvt", 1, 4)
    assert (osediff.method, osediff.timestep, osediff.vae_factor) == ("osediff", 999, 8)
    assert tvt.pixel_multiple == osediff.pixel_multiple == 64
    assert tvt.alpha_bar == pytest.approx(0.998296, abs=1e-6)  # docs/method.md §1.4
    assert osediff.alpha_bar == pytest.approx(0.0046, abs=1e-4)


@pytest.mark.parametrize("method", ["tvt", "osediff"])
@pytest.mark.parametrize("size", [(16, 16), (17, 23), (7, 5)])
def test_output_shape_range_and_input_dependence(restorers, method, size):
    restorer = restorers[method]
    lr = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sr = restorer(lr)
        again = restorer(lr)
        other = restorer(lr.flip(-1))
    assert sr.shape == (1, 3, 4 * size[0], 4 * size[1])
    assert sr.min() >= 0 and sr.max() <= 1
    assert torch.equal(sr, again)  # deterministic: posterior mean, no noise
    assert (sr - other).abs().mean() > 1e-3


@pytest.mark.parametrize("timestep", [1, 500, 999])
def test_closed_form_step_equals_the_schedulers_x0_prediction(timestep):
    scheduler = sd_noise_scheduler()
    g = torch.Generator().manual_seed(2)
    z_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ours = predict_x0(z_t, eps, float(scheduler.alphas_cumprod[timestep]))
    theirs = scheduler.step(eps, timestep, z_t).pred_original_sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_denoise_is_osediffs_single_scheduler_step(restorers):
    """OSEDiff's code takes scheduler.step(...).prev_sample on a one-step schedule: the same x0."""
    restorer = restorers["osediff"]
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompt = restorer.prompt(torch.zeros(1, 3, 8, 8))
    scheduler = sd_noise_scheduler()
    scheduler.set_timesteps(timesteps=[999])  # the last step: ᾱ_prev = 1
    with torch.no_grad():
        eps = restorer.unet(z, 999, prompt).sample
        expected = scheduler.step(eps, 999, z, generator=torch.Generator().manual_seed(0)).prev_sample
        torch.testing.assert_close(restorer.denoise(z, prompt), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["tvt", "osediff"])
def test_forward_composes_the_pieces_and_each_colour_fix(restorers, method):
    restorer = restorers[method]
    lr = _lr_photo(12)
    outputs = {}
    with torch.no_grad():
        lr_up = restorer.upsample_lr(lr)
        z_l = restorer.encode_lr(pad_to_multiple(lr_up, 64))
        raw = crop_to(restorer.decode(restorer.denoise(z_l, restorer.prompt(lr))), 48, 48)
        for mode in ("adain", "wavelet", "none"):
            restorer.color_fix = mode
            outputs[mode] = restorer(lr)
            torch.testing.assert_close(outputs[mode], apply_color_fix(mode, raw, lr_up).clamp(0, 1))
        restorer.color_fix = "adain"
    assert z_l.shape[-1] == 64 // restorer.vae_factor  # 48 px padded to 64
    assert (outputs["adain"] - outputs["wavelet"]).abs().mean() > 1e-3
    assert (outputs["adain"] - outputs["none"]).abs().mean() > 1e-3
    # Colour fixes pull the output's colours towards the LR's.
    colour_error = {m: (o.mean((2, 3)) - lr_up.mean((2, 3))).abs().mean() for m, o in outputs.items()}
    assert colour_error["wavelet"] < colour_error["none"] and colour_error["adain"] < colour_error["none"]


@pytest.mark.slow
def test_tiled_restorer_agrees_with_untiled(restorers):
    restorer = restorers["tvt"]
    lr = _lr_photo(48)  # output 192², 2 x 2 tiles of 128 px
    with torch.no_grad():
        full = restorer(lr)
        tiled = {}
        for stats in ("tile", "image"):
            restorer.tile, restorer.tile_overlap, restorer.tile_norm_stats = 128, 64, stats
            tiled[stats] = restorer(lr)
        restorer.tile, restorer.tile_overlap, restorer.tile_norm_stats = None, 0, "tile"
    assert tiled["image"].shape == full.shape
    # The UNet's attention sees only its tile, so some difference remains (random weights).
    err = {stats: (out - full).abs().mean().item() for stats, out in tiled.items()}
    assert err["image"] < 0.03, err
    assert err["image"] < 0.5 * err["tile"], err


def test_save_load_round_trip_merges_lora(restorers, tmp_path):
    torch.manual_seed(4)
    vae = VAED4(**MINI_VAE_D4)
    unet = UNet2DConditionModel(**MINI_UNET)
    ce_unet = CEUNet.from_unet(unet)
    add_unet_lora(ce_unet.unet)
    with torch.no_grad():  # make the (zero-initialised) LoRA matter
        for name, p in ce_unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    prompt = NullPrompt(torch.randn(1, 77, MINI_UNET["cross_attention_dim"]))
    restorer = build_tvt_restorer(vae, ce_unet, color_fix="wavelet", prompt=prompt).eval()
    lr = torch.rand(1, 3, 12, 20, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = restorer(lr)
        restorer.save_pretrained_dir(tmp_path / "tvt")
        loaded = OneStepRestorer.from_pretrained_dir(tmp_path / "tvt").eval()
        after = loaded(lr)
    stored = json.loads((tmp_path / "tvt" / "restorer.json").read_text())
    assert stored == {
        "method": "tvt",
        "timestep": 1,
        "scale": 4,
        "color_fix": "wavelet",
        "prompt_embedding": "prompt_embedding.safetensors",
        "prompt": None,  # trained on no tags: `tvt sr` keeps the stored prompt
    }
    assert sorted(p.name for p in (tmp_path / "tvt").iterdir()) == [
        "prompt_embedding.safetensors",
        "restorer.json",
        "scheduler",
        "unet",
        "vae",
    ]
    assert isinstance(loaded.unet, CEUNet) and not any("lora" in k for k in loaded.state_dict())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded.prompt.embedding, prompt.embedding)


def test_loading_overrides_and_missing_files_are_explained(restorers, tmp_path):
    restorers["osediff"].save_pretrained_dir(tmp_path / "osediff")
    loaded = OneStepRestorer.from_pretrained_dir(tmp_path / "osediff", color_fix="none", tile=256)
    assert isinstance(loaded.vae, AutoencoderKL) and loaded.timestep == 999
    assert (loaded.color_fix, loaded.tile, loaded.tile_overlap) == ("none", 256, 64)
    with pytest.raises(FileNotFoundError, match="restorer.json is missing"):
        OneStepRestorer.from_pretrained_dir(tmp_path)


def test_configuration_errors_name_the_problem():
    torch.manual_seed(0)
    vae, unet = VAED4(**MINI_VAE_D4), UNet2DConditionModel(**MINI_UNET)
    with pytest.raises(ValueError, match="unknown colour fix 'lab'"):
        build_tvt_restorer(vae, unet, color_fix="lab")
    with pytest.raises(ValueError, match="unknown tile_norm_stats 'thumbnail'"):
        build_tvt_restorer(vae, unet, tile=256, tile_norm_stats="thumbnail")
    with pytest.raises(ValueError, match="tile must be a multiple of 64 px, got 200"):
        build_tvt_restorer(vae, unet, tile=200)
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 1000\)"):
        build_osediff_restorer(vae, unet, timestep=1000)
    eight_channel_vae = VAED4(**{**MINI_VAE_D4, "latent_channels": 8})
    with pytest.raises(ValueError, match="8 latent channels do not match the UNet's 4"):
        build_osediff_restorer(eight_channel_vae, unet)


def test_null_prompt_broadcasts_and_dape_explains_what_is_missing():
    zeros = NullPrompt.zeros(32)
    assert isinstance(zeros, PromptProvider)
    lr = torch.rand(3, 3, 8, 8)
    assert zeros(lr).shape == (3, 77, 32) and zeros(lr).abs().max() == 0
    fixed = NullPrompt(torch.arange(6.0).view(1, 2, 3))
    torch.testing.assert_close(fixed(lr)[2], torch.arange(6.0).view(2, 3))
    with pytest.raises(ValueError, match=r"\(1, L, D\)"):
        NullPrompt(torch.zeros(77, 32))
    with pytest.raises(RuntimeError, match="RAM Swin-L.*model hub.*NullPrompt"):
        DAPEPrompt()


def test_null_prompt_encodes_the_empty_prompt_once_with_a_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    class _Tokenizer:  # CLIP's tokenizer needs vocabulary files from the hub; ids suffice here
        model_max_length = 77

        def __call__(self, prompt, **kwargs):
            ids = torch.full((1, 77), 2, dtype=torch.long)
            ids[0, 0] = 1
            return type("Tokens", (), {"input_ids": ids})()

    torch.manual_seed(0)
    encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).eval()
    prompt = NullPrompt.from_text_encoder(_Tokenizer(), encoder)
    assert prompt.embedding.shape == (1, 77, 16) and not prompt.embedding.requires_grad
    torch.testing.assert_close(prompt(torch.zeros(2, 3, 4, 4))[1], prompt.embedding[0])
    assert prompt.embedding.std() > 0.1
