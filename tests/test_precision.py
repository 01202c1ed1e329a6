"""Inference options (tvt/inference.py): reduced-precision denoiser with an fp32 VAE, channels-last."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from test_stablesr_restorer import restorer as stablesr  # noqa: F401  (the mini StableSR restorer fixture)

from tvt import compat

compat.apply()

from diffusers import AutoencoderKL, UNet2DConditionModel

from tvt import inference
from tvt.inference import InferenceOptions, describe, prepare_for_inference
from tvt.models.restorer import build_osediff_restorer, build_tvt_restorer, predict_x0
from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D4, MINI_VAE_D8
from tvt.models.vae_d4 import VAED4


def _lr(side: int = 16) -> torch.Tensor:
    image = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(image, size=(side, side), mode="area")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / (a.double() - b.double()).square().mean().item())


@pytest.fixture(scope="module")
def tvt_restorer():
    torch.manual_seed(0)
    return build_tvt_restorer(VAED4(**MINI_VAE_D4), UNet2DConditionModel(**MINI_UNET)).eval()


def test_options_are_validated_and_labelled():
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        InferenceOptions(precision="int8")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        InferenceOptions(threads=0)
    assert InferenceOptions(precision="bf16", channels_last=True).label == "bf16+fp32 VAE, channels-last"


def test_bf16_denoiser_keeps_an_fp32_vae_and_stays_close(tvt_restorer):
    fast = prepare_for_inference(copy.deepcopy(tvt_restorer), InferenceOptions(precision="bf16"))
    assert fast.unet.dtype == torch.bfloat16 and fast.vae.dtype == torch.float32
    lr = _lr()
    with torch.inference_mode():
        reference, out = tvt_restorer(lr), fast(lr)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert 20 < _psnr(reference, out) < 120  # rounded, not broken, and not a silent fp32 run


def test_channels_last_is_exact_up_to_summation_order(tvt_restorer):
    fast = prepare_for_inference(copy.deepcopy(tvt_restorer), InferenceOptions(channels_last=True))
    assert fast.vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    lr = _lr()
    with torch.inference_mode():
        torch.testing.assert_close(fast(lr), tvt_restorer(lr), rtol=0, atol=1e-4)


def test_stablesr_runs_a_bf16_denoiser_with_an_fp32_vae_and_cfw(stablesr):  # noqa: F811
    fast = prepare_for_inference(copy.deepcopy(stablesr), InferenceOptions(precision="bf16"))
    assert fast.unet.dtype == torch.bfloat16 and fast.conditioner.dtype == torch.bfloat16
    assert fast.vae.dtype == torch.float32 and next(fast.cfw.parameters()).dtype == torch.float32
    lr = _lr(12)
    with torch.inference_mode():
        out, reference = fast(lr, w=1.0), stablesr(lr, w=1.0)
    assert torch.isfinite(out).all() and _psnr(reference, out) > 15


@pytest.fixture(scope="module")
def osediff_restorer():
    torch.manual_seed(0)
    return build_osediff_restorer(AutoencoderKL(**MINI_VAE_D8), UNet2DConditionModel(**MINI_UNET)).eval()


@pytest.mark.parametrize(
    ("device", "bf16_units", "method", "expected"),
    [
        ("cpu", True, "tvt", "bf16"),  # t = 1: the UNet's rounding is not amplified
        ("cpu", True, "osediff", "fp32"),  # t = 999: amplified 14.6x, 37 dB from fp32 at SD size
        ("cpu", False, "tvt", "fp32"),  # no bf16 units: bf16 only adds casts
        ("cuda", False, "osediff", "fp16"),
    ],
)
def test_the_default_is_the_fastest_option_measured_exact(request, monkeypatch, device, bf16_units, method, expected):
    monkeypatch.setattr(inference, "cpu_has_bf16_units", lambda: bf16_units)
    restorer = request.getfixturevalue(f"{method}_restorer")
    options = inference.fastest_exact_options(restorer, device)
    assert (options.precision, options.channels_last, options.vae_fp32, options.threads) == (expected, True, True, None)


def test_error_gain_is_that_of_the_x0_prediction(tvt_restorer, osediff_restorer):
    """ẑ_H moves by gain × δ when ε moves by δ."""
    z, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    delta = 1e-3 * torch.randn_like(eps)
    moved = predict_x0(z, eps + delta, tvt_restorer.alpha_bar) - predict_x0(z, eps, tvt_restorer.alpha_bar)
    assert moved.norm() / delta.norm() == pytest.approx(tvt_restorer.eps_error_gain, rel=1e-3)
    assert tvt_restorer.eps_error_gain < 0.05 and osediff_restorer.eps_error_gain == pytest.approx(14.6, abs=0.05)


def test_stablesr_keeps_fp32_on_a_cpu_even_with_bf16_units(monkeypatch, stablesr):  # noqa: F811
    monkeypatch.setattr(inference, "cpu_has_bf16_units", lambda: True)
    assert inference.fastest_exact_options(stablesr, "cpu").precision == "fp32"


def test_describe_reads_what_the_restorer_runs_in(tvt_restorer):
    assert describe(tvt_restorer) == "denoiser fp32, VAE fp32, contiguous"
    fast = prepare_for_inference(copy.deepcopy(tvt_restorer), InferenceOptions(precision="bf16", channels_last=True))
    assert describe(fast) == "denoiser bf16, VAE fp32, channels-last"
