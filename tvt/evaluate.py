"""Evaluation stage: restore the test split with every configured method and score it.

Writes ``results/metrics.json`` (for ``dvc metrics show`` and MLflow) and a markdown/CSV
table per image subset (photos, rendered text, all). Methods are looked up in
:data:`METHODS`; a training-free bicubic baseline is always available.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tvt.data.manifest import read_manifest

log = logging.getLogger(__name__)


def load_image(path: Path) -> torch.Tensor:
    """PNG -> float tensor (3,H,W) in [0,1]."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def save_image(tensor: torch.Tensor, path: Path) -> None:
    arr = (tensor.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def bicubic_upscaler(scale: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training-free lower bound: bicubic interpolation (antialias off when upscaling)."""

    def restore(lr: torch.Tensor) -> torch.Tensor:
        sr = torch.nn.functional.interpolate(lr[None], scale_factor=scale, mode="bicubic", align_corners=False)
        return sr[0].clamp(0, 1)

    return restore


def build_method(name: str, cfg: Mapping) -> Callable[[torch.Tensor], torch.Tensor]:
    scale = cfg["degrade"]["scale"]
    if name == "bicubic":
        return bicubic_upscaler(scale)
    raise NotImplementedError(f"method {name!r} is not available in this version of tvt")


def markdown_table(rows: list[dict], metrics: list[str], title: str) -> str:
    """Methods x metrics, best value per column in bold."""
    from tvt.metrics.fidelity import higher_is_better

    best = {}
    for m in metrics:
        values = [r[m] for r in rows]
        best[m] = max(values) if higher_is_better(m) else min(values)
    head = "| method | n | " + " | ".join(f"{m} {'↑' if higher_is_better(m) else '↓'}" for m in metrics) + " |"
    lines = [f"### {title}", "", head, "|" + "---|" * (len(metrics) + 2)]
    for r in rows:
        cells = [f"**{r[m]:.4f}**" if r[m] == best[m] and len(rows) > 1 else f"{r[m]:.4f}" for m in metrics]
        lines.append(f"| {r['method']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate(cfg: Mapping, pairs_csv: Path, tables_dir: Path, metrics_file: Path, run) -> dict:
    """Score every method of ``cfg['evaluate']`` on the test split of ``pairs_csv``."""
    from tqdm import tqdm

    from tvt.metrics.fidelity import score

    ev = cfg["evaluate"]
    root = pairs_csv.parent
    test = [r for r in read_manifest(pairs_csv) if r["split"] == "test"]
    if not test:
        raise ValueError(f"{pairs_csv}: no test pairs to evaluate")
    subsets = {"all": test, **{k: [r for r in test if r["kind"] == k] for k in sorted({r["kind"] for r in test})}}
    per_image: list[dict] = []
    for method in ev["methods"]:
        restore = build_method(method, cfg)
        for row in tqdm(test, desc=f"evaluate {method}", unit="img"):
            lr, hr = load_image(root / row["lr_path"]), load_image(root / row["hr_path"])
            with torch.no_grad():
                sr = restore(lr)
            record = {"method": method, "pair_id": row["pair_id"], "kind": row["kind"]}
            for name in ev["metrics"]:
                record[name] = score(name, sr, hr, ev["crop_border"])
            per_image.append(record)
    summary: dict = {"test_set": f"{cfg['mode']}-test", "crop_border": ev["crop_border"], "subsets": {}}
    text = []
    for subset, rows in subsets.items():
        ids = {r["pair_id"] for r in rows}
        table_rows = []
        for method in ev["methods"]:
            recs = [p for p in per_image if p["method"] == method and p["pair_id"] in ids]
            entry = {"method": method, "n": len(recs), **{m: float(np.mean([p[m] for p in recs])) for m in ev["metrics"]}}
            table_rows.append(entry)
            summary["subsets"].setdefault(subset, {})[method] = {k: v for k, v in entry.items() if k != "method"}
        title = (f"{subset} ({cfg['mode']} test split; PSNR/SSIM on Y of YCbCr, "
                 f"{ev['crop_border']} px border cropped)")
        text.append(markdown_table(table_rows, ev["metrics"], title))
        with open(tables_dir / f"metrics_{subset}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["method", "n", *ev["metrics"]])
            writer.writeheader()
            writer.writerows(table_rows)
    report = "\n\n".join(text) + "\n"
    (tables_dir / "metrics.md").write_text(report)
    with open(tables_dir / "per_image.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["method", "pair_id", "kind", *ev["metrics"]])
        writer.writeheader()
        writer.writerows(per_image)
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(summary, indent=2) + "\n")
    for subset, methods in summary["subsets"].items():
        for method, values in methods.items():
            run.log_metrics({f"{subset}.{method}.{m}": values[m] for m in ev["metrics"]})
    run.log_artifact(tables_dir)
    run.log_artifact(metrics_file)
    print(report)
    return summary
