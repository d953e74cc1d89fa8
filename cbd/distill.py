"""The distillation engine that builds each anchor of a chain (METHOD.md section 1).

Anchor k is distilled from the already distilled anchor k-1; only step 1 runs the big teacher.
One call trains a transformers causal LM (``model(input_ids).logits``) against a teacher with
``0.5 reverse KL + 0.5 cross-entropy`` (``cbd.losses.distill_loss``), AdamW, linear warmup and
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

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from cbd.errors import AssetUnavailableError, IntegrityError, ShapeError
from cbd.io import LazyReader, write_safetensors
from cbd.losses import TopK, distill_loss, topk_logprobs
from cbd.manifest import atomic_write_bytes, fsync_path

log = logging.getLogger("cbd.distill")

CONFIG_FILE = "distill_config.json"
CKPT_DIR = "checkpoints"
LATEST = "latest.json"
TOPK_DIR = "teacher_topk"
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


# ---- distributed -------------------------------------------------------------------------------
def maybe_init_distributed(device: str = "auto") -> tuple[int, int]:
    """(rank, world size). Under ``torchrun`` (WORLD_SIZE > 1) initialise the process group
    once: nccl when ``device`` resolves to CUDA, gloo on CPU. The caller destroys it when done."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = resolve_device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(resolve_device(device))
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0: the one process that writes and logs."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def resolve_device(name: str) -> torch.device:
    """The run's device: "auto" is CUDA when available, else CPU; bare "cuda" is GPU LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _all_reduce_sum(t: Tensor, world: int) -> Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


# ---- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def _nll_sum(
    model: nn.Module, batches: Sequence[Tensor], device: torch.device, amp: Callable[[], Any] = nullcontext
) -> tuple[float, int]:
    """(summed next-token NLL in nats, target tokens) over ``(b, T+1)`` batches, eval mode."""
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    for batch in batches:
        batch = batch.to(device)
        with amp():
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # (b, T, V)
        targets = batch[:, 1:]
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return total, count


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Tensor]) -> float:
    """Mean next-token cross-entropy in nats/token over ``(b, T+1)`` LongTensor batches."""
    total, count = _nll_sum(model, batches, next(model.parameters()).device)
    if count == 0:
        raise ValueError("evaluate() got no tokens: pass at least one (b, T+1) batch with T >= 1")
    return total / count


# ---- checkpoints: safetensors + JSON, written atomically ----------------------------------------
def _write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=1).encode())  # tmp, fsync, os.replace


def _unique_state(model: nn.Module) -> dict[str, Tensor]:
    """``state_dict`` without the aliases of tied weights (the first name of a storage wins)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            out[name] = t.detach()
    return out


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """AdamW state as tensors named ``state.{param_index}.{name}`` plus a JSON dict of the param
    groups and scalars (AdamW's 0-dim ``step`` goes there, as a number with its dtype)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, Tensor) and value.dim():
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            elif isinstance(value, Tensor):
                scalars[f"{index}.{name}"] = {"value": value.item(), "dtype": str(value.dtype)[6:]}
            else:
                scalars[f"{index}.{name}"] = {"value": value}
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``optimizer_to_flat``: a dict for ``Optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, v in meta["scalars"].items():
        index, name = key.split(".", 1)
        value = torch.tensor(v["value"], dtype=getattr(torch, v["dtype"])) if "dtype" in v else v["value"]
        state.setdefault(int(index), {})[name] = value
    groups = [g | {"betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(work_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> Path:
    """Write ``checkpoints/step_N/`` in a temporary folder, rename it, then point latest.json at it."""
    root = work_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state['step']:08d}"
    tmp, final = root / f"{name}.tmp", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_safetensors(tmp / "model.safetensors", _unique_state(model))  # fsynced by cbd.io
    tensors, meta = optimizer_to_flat(opt)
    write_safetensors(tmp / "optimizer.safetensors", tensors)
    _write_json(tmp / "state.json", state | {"optimizer": meta})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(root)
    _write_json(root / LATEST, {"dir": name, "step": state["step"]})
    fsync_path(root)
    for old in root.glob("step_*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(work_dir: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict | None:
    """Load the latest checkpoint into ``model`` and ``opt``; its state dict, or None if none."""
    latest = work_dir / CKPT_DIR / LATEST
    if not latest.exists():
        return None
    folder = latest.parent / json.loads(latest.read_text())["dir"]
    try:
        state = json.loads((folder / "state.json").read_text())
        weights = LazyReader(folder / "model.safetensors", keep_dtype=True).load_all()
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if set(missing) - (model.state_dict().keys() - _unique_state(model).keys()) or unexpected:
            raise KeyError(
                f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        tensors = LazyReader(folder / "optimizer.safetensors", keep_dtype=True).load_all()
        opt.load_state_dict(optimizer_from_flat(tensors, state.pop("optimizer")))
    except (OSError, ValueError, KeyError, RuntimeError, IntegrityError) as exc:
        raise IntegrityError(
            f"checkpoint {folder} is unreadable ({exc}); delete {latest.parent} to start the run over"
        ) from exc
    return state


def _check_resumable(saved: dict, cfg: DistillConfig, work_dir: Path) -> None:
    now = cfg.model_dump(mode="json")
    diff = {k: (saved.get(k), v) for k, v in now.items() if k not in RESUME_FREE_FIELDS and saved.get(k) != v}
    if diff:
        raise IntegrityError(
            f"{work_dir} holds a checkpoint of another run (field: (saved, now)) "
            f"{diff}; use a fresh work_dir or the saved config",
            allowed=sorted(diff),
        )


# ---- teacher top-k cache -----------------------------------------------------------------------
class TopKCache:
    """The teacher's top-k log-probabilities per (step, rows of the global batch), one
    safetensors file each, tagged with k, temperature and a digest of the input ids. Each rank
    writes its own rows, so a cache is found again by a run with the same world size."""

    def __init__(self, root: Path, k: int, temperature: float, rows: tuple[int, int]) -> None:
        self.root, self.k, self.rows = root, k, rows
        self.tag = {"k": str(k), "temperature": repr(float(temperature))}

    def _path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}_rows_{self.rows[0]}-{self.rows[1]}.safetensors"

    def _meta(self, input_ids: Tensor) -> dict[str, str]:
        ids = input_ids.cpu().contiguous().numpy().tobytes()
        return self.tag | {"ids": hashlib.blake2b(ids, digest_size=16).hexdigest()}

    def get(self, step: int, input_ids: Tensor) -> TopK | None:
        """The cached entry, or None when absent, torn, or written for other ids, k or T."""
        path = self._path(step)
        try:
            reader = LazyReader(path, keep_dtype=True)
            if reader.metadata != self._meta(input_ids):
                return None
            return TopK(reader("values").to(input_ids.device), reader("indices").to(input_ids.device))
        except (OSError, IntegrityError):
            return None

    def put(self, step: int, input_ids: Tensor, topk: TopK) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(step)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"values": topk.values.float().cpu(), "indices": topk.indices.to(torch.int32).cpu()}
        write_safetensors(tmp, tensors, self._meta(input_ids))
        os.replace(tmp, path)


# ---- progress ----------------------------------------------------------------------------------
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
            _check_resumable(state["config"], self.cfg, self.work_dir)
            self.step, self.train_loss = state["step"], state["train_loss"]
            self.eval_loss = [tuple(e) for e in state["eval_loss"]]
            log.info("resumed from %s at step %d", self.work_dir, self.step)
        if self.main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.work_dir / CONFIG_FILE, self.cfg.model_dump(mode="json"))

    def amp(self):
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
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
            losses = _all_reduce_sum(torch.stack(self.pending).double(), self.world) / self.world
            self.train_loss.extend(losses.tolist())
            self.pending = []
        return self.train_loss[-1] if self.train_loss else float("nan")

    def evaluate(self, eval_batches: Sequence[Tensor]) -> float:
        """Eval batches are sharded over ranks; sums are reduced, so every rank gets the mean."""
        total, count = _nll_sum(self.student, eval_batches[self.rank :: self.world], self.device, self.amp)
        sums = _all_reduce_sum(
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
            self.evaluate(eval_batches)  # the step-0 loss (METHOD.md section 3)
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
