"""A tiny distillation run, identical in one process and under ``torchrun --nproc-per-node 2``.

``python tests/_ddp_script.py OUT_DIR`` or ``torchrun --standalone --nproc-per-node 2
tests/_ddp_script.py OUT_DIR``: rank 0 writes ``OUT_DIR/student.safetensors`` and
``OUT_DIR/result.json``. tests/test_distill.py imports ``run`` for the single-process side.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import LlamaConfig, LlamaForCausalLM

from cbd.train.config import DistillConfig
from cbd.train.ddp import is_main_process
from cbd.train.loop import distill

VOCAB, SEQ, BATCH = 99, 16, 4
CFG = DistillConfig(
    total_steps=4,
    batch_size=BATCH,
    seq_len=SEQ,
    lr=3e-3,
    warmup_steps=1,
    eval_every=2,
    ckpt_every=2,
    log_every=1,
    device="cpu",
)


def tiny_llama(layers: int, hidden: int, seed: int, **extra) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **extra,
    )
    return LlamaForCausalLM(cfg)


def train_batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))


def eval_batches() -> list[torch.Tensor]:
    return [train_batch(1000 + i)[: 1 + i % 2] for i in range(3)]  # uneven shards on purpose


def run(out_dir: Path) -> None:
    teacher, student = tiny_llama(2, 64, seed=0), tiny_llama(2, 32, seed=1)
    result = distill(
        student, teacher, train_batch, eval_batches(), CFG, work_dir=out_dir / "run", progress=False
    )
    if is_main_process():
        save_model(student, str(out_dir / "student.safetensors"))
        (out_dir / "result.json").write_text(result.model_dump_json())


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(Path(sys.argv[1]))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
