"""Paper-shaped tables and figures from an evaluation summary (the ``results/metrics.json`` dict).

* Table 2 shape: methods × image-quality metrics, one table per test subset;
* Table 3 shape: text legibility (OCR ACC / NED / CharAcc, overall and per text height),
  with HR as the upper bound of the protocol (not ranked);
* Table 4 shape: denoising steps, parameters, MACs of the paper-size architecture and the
  latency measured here;
* ablation tables, when the methods include the paper's variants (``t1``, ``tvt_s4``...);
* the published numbers (``tvt/data/paper_results.yaml``) beside ours, and a table that says
  whether our method ranking per metric agrees with the published one;
* figures: OCR accuracy against text height, and comparison grids
  LR | methods | HR with a zoom on the region where the methods disagree most.

Statistics (see :mod:`tvt.stats`): a mean over test items is shown as ``mean ± half-width``
of its bootstrap interval, and a cell is marked best (**bold**) or second (underlined) only
when a paired test separates it from the rows below; otherwise the leaders are marked tied
(*italic*). Quantities without sampling noise (steps, parameters, MACs) are ranked by value.

Every table is written as markdown, CSV and JSON; nothing here computes a metric. New
blocks plug into :func:`build_tables`.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from tvt import stats
from tvt.metrics.ocr import OCR_LABELS, OCR_METRICS
from tvt.metrics.suite import METRICS

HR_ROW = "HR"
PAIRING_NOTES = {
    "paired": "Real LR/HR pairs (LR taken by a camera, never synthetically degraded).",
    "synthetic": "LR synthesised from HR with the Real-ESRGAN second-order degradation (OSEDiff's parameters).",
}
_DECIMALS = {"psnr_y": 2, "fid": 2, "musiq": 2, "niqe": 3, "qalign": 3, "latency_ms": 1, "params_M": 2, "paper_params_M": 1,
             "paper_gmacs": 1, "paper_attn_gmacs": 1, "paper_all_gmacs": 1, "sd_latency_s": 1,
             "steps": 0, "n": 0}

#: ablation family -> (title, variant names without the "tvt_" prefix), docs/method.md §1.1–1.3
ABLATIONS = {
    "vae": ("VAE-D4 architecture: V1 (128/256/512 + mid-block), V2 (128/256/512) vs TVT", ("v1", "v2")),
    "transfer": ("Transfer VAE training: T1 (from scratch), T2 (latent L2 alignment) vs TVT", ("t1", "t2")),
    "design": ("Architecture: S1 (OSEDiff) … S5 (pruned UNet) vs TVT (CE-UNet)", ("s1", "s2", "s3", "s4", "s5")),
}
_ABLATION_NAME = re.compile(r"^(?:tvt_)?([vts]\d)$")

#: method -> row of tvt.complexity.compute_complexity with its paper-size architecture; an ablation
#: variant may also be spelt tvt_<variant>. T1 and T2 change how VAE-D4 trains, not its architecture.
_TVT_ROW = "TVT restorer (E4 + CE-UNet + D4)"
_ARCHITECTURES = {
    "tvt": _TVT_ROW,
    "osediff": "OSEDiff restorer (E8 + UNet + D8)",
    "s1": "OSEDiff restorer (E8 + UNet + D8)",
    "stablesr": "StableSR restorer (E8 + 200 steps + CFW-D8)",
    "v1": "V1 restorer (E4-V1 + CE-UNet + D4-V1)",
    "v2": "V2 restorer (E4-V2 + CE-UNet + D4-V2)",
    "t1": _TVT_ROW,
    "t2": _TVT_ROW,
    "s2": "S2 restorer (E8 + UNet + D8 with E8 skips)",
    "s3": "S3 restorer (E8 + UNet + D8, 8 latent channels)",
    "s4": "S4 restorer (E4 + UNet @ 128² + D4)",
    "s5": "S5 restorer (E4 + 25%-pruned UNet @ 128² + D4)",
}
ARCHITECTURES = {**_ARCHITECTURES, **{f"tvt_{m}": row for m, row in _ARCHITECTURES.items() if _ABLATION_NAME.match(m)}}

MARK_FORMATS = {stats.Mark.BEST: "**{}**", stats.Mark.SECOND: "<u>{}</u>", stats.Mark.TIED: "*{}*"}
PAPER_ROW = "↳ paper"


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    higher_is_better: bool | None = None  # None: not ranked
    #: "sampled": a mean over test items, ranked by the paired tests; "exact": no noise (steps, parameters,
    #: MACs), ranked by value; "measured": one noisy measurement (latency), ranked by value but never
    #: counted as evidence in the ordering check
    noise: str = "sampled"

    def __post_init__(self):
        if self.noise not in ("sampled", "exact", "measured"):
            raise ValueError(f"column {self.key!r}: noise {self.noise!r} is not sampled, exact or measured")

    @property
    def by_value(self) -> bool:
        return self.noise != "sampled"

    @property
    def header(self) -> str:
        arrow = {True: " ↑", False: " ↓", None: ""}[self.higher_is_better]
        return self.label + arrow


@dataclass(frozen=True)
class PaperValue:
    """One published number, in our unit, and where it was read."""

    table: str  # our table (its file stem)
    method: str  # our row
    key: str  # our column
    value: float
    source: str  # id in paper_results.yaml
    citation: str
    published_table: str
    block: str  # the published row group (test set)
    published_row: str
    published_column: str
    url: str


@dataclass
class Table:
    """Rows of ``{"method": name, column key: value or None}``; reference rows are not ranked.

    ``intervals`` and ``comparisons`` (per column key) come from the summary's statistics;
    ``paper`` holds the published values shown under our rows, with Δ = ours − published when
    ``paper_deltas`` (our rows are scored on the published test sets).
    """

    name: str  # file stem
    title: str
    columns: list[Column]
    rows: list[dict]
    reference_rows: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    intervals: dict[tuple[str, str], stats.Interval] = field(default_factory=dict)
    comparisons: dict[str, list[stats.Comparison]] = field(default_factory=dict)
    alpha: float = 0.05
    paper: dict[tuple[str, str], PaperValue] = field(default_factory=dict)
    paper_deltas: bool = False
    row_header: str = "Method"

    def marks(self) -> dict[tuple[str, str], stats.Mark]:
        """{(method, key): mark} per ranked column: by the paired tests of ``comparisons``, by value
        for ``by_value`` columns; a column of means without tests (FID) is not ranked."""
        out = {}
        for col in self.columns:
            if col.higher_is_better is None or not (col.by_value or col.key in self.comparisons):
                continue
            means = {r["method"]: r[col.key] for r in self.rows
                     if r["method"] not in self.reference_rows and _is_number(r.get(col.key))}
            differ = None if col.by_value else stats.significance(self.comparisons[col.key], self.alpha)
            out.update({(method, col.key): mark
                        for method, mark in stats.marks(means, col.higher_is_better, differ).items()})
        return out

    def half_width(self, method: str, key: str) -> float | None:
        """Half the width of a cell's interval (None without one): the ``±`` of the tables."""
        interval = self.intervals.get((method, key))
        if interval is None or not all(map(_is_number, interval)):
            return None
        return (interval[1] - interval[0]) / 2

    def cell(self, row: Mapping, col: Column) -> str:
        """The value, with ``± half-width`` of its interval when there is one."""
        value = row.get(col.key)
        text = format_value(col.key, value)
        if _is_number(value) and (half := self.half_width(row["method"], col.key)) is not None:
            text += " ± " + format_value(col.key, half)
        return text

    def paper_cell(self, row: Mapping, col: Column) -> str:
        published = self.paper.get((row["method"], col.key))
        if published is None:
            return ""
        text = format_value(col.key, published.value)
        if self.paper_deltas and _is_number(row.get(col.key)):
            delta = row[col.key] - published.value
            text += f" (Δ {'+' if delta >= 0 else '−'}{format_value(col.key, abs(delta))})"
        return text

    def markdown(self) -> str:
        marks = self.marks()
        lines = [f"### {self.title}", "", f"| {self.row_header} | " + " | ".join(c.header for c in self.columns) + " |",
                 "|---|" + "---:|" * len(self.columns)]
        for row in self.rows:
            cells = []
            for col in self.columns:
                mark = marks.get((row["method"], col.key))
                cells.append(MARK_FORMATS[mark].format(self.cell(row, col)) if mark else self.cell(row, col))
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
            if any(method == row["method"] for method, _ in self.paper):
                lines.append(f"| {PAPER_ROW} | " + " | ".join(self.paper_cell(row, c) for c in self.columns) + " |")
        notes = [*self.notes, *self._paper_notes()]
        if notes:
            lines += [""] + [f"{note}  " for note in notes]  # two spaces: markdown line break
        return "\n".join(lines).rstrip() + "\n"

    def _paper_notes(self) -> list[str]:
        sources = {}
        for v in self.paper.values():
            sources.setdefault((v.citation, v.published_table, v.url), set()).add(v.block)
        if not sources:
            return []
        how = ("Δ = ours − published" if self.paper_deltas else
               "not on our test images, so compare orderings (paper_agreement), not values")
        return [f"{PAPER_ROW}: published values; {how}."] + [
            f"  {citation}, {table} ({', '.join(sorted(blocks))}): {url}"
            for (citation, table, url), blocks in sources.items()]

    def csv_rows(self) -> tuple[list[str], list[dict]]:
        """Field names and rows: each value, then ``<key>_pm`` (interval half-width), ``<key>_paper``
        and ``<key>_delta`` for the columns that have them."""
        fields = ["method"]
        for col in self.columns:
            fields.append(col.key)
            if any(k == col.key for _, k in self.intervals):
                fields.append(f"{col.key}_pm")
            if any(k == col.key for _, k in self.paper):
                fields += [f"{col.key}_paper"] + ([f"{col.key}_delta"] if self.paper_deltas else [])
        rows = []
        for row in self.rows:
            out = {"method": row["method"], **{c.key: row.get(c.key) for c in self.columns}}
            for col in self.columns:
                if (half := self.half_width(row["method"], col.key)) is not None:
                    out[f"{col.key}_pm"] = half
                if (published := self.paper.get((row["method"], col.key))) is not None:
                    out[f"{col.key}_paper"] = published.value
                    if self.paper_deltas and _is_number(row.get(col.key)):
                        out[f"{col.key}_delta"] = row[col.key] - published.value
            rows.append(out)
        return fields, rows

    def to_json(self) -> dict:
        by_row = {}
        for (method, key), interval in self.intervals.items():
            by_row.setdefault(method, {})[key] = list(interval)
        paper = {}
        for (method, key), v in self.paper.items():
            paper.setdefault(method, {})[key] = {"value": v.value, "source": v.source, "block": v.block}
        marks = {}
        for (method, key), mark in self.marks().items():
            marks.setdefault(method, {})[key] = mark.value
        return {"title": self.title,
                "columns": [{"key": c.key, "label": c.label, "higher_is_better": c.higher_is_better}
                            for c in self.columns],
                "rows": self.rows, "intervals": by_row, "marks": marks, "paper": paper,
                "paper_deltas": self.paper_deltas, "notes": self.notes}

    def write(self, directory: Path) -> None:
        """``<name>.md``, ``<name>.csv`` and ``<name>.json`` in ``directory``."""
        (directory / f"{self.name}.md").write_text(self.markdown())
        fields, rows = self.csv_rows()
        with open(directory / f"{self.name}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        (directory / f"{self.name}.json").write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_value(key: str, value) -> str:
    if isinstance(value, str):
        return value
    if not _is_number(value):
        return "–"
    decimals = _DECIMALS.get(key.split(":")[0], 4)  # "sd_latency_s:<device>": one column per device
    return f"{value:.{decimals}f}" if decimals else f"{value:.0f}"


# ------------------------------------------------------------------------------------------
# Statistics of the summary on the tables
# ------------------------------------------------------------------------------------------


def _apply_statistics(table: Table, summary: Mapping, series: Mapping[str, Mapping], items: str) -> Table:
    """Intervals and paired tests of ``series`` ({column key: the summary's stats of that column})
    on ``table``, with the note that says how they were made (``items``: what was resampled)."""
    doc = summary.get("statistics")
    if not doc:
        table.notes.append("No per-item statistics in this summary: no intervals, means not ranked.")
        return table
    for key, found in series.items():
        table.intervals.update({(method, key): tuple(bounds) for method, bounds in found["intervals"].items()})
        table.comparisons[key] = [stats.Comparison.from_json(c) for c in found["comparisons"]]
    table.alpha = 1.0 - doc["confidence"]
    table.notes.append(
        f"± half-width of the {doc['confidence']:.0%} percentile-bootstrap interval over {items} "
        f"({doc['resamples']} resamples, seed {doc['seed']}; bounds in metrics.json). **Bold**: best, "
        f"<u>underlined</u>: second — each significantly better than every row below it (paired bootstrap of "
        f"the difference of means over the same {items}, two-sided p < {table.alpha:g}); *italic*: tied for "
        f"best (no significant difference).")
    untested = [c.label for c in table.columns
                if c.higher_is_better is not None and not c.by_value and c.key not in table.comparisons]
    if untested:
        table.notes.append(f"Not ranked (no per-item scores to test, e.g. one value per set): {', '.join(untested)}.")
    return table


def _subset_series(summary: Mapping, subset: str) -> Mapping[str, Mapping]:
    return ((summary.get("statistics") or {}).get("subsets", {}).get(subset) or {}).get("metrics", {})


def _ocr_series(summary: Mapping) -> Mapping[str, Mapping]:
    return ((summary.get("statistics") or {}).get("ocr") or {}).get("metrics", {})


# ------------------------------------------------------------------------------------------
# The paper-shaped tables
# ------------------------------------------------------------------------------------------


def prompt_note(prompts: Mapping[str, Mapping]) -> str:
    """Which prompt each restorer ran with: the null prompt (a fixed embedding) or a tagger's prompt format."""
    def label(record: Mapping) -> str:
        return "null" if record.get("prompt") != "tags" else f'{record["tagger"]} tags, "{record["format"]}"'

    return "Prompts: " + "; ".join(f"{name}: {label(record)}" for name, record in prompts.items()) + "."


def image_quality_tables(summary: Mapping) -> list[Table]:
    """Table 2 shape: one methods × metrics table per subset (``all``, ``photo``, ``text``...)."""
    measured = [n for n in summary["metrics"] if n not in summary["unavailable"]]
    tables = []
    for subset, methods in summary["subsets"].items():
        keys = [m for m in measured if any(m in values for values in methods.values())]
        columns = [Column("n", "n")] + [Column(m, METRICS[m].label, METRICS[m].higher_is_better) for m in keys]
        rows = [{"method": method, **{c.key: values.get(c.key) for c in columns}} for method, values in methods.items()]
        notes = [(f"{summary['test_set']}, subset '{subset}'. PSNR/SSIM on Y of YCbCr with "
                 f"{summary['crop_border']} px cropped per side; every output scored as an 8-bit PNG.")]
        pairing = summary.get("test_sets", {}).get(subset)
        if pairing:
            notes.append(PAIRING_NOTES[pairing])
        notes += [f"{METRICS[m].label}: over the images of at least {METRICS[m].min_side} px only."
                  for m in keys if METRICS[m].min_side]
        not_applicable = [m for m in measured if m not in keys]
        if not_applicable:
            notes.append("Not applicable to these images: " + ", ".join(
                f"{METRICS[m].label} (needs ≥ {METRICS[m].min_side} px)" if METRICS[m].min_side else METRICS[m].label
                for m in not_applicable) + ".")
        if summary.get("prompts"):
            notes.append(prompt_note(summary["prompts"]))
        if summary["unavailable"]:
            notes.append("Unavailable here (see metrics_status.md): "
                         + ", ".join(METRICS[m].label for m in summary["unavailable"]) + ".")
        table = Table(f"table2_{subset}", f"Image quality — {summary['test_set']} / {subset}", columns, rows,
                      notes=notes)
        series = _subset_series(summary, subset)
        tables.append(_apply_statistics(table, summary, {k: series[k] for k in keys if k in series}, "images"))
    return tables


def _size_key(px: int | str) -> str:
    return f"acc_{px}px"


def text_table(summary: Mapping) -> Table | None:
    """Table 3 shape: OCR ACC, NED, CharAcc, and ACC per text height; HR is the upper bound."""
    ocr = summary.get("ocr")
    if not ocr or not ocr.get("rows"):
        return None
    sizes = sorted({int(px) for row in ocr["rows"].values() for px in row.get("by_size", {})})
    columns = [Column("n", "n")] + [Column(m, OCR_LABELS[m], True) for m in OCR_METRICS]
    columns += [Column(_size_key(px), f"ACC@{px}px", True) for px in sizes]
    rows = []
    for method, values in ocr["rows"].items():
        row = {"method": method, **{m: values.get(m) for m in ("n", *OCR_METRICS)}}
        row.update({_size_key(px): values["by_size"].get(str(px), {}).get("acc") for px in sizes})
        rows.append(row)
    notes = [(f"{ocr.get('engine', 'Tesseract')} single-line mode (--psm 7) on the 8-bit outputs; "
             "strings NFKC-normalised, case-folded, whitespace removed. ACC: exact line match; "
             "NED: 1 − ED/max(|pred|, |gt|); CharAcc: max(0, 1 − ED/|gt|). HR: upper bound, not ranked.")]
    if ocr.get("text_px_bins"):
        notes.append("Annotated scene-text lines: each line's box is cut from the output and read alone; "
                     "ACC@N px groups lines whose HR box short side is in [N, next edge) of "
                     f"{ocr['text_px_bins']}.")
    subset = "+".join(ocr.get("subsets", ["text"]))
    table = Table("table3_text", f"Text legibility — {summary['test_set']} / {subset}", columns, rows,
                  reference_rows=(HR_ROW,), notes=notes)
    series = _ocr_series(summary)
    return _apply_statistics(table, summary, {c.key: series[c.key] for c in columns if c.key in series}, "text lines")


def complexity_table(summary: Mapping, architecture_rows: Sequence[Mapping] = ()) -> Table:
    """Table 4 shape: steps, parameters, both MAC accountings, measured latencies (tvt.complexity.table4).

    Costs are ranked by value: counts (steps, parameters, MACs) are exact; latencies are one noisy
    measurement each and never count as evidence in the ordering check."""
    from tvt.complexity import table4  # heavy imports (diffusers), only when Table 4 is built

    arch = {row["name"]: row for row in architecture_rows}
    paper_rows = {method: arch.get(ARCHITECTURES.get(method, "")) for method in summary["complexity"]}
    columns, rows, notes = table4(summary["complexity"], paper_rows, test_set=summary["test_set"],
                                  device=summary.get("device", "cpu"))
    columns = [Column(key, label, better, "measured" if "latency" in key else "exact")
               for key, label, better in columns]
    return Table("table4_complexity", "Complexity", columns, rows, notes=notes)


def ablation_subset(summary: Mapping) -> str:
    """The image subset that ablations and mini-mode ordering checks read: photos if split out, else all."""
    return next((s for s in ("photo", "all") if s in summary["subsets"]), next(iter(summary["subsets"])))


def ablation_tables(summary: Mapping, architecture_rows: Sequence[Mapping] = ()) -> list[Table]:
    """One table per ablation family present among the evaluated methods, TVT as the reference.

    With ``architecture_rows`` (:func:`tvt.complexity.compute_complexity`), each row also shows its
    paper-size architecture's MACs (conv + linear, and attention), where the paper's FLOPs land."""
    arch = {row["name"]: row for row in architecture_rows}
    subset = ablation_subset(summary)
    image = summary["subsets"][subset]
    ocr_rows = (summary.get("ocr") or {}).get("rows", {})
    image_series, ocr_series = _subset_series(summary, subset), _ocr_series(summary)
    tables = []
    for family, (title, variants) in ABLATIONS.items():
        members = [m for m in summary["methods"] if (match := _ABLATION_NAME.match(m)) and match.group(1) in variants]
        if not members:
            continue
        if family == "design" and "osediff" in summary["methods"] and not any(m.endswith("s1") for m in members):
            members.insert(0, "osediff")  # S1 is OSEDiff: the baseline's row, not a second training of it
        methods = members + [m for m in summary["methods"] if m == "tvt"]
        keys = [k for k in summary["metrics"] if k not in summary["unavailable"]
                and any(k in image.get(m, {}) for m in methods)]
        columns = [Column(k, METRICS[k].label, METRICS[k].higher_is_better) for k in keys]
        rows = [{"method": m, **{k: image.get(m, {}).get(k) for k in keys}} for m in methods]
        series = {k: image_series[k] for k in keys if k in image_series}
        if ocr_rows:
            columns += [Column(f"ocr_{m}", f"Text {OCR_LABELS[m]}", True) for m in ("acc", "ned")]
            for row in rows:
                row.update({f"ocr_{m}": ocr_rows.get(row["method"], {}).get(m) for m in ("acc", "ned")})
            series.update({f"ocr_{m}": ocr_series[m] for m in ("acc", "ned") if m in ocr_series})
        if arch:
            columns += [Column("paper_gmacs", "Paper-size conv+linear MACs (G)", False, "exact"),
                        Column("paper_attn_gmacs", "Paper-size attention MACs (G)", False, "exact")]
            for row in rows:
                paper = arch.get(ARCHITECTURES.get(row["method"], ""), {})
                row.update(paper_gmacs=paper.get("gmacs"), paper_attn_gmacs=paper.get("attn_gmacs"))
        table = Table(f"ablation_{family}", f"Ablation — {title} ({subset})", columns, rows)
        tables.append(_apply_statistics(table, summary, series, "images (text columns: text lines)"))
    return tables


# ------------------------------------------------------------------------------------------
# Published values beside ours
# ------------------------------------------------------------------------------------------

PAPER_RESULTS = "paper_results.yaml"  # in the tvt.data package


def load_paper_results(path: Path | None = None) -> list[PaperValue]:
    """Every published value of ``path`` (default: the packaged ``tvt/data/paper_results.yaml``).

    Each block maps our rows (``rows``: method → published row label) and columns (``columns``:
    key → published column header) onto one published row group; ``scale`` converts a column
    into our unit. A value whose row, column or source is not declared is an error, not skipped.
    """
    if path is None:
        return list(_packaged_paper_results())
    return _parse_paper_results(yaml.safe_load(Path(path).read_text()), str(path))


@lru_cache(maxsize=1)
def _packaged_paper_results() -> tuple[PaperValue, ...]:
    resource = resources.files("tvt.data") / PAPER_RESULTS
    return tuple(_parse_paper_results(yaml.safe_load(resource.read_text(encoding="utf-8")), str(resource)))


def _parse_paper_results(doc: Mapping, where: str) -> list[PaperValue]:
    sources = doc.get("sources") or {}
    values: dict[tuple[str, str, str], PaperValue] = {}
    for i, block in enumerate(doc.get("blocks") or []):
        at = f"{where}: blocks[{i}] ({block.get('table')}, {block.get('block')})"
        missing = [k for k in ("source", "block", "table", "rows", "columns", "values") if k not in block]
        if missing:
            raise ValueError(f"{at}: missing {', '.join(missing)}")
        source = sources.get(block["source"])
        if source is None:
            raise ValueError(f"{at}: unknown source {block['source']!r} (sources: {', '.join(sources)})")
        if not all(source.get(k) for k in ("citation", "table", "url")):
            raise ValueError(f"{at}: source {block['source']!r} needs citation, table and url")
        scale = block.get("scale") or {}
        for method, cells in block["values"].items():
            if method not in block["rows"]:
                raise ValueError(f"{at}: row {method!r} has no published row label in `rows`")
            for key, value in cells.items():
                if key not in block["columns"]:
                    raise ValueError(f"{at}: column {key!r} of row {method!r} has no published header in `columns`")
                if not _is_number(value):
                    raise ValueError(f"{at}: {method}.{key} = {value!r} is not a number")
                cell = (block["table"], method, key)
                if cell in values:
                    raise ValueError(f"{at}: {'/'.join(cell)} is listed twice")
                values[cell] = PaperValue(
                    block["table"], method, key, float(value) * scale.get(key, 1), block["source"], source["citation"],
                    source["table"], str(block["block"]), block["rows"][method], block["columns"][key], source["url"])
    return list(values.values())


def published_method(method: str) -> str:
    """The method whose published numbers a row of ours is compared with: ``<name>_official`` (the authors'
    released weights, scored here) is held to the very numbers published for ``<name>``."""
    from tvt.config import OFFICIAL_SUFFIX

    return method.removesuffix(OFFICIAL_SUFFIX)


def attach_paper(tables: Iterable[Table], values: Iterable[PaperValue], deltas: bool) -> None:
    """Put each published value on the cells of ours it names (:func:`published_method` of the row, column
    present), with Δ when ``deltas``."""
    by_cell: dict[tuple[str, str, str], PaperValue] = {(v.table, v.method, v.key): v for v in values}
    for table in tables:
        for row in table.rows:
            for col in table.columns:
                if (v := by_cell.get((table.name, published_method(row["method"]), col.key))) is not None:
                    table.paper[(row["method"], col.key)] = v
        table.paper_deltas = deltas


def _order(values: Mapping[str, float], higher_is_better: bool) -> list[str]:
    return sorted(values, key=lambda m: values[m], reverse=higher_is_better)


def paper_agreement_table(tables: Sequence[Table], values: Iterable[PaperValue], summary: Mapping) -> Table | None:
    """Per published block and metric: the published order of the methods we also ran, ours, and
    whether they agree — over every pair of methods, with ``(n.s.)`` when our difference for a
    pair is not significant. Paper mode compares each test set with itself; mini mode compares
    every published image-quality block with our :func:`ablation_subset` (other images: only
    the ordering can agree)."""
    ours = {t.name: t for t in tables}
    fallback = None if summary.get("test_sets") else f"table2_{ablation_subset(summary)}"
    blocks: dict[tuple[str, str, str], list[PaperValue]] = {}
    for v in values:
        blocks.setdefault((v.source, v.block, v.table), []).append(v)
    rows = []
    for (_, block, name), cells in blocks.items():
        table = ours.get(name) or (ours.get(fallback) if fallback and name.startswith("table2_") else None)
        if table is None:
            continue
        our_rows = {r["method"]: r for r in table.rows if r["method"] not in table.reference_rows}
        for col in table.columns:
            published = {v.method: v.value for v in cells if v.key == col.key and v.method in our_rows
                         and _is_number(our_rows[v.method].get(col.key))}
            if col.higher_is_better is None or len(published) < 2:
                continue
            mine = {m: our_rows[m][col.key] for m in published}
            rows.append({"method": col.header, "published": _ordering(published, col, block),
                         "ours": _ordering(mine, col, table.name),
                         "ordering": _verdict(published, mine, _separation(table, col))})
    if not rows:
        return None
    notes = [("A ≻ B: A is better than B in the metric's direction. Ordering over every pair of methods that both "
              "the publication and we evaluated: agree / disagree, '(n.s.)' when our difference for a pair is not "
              "significant (paired bootstrap, see the tables), '(untested)' for columns without per-item scores.")]
    if fallback:
        notes.append(f"Mini mode: our images are not the published test sets, so values differ by construction; "
                     f"the published blocks are compared with {fallback}.")
    return Table("paper_agreement", "Agreement with the published method ranking",
                 [Column("published", "Published"), Column("ours", "Ours"), Column("ordering", "Ordering")],
                 rows, notes=notes, row_header="Metric")


def _ordering(values: Mapping[str, float], col: Column, where: str) -> str:
    return f"{where}: " + " ≻ ".join(f"{m} {format_value(col.key, values[m])}"
                                     for m in _order(values, col.higher_is_better))


def _separation(table: Table, col: Column):
    """How to tell whether two of our values differ: exactly, by the paired test, or not at all (None: untested)."""
    if col.noise == "exact":
        return lambda a, b: True
    if col.noise == "measured":
        return None
    if col.key in table.comparisons:
        return stats.significance(table.comparisons[col.key], table.alpha)
    return None


def _verdict(published: Mapping[str, float], mine: Mapping[str, float], differ) -> str:
    """agree / disagree over every pair the publication orders, qualified by whether our pairs that decide
    it are significant: all of them when agreeing, the discordant ones when disagreeing."""
    methods = list(published)
    pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1:] if published[a] != published[b]]
    discordant = [(a, b) for a, b in pairs if (published[a] > published[b]) != (mine[a] > mine[b])]
    verdict = "disagree" if discordant else "agree"
    if differ is None:
        return verdict + " (untested)"
    deciding = discordant or pairs
    return verdict + ("" if all(mine[a] != mine[b] and differ(a, b) for a, b in deciding) else " (n.s.)")


