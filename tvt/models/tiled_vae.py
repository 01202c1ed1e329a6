"""Exact tiled VAE: tile by tile at bounded memory, with GroupNorm statistics of the whole image.

A VAE encoder or decoder is convolutions (local: a tile with enough context around it
computes them exactly), GroupNorms (global: they normalise with the mean and variance of the
whole feature map) and, in SD's mid-block, one self-attention (global). Per-tile GroupNorm
statistics give every tile its own brightness and contrast; Gaussian blending hides the
seams but not the drift (tiling.py).

The Tiled VAE shipped with OSEDiff (cswry/OSEDiff ``my_utils/vaehook.py``: ``build_task_queue``,
``GroupNormParam``) showed the way: run the network as a flat list of tasks, advance all tiles
task by task, and at every GroupNorm pause until every tile has contributed its statistics.
This module follows that idea and differs where exactness or memory need it:

* **Pooled statistics.** ``GroupNormParam.summary`` averages the per-tile variances weighted by
  tile area, counting the padding twice and leaving out the spread of the tile means. Here each
  tile contributes float64 sums of ``x`` and ``x²`` over the part of the image it *owns* (its
  core; the cores partition the image), so the mean and variance are those of the whole map.
* **Context from the network.** ``vaehook`` pads tiles by fixed margins (11/32 pixels). Here the
  margin (halo) is the receptive radius of the tiled ops, summed from their kernels and
  resolutions and rounded to the alignment, so every core value sees all its inputs: tiled
  equals untiled up to float rounding.
* **Attention untiled.** ``vaehook`` runs the mid-block attention per tile (a tile attends to
  itself only). Here everything at and beyond the mid-block attention runs untiled at latent
  resolution (1/64 of the image area for SD's VAE), exactly as the VAE does.
* **Bounded RSS.** ``vaehook`` keeps every tile's activations in CPU RAM (its header: ~20 GB for
  a 4096² image). Here tile states beyond ``resident_bytes`` are spilled to a temporary folder
  between GroupNorms, so resident memory is one tile's working set plus that budget.

The cost is one extra pass over the stored tile states per GroupNorm (I/O, not compute).
Supported: diffusers' ``AutoencoderKL`` encoder/decoder and :class:`~tvt.models.vae_d4.VAED4`
(``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``, ``UNetMidBlock2D``); anything else raises
an error that names the module.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from tvt.models.tiling import _group_norm_with_stats

DEFAULT_RESIDENT_BYTES = 1 << 30  # tile states kept in RAM before spilling to disk


@dataclass(frozen=True)
class Op:
    """One task of a flattened VAE network.

    kind: ``local`` (``fn`` needs ``radius`` pixels of context at its input resolution and
    scales the resolution by ``scale``), ``norm`` (a GroupNorm, ``fn`` is the module), ``save``
    (push ``fn(x)`` as the residual), ``add`` (``(residual + x) / factor``), ``global`` (``fn``
    needs the whole map).
    """

    kind: str
    fn: Callable | None = None
    radius: int = 0
    scale: Fraction = Fraction(1)
    factor: float = 1.0
    name: str = ""


def _conv(conv: nn.Conv2d, name: str) -> Op:
    kernel, stride, dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    if stride != 1 or conv.padding[0] != dilation * (kernel // 2) or conv.kernel_size[0] != conv.kernel_size[1]:
        raise ValueError(f"exact tiling: {name} is not a 'same'-padded stride-1 square convolution")
    return Op("local", conv, radius=dilation * (kernel // 2), name=name)


def _resnet(block: nn.Module, name: str) -> list[Op]:
    """``ResnetBlock2D.forward`` without time embedding, as tasks."""
    if not isinstance(block, ResnetBlock2D) or block.upsample is not None or block.downsample is not None:
        raise ValueError(f"exact tiling: unsupported block {name} ({type(block).__name__})")
    if block.time_emb_proj is not None or not isinstance(block.norm1, nn.GroupNorm):
        raise ValueError(f"exact tiling: {name} needs a time embedding or a spatial norm")
    shortcut = block.conv_shortcut
    return [
        Op("save", shortcut if shortcut is not None else (lambda x: x), name=f"{name}.shortcut"),
        Op("norm", block.norm1, name=f"{name}.norm1"),
        Op("local", block.nonlinearity, name=f"{name}.act1"),
        _conv(block.conv1, f"{name}.conv1"),
        Op("norm", block.norm2, name=f"{name}.norm2"),
        Op("local", block.nonlinearity, name=f"{name}.act2"),
        Op("local", block.dropout, name=f"{name}.dropout"),
        _conv(block.conv2, f"{name}.conv2"),
        Op("add", factor=block.output_scale_factor, name=name),
    ]


def _resample(module: nn.Module, name: str) -> Op:
    """diffusers' stride-2 conv downsample (pad right/bottom by one) or nearest-×2 + conv upsample."""
    if isinstance(module, Downsample2D) and module.use_conv and module.norm is None:
        return Op("local", module, radius=2, scale=Fraction(1, 2), name=name)
    if (
        isinstance(module, Upsample2D)
        and module.use_conv
        and module.interpolate
        and not module.use_conv_transpose
        and module.norm is None
    ):
        return Op("local", module, radius=1, scale=Fraction(2), name=name)
    raise ValueError(f"exact tiling: unsupported resampler {name} ({type(module).__name__})")


