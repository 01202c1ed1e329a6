"""Paper-shaped tables and figures from an evaluation summary (the ``results/metrics.json`` dict).

* Table 2 shape: methods × image-quality metrics, one table per test subset, best value
  per column in **bold** and the second best underlined;
* Table 3 shape: text legibility (OCR ACC / NED / CharAcc, overall and per text height),
  with HR as the upper bound of the protocol (not ranked);
* Table 4 shape: denoising steps, parameters, MACs of the paper-size architecture and the
  latency measured here;
* ablation tables, when the methods include the paper's variants (``t1``, ``tvt_s4``...);
* figures: OCR accuracy against text height, and comparison grids
  LR | methods | HR with a zoom on the region where the methods disagree most.

Every table is written as markdown, CSV and JSON; nothing here computes a metric.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from tvt.metrics.ocr import OCR_LABELS, OCR_METRICS
from tvt.metrics.suite import METRICS

HR_ROW = "HR"
PAIRING_NOTES = {
    "paired": "Real LR/HR pairs (LR taken by a camera, never synthetically degraded).",
    "synthetic": "LR synthesised from HR with the Real-ESRGAN second-order degradation (OSEDiff's parameters).",
}
_DECIMALS = {"psnr_y": 2, "fid": 2, "musiq": 2, "niqe": 3, "qalign": 3, "latency_ms": 1, "params_M": 2, "paper_params_M": 1,
             "paper_gmacs": 1, "steps": 0, "n": 0}

#: ablation family -> (title, variant names without the "tvt_" prefix), docs/method.md §1.1–1.3
ABLATIONS = {
    "vae": ("VAE-D4 architecture: V1 (128/256/512 + mid-block), V2 (128/256/512) vs TVT", ("v1", "v2")),
    "transfer": ("Transfer VAE training: T1 (from scratch), T2 (latent L2 alignment) vs TVT", ("t1", "t2")),
    "design": ("Architecture: S1 (OSEDiff) … S5 (pruned UNet) vs TVT (CE-UNet)", ("s1", "s2", "s3", "s4", "s5")),
}
_ABLATION_NAME = re.compile(r"^(?:tvt_)?([vts]\d)$")

#: method -> row of tvt.complexity.compute_complexity with its paper-size architecture
ARCHITECTURES = {
    "tvt": "TVT restorer (E4 + CE-UNet + D4)",
    "osediff": "OSEDiff restorer (E8 + UNet + D8)",
    "s1": "OSEDiff restorer (E8 + UNet + D8)",
    "tvt_s1": "OSEDiff restorer (E8 + UNet + D8)",
    "stablesr": "StableSR restorer (E8 + 200 steps + CFW-D8)",
}


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    higher_is_better: bool | None = None  # None: not ranked

    @property
    def header(self) -> str:
        arrow = {True: " ↑", False: " ↓", None: ""}[self.higher_is_better]
        return self.label + arrow


@dataclass
class Table:
    """Rows of ``{"method": name, column key: value or None}``; reference rows are not ranked."""

    name: str  # file stem
    title: str
    columns: list[Column]
    rows: list[dict]
    reference_rows: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    def ranks(self) -> dict[tuple[str, str], int]:
        """{(method, key): 1 or 2} for the best and second-best distinct value per ranked column."""
        ranks = {}
        for col in self.columns:
            if col.higher_is_better is None:
                continue
            scored = [(r["method"], r[col.key]) for r in self.rows
                      if r["method"] not in self.reference_rows and _is_number(r.get(col.key))]
            if len(scored) < 2:
                continue
            distinct = sorted({v for _, v in scored}, reverse=col.higher_is_better)
            for method, value in scored:
                if value == distinct[0]:
                    ranks[(method, col.key)] = 1
                elif len(distinct) > 1 and value == distinct[1]:
                    ranks[(method, col.key)] = 2
        return ranks

    def markdown(self) -> str:
        ranks = self.ranks()
        lines = [f"### {self.title}", "", "| Method | " + " | ".join(c.header for c in self.columns) + " |",
                 "|---|" + "---:|" * len(self.columns)]
        for row in self.rows:
            cells = []
            for col in self.columns:
                text = format_value(col.key, row.get(col.key))
                rank = ranks.get((row["method"], col.key))
                cells.append(f"**{text}**" if rank == 1 else f"<u>{text}</u>" if rank == 2 else text)
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
        if self.notes:
            lines += [""] + [f"{note}  " for note in self.notes]  # two spaces: markdown line break
        return "\n".join(lines).rstrip() + "\n"

    def to_json(self) -> dict:
        return {"title": self.title,
                "columns": [{"key": c.key, "label": c.label, "higher_is_better": c.higher_is_better}
                            for c in self.columns],
                "rows": self.rows, "notes": self.notes}

    def write(self, directory: Path) -> None:
        """``<name>.md``, ``<name>.csv`` and ``<name>.json`` in ``directory``."""
        (directory / f"{self.name}.md").write_text(self.markdown())
        with open(directory / f"{self.name}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["method", *(c.key for c in self.columns)], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        (directory / f"{self.name}.json").write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_value(key: str, value) -> str:
    if not _is_number(value):
        return "–"
    decimals = _DECIMALS.get(key, 4)
    return f"{value:.{decimals}f}" if decimals else f"{value:.0f}"


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
        if summary["unavailable"]:
            notes.append("Unavailable here (see metrics_status.md): "
                         + ", ".join(METRICS[m].label for m in summary["unavailable"]) + ".")
        tables.append(Table(f"table2_{subset}", f"Image quality — {summary['test_set']} / {subset}",
                            columns, rows, notes=notes))
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
    return Table("table3_text", f"Text legibility — {summary['test_set']} / {subset}", columns, rows,
                 reference_rows=(HR_ROW,), notes=notes)


def complexity_table(summary: Mapping, architecture_rows: Sequence[Mapping] = ()) -> Table:
    """Table 4 shape: steps, parameters, paper-size MACs, measured latency."""
    arch = {row["name"]: row for row in architecture_rows}
    rows = []
    for method, info in summary["complexity"].items():
        paper = arch.get(ARCHITECTURES.get(method, ""), {})
        rows.append({"method": method, "steps": info.get("steps"), "params_M": info.get("params_M"),
                     "paper_params_M": paper.get("params_M"), "paper_gmacs": paper.get("gmacs"),
                     "latency_ms": info.get("latency_ms")})
    columns = [Column("steps", "Steps", False), Column("params_M", "Params (M)", False),
               Column("paper_params_M", "Paper-size params (M)"), Column("paper_gmacs", "Paper-size MACs (G)", False),
               Column("latency_ms", "Latency (ms/img)", False)]
    notes = [(f"Steps: denoising steps (bicubic 0; unknown for external results). Params: the evaluated model. "
              f"Paper-size: the method's SD 2.1-base-scale architecture at 512² output (tvt.complexity, counted on "
              f"the meta device; MACs of convolutions and linear layers). Latency: median per image over the "
              f"{summary['test_set']} test images on {summary.get('device', 'cpu')}; not measured for external "
              f"results.")]
    return Table("table4_complexity", "Complexity", columns, rows, notes=notes)


def ablation_tables(summary: Mapping) -> list[Table]:
    """One table per ablation family present among the evaluated methods, TVT as the reference."""
    subset = next((s for s in ("photo", "all") if s in summary["subsets"]), next(iter(summary["subsets"])))
    image = summary["subsets"][subset]
    ocr_rows = (summary.get("ocr") or {}).get("rows", {})
    tables = []
    for family, (title, variants) in ABLATIONS.items():
        members = [m for m in summary["methods"] if (match := _ABLATION_NAME.match(m)) and match.group(1) in variants]
        if not members:
            continue
        methods = members + [m for m in summary["methods"] if m == "tvt"]
        keys = [k for k in summary["metrics"] if k not in summary["unavailable"]
                and any(k in image.get(m, {}) for m in methods)]
        columns = [Column(k, METRICS[k].label, METRICS[k].higher_is_better) for k in keys]
        rows = [{"method": m, **{k: image.get(m, {}).get(k) for k in keys}} for m in methods]
        if ocr_rows:
            columns += [Column(f"ocr_{m}", f"Text {OCR_LABELS[m]}", True) for m in ("acc", "ned")]
            for row in rows:
                row.update({f"ocr_{m}": ocr_rows.get(row["method"], {}).get(m) for m in ("acc", "ned")})
        tables.append(Table(f"ablation_{family}", f"Ablation — {title} ({subset})", columns, rows))
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