def build_tables(summary: Mapping, architecture_rows: Sequence[Mapping] = (),
                 paper_values: Iterable[PaperValue] | None = None) -> list[Table]:
    """Every table of an evaluation, in report order.

    A new block (e.g. another complexity or a claims table) is one more builder here: a function
    of the summary returning a :class:`Table` (or several, or None). Published values then land on
    it by its ``name`` (``paper_results.yaml``'s ``table``), and its columns join the ordering check.
    """
    tables = [*image_quality_tables(summary), text_table(summary), complexity_table(summary, architecture_rows),
              *ablation_tables(summary, architecture_rows)]
    tables = [t for t in tables if t is not None]
    values = load_paper_results() if paper_values is None else list(paper_values)
    attach_paper(tables, values, deltas=bool(summary.get("test_sets")))
    if (agreement := paper_agreement_table(tables, values, summary)) is not None:
        tables.append(agreement)
    return tables




def plot_series(summary: Mapping, metric: str) -> tuple[list[str], list[list]]:
    """Wide rows ``[text_px, value per OCR row]`` of one OCR metric, for ``dvc plots`` and figures."""
    ocr_rows = (summary.get("ocr") or {}).get("rows", {})
    sizes = sorted({int(px) for row in ocr_rows.values() for px in row.get("by_size", {})})
    header = ["text_px", *ocr_rows]
    return header, [[px, *(ocr_rows[r]["by_size"].get(str(px), {}).get(metric) for r in ocr_rows)] for px in sizes]


