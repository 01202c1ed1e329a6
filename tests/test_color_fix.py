"""Colour fixes: AdaIN statistics transfer and the à-trous wavelet low/high band swap."""

import pytest
import torch

from tvt.models.color_fix import (
    adain_color_fix,
    apply_color_fix,
    wavelet_blur,
    wavelet_color_fix,
    wavelet_decompose,
)


def _smooth_image(seed: int, size: int = 48) -> torch.Tensor:
    """A smooth (B=2, 3, size, size) image in [0, 1]: a few low-frequency cosines per channel."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    fx, fy, phase = (torch.rand(2, 3, 1, 1, generator=g) * s for s in (1.5, 1.5, 6.28))
    return 0.5 + 0.2 * torch.cos(6.28 * (fx * xx + fy * yy) + phase)


def _checkerboard(size: int = 48, amplitude: float = 0.1) -> torch.Tensor:
    idx = torch.arange(size)
    return amplitude * (1 - 2 * ((idx[:, None] + idx[None, :]) % 2)).float()


def test_adain_matches_reference_channel_statistics():
    g = torch.Generator().manual_seed(0)
    sr = torch.rand(2, 3, 20, 24, generator=g)
    ref = 0.3 * torch.rand(2, 3, 20, 24, generator=g) + torch.tensor([0.1, 0.5, 0.6]).view(1, 3, 1, 1)
    out = adain_color_fix(sr, ref)
    torch.testing.assert_close(out.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(2, 3)), ref.std(dim=(2, 3)), atol=1e-4, rtol=1e-4)
    # The structure is sr's: per channel, out is an increasing affine map of sr.
    corr = torch.corrcoef(torch.stack([out[0, 0].flatten(), sr[0, 0].flatten()]))[0, 1]
    assert corr > 0.9999


def test_wavelet_decomposition_is_exact_and_separates_bands():
    img = _smooth_image(1)
    high, low = wavelet_decompose(img, levels=5)
    torch.testing.assert_close(high + low, img, atol=1e-6, rtol=0)
    # A constant image has no detail and survives replicate-padded blurring unchanged.
    const = torch.full((1, 3, 17, 23), 0.37)
    c_high, c_low = wavelet_decompose(const)
    assert c_high.abs().max() < 1e-6 and (c_low - 0.37).abs().max() < 1e-6
    # The binomial kernel removes a checkerboard (the Nyquist pattern) away from the borders.
    assert wavelet_blur(_checkerboard().expand(1, 3, -1, -1), 1)[..., 2:-2, 2:-2].abs().max() < 1e-6


def test_wavelet_fix_keeps_sr_detail_and_takes_reference_colour():
    ref = _smooth_image(2)
    detail = _checkerboard()
    cast = torch.tensor([0.15, -0.1, 0.05]).view(1, 3, 1, 1)
    sr = ref + detail + cast  # the model added texture but shifted the colours
    out = wavelet_color_fix(sr, ref)
    # The colour cast (up to 0.15) is gone and the checkerboard texture (0.1) is kept; only the
    # borders' replicate padding leaks a little checkerboard into the low band (< 3 %).
    torch.testing.assert_close(out, ref + detail, atol=3e-3, rtol=0)
    # Band view: high band of the output is sr's, low band is ref's (by construction).
    sr_high, _ = wavelet_decompose(sr)
    _, ref_low = wavelet_decompose(ref)
    torch.testing.assert_close(out, sr_high + ref_low)
    # And the low band of a pure colour shift is exactly the shift.
    _, shifted_low = wavelet_decompose(ref + cast)
    torch.testing.assert_close(shifted_low - ref_low, cast.expand_as(ref_low), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["adain", "wavelet", "none"])
def test_identity_when_sr_equals_reference(mode):
    img = torch.rand(2, 3, 19, 21, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(apply_color_fix(mode, img, img), img, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fix", [adain_color_fix, wavelet_color_fix])
def test_same_result_in_either_value_range(fix):
    g = torch.Generator().manual_seed(4)
    sr, ref = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g)
    in_unit = fix(sr, ref)
    in_signed = fix(sr * 2 - 1, ref * 2 - 1)
    torch.testing.assert_close((in_signed + 1) / 2, in_unit, atol=1e-5, rtol=0)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown colour fix 'histogram'"):
        apply_color_fix("histogram", torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="same .* shape"):
        adain_color_fix(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 8, 8))
