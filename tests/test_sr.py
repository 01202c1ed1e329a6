"""`tvt sr`: inputs of every kind, rejected files, resuming, atomic writes, sizes, determinism, exit codes."""

import argparse
import contextlib
import functools
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tvt import compat

compat.apply()  # diffusers imports peft -> transformers -> torchvision

import cv2
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from PIL import Image, ImageCms, ImageOps
from sample_photos import COLOUR_PHOTOS
from sample_photos import photo as sample_photo

from tvt import sr
from tvt.models.restorer import build_tvt_restorer
from tvt.models.sd_configs import MINI_UNET, MINI_VAE_D4
from tvt.models.vae_d4 import VAED4

REPO = Path(__file__).resolve().parents[1]
SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def save_tiny_restorer(path: Path) -> Path:
    """A TVT restorer (VAE-D4 + CE-UNet) narrower than mini mode, randomly initialised: fast, same code paths."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**MINI_UNET, "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1,
                                   "norm_num_groups": 4, "cross_attention_dim": 8, "attention_head_dim": 2})
    vae = VAED4(**{**MINI_VAE_D4, "encoder_channels": (8, 16, 16), "decoder_channels": (16, 16, 8),
                   "decoder_layers_per_block": 1, "norm_num_groups": 4})
    return build_tvt_restorer(vae, unet).save_pretrained_dir(path)


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    return save_tiny_restorer(tmp_path_factory.mktemp("sr-weights") / "tvt")


@pytest.fixture(autouse=True, scope="module")
def load_each_restorer_once():
    """`tvt sr` loads its restorer on every run; the tests reuse one per set of options (time)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sr, "load_restorer", functools.cache(sr.load_restorer))
        yield


