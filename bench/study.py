"""Evidence: what CBD buys, measured on held-out text (docs/method.md §5).

Every initialiser is a pure function of (chain, target, seed) -> state dict; every score is the
mean next-token cross-entropy (nats/token) on held-out windows the chain never saw (the held-out
novel of the recipe's corpus). Seeds vary the evaluation windows, and for random inits the
init itself. ``cbd eval`` runs the studies and writes JSON, Markdown tables and PNG plots.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cbd.core.manifest import ChainManifest
from cbd.core.plan import TransOptions, adjacent_anchors, alpha0, target_spec
from cbd.core.request import Architecture
from cbd.core.spec import ModelSpec
from cbd.shape.linit import Anchor, make_linit
from cbd.store.anchors import load_alignment, load_anchor
from cbd.train.models import build_model, eval_loss, random_state, state_of

State = dict[str, torch.Tensor]


@dataclass
class Context:
    manifest: ChainManifest
    corpora: list[str]  # the chain's recipe corpora: held-out text of each
    tokenizer: str

    @property
    def corpus(self) -> str:
        return "+".join(self.corpora)

    def heldout(self, seed: int, *, batches: int = 4, batch_size: int = 4, seq_len: int = 256) -> list[torch.Tensor]:
        """``batches`` held-out windows split evenly over the chain's corpora (at least one each, one
        corpus after the other): the mean loss is the mean over domains."""
        from cbd.data import batches as data

        out = []
        for name in self.corpora:
            tokens = data.token_file(name, self.tokenizer, "heldout")
            out += data.eval_batches(tokens, batch_size=batch_size, seq_len=seq_len,
                                     num_batches=max(1, batches // len(self.corpora)), seed=seed)
        return out

    def validation(self) -> list[torch.Tensor]:
        from cbd.inits.calibration import validation_batches

        return validation_batches(self.manifest)

    def anchor(self, name: str) -> Anchor:
        return load_anchor(self.manifest, name)


def train_windows(ctx: Context, *, batch_size: int, seq_len: int, seed: int):
    """step -> training batch of the chain's corpora (equal token shares for a mix, as the packaged
    recipes weight them)."""
    from cbd.data import batches as data
    from cbd.data.mix import mixed_train_batches

    trains = [data.token_file(n, ctx.tokenizer, "train") for n in ctx.corpora]
    if len(trains) == 1:
        return lambda step: next(data.train_batches(trains[0], batch_size=batch_size, seq_len=seq_len, seed=seed,
                                                    start_step=step))
    return lambda step: next(mixed_train_batches(trains, [1.0] * len(trains), batch_size=batch_size, seq_len=seq_len,
                                                 seed=seed, start_step=step))


def context(manifest: ChainManifest) -> Context:
    from cbd.core.recipe import chain_corpora

    return Context(manifest, list(chain_corpora(manifest.recipe)), manifest.tokenizer)


def spec_of(ctx: Context, arch: dict) -> ModelSpec:
    return target_spec(Architecture.model_validate(arch), ctx.manifest.base)


def pair(ctx: Context, target: ModelSpec, small: str | None = None, big: str | None = None):
    s, b, _ = adjacent_anchors(ctx.manifest, target)
    small = small or (s.name if s else None)
    big = big or (b.name if b else None)
    return small, big


def linit_state(ctx: Context, target: ModelSpec, *, alpha: float | None = None, small: str | None = None,
                big: str | None = None, opts: TransOptions | None = None, aligned: bool = True) -> tuple[State, float]:
    small, big = pair(ctx, target, small, big)
    S = ctx.anchor(small) if small else None
    B = ctx.anchor(big) if big else None
    if alpha is None:
        alpha = alpha0(S.spec.non_embedding_params(), B.spec.non_embedding_params(), target.non_embedding_params()) \
            if S and B else (1.0 if S else 0.0)
    align = load_alignment(ctx.manifest, small, big) if S and B and aligned else None
    li = make_linit(target, S, B, alpha=alpha, alignment=align, opts=opts)
    return li.state(alpha), alpha


def calibrated_state(ctx: Context, target: ModelSpec) -> State:
    """LInit with alpha picked on the chain's validation batch (never the held-out text)."""
    from cbd.inits.calibration import calibrate

    small, big = pair(ctx, target)
    S, B = ctx.anchor(small), ctx.anchor(big)
    a0 = alpha0(S.spec.non_embedding_params(), B.spec.non_embedding_params(), target.non_embedding_params())
    li = make_linit(target, S, B, alpha=a0, alignment=load_alignment(ctx.manifest, small, big))
    alpha, _ = calibrate(li, ctx.validation())
    return li.state(alpha)


