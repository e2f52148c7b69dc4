"""Which MoMa model to build: variant names, expert groups and their validation.

Names (the paper's rows): "dense"; "moe_1t1i" (one FFN per modality); "moe_<m>t<n>i", e.g. "moe_4t4i" (m text
experts, n image experts, expert choice inside each modality's group); "moe_<n>x", e.g. "moe_8x" (expert choice
over n experts shared by both modalities); a "mod_" prefix adds staged mixture-of-depths ("mod_moe_4t4i",
"mod_dense").

Modality comes from the token id: ids in `image_token_range` = [lo, hi) are image codes, every other id is text.
BOI/EOI are deliberately TEXT: they live in the text vocabulary, the text side decides when an image starts (and
predicts BOI), and keeping them out of the image range keeps the range exactly the VQ codebook. Put them inside
the range if an experiment wants them routed with the image codes.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from typing import Any

from lm_core.config import ModelConfig
from lm_core.errors import UserError

NAME_FIELDS = {"variant", "mod", "text_experts", "image_experts", "mixed_experts"}  # set by the variant name
VALID_FORMS = "dense, moe_1t1i, moe_<m>t<n>i (e.g. moe_4t4i), moe_<n>x (e.g. moe_8x), each optionally mod_-prefixed"


@dataclasses.dataclass(frozen=True)
class MoMaConfig:
    """A MoMa variant. A group of ONE expert is a modality-specific FFN taking all its tokens, with Eq. 1's sigmoid
    gate (moma.experts)."""

    variant: str = "dense"
    text_experts: int = 0  # experts of the text group (0 with a mixed group or dense)
    image_experts: int = 0
    mixed_experts: int = 0  # "moe_<n>x": one group over all tokens
    capacity_factor: float = 1.0  # c_e = capacity_factor / |group|: on average one expert per token at 1.0
    image_token_range: tuple[int, int] = (0, 0)  # ids in [lo, hi) are image codes; everything else is text
    # Static slot sizing (see moma.experts): each group's slot arrays hold at most this fraction of a batch's tokens.
    # 1.0 never drops a token; with a known data mix (e.g. at most 60% image codes) smaller values cut the wasted
    # compute of idle slots, and a batch beyond the bound clips each expert's top-k (reported as *_slot_overflow).
    max_text_fraction: float = 1.0
    max_image_fraction: float = 1.0
    router_noise: bool = False  # Gumbel-sigmoid noise on router logits while training (upcycling, moma.experts)
    mod: bool = False  # staged mixture-of-depths on alternating layers 0, 2, 4, ...
    mod_capacity: float = 0.25  # c_d: fraction of each row's tokens a MoD layer processes (moma/depths.py)
    # Expert choice ranks the tokens of one routing group: the batch's rows split into this many equal groups of
    # consecutive rows. 0 = one group per batch shard of the mesh (1 on one device: the paper's batch-level
    # choice); a fixed count makes a single-device run route exactly like a sharded one. See `routing_groups`.
    routing_groups: int = 0

    def __post_init__(self) -> None:
        problems = self._range_problems()
        counts = {"text_experts": self.text_experts, "image_experts": self.image_experts,
                  "mixed_experts": self.mixed_experts}
        problems += [f"{name}={count!r} must be a non-negative integer" for name, count in counts.items()
                     if not isinstance(count, int) or count < 0]
        if not isinstance(self.routing_groups, int) or self.routing_groups < 0:
            problems.append(f"routing_groups={self.routing_groups!r} must be a non-negative integer "
                            "(0 = one group per batch shard)")
        if self.mixed_experts and (self.text_experts or self.image_experts):
            problems.append("a mixed group (mixed_experts) excludes text_experts/image_experts")
        if bool(self.text_experts) != bool(self.image_experts):
            problems.append(f"text_experts={self.text_experts} and image_experts={self.image_experts} must both "
                            "be positive (a modality without experts would get no FFN)")
        if not self.capacity_factor > 0:
            problems.append(f"capacity_factor={self.capacity_factor} must be > 0 (1.0 = one expert per token)")
        for name in ("max_text_fraction", "max_image_fraction", "mod_capacity"):
            if not 0 < getattr(self, name) <= 1:
                problems.append(f"{name}={getattr(self, name)} must be in (0, 1]")
        if problems:
            raise UserError("invalid MoMa config: " + "; ".join(problems))

    def _range_problems(self) -> list[str]:
        """Checks image_token_range and normalises it to a hashable (int, int) (config files give lists)."""
        try:
            low, high = (operator.index(v) for v in self.image_token_range)
        except (TypeError, ValueError):
            return [f"image_token_range={self.image_token_range!r} must be two integers (lo, hi)"]
        object.__setattr__(self, "image_token_range", (low, high))
        if not 0 <= low <= high:
            return [f"image_token_range={self.image_token_range} must be (lo, hi) with 0 <= lo <= hi"]
        if self.text_experts and low == high:
            return [f"variant {self.variant!r} routes by modality but image_token_range={self.image_token_range} "
                    "is empty; give the image-code ids [lo, hi)"]
        return []

    @property
    def is_dense(self) -> bool:
        return self.text_experts == self.image_experts == self.mixed_experts == 0

    @property
    def groups(self) -> dict[str, int]:
        """Expert groups by the tokens they serve: {"text": m, "image": n} or {"mixed": n} ({} when dense)."""
        if self.mixed_experts:
            return {"mixed": self.mixed_experts}
        return {name: count for name, count in (("text", self.text_experts), ("image", self.image_experts))
                if count}

    def max_fraction(self, group: str) -> float:
        """The static bound on the share of a batch's tokens that `group` can receive."""
        return {"text": self.max_text_fraction, "image": self.max_image_fraction}.get(group, 1.0)


