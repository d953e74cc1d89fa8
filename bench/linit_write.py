"""Benchmark: LInit of a target as large as the teacher, streamed to disk in fp32, against
``safetensors.torch.save_file`` writing the same tensors, in one process.

    python bench/linit_write.py --chain tiny            # needs a built chain with the teacher as a0
    python bench/linit_write.py --chain tiny --layers 29

Prints wall time of both (best of ``--repeat``), their ratio (target <= 1.5x; our write ends
with an fsync, so the ratio against save_file followed by an fsync is printed too), and the peak resident memory of the
LInit write relative to the output size (target <= 1.5x). The LInit run goes first, in a fresh
process state, so its peak RSS is not inflated by the baseline's in-memory copy.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from cbd.chainstore import load_alignment, load_anchor
from cbd.checkpoint import write_weights
from cbd.linit import make_linit
from cbd.manifest import load_manifest


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="target depth (default: source depth - 1)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    m = load_manifest(args.chain)
    big, small = m.anchors[0], m.anchors[1]
    target = big.spec.with_shape(num_hidden_layers=args.layers or big.spec.num_hidden_layers - 1)
    S, B = load_anchor(m, small.name), load_anchor(m, big.name)
    li = make_linit(target, S, B, alpha=0.3, alignment=load_alignment(m, small.name, big.name))
    out = Path(tempfile.mkdtemp(prefix="cbd-bench-"))
    base_rss = rss_mb()
    ours = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        write_weights(out, target, li.tensors(), dtype="float32", recipe={"bench": True})
        ours.append(time.perf_counter() - t0)
    size_mb = (out / "model.safetensors").stat().st_size / 2**20
    ours_peak = peak_mb() - base_rss
    tensors = li.state()
    theirs, theirs_sync = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        save_file(tensors, str(out / "baseline.safetensors"), metadata={"format": "pt"})
        theirs.append(time.perf_counter() - t0)
        with open(out / "baseline.safetensors", "rb+") as f:  # the same durability as ours (fsync)
            os.fsync(f.fileno())
        theirs_sync.append(time.perf_counter() - t0)
    shutil.rmtree(out)
    t_ours, t_theirs, t_sync = min(ours), min(theirs), min(theirs_sync)
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"target {target.shape} from {small.name} {small.spec.shape} + {big.name} {big.spec.shape}, "
          f"{target.num_params():,} params, output {size_mb:.0f} MiB fp32")
    print(f"LInit + streamed write: {t_ours:.2f} s (best of {args.repeat}: {', '.join(f'{t:.2f}' for t in ours)})")
    print(f"safetensors save_file of the same tensors: {t_theirs:.2f} s "
          f"({', '.join(f'{t:.2f}' for t in theirs)})")
    print(f"save_file + fsync (the durability our write includes): {t_sync:.2f} s "
          f"({', '.join(f'{t:.2f}' for t in theirs_sync)})")
    print(f"time ratio ours / save_file: {t_ours / t_theirs:.2f}x (target <= 1.5x); "
          f"ours / (save_file + fsync): {t_ours / t_sync:.2f}x")
    print(f"peak RSS growth during LInit write: {ours_peak:.0f} MiB = {ours_peak / size_mb:.2f}x the output "
          "(target <= 1.5x)")


if __name__ == "__main__":
    main()