def pruned_source_state(ctx: Context, target: ModelSpec) -> State:
    """The source pruned straight to the target by importance, no distillation."""
    src = ctx.manifest.anchors[0].name
    return make_linit(target, None, ctx.anchor(src), alpha=0.0).state()


def initialisers(ctx: Context, target: ModelSpec) -> dict[str, Callable[[int], State]]:
    """name -> (seed -> state). Only ``random`` depends on the seed."""
    small, big = pair(ctx, target)
    out: dict[str, Callable[[int], State]] = {}
    cache: dict[str, State] = {}

    def once(key, fn):
        def get(_seed):
            if key not in cache:
                cache[key] = fn()
            return cache[key]
        return get

    out["cbd"] = once("cbd", lambda: linit_state(ctx, target)[0])
    if small and big:
        out["cbd calibrated"] = once("cal", lambda: calibrated_state(ctx, target))
    if small and big:
        out["single-small (alpha=1)"] = once("s", lambda: linit_state(ctx, target, alpha=1.0)[0])
        out["single-big (alpha=0)"] = once("b", lambda: linit_state(ctx, target, alpha=0.0)[0])
    out["pruned source"] = once("p", lambda: pruned_source_state(ctx, target))
    out["random"] = lambda seed: random_state(target, seed)
    return out


def step0(ctx: Context, targets: dict[str, dict], *, seeds=(0, 1, 2), methods: list[str] | None = None,
          log=print) -> list[dict]:
    """Held-out loss at step 0 of every initialiser on every target, mean and spread over seeds."""
    rows = []
    for tname, arch in targets.items():
        target = spec_of(ctx, arch)
        small, big = pair(ctx, target)
        for method, fn in initialisers(ctx, target).items():
            if methods and method not in methods:
                continue
            losses = []
            for seed in seeds:
                model = build_model(target, fn(seed))
                losses.append(eval_loss(model, ctx.heldout(seed)))
            row = {"target": tname, "shape": list(target.shape), "non_embedding_params": target.non_embedding_params(),
                   "small": small, "big": big, "method": method, "mean": statistics.mean(losses),
                   "std": statistics.stdev(losses) if len(losses) > 1 else 0.0, "losses": losses}
            log(f"{tname:24s} {method:24s} {row['mean']:.3f} ± {row['std']:.3f}")
            rows.append(row)
    return rows


def alpha_sweep(ctx: Context, target: ModelSpec, *, grid: int = 11, seed: int = 0) -> dict:
    """Loss at step 0 for alpha in [0, 1], against alpha0 and the calibrated alpha."""
    from cbd.inits.calibration import calibrate

    small, big = pair(ctx, target)
    S, B = ctx.anchor(small), ctx.anchor(big)
    a0 = alpha0(S.spec.non_embedding_params(), B.spec.non_embedding_params(), target.non_embedding_params())
    li = make_linit(target, S, B, alpha=a0, alignment=load_alignment(ctx.manifest, small, big))
    batches = ctx.heldout(seed)
    alphas = [round(k / (grid - 1), 4) for k in range(grid)]
    losses = [eval_loss(build_model(target, li.state(a)), batches) for a in alphas + [a0]]
    calibrated, _ = calibrate(li, ctx.validation())
    cal_loss = eval_loss(build_model(target, li.state(calibrated)), batches)
    return {"alphas": alphas, "losses": losses[:-1], "alpha0": a0, "alpha0_loss": losses[-1],
            "calibrated": calibrated, "calibrated_loss": cal_loss, "small": small, "big": big}


