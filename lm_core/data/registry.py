"""Sources by name: `<prefix>:<argument>` specs resolved through a table of factories, one table per kind.

Text sources (`lm_core.data.sources`) and image-caption sources (`lm_core.data.image_sources`) are each a
`SourceRegistry`; paper packages add their own prefixes (`knowledge:`, `retrieval:`, MoMa's rendered glyphs) by
registering a factory when they are imported.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from lm_core.errors import UserError

SourceT = TypeVar("SourceT")


class SourceRegistry(Generic[SourceT]):
    """prefix -> factory(argument, **options) for one kind of source ("text source", "image source")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., SourceT]] = {}
        self._forms: dict[str, str] = {}

    def register(self, prefix: str, factory: Callable[..., SourceT], *, form: str | None = None,
                 overwrite: bool = False) -> None:
        """Make `get("<prefix>:<argument>", **options)` call `factory(argument, **options)`.

        `form` is how the spec is written in error messages, e.g. "files:<glob>". Registering the same function
        again (its module imported twice) is allowed; a different factory for a taken prefix needs `overwrite`.
        """
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", prefix):
            raise ValueError(f"{self.kind} prefix {prefix!r} must be an identifier-like name")
        old = self._factories.get(prefix)
        if old is not None and not overwrite and _qualified_name(old) != _qualified_name(factory):
            raise ValueError(f"{self.kind} prefix '{prefix}' is already registered (pass overwrite=True to "
                             "replace it)")
        self._factories[prefix] = factory
        self._forms[prefix] = form or f"{prefix}:<argument>"

    def get(self, spec: str, **options: Any) -> SourceT:
        """The source a spec names, or a UserError listing every valid form."""
        prefix, _, argument = spec.partition(":")
        if prefix not in self._factories:
            raise UserError(f"unknown {self.kind} '{spec}'; valid: {self.valid_forms()}")
        return self._factories[prefix](argument, **options)

    def valid_forms(self) -> str:
        return ", ".join(self._forms[p] for p in sorted(self._forms))


def _qualified_name(function: Callable[..., Any]) -> tuple[str, str, int]:
    """Where a function is defined: the same after its module is imported again, different for another one."""
    line = getattr(getattr(function, "__code__", None), "co_firstlineno", -1)
    return getattr(function, "__module__", ""), getattr(function, "__qualname__", repr(function)), line
