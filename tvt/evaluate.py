"""Evaluation stage: restore the test split with every method, score it, write the paper's tables.

One protocol for every row of every table: a method's output is rounded to 8 bits, as if
saved to PNG, and scored from there, so a folder of PNGs produced elsewhere
(``evaluate.external: {name: folder}``, e.g. StableSR's official outputs, files named
``<pair_id>.png``) is scored exactly like a method run here. Per pair: the image-quality
metrics of :mod:`tvt.metrics.suite` and, for text lines, OCR (:mod:`tvt.metrics.ocr`;
HR is read too, as the upper bound). Per subset: distribution metrics (FID) between the
folders of outputs and of HR images. Unavailable metrics are listed, never guessed.

Test pairs (:func:`load_test_pairs`): in mini mode the test split of the degradation stage's
``pairs.csv``, scored as subsets ``all``, ``photo`` and ``text``. In paper mode
(``evaluate.test_sets``) one subset per test set, in that order, as the paper's Table 2 has
one block per test set: the synthetic sets' pairs from ``pairs.csv`` (their dataset is the
data manifest's ``source`` of their image) and the real LR/HR sets (RealSR, DRealSR, Real-CE)
from the data stage's ``real_pairs.csv``, never degraded. Scene-text pairs with annotated
lines (Real-CE) are read line by line: each line's box is cut from the 8-bit output and from
HR and OCR-ed like a rendered line; the per-size columns of the text table then group lines
by their HR height (:data:`TEXT_PX_BINS`).

Outputs: in ``tables_dir`` (the stage's ``results/tables``) the tables of
:mod:`tvt.reports` as .md/.csv/.json, ``metrics.md`` (all of them), ``metrics_status.md``,
``per_image.csv`` and ``figures/*.png``; ``results/metrics.json`` (DVC metrics);
``results/plots/ocr_{acc,ned}_vs_text_px.csv`` (DVC plots). MLflow: every number on the
stage run as ``<subset>.<method>.<metric>`` (with ``…_ci_low`` / ``…_ci_high``, and the paired
tests' ``<subset>.<a>_vs_<b>.<metric>_p``), plus one nested run per (method, subset) tagged
``tvt.method`` / ``tvt.dataset`` for the UI's side-by-side comparison. Every trained restorer is
logged in its method's first comparison run as an MLflow model (its folder as a pyfunc,
:mod:`tvt.mlflow_model`) with that run's metrics, and registered as ``tvt-<mode>-<method>``
(``evaluate.register_models``, default true); ``metrics.json`` names each method's folder under
``restorers`` (``tvt push`` finds a restorer's metrics there).

Prompts (``evaluate.tagger``, :func:`tvt.config.evaluation_taggers`): a one-step restorer runs with
its stored null prompt, or with tags of every test image's upsampled LR encoded by the SD snapshot's
CLIP text encoder — the one path of ``tvt sr --tagger`` (:func:`tvt.models.prompts.tag_restorer`).
``dape`` is how the official test scripts prompt (Joyies/TVT ``TVT/inferences/inference.py``
``get_validation_prompt``, cswry/OSEDiff ``test_osediff.py`` ``get_validation_prompt``; their
``scripts/test`` give the positive prompt: TVT's ``clean, high-resolution, 8k``, none for OSEDiff).
Each image's tags go to ``tables/tags/<method>/<pair_id>.png.tags.json`` (the name of its output,
as ``tvt sr`` writes them beside it; the outputs themselves are not kept), and ``metrics.json``
``prompts`` and the Table 2 notes say which prompt each restorer ran with.

Statistics (:func:`table_statistics`, :mod:`tvt.stats`): per subset, a bootstrap over its images
gives every mean an interval and every pair of methods a paired test; OCR the same over text
lines. They are stored under ``statistics`` in ``metrics.json`` and drawn by the tables.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tvt import reports, stats
from tvt.config import evaluation_taggers
from tvt.data.manifest import read_manifest
from tvt.data.paper import MANIFEST_FILE, REAL_PAIRS_FILE
from tvt.metrics import ocr
from tvt.metrics.fidelity import quantise
from tvt.metrics.suite import METRICS, MetricSuite, availability
from tvt.stages import method_model_dir

log = logging.getLogger(__name__)

PLOTTED_OCR_METRICS = ("acc", "ned")
TEXT_PX_BINS = (0, 8, 12, 16, 24, 32, 48, 64, 96, 128)
"""Lower edges of the line-size groups of annotated scene text (HR px of a line box's short side)."""


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------


def load_image(path: Path) -> torch.Tensor:
    """PNG -> float tensor (1, 3, H, W) in [0, 1]."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> H×W×3 uint8, rounded as a PNG writer would."""
    return (tensor[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------
# Methods: the rows of the tables
# ------------------------------------------------------------------------------------------


@dataclass
class Method:
    """How a table row obtains its output for a test pair, and what it costs."""

    name: str
    restore: Callable[[torch.Tensor, str], torch.Tensor]  # (LR (1,3,h,w) in [0,1], pair_id) -> SR (1,3,H,W)
    steps: int | None = None  # denoising steps; 0 without diffusion, None when unknown (external)
    params_M: float | None = None
    timed: bool = True  # latency is measured for methods run here, not for external folders
    model: torch.nn.Module | None = None  # the restorer, for method-specific figures (StableSR's w)
    prompt: dict | None = None  # what a restorer conditions on (tvt.models.prompts.describe_prompt)
    model_dir: Path | None = None  # the saved restorer it was loaded from (logged to MLflow as a model)
    #: how the logged MLflow model prompts (tvt.mlflow_model.prompt_config): as this row was scored
    model_prompt: dict | None = None


def bicubic_method(scale: int) -> Method:
    """The training-free lower bound: bicubic interpolation (as the restorers' input)."""

    def restore(lr: torch.Tensor, pair_id: str) -> torch.Tensor:
        return torch.nn.functional.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)

    return Method("bicubic", restore, steps=0, params_M=0.0)


def restorer_method(name: str, restorer: torch.nn.Module, steps: int = 1) -> Method:
    """A restorer network, LR (B,3,h,w) -> SR in [0, 1], as a table row."""
    from tvt.models.prompts import describe_prompt

    restorer = restorer.eval()
    params = sum(p.numel() for p in restorer.parameters()) / 1e6
    return Method(name, lambda lr, pair_id: restorer(lr), steps=steps, params_M=params, model=restorer,
                  prompt=describe_prompt(getattr(restorer, "prompt", None)))


def trained_method(name: str, model_dir: Path, device: torch.device) -> Method:
    """A restorer trained by the pipeline (``resources/models/<name>``): one-step, or StableSR's
    multi-step sampler (its steps are the table's)."""
    from tvt.models.saved import load_restorer

    restorer = load_restorer(model_dir).to(device)
    method = restorer_method(name, restorer, steps=getattr(restorer, "steps", 1))
    method.model_dir = Path(model_dir)
    return method


def external_method(name: str, folder: Path) -> Method:
    """SR images produced elsewhere, ``<folder>/<pair_id>.png``, scored like any method."""

    def restore(lr: torch.Tensor, pair_id: str) -> torch.Tensor:
        path = folder / f"{pair_id}.png"
        if not path.is_file():
            raise FileNotFoundError(f"external results {name!r}: no {path} for test pair {pair_id!r}")
        return load_image(path)

    return Method(name, restore, steps=None, timed=False)


def build_method(name: str, cfg: Mapping, device: torch.device | str = "cpu", model_dir: Path | None = None,
                 text_encoder: Path | None = None) -> Method:
    """The method called ``name`` in ``cfg['evaluate']``: bicubic, an external folder or a trained model
    (from ``model_dir``, default: the newest pipeline run's ``resources/models/<name>``), prompted as
    ``evaluate.tagger`` says (:func:`tag_method`; tags encoded by ``text_encoder``, an SD snapshot,
    default the model's own folder)."""
    external = cfg["evaluate"].get("external") or {}
    if name == "bicubic":
        return bicubic_method(cfg["degrade"]["scale"])
    if name in external:
        return external_method(name, Path(external[name]))
    model_dir = Path(model_dir if model_dir is not None else method_model_dir(name))
    if not model_dir.is_dir():
        raise FileNotFoundError(f"method {name!r}: no trained model at {model_dir} (train it first, "
                                f"or list its outputs under evaluate.external)")
    from tvt.mlflow_model import prompt_config

    method = trained_method(name, model_dir, torch.device(device))
    tagger = evaluation_taggers(cfg).get(name, "none")
    method.model_prompt = prompt_config("none")
    if tagger != "none":
        tag_method(method, tagger, cfg["evaluate"], text_encoder or model_dir)
    return method


def tag_method(method: Method, tagger: str, ev: Mapping, text_encoder: Path) -> None:
    """Prompt ``method``'s restorer with ``tagger``'s tags of each upsampled LR (:func:`tag_restorer`, as
    ``tvt sr --tagger``), weights from ``evaluate.ram_weights`` / ``dape_weights``; errors name the method."""
    from tvt.mlflow_model import prompt_config
    from tvt.models.prompts import describe_prompt, tag_restorer

    try:
        prompt = tag_restorer(method.model, tagger, text_encoder=text_encoder, ram_weights=ev.get("ram_weights"),
                              dape_weights=ev.get("dape_weights"))
    except (TypeError, FileNotFoundError, RuntimeError) as exc:
        raise RuntimeError(f"evaluate.tagger: method {method.name!r} with {tagger} tags: {exc}") from exc
    method.prompt = describe_prompt(prompt)
    method.model_prompt = prompt_config(tagger, text_encoder, ev.get("ram_weights"), ev.get("dape_weights"))


def method_names(cfg: Mapping) -> list[str]:
    ev = cfg["evaluate"]
    names = [*ev["methods"], *(ev.get("external") or {})]
    repeated = sorted({n for n in names if names.count(n) > 1} | ({reports.HR_ROW} & set(names)))
    if repeated:
        raise ValueError(f"evaluate: method names must be unique and not {reports.HR_ROW!r}: {repeated}")
    return names


# ------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------


def _timed(method: Method, lr: torch.Tensor, pair_id: str, device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    sr = method.restore(lr, pair_id)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sr, (time.perf_counter() - start) * 1e3


def _ocr_fields(text: str, truth: str) -> dict:
    return {"ocr_text": text, **{f"ocr_{k}": v for k, v in ocr.line_scores(text, truth).items()}}


class _TextReads:
    """OCR records whose lines are being read (:class:`tvt.metrics.ocr.LineReader`): each record gets its
    ``ocr_*`` fields in :meth:`finish`, so Tesseract reads while the next images are restored."""

    def __init__(self, reader: ocr.LineReader):
        self.reader, self.pending = reader, []

    def read(self, record: dict, image: np.ndarray, line: Mapping) -> dict:
        self.pending.append((record, self.reader.submit(image, line["lang"]), line["text"]))
        return record

    def lines(self, method: str, image: np.ndarray, row: Mapping) -> list[dict]:
        """One OCR record per annotated line of a scene-text pair (its box cut from the H×W×3 image)."""
        records = []
        for index, line in enumerate(json.loads(row["lines"])):
            x0, y0, x1, y1 = line["box"]
            record = {"method": method, "pair_id": row["pair_id"], "kind": "text_line", "line": index,
                      "text_px": text_size_bin(line["px"])}
            records.append(self.read(record, image[y0:y1, x0:x1], line))
        return records

    def finish(self) -> None:
        for record, text, truth in self.pending:
            record.update(_ocr_fields(text.result(), truth))
        self.pending = []


@torch.inference_mode()
def score_method(method: Method, pairs: list[dict], root: Path, suite: MetricSuite, out_dir: Path,
                 read_text: bool, device: torch.device, tags_dir: Path | None = None) -> list[dict]:
    """One record per pair: metrics, OCR fields, latency, MSE (plus one OCR record per annotated
    text line); the 8-bit output is saved under ``out_dir`` and, for a restorer prompted with tags,
    its tags as ``<tags_dir>/<method>/<pair_id>.png.tags.json``. Row paths are relative to ``root``
    (or absolute)."""
    from tqdm import tqdm

    from tvt.models.prompts import write_last_tags

    records = []
    with ocr.LineReader() as reader:
        reads = _TextReads(reader)
        for row in tqdm(pairs, desc=f"evaluate {method.name}", unit="img"):
            lr, hr = load_image(root / row["lr_path"]), load_image(root / row["hr_path"])
            sr, ms = _timed(method, lr.to(device), row["pair_id"], device)
            sr = quantise(sr.float().cpu())
            if sr.shape != hr.shape:
                raise ValueError(f"{method.name}: output {tuple(sr.shape[-2:])} for {row['pair_id']}, "
                                 f"HR is {tuple(hr.shape[-2:])}")
            image = to_uint8(sr)
            path = out_dir / method.name / f"{row['pair_id']}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            if tags_dir is not None:
                write_last_tags(getattr(method.model, "prompt", None), tags_dir / path.relative_to(out_dir))
            record = {"method": method.name, "pair_id": row["pair_id"], "kind": row["kind"],
                      "text_px": row["text_px"], **suite.score_images(sr, hr), "mse": float(((sr - hr) ** 2).mean())}
            if method.timed:
                record["latency_ms"] = ms
            lines = []
            if read_text and row["kind"] == "text":
                if row.get("lines"):
                    lines = reads.lines(method.name, image, row)
                else:
                    reads.read(record, image, row)
            records += [record, *lines]
        reads.finish()
    return records


def text_size_bin(px: int) -> int:
    """The lower edge in :data:`TEXT_PX_BINS` of a line of ``px`` pixels."""
    return max(edge for edge in TEXT_PX_BINS if edge <= px)


def hr_ocr_records(pairs: list[dict], root: Path) -> list[dict]:
    """OCR of the HR text lines: the upper bound of the protocol."""
    records = []
    with ocr.LineReader() as reader:
        reads = _TextReads(reader)
        for row in pairs:
            if row["kind"] != "text":
                continue
            hr = to_uint8(load_image(root / row["hr_path"]))
            if row.get("lines"):
                records += reads.lines(reports.HR_ROW, hr, row)
            else:
                records.append(reads.read({"method": reports.HR_ROW, "pair_id": row["pair_id"], "kind": "text",
                                           "text_px": row["text_px"]}, hr, row))
        reads.finish()
    return records


def ocr_languages(pairs: list[dict]) -> list[str]:
    """Languages of the text to read: of the rendered lines and of the annotated lines."""
    langs = {r["lang"] for r in pairs if r["kind"] == "text" and not r.get("lines")}
    langs |= {line["lang"] for r in pairs if r.get("lines") for line in json.loads(r["lines"])}
    return sorted(langs)


def load_test_pairs(cfg: Mapping, pairs_csv: Path, data_dir: Path | None = None) -> list[dict]:
    """The rows to score (see the module docstring).

    Mini mode: the test split of ``pairs_csv`` as written. Paper mode (``evaluate.test_sets``):
    the synthetic test pairs of ``pairs_csv`` plus the real pairs of ``data_dir/real_pairs.csv``
    that belong to a listed test set, each with ``source`` (its test set), ``pairing``
    (``synthetic`` / ``paired``) and absolute paths (the two tables live in different folders).
    """
    rows = [r for r in read_manifest(pairs_csv) if r["split"] == "test"]
    test_sets = cfg["evaluate"].get("test_sets")
    if not test_sets:
        return rows
    if data_dir is None:
        raise ValueError("evaluate.test_sets: the real test pairs are read from the data stage's folder; "
                         "pass data_dir")
    data_dir = Path(data_dir)
    for table in (MANIFEST_FILE, REAL_PAIRS_FILE):
        if not (data_dir / table).is_file():
            raise FileNotFoundError(f"{data_dir / table} is missing: run the 'data' stage (paper mode scores "
                                    f"the test sets it lists)")
    sources = {r["id"]: r["source"] for r in read_manifest(data_dir / MANIFEST_FILE)}
    unknown = sorted({r["source_id"] for r in rows} - sources.keys())
    if unknown:
        raise ValueError(f"{pairs_csv}: test pairs of images that {data_dir / MANIFEST_FILE} does not list "
                         f"({', '.join(unknown[:3])}): rerun the 'degrade' stage after 'data'")
    pairs = [{**r, "source": sources[r["source_id"]], "pairing": "synthetic"} for r in rows]
    for r in pairs:
        r["lr_path"], r["hr_path"] = (str((pairs_csv.parent / r[k]).resolve()) for k in ("lr_path", "hr_path"))
    for r in read_manifest(data_dir / REAL_PAIRS_FILE):
        if r["split"] == "test":
            pairs.append({**r, "pairing": "paired", **{k: str((data_dir / r[k]).resolve())
                                                         for k in ("lr_path", "hr_path")}})
    pairs = [r for r in pairs if r["source"] in test_sets]
    empty = [name for name in test_sets if not any(r["source"] == name for r in pairs)]
    if empty:
        raise ValueError(f"evaluate.test_sets: no test pairs for {empty} in {pairs_csv} or "
                         f"{data_dir / REAL_PAIRS_FILE} (a synthetic set needs role 'test' and the degrade stage; "
                         f"a paired set its `pairs` layout)")
    return pairs


def evaluation_subsets(pairs: list[dict], test_sets: list[str] | None = None) -> dict[str, list[dict]]:
    """Paper mode (``test_sets``): one subset per test set, in that order. Mini mode: ``all``
    and one subset per kind (photo, text)."""
    if test_sets:
        return {name: [r for r in pairs if r["source"] == name] for name in test_sets}
    subsets = {"all": pairs}
    for kind in sorted({r["kind"] for r in pairs}):
        subsets[kind] = [r for r in pairs if r["kind"] == kind]
    return subsets


def distribution_scores(suite: MetricSuite, outputs: Path, root: Path, subset: list[dict], method: str,
                        work: Path) -> dict[str, float]:
    """FID-like metrics between this subset's outputs and its HR images (folders of links)."""
    if not any(METRICS[n].kind == "distribution" for n in suite.available):
        return {}
    sr_dir, hr_dir = work / "sr", work / "hr"
    for directory in (sr_dir, hr_dir):
        directory.mkdir(parents=True)
    for i, row in enumerate(subset):
        (sr_dir / f"{i:06d}.png").symlink_to((outputs / method / f"{row['pair_id']}.png").resolve())
        (hr_dir / f"{i:06d}.png").symlink_to((root / row["hr_path"]).resolve())
    return suite.score_folders(sr_dir, hr_dir)


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return float(np.mean(values)) if values else None


def ocr_summary(records: list[dict], rows: list[str]) -> dict[str, dict]:
    """Per OCR row (HR and methods): ACC/NED/CharAcc overall and per text height."""
    out = {}
    for name in rows:
        lines = [r for r in records if r["method"] == name and "ocr_acc" in r]
        if not lines:
            continue
        as_scores = [{m: r[f"ocr_{m}"] for m in ocr.OCR_METRICS} for r in lines]
        by_size = {str(px): ocr.aggregate(s for s, r in zip(as_scores, lines, strict=True) if r["text_px"] == px)
                   for px in sorted({r["text_px"] for r in lines})}
        out[name] = {**ocr.aggregate(as_scores), "by_size": by_size}
    return out


def bootstrap_settings(cfg: Mapping) -> stats.Bootstrap:
    """``evaluate.statistics`` (resamples, confidence) with the run's ``seed``: the same resamples every rerun."""
    options = cfg["evaluate"].get("statistics") or {}
    defaults = stats.Bootstrap()
    return stats.Bootstrap(options.get("resamples", defaults.resamples), options.get("confidence", defaults.confidence),
                           int(cfg.get("seed", defaults.seed)))


def score_matrix(records: list[dict], rows: list[str], keys: list[str], item_of: Callable[[dict], object],
                 value_of: Callable[[dict, str], float | None]) -> np.ndarray:
    """(keys, rows, items) scores, NaN where a row has no score for an item; items in first-seen order.

    ``item_of(record)``: the test item a record scores (None: not one of them), the same for every
    row, which is what pairs the rows; ``value_of(record, key)``: its score, or None.
    """
    row_of = {name: i for i, name in enumerate(rows)}
    items: dict[object, int] = {}
    cells = []
    for record in records:
        if record["method"] in row_of and (item := item_of(record)) is not None:
            cells.append((row_of[record["method"]], items.setdefault(item, len(items)), record))
    values = np.full((len(keys), len(rows), len(items)), np.nan)
    for row, item, record in cells:
        for k, key in enumerate(keys):
            if (value := value_of(record, key)) is not None:
                values[k, row, item] = value
    return values


def _ocr_keys(records: list[dict]) -> dict[str, tuple[str, str | None]]:
    """OCR column keys (``acc``, ``acc_16px``...) -> (metric, text size or None for all lines)."""
    sizes = sorted({str(r["text_px"]) for r in records if "ocr_acc" in r}, key=int)
    return {**{m: (m, None) for m in ocr.OCR_METRICS},
            **{f"{m}_{px}px": (m, px) for px in sizes for m in ocr.OCR_METRICS}}


def table_statistics(records: list[dict], names: list[str], subsets: dict[str, list[dict]], image_metrics: list[str],
                     ocr_rows: list[str], bootstrap: stats.Bootstrap) -> dict:
    """The ``statistics`` block of the summary: intervals and paired tests per subset over its images,
    and for OCR over text lines (HR included: how far each method is from the upper bound)."""
    out: dict = {**bootstrap.describe(), "subsets": {}}
    for subset, rows in subsets.items():
        ids = {r["pair_id"] for r in rows}
        values = score_matrix(records, names, image_metrics,
                              lambda r, ids=ids: r["pair_id"] if "line" not in r and r["pair_id"] in ids else None,
                              lambda r, key: r.get(key))
        out["subsets"][subset] = {"items": values.shape[-1], "metrics": {
            key: series.to_json() for key, series in stats.analyse(values, names, image_metrics, bootstrap).items()}}
    if ocr_rows:
        keys = _ocr_keys(records)

        def line_score(record: dict, key: str) -> float | None:
            metric, px = keys[key]
            return record[f"ocr_{metric}"] if px is None or str(record["text_px"]) == px else None

        values = score_matrix(records, ocr_rows, list(keys),
                              lambda r: (r["pair_id"], r.get("line")) if "ocr_acc" in r else None, line_score)
        out["ocr"] = {"items": values.shape[-1], "metrics": {
            key: series.to_json() for key, series in stats.analyse(values, ocr_rows, list(keys), bootstrap).items()}}
    return out


# ------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------


def figure_pairs(records: list[dict], methods: list[str], kind: str | None, count: int) -> list[str]:
    """The ``count`` pairs of a kind (None: any) where the methods disagree most (spread of their
    MSE); with a single method, its hardest pairs."""
    mse: dict[str, list[float]] = {}
    for r in records:
        if "mse" in r and (kind is None or r["kind"] == kind) and r["method"] in methods:
            mse.setdefault(r["pair_id"], []).append(r["mse"])
    spread = {p: (max(v) - min(v)) if len(methods) > 1 else v[0] for p, v in mse.items()}
    return sorted(spread, key=lambda p: (-spread[p], p))[:count]


def comparison_figures(pair_ids: list[str], pairs: dict[str, dict], root: Path, outputs: Path,
                       methods: list[str], scale: int) -> dict[str, object]:
    figures = {}
    for pair_id in pair_ids:
        row = pairs[pair_id]
        hr = np.asarray(Image.open(root / row["hr_path"]).convert("RGB"))
        lr = Image.open(root / row["lr_path"]).convert("RGB")
        lr_up = np.asarray(lr.resize((hr.shape[1], hr.shape[0]), Image.NEAREST))
        srs = [np.asarray(Image.open(outputs / m / f"{pair_id}.png")) for m in methods]
        box = reports.disagreement_box(srs, hr, reports.zoom_size(*hr.shape[:2]))
        panels = [(f"LR (×{scale}, nearest)", lr_up), *zip(methods, srs, strict=True), ("HR", hr)]
        figures[f"compare_{pair_id.replace('/', '__')}"] = reports.comparison_figure(pair_id, panels, box)
    return figures


#: StableSR's CFW weights shown side by side (realism 0 … fidelity 1)
CFW_WEIGHTS = (0.0, 0.5, 1.0)


def cfw_weight_figure(method: Method, pairs: list[dict], root: Path, device: torch.device):
    """StableSR's fidelity–realism dial on one test image: LR | w = 0 | 0.5 | 1 | HR, with a zoom
    where the outputs differ most. The image is the text line with the largest letters if there
    is one (fine structure still legible in the LR, where CFW's fidelity shows), else the first
    test pair. None for other methods."""
    model = method.model
    if model is None or not hasattr(model, "w"):
        return None
    text = [r for r in pairs if r["kind"] == "text" and r.get("text_px")]
    row = max(text, key=lambda r: r["text_px"]) if text else pairs[0]
    lr = load_image(root / row["lr_path"]).to(device)
    hr = np.asarray(Image.open(root / row["hr_path"]).convert("RGB"))
    with torch.no_grad():
        outputs = [to_uint8(model(lr, w=w)) for w in CFW_WEIGHTS]
    lr_up = np.asarray(Image.open(root / row["lr_path"]).convert("RGB").resize((hr.shape[1], hr.shape[0]),
                                                                               Image.NEAREST))
    box = reports.disagreement_box(outputs, hr, reports.zoom_size(*hr.shape[:2]))
    panels = [("LR (nearest)", lr_up), *((f"{method.name} w={w:g}", o) for w, o in zip(CFW_WEIGHTS, outputs)),
              ("HR", hr)]
    return reports.comparison_figure(f"{method.name}: CFW weight w on {row['pair_id']}", panels, box)


# ------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------


def _architecture_rows(methods: list[str], complexity_file: Path, scale: int) -> list[dict]:
    """Paper-size complexity rows (results/complexity.json, else counted now on the meta device)."""
    if not any(m in reports.ARCHITECTURES for m in methods):
        return []
    if complexity_file.is_file():
        return json.loads(complexity_file.read_text())
    from tvt.complexity import compute_complexity

    return compute_complexity(output_size=512, scale=scale)


def _summarise(cfg: Mapping, names: list[str], records: list[dict], subsets: dict[str, list[dict]],
               suite: MetricSuite, distribution: dict, ocr_rows: dict, ocr_status: str, costs: dict[str, dict],
               device: torch.device) -> dict:
    ev = cfg["evaluate"]
    summary: dict = {
        "test_set": f"{cfg['mode']}-test", "crop_border": ev["crop_border"], "device": device.type,
        "methods": names, "metrics": list(ev["metrics"]), "unavailable": dict(suite.unavailable), "subsets": {},
    }
    if ev.get("test_sets"):
        summary["test_sets"] = {name: rows[0]["pairing"] for name, rows in subsets.items()}
    image_metrics = [n for n in suite.available if METRICS[n].kind != "distribution"]
    for subset, rows in subsets.items():
        ids = {r["pair_id"] for r in rows}
        for name in names:
            recs = [r for r in records if r["method"] == name and r["pair_id"] in ids and "line" not in r]
            values = {"n": len(recs), **{m: _mean(recs, m) for m in image_metrics}, **distribution[(subset, name)]}
            summary["subsets"].setdefault(subset, {})[name] = {k: v for k, v in values.items() if v is not None}
    if ocr_rows or ocr_status != "available":
        summary["ocr"] = {"status": ocr_status, "rows": ocr_rows}
        if ocr_rows:
            summary["ocr"]["engine"] = f"tesseract {ocr.tesseract_version()}"
        if ev.get("test_sets"):
            summary["ocr"]["subsets"] = [s for s, rows in subsets.items() if any(r["kind"] == "text" for r in rows)]
            if any(r.get("lines") for rows in subsets.values() for r in rows):
                summary["ocr"]["text_px_bins"] = list(TEXT_PX_BINS)
    summary["statistics"] = table_statistics(records, names, subsets, image_metrics, list(ocr_rows), bootstrap_settings(cfg))
    summary["complexity"] = {}
    for name in names:
        latencies = [r["latency_ms"] for r in records if r["method"] == name and "latency_ms" in r]
        info = {**costs[name], "latency_ms": statistics.median(latencies) if latencies else None}
        summary["complexity"][name] = {k: v for k, v in info.items() if v is not None}
    return summary


def flat_metrics(summary: Mapping) -> dict[str, float]:
    """Every number of the summary as ``<subset>.<method>.<metric>``, ``ocr.<row>.<metric>[_<px>px]``
    and ``complexity.<method>.<key>`` (the MLflow names of the stage run)."""
    flat = {f"{subset}.{method}.{key}": value for subset, methods in summary["subsets"].items()
            for method, values in methods.items() for key, value in values.items()}
    for row, values in (summary.get("ocr") or {}).get("rows", {}).items():
        flat.update({f"ocr.{row}.{m}": values[m] for m in ("n", *ocr.OCR_METRICS)})
        for px, by_size in values["by_size"].items():
            flat.update({f"ocr.{row}.{m}_{px}px": by_size[m] for m in ocr.OCR_METRICS})
    statistics_ = summary.get("statistics") or {}
    blocks = [(subset, doc["metrics"]) for subset, doc in statistics_.get("subsets", {}).items()]
    if statistics_.get("ocr"):
        blocks.append(("ocr", statistics_["ocr"]["metrics"]))
    for prefix, metrics in blocks:
        for key, series in metrics.items():
            flat.update({f"{prefix}.{row}.{key}{suffix}": bound for row, suffix, bound in _bounds(series)})
            flat.update({f"{prefix}.{c['a']}_vs_{c['b']}.{key}_p": c["p"] for c in series["comparisons"]})
    for method, values in summary["complexity"].items():
        flat.update({f"complexity.{method}.{key}": value for key, value in values.items()})
    return {k: float(v) for k, v in flat.items()}


def _bounds(series: Mapping) -> Iterator[tuple[str, str, float]]:
    """(row, ``_ci_low`` / ``_ci_high``, bound) for every interval of one column's statistics."""
    for row, bounds in series["intervals"].items():
        for suffix, bound in zip(("_ci_low", "_ci_high"), bounds, strict=True):
            if bound is not None:
                yield row, suffix, bound


def comparison_runs(summary: Mapping) -> list[tuple[str, str, dict[str, float]]]:
    """(method, subset, metrics) of the nested MLflow runs: one per method and subset; OCR rows
    (HR included) join the text subset(s) (mini: ``text``) and complexity the ``all`` subset
    (paper mode, which has none: every subset)."""
    runs = []
    ocr_rows = (summary.get("ocr") or {}).get("rows", {})
    text_subsets = set((summary.get("ocr") or {}).get("subsets", ["text"]))
    statistics_ = summary.get("statistics") or {}
    ocr_series = (statistics_.get("ocr") or {}).get("metrics", {})
    for subset, methods in summary["subsets"].items():
        is_text = subset in text_subsets
        series = statistics_.get("subsets", {}).get(subset, {}).get("metrics", {})
        for method in [*methods, *([reports.HR_ROW] if is_text and reports.HR_ROW in ocr_rows else [])]:
            metrics = dict(methods.get(method, {}))
            for key, doc in series.items():
                metrics.update({f"{key}{suffix}": bound for row, suffix, bound in _bounds(doc) if row == method})
            if is_text and method in ocr_rows:
                row = ocr_rows[method]
                metrics.update({f"ocr_{m}": row[m] for m in ocr.OCR_METRICS})
                metrics.update({f"ocr_{m}_{px}px": s[m] for px, s in row["by_size"].items() for m in ocr.OCR_METRICS})
                for key, doc in ocr_series.items():
                    metrics.update({f"ocr_{key}{suffix}": bound for row, suffix, bound in _bounds(doc) if row == method})
            if subset == "all" or "all" not in summary["subsets"]:
                metrics.update(summary["complexity"].get(method, {}))
            runs.append((method, subset, {k: float(v) for k, v in metrics.items()}))
    return runs


def log_comparison_runs(run, summary: Mapping, mode: str, restorers: Mapping[str, Path] | None = None,
                        model_prompts: Mapping[str, Mapping] | None = None) -> int:
    """Open the nested (method, subset) runs under ``run`` if it is MLflow's active run; return how many.

    ``restorers`` (method -> saved folder) are logged as MLflow models, each in its method's first
    run (subset ``all`` in mini mode, the first test set in paper mode), with that run's metrics and
    its ``model_prompts`` entry (how it was prompted when scored: :func:`tvt.mlflow_model.prompt_config`)."""
    import mlflow

    active = mlflow.active_run()
    if active is None or active.info.run_id != getattr(run, "run_id", None):
        log.info("no active MLflow stage run: nested comparison runs skipped")
        return 0
    runs = comparison_runs(summary)
    pending = dict(restorers or {})
    for method, subset, metrics in runs:
        tags = {"tvt.kind": "evaluation", "tvt.method": method, "tvt.dataset": f"{summary['test_set']}/{subset}",
                "tvt.subset": subset, "tvt.mode": mode}
        with mlflow.start_run(run_name=f"{method} · {subset}", nested=True, tags=tags):
            mlflow.log_metrics(metrics)
            if method in pending:
                from tvt.mlflow_model import log_restorer_model

                log_restorer_model(pending.pop(method), mode, method, metrics, (model_prompts or {}).get(method))
    return len(runs)


def _status_markdown(summary: Mapping) -> str:
    lines = ["### Metric availability", "", "| Metric | Kind | Better | Status |", "|---|---|---|---|"]
    for name, status in availability(summary["metrics"]).items():
        spec = METRICS[name]
        lines.append(f"| {spec.label} | {spec.kind} | {spec.arrow} | {status} |")
    if "ocr" in summary:
        lines.append(f"| OCR (ACC/NED/CharAcc) | text | ↑ | {summary['ocr']['status']} |")
    return "\n".join(lines) + "\n"


def _write_per_image(records: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def evaluate(cfg: Mapping, pairs_csv: Path, tables_dir: Path, metrics_file: Path, run,
             plots_dir: Path | None = None, complexity_file: Path | None = None,
             data_dir: Path | None = None, model_dirs: Mapping[str, Path] | None = None,
             text_encoder: Path | None = None) -> dict:
    """Score every method of ``cfg['evaluate']`` on the test pairs (:func:`load_test_pairs`); see the module doc.

    ``plots_dir`` defaults to ``<metrics_file dir>/plots``; ``complexity_file`` (paper-size
    complexity rows of tvt.complexity) to ``<metrics_file dir>/complexity.json``; ``data_dir``
    (paper mode: the data stage's output with ``manifest.csv`` and ``real_pairs.csv``) is
    required with ``evaluate.test_sets``; ``model_dirs`` (method -> trained restorer, the pipeline's own) to
    :func:`build_method`'s default; ``text_encoder`` (an SD snapshot with ``tokenizer/`` and ``text_encoder/``,
    the pipeline's prior) encodes the tagged prompts of ``evaluate.tagger``.
    """
    ev = cfg["evaluate"]
    results_dir = Path(metrics_file).parent
    plots_dir = Path(plots_dir) if plots_dir is not None else results_dir / "plots"
    complexity_file = Path(complexity_file) if complexity_file is not None else results_dir / "complexity.json"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = pairs_csv.parent
    pairs = load_test_pairs(cfg, pairs_csv, data_dir)
    if not pairs:
        raise ValueError(f"{pairs_csv}: no test pairs to evaluate")
    names = method_names(cfg)
    subsets = evaluation_subsets(pairs, ev.get("test_sets"))
    suite = MetricSuite(ev["metrics"], ev["crop_border"], device)
    has_text = any(r["kind"] == "text" for r in pairs)
    ocr_status = "disabled" if not ev.get("ocr", True) else (
        ocr.unavailable_reason(ocr_languages(pairs)) or "available")
    read_text = has_text and ocr_status == "available"

    with tempfile.TemporaryDirectory(prefix="tvt-evaluate-") as tmp:
        outputs = Path(tmp) / "outputs"
        records: list[dict] = []
        costs: dict[str, dict] = {}
        prompts: dict[str, dict] = {}  # methods run here: the prompt they conditioned on
        restorers: dict[str, Path] = {}
        model_prompts: dict[str, dict | None] = {}
        method_figures: dict[str, object] = {}
        for name in names:
            method = build_method(name, cfg, device, (model_dirs or {}).get(name), text_encoder)
            records += score_method(method, pairs, root, suite, outputs, read_text, device, tables_dir / "tags")
            costs[name] = {"steps": method.steps, "params_M": method.params_M}
            if method.prompt is not None:
                prompts[name] = method.prompt
            if method.model_dir is not None:
                restorers[name] = method.model_dir
                model_prompts[name] = method.model_prompt
            if (figure := cfw_weight_figure(method, pairs, root, device)) is not None:
                method_figures[f"{name}_cfw_w"] = figure
            del method  # release a trained model before loading the next
        if read_text:
            records += hr_ocr_records(pairs, root)
        distribution = {(subset, name): distribution_scores(suite, outputs, root, rows, name,
                                                             Path(tmp) / "sets" / subset / name)
                        for subset, rows in subsets.items() for name in names}
        ocr_rows = ocr_summary(records, [reports.HR_ROW, *names]) if read_text else {}
        summary = _summarise(cfg, names, records, subsets, suite, distribution, ocr_rows, ocr_status,
                             costs, device)
        summary["prompts"] = prompts
        summary["restorers"] = {name: folder.as_posix() for name, folder in restorers.items()}
        by_id = {r["pair_id"]: r for r in pairs}
        count = ev.get("figure_pairs", 2)
        if ev.get("test_sets"):  # the hardest pairs of every test set
            chosen = [p for rows in subsets.values() for p in figure_pairs(
                [r for r in records if r["pair_id"] in {row["pair_id"] for row in rows}], names, None, count)]
        else:
            chosen = [p for kind in sorted(subsets.keys() & {"photo", "text"})
                      for p in figure_pairs(records, names, kind, count)]
        figures = {**comparison_figures(chosen, by_id, root, outputs, names, cfg["degrade"]["scale"]),
                   **method_figures}

    tables = reports.build_tables(summary, _architecture_rows(names, complexity_file, cfg["degrade"]["scale"]))
    for table in tables:
        table.write(tables_dir)
    status = _status_markdown(summary)
    (tables_dir / "metrics_status.md").write_text(status)
    report = "\n".join(t.markdown() for t in tables) + "\n" + status
    if ev.get("claims") and cfg["mode"] == "mini":  # the paper's effects in miniature
        from tvt import claims

        report += "\n" + claims.evaluation_block(cfg, results_dir, tables_dir, device)
    (tables_dir / "metrics.md").write_text(report)
    _write_per_image(records, tables_dir / "per_image.csv")

    if (figure := reports.ocr_vs_size_figure(summary)) is not None:
        figures["ocr_vs_text_px"] = figure
    (tables_dir / "figures").mkdir(exist_ok=True)
    for name, figure in figures.items():
        figure.savefig(tables_dir / "figures" / f"{name}.png", dpi=150)
    for metric in PLOTTED_OCR_METRICS:
        reports.write_plot_csv(summary, metric, plots_dir / f"ocr_{metric}_vs_text_px.csv")
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")

    run.log_metrics(flat_metrics(summary))
    run.set_tags({"tvt.methods": ",".join(names), "tvt.test_set": summary["test_set"]})
    run.log_artifact(tables_dir)
    run.log_artifact(metrics_file)
    run.log_artifact(plots_dir, "plots")
    log_comparison_runs(run, summary, cfg["mode"], restorers if ev.get("register_models", True) else None,
                        model_prompts)
    print(report)
    return summary
