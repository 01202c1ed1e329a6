"""Rendered single-line text: the fine-structure probe that a VAE-D8 latent cannot keep.

TVT's claim is that small text survives a 4× latent but not an 8× one (docs/method.md §1).
Scene-text test sets cannot be downloaded here, so we render our own: one line per image,
so an OCR reading of the SR output can be scored per line against a known ground truth.

Strings mix plain English words with random codes such as ``KX7-29QF``: a recogniser
cannot complete a code from language statistics, so OCR accuracy measures pixels, not
priors. Codes avoid ``0/O`` and ``1/I``, which even a perfect image leaves ambiguous.

Glyphs are laid out with Pillow's BASIC engine (not raqm, which only some builds have), so
the same fonts give the same bytes on every machine.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps, ImageStat, features

LANGUAGES = ("en", "zh")
CANVAS_MULTIPLE = 16  # both canvas sides are multiples of 16 (4× scale, VAE-D4 latents)

CJK_FONT_CANDIDATES: tuple[Path, ...] = (
    Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),
    Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"),
    Path("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf"),
)
"""Where Debian installs free CJK fonts (fonts-wqy-microhei, -zenhei, fonts-droid-fallback)."""

_MATPLOTLIB_FONTS = (
    ("DejaVu Sans", "DejaVuSans.ttf"),
    ("DejaVu Serif", "DejaVuSerif.ttf"),
    ("DejaVu Sans Mono", "DejaVuSansMono.ttf"),
)

_EN_WORDS_TEXT = """
able about above across after again against almost along also always among animal
answer apple area around autumn bank basket beach before begin behind below better
between bird black blue board boat body bottle bread bridge bright brown build cable
candle carpet castle chair change circle city clean clock cloud coast coffee color
common copper corner cotton country cover crowd daily dance dark depth desert dinner
distant door double dream drive early earth east engine evening every family farmer
field final finger first floor flower forest friend garden gentle glass golden gravel
green ground harbor heavy hidden history horse house island journey kitchen ladder lake
lamp language large later letter light little market metal middle minute mirror morning
mountain music narrow nature night north number ocean office orange paper pencil people
picture planet plant pocket quiet rabbit railway river road rocket round salt second
shadow silver simple slowly small smooth south spring square station stone storm street
summer sunlight table thunder ticket timber tower train travel valley village water
weather window winter wooden yellow
"""
EN_WORDS: tuple[str, ...] = tuple(_EN_WORDS_TEXT.split())

ZH_CHARS = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过"
    "家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所"
    "本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全"
    "工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教"
    "西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性"
    "通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲"
    "界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认"
    "算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红"
)
"""344 of the most frequent simplified characters (all in GB 2312)."""

CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


@dataclass(frozen=True)
class FontSpec:
    """A font face to render with; ``path=None`` is Pillow's built-in scalable font."""

    name: str
    path: Path | None = None
    index: int = 0  # face inside a .ttc collection

    def load(self, px: int) -> ImageFont.FreeTypeFont:
        """The face at a size of ``px`` pixels per em (cached)."""
        return _load_font(self, px)


@functools.lru_cache(maxsize=256)
def _load_font(font: FontSpec, px: int) -> ImageFont.FreeTypeFont:
    basic = ImageFont.Layout.BASIC
    if font.path is None:
        return ImageFont.load_default(size=px).font_variant(layout_engine=basic)
    return ImageFont.truetype(str(font.path), px, index=font.index, layout_engine=basic)


def latin_fonts() -> list[FontSpec]:
    """DejaVu Sans / Serif / Sans Mono from matplotlib's wheel, and Pillow's own font."""
    fonts = []
    if importlib.util.find_spec("matplotlib") is not None:
        folder = importlib.resources.files("matplotlib").joinpath("mpl-data/fonts/ttf")
        for name, filename in _MATPLOTLIB_FONTS:
            path = Path(str(folder.joinpath(filename)))
            if path.is_file():
                fonts.append(FontSpec(name, path))
    if features.check("freetype2"):  # load_default(size=...) is scalable only with FreeType
        fonts.append(FontSpec("Pillow default (Aileron)"))
    return fonts


def cjk_fonts() -> list[FontSpec]:
    """Installed CJK fonts among :data:`CJK_FONT_CANDIDATES` (empty when none is)."""
    return [FontSpec(ImageFont.truetype(str(p), 16).getname()[0], p)
            for p in CJK_FONT_CANDIDATES if p.is_file()]


def fonts_for(lang: str) -> list[FontSpec]:
    """Fonts that cover a language's script."""
    if lang == "en":
        return latin_fonts()
    if lang == "zh":
        return cjk_fonts()
    raise ValueError(f"unknown text language {lang!r}; expected one of {LANGUAGES}")


def random_code(rng: random.Random) -> str:
    """A licence-plate-like code, e.g. ``KX7-29QF``: no language model can guess it."""
    head = "".join(rng.choices(CODE_ALPHABET, k=rng.randint(2, 4)))
    tail = "".join(rng.choices(CODE_ALPHABET, k=rng.randint(3, 5)))
    return f"{head}-{tail}"


