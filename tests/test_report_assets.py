"""What the Snakemake report shows besides the evaluation's figures: HTML tables, training curves."""

from __future__ import annotations

import io

import mlflow
import pytest

from tvt.report_assets import curves_figure, stage_history, write_html_tables


def test_tables_become_html_pages_with_their_marks(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "table2_all.md").write_text(
        "### Image quality\n\n| Method | PSNR ↑ |\n|---|---:|\n| tvt | **25.81 ± 0.42** |\n| bicubic | <u>24.10</u> |\n"
    )
    (tables / "metrics.md").write_text("every table at once\n")
    (written,) = write_html_tables(tables, tmp_path / "html")
    page = written.read_text()
    assert written.name == "table2_all.html" and page.startswith("<!DOCTYPE html>")
    assert "<h3>Image quality</h3>" in page and "<td>tvt</td>" in page
    assert "<strong>25.81 ± 0.42</strong>" in page and "<u>24.10</u>" in page


@pytest.mark.slow
def test_a_stage_curve_joins_every_run_of_its_key(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("curves", artifact_location=(tmp_path / "a").as_uri())
    runs = [("isr_tvt", "k1", range(4)), ("isr_tvt", "k1", range(3, 6)), ("isr_tvt", "k2", range(6))]
    for index, (stage, key, steps) in enumerate(runs):  # a failed run, its resumption, another config's run
        run = client.create_run(experiment, start_time=1000 + index, tags={"tvt.stage": stage, "tvt.key": key})
        for step in steps:
            client.log_metric(run.info.run_id, "isr_tvt/loss", 10 * index + step, step=step)
            client.log_metric(run.info.run_id, "isr_tvt/samples_per_s", 3.0, step=step)
        client.log_metric(run.info.run_id, "isr_tvt/val_psnr", 20.0)  # a final value, no curve
    history = stage_history(client, experiment, "isr_tvt", "k1")
    assert history == {"isr_tvt/loss": [(0, 0), (1, 1), (2, 2), (3, 13), (4, 14), (5, 15)]}
    svg = io.StringIO()
    curves_figure("isr_tvt", "k1", history).savefig(svg, format="svg")
    assert svg.getvalue().count('id="line2d_') >= 1
    empty = io.StringIO()
    curves_figure("isr_tvt", "k3", {}).savefig(empty, format="svg")
    assert 'id="line2d_' not in empty.getvalue()