def parse_variant(name: str, *, image_token_range: tuple[int, int] = (0, 0), capacity_factor: float = 1.0,
                  mod_capacity: float = 0.25, **options: object) -> MoMaConfig:
    """`MoMaConfig` for a variant name; `options` are further MoMaConfig fields (router_noise, max_*_fraction)."""
    mod = name.startswith("mod_")
    body = name[4:] if mod else name
    settable = {f.name for f in dataclasses.fields(MoMaConfig)} - NAME_FIELDS
    if unknown := sorted(set(options) - settable):
        raise UserError(f"unknown MoMa option(s) {unknown}; valid: {sorted(settable)} (the name sets the groups)")
    common = dict(variant=name, capacity_factor=capacity_factor, image_token_range=tuple(image_token_range),
                  mod=mod, mod_capacity=mod_capacity, **options)
    if body == "dense":
        return MoMaConfig(**common)
    if (match := re.fullmatch(r"moe_(\d+)t(\d+)i", body)) and int(match[1]) > 0 and int(match[2]) > 0:
        return MoMaConfig(text_experts=int(match[1]), image_experts=int(match[2]), **common)
    if (match := re.fullmatch(r"moe_(\d+)x", body)) and int(match[1]) > 0:
        return MoMaConfig(mixed_experts=int(match[1]), **common)
    raise UserError(f"unknown MoMa variant {name!r}; valid: {VALID_FORMS}")


def check_fits_mesh(config: MoMaConfig, expert_axis_size: int) -> None:
    """Each routed group's experts are split over the mesh axis `expert`, so its size must divide evenly.

    Single-expert groups (1t1i) are replicated and fit any mesh.
    """
    if not isinstance(expert_axis_size, int) or expert_axis_size < 1:
        raise UserError(f"expert mesh axis size {expert_axis_size!r} must be a positive integer")
    bad = {group: count for group, count in config.groups.items() if count > 1 and count % expert_axis_size}
    if bad:
        sizes = ", ".join(f"{group} group has {count}" for group, count in bad.items())
        raise UserError(f"variant {config.variant!r} does not fit the mesh's expert axis of size "
                        f"{expert_axis_size} ({sizes} experts); use group sizes divisible by {expert_axis_size} "
                        "or a smaller mesh.expert")


def check_fits_model(config: MoMaConfig, model: ModelConfig) -> None:
    """The image-code range must lie inside the model's vocabulary."""
    if config.image_token_range[1] > model.vocab_size:
        raise UserError(f"image_token_range={config.image_token_range} reaches past vocab_size={model.vocab_size}")


def routing_groups(configured: int, rows: int, batch_shards: int) -> int:
    """How many routing groups a batch of `rows` rows splits into on a mesh with `batch_shards` batch shards.

    `configured` > 0 is used as given (it must divide `rows`); 0 means one group per batch shard, so each device
    routes only its own tokens, or one group when the rows do not split evenly over the shards (e.g. decoding a
    single row on a data-parallel mesh). Groups are consecutive rows, so a group never spans two shards when the
    count is a multiple of `batch_shards`.
    """
    groups = configured or (batch_shards if rows % batch_shards == 0 else 1)
    if rows % groups:
        raise UserError(f"moma.routing_groups={configured} does not split a batch of {rows} rows into equal "
                        f"groups; use a divisor of {rows} (or 0: one group per batch shard)")
    return groups


def check_routing_capacity(config: MoMaConfig, rows: int, seq_len: int, batch_shards: int) -> None:
    """Each routed expert must have at least one slot by the capacity rule k = c_e · b_M,group (moma.experts).

    b_M,group is bounded by the group's max_*_fraction of the routing group's tokens; MoD layers hand their FFN
    only ceil(mod_capacity · seq) tokens per row (with unbounded fractions, moma.depths.build_moma_model).
    """
    groups = routing_groups(config.routing_groups, rows, batch_shards)
    per_group_rows = rows // groups
    layouts = [(seq_len, config.max_fraction)]
    if config.mod:
        layouts.append((math.ceil(config.mod_capacity * seq_len), lambda name: 1.0))
    for tokens_per_row, max_fraction in layouts:
        tokens = per_group_rows * tokens_per_row
        for name, experts in config.groups.items():
            capacity = config.capacity_factor * max_fraction(name) * tokens / experts
            if experts > 1 and capacity < 1:
                raise UserError(
                    f"{name} experts get {capacity:.2f} < 1 slot each: {groups} routing groups of {tokens} tokens "
                    f"({per_group_rows} rows) x capacity_factor {config.capacity_factor} x max fraction "
                    f"{max_fraction(name)} / {experts} experts; use fewer routing_groups, longer rows or fewer "
                    "experts")


def image_token_mask(ids: Any, image_token_range: tuple[int, int]) -> Any:
    """True where an id is an image code, in [lo, hi) (text, BOI/EOI and padding are False); numpy or jax arrays
    alike (only comparisons). The one image-token predicate: the model's modality groups, the losses and the data
    all use it (`moma.mixed_modal.MixedVocab.is_image_token` passes its own range)."""
    low, high = image_token_range
    return (ids >= low) & (ids < high)
