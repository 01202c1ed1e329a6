"""`tvt import osediff`: osediff.pkl (peft LoRA on SD 2.1's UNet and VAE encoder) merges into a
plain restorer that computes what the official adapters compute."""

from __future__ import annotations

import copy

import pytest
import torch

from tvt import compat

compat.apply()

from official_support import add_release_adapters, perturb_, unet_lora_modules, vae_lora_modules
from training_support import one_thread, save_tiny_prior  # noqa: F401

from tvt.models.restorer import OSEDIFF_TIMESTEP, OneStepRestorer
from tvt.models.saved import load_restorer
from tvt.official.checkpoint import OfficialFormatError
from tvt.official.osediff import import_osediff

RANK = 4


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("osediff_release")
    vae, unet = save_tiny_prior(root / "sd")
    groups = unet_lora_modules(unet, decoder_has_conv_out=True)
    unet = add_release_adapters(copy.deepcopy(unet), groups, RANK, seed=1).eval()
    perturb_(unet, "conv_in", seed=2)  # trained in full as well as through LoRA
    vae_modules = vae_lora_modules(vae)
    vae = add_release_adapters(copy.deepcopy(vae), {"default_encoder": vae_modules}, RANK, seed=3).eval()
    torch.save(
        {
            "vae_lora_encoder_modules": vae_modules,
            "unet_lora_encoder_modules": groups["default_encoder"],
            "unet_lora_decoder_modules": groups["default_decoder"],
            "unet_lora_others_modules": groups["default_others"],
            "rank_unet": RANK,
            "rank_vae": RANK,
            "state_dict_unet": {k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
            "state_dict_vae": {k: v for k, v in vae.state_dict().items() if "lora" in k},
        },
        root / "osediff.pkl",
    )
    return root, vae, unet


@pytest.fixture(scope="module")
def imported(release, tmp_path_factory):
    root, _, _ = release
    return import_osediff(root / "osediff.pkl", root / "sd", tmp_path_factory.mktemp("osediff_official") / "r")


def test_every_lora_and_full_weight_is_consumed(release, imported):
    root, _, _ = release
    _, report = imported
    (part,) = report["sources"]
    saved = torch.load(root / "osediff.pkl", weights_only=True)
    assert part["keys"] == part["consumed"] == len(saved["state_dict_unet"]) + len(saved["state_dict_vae"])
    assert part["lora"] == {"rank_unet": RANK, "rank_vae": RANK, "alpha": 8}


def test_merged_weights_are_w_plus_alpha_over_r_b_a(release, imported):
    root, _, _ = release
    folder, _ = imported
    restorer = load_restorer(folder)
    base = torch.load(root / "osediff.pkl", weights_only=True)["state_dict_unet"]
    plain_unet = restorer.unet.state_dict()
    from diffusers import UNet2DConditionModel

    sd_unet = UNet2DConditionModel.from_pretrained(root / "sd" / "unet").state_dict()
    for module in ("down_blocks.0.resnets.0.conv1", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"):
        adapter = "default_encoder" if module.startswith("down") else "default_others"
        a, b = base[f"{module}.lora_A.{adapter}.weight"], base[f"{module}.lora_B.{adapter}.weight"]
        expected = sd_unet[f"{module}.weight"] + (8 / RANK) * (b.flatten(1) @ a.flatten(1)).reshape(
            sd_unet[f"{module}.weight"].shape
        )
        torch.testing.assert_close(plain_unet[f"{module}.weight"], expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(plain_unet["conv_in.bias"], base["conv_in.base_layer.bias"])


def test_the_merged_restorer_equals_the_adapters_running_unmerged(release, imported):
    _, vae, unet = release
    folder, _ = imported
    restorer = load_restorer(folder).eval()
    assert restorer.timestep == OSEDIFF_TIMESTEP and restorer.method == "osediff_official"
    reference = OneStepRestorer(vae, unet, method="reference", timestep=OSEDIFF_TIMESTEP, prompt=restorer.prompt).eval()
    lr = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, theirs = restorer(lr), reference(lr)
        unet.disable_adapters(), vae.disable_adapters()
        without = reference(lr)
        unet.enable_adapters(), vae.enable_adapters()
    assert (theirs - without).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_a_pkl_with_an_unlisted_or_foreign_layout_is_refused_by_name(release, tmp_path):
    root, _, _ = release
    saved = torch.load(root / "osediff.pkl", weights_only=True)
    dropped = saved["unet_lora_others_modules"].pop()
    torch.save(saved, tmp_path / "unlisted.pkl")
    with pytest.raises(OfficialFormatError, match="belong to no listed module") as error:
        import_osediff(tmp_path / "unlisted.pkl", root / "sd", tmp_path / "out")
    assert dropped in str(error.value)
    torch.save({"state_dict": {}}, tmp_path / "foreign.pkl")
    with pytest.raises(OfficialFormatError, match=r"8 missing \(rank_unet, rank_vae, state_dict_unet"):
        import_osediff(tmp_path / "foreign.pkl", root / "sd", tmp_path / "out")


@pytest.mark.slow
def test_the_pipeline_stage_refuses_an_unpinned_file_then_pins_and_imports_it(release, tmp_path):
    import shutil

    from tvt.data.download import DownloadError, sha256_of
    from tvt.official import run_official_stage

    root, _, _ = release
    out, downloads = tmp_path / "official_osediff", tmp_path / "downloads"

    def stage(run, opts):
        run_official_stage("osediff", cfg, run, opts, root / "sd", out, downloads)
    spec = {"url": (root / "osediff.pkl").as_uri(), "sha256": None}
    cfg = {"official": {"osediff": {"files": {"pkl": spec}}}}

    class Run:
        metrics, artifacts = {}, []

        def log_metrics(self, metrics, step=None):
            self.metrics.update(metrics)

        def log_artifact(self, path, folder=None):
            self.artifacts.append(path)

    with pytest.raises(DownloadError, match="sha256"):
        stage(Run(), {})
    run = Run()
    stage(run, {"trust_new_hashes": True})
    assert run.metrics["keys"] == run.metrics["keys_consumed"] > 0
    assert load_restorer(out).method == "osediff_official"
    spec["sha256"] = "0" * 64  # a pinned hash that the file does not have
    shutil.rmtree(downloads)
    shutil.rmtree(out)
    with pytest.raises(DownloadError, match=sha256_of(root / "osediff.pkl")[:12]):
        stage(Run(), {})
