"""Alpha calibration (a grid around alpha0 scored by loss on the chain's validation batch) and the
request-time repair of both LInit terms (readers refit on each anchor's calibration activations)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save as safetensors_bytes

from cbd.core import paths
from cbd.core.files import atomic_write_bytes, file_version
from cbd.core.manifest import ChainManifest, chain_dir
from cbd.core.spec import ModelSpec
from cbd.errors import IntegrityError
from cbd.shape import arch
from cbd.shape.linit import Alpha, Anchor, LInit, alpha_grid, alpha_group
from cbd.tensors.reader import LazyReader
from cbd.tensors.writer import write_safetensors
from cbd.train.models import (
    batch_sums,
    bf16_autocast,
    build_model,
    eval_loss,
    forward_nll,
    mean_nll,
)

log = logging.getLogger("cbd.inits")


def search_bf16() -> bool:
    """Whether the per-block alpha search (:func:`calibrate_blocks`) scores its candidates under bf16
    autocast: ``CBD_SEARCH_BF16`` = ``auto`` (the default: where the CPU has native bf16, AMX or
    AVX512-BF16, where a pass takes about 0.55x the float32 time), ``1`` or ``0``. Every loss that
    is reported (the repair's checks, the alpha grid, the search's result, the init card) is
    float32, the precision the checkpoint is delivered in."""
    from cbd.core.threads import cpu_has_bf16

    want = os.environ.get("CBD_SEARCH_BF16", "auto").strip().lower()
    if want in ("1", "true", "on"):
        return True
    if want in ("0", "false", "off"):
        return False
    return cpu_has_bf16()


TOKEN_CACHE_FILES = 8  # token files kept in memory per process (a chain has two, each tens of KB)
_tokens_cache: OrderedDict[tuple[str, int, int, int], torch.Tensor] = OrderedDict()
_tokens_lock = threading.Lock()


def _tokens(path: Path) -> torch.Tensor:
    """The ``tokens`` tensor of ``path`` (int64), kept warm per process: read once per file identity
    (path, inode, size, mtime; a chain rebuilt or the file rewritten is read anew), in a small LRU.
    Every call returns a fresh copy, so a caller that modifies what it got cannot change what the
    next job sees (the copy costs microseconds; the files hold a few thousand tokens)."""
    st = path.stat()
    key = (str(path), *file_version(st))
    with _tokens_lock:
        held = _tokens_cache.get(key)
        if held is not None:
            _tokens_cache.move_to_end(key)
            return held.clone()
    held = LazyReader(path, keep_dtype=True)("tokens").long().clone()  # its own memory, never a pool's
    with _tokens_lock:
        for old in [k for k in _tokens_cache if k[0] == key[0]]:  # an older version of the same file
            del _tokens_cache[old]
        _tokens_cache[key] = held
        while len(_tokens_cache) > TOKEN_CACHE_FILES:
            _tokens_cache.popitem(last=False)
    return held.clone()


def tokens_digest(*tensors: torch.Tensor) -> str:
    """sha256 of token tensors' bytes, in order: what the caches beside a chain are named by."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def validation_batches(manifest: ChainManifest, chains_root: Path | None = None) -> list[torch.Tensor]:
    """The chain's validation tokens (from its training split, never the held-out text); read from
    disk once per process and file version, a fresh copy per call."""
    path = chain_dir(manifest.name, chains_root) / "validation.safetensors"
    if not path.is_file():
        raise IntegrityError(f"chain {manifest.name} has no validation.safetensors: rebuild it to calibrate")
    return list(_tokens(path).split(4))


def calibration_tokens(manifest: ChainManifest, chains_root: Path | None = None) -> torch.Tensor:
    """The chain's calibration batch (importance and repair; training text, every corpus of the mix);
    read from disk once per process and file version, a fresh copy per call.
    A chain built before it was stored falls back to its validation batch."""
    path = chain_dir(manifest.name, chains_root) / "calibration.safetensors"
    if not path.is_file():
        return torch.cat(validation_batches(manifest, chains_root))
    return _tokens(path)


ANCHOR_CACHE_MAX_BYTES = 2 << 30  # CBD_ANCHOR_CACHE_MAX_BYTES: anchors whose outputs would take more are not cached


