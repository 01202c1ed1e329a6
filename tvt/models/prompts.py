"""Text conditioning ``c`` of the one-step restorer (docs/method.md §1.4).

OSEDiff and TVT condition the UNet on CLIP embeddings of tags that a prompt extractor reads
off the LR image: at test time DAPE (RAM Swin-L with OSEDiff's degradation-aware LoRA) on the
bicubic-upsampled LR, and the prompt is ``"<tags>, <positive prompt>,"`` (cswry/OSEDiff
``test_osediff.py::get_validation_prompt``, Joyies/TVT ``TVT/inferences/inference.py``); in
training, RAM's tags of the HR image, with a negative prompt for VSD's CFG.

* :class:`NullPrompt` — one fixed embedding for every image (CLIP's ``""``, a stored tensor, or
  zeros in mini mode). Every default path uses it, and results record it.
* :class:`TaggedPrompt` — the pluggable extractor path: any *tagger* (LR images → one tag
  string per image) + a text encoder (:func:`clip_text_encoder`). It keeps the tags and
  prompts of its last call (:attr:`TaggedPrompt.last_tags`) so callers can write them next to
  each output (:func:`write_tags`).
* :class:`RAMTagger` / :class:`DAPEPrompt` — the official extractor through the
  ``recognize-anything`` package (``import ram``), which is not on PyPI. Cluster install::

      pip install git+https://github.com/xinyu1205/recognize-anything.git   # RAM
      # DAPE: OSEDiff's RAM+LoRA variant lives in its repository (ram/models/ram_lora.py);
      # put that ``ram`` folder first on PYTHONPATH instead of the package above.

  plus ``ram_swin_large_14m.pth`` and OSEDiff's ``DAPE.pth`` from the model hub.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

CLIP_CONTEXT_LENGTH = 77


@runtime_checkable
class PromptProvider(Protocol):
    """Maps a batch of LR images (B, 3, h, w) in [0, 1] to UNet text embeddings (B, L, D)."""

    def __call__(self, lr_images: torch.Tensor) -> torch.Tensor: ...


class NullPrompt(nn.Module):
    """The same prompt embedding for every image: ``embedding`` (1, L, D), broadcast to the batch.

    A module with the embedding as a buffer, so it follows the restorer's ``.to(device)``.
    """

    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        if embedding.dim() != 3 or embedding.shape[0] != 1:
            raise ValueError(f"NullPrompt needs a (1, L, D) embedding, got {tuple(embedding.shape)}")
        self.register_buffer("embedding", embedding.detach().clone())

    @classmethod
    def zeros(cls, cross_attention_dim: int, length: int = CLIP_CONTEXT_LENGTH) -> NullPrompt:
        """All-zero context: cross-attention then contributes only its output bias (mini mode)."""
        return cls(torch.zeros(1, length, cross_attention_dim))

    @classmethod
    @torch.no_grad()
    def from_text_encoder(cls, tokenizer, text_encoder: nn.Module, prompt: str = "") -> NullPrompt:
        """Encode ``prompt`` once with a CLIP tokenizer / text encoder (SD's ``""`` by default)."""
        tokens = tokenizer(
            prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(text_encoder.device)
        return cls(text_encoder(tokens)[0].float())

    def forward(self, lr_images: torch.Tensor) -> torch.Tensor:
        return self.embedding.to(lr_images.dtype).expand(lr_images.shape[0], -1, -1)


#: the official test scripts' positive prompt (TVT README / OSEDiff ``--prompt`` examples)
OFFICIAL_POSITIVE_PROMPT = "clean, high-resolution, 8k"
RAM_IMAGE_SIZE = 384
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
Tagger = Callable[[torch.Tensor], list[str]]


def clip_text_encoder(tokenizer, text_encoder: nn.Module) -> Callable[[list[str]], torch.Tensor]:
    """prompts → (B, 77, D) embeddings as SD's pipelines compute them (padded to the tokenizer's length)."""

    @torch.no_grad()
    def encode(prompts: list[str]) -> torch.Tensor:
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids.to(text_encoder.device)
        return text_encoder(tokens)[0].float()

    return encode


class TaggedPrompt(nn.Module):
    """Per-image prompt ``"<tags>, <positive prompt>,"`` from a tagger run on the upsampled LR, CLIP-encoded.

    ``tagger`` gets the bicubic ×``scale`` LR in [0, 1] (B, 3, H, W) and returns one tag
    string per image; ``encode`` maps the prompts to embeddings.
    """

    def __init__(self, tagger: Tagger, encode: Callable[[list[str]], torch.Tensor],
                 positive_prompt: str = OFFICIAL_POSITIVE_PROMPT, scale: int = 4):
        super().__init__()
        self.tagger, self.encode, self.positive_prompt, self.scale = tagger, encode, positive_prompt, scale
        self.last_tags: list[str] = []
        self.last_prompts: list[str] = []

    def prompts_for(self, tags: list[str]) -> list[str]:
        return [f"{t}, {self.positive_prompt}," if self.positive_prompt else t for t in tags]

    def forward(self, lr_images: torch.Tensor) -> torch.Tensor:
        upsampled = F.interpolate(lr_images.float(), scale_factor=self.scale, mode="bicubic",
                                  align_corners=False).clamp(0, 1)
        tags = list(self.tagger(upsampled))
        if len(tags) != lr_images.shape[0]:
            raise ValueError(f"the tagger returned {len(tags)} tag strings for {lr_images.shape[0]} images")
        self.last_tags, self.last_prompts = tags, self.prompts_for(tags)
        return self.encode(self.last_prompts).to(lr_images.device, lr_images.dtype)


def write_tags(output: Path, tags: str, prompt: str | None = None) -> Path:
    """``<output>.tags.txt`` beside an SR image: the tags (and the full prompt) it was restored with."""
    path = Path(output).with_name(Path(output).name + ".tags.txt")
    path.write_text(tags + "\n" + (f"prompt: {prompt}\n" if prompt is not None else ""))
    return path


class RAMTagger:
    """RAM (or DAPE, with ``dape_weights``) through the official ``ram`` package: images → tag strings.

    Input as in the official scripts: resized to 384², ImageNet-normalised; tags joined by
    ", " (RAM's ``generate_tag`` joins with " | ").
    """

    def __init__(self, ram_weights: str | Path | None = None, dape_weights: str | Path | None = None,
                 device: str | torch.device = "cpu"):
        missing = []
        if ram_weights is None or not Path(ram_weights).is_file():
            missing.append(f"RAM Swin-L weights (ram_swin_large_14m.pth; got {ram_weights})")
        if dape_weights is not None and not Path(dape_weights).is_file():
            missing.append(f"OSEDiff's DAPE LoRA weights (DAPE.pth; got {dape_weights})")
        try:
            if dape_weights is not None:
                from ram.models.ram_lora import ram as build  # OSEDiff's DAPE variant of RAM
            else:
                from ram.models import ram as build
        except ImportError:
            build = None
            missing.append("the `ram` package (recognize-anything; DAPE: OSEDiff's ram/ folder)")
        if missing:
            raise RuntimeError(
                "DAPE/RAM prompts need " + "; ".join(missing) + ". The weights come from a model hub that only the "
                "cluster can reach and the code is not on PyPI (install notes: tvt/models/prompts.py). Use "
                "NullPrompt (an empty or fixed prompt), which every default configuration uses.")
        extra = {"pretrained_condition": str(dape_weights)} if dape_weights is not None else {}
        self.model = build(pretrained=str(ram_weights), image_size=RAM_IMAGE_SIZE, vit="swin_l", **extra)
        self.model.eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[str]:
        x = F.interpolate(images.float(), size=(RAM_IMAGE_SIZE, RAM_IMAGE_SIZE), mode="bicubic", align_corners=False)
        mean = torch.tensor(_IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        tags = self.model.generate_tag(((x.clamp(0, 1) - mean) / std).to(self.device))[0]
        return [", ".join(t.strip() for t in tag.split("|")) for tag in tags]


class DAPEPrompt(TaggedPrompt):
    """OSEDiff's degradation-aware prompt extractor: DAPE tags of the upsampled LR + the positive prompt, CLIP-encoded.

    Needs the ``ram`` package and the hub weights (module docstring); without them it raises
    and names what is missing. No default path needs it: use :class:`NullPrompt`.
    """

    def __init__(self, tokenizer=None, text_encoder: nn.Module | None = None, *,
                 ram_weights: str | Path | None = None, dape_weights: str | Path | None = None,
                 positive_prompt: str = OFFICIAL_POSITIVE_PROMPT, scale: int = 4):
        tagger = RAMTagger(ram_weights, dape_weights, device=text_encoder.device if text_encoder is not None else "cpu")
        if tokenizer is None or text_encoder is None:
            raise RuntimeError("DAPEPrompt needs SD's CLIP tokenizer and text encoder (the SD snapshot's "
                               "tokenizer/ and text_encoder/)")
        super().__init__(tagger, clip_text_encoder(tokenizer, text_encoder), positive_prompt, scale)
