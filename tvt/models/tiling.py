"""Seam-free tiled execution of image-to-image networks, so memory depends on the tile size.

Any network ``fn`` that maps a (B, C, h, w) tensor to (B, C', s*h, s*w) — a VAE encoder
(s = 1/8 or 1/4), a decoder (s = 4 or 8), a UNet in latent space (s = 1) — runs here on
overlapping tiles whose outputs are blended with Gaussian weights (as in StableSR's
aggregation sampling). A tile's weight is largest at its centre and small at its edges,
where its receptive field was cut off, so no tile border shows as a step.

GroupNorm is the other source of seams: it normalises with statistics of its whole input,
so on a tile every tile gets its own brightness and contrast. ``norm_stats`` chooses:

* ``"tile"`` — each tile its own statistics (diffusers' and StableSR's behaviour);
* ``"image"`` — every tile uses the statistics of one untiled calibration pass over the
  whole input (:func:`frozen_group_norm_stats`): tiled equals untiled up to receptive-field
  truncation at tile borders, but that pass costs as much memory as untiled inference
  (worth it where a later, tiled stage — e.g. a UNet's attention — is the memory bound);
* ``"exact"`` — VAEs only (:func:`tiled_encode`, :func:`tiled_decode`): statistics pooled over
  all tiles before any tile goes on (tiled_vae.py) — untiled output at tiled memory.

Estimating the statistics on a downscaled input (Tiled-VAE's "fast" mode) keeps memory
bounded, but in our measurements it drifted further from the untiled output than per-tile
statistics did (randomly initialised mini VAE-D4 decoder: mean error 0.27 vs 0.06), so it is
not offered.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

# StableSR's value (variance 0.01 of the side): a tile's truncated border pixels get almost
# no weight, so with an overlap of at least twice the receptive radius tiled == untiled
# (measured on the mini VAE-D4: 0.3 % max error; 0.15 gives 1.5 %, from the border leak).
DEFAULT_SIGMA_RATIO = 0.1
NORM_STATS_MODES = ("tile", "image", "exact")


def gaussian_weight(
    height: int,
    width: int,
    sigma_ratio: float = DEFAULT_SIGMA_RATIO,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Separable Gaussian tile weight of shape (height, width), peak 1 at the centre.

    The standard deviation along each side is ``sigma_ratio`` times that side.
    """

    def profile(n: int) -> torch.Tensor:
        pos = torch.arange(n, device=device, dtype=torch.float64) - (n - 1) / 2
        return torch.exp(-0.5 * (pos / (sigma_ratio * n)) ** 2)

    return (profile(height)[:, None] * profile(width)[None, :]).to(dtype)


