"""Mini dataset: wheel photos + rendered text lines, manifest, splits, determinism."""

from __future__ import annotations

import math
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tvt.data import mini, text_render
from tvt.data.manifest import (
    COLUMNS,
    read_manifest,
    sha256_file,
    verify_manifest,
    write_manifest,
)
from tvt.data.photos import WHEEL_PHOTOS, locate

SEED = 1234
SIZES = [12, 20, 32]


def small_cfg(**text) -> dict:
    """The `data` config section, shrunk: small photos, three sizes, English only."""
    return {
        "source": "mini",
        "photos": {"min_side": 128, "max_side": 256},
        "text": {"sizes": SIZES, "lines_per_size": 4, "languages": ["en"],
                 "backgrounds": ["plain", "photo"], "width": 192, **text},
        "split": {"val": 0.15, "test": 0.25},
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[dict]]:
    manifest = mini.build_mini_dataset(small_cfg(), tmp_path_factory.mktemp("a"), SEED)
    return manifest, read_manifest(manifest)


def photo_rows(rows):
    return [r for r in rows if r["kind"] == "photo"]


def text_rows(rows):
    return [r for r in rows if r["kind"] == "text"]


def ink_mask(image: Image.Image) -> np.ndarray:
    """Ink pixels: background is compressed into one half of 0..255, ink lies in the other."""
    grey = np.asarray(image.convert("L"))
    light_background = np.median(grey) >= 128
    return grey < 128 if light_background else grey >= 128


# --- build: determinism and provenance -------------------------------------------------------

def test_same_seed_gives_identical_manifest_and_bytes(built, tmp_path):
    manifest_a, rows_a = built
    manifest_b = mini.build_mini_dataset(small_cfg(), tmp_path, SEED)
    assert manifest_b.read_bytes() == manifest_a.read_bytes()
    for row in rows_a:
        assert (tmp_path / row["path"]).read_bytes() == (manifest_a.parent / row["path"]).read_bytes()


def test_different_seed_changes_text_strings(built, tmp_path):
    _, rows = built
    cfg = small_cfg()
    cfg["photos"]["max_side"] = 128  # keep this extra build cheap; only strings matter here
    other = text_rows(read_manifest(mini.build_mini_dataset(cfg, tmp_path, SEED + 1)))
    ours = {r["id"]: r["text"] for r in text_rows(rows)}
    assert {r["id"] for r in other} == set(ours)
    changed = sum(r["text"] != ours[r["id"]] for r in other)
    assert changed == len(other)


def test_manifest_layout(built):
    manifest, rows = built
    header = manifest.read_text(encoding="utf-8").splitlines()[0]
    assert header.split(",") == list(COLUMNS)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    for r in rows:
        assert "\\" not in r["path"] and not Path(r["path"]).is_absolute()
        assert r["path"] == f"{'photos' if r['kind'] == 'photo' else 'text'}/{r['id']}.png"
        assert r["source"] and r["licence"]
    for r in photo_rows(rows):
        assert (r["text"], r["text_px"], r["font"], r["lang"], r["background"]) == ("", None, "", "", "")
    for r in text_rows(rows):
        assert r["text"] and r["font"] and r["lang"] == "en" and r["background"] in ("plain", "photo")


def test_photos_found_through_packages_with_licences(built):
    _, rows = built
    by_id = {r["id"]: r for r in photo_rows(rows)}
    assert len(by_id) >= 10, "scikit-image / scikit-learn / matplotlib photos not found"
    if locate(WHEEL_PHOTOS[0]) is not None:
        assert by_id["photo-skimage-astronaut"]["licence"].startswith("public domain")
    if "photo-sklearn-china" in by_id:
        assert by_id["photo-sklearn-china"]["licence"].startswith("CC-BY-2.0")


