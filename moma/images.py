"""MoMa's image–caption sources, registered with lm_core's `get_image_source` when this module is imported:

- `builtin[:<count>]` needs no network and no files: glyphs (letters, digits, Greek letters, symbols) rendered with
  the DejaVu fonts matplotlib ships, in a colour, size and position on a background colour, captioned from the
  Unicode character name ("a large red LATIN CAPITAL LETTER A in DejaVu Sans Bold at the top left on a white
  background"). Image i of a split is a pure function of (split seed, i, image_size): any count, random access,
  nothing stored. Captions describe exactly what is drawn, so an early-fusion model can learn both directions.
- `images:<folder>`: the user's own images (PNG, JPEG, ...; subfolders included). Captions come from
  `captions.tsv` / `captions.txt` in the folder (`filename<TAB>caption` per line), else from the file stem.
  Unreadable files are skipped, counted and named in a warning; ~5% go to validation by a hash of the path.

`tfds:<name>[/<config>]`, the views, batching and the `image_captions:` text source are lm_core's
(`lm_core.data.image_sources`); `get_image_source` is re-exported here so that importing it from this module
guarantees MoMa's sources are registered.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import string
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lm_core.data.image_sources import (
    ImageCaption,
    ImageCaptionSource,
    ImageView,
    fit_image,
    get_image_source,
    register_image_source,
)
from lm_core.data.splits import hash_split
from lm_core.errors import UserError, brief

log = logging.getLogger(__name__)

BUILTIN_TRAIN_COUNT = 20_000
BUILTIN_VALIDATION_COUNT = 500
# Split seeds of the builtin source: validation glyphs are drawn from a different stream than training ones.
BUILTIN_SEEDS = {"train": 0, "validation": 1}
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                              ".pnm", ".tga", ".qoi"})
CAPTION_FILES = ("captions.tsv", "captions.txt")

# ---------------------------------------------------------------------------------------------------------------
# builtin: rendered glyphs


# Characters every DejaVu face below has (no tofu boxes) and that fill a box (no '.', '-', '_').
GLYPHS = (string.ascii_uppercase + string.ascii_lowercase + string.digits + "#$%&@?+=*"
          + "ΓΔΘΛΞΠΣΦΨΩ" + "αβγδελμπσω")
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
              "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (245, 220, 30),
           "orange": (245, 140, 20), "purple": (130, 40, 170), "pink": (245, 150, 190), "brown": (120, 70, 30),
           "cyan": (40, 210, 230), "black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SIZES = (("small", 0.4), ("medium", 0.6), ("large", 0.85))  # glyph's longer side / image side
POSITIONS = (("top left", 0, 0), ("top", 1, 0), ("top right", 2, 0), ("left", 0, 1), ("center", 1, 1),
             ("right", 2, 1), ("bottom left", 0, 2), ("bottom", 1, 2), ("bottom right", 2, 2))
SUPERSAMPLE = 4  # glyphs are drawn this many times larger and box-filtered down: smooth edges at 16x16
_MIN_CONTRAST = 90  # luminance difference of foreground and background, out of 255


def _luminance(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


# (foreground, background) colour names that stay distinguishable after downsampling, in a fixed order.
COLOUR_PAIRS = tuple((fg, bg) for bg in COLOURS for fg in COLOURS
                     if abs(_luminance(COLOURS[fg]) - _luminance(COLOURS[bg])) >= _MIN_CONTRAST)


@dataclasses.dataclass(frozen=True)
class GlyphSpec:
    """Everything drawn in one builtin image; the caption is a function of it."""

    char: str
    font_file: str
    foreground: str
    background: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        return (f"a {self.size} {self.foreground} {unicodedata.name(self.char)} in {font_name(self.font_file)} "
                f"at the {self.position} on a {self.background} background")


def glyph_spec(seed: int, index: int) -> GlyphSpec:
    """The glyph of image `index` of the stream `seed`: independent draws from a generator seeded by both."""
    rng = np.random.default_rng([seed, index])
    char, font, pair, size, position = (int(rng.integers(n)) for n in (len(GLYPHS), len(FONT_FILES),
                                                                       len(COLOUR_PAIRS), len(SIZES), len(POSITIONS)))
    foreground, background = COLOUR_PAIRS[pair]
    return GlyphSpec(GLYPHS[char], FONT_FILES[font], foreground, background, SIZES[size][0], POSITIONS[position][0])


def render_glyph(spec: GlyphSpec, image_size: int) -> np.ndarray:
    """[image_size, image_size, 3] uint8: the glyph's ink box scaled to its size fraction, placed in a 3x3 grid."""
    canvas = image_size * SUPERSAMPLE
    fraction = dict(SIZES)[spec.size]
    column, row = next((c, r) for name, c, r in POSITIONS if name == spec.position)
    target = fraction * canvas
    width, height = _ink_size(spec.font_file, spec.char)  # at the reference size
    pixels = max(4, round(_REFERENCE_PIXELS * target / max(width, height)))
    font = _font(spec.font_file, pixels)
    left, top, right, bottom = font.getbbox(spec.char)
    margin = 0.04 * canvas
    x = margin + (canvas - 2 * margin - (right - left)) * column / 2
    y = margin + (canvas - 2 * margin - (bottom - top)) * row / 2
    image = Image.new("RGB", (canvas, canvas), COLOURS[spec.background])
    ImageDraw.Draw(image).text((round(x - left), round(y - top)), spec.char, font=font,
                               fill=COLOURS[spec.foreground])
    return np.asarray(image.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.uint8)


