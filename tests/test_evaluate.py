"""The evaluation stage end to end on a hand-built test split: bicubic, a restorer network and
external PNG folders scored by one protocol, tables and figures written, MLflow runs nested."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sample_photos import photo

from tvt import evaluate as ev
from tvt import reports, tracking
from tvt.data.manifest import read_manifest, sha256_file, write_manifest
from tvt.data.text_render import latin_fonts, render_text_line
from tvt.degradation import PAIR_COLUMNS
from tvt.metrics import ocr

TEXT_LINES = {16: "harbor 7KX-29Q", 24: "golden mirror"}
METHODS = ["bicubic", "sharp"]


class Sharpen(torch.nn.Module):
    """A stand-in restorer: bicubic ×4 then a fixed unsharp mask."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, padding_mode="replicate", groups=3, bias=False)
        kernel = -torch.full((3, 3), 1 / 9)
        kernel[1, 1] += 2
        self.conv.weight.data[:] = kernel

    def forward(self, lr):
        up = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
        return self.conv(up).clamp(0, 1)


def _save(image: Image.Image | np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)


def _build_split(root: Path) -> Path:
    """Two 128² photo crops and two rendered text lines (16, 24 px), LR by bicubic ÷4, plus a train pair."""
    images = {}
    for name in ("astronaut", "chelsea"):
        images[f"photo-{name}"] = ("photo", photo(name).crop((64, 64, 192, 192)), None)
    font = next(f for f in latin_fonts() if f.name == "DejaVu Sans")
    for px, text in TEXT_LINES.items():
        images[f"text-en-{px}px"] = ("text", render_text_line(text, font, px, 192), (text, px))
    rows = []
    for pair_id, (kind, hr, text) in images.items():
        hr_path, lr_path = root / "test" / "hr" / f"{pair_id}.png", root / "test" / "lr" / f"{pair_id}.png"
        _save(hr, hr_path)
        _save(hr.resize((hr.width // 4, hr.height // 4), Image.BICUBIC), lr_path)
        rows.append({"pair_id": pair_id, "source_id": pair_id, "split": "test", "kind": kind,
                     "hr_path": hr_path.relative_to(root).as_posix(), "lr_path": lr_path.relative_to(root).as_posix(),
                     "hr_sha256": sha256_file(hr_path), "lr_sha256": sha256_file(lr_path), "crop_x": 0, "crop_y": 0,
                     "text": text[0] if text else "", "text_px": text[1] if text else None,
                     "lang": "en" if text else "", "font": "DejaVu Sans" if text else "", "params": "{}"})
    rows.append({**rows[0], "pair_id": "photo-train", "split": "train"})  # must not be evaluated
    return write_manifest(rows, root / "pairs.csv", PAIR_COLUMNS)


def _test_rows(pairs: Path) -> list[dict]:
    return [r for r in read_manifest(pairs) if r["split"] == "test"]


def _external_folders(pairs: Path, dest: Path) -> dict[str, str]:
    """``bicubic_png``: the bicubic outputs as PNGs made elsewhere; ``oracle``: HR ± 1 grey level."""
    rng = np.random.default_rng(0)
    bicubic = ev.bicubic_method(4)
    for row in _test_rows(pairs):
        lr = ev.load_image(pairs.parent / row["lr_path"])
        _save(ev.to_uint8(bicubic.restore(lr, row["pair_id"])), dest / "bicubic_png" / f"{row['pair_id']}.png")
        hr = np.asarray(Image.open(pairs.parent / row["hr_path"])).astype(int)
        _save(np.clip(hr + rng.integers(-1, 2, hr.shape), 0, 255).astype(np.uint8),
              dest / "oracle" / f"{row['pair_id']}.png")
    return {"bicubic_png": str(dest / "bicubic_png"), "oracle": str(dest / "oracle")}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Run the stage once, inside a real MLflow stage run; yield what the tests inspect."""
    tmp = tmp_path_factory.mktemp("evaluate")
    pairs = _build_split(tmp / "pairs")
    cfg = {
        "mode": "mini", "seed": 1,
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "test-evaluate"},
        "degrade": {"scale": 4},
        "evaluate": {"methods": METHODS, "crop_border": 4, "metrics": ["psnr_y", "ssim_y", "niqe", "musiq"],
                     "external": _external_folders(pairs, tmp / "external"), "figure_pairs": 1},
    }
    (tmp / "resources" / "models" / "sharp").mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("TORCH_HOME", str(tmp / "empty-torch-home"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv(tracking.PIPELINE_ENV, raising=False)
        mp.setattr(ev, "trained_method", lambda name, model_dir, device: ev.restorer_method(name, Sharpen()))
        tables = tmp / "results" / "tables"
        tables.mkdir(parents=True)
        with tracking.stage_run("evaluate", cfg, "evaluate") as run:
            summary = ev.evaluate(cfg, pairs, tables, tmp / "results" / "metrics.json", run)
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=cfg["tracking"]["uri"])
        yield {"summary": summary, "tmp": tmp, "tables": tables, "run_id": run.run_id, "client": client,
               "experiment": client.get_experiment_by_name("test-evaluate").experiment_id}


# --- the summary (results/metrics.json) ----------------------------------------------------------


@pytest.mark.slow
def test_metrics_json_is_the_returned_summary(evaluated):
    on_disk = json.loads((evaluated["tmp"] / "results" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(evaluated["summary"]))
    assert on_disk["methods"] == [*METHODS, "bicubic_png", "oracle"]
    assert set(on_disk["subsets"]) == {"all", "photo", "text"}
    assert on_disk["subsets"]["all"]["bicubic"]["n"] == 4 and on_disk["subsets"]["photo"]["bicubic"]["n"] == 2


@pytest.mark.slow
def test_external_pngs_are_scored_exactly_like_a_method_run_here(evaluated):
    subsets = evaluated["summary"]["subsets"]
    for subset in subsets.values():
        assert subset["bicubic_png"] == subset["bicubic"]
    all_ = subsets["all"]
    assert all_["oracle"]["psnr_y"] > 45 and 15 < all_["bicubic"]["psnr_y"] < 25
    assert all_["sharp"]["psnr_y"] != pytest.approx(all_["bicubic"]["psnr_y"], abs=1e-3)


@pytest.mark.slow
def test_unavailable_and_not_applicable_metrics_are_never_numbers(evaluated):
    summary = evaluated["summary"]
    assert summary["unavailable"]["musiq"].startswith("unavailable (needs weights: ")
    assert not any("musiq" in values for s in summary["subsets"].values() for values in s.values())
    # NIQE needs 96-px blocks: photos (128²) only, text lines (32-48 px high) never
    assert summary["subsets"]["photo"]["bicubic"]["niqe"] > summary["subsets"]["photo"]["oracle"]["niqe"]
    assert "niqe" not in summary["subsets"]["text"]["bicubic"]


@pytest.mark.slow
def test_every_mean_has_a_bootstrap_interval_and_every_pair_a_paired_test(evaluated):
    summary = evaluated["summary"]
    statistics = summary["statistics"]
    assert statistics["resamples"] >= 1000 and statistics["seed"] == 1 and statistics["confidence"] == 0.95
    for subset, methods in summary["subsets"].items():
        block = statistics["subsets"][subset]
        assert block["items"] == methods["bicubic"]["n"]
        for method, values in methods.items():
            for key in ("psnr_y", "ssim_y"):
                low, high = block["metrics"][key]["intervals"][method]
                assert low <= values[key] <= high, (subset, method, key)
        assert len(block["metrics"]["psnr_y"]["comparisons"]) == len(methods) * (len(methods) - 1) // 2
    photo = statistics["subsets"]["photo"]["metrics"]
    assert set(photo["niqe"]["intervals"]) == set(summary["methods"])  # NIQE: photos only, still every method
    pairs = {frozenset((c["a"], c["b"])): c for c in statistics["subsets"]["all"]["metrics"]["psnr_y"]["comparisons"]}
    same = pairs[frozenset(("bicubic", "bicubic_png"))]  # the same outputs, scored twice
    assert same["diff"] == 0 and same["p"] == 1.0
    oracle = pairs[frozenset(("bicubic", "oracle"))]  # HR ± 1 grey level beats bicubic on every image
    assert (oracle["a"], oracle["b"]) == ("bicubic", "oracle")  # rows in method order: diff = bicubic − oracle
    assert oracle["diff"] < 0 and oracle["ci"][1] < 0 and oracle["p"] < 0.05
    md = (evaluated["tables"] / "table2_all.md").read_text()
    assert "**" in md and " ± " in md and "percentile-bootstrap interval over images" in md


@pytest.mark.slow
@pytest.mark.skipif(ocr.unavailable_reason(["en"]) is not None, reason="tesseract-ocr is not installed")
def test_ocr_rows_put_hr_first_and_split_by_text_size(evaluated):
    rows = evaluated["summary"]["ocr"]["rows"]
    assert list(rows) == ["HR", *METHODS, "bicubic_png", "oracle"]
    assert rows["HR"]["acc"] == 1.0 and rows["oracle"]["acc"] == 1.0
    assert set(rows["bicubic"]["by_size"]) == {"16", "24"} and rows["bicubic"]["by_size"]["16"]["n"] == 1
    assert rows["bicubic"]["ned"] < rows["HR"]["ned"]


@pytest.mark.slow
def test_complexity_counts_the_restorer_and_times_only_methods_run_here(evaluated):
    complexity = evaluated["summary"]["complexity"]
    assert complexity["bicubic"]["steps"] == 0 and complexity["bicubic"]["params_M"] == 0
    assert complexity["sharp"]["steps"] == 1 and complexity["sharp"]["params_M"] == pytest.approx(27e-6)
    assert complexity["sharp"]["latency_ms"] > 0
    assert complexity["oracle"] == {}


# --- tables, figures, plots --------------------------------------------------------------------


@pytest.mark.slow
def test_tables_figures_and_plots_are_written(evaluated):
    tables, tmp = evaluated["tables"], evaluated["tmp"]
    for stem in ("table2_all", "table2_photo", "table2_text", "table3_text", "table4_complexity"):
        assert all((tables / f"{stem}.{ext}").is_file() for ext in ("md", "csv", "json")), stem
    report = (tables / "metrics.md").read_text()
    assert report.count("| bicubic |") >= 4 and "| Metric | Kind | Better | Status |" in report
    assert "| MUSIQ | NR | ↑ | unavailable (needs weights:" in (tables / "metrics_status.md").read_text()
    per_image = list(csv.DictReader((tables / "per_image.csv").read_text().splitlines()))
    assert len(per_image) == 4 * 4 + 2  # four rows per pair, plus the HR reads of the two lines
    figures = sorted(p.name for p in (tables / "figures").iterdir())
    assert len([f for f in figures if f.startswith("compare_photo")]) == 1
    assert len([f for f in figures if f.startswith("compare_text")]) == 1
    assert "ocr_vs_text_px.png" in figures
    plot = (tmp / "results" / "plots" / "ocr_acc_vs_text_px.csv").read_text().splitlines()
    assert plot[0] == "text_px,HR,bicubic,sharp,bicubic_png,oracle" and [r.split(",")[0] for r in plot[1:]] == ["16", "24"]


def test_figure_pairs_are_where_methods_disagree_most():
    records = [{"method": m, "pair_id": p, "kind": "photo", "mse": mse}
               for p, errors in {"a": (0.01, 0.02), "b": (0.01, 0.09), "c": (0.05, 0.05)}.items()
               for m, mse in zip(("x", "y"), errors, strict=True)]
    assert ev.figure_pairs(records, ["x", "y"], "photo", 2) == ["b", "a"]
    assert ev.figure_pairs(records, ["x"], "photo", 1) == ["c"]  # one method: its hardest pair


def test_paper_subsets_follow_test_sets_and_mini_subsets_are_kinds():
    rows = [{"pair_id": "a", "kind": "photo", "source": "realsr"}, {"pair_id": "b", "kind": "text", "source": "realce"},
            {"pair_id": "c", "kind": "photo", "source": "div2k_val"}]
    assert list(ev.evaluation_subsets(rows)) == ["all", "photo", "text"]
    paper = ev.evaluation_subsets(rows, ["realce", "div2k_val", "realsr"])
    assert {name: [r["pair_id"] for r in subset] for name, subset in paper.items()} == {
        "realce": ["b"], "div2k_val": ["c"], "realsr": ["a"]}


def test_figure_pairs_of_any_kind_ignore_ocr_line_records():
    records = [{"method": m, "pair_id": p, "kind": kind, "mse": mse}
               for p, kind, errors in (("a", "photo", (0.01, 0.02)), ("b", "text", (0.01, 0.09)))
               for m, mse in zip(("x", "y"), errors, strict=True)]
    records.append({"method": "x", "pair_id": "b", "kind": "text_line", "line": 0, "ocr_acc": 1.0})
    assert ev.figure_pairs(records, ["x", "y"], None, 2) == ["b", "a"]
    assert ev.figure_pairs(records, ["x", "y"], "photo", 2) == ["a"]


def test_text_size_bins_are_lower_edges():
    assert [ev.text_size_bin(px) for px in (3, 8, 11, 31, 32, 500)] == [0, 8, 8, 24, 32, 128]


# --- MLflow ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stage_run_carries_every_number_and_the_artifacts(evaluated):
    client, summary = evaluated["client"], evaluated["summary"]
    run = client.get_run(evaluated["run_id"])
    assert run.data.metrics["all.bicubic.psnr_y"] == pytest.approx(summary["subsets"]["all"]["bicubic"]["psnr_y"])
    assert run.data.metrics["complexity.sharp.steps"] == 1
    low, high = summary["statistics"]["subsets"]["all"]["metrics"]["psnr_y"]["intervals"]["sharp"]
    assert run.data.metrics["all.sharp.psnr_y_ci_low"] == pytest.approx(low)
    assert run.data.metrics["all.sharp.psnr_y_ci_high"] == pytest.approx(high)
    assert 0 <= run.data.metrics["all.bicubic_vs_sharp.psnr_y_p"] <= 1
    if "ocr" in summary and summary["ocr"]["rows"]:
        assert run.data.metrics["ocr.HR.acc"] == 1.0 and "ocr.bicubic.acc_16px" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(evaluated["run_id"])}
    assert {"metrics.md", "table2_all.md", "figures", "metrics.json", "plots"} <= artifacts


@pytest.mark.slow
def test_one_nested_run_per_method_and_subset(evaluated):
    client, summary = evaluated["client"], evaluated["summary"]
    children = client.search_runs([evaluated["experiment"]], "tags.`tvt.kind` = 'evaluation'")
    keys = {(r.data.tags["tvt.method"], r.data.tags["tvt.subset"]) for r in children}
    expected = {(m, s) for m in summary["methods"] for s in summary["subsets"]}
    if summary["ocr"]["rows"]:
        expected.add(("HR", "text"))
    assert keys == expected and len(children) == len(expected)
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == evaluated["run_id"]
        assert child.data.tags["tvt.dataset"] == f"mini-test/{child.data.tags['tvt.subset']}"
    sharp_photo = next(r for r in children if r.data.tags["tvt.method"] == "sharp" and r.data.tags["tvt.subset"] == "photo")
    assert sharp_photo.data.metrics["psnr_y"] == pytest.approx(summary["subsets"]["photo"]["sharp"]["psnr_y"])
    low, _ = summary["statistics"]["subsets"]["photo"]["metrics"]["psnr_y"]["intervals"]["sharp"]
    assert sharp_photo.data.metrics["psnr_y_ci_low"] == pytest.approx(low)


# --- methods -------------------------------------------------------------------------------------


def test_methods_fail_with_the_path_they_need(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {"degrade": {"scale": 4}, "evaluate": {"methods": ["tvt"], "external": {"stablesr": str(tmp_path / "sr")}}}
    with pytest.raises(FileNotFoundError, match="no trained model at resources/models/tvt"):
        ev.build_method("tvt", cfg)
    stablesr = ev.build_method("stablesr", cfg)
    assert stablesr.steps is None and not stablesr.timed
    with pytest.raises(FileNotFoundError, match=r"external results 'stablesr': no .*sr/p1\.png"):
        stablesr.restore(torch.zeros(1, 3, 4, 4), "p1")
    with pytest.raises(ValueError, match=r"unique.*\['HR', 'tvt'\]"):
        ev.method_names({"evaluate": {"methods": ["tvt", "HR"], "external": {"tvt": "x"}}})


def test_an_output_of_the_wrong_size_names_the_method(tmp_path):
    pairs = _build_split(tmp_path)
    rows = _test_rows(pairs)[:1]
    wrong = ev.Method("half", lambda lr, pair_id: torch.zeros(1, 3, 2, 2))
    suite = ev.MetricSuite(["psnr_y"], crop_border=0)
    with pytest.raises(ValueError, match=r"half: output \(2, 2\)"):
        ev.score_method(wrong, rows, tmp_path, suite, tmp_path / "out", False, torch.device("cpu"))


@pytest.mark.slow
def test_the_prompt_of_every_method_run_here_is_recorded(evaluated):
    assert evaluated["summary"]["prompts"] == {"sharp": {"prompt": "null"}}  # bicubic and external: no prompt
    assert "Prompts: sharp: null." in (evaluated["tables"] / "table2_all.md").read_text()
    note = reports.prompt_note({"tvt": {"prompt": "tags", "tagger": "dape", "format": "<tags>, clean, 8k,"},
                                "osediff": {"prompt": "null"}})
    assert note == 'Prompts: tvt: dape tags, "<tags>, clean, 8k,"; osediff: null.'
