"""Benchmark: LInit of a target as large as the teacher, streamed to disk in fp32, against
``safetensors.torch.save_file`` writing the same tensors, in one process.

    OMP_NUM_THREADS=1 python bench/linit_write.py --chain tiny --repeat 9
    python bench/linit_write.py --chain tiny --layers 29
    OMP_NUM_THREADS=1 python bench/linit_write.py --chain tiny --phases   # where the time goes

Two like-for-like pairs, each side writing a new file every round (the previous one is
removed and everything dirty synced outside the timing), rounds interleaved so drift hits both
sides alike:

- durable: our write as the service does it (ends with an fsync, so the checkpoint is on disk
  before it is published) against ``save_file`` followed by an fsync;
- page cache: our write with ``durable=False`` against ``save_file`` alone (neither syncs).

Prints best and median of ``--repeat`` rounds after one warm-up round, the ratios (target <=
1.5x), and the peak resident memory of the first LInit write relative to the output size
(target <= 1.5x); that write runs first, before the baseline's in-memory copy of the tensors
exists, and is not timed.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from cbd.core.files import fsync_path
from cbd.core.manifest import load_manifest
from cbd.shape.linit import LInit, make_linit
from cbd.shape.trans import trans_tensor
from cbd.store.anchors import load_alignment, load_anchor
from cbd.store.checkpoint import write_weights
from cbd.tensors.pool import BufferPool, empty, intermediates, pooled
from cbd.tensors.writer import write_safetensors


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phases(li: LInit, out: Path, repeat: int) -> None:
    """The LInit's compute alone, per phase (pooled, no write), and our writer alone."""
    kw = {"width_expand": li.opts.width_expand, "depth_expand": li.opts.depth_expand, "alloc": empty}
    best: dict[str, float] = {}
    for _ in range(repeat):
        t = dict.fromkeys(("Trans(S)", "Trans(B) (map, drop pages)", "blend"), 0.0)
        with pooled(BufferPool()):
            for name, rows in li.blocks():  # the pieces LInit.chunks computes, as it does
                rs, rb = li.small.reader(), li.big.reader()
                if rows is not None:
                    rs, rb = (lambda n, r=rs, k=rows: r(n)[k]), (lambda n, r=rb, k=rows: r(n)[k])
                with intermediates():  # everything lent here goes back to the pool at the end
                    t0 = time.perf_counter()
                    a = trans_tensor(name, rs, li.small.spec, li.target, li.maps_small, **kw)
                    t1 = time.perf_counter()
                    b = trans_tensor(name, rb, li.big.spec, li.target, li.maps_big, **kw)
                    t2 = time.perf_counter()
                    torch.lerp(b, a, li.alpha, out=empty(b.shape, b.dtype))
                    t["Trans(S)"] += t1 - t0
                    t["Trans(B) (map, drop pages)"] += t2 - t1
                    t["blend"] += time.perf_counter() - t2
        t["compute"] = sum(t.values())
        best = {k: min(v, best.get(k, v)) for k, v in t.items()}
    state = li.state()
    w = []
    for _ in range(repeat):
        (out / "w.safetensors").unlink(missing_ok=True)
        os.sync()
        t0 = time.perf_counter()
        write_safetensors(out / "w.safetensors", state)
        w.append(time.perf_counter() - t0)
    best["our writer, tensors in memory (with fsync)"] = min(w)
    for k, v in best.items():
        print(f"{k:45s} {v:.3f} s (best of {repeat})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="target depth (default: source depth - 1)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--phases", action="store_true", help="time the compute phases and the writer separately")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    m = load_manifest(args.chain)
    big, small = m.anchors[0], m.anchors[1]
    target = big.spec.with_shape(num_hidden_layers=args.layers or big.spec.num_hidden_layers - 1)
    S, B = load_anchor(m, small.name), load_anchor(m, big.name)
    li = make_linit(target, S, B, alpha=0.3, alignment=load_alignment(m, small.name, big.name))
    out = Path(tempfile.mkdtemp(prefix="cbd-bench-"))
    if args.phases:
        phases(li, out, args.repeat)
        shutil.rmtree(out)
        return
    ours_file, base_file = out / "model.safetensors", out / "baseline.safetensors"

    def ours(durable: bool) -> float:
        ours_file.unlink(missing_ok=True)
        os.sync()  # no other round's dirty pages still being written back (not timed)
        t0 = time.perf_counter()
        write_weights(out, target, li.chunks(), dtype="float32", recipe={"bench": True}, durable=durable)
        return time.perf_counter() - t0

    base_rss = rss_mb()
    ours(True)
    ours_peak = peak_mb() - base_rss
    size_mb = ours_file.stat().st_size / 2**20
    tensors = li.state()

    def theirs(durable: bool) -> float:
        base_file.unlink(missing_ok=True)
        os.sync()
        t0 = time.perf_counter()
        save_file(tensors, str(base_file), metadata={"format": "pt"})
        if durable:
            fsync_path(base_file)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"ours durable": [], "save_file + fsync": [], "ours page cache": [],
                                     "save_file": []}
    for k in range(args.repeat + 1):  # round 0 warms up both sides (allocator, page cache) and is not counted
        for key, run in (("save_file + fsync", lambda: theirs(True)), ("ours durable", lambda: ours(True)),
                         ("save_file", lambda: theirs(False)), ("ours page cache", lambda: ours(False))):
            t = run()
            if k:
                times[key].append(t)
    shutil.rmtree(out)
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}  (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print(f"target {target.shape} from {small.name} {small.spec.shape} + {big.name} {big.spec.shape}, "
          f"{target.num_params():,} params, output {size_mb:.0f} MiB fp32")
    for k, v in times.items():
        print(f"{k:18s} best {min(v):.3f} s  median {statistics.median(v):.3f} s  ({', '.join(f'{t:.2f}' for t in v)})")
    for a, b in (("ours durable", "save_file + fsync"), ("ours page cache", "save_file")):
        print(f"time ratio {a} / {b}: best {min(times[a]) / min(times[b]):.2f}x, median "
              f"{statistics.median(times[a]) / statistics.median(times[b]):.2f}x (target <= 1.5x)")
    print(f"peak RSS growth during the first LInit write: {ours_peak:.0f} MiB = {ours_peak / size_mb:.2f}x the output "
          "(target <= 1.5x)")


if __name__ == "__main__":
    main()