def test_sha256_and_verify_catches_modified_and_missing_files(built, tmp_path):
    manifest, rows = built
    for r in rows:
        assert sha256_file(manifest.parent / r["path"]) == r["sha256"]
    assert verify_manifest(manifest) == rows

    copy = tmp_path / "copy"
    shutil.copytree(manifest.parent, copy)
    victim = text_rows(rows)[1]
    with open(copy / victim["path"], "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match=f"checksum mismatch for {victim['id']}"):
        verify_manifest(copy / "manifest.csv")
    (copy / victim["path"]).unlink()
    with pytest.raises(ValueError, match=f"file missing for {victim['id']}"):
        verify_manifest(copy / "manifest.csv")


def test_manifest_round_trip_and_rejects_bad_rows(built, tmp_path):
    manifest, rows = built
    again = write_manifest(list(reversed(rows)), tmp_path / "m.csv")
    assert again.read_bytes() == manifest.read_bytes()
    with pytest.raises(ValueError, match="duplicate ids"):
        write_manifest(rows + rows[:1], tmp_path / "dup.csv")
    with pytest.raises(ValueError, match="split 'dev'"):
        write_manifest([{**rows[0], "split": "dev"}], tmp_path / "bad.csv")
    with pytest.raises(ValueError, match=r"missing \['licence'\]"):
        write_manifest([{k: v for k, v in rows[0].items() if k != "licence"}], tmp_path / "bad.csv")


def test_pair_manifests_share_the_reader_and_verifier(built, tmp_path):
    """Later stages' manifests (key pair_id, hr_/lr_ path+sha256 columns) use the same API."""
    manifest, rows = built
    photo = photo_rows(rows)[0]
    shutil.copy(manifest.parent / photo["path"], tmp_path / "hr.png")
    Image.open(tmp_path / "hr.png").resize((32, 32)).save(tmp_path / "lr.png")
    columns = ("pair_id", "split", "kind", "hr_path", "hr_sha256", "lr_path", "lr_sha256", "crop_x")
    pair = {"pair_id": "p0", "split": "test", "kind": "photo", "hr_path": "hr.png",
            "hr_sha256": photo["sha256"], "lr_path": "lr.png",
            "lr_sha256": sha256_file(tmp_path / "lr.png"), "crop_x": 16}
    pairs = write_manifest([pair], tmp_path / "pairs.csv", columns)
    assert read_manifest(pairs) == [pair]  # crop_x back as int
    assert verify_manifest(pairs) == [pair]
    Image.new("RGB", (32, 32)).save(tmp_path / "lr.png")
    with pytest.raises(ValueError, match="checksum mismatch for p0: .*lr.png"):
        verify_manifest(pairs)


def test_rebuild_with_fewer_sizes_removes_stale_images(tmp_path):
    cfg = small_cfg(sizes=[12, 20], lines_per_size=1, backgrounds=["plain"])
    mini.build_mini_dataset(cfg, tmp_path, SEED)
    cfg["text"]["sizes"] = [12]
    rows = read_manifest(mini.build_mini_dataset(cfg, tmp_path, SEED))
    assert sorted(p.name for p in (tmp_path / "text").iterdir()) == \
        sorted(Path(r["path"]).name for r in text_rows(rows)) == ["text-en-12px-000.png"]


# --- sizes ---------------------------------------------------------------------------------

def test_photo_sizes_obey_min_and_max_side(built):
    _, rows = built
    for r in photo_rows(rows):
        image = Image.open(built[0].parent / r["path"])
        assert image.mode == "RGB" and image.size == (r["width"], r["height"])
        assert 128 <= min(image.size) and max(image.size) <= 256
    page = next(p for p in WHEEL_PHOTOS if p.id == "photo-skimage-page")
    if locate(page) is not None:  # 384x191 -> 256x127: shorter side below min_side
        assert page.id not in {r["id"] for r in rows}


def test_extra_photo_folder_is_opt_in(monkeypatch, tmp_path):
    folder = tmp_path / "backgrounds"
    (folder / "sub dir").mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "sub dir" / "dunes.jpg")
    Image.fromarray(noise[:100, :100]).save(folder / "tiny.png")  # below min_side
    monkeypatch.setattr(mini, "WHEEL_PHOTOS", ())
    cfg = small_cfg(sizes=[12], lines_per_size=1, backgrounds=["plain"])
    cfg["photos"]["extra_dirs"] = [str(folder)]
    photos = photo_rows(read_manifest(mini.build_mini_dataset(cfg, tmp_path / "out", SEED)))
    assert [(r["id"], r["width"], r["height"]) for r in photos] == \
        [("photo-backgrounds-sub_dir_dunes", 256, 192)]
    assert photos[0]["licence"].startswith("unstated")


def test_text_canvas_sizes(built):
    _, rows = built
    texts = text_rows(rows)
    assert Counter(r["text_px"] for r in texts) == {px: 4 for px in SIZES}
    assert {r["background"] for r in texts} == {"plain", "photo"}
    for r in texts:
        assert r["width"] == 192 and r["height"] % 16 == 0
    heights = {r["text_px"]: r["height"] for r in texts}
    assert heights[12] < heights[32]