def _mid_block(block: nn.Module, name: str) -> list[Op]:
    if not isinstance(block, UNetMidBlock2D):
        raise TypeError(f"exact tiling: unsupported mid-block {name} ({type(block).__name__})")
    ops = _resnet(block.resnets[0], f"{name}.resnets.0")
    for i, (attention, resnet) in enumerate(zip(block.attentions, block.resnets[1:], strict=True)):
        if attention is not None:
            if not isinstance(attention, Attention):
                raise ValueError(f"exact tiling: unsupported attention {name}.attentions.{i}")
            ops.append(Op("global", attention, name=f"{name}.attentions.{i}"))
        ops += _resnet(resnet, f"{name}.resnets.{i + 1}")
    return ops


def _tail(net: nn.Module, name: str) -> list[Op]:
    if not isinstance(net.conv_norm_out, nn.GroupNorm):
        raise TypeError(f"exact tiling: {name}.conv_norm_out is not a GroupNorm")
    return [
        Op("norm", net.conv_norm_out, name=f"{name}.conv_norm_out"),
        Op("local", net.conv_act, name=f"{name}.conv_act"),
        _conv(net.conv_out, f"{name}.conv_out"),
    ]


def _blocks(blocks: nn.ModuleList, name: str, resamplers: str) -> list[Op]:
    ops = []
    for i, block in enumerate(blocks):
        for j, resnet in enumerate(block.resnets):
            ops += _resnet(resnet, f"{name}.{i}.resnets.{j}")
        for j, module in enumerate(getattr(block, resamplers) or ()):
            ops.append(_resample(module, f"{name}.{i}.{resamplers}.{j}"))
    return ops


def encoder_program(vae: nn.Module) -> list[Op]:
    """``vae.encode(x).latent_dist.mode()`` as tasks (AutoencoderKL or VAED4)."""
    enc = vae.encoder
    ops = [_conv(enc.conv_in, "encoder.conv_in"), *_blocks(enc.down_blocks, "encoder.down_blocks", "downsamplers")]
    if enc.mid_block is not None:
        ops += _mid_block(enc.mid_block, "encoder.mid_block")
    ops += _tail(enc, "encoder")
    if getattr(vae, "quant_conv", None) is not None:
        ops.append(_conv(vae.quant_conv, "quant_conv"))
    ops.append(Op("local", lambda moments: moments.chunk(2, dim=1)[0], name="posterior.mode"))
    return ops


def decoder_program(vae: nn.Module) -> list[Op]:
    """``vae.decode(z).sample`` as tasks (AutoencoderKL or VAED4)."""
    dec = vae.decoder
    ops = [_conv(vae.post_quant_conv, "post_quant_conv")] if getattr(vae, "post_quant_conv", None) is not None else []
    ops.append(_conv(dec.conv_in, "decoder.conv_in"))
    if dec.mid_block is not None:
        ops += _mid_block(dec.mid_block, "decoder.mid_block")
    ops += _blocks(dec.up_blocks, "decoder.up_blocks", "upsamplers")
    return ops + _tail(dec, "decoder")


