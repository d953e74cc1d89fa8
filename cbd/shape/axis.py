"""AxisMap: where each target unit along one axis comes from, and whether it is new."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class AxisMap:
    """Target unit ``j`` is source unit ``idx[j]``; ``new[j]``: an expansion (a duplicate, a
    zero or mean channel, an inserted block), not the source unit's own copy."""

    idx: tuple[int, ...]
    new: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.idx) != len(self.new):
            raise ValueError("idx and new differ in length")

    @classmethod
    def keep(cls, idx: Sequence[int]) -> AxisMap:
        return cls(tuple(int(i) for i in idx), (False,) * len(idx))

    @cached_property
    def is_identity(self) -> bool:
        return not any(self.new) and self.idx == tuple(range(len(self.idx)))

    def cached(self, key: tuple, make: Callable[[], T]) -> T:
        """A tensor derived from this map (gather indices, scale factors), made once: Trans
        applies the same maps to every tensor of a layer and the same resid map to all."""
        cache = self.__dict__.setdefault("_derived", {})  # frozen: fields only; this is a cache
        if key not in cache:
            cache[key] = make()
        return cache[key]
