"""`tvt import tvt`: a synthetic release in the official layout converts to a restorer that computes
what the official model computes, with every key accounted for."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tvt import compat

compat.apply()

from diffusers import UNet2DConditionModel
from official_support import add_release_adapters, perturb_, save_lightning_checkpoint, unet_lora_modules
from training_support import one_thread, save_tiny_prior  # noqa: F401

from tvt.models.ce_unet import CEUNet
from tvt.models.restorer import TVT_TIMESTEP, OneStepRestorer
from tvt.models.saved import load_restorer
from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D4
from tvt.models.vae_d4 import VAED4
from tvt.official.checkpoint import OfficialFormatError, load_checkpoint
from tvt.official.common import sd_prompt_embedding
from tvt.official.tvt import import_tvt

# the official five-level TVT UNet at mini size: SD's levels plus a replica of the first in front
FIVE_LEVEL_UNET = {
    **MINI_UNET,
    "block_out_channels": (32, 32, 64, 64, 64),
    "down_block_types": ("CrossAttnDownBlock2D",) * 4 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 4,
    "attention_head_dim": (2, 2, 4, 4, 4),
}
FULLY_TRAINED = ("down_blocks.0", "up_blocks.3.upsamplers.0", "up_blocks.4", "conv_in", "conv_out")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """vae.ckpt, TVTUNet/unet/ and model_TVT.pkl as the official code writes them, plus the reference models."""
    root = tmp_path_factory.mktemp("tvt_release")
    save_tiny_prior(root / "sd")
    torch.manual_seed(0)
    vae = VAED4(**MINI_VAE_D4).eval()
    save_lightning_checkpoint(
        root / "vae.ckpt",
        {
            **{f"vaeDe4.{k}": v for k, v in vae.state_dict().items()},
            "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),  # a training-only module
        },
    )
    unet = UNet2DConditionModel(**FIVE_LEVEL_UNET)
    unet.save_pretrained(root / "TVTUNet" / "unet")  # the initialisation the release ships
    groups = unet_lora_modules(unet, decoder_has_conv_out=False)
    trained = add_release_adapters(copy.deepcopy(unet), groups, rank=4, seed=1).eval()
    for pattern in FULLY_TRAINED:
        perturb_(trained, pattern, seed=len(pattern))
    state = {k: v for k, v in trained.state_dict().items() if "lora" in k or any(p in k for p in FULLY_TRAINED)}
    torch.save(
        {
            "unet_lora_encoder_modules": groups["default_encoder"],
            "unet_lora_decoder_modules": groups["default_decoder"],
            "unet_lora_others_modules": groups["default_others"],
            "rank_unet": 4,
            "state_dict_unet": state,
        },
        root / "model_TVT.pkl",
    )
    return root, vae, trained


def convert(root, out, **files):
    paths = {"vae_ckpt": root / "vae.ckpt", "unet_dir": root / "TVTUNet", "pkl": root / "model_TVT.pkl", **files}
    return import_tvt(**paths, sd_dir=root / "sd", out_dir=out, vae_config=MINI_VAE_D4)


@pytest.fixture(scope="module")
def imported(release, tmp_path_factory):
    root, _, _ = release
    return convert(root, tmp_path_factory.mktemp("tvt_official") / "restorer")


def test_every_key_is_consumed_or_ignored_with_its_reason(release, imported):
    root, vae, _ = release
    _, report = imported
    vae_part, unet_part = report["sources"]
    assert vae_part["consumed"] == len(vae.state_dict()) and vae_part["keys"] == len(vae.state_dict()) + 1
    assert [entry["keys"] for entry in vae_part["ignored"]] == [1] and "loss" in vae_part["ignored"][0]["reason"]
    saved = torch.load(root / "model_TVT.pkl", weights_only=True)["state_dict_unet"]
    assert unet_part["keys"] == unet_part["consumed"] == len(saved) and unet_part["ignored"] == []


def test_the_converted_restorer_computes_what_the_official_model_computes(release, imported):
    root, vae, trained = release
    folder, _ = imported
    restorer = load_restorer(folder).eval()
    assert isinstance(restorer.unet, CEUNet) and restorer.timestep == TVT_TIMESTEP == 1
    assert restorer.method == "tvt_official"
    for key, value in vae.state_dict().items():  # prefix stripped, nothing altered
        assert torch.equal(restorer.vae.state_dict()[key], value), key
    # the reference: the five-level UNet with the three peft adapters active, unmerged
    prompt = sd_prompt_embedding(root / "sd")
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        official = trained(z, TVT_TIMESTEP, prompt.expand(2, -1, -1)).sample
        ours = restorer.unet(z, TVT_TIMESTEP, prompt.expand(2, -1, -1)).sample
        plain = UNet2DConditionModel.from_pretrained(root / "TVTUNet" / "unet")(
            z, TVT_TIMESTEP, prompt.expand(2, -1, -1)
        ).sample
    assert (official - plain).abs().max() > 1e-2  # the adapters and fine-tuned ends change the output
    torch.testing.assert_close(ours, official, atol=2e-5, rtol=1e-4)
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    reference = OneStepRestorer(
        vae, trained, method="reference", timestep=TVT_TIMESTEP, color_fix="adain", prompt=restorer.prompt
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(restorer(lr), reference(lr), atol=1e-4, rtol=1e-4)


def test_a_damaged_pkl_names_the_missing_lora_weight(release, tmp_path):
    root, _, _ = release
    release_dict = torch.load(root / "model_TVT.pkl", weights_only=True)
    lost = next(k for k in release_dict["state_dict_unet"] if ".lora_B.default_decoder." in k)
    del release_dict["state_dict_unet"][lost]
    torch.save(release_dict, tmp_path / "damaged.pkl")
    with pytest.raises(OfficialFormatError, match="LoRA modules listed in the file have no weights") as error:
        convert(root, tmp_path / "out", pkl=tmp_path / "damaged.pkl")
    assert lost.split(".lora_B.")[0] in str(error.value)


def test_a_foreign_or_truncated_vae_checkpoint_is_refused_by_name(release, tmp_path):
    root, _, _ = release
    ckpt = load_checkpoint(root / "vae.ckpt")
    ckpt["state_dict"].pop("vaeDe4.decoder.conv_out.weight")
    save_lightning_checkpoint(tmp_path / "truncated.ckpt", ckpt["state_dict"])
    with pytest.raises(OfficialFormatError, match=r"1 missing \(decoder\.conv_out\.weight\)"):
        convert(root, tmp_path / "out", vae_ckpt=tmp_path / "truncated.ckpt")
    with pytest.raises(OfficialFormatError, match="unet_lora_encoder_modules"):  # the pkl is not a Lightning file
        convert(root, tmp_path / "out", vae_ckpt=root / "model_TVT.pkl")


@pytest.mark.slow
def test_tvt_import_then_tvt_sr_restores_on_cpu_in_fp32_and_bf16(release, tmp_path, capsys):
    import json

    from PIL import Image
    from skimage import data

    from tvt.cli import main

    root, _, _ = release
    folder = tmp_path / "tvt_official"
    assert (
        main(
            [
                "import",
                "tvt",
                "--vae-ckpt",
                str(root / "vae.ckpt"),
                "--unet-dir",
                str(root / "TVTUNet"),
                "--pkl",
                str(root / "model_TVT.pkl"),
                "--sd",
                str(root / "sd"),
                "--out",
                str(folder),
                "--size",
                "mini",
            ]
        )
        == 0
    )
    report = json.loads((folder / "import_report.json").read_text())
    assert set(report["files"]) == {"vae_ckpt", "pkl"} and len(report["files"]["pkl"]["sha256"]) == 64
    assert "null" in report["prompt"]
    assert (
        main(
            [
                "import",
                "tvt",
                "--vae-ckpt",
                str(root / "model_TVT.pkl"),
                "--unet-dir",
                str(root / "TVTUNet"),
                "--pkl",
                str(root / "model_TVT.pkl"),
                "--sd",
                str(root / "sd"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 1
    )
    assert "error:" in capsys.readouterr().err
    Image.fromarray(data.astronaut()[::32, ::32][:12, :12]).save(tmp_path / "lr.png")
    outputs = {}
    for dtype in ("fp32", "bf16"):
        assert (
            main(
                [
                    "sr",
                    str(tmp_path / "lr.png"),
                    "-o",
                    str(tmp_path / dtype),
                    "--weights",
                    str(folder),
                    "--device",
                    "cpu",
                    "--dtype",
                    dtype,
                ]
            )
            == 0
        )
        outputs[dtype] = np.asarray(Image.open(tmp_path / dtype / "lr.png"), dtype=np.float32)
        assert outputs[dtype].shape == (48, 48, 3)
    assert np.abs(outputs["fp32"] - outputs["bf16"]).mean() < 8  # bf16 rounds, but restores the same image


def test_at_paper_size_the_five_level_unet_renames_onto_ce_unet_key_for_key():
    """SD 2.1-base with a replicated first level (the presumed TVTUNet config) on the meta device."""
    from tvt.models.sd_configs import SD21_BASE_UNET
    from tvt.official.tvt import five_level_to_ce_unet, inner_unet_config

    config = {
        **SD21_BASE_UNET,
        "block_out_channels": (320, 320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 4 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 4,
        "attention_head_dim": (5, 5, 10, 20, 20),
    }
    with torch.device("meta"):
        official = UNet2DConditionModel(**config).state_dict()
        ours = CEUNet(unet_config=inner_unet_config(config)).state_dict()
    renamed = {five_level_to_ce_unet(k, 5): tuple(v.shape) for k, v in official.items()}
    assert len(renamed) == len(official) == len(ours)
    assert renamed == {k: tuple(v.shape) for k, v in ours.items()}
