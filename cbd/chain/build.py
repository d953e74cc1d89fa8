"""Build a chain: the source becomes anchor a0, each next anchor is pruned from the one
before by importance and distilled from it (only the first step runs the source).

Two pieces, one code path: ``build_anchor`` builds one anchor from its parent on disk (a0: the
source converted, or a model of the source's family taught by a foreign model, see
``cbd.core.recipe``), and ``write_chain_manifest`` publishes the chain. ``build_chain`` runs them in
order in one process; the queued build (``worker.queue.enqueue_build_chain``) runs each as its
own RQ job, each depending on the one before.

Resumable at two levels: finished anchors are kept (``anchor.json`` + verified weights) and
``cbd.train`` resumes an interrupted anchor from its last step checkpoint. The manifest is
written last, so a half-built chain is never served.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cbd import __version__
from cbd.core.catalog import TEACHERS, TOKENIZER_FILES
from cbd.core.files import publish_dir
from cbd.core.manifest import (
    AnchorEntry,
    ChainManifest,
    anchor_dir,
    chain_dir,
    list_chains,
    load_manifest,
    write_manifest,
)
from cbd.core.plan import target_spec
from cbd.core.recipe import AnchorRecipe, Recipe, load_recipe
from cbd.core.spec import ModelSpec
from cbd.errors import ChainNotBuiltError
from cbd.repair.refit import repaired_prune
from cbd.shape import arch
from cbd.shape.importance import importance
from cbd.shape.linit import prune
from cbd.store.anchors import read_entry, write_anchor
from cbd.tensors.reader import LazyReader
from cbd.tensors.writer import write_safetensors
from cbd.train.config import DistillConfig
from cbd.train.ddp import is_main_process
from cbd.train.loop import distill, evaluate
from cbd.train.models import build_model, state_of

log = logging.getLogger("cbd.chain")
Progress = Callable[[dict], None]


class ChainData:
    """Token streams of a recipe: train windows by step, fixed held-out and validation batches.

    One corpus (``data.corpus``): exactly the batches chains were always built with. A mix
    (``data.corpora``, the rule in ``cbd.data.mix``): training rows dealt to corpora by token share,
    each corpus' held-out work kept out and evaluated on its own (``heldout_by_domain``;
    ``heldout`` is all of them, one domain after the other, so its loss is the mean over domains),
    and the calibration and validation batches hold rows of every corpus by share.
    """

    def __init__(self, recipe: Recipe) -> None:
        from cbd.data import batches as data

        d = recipe.data
        tok = chain_tokenizer(recipe)
        self.domains = d.corpus_names
        self.heldout_by_domain = {
            name: data.eval_batches(data.token_file(name, tok, "heldout"),
                                    batch_size=d.eval_batch_size, seq_len=d.eval_seq_len,
                                    num_batches=d.eval_batches, seed=recipe.seed)
            for name in self.domains}
        self.heldout = [b for name in self.domains for b in self.heldout_by_domain[name]]
        self._seq = recipe.train.seq_len
        self._bs = recipe.train.batch_size
        self.mix: dict | None = None
        if not d.mixed:
            self.train = data.token_file(d.corpus, tok, "train")
            self.calibration = data.calibration_batch(self.train, batch_size=d.calibration_batch_size,
                                                      seq_len=d.calibration_seq_len, seed=recipe.seed)
            self.validation = data.eval_batches(self.train, batch_size=4, seq_len=d.calibration_seq_len,
                                                num_batches=2, seed=recipe.seed + 7)
            return
        from cbd.data import mix

        self.train_by_domain = {name: data.token_file(name, tok, "train") for name in self.domains}
        trains = list(self.train_by_domain.values())
        sizes = {name: len(t) for name, t in self.train_by_domain.items()}
        run = max((a.steps if a.steps is not None else recipe.train.steps) for a in recipe.anchors)
        run_tokens = run * self._bs * self._seq
        shares = mix.effective_shares(d.weights, sizes, run_tokens=run_tokens, max_epochs=d.max_epochs)
        self.shares = [shares[name] for name in self.domains]
        self.mix = {"weights": d.weights, "shares": {n: round(v, 6) for n, v in shares.items()},
                    "train_tokens": sizes, "run_tokens": run_tokens,
                    "epochs": {n: round(v, 4) for n, v in mix.epochs(shares, sizes, run_tokens).items()},
                    "max_epochs": d.max_epochs}
        self.calibration = mix.mixed_fixed_batch(trains, self.shares, n_rows=d.calibration_batch_size,
                                                 seq_len=d.calibration_seq_len, seed=recipe.seed)
        self.validation = list(mix.mixed_fixed_batch(trains, self.shares, n_rows=8, seq_len=d.calibration_seq_len,
                                                     seed=recipe.seed + 7).split(4))

    def batch_fn(self, seed: int) -> Callable[[int], torch.Tensor]:
        from cbd.data import batches as data

        if self.mix is not None:
            from cbd.data.mix import mixed_train_batches

            trains = list(self.train_by_domain.values())
            return lambda step: next(mixed_train_batches(trains, self.shares, batch_size=self._bs,
                                                         seq_len=self._seq, seed=seed, start_step=step))
        return lambda step: next(data.train_batches(self.train, batch_size=self._bs, seq_len=self._seq,
                                                    seed=seed, start_step=step))

    @torch.no_grad()
    def evaluate_heldout(self, model) -> tuple[float, dict]:
        """The held-out loss over every domain's windows together and ``domain_losses``' fields, from one
        pass over each domain: the pooled loss is the domains' summed NLL over their summed tokens (what
        ``evaluate(model, self.heldout)`` computes, without a second pass over the same windows)."""
        from cbd.train.models import nll_sum

        if len(self.domains) == 1:
            loss = evaluate(model, self.heldout)
            return loss, self.domain_losses(model, loss)
        device = next(model.parameters()).device
        sums = {name: nll_sum(model, batches, device) for name, batches in self.heldout_by_domain.items()}
        loss = sum(t for t, _ in sums.values()) / sum(c for _, c in sums.values())
        return loss, _domain_fields({name: round(t / c, 4) for name, (t, c) in sums.items()})

    def domain_losses(self, model, heldout_loss: float) -> dict:
        """``heldout_loss_by_domain`` and ``heldout_loss_mean`` (one corpus: ``heldout_loss`` itself)."""
        if len(self.domains) == 1:
            return _domain_fields({self.domains[0]: round(heldout_loss, 4)})
        return self.evaluate_heldout(model)[1]


def _domain_fields(by: dict[str, float]) -> dict:
    return {"heldout_loss_by_domain": by, "heldout_loss_mean": round(sum(by.values()) / len(by), 4)}


def build_chain(recipe_or_name: Recipe | str, *, root: Path | None = None, progress: Progress | None = None,
                force: bool = False) -> ChainManifest:
    """Every anchor in order, then the manifest; a chain built from the same recipe is returned as is."""
    recipe = _recipe(recipe_or_name)
    report = progress or (lambda _: None)
    check_source(recipe)
    if not force and (built := built_manifest(recipe, root)) is not None:
        log.info("chain %s is already built", recipe.name)
        return built
    if force and (chain_dir(recipe.name, root) / "manifest.json").exists() and is_main_process():
        (chain_dir(recipe.name, root) / "manifest.json").unlink()
    names = recipe.anchor_names
    data: list[ChainData] = []  # tokenised once, on first need, for all anchors
    for k, name in enumerate(names):
        report({"stage": f"anchor {name} ({k + 1}/{len(names)})", "fraction": k / len(names)})
        build_anchor(recipe, name, root=root, progress=report, data=data)
    manifest = write_chain_manifest(recipe, root=root, data=data)
    report({"stage": "done", "fraction": 1.0})
    return manifest


def built_manifest(recipe: Recipe, root: Path | None = None) -> ChainManifest | None:
    """The chain's manifest when it is built from exactly this recipe, else None."""
    if recipe.name not in list_chains(root):
        return None
    m = load_manifest(recipe.name, root)
    return m if m.recipe == recipe.model_dump(mode="json") else None


