"""A cache miss as the service runs it, end to end, beside the floor measured in the same run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/miss_path.py --chain tiny --json docs/data/miss-path-tiny.json

The real service on loopback: a private redis-server, one worker (``python -m worker.main``, torch
threads as given: 2 by default, the two cores), the API (uvicorn, ``CBD_SYNC_WAIT_S`` long enough that
the POST itself waits for the job). The chain is read from ``--chains`` (a built real chain; default
``$CBD_HOME/chains``); checkpoints go to a temporary store. For each target and request body, the time
of ``POST /initialize`` for an init the store does not hold, from the request until its answer says
``finished`` (request, plan, queue, the worker's job: anchors, repair, calibration, card, LInit,
streamed write, hash and publish, the answer), ``--rounds`` times: the first round is cold (the
worker loads the anchors), the others warm. Each round asks for a shape no round before it asked for
(the FFN 64 wider per round: still the same size class), so nothing a worker keeps per shape helps
(what it keeps per anchor does: the loaded anchors, their cached outputs); with ``--same-shape``
every round asks for the same init again, its folder removed in between, as after an eviction. The floor, per round: ``safetensors``
``save_file`` of the same tensors (read back from the published checkpoint) plus ``fsync``, into the
same folder's file system, timed in this process.

Bodies: ``default`` (what ``POST /initialize`` does when the body gives only the shape: ridge repair,
alpha per block, the init card) and ``plain`` (``"calibrate": false, "repair": false``: alpha0, plain
Trans, the init card) and ``no card`` (plain, ``"card": false`` too: no forward pass at all). Reported: seconds (cold, then the median and spread of the warm rounds), the
floor's median, the ratio of the warm median to it, and the job's own stage times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest_service import Children, RedisServer  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "docs" / "data"
TARGETS = {
    "teacher-sized (28x576, 9/3, 1536)": dict(num_hidden_layers=28, hidden_size=576, num_attention_heads=9,
                                              num_key_value_heads=3, intermediate_size=1536),
    "~30M (16x448, 7/1, 1280)": dict(num_hidden_layers=16, hidden_size=448, num_attention_heads=7,
                                     num_key_value_heads=1, intermediate_size=1280),
}
BODIES = {"default": {}, "plain": {"calibrate": False, "repair": False},
          "no card": {"calibrate": False, "repair": False, "card": False}}


def floor_s(weights: Path, folder: Path) -> float:
    """save_file + fsync of the tensors in ``weights``, into ``folder``: seconds."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    out = folder / "floor.safetensors"
    t0 = time.perf_counter()
    save_file(tensors, out)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    out.unlink()
    return seconds


def job_seconds(client: httpx.Client, job_id: str) -> float | None:
    """The worker's own time for the job (rq's started_at to ended_at)."""
    from datetime import datetime

    job = client.get(f"/jobs/{job_id}").json()
    if not job.get("started_at") or not job.get("ended_at"):
        return None
    return (datetime.fromisoformat(job["ended_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()


def run(chain: str, chains: Path, rounds: int, threads: int, only: str | None, same_shape: bool = False,
        bodies: tuple[str, ...] = tuple(BODIES)) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="cbd-miss-") as tmp:
        tmp = Path(tmp)
        store = tmp / "artifacts"
        (tmp / "redis").mkdir()
        (tmp / "logs").mkdir()
        redis = RedisServer(tmp / "redis")
        redis.start()
        kids = Children(tmp / "logs")
        env = {"CBD_CHAINS": str(chains), "CBD_ARTIFACTS": str(store), "CBD_DEFAULT_CHAIN": chain}
        try:
            url = redis.url + "/0"
            kids.worker(url, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **env)
            base, _ = kids.api(url, CBD_SYNC_WAIT_S="600", CBD_ACCESS_LOG="off", **env)
            with httpx.Client(base_url=base, timeout=900) as c:
                for target, shape in TARGETS.items():
                    if only and only not in target:
                        continue
                    for body_name in bodies:
                        extra = BODIES[body_name]
                        times, floors, jobs, aid, shapes = [], [], [], None, []
                        for k in range(rounds):
                            grow = 0 if same_shape else 64 * k
                            body = {"chain": chain, "architecture": shape | {
                                "intermediate_size": shape["intermediate_size"] + grow}, **extra}
                            shapes.append(body["architecture"]["intermediate_size"])
                            if aid is not None and same_shape:
                                shutil.rmtree(store / aid)  # a miss again, as after an eviction
                            t0 = time.perf_counter()
                            r = c.post("/initialize", json=body)
                            seconds = time.perf_counter() - t0
                            if r.status_code != 200 or r.json().get("status") != "finished":
                                raise RuntimeError(f"{target} {body_name}: {r.status_code} {r.text[:500]}\n{kids.log()}")
                            aid = r.json()["artifact_id"]
                            times.append(seconds)
                            jobs.append(job_seconds(c, aid))
                            floors.append(floor_s(store / aid / "model.safetensors", tmp))
                            print(f"  {target} {body_name}: {seconds:.2f} s (floor {floors[-1]:.3f} s)", flush=True)
                        info = json.loads((store / aid / "artifact.json").read_text())
                        warm = times[1:] or times
                        row = {"target": target, "body": body_name, "request": body, "rounds": rounds,
                               "intermediate_sizes": shapes,
                               "cold_s": round(times[0], 3), "warm_s": [round(t, 3) for t in warm],
                               "warm_median_s": round(statistics.median(warm), 3),
                               "floor_s": [round(f, 3) for f in floors],
                               "floor_median_s": round(statistics.median(floors), 3),
                               "job_s": [round(j, 3) if j is not None else None for j in jobs],
                               "weights_bytes": (store / aid / "model.safetensors").stat().st_size,
                               "alpha_scheme": info.get("metrics", {}).get("card", {}).get("alpha_scheme"),
                               "repair": info.get("metrics", {}).get("card", {}).get("repair")}
                        row["x_floor"] = round(row["warm_median_s"] / row["floor_median_s"], 2)
                        rows.append(row)
        finally:
            kids.stop()
            redis.stop()
    return {"command": "OMP_NUM_THREADS=2 .venv/bin/python bench/miss_path.py " + " ".join(sys.argv[1:]),
            "chain": chain, "same_shape": same_shape, "worker_threads": threads, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d"), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--chains", type=Path, default=None, help="folder of built chains (default: $CBD_HOME/chains)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="the worker's torch threads")
    ap.add_argument("--only", help="run the targets whose name contains this")
    ap.add_argument("--bodies", default=",".join(BODIES), help="comma-separated request bodies to run")
    ap.add_argument("--same-shape", action="store_true",
                    help="every round the same request (its checkpoint removed in between), not a new shape")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    chains = args.chains or Path(os.environ.get("CBD_HOME", "~/.cache/cbd")).expanduser() / "chains"
    bodies = tuple(b.strip() for b in args.bodies.split(","))
    if unknown := [b for b in bodies if b not in BODIES]:
        ap.error(f"unknown bodies {unknown}; known: {', '.join(BODIES)}")
    result = run(args.chain, chains, args.rounds, args.threads, args.only, args.same_shape, bodies)
    print(f"{'target':36} {'body':8} {'cold s':>7} {'warm s (median)':>16} {'floor s':>8} {'x floor':>8}")
    for r in result["rows"]:
        print(f"{r['target']:36} {r['body']:8} {r['cold_s']:7.2f} {r['warm_median_s']:16.2f} "
              f"{r['floor_median_s']:8.3f} {r['x_floor']:8.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
