"""Chain recipes: validated TOML files in ``anchors/`` (one per chain). Torch-free.

A recipe names the source model, the anchors' shapes (largest first; each must be a subset
of the one before on every axis, so anchors stay channel aligned), how anchors are pruned,
the distillation loss, data, optimiser and schedule, and the seed.

Anchor a0 is the source converted, or, with an ``[anchor_zero]`` table, a model of the source's
family and tokenizer (its shape given there) taught by a model of *another* family by
sequence-level KD (``cbd.bridge.foreign_anchor_zero``): the foreign model continues prompts drawn
from the corpus and a0 learns those texts; the chain then continues from a0 as usual.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from cbd.core import paths
from cbd.core.catalog import TEACHERS
from cbd.core.manifest import check_name
from cbd.core.names import NAME_PATTERN, NAME_RE
from cbd.core.plan import TransOptions
from cbd.core.request import Architecture
from cbd.core.sources import absolute_corpus, absolute_source, parse_corpus, parse_source
from cbd.core.spec import MAX_HEADS, MAX_HIDDEN, MAX_LAYERS
from cbd.core.training import (
    BatchSize,
    Count,
    Every,
    LossWeight,
    Lr,
    MinLrRatio,
    Seed,
    Steps,
    Temperature,
    TopKCache,
    Trains,
    WarmupSteps,
    WeightDecay,
    WindowLen,
    overrides_of,
)
from cbd.errors import RecipeError, UnknownNameError


class AnchorRecipe(Architecture):
    """One anchor: its shape (transformers names), or ``fraction`` of the source's non-embedding
    parameters (resolved to a valid shape for the source by ``cbd.core.ladder``), and optional
    per-anchor training overrides. A resolved anchor holds both (the shape is what is built)."""

    name: str = Field(pattern=NAME_PATTERN)
    num_hidden_layers: int | None = Field(default=None, ge=1, le=MAX_LAYERS)
    hidden_size: int | None = Field(default=None, ge=1, le=MAX_HIDDEN)
    num_attention_heads: int | None = Field(default=None, ge=1, le=MAX_HEADS)
    fraction: float | None = Field(default=None, gt=0, lt=1, allow_inf_nan=False,
                                   description="of the source's non-embedding parameters, instead of a shape")
    steps: int | None = Field(default=None, ge=0)
    lr: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _shape_or_fraction(self) -> AnchorRecipe:
        given = [self.num_hidden_layers, self.hidden_size, self.num_attention_heads]
        if all(v is None for v in given):
            if self.fraction is None:
                raise ValueError(f"anchor {self.name!r}: give its shape (num_hidden_layers, hidden_size, "
                                 "num_attention_heads, ...) or a fraction of the source (fraction = 0.3)")
        elif any(v is None for v in given):
            raise ValueError(f"anchor {self.name!r}: num_hidden_layers, hidden_size and num_attention_heads "
                             "go together (or give fraction instead)")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        out = handler(self)
        if self.fraction is None:  # the dump anchors had before fractions existed
            out.pop("fraction", None)
        return out

    @property
    def resolved(self) -> bool:
        return self.num_hidden_layers is not None


class TrainRecipe(Trains):
    """``[train]``: how each chain step distils (``cbd.chain.build.step_config``); the settings it
    does not name (betas, grad_clip) are ``Optimization``'s, the seed is the recipe's."""

    kl_weight: LossWeight = 0.5
    ce_weight: LossWeight = 0.5
    temperature: Temperature = 1.0
    lr: Lr = 1e-3
    min_lr_ratio: MinLrRatio = 0.1
    warmup_steps: WarmupSteps = 10
    weight_decay: WeightDecay = 0.0
    batch_size: BatchSize = 4
    seq_len: WindowLen = 256
    steps: Steps = Field(100, description="optimizer steps per anchor (0: prune only)")
    eval_every: Every = 0
    ckpt_every: Every = 50
    topk_cache: TopKCache = None


def _known_corpus(name: str, what: str) -> str:
    try:
        parse_corpus(name)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    return name


class CorpusShare(BaseModel):
    """One corpus of a ``[data] corpora`` mix and its weight (a token share, see ``DataRecipe``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    weight: float = Field(gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _known(self) -> CorpusShare:
        _known_corpus(self.name, "data.corpora name")
        return self


class DataRecipe(BaseModel):
    """``[data]``: the training text and the held-out, calibration and validation batches.

    Either one corpus, ``corpus = "austen"`` (the default; what every recipe before mixes meant),
    or a weighted mix, ``corpora = [{name = "austen", weight = 1}, {name = "shakespeare", weight = 1}]``
    (two or more distinct corpora of ``cbd.core.catalog.CORPORA``, weights > 0), never both.

    The weighting rule of a mix (``cbd.data.mix``): weights, normalised to sum 1, are the shares of
    *tokens* of the training stream. Every window is one row of a batch, and rows are dealt to
    corpora by share (so every batch mixes domains); a window is a random position in that
    corpus' training split. A corpus smaller than its share of a run is repeated, at most
    ``max_epochs`` times over the longest anchor's run (steps x batch_size x seq_len tokens): a
    share that would repeat it more is cut to that cap and the rest goes to the other corpora in
    proportion to their weights (if every corpus is capped, the shares are the corpora's sizes).
    Each corpus keeps its own held-out work out of training; ``eval_batches`` held-out batches are
    drawn *per corpus* (``heldout_loss`` is then their mean over domains), and the calibration and
    validation batches hold rows of every corpus by share (at least one each).

    The dump of a one-corpus recipe is exactly what it was before mixes existed (no ``corpora``,
    no ``max_epochs``): a built chain is recognised by its recorded recipe.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    corpus: str = "austen"
    corpora: tuple[CorpusShare, ...] | None = Field(
        default=None, min_length=2, description="a weighted mix of corpora instead of one corpus")
    max_epochs: float = Field(
        default=4.0, gt=0, allow_inf_nan=False,
        description="with corpora: the most times one anchor's run repeats a corpus (shares are cut to fit)")
    eval_batches: Count = 8
    eval_batch_size: Count = 4
    eval_seq_len: WindowLen = 256
    calibration_batch_size: Count = 8
    calibration_seq_len: WindowLen = 128

    @model_validator(mode="after")
    def _one_or_a_mix(self) -> DataRecipe:
        if self.corpora is None:
            if "max_epochs" in self.model_fields_set:
                raise ValueError("data.max_epochs applies to a corpora mix only; this recipe names one corpus")
            _known_corpus(self.corpus, "data.corpus")
            return self
        if "corpus" in self.model_fields_set:
            raise ValueError("give data.corpus (one corpus) or data.corpora (a weighted mix), not both")
        names = [c.name for c in self.corpora]
        if len(set(names)) != len(names):
            raise ValueError(f"data.corpora names must be distinct: {names}")
        if len(names) > self.calibration_batch_size:
            raise ValueError(f"data.corpora has {len(names)} corpora but calibration_batch_size is "
                             f"{self.calibration_batch_size}: the calibration batch needs a row of each")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        out = handler(self)
        if self.corpora is None:  # one corpus: the dump recipes had before mixes existed
            out.pop("corpora", None)
            out.pop("max_epochs", None)
        else:
            out.pop("corpus", None)
        return out

    @property
    def mixed(self) -> bool:
        return self.corpora is not None

    @property
    def weights(self) -> dict[str, float]:
        """Corpus name -> weight as given (one corpus: weight 1), in recipe order."""
        if self.corpora is None:
            return {self.corpus: 1.0}
        return {c.name: c.weight for c in self.corpora}

    @property
    def corpus_names(self) -> list[str]:
        return list(self.weights)


def chain_corpora(recipe_dump: dict[str, Any]) -> dict[str, float]:
    """Corpus name -> weight that a chain was trained on, from its recorded recipe (a manifest's
    ``recipe``): the one reading of ``[data]`` for everything that trains or evaluates after the
    build (the bridge, the benchmarks)."""
    return DataRecipe.model_validate(recipe_dump.get("data", {})).weights


class SeqKDOptions(Trains):
    """Anchor zero from a foreign model (docs/method.md §4): it writes text, the proxy learns it.

    The foreign teacher (Gemma-3-270M by default: another family, a 262k SentencePiece
    vocabulary) continues prompts drawn from the corpus; a model of the chain's family and
    tokenizer is trained on those texts with cross-entropy (sequence-level KD, Kim & Rush 2016,
    ``cbd.chain.anchor_zero``). Settings it does not name (min_lr_ratio, weight decay, betas,
    grad_clip) are ``Optimization``'s.
    """

    teacher: str = "gemma3-270m"
    prompts: Count = Field(64, description="corpus prompts the foreign model continues")
    prompt_words: Count = 24
    new_tokens: Count = Field(96, description="foreign tokens generated per prompt")
    temperature: float = Field(0.8, gt=0, description="sampling temperature of the foreign model")
    top_p: float = Field(0.95, gt=0, le=1)
    gen_batch: Count = 8
    steps: Count = Field(100, description="optimizer steps of a0 on the generated text")
    batch_size: BatchSize = 4
    seq_len: WindowLen = 128
    lr: Lr = 5e-4
    warmup_steps: WarmupSteps = 10
    seed: Seed = 0


class SeqKDRecipe(overrides_of(SeqKDOptions, exclude=frozenset({"teacher"}))):
    """``[anchor_zero.seqkd]``: ``SeqKDOptions`` fields (unset: its default; ``seed``: the recipe's)."""


class AnchorZeroRecipe(Architecture):
    """``[anchor_zero]``: a0 of this shape (source family and tokenizer) taught by ``foreign``."""

    foreign: str = Field(pattern=NAME_PATTERN, description="a model of cbd.core.catalog.TEACHERS")
    seqkd: SeqKDRecipe = SeqKDRecipe()

    @model_validator(mode="after")
    def _known_teacher(self) -> AnchorZeroRecipe:
        if self.foreign not in TEACHERS:
            raise ValueError(f"anchor_zero.foreign {self.foreign!r} is not a known model; known: {sorted(TEACHERS)}")
        return self


class Recipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    source: str = Field("smollm2-135m", description="a0, or with anchor_zero only its family and tokenizer: "
                        "a packaged model, 'path:/a/hf/folder' or 'hf:Org/Name@REVISION' (cbd.core.sources)")
    source_repo: str = Field("HuggingFaceTB/SmolLM2-135M-Instruct", description="base_model on model cards "
                             "(default for hf: sources: the repo id; for path: sources: the source)")
    tokenizer: str = Field("smollm2", description="a tokenizer by name, or 'source': the source folder's own "
                           "(the default for path: and hf: sources)")
    license: str | None = Field(default=None, description="the source's licence (an SPDX id or the name its card "
                                "uses); required when the source's card and config state none")
    seed: int = 0
    device: str = "auto"
    # Anchor starts are plain prunes by default: a repaired start (``repair = "ridge"``) begins lower, but the
    # first anchor ends higher after the same distillation steps and the chain level or higher on average
    # (docs/results.md, "Repaired or plain anchor starts").
    prune: TransOptions = Field(default=TransOptions(repair="none"),
                                description="how each anchor's start is cut from the one before")
    train: TrainRecipe = TrainRecipe()
    data: DataRecipe = DataRecipe()
    anchors: list[AnchorRecipe] = Field(min_length=1)
    expected: dict[str, Any] = Field(default_factory=dict, description="documented build time etc.")
    mode: Literal["chain", "direct"] = Field("chain", description="direct: every anchor distilled from the source")
    anchor_zero: AnchorZeroRecipe | None = Field(default=None, description="a0 taught by a foreign model")

    @model_validator(mode="before")
    @classmethod
    def _source_defaults(cls, data: Any) -> Any:
        """A ``ladder`` becomes anchors a1..aK by fraction; a path:/hf: source brings its own tokenizer and
        base model name unless the recipe names them."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "ladder" in data:
            ladder = data.pop("ladder")
            if "anchors" in data:
                raise ValueError("give anchors or ladder (fractions of the source), not both")
            if not isinstance(ladder, list) or not ladder:
                raise ValueError(f"ladder must be a list of fractions of the source, largest first (got {ladder!r})")
            data["anchors"] = [{"name": f"a{k + 1}", "fraction": f} for k, f in enumerate(ladder)]
        src = data.get("source")
        if isinstance(src, str) and src.startswith(("path:", "hf:")):
            data.setdefault("tokenizer", "source")
            data.setdefault("source_repo", src[3:].partition("@")[0] if src.startswith("hf:") else src)
        return data

    @model_validator(mode="after")
    def _known_source(self) -> Recipe:
        parse_source(self.source)
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        out = handler(self)
        if self.license is None:  # the dump recipes had before licences were stated
            out.pop("license", None)
        return out

    @property
    def resolved(self) -> bool:
        """Every anchor has a shape (none is still a fraction of the source)."""
        return all(a.resolved for a in self.anchors)

    @model_validator(mode="after")
    def _unique_shrinking(self) -> Recipe:
        names = [a.name for a in self.anchors]
        if len(set(names)) != len(names) or "a0" in names:
            raise ValueError(f"anchor names must be unique and not 'a0' (the source): {names}")
        return self

    @model_validator(mode="after")
    def _anchor_zero_one_corpus(self) -> Recipe:
        if self.anchor_zero is not None and self.data.mixed:
            raise ValueError("anchor_zero draws its prompts from one corpus: give data.corpus, not data.corpora")
        return self

    @property
    def anchor_names(self) -> list[str]:
        """Every anchor in build order: ``a0`` (the source, or the foreign model's anchor zero), then the rest."""
        return ["a0", *(a.name for a in self.anchors)]

    def anchor(self, name: str) -> AnchorRecipe:
        for a in self.anchors:
            if a.name == name:
                return a
        raise UnknownNameError(f"recipe {self.name!r} has no anchor {name!r}", allowed=self.anchor_names)


def extra_recipe_dirs() -> list[Path]:
    """Folders of recipes of one's own (``$CBD_RECIPES``, ``os.pathsep``-separated): the service and
    ``cbd chain build NAME`` find them by name after the packaged ones (a packaged name wins)."""
    return [Path(p).expanduser() for p in os.environ.get("CBD_RECIPES", "").split(os.pathsep) if p.strip()]


def recipe_dirs(packaged: Path | None = None) -> list[Path]:
    """Where recipes are looked up by name, in order: the packaged ``anchors/``, then ``$CBD_RECIPES``."""
    return [packaged or paths.RECIPES_DIR, *extra_recipe_dirs()]


def find_recipe(name: str, dirs: list[Path] | None = None) -> Path | None:
    """The file of recipe ``name`` (``<dir>/<name>.toml``, first folder first), or None."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        return None
    for d in dirs or recipe_dirs():
        if (d / f"{name}.toml").is_file():
            return d / f"{name}.toml"
    return None


def recipe_path(name: str) -> Path:
    """Where recipe ``name`` is read from (the packaged folder when no folder has it)."""
    return find_recipe(name) or paths.RECIPES_DIR / f"{check_name(name, 'recipe name')}.toml"


def list_recipes(dirs: list[Path] | None = None) -> list[str]:
    return sorted({p.stem for d in dirs or recipe_dirs() if d.is_dir() for p in d.glob("*.toml")
                   if NAME_RE.match(p.stem)})


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A recipe by name (packaged, then ``$CBD_RECIPES``) or from a ``.toml`` file anywhere.

    Relative paths inside a recipe file (``source = "path:..."``, ``files:``/``jsonl:``/``parquet:``
    corpora) are relative to the file's folder; the recorded recipe holds them absolute. A recipe
    found by name must be called what its file is called (the service builds it by that name).
    """
    path = Path(name_or_path)
    by_name = path.suffix != ".toml"
    if by_name:
        found = find_recipe(str(name_or_path))
        if found is None:
            raise UnknownNameError(f"no recipe {name_or_path!r} in {', '.join(map(str, recipe_dirs()))} "
                                   "(give a .toml path to build a recipe from anywhere)", allowed=list_recipes())
        path = found
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise RecipeError(f"recipe {path} cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {path} is invalid: {exc}") from None
    data = _absolute_paths(data, path.resolve().parent) if isinstance(data, dict) else data
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"recipe {path} is invalid: {exc}") from None
    if by_name and recipe.name != path.stem:
        raise RecipeError(f"recipe {path} is named {recipe.name!r}: a recipe found by name must be called "
                          f"what its file is ({path.stem!r})", allowed={"name": path.stem})
    return recipe


def _absolute_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """``data`` with the relative local paths of its source and corpora made absolute against ``base``."""
    data = dict(data)
    if isinstance(data.get("source"), str):
        data["source"] = absolute_source(data["source"], base)
    d = data.get("data")
    if isinstance(d, dict):
        d = dict(d)
        if isinstance(d.get("corpus"), str):
            d["corpus"] = absolute_corpus(d["corpus"], base)
        if isinstance(d.get("corpora"), list):
            d["corpora"] = [dict(c, name=absolute_corpus(c["name"], base))
                            if isinstance(c, dict) and isinstance(c.get("name"), str) else c
                            for c in d["corpora"]]
        data["data"] = d
    return data