def anchor_cache(manifest: ChainManifest, name: str, tokens: torch.Tensor, chains_root: Path | None = None,
                 tag: str = ""):
    """The anchor's own outputs over the calibration batch, cached beside the chain (they are the
    same for every request that prunes this anchor): a drop-in for
    :func:`cbd.repair.refit.anchor_outputs`. The first call computes every reader's and block's
    output (one pass) and writes them to ``.anchor-outputs/`` in the chains folder (float32, so a cached
    answer is the computed one bit for bit), named by the anchor's sha256 and the batch's; later
    calls read only what they need. An anchor whose outputs would pass
    ``CBD_ANCHOR_CACHE_MAX_BYTES`` (default 2 GiB; 0 turns the cache off), a cache that cannot be
    written or a file that cannot be read fall back to computing what is needed. ``tag`` names a
    re-parametrisation of the anchor (:attr:`cbd.shape.linit.Anchor.tag`): its outputs are its own."""
    from cbd.repair.refit import anchor_outputs

    entry = manifest.anchor(name)
    digest = tokens_digest(tokens)[:16]
    folder = (chains_root or paths.chains_dir()) / ".anchor-outputs"  # no manifest: never listed as a chain
    # ".in": the residual readers' inputs are in it too (a cache written before them lacks them)
    path = folder / f"{manifest.name}.{name}{'.' + tag if tag else ''}.{entry.sha256[:16]}.{digest}.in.safetensors"
    limit = int(os.environ.get("CBD_ANCHOR_CACHE_MAX_BYTES", ANCHOR_CACHE_MAX_BYTES))

    def key(k: int, what: tuple) -> str:
        return f"b{k}." + (f"h.{what[1]}" if what[0] == "h" else f"y.{what[0]}.{what[1]}")

    def provide(spec, state, batches, need_y, need_h) -> list[dict]:
        wanted = [*need_y, *(("h", i) for i in need_h)]
        if limit <= 0:  # the cache is off
            return anchor_outputs(spec, state, batches, need_y, need_h)
        if path.is_file():
            try:
                read = LazyReader(path, keep_dtype=True)
                return [{w: read(key(k, w)) for w in wanted} for k in range(len(batches))]
            except Exception as exc:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
                log.warning("anchor output cache %s unreadable (%s): recomputing it", path.name, exc)
                path.unlink(missing_ok=True)
        tokens_n = sum(int(b[:, :-1].numel()) for b in batches)
        # o_proj's and down_proj's outputs, the block's output, the inputs of the two residual groups
        size = 4 * tokens_n * spec.hidden_size * 5 * spec.num_hidden_layers
        if size > limit:
            return anchor_outputs(spec, state, batches, need_y, need_h)
        full = anchor_outputs(spec, state, batches)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            write_safetensors(tmp, {key(k, w): t.contiguous() for k, held in enumerate(full) for w, t in held.items()})
            os.replace(tmp, path)  # whole or absent: a reader never sees a partial file
        except OSError as exc:
            log.warning("anchor output cache not written (%s)", exc)
        return [{w: held[w] for w in wanted} for held in full]

    return provide


def anchor_moment(manifest: ChainManifest, name: str, anchor: Anchor, chains_root: Path | None = None) -> torch.Tensor:
    """The second moment of anchor ``name``'s residual stream over the chain's calibration batch
    (:func:`cbd.repair.carry.resid_moment`): computed once (one forward pass), kept beside the chain
    in ``.anchor-outputs/`` like :func:`anchor_cache` (d x d float64: under 3 MB for the teacher),
    and in memory for the process."""
    from cbd.repair.carry import resid_moment

    entry = manifest.anchor(name)
    tokens = calibration_tokens(manifest, chains_root)
    folder = (chains_root or paths.chains_dir()) / ".anchor-outputs"
    path = folder / f"{manifest.name}.{name}.{entry.sha256[:16]}.{tokens_digest(tokens)[:16]}.moment.safetensors"
    with _MOMENTS_LOCK:
        if str(path) in _MOMENTS:
            return _MOMENTS[str(path)]
    moment = None
    if path.is_file():
        try:
            moment = LazyReader(path, keep_dtype=True)("moment").clone()
        except Exception as exc:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
            log.warning("residual moment cache %s unreadable (%s): recomputing it", path.name, exc)
    if moment is None:
        state = {n: anchor.read(n) for n in arch.param_names(anchor.spec)}
        moment = resid_moment(anchor.spec, state, list(tokens.split(4)))
        try:
            atomic_write_bytes(path, safetensors_bytes({"moment": moment}))
        except OSError as exc:
            log.warning("residual moment cache not written (%s)", exc)
    with _MOMENTS_LOCK:
        _MOMENTS[str(path)] = moment
    return moment


_MOMENTS: dict[str, torch.Tensor] = {}
_MOMENTS_LOCK = threading.Lock()


def carry_notes(li: LInit) -> dict:
    """What the carry did to each term of ``li`` ("small"/"big" -> its note; empty: nothing turned)."""
    return {t: a.notes["carry"] for t, a in (("small", li.small), ("big", li.big)) if a is not None and "carry" in a.notes}


