"""Image–caption pairs by name: `get_image_source("builtin" | "images:<folder>" | "tfds:<name>[/<config>]")`.

Every source gives RGB uint8 images of ONE size (`image_size` x `image_size`, center-cropped and resized), because
the VQ tokenizer turns an image into a fixed grid of codes and the mixed-modal sequences need a fixed number of
image tokens per image.

- `builtin[:<count>]` needs no network and no files: glyphs (letters, digits, Greek letters, symbols) rendered with
  the DejaVu fonts matplotlib ships, in a colour, size and position on a background colour, captioned from the
  Unicode character name ("a large red LATIN CAPITAL LETTER A in DejaVu Sans Bold at the top left on a white
  background"). Image i of a split is a pure function of (split seed, i, image_size): any count, random access,
  nothing stored. Captions describe exactly what is drawn, so an early-fusion model can learn both directions.
- `images:<folder>`: the user's own images (PNG, JPEG, ...; subfolders included). Captions come from
  `captions.tsv` / `captions.txt` in the folder (`filename<TAB>caption` per line), else from the file stem.
  Unreadable files are skipped, counted and named in a warning; ~5% go to validation by a hash of the path.
- `tfds:<name>[/<config>]`: any TFDS dataset with an Image feature and a caption (a Text feature, a sequence of
  them, or a ClassLabel turned into "a photo of a <label>"), read through `tfds.data_source` (no TensorFlow).

Importing this module also registers the text source `image_captions:<image spec>` with lm_core (the captions
alone), so a text tokenizer can be trained on exactly the captions the mixed-modal data will contain.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import string
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from lm_core.data.sources import VALIDATION_PER_MILLE, TextSource, hash_split, register_text_source
from lm_core.errors import UserError, brief

log = logging.getLogger(__name__)

VALID_SPECS = "builtin[:<count>], images:<folder>, tfds:<name>[/<config>]"
DEFAULT_IMAGE_SIZE = 32
BUILTIN_TRAIN_COUNT = 20_000
BUILTIN_VALIDATION_COUNT = 500
# Split seeds of the builtin source: validation glyphs are drawn from a different stream than training ones.
BUILTIN_SEEDS = {"train": 0, "validation": 1}
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                              ".pnm", ".tga", ".qoi"})
CAPTION_FILES = ("captions.tsv", "captions.txt")


@dataclasses.dataclass(frozen=True)
class ImageCaption:
    image: np.ndarray  # [size, size, 3] uint8
    caption: str
    key: str  # where the pair came from (glyph index, file path, record index): names it in messages


@dataclasses.dataclass(frozen=True)
class ImageCaptionSource:
    """Named splits of image–caption pairs, each a random-access Sequence[ImageCaption] of one image size."""

    name: str
    image_size: int
    splits: Mapping[str, Sequence[ImageCaption]]
    skipped: tuple[str, ...] = ()  # unreadable files left out (images:<folder>)

    def split(self, name: str) -> Sequence[ImageCaption]:
        if name not in self.splits:
            raise UserError(f"image source '{self.name}' has no split '{name}'; valid: {sorted(self.splits)}")
        return self.splits[name]


def get_image_source(spec: str, *, image_size: int = DEFAULT_IMAGE_SIZE,
                     data_dir: str | os.PathLike | None = None) -> ImageCaptionSource:
    """The source a spec names, its images center-cropped and resized to `image_size`. `data_dir`: for tfds:."""
    if not isinstance(image_size, int) or image_size < 8:
        raise UserError(f"image_size={image_size!r} is invalid; valid: an integer >= 8")
    prefix, _, argument = spec.partition(":")
    factories: dict[str, Callable[[str, int, Any], ImageCaptionSource]] = {
        "builtin": _builtin_source, "images": _folder_source, "tfds": _tfds_source}
    if prefix not in factories:
        raise UserError(f"unknown image source '{spec}'; valid: {VALID_SPECS}")
    return factories[prefix](argument, image_size, data_dir)


def fit_image(image: Image.Image, size: int) -> np.ndarray:
    """RGB [size, size, 3] uint8: transparency composited on white, center-cropped to a square, then resized.

    Cropping (not padding) keeps every output pixel real image content; the VQ codebook then never spends codes on
    letterbox bars.
    """
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    fitted = ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.LANCZOS)
    return np.asarray(fitted, dtype=np.uint8)  # [size, size, 3]


def image_batches(items: Sequence[ImageCaption], batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless [batch_size, size, size, 3] uint8 batches: epochs of a seeded permutation, back to back.

    Image k of the stream is item `perm_{k // n}[k % n]`, as in lm_core's loader, so a split smaller than a batch
    still fills it (from the next epoch).
    """
    if batch_size <= 0:
        raise UserError(f"batch_size={batch_size} is invalid; valid: a positive integer")
    if len(items) == 0:
        raise UserError("the image split is empty; valid: a split with at least one image")
    return _endless_batches(items, batch_size, seed)  # checked above, not at the first next()


