"""The settings of one distillation run and its result."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field, model_validator

from cbd.core.training import Every, LossWeight, Optimization, Temperature, TopKCache, lr_at

FORMAT_VERSION = 1


# Fields a resumed run may change: they decide when things happen, not what is computed.
RESUME_FREE_FIELDS = frozenset({"eval_every", "ckpt_every", "log_every", "device", "bf16"})


ProgressFn = Callable[[dict[str, Any]], None]


class DistillConfig(Optimization):
    """One distillation run: the shared ``Optimization`` settings (the library's defaults), the loss,
    the length and the cadence; give exactly one of ``total_steps``/``total_tokens``."""

    kl_weight: LossWeight = 0.5
    ce_weight: LossWeight = 0.5
    temperature: Temperature = 1.0
    total_steps: int | None = Field(None, ge=1)
    total_tokens: int | None = Field(None, ge=1)
    eval_every: Every = 100  # 0: evaluate at the start and the end only
    ckpt_every: Every = 100  # 0: checkpoint at the end only
    log_every: int = Field(10, ge=1)
    topk_cache: TopKCache = None
    device: str = "auto"  # "auto": cuda when available, else cpu
    bf16: bool = True  # bf16 autocast: on CUDA (on a CPU only with CBD_CPU_BF16=1: cbd.train.loop.cpu_bf16)

    @classmethod
    def of(cls, settings: Optimization, **fields: object) -> DistillConfig:
        """A run with these shared settings (see ``cbd.core.training.Trains.optimization``) and
        ``fields`` (loss, length, cadence)."""
        return cls.model_validate(settings.model_dump() | fields)

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if (self.total_steps is None) == (self.total_tokens is None):
            raise ValueError(
                f"give exactly one of total_steps ({self.total_steps}) or total_tokens ({self.total_tokens})"
            )
        if self.kl_weight == 0 and self.ce_weight == 0:
            raise ValueError("kl_weight and ce_weight are both 0: nothing to train on")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds the run's {self.steps} steps")
        return self

    @property
    def tokens_per_step(self) -> int:
        """Global tokens per optimizer step (all ranks together)."""
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        """Optimizer steps of the run: the one place tokens turn into steps."""
        if self.total_steps is not None:
            return self.total_steps
        return math.ceil(self.total_tokens / self.tokens_per_step)


class DistillResult(BaseModel):
    """What a run did. ``train_loss[i]`` is step i's loss; ``eval_loss`` is (tokens, nats/token)."""

    steps: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    train_loss: list[float]
    eval_loss: list[tuple[int, float]]
    final_eval_loss: float | None
    resumed_from_step: int = 0
    teacher_tokens: int = 0  # tokens the teacher ran on in this call (cache hits excluded)


__all__ = ["FORMAT_VERSION", "RESUME_FREE_FIELDS", "DistillConfig", "DistillResult", "ProgressFn", "lr_at"]
