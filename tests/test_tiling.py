"""Seam-free tiling: tile grids, Gaussian blending, shared GroupNorm statistics, padding."""

import itertools

import numpy as np
import pytest
import torch
from sample_photos import photo_array
from torch import nn

from tvt.models.sd_configs import MINI_VAE_D4
from tvt.models.tiling import (
    crop_to,
    frozen_group_norm_stats,
    gaussian_weight,
    pad_to_multiple,
    tile_starts,
    tiled_apply,
    tiled_decode,
    tiled_encode,
)
from tvt.models.vae_d4 import VAED4


def _photo(height: int, width: int) -> torch.Tensor:
    """A (1, 3, height, width) crop of the 'coffee' photo in [-1, 1]."""
    rgb = photo_array("coffee").astype(np.float32)[:height, :width]
    return torch.from_numpy(rgb).permute(2, 0, 1)[None] / 127.5 - 1


class _ConvNet(nn.Module):
    """Three 3x3 convolutions (receptive radius 3) then a pixel shuffle (x2) or a stride (/2)."""

    def __init__(self, scale: float):
        super().__init__()
        torch.manual_seed(0)
        up = int(scale) if scale >= 1 else 1
        last = nn.Conv2d(8, 3 * up * up, 3, padding=1, stride=1 if scale >= 1 else 2)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.Tanh(),
            last,
            nn.PixelShuffle(up),
        )

    def forward(self, x):
        return self.body(x)


def test_gaussian_weight_is_separable_centred_and_scaled_by_sigma_ratio():
    w = gaussian_weight(9, 15, sigma_ratio=0.2)
    assert w.shape == (9, 15)
    assert w[4, 7] == pytest.approx(1.0) and w.max() == w[4, 7]
    torch.testing.assert_close(w, w.flip(0).flip(1))
    torch.testing.assert_close(w, w[:, 7:8] * w[4:5, :])
    # The corner pixel of a 15-wide side sits 7 px from the centre, sigma = 0.2 * 15 = 3 px.
    assert w[4, 0].item() == pytest.approx(np.exp(-0.5 * (7 / 3) ** 2), rel=1e-5)


@pytest.mark.parametrize(
    "length,tile,overlap,multiple",
    [(100, 32, 8, 1), (96, 32, 16, 8), (200, 64, 16, 8), (65, 64, 8, 1), (30, 64, 8, 2), (4096, 512, 64, 64)],
)
def test_tile_starts_cover_exactly_with_the_requested_overlap(length, tile, overlap, multiple):
    starts = tile_starts(length, tile, overlap, multiple)
    side = min(tile, length)
    assert starts[0] == 0 and starts[-1] + side == length
    assert all(s % multiple == 0 for s in starts)
    assert all(b - a > 0 and a + tile - b >= overlap for a, b in itertools.pairwise(starts))


@pytest.mark.parametrize("scale", [1, 2, 0.5])
def test_tiled_conv_net_matches_untiled_without_seams(scale):
    net = _ConvNet(scale).eval()
    x = _photo(96, 112)
    with torch.no_grad():
        full = net(x)
        tiled = tiled_apply(net, x, tile=32, overlap=16, scale_out=scale)
    assert tiled.shape == full.shape
    # Only the Gaussian tails of truncated tile borders leak in: < 1 % at worst, 0.1 % on average.
    peak, err = full.abs().max(), (tiled - full).abs()
    assert err.max() < 0.01 * peak and err.mean() < 1e-3 * peak, (err.max(), err.mean())
    # Across every tile border the tiled image steps as the untiled one does: no seam.
    borders = sorted({int((s + e) * scale) for s in tile_starts(112, 32, 16) for e in (0, 32)} - {0, int(112 * scale)})
    steps_tiled = tiled[..., borders] - tiled[..., [b - 1 for b in borders]]
    steps_full = full[..., borders] - full[..., [b - 1 for b in borders]]
    assert (steps_tiled - steps_full).abs().max() < 0.01 * peak


@pytest.mark.parametrize("height,width", [(37, 23), (5, 61), (64, 64)])
def test_output_is_exactly_scale_times_input_for_odd_sizes(height, width):
    x = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    up4 = lambda t: torch.repeat_interleave(torch.repeat_interleave(t, 4, -2), 4, -1)
    out = tiled_apply(up4, x, tile=16, overlap=4, scale_out=4)
    assert out.shape == (2, 3, 4 * height, 4 * width)
    torch.testing.assert_close(out, up4(x))  # blending identical tiles changes nothing
    # 1/8 needs sides that are multiples of 8: pad, tile, crop back.
    padded = pad_to_multiple(x, 8)
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    pool8 = lambda t: nn.functional.avg_pool2d(t, 8)
    assert tiled_apply(pool8, padded, tile=16, overlap=8, scale_out=1 / 8).shape[-2:] == (
        padded.shape[-2] // 8,
        padded.shape[-1] // 8,
    )


