"""The generic data pieces every source and loader shares: the source registry, random-access views, the epoch
order and the train/validation splits (lm_core.data.registry, views, splits, image_sources)."""

import numpy as np
import pytest

from lm_core.data.image_sources import IMAGE_SOURCES, ImageCaption, ImageCaptionSource, ImageView, get_image_source
from lm_core.data.registry import SourceRegistry
from lm_core.data.splits import train_validation
from lm_core.data.views import IndexedView, epoch_order
from lm_core.errors import UserError


def _factory(argument, **options):
    return ("made", argument, options)


def _other_factory(argument, **options):
    return ("other", argument)


def test_registry_resolves_specs_and_lists_forms_when_unknown():
    registry = SourceRegistry("test source")
    registry.register("alpha", _factory, form="alpha:<x>")
    registry.register("beta", _other_factory)
    assert registry.get("alpha:a:b", size=3) == ("made", "a:b", {"size": 3})
    with pytest.raises(UserError, match=r"^unknown test source 'gamma:x'; valid: alpha:<x>, beta:<argument>$"):
        registry.get("gamma:x")
    with pytest.raises(ValueError, match="identifier-like"):
        registry.register("bad prefix", _factory)


def test_registry_accepts_the_same_factory_again_but_not_another_one():
    registry = SourceRegistry("test source")
    registry.register("alpha", _factory)
    registry.register("alpha", _factory)  # the module that registers it imported again
    with pytest.raises(ValueError, match="'alpha' is already registered"):
        registry.register("alpha", _other_factory)
    registry.register("alpha", _other_factory, overwrite=True)
    assert registry.get("alpha:x") == ("other", "x")


class _Squares(IndexedView[int]):
    def __init__(self, count: int):
        super().__init__(range(count))
        self.reads: list[int] = []

    def _item(self, index: int) -> int:
        self.reads.append(index)
        return index * index


def test_views_slice_without_reading_and_map_indices_through_every_slice():
    squares = _Squares(10)
    view = squares[2:9][1::2]  # underlying items 3, 5, 7
    assert len(view) == 3 and squares.reads == []
    assert list(view) == [9, 25, 49]
    assert view[-1] == 49 and len(squares) == 10  # the original view is unchanged by slicing


def test_epoch_order_is_the_seeded_permutation_checkpoints_were_saved_with():
    # A saved stream position is a place in this order: these values must never change, or resuming an old
    # checkpoint would silently continue with other documents.
    assert epoch_order(0, 0, 6).tolist() == [3, 2, 5, 4, 0, 1]
    assert epoch_order(7, 3, 6).tolist() == [4, 0, 3, 2, 5, 1]
    assert epoch_order(7, 3, 6, shuffle=False).tolist() == list(range(6))
    assert sorted(epoch_order(1, 2, 100).tolist()) == list(range(100))
    assert epoch_order(1, 2, 100).tolist() != epoch_order(1, 3, 100).tolist()


def test_train_validation_holds_out_the_tail_of_train_only_when_there_is_no_validation_split():
    train, test = list(range(40)), list(range(5))
    assert train_validation({"train": train, "test": test}, "d") == {"train": (train, range(40)),
                                                                     "validation": (test, range(5))}
    assert train_validation({"train": train}, "d") == {"train": (train, range(38)), "validation": (train,
                                                                                                   range(38, 40))}
    assert train_validation({"train": [0]}, "d") == {"train": ([0], range(1)), "validation": ([0], range(1))}
    with pytest.raises(UserError, match=r"TFDS dataset 'd' has no 'train' split \(splits: \['test'\]\)"):
        train_validation({"test": test}, "d")


class _Flat(ImageView):
    def __init__(self, count: int):
        super().__init__(range(count))

    def _item(self, index: int) -> ImageCaption:
        return ImageCaption(np.full((8, 8, 3), index, np.uint8), f"flat {index}", f"flat/{index}")


def test_a_registered_image_source_is_served_with_its_size_checked():
    IMAGE_SOURCES.register("unit_test_flat", lambda argument, *, image_size, data_dir: _flat_source(argument))
    source = get_image_source("unit_test_flat:4", image_size=8)
    assert [item.caption for item in source.split("validation")] == ["flat 0", "flat 1", "flat 2", "flat 3"]
    assert source.split("validation").caption(2) == "flat 2"
    with pytest.raises(UserError, match="image_size=4 is invalid"):
        get_image_source("unit_test_flat:4", image_size=4)
    with pytest.raises(UserError, match=r"unknown image source 'nope:x'; valid: .*tfds:<name>\[/<config>\]"):
        get_image_source("nope:x")


def _flat_source(argument: str) -> ImageCaptionSource:
    return ImageCaptionSource("flat", 8, {"validation": _Flat(int(argument))})
