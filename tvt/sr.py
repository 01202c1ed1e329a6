"""``tvt sr``: super-resolve a batch of images with a trained one-step restorer (TVT, OSEDiff...).

    tvt sr photos/ scan.png 'shots/*.jpg' -o out/ --weights resources/models/tvt
    tvt sr photos/ -o out/ --weights owner/name     # a restorer on the Hugging Face Hub (`tvt push`)

**Inputs** are files, folders (their image files; ``--recursive`` descends, hidden names are
ignored) and glob patterns. Each output keeps its input's name under OUTDIR — for folders
and globs, its path relative to the folder (or to the pattern's fixed prefix). Formats that
cannot hold a restored photograph (GIF's 256 colours, anything not PNG/JPEG/TIFF/WebP/BMP)
are written as PNG with ``.png`` appended. Existing outputs are skipped unless
``--overwrite``, so rerunning an interrupted batch resumes it; every output is written under
a hidden temporary name and renamed into place, so a crash never leaves a partial file under
an output's name. JPEG and WebP are written at ``--quality``, JPEG without chroma subsampling.

**What happens to each kind of image**

* RGB is restored as is; CMYK (JPEG) is converted to RGB, through its ICC profile when it has
  one, and written as RGB.
* Grayscale (L, 1-bit, 16-bit) is fed to the network as RGB, and the result is converted
  back to grayscale (Rec. 601 luma, Pillow's): grayscale in, grayscale out.
* Alpha (LA, RGBA, palette with transparency) never enters the network, which was trained
  on opaque photographs: it is upscaled on its own, bicubically, like the LR in the restorer.
* Palette images are restored and written in RGB(A): a palette cannot hold the new colours.
* 16-bit PNGs (grayscale through Pillow, colour through OpenCV, since Pillow reads those as
  8 bit) reach the network as floats with all 16 bits and are written with 16 bits.
* EXIF orientation is applied first (the output is upright and has no orientation tag); the
  ICC profile is copied into outputs whose format Pillow can embed it in (PNG, JPEG, TIFF,
  WebP; not BMP, not 16-bit colour).

**Rejected**, with one line on stderr each and counted as failed, while the batch goes on:
empty files, files that are not images, truncated or corrupt images, images whose shorter
side is below ``--min-side`` and images with more than ``--max-input-pixels`` pixels (checked
from the header, before decoding; Pillow's decompression-bomb guard is set to the same limit).

**Tiling** (memory): untiled, an image's activation memory grows with its output area (the
decoder's full-resolution feature maps; the UNet's self-attention grows with its square in
time, not in memory, with PyTorch's fused attention). An image whose output has more than ``--max-pixels-untiled`` pixels therefore
runs through the restorer's tiled path (tiles of ``--tile`` output pixels, Gaussian-blended),
whose activation memory is fixed by the tile; only image-sized buffers (input, bicubic
upsample, output) still grow with the image, and ``--max-input-pixels`` bounds those. An
explicit ``--tile`` tiles every image larger than one tile. The VAE's tiles pool their GroupNorm
statistics (exact tiling), so their states wait between GroupNorms: in RAM up to ``--tile-memory``
MiB, on disk beyond.

**Prompts** (``--tagger``): by default the restorer conditions on the prompt stored with it: the
null prompt, or, for a restorer trained on tags (``restorer.json``'s ``prompt``), tags of the same
tagger with its positive prompt (one line on stderr says so; ``--tagger none`` forces the null
prompt). ``--tagger ram`` / ``dape`` (RAM, or RAM + OSEDiff's DAPE LoRA, as the official test
scripts) or ``colour`` (weight-free colour terms) tags each bicubic-upsampled LR; the prompt
``"<tags>, <--prompt>,"`` (default: the restorer's recipe, else its method's official positive
prompt: TVT's, none for OSEDiff) is encoded by SD's CLIP text encoder (``--text-encoder``, default the
weights folder when it holds ``tokenizer/`` and ``text_encoder/``), and ``<output name>.tags.json``
(``{"tagger", "tags", "prompt"}``) is written beside each output. A tagger whose package or
weights are missing is a usage error that says what to install.

**Speed** (``--dtype``, ``--channels-last``): by default the fastest options that stay exact
(:func:`tvt.inference.fastest_exact_options`; one line on stdout names them): channels-last, and a
reduced-precision denoiser where measured within 0.1 dB of fp32 against ground truth and ≥ 40 dB
from its output (fp16 on CUDA, bf16 for TVT on CPUs with bf16 units); the VAE stays fp32.
``--dtype fp32 --no-channels-last`` is the plain fp32 path.

**Exit status**: 0 every image restored or skipped, 1 some image failed, 2 usage error (bad
arguments, no inputs, missing or incomplete weights). The same input gives the same bytes.

This module is imported when the CLI starts: torch, numpy and the models load on first use.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from tvt.stages import method_model_dir

if TYPE_CHECKING:
    import numpy as np

    from tvt.models.restorer import OneStepRestorer

HELP = "super-resolve images with a trained restorer (TVT, OSEDiff, StableSR...)"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: what a folder or a glob contributes (compared case-insensitively)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif")
#: output formats, by suffix; other inputs are written as PNG with ".png" appended
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF",
                  ".webp": "WEBP", ".bmp": "BMP"}
SIXTEEN_BIT_FORMATS = ("PNG", "TIFF")

DEFAULT_METHOD = "tvt"
DEFAULT_MIN_SIDE = 8  # below this there is nothing to restore: an icon, a thumbnail, a mistake
DEFAULT_MAX_INPUT_PIXELS = 2048 * 2048  # a 4x output of 67 MP: image buffers of a few GB
DEFAULT_MAX_PIXELS_UNTILED = 1024 * 1024  # output pixels: 4x the 512² training crops
DEFAULT_TILE = 512  # output pixels: the training crop, so every tile looks like training data
DEFAULT_QUALITY = 95  # JPEG and WebP
DTYPES = ("auto", "fp32", "bf16", "fp16")  # of the denoiser; the VAE stays fp32 (tvt/inference.py)
#: ``--tagger``: none + tvt.models.prompts.TAGGERS (not imported here: the CLI starts without torch)
TAGGER_CHOICES = ("none", "colour", "ram", "dape")

#: the layout :meth:`OneStepRestorer.save_pretrained_dir` writes (tests keep the two in step);
#: the prompt embedding, when restorer.json names one, is checked too
RESTORER_CONFIG = "restorer.json"
REQUIRED_WEIGHT_FILES = (
    RESTORER_CONFIG,
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
)

_LUMA = (0.299, 0.587, 0.114)  # Rec. 601, as Pillow's convert("L")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_16BIT_MULTICHANNEL = (2, 4, 6)  # IHDR colour types RGB, gray+alpha, RGBA: 8-bit in Pillow
_EXIF_ORIENTATION_TAG = 0x0112


class UsageError(Exception):
    """Bad arguments, no inputs or unusable weights: nothing is restored (exit 2)."""


class ImageError(Exception):
    """This image cannot be restored; the batch goes on (exit 1 at the end)."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---- inputs ----