def recovery(ctx: Context, target: ModelSpec, state: State, *, tokens: int, eval_every_tokens: int, seed: int = 0,
             batch_size: int = 4, seq_len: int = 128, lr: float = 1e-3, warmup: int = 10, label: str = "",
             heldout_batches: int = 2) -> list[tuple[int, float]]:
    """Continued pretraining (cross-entropy only) from ``state``; held-out loss every N tokens.

    Every method gets the same optimiser (AdamW), schedule (``warmup`` steps, cosine to a tenth of
    ``lr``), batches and evaluation windows.
    """
    from cbd.train.config import DistillConfig
    from cbd.train.loop import distill

    tok = batch_size * seq_len
    steps = max(1, tokens // tok)
    cfg = DistillConfig(kl_weight=0.0, ce_weight=1.0, lr=lr, warmup_steps=min(warmup, steps), batch_size=batch_size,
                        seq_len=seq_len, total_steps=steps, eval_every=max(1, eval_every_tokens // tok),
                        ckpt_every=0, seed=seed)
    model = build_model(target, state).train()
    fn = train_windows(ctx, batch_size=batch_size, seq_len=seq_len, seed=seed + 99)
    t0 = time.perf_counter()
    res = distill(model, None, fn, ctx.heldout(seed, batches=heldout_batches), cfg, progress=False)
    print(f"recovery {label}: {steps} steps in {time.perf_counter() - t0:.0f} s, final {res.final_eval_loss:.3f}")
    return [(int(t), float(v)) for t, v in res.eval_loss]


def anchor_state(ctx: Context, name: str) -> State:
    a = ctx.anchor(name)
    from cbd.shape import arch

    return {n: a.read(n) for n in arch.param_names(a.spec)}


def _scores(imp: dict[str, torch.Tensor], how: str, seed: int) -> dict[str, torch.Tensor]:
    """Importance as measured, reversed (least important first), or random (a seeded draw)."""
    if how == "importance":
        return imp
    if how == "least important":
        return {k: -v for k, v in imp.items()}
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) for k, v in imp.items()}


