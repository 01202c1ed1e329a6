"""Text conditioning ``c`` of the one-step restorer (docs/method.md §1.4, docs/training-recipe.md "Prompts").

The official codes condition the UNet on SD's CLIP embedding of tags read off an image:

* test time — DAPE (RAM Swin-L + OSEDiff's degradation-aware LoRA) tags of the upsampled LR,
  prompt ``"<tags>, <positive>,"`` (:func:`inference_prompt`; TVT's positive prompt is
  :data:`OFFICIAL_POSITIVE_PROMPT`, OSEDiff's test script passes an empty one);
* training — RAM tags of the HR crop (:func:`training_prompt`), and VSD's classifier-free
  guidance against a negative prompt (:data:`OFFICIAL_NEGATIVE_PROMPTS`).

Pieces:

* :class:`NullPrompt` — one fixed embedding for every image (CLIP's ``""``, a stored tensor, or
  zeros in mini mode). The offline default everywhere; results record it as ``null``.
* a *tagger* — images (B, 3, H, W) in [0, 1] → one tag string each (:data:`Tagger`;
  :func:`make_tagger` by name): :class:`RAMTagger` (RAM, or DAPE with its LoRA weights) or
  :class:`ColourTagger` (weight-free, offline).
* :class:`TaggedPrompt` — a tagger + SD's text encoder (:func:`load_text_encoder`) as the
  restorer's prompt provider; it keeps each call's tags so that ``tvt sr`` writes them beside
  every output and the evaluation under its tables (:func:`write_last_tags`).
* :func:`tag_restorer` — the one way a restorer gets a :class:`TaggedPrompt`: ``tvt sr --tagger``
  and the evaluation's ``evaluate.tagger`` both call it.
* :class:`PromptRecipe` — how a restorer was trained to be prompted (``restorer.json``'s ``prompt``),
  which ``tvt sr`` follows when no ``--tagger`` is given.

RAM and DAPE need the ``ram`` package, which is not on PyPI, and hub weights. Cluster install::

    pip install git+https://github.com/xinyu1205/recognize-anything.git   # RAM (import ram)
    # DAPE: OSEDiff's RAM+LoRA variant (ram/models/ram_lora.py) ships in cswry/OSEDiff's
    # ram/ folder; put that repository first on PYTHONPATH instead of the package above.
    # weights: ram_swin_large_14m.pth (xinyu1205/recognize-anything on the hub), DAPE.pth (OSEDiff README)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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


#: the positive prompt of TVT's test script (Joyies/TVT ``scripts/test/test_realsr.sh`` ``--prompt``);
#: OSEDiff's test script passes none (cswry/OSEDiff ``scripts/test/test.sh``, ``--prompt`` default "")
OFFICIAL_POSITIVE_PROMPT = "clean, high-resolution, 8k"
#: the negative prompts of VSD's classifier-free guidance in the official training scripts
OFFICIAL_NEGATIVE_PROMPTS = {
    # Joyies/TVT scripts/train/train.sh --negative_prompt ("oil painting" twice, as there)
    "tvt": "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, "
    "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, "
    "deformed, lowres, over-smooth",
    # cswry/OSEDiff scripts/train/train_osediff.sh --neg_prompt
    "osediff": "painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, "
    "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, "
    "deformed, lowres, over-smooth",
}
#: the positive prompt of each code base's official test script (:data:`OFFICIAL_POSITIVE_PROMPT`; OSEDiff's: none)
OFFICIAL_POSITIVE_PROMPTS = {"tvt": OFFICIAL_POSITIVE_PROMPT, "osediff": ""}
RAM_IMAGE_SIZE = 384
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
Tagger = Callable[[torch.Tensor], list[str]]
#: tag extractors by name (:func:`make_tagger`); "none"/None is the null prompt
TAGGERS = ("colour", "ram", "dape")


def inference_prompt(tags: str, positive: str = OFFICIAL_POSITIVE_PROMPT) -> str:
    """``"<tags>, <positive>,"``: both official test scripts (Joyies/TVT ``TVT/inferences/inference.py``
    and cswry/OSEDiff ``test_osediff.py``, ``get_validation_prompt``)."""
    return f"{tags}, {positive},"


def default_positive_prompt(method: str) -> str:
    """The positive prompt of ``method``'s official test script (:data:`OFFICIAL_POSITIVE_PROMPTS`: ``osediff``
    has none), TVT's for every other restorer (the ablations vary TVT's recipe)."""
    return OFFICIAL_POSITIVE_PROMPTS.get(method, OFFICIAL_POSITIVE_PROMPT)


def training_prompt(tags: str, codebase: str) -> str:
    """The generator's prompt while training, per official code base: TVT appends its (empty)
    ``--positive_prompt`` (Joyies/TVT ``TVT/train_TVTSR/train.py`` ``main``: ``f'{caption}, {positive}'``),
    OSEDiff uses the tags alone (cswry/OSEDiff ``train_osediff.py``: ``batch["prompt"] = caption``)."""
    if codebase == "tvt":
        return f"{tags}, "
    if codebase == "osediff":
        return tags
    raise ValueError(f"unknown code base {codebase!r}; expected 'tvt' or 'osediff'")


def clip_text_encoder(tokenizer, text_encoder: nn.Module) -> Callable[[list[str]], torch.Tensor]:
    """prompts → (B, 77, D) embeddings as SD's pipelines compute them (padded to the tokenizer's length)."""

    @torch.no_grad()
    def encode(prompts: list[str]) -> torch.Tensor:
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids.to(text_encoder.device)
        return text_encoder(tokens)[0].float()

    return encode


def load_text_encoder(folder: str | Path, device: str | torch.device = "cpu") -> Callable[[list[str]], torch.Tensor]:
    """:func:`clip_text_encoder` of an SD snapshot's ``tokenizer/`` and ``text_encoder/`` (frozen, eval)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    missing = [sub for sub in ("tokenizer", "text_encoder") if not (folder / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: no {' or '.join(f'{m}/' for m in missing)}; tagged prompts need SD's CLIP tokenizer and "
            "text encoder (the paper-mode SD snapshot has both: `tvt where prior --config config/paper.yaml`; "
            "mini mode's prior has no text encoder)")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval().requires_grad_(False).to(device)
    return clip_text_encoder(tokenizer, encoder)