# --- text rendering ------------------------------------------------------------------------

def test_every_text_image_has_ink_inside_its_bounds(built):
    manifest, rows = built
    for r in text_rows(rows):
        image = Image.open(manifest.parent / r["path"])
        mask = ink_mask(image)
        ys, xs = np.nonzero(mask)
        assert mask.sum() > 3 * len(r["text"]), f"{r['id']}: too little ink"
        assert ys.min() > 0 and xs.min() > 0, f"{r['id']}: ink touches the top/left edge"
        assert ys.max() < image.height - 1 and xs.max() < image.width - 1, f"{r['id']}: clipped"
        # glyphs scale with the requested size: ink height at least half the pixel size
        assert ys.max() - ys.min() >= r["text_px"] // 2


def test_photo_background_keeps_texture_and_contrast(built):
    manifest, rows = built
    for r in text_rows(rows):
        if r["background"] != "photo":
            continue
        grey = np.asarray(Image.open(manifest.parent / r["path"]).convert("L")).astype(int)
        paper = grey[~ink_mask(Image.open(manifest.parent / r["path"]))]
        assert len(np.unique(paper)) > 8, f"{r['id']}: photo backdrop lost its texture"
        # ink is 0 or 255; the backdrop stays in the other half of the range
        assert paper.min() >= 128 or paper.max() <= 127