def test_half_precision_tiles_blend_without_vanishing_corner_weights():
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)).half()
    out = tiled_apply(lambda t: t * 2, x, tile=32, overlap=8)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out, x * 2)


def test_pad_to_multiple_mirrors_and_crop_to_restores():
    x = torch.arange(15.0).view(1, 1, 3, 5)
    padded = pad_to_multiple(x, 8)
    assert padded.shape == (1, 1, 8, 8)
    torch.testing.assert_close(crop_to(padded, 3, 5), x)
    torch.testing.assert_close(padded[0, 0, 0, 5:], torch.tensor([3.0, 2.0, 1.0]))  # reflected
    assert pad_to_multiple(torch.zeros(1, 3, 1, 7), 4).shape == (1, 3, 4, 8)  # 1-px side


def test_misaligned_input_and_wrong_scale_are_named():
    with pytest.raises(ValueError, match="multiple of 8 .*pad_to_multiple"):
        tiled_apply(lambda t: t[..., ::8, ::8], torch.zeros(1, 3, 60, 64), 32, 8, scale_out=1 / 8)
    with pytest.raises(ValueError, match="expected .* for scale_out=2"):
        tiled_apply(lambda t: t, torch.zeros(1, 3, 64, 64), 32, 8, scale_out=2)
    with pytest.raises(ValueError, match="needs the norm_module"):
        tiled_apply(lambda t: t, torch.zeros(1, 3, 64, 64), 32, 8, norm_stats="image")


@pytest.fixture(scope="module")
def mini_vae_d4():
    torch.manual_seed(0)
    return VAED4(**MINI_VAE_D4).eval()


def test_frozen_group_norm_stats_reproduce_untiled_and_are_released(mini_vae_d4):
    x = _photo(128, 128)
    crop = (..., slice(32, 96), slice(32, 96))  # latent 8..24; the centre 14..18 is 24 px
    centre = (..., slice(14, 18), slice(14, 18))  # from the crop border (> receptive radius)
    encode = lambda t: mini_vae_d4.encode(t).latent_dist.mode()
    with torch.no_grad():
        reference = encode(x)
        crop_alone = encode(x[crop])
        with frozen_group_norm_stats(mini_vae_d4, lambda: encode(x)):
            torch.testing.assert_close(encode(x), reference)
            crop_frozen = encode(x[crop])
        after = encode(x[crop])
    centre_of_crop = (..., slice(6, 10), slice(6, 10))
    assert (crop_frozen[centre_of_crop] - reference[centre]).abs().max() < 1e-5
    assert (crop_alone[centre_of_crop] - reference[centre]).abs().max() > 1e-2  # own stats differ
    torch.testing.assert_close(after, crop_alone)  # GroupNorms behave normally again


@pytest.mark.slow
def test_tiled_vae_d4_matches_untiled_with_image_statistics(mini_vae_d4):
    x = _photo(192, 160)
    with torch.no_grad():
        z = mini_vae_d4.encode(x).latent_dist.mode()
        decoded = mini_vae_d4.decode(z).sample
        z_tiled = tiled_encode(mini_vae_d4, x, tile=96, overlap=48, norm_stats="image")
        decoded_tiled = tiled_decode(mini_vae_d4, z, tile=32, overlap=16, norm_stats="image")
        decoded_per_tile = tiled_decode(mini_vae_d4, z, tile=32, overlap=16)
    assert z_tiled.shape == z.shape == (1, 4, 48, 40)
    assert decoded_tiled.shape == decoded_per_tile.shape == x.shape
    # Measured: 0.35 % / 0.15 % of the peak at worst, < 0.01 % on average.
    for tiled, full in ((z_tiled, z), (decoded_tiled, decoded)):
        peak, err = full.abs().max(), (tiled - full).abs()
        assert err.max() < 0.01 * peak and err.mean() < 2e-4 * peak, (err.max(), err.mean(), peak)
    # Shared statistics are what makes the tiles agree: per-tile statistics are far off.
    assert (decoded_per_tile - decoded).abs().mean() > 100 * (decoded_tiled - decoded).abs().mean()