def save_character_tokenizer(folder: str | Path):
    """A CLIP tokenizer over single characters (a–z, 0–9, ``,`` and ``-``), saved to ``folder`` and returned.

    An offline stand-in for CLIP's 49 408-token BPE vocabulary, which only the hub serves: it pads
    and truncates to SD's 77 positions, so a text encoder built on it (``vocab_size=len(tokenizer)``)
    runs at its real cost and on real prompts (tests, ``bench/bench_paper_scale.py``).
    """
    import string

    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ",-":
        vocab[char], vocab[char + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                              model_max_length=CLIP_CONTEXT_LENGTH)
    tokenizer.save_pretrained(folder)
    return tokenizer


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

    @property
    def tagger_name(self) -> str:
        """The tagger's ``name`` (:func:`make_tagger`'s), else its function or class name."""
        return getattr(self.tagger, "name", None) or getattr(self.tagger, "__name__", type(self.tagger).__name__)

    def prompts_for(self, tags: list[str]) -> list[str]:
        return [inference_prompt(t, self.positive_prompt) for t in tags]

    def forward(self, lr_images: torch.Tensor) -> torch.Tensor:
        upsampled = F.interpolate(lr_images.float(), scale_factor=self.scale, mode="bicubic",
                                  align_corners=False).clamp(0, 1)
        tags = list(self.tagger(upsampled))
        if len(tags) != lr_images.shape[0]:
            raise ValueError(f"the tagger returned {len(tags)} tag strings for {lr_images.shape[0]} images")
        self.last_tags, self.last_prompts = tags, self.prompts_for(tags)
        return self.encode(self.last_prompts).to(lr_images.device, lr_images.dtype)


def describe_prompt(provider: nn.Module | None) -> dict:
    """What a restorer conditions on, for results (``metrics.json`` ``prompts``): ``{"prompt": "null"}``
    (a fixed embedding, or none) or ``{"prompt": "tags", "tagger", "format"}``."""
    if isinstance(provider, TaggedPrompt):
        return {"prompt": "tags", "tagger": provider.tagger_name,
                "format": inference_prompt("<tags>", provider.positive_prompt)}
    return {"prompt": "null"}


@dataclass(frozen=True)
class PromptRecipe:
    """How a restorer was trained to be prompted: tags of ``tagger`` (:data:`TAGGERS`), and at test time
    the prompt ``"<tags>, <positive>,"`` (:func:`inference_prompt`).

    Saved in ``restorer.json`` as ``"prompt": {"tagger", "positive"}`` (``null``: the stored null prompt,
    also what folders saved before the key mean), so that ``tvt sr`` prompts a restorer trained on tags
    with tags by default. The stored embedding stays the null prompt, which ``--tagger none`` forces.
    """

    tagger: str
    positive: str = OFFICIAL_POSITIVE_PROMPT

    def __post_init__(self):
        if self.tagger not in TAGGERS:
            raise ValueError(f"unknown tagger {self.tagger!r}; known: {', '.join(TAGGERS)}")

    def to_json(self) -> dict:
        return {"tagger": self.tagger, "positive": self.positive}

    @classmethod
    def from_json(cls, record: Mapping | None) -> PromptRecipe | None:
        """The recipe of a ``restorer.json`` ``prompt`` value; None for ``null`` or an absent key."""
        if record is None:
            return None
        if not isinstance(record, Mapping) or set(record) != {"tagger", "positive"}:
            raise ValueError(f"restorer.json 'prompt': expected null or {{\"tagger\", \"positive\"}}, got {record!r}")
        return cls(record["tagger"], record["positive"])


