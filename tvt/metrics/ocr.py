"""Text legibility: a recogniser reads each restored text line, scored against the ground truth.

The recogniser is Tesseract 5 (Debian ``tesseract-ocr`` with ``-eng`` and ``-chi-sim``)
through pytesseract, in single-line mode (``--psm 7``): one pair = one rendered line, read
from the SR image exactly as saved (8-bit, output resolution, no preprocessing). Reading
HR gives the upper bound of the protocol, reading bicubic a training-free lower bound.

Strings are compared after :func:`normalise` (NFKC, case folded, whitespace removed:
Tesseract's Chinese model puts spaces between characters, and spacing is not what SR
restores). With ``ED`` the Levenshtein distance between the recognised string ``p`` and
the ground truth ``g``, per line:

* **ACC** (line accuracy, Real-CE's ACC): 1 if ``p == g`` else 0;
* **NED** (normalised edit distance *similarity*, Real-CE's NED and ICDAR 2019's
  "1-N.E.D"): ``1 - ED(p, g) / max(|p|, |g|)``, 1 for a perfect read (both empty: 1);
* **CharAcc** (character accuracy, as in OCR engine evaluations): ``max(0, 1 - ED(p, g) / |g|)``.

All three are averaged over lines; higher is better.
"""

from __future__ import annotations

import os
import shutil
import unicodedata
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Self

import numpy as np
from PIL import Image

#: dataset language code -> Tesseract traineddata
TESSERACT_LANGUAGES = {"en": "eng", "zh": "chi_sim"}
TESSERACT_CONFIG = "--psm 7"  # treat the image as a single text line
OCR_METRICS = ("acc", "ned", "char_acc")
OCR_LABELS = {"acc": "ACC", "ned": "NED", "char_acc": "CharAcc"}


def normalise(text: str) -> str:
    """NFKC, case folded, all whitespace removed."""
    return "".join(unicodedata.normalize("NFKC", text).casefold().split())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insertions, deletions, substitutions)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def line_scores(predicted: str, truth: str) -> dict[str, float]:
    """ACC, NED and CharAcc of one line (see the module docstring), on normalised strings."""
    p, g = normalise(predicted), normalise(truth)
    distance = edit_distance(p, g)
    return {
        "acc": float(p == g),
        "ned": 1.0 - distance / max(len(p), len(g)) if (p or g) else 1.0,
        "char_acc": max(0.0, 1.0 - distance / len(g)) if g else float(not p),
    }


def aggregate(lines: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean of :func:`line_scores` over lines, with their number ``n``."""
    lines = list(lines)
    if not lines:
        return {"n": 0}
    return {"n": len(lines), **{m: float(np.mean([line[m] for line in lines])) for m in OCR_METRICS}}


@lru_cache(maxsize=1)
def _installed_languages() -> frozenset[str]:
    import pytesseract

    return frozenset(pytesseract.get_languages(config=""))


def unavailable_reason(languages: Sequence[str] = ("en",)) -> str | None:
    """None when Tesseract can read these dataset languages, else ``"unavailable (needs ...)"``."""
    if shutil.which("tesseract") is None:
        return "unavailable (needs tesseract-ocr)"
    unknown = sorted(set(languages) - set(TESSERACT_LANGUAGES))
    if unknown:
        raise ValueError(f"no Tesseract model known for text language(s) {unknown}; known: {sorted(TESSERACT_LANGUAGES)}")
    missing = sorted({TESSERACT_LANGUAGES[lang] for lang in languages} - _installed_languages())
    if missing:
        packages = ", ".join("tesseract-ocr-" + m.replace("_", "-") for m in missing)
        return f"unavailable (needs {packages})"
    return None


def tesseract_version() -> str:
    import pytesseract

    return str(pytesseract.get_tesseract_version())


def recognise(image: Image.Image | np.ndarray, lang: str) -> str:
    """The text Tesseract reads in a one-line image (RGB or grey, uint8)."""
    import pytesseract

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return pytesseract.image_to_string(image, lang=TESSERACT_LANGUAGES[lang], config=TESSERACT_CONFIG).strip()


class LineReader:
    """Reads many lines side by side: a :func:`recognise` call is one Tesseract process that mostly
    starts and loads its model, so the lines are read by one process per usable core while the caller
    goes on (restoring the next image); the strings read are the same (``bench/bench_ocr.py`` measures
    the gain, ``tests/test_ocr.py`` the equality). The environment is left alone: ``OMP_THREAD_LIMIT=1``
    would make each Tesseract a little faster, but set in this process it reaches every later child
    (a training stage with it ran its backward passes hundreds of times slower)."""

    def __init__(self, workers: int | None = None):
        self._pool = ThreadPoolExecutor(workers or len(os.sched_getaffinity(0)), thread_name_prefix="ocr")

    def submit(self, image: Image.Image | np.ndarray, lang: str) -> Future[str]:
        """The text of one line, once read (:func:`recognise`)."""
        return self._pool.submit(recognise, image, lang)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
