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
  equals untiled up to float rounding. The window shrinks as the tile advances, to the radius
  of the ops still ahead, so the costly full-resolution end of a decoder runs on little more
  than the core.
* **Attention untiled.** ``vaehook`` runs the mid-block attention per tile (a tile attends to
  itself only). Here everything at and beyond the mid-block attention runs untiled at latent
  resolution (1/64 of the image area for SD's VAE), exactly as the VAE does.
* **Bounded RSS.** ``vaehook`` keeps every tile's activations in CPU RAM (its header: ~20 GB for
  a 4096² image). Here tile states beyond ``resident_bytes`` are spilled to a temporary folder
  between GroupNorms, so resident memory is one tile's working set plus that budget (plus the
  untiled attention part, which grows with the image).

The cost is one extra pass over the stored tile states per GroupNorm (I/O, not compute).
Supported: diffusers' ``AutoencoderKL`` encoder/decoder and :class:`~tvt.models.vae_d4.VAED4`
(``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``, ``UNetMidBlock2D``) and basicsr's
``RRDB``; anything else raises an error that names the module. Programs may also pass maps
between passes: a ``write`` task stores each tile's core into a :class:`FeatureMap` (RAM or
disk), a ``read`` task concatenates a stored map over the tile's window — how StableSR's CFW
decoder fuses the encoder's features (:meth:`tvt.models.cfw.CFWAutoencoder.tiled_decode`).
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

from basicsr.archs.rrdbnet_arch import RRDB
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from tvt.models.tiling import _group_norm_with_stats

#: Tile states kept in RAM before spilling to disk, on CPU. 128 MiB, not more: with SD 2.1's decoder
#: a 1 GiB budget took the working memory from 2.3 GB (1024²) to 3.6 GB (2048²), 128 MiB held it at
#: 1.3 GB for both, for 11 % more CPU time at 1024² and none at 2048² (docs/inference.md).
CPU_RESIDENT_BYTES = 128 << 20
#: The same on an accelerator, where the states sit in device memory and a spill is a device -> host
#: -> disk round trip per GroupNorm that the CPU figures do not price: the earlier 1 GiB (unmeasured).
ACCELERATOR_RESIDENT_BYTES = 1 << 30


def default_resident_bytes(device: torch.device) -> int:
    """The tile-state budget for maps on ``device`` (see the two constants above)."""
    return CPU_RESIDENT_BYTES if torch.device(device).type == "cpu" else ACCELERATOR_RESIDENT_BYTES


@dataclass(frozen=True)
class Op:
    """One task of a flattened VAE network.

    kind: ``local`` (``fn`` needs ``radius`` pixels of context at its input resolution and
    scales the resolution by ``scale``), ``norm`` (a GroupNorm, ``fn`` is the module), ``save``
    (push ``fn(x)`` as the residual), ``add`` (``(residual + x) / factor``), ``global`` (``fn``
    needs the whole map), ``write`` (``fn`` is a :class:`FeatureMap`'s ``write``: the tile's core
    of ``x`` is stored, ``x`` passes on), ``read`` (``fn`` is a :class:`FeatureMap`'s ``read``:
    the stored map over the tile's window is concatenated in front of ``x``'s channels).
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


def resnet_ops(block: nn.Module, name: str) -> list[Op]:
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


def rrdb_op(block: nn.Module, name: str) -> Op:
    """An ESRGAN RRDB (basicsr ``RRDB``: three dense blocks of five 3x3 convs) as one local task.

    A dense block feeds each conv the concatenation of all earlier outputs, so its longest path
    runs through all five convs: the block's receptive radius is the sum of theirs (5 for 3x3),
    the RRDB's the sum over its three blocks (15). It has no GroupNorm, so it needs no split.
    """
    if not isinstance(block, RRDB):
        raise TypeError(f"exact tiling: unsupported block {name} ({type(block).__name__}), expected an RRDB")
    convs = [
        _conv(getattr(rdb, f"conv{k}"), f"{name}.{rdb_name}.conv{k}")
        for rdb_name, rdb in (("rdb1", block.rdb1), ("rdb2", block.rdb2), ("rdb3", block.rdb3))
        for k in range(1, 6)
    ]
    return Op("local", block, radius=sum(conv.radius for conv in convs), name=name)


def _mid_block(block: nn.Module, name: str) -> list[Op]:
    if not isinstance(block, UNetMidBlock2D):
        raise TypeError(f"exact tiling: unsupported mid-block {name} ({type(block).__name__})")
    ops = resnet_ops(block.resnets[0], f"{name}.resnets.0")
    for i, (attention, resnet) in enumerate(zip(block.attentions, block.resnets[1:], strict=True)):
        if attention is not None:
            if not isinstance(attention, Attention):
                raise ValueError(f"exact tiling: unsupported attention {name}.attentions.{i}")
            ops.append(Op("global", attention, name=f"{name}.attentions.{i}"))
        ops += resnet_ops(resnet, f"{name}.resnets.{i + 1}")
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
            ops += resnet_ops(resnet, f"{name}.{i}.resnets.{j}")
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


def module_end(ops: list[Op], name: str) -> int:
    """The position just after the last task of module ``name`` (e.g. ``decoder.up_blocks.1.resnets.0``:
    after its residual add), where tasks that read the module's output go."""
    ends = [i + 1 for i, op in enumerate(ops) if op.name == name or op.name.startswith(f"{name}.")]
    if not ends:
        raise ValueError(f"exact tiling: no task of module {name!r} in the program")
    return ends[-1]