def chosen_tagger(restorer: nn.Module, tagger: str | None) -> str:
    """The tagger ``restorer`` prompts with: ``tagger`` when the user names one, else the one its
    :class:`PromptRecipe` was trained with, else ``none`` (its stored prompt). One rule for ``tvt sr``
    and a logged MLflow model, so both restore an image alike."""
    recipe = getattr(restorer, "prompt_recipe", None)
    return tagger or (recipe.tagger if recipe is not None else "none")


def tag_restorer(restorer: nn.Module, tagger: str, *, text_encoder: str | Path, positive_prompt: str | None = None,
                 ram_weights: str | Path | None = None, dape_weights: str | Path | None = None) -> TaggedPrompt:
    """Condition a one-step ``restorer`` on per-image tags of ``tagger`` (:func:`make_tagger`) instead of its
    stored prompt: the one path of ``tvt sr --tagger`` and of the evaluation's ``evaluate.tagger``.

    The positive prompt: ``positive_prompt``, else the restorer's :class:`PromptRecipe`'s, else its
    method's official one (:func:`default_positive_prompt`). Raises TypeError for a multi-step
    (StableSR) restorer, FileNotFoundError / RuntimeError naming a missing text encoder, package or weights.
    """
    if not hasattr(restorer, "prompt") or not hasattr(restorer, "denoise"):
        raise TypeError("a multi-step (StableSR) restorer samples with the empty prompt, as the official code; "
                        "only one-step restorers take tags")
    device = next(restorer.parameters()).device
    encode = load_text_encoder(text_encoder, device)
    tag = make_tagger(tagger, ram_weights=ram_weights, dape_weights=dape_weights, device=device)
    if positive_prompt is None:
        recipe = getattr(restorer, "prompt_recipe", None)
        positive_prompt = recipe.positive if recipe is not None else default_positive_prompt(restorer.method)
    restorer.prompt = TaggedPrompt(tag, encode, positive_prompt, scale=restorer.scale)
    return restorer.prompt


TAGS_SUFFIX = ".tags.json"


