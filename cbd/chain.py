"""Build a chain: the source becomes anchor a0, each next anchor is pruned from the one
before by importance and distilled from it (only the first step runs the source).

Resumable at two levels: finished anchors are kept (``anchor.json`` + verified weights) and
``cbd.distill`` resumes an interrupted anchor from its last step checkpoint. The manifest is
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

from cbd import __version__, arch
from cbd.chainstore import read_entry, write_anchor
from cbd.distill import DistillConfig, distill, evaluate, is_main_process
from cbd.importance import importance
from cbd.io import LazyReader, write_safetensors
from cbd.linit import prune
from cbd.manifest import (
    AnchorEntry,
    ChainManifest,
    anchor_dir,
    chain_dir,
    list_chains,
    load_manifest,
    write_manifest,
)
from cbd.model import build_model, state_of
from cbd.plan import target_spec
from cbd.recipe import Recipe, load_recipe
from cbd.spec import ModelSpec

log = logging.getLogger("cbd.chain")
Progress = Callable[[dict], None]


class ChainData:
    """Token streams of a recipe: train windows by step, fixed held-out and validation batches."""

    def __init__(self, recipe: Recipe) -> None:
        from cbd import data

        d = recipe.data
        self.train = data.token_file(d.corpus, recipe.tokenizer, "train")
        self.heldout = data.eval_batches(data.token_file(d.corpus, recipe.tokenizer, "heldout"),
                                         batch_size=d.eval_batch_size, seq_len=d.eval_seq_len,
                                         num_batches=d.eval_batches, seed=recipe.seed)
        self.calibration = data.calibration_batch(self.train, batch_size=d.calibration_batch_size,
                                                  seq_len=d.calibration_seq_len, seed=recipe.seed)
        self.validation = data.eval_batches(self.train, batch_size=4, seq_len=d.calibration_seq_len,
                                            num_batches=2, seed=recipe.seed + 7)
        self._seq = recipe.train.seq_len
        self._bs = recipe.train.batch_size

    def batch_fn(self, seed: int) -> Callable[[int], torch.Tensor]:
        from cbd import data

        return lambda step: next(data.train_batches(self.train, batch_size=self._bs, seq_len=self._seq,
                                                    seed=seed, start_step=step))


def build_chain(recipe_or_name: Recipe | str, *, root: Path | None = None, progress: Progress | None = None,
                force: bool = False) -> ChainManifest:
    recipe = load_recipe(recipe_or_name) if isinstance(recipe_or_name, str) else recipe_or_name
    report = progress or (lambda _: None)
    cdir = chain_dir(recipe.name, root)
    if recipe.name in list_chains(root) and not force:
        m = load_manifest(recipe.name, root)
        if m.recipe == recipe.model_dump(mode="json"):
            log.info("chain %s is already built", recipe.name)
            return m
    if force and (cdir / "manifest.json").exists():
        (cdir / "manifest.json").unlink()
    torch.manual_seed(recipe.seed)
    source = _source_dir(recipe)
    report({"stage": "tokenising corpus", "fraction": 0.0})
    data = ChainData(recipe)
    _prepare_chain_dir(cdir, source, data)
    entries = [_source_anchor(recipe, source, data, root)]
    state, spec = LazyReader(anchor_dir(recipe.name, "a0", root) / "model.safetensors").load_all(), entries[0].spec
    imp = LazyReader(anchor_dir(recipe.name, "a0", root) / "importance.safetensors").load_all()
    for k, a in enumerate(recipe.anchors, start=1):
        report({"stage": f"anchor {a.name} ({k}/{len(recipe.anchors)})", "fraction": (k - 1) / len(recipe.anchors)})
        parent = entries[0] if recipe.mode == "direct" else entries[-1]
        if recipe.mode == "direct":
            state, spec = LazyReader(anchor_dir(recipe.name, "a0", root) / "model.safetensors").load_all(), parent.spec
            imp = LazyReader(anchor_dir(recipe.name, "a0", root) / "importance.safetensors").load_all()
        entry, state, imp = _build_anchor(recipe, a, parent, spec, state, imp, data, root, report)
        entries.append(entry)
        spec = entry.spec
    manifest = ChainManifest(name=recipe.name, source=recipe.source_repo, tokenizer=recipe.tokenizer,
                             recipe=recipe.model_dump(mode="json"), anchors=entries, code_version=__version__,
                             created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if is_main_process():
        write_manifest(manifest, root)
        shutil.rmtree(cdir / ".work", ignore_errors=True)
    report({"stage": "done", "fraction": 1.0})
    return manifest


def _source_dir(recipe: Recipe) -> Path:
    from cbd import assets

    return assets.teacher_dir(recipe.source)


def _prepare_chain_dir(cdir: Path, source: Path, data: ChainData) -> None:
    tok = cdir / "tokenizer"
    if not (tok / "tokenizer.json").is_file() and is_main_process():
        tmp = cdir / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (source / f).is_file():
                shutil.copyfile(source / f, tmp / f)
        tmp.rename(tok)
    if is_main_process():
        write_safetensors(cdir / "validation.safetensors", {"tokens": torch.cat(data.validation).contiguous()})


def _source_anchor(recipe: Recipe, source: Path, data: ChainData, root: Path | None) -> AnchorEntry:
    done = read_entry(root, recipe.name, "a0")
    if done is not None:
        return done
    t0 = time.perf_counter()
    spec = ModelSpec.from_hf_config(json.loads((source / "config.json").read_text()))
    state = LazyReader(source / "model.safetensors").load_all()
    state = {n: state[n] for n in arch.param_names(spec)}
    model = build_model(spec, state)
    imp = importance(model, spec, data.calibration)
    metrics = {"heldout_loss": round(evaluate(model, data.heldout), 4), "tokens": 0, "teacher_tokens": 0,
               "wall_s": round(time.perf_counter() - t0, 1), "note": "the source model (Q4_1 de-quantised)"}
    log.info("anchor a0 (source) held-out loss %.3f", metrics["heldout_loss"])
    return write_anchor(root, recipe.name, "a0", spec, state, importance=imp, alignment=None, parent=None,
                        metrics=metrics)


def _build_anchor(recipe: Recipe, a, parent: AnchorEntry, parent_spec: ModelSpec, parent_state, parent_imp,
                  data: ChainData, root: Path | None, report: Progress):
    spec = target_spec(a, parent_spec)
    done = read_entry(root, recipe.name, a.name)
    if done is not None and done.spec == spec:
        log.info("anchor %s already built: reusing it", a.name)
        folder = anchor_dir(recipe.name, a.name, root)
        return done, LazyReader(folder / "model.safetensors").load_all(), \
            LazyReader(folder / "importance.safetensors").load_all()
    t0 = time.perf_counter()
    state, alignment = prune(parent_state, parent_spec, parent_imp, spec, recipe.prune)
    student = build_model(spec, state)
    pruned_loss = evaluate(student, data.heldout)
    log.info("anchor %s %s pruned from %s: held-out loss %.3f", a.name, spec.shape, parent.name, pruned_loss)
    steps = a.steps if a.steps is not None else recipe.train.steps
    result = None
    if steps:
        teacher = build_model(parent_spec, parent_state)
        t = recipe.train
        cfg = DistillConfig(kl_weight=t.kl_weight, ce_weight=t.ce_weight, temperature=t.temperature,
                            lr=a.lr or t.lr, min_lr_ratio=t.min_lr_ratio, warmup_steps=min(t.warmup_steps, steps),
                            weight_decay=t.weight_decay, batch_size=t.batch_size, seq_len=t.seq_len,
                            total_steps=steps, eval_every=t.eval_every, ckpt_every=t.ckpt_every,
                            seed=recipe.seed, topk_cache=t.topk_cache, device=recipe.device)
        work = chain_dir(recipe.name, root) / ".work" / a.name
        student.train()
        result = distill(student, teacher, data.batch_fn(recipe.seed + 1000 * len(a.name) + steps), data.heldout,
                         cfg, work_dir=work, progress=lambda p: report({"stage": f"distilling {a.name}", **p}))
        del teacher
    student.eval()
    state = state_of(student, spec)
    imp = importance(student, spec, data.calibration)
    metrics = {"heldout_loss_pruned": round(pruned_loss, 4),
               "heldout_loss": round(result.final_eval_loss if result and result.final_eval_loss is not None
                                     else evaluate(student, data.heldout), 4),
               "tokens": result.tokens if result else 0, "teacher_tokens": result.teacher_tokens if result else 0,
               "tokens_per_s": round(result.tokens_per_s, 1) if result else 0.0,
               "wall_s": round(time.perf_counter() - t0, 1)}
    log.info("anchor %s done: held-out loss %.3f (%s)", a.name, metrics["heldout_loss"], metrics)
    entry = write_anchor(root, recipe.name, a.name, spec, state, importance=imp, alignment=alignment,
                         parent=parent.name, metrics=metrics) if is_main_process() else None
    return entry, state, imp
