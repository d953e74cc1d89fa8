"""LInit: ``theta_T = alpha * Trans(S -> T) + (1 - alpha) * Trans(B -> T)`` (docs/method.md §2).

S is the smaller adjacent anchor, B the bigger. The target's units are chosen in B's
coordinates preferring units S also has (``cbd.shape.maps.choose_maps(prefer=alignment)``), and S is
mapped onto the same units through its alignment (``cbd.shape.maps.compose``), so the two terms
are in the same coordinates. With one anchor (outside the chain's range, or an exact anchor
shape) the target is Trans of that anchor alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from cbd.core.plan import LInitOptions, TransOptions
from cbd.core.spec import ModelSpec
from cbd.shape import arch
from cbd.shape.maps import Alignment, Importance, Maps, choose_maps, compose
from cbd.shape.modes import RESID_FILL
from cbd.shape.trans import Alloc, Reader, axis_map, fresh, rows_independent, trans_tensor
from cbd.tensors.pool import empty, intermediates


@dataclass
class Anchor:
    """An anchor as LInit sees it: a spec, a tensor reader and its importance scores.

    When ``read`` also offers ``view`` and ``is_view`` (:class:`cbd.tensors.reader.LazyReader`), LInit
    reads through zero-copy read-only views: Trans and the blend only read their inputs, and
    whatever LInit returns is copied out of a view first.
    """

    spec: ModelSpec
    read: Reader
    importance: Importance | None = None
    # a function-preserving re-parametrisation of the stored anchor (cbd.repair.carry): its name, so
    # what is cached of the anchor's outputs is cached apart, and what it did, for the recipe
    tag: str = ""
    notes: dict = field(default_factory=dict)

    def reader(self) -> Reader:
        return getattr(self.read, "view", self.read)

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is (part of) the anchor's own storage, which callers must not modify."""
        is_view = getattr(self.read, "is_view", None)
        return is_view is not None and is_view(t)


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
    # "small"/"big" -> {(target layer, layer key): tensor in that anchor's coordinates}: what Trans
    # reads instead of the anchor's own tensor (cbd.repair.refit.refits: the repaired readers;
    # (None, name) for a global tensor: the final norm refit where the residual width is pruned)
    replaced: dict[str, dict[tuple[int | None, str], torch.Tensor]] = field(default_factory=dict)
    _own: dict[str, torch.Tensor | None] = field(default_factory=dict, repr=False)
    _own_axes: dict[tuple[str, int | None], torch.Tensor | None] = field(default_factory=dict, repr=False)

    @property
    def fades(self) -> bool:
        """Whether the small term holds B's units where S has none (``LInitOptions.blend`` "fade"): two
        anchors of a family whose new residual channels are 0 (RMSNorm). A LayerNorm family (GPT-2)
        fills them with the mean of the real ones, so B's readers would see them: the plain blend."""
        return (getattr(self.opts, "blend", "plain") == "fade" and self.small is not None and self.big is not None
                and RESID_FILL[arch.family(self.target).norm] == "zero")

    def width_expand(self, term: str) -> str:
        """The small term's new units are 0 when fading (their readers' columns: S's function, its own
        units unscaled); ``opts.width_expand`` otherwise."""
        return "zero" if term == "small" and self.fades else self.opts.width_expand

    def own(self, name: str) -> torch.Tensor | None:
        """Where the small term of a tensor that reads (does not write into the residual stream) holds
        one of S's own parameters: a bool tensor broadcastable to the target tensor ``name`` (False: a
        unit, channel or layer S lacks; a kv head counts as S's when one of S's query heads reads it,
        a copy made for GQA regrouping included), or None when there is nothing to fade: S's own
        everywhere, or a writer (``o_proj``, ``down_proj``, the embedding: Trans(S) holds 0 wherever
        S lacks a unit, so the plain blend is already ``(1 - alpha)`` times B's value there). Axes no
        map changes (vocabulary, head dim) count as S's own. Kept per tensor name."""
        if name not in self._own:
            self._own[name] = self._own_mask(name)
        return self._own[name]

    def _own_mask(self, name: str) -> torch.Tensor | None:
        maps, tgt = self.maps_small, self.target
        j, _ = arch.split_name(name)
        roles = arch.roles(tgt, name)
        if ("resid", "out") in roles:
            return None
        if j is not None and maps.layers.new[j]:  # a layer S lacks
            return torch.zeros((1,) * len(roles), dtype=torch.bool)
        mask = torch.ones((1,) * len(roles), dtype=torch.bool)
        for k, (axis, _) in enumerate(roles):
            keep = self._own_axis(axis, j)
            if keep is None:
                continue
            shape = [1] * len(roles)
            shape[k] = -1
            mask = mask & keep.view(shape)
        return None if bool(mask.all()) else mask

    def _own_axis(self, axis: str, j: int | None) -> torch.Tensor | None:
        """Along one axis of target layer ``j`` (None: a global axis), where S holds its own unit,
        per element (units expanded to their width); None where S lacks none. Kept per (axis, j):
        the tensors of a layer share their axes."""
        if (axis, j) not in self._own_axes:
            m = axis_map(self.maps_small, axis, j)
            keep = None
            if m is not None and any(m.new):
                keep = [not n for n in m.new]
                if axis == "kv":  # a copy of one of S's kv heads that S's own query heads read is S's
                    r, q = self.target.kv_group_size, self.maps_small.q[j].new
                    keep = [own or not all(q[g * r:(g + 1) * r]) for g, own in enumerate(keep)]
                keep = torch.tensor(keep).repeat_interleave(arch.unit(self.target, axis))
            self._own_axes[(axis, j)] = keep
        return self._own_axes[(axis, j)]

    def tensor(self, name: str, alpha: Alpha | None = None, rows: slice | None = None, *,
               alloc: Alloc = fresh) -> torch.Tensor:
        """One target tensor, owned by the caller: new memory from ``alloc``, or (alpha 0 or 1
        and nothing to map) the anchor's own tensor when that is not a read-only view of its file.

        ``rows``: only that block of rows, for a tensor whose rows Trans maps independently
        (:func:`cbd.shape.trans.rows_independent`). Frees nothing: the caller owns every
        intermediate ``alloc`` gave (:meth:`chunks` gives them back to the pool).
        """
        if rows is not None and not rows_independent(name, self.target):
            raise ValueError(f"{name}: Trans mixes its rows, so it is computed whole, not in blocks of rows")
        a = self.alpha if alpha is None else alpha
        if isinstance(a, Mapping):  # an alpha per group (alpha_group)
            a = a[alpha_group(name)]
        if self.fades and a != 0.0 and self.own(name) is not None:
            return self._faded(name, a, rows, alloc)
        parts = [(w, anchor, *self._trans(name, anchor, maps, rows, alloc, self.replaced.get(term, {}), term))
                 for term, anchor, maps, w in (("small", self.small, self.maps_small, a),
                                               ("big", self.big, self.maps_big, 1.0 - a))
                 if anchor is not None and w != 0.0]
        if len(parts) == 1:  # alpha 0 or 1: exactly one anchor's Trans, bit for bit
            _, anchor, t, _ = parts[0]
            return alloc(tuple(t.shape), t.dtype).copy_(t) if anchor.owns(t) else t
        (wa, _, ta, a_new), (_, _, tb, b_new) = parts
        # wa * ta + (1 - wa) * tb in one pass, written over a Trans output that is new memory when
        # there is one (elementwise, so writing over an input gives the same bits)
        out = tb if b_new else ta if a_new else alloc(tuple(tb.shape), tb.dtype)
        return torch.lerp(tb, ta, wa, out=out)

    def _faded(self, name: str, a: float, rows: slice | None, alloc: Alloc) -> torch.Tensor:
        """A tensor that reads: ``lerp(Trans(B), Trans(S), a)`` where S holds its own parameters, B's value
        elsewhere (a new unit's inputs, a new channel's readers, a layer S lacks: S's function never
        sees them, since Trans(S) writes 0 from every unit, channel and layer S lacks)."""
        ta, a_new = self._trans(name, self.small, self.maps_small, rows, alloc, self.replaced.get("small", {}), "small")
        tb, b_new = self._trans(name, self.big, self.maps_big, rows, alloc, self.replaced.get("big", {}), "big")
        own = self.own(name)
        if rows is not None and own.shape[0] != 1:
            own = own[rows]
        out = ta if a_new else alloc(tuple(ta.shape), ta.dtype)
        torch.lerp(tb, ta, a, out=out)
        return torch.where(own, out, tb, out=out)

    def _trans(self, name: str, anchor: Anchor, maps: Maps, rows: slice | None,
               alloc: Alloc, replaced: dict[tuple[int, str], torch.Tensor], term: str) -> tuple[torch.Tensor, bool]:
        """Trans of one anchor's tensor (its ``rows``), and whether that is new memory: Trans
        returns the tensor it read itself when it maps nothing, else a new tensor."""
        read, got = anchor.reader(), []
        layer, key = arch.split_name(name)
        swap = replaced.get((layer, key))  # (None, name): a global tensor
        if swap is not None:
            want = key if layer is None else arch.layer_prefix(anchor.spec).format(i=maps.layers.idx[layer]) + key
            own = read
            read = lambda n: swap if n == want else own(n)  # noqa: E731

        def reader(n: str) -> torch.Tensor:
            got.append(read(n) if rows is None else read(n)[rows])
            return got[-1]

        t = trans_tensor(name, reader, anchor.spec, self.target, maps, width_expand=self.width_expand(term),
                         depth_expand=self.opts.depth_expand, alloc=alloc)
        return t, all(t is not g for g in got)

    def tensors(self, alpha: Alpha | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        return self._execute(((name, None) for name in arch.param_names(self.target)), alpha)

    def chunks(self, alpha: Alpha | None = None, *, max_bytes: int = 8 << 20) -> Iterator[tuple[str, torch.Tensor]]:
        """``tensors()`` for a streamed write: a large tensor whose rows are independent (the
        embedding: vocabulary x hidden) comes as consecutive blocks of rows of at most
        ``max_bytes`` (float32), so the write recycles a few block buffers instead of touching
        fresh memory for the whole tensor, and the disk starts on it while the rest is computed.
        The blocks concatenate to exactly ``tensor(name)``."""
        return self._execute(self.blocks(max_bytes), alpha)

    def _execute(self, pieces: Iterator[tuple[str, slice | None]], alpha: Alpha | None):
        """The executor: computes each piece with buffers from the active
        :class:`~cbd.tensors.pool.BufferPool` (plain memory without one) and, once the piece is
        computed (the last use of its reads and Trans outputs), gives every intermediate back;
        the piece itself goes to the consumer (the writer gives it back once written)."""
        for name, rows in pieces:
            with intermediates() as scope:  # no yield inside: the scope must close first
                t = scope.keep(self.tensor(name, alpha, rows, alloc=empty))
            yield name, t

    def blocks(self, max_bytes: int = 8 << 20) -> Iterator[tuple[str, slice | None]]:
        """The (name, rows) pieces ``chunks`` computes, in file order (rows None: whole)."""
        for name in arch.param_names(self.target):
            shape = arch.tensor_shape(self.target, name)
            row_bytes = 4 * math.prod(shape[1:])
            if shape[0] * row_bytes <= max_bytes or not rows_independent(name, self.target):
                yield name, None
                continue
            step = max(1, max_bytes // row_bytes)
            for r in range(0, shape[0], step):
                yield name, slice(r, min(r + step, shape[0]))

    def state(self, alpha: Alpha | None = None) -> dict[str, torch.Tensor]:
        return dict(self.tensors(alpha))


def make_linit(target: ModelSpec, small: Anchor | None, big: Anchor | None, *, alpha: float,
               alignment: Alignment | None = None, opts: TransOptions | None = None) -> LInit:
    """Choose the maps. ``alignment`` places ``small`` inside ``big`` (None: not aligned)."""
    opts = opts or LInitOptions()  # a TransOptions without a blend (a chain step's) blends plainly
    sel = {"depth_by": opts.depth_subset, "width_by": opts.width_subset}
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


Alpha = float | Mapping[str, float]  # one alpha, or one per group of tensors (alpha_group -> alpha)


def alpha_group(name: str) -> str:
    """The group a tensor's alpha belongs to when alpha is given per group: ``L{j}`` for target
    layer j's tensors, ``outer`` for the embedding, the final norm and an untied head."""
    layer, _ = arch.split_name(name)
    return "outer" if layer is None else f"L{layer}"


def alpha_grid(alpha0: float, *, step: float = 0.1, width: int = 0) -> list[float]:
    """Candidates for calibration: alpha0, ``width`` neighbours ``step`` apart on each side, and both
    endpoints. By default none: on 26 measured target and repair pairs of the `tiny` and `default`
    chains the grid's interior never beat the better endpoint by more than 0.002 nats
    (docs/data/interp-*.json, with width 2), so four passes per request bought nothing; what the
    blend can gain comes from an alpha per block (``cbd.inits.calibration.calibrate_blocks``)."""
    cands = {0.0, 1.0, round(alpha0, 4)}
    cands |= {round(min(1.0, max(0.0, alpha0 + k * step)), 4) for k in range(-width, width + 1)}
    return sorted(cands)


def prune(state: dict[str, torch.Tensor], spec: ModelSpec, importance: Importance | None, child: ModelSpec,
          opts: TransOptions | None = None) -> tuple[dict[str, torch.Tensor], Alignment]:
    """The start of the next anchor: a subset of ``state`` by importance, and its alignment.

    Every axis of ``child`` must be at most ``spec``'s (anchors shrink along the chain).
    """
    from cbd.shape.trans import trans_state

    maps = prune_maps(spec, importance, child, opts)
    return trans_state(state, spec, child, maps), Alignment.from_maps(maps)


def prune_maps(spec: ModelSpec, importance: Importance | None, child: ModelSpec,
               opts: TransOptions | None = None) -> Maps:
    """The units of ``spec`` that the next anchor ``child`` keeps (every axis must shrink or stay)."""
    opts = opts or TransOptions()
    if any(c > p for c, p in zip(child.shape, spec.shape, strict=True)) or child.kv_group_size > spec.kv_group_size:
        raise ValueError(f"anchor {child.shape} (query heads per kv head {child.kv_group_size}) is not a subset of "
                         f"its parent {spec.shape} ({spec.kv_group_size}): every axis must shrink or stay")
    return choose_maps(spec, child, importance, depth_by=opts.depth_subset, width_by=opts.width_subset)