def carried(manifest: ChainManifest, name: str, anchor: Anchor, target: ModelSpec,
            aligned: list[int] | None = None, chains_root: Path | None = None) -> Anchor:
    """Anchor ``name`` re-parametrised for a prune of its residual width to ``target``'s
    (:mod:`cbd.repair.carry`): the channels the prune may drop rotated onto their principal
    directions, ranked by energy, so the prune keeps the top ones. ``aligned``: the channels the
    smaller anchor shares, which stay where they are. The anchor itself when nothing is pruned, its
    family cannot be rotated, or the prune keeps none of the rotated channels. What was done is in
    the returned anchor's ``notes["carry"]``."""
    from cbd.repair.carry import carried_importance, carry_rotation, fixed_channels, rotatable, rotated_reader

    spec, width = anchor.spec, target.hidden_size
    if not rotatable(spec) or width >= spec.hidden_size:
        return anchor
    fixed = fixed_channels(spec, width, anchor.importance, aligned)
    if len(fixed) >= width:
        return anchor
    rot = carry_rotation(anchor_moment(manifest, name, anchor, chains_root), fixed)
    if rot is None:
        return anchor
    kept = width - len(fixed)
    tag = "carry-" + hashlib.sha256(rot.rotated.numpy().tobytes()).hexdigest()[:12]
    return Anchor(spec=spec, read=rotated_reader(spec, anchor.read, rot),
                  importance=carried_importance(anchor.importance, spec.hidden_size, rot), tag=tag,
                  notes={"carry": {"anchor": name, "method": "pca", "fixed": len(fixed), "rotated": len(rot.rotated),
                                   "kept": kept, "energy_kept": round(rot.kept_energy(kept), 4)}})


def ridge_trial(manifest: ChainManifest, name: str, target,
                chains_root: Path | None = None) -> tuple[dict[float, float], float | None]:
    """Anchor ``name`` pruned to ``target`` (by importance) and refit in situ at every ridge of
    ``INSITU_RIDGE``: (ridge -> loss on the chain's validation batch, the plain prune's loss there);
    both empty when the prune leaves no reader to refit."""
    from cbd.repair.refit import INSITU_RIDGE, insitu_refits
    from cbd.shape.maps import choose_maps
    from cbd.store.anchors import load_anchor

    anchor = load_anchor(manifest, name, chains_root)
    tokens, check = calibration_tokens(manifest, chains_root), validation_batches(manifest, chains_root)
    state = {n: anchor.read(n) for n in arch.param_names(anchor.spec)}
    maps = choose_maps(anchor.spec, target, anchor.importance, depth_by="importance", width_by="importance")
    _, report = insitu_refits(anchor.spec, state, target, maps, list(tokens.split(4)), check=check,
                              ridge=INSITU_RIDGE, guard=False, outputs=anchor_cache(manifest, name, tokens, chains_root))
    return ({float(r): v for r, v in report.get("check_loss_by_ridge", {}).items()},
            report.get("check_loss_plain"))


def anchor_ridge(manifest: ChainManifest, name: str, chains_root: Path | None = None) -> float | None:
    """The ridge a request's refit of anchor ``name`` uses: the one of ``INSITU_RIDGE`` whose in-situ
    refit of that anchor pruned to the *next* anchor's shape (a prune the chain fixes, whatever the
    request) scores lowest on the chain's validation batch. Measured once and kept beside the
    chain (``.anchor-outputs/``, named by the anchor's sha256 and both batches, like
    :func:`anchor_cache`), so every request after the first pays for one ridge instead of each;
    a function of the chain alone, so the same request always gets the same bytes. ``None`` (a
    request tries every ridge) for the smallest anchor (nothing is pruned from it in the chain),
    for an anchor whose prune to the next shape leaves no reader to refit, and when
    ``CBD_RIDGE_PER_ANCHOR=0``. Why the winner is the anchor's and not the target's:
    ``bench/ridges.py``, docs/results.md."""
    if os.environ.get("CBD_RIDGE_PER_ANCHOR", "1").strip() == "0":
        return None
    names = [a.name for a in manifest.anchors]
    i = names.index(name)
    if i == len(names) - 1:
        return None
    entry, nxt = manifest.anchor(name), manifest.anchors[i + 1].spec
    tokens, check = calibration_tokens(manifest, chains_root), validation_batches(manifest, chains_root)
    folder = (chains_root or paths.chains_dir()) / ".anchor-outputs"
    path = folder / f"{manifest.name}.{name}.{entry.sha256[:16]}.{tokens_digest(tokens, *check)[:16]}.in.ridge.json"
    try:
        kept = json.loads(path.read_text())["ridge"]
        return None if kept is None else float(kept)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not measured yet, or unreadable: measured (again) below
    by, _ = ridge_trial(manifest, name, nxt, chains_root)
    ridge = min(by, key=by.get) if by else None  # none: the chain's prune leaves nothing to refit
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"ridge": ridge, "check_loss_by_ridge": by, "pruned_to": nxt.model_dump()}))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("anchor ridge not kept (%s)", exc)
    return ridge


