"""Real-ESRGAN second-order degradation: determinism, sizes, statistics, pair synthesis."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from tvt.data.manifest import verify_manifest
from tvt.degradation import (
    PAIR_COLUMNS,
    apply_params,
    degrade,
    image_seed,
    sample_params,
    synthesize_pairs,
    usm_sharpen,
    validate_config,
)

CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"
SEEDS = range(8)


@pytest.fixture(scope="module")
def cfg() -> dict:
    """The project's own `degrade` section, with small crops so the tests stay fast."""
    section = yaml.safe_load(CONFIG.read_text())["degrade"]
    return {**section, "hr_size": 64, "crops_per_image": 2}


def textured(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    """A 4-px checkerboard plus noise: plenty of high-frequency energy."""
    yy, xx = np.mgrid[:height, :width]
    board = ((yy // 4 + xx // 4) % 2) * 160.0 + 40.0
    noise = np.random.default_rng(seed).normal(0, 20, (height, width, 3))
    return np.clip(board[..., None] + noise, 0, 255).astype(np.uint8)


def laplacian_variance(image: np.ndarray) -> float:
    gray = torch.from_numpy(image.astype(np.float32).mean(-1))[None, None]
    kernel = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float32)[None, None]
    return F.conv2d(gray, kernel).var().item()


def bicubic_up(lr: np.ndarray, scale: int) -> np.ndarray:
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, scale_factor=scale, mode="bicubic").clamp(0, 255)
    return x[0].permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------ seeds ---


def test_image_seed_is_a_stable_hash_of_seed_and_key():
    # Golden value: changing the hashing scheme silently changes every dataset.
    assert image_seed(1234, "baboon/crop0") == 4791810005482571166
    assert image_seed(1234, "baboon/crop0") != image_seed(1234, "baboon/crop1")
    assert image_seed(1234, "baboon/crop0") != image_seed(1235, "baboon/crop0")
    assert all(0 <= image_seed(s, "k") < 2**63 for s in range(20))


# ------------------------------------------------------------------------- degrade() ---


@pytest.mark.parametrize("height,width", [(64, 64), (48, 80)])
def test_lr_has_exactly_the_scaled_size(cfg, height, width):
    for seed in range(3):
        lr, _ = degrade(textured(height, width), cfg, seed)
        assert lr.shape == (height // 4, width // 4, 3)
        assert lr.dtype == np.uint8


def test_images_smaller_than_the_kernels_still_degrade(cfg):
    for seed in SEEDS:  # 16 px tall: the first-order resize can leave 2 px for a 21 px blur
        lr, _ = degrade(textured(16, 40), cfg, seed)
        assert lr.shape == (4, 10, 3)


def test_same_seed_same_lr_and_params_different_seed_different_lr(cfg):
    hr = textured()
    lr_a, params_a = degrade(hr, cfg, 7)
    lr_b, params_b = degrade(hr, cfg, 7)
    assert np.array_equal(lr_a, lr_b) and params_a == params_b
    others = [degrade(hr, cfg, seed)[0] for seed in (8, 9, 10)]
    assert all(not np.array_equal(lr_a, other) for other in others)


def test_degrade_leaves_global_rng_and_thread_count_untouched(cfg):
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    degrade(textured(), cfg, 3)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_params_are_json_and_replay_the_same_lr(cfg):
    hr = textured()
    kernel_types, noise_types = set(), set()
    for seed in SEEDS:
        lr, params = degrade(hr, cfg, seed)
        replayed = json.loads(json.dumps(params))
        assert replayed == params
        assert np.array_equal(apply_params(hr, replayed, seed), lr)
        kernel_types.add(params["first"]["blur"]["type"])
        noise_types.add(params["first"]["noise"]["type"])
        assert params["final"]["order"] in ("resize_sinc_then_jpeg", "jpeg_then_resize_sinc")
        assert 30 <= params["first"]["jpeg_quality"] <= 95
        assert 7 <= params["first"]["blur"]["size"] <= 21 and params["first"]["blur"]["size"] % 2
    assert len(kernel_types) > 1 and noise_types == {"gaussian", "poisson"}


def test_sampled_parameters_follow_the_config(cfg):
    narrow = copy.deepcopy(cfg)
    narrow["first"].update(sinc_prob=0.0, blur_sigma=[2.0, 2.0], gaussian_noise_prob=1.0,
                           noise_range=[5.0, 5.0], resize_prob=[0, 1, 0])
    narrow["kernel_list"], narrow["kernel_prob"] = ["iso"], [1]
    narrow["second"]["blur_prob"] = 0.0
    narrow["final_sinc_prob"] = 0.0
    for seed in range(5):
        params = sample_params(narrow, seed)
        first = params["first"]
        assert first["blur"]["type"] == "iso" and first["blur"]["sigma_x"] == 2.0
        assert first["noise"] == {"type": "gaussian", "sigma": 5.0, "gray": first["noise"]["gray"]}
        assert first["resize"]["direction"] == "down" and 0.15 <= first["resize"]["scale"] <= 1
        assert params["second"]["blur"] is None and params["final"]["sinc"] is None


def test_changing_one_stage_keeps_the_other_stages(cfg):
    changed = {**cfg, "final_sinc_prob": 0.0}
    for seed in range(4):
        a, b = sample_params(cfg, seed), sample_params(changed, seed)
        assert a["first"] == b["first"] and a["second"] == b["second"]


def test_lr_loses_high_frequencies(cfg):
    hr = textured()
    energy = laplacian_variance(hr)
    ratios = [laplacian_variance(bicubic_up(degrade(hr, cfg, seed)[0], 4)) / energy for seed in SEEDS]
    assert max(ratios) < 0.5, ratios


def test_noise_is_visible_on_a_flat_image(cfg):
    grey = np.full((64, 64, 3), 128, np.uint8)
    stds = [degrade(grey, cfg, seed)[0].astype(np.float64).std() for seed in SEEDS]
    assert sum(std > 0 for std in stds) >= 6, stds


# ---------------------------------------------------------------------- config errors ---


@pytest.mark.parametrize("edit,key", [
    (lambda c: c.pop("kernel_size"), "degrade.kernel_size"),
    (lambda c: c.update(kernel_size=20), "degrade.kernel_size"),
    (lambda c: c.update(hr_size=66), "degrade.hr_size"),
    (lambda c: c.update(kernel_prob=[1, 0]), "degrade.kernel_prob"),
    (lambda c: c.update(kernel_list=["iso", "gauss"]), "degrade.kernel_list"),
    (lambda c: c["first"].update(jpeg_range=[95, 30]), "degrade.first.jpeg_range"),
    (lambda c: c["second"].pop("blur_prob"), "degrade.second.blur_prob"),
    (lambda c: c["second"].update(resize_range=[1.1, 1.5]), "degrade.second.resize_range"),
    (lambda c: c.update(final_sinc_prob=1.5), "degrade.final_sinc_prob"),
])
def test_bad_config_names_the_key(cfg, edit, key):
    bad = copy.deepcopy(cfg)
    edit(bad)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate_config(bad)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        degrade(textured(), bad, 0)


def test_bad_hr_is_rejected(cfg):
    with pytest.raises(ValueError, match="multiples of scale"):
        degrade(textured(66, 64), cfg, 0)
    with pytest.raises(ValueError, match="uint8 RGB"):
        degrade(textured().astype(np.float32), cfg, 0)


# --------------------------------------------------- StableSR options: no-degradation, USM ---


def test_no_degradation_draw_is_a_plain_bicubic_downscale(cfg):
    hr = textured(64, 64)
    lr, params = degrade(hr, {**cfg, "no_degradation_prob": 1.0}, seed=3)
    assert params == {"scale": 4, "none": True}
    expected = F.interpolate(torch.from_numpy(hr).permute(2, 0, 1)[None].float() / 255, size=(16, 16),
                             mode="bicubic", antialias=True)
    expected = (expected.clamp(0, 1) * 255).round()[0].permute(1, 2, 0).to(torch.uint8).numpy()
    assert np.array_equal(lr, expected)
    assert np.array_equal(apply_params(hr, json.loads(json.dumps(params)), 3), lr)  # the recipe replays


def test_no_degradation_share_and_untouched_recipes(cfg):
    """About p of the pairs skip the degradation; the others keep exactly the recipe they had without the option."""
    seeds = range(400)
    skipped = [s for s in seeds if sample_params({**cfg, "no_degradation_prob": 0.05}, s).get("none")]
    assert 8 <= len(skipped) <= 35  # Binomial(400, 0.05): mean 20, sd 4.4
    kept = [s for s in seeds[:40] if s not in skipped]
    assert all(sample_params({**cfg, "no_degradation_prob": 0.05}, s) == sample_params(cfg, s) for s in kept)


def test_usm_sharpens_as_basicsr(cfg):
    hr = textured(64, 64)
    sharp = usm_sharpen(hr)
    assert sharp.dtype == np.uint8 and sharp.shape == hr.shape
    assert laplacian_variance(sharp) > 1.2 * laplacian_variance(hr)
    flat = np.full((32, 32, 3), 128, np.uint8)
    assert np.array_equal(usm_sharpen(flat), flat)  # nothing to sharpen


@pytest.mark.parametrize("edit,key", [({"no_degradation_prob": 1.5}, "no_degradation_prob"),
                                      ({"usm_gt": "yes"}, "usm_gt")])
def test_bad_stablesr_options_name_the_key(cfg, edit, key):
    with pytest.raises(ValueError, match=f"degrade.{key}"):
        validate_config({**cfg, **edit})


def test_usm_gt_pairs_keep_the_sharpened_crop_as_hr(cfg, serial_run, tmp_path):
    _, plain_csv = serial_run
    pairs_csv = synthesize_pairs(write_manifest(tmp_path, [0, 1, 2]), tmp_path / "out", {**cfg, "usm_gt": True},
                                 seed=1234, workers=1)
    with pairs_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        plain = np.asarray(Image.open(plain_csv.parent / row["hr_path"]))
        sharp = np.asarray(Image.open(pairs_csv.parent / row["hr_path"]))
        assert np.array_equal(sharp, usm_sharpen(plain))
        assert json.loads(row["params"])["usm_gt"] is True


# ------------------------------------------------------------------- synthesize_pairs ---


SOURCES = [  # id, kind, (width, height)
    ("photo_big", "photo", (96, 80)),
    ("photo_small", "photo", (50, 40)),  # short side < hr_size: upscaled first
    ("text_line", "text", (90, 34)),     # not multiples of 4: cropped to 88 x 32
]


def write_manifest(folder: Path, order: list[int]) -> Path:
    """A 3-image manifest with the data manifest's columns; images in folder/images."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (source_id, kind, (width, height)) in enumerate(SOURCES):
        pixels = textured(height, width, seed=i)
        path = folder / "images" / f"{source_id}.png"
        Image.fromarray(pixels).save(path)
        is_text = kind == "text"
        rows.append({
            "id": source_id, "path": f"images/{source_id}.png", "width": width, "height": height,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "split": "test" if is_text else "train",
            "source": "synthetic", "licence": "CC0", "kind": kind, "text": "HELLO" if is_text else "",
            "text_px": 20 if is_text else "", "font": "DejaVuSans" if is_text else "",
            "lang": "en" if is_text else "", "background": "plain" if is_text else "",
        })
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[i] for i in order)
    return manifest


def snapshot(out_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(out_dir).as_posix(): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def serial_run(cfg, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serial")
    pairs_csv = synthesize_pairs(write_manifest(folder, [0, 1, 2]), folder / "out", cfg, seed=1234, workers=1)
    return folder, pairs_csv


def test_pairs_csv_describes_the_written_pairs(serial_run):
    folder, pairs_csv = serial_run
    with pairs_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == PAIR_COLUMNS
        rows = list(reader)
    assert [r["pair_id"] for r in rows] == ["photo_big_0", "photo_big_1", "photo_small_0", "photo_small_1",
                                            "text_line_0"]
    out_dir = pairs_csv.parent
    for row in rows:
        hr_bytes, lr_bytes = (out_dir / row["hr_path"]).read_bytes(), (out_dir / row["lr_path"]).read_bytes()
        assert hashlib.sha256(hr_bytes).hexdigest() == row["hr_sha256"]
        assert hashlib.sha256(lr_bytes).hexdigest() == row["lr_sha256"]
        hr = np.asarray(Image.open(out_dir / row["hr_path"]))
        lr = np.asarray(Image.open(out_dir / row["lr_path"]))
        assert lr.shape == (hr.shape[0] // 4, hr.shape[1] // 4, 3)
        assert json.loads(row["params"])["scale"] == 4
        if row["kind"] == "photo":
            assert hr.shape == (64, 64, 3) and row["split"] == "train" and row["text"] == ""
        else:
            assert hr.shape == (32, 88, 3) and row["split"] == "test"
            assert (row["text"], row["text_px"], row["lang"], row["font"]) == ("HELLO", "20", "en", "DejaVuSans")
    # An un-resized photo's HR is exactly the source crop at the recorded position.
    big = next(r for r in rows if r["pair_id"] == "photo_big_1")
    x, y = int(big["crop_x"]), int(big["crop_y"])
    source = np.asarray(Image.open(folder / "images" / "photo_big.png"))
    assert np.array_equal(np.asarray(Image.open(out_dir / big["hr_path"])), source[y:y + 64, x:x + 64])
    assert not [p for p in out_dir.rglob("*") if p.name.endswith(".tmp")]
    assert len(verify_manifest(pairs_csv)) == 5  # the project's checksum verifier agrees


@pytest.mark.slow
def test_pairs_do_not_depend_on_workers_or_manifest_order(cfg, serial_run, tmp_path):
    _, pairs_csv = serial_run
    expected = snapshot(pairs_csv.parent)
    order = [0, 1, 2]
    random.Random(3).shuffle(order)
    order = order if order != [0, 1, 2] else [2, 0, 1]
    parallel = synthesize_pairs(write_manifest(tmp_path / "a", [0, 1, 2]), tmp_path / "a" / "out", cfg, 1234,
                                workers=2)
    shuffled = synthesize_pairs(write_manifest(tmp_path / "b", order), tmp_path / "b" / "out", cfg, 1234,
                                workers=1)
    assert snapshot(parallel.parent) == expected
    assert snapshot(shuffled.parent) == expected


def _paper_online(*, vae_transfer: bool) -> dict:
    """config/paper.yaml, whose trainers all degrade online (StableSR's CFW stage draws its own pairs); without
    TVT's VAE transfer stages only OSEDiff and StableSR are left."""
    from tvt import config

    cfg = config.load(CONFIG.with_name("paper.yaml"))
    del cfg["official"]
    if not vae_transfer:
        del cfg["decoder_transfer"], cfg["encoder_transfer"], cfg["isr"]["tvt"]
    cfg["evaluate"]["methods"] = ["bicubic", "osediff", "stablesr", *(["tvt"] if vae_transfer else [])]
    return config.validate(cfg)


def test_the_train_split_holds_what_the_configs_trainers_read(cfg, serial_run, tmp_path):
    from tvt import config, stages
    from tvt.training.data import PairDataset

    mini = config.load(CONFIG)
    decided = {"mini": stages.fixed_train_pairs(mini), "paper": stages.fixed_train_pairs(config.load(
        CONFIG.with_name("paper.yaml"))), "vae": stages.fixed_train_pairs(_paper_online(vae_transfer=True)),
        "online": stages.fixed_train_pairs(_paper_online(vae_transfer=False))}
    # mini trains on fixed pairs; paper mode's VAE transfer stages read HR crops only (StableSR's CFW stage
    # draws its own pairs); OSEDiff and StableSR online read nothing of the train split
    assert decided == {"mini": "pairs", "paper": "hr", "vae": "hr", "online": "none"}
    _, full_csv = serial_run  # written with train="pairs", the default
    full = snapshot(full_csv.parent)
    written = {}
    for train in ("hr", "none"):
        folder = tmp_path / train
        pairs_csv = synthesize_pairs(write_manifest(folder, [0, 1, 2]), folder / "out", cfg, 1234, workers=1,
                                     train=train)
        written[train] = snapshot(pairs_csv.parent)
        assert len(verify_manifest(pairs_csv)) == {"hr": 5, "none": 1}[train]
    # the test pair is the same bytes whatever the train split holds; train HR crops are the same crops
    assert not any(k.startswith("train/") for k in written["none"])
    assert {k for k in written["hr"] if k.startswith("train/")} == {k for k in full if k.startswith("train/hr/")}
    for train, files in written.items():
        assert all(files[k] == full[k] for k in files if k != "pairs.csv"), train
    # a reader of LR finds the reason and the key to change, HR readers still train
    hr_only = tmp_path / "hr" / "out"
    assert len(PairDataset(hr_only, "train", with_lr=False)) == 4
    with pytest.raises(ValueError, match=r"'train' holds HR crops only.*isr\.<name>\.data.*stablesr\.sft\.data"):
        PairDataset(hr_only, "train")
    with pytest.raises(ValueError, match=r"no pairs .* split 'train': the degrade stage writes fixed train pairs "
                                         r"only for a config whose trainers read them.*`data: fixed`"):
        PairDataset(tmp_path / "none" / "out", "train", with_lr=False)
    with pytest.raises(ValueError, match="train must be one of"):
        synthesize_pairs(write_manifest(tmp_path / "bad", [0]), tmp_path / "bad" / "out", cfg, 0, train="lr")


def test_switching_a_trainer_to_fixed_data_gives_degrade_a_new_key():
    from tvt import stages

    online = _paper_online(vae_transfer=False)
    fixed = copy.deepcopy(online)
    fixed["isr"]["osediff"]["data"] = "fixed"
    assert stages.fixed_train_pairs(fixed) == "pairs"
    keys = [stages.stage_by_name(c, "degrade").key for c in (online, fixed)]
    assert keys[0] != keys[1]
    edited = copy.deepcopy(online)
    edited["isr"]["osediff"]["lr"] = 1e-4  # what the trainer does with its data does not touch the pairs
    assert stages.stage_by_name(edited, "degrade").key == keys[0]
    # DVC's params stay the degrade section alone: an edit of a trainer's lr must not rerun degrade
    # (test_workflow's `dvc exp run -S isr.tvt.lr=...`); the key above is what tells a new split apart
    assert "isr" not in stages.stage_by_name(online, "degrade").config_keys


def test_missing_source_image_is_named(cfg, tmp_path):
    manifest = write_manifest(tmp_path, [0, 1, 2])
    (tmp_path / "images" / "photo_small.png").unlink()
    with pytest.raises(ValueError, match=r"photo_small.*not found"):
        synthesize_pairs(manifest, tmp_path / "out", cfg, seed=0, workers=1)


def test_changed_source_image_is_caught(cfg, tmp_path):
    manifest = write_manifest(tmp_path, [0, 1, 2])
    Image.fromarray(textured(80, 96, seed=9)).save(tmp_path / "images" / "photo_big.png")
    with pytest.raises(ValueError, match=r"photo_big.*sha256"):
        synthesize_pairs(manifest, tmp_path / "out", cfg, seed=0, workers=1)


@pytest.mark.parametrize("column,value,message", [
    ("kind", "video", "kind 'video'"),
    ("id", "photo_big", "duplicate id 'photo_big'"),
    ("id", "../escape", "not usable as a file name"),
])
def test_bad_manifest_rows_are_named(cfg, tmp_path, column, value, message):
    manifest = write_manifest(tmp_path, [0, 1, 2])
    lines = manifest.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[2].split(",")
    cells[header.index(column)] = value
    manifest.write_text("\n".join([*lines[:2], ",".join(cells), *lines[3:]]) + "\n")
    with pytest.raises(ValueError, match=message):
        synthesize_pairs(manifest, tmp_path / "out", cfg, seed=0, workers=1)
