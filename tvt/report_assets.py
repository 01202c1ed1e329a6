"""What the Snakemake report shows besides the evaluation's figures: the tables as HTML pages and one
training-curve figure per training stage (``snakemake --report report.html``, README "Results").

* :func:`write_html_tables`: every markdown table of the evaluation (``tables/*.md``: Table 2/3/4
  shapes, ablations, the published numbers, the claims, metric availability) as a standalone HTML
  page, since the report shows HTML and images but prints markdown as plain text.
* :func:`write_training_curves`: the training stages log their loss terms to MLflow every
  ``log_every`` steps (:class:`tvt.training.engine.Trainer`); this reads them back from the runs
  tagged with each stage's key — every run of that key, so a training resumed after a failure
  is one curve — and draws one small SVG per stage. A stage whose runs are not in this tracking
  store (trained elsewhere) gets a figure that says so instead of a curve.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from pathlib import Path

from matplotlib.figure import Figure

#: logged by the trainer for every stage, not learning curves
NOT_CURVES = ("samples_per_s", "lr/")
CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}h3{margin-bottom:.2em}p{max-width:60em}"""


def markdown_to_html(markdown: str, title: str) -> str:
    """A standalone HTML page of one of our markdown tables (pipe tables, bold/italic/underline marks)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>\n{body}</body></html>\n"
    )


def write_html_tables(tables_dir: Path, out_dir: Path) -> list[Path]:
    """``out_dir/<name>.html`` for every ``tables_dir/<name>.md`` except ``metrics.md`` (all of them at once)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sorted(tables_dir.glob("*.md")):
        if source.stem == "metrics":
            continue
        target = out_dir / f"{source.stem}.html"
        target.write_text(markdown_to_html(source.read_text(encoding="utf-8"), source.stem), encoding="utf-8")
        written.append(target)
    return written


def stage_history(client, experiment_id: str, stage: str, key: str) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] over every run of ``stage`` with output key ``key``, oldest run first,
    a later run's value winning at a step two runs logged (a resumed run repeats no step, but may)."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`tvt.stage` = '{stage}' and tags.`tvt.key` = '{key}'",
        order_by=["attributes.start_time ASC"],
    )
    merged: dict[str, dict[int, float]] = {}
    for run in runs:
        for metric in run.data.metrics:
            if any(part in metric for part in NOT_CURVES):
                continue
            for point in client.get_metric_history(run.info.run_id, metric):
                merged.setdefault(metric, {})[point.step] = point.value
    return {m: sorted(points.items()) for m, points in sorted(merged.items()) if len(points) > 1}


def curves_figure(stage: str, key: str, history: Mapping[str, list[tuple[int, float]]]) -> Figure:
    """Small multiples, one panel per logged metric against the training step."""
    if not history:
        fig = Figure(figsize=(5, 1.2))
        fig.text(
            0.5,
            0.5,
            f"{stage} ({key}): no logged training curve in this MLflow store",
            ha="center",
            va="center",
            fontsize=9,
        )
        return fig
    cols = min(4, len(history))
    rows = math.ceil(len(history) / cols)
    fig = Figure(figsize=(3.0 * cols, 2.2 * rows + 0.4), layout="constrained")
    fig.suptitle(f"{stage}  ·  key {key}", fontsize=10)
    for ax, (metric, points) in zip(fig.subplots(rows, cols, squeeze=False).flat, history.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, lw=1.2)
        ax.set_title(metric.removeprefix(f"{stage}/"), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if min(values) > 0 and max(values) / min(values) > 50:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(fig.axes)[len(history) :]:
        ax.set_visible(False)
    return fig


def write_training_curves(cfg: Mapping, out_dir: Path) -> list[Path]:
    """``out_dir/<stage>.svg`` for every training stage of ``cfg``, from the configured MLflow store."""
    import mlflow

    from tvt.stages import build_stages
    from tvt.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stage in (st for st in build_stages(cfg) if st.trains):
        history = stage_history(client, experiment.experiment_id, stage.name, stage.key) if experiment else {}
        path = out_dir / f"{stage.name}.svg"
        curves_figure(stage.name, stage.key, history).savefig(path)
        written.append(path)
    return written


def report_contents(report_html: str) -> tuple[dict, dict]:
    """(results, categories) embedded in a Snakemake HTML report: path -> {"mime_type", "data_uri", ...}
    and category -> subcategory -> [paths] (snakemake/report/html_reporter: ``var results = {...};``)."""
    import json
    import re

    found = {}
    for name in ("results", "categories"):
        match = re.search(rf"var {name} = (\{{.*?\}});\s*</script>", report_html, re.DOTALL)
        if match is None:
            raise ValueError(f"not a Snakemake HTML report: no `var {name}` in it")
        found[name] = json.loads(match.group(1))
    return found["results"], found["categories"]


def data_uri_bytes(uri: str) -> bytes:
    """The content of a ``data:…;base64,…`` URI (how the report embeds every result)."""
    import base64

    return base64.b64decode(uri.split(";base64,", 1)[1])