def repair_terms(li: LInit, names: dict[str, str | None], manifest: ChainManifest, chains_root: Path | None = None,
                 losses: dict[float, list[tuple[float, int]]] | None = None) -> dict:
    """Refit, for each anchor term of ``li`` (``names``: "small"/"big" -> anchor name), the readers of
    the units its map prunes, in situ (``cbd.repair.refit.insitu_refits``: on the inputs they get
    inside that anchor's Trans onto the target, toward the anchor's own outputs, over the chain's
    calibration batch; no teacher, no gradients), into ``li.replaced``; a refit that does not lower
    the term's loss on the chain's validation batch is dropped (the ridge is chosen there too:
    ``cbd.repair.refit.INSITU_RIDGE``). Returns what was done, for the recipe and the card; into
    ``losses`` (alpha -> per-batch sums over the validation batch, :func:`cbd.train.models.batch_sums`)
    it puts each term's loss as repaired (alpha 1: the small term alone, 0: the big), measured on
    the validation batch while choosing the ridge, so :class:`Blend` need not measure them again,
    on the whole batch or part of it."""
    from cbd.repair.refit import INSITU_RIDGE, insitu_refits

    tokens, check, done = None, None, {}
    for term, anchor, maps in (("small", li.small, li.maps_small), ("big", li.big, li.maps_big)):
        if anchor is None or maps is None:
            continue
        if tokens is None:
            tokens, check = calibration_tokens(manifest, chains_root), validation_batches(manifest, chains_root)
        state = _Lazy(anchor.read, arch.param_names(anchor.spec))
        ridge = anchor_ridge(manifest, names[term], chains_root) if names.get(term) else None
        sums: list[tuple[float, int]] = []
        per_layer, report = insitu_refits(anchor.spec, state, li.target, maps, list(tokens.split(4)), check=check,
                                          ridge=INSITU_RIDGE if ridge is None else ridge,
                                          width_expand=li.width_expand(term), depth_expand=li.opts.depth_expand,
                                          outputs=anchor_cache(manifest, names[term], tokens, chains_root,
                                                               tag=anchor.tag) if names.get(term) else None,
                                          check_sums=sums)
        report["ridge_from"] = "tried" if ridge is None else "anchor"
        report.pop("check_loss", None)
        if report["refit"]:
            li.replaced[term] = per_layer
            done[term] = {"anchor": names[term], **report}
            if losses is not None and sums:
                losses[1.0 if term == "small" else 0.0] = sums
    return {"repair": {"method": "ridge, in situ", "terms": done}} if done else {}