def run_untiled(ops: list[Op], x: torch.Tensor) -> torch.Tensor:
    """Run tasks on a whole map; GroupNorms with their own statistics (the reference path)."""
    residuals = []
    for op in ops:
        if op.kind == "save":
            residuals.append(op.fn(x))
        elif op.kind == "add":
            x = (residuals.pop() + x) / op.factor
        else:
            x = op.fn(x)
    return x


def split_tiled(ops: list[Op]) -> tuple[list[Op], list[Op], list[Op]]:
    """(untiled head, tiled part, untiled tail). Global tasks (attention) need the whole map, so
    they and everything on their low-resolution side run untiled: the encoder from its first
    attention on, the decoder up to its last. Which side is which: the one without resampling."""
    globals_ = [i for i, op in enumerate(ops) if op.kind == "global"]
    if not globals_:
        return [], ops, []
    first, last = globals_[0], globals_[-1]
    if any(op.scale != 1 for op in ops[last + 1 :]):  # decoder: upsampling after the attention
        if any(op.scale != 1 for op in ops[:first]):
            raise ValueError("exact tiling: attention between two resampling stages is not supported")
        return ops[: last + 1], ops[last + 1 :], []
    return [], ops[:first], ops[first:]


def _resolution_track(ops: list[Op]) -> tuple[list[Fraction], int, int]:
    """Per op its input resolution (relative to the tiled input), the alignment tiles need
    (the product of downsamplings) and the halo (receptive radius in input pixels)."""
    scales, scale, radius = [], Fraction(1), Fraction(0)
    for op in ops:
        scales.append(scale)
        radius += Fraction(op.radius) / scale
        scale *= op.scale
    align = max(1, math.prod(1 / s for s in (op.scale for op in ops) if s < 1).numerator)
    halo = -(-math.ceil(radius) // align) * align
    return scales, int(align), halo


class _TileStore:
    """Tile states (tensors) in RAM up to ``resident_bytes``, the rest in a temporary folder."""

    def __init__(self, resident_bytes: int):
        self.budget = resident_bytes
        self.resident: dict[int, list[torch.Tensor]] = {}
        self.used = 0
        self._tmp: tempfile.TemporaryDirectory | None = None

    def put(self, key: int, state: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in state)
        if self.used + size <= self.budget:
            self.resident[key] = state
            self.used += size
            return
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tvt-tiles-")
        torch.save([t.clone(memory_format=torch.contiguous_format) for t in state], Path(self._tmp.name) / f"{key}.pt")

    def take(self, key: int) -> list[torch.Tensor]:
        if key in self.resident:
            state = self.resident.pop(key)
            self.used -= sum(t.numel() * t.element_size() for t in state)
            return state
        path = Path(self._tmp.name) / f"{key}.pt"
        state = torch.load(path, weights_only=True)
        path.unlink()
        return state

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _spans(length: int, core: int, align: int) -> list[tuple[int, int]]:
    """Cores along one side: near-equal, aligned, covering [0, length)."""
    count = max(1, math.ceil(length / core))
    bounds = sorted({round(i * length / count / align) * align for i in range(count)} | {length})
    return list(itertools.pairwise(bounds))


def run_tiled(
    ops: list[Op],
    x: torch.Tensor,
    tile: int,
    *,
    resident_bytes: int = DEFAULT_RESIDENT_BYTES,
) -> torch.Tensor:
    """Run local and GroupNorm tasks on cores of side about ``tile`` (input pixels) plus the halo.

    All tiles advance together from one GroupNorm to the next; each GroupNorm normalises with
    the mean and variance pooled over every tile's core, so the result is the untiled one.
    """
    if any(op.kind == "global" for op in ops):
        raise ValueError("run_tiled: global tasks (attention) must run untiled; see split_tiled")
    scales, align, halo = _resolution_track(ops)
    height, width = x.shape[-2:]
    if height % align or width % align:
        raise ValueError(f"exact tiling: input {height}x{width} must be a multiple of {align}")
    tile = max(align, tile // align * align)
    if height <= tile and width <= tile:
        return run_untiled(ops, x)

    windows = []  # (core rows, core cols, window rows, window cols) in input pixels
    for r0, r1 in _spans(height, tile, align):
        for c0, c1 in _spans(width, tile, align):
            windows.append(
                (
                    (r0, r1),
                    (c0, c1),
                    (max(0, r0 - halo), min(height, r1 + halo)),
                    (max(0, c0 - halo), min(width, c1 + halo)),
                )
            )
    segments = [i for i, op in enumerate(ops) if op.kind == "norm"] + [len(ops)]

    store = _TileStore(resident_bytes)
    try:
        for key, (_, _, rows, cols) in enumerate(windows):
            store.put(key, [x[..., rows[0] : rows[1], cols[0] : cols[1]]])
        start, stats = 0, None
        out = None
        for stop in segments:
            sums = None
            for key, (core_r, core_c, rows, cols) in enumerate(windows):
                h, *residuals = store.take(key)
                if stats is not None:
                    h = stats(h)
                for op in ops[start:stop]:
                    if op.kind == "save":
                        residuals.append(op.fn(h))
                    elif op.kind == "add":
                        h = (residuals.pop() + h) / op.factor
                    else:
                        h = op.fn(h)
                scale = scales[stop] if stop < len(ops) else scales[-1] * ops[-1].scale
                core = h[..., _crop(core_r, rows, scale), _crop(core_c, cols, scale)]
                if stop == len(ops):
                    if out is None:
                        out = h.new_empty(*h.shape[:-2], int(height * scale), int(width * scale))
                    out[
                        ...,
                        int(core_r[0] * scale) : int(core_r[1] * scale),
                        int(core_c[0] * scale) : int(core_c[1] * scale),
                    ] = core
                    continue
                part = _group_sums(core, ops[stop].fn.num_groups)
                sums = part if sums is None else [a + b for a, b in zip(sums, part, strict=True)]
                store.put(key, [h, *residuals])
            if stop < len(ops):
                stats = _pooled_norm(ops[stop].fn, *sums)
            start = stop + 1
        return out
    finally:
        store.close()


def _crop(core: tuple[int, int], window: tuple[int, int], scale: Fraction) -> slice:
    return slice(int((core[0] - window[0]) * scale), int((core[1] - window[0]) * scale))


def _group_sums(x: torch.Tensor, groups: int) -> list[torch.Tensor]:
    grouped = x.double().reshape(x.shape[0], groups, -1)
    return [grouped.sum(-1), grouped.square().sum(-1), torch.tensor(grouped.shape[-1], dtype=torch.float64)]


def _pooled_norm(norm: nn.GroupNorm, total: torch.Tensor, squares: torch.Tensor, count: torch.Tensor):
    mean = total / count
    var = (squares / count - mean.square()).clamp_min(0)
    return _group_norm_with_stats(norm, mean.float(), var.float())


def exact_tiled_encode(vae: nn.Module, image: torch.Tensor, tile: int, **options: object) -> torch.Tensor:
    """Unscaled latent mean of ``image`` in [-1, 1]: the high-resolution stages on pixel tiles of
    about ``tile`` px, the rest untiled at latent resolution. ``options`` go to :func:`run_tiled`."""
    head, tiled, tail = split_tiled(encoder_program(vae))
    with torch.no_grad():
        return run_untiled(tail, run_tiled(tiled, run_untiled(head, image), tile, **options))


def exact_tiled_decode(vae: nn.Module, latents: torch.Tensor, tile: int, **options: object) -> torch.Tensor:
    """Image in [-1, 1] from unscaled ``latents``: the mid-block untiled at latent resolution, the
    upsampling stages on latent tiles of about ``tile`` px. ``options`` go to :func:`run_tiled`."""
    head, tiled, tail = split_tiled(decoder_program(vae))
    with torch.no_grad():
        return run_untiled(tail, run_tiled(tiled, run_untiled(head, latents), tile, **options))


__all__ = [
    "DEFAULT_RESIDENT_BYTES",
    "Op",
    "decoder_program",
    "encoder_program",
    "exact_tiled_decode",
    "exact_tiled_encode",
    "run_tiled",
    "run_untiled",
    "split_tiled",
]
