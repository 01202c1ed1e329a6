"""Paper-shaped tables (ranking marks, files) and figures from a hand-made evaluation summary."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from tvt import reports


def _summary(**overrides) -> dict:
    summary = {
        "test_set": "mini-test", "crop_border": 4, "device": "cpu",
        "methods": ["bicubic", "osediff", "tvt", "tvt_t1", "t2", "s4"],
        "metrics": ["psnr_y", "lpips", "niqe", "musiq"],
        "unavailable": {"musiq": "unavailable (needs weights: musiq.pth)"},
        "subsets": {
            "all": {
                "bicubic": {"n": 4, "psnr_y": 24.0, "lpips": 0.50},
                "osediff": {"n": 4, "psnr_y": 23.0, "lpips": 0.30},
                "tvt": {"n": 4, "psnr_y": 23.5, "lpips": 0.25},
                "tvt_t1": {"n": 4, "psnr_y": 22.0, "lpips": 0.40},
                "t2": {"n": 4, "psnr_y": 23.5, "lpips": 0.35},
                "s4": {"n": 4, "psnr_y": 21.0, "lpips": 0.28},
            },
        },
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
        "complexity": {"bicubic": {"steps": 0, "params_M": 0.0, "latency_ms": 0.2},
                       "tvt": {"steps": 1, "params_M": 12.5, "latency_ms": 40.0}},
    }
    summary.update(overrides)
    return summary


def _row(table: reports.Table, method: str) -> dict:
    return next(r for r in table.rows if r["method"] == method)


def test_best_is_bold_and_second_underlined_in_each_metric_direction():
    (table,) = reports.image_quality_tables(_summary())
    assert [c.key for c in table.columns] == ["n", "psnr_y", "lpips"]  # musiq unavailable, niqe never measured
    ranks = table.ranks()
    assert ranks[("bicubic", "psnr_y")] == 1  # ↑: highest PSNR
    assert ranks[("tvt", "psnr_y")] == ranks[("t2", "psnr_y")] == 2  # a tie shares the mark
    assert ranks[("tvt", "lpips")] == 1 and ranks[("s4", "lpips")] == 2  # ↓: lowest LPIPS
    assert ("osediff", "psnr_y") not in ranks and not any(key == "n" for _, key in ranks)
    md = table.markdown()
    assert "| bicubic | 4 | **24.00** | 0.5000 |" in md
    assert "| tvt | 4 | <u>23.50</u> | **0.2500** |" in md
    assert "| Method | n | PSNR ↑ | LPIPS ↓ |" in md
    assert "MUSIQ" in md and "NIQE (needs ≥ 96 px)" in md


def test_reference_rows_are_not_ranked_and_missing_values_show_a_dash():
    table = reports.text_table(_summary())
    assert [c.key for c in table.columns] == ["n", "acc", "ned", "char_acc", "acc_16px", "acc_24px"]
    ranks = table.ranks()
    assert ("HR", "acc") not in ranks and ranks[("tvt", "acc")] == 1 and ranks[("bicubic", "acc")] == 2
    assert _row(table, "tvt")["acc_16px"] == 0.5
    assert reports.format_value("acc", None) == "–" and reports.format_value("psnr_y", float("nan")) == "–"
    assert reports.text_table(_summary(ocr={"status": "unavailable (needs tesseract-ocr)", "rows": {}})) is None


def test_tables_are_written_as_markdown_csv_and_json(tmp_path):
    (table,) = reports.image_quality_tables(_summary())
    table.write(tmp_path)
    rows = list(csv.DictReader((tmp_path / "table2_all.csv").read_text().splitlines()))
    assert [r["method"] for r in rows] == _summary()["methods"]
    assert float(rows[2]["lpips"]) == 0.25
    doc = json.loads((tmp_path / "table2_all.json").read_text())
    assert doc["columns"][1] == {"key": "psnr_y", "label": "PSNR", "higher_is_better": True}
    assert doc["rows"][0]["psnr_y"] == 24.0
    assert (tmp_path / "table2_all.md").read_text() == table.markdown()


def test_ablation_tables_group_the_paper_variants_with_tvt():
    tables = {t.name: t for t in reports.ablation_tables(_summary())}
    assert set(tables) == {"ablation_transfer", "ablation_design"}
    assert [r["method"] for r in tables["ablation_transfer"].rows] == ["tvt_t1", "t2", "tvt"]
    assert [r["method"] for r in tables["ablation_design"].rows] == ["s4", "tvt"]
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
    assert table.ranks()[("bicubic", "latency_ms")] == 1


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
    table = reports.Table("t", "t", [reports.Column("x", "x", True)],
                          [{"method": "a", "x": value}, {"method": "b", "x": 1.0}, {"method": "c", "x": 0.5}])
    assert table.ranks() == {("b", "x"): 1, ("c", "x"): 2}
