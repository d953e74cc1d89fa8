"""Trans's modes, one registry: how a target's new units are filled, which units a subset keeps.

:data:`MODES` maps each option to its modes by name: the fields of
:class:`cbd.core.plan.TransOptions` (``width_expand``, ``depth_expand``, ``width_subset``,
``depth_subset``) and ``resid_fill``, which the family's norm chooses (:data:`RESID_FILL`).
Adding a mode is adding one entry here (and its name to the option's ``Literal`` in
``TransOptions``; ``tests/test_shape_modes.py`` checks that the two agree). Trans and the map
choosers look modes up by name and never branch on one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cbd.shape.axis import AxisMap

# (shape, dtype) -> a new uninitialised tensor: how Trans allocates (cbd.shape.trans.fresh, or the
# streamed write's pool)
Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
# (t, dim, m, unit) -> t: set the new units of ``t``, just gathered along ``dim`` by ``m`` (so a
# fresh tensor, written in place); each unit is ``unit`` consecutive entries (head_dim for heads)
Fill = Callable[[torch.Tensor, int, AxisMap, int], torch.Tensor]


@dataclass(frozen=True)
class Expand:
    """What the new units of a mapped tensor hold along one axis."""

    fill: Fill
    doc: str


@dataclass(frozen=True)
class DepthExpand:
    """What an inserted block's output projections (``cbd.shape.arch.block_outputs``) hold:
    ``outputs(t, alloc)`` from the copied neighbour's ``t``."""

    outputs: Callable[[torch.Tensor, Alloc], torch.Tensor]
    doc: str


@dataclass(frozen=True)
class Subset:
    """Which source units a smaller target keeps.

    ``rank(n, scores)``: the ``n`` source units best first (``scores`` may be None: index
    order). ``spaced(n_src, n_tgt)``, when set, gives the kept units directly where no unit is
    preferred (an alignment's units come first otherwise, then ``rank``).
    """

    rank: Callable[[int, torch.Tensor | None], list[int]]
    doc: str
    spaced: Callable[[int, int], list[int]] | None = None


def scale_units(name: str, factors: Callable[[AxisMap], list[float]]) -> Fill:
    """A fill multiplying each target unit by ``factors(m)[j]`` (made once per map and unit)."""

    def fill(t: torch.Tensor, dim: int, m: AxisMap, unit: int) -> torch.Tensor:
        def make() -> torch.Tensor | None:
            f = factors(m)
            if all(x == 1.0 for x in f):
                return None
            return torch.tensor(f, dtype=torch.float32).repeat_interleave(unit)

        f = m.cached(("scale", name, unit), make)
        if f is None:
            return t
        shape = [1] * t.dim()
        shape[dim] = -1
        return t.mul_(f.to(t.dtype).view(shape))

    return fill


def _per_copy(m: AxisMap) -> list[float]:
    counts = Counter(m.idx)  # copies of each source unit, the original included
    return [1.0 / counts[i] for i in m.idx]


def _zero_new(m: AxisMap) -> list[float]:
    return [0.0 if n else 1.0 for n in m.new]


def fill_mean(t: torch.Tensor, dim: int, m: AxisMap, unit: int) -> torch.Tensor:
    """Set the new entries along ``dim`` to the mean of the real ones (residual: ``unit`` 1)."""
    real = torch.tensor([i for i, n in enumerate(m.new) if not n], dtype=torch.long)
    added = torch.tensor([i for i, n in enumerate(m.new) if n], dtype=torch.long)
    mean = t.index_select(dim, real).mean(dim, keepdim=True, dtype=torch.float32).to(t.dtype)
    shape = list(t.shape)
    shape[dim] = len(added)
    return t.index_copy_(dim, added, mean.expand(shape))


ZERO = Expand(scale_units("zero", _zero_new), "new units are 0")


def by_score(n: int, scores: torch.Tensor | None) -> list[int]:
    if scores is None:
        return list(range(n))
    # stable: ties keep index order, so equal scores give a deterministic choice
    return [int(i) for i in torch.sort(scores.float(), descending=True, stable=True).indices]


def by_index(n: int, scores: torch.Tensor | None) -> list[int]:
    return list(range(n))


def evenly_spaced(n_src: int, n_tgt: int) -> list[int]:
    """``pi(l) = round(l*(L_A-1)/(L_T-1))``: keeps the first and the last (docs/method.md §3)."""
    if n_tgt == 1:
        return [0]
    return sorted({round(k * (n_src - 1) / (n_tgt - 1)) for k in range(n_tgt)})


MODES: dict[str, dict[str, Expand | DepthExpand | Subset]] = {
    "width_expand": {  # a duplicate head or neuron: its readers' columns (io "in")
        "clone": Expand(scale_units("clone", _per_copy),
                        "copies share the readers' columns, divided by the number of copies (Net2Net)"),
        "zero": ZERO,
    },
    "resid_fill": {  # a new residual channel: every writer's row (io "out"); see RESID_FILL
        "zero": ZERO,
        "mean": Expand(fill_mean, "new channels carry the mean of the real ones (LayerNorm keeps its mean)"),
    },
    "depth_expand": {  # an inserted block, a copy of the block before it
        "identity": DepthExpand(lambda t, alloc: alloc(tuple(t.shape), t.dtype).zero_(),
                                "its output projections are 0: the block adds nothing to the residual"),
        "copy": DepthExpand(lambda t, alloc: t, "its output projections are kept (not exact)"),
    },
    "width_subset": {
        "importance": Subset(by_score, "the most important units"),
        "prefix": Subset(by_index, "the first units"),
    },
    "depth_subset": {
        "importance": Subset(by_score, "the most important blocks"),
        "even": Subset(by_score, "evenly spaced blocks, first and last kept", spaced=evenly_spaced),
    },
}

# The residual fill a family's norm needs to keep its function (cbd.shape.trans docstring)
RESID_FILL = {"rms": "zero", "layer": "mean"}


def mode(option: str, name: str) -> Expand | DepthExpand | Subset:
    try:
        return MODES[option][name]
    except KeyError:
        known = ", ".join(MODES.get(option, {})) or ", ".join(MODES)
        raise ValueError(f"unknown {option} mode {name!r} (known: {known})") from None

