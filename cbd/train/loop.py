"""The distillation engine that builds each anchor of a chain (docs/method.md §1).

Anchor k is distilled from the already distilled anchor k-1; only step 1 runs the big teacher.
One call trains a transformers causal LM (``model(input_ids).logits``) against a teacher with
``0.5 reverse KL + 0.5 cross-entropy`` (``cbd.train.losses.distill_loss``), AdamW, linear warmup and
cosine decay; it is resumable, data parallel under ``torchrun``, and reports progress.

>>> cfg = DistillConfig(total_tokens=1_000_000, batch_size=4, seq_len=256)
>>> cfg.steps
977

Layout of ``work_dir`` (safetensors and JSON only, never pickle)::

    distill_config.json               the run config, written at start
    checkpoints/latest.json           {"dir": "step_00000100", "step": 100}, replaced atomically last
    checkpoints/step_00000100/        model.safetensors, optimizer.safetensors, state.json
    teacher_topk/step_*_rows_*.safetensors   cached teacher top-k (``topk_cache``), by default

Randomness (dropout) is reseeded at every step from ``(seed, step, rank)`` inside a forked RNG,
so a resumed run replays the same masks with no generator state to save, and the caller's RNG
is left untouched.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cbd.core.files import write_json
from cbd.core.threads import cpu_has_bf16
from cbd.errors import AssetUnavailableError, ShapeError
from cbd.train.checkpoints import CONFIG_FILE, check_resumable, load_checkpoint, save_checkpoint
from cbd.train.config import FORMAT_VERSION, DistillConfig, DistillResult, ProgressFn, lr_at
from cbd.train.ddp import all_reduce_sum, is_main_process, maybe_init_distributed, resolve_device
from cbd.train.losses import TopK, distill_loss, topk_logprobs
from cbd.train.models import evaluate, nll_sum
from cbd.train.topk import TOPK_DIR, TopKCache

log = logging.getLogger("cbd.distill")
__all__ = ["distill", "evaluate"]  # evaluate: cbd.train.models


# ---- progress ----------------------------------------------------------------------------------
@functools.cache
def cpu_bf16() -> bool:
    """Whether to autocast to bf16 on this CPU: only when asked (``CBD_CPU_BF16=1``) and the CPU has
    native bf16 matrix instructions (AVX512-BF16 or AMX; elsewhere it is emulated and slower).

    Off by default: on these CPUs it trains ~2.2x faster (bench/bf16.py: 40 steps of tiny's a1, 344 vs
    159 tokens/s, held-out 6.05 vs 6.12), but a 240-step run of default's a1 at lr 1e-3 diverged with it (training loss 4.3
    at step 40, 7.0 at step 120; held-out 6.45 at the start, 7.10 at the end), so until that is
    understood CPU chains train in float32."""
    return os.environ.get("CBD_CPU_BF16", "0") == "1" and cpu_has_bf16()


class _Progress:
    """A tqdm bar on a terminal, else a ``step=.. tokens=.. loss=..`` log line every log_every
    steps; an optional callback (an RQ job stores the dict in ``job.meta``). Rank 0 only."""

    def __init__(self, cfg: DistillConfig, start_step: int, progress: bool | ProgressFn, main: bool) -> None:
        self.cfg, self.start_step, self.t0 = cfg, start_step, time.perf_counter()
        self.callback = progress if callable(progress) and main else None
        self.bar = None
        if progress is not False and main and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=cfg.steps * cfg.tokens_per_step,
                initial=start_step * cfg.tokens_per_step,
                unit="tok",
                unit_scale=True,
                dynamic_ncols=True,
                desc="distill",
            )
        self.main = main

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(self.cfg.tokens_per_step)

    def report(self, step: int, loss: float, lr: float, eval_loss: float | None = None) -> None:
        if not self.main:
            return
        elapsed = time.perf_counter() - self.t0
        done = step - self.start_step
        tok_s = done * self.cfg.tokens_per_step / elapsed if elapsed > 0 else 0.0
        eta_s = (self.cfg.steps - step) * elapsed / done if done else float("nan")
        info = {
            "step": step,
            "total": self.cfg.steps,
            "tokens": step * self.cfg.tokens_per_step,
            "total_tokens": self.cfg.steps * self.cfg.tokens_per_step,
            "loss": loss,
            "lr": lr,
            "tok_s": tok_s,
            "eta_s": eta_s,
            "eval_loss": eval_loss,
        }
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        else:
            log.info(
                "step=%d/%d tokens=%d loss=%.4f lr=%.3g tok_s=%.1f eta_s=%.0f%s",
                step,
                self.cfg.steps,
                info["tokens"],
                loss,
                lr,
                tok_s,
                eta_s,
                "" if eval_loss is None else f" eval_loss={eval_loss:.4f}",
            )
        if self.callback is not None:
            self.callback(info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- the loop ----------------------------------------------------------------------------------
def _step_seed(seed: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1_009 + rank) % (1 << 63)


def _make_optimizer(model: nn.Module, cfg: DistillConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one kernel per tensor: 3-6x faster than the default on CPU too); weight
    decay on matrices only, not on norms and biases (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type in ("cpu", "cuda"))


class _Run:
    """The state of one distill() call; methods are the loop's stages."""

    def __init__(self, student, teacher, cfg, work_dir, cache_dir, progress) -> None:
        self.rank, self.world = maybe_init_distributed(cfg.device)
        if cfg.batch_size % self.world:
            raise ShapeError(
                f"batch_size {cfg.batch_size} does not split over {self.world} ranks; "
                f"use a multiple of {self.world}"
            )
        self.cfg, self.teacher, self.work_dir = cfg, teacher, work_dir
        self.main = is_main_process()
        self.device = resolve_device(cfg.device)
        self.student = student.to(self.device).train()
        if teacher is not None:
            teacher.to(self.device).eval()
        self.opt = _make_optimizer(student, cfg, self.device)
        per_rank = cfg.batch_size // self.world
        self.rows = (self.rank * per_rank, (self.rank + 1) * per_rank)
        self.cache = self._make_cache(cache_dir)
        self.step, self.train_loss, self.eval_loss, self.pending = 0, [], [], []
        self.teacher_tokens = 0
        self._resume()
        self.start_step = self.step
        self.model = student
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(student, device_ids=ids)
        self.progress = _Progress(cfg, self.step, progress, self.main)

    def _make_cache(self, cache_dir: Path | None) -> TopKCache | None:
        if self.cfg.topk_cache is None or not self.cfg.kl_weight:
            return None
        root = cache_dir or (self.work_dir / TOPK_DIR if self.work_dir else None)
        if root is None:
            raise ValueError(
                "topk_cache is set but there is no place for the cache: pass work_dir or cache_dir"
            )
        return TopKCache(Path(root), self.cfg.topk_cache, self.cfg.temperature, self.rows)

    def _resume(self) -> None:
        if self.work_dir is None:
            return
        state = load_checkpoint(self.work_dir, self.student, self.opt)
        if state is not None:
            check_resumable(state["config"], self.cfg, self.work_dir)
            self.step, self.train_loss = state["step"], state["train_loss"]
            self.eval_loss = [tuple(e) for e in state["eval_loss"]]
            log.info("resumed from %s at step %d", self.work_dir, self.step)
        if self.main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.work_dir / CONFIG_FILE, self.cfg.model_dump(mode="json"))

    def amp(self):
        if self.cfg.bf16 and (self.device.type == "cuda" or (self.device.type == "cpu" and cpu_bf16())):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def batch(self, train_batches: Callable[[int], Tensor], step: int) -> Tensor:
        batch = train_batches(step)
        want = (self.cfg.batch_size, self.cfg.seq_len + 1)
        if tuple(batch.shape) != want or batch.dtype != torch.long:
            raise ShapeError(
                f"train_batches({step}) gave a {batch.dtype} batch of shape "
                f"{tuple(batch.shape)}; expected torch.int64 {want} = (batch_size, seq_len + 1)"
            )
        return batch[self.rows[0] : self.rows[1]].to(self.device, non_blocking=True)

    def teacher_view(self, step: int, input_ids: Tensor) -> Tensor | TopK | None:
        """What the loss compares against: full logits, cached top-k, or None (no KL)."""
        if not self.cfg.kl_weight:
            return None
        if self.cache is not None and (hit := self.cache.get(step, input_ids)) is not None:
            return hit
        if self.teacher is None:
            raise AssetUnavailableError(
                f"step {step} is not in the top-k cache and no teacher was "
                "given: pass the teacher, or the cache_dir of the run that wrote it"
            )
        with torch.no_grad(), self.amp():
            logits = self.teacher(input_ids=input_ids, use_cache=False).logits  # (b, T, V)
        self.teacher_tokens += input_ids.numel() * self.world
        if self.cache is None:
            return logits
        topk = topk_logprobs(logits, self.cfg.topk_cache, temperature=self.cfg.temperature)
        self.cache.put(step, input_ids, topk)
        return topk

    def train_step(self, step: int, batch: Tensor) -> float:
        torch.manual_seed(_step_seed(self.cfg.seed, step, self.rank))
        x, y = batch[:, :-1], batch[:, 1:]  # (b, T)
        teacher = self.teacher_view(step, x)
        lr = lr_at(step, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with self.amp():
            logits = self.model(input_ids=x, use_cache=False).logits  # (b, T, V)
        loss, parts = distill_loss(logits, y, teacher=teacher, cfg=self.cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.pending.append(parts["loss"])  # synced in flush(), not every step
        return lr

    def flush(self) -> float:
        """Move pending step losses (averaged over ranks) into the history; the last one."""
        if self.pending:
            losses = all_reduce_sum(torch.stack(self.pending).double(), self.world) / self.world
            self.train_loss.extend(losses.tolist())
            self.pending = []
        return self.train_loss[-1] if self.train_loss else float("nan")

    def evaluate(self, eval_batches: Sequence[Tensor]) -> float:
        """Eval batches are sharded over ranks; sums are reduced, so every rank gets the mean."""
        total, count = nll_sum(self.student, eval_batches[self.rank :: self.world], self.device, self.amp)
        sums = all_reduce_sum(
            torch.tensor([total, count], dtype=torch.float64, device=self.device), self.world
        )
        loss = (sums[0] / sums[1]).item()
        self.eval_loss.append((self.step * self.cfg.tokens_per_step, loss))
        return loss

    def save(self) -> None:
        if self.work_dir is None or not self.main:
            return
        state = {
            "format": FORMAT_VERSION,
            "step": self.step,
            "train_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            "config": self.cfg.model_dump(mode="json"),
        }
        save_checkpoint(self.work_dir, self.student, self.opt, state)

    def run(self, train_batches: Callable[[int], Tensor], eval_batches: Sequence[Tensor]) -> None:
        cfg, every = self.cfg, lambda n: n and self.step % n == 0
        if eval_batches and not self.eval_loss:
            self.evaluate(eval_batches)  # the step-0 loss (docs/method.md §5)
        while self.step < cfg.steps:
            lr = self.train_step(self.step, self.batch(train_batches, self.step))
            self.step += 1
            self.progress.advance()
            last = self.step == cfg.steps
            do_eval = bool(eval_batches) and (every(cfg.eval_every) or last)
            do_save = every(cfg.ckpt_every) or last
            if every(cfg.log_every) or do_eval or do_save:
                loss = self.flush()
                ev = self.evaluate(eval_batches) if do_eval else None
                self.progress.report(self.step, loss, lr, ev)
            if do_save:
                self.save()
        if self.world > 1:
            dist.barrier()  # no rank returns before rank 0 has written the last checkpoint


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    train_batches: Callable[[int], Tensor],
    eval_batches: Sequence[Tensor],
    cfg: DistillConfig,
    *,
    work_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: bool | ProgressFn = True,
) -> DistillResult:
    """Distil ``teacher`` into ``student`` in place; resume from ``work_dir`` when it holds a run.

    ``train_batches(step)`` returns the global ``(batch_size, seq_len + 1)`` LongTensor of that
    step, the same every time it is asked (resume and data parallelism rely on it); each rank
    trains on its rows. ``teacher`` may be None when ``kl_weight`` is 0 or every step is in the
    top-k cache (``cache_dir``, default ``work_dir/teacher_topk``). ``progress``: True shows a
    bar on a terminal and logs otherwise, False only logs, a callable also gets a dict every
    ``log_every`` steps.
    """
    work_dir = Path(work_dir) if work_dir is not None else None
    run = _Run(student, teacher, cfg, work_dir, cache_dir, progress)
    t0 = time.perf_counter()
    devices = [run.device.index] if run.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            run.run(train_batches, eval_batches)
    finally:
        run.progress.close()
    wall_s = time.perf_counter() - t0
    trained = (run.step - run.start_step) * cfg.tokens_per_step
    return DistillResult(
        steps=run.step,
        tokens=run.step * cfg.tokens_per_step,
        wall_s=wall_s,
        tokens_per_s=trained / wall_s if wall_s > 0 else 0.0,
        train_loss=run.train_loss,
        eval_loss=run.eval_loss,
        final_eval_loss=run.eval_loss[-1][1] if run.eval_loss else None,
        resumed_from_step=run.start_step,
        teacher_tokens=run.teacher_tokens,
    )
