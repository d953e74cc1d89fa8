"""Teacher-free repair (``cbd.repair``) on a real chain: held-out loss of subsets, repaired or not.

    OMP_NUM_THREADS=1 python bench/repair.py --chain tiny
    python bench/repair.py --chain tiny --cases ffn,heads --calib validation

For each case (an anchor and a target that shrinks its FFN, its heads, or both), prints the
held-out loss (the recipe corpus' held-out novel, *Persuasion* for Austen; nats/token) of the
anchor itself, of Trans(anchor -> target) (unrepaired) and of the repaired subset, with the wall
time and peak resident memory (over the process's RSS before the repair) of the repair. The
calibration batch is never the evaluation text: windows of the training split (``--calib train``,
default) or the chain's validation tokens (``--calib validation``, also training text).
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from bench import study
from cbd.core.manifest import load_manifest
from cbd.repair import repair
from cbd.shape import arch
from cbd.shape.maps import choose_maps
from cbd.shape.trans import trans_state
from cbd.train.models import state_loss

# name: (anchor, target shape changes); head_dim stays the chain's 64, so a heads-only change keeps d
CASES = {
    "ffn": ("a1", dict(intermediate_size=512)),
    "heads": ("a1", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
    "heads+resid": ("a1", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)),
    "both": ("a1", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512)),
    "a0-ffn": ("a0", dict(intermediate_size=768)),
    "a0-heads": ("a0", dict(num_attention_heads=6, num_key_value_heads=3, head_dim=64)),
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Peak RSS while the block runs, sampled every 5 ms, minus the RSS at its start."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def calibration(ctx: study.Context, how: str, seqs: int, seq_len: int) -> list[torch.Tensor]:
    if how == "validation":
        return [b[:, :-1] for b in ctx.validation()]
    from cbd.data import batches as data
    from cbd.data.mix import mixed_fixed_batch

    trains = [data.token_file(n, ctx.tokenizer, "train") for n in ctx.corpora]
    return list(mixed_fixed_batch(trains, [1.0] * len(trains), n_rows=seqs, seq_len=seq_len, seed=123).split(4))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--cases", default="ffn,heads,heads+resid,both")
    ap.add_argument("--calib", choices=["train", "validation"], default="train")
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ctx = study.context(load_manifest(args.chain))
    held = ctx.heldout(args.seed)
    calib = calibration(ctx, args.calib, args.calib_seqs, args.calib_len)
    n_calib = sum(b.numel() for b in calib)
    n_held = sum(b[:, 1:].numel() for b in held)
    print(f"chain {args.chain}; calibration: {n_calib} tokens of the {args.calib} split; "
          f"held-out: {n_held} tokens of {ctx.corpus}'s held-out text (seed {args.seed}); ridge {args.ridge}")
    print(f"{'case':<12} {'anchor -> target':<44} {'anchor':>7} {'subset':>7} {'repaired':>8} {'gain':>6} "
          f"{'repair s':>8} {'+RSS MiB':>8}")
    base_loss: dict[str, float] = {}
    for case in args.cases.split(","):
        name, change = CASES[case]
        a = ctx.anchor(name)
        state = {n: a.read(n) for n in arch.param_names(a.spec)}
        tgt = a.spec.with_shape(**change)
        maps = choose_maps(a.spec, tgt, a.importance)
        if name not in base_loss:
            base_loss[name] = state_loss(a.spec, state, held)
        plain = state_loss(tgt, trans_state(state, a.spec, tgt, maps), held)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            fixed_state = repair(a.spec, state, tgt, maps, calib, ridge=args.ridge)
            wall = time.perf_counter() - t0
        fixed = state_loss(tgt, fixed_state, held)
        L, d, H, G, _, f = tgt.shape
        label = f"{name} {a.spec.shape[:4]}+{a.spec.ffn} -> {L}x{d} {H}/{G} {f}"
        print(f"{case:<12} {label:<44} {base_loss[name]:7.3f} {plain:7.3f} {fixed:8.3f} {plain - fixed:6.3f} "
              f"{wall:8.1f} {mem.extra_mib:8.0f}", flush=True)


if __name__ == "__main__":
    main()
