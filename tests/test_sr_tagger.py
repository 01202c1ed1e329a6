"""``tvt sr --tagger``: tags of the upsampled LR condition the restorer through SD's text encoder and are
written beside every output; a tagger that cannot run is a usage error naming what to install."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sample_photos import photo
from training_support import one_thread, save_tiny_text_encoder  # noqa: F401

from tvt import compat

compat.apply()

from diffusers import AutoencoderKL, UNet2DConditionModel

from tvt import sr
from tvt.models import prompts
from tvt.models.restorer import OneStepRestorer, build_osediff_restorer
from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D8


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A random mini OSEDiff restorer folder that also holds a tiny CLIP tokenizer and text encoder."""
    folder = tmp_path_factory.mktemp("sr-tagger") / "osediff"
    torch.manual_seed(0)
    build_osediff_restorer(AutoencoderKL(**MINI_VAE_D8), UNet2DConditionModel(**MINI_UNET)).save_pretrained_dir(folder)
    save_tiny_text_encoder(folder)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lr")
    for name in ("coffee", "chelsea"):
        photo(name, 64).resize((16, 16), Image.BICUBIC).save(folder / f"{name}.png")
    return folder


def run_sr(capsys, *argv) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="tvt sr")
    sr.add_arguments(parser)
    code = sr.main(parser.parse_args([str(a) for a in argv]))
    return code, capsys.readouterr().err


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_the_choices_are_the_taggers_that_exist():
    assert sr.TAGGER_CHOICES == ("none", *prompts.TAGGERS)


def test_tags_are_written_beside_each_output_and_the_prompt_changes_the_output(weights, inputs, tmp_path, capsys):
    common = (inputs, "--weights", weights, "--device", "cpu", "--threads", "1")
    assert run_sr(capsys, *common, "-o", tmp_path / "tagged", "--tagger", "colour")[0] == 0
    for name in ("coffee", "chelsea"):
        record = json.loads((tmp_path / "tagged" / f"{name}.png.tags.json").read_text())
        lr = torch.from_numpy(np.asarray(Image.open(inputs / f"{name}.png"), dtype=np.float32) / 255)
        up = torch.nn.functional.interpolate(lr.permute(2, 0, 1)[None], scale_factor=4, mode="bicubic").clamp(0, 1)
        # an OSEDiff restorer: OSEDiff's test script has no positive prompt (TVT's would add "clean, ...")
        assert record == {"tagger": "colour", "tags": prompts.ColourTagger()(up)[0], "prompt": f"{record['tags']}, ,"}
    coffee, chelsea = (json.loads((tmp_path / "tagged" / f"{n}.png.tags.json").read_text())["tags"]
                       for n in ("coffee", "chelsea"))
    assert coffee != chelsea  # tags read off each image

    assert run_sr(capsys, *common, "-o", tmp_path / "other", "--tagger", "colour", "--prompt", "blurry, noisy")[0] == 0
    assert json.loads((tmp_path / "other" / "coffee.png.tags.json").read_text())["prompt"].endswith(", blurry, noisy,")
    assert run_sr(capsys, *common, "-o", tmp_path / "null")[0] == 0
    assert not list((tmp_path / "null").glob("*.json"))  # the stored null prompt: nothing to record
    tagged, other, null = (pixels(tmp_path / d / "coffee.png") for d in ("tagged", "other", "null"))
    assert np.abs(tagged - other).max() > 0 and np.abs(tagged - null).max() > 0  # the prompt reaches the UNet