def random_line(rng: random.Random, lang: str, font: ImageFont.FreeTypeFont,
                max_width: float) -> str:
    """A random line as long as fits in ``max_width`` pixels (measured with ``getlength``)."""
    if lang == "en":
        def token() -> str:
            roll = rng.random()
            if roll < 0.3:
                return random_code(rng)
            if roll < 0.4:
                return str(rng.randint(10, 99999))
            word = rng.choice(EN_WORDS)
            return word.capitalize() if roll < 0.55 else word
        separator = " "
    elif lang == "zh":
        def token() -> str:
            return rng.choice(ZH_CHARS)
        separator = ""
    else:
        raise ValueError(f"unknown text language {lang!r}; expected one of {LANGUAGES}")

    line = token()
    while font.getlength(line) > max_width and len(line) > 1:  # a lone token too long
        line = line[:-1]
    while True:
        longer = line + separator + token()
        if font.getlength(longer) > max_width:
            return line
        line = longer


def line_margin(px: int) -> int:
    """Blank border around a line: a quarter of the size, so glyphs never touch the edge."""
    return max(2, math.ceil(px / 4))


def line_canvas_size(font: FontSpec, px: int, width: int) -> tuple[int, int]:
    """(width, height) of a line's canvas: height = ascent + descent + margins, up to ×16."""
    if width % CANVAS_MULTIPLE or width <= 0:
        raise ValueError(f"text canvas width {width} is not a positive multiple of {CANVAS_MULTIPLE}")
    ascent, descent = font.load(px).getmetrics()
    height = ascent + descent + 2 * line_margin(px)
    return width, CANVAS_MULTIPLE * math.ceil(height / CANVAS_MULTIPLE)


def render_text_line(text: str, font: FontSpec, px: int, width: int,
                     background: Image.Image | None = None) -> Image.Image:
    """Render ``text`` in one line on a ``width`` × (multiple of 16) RGB canvas.

    ``background=None`` gives black ink on white paper. Otherwise the background is fitted
    (cropped/resized) to the canvas, the ink is black or white, whichever contrasts with the
    mean luminance under the text, and the background is compressed into the other half of
    the 0..255 range, so there is a gap of at least 128 grey levels between ink and any
    background pixel: text stays legible on any photo while the photo keeps its texture.

    Raises ValueError if the rendered glyphs would leave the canvas (no silent clipping).
    """
    size = line_canvas_size(font, px, width)
    face = font.load(px)
    ascent, descent = face.getmetrics()
    margin = line_margin(px)
    origin = (margin, (size[1] - ascent - descent) // 2 + ascent)  # left end of the baseline

    probe = ImageDraw.Draw(Image.new("L", size))
    left, top, right, bottom = probe.textbbox(origin, text, font=face, anchor="ls")
    if left < 0 or top < 0 or right > size[0] or bottom > size[1]:
        raise ValueError(
            f"text {text!r} in {font.name} at {px} px needs box {(left, top, right, bottom)}, "
            f"outside the {size[0]}x{size[1]} canvas; shorten it (see random_line)"
        )

    if background is None:
        canvas, ink = Image.new("RGB", size, "white"), (0, 0, 0)
    else:
        canvas = ImageOps.fit(background.convert("RGB"), size, Image.Resampling.LANCZOS)
        under_text = canvas.convert("L").crop((left, top, right, bottom))
        dark_ink = ImageStat.Stat(under_text).mean[0] >= 128
        ink = (0, 0, 0) if dark_ink else (255, 255, 255)
        lut = [128 + v // 2 if dark_ink else v // 2 for v in range(256)]
        canvas = canvas.point(lut * 3)
    ImageDraw.Draw(canvas).text(origin, text, fill=ink, font=face, anchor="ls")
    return canvas


def render_text_page(rng: random.Random, lang: str, fonts: list[FontSpec], sizes: tuple[int, int], side: int,
                     backgrounds: list[Image.Image | None]) -> Image.Image:
    """A ``side``² page of stacked text lines: sizes drawn from ``sizes`` (inclusive), fonts from
    ``fonts``, each line on a backdrop drawn from ``backgrounds`` (``None``: white paper).

    Why: a training image that is mostly fine strokes. SD's autoencoder learnt text from the text in
    LAION; the mini photos hold none, so without pages the mini autoencoders never see a glyph.
    Lines are set with a leading of px/8 (not a line canvas's wide margins), so glyphs fill the page;
    the last line is cut at the page's bottom edge, as a crop of a real page would be.
    """
    if not fonts:
        raise ValueError(f"no font for text language {lang!r}: cannot render a page")
    page = Image.new("RGB", (side, side), "white")
    y = 0
    while y < side:
        px, font = rng.randint(*sizes), rng.choice(fonts)
        text = random_line(rng, lang, font.load(px), side - 2 * line_margin(px))
        line = render_text_line(text, font, px, side, rng.choice(backgrounds))
        ascent, descent = font.load(px).getmetrics()
        top, leading = (line.height - ascent - descent) // 2, max(1, px // 8)  # the canvas centres the text
        line = line.crop((0, max(0, top - leading), side, min(line.height, top + ascent + descent + leading)))
        page.paste(line, (0, y))
        y += line.height
    return page
