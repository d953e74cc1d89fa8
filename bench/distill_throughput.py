"""Throughput of ``cbd.train.loop.distill`` against a bare PyTorch loop (a benchmark, not a test).

Same models, same batches, same loss (0.5 reverse KL + 0.5 cross-entropy), one process. The bare
loop is exactly: teacher forward under no_grad, student forward/backward, AdamW step, written
the obvious way (autograd losses, torch's default AdamW; ``--bare-fused-adamw`` gives it fused
AdamW too). The engine adds what a real run needs (LR schedule, gradient clipping, per-step
reseeding, loss history) and two speed-ups (the fused loss of ``cbd.train.losses.reverse_kl_ce``,
fused AdamW); the target is engine >= 0.8x bare. Rounds alternate bare/engine after one untimed
warm-up round each (first calls pay for oneDNN set-up); the best round is the headline (these
machines' cores are shared, so slower rounds measure the neighbours), median and CPU time are
printed too.

    .venv/bin/python bench/distill_throughput.py                         # defaults below
    .venv/bin/python bench/distill_throughput.py --vocab 4096 --steps 4  # quicker
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from cbd.core.spec import ModelSpec
from cbd.train.config import DistillConfig
from cbd.train.ddp import resolve_device
from cbd.train.loop import distill


def build(layers: int, hidden: int, vocab: int, head_dim: int, seed: int) -> LlamaForCausalLM:
    spec = ModelSpec(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=hidden // head_dim,
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**spec.to_hf_config()))


def bare_loop(
    student, teacher, batches: list[torch.Tensor], lr: float, device: torch.device, fused_adamw: bool
) -> None:
    """The reference: nothing but the work every distillation step has to do."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.95), fused=fused_adamw or None)
    student.train()
    teacher.eval()
    for batch in batches:
        batch = batch.to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            t_logits = teacher(input_ids=x, use_cache=False).logits
        s_logits = student(input_ids=x, use_cache=False).logits
        log_q, log_p = F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
        ce = F.cross_entropy(s_logits.float().flatten(0, 1), y.flatten())
        loss = 0.5 * kl + 0.5 * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    loss.item()  # wait for the device


def engine(student, teacher, batches: list[torch.Tensor], cfg: DistillConfig) -> None:
    distill(student, teacher, lambda step: batches[step], [], cfg, progress=False)


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student-layers", type=int, default=6)
    p.add_argument("--student-hidden", type=int, default=192)
    p.add_argument("--teacher-layers", type=int, default=12)
    p.add_argument("--teacher-hidden", type=int, default=384)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per method")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--bare-fused-adamw", action="store_true", help="give the bare loop fused AdamW too")
    args = p.parse_args(argv)
    print("command:", shlex.join(["python", *sys.argv]))
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    teacher = build(args.teacher_layers, args.teacher_hidden, args.vocab, args.head_dim, seed=0).to(device)
    student = build(args.student_layers, args.student_hidden, args.vocab, args.head_dim, seed=1).to(device)
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g) for _ in range(args.steps)
    ]
    cfg = DistillConfig(
        total_steps=args.steps,
        batch_size=args.batch,
        seq_len=args.seq,
        eval_every=0,
        ckpt_every=0,
        log_every=args.steps,
        device=str(device),
    )
    tokens = args.steps * args.batch * args.seq
    print(
        f"device={device} threads={torch.get_num_threads()} teacher={args.teacher_layers}x"
        f"{args.teacher_hidden} student={args.student_layers}x{args.student_hidden} vocab={args.vocab} "
        f"batch={args.batch}x{args.seq} steps/round={args.steps} rounds={args.rounds}"
    )

    bare_args = (student, teacher, batches, cfg.lr, device, args.bare_fused_adamw)
    engine_args = (student, teacher, batches, cfg)
    timed(bare_loop, *bare_args), timed(engine, *engine_args)  # warm-up, untimed
    runs = {"bare loop": [], "distill()": []}
    for _ in range(args.rounds):
        runs["bare loop"].append(timed(bare_loop, *bare_args))
        runs["distill()"].append(timed(engine, *engine_args))
    rate = {}
    for name, times in runs.items():
        wall, cpu = [w for w, _ in times], [c for _, c in times]
        rate[name] = tokens / min(wall)
        print(
            f"{name}: {tokens / min(wall):8.1f} tok/s best, {tokens / statistics.median(wall):8.1f} median, "
            f"{tokens / min(cpu):8.1f} per CPU-second | rounds (s) " + " ".join(f"{w:.2f}" for w in wall)
        )
    print(f"ratio distill()/bare (best rounds): {rate['distill()'] / rate['bare loop']:.3f} (target >= 0.8)")


if __name__ == "__main__":
    main()
