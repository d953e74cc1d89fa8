"""The settings of one distillation run and its result."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

FORMAT_VERSION = 1


# Fields a resumed run may change: they decide when things happen, not what is computed.
RESUME_FREE_FIELDS = frozenset({"eval_every", "ckpt_every", "log_every", "device", "bf16"})


ProgressFn = Callable[[dict[str, Any]], None]


class DistillConfig(BaseModel):
    """One chain step's training recipe; give exactly one of ``total_steps``/``total_tokens``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kl_weight: float = Field(0.5, ge=0)
    ce_weight: float = Field(0.5, ge=0)
    temperature: float = Field(1.0, gt=0)
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=1)
    total_steps: int | None = Field(None, ge=1)
    total_tokens: int | None = Field(None, ge=1)
    eval_every: int = Field(100, ge=0)  # 0: evaluate at the start and the end only
    ckpt_every: int = Field(100, ge=0)  # 0: checkpoint at the end only
    log_every: int = Field(10, ge=1)
    seed: int = 0
    topk_cache: int | None = Field(None, ge=1)  # k: the KL uses the teacher's cached top-k
    device: str = "auto"  # "auto": cuda when available, else cpu
    bf16: bool = True  # bf16 autocast, on CUDA only

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


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to
    ``lr * min_lr_ratio``, reached exactly at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps - 1))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
