"""The prompt path end to end with an offline tagger: tags of the upsampled LR → official prompt
format → CLIP text encoder → UNet conditioning, and the tags written beside the output."""

from __future__ import annotations

import json

import pytest
import torch

from tvt import compat

compat.apply()

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tvt.models.prompts import (
    OFFICIAL_NEGATIVE_PROMPTS,
    ColourTagger,
    DAPEPrompt,
    NullPrompt,
    TaggedPrompt,
    clip_text_encoder,
    describe_prompt,
    inference_prompt,
    save_character_tokenizer,
    training_prompt,
    write_tags,
)
from tvt.models.restorer import build_osediff_restorer
from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D8


def brightness_tagger(images: torch.Tensor) -> list[str]:
    """An extractor that runs offline: one tag per image from its mean brightness and dominant channel."""
    tags = []
    for image in images:
        colour = ("red", "green", "blue")[int(image.mean(dim=(1, 2)).argmax())]
        tags.append(f"{'bright' if image.mean() > 0.5 else 'dark'}, {colour}")
    return tags


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny CLIP tokenizer (single characters: CLIP's BPE vocabulary is on the hub) and text encoder."""
    tokenizer = save_character_tokenizer(tmp_path_factory.mktemp("clip"))
    torch.manual_seed(0)
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=MINI_UNET["cross_attention_dim"],
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            eos_token_id=1,
            bos_token_id=0,
            pad_token_id=1,
        )
    ).eval()
    return tokenizer, encoder


def images(seed: int, brightness: float) -> torch.Tensor:
    return (torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.4 + brightness).clamp(0, 1)


def test_tags_of_the_upsampled_lr_become_the_official_prompt_and_its_embedding(clip):
    encode = clip_text_encoder(*clip)
    prompt = TaggedPrompt(brightness_tagger, encode)
    lr = torch.cat([images(0, 0.55), images(1, 0.05)])
    embeds = prompt(lr)
    assert prompt.last_tags == [
        "bright, " + prompt.last_tags[0].split(", ")[1],
        "dark, " + prompt.last_tags[1].split(", ")[1],
    ]
    assert prompt.last_prompts[0] == f"{prompt.last_tags[0]}, clean, high-resolution, 8k,"
    assert embeds.shape == (2, 77, MINI_UNET["cross_attention_dim"])
    torch.testing.assert_close(embeds, encode(prompt.last_prompts))
    assert (embeds[0] - embeds[1]).abs().max() > 1e-3  # other tags, other conditioning
    with pytest.raises(ValueError, match="returned 1 tag strings for 2 images"):
        TaggedPrompt(lambda x: ["one"], encode)(lr)


def test_the_restorer_is_conditioned_on_each_images_tags_and_they_are_written_beside_it(clip, tmp_path):
    torch.manual_seed(0)
    restorer = build_osediff_restorer(AutoencoderKL(**MINI_VAE_D8), UNet2DConditionModel(**MINI_UNET)).eval()
    encode = clip_text_encoder(*clip)
    null = NullPrompt(encode([""]))
    tagged = TaggedPrompt(brightness_tagger, encode)
    lr = images(2, 0.6)
    with torch.no_grad():
        restorer.prompt = null
        plain = restorer(lr)
        restorer.prompt = tagged
        conditioned = restorer(lr)
    assert not torch.allclose(plain, conditioned, atol=1e-4)  # the tags reach the UNet
    output = tmp_path / "img.png"
    written = write_tags(output, tagged.tagger_name, tagged.last_tags[0], tagged.last_prompts[0])
    assert written == tmp_path / "img.png.tags.json"
    assert json.loads(written.read_text()) == {"tagger": "brightness_tagger", "tags": tagged.last_tags[0],
                                               "prompt": tagged.last_prompts[0]}
    assert describe_prompt(tagged) == {"prompt": "tags", "tagger": "brightness_tagger",
                                       "format": "<tags>, clean, high-resolution, 8k,"}
    assert describe_prompt(null) == {"prompt": "null"}


def test_official_prompt_formats():
    assert inference_prompt("dog, grass") == "dog, grass, clean, high-resolution, 8k,"  # TVT test_realsr.sh
    assert inference_prompt("dog, grass", "") == "dog, grass, ,"  # OSEDiff test.sh: no --prompt
    assert training_prompt("dog, grass", "tvt") == "dog, grass, "  # TVT train.py, empty --positive_prompt
    assert training_prompt("dog, grass", "osediff") == "dog, grass"  # OSEDiff train_osediff.py: the tags
    assert OFFICIAL_NEGATIVE_PROMPTS["tvt"].count("oil painting") == 2  # as TVT's train.sh has it
    assert OFFICIAL_NEGATIVE_PROMPTS["tvt"].replace("sketch, oil painting,", "sketch,") == OFFICIAL_NEGATIVE_PROMPTS[
        "osediff"]
    with pytest.raises(ValueError, match="code base"):
        training_prompt("dog", "stablesr")


def test_colour_tagger_names_the_colours_that_cover_the_image_most_first():
    red = torch.tensor([0.85, 0.05, 0.1]).view(3, 1, 1).expand(3, 8, 8)
    sky = torch.cat([torch.tensor([0.15, 0.25, 0.75]).view(3, 1, 1).expand(3, 3, 8),  # 3 rows of blue
                     torch.ones(3, 5, 8)], dim=1)  # 5 rows of white
    speckled = red.clone()
    speckled[:, 0, :3] = 1.0  # 3 of 64 white pixels: under the 10 % share
    assert ColourTagger()(torch.stack([red, sky, speckled])) == ["red", "white, blue", "red"]
    assert ColourTagger()(torch.stack([sky, red])) == ["white, blue", "red"]  # per image, batch order kept


def test_dape_without_ram_names_every_missing_part(tmp_path):
    with pytest.raises(RuntimeError, match=r"ram_swin_large_14m\.pth.*DAPE\.pth.*NullPrompt"):
        DAPEPrompt(ram_weights=tmp_path / "absent.pth", dape_weights=tmp_path / "absent_dape.pth")
