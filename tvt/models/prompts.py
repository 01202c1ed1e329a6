"""Text conditioning ``c`` of the one-step restorer (docs/method.md §1.4).

OSEDiff and TVT condition the UNet on CLIP embeddings of tags that a prompt extractor
(DAPE: RAM Swin-L + LoRA) reads off the LR image. The extractor's weights come from a model
hub, so it is optional; every default path uses a *fixed* prompt embedding instead — CLIP's
encoding of the empty prompt where a text encoder exists, a stored tensor (e.g. saved with a
trained restorer) or zeros in mini mode, which has no CLIP.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
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


class DAPEPrompt:
    """Placeholder for OSEDiff's degradation-aware prompt extractor (DAPE).

    DAPE is RAM (Recognize Anything, Swin-L backbone) fine-tuned with LoRA to read tags from
    degraded images; the tags are then encoded by SD's CLIP text encoder. Its weights
    (``ram_swin_large_14m.pth`` and OSEDiff's ``DAPE.pth``) are downloaded from a model hub,
    which only the cluster can reach, and RAM's code is not a PyPI dependency here. No
    default path needs it: use :class:`NullPrompt`.
    """

    def __init__(self, *args: object, **kwargs: object):
        raise RuntimeError(
            "DAPE prompts need RAM Swin-L weights (ram_swin_large_14m.pth), OSEDiff's DAPE LoRA "
            "weights (DAPE.pth) and SD's CLIP text encoder, all from a model hub that only the "
            "cluster can reach; they are not available in this environment. Use "
            "NullPrompt (an empty or fixed prompt), which every default configuration uses."
        )
