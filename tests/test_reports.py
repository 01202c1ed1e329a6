"""Paper-shaped tables (ranking marks, files) and figures from a hand-made evaluation summary."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import yaml

from tvt import config, reports
from tvt.config import REPO_ROOT
from tvt.stats import Mark

STATISTICS = {"interval": "percentile bootstrap over test items", "test": "paired bootstrap", "resamples": 2000,
              "confidence": 0.95, "seed": 1}


def _series(intervals: dict[str, tuple[float, float]], within_noise=()) -> dict:
    """A column's statistics: the given intervals; every pair significant (p = 0.001) except ``within_noise``."""
    rows, tied = list(intervals), [set(pair) for pair in within_noise]
    comparisons = [{"a": a, "b": b, "diff": 0.0, "ci": [0.0, 0.0], "p": 0.4 if {a, b} in tied else 0.001}
                   for i, a in enumerate(rows) for b in rows[i + 1:]]
    return {"intervals": {r: list(v) for r, v in intervals.items()}, "comparisons": comparisons}


def _around(values: dict[str, float], half: float) -> dict[str, tuple[float, float]]:
    return {k: (v - half, v + half) for k, v in values.items()}


PSNR = {"bicubic": 24.0, "osediff": 23.0, "tvt": 23.5, "tvt_t1": 22.0, "t2": 23.5, "s4": 21.0}
LPIPS = {"bicubic": 0.50, "osediff": 0.30, "tvt": 0.25, "tvt_t1": 0.40, "t2": 0.35, "s4": 0.28}


def _summary(**overrides) -> dict:
    summary = {
        "test_set": "mini-test", "crop_border": 4, "device": "cpu",
        "methods": ["bicubic", "osediff", "tvt", "tvt_t1", "t2", "s4"],
        "metrics": ["psnr_y", "lpips", "niqe", "musiq"],
        "unavailable": {"musiq": "unavailable (needs weights: musiq.pth)"},
        "subsets": {"all": {m: {"n": 4, "psnr_y": PSNR[m], "lpips": LPIPS[m]} for m in PSNR}},
        "ocr": {"status": "available", "engine": "tesseract 5.3.0", "rows": {
            "HR": {"n": 4, "acc": 1.0, "ned": 1.0, "char_acc": 1.0,
                   "by_size": {"16": {"n": 2, "acc": 1.0, "ned": 1.0, "char_acc": 1.0},
                               "24": {"n": 2, "acc": 1.0, "ned": 1.0, "char_acc": 1.0}}},
            "bicubic": {"n": 4, "acc": 0.25, "ned": 0.6, "char_acc": 0.55,
                        "by_size": {"16": {"n": 2, "acc": 0.0, "ned": 0.3, "char_acc": 0.2},
                                    "24": {"n": 2, "acc": 0.5, "ned": 0.9, "char_acc": 0.9}}},
            "tvt": {"n": 4, "acc": 0.75, "ned": 0.9, "char_acc": 0.9,
                    "by_size": {"16": {"n": 2, "acc": 0.5, "ned": 0.8, "char_acc": 0.8},
                                "24": {"n": 2, "acc": 1.0, "ned": 1.0, "char_acc": 1.0}}},
        }},
        "statistics": {**STATISTICS, "subsets": {"all": {"items": 4, "metrics": {
            "psnr_y": _series(_around(PSNR, 0.4), within_noise=[("tvt", "t2")]),
            "lpips": _series(_around(LPIPS, 0.02), within_noise=[("tvt", "s4")]),
        }}}, "ocr": {"items": 4, "metrics": {
            "acc": _series({"HR": (1.0, 1.0), "bicubic": (0.0, 0.5), "tvt": (0.5, 1.0)}),
            "ned": _series({"HR": (1.0, 1.0), "bicubic": (0.4, 0.8), "tvt": (0.8, 1.0)}, within_noise=[("tvt", "bicubic")]),
        }}},
        "complexity": {"bicubic": {"steps": 0, "params_M": 0.0, "latency_ms": 0.2},
                       "tvt": {"steps": 1, "params_M": 12.5, "latency_ms": 40.0}},
    }
    summary.update(overrides)
    return summary


def _row(table: reports.Table, method: str) -> dict:
    return next(r for r in table.rows if r["method"] == method)