class _Lazy(Mapping):
    """An anchor's state dict whose tensors are read on first use and kept: the repair reads only
    the layers the target keeps (and the readers around a dropped span) when the anchor's outputs
    are cached, so a re-parametrised anchor (:mod:`cbd.repair.carry`, each read a rotation of the
    whole tensor) is not rotated where nothing reads it."""

    def __init__(self, read, names: list[str]):
        self._read, self._names, self._got = read, dict.fromkeys(names), {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._got:
            if name not in self._names:
                raise KeyError(name)
            self._got[name] = self._read(name)
        return self._got[name]

    def __contains__(self, name) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class _Known(torch.nn.Module):
    """Stands in for a decoder layer whose output is known (:class:`Blend`'s prefix runs): returns
    ``out`` when given, else its input unchanged (a layer before the one that hands over)."""

    def __init__(self, out: torch.Tensor | None = None):
        super().__init__()
        self.out = out

    def forward(self, *args, **kwargs):
        return self.out if self.out is not None else (args[0] if args else kwargs["hidden_states"])


# the interior points of a fading blend's alpha grid, then halfway to the best one's neighbours
# (grid_losses): on tiny's upper pair target 0.125 beat 0.25 by 0.03 nats on the validation batch
FADE_INTERIOR = (0.25, 0.5, 0.75)
FADE_REFINE = 0.125


class Blend:
    """Step-0 losses of an LInit at any alpha, for the price of one forward pass each: both terms
    (each anchor's Trans onto the target, its repairs included) are computed once, and one model's
    parameters are set to their blend (``torch.lerp(big, small, alpha)``, what ``LInit.tensor``
    computes, bit for bit, a fading blend included: tests/test_linit.py) before each evaluation,
    instead of re-running Trans and building a model per candidate; only the groups whose alpha changed are set again. ``alpha``: one value,
    or one per tensor group (``alpha_group``).

    ``loss(alpha, search=True)`` is the per-block search's: under bf16 autocast when ``bf16``
    (:func:`search_bf16`), and it runs only the layers from the first one whose alpha differs from
    a recently searched point (whose hidden states entering each layer it keeps: ``TRACES`` of
    them), so a candidate that changes a late block costs the late layers and the head. The hidden
    states are those the full pass computes, so the loss is the full pass's, bit for bit. Every
    other loss is a full float32 pass. Each precision has its own cache.
    Holds two target-sized states, a model and the traces."""

    TRACES = 3

    def __init__(self, li: LInit, batches: list[torch.Tensor], *, bf16: bool = False):
        self.batches, self.passes, self.bf16 = batches, 0, bf16
        self.small = li.state(1.0) if li.small is not None else None
        self.big = li.state(0.0) if li.big is not None else None
        first = self.big if self.big is not None else self.small
        self.model = build_model(li.target, first)
        params = dict(self.model.named_parameters())
        self.params = {n: params[n] for n in first if n in params}  # a tied head is the embedding
        self.groups = {n: alpha_group(n) for n in self.params}
        self.n = li.target.num_hidden_layers
        self.layers = self.model.get_submodule(arch.layer_prefix(li.target).split(".{i}")[0])
        self.was: dict[str, float] = {}  # group -> the alpha its parameters hold now
        self.cache: dict = {}  # (bf16, alpha key) -> loss
        self.sums: dict = {}  # (alpha key, batch digest) -> float32 (summed NLL, tokens): shared with views
        self.search_batches = self._search_batches(batches)
        self.traces: OrderedDict = OrderedDict()  # per-layer alphas -> per batch, the hidden states entering each layer
        self.layers_run = 0  # decoder layers run by search passes, over all batches (a pass runs n per batch)

    def on(self, batches: list[torch.Tensor]) -> Blend:
        """The same blend scored on other ``batches`` (part of the validation batch: the per-block
        search's half): it shares the terms and the model, not the losses or traces."""
        view = copy.copy(self)
        view.batches, view.cache, view.traces, view.layers_run, view.passes = batches, {}, OrderedDict(), 0, 0
        view.search_batches = self._search_batches(batches)
        return view

    def _search_batches(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """bf16 search passes run the batches as one (autocast casts every weight once per forward)."""
        one = self.bf16 and batches and len({tuple(b.shape[1:]) for b in batches}) == 1
        return [torch.cat(batches)] if one else batches

    @property
    def layer_passes(self) -> float:
        """The decoder layers the search's passes ran, in whole passes over the batch."""
        return self.layers_run / max(1, len(self.search_batches) * self.n)

    @staticmethod
    def key(alpha: Alpha):
        """One alpha for every group is that alpha: both spellings share a cache entry."""
        if isinstance(alpha, Mapping):
            values = set(alpha.values())
            return float(values.pop()) if len(values) == 1 else tuple(sorted(alpha.items()))
        return float(alpha)

    def remember(self, losses: Mapping[float, float | list[tuple[float, int]]]) -> None:
        """float32 losses measured elsewhere on the blend's batches and the same weights (the
        repair's checks): per alpha, the loss over all of them, or better their per-batch sums in
        order (:func:`cbd.train.models.batch_sums`), which also score any part of the batches."""
        for a, got in losses.items():
            if isinstance(got, (int, float)):
                self.cache[(False, self.key(a))] = float(got)
            elif len(got) == len(self.batches):
                self.sums |= dict(zip(self._sum_keys(a, self.batches), got, strict=True))

    @staticmethod
    def _value(alpha: Alpha, group: str) -> float:
        return float(alpha[group]) if isinstance(alpha, Mapping) else float(alpha)

    @torch.no_grad()
    def set(self, alpha: Alpha) -> None:
        for n, g in self.groups.items():
            a = self._value(alpha, g)
            if self.was.get(g) == a:
                continue
            if self.big is None or a == 1.0:
                self.params[n].copy_(self.small[n])
            elif self.small is None or a == 0.0:
                self.params[n].copy_(self.big[n])
            else:
                torch.lerp(self.big[n], self.small[n], a, out=self.params[n].data)
        self.was.clear()  # in place: views (:meth:`on`) share the model, so they share what it holds
        self.was.update({g: self._value(alpha, g) for g in set(self.groups.values())})

    def loss_on(self, alpha: Alpha, batches: list[torch.Tensor]) -> float:
        """The float32 loss at ``alpha`` on other ``batches`` than the blend's (the per-block
        search's check: part of the validation batch), from per-batch sums: a batch that a full
        pass at ``alpha`` (or the repair's check) already ran is not run again."""
        return self._float32(alpha, batches)

    def _float32(self, alpha: Alpha, batches: list[torch.Tensor]) -> float:
        """The float32 loss at ``alpha`` over ``batches``: :func:`eval_loss`'s, bit for bit (the
        per-batch sums added in order), running only the batches not yet measured at ``alpha``."""
        keys = self._sum_keys(alpha, batches)
        todo = [(k, b) for k, b in zip(keys, batches, strict=True) if k not in self.sums]
        if todo:
            self.set(alpha)
            self.sums |= dict(zip((k for k, _ in todo), batch_sums(self.model, [b for _, b in todo], chunked=True),
                                  strict=True))
            self.passes += 1
        return mean_nll(self.sums[k] for k in keys)

    def _sum_keys(self, alpha: Alpha, batches: list[torch.Tensor]) -> list[tuple]:
        """Where each batch's float32 sums at ``alpha`` are kept in :attr:`sums`."""
        key = self.key(alpha)
        return [(key, tokens_digest(b)) for b in batches]

    def loss(self, alpha: Alpha, *, search: bool = False) -> float:
        half = self.bf16 and search
        key = (half, self.key(alpha))
        if key in self.cache:
            return self.cache[key]
        if not half and (not search or all(k in self.sums for k in self._sum_keys(alpha, self.batches))):
            return self._float32(alpha, self.batches)  # a float32 search point already measured in full
        self.set(alpha)
        self.cache[key] = self._search_pass(alpha, half)
        self.passes += 1
        return self.cache[key]

    @torch.no_grad()
    def _search_pass(self, alpha: Alpha, half: bool) -> float:
        outer = self._value(alpha, "outer")
        layers = tuple(self._value(alpha, f"L{j}") for j in range(self.n))
        start, base = 0, None
        for t_outer, t_layers in self.traces:
            if t_outer != outer:
                continue  # the embedding differs: every layer's input does
            j = next((j for j in range(self.n) if t_layers[j] != layers[j]), self.n)
            if j > start:
                start, base = j, (t_outer, t_layers)
        old = list(self.layers)
        held = self.traces[base] if base is not None else None
        if base is not None:
            self.traces.move_to_end(base)
        amp = bf16_autocast() if half else contextlib.nullcontext
        total, count, trace = 0.0, 0, []
        was_training = self.model.training
        self.model.eval()
        try:
            for b, batch in enumerate(self.search_batches):
                entering = list(held[b][:start]) if held is not None else []
                for i in range(start):  # the layers before ``start`` hand over what they computed before
                    self.layers[i] = _Known(held[b][start] if i == start - 1 else None)
                hooks = [self.layers[i].register_forward_pre_hook(
                    lambda m, args, kwargs, got=entering: got.append(args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True) for i in range(start, self.n)]
                hooks.append(self.layers[self.n - 1].register_forward_hook(
                    lambda m, args, out, got=entering: got.append(out[0] if isinstance(out, tuple) else out)))
                try:
                    with amp():
                        nll, n = forward_nll(self.model, batch, chunked=True)  # as eval_loss(chunked=True)
                finally:
                    for h in hooks:
                        h.remove()
                total, count = total + nll, count + n
                trace.append(entering)
                self.layers_run += self.n - start
        finally:
            for i, m in enumerate(old):
                self.layers[i] = m
            self.model.train(was_training)
        self.traces[(outer, layers)] = trace
        while len(self.traces) > self.TRACES:
            self.traces.popitem(last=False)
        return total / count


def init_card(li: LInit, alpha, names: dict[str, str | None], batches: list[torch.Tensor], *,
              repair: str = "none", scheme: str = "global", blend: Blend | None = None) -> dict:
    """What a user gets before training, in float32 (the checkpoint's precision): the init's step-0
    loss on the chain's validation batch (training text of every corpus, never held out), beside
    each single anchor's Trans onto the same target (alpha 1: the smaller, alpha 0: the bigger) and
    a random init (transformers' own initialisation, seed 0). ``blend``: the calibration's
    :class:`Blend` (one is made when none is given), whose losses are reused."""
    blend = blend or Blend(li, batches)

    single = {}
    for term, a in (("small", 1.0), ("big", 0.0)):
        if getattr(li, term) is not None:
            single[term] = {"anchor": names[term], "alpha": a, "loss": round(blend.loss(a), 4)}
    best = min(single.values(), key=lambda x: x["loss"])
    tokens = sum(int(b[:, 1:].numel()) for b in batches)
    own = blend.loss(alpha)
    return {
        "step0_loss": round(own, 4),
        "best_single_anchor": best, "single_anchors": single,
        "random_init_loss": round(random_init_loss(li.target, batches), 4),
        "alpha": alpha, "alpha_scheme": scheme, "repair": repair,
        "blend": ("fade" if li.fades else "plain") if li.small is not None and li.big is not None else None,
        # the anchors whose residual width was carried (cbd.repair.carry): how much of it was kept
        "carry": carry_notes(li) or None,
        "gain_over_best_single_anchor": round(best["loss"] - own, 4),
        "validation": {"what": "the chain's validation batch (training text of every corpus of its recipe)",
                       "tokens": tokens, "precision": "float32"},
    }


RANDOM_LOSS_CACHE = 64  # (shape, batch) -> random-init loss, kept per process
_random_losses: OrderedDict[tuple[str, str], float] = OrderedDict()
_random_lock = threading.Lock()


def random_init_loss(target, batches: list[torch.Tensor]) -> float:
    """The float32 loss of transformers' own initialisation of ``target`` (seed 0) on ``batches``:
    the same numbers every time for one shape and batch, so kept per process (the worker's next
    request of the shape skips the model build and the pass)."""
    key = (target.model_dump_json(), tokens_digest(*batches))
    with _random_lock:
        if key in _random_losses:
            _random_losses.move_to_end(key)
            return _random_losses[key]
    loss = eval_loss(build_model(target, seed=0), batches, chunked=True)  # the model random_state(seed=0) reads
    with _random_lock:
        _random_losses[key] = loss
        while len(_random_losses) > RANDOM_LOSS_CACHE:
            _random_losses.popitem(last=False)
    return loss


def calibrate(li: LInit, batches: list[torch.Tensor]) -> tuple[float, dict]:
    """Pick alpha from a grid around alpha0 by validation loss at step 0 (forward passes only)."""
    if li.small is None or li.big is None:
        return li.alpha, {}
    scores = grid_losses(li, batches)
    best = min(scores, key=lambda a: (scores[a], abs(a - li.alpha)))
    return best, {"alpha0": li.alpha, "calibration_loss": {str(a): round(v, 5) for a, v in scores.items()}}


def layer_blocks(num_layers: int, blocks: int) -> list[list[int]]:
    """Target layers cut into at most ``blocks`` contiguous groups of near-equal size."""
    n = min(blocks, num_layers)
    return [list(range(num_layers * k // n, num_layers * (k + 1) // n)) for k in range(n)] if n else []


# the per-block search's moves: each group tries the grid's best alpha this far either side (clipped
# to [0, 1]). The values 0, 0.5 and 1 (the service until session 14) are three candidates per group
# from an interior start instead of two, and were never better on held-out text; wider moves (0.25)
# overfit the validation batch as often as they helped (docs/results.md, "The per-block search's
# moves and blocks")
BLOCK_STEPS = (-0.125, 0.125)


def block_values(alpha: float, steps: tuple[float, ...] = BLOCK_STEPS) -> tuple[float, ...]:
    """The alphas each group of the per-block search tries from ``alpha``: ``alpha + step`` for each
    of ``steps``, clipped to [0, 1], without ``alpha`` itself."""
    return tuple(sorted({min(1.0, max(0.0, round(alpha + s, 6))) for s in steps} - {alpha}))


# how many blocks of layers the per-block search gives an alpha of their own: up to SEARCH_BLOCKS
# (one layer each for targets of up to 12 layers), fewer where the candidates would pass
# SEARCH_BUDGET_MACS (search_blocks). On `default` one layer per block gained 0.045 nats over 6
# blocks on its depth-only target (docs/results.md, "The per-block search's moves and blocks")
SEARCH_BLOCKS = 12
SEARCH_BUDGET_MACS = 4.5e11


def search_blocks(target: ModelSpec, tokens: int, moves: int = len(BLOCK_STEPS)) -> int:
    """The blocks of layers the per-block search uses for ``target`` over a validation batch of
    ``tokens`` predicted tokens: the most, up to :data:`SEARCH_BLOCKS` and the target's layers,
    whose candidates fit :data:`SEARCH_BUDGET_MACS` multiply-accumulates, counting each of the
    ``(blocks + 1) * moves`` candidates as a whole pass over half the batch (the target's
    non-embedding parameters and its head per token; a candidate runs only the layers from its
    block on, so this is an upper bound). At least one block. A function of the shape and the
    batch alone, so the same request always searches the same way. On the packaged chains'
    1,024 validation tokens: 12 blocks up to ~34M multiply-accumulates per token (every target
    of docs/results.md below `default`'s first anchor: 14x320 is 31M), 6 for a ~30M target
    (16x448: 57M), 3 for 24x512 (91M), 2 for the teacher's size (127M)."""
    per_pass = (target.non_embedding_params() + target.vocab_size * target.hidden_size) * tokens / 2
    fit = int(SEARCH_BUDGET_MACS // (max(1, moves) * per_pass)) - 1
    return max(1, min(SEARCH_BLOCKS, target.num_hidden_layers, fit))


BlockCheck = Literal["none", "half", "twofold"]
BLOCK_CHECK: BlockCheck = "half"  # the service's (cbd.inits.run.prepare): docs/results.md measures all three


def calibrate_blocks(li: LInit, batches: list[torch.Tensor], alpha: float, base_loss: float, *,
                     blocks: int = 6, values: tuple[float, ...] = (0.0, 0.5, 1.0), sweeps: int = 1,
                     blend: Blend | None = None, check: BlockCheck = "none",
                     notes: dict | None = None) -> tuple[dict[str, float], float, int]:
    """An alpha per group of tensors, from ``alpha`` (the global grid's best, float32 loss
    ``base_loss`` on ``batches``): coordinate descent over the groups (the outer tensors, then
    ``blocks`` contiguous blocks of target layers), each tried at ``values`` (the service passes
    :func:`block_values` of the start and :func:`search_blocks` blocks), a change kept only
    when it lowers the search's loss. Candidates are scored by ``loss(.., search=True)`` (bf16
    where :func:`search_bf16` says, running only the layers a candidate changes); a result other
    than the start is measured again in float32 on all of ``batches`` and kept only if it beats
    ``base_loss`` there, so the result is never worse in float32 on ``batches`` than any point of
    the grid, the single anchors included.

    The search keeps the best of up to ``(blocks + 1) * len(values)`` candidates on the text
    it sees, so part of what it finds is that text's noise (on ``default``'s upper pair target the
    search on the whole validation batch gained 0.011 nats there and lost 0.098 on the held-out
    works: docs/results.md). ``check`` says what guards against that:

    - ``"none"``: the search runs on all of ``batches``;
    - ``"half"`` (the service's): it runs on every other batch (the packaged chains' validation
      batch is two batches of one row per corpus) and its result is kept only if it also beats the
      start on the rest, in float32;
    - ``"twofold"``: it runs on each half, each result is checked on the other half as above, and
      of those that pass, the one with the lower float32 loss on all of ``batches`` is kept. On the
      10 targets of docs/results.md it chose what ``"half"`` chose, at twice the search's cost, so
      the service (:data:`BLOCK_CHECK`) runs ``"half"``.

    The start, chosen by the grid on all of ``batches``, is favoured by a check if anything.
    ``notes`` (a dict) receives the checks' losses and the search's layer passes. Costs at most
    ``sweeps * (blocks + 1) * len(values) + 1`` passes over the text searched (a half, twice
    for ``"twofold"``; fewer where ``blend`` has measured a point already, and a block's candidates
    run the layers from that block on), one float32 pass over ``batches`` per result (whose
    per-batch sums also give the check its half; the start's come from the grid's or the repair's
    float32 pass where one measured it, else one more pass over the half), and two target-sized
    states in memory (each anchor's Trans, :class:`Blend`).
    Returns (group -> alpha, its float32 loss on ``batches``, passes made)."""
    blend = blend or Blend(li, batches)
    check = check if len(batches) >= 2 else "none"
    cut = layer_blocks(li.target.num_hidden_layers, blocks)
    groups = ["outer"] + [f"B{k}" for k in range(len(cut))]

    def per_group(current: dict[str, float]) -> dict[str, float]:
        out = {"outer": current["outer"]}
        for k, layers in enumerate(cut):
            out |= {f"L{j}": current[f"B{k}"] for j in layers}
        return out

    start = dict.fromkeys(groups, alpha)

    def descend(search: Blend) -> dict[str, float]:
        current = dict(start)
        best = search.loss(per_group(current), search=True)
        for _ in range(sweeps):
            changed = False
            for g in groups:
                for a in values:
                    if a == current[g]:
                        continue
                    loss = search.loss(per_group(current | {g: a}), search=True)
                    if loss < best - 1e-6:
                        best, current[g], changed = loss, a, True
            if not changed:
                break
        return current

    before = blend.passes
    halves = {"first": batches[0::2], "second": batches[1::2]}
    parts = {"none": (), "half": ("first",), "twofold": ("first", "second")}[check]
    searched = {k: blend.on(halves[k]) for k in parts} if parts else {"all": blend}
    kept: list[tuple[float, dict[str, float]]] = []
    checks = {}
    for part, search in searched.items():
        current = descend(search)
        if current == start:
            continue
        found = per_group(current)
        loss = blend.loss(found)  # float32 on every batch, as the grid's
        keep = loss < base_loss - 1e-6
        if keep and part != "all":
            other = halves["second" if part == "first" else "first"]
            was, now = blend.loss_on(per_group(start), other), blend.loss_on(found, other)
            keep = now < was - 1e-6
            checks[part] = {"start": round(was, 5), "found": round(now, 5), "loss": round(loss, 5), "kept": keep}
        if keep:
            kept.append((loss, found))
    passes = blend.passes - before + sum(v.passes for v in searched.values() if v is not blend)
    if notes is not None:
        notes["check"] = check
        notes["layer_passes"] = round(sum(v.layer_passes for v in searched.values()) / (1 if check == "none" else 2), 2)
        if checks:
            notes["checks"] = checks
    if kept:
        loss, found = min(kept, key=lambda x: x[0])
        return found, loss, passes
    return per_group(start), base_loss, passes


def grid_losses(li: LInit, batches: list[torch.Tensor], blend: Blend | None = None) -> dict[float, float]:
    """alpha -> float32 validation loss over :func:`cbd.shape.linit.alpha_grid` (both endpoints
    included). A fading blend's (``li.fades``) best point is often inside (docs/results.md, "The loss
    along alpha"), so instead of alpha0 its interior (:data:`FADE_INTERIOR`, then
    :data:`FADE_REFINE` either side of the best of those) is searched (``blend.loss(search=True)``:
    bf16 where :func:`search_bf16` says) and the best interior point is measured in float32 and
    added."""
    blend = blend or Blend(li, batches)
    # fading: the ends, then the searched interior (alpha0, a distance, never won there on tiny)
    scores = {a: blend.loss(a) for a in ((0.0, 1.0) if li.fades else alpha_grid(li.alpha))}
    inner = {a: blend.loss(a, search=True) for a in FADE_INTERIOR if a not in scores} if li.fades else {}
    if inner:
        best = min(inner, key=inner.get)
        for a in (best - FADE_REFINE, best + FADE_REFINE):  # halfway to each neighbour
            if 0.0 < a < 1.0 and a not in scores and a not in inner:
                inner[a] = blend.loss(a, search=True)
        a = min(inner, key=inner.get)
        scores[a] = blend.loss(a)
    return dict(sorted(scores.items()))