def _endless_batches(items: Sequence[ImageCaption], batch_size: int, seed: int) -> Iterator[np.ndarray]:
    n = len(items)
    permutations: dict[int, np.ndarray] = {}
    stream = 0
    while True:
        batch = []
        for k in range(stream, stream + batch_size):
            epoch, position = divmod(k, n)
            if epoch not in permutations:
                permutations = {epoch: np.random.default_rng([seed, epoch]).permutation(n)}  # epochs only grow
            batch.append(items[int(permutations[epoch][position])].image)
        stream += batch_size
        yield np.stack(batch)  # [batch, size, size, 3]


# ---------------------------------------------------------------------------------------------------------------
# Random-access views (slicing gives a view, like lm_core's RecordTexts)


class _IndexedView(Sequence[ImageCaption]):
    """A Sequence over `indices` of an underlying collection; subclasses say how to read item i."""

    def __init__(self, indices: range | Sequence[int]):
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)

    @overload
    def __getitem__(self, index: int) -> ImageCaption: ...

    @overload
    def __getitem__(self, index: slice) -> _IndexedView: ...

    def __getitem__(self, index: int | slice) -> ImageCaption | _IndexedView:
        if isinstance(index, slice):
            view = self._copy()
            view._indices = self._indices[index]
            return view
        return self._item(self._indices[index])

    def caption(self, index: int) -> str:
        """The caption of item `index` without decoding or rendering its image."""
        return self._caption(self._indices[index])

    def _copy(self) -> _IndexedView:
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        return view

    def _item(self, index: int) -> ImageCaption:
        raise NotImplementedError

    def _caption(self, index: int) -> str:
        return self._item(index).caption


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


class RenderedGlyphs(_IndexedView):
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


def _builtin_source(argument: str, image_size: int, data_dir: Any) -> ImageCaptionSource:
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


class FolderImages(_IndexedView):
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


def _folder_source(argument: str, image_size: int, data_dir: Any) -> ImageCaptionSource:
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


# ---------------------------------------------------------------------------------------------------------------
# tfds:<name>[/<config>]


class RecordImages(_IndexedView):
    """Image and caption of records [indices] of a random-access TFDS source."""

    def __init__(self, records: Any, indices: range, image_key: str, caption_of: Callable[[Mapping], str],
                 image_size: int, name: str):
        super().__init__(indices)
        self._records = records
        self._image_key = image_key
        self._caption_of = caption_of
        self.image_size = image_size
        self.name = name

    def _item(self, index: int) -> ImageCaption:
        record = self._records[index]
        array = np.asarray(record[self._image_key])  # [H, W, C] uint8, C in {1, 3, 4}
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        image = fit_image(Image.fromarray(array.astype(np.uint8)), self.image_size)
        return ImageCaption(image, self._caption_of(record), f"tfds:{self.name}[{index}]")

    def _caption(self, index: int) -> str:
        return self._caption_of(self._records[index])


def _tfds_source(name: str, image_size: int, data_dir: str | os.PathLike | None) -> ImageCaptionSource:
    import tensorflow_datasets as tfds

    from lm_core.data import builtin_tfds

    if not name:
        raise UserError("image source 'tfds:' names no dataset; valid: tfds:<name>[/<config>], e.g. "
                        "tfds:coco_captions")
    data_dir = data_dir if data_dir is not None else os.environ.get(builtin_tfds.DATA_DIR_ENV)
    root = os.fspath(Path(data_dir).expanduser()) if data_dir else None

    def make_builder() -> Any:
        return tfds.builder(name, data_dir=root, file_format="array_record")

    try:
        builder = make_builder()
    except tfds.core.registered.DatasetNotFoundError as e:
        matches = difflib.get_close_matches(name.split("/")[0], tfds.list_builders(with_community_datasets=False))
        hint = f" (did you mean {', '.join(matches[:3])}?)" if matches else ""
        raise UserError(f"unknown TFDS dataset '{name}'{hint}; valid: a name from tfds.list_builders() with an "
                        "Image feature and a caption") from e
    except ValueError as e:
        raise UserError(f"cannot open TFDS dataset '{name}' ({brief(e)}); valid: tfds:<name>[/<config>] "
                        "with a config the dataset defines") from e
    except ModuleNotFoundError as e:  # some builders import TensorFlow or their own packages just to be made
        reason = " ".join(str(e).split()).rsplit(": ", 1)[-1][:120]  # TFDS prefixes its builder arguments
        raise UserError(f"cannot open TFDS dataset '{name}': a module its builder needs is not installed "
                        f"({reason}); valid: install it, or a dataset whose builder needs none") from e
    image_key = _image_feature(builder.info.features, name)
    caption_of = _caption_reader(builder.info.features, name)
    try:
        builder = builtin_tfds.prepared_builder(make_builder)
    except Exception as e:  # noqa: BLE001 - downloads fail in many ways; all mean "prepare it yourself"
        raise UserError(f"could not prepare TFDS dataset '{name}' in '{builder.data_dir_root}' "
                        f"({type(e).__name__}: {brief(e)[:160]}); valid: a prepared dataset, e.g. "
                        f"`tfds build {name} --file_format=array_record --data_dir=DIR` then data_dir=DIR") from e
    records = builtin_tfds.data_sources(builder)
    splits = {split: RecordImages(source, indices, image_key, caption_of, image_size, name)
              for split, (source, indices) in _train_validation(records, name).items()}
    return ImageCaptionSource(f"tfds:{name}", image_size, splits)