def test_best_is_bold_only_when_significantly_better_than_every_other_row():
    (table,) = reports.image_quality_tables(_summary())
    assert [c.key for c in table.columns] == ["n", "psnr_y", "lpips"]  # musiq unavailable, niqe never measured
    marks = table.marks()
    assert marks[("bicubic", "psnr_y")] is Mark.BEST  # ↑: highest PSNR, separated from every row
    assert ("tvt", "psnr_y") not in marks and ("t2", "psnr_y") not in marks  # equal runners-up: no "second"
    assert marks[("tvt", "lpips")] is marks[("s4", "lpips")] is Mark.TIED  # ↓: lowest LPIPS, within noise of s4
    assert ("t2", "lpips") not in marks and not any(key == "n" for _, key in marks)
    md = table.markdown()
    assert "| bicubic | 4 | **24.00 ± 0.40** | 0.5000 ± 0.0200 |" in md
    assert "| tvt | 4 | 23.50 ± 0.40 | *0.2500 ± 0.0200* |" in md
    assert "| Method | n | PSNR ↑ | LPIPS ↓ |" in md
    assert "MUSIQ" in md and "NIQE (needs ≥ 96 px)" in md
    assert "95% percentile-bootstrap interval over images (2000 resamples, seed 1" in md
    assert "paired bootstrap of the difference of means over the same images, two-sided p < 0.05" in md


def test_a_significant_second_is_underlined():
    psnr = {**PSNR, "t2": 23.2}  # distinct runners-up, every pair separated
    summary = _summary(statistics={**STATISTICS, "subsets": {"all": {"items": 4, "metrics": {
        "psnr_y": _series(_around(psnr, 0.1))}}}})
    summary["subsets"]["all"]["t2"]["psnr_y"] = 23.2
    (table,) = reports.image_quality_tables(summary)
    assert {k: v for k, v in table.marks().items() if k[1] == "psnr_y"} == {
        ("bicubic", "psnr_y"): Mark.BEST, ("tvt", "psnr_y"): Mark.SECOND}
    assert "| tvt | 4 | <u>23.50 ± 0.10</u> | 0.2500 |" in table.markdown()  # LPIPS: no statistics, no mark


def test_without_statistics_means_carry_no_interval_and_no_mark():
    summary = _summary()
    del summary["statistics"]
    (table,) = reports.image_quality_tables(summary)
    assert table.marks() == {}
    assert "| bicubic | 4 | 24.00 | 0.5000 |" in table.markdown()
    assert "No per-item statistics in this summary" in table.markdown()


def test_set_level_metrics_are_shown_but_not_ranked():
    summary = _summary(metrics=["psnr_y", "lpips", "fid"], unavailable={})
    for method, values in summary["subsets"]["all"].items():
        values["fid"] = 30.0 + len(method)
    (table,) = reports.image_quality_tables(summary)
    assert not any(key == "fid" for _, key in table.marks())
    assert "| bicubic | 4 | **24.00 ± 0.40** | 0.5000 ± 0.0200 | 37.00 |" in table.markdown()
    assert "Not ranked (no per-item scores to test, e.g. one value per set): FID." in table.markdown()


def test_reference_rows_are_not_ranked_and_missing_values_show_a_dash():
    table = reports.text_table(_summary())
    assert [c.key for c in table.columns] == ["n", "acc", "ned", "char_acc", "acc_16px", "acc_24px"]
    marks = table.marks()
    assert ("HR", "acc") not in marks and marks[("tvt", "acc")] is Mark.BEST and ("bicubic", "acc") not in marks
    assert marks[("tvt", "ned")] is marks[("bicubic", "ned")] is Mark.TIED
    assert not any(key == "char_acc" for _, key in marks)  # no statistics for it: not ranked
    assert _row(table, "tvt")["acc_16px"] == 0.5
    assert "| HR | 4 | 1.0000 ± 0.0000 |" in table.markdown() and "over text lines" in table.markdown()
    assert reports.format_value("acc", None) == "–" and reports.format_value("psnr_y", float("nan")) == "–"
    assert reports.text_table(_summary(ocr={"status": "unavailable (needs tesseract-ocr)", "rows": {}})) is None


