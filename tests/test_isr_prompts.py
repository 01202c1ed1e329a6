"""Stage 3 with tagged prompts (``isr.<name>.prompt``): tags of every training HR computed once and
cached, the official prompt and negative prompt through SD's text encoder, exact resume from the cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tvt import compat

compat.apply()

from safetensors.torch import load_file
from training_support import (  # noqa: F401
    RecordingRun,
    make_pairs_dir,
    one_thread,
    save_tiny_prior,
    save_tiny_text_encoder,
)

from tvt.models import prompts
from tvt.models.prompts import OFFICIAL_NEGATIVE_PROMPTS, ColourTagger, training_prompt
from tvt.models.sd_configs import MINI_VAE_D4
from tvt.models.vae_d4 import VAED4
from tvt.training import isr
from tvt.training.data import PairDataset

STEPS = 6


pytestmark = pytest.mark.usefixtures("random_lpips")  # tests/conftest.py


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Pairs of two photos, a mini SD snapshot with a tiny CLIP text encoder, a mini VAE-D4."""
    root = tmp_path_factory.mktemp("isr-prompts")
    make_pairs_dir(root / "pairs", 64, {"train": 2, "val": 2}, seed=3, n_photos=2)
    save_tiny_prior(root / "sd")
    save_tiny_text_encoder(root / "sd")
    VAED4(**MINI_VAE_D4).save_pretrained(root / "d4")
    return root


def section(**overrides) -> dict:
    return {"method": "tvt", "unet": "ce", "vae_encoder": "frozen", "timestep": 1, "t_vsd": [250, 750],
            "lora_rank": 4, "fake_lora_rank": 4, "lr": 1e-3, "fake_lr": 1e-3, "weight_decay": 1e-2,
            "lambda_l2": 1.0, "lambda_lpips": 2.0, "lambda_vsd": 1.0, "lpips_net": "alex", "cfg_scale": 7.5,
            "color_fix": "adain", "steps": STEPS, "batch_size": 2, "grad_clip": 1.0, "log_every": 1,
            "checkpoint_every": 3, "keep_checkpoints": 2, "sample_every": 0, "prompt": "colour", **overrides}


def train(workdir: Path, tag: str, run=None, **overrides) -> dict:
    cfg = {"mode": "mini", "seed": 7, "isr": {"tvt": section(**overrides)}}
    return isr.run_isr(cfg, "tvt", workdir / "pairs", workdir / "sd", workdir / "d4", workdir / f"out-{tag}",
                       workdir / f"ckpt-{tag}", run)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v for part in ("vae", "unet")
            for k, v in load_file(folder / part / "diffusion_pytorch_model.safetensors").items()}


@pytest.fixture(scope="module")
def trained(workdir):
    """A prompted run, recording every prompt the stage sends through the text encoder."""
    encoded: list[list[str]] = []
    real = isr.load_text_encoder

    def recording(folder, device):
        encode = real(folder, device)
        return lambda texts: (encoded.append(list(texts)), encode(texts))[1]

    run = RecordingRun()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(isr, "load_text_encoder", recording)
        train(workdir, "colour", run)
    return run, encoded


@pytest.mark.slow
def test_prompted_training_tags_each_hr_once_and_conditions_on_the_official_prompts(workdir, trained):
    run, encoded = trained
    assert len(run.series("isr_tvt/loss")) == STEPS
    # the reconstruction objective falls (the steps see one batch, with random flips and posterior samples)
    rec = [l2 + 2 * lpips for l2, lpips in zip(run.series("isr_tvt/l2"), run.series("isr_tvt/lpips"), strict=True)]
    assert sum(rec[-3:]) < sum(rec[:3]), rec
    # the teacher's CFG now runs between the tagged prompt and the official negative prompt: the fake
    # score, a copy of the teacher, no longer matches it at the first step (with the null prompt it does)
    assert run.series("isr_tvt/vsd")[0] > 0.01
    cache = json.loads((workdir / "ckpt-colour" / isr.TAGS_FILE).read_text())
    train_set = PairDataset(workdir / "pairs", "train", with_lr=False)
    hr = torch.stack([item["hr"] for item in train_set])
    expected = dict(zip((item["pair_id"] for item in train_set), ColourTagger()((hr + 1) / 2), strict=True))
    assert cache["tags"] == expected and cache["identity"]["tagger"] == "colour"
    assert len(set(expected.values())) == 2  # two photos, two tag sets
    # first the official TVT negative prompt, then every step the batch's "<tags>, " prompts
    assert encoded[0] == [OFFICIAL_NEGATIVE_PROMPTS["tvt"]]
    assert len(encoded) == 1 + STEPS
    for prompts_of_step in encoded[1:]:
        assert sorted(prompts_of_step) == sorted(training_prompt(t, "tvt") for t in expected.values())