def tile_starts(length: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Offsets of tiles of side ``tile`` covering ``[0, length)`` with at least ``overlap`` shared.

    The tiles are spread evenly, the first starts at 0 and the last ends exactly at
    ``length``; every offset is a multiple of ``multiple`` (``length``, ``tile`` and
    ``tile - overlap`` must be multiples of it too). One tile when ``length <= tile``.
    """
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    spacing = (length - tile) / (count - 1)
    return [round(i * spacing / multiple) * multiple for i in range(count)]


def _alignment(scale_out: float, multiple: int) -> tuple[Fraction, int]:
    """The output scale as a fraction and the input alignment it needs (1/8 needs 8)."""
    scale = Fraction(scale_out).limit_denominator(64)
    if scale <= 0 or abs(float(scale) - scale_out) > 1e-9:
        raise ValueError(f"scale_out must be a positive ratio of small integers, got {scale_out}")
    return scale, math.lcm(scale.denominator, multiple)


@contextlib.contextmanager
def frozen_group_norm_stats(module: nn.Module, calibrate: Callable[[], object]) -> Iterator[None]:
    """Within the block, every GroupNorm of ``module`` that ``calibrate()`` ran normalises with
    the per-sample, per-group mean and variance it saw during ``calibrate()``.

    Use it to run a network tile by tile as if it saw the whole image (see module docstring).
    Batch size must not change between calibration and use.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
    stats: dict[nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(norm: nn.GroupNorm, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        x = inputs[0]
        grouped = x.detach().float().reshape(x.shape[0], norm.num_groups, -1)
        var, mean = torch.var_mean(grouped, dim=-1, correction=0)
        stats[norm] = (mean, var)

    handles = [norm.register_forward_hook(record) for norm in norms]
    try:
        with torch.no_grad():
            calibrate()
    finally:
        for handle in handles:
            handle.remove()

    for norm, (mean, var) in stats.items():
        norm.forward = _group_norm_with_stats(norm, mean, var)  # instance attribute shadows
    try:
        yield
    finally:
        for norm in stats:
            del norm.forward


def _group_norm_with_stats(
    norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    inv_std = torch.rsqrt(var + norm.eps)

    def forward(x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        if batch != mean.shape[0]:
            raise ValueError(f"GroupNorm statistics were calibrated for batch {mean.shape[0]}, got {batch}")
        grouped = x.float().reshape(batch, norm.num_groups, -1)
        y = ((grouped - mean[..., None]) * inv_std[..., None]).reshape_as(x).to(x.dtype)
        if norm.affine:
            shape = (1, channels) + (1,) * (x.dim() - 2)
            y = y * norm.weight.view(shape) + norm.bias.view(shape)
        return y

    return forward


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale_out: float = 1,
    *,
    multiple: int = 1,
    sigma_ratio: float = DEFAULT_SIGMA_RATIO,
    norm_module: nn.Module | None = None,
    norm_stats: str = "tile",
) -> torch.Tensor:
    """Apply ``fn`` to overlapping ``tile``-sized tiles of ``x`` and blend the outputs.

    Args:
        fn: maps (B, C, h, w) to (B, C', h * scale_out, w * scale_out).
        x: (B, C, H, W); H and W must be multiples of the alignment (the denominator of
            ``scale_out`` and ``multiple``) — see :func:`pad_to_multiple`.
        tile, overlap: tile side and minimal overlap, in pixels of ``x``; rounded to the
            alignment. An input no larger than a tile is processed in one call.
        multiple: tile sides and offsets are multiples of it (e.g. a UNet's 2**downsamplings).
        sigma_ratio: Gaussian weight spread, as a fraction of the tile side.
        norm_module: the module whose GroupNorms ``fn`` runs (needed unless ``norm_stats``
            is ``"tile"``).
        norm_stats: ``"tile"`` or ``"image"`` (see the module docstring).
    """
    scale, align = _alignment(scale_out, multiple)
    height, width = x.shape[-2:]
    if height % align or width % align:
        raise ValueError(
            f"tiled input of size {height}x{width} must be a multiple of {align} "
            f"(scale_out={scale_out}, multiple={multiple}); pad it with pad_to_multiple first"
        )
    if norm_stats not in NORM_STATS_MODES:
        raise ValueError(f"unknown norm_stats {norm_stats!r}; expected one of {NORM_STATS_MODES}")
    if norm_stats == "exact":
        raise ValueError("norm_stats='exact' needs the VAE's structure: use tiled_encode/tiled_decode")
    if norm_stats != "tile" and norm_module is None:
        raise ValueError(f"norm_stats={norm_stats!r} needs the norm_module whose GroupNorms to share")
    tile = max(align, tile // align * align)
    overlap = min(tile - align, -(-overlap // align) * align)
    if height <= tile and width <= tile:
        return fn(x)

    norms_shared = contextlib.nullcontext()
    if norm_stats == "image":
        norms_shared = frozen_group_norm_stats(norm_module, lambda: fn(x))

    out = weight_sum = None
    with norms_shared:
        for top in tile_starts(height, tile, overlap, align):
            for left in tile_starts(width, tile, overlap, align):
                piece = x[..., top : top + tile, left : left + tile]
                expected = (int(piece.shape[-2] * scale), int(piece.shape[-1] * scale))
                y = fn(piece)
                if tuple(y.shape[-2:]) != expected:
                    raise ValueError(
                        f"fn mapped a {tuple(piece.shape[-2:])} tile to {tuple(y.shape[-2:])}, "
                        f"expected {expected} for scale_out={scale_out}"
                    )
                if out is None:  # float32 sums: corner weights (~1e-11) vanish in half precision
                    out_size = (int(height * scale), int(width * scale))
                    out = y.new_zeros(*y.shape[:-2], *out_size, dtype=torch.float32)
                    weight_sum = y.new_zeros(out_size, dtype=torch.float32)
                weight = gaussian_weight(*expected, sigma_ratio, device=y.device)
                rows = slice(int(top * scale), int(top * scale) + expected[0])
                cols = slice(int(left * scale), int(left * scale) + expected[1])
                out[..., rows, cols] += y.float() * weight
                weight_sum[rows, cols] += weight
    return (out / weight_sum).to(y.dtype)


def vae_downsample_factor(vae: nn.Module) -> int:
    """Spatial factor between a VAE's image and latent: VAED4 says so, AutoencoderKL implies it."""
    factor = getattr(vae, "downsample_factor", None)
    if factor is None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return int(factor)


def tiled_encode(vae: nn.Module, image: torch.Tensor, tile: int, overlap: int, **tiling: object) -> torch.Tensor:
    """Latent mean (the posterior's mode, unscaled) of ``image`` in [-1, 1], by pixel tiles.

    ``tile`` and ``overlap`` are in pixels; ``tiling`` goes to :func:`tiled_apply`, except with
    ``norm_stats="exact"`` (:func:`~tvt.models.tiled_vae.exact_tiled_encode`; ``overlap`` unused:
    the halo follows from the network; ``resident_bytes``: its RAM budget for tile states, None for
    the device's default).
    """
    resident_bytes = tiling.pop("resident_bytes", None)
    if tiling.get("norm_stats") == "exact":
        from tvt.models.tiled_vae import exact_tiled_encode  # tiled_vae builds on this module

        return exact_tiled_encode(vae, image, tile, resident_bytes=resident_bytes)
    factor = vae_downsample_factor(vae)
    encode = lambda x: vae.encode(x).latent_dist.mode()
    return tiled_apply(encode, image, tile, overlap, 1 / factor, norm_module=vae, **tiling)


def tiled_decode(vae: nn.Module, latents: torch.Tensor, tile: int, overlap: int, **tiling: object) -> torch.Tensor:
    """Image in [-1, 1] decoded from unscaled ``latents`` by latent tiles.

    ``tile`` and ``overlap`` are in latent pixels; ``tiling`` goes to :func:`tiled_apply`, except
    with ``norm_stats="exact"`` (:func:`~tvt.models.tiled_vae.exact_tiled_decode`, with
    ``resident_bytes`` as in :func:`tiled_encode`).
    """
    resident_bytes = tiling.pop("resident_bytes", None)
    if tiling.get("norm_stats") == "exact":
        from tvt.models.tiled_vae import exact_tiled_decode  # tiled_vae builds on this module

        return exact_tiled_decode(vae, latents, tile, resident_bytes=resident_bytes)
    factor = vae_downsample_factor(vae)
    decode = lambda z: vae.decode(z).sample
    return tiled_apply(decode, latents, tile, overlap, factor, norm_module=vae, **tiling)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad the bottom and right of ``x`` so both sides are multiples of ``multiple``.

    Mirroring is repeated when the padding exceeds the image (tiny inputs); a one-pixel side
    is replicated. Undo with :func:`crop_to`.
    """
    pad_h = -x.shape[-2] % multiple
    pad_w = -x.shape[-1] % multiple
    while pad_h or pad_w:
        step_h = min(pad_h, max(x.shape[-2] - 1, 1))
        step_w = min(pad_w, max(x.shape[-1] - 1, 1))
        reflectable = x.shape[-2] > step_h and x.shape[-1] > step_w
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect" if reflectable else "replicate")
        pad_h -= step_h
        pad_w -= step_w
    return x


def crop_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The top-left ``height`` x ``width`` window of ``x`` (inverse of :func:`pad_to_multiple`)."""
    return x[..., :height, :width]