def test_tables_are_written_as_markdown_csv_and_json(tmp_path):
    (table,) = reports.image_quality_tables(_summary())
    table.write(tmp_path)
    rows = list(csv.DictReader((tmp_path / "table2_all.csv").read_text().splitlines()))
    assert list(rows[0]) == ["method", "n", "psnr_y", "psnr_y_pm", "lpips", "lpips_pm"]
    assert [r["method"] for r in rows] == _summary()["methods"]
    assert float(rows[2]["lpips"]) == 0.25 and float(rows[2]["psnr_y_pm"]) == pytest.approx(0.4)
    doc = json.loads((tmp_path / "table2_all.json").read_text())
    assert doc["columns"][1] == {"key": "psnr_y", "label": "PSNR", "higher_is_better": True}
    assert doc["rows"][0]["psnr_y"] == 24.0
    assert doc["intervals"]["tvt"]["psnr_y"] == [23.1, 23.9]
    assert doc["marks"]["bicubic"] == {"psnr_y": "best"} and doc["marks"]["s4"] == {"lpips": "tied"}
    assert (tmp_path / "table2_all.md").read_text() == table.markdown()


def test_ablation_tables_group_the_paper_variants_with_tvt():
    tables = {t.name: t for t in reports.ablation_tables(_summary())}
    assert set(tables) == {"ablation_transfer", "ablation_design"}
    assert [r["method"] for r in tables["ablation_transfer"].rows] == ["tvt_t1", "t2", "tvt"]
    assert [r["method"] for r in tables["ablation_design"].rows] == ["osediff", "s4", "tvt"]  # S1 = OSEDiff
    assert _row(tables["ablation_transfer"], "tvt")["ocr_acc"] == 0.75
    assert _row(tables["ablation_transfer"], "t2")["ocr_acc"] is None
    assert reports.ablation_tables(_summary(methods=["bicubic", "tvt"])) == []


def test_complexity_table_reads_paper_size_architecture_rows():
    rows = [{"name": "TVT restorer (E4 + CE-UNet + D4)", "params_M": 950.0, "gmacs": 1200.0, "attn_gmacs": 900.0}]
    table = reports.complexity_table(_summary(), rows)
    assert _row(table, "tvt") == {"method": "tvt", "steps": 1, "params_M": 12.5, "paper_params_M": 950.0,
                                  "paper_gmacs": 1200.0, "paper_attn_gmacs": 900.0, "paper_all_gmacs": 2100.0,
                                  "latency_ms": 40.0, "sd_latency_s:CPU, 2 threads": 29.0}
    assert _row(table, "bicubic")["paper_gmacs"] is None
    assert table.marks()[("bicubic", "latency_ms")] is Mark.BEST  # by value: no sampling noise to test


def test_plot_csv_is_wide_with_one_column_per_ocr_row(tmp_path):
    path = reports.write_plot_csv(_summary(), "acc", tmp_path / "plots" / "acc.csv")
    assert path.read_text().splitlines() == ["text_px,HR,bicubic,tvt", "16,1.0,0.0,0.5", "24,1.0,0.5,1.0"]


def test_ocr_figure_has_one_line_per_row():
    figure = reports.ocr_vs_size_figure(_summary())
    assert [len(ax.lines) for ax in figure.axes] == [3, 3]
    assert reports.ocr_vs_size_figure(_summary(ocr=None)) is None


def test_disagreement_box_finds_where_methods_differ():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    noisy = np.clip(hr.astype(int) + rng.integers(-8, 9, hr.shape), 0, 255).astype(np.uint8)
    broken = noisy.copy()
    broken[40:56, 8:24] = 0  # only this method fails, only here
    x, y, w, h = reports.disagreement_box([noisy, broken], hr, (16, 16))
    assert (w, h) == (16, 16) and abs(x - 8) <= 4 and abs(y - 40) <= 4
    # with one method: where its own error is largest
    x, y, _, _ = reports.disagreement_box([broken], hr, (16, 16))
    assert abs(x - 8) <= 4 and abs(y - 40) <= 4
    assert reports.zoom_size(32, 192) == (32, 64) and reports.zoom_size(96, 96) == (32, 32)


def test_comparison_figure_renders_every_panel_and_its_zoom():
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    figure = reports.comparison_figure("pair", [("LR", image), ("bicubic", image), ("HR", image)], (4, 8, 16, 16))
    assert len(figure.axes) == 6
    assert [ax.get_title() for ax in figure.axes[:3]] == ["LR", "bicubic", "HR"]
    assert figure.axes[3].images[0].get_array().shape[:2] == (16, 16)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("value", [True, "0.5"])