@pytest.mark.slow
def test_resume_reuses_the_cached_tags_and_matches_the_uninterrupted_run(workdir, trained, monkeypatch):
    killed = workdir / "ckpt-killed"
    shutil.copytree(workdir / "ckpt-colour" / "checkpoint-3", killed / "checkpoint-3")
    shutil.copy(workdir / "ckpt-colour" / isr.TAGS_FILE, killed / isr.TAGS_FILE)

    def no_tagging(self, images):
        raise AssertionError("the cached tags were not reused")

    monkeypatch.setattr(prompts.ColourTagger, "__call__", no_tagging)
    train(workdir, "killed")
    full, resumed = weights(workdir / "out-colour"), weights(workdir / "out-killed")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_the_tag_cache_is_recomputed_for_another_tagger_or_other_data(workdir, tmp_path):
    dataset = PairDataset(workdir / "pairs", "train", with_lr=False)
    calls = []

    def make():
        calls.append(1)
        return lambda images: [f"tag{int(i)}" for i in range(len(images))]

    cache = tmp_path / isr.TAGS_FILE
    first = isr.training_tags(dataset, make, cache, {"tagger": "a"}, batch_size=2, device=torch.device("cpu"))
    assert sorted(first.values()) == ["tag0", "tag1"] and len(calls) == 1
    assert isr.training_tags(dataset, make, cache, {"tagger": "a"}, batch_size=2, device=torch.device("cpu")) == first
    assert len(calls) == 1  # read back
    isr.training_tags(dataset, make, cache, {"tagger": "b"}, batch_size=2, device=torch.device("cpu"))
    assert len(calls) == 2  # another tagger: tagged again


def test_prompts_need_the_text_encoder_and_ram_names_its_package(workdir, tmp_path):
    save_tiny_prior(tmp_path / "sd")  # the mini prior has no text encoder
    with pytest.raises(FileNotFoundError, match=r"no tokenizer/ or text_encoder/.*mini mode's prior has no text encoder"):
        prompts.load_text_encoder(tmp_path / "sd")
    with pytest.raises(RuntimeError, match=r"ram_swin_large_14m\.pth.*`ram` package \(pip install "
                                           r"git\+https://github\.com/xinyu1205/recognize-anything"):
        prompts.make_tagger("ram", ram_weights=tmp_path / "absent.pth")


@pytest.mark.slow
def test_the_saved_restorer_records_the_tagger_it_was_trained_with(tmp_path):
    """``tvt sr`` prompts it with that tagger and its code base's test-time positive prompt by default."""
    from diffusers import UNet2DConditionModel

    from tvt.models.restorer import OneStepRestorer, sd_noise_scheduler
    from tvt.models.sd_configs import MINI_UNET

    teacher = UNet2DConditionModel(**MINI_UNET)
    null = torch.zeros(1, 77, MINI_UNET["cross_attention_dim"])
    for prompt, expected in (("colour", {"tagger": "colour", "positive": prompts.OFFICIAL_POSITIVE_PROMPT}),
                             (None, None)):
        restorer = isr.build_generator("tvt", section(prompt=prompt), VAED4(**MINI_VAE_D4), teacher,
                                       sd_noise_scheduler(), null, 4)
        folder = restorer.save_pretrained_dir(tmp_path / str(prompt))
        assert json.loads((folder / "restorer.json").read_text())["prompt"] == expected
        loaded = OneStepRestorer.from_pretrained_dir(folder)
        assert loaded.prompt_recipe == (prompts.PromptRecipe(**expected) if expected else None)
        assert torch.equal(loaded.prompt.embedding, null)  # the stored embedding stays the null prompt
    assert prompts.default_positive_prompt("osediff") == ""  # OSEDiff's test script passes none
    assert prompts.default_positive_prompt("s4") == prompts.OFFICIAL_POSITIVE_PROMPT  # TVT's recipe, varied
