"""Which MoMa model to build: variant names, expert groups and their validation.

Names (the paper's rows): "dense"; "moe_1t1i" (one FFN per modality); "moe_<m>t<n>i", e.g. "moe_4t4i" (m text
experts, n image experts, expert choice inside each modality's group); "moe_<n>x", e.g. "moe_8x" (expert choice
over n experts shared by both modalities); a "mod_" prefix adds staged mixture-of-depths.
"""

from __future__ import annotations

import dataclasses
import re

from lm_core.errors import UserError

VALID_FORMS = "dense, moe_1t1i, moe_<m>t<n>i (e.g. moe_4t4i), moe_<n>x (e.g. moe_8x), each optionally mod_-prefixed"


@dataclasses.dataclass(frozen=True)
class MoMaConfig:
    variant: str = "dense"
    text_experts: int = 0  # experts of the text group (0 with a mixed group or dense)
    image_experts: int = 0
    mixed_experts: int = 0  # "moe_<n>x": one group over all tokens
    capacity_factor: float = 1.0  # c_e = capacity_factor / |group|: on average one expert per token at 1.0
    image_token_range: tuple[int, int] = (0, 0)  # ids in [lo, hi) are image codes; everything else is text
    mod: bool = False  # staged mixture-of-depths on alternating layers
    mod_capacity: float = 0.25  # c_d: fraction of the batch's tokens a MoD layer processes

    def __post_init__(self) -> None:
        if not self.capacity_factor > 0:
            raise UserError(f"capacity_factor={self.capacity_factor} must be > 0 (1.0 = one expert per token)")
        if not 0 < self.mod_capacity <= 1:
            raise UserError(f"mod_capacity={self.mod_capacity} must be in (0, 1]")
        low, high = self.image_token_range
        if not 0 <= low <= high:
            raise UserError(f"image_token_range={self.image_token_range} must be (lo, hi) with 0 <= lo <= hi")

    @property
    def is_dense(self) -> bool:
        return self.text_experts == self.image_experts == self.mixed_experts == 0

    @property
    def groups(self) -> dict[str, int]:
        """Expert groups by the tokens they serve: {"text": m, "image": n} or {"mixed": n}."""
        if self.mixed_experts:
            return {"mixed": self.mixed_experts}
        return {name: count for name, count in (("text", self.text_experts), ("image", self.image_experts))
                if count}


def parse_variant(name: str, *, image_token_range: tuple[int, int] = (0, 0), capacity_factor: float = 1.0,
                  mod_capacity: float = 0.25) -> MoMaConfig:
    mod = name.startswith("mod_")
    body = name[4:] if mod else name
    common = dict(variant=name, capacity_factor=capacity_factor, image_token_range=tuple(image_token_range),
                  mod=mod, mod_capacity=mod_capacity)
    if body == "dense":
        return MoMaConfig(**common)
    if match := re.fullmatch(r"moe_(\d+)t(\d+)i", body):
        text, image = int(match[1]), int(match[2])
        if text > 0 and image > 0:
            return MoMaConfig(text_experts=text, image_experts=image, **common)
    if (match := re.fullmatch(r"moe_(\d+)x", body)) and int(match[1]) > 0:
        return MoMaConfig(mixed_experts=int(match[1]), **common)
    raise UserError(f"unknown MoMa variant {name!r}; valid: {VALID_FORMS}")


def check_fits_mesh(config: MoMaConfig, expert_axis_size: int) -> None:
    """Each group's experts are split over the mesh axis `expert`, so every group size must divide evenly."""
    bad = {group: count for group, count in config.groups.items() if count % expert_axis_size}
    if bad and expert_axis_size > 1:
        sizes = ", ".join(f"{group} group has {count}" for group, count in bad.items())
        raise UserError(f"variant {config.variant!r} does not fit the mesh's expert axis of size "
                        f"{expert_axis_size} ({sizes} experts); use group sizes divisible by {expert_axis_size} "
                        "or a smaller mesh.expert")