@dataclass(frozen=True)
class BatchItem:
    source: Path
    output: Path


def discover_inputs(inputs: Sequence[str], outdir: Path, *, recursive: bool = False) -> list[BatchItem]:
    """One item per image file named by ``inputs`` (files, folders, glob patterns), in order.

    A file given twice is restored once; files inside ``outdir`` are never inputs (so a rerun
    with OUTDIR inside an input folder does not restore its own outputs). Raises
    :class:`UsageError` for an input that yields no file and for two inputs that would write
    the same output.
    """
    outdir_resolved = outdir.resolve()
    items: dict[Path, BatchItem] = {}
    for spec in inputs:
        found = _expand(spec, recursive)
        if not found:
            raise UsageError(f"{spec}: no image files (looked for {' '.join(IMAGE_SUFFIXES)}"
                             f"{'' if recursive else '; --recursive descends into subfolders'})")
        for source, relative in found:
            key = source.resolve()
            if not key.is_relative_to(outdir_resolved):
                items.setdefault(key, BatchItem(source, outdir / output_name(relative)))
    by_output: dict[Path, BatchItem] = {}
    for item in items.values():
        if (other := by_output.setdefault(item.output, item)) is not item:
            raise UsageError(f"{other.source} and {item.source} would both be written to {item.output}; "
                             "restore them into separate OUTDIRs")
    return list(items.values())


def _expand(spec: str, recursive: bool) -> list[tuple[Path, Path]]:
    """(file, its output path relative to OUTDIR) for one INPUT argument."""
    path = Path(spec)
    if path.is_file():
        return [(path, Path(path.name))]
    if path.is_dir():
        candidates = path.rglob("*") if recursive else path.iterdir()
        return [(f, f.relative_to(path)) for f in sorted(candidates)
                if _is_image_name(f.relative_to(path)) and f.is_file()]
    if any(char in spec for char in "*?["):
        fixed = []  # the pattern's folder prefix without wildcards: outputs are relative to it
        for part in path.parts:
            if any(char in part for char in "*?["):
                break
            fixed.append(part)
        root = Path(*fixed) if fixed else Path(".")
        matches = sorted(Path(m) for m in glob.glob(spec, recursive=recursive))
        return [(m, m.relative_to(root)) for m in matches if _is_image_name(m.relative_to(root)) and m.is_file()]
    raise UsageError(f"{spec}: no such file, folder or glob match")


def _is_image_name(relative: Path) -> bool:
    return relative.suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") for p in relative.parts)


def output_name(relative: Path) -> Path:
    """The input's relative path, with ``.png`` appended when its format is not an output format."""
    return relative if relative.suffix.lower() in OUTPUT_FORMATS else relative.with_name(relative.name + ".png")