def build_anchor(recipe_or_name: Recipe | str, name: str, *, root: Path | None = None,
                 progress: Progress | None = None, data: list[ChainData] | None = None) -> AnchorEntry:
    """Build anchor ``name`` of the recipe's chain from its parent on disk; idempotent.

    A finished anchor of the expected shape is returned at once; an interrupted one resumes from
    its last step checkpoint. ``data``: a one-element cache of the recipe's ``ChainData``.
    """
    recipe = _recipe(recipe_or_name)
    report = progress or (lambda _: None)
    data = data if data is not None else []
    if name == "a0":
        check_source(recipe)
        return _anchor_zero(recipe, root, data, report)
    a = recipe.anchor(name)
    parent = _parent(recipe, name, root)
    spec = target_spec(a, parent.spec)
    done = read_entry(root, recipe.name, name)
    if done is not None and done.spec == spec:
        log.info("anchor %s already built: reusing it", name)
        return done
    _unpublish_stale(recipe, root)
    torch.manual_seed(recipe.seed)
    folder = anchor_dir(recipe.name, parent.name, root)
    state = LazyReader(folder / "model.safetensors").load_all()
    imp = LazyReader(folder / "importance.safetensors").load_all()
    return _build_anchor(recipe, a, parent, state, imp, _data(recipe, data), root, report)


