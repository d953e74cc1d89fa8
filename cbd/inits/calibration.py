"""Alpha calibration (a grid around alpha0 scored by loss on the chain's validation batch) and the
request-time repair of both LInit terms (readers refit on each anchor's calibration activations)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from cbd.core import paths
from cbd.core.files import file_version
from cbd.core.manifest import ChainManifest, chain_dir
from cbd.errors import IntegrityError
from cbd.shape import arch
from cbd.shape.linit import Alpha, LInit, alpha_grid, alpha_group
from cbd.tensors.reader import LazyReader
from cbd.tensors.writer import write_safetensors
from cbd.train.models import build_model, eval_loss, random_state, state_loss

log = logging.getLogger("cbd.inits")


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


def anchor_cache(manifest: ChainManifest, name: str, tokens: torch.Tensor, chains_root: Path | None = None):
    """The anchor's own outputs over the calibration batch, cached beside the chain (they are the
    same for every request that prunes this anchor): a drop-in for
    :func:`cbd.repair.refit.anchor_outputs`. The first call computes every reader's and block's
    output (one pass) and writes them to ``.anchor-outputs/`` in the chains folder (float32, so a cached
    answer is the computed one bit for bit), named by the anchor's sha256 and the batch's; later
    calls read only what they need. An anchor whose outputs would pass
    ``CBD_ANCHOR_CACHE_MAX_BYTES`` (default 2 GiB; 0 turns the cache off), a cache that cannot be
    written or a file that cannot be read fall back to computing what is needed."""
    from cbd.repair.refit import anchor_outputs

    entry = manifest.anchor(name)
    digest = hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()[:16]
    folder = (chains_root or paths.chains_dir()) / ".anchor-outputs"  # no manifest: never listed as a chain
    path = folder / f"{manifest.name}.{name}.{entry.sha256[:16]}.{digest}.safetensors"
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
        size = 4 * tokens_n * spec.hidden_size * 3 * spec.num_hidden_layers  # o_proj, down_proj, block outputs
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


def repair_terms(li: LInit, names: dict[str, str | None], manifest: ChainManifest, chains_root: Path | None = None,
                 losses: dict[float, float] | None = None) -> dict:
    """Refit, for each anchor term of ``li`` (``names``: "small"/"big" -> anchor name), the readers of
    the units its map prunes, in situ (``cbd.repair.refit.insitu_refits``: on the inputs they get
    inside that anchor's Trans onto the target, toward the anchor's own outputs, over the chain's
    calibration batch; no teacher, no gradients), into ``li.replaced``; a refit that does not lower
    the term's loss on the chain's validation batch is dropped (the ridge is chosen there too:
    ``cbd.repair.refit.INSITU_RIDGE``). Returns what was done, for the recipe and the card; into
    ``losses`` (alpha -> validation loss) it puts each term's loss as repaired (alpha 1: the small
    term alone, 0: the big), measured on the validation batch while choosing the ridge, so
    :class:`Blend` need not measure them again."""
    from cbd.repair.refit import insitu_refits

    tokens, check, done = None, None, {}
    for term, anchor, maps in (("small", li.small, li.maps_small), ("big", li.big, li.maps_big)):
        if anchor is None or maps is None:
            continue
        if tokens is None:
            tokens, check = calibration_tokens(manifest, chains_root), validation_batches(manifest, chains_root)
        state = {n: anchor.read(n) for n in arch.param_names(anchor.spec)}
        per_layer, report = insitu_refits(anchor.spec, state, li.target, maps, list(tokens.split(4)), check=check,
                                          width_expand=li.opts.width_expand, depth_expand=li.opts.depth_expand,
                                          outputs=anchor_cache(manifest, names[term], tokens, chains_root)
                                          if names.get(term) else None)
        check_loss = report.pop("check_loss", None)
        if report["refit"]:
            li.replaced[term] = per_layer
            done[term] = {"anchor": names[term], **report}
            if losses is not None and check_loss is not None:
                losses[1.0 if term == "small" else 0.0] = check_loss
    return {"repair": {"method": "ridge, in situ", "terms": done}} if done else {}


class Blend:
    """Step-0 losses of an LInit at any alpha, for the price of one forward pass each: both terms
    (each anchor's Trans onto the target, its repairs included) are computed once, and one model's
    parameters are set to their blend (``torch.lerp(big, small, alpha)``, what ``LInit.tensor``
    computes, bit for bit) before each evaluation, instead of re-running Trans and building a
    model per candidate. ``alpha``: one value, or one per tensor group (``alpha_group``).
    Holds two target-sized states and a model."""

    def __init__(self, li: LInit, batches: list[torch.Tensor]):
        self.batches, self.passes = batches, 0
        self.small = li.state(1.0) if li.small is not None else None
        self.big = li.state(0.0) if li.big is not None else None
        first = self.big if self.big is not None else self.small
        self.model = build_model(li.target, first)
        params = dict(self.model.named_parameters())
        self.params = {n: params[n] for n in first if n in params}  # a tied head is the embedding
        self.cache: dict = {}

    @torch.no_grad()
    def set(self, alpha: Alpha) -> None:
        for n in self.params:
            a = alpha[alpha_group(n)] if isinstance(alpha, Mapping) else alpha
            if self.big is None or a == 1.0:
                self.params[n].copy_(self.small[n])
            elif self.small is None or a == 0.0:
                self.params[n].copy_(self.big[n])
            else:
                torch.lerp(self.big[n], self.small[n], a, out=self.params[n].data)

    def loss(self, alpha: Alpha) -> float:
        key = tuple(sorted(alpha.items())) if isinstance(alpha, Mapping) else float(alpha)
        if key not in self.cache:
            self.set(alpha)
            self.cache[key] = eval_loss(self.model, self.batches)
            self.passes += 1
        return self.cache[key]


def init_card(li: LInit, alpha, names: dict[str, str | None], batches: list[torch.Tensor],
              scores: dict[float, float] | None = None, *, repair: str = "none", scheme: str = "global",
              alphas_loss: float | None = None, blend: Blend | None = None) -> dict:
    """What a user gets before training: the init's step-0 loss on the chain's validation batch
    (training text of every corpus, never held out), beside each single anchor's Trans onto the
    same target (alpha 1: the smaller, alpha 0: the bigger) and a random init (transformers' own
    initialisation, seed 0). ``scores`` (alpha -> loss) are the calibration's, reused; ``blend``
    the calibration's :class:`Blend` (one is made when none is given)."""
    blend = blend or Blend(li, batches)
    blend.cache |= {float(a): v for a, v in (scores or {}).items()}
    loss = blend.loss

    single = {}
    for term, a in (("small", 1.0), ("big", 0.0)):
        if getattr(li, term) is not None:
            single[term] = {"anchor": names[term], "alpha": a, "loss": round(loss(a), 4)}
    best = min(single.values(), key=lambda x: x["loss"])
    tokens = sum(int(b[:, 1:].numel()) for b in batches)
    own = alphas_loss if isinstance(alpha, dict) and alphas_loss is not None else loss(alpha)
    return {
        "step0_loss": round(own, 4),
        "best_single_anchor": best, "single_anchors": single,
        "random_init_loss": round(state_loss(li.target, random_state(li.target, seed=0), batches), 4),
        "alpha": alpha, "alpha_scheme": scheme, "repair": repair,
        "gain_over_best_single_anchor": round(best["loss"] - own, 4),
        "validation": {"what": "the chain's validation batch (training text of every corpus of its recipe)",
                       "tokens": tokens},
    }


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


def calibrate_blocks(li: LInit, batches: list[torch.Tensor], alpha: float, base_loss: float, *,
                     blocks: int = 6, values: tuple[float, ...] = (0.0, 0.5, 1.0), sweeps: int = 1,
                     blend: Blend | None = None) -> tuple[dict[str, float], float, int]:
    """An alpha per group of tensors, from ``alpha`` (the global grid's best, loss ``base_loss``):
    coordinate descent over the groups (the outer tensors, then ``blocks`` contiguous blocks of
    target layers), each tried at ``values``, a change kept only when it lowers the validation
    loss. It starts at the global best, so it is never worse on ``batches`` than any point of the
    grid, the single anchors included. Costs at most ``sweeps * (blocks + 1) * len(values)``
    forward passes over ``batches`` (fewer where ``blend`` has measured a point already), and two
    target-sized states in memory (each anchor's Trans, :class:`Blend`).
    Returns (group -> alpha, its loss, forward passes made)."""
    blend = blend or Blend(li, batches)
    cut = layer_blocks(li.target.num_hidden_layers, blocks)
    groups = ["outer"] + [f"B{k}" for k in range(len(cut))]

    def per_group(current: dict[str, float]) -> dict[str, float]:
        out = {"outer": current["outer"]}
        for k, layers in enumerate(cut):
            out |= {f"L{j}": current[f"B{k}"] for j in layers}
        return out

    current = dict.fromkeys(groups, alpha)
    best, before = base_loss, blend.passes
    for _ in range(sweeps):
        changed = False
        for g in groups:
            for a in values:
                if a == current[g]:
                    continue
                loss = blend.loss(per_group(current | {g: a}))
                if loss < best - 1e-6:
                    best, current[g], changed = loss, a, True
        if not changed:
            break
    return per_group(current), best, blend.passes - before


def grid_losses(li: LInit, batches: list[torch.Tensor], blend: Blend | None = None) -> dict[float, float]:
    """alpha -> validation loss over :func:`cbd.shape.linit.alpha_grid` (both endpoints included)."""
    blend = blend or Blend(li, batches)
    return {a: blend.loss(a) for a in alpha_grid(li.alpha)}
