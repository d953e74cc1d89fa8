"""The Python half of bench/gpu_smoke.sh: the first anchor of the `gpu` recipe for a few steps, an init
and a bridge step from it, nccl, and the projected `gpu` build time. Prints one JSON line per stage
(``{"stage", "ok", ...}``) and a summary; exit 1 when a stage failed (the others still run).

    python bench/gpu_smoke.py --device cuda --steps 40          # on the GPU machine (gpu_smoke.sh)
    python bench/gpu_smoke.py --device cpu --steps 2 --batch-size 2 --seq-len 64 --eval-batches 1   # dry run

Everything is built into a temporary CBD_CHAINS / CBD_ARTIFACTS (the asset cache is the usual one).
The projection assumes every step of the chain runs at a1's measured tokens/s (a2 and a3 distil from
smaller teachers, so it is an upper bound for them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

RESULTS: list[dict] = []


def stage(name: str):
    def wrap(fn):
        def run(*a, **kw):
            t0 = time.perf_counter()
            try:
                out = fn(*a, **kw) or {}
                rec = {"stage": name, "ok": True, "s": round(time.perf_counter() - t0, 2), **out}
            except Exception as exc:
                rec = {"stage": name, "ok": False, "s": round(time.perf_counter() - t0, 2),
                       "error": f"{type(exc).__name__}: {exc}"[:2000], "where": traceback.format_exc()[-1500:]}
            RESULTS.append(rec)
            print(json.dumps(rec), flush=True)
            return rec
        return run
    return wrap


@stage("device")
def check_device(device: str) -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device (a CPU wheel, or no driver)")
        out |= {"gpu": torch.cuda.get_device_name(0), "bf16": torch.cuda.is_bf16_supported()}
        x = torch.randn(4096, 4096, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = x @ x
        out["autocast_dtype"] = str(y.dtype)
    return out


@stage("nccl")
def check_nccl(device: str) -> dict:
    """One-process nccl group (gloo on CPU) and an all_reduce, as cbd.train.ddp starts it."""
    import subprocess

    code = ("import torch, torch.distributed as dist\n"  # one rank: maybe_init_distributed starts groups of 2+
            "from cbd.train.ddp import resolve_device\n"
            f"dev = resolve_device({device!r})\n"
            "if dev.type == 'cuda': torch.cuda.set_device(dev)\n"
            "dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')\n"
            "t = torch.ones(1, device=dev); dist.all_reduce(t)\n"
            "print(dist.get_backend(), float(t)); dist.destroy_process_group()\n")
    script = Path(tempfile.mkdtemp(prefix="cbd-nccl-")) / "nccl_check.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone",
                        str(script)], text=True, capture_output=True, timeout=180)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-1500:])
    return {"backend": r.stdout.split()[0]}


def smoke_recipe(args):
    from cbd.core.recipe import load_recipe

    r = load_recipe("gpu")
    first = r.anchors[0].model_copy(update={"steps": args.steps})
    train = r.train.model_copy(update={"steps": args.steps, "ckpt_every": max(args.steps, 1),
                                       "warmup_steps": min(r.train.warmup_steps, max(args.steps // 4, 1)),
                                       **({"batch_size": args.batch_size} if args.batch_size else {}),
                                       **({"seq_len": args.seq_len} if args.seq_len else {})})
    data = r.data.model_copy(update={"eval_batches": args.eval_batches, "eval_seq_len": min(r.data.eval_seq_len,
                                                                                            train.seq_len)})
    return r, r.model_copy(update={"name": "gpu-smoke", "device": args.device, "anchors": [first], "train": train,
                                   "data": data})


@stage("anchor a1 (gpu recipe, capped)")
def build_first_anchor(full, recipe) -> dict:
    from cbd.chain.build import build_chain

    m = build_chain(recipe)
    a1 = m.anchor("a1")
    tps = float(a1.metrics.get("tokens_per_s") or 0.0)
    per_step = full.train.batch_size * full.train.seq_len
    steps = [a.steps if a.steps is not None else full.train.steps for a in full.anchors]
    projected_h = sum(steps) * per_step / tps / 3600 if tps else None
    return {"steps": recipe.train.steps, "batch": recipe.train.batch_size, "seq_len": recipe.train.seq_len,
            "tokens_per_s": tps, "anchor_wall_s": a1.metrics.get("wall_s"),
            "heldout_loss": a1.metrics.get("heldout_loss"),
            "projected_gpu_build_h": round(projected_h, 2) if projected_h else None,
            "projection": f"{sum(steps)} steps x {per_step} tokens at a1's tokens/s (recipe says "
                          f"{full.expected.get('build_hours_h200')} h)"}


def _plan(chain_name: str, **kw):
    from cbd.core.manifest import load_manifest
    from cbd.core.plan import make_plan
    from cbd.core.request import InitRequest

    m = load_manifest(chain_name)
    req = InitRequest(chain=chain_name, architecture={"num_hidden_layers": 16, "hidden_size": 320,
                                                      "num_attention_heads": 5, "num_key_value_heads": 1,
                                                      "intermediate_size": 896}, **kw.pop("request", {}))
    return make_plan(req, m, **kw)


@stage("init (LInit + write, as the worker runs it)")
def linit() -> dict:
    from cbd.run import run_plan

    t0 = time.perf_counter()
    info = run_plan(_plan("gpu-smoke"))
    return {"id": info.id, "alpha": info.alpha, "s_run": round(time.perf_counter() - t0, 2),
            "bytes": sum(f.size for f in info.files.values()),
            "note": "cbd.inits has no device option: LInit runs on the CPU in every worker"}


@stage("bridge step (gpt2 tokenizer, 1 step)")
def bridge() -> dict:
    from cbd.core.plan import BridgeOptions
    from cbd.run import run_plan

    opts = BridgeOptions(steps=1, batch_size=2, seq_len=64, warmup_steps=1, eval_batches=1, eval_batch_size=2,
                         eval_seq_len=64)
    info = run_plan(_plan("gpu-smoke", request={"tokenizer": "gpt2"}, bridge_options=opts))
    return {"id": info.id, "note": "cbd.bridge has no device option: the bridge runs on the CPU"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=int(os.environ.get("CBD_SMOKE_STEPS", "40")))
    p.add_argument("--batch-size", type=int, default=0, help="0: the recipe's (64)")
    p.add_argument("--seq-len", type=int, default=0, help="0: the recipe's (1024)")
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--skip", default="", help="comma-separated stages to skip: nccl, bridge")
    p.add_argument("--keep", action="store_true", help="keep the work folder (chain and inits)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cbd-gpu-smoke-"))
    os.environ["CBD_CHAINS"], os.environ["CBD_ARTIFACTS"] = str(tmp / "chains"), str(tmp / "artifacts")
    skip = set(args.skip.split(","))
    check_device(args.device)
    if "nccl" not in skip:
        check_nccl(args.device)
    full, recipe = smoke_recipe(args)
    built = build_first_anchor(full, recipe)
    if built["ok"]:
        linit()
        if "bridge" not in skip:
            bridge()
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    failed = [r["stage"] for r in RESULTS if not r["ok"]]
    print(json.dumps({"summary": True, "tokens_per_s": built.get("tokens_per_s"),
                      "projected_gpu_build_h": built.get("projected_gpu_build_h"), "failed": failed,
                      "work_dir": str(tmp)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