def write_plot_csv(summary: Mapping, metric: str, path: Path) -> Path:
    header, rows = plot_series(summary, metric)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------


def ocr_vs_size_figure(summary: Mapping) -> Figure | None:
    """ACC and NED against text height, one line per method, HR dashed."""
    header, acc = plot_series(summary, "acc")
    if not acc:
        return None
    _, ned = plot_series(summary, "ned")
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    for ax, series, label in zip(fig.subplots(1, 2), (acc, ned), ("ACC (exact line)", "NED"), strict=True):
        sizes = [row[0] for row in series]
        for i, method in enumerate(header[1:], start=1):
            values = [np.nan if row[i] is None else row[i] for row in series]
            ax.plot(sizes, values, marker="o", label=method, linestyle="--" if method == HR_ROW else "-")
        ax.set(xlabel="text height (px, HR)", ylabel=label, ylim=(-0.03, 1.03), xticks=sizes)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize="small")
    fig.suptitle(f"Text legibility vs size — {summary['test_set']}")
    return fig


def disagreement_box(outputs: Sequence[np.ndarray], hr: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the ``size`` = (h, w) region where the outputs' local errors differ most.

    Local error: the mean absolute error to HR over the region. With several outputs the
    region maximises (worst − best) local error, i.e. where the choice of method matters;
    with one output, its largest local error.
    """
    height, width = min(size[0], hr.shape[0]), min(size[1], hr.shape[1])
    stride = (max(1, height // 4), max(1, width // 4))
    errors = torch.stack([torch.from_numpy(np.abs(o.astype(np.float32) - hr.astype(np.float32)).mean(-1))
                          for o in outputs])[:, None]
    local = F.avg_pool2d(errors, (height, width), stride=stride)[:, 0]
    score = local.max(0).values - local.min(0).values if len(outputs) > 1 else local[0]
    iy, ix = np.unravel_index(int(score.argmax()), tuple(score.shape))
    return int(ix) * stride[1], int(iy) * stride[0], width, height


def zoom_size(height: int, width: int) -> tuple[int, int]:
    """The zoomed region: a third of a photo's side; a text line's full height, twice as wide."""
    if width >= 2 * height:
        return height, min(width, 2 * height)
    side = max(8, min(height, width) // 3)
    return side, side


def comparison_figure(title: str, panels: Sequence[tuple[str, np.ndarray]], box: tuple[int, int, int, int]) -> Figure:
    """Row 1: every panel (HxWx3 uint8, same size) with the box drawn; row 2: the box zoomed."""
    x, y, w, h = box
    height, width = panels[0][1].shape[:2]
    panel_width, aspect = 2.4, height / width
    zoom_aspect = h / w
    fig = Figure(figsize=(panel_width * len(panels), panel_width * (aspect + zoom_aspect) + 0.5), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False, height_ratios=(aspect, zoom_aspect))
    for col, (label, image) in enumerate(panels):
        top, zoom = axes[0, col], axes[1, col]
        top.imshow(image, interpolation="nearest")
        top.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="red", linewidth=1.2))
        top.set_title(label, fontsize="small")
        zoom.imshow(image[y:y + h, x:x + w], interpolation="nearest")
        for ax in (top, zoom):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize="small")
    return fig