# ---- reading ----


@dataclass
class Picture:
    """An image as the restorer sees it, plus what it must not touch."""

    rgb: np.ndarray  # (H, W, 3) float32 in [0, 1]; grayscale images have three equal channels
    alpha: np.ndarray | None  # (H, W) float32 in [0, 1]
    grayscale: bool  # written back as grayscale
    bit_depth: int  # 8 or 16: what the output is written with
    icc_profile: bytes | None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as Pillow says it."""
        return self.rgb.shape[1], self.rgb.shape[0]


@contextlib.contextmanager
def _strict_pillow(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb guard at ``max_pixels``, truncated files as errors, no warnings."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd metadata, bomb warnings: the checks below decide
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def read_image(path: Path, *, min_side: int = DEFAULT_MIN_SIDE,
               max_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> Picture:
    """Decode ``path`` upright into a :class:`Picture`; :class:`ImageError` says why not."""
    try:
        data = path.read_bytes()
    except OSError as exc:  # vanished since discovery, unreadable, a folder
        raise ImageError(f"cannot read ({_one_line(exc)})") from exc
    if not data:
        raise ImageError("empty file")
    with _strict_pillow(max_pixels):
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size  # from the header: nothing decoded yet
                if width * height > max_pixels:
                    raise ImageError(f"{width}x{height} has more than --max-input-pixels {max_pixels} pixels")
                if min(width, height) < min_side:
                    raise ImageError(f"{width}x{height} is smaller than --min-side {min_side}")
                image.load()
                if _is_16bit_multichannel_png(data):
                    return _read_16bit_png(data, image)
                return _picture_from_pillow(image)
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageError(f"more than --max-input-pixels {max_pixels} pixels ({_one_line(exc)})") from exc
        except UnidentifiedImageError as exc:
            raise ImageError("not an image (Pillow cannot identify its format)") from exc
        except Exception as exc:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError,
            # struct.error, zlib.error... on damaged data: each of them means a damaged file
            raise ImageError(f"corrupt or truncated image ({_one_line(exc)})") from exc


def _picture_from_pillow(image: Image.Image) -> Picture:
    import numpy as np

    icc_profile = image.info.get("icc_profile") or None
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "F":
        raise ImageError("floating-point images are not supported")
    if mode == "CMYK":
        image, icc_profile = _cmyk_to_rgb(image, icc_profile), None
    elif mode in ("P", "PA"):
        image = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
    elif mode == "1":
        image = image.convert("L")
    elif mode not in ("L", "LA", "RGB", "RGBA") and not mode.startswith("I"):
        try:  # YCbCr, RGBX, premultiplied RGBa/La...
            image = image.convert("RGBA" if "A" in mode or "a" in mode else "RGB")
        except ValueError as exc:
            raise ImageError(f"unsupported image mode {mode}") from exc

    if image.mode.startswith("I"):  # I;16 (16-bit grayscale PNG/TIFF), I;16B, or I (32-bit integers)
        values = np.asarray(image).astype(np.float32)
        if values.min() < 0 or values.max() > 65535:
            raise ImageError(f"mode {image.mode} with values outside 0..65535 is not supported")
        pixels, bit_depth = values[..., None] / 65535, 16
    else:
        pixels, bit_depth = np.asarray(image, dtype=np.float32) / 255, 8
        if pixels.ndim == 2:
            pixels = pixels[..., None]
    channels = pixels.shape[-1]  # 1 L, 2 LA, 3 RGB, 4 RGBA
    alpha = pixels[..., -1] if channels in (2, 4) else None
    if channels <= 2:
        return Picture(np.repeat(pixels[..., :1], 3, axis=-1), alpha, True, bit_depth, icc_profile)
    return Picture(np.ascontiguousarray(pixels[..., :3]), alpha, False, bit_depth, icc_profile)


def _cmyk_to_rgb(image: Image.Image, icc_profile: bytes | None) -> Image.Image:
    """Through the image's own CMYK profile to sRGB when it has a usable one, else Pillow's formula."""
    if icc_profile:
        try:
            return ImageCms.profileToProfile(image, io.BytesIO(icc_profile), ImageCms.createProfile("sRGB"),
                                             outputMode="RGB")
        except ImageCms.PyCMSError:
            pass
    return image.convert("RGB")


def _is_16bit_multichannel_png(data: bytes) -> bool:
    """Whether the IHDR says 16-bit RGB, RGBA or gray+alpha (which Pillow decodes to 8 bit)."""
    return len(data) > 25 and data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and data[24] == 16 \
        and data[25] in _PNG_16BIT_MULTICHANNEL


def _read_16bit_png(data: bytes, image: Image.Image) -> Picture:
    """16-bit colour PNG through OpenCV; orientation and ICC profile from Pillow's reading."""
    import cv2
    import numpy as np

    array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype != np.uint16 or array.ndim != 3:
        raise ImageError("corrupt 16-bit PNG (OpenCV cannot decode it)")
    array = apply_exif_orientation(array, image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    pixels = array.astype(np.float32) / 65535
    rgb = np.ascontiguousarray(pixels[..., 2::-1])  # OpenCV's BGR(A)
    alpha = pixels[..., 3] if pixels.shape[-1] == 4 else None
    grayscale = image.mode.startswith("L")  # colour type 4: gray+alpha
    return Picture(rgb, alpha, grayscale, 16, image.info.get("icc_profile") or None)


def apply_exif_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Make an (H, W, ...) array upright as :func:`PIL.ImageOps.exif_transpose` does."""
    flips = {  # EXIF orientation -> the inverse of how the camera stored the picture
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: a[::-1].swapaxes(0, 1),  # 90° clockwise
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: a[:, ::-1].swapaxes(0, 1),  # 90° counter-clockwise
    }
    return flips[orientation](array) if orientation in flips else array


# ---- restoring ----


@dataclass(frozen=True)
class TilingPolicy:
    """When an image runs through the restorer's tiled path (see the module docstring)."""

    max_pixels_untiled: int = DEFAULT_MAX_PIXELS_UNTILED
    tile: int = DEFAULT_TILE
    overlap: int | None = None  # None: the restorer's default, a quarter tile
    always: bool = False  # an explicit --tile: tile whatever is larger than one tile
    memory: int | None = None  # exact tiling's RAM budget for tile states, bytes (None: the device's default)

    def tile_for(self, out_width: int, out_height: int) -> int | None:
        """The tile side for an output of this size, None for one untiled pass."""
        if self.always or out_width * out_height > self.max_pixels_untiled:
            return self.tile
        return None


def upscale(restorer: OneStepRestorer, picture: Picture, tile: int | None, overlap: int | None = None,
            tile_memory: int | None = None) -> Picture:
    """The restorer's output for ``picture`` (alpha upscaled bicubically beside it); ``tile_memory``:
    the RAM budget (bytes) of exact tiling's tile states, None for the device's default."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    parameter = next(restorer.parameters())
    restorer.tile = tile
    restorer.tile_overlap = overlap if overlap is not None else (tile or 0) // 4
    restorer.tile_memory = tile_memory
    lr = torch.from_numpy(picture.rgb).permute(2, 0, 1)[None].to(parameter.device, restorer.vae.dtype)
    try:
        with torch.inference_mode():
            sr = restorer(lr)[0].float().permute(1, 2, 0).cpu().numpy()
    except RuntimeError as exc:  # out of memory, an op missing for this device or dtype
        hint = "; lower --max-pixels-untiled or --tile" if isinstance(exc, torch.OutOfMemoryError) else ""
        raise ImageError(f"restoration failed ({_one_line(exc)}){hint}") from exc
    alpha = None
    if picture.alpha is not None:
        alpha_lr = torch.from_numpy(picture.alpha)[None, None]
        alpha = F.interpolate(alpha_lr, scale_factor=restorer.scale, mode="bicubic", align_corners=False)
        alpha = alpha.clamp(0, 1)[0, 0].numpy()
    return Picture(np.ascontiguousarray(sr), alpha, picture.grayscale, picture.bit_depth, picture.icc_profile)


# ---- writing ----


def encode_image(picture: Picture, output: Path, *, quality: int = DEFAULT_QUALITY) -> bytes:
    """The bytes of ``output``'s file: format from its suffix, grayscale, alpha and bit depth kept
    where the format holds them (16 bit: PNG and TIFF; alpha: not JPEG or BMP). JPEG and WebP at
    ``quality``, JPEG without chroma subsampling."""
    import numpy as np

    fmt = OUTPUT_FORMATS.get(output.suffix.lower(), "PNG")
    levels = 65535 if picture.bit_depth == 16 and fmt in SIXTEEN_BIT_FORMATS else 255
    channels = [picture.rgb @ np.array(_LUMA, dtype=np.float32)] if picture.grayscale else \
        [picture.rgb[..., i] for i in range(3)]
    if picture.alpha is not None and fmt not in ("JPEG", "BMP"):
        channels.append(picture.alpha)
    values = np.stack(channels, axis=-1)  # the one full-size float copy: the rest is in place
    np.clip(values, 0, 1, out=values)
    values *= levels
    array = np.rint(values, out=values).astype(np.uint16 if levels == 65535 else np.uint8)
    try:
        if levels == 65535 and array.shape[-1] > 1:  # Pillow has no 16-bit colour or gray+alpha modes
            return _encode_16bit_opencv(array, output.suffix.lower() if fmt != "PNG" else ".png")
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        params = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
        if fmt == "JPEG":
            params["subsampling"] = 0  # 4:4:4: halving the chroma resolution would undo the upscaling
        if picture.icc_profile and fmt != "BMP":
            params["icc_profile"] = picture.icc_profile
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **params)
        return buffer.getvalue()
    except (OSError, ValueError) as exc:  # e.g. WebP's 16383-pixel side limit
        raise ImageError(f"cannot encode a {array.shape[1]}x{array.shape[0]} {fmt} ({_one_line(exc)})") from exc


def _encode_16bit_opencv(array: np.ndarray, suffix: str) -> bytes:
    import cv2
    import numpy as np

    if array.shape[-1] == 2:  # gray+alpha: OpenCV writes 1, 3 or 4 channels
        array = np.concatenate([array[..., :1]] * 3 + [array[..., 1:]], axis=-1)
    bgr = array[..., [2, 1, 0, 3][: array.shape[-1]]]
    ok, encoded = cv2.imencode(suffix, np.ascontiguousarray(bgr))
    if not ok:
        raise ValueError(f"OpenCV cannot write 16-bit {suffix}")
    return encoded.tobytes()


def write_atomically(output: Path, payload: bytes) -> None:
    """Write ``payload`` to a hidden temporary file beside ``output``, then rename it into place:
    ``output`` either does not exist or is complete, whatever interrupts the write."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


# ---- the batch ----


@dataclass(frozen=True)
class BatchOptions:
    overwrite: bool = False
    min_side: int = DEFAULT_MIN_SIDE
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS
    tiling: TilingPolicy = TilingPolicy()
    quality: int = DEFAULT_QUALITY


@dataclass(frozen=True)
class ImageResult:
    item: BatchItem
    status: str  # "restored", "skipped" (output exists) or "failed"
    seconds: float = 0.0
    input_size: tuple[int, int] | None = None  # (width, height)
    output_size: tuple[int, int] | None = None
    tile: int | None = None
    message: str = ""


def restore_image(restorer: OneStepRestorer, item: BatchItem, options: BatchOptions) -> ImageResult:
    """Read, restore and write one image (and its tags, with a tagged prompt); a failure comes back as a
    "failed" result."""
    from tvt.models.prompts import write_last_tags

    start = time.perf_counter()
    input_size = tile = None
    try:
        picture = read_image(item.source, min_side=options.min_side, max_pixels=options.max_input_pixels)
        input_size = picture.size
        tile = options.tiling.tile_for(input_size[0] * restorer.scale, input_size[1] * restorer.scale)
        restored = upscale(restorer, picture, tile, options.tiling.overlap, options.tiling.memory)
        payload = encode_image(restored, item.output, quality=options.quality)
        try:
            write_last_tags(getattr(restorer, "prompt", None), item.output)  # first: no output without its tags
            write_atomically(item.output, payload)
        except OSError as exc:
            raise ImageError(f"cannot write {item.output} ({_one_line(exc)})") from exc
    except ImageError as exc:
        return ImageResult(item, "failed", time.perf_counter() - start, input_size, None, tile, str(exc))
    return ImageResult(item, "restored", time.perf_counter() - start, input_size, restored.size, tile)


def restore_batch(restorer: OneStepRestorer | None, items: Sequence[BatchItem], options: BatchOptions = BatchOptions(),
                  *, progress: bool | None = None) -> list[ImageResult]:
    """Restore every item whose output is missing (all with ``overwrite``); failures go to stderr
    one line each as they happen. ``restorer`` may be None only when every output exists.
    ``progress``: a tqdm bar (None: only on a terminal)."""
    from tqdm import tqdm

    results = []
    with tqdm(items, desc="tvt sr", unit="img", file=sys.stderr, disable=None if progress is None else not progress,
              dynamic_ncols=True) as bar:
        for item in bar:
            if item.output.exists() and not options.overwrite:
                results.append(ImageResult(item, "skipped"))
                continue
            result = restore_image(restorer, item, options)
            if result.status == "failed":
                tqdm.write(f"error: {item.source}: {result.message}", file=sys.stderr)
            results.append(result)
    return results


def format_summary(results: Sequence[ImageResult], seconds: float) -> str:
    """A table of every image (status, time, sizes, tile) and a totals line."""

    def size(wh):
        return f"{wh[0]}x{wh[1]}" if wh else "-"

    rows = [("status", "seconds", "input", "output", "tile", "file")]
    for r in results:
        name = str(r.item.source) + (f"  ({r.message})" if r.message else "")
        rows.append((r.status, f"{r.seconds:.2f}" if r.status != "skipped" else "-", size(r.input_size),
                     size(r.output_size), str(r.tile or "-"), name))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join([cell.ljust(w) for cell, w in zip(row[:5], widths)] + [row[5]]) for row in rows]
    counts = {status: sum(r.status == status for r in results) for status in ("restored", "skipped", "failed")}
    restored_seconds = sum(r.seconds for r in results if r.status == "restored")
    rate = f" (restoring: {counts['restored'] / restored_seconds:.2f} images/s)" if restored_seconds else ""
    totals = (f"{counts['restored']} restored, {counts['skipped']} skipped (output exists; --overwrite redoes it), "
              f"{counts['failed']} failed in {seconds:.1f} s{rate}")
    return "\n".join(lines + [totals])


