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

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cbd.core import paths
from cbd.core.catalog import TEACHERS
from cbd.core.manifest import check_name
from cbd.core.names import NAME_PATTERN
from cbd.core.plan import TransOptions
from cbd.core.request import Architecture
from cbd.errors import RecipeError, UnknownNameError


class AnchorRecipe(Architecture):
    """One anchor: its shape (transformers names) and optional per-anchor training overrides."""

    name: str = Field(pattern=NAME_PATTERN)
    steps: int | None = Field(default=None, ge=0)
    lr: float | None = Field(default=None, gt=0)


class TrainRecipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kl_weight: float = Field(0.5, ge=0)
    ce_weight: float = Field(0.5, ge=0)
    temperature: float = Field(1.0, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=8)
    steps: int = Field(100, ge=0, description="optimizer steps per anchor (0: prune only)")
    eval_every: int = Field(0, ge=0)
    ckpt_every: int = Field(50, ge=0)
    topk_cache: int | None = Field(default=None, ge=1)


class DataRecipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    corpus: str = "austen"
    eval_batches: int = Field(8, ge=1)
    eval_batch_size: int = Field(4, ge=1)
    eval_seq_len: int = Field(256, ge=8)
    calibration_batch_size: int = Field(8, ge=1)
    calibration_seq_len: int = Field(128, ge=8)


class SeqKDRecipe(BaseModel):
    """``[anchor_zero.seqkd]``: fields of ``cbd.bridge.SeqKDOptions`` (torch-free here; unset: its default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompts: int | None = Field(default=None, ge=1, description="corpus prompts the foreign model continues")
    prompt_words: int | None = Field(default=None, ge=1)
    new_tokens: int | None = Field(default=None, ge=1, description="foreign tokens generated per prompt")
    temperature: float | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    gen_batch: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=1, description="optimizer steps of a0 on the generated text")
    batch_size: int | None = Field(default=None, ge=1)
    seq_len: int | None = Field(default=None, ge=8)
    lr: float | None = Field(default=None, gt=0)
    warmup_steps: int | None = Field(default=None, ge=0)
    seed: int | None = Field(default=None, description="the recipe's seed when unset")


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
    source: str = Field("smollm2-135m", description="a0, or with anchor_zero only its family and tokenizer")
    source_repo: str = Field("HuggingFaceTB/SmolLM2-135M-Instruct", description="base_model on model cards")
    tokenizer: str = "smollm2"
    seed: int = 0
    device: str = "auto"
    prune: TransOptions = TransOptions()
    train: TrainRecipe = TrainRecipe()
    data: DataRecipe = DataRecipe()
    anchors: list[AnchorRecipe] = Field(min_length=1)
    expected: dict[str, Any] = Field(default_factory=dict, description="documented build time etc.")
    mode: Literal["chain", "direct"] = Field("chain", description="direct: every anchor distilled from the source")
    anchor_zero: AnchorZeroRecipe | None = Field(default=None, description="a0 taught by a foreign model")

    @model_validator(mode="after")
    def _unique_shrinking(self) -> Recipe:
        names = [a.name for a in self.anchors]
        if len(set(names)) != len(names) or "a0" in names:
            raise ValueError(f"anchor names must be unique and not 'a0' (the source): {names}")
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


def recipe_path(name: str) -> Path:
    return paths.RECIPES_DIR / f"{check_name(name, 'recipe name')}.toml"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in paths.RECIPES_DIR.glob("*.toml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = recipe_path(str(name_or_path))
        if not path.is_file():
            raise UnknownNameError(f"no recipe {name_or_path!r} in {paths.RECIPES_DIR}", allowed=list_recipes())
    try:
        return Recipe.model_validate(tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise RecipeError(f"recipe {path} is invalid: {exc}") from None