# (operator, target shape relative to the anchor, kind): each changes one axis only
def _operators(spec: ModelSpec) -> list[tuple[str, dict, str]]:
    L, d, H, G, _, f = spec.shape
    return [
        ("depth: insert identity blocks", {"num_hidden_layers": L + L // 2}, "identity"),
        ("depth: insert copied blocks", {"num_hidden_layers": L + L // 2}, "copy"),
        ("heads: clone x2 (GQA groups x2)", {"num_attention_heads": 2 * H, "num_key_value_heads": 2 * G}, "clone"),
        ("heads: zero new x2", {"num_attention_heads": 2 * H, "num_key_value_heads": 2 * G}, "zero"),
        ("FFN: clone x2", {"intermediate_size": 2 * f}, "clone"),
        ("FFN: zero new x2", {"intermediate_size": 2 * f}, "zero"),
        ("residual: zero channels + RMSNorm rescale x1.5", {"hidden_size": d + d // 2}, "clone"),
        ("depth: remove 1/4 of blocks", {"num_hidden_layers": L - max(1, L // 4)}, "remove"),
        ("heads: remove half the kv groups", {"num_attention_heads": H // 2, "num_key_value_heads": G // 2}
         if G >= 2 else {"num_attention_heads": H // 2}, "remove"),
        ("residual: remove 1/4 of channels", {"hidden_size": d - d // 4}, "remove"),
        ("FFN: remove half the neurons", {"intermediate_size": f // 2}, "remove"),
    ]


def operator_damage(ctx: Context, name: str, *, seeds=(0, 1, 2), random_draws: int = 3, log=print) -> dict:
    """Each Trans operator alone on one anchor: held-out loss before and after.

    Expansions should keep the loss (function preserving); removals are scored for units
    chosen by importance, at random (``random_draws`` seeded draws) and least important first.
    """
    from cbd.shape.trans import trans_state

    A = ctx.anchor(name)
    state = anchor_state(ctx, name)
    batches = {s: ctx.heldout(s) for s in seeds}

    def score(spec, st) -> list[float]:
        model = build_model(spec, st)
        return [eval_loss(model, batches[s]) for s in seeds]

    base = score(A.spec, state)
    rows = [{"operator": "none (the anchor)", "selection": "", "shape": list(A.spec.shape),
             "losses": base, "mean": statistics.mean(base), "delta": 0.0}]
    log(f"{name} {A.spec.shape}: {rows[0]['mean']:.4f}")
    from cbd.shape.maps import choose_maps

    for op, shape, kind in _operators(A.spec):
        try:  # head_dim stays the anchor's (the chain's rule)
            tgt = ModelSpec.model_validate(A.spec.model_dump() | shape | {"head_dim": A.spec.head_dim})
        except ValueError as exc:
            log(f"skip {op}: {exc}")
            continue
        if kind == "remove":
            draws = [("importance", 0), ("least important", 0)] + [("random", k) for k in range(random_draws)]
        else:
            draws = [("importance", 0)]
        by_sel: dict[str, list[float]] = {}
        for how, k in draws:
            maps = choose_maps(A.spec, tgt, _scores(A.importance or {}, how, k))
            opts = {"width_expand": "zero" if kind == "zero" else "clone",
                    "depth_expand": "copy" if kind == "copy" else "identity"}
            by_sel.setdefault(how, []).append(statistics.mean(score(tgt, trans_state(state, A.spec, tgt, maps, **opts))))
        for how, vals in by_sel.items():
            mean = statistics.mean(vals)
            rows.append({"operator": op, "selection": how if kind == "remove" else kind, "shape": list(tgt.shape),
                         "mean": mean, "delta": mean - rows[0]["mean"],
                         "spread": statistics.stdev(vals) if len(vals) > 1 else 0.0, "draws": len(vals)})
            log(f"  {op:48s} {rows[-1]['selection']:16s} {mean:.4f} ({mean - rows[0]['mean']:+.4f})")
    return {"anchor": name, "shape": list(A.spec.shape), "rows": rows}


def direct_kd_state(ctx: Context, target: ModelSpec, *, steps: int | None = None, cache: Path | None = None,
                    log=print) -> tuple[State, dict]:
    """The target distilled straight from the source, starting from the source pruned to it.

    Same loss, optimiser, schedule and batches as the chain's first step, and by default the
    same number of steps (one chain step's teacher budget). Cached as safetensors in ``cache``.
    """
    from cbd.chain.build import ChainData, step_batches, step_config
    from cbd.core.recipe import Recipe
    from cbd.shape import arch
    from cbd.tensors.reader import LazyReader
    from cbd.tensors.writer import write_safetensors
    from cbd.train.loop import distill

    recipe = Recipe.model_validate(ctx.manifest.recipe)
    first = recipe.anchors[0]
    steps = steps or (first.steps if first.steps is not None else recipe.train.steps)
    path = cache / f"directkd-{'x'.join(map(str, target.shape))}-{steps}.safetensors" if cache else None
    if path is not None and path.is_file():
        r = LazyReader(path)
        return r.load_all(), json.loads(r.metadata.get("metrics", "{}"))
    src = ctx.manifest.anchors[0]
    teacher = build_model(src.spec, anchor_state(ctx, src.name))
    student = build_model(target, pruned_source_state(ctx, target)).train()
    cfg = step_config(recipe, first, steps, ckpt_every=0, topk_cache=None)  # no work dir: no resume, no cache
    data = ChainData(recipe)
    t0 = time.perf_counter()
    res = distill(student, teacher, step_batches(recipe, data, first, steps), data.heldout, cfg, progress=False)
    metrics = {"steps": steps, "tokens": res.tokens, "teacher_tokens": res.teacher_tokens,
               "wall_s": round(time.perf_counter() - t0, 1), "heldout_loss": res.final_eval_loss}
    log(f"direct KD {target.shape}: {metrics}")
    state = state_of(student.eval(), target)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, {n: state[n] for n in arch.param_names(target)}, {"metrics": json.dumps(metrics)})
    return state, metrics


def tokens_to_reach(curve: list[tuple[int, float]], level: float) -> float | None:
    """First token count at which ``curve`` reaches ``level`` (linear interpolation), else None."""
    if curve and curve[0][1] <= level:
        return 0.0
    for (t0, l0), (t1, l1) in zip(curve, curve[1:], strict=False):
        if l1 <= level:
            return t0 + (t1 - t0) * (l0 - level) / (l0 - l1) if l0 != l1 else t1
    return None


def save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=lambda o: o if not isinstance(o, float) or math.isfinite(o)
                               else None))