def run_sr(capsys, *argv) -> tuple[int, str, str]:
    """``tvt sr ARGV`` in this process: (exit status, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="tvt sr")
    sr.add_arguments(parser)
    if capsys is not None:
        code = sr.main(parser.parse_args([str(a) for a in argv]))
        return (code, *capsys.readouterr())
    stdout, stderr = io.StringIO(), io.StringIO()  # module-scoped fixtures have no capsys
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = sr.main(parser.parse_args([str(a) for a in argv]))
    return code, stdout.getvalue(), stderr.getvalue()


def photo(width: int = 16, height: int = 12, seed: int = 0) -> np.ndarray:
    """A real photo (one per ``seed``) area-downscaled to ``width``×``height``, RGB uint8."""
    name = COLOUR_PHOTOS[seed % len(COLOUR_PHOTOS)]
    return np.asarray(sample_photo(name).resize((width, height), Image.Resampling.BOX))


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


# ---- weights ----


def test_required_weight_files_are_what_save_pretrained_dir_writes(weights):
    written = {p.relative_to(weights).as_posix() for p in weights.rglob("*") if p.is_file()}
    assert set(sr.REQUIRED_WEIGHT_FILES) <= written
    assert written - set(sr.REQUIRED_WEIGHT_FILES) == {"prompt_embedding.safetensors"}  # named in restorer.json


def test_weights_resolve_from_a_restorer_a_resources_folder_or_a_project_root(weights, tmp_path, monkeypatch):
    assert sr.resolve_weights(weights) == weights
    assert sr.resolve_weights(weights, "tvt") == weights
    project = tmp_path / "project"
    (project / "resources" / "models").mkdir(parents=True)
    (project / "resources" / "models" / "tvt").symlink_to(weights)
    assert sr.resolve_weights(project / "resources") == project / "resources" / "models" / "tvt"
    assert sr.resolve_weights(project, "tvt") == project / "resources" / "models" / "tvt"
    monkeypatch.chdir(project)
    assert sr.resolve_weights(None) == Path("resources/models/tvt")
    with pytest.raises(sr.UsageError, match="holds a 'tvt' restorer, not --method 'osediff'"):
        sr.resolve_weights(weights, "osediff")
    with pytest.raises(sr.UsageError, match=r"resources/models/osediff does not exist.*make demo"):
        sr.resolve_weights(None, "osediff")


@pytest.mark.parametrize("missing", ["unet/diffusion_pytorch_model.safetensors", "prompt_embedding.safetensors",
                                     "restorer.json"])
def test_incomplete_weights_name_the_missing_file(weights, tmp_path, missing):
    import shutil

    broken = Path(shutil.copytree(weights, tmp_path / "broken"))
    (broken / missing).unlink()
    with pytest.raises(sr.UsageError, match=f"incomplete: {missing} is missing"):
        sr.resolve_weights(broken)


# ---- every kind of input ----


@pytest.fixture(scope="module")
def restored_kinds(weights, tmp_path_factory):
    """One batch over every input class: (inputs folder, outputs folder, exit status, stdout, stderr)."""
    folder = tmp_path_factory.mktemp("kinds")
    src, out = folder / "in", folder / "out"
    src.mkdir()
    rgb = photo()
    Image.fromarray(rgb).save(src / "rgb.png", icc_profile=SRGB_ICC)
    Image.fromarray(rgb).convert("L").save(src / "gray.png")
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, rgb.shape[1] // 2:] = 255
    Image.fromarray(np.dstack([rgb, alpha])).save(src / "rgba.png")
    Image.fromarray(np.dstack([rgb, 255 - alpha])).save(src / "rgba_other_alpha.png")
    Image.fromarray(np.dstack([rgb[..., 0], alpha])).convert("LA").save(src / "la.png")
    Image.fromarray(rgb).quantize(16).save(src / "palette.png")
    transparent = Image.fromarray(rgb).quantize(16)
    transparent.info["transparency"] = 0
    transparent.save(src / "palette_transparent.png", transparency=0)
    gray16 = (np.asarray(Image.fromarray(rgb).convert("L"), np.uint16) * 257 + np.arange(rgb.shape[1], dtype=np.uint16))
    Image.fromarray(gray16).save(src / "gray16.png")
    rgb16 = rgb.astype(np.uint16) * 256  # and a copy differing only in the low bytes, which 8 bits would lose
    cv2.imwrite(str(src / "rgb16.png"), rgb16[..., ::-1])
    cv2.imwrite(str(src / "rgb16_low_bytes.png"), (rgb16 + 200)[..., ::-1])
    Image.fromarray(rgb).convert("CMYK").save(src / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it 90° clockwise
    Image.fromarray(rgb).save(src / "rotated.jpg", exif=exif, icc_profile=SRGB_ICC, quality=95)
    upright = ImageOps.exif_transpose(Image.open(src / "rotated.jpg"))
    upright.save(src / "upright.png")  # the same pixels as the network must see for rotated.jpg
    Image.fromarray(rgb).save(src / "photo.bmp")
    Image.fromarray(rgb).quantize(64).save(src / "anim.gif")
    return (src, out, *run_sr(None, src, "-o", out, "--weights", weights))


def test_every_input_class_is_restored_in_its_own_kind(restored_kinds):
    _, out, code, stdout, err = restored_kinds
    assert code == 0, err
    assert "15 restored, 0 skipped" in stdout
    h, w = 12, 16

    def opened(name):
        return Image.open(out / name)

    expected_modes = {"rgb.png": "RGB", "gray.png": "L", "rgba.png": "RGBA", "la.png": "LA", "palette.png": "RGB",
                      "palette_transparent.png": "RGBA", "gray16.png": "I;16", "cmyk.jpg": "RGB",
                      "photo.bmp": "RGB", "anim.gif.png": "RGB"}
    for name, mode in expected_modes.items():
        with opened(name) as image:
            assert (image.mode, image.size) == (mode, (4 * w, 4 * h)), name
    with opened("rotated.jpg") as image:
        assert image.size == (4 * h, 4 * w)  # upright: sides swapped
        assert 0x0112 not in image.getexif() and image.info["icc_profile"] == SRGB_ICC
    # the network saw exactly the upright pixels: the same output, encoded as the tool encodes JPEGs
    expected = io.BytesIO()
    opened("upright.png").save(expected, "JPEG", quality=95, subsampling=0, icc_profile=SRGB_ICC)
    assert (out / "rotated.jpg").read_bytes() == expected.getvalue()
    assert opened("rgb.png").info["icc_profile"] == SRGB_ICC


def test_alpha_is_upscaled_apart_from_the_network(restored_kinds):
    src, out = restored_kinds[:2]
    rgba, other = np.asarray(Image.open(out / "rgba.png")), np.asarray(Image.open(out / "rgba_other_alpha.png"))
    assert np.array_equal(rgba[..., :3], other[..., :3])  # alpha does not reach the network
    alpha_lr = torch.from_numpy(np.asarray(Image.open(src / "rgba.png"))[..., 3] / np.float32(255))[None, None]
    expected = F.interpolate(alpha_lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)[0, 0]
    assert np.abs(rgba[..., 3].astype(np.float32) - expected.numpy() * 255).max() <= 0.5 + 1e-3
    assert rgba[:, :30, 3].max() == 0 and rgba[:, -30:, 3].min() == 255


def test_sixteen_bit_inputs_keep_sixteen_bits(restored_kinds):
    out = restored_kinds[1]
    gray = np.asarray(Image.open(out / "gray16.png"))
    assert gray.dtype == np.uint16 and np.mean(gray % 257 != 0) > 0.5  # not 8-bit values scaled up
    colour = cv2.imread(str(out / "rgb16.png"), cv2.IMREAD_UNCHANGED)
    assert colour.dtype == np.uint16 and colour.shape == (48, 64, 3)
    assert np.mean(colour % 257 != 0) > 0.5
    low_bytes = cv2.imread(str(out / "rgb16_low_bytes.png"), cv2.IMREAD_UNCHANGED)
    assert 0 < np.abs(low_bytes.astype(np.float32) - colour).mean() < 257  # the network saw all 16 bits


def test_grayscale_and_cmyk_keep_their_colours(restored_kinds):
    src, out = restored_kinds[:2]
    cmyk_as_rgb = np.asarray(Image.open(src / "cmyk.jpg").convert("RGB"), np.float32)
    restored = np.asarray(Image.open(out / "cmyk.jpg"), np.float32)
    assert np.abs(cmyk_as_rgb.mean((0, 1)) - restored.mean((0, 1))).max() < 6  # AdaIN colour fix: same means
    gray_in = np.asarray(Image.open(src / "gray.png"), np.float32)
    assert abs(np.asarray(Image.open(out / "gray.png"), np.float32).mean() - gray_in.mean()) < 3


def test_exif_orientation_of_arrays_matches_pillow():
    pixels = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG", exif=exif)
        expected = np.asarray(ImageOps.exif_transpose(Image.open(buffer)))
        assert np.array_equal(sr.apply_exif_orientation(pixels, orientation), expected), orientation


# ---- rejected files ----


def test_bad_files_fail_with_one_line_each_and_the_batch_goes_on(weights, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo()).save(src / "good.png")
    (src / "empty.png").write_bytes(b"")
    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.fromarray(photo(40, 40)).save(png, "PNG")
    Image.fromarray(photo(40, 40)).save(jpeg, "JPEG")
    (src / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (src / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (src / "text.png").write_text("this is not an image\n")
    Image.fromarray(photo(6, 30)).save(src / "tiny.png")
    Image.fromarray(photo(50, 50)).save(src / "large.png")  # 2500 pixels: over the limit of 2000
    Image.new("L", (300, 300)).save(src / "bomb.png")  # over twice the limit: Pillow's own guard
    code, stdout, err = run_sr(capsys, src, "-o", tmp_path / "out", "--weights", weights,
                               "--max-input-pixels", 2000)
    assert code == 1
    assert "Traceback" not in err
    reasons = {"empty.png": "empty file", "truncated.png": "corrupt or truncated",
               "truncated.jpg": "corrupt or truncated", "text.png": "not an image",
               "tiny.png": "6x30 is smaller than --min-side 8",
               "large.png": "50x50 has more than --max-input-pixels 2000", "bomb.png": "--max-input-pixels 2000"}
    lines = error_lines(err)
    assert len(lines) == len(reasons)
    for name, reason in reasons.items():
        [line] = [line for line in lines if line.startswith(f"error: {src / name}: ")]
        assert reason in line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]  # nothing partial
    assert "1 restored, 0 skipped (output exists; --overwrite redoes it), 7 failed" in stdout


# ---- resuming and atomic writes ----


def _three_inputs(folder: Path) -> Path:
    folder.mkdir()
    for i in range(3):
        Image.fromarray(photo(12 + 2 * i, 12, seed=i)).save(folder / f"img{i}.png")
    return folder


def test_rerun_redoes_only_missing_outputs(weights, tmp_path, capsys):
    src, out = _three_inputs(tmp_path / "in"), tmp_path / "out"
    assert run_sr(capsys, src, "-o", out, "--weights", weights)[0] == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "img1.png").unlink()
    code, stdout, _ = run_sr(capsys, src, "-o", out, "--weights", weights)
    assert code == 0 and "1 restored, 2 skipped" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "img1.png"} == {
        k: v for k, v in stamps.items() if k != "img1.png"}
    code, stdout, _ = run_sr(capsys, src, "-o", out, "--weights", weights, "--overwrite")
    assert code == 0 and "3 restored, 0 skipped" in stdout


def test_an_interrupted_write_leaves_no_partial_file(weights, tmp_path, capsys, monkeypatch):
    src, out = _three_inputs(tmp_path / "in"), tmp_path / "out"

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(sr.os, "replace", interrupted)
    code, _, err = run_sr(capsys, src, "-o", out, "--weights", weights)
    assert code == 130 and "rerun the same command to resume" in err
    assert list(out.iterdir()) == []  # neither img0.png nor .img0.png.partial

    def disk_full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sr.os, "replace", disk_full)
    code, _, err = run_sr(capsys, src, "-o", out, "--weights", weights)
    assert code == 1 and len(error_lines(err)) == 3 and "No space left on device" in err
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    code, stdout, _ = run_sr(capsys, src, "-o", out, "--weights", weights)
    assert code == 0 and "3 restored" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img1.png", "img2.png"]


# ---- sizes, tiling, determinism ----


@pytest.mark.parametrize("scale", [None, 2])
def test_output_size_is_scale_times_input(weights, tmp_path, capsys, scale):
    Image.fromarray(photo(13, 9)).save(tmp_path / "odd.png")
    extra = ["--scale", scale] if scale else []
    code, _, err = run_sr(capsys, tmp_path / "odd.png", "-o", tmp_path / "out", "--weights", weights, *extra)
    assert code == 0, err
    assert Image.open(tmp_path / "out" / "odd.png").size == (13 * (scale or 4), 9 * (scale or 4))


def test_tiling_policy_decides_by_output_area():
    auto = sr.TilingPolicy(max_pixels_untiled=512 * 512, tile=256)
    assert auto.tile_for(512, 512) is None
    assert auto.tile_for(513, 512) == 256
    assert sr.TilingPolicy(tile=128, always=True).tile_for(64, 64) == 128


def test_large_outputs_run_tiled(weights, tmp_path, capsys):
    Image.fromarray(photo(24, 20)).save(tmp_path / "big.png")  # 96x80 output
    out_auto, out_untiled = tmp_path / "auto", tmp_path / "untiled"
    code, stdout, _ = run_sr(capsys, tmp_path / "big.png", "-o", out_auto, "--weights", weights,
                             "--max-pixels-untiled", 10000, "--tile", 64, "--overlap", 16)
    assert code == 0
    [row] = [line for line in stdout.splitlines() if line.startswith("restored")]
    assert row.split()[2:5] == ["24x20", "96x80", "64"]
    assert run_sr(capsys, tmp_path / "big.png", "-o", out_untiled, "--weights", weights)[0] == 0
    tiled, untiled = (np.asarray(Image.open(d / "big.png"), np.float32) for d in (out_auto, out_untiled))
    assert tiled.shape == untiled.shape == (80, 96, 3)
    assert 0 < np.abs(tiled - untiled).mean() < 40  # another computation of the same image


def test_tile_memory_bounds_the_tile_states_and_not_the_result(weights, tmp_path, capsys, monkeypatch):
    from tvt.models import tiled_vae

    stores = []
    original = tiled_vae._TileStore.close

    def spy(store):  # each exact tiled pass closes its store: (budget, whether states went to disk)
        stores.append((store.budget, store._tmp is not None))
        original(store)

    monkeypatch.setattr(tiled_vae._TileStore, "close", spy)
    Image.fromarray(photo(24, 20)).save(tmp_path / "big.png")  # 96x80 output, 64-px tiles
    outputs, seen = {}, {}
    for name, extra in {"default": (), "1 MiB": ("--tile-memory", 1)}.items():
        stores.clear()
        code, _, err = run_sr(capsys, tmp_path / "big.png", "-o", tmp_path / name, "--weights", weights, "--tile", 64,
                              "--dtype", "fp32", "--no-channels-last", *extra)
        assert code == 0, err
        outputs[name], seen[name] = (tmp_path / name / "big.png").read_bytes(), set(stores)
    assert seen == {"default": {(128 << 20, False)}, "1 MiB": {(1 << 20, True)}}  # encoder and decoder alike
    assert outputs["1 MiB"] == outputs["default"]  # states round-trip through the disk exactly


def test_same_input_gives_the_same_bytes(weights, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo()).save(src / "photo.png")
    Image.fromarray(photo()).save(src / "photo.jpg")
    for out in ("a", "b"):
        assert run_sr(capsys, src, "-o", tmp_path / out, "--weights", weights)[0] == 0
    for name in ("photo.png", "photo.jpg"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# ---- inputs: folders, globs, recursion ----


def test_folders_and_globs_mirror_their_structure(weights, tmp_path, capsys):
    root = tmp_path / "shoot"
    (root / "day1").mkdir(parents=True)
    for rel in ("top.png", "day1/a.jpg", "day1/.hidden.png", "notes.txt"):
        (root / rel).write_bytes(b"x" if rel.endswith(".txt") else b"")
        if not rel.endswith(".txt"):
            Image.fromarray(photo()).save(root / rel)
    items = sr.discover_inputs([str(root / "**" / "*.jpg")], tmp_path / "g", recursive=True)
    assert [(i.source, i.output) for i in items] == [(root / "day1" / "a.jpg", tmp_path / "g" / "day1" / "a.jpg")]
    out = root / "restored"  # inside the input folder: its files must never become inputs
    assert [i.output for i in sr.discover_inputs([str(root)], out)] == [out / "top.png"]
    for _ in range(2):  # the second run sees restored/ inside shoot/ and skips everything
        code, stdout, _ = run_sr(capsys, root, "-o", out, "--weights", weights, "--recursive")
        assert code == 0
    assert "0 restored, 2 skipped" in stdout
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["day1/a.jpg", "top.png"]


# ---- exit codes and the command line ----


def test_usage_errors_exit_2_with_one_line(weights, tmp_path, capsys):
    Image.fromarray(photo()).save(tmp_path / "a.png")
    (tmp_path / "other").mkdir()
    Image.fromarray(photo()).save(tmp_path / "other" / "a.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "out"
    cases = {
        (tmp_path / "empty", "-o", out, "--weights", weights): "no image files",
        (tmp_path / "nothing.png", "-o", out, "--weights", weights): "no such file, folder or glob match",
        (tmp_path / "*.jpg", "-o", out, "--weights", weights): "no image files",
        (tmp_path / "a.png", tmp_path / "other" / "a.png", "-o", out, "--weights", weights): "would both be written",
        (tmp_path / "a.png", "-o", tmp_path / "file.txt", "--weights", weights): "is not a folder",
        (tmp_path / "a.png", "-o", out, "--weights", tmp_path / "empty"): "restorer.json is missing",
        (tmp_path / "a.png", "-o", out, "--weights", weights, "--method", "osediff"): "not --method 'osediff'",
        (tmp_path / "a.png", "-o", out, "--weights", weights, "--tile", 100): "must be a multiple of 64",
        (tmp_path / "a.png", "-o", out, "--weights", weights, "--tile", 64, "--overlap", 64): "must be in [0, 64)",
    }
    for argv, message in cases.items():
        code, _, err = run_sr(capsys, *argv)
        assert code == 2, argv
        assert err.startswith("tvt sr: error: ") and message in err, err
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        run_sr(capsys, tmp_path / "a.png", "-o", out, "--quality", 0)
    assert exit_info.value.code == 2 and "expected an integer from 1 to 100, got '0'" in capsys.readouterr().err


@pytest.mark.slow
def test_module_entry_point_starts_without_torch(tmp_path):
    """`python -m tvt.sr` answers usage errors with exit 2; the CLI imports tvt.sr without torch."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    missing = subprocess.run([sys.executable, "-m", "tvt.sr", str(tmp_path / "none.png"), "-o", str(tmp_path / "o")],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False)
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
    probe = subprocess.run([sys.executable, "-c", "import sys, tvt.sr; print('torch' in sys.modules)"],
                           capture_output=True, text=True, env=env, timeout=60, check=True)
    assert probe.stdout.strip() == "False"


