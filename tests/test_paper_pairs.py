"""Paper mode's test sets end to end on tiny fake downloads laid out like the real archives:
RealSR / DRealSR (StableSR's test_LR / test_HR crops), Real-CE (13 mm / 52 mm / annos) and a
DIV2K-like synthetic set, assembled by the data stage, degraded (synthetic set only) by the
degrade stage and scored with bicubic: one Table-2 block per test set, PSNR checked against
an independent computation, layout errors named."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageFilter
from sample_photos import photo

from tvt import evaluate as ev
from tvt.config import REPO_ROOT, ConfigError, validate
from tvt.data.manifest import read_manifest, verify_manifest
from tvt.data.paper import (
    REAL_PAIRS_FILE,
    DatasetLayoutError,
    assemble_paper_dataset,
    image_id,
    read_annotations,
)
from tvt.data.text_render import latin_fonts, render_text_line
from tvt.degradation import synthesize_pairs
from tvt.metrics import ocr

SCALE, HR = 4, 96
TEST_SETS = ["realsr", "drealsr", "div2k_val", "realce"]
REALCE_LINES = ["harbor 7KX", "golden mirror"]
REALCE_WIDTH = 258  # not a multiple of 4: Real-CE's protocol crops the HR to 256


def _photo(name: str, size: int = HR, x: int = 16, y: int = 16) -> Image.Image:
    return photo(name).crop((x, y, x + size, y + size))


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _downloaded(folder: Path) -> Path:
    """The marker the download stage writes once a dataset is verified and extracted."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".complete").write_text(json.dumps({"sha256": ["0" * 64], "urls": ["file:///fake.zip"]}))
    return folder