def _image_feature(features: Mapping[str, Any], name: str) -> str:
    import tensorflow_datasets as tfds

    keys = [k for k, v in features.items() if isinstance(v, tfds.features.Image)]
    if not keys:
        raise UserError(f"TFDS dataset '{name}' has no top-level Image feature (features: {sorted(features)}); "
                        "valid: an image-caption dataset")
    return "image" if "image" in keys else keys[0]


_CAPTION_KEYS = ("caption", "captions", "text", "description")


def _caption_reader(features: Mapping[str, Any], name: str) -> Callable[[Mapping], str]:
    """How to get one caption string from a record: a Text feature (or the first of a sequence of them), else a
    class label as "a photo of a <label>" (so classification datasets still give an image–text pair)."""
    import tensorflow_datasets as tfds

    def has_text(feature: Any) -> bool:
        if isinstance(feature, tfds.features.Text):
            return True
        if isinstance(feature, tfds.features.Sequence):
            return has_text(feature.feature)
        if isinstance(feature, tfds.features.FeaturesDict):
            return any(has_text(f) for f in feature.values())
        return False

    text_keys = sorted((k for k, v in features.items() if has_text(v)),
                       key=lambda k: (_CAPTION_KEYS.index(k) if k in _CAPTION_KEYS else len(_CAPTION_KEYS), k))
    if text_keys:
        key = text_keys[0]
        return lambda record: _first_text(record[key])
    labels = [k for k, v in features.items() if isinstance(v, tfds.features.ClassLabel) and v.names]
    if labels:
        names = [n.replace("_", " ") for n in features[labels[0]].names]
        return lambda record: f"a photo of a {names[int(record[labels[0]])]}"
    raise UserError(f"TFDS dataset '{name}' has no caption (no Text or ClassLabel feature; features: "
                    f"{sorted(features)}); valid: an image dataset with a Text caption or a class label")


def _first_text(value: Any) -> str:
    """A caption from a Text value, a sequence of them (first one) or a dict holding one."""
    if isinstance(value, Mapping):
        value = next((value[k] for k in (*_CAPTION_KEYS, *sorted(value)) if k in value), "")
    if isinstance(value, np.ndarray) and value.ndim > 0 or isinstance(value, list | tuple):
        value = value[0] if len(value) else b""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _train_validation(records: Mapping[str, Any], name: str) -> dict[str, tuple[Any, range]]:
    """train + validation, else train + test, else the last ~5% of train held out (as lm_core does for text)."""
    if "train" not in records:
        raise UserError(f"TFDS dataset '{name}' has no 'train' split (splits: {sorted(records)}); valid: a "
                        "dataset with a train split")
    train = records["train"]
    for held_out in ("validation", "test"):
        if held_out in records:
            return {"train": (train, range(len(train))),
                    "validation": (records[held_out], range(len(records[held_out])))}
    cut = len(train) - max(1, len(train) * VALIDATION_PER_MILLE // 1000) if len(train) >= 2 else len(train)
    return {"train": (train, range(cut)), "validation": (train, range(cut, len(train)) if cut < len(train)
                                                          else range(len(train)))}


# ---------------------------------------------------------------------------------------------------------------
# image_captions:<image spec> (a text source for lm_core)


class Captions(Sequence[str]):
    """The captions of an image split, read without decoding images (tokenizer training, text-only baselines)."""

    def __init__(self, items: Sequence[ImageCaption]):
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        items = self._items
        return items.caption(index) if isinstance(items, _IndexedView) else items[index].caption


def _captions_text_source(argument: str, *, data_dir: str | os.PathLike | None) -> TextSource:
    source = get_image_source(argument, image_size=DEFAULT_IMAGE_SIZE, data_dir=data_dir)
    return TextSource(f"image_captions:{argument}", {split: Captions(items) for split, items in source.splits.items()})




register_text_source("image_captions", _captions_text_source, form="image_captions:<image source spec>",
                     overwrite=True)

__all__ = ["COLOURS", "GLYPHS", "POSITIONS", "SIZES", "Captions", "GlyphSpec", "ImageCaption", "ImageCaptionSource",
           "RenderedGlyphs", "fit_image", "get_image_source", "glyph_spec", "image_batches", "render_glyph"]
