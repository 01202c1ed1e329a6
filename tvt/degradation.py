"""Real-ESRGAN second-order degradation: LR/HR pair synthesis with OSEDiff's parameters.

The degradation is Real-ESRGAN's (Wang et al., 2021) as configured by OSEDiff: blur, resize,
noise and JPEG applied twice, then [resize to H/scale + sinc filter] and JPEG in random order
(docs/method.md §1.4). It is built from basicsr's *parameterised* building blocks (kernel builders,
noise, ``filter2D``, ``DiffJPEG``) rather than its ``random_*`` wrappers: those draw from
hidden global RNGs and do not return what they drew, whereas a reproduction must record
every parameter of every pair.

Two options serve StableSR's recipe (its ``basicsr/data/realesrgan_dataset.py`` with the
``degradation`` block of ``configs/stableSRNew/v2-finetune_text_T_512.yaml``, applied in
``ldm/models/diffusion/ddpm.py`` ``LatentDiffusionSRTextWT.get_input``): ``usm_gt`` sharpens
the HR crop with basicsr's ``USMSharp`` before it is degraded *and* keeps the sharpened crop as
the ground truth (:func:`usm_sharpen`), and ``no_degradation_prob`` replaces the degradation of
that share of pairs by a plain bicubic ÷scale (StableSR feeds the ground truth itself as the
upsampled LR there; a stored LR at 1/scale cannot, so this is the nearest offline equivalent).
Both are off unless configured, so existing pair sets are unchanged.

Determinism is the design constraint. A pair's randomness depends only on
``(seed, image id, crop index)`` through :func:`image_seed` (a SHA-256 hash, unlike ``hash()``
stable across processes): all parameters are drawn from a NumPy generator seeded with it, the
per-pixel noise from torch's CPU generator seeded with it (in a forked RNG state, so callers'
RNGs are untouched), and torch runs single-threaded inside the degradation so convolution
numerics cannot depend on the thread count. Hence the same inputs give byte-identical PNGs
whatever the processing order or the number of worker processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import tvt.compat
from tvt.data.manifest import read_manifest, sha256_file, write_manifest

tvt.compat.apply()  # before basicsr imports torchvision

from basicsr.data.degradations import (
    add_gaussian_noise_pt,
    add_poisson_noise_pt,
    bivariate_Gaussian,
    bivariate_generalized_Gaussian,
    bivariate_plateau,
    circular_lowpass_kernel,
)
from basicsr.utils.diffjpeg import DiffJPEG
from basicsr.utils.img_process_util import USMSharp, filter2D

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
INTERPOLATIONS = ("area", "bilinear", "bicubic")
RESIZE_DIRECTIONS = ("up", "down", "keep")
FINAL_ORDERS = ("resize_sinc_then_jpeg", "jpeg_then_resize_sinc")
MIN_KERNEL_SIZE = 7  # Real-ESRGAN draws kernel sizes from the odd numbers 7..kernel_size

PAIR_COLUMNS = (
    "pair_id", "source_id", "split", "kind", "hr_path", "lr_path", "hr_sha256", "lr_sha256",
    "crop_x", "crop_y", "text", "text_px", "lang", "font", "params",
)
_MANIFEST_COLUMNS = ("id", "path", "sha256", "split", "kind")
#: what :func:`synthesize_pairs` writes for the train split (val/test always get full pairs):
#: ``pairs`` HR crops and their LR, ``hr`` the HR crops only (LR and params empty), ``none`` no row.
#: Which one a config needs is decided by :func:`tvt.stages.fixed_train_pairs`.
TRAIN_PAIRS = ("pairs", "hr", "none")
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# ------------------------------------------------------------------------------------------
# Seeds and configuration
# ------------------------------------------------------------------------------------------


def image_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one image, a stable function of the global seed and a string key."""
    digest = hashlib.sha256(f"{int(seed)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _fail(key: str, message: str, value: Any) -> NoReturn:
    raise ValueError(f"degrade.{key}: {message}, got {value!r}")


def _get(cfg: Mapping, key: str, path: str) -> Any:
    if not isinstance(cfg, Mapping) or key not in cfg:
        raise ValueError(f"degrade.{path}: missing config key")
    return cfg[key]


def _check_int(value: Any, key: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(key, f"expected an integer >= {minimum}", value)


def _check_probability(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        _fail(key, "expected a probability in [0, 1]", value)


def _check_weights(value: Any, key: str, length: int) -> None:
    ok = (isinstance(value, (list, tuple)) and len(value) == length
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
          and sum(value) > 0)
    if not ok:
        _fail(key, f"expected {length} non-negative weights with a positive sum", value)


def _check_range(value: Any, key: str, low: float, high: float, contains_one: bool = False) -> None:
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
          and low <= value[0] <= value[1] <= high
          and (not contains_one or value[0] <= 1 <= value[1]))
    if not ok:
        bounds = f"{low} <= low <= high <= {high}" + (" with low <= 1 <= high" if contains_one else "")
        _fail(key, f"expected [low, high] with {bounds}", value)


def _check_stage(stage: Mapping, name: str) -> None:
    def get(key: str) -> Any:
        return _get(stage, key, f"{name}.{key}")

    if name == "second":
        _check_probability(get("blur_prob"), "second.blur_prob")
    for key in ("sinc_prob", "gaussian_noise_prob", "gray_noise_prob"):
        _check_probability(get(key), f"{name}.{key}")
    _check_weights(get("resize_prob"), f"{name}.resize_prob", len(RESIZE_DIRECTIONS))
    _check_range(get("blur_sigma"), f"{name}.blur_sigma", 1e-6, math.inf)
    # Shape parameters are drawn from [low, 1] or [1, high] with equal chance (as basicsr).
    _check_range(get("betag_range"), f"{name}.betag_range", 1e-6, math.inf, contains_one=True)
    _check_range(get("betap_range"), f"{name}.betap_range", 1e-6, math.inf, contains_one=True)
    # Resizing is drawn from [low, 1] (down) or [1, high] (up).
    _check_range(get("resize_range"), f"{name}.resize_range", 1e-6, math.inf, contains_one=True)
    _check_range(get("noise_range"), f"{name}.noise_range", 0.0, math.inf)
    _check_range(get("poisson_scale_range"), f"{name}.poisson_scale_range", 0.0, math.inf)
    _check_range(get("jpeg_range"), f"{name}.jpeg_range", 1, 100)


def validate_config(cfg: Mapping) -> None:
    """Raise ValueError naming the offending key if the ``degrade`` config section is unusable."""
    _check_int(_get(cfg, "scale", "scale"), "scale", 1)
    hr_size = _get(cfg, "hr_size", "hr_size")
    _check_int(hr_size, "hr_size", cfg["scale"])
    if hr_size % cfg["scale"]:
        _fail("hr_size", f"expected a multiple of scale={cfg['scale']}", hr_size)
    _check_int(_get(cfg, "crops_per_image", "crops_per_image"), "crops_per_image", 1)
    _check_int(_get(cfg, "workers", "workers"), "workers", 1)
    kernel_size = _get(cfg, "kernel_size", "kernel_size")
    _check_int(kernel_size, "kernel_size", MIN_KERNEL_SIZE)
    if kernel_size % 2 == 0:
        _fail("kernel_size", "expected an odd size", kernel_size)
    kernel_list = _get(cfg, "kernel_list", "kernel_list")
    if not isinstance(kernel_list, (list, tuple)) or not kernel_list or any(k not in KERNEL_TYPES for k in kernel_list):
        _fail("kernel_list", f"expected a non-empty list of {KERNEL_TYPES}", kernel_list)
    _check_weights(_get(cfg, "kernel_prob", "kernel_prob"), "kernel_prob", len(kernel_list))
    _check_stage(_get(cfg, "first", "first"), "first")
    _check_stage(_get(cfg, "second", "second"), "second")
    _check_probability(_get(cfg, "final_sinc_prob", "final_sinc_prob"), "final_sinc_prob")
    _check_probability(cfg.get("no_degradation_prob", 0.0), "no_degradation_prob")
    if not isinstance(cfg.get("usm_gt", False), bool):
        _fail("usm_gt", "expected true or false", cfg["usm_gt"])


# ------------------------------------------------------------------------------------------
# Parameter sampling (Real-ESRGAN's distributions, recorded explicitly)
# ------------------------------------------------------------------------------------------


def _choose(rng: np.random.Generator, options: tuple | list, weights: list | None = None) -> Any:
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / sum(weights)
    return options[int(rng.choice(len(options), p=p))]


def _kernel_sizes(max_size: int) -> list[int]:
    return list(range(MIN_KERNEL_SIZE, max_size + 1, 2))


def _sample_beta(rng: np.random.Generator, beta_range: list) -> float:
    """Shape parameter: below or above 1 with equal chance, as basicsr's random kernels."""
    if rng.random() < 0.5:
        return rng.uniform(beta_range[0], 1.0)
    return rng.uniform(1.0, beta_range[1])


def _sample_blur(rng: np.random.Generator, cfg: Mapping, stage: Mapping) -> dict:
    size = _choose(rng, _kernel_sizes(cfg["kernel_size"]))
    if rng.random() < stage["sinc_prob"]:
        # Real-ESRGAN: small sinc kernels cannot represent very low cut-offs.
        low_cutoff = math.pi / 3 if size < 13 else math.pi / 5
        return {"type": "sinc", "size": size, "omega_c": rng.uniform(low_cutoff, math.pi)}
    kind = _choose(rng, cfg["kernel_list"], cfg["kernel_prob"])
    sigma_x = rng.uniform(*stage["blur_sigma"])
    if "aniso" in kind:
        sigma_y, theta = rng.uniform(*stage["blur_sigma"]), rng.uniform(-math.pi, math.pi)
    else:
        sigma_y, theta = sigma_x, 0.0
    blur = {"type": kind, "size": size, "sigma_x": sigma_x, "sigma_y": sigma_y, "theta": theta}
    if kind.startswith("generalized"):
        blur["beta"] = _sample_beta(rng, stage["betag_range"])
    elif kind.startswith("plateau"):
        blur["beta"] = _sample_beta(rng, stage["betap_range"])
    return blur


def _sample_resize(rng: np.random.Generator, stage: Mapping) -> dict:
    direction = _choose(rng, RESIZE_DIRECTIONS, stage["resize_prob"])
    low, high = stage["resize_range"]
    if direction == "up":
        scale = rng.uniform(1.0, high)
    elif direction == "down":
        scale = rng.uniform(low, 1.0)
    else:
        scale = 1.0
    return {"direction": direction, "scale": scale, "interpolation": _choose(rng, INTERPOLATIONS)}


def _sample_noise(rng: np.random.Generator, stage: Mapping) -> dict:
    if rng.random() < stage["gaussian_noise_prob"]:
        noise = {"type": "gaussian", "sigma": rng.uniform(*stage["noise_range"])}
    else:
        noise = {"type": "poisson", "scale": rng.uniform(*stage["poisson_scale_range"])}
    noise["gray"] = bool(rng.random() < stage["gray_noise_prob"])
    return noise


def _sample_final(rng: np.random.Generator, cfg: Mapping) -> dict:
    """[resize to LR size + sinc] and JPEG, in random order; the sinc filter is optional."""
    order = _choose(rng, FINAL_ORDERS)
    interpolation = _choose(rng, INTERPOLATIONS)
    sinc = None
    if rng.random() < cfg["final_sinc_prob"]:
        sinc = {"type": "sinc", "size": _choose(rng, _kernel_sizes(cfg["kernel_size"])),
                "omega_c": rng.uniform(math.pi / 3, math.pi)}
    quality = rng.uniform(*cfg["second"]["jpeg_range"])
    return {"order": order, "interpolation": interpolation, "sinc": sinc, "jpeg_quality": quality}


def sample_params(cfg: Mapping, seed: int) -> dict:
    """Draw every random choice of one degradation; the result is a JSON-serialisable recipe.

    Each stage draws from its own child stream, so changing e.g. ``final_sinc_prob`` leaves
    the first and second stages of every pair unchanged.
    """
    validate_config(cfg)
    # SeedSequence children depend on their index only: a fourth stream leaves the others as they were
    first_rng, second_rng, final_rng, skip_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(4))
    skip = cfg.get("no_degradation_prob", 0.0)
    if skip > 0 and skip_rng.random() < skip:
        return {"scale": cfg["scale"], "none": True}
    first, second = cfg["first"], cfg["second"]
    return {
        "scale": cfg["scale"],
        "first": {
            "blur": _sample_blur(first_rng, cfg, first),
            "resize": _sample_resize(first_rng, first),
            "noise": _sample_noise(first_rng, first),
            "jpeg_quality": first_rng.uniform(*first["jpeg_range"]),
        },
        "second": {
            "blur": (_sample_blur(second_rng, cfg, second)
                     if second_rng.random() < second["blur_prob"] else None),
            "resize": _sample_resize(second_rng, second),
            "noise": _sample_noise(second_rng, second),
        },
        "final": _sample_final(final_rng, cfg),
    }


# ------------------------------------------------------------------------------------------
# Applying a recipe (basicsr building blocks)
# ------------------------------------------------------------------------------------------


def _kernel(blur: Mapping) -> np.ndarray:
    """The blur kernel at its own size (Real-ESRGAN zero-pads to 21 px: same result)."""
    if blur["type"] == "sinc":
        return circular_lowpass_kernel(blur["omega_c"], blur["size"])
    args = (blur["size"], blur["sigma_x"], blur["sigma_y"], blur["theta"])
    isotropic = "aniso" not in blur["type"]
    if blur["type"].startswith("generalized"):
        return bivariate_generalized_Gaussian(*args, blur["beta"], isotropic=isotropic)
    if blur["type"].startswith("plateau"):
        return bivariate_plateau(*args, blur["beta"], isotropic=isotropic)
    return bivariate_Gaussian(*args, isotropic=isotropic)


def _blur(x: torch.Tensor, blur: Mapping) -> torch.Tensor:
    """filter2D with its reflect padding. An image smaller than the kernel (a short text line
    after the coarsest first-order resize) gets the kernel's centre, renormalised."""
    kernel = _kernel(blur)
    fits = min(x.shape[-2:]) - 1  # reflect padding must be smaller than the image
    if kernel.shape[0] // 2 > fits:
        centre = kernel.shape[0] // 2
        kernel = kernel[centre - fits:centre + fits + 1, centre - fits:centre + fits + 1]
        kernel = kernel / kernel.sum()
    return filter2D(x, torch.from_numpy(kernel).float()[None].to(x.device))


def _add_noise(x: torch.Tensor, noise: Mapping) -> torch.Tensor:
    gray = float(noise["gray"])
    if noise["type"] == "gaussian":
        return add_gaussian_noise_pt(x, sigma=noise["sigma"], gray_noise=gray, clip=True, rounds=False)
    return add_poisson_noise_pt(x, scale=noise["scale"], gray_noise=gray, clip=True, rounds=False)


@lru_cache(maxsize=4)
def _jpeger(device: str) -> DiffJPEG:
    return DiffJPEG(differentiable=False).to(device)


def _jpeg(x: torch.Tensor, quality: float) -> torch.Tensor:
    return _jpeger(str(x.device))(x.clamp(0, 1), quality=quality)


@contextmanager
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_hr(hr: np.ndarray, scale: int) -> None:
    if not isinstance(hr, np.ndarray) or hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[2] != 3:
        got = getattr(hr, "dtype", type(hr).__name__), getattr(hr, "shape", None)
        raise ValueError(f"hr: expected a uint8 RGB array of shape (H, W, 3), got {got}")
    if hr.shape[0] % scale or hr.shape[1] % scale:
        raise ValueError(f"hr: height and width must be multiples of scale={scale}, got {hr.shape[:2]}")


@lru_cache(maxsize=4)
def _usm(device: str) -> USMSharp:
    # basicsr's defaults, as StableSR and Real-ESRGAN: radius 50, weight 0.5, threshold 10
    return USMSharp().to(device)


def sharpen_tensor(x: torch.Tensor) -> torch.Tensor:
    """basicsr ``USMSharp`` of a (N, 3, H, W) image in [0, 1] on its own device, rounded to 8 bits. Its
    101² filter costs seconds per 512² crop on one CPU core, milliseconds on a GPU (where StableSR runs it)."""
    with torch.inference_mode():
        return quantize(_usm(str(x.device))(x))


def usm_sharpen(hr: np.ndarray) -> np.ndarray:
    """Unsharp-masked uint8 RGB image (basicsr ``USMSharp``): StableSR's ``use_usm`` ground truth."""
    _check_hr(hr, 1)
    with _single_thread():
        return _to_uint8(sharpen_tensor(_to_unit(hr)))


def _to_unit(hr: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(hr, dtype=torch.float32, device=device).permute(2, 0, 1)[None] / 255.0


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255.0).round()[0].permute(1, 2, 0).to(torch.uint8).cpu().numpy()


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Pixel noise from ``seed`` on ``device`` in a forked RNG state (callers' RNGs untouched), single-threaded
    on CPU so that convolution numerics cannot depend on the thread count."""
    cuda = [device] if device.type == "cuda" else []
    threads = _single_thread() if device.type == "cpu" else contextlib.nullcontext()
    with threads, torch.random.fork_rng(devices=cuda), torch.inference_mode():
        torch.manual_seed(seed)
        yield


def degrade_tensor(x: torch.Tensor, params: Mapping, seed: int) -> torch.Tensor:
    """Apply a recipe to a (1, 3, H, W) image in [0, 1] on its own device; the LR is returned *unrounded*.

    Blur, noise and JPEG run wherever ``x`` lives: on a GPU as Real-ESRGAN's
    ``RealESRGANModel.feed_data`` does, on the CPU as the TVT/OSEDiff datasets do
    (``RealESRGAN_degradation(device='cpu')``). The same recipe gives the same LR to float
    rounding on either; on one device it is bit-reproducible.
    """
    scale = params["scale"]
    lr_h, lr_w = x.shape[-2] // scale, x.shape[-1] // scale
    with _seeded(seed, x.device):
        if params.get("none"):  # the no-degradation draw: bicubic ÷scale only
            return F.interpolate(x, size=(lr_h, lr_w), mode="bicubic", antialias=True)
        first, second, final = params["first"], params["second"], params["final"]

        def resize_sinc(x: torch.Tensor) -> torch.Tensor:
            x = F.interpolate(x, size=(lr_h, lr_w), mode=final["interpolation"])
            return x if final["sinc"] is None else _blur(x, final["sinc"])

        # First order: blur -> resize -> noise -> JPEG.
        x = _blur(x, first["blur"])
        x = F.interpolate(x, scale_factor=first["resize"]["scale"], mode=first["resize"]["interpolation"])
        x = _jpeg(_add_noise(x, first["noise"]), first["jpeg_quality"])
        # Second order: (blur) -> resize relative to the final LR size -> noise.
        if second["blur"] is not None:
            x = _blur(x, second["blur"])
        s = second["resize"]["scale"]
        size = (max(1, int(lr_h * s)), max(1, int(lr_w * s)))
        x = _add_noise(F.interpolate(x, size=size, mode=second["resize"]["interpolation"]), second["noise"])
        # Final: [resize to LR size + sinc] and JPEG in random order (other orders give
        # twisted lines, Real-ESRGAN §3.2).
        if final["order"] == "resize_sinc_then_jpeg":
            return _jpeg(resize_sinc(x), final["jpeg_quality"])
        return resize_sinc(_jpeg(x, final["jpeg_quality"]))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to 8 bits and clamp, in [0, 1]: what every official pipeline does to its LR."""
    return torch.clamp((x * 255.0).round(), 0, 255) / 255.0


def resize_back(lr: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """The unrounded LR brought back to the HR size and rounded to 8 bits: Real-ESRGAN's ``resize_bak``
    (TVT ``TVT/datasets/realesrgan.py`` and OSEDiff ``dataloaders/realesrgan.py``,
    ``RealESRGAN_degradation.degrade_process``), whose result is what the official training feeds the model."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"resize_back: interpolation {interpolation!r} is not one of {INTERPOLATIONS}")
    with torch.inference_mode():
        return quantize(F.interpolate(lr, size=size, mode=interpolation))


def apply_params(hr: np.ndarray, params: Mapping, seed: int) -> np.ndarray:
    """Degrade ``hr`` with a recipe from :func:`sample_params`; ``seed`` drives the pixel noise."""
    _check_hr(hr, params["scale"])
    return _to_uint8(degrade_tensor(_to_unit(hr), params, seed))


def degrade(hr: np.ndarray, cfg: Mapping, seed: int) -> tuple[np.ndarray, dict]:
    """Real-ESRGAN second-order degradation of one uint8 RGB image.

    Returns the uint8 LR image (H/scale x W/scale x 3) and the JSON-serialisable recipe;
    ``apply_params(hr, recipe, seed)`` reproduces the LR exactly. With ``usm_gt`` the caller
    passes the sharpened HR (:func:`usm_sharpen`), which is also its ground truth.
    """
    params = sample_params(cfg, seed)
    return apply_params(hr, params, seed), params


# ------------------------------------------------------------------------------------------
# Pair synthesis from a data manifest
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SourceJob:
    """Everything a worker needs to turn one manifest row into its pairs (picklable)."""

    row: dict
    root: Path
    out_dir: Path
    cfg: dict
    seed: int
    degrade: bool = True  # False: write the HR crops only (a train split nobody reads as LR)


def _read_sources(manifest: Path) -> list[dict]:
    if not manifest.is_file():
        raise ValueError(f"manifest not found: {manifest}")
    rows = read_manifest(manifest)  # checks split and kind
    missing = [c for c in _MANIFEST_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"manifest {manifest}: missing column(s) {missing}")
    seen: set[str] = set()
    for row in rows:
        if not _SAFE_ID.fullmatch(row["id"]):
            raise ValueError(f"manifest {manifest}: id {row['id']!r} is not usable as a file name")
        if row["id"] in seen:
            raise ValueError(f"manifest {manifest}: duplicate id {row['id']!r}")
        seen.add(row["id"])
    return rows


def _load_rgb(row: dict, root: Path) -> Image.Image:
    """The source image of a manifest row, after checking that it is the one listed."""
    path = root / row["path"]
    if not path.is_file():
        raise ValueError(f"manifest row {row['id']!r}: source image not found: {path}")
    if sha256_file(path) != row["sha256"]:
        raise ValueError(f"manifest row {row['id']!r}: {path} does not match its sha256 in the manifest")
    with Image.open(path) as image:
        return image.convert("RGB")


def _write_atomic(path: Path, data: bytes) -> str:
    """Write ``data`` under a temporary name and rename it, so no reader sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _crops(job: _SourceJob) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Yield (crop index, x, y, HR array) for one manifest row."""
    row, cfg = job.row, job.cfg
    scale, hr_size = cfg["scale"], cfg["hr_size"]
    image = _load_rgb(row, job.root)
    if row["kind"] == "text":
        # Whole image: OCR needs intact text lines.
        width, height = image.width // scale * scale, image.height // scale * scale
        if not width or not height:
            raise ValueError(f"manifest row {row['id']!r}: image {image.size} smaller than scale={scale}")
        yield 0, 0, 0, np.asarray(image)[:height, :width]
        return
    short = min(image.size)
    if short < hr_size:
        image = image.resize((max(hr_size, round(image.width * hr_size / short)),
                              max(hr_size, round(image.height * hr_size / short))),
                             Image.Resampling.BICUBIC)
    pixels = np.asarray(image)
    for k in range(cfg["crops_per_image"]):
        rng = np.random.default_rng(image_seed(job.seed, f"{row['id']}/crop{k}"))
        y = int(rng.integers(0, image.height - hr_size + 1))
        x = int(rng.integers(0, image.width - hr_size + 1))
        yield k, x, y, pixels[y:y + hr_size, x:x + hr_size]


def _synthesize_source(job: _SourceJob) -> list[dict]:
    """Degrade and write every pair of one manifest row; return their pairs.csv rows."""
    row = job.row
    pairs = []
    for k, x, y, hr in _crops(job):
        pair_id = f"{row['id']}_{k}"
        seed = image_seed(job.seed, f"{row['id']}/crop{k}/degradation")
        usm = job.cfg.get("usm_gt", False)
        if usm:  # StableSR: the sharpened crop is degraded and is the ground truth
            hr = usm_sharpen(hr)
        hr_path = Path(row["split"], "hr", f"{pair_id}.png")
        pair = {
            "pair_id": pair_id, "source_id": row["id"], "split": row["split"], "kind": row["kind"],
            "hr_path": hr_path.as_posix(), "hr_sha256": _write_atomic(job.out_dir / hr_path, _png_bytes(hr)),
            "lr_path": None, "lr_sha256": None, "params": None, "crop_x": x, "crop_y": y,
            **{key: row.get(key) for key in ("text", "text_px", "lang", "font")},
        }
        if job.degrade:
            lr, params = degrade(hr, job.cfg, seed)
            if usm:  # recorded only when on, so the pairs.csv of existing configurations stays byte-identical
                params["usm_gt"] = True
            lr_path = Path(row["split"], "lr", f"{pair_id}.png")
            pair.update(lr_path=lr_path.as_posix(), lr_sha256=_write_atomic(job.out_dir / lr_path, _png_bytes(lr)),
                        params=json.dumps(params, sort_keys=True))
        pairs.append(pair)
    return pairs


def _worker_context() -> multiprocessing.context.BaseContext:
    """A fork server that has imported this module: workers start fast and, unlike plain
    fork, never inherit a parent's OpenMP thread pool (not fork-safe)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _run(jobs: list[_SourceJob], workers: int) -> Iterator[list[dict]]:
    if workers == 1 or len(jobs) <= 1:
        yield from map(_synthesize_source, jobs)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=_worker_context()) as pool:
        yield from pool.map(_synthesize_source, jobs)


def synthesize_pairs(manifest: Path, out_dir: Path, cfg: dict, seed: int,
                     workers: int | None = None, *, train: str = "pairs") -> Path:
    """Synthesise LR/HR pairs for every manifest row; return the path of ``pairs.csv``.

    Photos give ``crops_per_image`` random ``hr_size`` crops, text images one whole-image
    pair. Writes ``{split}/hr|lr/{pair_id}.png`` under ``out_dir`` and ``pairs.csv`` (rows
    sorted by pair_id); the output does not depend on ``workers`` or on the manifest's order.

    ``train`` (:data:`TRAIN_PAIRS`) limits the train split to what some stage reads: a trainer
    that degrades online never opens a fixed train LR, and at paper scale (LSDIR's 17 shards)
    degrading them costs days of CPU. Every row keeps its seed, so a crop or pair is the same
    bytes whichever ``train`` wrote it.
    """
    validate_config(cfg)
    if train not in TRAIN_PAIRS:
        raise ValueError(f"train must be one of {TRAIN_PAIRS}, got {train!r}")
    workers = cfg["workers"] if workers is None else workers
    _check_int(workers, "workers", 1)
    manifest, out_dir = Path(manifest), Path(out_dir)
    jobs = [_SourceJob(row, manifest.parent, out_dir, dict(cfg), int(seed), degrade=row["split"] != "train"
                       or train == "pairs")
            for row in _read_sources(manifest) if row["split"] != "train" or train != "none"]
    pairs = []
    for rows in tqdm(_run(jobs, workers), total=len(jobs), desc="degrade", unit="image"):
        pairs.extend(rows)
    pairs_csv = out_dir / "pairs.csv"
    tmp = write_manifest(pairs, pairs_csv.with_name(f".pairs.csv.{os.getpid()}.tmp"), PAIR_COLUMNS)
    os.replace(tmp, pairs_csv)
    return pairs_csv


# ------------------------------------------------------------------------------------------
# Online degradation: a fresh crop, flip and degradation each time a training image is drawn
# ------------------------------------------------------------------------------------------


def online_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of draw ``index`` of ``epoch``: a pure function, no RNG state to checkpoint or replay."""
    return image_seed(seed, f"online/epoch{int(epoch)}/sample{int(index)}")


def sample_online(cfg: Mapping, seed: int, *, crop_range: tuple[int, int]) -> dict:
    """One training draw, as a JSON-serialisable recipe.

    What the official datasets draw for every item (TVT ``TVT/my_utils/training_utils_realsr.py``
    ``PairedSROnlineDataset.__getitem__`` with ``RealESRGAN_degradation.degrade_process(...,
    resize_bak=True)``; OSEDiff ``dataloaders/realsr_dataset.py`` the same): a random crop
    (``crop``: top-left offset, drawn in ``[0, crop_range)`` per axis), a horizontal flip, the
    Real-ESRGAN degradation (``degradation``, :func:`sample_params`), the interpolation that
    brings the LR back to the HR size (``resize_back``) and the seed of the pixel noise (``seed``).
    Each part draws from its own stream, so e.g. a new ``final_sinc_prob`` keeps every crop.
    """
    crop_rng, flip_rng, back_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(3))
    noise_seed = image_seed(seed, "degradation")
    return {
        "crop": [int(crop_rng.integers(0, crop_range[0])), int(crop_rng.integers(0, crop_range[1]))],
        "flip": bool(flip_rng.random() < 0.5),
        "usm_gt": bool(cfg.get("usm_gt", False)),
        "degradation": sample_params(cfg, noise_seed),
        "resize_back": _choose(back_rng, INTERPOLATIONS),
        "seed": noise_seed,
    }


def crop_flip(image: np.ndarray, recipe: Mapping, size: int) -> np.ndarray:
    """The recipe's ``size``² HR crop of a uint8 (H, W, 3) image, flipped if drawn so."""
    y, x = recipe["crop"]
    if y + size > image.shape[0] or x + size > image.shape[1]:
        raise ValueError(f"recipe crop {size}² at (y={y}, x={x}) exceeds the image {image.shape[:2]}")
    hr = image[y:y + size, x:x + size]
    return np.ascontiguousarray(hr[:, ::-1] if recipe["flip"] else hr)


def degrade_online(hr: torch.Tensor, recipe: Mapping) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ground truth, LR at 1/scale, LR brought back to the HR size), all 8-bit, for a (1, 3, H, W) HR
    crop in [0, 1] on any device: the ``apply`` side of :func:`sample_online` (replays a recipe exactly).
    With ``usm_gt`` (StableSR) the ground truth is the sharpened crop, which is also what is degraded."""
    with _single_thread() if hr.device.type == "cpu" else contextlib.nullcontext():
        if recipe.get("usm_gt"):
            hr = sharpen_tensor(hr)
        lr = degrade_tensor(hr, recipe["degradation"], recipe["seed"])
        return hr, quantize(lr), resize_back(lr, tuple(hr.shape[-2:]), recipe["resize_back"])