def write_tags(output: Path, tagger: str, tags: str, prompt: str) -> Path:
    """``<output name>.tags.json`` beside an SR image: ``{"tagger", "tags", "prompt"}`` it was restored with
    (one file per output, like OSEDiff's ``--save_prompts``, but named after the whole output name so
    that ``a.png`` and ``a.jpg`` keep separate records)."""
    path = Path(output).with_name(Path(output).name + TAGS_SUFFIX)
    payload = json.dumps({"tagger": tagger, "tags": tags, "prompt": prompt}, ensure_ascii=False, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(payload, encoding="utf-8")
    os.replace(partial, path)
    return path


def write_last_tags(provider: nn.Module | None, output: Path) -> Path | None:
    """:func:`write_tags` beside ``output`` for the image a :class:`TaggedPrompt` prompted last (one image
    per call); None, and nothing written, for a fixed prompt."""
    if not isinstance(provider, TaggedPrompt):
        return None
    if len(provider.last_tags) != 1:
        raise ValueError(f"the last call tagged {len(provider.last_tags)} images; tags are written per image")
    return write_tags(output, provider.tagger_name, provider.last_tags[0], provider.last_prompts[0])


#: the eleven basic colour terms (Berlin & Kay) with sRGB prototypes in [0, 1]; ties go to the earlier term
BASIC_COLOURS = (
    ("black", (0.0, 0.0, 0.0)), ("white", (1.0, 1.0, 1.0)), ("gray", (0.5, 0.5, 0.5)),
    ("red", (0.8, 0.1, 0.1)), ("green", (0.15, 0.6, 0.15)), ("blue", (0.1, 0.2, 0.8)),
    ("yellow", (0.95, 0.9, 0.15)), ("orange", (1.0, 0.55, 0.0)), ("brown", (0.45, 0.27, 0.1)),
    ("pink", (1.0, 0.7, 0.75)), ("purple", (0.5, 0.15, 0.55)),
)


class ColourTagger:
    """A deterministic, weight-free tagger: the basic colour terms that cover an image.

    Every pixel takes the nearest of :data:`BASIC_COLOURS` (the eleven basic colour terms of
    Berlin & Kay, as sRGB prototypes) and the terms covering at least ``min_share`` of the
    image become its tags, most frequent first, joined by ", " like DAPE's. RAM's vocabulary
    holds these words too, so they are real tags of the image, only fewer and coarser than
    RAM's. It lets every path that RAM drives — tagging once per training image, caching,
    prompt formatting, CLIP encoding, tags written beside outputs — run where the ``ram``
    package and its weights cannot be installed (tests, mini mode); it is no stand-in for
    RAM's quality.
    """

    name = "colour"
    def __init__(self, min_share: float = 0.1, max_tags: int = 4):
        self.min_share, self.max_tags = min_share, max_tags
        self._names = [name for name, _ in BASIC_COLOURS]
        self._colours = torch.tensor([rgb for _, rgb in BASIC_COLOURS])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[str]:
        pixels = images.float().clamp(0, 1).flatten(2).transpose(1, 2)  # (B, HW, 3)
        nearest = torch.cdist(pixels, self._colours.to(pixels.device)[None]).argmin(-1)  # (B, HW)
        shares = F.one_hot(nearest, len(self._names)).float().mean(1)  # (B, terms)
        tags = []
        for row in shares.cpu():
            order = sorted(range(len(self._names)), key=lambda i: (-float(row[i]), i))
            chosen = [self._names[i] for i in order[: self.max_tags] if row[i] >= self.min_share]
            tags.append(", ".join(chosen or [self._names[order[0]]]))
        return tags


def make_tagger(name: str, *, ram_weights: str | Path | None = None, dape_weights: str | Path | None = None,
                device: str | torch.device = "cpu") -> Tagger:
    """The tag extractor ``name`` (:data:`TAGGERS`): ``colour`` (:class:`ColourTagger`), ``ram`` (RAM Swin-L,
    as the official training scripts tag the HR) or ``dape`` (RAM + OSEDiff's DAPE LoRA, as the official
    test scripts tag the upsampled LR). RAM and DAPE raise naming what is missing (module docstring)."""
    if name == "colour":
        return ColourTagger()
    if name == "ram":
        return RAMTagger(ram_weights, device=device)
    if name == "dape":
        if dape_weights is None:
            raise RuntimeError("DAPE prompts need OSEDiff's DAPE LoRA weights (DAPE.pth) besides RAM's; "
                               "give their path (tvt sr --dape-weights)")
        return RAMTagger(ram_weights, dape_weights, device=device)
    raise ValueError(f"unknown tagger {name!r}; known: {', '.join(TAGGERS)}")


class RAMTagger:
    """RAM (or DAPE, with ``dape_weights``) through the official ``ram`` package: images → tag strings.

    Input as the official scripts prepare it (cswry/OSEDiff ``test_osediff.py`` ``ram_transforms``,
    Joyies/TVT ``train.py``): torchvision's ``Resize((384, 384))`` on a tensor — bilinear without
    antialiasing in the torchvision of their requirements (torch 2.0.1) — then ImageNet
    normalisation. Tags are joined by ", " as OSEDiff's ``ram_lora.RAM.generate_tag`` does (the
    ``recognize-anything`` package joins with " | ").
    """

    def __init__(self, ram_weights: str | Path | None = None, dape_weights: str | Path | None = None,
                 device: str | torch.device = "cpu"):
        self.name = "ram" if dape_weights is None else "dape"
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
            missing.append("the `ram` package (pip install git+https://github.com/xinyu1205/recognize-anything.git; "
                           "DAPE: cswry/OSEDiff's ram/ folder on PYTHONPATH)")
        if missing:
            raise RuntimeError(
                f"{self.name.upper()} prompts need " + "; ".join(missing) + ". The weights come from a model hub "
                "and the code is not on PyPI (install notes: tvt/models/prompts.py). Without them use the null "
                "prompt (NullPrompt: `tvt sr --tagger none`, `isr.<name>.prompt: null`), the default.")
        extra = {"pretrained_condition": str(dape_weights)} if dape_weights is not None else {}
        self.model = build(pretrained=str(ram_weights), image_size=RAM_IMAGE_SIZE, vit="swin_l", **extra)
        self.model.eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[str]:
        x = F.interpolate(images.float(), size=(RAM_IMAGE_SIZE, RAM_IMAGE_SIZE), mode="bilinear", align_corners=False,
                          antialias=False)
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
