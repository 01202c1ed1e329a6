"""``evaluate.tagger``: the evaluation prompts a one-step restorer with tags of each upsampled LR through
``tvt sr``'s path, writes the tags of every output, records the prompt, and keys its results by it."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from PIL import Image
from sample_photos import photo
from training_support import save_tiny_text_encoder

from tvt import compat

compat.apply()

from diffusers import AutoencoderKL, UNet2DConditionModel

from tvt import config, stages
from tvt import evaluate as ev
from tvt.data.manifest import sha256_file, write_manifest
from tvt.degradation import PAIR_COLUMNS
from tvt.models.prompts import ColourTagger
from tvt.models.restorer import build_osediff_restorer
from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D8

PHOTOS = ("coffee", "chelsea")


class Run:
    """What the stage run is told, kept for nothing: MLflow is not under test here."""

    def log_metrics(self, metrics):
        pass

    def set_tags(self, tags):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One mini OSEDiff restorer scored twice in one evaluation: ``plain`` (its stored null prompt) and
    ``tagged`` (colour tags, encoded by a tiny CLIP text encoder kept apart, like the pipeline's prior)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("evaluate-prompts")
    torch.manual_seed(0)
    restorer = tmp / "restorer"
    build_osediff_restorer(AutoencoderKL(**MINI_VAE_D8), UNet2DConditionModel(**MINI_UNET)).save_pretrained_dir(
        restorer
    )
    save_tiny_text_encoder(tmp / "sd")
    rows = []
    for name in PHOTOS:
        hr = photo(name, 64)
        for kind, image in (("hr", hr), ("lr", hr.resize((16, 16), Image.BICUBIC))):
            (tmp / "pairs" / kind).mkdir(parents=True, exist_ok=True)
            image.save(tmp / "pairs" / kind / f"{name}.png")
        rows.append(
            {
                "pair_id": name,
                "source_id": name,
                "split": "test",
                "kind": "photo",
                "hr_path": f"hr/{name}.png",
                "lr_path": f"lr/{name}.png",
                "hr_sha256": sha256_file(tmp / "pairs" / "hr" / f"{name}.png"),
                "lr_sha256": sha256_file(tmp / "pairs" / "lr" / f"{name}.png"),
                "crop_x": 0,
                "crop_y": 0,
                "text": "",
                "text_px": None,
                "lang": "",
                "font": "",
                "params": "{}",
            }
        )
    pairs = write_manifest(rows, tmp / "pairs" / "pairs.csv", PAIR_COLUMNS)
    cfg = {
        "mode": "mini",
        "seed": 1,
        "degrade": {"scale": 4},
        "isr": {"plain": {}, "tagged": {}},
        "evaluate": {
            "methods": ["plain", "tagged"],
            "crop_border": 0,
            "metrics": ["psnr_y"],
            "ocr": False,
            "figure_pairs": 0,
            "register_models": False,
            "tagger": {"tagged": "colour"},
        },
    }
    tables = tmp / "results" / "tables"
    tables.mkdir(parents=True)
    summary = ev.evaluate(
        cfg,
        pairs,
        tables,
        tmp / "results" / "metrics.json",
        Run(),
        model_dirs={"plain": restorer, "tagged": restorer},
        text_encoder=tmp / "sd",
    )
    return {"summary": summary, "tmp": tmp, "tables": tables, "pairs": pairs}


def test_tags_of_each_upsampled_lr_are_written_for_every_output(evaluated):
    tags_dir = evaluated["tables"] / "tags"
    assert sorted(p.relative_to(tags_dir).as_posix() for p in tags_dir.rglob("*.json")) == [
        f"tagged/{name}.png.tags.json" for name in sorted(PHOTOS)
    ]  # the null prompt has none to write
    written = {}
    for name in PHOTOS:
        lr = ev.load_image(evaluated["pairs"].parent / "lr" / f"{name}.png")
        upsampled = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(0, 1)
        tags = ColourTagger()(upsampled)[0]
        written[name] = json.loads((tags_dir / "tagged" / f"{name}.png.tags.json").read_text())
        # OSEDiff's test script has no positive prompt: "<tags>, ,"
        assert written[name] == {"tagger": "colour", "tags": tags, "prompt": f"{tags}, ,"}
    assert written["coffee"]["tags"] != written["chelsea"]["tags"]


def test_the_prompt_changes_the_scores_and_is_recorded(evaluated):
    summary = evaluated["summary"]
    assert summary["prompts"] == {
        "plain": {"prompt": "null"},
        "tagged": {"prompt": "tags", "tagger": "colour", "format": "<tags>, ,"},
    }
    assert json.loads((evaluated["tmp"] / "results" / "metrics.json").read_text())["prompts"] == summary["prompts"]
    assert (
        'Prompts: plain: null; tagged: colour tags, "<tags>, ,".' in (evaluated["tables"] / "table2_all.md").read_text()
    )
    with open(evaluated["tables"] / "per_image.csv", newline="") as fh:
        psnr = {(r["method"], r["pair_id"]): float(r["psnr_y"]) for r in csv.DictReader(fh)}
    for name in PHOTOS:  # the same weights, another prompt: another output
        assert abs(psnr["plain", name] - psnr["tagged", name]) > 1e-3, psnr


def test_a_tagger_that_cannot_run_names_the_method_and_what_is_missing(evaluated, tmp_path):
    cfg = {
        "degrade": {"scale": 4},
        "isr": {"tvt": {}},
        "evaluate": {"methods": ["tvt"], "tagger": {"default": "ram"}, "ram_weights": str(tmp_path / "ram.pth")},
    }
    restorer = evaluated["tmp"] / "restorer"
    with pytest.raises(RuntimeError, match=r"evaluate.tagger: method 'tvt' with ram tags: .*ram_swin_large_14m\.pth"):
        ev.build_method("tvt", cfg, model_dir=restorer, text_encoder=evaluated["tmp"] / "sd")
    cfg["evaluate"]["tagger"] = {"tvt": "colour"}
    with pytest.raises(RuntimeError, match=r"method 'tvt' with colour tags: .*no tokenizer/ or text_encoder/"):
        ev.build_method("tvt", cfg, model_dir=restorer)  # the restorer folder holds no text encoder


def test_the_evaluation_key_follows_the_prompt_choice_and_training_keys_do_not():
    ci = config.load(config.REPO_ROOT / "config" / "ci.yaml")
    tagged = copy.deepcopy(ci)
    tagged["evaluate"]["tagger"] = {"tvt": "colour"}
    before, after = ({s.name: s for s in stages.build_stages(config.validate(c))} for c in (ci, tagged))
    assert after["evaluate"].key != before["evaluate"].key
    assert "prior" in after["evaluate"].needs and "prior" not in before["evaluate"].needs  # its text encoder
    assert all(after[name].key == stage.key for name, stage in before.items() if name != "evaluate")
