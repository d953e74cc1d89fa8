"""The optimisation settings every training loop of cbd shares, defined once. Torch-free.

Every run in cbd is AdamW (``betas``, ``weight_decay`` on matrices, gradients clipped to
``grad_clip``) with a linear warmup of ``warmup_steps`` and a cosine decay to
``lr * min_lr_ratio`` (``lr_at``), on batches of ``batch_size`` windows of ``seq_len`` tokens,
seeded by ``seed``. ``Optimization`` holds these settings with the library's defaults; the
places that train state their *own* defaults, once, in their own model, with the field types
below (one bound and one meaning per setting):

- ``cbd.train.config.DistillConfig`` (one distillation run) *is* an ``Optimization`` plus losses
  and cadence: the library's defaults;
- a recipe's ``[train]`` (``cbd.core.recipe.TrainRecipe``): a chain step, see
  ``cbd.chain.build.step_config``;
- ``cbd.core.plan.BridgeOptions``: a bridge run (its fields are part of a bridge plan's hash);
- ``cbd.core.recipe.SeqKDOptions``: the sequence-level KD run of a foreign anchor zero.

The last three expose a subset of the settings; ``Trains.optimization`` turns one into the
``Optimization`` of a run (the settings it does not expose keep the library's defaults), so no
caller copies the settings field by field.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# ---- one type (bound, meaning) per setting; each model gives its own default ------------------
Lr = Annotated[float, Field(gt=0, description="peak learning rate (AdamW)")]
MinLrRatio = Annotated[float, Field(ge=0, le=1, description="the cosine ends at lr * min_lr_ratio")]
WarmupSteps = Annotated[int, Field(ge=0, description="linear warmup steps (capped at the run's steps)")]
WeightDecay = Annotated[float, Field(ge=0, description="AdamW weight decay (matrices only)")]
Betas = tuple[float, float]
GradClip = Annotated[float | None, Field(gt=0, description="gradient norm clip (None: no clipping)")]
BatchSize = Annotated[int, Field(ge=1, description="windows per optimizer step (all ranks together)")]
SeqLen = Annotated[int, Field(ge=1, description="tokens per training window")]
WindowLen = Annotated[SeqLen, Field(ge=8)]  # what a recipe or a request may ask for
Steps = Annotated[int, Field(ge=0, description="optimizer steps")]
Seed = int
LossWeight = Annotated[float, Field(ge=0)]
Temperature = Annotated[float, Field(gt=0, description="softmax temperature of the distillation loss")]
Every = Annotated[int, Field(ge=0)]  # a cadence in steps; 0: at the start and the end only
TopKCache = Annotated[int | None, Field(ge=1, description="k: the KL uses the teacher's cached top-k")]
Count = Annotated[int, Field(ge=1)]


class Optimization(BaseModel):
    """AdamW, warmup + cosine, batches and seed: the shared settings, the library's defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lr: Lr = 3e-4
    min_lr_ratio: MinLrRatio = 0.1
    warmup_steps: WarmupSteps = 0
    weight_decay: WeightDecay = 0.0
    betas: Betas = (0.9, 0.95)
    grad_clip: GradClip = 1.0
    batch_size: BatchSize = 4
    seq_len: SeqLen = 256
    seed: Seed = 0


OPTIMIZATION_FIELDS = frozenset(Optimization.model_fields)


class Trains(BaseModel):
    """A model that exposes some of the ``Optimization`` settings (under the same names)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def optimization(self, steps: int, **overrides: object) -> Optimization:
        """The settings of a run of ``steps`` steps: this model's own, then ``overrides``, the rest
        the library's defaults; warmup is capped at the run's steps (the one place it is)."""
        own = {k: getattr(self, k) for k in type(self).model_fields if k in OPTIMIZATION_FIELDS}
        opt = Optimization.model_validate(own | overrides)
        return opt.model_copy(update={"warmup_steps": min(opt.warmup_steps, steps)})


def lr_at(step: int, cfg: Optimization, steps: int | None = None) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of a run of ``steps`` steps (a
    ``DistillConfig`` knows its own): linear warmup, then cosine to ``lr * min_lr_ratio``,
    reached exactly at the last step."""
    steps = cfg.steps if steps is None else steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps - 1))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def overrides_of(model: type[BaseModel], *, exclude: frozenset[str] = frozenset()) -> type[BaseModel]:
    """A base for a model of optional overrides of ``model``'s fields: the same names, types and
    bounds, every default None (unset: ``model``'s default). Subclass it to name and document it."""
    from pydantic import create_model

    fields = {name: ((Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation) | None,
                     Field(None, description=info.description))
              for name, info in model.model_fields.items() if name not in exclude}
    return create_model(f"{model.__name__}Overrides", __config__=ConfigDict(frozen=True, extra="forbid"), **fields)