def write_chain_manifest(recipe_or_name: Recipe | str, *, root: Path | None = None,
                         data: list[ChainData] | None = None) -> ChainManifest:
    """Publish the chain: tokenizer, validation batch, then ``manifest.json`` last and atomically.

    Every anchor of the recipe must be finished and verified (sha256) on disk; otherwise
    ``ChainNotBuiltError`` names the first missing one and nothing is published.
    """
    recipe = _recipe(recipe_or_name)
    entries = []
    for name in recipe.anchor_names:
        entry = read_entry(root, recipe.name, name)
        if entry is None:
            raise ChainNotBuiltError(f"anchor {name} of chain {recipe.name!r} is not built (or its weights differ "
                                     f"from its anchor.json): build it first; nothing was published")
        entries.append(entry)
    manifest = ChainManifest(name=recipe.name, source=recipe.source_repo, tokenizer=recipe.tokenizer,
                             recipe=recipe.model_dump(mode="json"), anchors=entries, code_version=__version__,
                             created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if is_main_process():
        cdir = chain_dir(recipe.name, root)
        _write_tokenizer(cdir, source_dir(recipe))
        chain_data = _data(recipe, data if data is not None else [])
        write_safetensors(cdir / "validation.safetensors", {"tokens": torch.cat(chain_data.validation).contiguous()})
        write_safetensors(cdir / "calibration.safetensors", {"tokens": chain_data.calibration.contiguous()})
        write_manifest(manifest, root)
        shutil.rmtree(cdir / ".work", ignore_errors=True)
    return manifest


def source_dir(recipe: Recipe) -> Path:
    """The recipe's source model folder: a0's weights, or with ``anchor_zero`` its family and tokenizer
    (a packaged model built from its package, a ``path:`` folder, or an ``hf:`` snapshot fetched once)."""
    from cbd.data.sources import source_folder

    return source_folder(recipe.source)


def chain_tokenizer(recipe: Recipe) -> str | Path:
    """The chain's tokenizer: a name (``cbd.data.tokenizers``), or the source folder (``tokenizer = "source"``)."""
    return source_dir(recipe) if recipe.tokenizer == "source" else recipe.tokenizer


def check_source(recipe: Recipe) -> None:
    """Refuse a source the weight-role tables cannot read, or one without a licence, before any work
    (a Hub source: only its config.json and README.md are fetched)."""
    from cbd.data.sources import source_info

    source_info(recipe.source, recipe.license)


def source_spec(recipe: Recipe) -> ModelSpec:
    """The source's shape from its ``config.json`` alone (a Hub source's weights are not fetched), checked."""
    from cbd.data.sources import source_info

    if recipe.source.startswith("hf:"):
        return ModelSpec.from_hf_config(source_info(recipe.source, recipe.license).config)
    check_source(recipe)
    return _source_spec(recipe)


def resolve(recipe: Recipe) -> Recipe:
    """The recipe with every ``fraction`` anchor given its shape for this source (``cbd.core.ladder``)."""
    if recipe.resolved:
        return recipe
    from cbd.core.ladder import resolve_anchors

    src = source_spec(recipe)
    zero = target_spec(recipe.anchor_zero, src) if recipe.anchor_zero is not None else None
    return resolve_anchors(recipe, src, zero)


def read_source_state(folder: Path, spec: ModelSpec, source: str) -> dict[str, torch.Tensor]:
    """The tensors of ``spec`` from a source checkpoint (one file or sharded), one tensor at a time, as float32.
    GPT-2 checkpoints saved without the ``transformer.`` prefix (the original ones) are read too."""
    from cbd.errors import RecipeError
    from cbd.tensors.sharded import CheckpointReader

    reader = CheckpointReader(folder)
    stored = set(reader.keys())
    names = arch.param_names(spec)
    where = {}
    for n in names:
        if n not in stored and spec.family == "gpt2" and n.removeprefix("transformer.") in stored:
            where[n] = n.removeprefix("transformer.")
        else:
            where[n] = n
    missing = [n for n in names if where[n] not in stored]
    if missing:
        raise RecipeError(f"source {source}: its weights lack {len(missing)} tensors of a {spec.model_type} of its "
                          f"config, e.g. {missing[:3]}; stored: {sorted(stored)[:3]}...")
    return {n: reader(where[n]) for n in names}


# ---- pieces ----------------------------------------------------------------------------------------
def _recipe(recipe_or_name: Recipe | str) -> Recipe:
    return resolve(load_recipe(recipe_or_name) if isinstance(recipe_or_name, str) else recipe_or_name)


def _data(recipe: Recipe, cache: list[ChainData]) -> ChainData:
    if not cache:
        cache.append(ChainData(recipe))
    return cache[0]


def _parent(recipe: Recipe, name: str, root: Path | None) -> AnchorEntry:
    names = recipe.anchor_names
    parent = "a0" if recipe.mode == "direct" else names[names.index(name) - 1]
    entry = read_entry(root, recipe.name, parent)
    if entry is None:
        raise ChainNotBuiltError(f"anchor {name} of chain {recipe.name!r} is pruned from {parent}, which is not "
                                 f"built yet: build {parent} first", allowed={"parent": parent})
    return entry


def _unpublish_stale(recipe: Recipe, root: Path | None) -> None:
    """About to (re)write an anchor: a manifest of another recipe must not list it meanwhile."""
    path = chain_dir(recipe.name, root) / "manifest.json"
    if path.exists() and is_main_process() and built_manifest(recipe, root) is None:
        log.warning("chain %s: recipe changed, unpublishing its manifest until the rebuild ends", recipe.name)
        path.unlink(missing_ok=True)


def _publish_anchor(recipe: Recipe, name: str, root: Path | None, write: Callable[[], AnchorEntry]) -> AnchorEntry:
    """Rank 0 writes the anchor; under torchrun every rank then reads it back after a barrier."""
    entry = write() if is_main_process() else None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return entry if entry is not None else read_entry(root, recipe.name, name)


def _write_tokenizer(cdir: Path, source: Path) -> None:
    tok = cdir / "tokenizer"
    if (tok / "tokenizer.json").is_file():
        return
    tmp = cdir / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in TOKENIZER_FILES:
        if (source / f).is_file():
            shutil.copyfile(source / f, tmp / f)
    publish_dir(tmp, tok)


# ---- anchor zero: the source itself, or a foreign model's pupil -------------------------------------
def _source_spec(recipe: Recipe) -> ModelSpec:
    return ModelSpec.from_hf_config(json.loads((source_dir(recipe) / "config.json").read_text()))


def _provenance(recipe: Recipe) -> dict:
    """``source`` (what, which commit, its licence and where the licence was stated) and ``license``."""
    from cbd.data.sources import commit_of, source_info

    info = source_info(recipe.source, recipe.license).record()
    commit = commit_of(source_dir(recipe))
    if commit is not None:
        info["commit"] = commit
    return {"source": info, "license": info["license"]}


def _anchor_zero(recipe: Recipe, root: Path | None, data: list[ChainData], report: Progress) -> AnchorEntry:
    z = recipe.anchor_zero
    spec = _source_spec(recipe) if z is None else target_spec(z, _source_spec(recipe))
    done = read_entry(root, recipe.name, "a0")
    teacher = done.metrics.get("foreign", {}).get("teacher") if done is not None else None
    if done is not None and done.spec == spec and teacher == (z.foreign if z else None):
        log.info("anchor a0 already built: reusing it")
        return done
    _unpublish_stale(recipe, root)
    torch.manual_seed(recipe.seed)
    if z is None:
        return _source_anchor(recipe, spec, _data(recipe, data), root)
    return _foreign_anchor(recipe, spec, _data(recipe, data), root, report)


def _source_anchor(recipe: Recipe, spec: ModelSpec, data: ChainData, root: Path | None) -> AnchorEntry:
    t0 = time.perf_counter()
    provenance = _provenance(recipe)
    state = read_source_state(source_dir(recipe), spec, recipe.source)
    model = build_model(spec, state)
    imp = importance(model, spec, data.calibration)
    loss, by_domain = data.evaluate_heldout(model)
    metrics = {"heldout_loss": round(loss, 4), **by_domain, "tokens": 0, "teacher_tokens": 0,
               "wall_s": round(time.perf_counter() - t0, 1), **provenance,
               "note": "the source model (Q4_1 de-quantised)" if recipe.source in TEACHERS
               else f"the source model ({recipe.source})"}
    if data.mix is not None:
        metrics["data_mix"] = data.mix
    log.info("anchor a0 (source) held-out loss %.3f", metrics["heldout_loss"])
    return _publish_anchor(recipe, "a0", root, lambda: write_anchor(
        root, recipe.name, "a0", spec, state, importance=imp, alignment=None, parent=None, metrics=metrics))


def _foreign_anchor(recipe: Recipe, spec: ModelSpec, data: ChainData, root: Path | None,
                    report: Progress) -> AnchorEntry:
    """a0 of ``spec`` (the source's family and tokenizer) taught by a foreign model (sequence-level KD)."""
    from transformers import AutoTokenizer

    from cbd.chain.anchor_zero import SeqKDOptions, foreign_anchor_zero
    from cbd.data.teachers import teacher_dir
    from cbd.data.tokenizers import load_tokenizer

    z = recipe.anchor_zero
    t0 = time.perf_counter()
    opts = SeqKDOptions.model_validate(
        {"teacher": z.foreign, "seed": recipe.seed} | z.seqkd.model_dump(exclude_none=True))
    tok = chain_tokenizer(recipe)
    chain_tok = load_tokenizer(tok) if isinstance(tok, str) else AutoTokenizer.from_pretrained(tok)
    state, kd = foreign_anchor_zero(spec, chain_tok, recipe.data.corpus, opts,
                                    report=lambda e: report({**e, "anchor": "a0"}))
    model = build_model(spec, state)
    imp = importance(model, spec, data.calibration)
    provenance = json.loads((teacher_dir(z.foreign) / "source.json").read_text())
    loss, by_domain = data.evaluate_heldout(model)
    metrics = {"heldout_loss": round(loss, 4), **by_domain, **_provenance(recipe),
               "tokens": kd["tokens"],
               "teacher_tokens": kd["teacher_tokens"], "wall_s": round(time.perf_counter() - t0, 1),
               "note": f"taught by {z.foreign} (another family) by sequence-level KD on its continuations of "
                       f"{recipe.data.corpus} prompts",
               "foreign": {"teacher": z.foreign, "method": "sequence-level KD", "provenance": provenance,
                           "options": opts.model_dump(mode="json"), **{k: v for k, v in kd.items() if k != "teacher"}}}
    log.info("anchor a0 (taught by %s) held-out loss %.3f", z.foreign, metrics["heldout_loss"])
    return _publish_anchor(recipe, "a0", root, lambda: write_anchor(
        root, recipe.name, "a0", spec, state, importance=imp, alignment=None, parent=None, metrics=metrics))


# ---- a1..aK: pruned from the parent, distilled from it ---------------------------------------------
def step_config(recipe: Recipe, a: AnchorRecipe, steps: int, **overrides) -> DistillConfig:
    """The distillation settings of one chain step (also used to compare against direct KD): the
    recipe's ``[train]`` (the anchor's own ``lr`` first), the recipe's seed and device."""
    t = recipe.train
    settings = t.optimization(steps, lr=a.lr or t.lr, seed=recipe.seed)
    return DistillConfig.of(settings, **(t.model_dump(exclude=set(settings.model_fields) | {"steps"})
                                         | {"total_steps": steps, "device": recipe.device} | overrides))


def autocast_of(cfg: DistillConfig) -> str:
    """What the distillation computed in: ``bf16`` (autocast, CUDA or a CPU with native bf16) or ``float32``."""
    from cbd.train.loop import cpu_bf16

    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return "bf16" if cfg.bf16 and (cuda or cpu_bf16()) else "float32"


def step_batches(recipe: Recipe, data: ChainData, a: AnchorRecipe, steps: int) -> Callable[[int], torch.Tensor]:
    """The training windows of one chain step, by step index."""
    return data.batch_fn(recipe.seed + 1000 * len(a.name) + steps)


def _build_anchor(recipe: Recipe, a: AnchorRecipe, parent: AnchorEntry, parent_state, parent_imp,
                  data: ChainData, root: Path | None, report: Progress) -> AnchorEntry:
    parent_spec = parent.spec
    spec = target_spec(a, parent_spec)
    t0 = time.perf_counter()
    repair_report = None
    if recipe.prune.repair == "ridge":  # the pruned readers refit in situ (cbd.repair), no teacher
        state, alignment, repair_report = repaired_prune(parent_state, parent_spec, parent_imp, spec, recipe.prune,
                                                         list(data.calibration.split(4)), check=data.validation)
        log.info("anchor %s: repair %s", a.name, repair_report)
    else:
        state, alignment = prune(parent_state, parent_spec, parent_imp, spec, recipe.prune)
    student = build_model(spec, state)
    pruned_loss = evaluate(student, data.heldout)
    log.info("anchor %s %s pruned from %s: held-out loss %.3f", a.name, spec.shape, parent.name, pruned_loss)
    steps = a.steps if a.steps is not None else recipe.train.steps
    result = None
    if steps:
        teacher = build_model(parent_spec, parent_state)
        cfg = step_config(recipe, a, steps)
        work = chain_dir(recipe.name, root) / ".work" / a.name
        student.train()
        result = distill(student, teacher, step_batches(recipe, data, a, steps), data.heldout,
                         cfg, work_dir=work, progress=lambda p: report({"stage": f"distilling {a.name}", **p}))
        del teacher
    student.eval()
    state = state_of(student, spec)
    imp = importance(student, spec, data.calibration)
    loss = (result.final_eval_loss if result and result.final_eval_loss is not None
            else evaluate(student, data.heldout))
    metrics = {"heldout_loss_pruned": round(pruned_loss, 4), **({"repair": repair_report} if repair_report else {}),
               "heldout_loss": round(loss, 4), **data.domain_losses(student, loss),
               "tokens": result.tokens if result else 0, "teacher_tokens": result.teacher_tokens if result else 0,
               "tokens_per_s": round(result.tokens_per_s, 1) if result else 0.0,
               "autocast": autocast_of(step_config(recipe, a, steps)) if steps else None,
               "wall_s": round(time.perf_counter() - t0, 1)}
    if result and len(result.eval_loss) > 2:  # [train] eval_every: the learning curve (tokens, held-out loss)
        metrics["heldout_curve"] = [[int(t), round(v, 4)] for t, v in result.eval_loss]
    if "license" in parent.metrics:  # the source's licence travels down the chain
        metrics["license"] = parent.metrics["license"]
    log.info("anchor %s done: held-out loss %.3f (%s)", a.name, metrics["heldout_loss"], metrics)
    return _publish_anchor(recipe, a.name, root, lambda: write_anchor(
        root, recipe.name, a.name, spec, state, importance=imp, alignment=alignment, parent=parent.name,
        metrics=metrics))