def test_non_numbers_are_not_ranked(value):
    table = reports.Table("t", "t", [reports.Column("x", "x", True, noise="exact")],
                          [{"method": "a", "x": value}, {"method": "b", "x": 1.0}, {"method": "c", "x": 0.5},
                           {"method": "d", "x": 0.25}])
    assert table.marks() == {("b", "x"): Mark.BEST, ("c", "x"): Mark.SECOND}


# --- published values beside ours ---------------------------------------------------------------


def _paper_mode_summary(config_name: str = "paper.yaml") -> dict:
    """What the evaluation of a paper-mode config writes, with made-up numbers: its methods, test sets, metrics."""
    cfg = config.load(REPO_ROOT / "config" / config_name)
    ev, datasets = cfg["evaluate"], cfg["data"]["datasets"]
    rng = np.random.default_rng(0)
    return {
        "test_set": "paper-test", "crop_border": 4, "device": "cuda", "methods": ev["methods"],
        "metrics": ev["metrics"], "unavailable": {},
        "test_sets": {name: datasets[name].get("pairing", "synthetic") for name in ev["test_sets"]},
        "subsets": {name: {m: {"n": 100, **{k: float(rng.random()) for k in ev["metrics"]}} for m in ev["methods"]}
                    for name in ev["test_sets"]},
        "complexity": {m: {"steps": 1, "params_M": 1.0, "latency_ms": 10.0} for m in ev["methods"]},
        "statistics": STATISTICS,
    }


def test_every_published_value_lands_on_a_cell_of_the_paper_mode_tables():
    values = reports.load_paper_results()
    assert len(values) >= 50 and all(v.url.startswith("https://") and v.citation for v in values)
    # the ablation tables' published FLOPs land on config/paper-ablations.yaml's tables (paper.yaml's and more)
    arch = [{"name": n, "params_M": 1.0, "gmacs": 1.0, "attn_gmacs": 1.0} for n in set(reports.ARCHITECTURES.values())]
    tables = {t.name: t for t in reports.build_tables(_paper_mode_summary("paper-ablations.yaml"), arch)}
    for v in values:
        assert v.table in tables, f"{v.source} {v.block}: no table {v.table!r} in paper mode"
        table = tables[v.table]
        assert any(r["method"] == v.method for r in table.rows), f"{v.table}: no row {v.method!r}"
        assert v.key in {c.key for c in table.columns}, f"{v.table}: no column {v.key!r}"
        assert table.paper[(v.method, v.key)] == v


def test_paper_mode_shows_published_values_and_deltas(tmp_path):
    summary = _paper_mode_summary()
    summary["subsets"]["realsr"]["osediff"]["psnr_y"] = 26.0
    summary["subsets"]["realsr"]["stablesr"]["niqe"] = 5.0
    tables = {t.name: t for t in reports.build_tables(summary)}
    realsr = tables["table2_realsr"]
    md = realsr.markdown()
    paper_rows = [line for line in md.splitlines() if line.startswith(f"| {reports.PAPER_ROW} |")]
    # under osediff, stablesr and the authors' weights of both; bicubic and tvt are not in the published table
    assert len(paper_rows) == 4
    assert "| 25.15 (Δ +0.85) |" in paper_rows[0]
    assert "5.912 (Δ −0.912)" in paper_rows[1]
    official = realsr.paper[("osediff_official", "psnr_y")]
    assert official is realsr.paper[("osediff", "psnr_y")] and official.published_row == "OSEDiff-s1"
    assert ("tvt_official", "psnr_y") not in realsr.paper  # no readable TVT table
    assert "published values; Δ = ours − published." in md and "asserts/tab_main.png" in md
    realsr.write(tmp_path)
    row = next(r for r in csv.DictReader((tmp_path / "table2_realsr.csv").read_text().splitlines())
               if r["method"] == "osediff")
    assert float(row["psnr_y_paper"]) == 25.15 and float(row["psnr_y_delta"]) == pytest.approx(0.85)
    assert tables["table4_complexity"].paper[("stablesr", "latency_ms")].value == pytest.approx(11500.0)  # s -> ms