# ---- weights ----


def resolve_weights(weights: Path | str | None, method: str | None = None, revision: str | None = None) -> Path:
    """The restorer folder to load: ``weights`` itself when it holds one, else
    ``<weights>/models/<method>`` (a resources folder) or ``<weights>/resources/models/<method>``
    (a project root); a Hub model id ("owner/name", no such local path) is fetched into the Hugging
    Face cache at ``revision`` (:mod:`tvt.models.hub`); without ``weights``, the pipeline's
    ``resources/models/<method>``.

    Raises :class:`UsageError` naming the first missing file, or a method that disagrees.
    """
    from tvt.models.hub import HubError, is_repo_id, restorer_folder

    name = method or DEFAULT_METHOD
    if revision is not None and (weights is None or not is_repo_id(weights)):
        raise UsageError("--revision selects a commit of a Hub repository: give --weights OWNER/NAME")
    if weights is not None and is_repo_id(weights):
        try:
            weights = restorer_folder(str(weights), revision=revision)
        except HubError as exc:
            raise UsageError(f"--weights {_one_line(exc)}") from exc
    weights = None if weights is None else Path(weights)
    if weights is None:
        weights = Path(method_model_dir(name))
        if not weights.is_dir():
            raise UsageError(f"no --weights given and {weights} does not exist: train it with the pipeline "
                             "(`make demo` for the mini models) or pass --weights DIR")
    elif not weights.is_dir():
        raise UsageError(f"--weights {weights}: no such folder")
    elif not (weights / RESTORER_CONFIG).exists():
        for candidate in (weights / "models" / name, weights / method_model_dir(name)):
            if (candidate / RESTORER_CONFIG).exists():
                weights = candidate
                break
    for relative in REQUIRED_WEIGHT_FILES:
        if not (weights / relative).is_file():
            raise UsageError(f"--weights {weights} is incomplete: {relative} is missing "
                             "(expected a restorer saved by the training stages)")
    try:
        config = json.loads((weights / RESTORER_CONFIG).read_text())
        stored_method, embedding = config["method"], config.get("prompt_embedding")
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{weights / RESTORER_CONFIG} is not a restorer config ({_one_line(exc)})") from exc
    if embedding and not (weights / embedding).is_file():
        raise UsageError(f"--weights {weights} is incomplete: {embedding} is missing")
    if method is not None and stored_method != method:
        raise UsageError(f"--weights {weights} holds a {stored_method!r} restorer, not --method {method!r}")
    return weights