def test_render_refuses_to_clip_and_checks_width():
    font = text_render.latin_fonts()[0]
    with pytest.raises(ValueError, match="outside the 64x"):
        text_render.render_text_line("much too long for this canvas", font, 20, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        text_render.render_text_line("abc", font, 20, 100)


def test_random_line_fits_and_depends_on_seed():
    font = text_render.latin_fonts()[0]
    face = font.load(16)
    lines = [text_render.random_line(random.Random(s), "en", face, 180.0) for s in range(20)]
    assert len(set(lines)) == 20
    for line in lines:
        assert 0 < face.getlength(line) <= 180.0
        assert line == line.strip()
        # the next token would not have fitted: lines fill most of the width
        assert face.getlength(line) > 180.0 / 3
    codes = [text_render.random_code(random.Random(s)) for s in range(200)]
    assert not set("".join(codes)) & set("01OI")
    assert all("-" in c for c in codes)


def test_chinese_is_skipped_with_a_warning_without_cjk_font(monkeypatch):
    monkeypatch.setattr(text_render, "CJK_FONT_CANDIDATES", ())
    with pytest.warns(UserWarning, match="'zh'"):
        plan = mini.plan_text_lines(small_cfg(languages=["en", "zh"])["text"])
    assert {item.lang for item in plan} == {"en"} and len(plan) == 4 * len(SIZES)


def test_chinese_line_renders_where_a_cjk_font_is_installed():
    fonts = text_render.cjk_fonts()
    if not fonts:
        pytest.skip("no CJK font installed (Debian: fonts-wqy-microhei)")
    face = fonts[0].load(24)
    line = text_render.random_line(random.Random(0), "zh", face, 360.0)
    assert len(line) >= 10 and set(line) <= set(text_render.ZH_CHARS)
    assert ink_mask(text_render.render_text_line(line, fonts[0], 24, 384)).sum() > 100


def test_ocr_reads_32px_dejavu_sans_exactly():
    if shutil.which("tesseract") is None:
        pytest.skip("tesseract is not installed (Debian: tesseract-ocr tesseract-ocr-eng)")
    pytesseract = pytest.importorskip("pytesseract")
    font = next(f for f in text_render.latin_fonts() if f.name == "DejaVu Sans")
    px, width = 32, 384
    truth = text_render.random_line(random.Random(SEED), "en", font.load(px),
                                    width - 2 * text_render.line_margin(px))
    image = text_render.render_text_line(truth, font, px, width)
    assert pytesseract.image_to_string(image, config="--psm 7").strip() == truth


# --- splits --------------------------------------------------------------------------------

def test_photo_split_fractions_follow_config():
    counts = Counter(mini.photo_split(SEED, f"img-{i}", 0.15, 0.25) for i in range(4000))
    assert abs(counts["test"] / 4000 - 0.25) < 0.03
    assert abs(counts["val"] / 4000 - 0.15) < 0.03
    assert mini.photo_split(SEED, "img-7", 0.15, 0.25) == mini.photo_split(SEED, "img-7", 0.15, 0.25)


def test_split_is_stable_when_a_photo_is_removed(monkeypatch, tmp_path):
    available = [p for p in WHEEL_PHOTOS if locate(p) is not None][:5]
    if len(available) < 3:
        pytest.skip("fewer than 3 wheel photos installed")
    cfg = small_cfg(sizes=[12], lines_per_size=2)
    cfg["photos"]["max_side"] = 128
    monkeypatch.setattr(mini, "WHEEL_PHOTOS", tuple(available))
    full = {r["id"]: r["split"] for r in read_manifest(mini.build_mini_dataset(cfg, tmp_path / "a", SEED))}
    monkeypatch.setattr(mini, "WHEEL_PHOTOS", tuple(available[1:]))
    fewer = {r["id"]: r["split"] for r in read_manifest(mini.build_mini_dataset(cfg, tmp_path / "b", SEED))}
    assert set(full) - set(fewer) == {available[0].id}
    assert all(fewer[i] == full[i] for i in fewer)


def test_at_least_half_of_every_text_group_is_test(built):
    _, rows = built
    groups = Counter((r["lang"], r["text_px"]) for r in text_rows(rows))
    tests = Counter((r["lang"], r["text_px"]) for r in text_rows(rows) if r["split"] == "test")
    for group, n in groups.items():
        assert tests[group] >= math.ceil(n / 2), group
    splits = mini.text_splits([[f"t{i}" for i in range(9)]], SEED, 0.15, 0.25)
    assert Counter(splits.values())["test"] == 5


def test_bad_split_fractions_are_rejected(tmp_path):
    cfg = small_cfg()
    cfg["split"] = {"val": 0.5, "test": 0.5}
    with pytest.raises(ValueError, match="val=0.5, test=0.5"):
        mini.build_mini_dataset(cfg, tmp_path, SEED)


# --- text pages (train split) ---------------------------------------------------------------

def test_text_pages_join_the_train_split_only_and_change_no_other_image(built, tmp_path):
    _, plain_rows = built
    cfg = small_cfg(train_pages=3, page_size=128)
    rows = read_manifest(mini.build_mini_dataset(cfg, tmp_path, SEED))
    pages = [r for r in rows if r["kind"] == "page"]
    assert [r["id"] for r in pages] == ["page-000", "page-001", "page-002"]
    assert {r["split"] for r in pages} == {"train"}  # val and test keep photos and lines only
    assert all(r["path"] == f"pages/{r['id']}.png" and (r["width"], r["height"]) == (128, 128) for r in pages)
    assert [r["background"] for r in pages] == ["plain", "photo", "plain"]  # backgrounds cycle
    # adding pages changes no photo or text line (their bytes are in the sha256 column)
    assert [r for r in rows if r["kind"] != "page"] == plain_rows
    for r in pages:
        image = Image.open(tmp_path / r["path"])
        ink = ink_mask(image)
        # text from top to bottom: most pixel rows cross a glyph, and some ink is in every quarter
        assert ink.any(axis=1).mean() > 0.5, r["id"]
        assert all(q.any() for q in np.array_split(ink, 4, axis=0)), r["id"]
    grey = np.asarray(Image.open(tmp_path / pages[1]["path"]).convert("L"))
    assert len(np.unique(grey)) > 40  # the photo page keeps its backdrops' texture
    again = read_manifest(mini.build_mini_dataset(cfg, tmp_path / "again", SEED))
    assert [r["sha256"] for r in again] == [r["sha256"] for r in rows]  # deterministic


def test_the_training_sets_read_text_pages_beside_photos(tmp_path):
    from tvt import config
    from tvt.data.manifest import TRAINING_KINDS
    from tvt.training.data import OnlinePairDataset

    assert TRAINING_KINDS == ("photo", "page")
    manifest = mini.build_mini_dataset(small_cfg(train_pages=2, page_size=128), tmp_path, SEED)
    online = OnlinePairDataset(manifest, config.load("config/config.yaml")["degrade"], SEED)
    kinds = Counter(r["kind"] for r in online.rows)
    assert kinds["page"] == 2 and kinds["photo"] > 0 and "text" not in kinds
    page = next(i for i, r in enumerate(online.rows) if r["kind"] == "page")
    item = online[page]
    assert item["hr"].shape == (3, 128, 128) and item["pair_id"].startswith("page-")
