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

from diffusers import UNet2DConditionModel

from tvt.inference import InferenceOptions, prepare_for_inference
from tvt.models.restorer import build_tvt_restorer
from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D4
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