def font_name(font_file: str) -> str:
    """"DejaVu Sans Bold" for DejaVuSans-Bold.ttf (the regular "Book" style is left out)."""
    family, style = _font(font_file, _REFERENCE_PIXELS).getname()
    return family if style in ("Book", "Regular") else f"{family} {style}"


_REFERENCE_PIXELS = 100


@functools.cache
def _font_path(font_file: str) -> str:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / font_file
    if not path.is_file():
        raise UserError(f"font '{path}' is missing; valid: a matplotlib installation that ships its DejaVu fonts "
                        "(the builtin image source draws with them)")
    return str(path)


@functools.lru_cache(maxsize=1024)
def _font(font_file: str, pixels: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(_font_path(font_file), pixels)


@functools.lru_cache(maxsize=4096)
def _ink_size(font_file: str, char: str) -> tuple[int, int]:
    left, top, right, bottom = _font(font_file, _REFERENCE_PIXELS).getbbox(char)
    return max(1, right - left), max(1, bottom - top)


class RenderedGlyphs(ImageView):
    """`count` rendered glyph images of the stream `seed`; item i is computed on access (nothing stored)."""

    def __init__(self, count: int, seed: int, image_size: int):
        super().__init__(range(count))
        self.seed = seed
        self.image_size = image_size

    def spec(self, index: int) -> GlyphSpec:
        return glyph_spec(self.seed, self._indices[index])

    def _item(self, index: int) -> ImageCaption:
        spec = glyph_spec(self.seed, index)
        return ImageCaption(render_glyph(spec, self.image_size), spec.caption, f"glyph:{self.seed}/{index}")

    def _caption(self, index: int) -> str:
        return glyph_spec(self.seed, index).caption


def _builtin_source(argument: str, *, image_size: int, data_dir: str | os.PathLike | None) -> ImageCaptionSource:
    """`builtin[:<count>]`: `count` rendered training glyphs and the validation ones (nothing read or stored)."""
    del data_dir  # rendered on the fly
    count = BUILTIN_TRAIN_COUNT
    if argument:
        if not argument.isdigit() or int(argument) < 1:
            raise UserError(f"image source 'builtin:{argument}' has an invalid count; valid: builtin or "
                            "builtin:<positive count of training images>")
        count = int(argument)
    splits = {"train": RenderedGlyphs(count, BUILTIN_SEEDS["train"], image_size),
              "validation": RenderedGlyphs(BUILTIN_VALIDATION_COUNT, BUILTIN_SEEDS["validation"], image_size)}
    return ImageCaptionSource("builtin" + (f":{argument}" if argument else ""), image_size, splits)


# ---------------------------------------------------------------------------------------------------------------
# images:<folder>


class FolderImages(ImageView):
    """Readable image files of a folder (relative POSIX paths) with their captions, decoded on access."""

    def __init__(self, folder: Path, keys: Sequence[str], captions: Mapping[str, str], image_size: int):
        super().__init__(range(len(keys)))
        self.folder = folder
        self.keys = list(keys)
        self.captions = captions
        self.image_size = image_size

    def _item(self, index: int) -> ImageCaption:
        key = self.keys[index]
        try:
            with Image.open(self.folder / key) as image:
                array = fit_image(image, self.image_size)
        except _UNREADABLE as e:
            raise UserError(f"image '{self.folder / key}' became unreadable ({brief(e)}); valid: an image "
                            "Pillow can open (restart to rescan the folder)") from e
        return ImageCaption(array, self.captions[key], str(self.folder / key))

    def _caption(self, index: int) -> str:
        return self.captions[self.keys[index]]


_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _folder_source(argument: str, *, image_size: int, data_dir: str | os.PathLike | None) -> ImageCaptionSource:
    """`images:<folder>`: every readable image file below the folder, ~5% to validation by a hash of its path."""
    del data_dir  # images are read where they are
    if not argument:
        raise UserError("image source 'images:' names no folder; valid: images:<folder>")
    folder = Path(argument).expanduser()
    if not folder.is_dir():
        raise UserError(f"image folder '{argument}' does not exist or is not a folder; valid: images:<folder> "
                        f"holding {', '.join(sorted(IMAGE_EXTENSIONS))} files")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    keys = [p.relative_to(folder).as_posix() for p in paths]
    readable = [key for key in keys if _is_readable(folder / key)]  # decodes every file once: slow for huge folders
    kept = set(readable)
    skipped = tuple(key for key in keys if key not in kept)
    if skipped:
        log.warning("image folder '%s': skipped %d unreadable image(s): %s", folder, len(skipped),
                    _name_list(skipped))
    if not readable:
        found = f"{len(keys)} image file(s), all unreadable: {_name_list(skipped)}" if keys else "no image files"
        raise UserError(f"image folder '{argument}' has no readable image ({found}); valid: a folder with "
                        f"images Pillow can open ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    captions = _folder_captions(folder, readable)
    train, validation = hash_split(readable)
    splits = {"train": FolderImages(folder, train, captions, image_size),
              "validation": FolderImages(folder, validation, captions, image_size)}
    return ImageCaptionSource(f"images:{argument}", image_size, splits, skipped)


def _is_readable(path: Path) -> bool:
    """Fully decodes the file: a truncated JPEG opens fine and fails only in load()."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except _UNREADABLE:
        return False


def _folder_captions(folder: Path, keys: Sequence[str]) -> dict[str, str]:
    """Caption per key: from captions.tsv/.txt (by relative path or bare file name), else the file stem."""
    listed: dict[str, str] = {}
    caption_file = next((folder / name for name in CAPTION_FILES if (folder / name).is_file()), None)
    if caption_file is not None:
        for number, line in enumerate(caption_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip() or line.startswith("#"):
                continue
            name, tab, caption = line.partition("\t")
            if not tab or not name.strip() or not caption.strip():
                raise UserError(f"{caption_file}:{number} is not 'filename<TAB>caption' ({line[:80]!r}); valid: "
                                "one 'filename<TAB>caption' per line (blank and #-lines are ignored)")
            listed[name.strip()] = caption.strip()
        unknown = sorted(set(listed) - set(keys) - {Path(k).name for k in keys})
        if unknown:
            log.warning("%s: %d caption(s) name no readable image: %s", caption_file, len(unknown),
                        _name_list(unknown))
    return {key: listed.get(key) or listed.get(Path(key).name) or _stem_caption(key) for key in keys}


def _stem_caption(key: str) -> str:
    return " ".join(Path(key).stem.replace("_", " ").replace("-", " ").split())


def _name_list(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


register_image_source("builtin", _builtin_source, form="builtin[:<count>]")
register_image_source("images", _folder_source, form="images:<folder>")

__all__ = ["COLOURS", "GLYPHS", "POSITIONS", "SIZES", "FolderImages", "GlyphSpec", "RenderedGlyphs",
           "get_image_source", "glyph_spec", "render_glyph"]
