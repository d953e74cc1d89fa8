"""LInit: ``theta_T = alpha * Trans(S -> T) + (1 - alpha) * Trans(B -> T)`` (METHOD.md 1.2).

S is the smaller adjacent anchor, B the bigger. The target's units are chosen in B's
coordinates preferring units S also has (``cbd.maps.choose_maps(prefer=alignment)``), and S is
mapped onto the same units through its alignment (``cbd.maps.compose``), so the two terms
are in the same coordinates. With one anchor (outside the chain's range, or an exact anchor
shape) the target is Trans of that anchor alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from cbd import arch
from cbd.maps import Alignment, Importance, Maps, choose_maps, compose
from cbd.plan import TransOptions
from cbd.spec import ModelSpec
from cbd.trans import Reader, trans_tensor


@dataclass
class Anchor:
    """An anchor as LInit sees it: a spec, a tensor reader and its importance scores."""

    spec: ModelSpec
    read: Reader
    importance: Importance | None = None


@dataclass
class LInit:
    """Maps for both anchors onto one target; ``tensor(name)`` computes one target tensor."""

    target: ModelSpec
    small: Anchor | None
    big: Anchor | None
    maps_small: Maps | None
    maps_big: Maps | None
    alpha: float
    opts: TransOptions
    _small_read: Reader | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Inserted blocks copy their neighbour, so consecutive target layers read the same layer
        # of the smaller anchor: keep its last few tensors (never modified: cbd.trans copies
        # before it scales, and only the bigger anchor's term is blended in place).
        if self.small is not None:
            self._small_read = lru_cache(maxsize=32)(self.small.read)

    def tensor(self, name: str, alpha: float | None = None) -> torch.Tensor:
        a = self.alpha if alpha is None else alpha
        kw = {"width_expand": self.opts.width_expand, "depth_expand": self.opts.depth_expand}
        parts = []
        if self.small is not None and a != 0.0:
            parts.append((a, trans_tensor(name, self._small_read, self.small.spec, self.target, self.maps_small, **kw)))
        if self.big is not None and a != 1.0:
            parts.append((1.0 - a, trans_tensor(name, self.big.read, self.big.spec, self.target, self.maps_big, **kw)))
        if len(parts) == 1:
            return parts[0][1]  # alpha 0 or 1: exactly one anchor's Trans, bit for bit
        (wa, ta), (_, tb) = parts
        if getattr(self.big.read, "returns_fresh", False):  # tb is ours alone: blend in place
            return tb.lerp_(ta, wa)  # wa * ta + (1 - wa) * tb, one pass over memory
        return torch.lerp(tb, ta, wa)

    def tensors(self, alpha: float | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in arch.param_names(self.target):
            yield name, self.tensor(name, alpha)

    def state(self, alpha: float | None = None) -> dict[str, torch.Tensor]:
        return dict(self.tensors(alpha))


def make_linit(target: ModelSpec, small: Anchor | None, big: Anchor | None, *, alpha: float,
               alignment: Alignment | None = None, opts: TransOptions | None = None) -> LInit:
    """Choose the maps. ``alignment`` places ``small`` inside ``big`` (None: not aligned)."""
    opts = opts or TransOptions()
    sel = {"depth_by": "even" if opts.depth_subset == "even" else "importance",
           "width_by": opts.width_subset}
    if small is not None and big is not None:
        maps_big = choose_maps(big.spec, target, big.importance, prefer=alignment, **sel)
        if alignment is not None:
            maps_small = compose(maps_big, alignment, small.spec, small.importance)
        else:
            maps_small = choose_maps(small.spec, target, small.importance, **sel)
        return LInit(target, small, big, maps_small, maps_big, alpha, opts)
    one = small or big
    if one is None:
        raise ValueError("LInit needs at least one anchor")
    maps = choose_maps(one.spec, target, one.importance, **sel)
    return LInit(target, small, big, maps if small else None, maps if big else None,
                 1.0 if small else 0.0, opts)


def compose_alignments(a_in_b: Alignment, b_in_c: Alignment) -> Alignment:
    """A inside C from A inside B and B inside C (anchors more than one step apart)."""
    layers = [b_in_c.layers[x] for x in a_in_b.layers]
    return Alignment(
        layers=layers,
        resid=[b_in_c.resid[x] for x in a_in_b.resid],
        q=[[b_in_c.q[b][h] for h in a_in_b.q[s]] for s, b in enumerate(a_in_b.layers)],
        kv=[[b_in_c.kv[b][g] for g in a_in_b.kv[s]] for s, b in enumerate(a_in_b.layers)],
        ffn=[[b_in_c.ffn[b][n] for n in a_in_b.ffn[s]] for s, b in enumerate(a_in_b.layers)],
    )


def alpha_grid(alpha0: float, *, step: float = 0.1, width: int = 2) -> list[float]:
    """Candidates for calibration: alpha0, neighbours ``step`` apart, and both endpoints."""
    cands = {0.0, 1.0, round(alpha0, 4)}
    cands |= {round(min(1.0, max(0.0, alpha0 + k * step)), 4) for k in range(-width, width + 1)}
    return sorted(cands)


def prune(state: dict[str, torch.Tensor], spec: ModelSpec, importance: Importance | None, child: ModelSpec,
          opts: TransOptions | None = None) -> tuple[dict[str, torch.Tensor], Alignment]:
    """The start of the next anchor: a subset of ``state`` by importance, and its alignment.

    Every axis of ``child`` must be at most ``spec``'s (anchors shrink along the chain).
    """
    opts = opts or TransOptions()
    if any(c > p for c, p in zip(child.shape, spec.shape, strict=True)) or child.kv_group_size > spec.kv_group_size:
        raise ValueError(f"anchor {child.shape} (query heads per kv head {child.kv_group_size}) is not a subset of "
                         f"its parent {spec.shape} ({spec.kv_group_size}): every axis must shrink or stay")
    from cbd.trans import trans_state

    maps = choose_maps(spec, child, importance, depth_by="even" if opts.depth_subset == "even" else "importance",
                       width_by=opts.width_subset)
    return trans_state(state, spec, child, maps), Alignment.from_maps(maps)