def run_untiled(ops: list[Op], x: torch.Tensor) -> torch.Tensor:
    """Run tasks on a whole map; GroupNorms with their own statistics (the reference path)."""
    residuals: list[torch.Tensor] = []
    for op in ops:
        x = _step(op, x, residuals)
    return x


def _step(
    op: Op,
    x: torch.Tensor,
    residuals: list[torch.Tensor],
    tile: _Tile | None = None,
    scale: Fraction = Fraction(1),
    margin: int = 0,
) -> torch.Tensor:
    """One task on a whole map (``tile`` None) or on ``tile``'s window of ``margin`` input pixels
    around its core, at resolution ``scale``."""
    if op.kind == "save":
        residuals.append(op.fn(x))
    elif op.kind == "add":
        x = (residuals.pop() + x) / op.factor
    elif op.kind == "read":
        rows, cols = tile.window(scale, margin) if tile else _whole(x)
        feature = op.fn(rows, cols)
        if feature.shape[0] != x.shape[0] or feature.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"exact tiling: {op.name} reads a map of {tuple(feature.shape)} onto features of {tuple(x.shape)}"
            )
        x = torch.cat([feature, x], dim=1)
    elif op.kind == "write":
        (rows, cols), (own_rows, own_cols) = tile.core(scale, margin) if tile else (_whole(x), _whole(x))
        size = tile.size(scale) if tile else tuple(x.shape[-2:])
        op.fn(x[..., own_rows, own_cols], rows, cols, size)
    else:
        x = op.fn(x)
    return x


def _whole(x: torch.Tensor) -> tuple[slice, slice]:
    return slice(0, x.shape[-2]), slice(0, x.shape[-1])


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