def _mini_with_baselines(psnr: dict, psnr_noise=(), lpips: dict | None = None) -> dict:
    lpips = lpips or {"osediff": 0.30, "stablesr": 0.32}
    subset = {m: {"n": 8, "psnr_y": psnr[m], "lpips": lpips[m]} for m in psnr}
    return {
        "test_set": "mini-test", "crop_border": 4, "device": "cpu", "methods": list(psnr),
        "metrics": ["psnr_y", "lpips"], "unavailable": {}, "subsets": {"all": subset, "photo": subset},
        "complexity": {"osediff": {"steps": 1, "latency_ms": 900.0}, "stablesr": {"steps": 200, "latency_ms": 500.0}},
        "statistics": {**STATISTICS, "subsets": {s: {"items": 8, "metrics": {
            "psnr_y": _series(_around(psnr, 0.2), within_noise=psnr_noise),
            "lpips": _series(_around(lpips, 0.01), within_noise=[("osediff", "stablesr")])}} for s in ("all", "photo")}},
    }


def test_mini_mode_compares_the_published_orderings_not_values():
    tables = {t.name: t for t in reports.build_tables(_mini_with_baselines({"osediff": 14.0, "stablesr": 13.0}))}
    assert not tables["table2_photo"].paper  # the published test sets are not ours
    complexity = tables["table4_complexity"].markdown()
    assert f"| {reports.PAPER_ROW} | 200 |" in complexity and "Δ" not in complexity.split("\n\n")[0]
    agreement = tables["paper_agreement"]
    rows = {(r["method"], r["published"].split(":")[0]): r for r in agreement.rows}
    # published PSNR: OSEDiff above StableSR on RealSR and DIV2K-Val, below on DRealSR; ours: above (significant)
    assert rows[("PSNR ↑", "RealSR")]["ordering"] == "agree"
    assert rows[("PSNR ↑", "DrealSR")]["ordering"] == "disagree"
    assert rows[("PSNR ↑", "DrealSR")]["published"] == "DrealSR: stablesr 28.03 ≻ osediff 27.92"
    assert rows[("PSNR ↑", "DrealSR")]["ours"] == "table2_photo: osediff 14.00 ≻ stablesr 13.00"
    # LPIPS: published OSEDiff better everywhere, ours too but within noise
    assert {r["ordering"] for (metric, _), r in rows.items() if metric == "LPIPS ↓"} == {"agree (n.s.)"}
    assert rows[("Steps ↓", "all methods")]["ordering"] == "agree"  # exact values: no test needed
    assert rows[("Latency, evaluated model, cpu (ms/img) ↓", "all methods")]["ordering"] == "disagree (untested)"
    with pytest.raises(ValueError, match="noise 'noisy' is not sampled, exact or measured"):
        reports.Column("x", "x", True, noise="noisy")
    assert "Mini mode" in agreement.markdown() and "| Metric | Published | Ours | Ordering |" in agreement.markdown()


def test_a_disagreement_within_noise_is_marked_not_significant():
    summary = _mini_with_baselines({"osediff": 14.0, "stablesr": 13.0}, psnr_noise=[("osediff", "stablesr")])
    agreement = next(t for t in reports.build_tables(summary) if t.name == "paper_agreement")
    verdicts = {r["published"].split(":")[0]: r["ordering"] for r in agreement.rows if r["method"] == "PSNR ↑"}
    assert verdicts == {"DIV2K-Val": "agree (n.s.)", "DrealSR": "disagree (n.s.)", "RealSR": "agree (n.s.)"}


def test_published_values_must_name_their_row_column_and_source(tmp_path):
    block = {"source": "s", "block": "RealSR", "table": "table2_realsr", "rows": {"osediff": "OSEDiff-s1"},
             "columns": {"psnr_y": "PSNR"}, "values": {"osediff": {"psnr_y": 25.15}}}
    source = {"citation": "Wu et al. 2024", "table": "Table 1", "url": "https://example.org/t1.png"}

    def load(**changes):
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump({"sources": {"s": source}, "blocks": [{**block, **changes}]}))
        return reports.load_paper_results(path)

    (value,) = load()
    assert (value.table, value.method, value.key, value.value, value.published_row) == (
        "table2_realsr", "osediff", "psnr_y", 25.15, "OSEDiff-s1")
    with pytest.raises(ValueError, match="column 'ssim_y' of row 'osediff' has no published header"):
        load(values={"osediff": {"psnr_y": 25.15, "ssim_y": 0.73}})
    with pytest.raises(ValueError, match="row 'tvt' has no published row label"):
        load(values={"tvt": {"psnr_y": 25.0}})
    with pytest.raises(ValueError, match="unknown source 'other'"):
        load(source="other")
    with pytest.raises(ValueError, match="is not a number"):
        load(values={"osediff": {"psnr_y": "25.15"}})
    assert load(scale={"psnr_y": 10})[0].value == pytest.approx(251.5)