#: ``tvt sr`` options that only a multi-step (StableSR) restorer has: flag -> constructor argument
SAMPLING_OPTIONS = {"--steps": "steps", "--w": "w", "--seed": "seed"}


def load_restorer(weights: Path, *, device: str | None = None, dtype: str = "auto", channels_last: bool | None = None,
                  scale: int | None = None, color_fix: str | None = None, threads: int | None = None,
                  **sampling: object) -> OneStepRestorer:
    """The restorer in ``weights`` (see :func:`resolve_weights`), in eval mode on ``device``
    (default: CUDA when available), with ``scale``, ``color_fix`` and, for a StableSR restorer,
    ``sampling`` (``steps``, ``w``, ``seed``; None keeps the stored value) overriding the stored ones.

    ``dtype`` "auto" and ``channels_last`` None take :func:`tvt.inference.fastest_exact_options` for
    this restorer on this device."""
    import dataclasses

    import torch

    from tvt.inference import fastest_exact_options, prepare_for_inference
    from tvt.models.saved import load_restorer as load_saved
    from tvt.models.saved import restorer_class_name

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    torch.backends.cudnn.benchmark = False  # autotuned kernels may differ between runs: same input, same bytes
    torch.backends.cudnn.deterministic = True
    overrides = {key: value for key, value in (("scale", scale), ("color_fix", color_fix), *sampling.items())
                 if value is not None}
    given = [flag for flag, key in SAMPLING_OPTIONS.items() if key in overrides]
    try:
        if given and restorer_class_name(weights) != "StableSRRestorer":
            raise UsageError(f"{', '.join(given)}: only multi-step (StableSR) restorers sample; "
                             f"{weights} holds a one-step restorer")
        restorer = load_saved(weights, **overrides)  # one-step (TVT, OSEDiff…) or StableSR
    except UsageError:
        raise
    except Exception as exc:  # damaged safetensors, unknown classes, configs of another version...
        raise UsageError(f"cannot load the restorer in {weights} ({_one_line(exc)})") from exc
    fastest = fastest_exact_options(restorer, device)
    options = dataclasses.replace(fastest, threads=threads, **({} if dtype == "auto" else {"precision": dtype}),
                                  **({} if channels_last is None else {"channels_last": channels_last}))
    return prepare_for_inference(restorer.to(device), options)