@pytest.mark.parametrize("bf16_units", [True, False])
def test_the_default_runs_the_fastest_exact_options_and_says_so(weights, tmp_path, capsys, monkeypatch, bf16_units):
    from tvt import inference

    monkeypatch.setattr(inference, "cpu_has_bf16_units", lambda: bf16_units)
    monkeypatch.setattr(sr, "load_restorer", sr.load_restorer.__wrapped__)  # uncached: the probe decides
    Image.fromarray(photo(32, 24)).save(tmp_path / "a.png")
    runs = {"auto": (), "plain": ("--dtype", "fp32", "--no-channels-last")}
    outputs = {}
    for name, options in runs.items():
        code, stdout, err = run_sr(capsys, tmp_path / "a.png", "-o", tmp_path / name, "--weights", weights,
                                   "--device", "cpu", *options)
        assert code == 0, err
        outputs[name] = np.asarray(Image.open(tmp_path / name / "a.png"), np.float64)
        expected = (f"denoiser {'bf16' if bf16_units else 'fp32'}, VAE fp32, channels-last (auto)" if name == "auto"
                    else "denoiser fp32, VAE fp32, contiguous")
        assert f"running in: {expected}\n" in stdout
    difference = np.abs(outputs["auto"] - outputs["plain"])
    if bf16_units:  # rounded in the UNet, not broken
        assert 0 < difference.mean() < 2
    else:  # fp32 in another memory layout: summation order only
        assert difference.max() <= 1


def test_registered_in_the_tvt_cli(weights, tmp_path, capsys):
    from tvt import cli

    if "sr" not in cli.build_parser()._subparsers._group_actions[0].choices:
        pytest.skip("`tvt sr` is not registered in tvt/cli.py yet")
    Image.fromarray(photo()).save(tmp_path / "a.png")
    assert cli.main(["sr", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--weights", str(weights)]) == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (64, 48)