def _resolution_track(ops: list[Op]) -> tuple[list[Fraction], int, list[int]]:
    """Per op its input resolution (relative to the tiled input) and the margin its input needs
    around a core: the receptive radius of it and every later op in input pixels, rounded up to
    the alignment tiles need (the product of downsamplings; also returned). ``margins[0]`` is
    the halo; later ops need less, so a tile's window shrinks as it advances."""
    scales, scale = [], Fraction(1)
    for op in ops:
        scales.append(scale)
        scale *= op.scale
    align = int(max(1, math.prod(1 / s for s in (op.scale for op in ops) if s < 1).numerator))
    margins, radius = [], Fraction(0)
    for op, scale in zip(reversed(ops), reversed(scales), strict=True):
        radius += Fraction(op.radius) / scale
        margins.append(-(-math.ceil(radius) // align) * align)
    return scales, align, margins[::-1]


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


class FeatureMap:
    """A (B, C, H, W) map written core by core and read window by window by tiled tasks.

    What one pass computes and a later one reads (CFW: the encoder's features, which the decoder
    fuses). In RAM, or with ``on_disk`` in a temporary file of ``block`` x ``block`` pixel blocks
    accessed with ``pread``/``pwrite``: a core write or window read touches only the blocks it
    overlaps, so resident memory is one window, not the map (a memory map would count every
    page touched in the process's RSS).
    """

    def __init__(self, *, on_disk: bool = False, block: int = 32):
        self.on_disk, self.block = on_disk, block
        self.shape: tuple[int, ...] | None = None
        self._data: torch.Tensor | None = None
        self._file = None

    def _allocate(self, like: torch.Tensor, size: tuple[int, int]) -> None:
        self.shape, self.dtype = (*like.shape[:2], *size), like.dtype
        if not self.on_disk:
            whole = tuple(like.shape[-2:]) == tuple(size)  # an untiled run: keep it, no copy
            self._data = like if whole else like.new_empty(self.shape)
            return
        self._grid = (-(-size[0] // self.block), -(-size[1] // self.block))
        self._block_shape = (*like.shape[:2], self.block, self.block)
        self._block_bytes = math.prod(self._block_shape) * like.element_size()
        self._file = tempfile.TemporaryFile(prefix="tvt-feature-")  # noqa: SIM115 (closed by close())
        os.ftruncate(self._file.fileno(), math.prod(self._grid) * self._block_bytes)  # sparse: zeros

    def _blocks(self, rows: slice, cols: slice):
        """(offset in the file, block's part, the region's part) of every block ``rows`` x ``cols`` overlaps."""
        b = self.block
        for i in range(rows.start // b, -(-rows.stop // b)):
            r0, r1 = max(rows.start, i * b), min(rows.stop, (i + 1) * b)
            for j in range(cols.start // b, -(-cols.stop // b)):
                c0, c1 = max(cols.start, j * b), min(cols.stop, (j + 1) * b)
                offset = (i * self._grid[1] + j) * self._block_bytes
                yield (
                    offset,
                    (slice(r0 - i * b, r1 - i * b), slice(c0 - j * b, c1 - j * b)),
                    (slice(r0 - rows.start, r1 - rows.start), slice(c0 - cols.start, c1 - cols.start)),
                )

    def _load(self, offset: int) -> torch.Tensor:
        block = torch.empty(self._block_shape, dtype=self.dtype)
        os.preadv(self._file.fileno(), [block.view(torch.uint8).numpy()], offset)
        return block

    def write(self, value: torch.Tensor, rows: slice, cols: slice, size: tuple[int, int]) -> None:
        """Store ``value`` as the map's ``[..., rows, cols]``; the map is ``size`` pixels."""
        if self.shape is None:
            self._allocate(value, size)
        if tuple(self.shape[-2:]) != tuple(size) or value.shape[:2] != self.shape[:2]:
            raise ValueError(f"FeatureMap of {self.shape} written as {(*value.shape[:2], *size)}")
        if not self.on_disk:
            if self._data is not value:
                self._data[..., rows, cols] = value
            return
        for offset, (block_rows, block_cols), (own_rows, own_cols) in self._blocks(rows, cols):
            whole = block_rows.stop - block_rows.start == block_cols.stop - block_cols.start == self.block
            block = torch.empty(self._block_shape, dtype=self.dtype) if whole else self._load(offset)
            block[..., block_rows, block_cols] = value[..., own_rows, own_cols]
            os.pwrite(self._file.fileno(), block.view(torch.uint8).numpy(), offset)

    def read(self, rows: slice, cols: slice) -> torch.Tensor:
        """The map's ``[..., rows, cols]`` (a copy when on disk)."""
        if self.shape is None:
            raise ValueError("FeatureMap read before anything was written to it")
        if rows.start < 0 or cols.start < 0 or rows.stop > self.shape[-2] or cols.stop > self.shape[-1]:
            raise ValueError(f"FeatureMap of {self.shape}: rows {rows} / cols {cols} fall outside it")
        if not self.on_disk:
            return self._data[..., rows, cols]
        out = torch.empty(*self.shape[:2], rows.stop - rows.start, cols.stop - cols.start, dtype=self.dtype)
        for offset, (block_rows, block_cols), (own_rows, own_cols) in self._blocks(rows, cols):
            out[..., own_rows, own_cols] = self._load(offset)[..., block_rows, block_cols]
        return out

    def tensor(self) -> torch.Tensor:
        """The whole map (read from disk when it is there)."""
        return self.read(slice(0, self.shape[-2]), slice(0, self.shape[-1]))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _spans(length: int, core: int, align: int) -> list[tuple[int, int]]:
    """Cores along one side: near-equal, aligned, covering [0, length)."""
    count = max(1, math.ceil(length / core))
    bounds = sorted({round(i * length / count / align) * align for i in range(count)} | {length})
    return list(itertools.pairwise(bounds))


@dataclass(frozen=True)
class _Tile:
    """A core — the part of the map the tile owns; cores partition it — as (start, stop) rows and
    columns in input pixels of a ``height`` x ``width`` input. Its window at margin ``m`` is the
    core grown by ``m`` on every side, clipped to the map."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    height: int
    width: int

    def _span(self, margin: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return (
            (max(0, self.rows[0] - margin), min(self.height, self.rows[1] + margin)),
            (max(0, self.cols[0] - margin), min(self.width, self.cols[1] + margin)),
        )

    def size(self, scale: Fraction) -> tuple[int, int]:
        return int(self.height * scale), int(self.width * scale)

    def window(self, scale: Fraction, margin: int) -> tuple[slice, slice]:
        """The window in the map at resolution ``scale``."""
        return tuple(slice(int(a * scale), int(b * scale)) for a, b in self._span(margin))

    def core(self, scale: Fraction, margin: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """The core in the map and in the window of ``margin``, at resolution ``scale``."""
        in_window = tuple(_crop(core, span, scale) for core, span in zip((self.rows, self.cols), self._span(margin)))
        return self.window(scale, 0), in_window

    def crop(self, x: torch.Tensor, scale: Fraction, margin: int, to: int) -> torch.Tensor:
        """``x``, the window of ``margin`` at resolution ``scale``, cut to the window of ``to``."""
        if to == margin:
            return x
        (rows, cols), (old_rows, old_cols) = self._span(to), self._span(margin)
        return x[..., _crop(rows, old_rows, scale), _crop(cols, old_cols, scale)]


def run_tiled(
    ops: list[Op],
    x: torch.Tensor,
    tile: int,
    *,
    resident_bytes: int | None = None,
    into: FeatureMap | None = None,
) -> torch.Tensor | None:
    """Run local and GroupNorm tasks on cores of side about ``tile`` (input pixels) plus the halo.

    All tiles advance together from one GroupNorm to the next; each GroupNorm normalises with
    the mean and variance pooled over every tile's core, so the result is the untiled one. A
    tile's window shrinks as it advances, to what the remaining tasks need (the decoder's
    full-resolution stages run on little more than the core). The result is returned, or
    written to ``into`` (then None is returned). ``resident_bytes``: the RAM budget of the tile
    states, by default :func:`default_resident_bytes` of ``x``'s device.
    """
    if any(op.kind == "global" for op in ops):
        raise ValueError("run_tiled: global tasks (attention) must run untiled; see split_tiled")
    out = FeatureMap() if into is None else into
    program = [*ops, Op("write", out.write, name="output")]
    scales, align, margins = _resolution_track(program)
    height, width = x.shape[-2:]
    if height % align or width % align:
        raise ValueError(f"exact tiling: input {height}x{width} must be a multiple of {align}")
    tile = max(align, tile // align * align)
    if height <= tile and width <= tile:
        run_untiled(program, x)
        return out.tensor() if into is None else None

    tiles = [
        _Tile(rows, cols, height, width) for rows in _spans(height, tile, align) for cols in _spans(width, tile, align)
    ]
    saved_at, residual_margins = [], {}  # the margin each residual was saved with, per add task
    for i, op in enumerate(program):
        if op.kind == "save":
            saved_at.append(margins[i])
        elif op.kind == "add":
            residual_margins[i] = saved_at.pop()
    segments = [i for i, op in enumerate(program) if op.kind == "norm"] + [len(program)]
    store = _TileStore(default_resident_bytes(x.device) if resident_bytes is None else resident_bytes)
    try:
        for key, t in enumerate(tiles):
            rows, cols = t.window(Fraction(1), margins[0])
            store.put(key, [x[..., rows, cols]])
        start, stats = 0, None
        for stop in segments:
            sums = None
            for key, t in enumerate(tiles):
                h, *residuals = store.take(key)
                margin = margins[max(0, start - 1)]
                if stats is not None:
                    h = stats(h)
                for i in range(start, stop):
                    h, margin = t.crop(h, scales[i], margin, margins[i]), margins[i]
                    if program[i].kind == "add":
                        residuals[-1] = t.crop(residuals[-1], scales[i], residual_margins[i], margin)
                    h = _step(program[i], h, residuals, t, scales[i], margin)
                if stop == len(program):
                    continue
                h = t.crop(h, scales[stop], margin, margins[stop])
                _, (rows, cols) = t.core(scales[stop], margins[stop])
                part = _group_sums(h[..., rows, cols], program[stop].fn.num_groups)
                sums = part if sums is None else [a + b for a, b in zip(sums, part, strict=True)]
                store.put(key, [h, *residuals])
            if stop < len(program):
                stats = _pooled_norm(program[stop].fn, *sums)
            start = stop + 1
    finally:
        store.close()
    return out.tensor() if into is None else None


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
    "ACCELERATOR_RESIDENT_BYTES",
    "CPU_RESIDENT_BYTES",
    "FeatureMap",
    "Op",
    "decoder_program",
    "default_resident_bytes",
    "encoder_program",
    "exact_tiled_decode",
    "exact_tiled_encode",
    "module_end",
    "resnet_ops",
    "rrdb_op",
    "run_tiled",
    "run_untiled",
    "split_tiled",
]