def attach_tagger(restorer: OneStepRestorer, weights: Path, tagger: str, *, text_encoder: Path | None = None,
                  positive_prompt: str | None = None, ram_weights: Path | None = None,
                  dape_weights: Path | None = None, source: str | None = None) -> OneStepRestorer:
    """Condition ``restorer`` on per-image tags of ``tagger`` instead of its stored prompt
    (:func:`tvt.models.prompts.tag_restorer`); :class:`UsageError` names what is missing (package, weights,
    text encoder). ``source``: where the tagger was chosen, for the error (default ``--tagger <name>``)."""
    from tvt.models.prompts import tag_restorer

    source = source or f"--tagger {tagger}"
    try:
        tag_restorer(restorer, tagger, text_encoder=text_encoder or weights, positive_prompt=positive_prompt,
                     ram_weights=ram_weights, dape_weights=dape_weights)
    except TypeError as exc:
        raise UsageError(f"{source}: {weights} holds a multi-step (StableSR) restorer, which samples with the "
                         "empty prompt as the official code; use --tagger none") from exc
    except (FileNotFoundError, RuntimeError) as exc:
        hint = "" if text_encoder else " (or pass --text-encoder DIR)"
        raise UsageError(f"{source}: {_one_line(exc)}{hint}") from exc
    return restorer