def _stablesr_like(root: Path, archive: str, photos: list[str], lr_name=lambda s: s,
                   hr_name=lambda s: s) -> None:
    """``<archive>/test_HR/<name>.png`` (HR crop) and ``<archive>/test_LR/<name>.png`` (its bicubic ÷4)."""
    for name in photos:
        hr = _photo(name)
        _save(hr, root / archive / "test_HR" / f"{hr_name(name)}.png")
        _save(hr.resize((HR // SCALE,) * 2, Image.BICUBIC), root / archive / "test_LR" / f"{lr_name(name)}.png")


def _realce_like(root: Path) -> list[list[int]]:
    """``Real-CE/test/{13mm,52mm,annos}``: 52 mm = two rendered lines (HR), 13 mm = the same
    scene blurred at the same size (registered), annos = quadrilateral + transcription (GBK)."""
    font = next(f for f in latin_fonts() if f.name == "DejaVu Sans")
    rendered = [render_text_line(text, font, 32, 256) for text in REALCE_LINES]
    hr = Image.new("RGB", (REALCE_WIDTH, sum(r.height for r in rendered)), "white")
    boxes, top = [], 0
    for image in rendered:
        hr.paste(image, (0, top))
        boxes.append([0, top, image.width, top + image.height])
        top += image.height
    base = root / "Real-CE" / "test"
    _save(hr, base / "52mm" / "sign_001.png")
    _save(hr.filter(ImageFilter.GaussianBlur(6)), base / "13mm" / "sign_001.png")
    annos = [f"{x0},{y0},{x1},{y0},{x1},{y1},{x0},{y1},{text}"
             for (x0, y0, x1, y1), text in zip(boxes, REALCE_LINES, strict=True)]
    annos.append("0,0,10,0,10,10,0,10,###")  # illegible: skipped
    (base / "annos").mkdir()
    (base / "annos" / "sign_001.txt").write_bytes("\n".join(annos).encode("gbk"))
    return boxes


DATASETS = {
    "lsdir": {"role": "train", "val_images": 1, "archives": [{"url": "file:///lsdir.tar", "sha256": None}]},
    "div2k_val": {"role": "test", "pairing": "synthetic", "archives": [{"url": "file:///div2k.zip", "sha256": None}]},
    "realsr": {"role": "test", "pairing": "paired", "archives": [{"url": "file:///realsr.zip", "sha256": None}],
               "pairs": {"lr": "**/test_LR/*", "hr": "**/test_HR/*", "scale": SCALE}},
    "drealsr": {"role": "test", "pairing": "paired", "archives": [{"url": "file:///drealsr.zip", "sha256": None}],
                "pairs": {"lr": "**/test_LR/*", "hr": "**/test_HR/*", "scale": SCALE, "lr_stem": ["_x4$", ""]}},
    "realce": {"role": "test", "pairing": "paired", "archives": [{"url": "file:///realce.zip", "sha256": None}],
               "pairs": {"lr": "**/test/13mm/*", "hr": "**/test/52mm/*", "scale": SCALE, "lr_resize": True,
                         "annotations": "**/test/annos/{stem}.txt", "annotation_encoding": "gbk"}},
}


def _downloads(root: Path) -> dict:
    """Fake ``resources/datasets`` with every dataset of :data:`DATASETS`; returns the Real-CE boxes."""
    _stablesr_like(_downloaded(root / "realsr"), "RealSRVal_crop128", ["astronaut", "chelsea"])
    _stablesr_like(_downloaded(root / "drealsr"), "DrealSRVal_crop128", ["coffee", "rocket"],
                   lr_name=lambda s: f"{s}_x4")  # LR named <stem>_x4: matched through lr_stem
    for name in ("china", "flower"):
        _save(_photo(name, 128), _downloaded(root / "div2k_val") / "DIV2K_valid_HR" / f"{name}.png")
    for number, name in enumerate(("motorcycle_left", "coffee"), start=1):
        _save(_photo(name, 128), _downloaded(root / "lsdir") / "shard-00" / f"000000{number}.png")
    return {"realce_boxes": _realce_like(_downloaded(root / "realce"))}


def _config(tmp: Path) -> dict:
    """config/paper.yaml with these datasets, config/ci.yaml's degradation and a bicubic-only evaluation."""
    cfg = yaml.safe_load((REPO_ROOT / "config" / "paper.yaml").read_text())
    ci = yaml.safe_load((REPO_ROOT / "config" / "ci.yaml").read_text())
    cfg["data"]["datasets"] = copy.deepcopy(DATASETS)
    cfg["degrade"] = {**ci["degrade"], "workers": 1}
    cfg["tracking"]["uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg["evaluate"] = {"methods": ["bicubic"], "crop_border": 4, "metrics": ["psnr_y"], "ocr": True,
                       "figure_pairs": 1, "test_sets": TEST_SETS}
    return validate(cfg, "test config")


class StageRun:
    """What the evaluation logs to its MLflow stage run, kept in memory (MLflow is tested elsewhere)."""

    def __init__(self):
        self.metrics, self.tags, self.artifacts = {}, {}, []

    def log_metrics(self, metrics):
        self.metrics.update(metrics)

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_artifact(self, path, name=None):
        self.artifacts.append(Path(path))


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper")
    cfg = _config(tmp)
    facts = _downloads(tmp / "datasets")
    data = tmp / "data"
    manifest = assemble_paper_dataset(cfg["data"], data, tmp / "datasets")
    pairs_csv = synthesize_pairs(manifest, tmp / "pairs", cfg["degrade"], cfg["seed"], workers=1)
    tables = tmp / "results" / "tables"
    tables.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp / "empty-torch-home"))
        summary = ev.evaluate(cfg, pairs_csv, tables, tmp / "results" / "metrics.json", StageRun(), data_dir=data)
    return {"cfg": cfg, "tmp": tmp, "data": data, "manifest": manifest, "pairs_csv": pairs_csv,
            "tables": tables, "summary": summary, **facts}


# --- the data stage ----------------------------------------------------------------------------


def test_real_pairs_bypass_the_manifest_and_synthetic_sets_are_degraded(paper):
    manifest = read_manifest(paper["manifest"])
    # one LSDIR image held out as the trainers' validation split: the one whose id hashes lowest
    lsdir = {r["id"]: r["split"] for r in manifest if r["source"] == "lsdir"}
    held = min(lsdir, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
    assert lsdir == {i: "val" if i == held else "train" for i in ("lsdir-shard-00__0000001", "lsdir-shard-00__0000002")}
    assert {r["id"] for r in manifest if r["source"] == "div2k_val"} == {
        "div2k_val-DIV2K_valid_HR__china", "div2k_val-DIV2K_valid_HR__flower"}
    assert {r["split"] for r in manifest if r["source"] == "div2k_val"} == {"test"}
    real = verify_manifest(paper["data"] / REAL_PAIRS_FILE)  # every LR/HR exists with its sha256
    assert sorted((r["source"], r["pair_id"], r["kind"]) for r in real) == [
        ("drealsr", "drealsr-coffee", "photo"), ("drealsr", "drealsr-rocket", "photo"),
        ("realce", "realce-sign_001", "text"),
        ("realsr", "realsr-astronaut", "photo"), ("realsr", "realsr-chelsea", "photo")]
    pairs = read_manifest(paper["pairs_csv"])  # the degrade stage saw only the manifest
    assert sorted(r["source_id"] for r in pairs if r["split"] == "test") == sorted(
        r["id"] for r in manifest if r["split"] == "test")
    for row in real:
        with Image.open(paper["data"] / row["hr_path"]) as hr, Image.open(paper["data"] / row["lr_path"]) as lr:
            assert hr.size == (lr.width * SCALE, lr.height * SCALE) == (row["width"], row["height"])


def test_stablesr_pairs_are_the_downloaded_files_untouched(paper):
    rows = {r["pair_id"]: r for r in read_manifest(paper["data"] / REAL_PAIRS_FILE)}
    datasets = paper["tmp"] / "datasets"
    assert (paper["data"] / rows["realsr-astronaut"]["lr_path"]).resolve() == \
        (datasets / "realsr" / "RealSRVal_crop128" / "test_LR" / "astronaut.png").resolve()
    assert (paper["data"] / rows["drealsr-rocket"]["lr_path"]).resolve() == \
        (datasets / "drealsr" / "DrealSRVal_crop128" / "test_LR" / "rocket_x4.png").resolve()


def test_realce_lr_is_the_13mm_image_resized_as_real_ce_does(paper):
    row = next(r for r in read_manifest(paper["data"] / REAL_PAIRS_FILE) if r["source"] == "realce")
    base = paper["tmp"] / "datasets" / "realce" / "Real-CE" / "test"
    hr52 = np.asarray(Image.open(base / "52mm" / "sign_001.png"))
    lr13 = np.asarray(Image.open(base / "13mm" / "sign_001.png"))
    height, width = hr52.shape[0] // SCALE, hr52.shape[1] // SCALE
    expected_lr = cv2.resize(lr13, (width, height), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(np.asarray(Image.open(paper["data"] / row["lr_path"])), expected_lr)
    assert np.array_equal(np.asarray(Image.open(paper["data"] / row["hr_path"])),
                          hr52[:height * SCALE, :width * SCALE])
    lines = json.loads(row["lines"])
    assert [line["text"] for line in lines] == REALCE_LINES  # '###' skipped
    boxes = [[x0, y0, min(x1, width * SCALE), y1] for x0, y0, x1, y1 in paper["realce_boxes"]]
    assert [line["box"] for line in lines] == boxes and all(line["lang"] == "en" for line in lines)
    assert row["lang"] == "en" and row["width"] == 256


# --- the evaluation ----------------------------------------------------------------------------


def _bicubic_psnr_y(lr_path: Path, hr_path: Path, border: int = 4) -> float:
    """PSNR on Y (BT.601, as MATLAB's rgb2ycbcr) of the 8-bit bicubic ×4 output, computed here.
    The MSE is taken in [0, 1] units plus 1e-8, pyiqa's guard against log(0) (~1e-4 dB here)."""
    lr = torch.from_numpy(np.asarray(Image.open(lr_path).convert("RGB"), dtype=np.float32) / 255)
    up = torch.nn.functional.interpolate(lr.permute(2, 0, 1)[None], scale_factor=SCALE, mode="bicubic",
                                         align_corners=False)
    sr = (up[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.float64)
    hr = np.asarray(Image.open(hr_path).convert("RGB"), dtype=np.float64)

    def y(rgb):
        return (16 + rgb @ np.array([65.481, 128.553, 24.966]) / 255)[border:-border, border:-border] / 255

    return float(-10 * np.log10(np.mean((y(sr) - y(hr)) ** 2) + 1e-8))


def test_one_block_per_test_set_with_psnr_equal_to_an_independent_computation(paper):
    summary, data = paper["summary"], paper["data"]
    assert list(summary["subsets"]) == TEST_SETS  # evaluate.test_sets order; no mini 'all'/'photo'/'text'
    assert summary["test_sets"] == {"realsr": "paired", "drealsr": "paired", "div2k_val": "synthetic",
                                    "realce": "paired"}
    real = read_manifest(data / REAL_PAIRS_FILE)
    synthetic = [r for r in read_manifest(paper["pairs_csv"]) if r["split"] == "test"]
    expected = {name: [_bicubic_psnr_y(data / r["lr_path"], data / r["hr_path"]) for r in real
                       if r["source"] == name] for name in ("realsr", "drealsr", "realce")}
    expected["div2k_val"] = [_bicubic_psnr_y(paper["pairs_csv"].parent / r["lr_path"],
                                             paper["pairs_csv"].parent / r["hr_path"]) for r in synthetic]
    for name, values in expected.items():
        block = summary["subsets"][name]["bicubic"]
        assert block["n"] == len(values) == {"realsr": 2, "drealsr": 2, "div2k_val": 2, "realce": 1}[name]
        assert block["psnr_y"] == pytest.approx(float(np.mean(values)), abs=1e-6), name
    # the synthetic LR is degraded (much worse than a clean bicubic ÷4 of the same kind of crop)
    assert summary["subsets"]["div2k_val"]["bicubic"]["psnr_y"] < summary["subsets"]["realsr"]["bicubic"]["psnr_y"]


def test_tables_and_flat_metrics_carry_every_test_set(paper):
    tables, summary = paper["tables"], paper["summary"]
    for name in TEST_SETS:
        text = (tables / f"table2_{name}.md").read_text()
        assert f"Image quality — paper-test / {name}" in text and "| bicubic |" in text
        note = "Real LR/HR pairs" if summary["test_sets"][name] == "paired" else "Real-ESRGAN second-order"
        assert note in text
    assert not (tables / "table2_all.md").exists()
    flat = ev.flat_metrics(summary)
    assert flat["realsr.bicubic.psnr_y"] == pytest.approx(summary["subsets"]["realsr"]["bicubic"]["psnr_y"])
    runs = {(method, subset): metrics for method, subset, metrics in ev.comparison_runs(summary)}
    assert {s for _, s in runs} == set(TEST_SETS)
    assert all(runs[("bicubic", s)]["steps"] == 0 for s in TEST_SETS)  # complexity on every block (no 'all')
    figures = [p.name.removeprefix("compare_") for p in (tables / "figures").glob("compare_*.png")]
    assert sorted(f.split("-")[0] for f in figures) == sorted(TEST_SETS)  # the hardest pair of each set


@pytest.mark.skipif(ocr.unavailable_reason(["en"]) is not None, reason="tesseract-ocr is not installed")
def test_realce_lines_are_read_one_by_one(paper):
    summary = paper["summary"]
    assert summary["ocr"]["status"] == "available" and summary["ocr"]["subsets"] == ["realce"]
    rows = summary["ocr"]["rows"]
    assert list(rows) == ["HR", "bicubic"] and rows["HR"]["n"] == rows["bicubic"]["n"] == len(REALCE_LINES)
    assert rows["HR"]["acc"] == 1.0 and rows["bicubic"]["ned"] < rows["HR"]["ned"]
    bins = {str(ev.text_size_bin(min(x1 - x0, y1 - y0))) for x0, y0, x1, y1 in paper["realce_boxes"]}
    assert set(rows["HR"]["by_size"]) == bins
    text_table = (paper["tables"] / "table3_text.md").read_text()
    assert "Text legibility — paper-test / realce" in text_table and "Annotated scene-text lines" in text_table
    runs = {(method, subset): metrics for method, subset, metrics in ev.comparison_runs(summary)}
    assert runs[("HR", "realce")]["ocr_acc"] == 1.0 and "ocr_acc" not in runs[("bicubic", "realsr")]
    per_image = (paper["tables"] / "per_image.csv").read_text().splitlines()
    assert sum(",text_line," in line for line in per_image) == 2 * len(REALCE_LINES)  # bicubic + HR


def test_a_test_set_without_pairs_is_named(paper, tmp_path):
    cfg = copy.deepcopy(paper["cfg"])
    cfg["evaluate"]["test_sets"] = ["realsr", "urban100"]
    with pytest.raises(ValueError, match=r"evaluate.test_sets: no test pairs for \['urban100'\]"):
        ev.load_test_pairs(cfg, paper["pairs_csv"], paper["data"])
    shutil.copy(paper["manifest"], tmp_path / "manifest.csv")  # a data folder from before real pairs
    with pytest.raises(FileNotFoundError, match="real_pairs.csv is missing: run the 'data' stage"):
        ev.load_test_pairs(cfg, paper["pairs_csv"], tmp_path)


# --- layout errors -----------------------------------------------------------------------------


def _assemble(tmp: Path, name: str, spec: dict) -> Path:
    return assemble_paper_dataset({"datasets": {name: {"role": "test", "pairing": "paired", "archives": [], **spec}}},
                                  tmp / "data", tmp / "datasets")


def test_pairs_without_partner_are_listed(tmp_path):
    root = _downloaded(tmp_path / "datasets" / "realsr")
    _stablesr_like(root, "RealSRVal_crop128", ["astronaut", "chelsea"])
    (root / "RealSRVal_crop128" / "test_HR" / "chelsea.png").rename(root / "RealSRVal_crop128" / "test_HR" / "chelsea2.png")
    spec = {"pairs": {"lr": "**/test_LR/*", "hr": "**/test_HR/*", "scale": SCALE}}
    with pytest.raises(DatasetLayoutError, match=(
            r"data.datasets.realsr.pairs: LR and HR are matched by file stem; 1 LR image\(s\) without an HR "
            r"partner: RealSRVal_crop128/test_LR/chelsea.png; 1 HR image\(s\) without an LR partner: "
            r"RealSRVal_crop128/test_HR/chelsea2.png")):
        _assemble(tmp_path, "realsr", spec)
    with pytest.raises(DatasetLayoutError, match=r"data.datasets.realsr.pairs.lr: '\*\*/LR/\*' matches no image"):
        _assemble(tmp_path, "realsr", {"pairs": {**spec["pairs"], "lr": "**/LR/*"}})


def test_a_pair_at_the_wrong_scale_names_the_file(tmp_path):
    root = _downloaded(tmp_path / "datasets" / "drealsr")
    _stablesr_like(root, "DrealSRVal_crop128", ["astronaut", "grace_hopper"])
    _save(_photo("grace_hopper", 100), root / "DrealSRVal_crop128" / "test_HR" / "grace_hopper.png")
    with pytest.raises(DatasetLayoutError, match=(
            r"data.datasets.drealsr.pairs.scale: every HR must be 4× its LR .*1 pair\(s\) are not: "
            r"DrealSRVal_crop128/test_HR/grace_hopper.png is 100×100, its LR DrealSRVal_crop128/test_LR/grace_hopper.png 24×24")):
        _assemble(tmp_path, "drealsr", {"pairs": {"lr": "**/test_LR/*", "hr": "**/test_HR/*", "scale": SCALE}})


def test_a_missing_annotation_file_is_named(tmp_path):
    _realce_like(_downloaded(tmp_path / "datasets" / "realce"))
    spec = copy.deepcopy(DATASETS["realce"])
    spec["pairs"]["annotations"] = "**/test/labels/{stem}.txt"
    with pytest.raises(DatasetLayoutError, match=r"data.datasets.realce.pairs.annotations: no file for image 'sign_001'"):
        _assemble(tmp_path, "realce", spec)


def test_annotations_keep_commas_skip_illegible_and_detect_chinese(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("1,2,50,2,50,20,1,20,Hello, world\n0,0,9,0,9,9,0,9,###\n"
                     "10,30,90,30,90,60,10,60,中文招牌\n-5,-5,500,-5,500,70,-5,70,edge\n".encode("gbk"))
    lines = read_annotations(path, "gbk", (80, 64))
    assert [(line["text"], line["lang"], line["box"], line["px"]) for line in lines] == [
        ("Hello, world", "en", [1, 2, 50, 20], 18), ("中文招牌", "zh", [10, 30, 80, 60], 30),
        ("edge", "en", [0, 0, 80, 64], 64)]
    path.write_text("1,2,3,text\n")
    with pytest.raises(DatasetLayoutError, match=r"a.txt, line 1: expected 'x1,y1,x2,y2,x3,y3,x4,y4,text'"):
        read_annotations(path, "utf-8", (80, 64))


def test_image_ids_are_file_names():
    assert image_id("lsdir", "0001000/0000001") == "lsdir-0001000__0000001"
    assert image_id("urban100", "x/img 001(1)") == "urban100-x__img_001_1_"


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["realsr"].pop("pairs"), "data.datasets.realsr.pairs: required when pairing is 'paired'"),
    (lambda d: d["div2k_val"].__setitem__("pairs", d["realsr"]["pairs"]),
     "data.datasets.div2k_val.pairs: only read when pairing is 'paired'"),
    (lambda d: d["lsdir"].update(pairing="paired", pairs=d["realsr"]["pairs"]),
     "data.datasets.lsdir.pairing: 'paired' is for test sets"),
    (lambda d: d["realsr"]["pairs"].__setitem__("scale", 2),
     r"data.datasets.realsr.pairs.scale: 2 differs from degrade.scale \(4\)"),
    (lambda d: d["realce"]["pairs"].__setitem__("annotations", "annos/x.txt"),
     "data.datasets.realce.pairs.annotations: 'annos/x.txt' has no '{stem}' placeholder"),
    (lambda d: d["realsr"]["pairs"].__setitem__("hr", "../elsewhere/*"),
     "data.datasets.realsr.pairs.hr: '../elsewhere/\\*' must be relative"),
    (lambda d: d["drealsr"]["pairs"].__setitem__("lr_stem", ["(", ""]),
     r"data.datasets.drealsr.pairs.lr_stem: '\(' is not a regular expression"),
    (lambda d: d["realsr"]["pairs"].__setitem__("lr_glob", "x"), "data.datasets.realsr.pairs.lr_glob: unknown key"),
    (lambda d: d["realsr"].__setitem__("pairing", "real"), "data.datasets.realsr.pairing: 'real' is not one of"),
    (lambda d: d["lsdir"].pop("val_images"), "data.datasets.lsdir.val_images: the training stages validate on"),
    (lambda d: d["realsr"].__setitem__("val_images", 2), "data.datasets.realsr.val_images: holds out validation"),
])
def test_config_errors_name_the_key(tmp_path, edit, message):
    cfg = _config(tmp_path)
    edit(cfg["data"]["datasets"])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, "c.yaml")


def test_the_paper_config_declares_real_and_synthetic_test_sets():
    cfg = validate(yaml.safe_load((REPO_ROOT / "config" / "paper.yaml").read_text()))
    pairing = {n: s.get("pairing", "synthetic") for n, s in cfg["data"]["datasets"].items() if s["role"] == "test"}
    assert pairing == {"div2k_val": "synthetic", "realsr": "paired", "drealsr": "paired", "realce": "paired",
                       "urban100": "synthetic"}
    assert cfg["data"]["datasets"]["realce"]["pairs"]["annotations"].endswith("{stem}.txt")
