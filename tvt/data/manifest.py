"""Manifests: CSV files that list a stage's images with checksums, splits and provenance.

Every stage after data preparation finds its images through a manifest, never by globbing
a folder, so it sees exactly the images that were built and can prove they are unchanged
(:func:`verify_manifest`). The data manifest has the columns :data:`COLUMNS`; later
stages write their own (e.g. the degradation stage's pairs, keyed by ``pair_id`` with
``hr_path``/``hr_sha256`` and ``lr_path``/``lr_sha256``), read through the same functions.

Conventions shared by all manifests: the first column is the unique key and rows are
sorted by it; paths are POSIX and relative to the manifest's folder; a column ``X_sha256``
(or ``sha256``) holds the checksum of the file in ``X_path`` (or ``path``).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from pathlib import Path

COLUMNS = (
    "id", "path", "width", "height", "sha256", "split", "source", "licence",
    "kind", "text", "text_px", "font", "lang", "background",
)
"""Columns of the data manifest. The last five are filled for rendered text only."""

SPLITS = ("train", "val", "test")
KINDS = ("photo", "text", "page")
"""``photo``; ``text``: one rendered line, kept whole (the OCR benchmark); ``page``: a rendered page of
text lines (mini mode's train split), cropped and trained on like a photo."""
TRAINING_KINDS = ("photo", "page")
"""The kinds the training stages read: crops that share one size, so they batch."""
INT_COLUMNS = ("width", "height", "text_px", "crop_x", "crop_y")
"""Read as int (None when empty) wherever a manifest has them."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(rows: list[dict], path: str | Path, columns: Sequence[str] = COLUMNS) -> Path:
    """Write ``rows`` sorted by their key (first column): equal data, identical bytes.

    Raises ValueError if a row's keys differ from ``columns``, a key repeats, or a split
    or kind is unknown. None is written as an empty cell.
    """
    path = Path(path)
    key = columns[0]
    for row in rows:
        _check_row(row, columns, where=f"manifest {path}")
    keys = [row[key] for row in rows]
    if len(set(keys)) != len(keys):
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"manifest {path}: duplicate {key}s {duplicates[:5]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in sorted(rows, key=lambda r: r[key]):
            writer.writerow({c: "" if row[c] is None else row[c] for c in columns})
    return path


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a manifest as dicts of str, with :data:`INT_COLUMNS` as int or None."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = tuple(reader.fieldnames or ())
        if not columns:
            raise ValueError(f"manifest {path}: empty file, no header")
        rows = []
        for line_no, row in enumerate(reader, start=2):
            where = f"manifest {path}, line {line_no}"
            if None in row or None in row.values():
                raise ValueError(f"{where}: {len(columns)} columns expected")
            try:
                for c in INT_COLUMNS:
                    if c in row:
                        row[c] = int(row[c]) if row[c] else None
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            _check_row(row, columns, where)
            rows.append(row)
    return rows


def verify_manifest(path: str | Path) -> list[dict]:
    """Recompute every checksummed file's SHA-256; raise ValueError naming the first bad one.

    Returns the rows when every file exists and matches. A row whose path and sha256 are both empty
    declares that file not written (the degrade stage's HR-only train split has no LR).
    """
    path = Path(path)
    rows = read_manifest(path)
    if not rows:
        return rows
    pairs = [(c, c.removesuffix("path") + "sha256") for c in rows[0]
             if c == "path" or c.endswith("_path")]
    pairs = [(p, s) for p, s in pairs if s in rows[0]]
    if not pairs:
        raise ValueError(f"manifest {path}: no path column with a sha256 column to verify")
    key = next(iter(rows[0]))
    for row in rows:
        for path_column, sha_column in pairs:
            if not row[path_column] and not row[sha_column]:
                continue
            file = path.parent / row[path_column]
            if not file.is_file():
                raise ValueError(f"manifest {path}: file missing for {row[key]}: {file}")
            actual = sha256_file(file)
            if actual != row[sha_column]:
                raise ValueError(f"manifest {path}: checksum mismatch for {row[key]}: {file} "
                                 f"has sha256 {actual}, manifest says {row[sha_column]}")
    return rows


def _check_row(row: dict, columns: Sequence[str], where: str) -> None:
    name = row.get(columns[0])
    if set(row) != set(columns):
        missing, extra = sorted(set(columns) - set(row)), sorted(set(row) - set(columns))
        raise ValueError(f"{where}: row {name!r} missing {missing}, extra {extra}")
    if "split" in row and row["split"] not in SPLITS:
        raise ValueError(f"{where}: row {name!r} has split {row['split']!r}, not one of {SPLITS}")
    if "kind" in row and row["kind"] not in KINDS:
        raise ValueError(f"{where}: row {name!r} has kind {row['kind']!r}, not one of {KINDS}")