def test_a_tagger_that_cannot_run_names_what_to_install(weights, inputs, tmp_path, capsys):
    code, err = run_sr(capsys, inputs, "-o", tmp_path / "ram", "--weights", weights, "--tagger", "ram",
                       "--ram-weights", tmp_path / "ram_swin_large_14m.pth")
    assert code == sr.EXIT_USAGE and "`ram` package" in err and "recognize-anything" in err
    assert "ram_swin_large_14m.pth" in err and not (tmp_path / "ram").exists()
    code, err = run_sr(capsys, inputs, "-o", tmp_path / "dape", "--weights", weights, "--tagger", "dape")
    assert code == sr.EXIT_USAGE and "DAPE.pth" in err
    bare = tmp_path / "bare"
    torch.manual_seed(0)
    build_osediff_restorer(AutoencoderKL(**MINI_VAE_D8), UNet2DConditionModel(**MINI_UNET)).save_pretrained_dir(bare)
    code, err = run_sr(capsys, inputs, "-o", tmp_path / "no-clip", "--weights", bare, "--tagger", "colour")
    assert code == sr.EXIT_USAGE and "tokenizer/ or text_encoder/" in err and "--text-encoder" in err
    code, _ = run_sr(capsys, inputs, "-o", tmp_path / "clip", "--weights", bare, "--tagger", "colour",
                     "--text-encoder", weights)
    assert code == 0 and (tmp_path / "clip" / "coffee.png.tags.json").is_file()


def _with_recipe(weights: Path, folder: Path, recipe: dict | None) -> Path:
    """A copy of ``weights`` whose restorer.json records ``recipe`` as its prompt (None: the key removed, as in
    folders saved before it existed)."""
    shutil.copytree(weights, folder)
    config = json.loads((folder / "restorer.json").read_text())
    if recipe is None:
        del config["prompt"]
    else:
        config["prompt"] = recipe
    (folder / "restorer.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_a_restorer_trained_on_tags_is_prompted_with_its_tagger_by_default(weights, inputs, tmp_path, capsys):
    assert json.loads((weights / "restorer.json").read_text())["prompt"] is None  # saved with the null prompt
    trained = _with_recipe(weights, tmp_path / "trained", {"tagger": "colour", "positive": "sharp"})
    assert OneStepRestorer.from_pretrained_dir(trained).prompt_recipe == prompts.PromptRecipe("colour", "sharp")
    common = (inputs, "--weights", trained, "--device", "cpu", "--threads", "1")
    code, err = run_sr(capsys, *common, "-o", tmp_path / "default")
    assert code == 0 and err.count("trained on colour tags") == 1 and "'<tags>, sharp,'" in err
    record = json.loads((tmp_path / "default" / "coffee.png.tags.json").read_text())
    assert record["tagger"] == "colour" and record["prompt"] == f"{record['tags']}, sharp,"
    assert run_sr(capsys, *common, "-o", tmp_path / "forced", "--tagger", "none")[0] == 0
    assert not list((tmp_path / "forced").glob("*.json"))
    assert run_sr(capsys, inputs, "--weights", weights, "-o", tmp_path / "null")[0] == 0
    default, forced, null = (pixels(tmp_path / d / "coffee.png") for d in ("default", "forced", "null"))
    assert np.array_equal(forced, null) and np.abs(default - null).max() > 0


def test_a_stored_tagger_that_cannot_run_is_a_usage_error_naming_the_way_out(weights, inputs, tmp_path, capsys):
    trained = _with_recipe(weights, tmp_path / "ram", {"tagger": "ram", "positive": "clean, high-resolution, 8k"})
    code, err = run_sr(capsys, inputs, "--weights", trained, "-o", tmp_path / "out")
    assert code == sr.EXIT_USAGE and not (tmp_path / "out").exists()
    assert "restorer.json's prompt (tagger 'ram'; --tagger none: the null prompt)" in err
    assert "`ram` package" in err and "ram_swin_large_14m.pth" in err
    assert run_sr(capsys, inputs, "--weights", trained, "-o", tmp_path / "null", "--tagger", "none")[0] == 0


def test_folders_saved_before_the_prompt_record_load_with_the_null_prompt(weights, tmp_path):
    old = _with_recipe(weights, tmp_path / "old", None)
    assert OneStepRestorer.from_pretrained_dir(old).prompt_recipe is None
    broken = _with_recipe(weights, tmp_path / "broken", {"tagger": "clip", "positive": ""})
    with pytest.raises(ValueError, match="unknown tagger 'clip'"):
        OneStepRestorer.from_pretrained_dir(broken)
    with pytest.raises(ValueError, match=r"restorer.json 'prompt': expected null or"):
        OneStepRestorer.from_pretrained_dir(_with_recipe(weights, tmp_path / "odd", {"tagger": "ram"}))
