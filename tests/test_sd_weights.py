"""Paper-mode SD weights: the revision must be a pinned commit and the snapshot SD 2.1-base."""

from __future__ import annotations

import copy
import json

import pytest

from tvt import config
from tvt.config import ConfigError
from tvt.models.sd_configs import MINI_UNET, SD21_BASE_UNET, SD21_BASE_VAE
from tvt.models.sd_weights import check_sd_architecture

PAPER = config.load(config.REPO_ROOT / "config" / "paper.yaml")


def test_paper_config_pins_a_commit():
    assert len(PAPER["prior"]["revision"]) == 40


@pytest.mark.parametrize("revision", ["main", "fp16", "5ede9e4"])
def test_branch_or_short_revision_is_refused(revision):
    cfg = copy.deepcopy(PAPER)
    cfg["prior"]["revision"] = revision
    with pytest.raises(ConfigError) as info:
        config.validate(cfg, "paper.yaml")
    assert f"paper.yaml: prior.revision: {revision!r} is not valid here: hub: the 40-hex commit" in str(info.value)


def _snapshot(root, unet: dict, vae: dict):
    for sub, conf in (("unet", unet), ("vae", vae)):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text(json.dumps({"_class_name": "x", **conf, "sample_size": 512}))
    return root


def test_sd21_base_snapshot_is_accepted(tmp_path):
    check_sd_architecture(_snapshot(tmp_path, SD21_BASE_UNET, SD21_BASE_VAE))


def test_other_architecture_is_refused_naming_the_keys(tmp_path):
    sd15_like = {**SD21_BASE_UNET, "cross_attention_dim": 768, "use_linear_projection": False}
    with pytest.raises(ValueError, match=r"unet/config.json: not SD 2.1-base's unet: cross_attention_dim=768 "
                                         r"\(expected 1024\); use_linear_projection=False"):
        check_sd_architecture(_snapshot(tmp_path, sd15_like, SD21_BASE_VAE))


def test_mini_prior_is_not_sd21(tmp_path):
    with pytest.raises(ValueError, match="block_out_channels"):
        check_sd_architecture(_snapshot(tmp_path, MINI_UNET, SD21_BASE_VAE))


def test_missing_config_is_named(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="unet/config.json: missing from the SD snapshot"):
        check_sd_architecture(tmp_path)
