"""`tvt sr` on damaged files: random bytes and real images corrupted after their header.

Bounded and seeded (60 cases, one batch): every file ends either restored (a valid image of
4x its size) or rejected with exactly one line naming it — never a traceback, never a stopped
batch, never a partial output.
"""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_sr import error_lines, run_sr, save_tiny_restorer

from tvt import sr

CASES = 60
SEED = 20261122
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif", "WEBP": ".webp"}
HEADER_BYTES = 64  # corruption starts after this: the file still identifies as its format
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBP", b""]


def _valid_image(rng: np.random.Generator, fmt: str) -> bytes:
    side = int(rng.integers(8, 17))
    pixels = rng.integers(0, 256, (side, side + 3, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _corrupted(rng: np.random.Generator, data: bytes) -> bytes:
    """Random damage past the header: overwritten bytes, a cut, or inserted garbage."""
    data = bytearray(data)
    start = min(HEADER_BYTES, len(data) - 1)
    kind = rng.integers(3)
    if kind == 0:
        for position in rng.integers(start, len(data), size=int(rng.integers(1, 16))):
            data[position] = int(rng.integers(256))
    elif kind == 1:
        del data[int(rng.integers(start, len(data))):]
    else:
        position = int(rng.integers(start, len(data)))
        data[position:position] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    return bytes(data)


def _cases(folder: Path) -> list[Path]:
    rng = np.random.default_rng(SEED)
    paths = []
    for i in range(CASES):
        if i % 3 == 0:  # random bytes, some behind a real format signature
            magic = MAGIC[int(rng.integers(len(MAGIC)))]
            data = magic + rng.integers(0, 256, int(rng.integers(0, 2000)), dtype=np.uint8).tobytes()
            suffix = list(FORMATS.values())[int(rng.integers(len(FORMATS)))]
        else:
            fmt = list(FORMATS)[int(rng.integers(len(FORMATS)))]
            data, suffix = _corrupted(rng, _valid_image(rng, fmt)), FORMATS[fmt]
        paths.append(folder / f"case{i:02d}{suffix}")
        paths[-1].write_bytes(data)
    return paths


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_tiny_restorer(tmp_path_factory.mktemp("sr-fuzz-weights") / "tvt")


def test_damaged_files_are_restored_or_rejected_in_one_line(weights, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    inputs = _cases(src)
    code, stdout, err = run_sr(capsys, src, "-o", out, "--weights", weights)

    assert code in (sr.EXIT_OK, sr.EXIT_FAILED)
    assert "Traceback" not in err
    lines = error_lines(err)
    rejected = {line.split(": ", 2)[1] for line in lines}
    assert len(rejected) == len(lines)  # one line per rejected file
    restored = 0
    for path in inputs:
        output = out / sr.output_name(path.relative_to(src))
        if str(path) in rejected:
            assert not output.exists()
        else:
            with Image.open(path) as original, Image.open(output) as result:
                size = original.size
                result.load()
                assert result.size == (4 * size[0], 4 * size[1])
            restored += 1
    assert f"{restored} restored, 0 skipped (output exists; --overwrite redoes it), {len(lines)} failed" in stdout
    assert restored > 5 and len(lines) > CASES // 3  # both outcomes are exercised
    assert not [p for p in out.rglob(".*")]  # no partial files