def choose_tagger(restorer: OneStepRestorer, weights: Path, tagger: str | None) -> tuple[str, str | None]:
    """(tagger, where it was chosen): ``--tagger`` when given, else the restorer's recipe (announced on
    stderr), else ``none``."""
    from tvt.models.prompts import chosen_tagger, inference_prompt

    recipe = getattr(restorer, "prompt_recipe", None)
    if tagger is not None or recipe is None:
        return chosen_tagger(restorer, tagger), None
    print(f"tvt sr: {weights} was trained on {recipe.tagger} tags: prompting with "
          f"{inference_prompt('<tags>', recipe.positive)!r} (--tagger none: its null prompt)", file=sys.stderr)
    return recipe.tagger, f"{weights / RESTORER_CONFIG}'s prompt (tagger {recipe.tagger!r}; --tagger none: the null prompt)"


def _unit_interval(text: str) -> float:
    """An argparse type: a float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


# ---- command line ----


def _int_between(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"expected an integer {'>= ' + str(low) if high is None else f'from {low} to {high}'}, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``tvt sr`` arguments (the module docstring documents their behaviour)."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR",
                        help="output folder (created); outputs mirror the inputs' names")
    parser.add_argument("--weights", metavar="DIR|OWNER/NAME",
                        help="a saved restorer, a resources/project folder holding models/METHOD, or a Hugging "
                             "Face Hub model id (fetched into the HF cache; default: resources/models/METHOD)")
    parser.add_argument("--revision", metavar="REV",
                        help="branch, tag or commit of a Hub --weights (default: main; a commit hash pins it)")
    parser.add_argument("--method", help=f"restorer to pick under --weights, e.g. tvt or osediff "
                                         f"(default: {DEFAULT_METHOD}; checked against a restorer folder)")
    parser.add_argument("--recursive", action="store_true", help="descend into subfolders (and ** in globs)")
    parser.add_argument("--overwrite", action="store_true", help="redo outputs that exist (default: skip them)")
    parser.add_argument("--scale", type=_int_between(1), help="upscaling factor (default: the restorer's own, 4)")
    parser.add_argument("--color-fix", choices=("adain", "wavelet", "none"), help="default: the restorer's own")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="denoiser precision; the VAE stays fp32 (default: auto, the fastest that stays exact: "
                             "fp16 on CUDA, bf16 for TVT on CPUs with bf16 units, else fp32; see docs/inference.md)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last memory format (default: on; float reordering only, and faster)")
    parser.add_argument("--threads", type=_int_between(1), metavar="T",
                        help="CPU threads (default: torch's, one per core; on a busy machine 1 can be "
                             "much faster, see docs/inference.md)")
    parser.add_argument("--tile", type=_int_between(1), metavar="N",
                        help="tile every image larger than N x N output pixels (a multiple of the restorer's "
                             f"64-pixel alignment; default: {DEFAULT_TILE}, only above --max-pixels-untiled)")
    parser.add_argument("--overlap", type=_int_between(0), metavar="M", help="tile overlap in output pixels (default: N/4)")
    parser.add_argument("--tile-memory", type=_int_between(1), metavar="MIB",
                        help="RAM for the tile states of exact VAE tiling, in MiB; beyond it they wait on disk "
                             "(default: 128 on CPU, 1024 on a GPU; more is a little faster, see docs/inference.md)")
    parser.add_argument("--max-pixels-untiled", type=_int_between(1), default=DEFAULT_MAX_PIXELS_UNTILED, metavar="P",
                        help="outputs with more pixels run tiled, so memory stays bounded (default: %(default)s)")
    parser.add_argument("--max-input-pixels", type=_int_between(1), default=DEFAULT_MAX_INPUT_PIXELS, metavar="P",
                        help="reject larger inputs, a decompression-bomb guard (default: %(default)s)")
    parser.add_argument("--min-side", type=_int_between(1), default=DEFAULT_MIN_SIDE, metavar="S",
                        help="reject inputs whose shorter side is smaller (default: %(default)s)")
    parser.add_argument("--quality", type=_int_between(1, 100), default=DEFAULT_QUALITY, metavar="Q",
                        help="JPEG/WebP quality 1-100 (default: %(default)s)")
    prompts = parser.add_argument_group("prompts of one-step restorers (default: the restorer's stored prompt)")
    prompts.add_argument("--tagger", choices=TAGGER_CHOICES,
                         help="tag each upsampled LR and condition on '<tags>, <prompt>,' as the official test "
                              "scripts (dape; ram: RAM alone; colour: weight-free colour terms); writes "
                              "<output>.tags.json beside each output (default: the tagger the restorer was "
                              "trained with, none for the null prompt; none forces the null prompt)")
    prompts.add_argument("--prompt", metavar="TEXT",
                         help="positive prompt after the tags (default: the restorer's own, else its method's "
                              "official one: TVT's 'clean, high-resolution, 8k', none for OSEDiff)")
    prompts.add_argument("--text-encoder", type=Path, metavar="DIR",
                         help="folder with SD's tokenizer/ and text_encoder/, e.g. the SD snapshot: `tvt where "
                              "prior --config config/paper.yaml` (default: the --weights folder)")
    prompts.add_argument("--ram-weights", type=Path, metavar="PTH", help="ram_swin_large_14m.pth (ram, dape)")
    prompts.add_argument("--dape-weights", type=Path, metavar="PTH", help="OSEDiff's DAPE.pth (dape)")
    sampling = parser.add_argument_group("multi-step restorers (StableSR); defaults: the restorer's own")
    sampling.add_argument("--steps", type=_int_between(2, 1000), metavar="N",
                          help="respaced sampling steps (StableSR's paper: 200; fewer is faster, less detailed)")
    sampling.add_argument("--w", type=_unit_interval, metavar="W",
                          help="CFW weight: 0 = realism (SD's plain decoder), 1 = fidelity to the input")
    sampling.add_argument("--seed", type=_int_between(0), metavar="S", help="seed of the sampling noise")


def _tiling_policy(args: argparse.Namespace, pixel_multiple: int) -> TilingPolicy:
    tile = args.tile or DEFAULT_TILE
    if tile % pixel_multiple:
        raise UsageError(f"--tile {tile} must be a multiple of {pixel_multiple} (the restorer's alignment)")
    if args.overlap is not None and not 0 <= args.overlap < tile:
        raise UsageError(f"--overlap {args.overlap} must be in [0, {tile})")
    memory = args.tile_memory and args.tile_memory << 20
    return TilingPolicy(args.max_pixels_untiled, tile, args.overlap, always=args.tile is not None, memory=memory)


def main(args: argparse.Namespace) -> int:
    """Run ``tvt sr``; returns the exit status (0 ok, 1 some images failed, 2 usage error)."""
    start = time.perf_counter()
    try:
        if args.output.exists() and not args.output.is_dir():
            raise UsageError(f"-o {args.output} exists and is not a folder")
        items = discover_inputs(args.inputs, args.output, recursive=args.recursive)
        weights = resolve_weights(args.weights, args.method, args.revision)
        restorer = options = None
        if args.overwrite or any(not item.output.exists() for item in items):
            restorer = load_restorer(weights, device=args.device, dtype=args.dtype, channels_last=args.channels_last,
                                     scale=args.scale, color_fix=args.color_fix, threads=args.threads,
                                     steps=args.steps, w=args.w, seed=args.seed)
            from tvt.inference import describe  # (torch is loaded by now)

            print(f"running in: {describe(restorer)}" + (" (auto)" if args.dtype == "auto" else ""), flush=True)
            tagger, source = choose_tagger(restorer, weights, args.tagger)
            if tagger != "none":
                attach_tagger(restorer, weights, tagger, text_encoder=args.text_encoder,
                              positive_prompt=args.prompt, ram_weights=args.ram_weights,
                              dape_weights=args.dape_weights, source=source)
            options = BatchOptions(args.overwrite, args.min_side, args.max_input_pixels,
                                   _tiling_policy(args, restorer.pixel_multiple), args.quality)
    except UsageError as exc:
        print(f"tvt sr: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        results = restore_batch(restorer, items, options or BatchOptions())
    except KeyboardInterrupt:
        print("interrupted: finished outputs are complete; rerun the same command to resume", file=sys.stderr)
        return 130
    print(format_summary(results, time.perf_counter() - start))
    return EXIT_FAILED if any(r.status == "failed" for r in results) else EXIT_OK


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="tvt sr", description=HELP)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
