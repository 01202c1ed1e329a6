"""OCR legibility metrics: exact definitions on known strings, Tesseract on rendered lines."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from tvt.data.text_render import latin_fonts, random_line, render_text_line
from tvt.metrics import ocr

needs_tesseract = pytest.mark.skipif(ocr.unavailable_reason(["en"]) is not None,
                                     reason="tesseract-ocr with English is not installed")


# --- definitions -----------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b", "distance"), [
    ("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("flaw", "lawn", 2), ("你好世界", "你好", 2), ("same", "same", 0),
])
def test_edit_distance(a, b, distance):
    assert ocr.edit_distance(a, b) == distance == ocr.edit_distance(b, a)


def test_line_scores_on_known_strings():
    # a one-character error in an 8-character code (after normalisation: "kx729qf" vs "kx7-29qf")
    assert ocr.line_scores("KX7 29QF", "KX7-29QF") == {"acc": 0.0, "ned": pytest.approx(1 - 1 / 8),
                                                       "char_acc": pytest.approx(1 - 1 / 8)}
    # case and spacing are not what SR restores; Tesseract spaces out Chinese characters
    assert ocr.line_scores("Hello  World", "hello world")["acc"] == 1.0
    assert ocr.line_scores("你 好 世 界", "你好世界") == {"acc": 1.0, "ned": 1.0, "char_acc": 1.0}
    # NED normalises by the longer string, CharAcc by the truth (and is clipped at 0)
    assert ocr.line_scores("abcdefgh", "ab") == {"acc": 0.0, "ned": pytest.approx(2 / 8), "char_acc": 0.0}
    assert ocr.line_scores("", "abcd") == {"acc": 0.0, "ned": 0.0, "char_acc": 0.0}
    assert ocr.line_scores("", "") == {"acc": 1.0, "ned": 1.0, "char_acc": 1.0}


def test_aggregate_averages_lines():
    lines = [ocr.line_scores("abcd", "abcd"), ocr.line_scores("abce", "abcd")]
    assert ocr.aggregate(lines) == {"n": 2, "acc": 0.5, "ned": pytest.approx(0.875), "char_acc": pytest.approx(0.875)}
    assert ocr.aggregate([]) == {"n": 0}


# --- availability ----------------------------------------------------------------------------


def test_missing_tesseract_is_reported(monkeypatch):
    monkeypatch.setattr(ocr.shutil, "which", lambda name: None)
    assert ocr.unavailable_reason(["en"]) == "unavailable (needs tesseract-ocr)"


def test_missing_language_pack_is_reported(monkeypatch):
    monkeypatch.setattr(ocr.shutil, "which", lambda name: "/usr/bin/tesseract")
    monkeypatch.setattr(ocr, "_installed_languages", lambda: frozenset({"eng", "osd"}))
    assert ocr.unavailable_reason(["en"]) is None
    assert ocr.unavailable_reason(["en", "zh"]) == "unavailable (needs tesseract-ocr-chi-sim)"
    with pytest.raises(ValueError, match="'fr'"):
        ocr.unavailable_reason(["fr"])


# --- Tesseract on rendered text --------------------------------------------------------------


def _lines(px: int, count: int, seed: int) -> list[tuple[str, Image.Image]]:
    font = next(f for f in latin_fonts() if f.name.startswith("DejaVu Sans"))
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        text = random_line(rng, "en", font.load(px), 320 - 2 * px)
        out.append((text, render_text_line(text, font, px, 320)))
    return out


def _bicubic_x4(image: Image.Image) -> Image.Image:
    w, h = image.size
    return image.resize((w // 4, h // 4), Image.BICUBIC).resize((w, h), Image.BICUBIC)


@pytest.mark.slow
@needs_tesseract
def test_hr_text_at_24px_is_read():
    scores = ocr.aggregate(ocr.line_scores(ocr.recognise(image, "en"), text) for text, image in _lines(24, 6, seed=1))
    assert scores["n"] == 6 and scores["acc"] >= 0.9 and scores["ned"] >= 0.97


@pytest.mark.slow
@needs_tesseract
def test_bicubic_degraded_16px_text_reads_worse_than_hr():
    lines = _lines(16, 6, seed=2)
    hr = ocr.aggregate(ocr.line_scores(ocr.recognise(image, "en"), text) for text, image in lines)
    bicubic = ocr.aggregate(ocr.line_scores(ocr.recognise(_bicubic_x4(image), "en"), text) for text, image in lines)
    assert hr["char_acc"] >= 0.9
    assert bicubic["char_acc"] < hr["char_acc"] - 0.2 and bicubic["ned"] < hr["ned"] and bicubic["acc"] <= hr["acc"]


@needs_tesseract
@pytest.mark.slow  # starts tesseract (pytesseract), which the fast tier does not
def test_recognise_accepts_arrays_and_reads_one_line():
    import numpy as np

    text, image = _lines(32, 1, seed=3)[0]
    assert ocr.normalise(ocr.recognise(np.asarray(image), "en")) == ocr.normalise(text)
    assert "\n" not in ocr.recognise(image, "en")


@needs_tesseract
@pytest.mark.slow  # starts tesseract processes
def test_lines_read_side_by_side_are_the_lines_read_one_by_one():
    """LineReader runs Tesseract processes concurrently: each line must still read exactly as alone, each
    future must hold its own line's text (degraded lines, so the strings differ from the truth and from
    each other), and this process's environment -- which every later child inherits -- is left alone."""
    import os

    environment = dict(os.environ)
    images = [_bicubic_x4(image) for _, image in _lines(16, 6, seed=4)] + [image for _, image in _lines(24, 2, seed=5)]
    alone = [ocr.recognise(image, "en") for image in images]
    assert len(set(alone)) == len(alone)
    with ocr.LineReader(workers=3) as reader:
        futures = [reader.submit(image, "en") for image in images]
    assert [f.result() for f in futures] == alone
    assert dict(os.environ) == environment
