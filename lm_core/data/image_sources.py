"""Image–caption sources by name: `get_image_source("<prefix>:<argument>", image_size=...)`.

Every source gives RGB uint8 images of ONE size (`image_size` x `image_size`, center-cropped and resized), because
an image tokenizer turns an image into a fixed grid of codes and mixed-modal sequences need a fixed number of
image tokens per image. Each split is a random-access view (`ImageView`): an image is decoded or rendered only
when it is read, and its caption can be read without it.

- `tfds:<name>[/<config>]` (here): any TFDS dataset with an Image feature and a caption (a Text feature, a
  sequence of them, or a ClassLabel turned into "a photo of a <label>"), read through `tfds.data_source`.
- Paper packages register more with `register_image_source`: moma.images adds `builtin[:<count>]` (rendered
  glyphs, no files) and `images:<folder>` (the user's own images).

`image_captions:<image source spec>` is also a TEXT source (the captions alone), so a text tokenizer can be trained
on exactly the captions the mixed-modal data will contain.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps

from lm_core.data.registry import SourceRegistry
from lm_core.data.sources import TextSource, register_text_source
from lm_core.data.tfds_records import open_tfds
from lm_core.data.views import IndexedView, epoch_order
from lm_core.errors import UserError

DEFAULT_IMAGE_SIZE = 32


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


class ImageSourceFactory(Protocol):
    def __call__(self, argument: str, *, image_size: int, data_dir: str | os.PathLike | None
                 ) -> ImageCaptionSource: ...


IMAGE_SOURCES: SourceRegistry[ImageCaptionSource] = SourceRegistry("image source")


def register_image_source(prefix: str, factory: ImageSourceFactory, *, form: str | None = None) -> None:
    """Make `get_image_source("<prefix>:<argument>")` call `factory(argument, image_size=..., data_dir=...)`."""
    IMAGE_SOURCES.register(prefix, factory, form=form)


def get_image_source(spec: str, *, image_size: int = DEFAULT_IMAGE_SIZE,
                     data_dir: str | os.PathLike | None = None) -> ImageCaptionSource:
    """The source a spec names, its images center-cropped and resized to `image_size`. `data_dir`: for tfds:."""
    if not isinstance(image_size, int) or image_size < 8:
        raise UserError(f"image_size={image_size!r} is invalid; valid: an integer >= 8")
    return IMAGE_SOURCES.get(spec, image_size=image_size, data_dir=data_dir)


class ImageView(IndexedView[ImageCaption]):
    """A view of image–caption pairs whose captions can be read without decoding or rendering the images."""

    def caption(self, index: int) -> str:
        """The caption of item `index` of the view."""
        return self._caption(self._indices[index])

    def _caption(self, index: int) -> str:
        return self._item(index).caption


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
    """Endless [batch_size, size, size, 3] uint8 batches: epochs in `epoch_order(seed, epoch)`, back to back.

    Image k of the stream is item `order_{k // n}[k % n]`, as in lm_core's loaders, so a split smaller than a batch
    still fills it (from the next epoch).
    """
    if batch_size <= 0:
        raise UserError(f"batch_size={batch_size} is invalid; valid: a positive integer")
    if len(items) == 0:
        raise UserError("the image split is empty; valid: a split with at least one image")
    return _endless_batches(items, batch_size, seed)  # checked above, not at the first next()


def _endless_batches(items: Sequence[ImageCaption], batch_size: int, seed: int) -> Iterator[np.ndarray]:
    n = len(items)
    orders: dict[int, np.ndarray] = {}
    stream = 0
    while True:
        batch = []
        for k in range(stream, stream + batch_size):
            epoch, position = divmod(k, n)
            if epoch not in orders:
                orders = {epoch: epoch_order(seed, epoch, n)}  # epochs only grow
            batch.append(items[int(orders[epoch][position])].image)
        stream += batch_size
        yield np.stack(batch)  # [batch, size, size, 3]


# ---------------------------------------------------------------------------------------------------------------
# tfds:<name>[/<config>]


class RecordImages(ImageView):
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


def _tfds_source(name: str, *, image_size: int, data_dir: str | os.PathLike | None) -> ImageCaptionSource:
    """Any TFDS dataset with an Image feature and a caption, read with random access (no TensorFlow)."""

    def read_features(features: Mapping[str, Any]) -> tuple[str, Callable[[Mapping], str]]:
        return _image_feature(features, name), _caption_reader(features, name)

    (image_key, caption_of), records = open_tfds(
        name, data_dir, kind="image source", example="tfds:coco_captions", wanted="an Image feature and a caption",
        read_features=read_features)
    splits = {split: RecordImages(source, indices, image_key, caption_of, image_size, name)
              for split, (source, indices) in records.items()}
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


# ---------------------------------------------------------------------------------------------------------------
# image_captions:<image spec> (a text source)


class Captions(Sequence[str]):
    """The captions of an image split, read without decoding images (tokenizer training, text-only baselines)."""

    def __init__(self, items: Sequence[ImageCaption]):
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        items = self._items
        return items.caption(index) if isinstance(items, ImageView) else items[index].caption


def _captions_text_source(argument: str, *, data_dir: str | os.PathLike | None) -> TextSource:
    """`image_captions:<image source spec>`: the captions of that source's splits, as a text source."""
    source = get_image_source(argument, image_size=DEFAULT_IMAGE_SIZE, data_dir=data_dir)
    return TextSource(f"image_captions:{argument}", {split: Captions(items) for split, items in source.splits.items()})


register_image_source("tfds", _tfds_source, form="tfds:<name>[/<config>]")
register_text_source("image_captions", _captions_text_source, form="image_captions:<image source spec>")

__all__ = ["DEFAULT_IMAGE_SIZE", "IMAGE_SOURCES", "Captions", "ImageCaption", "ImageCaptionSource", "ImageView",
           "fit_image", "get_image_source", "image_batches", "register_image_source"]
