"""Throughput of ``cbd serve --workers N`` on this machine: a batch of distinct LInit jobs.

    python bench/workers.py --chain tiny --jobs 12        # -> docs/data/workers-tiny.json

For N = 1 and then N = 2, a fresh ``cbd serve --workers N`` (its embedded Redis, a temporary
artifact store, the chain from the cache) first gets one warm-up job per worker (imports, the
first anchor reads), then ``--jobs`` distinct ``POST /initialize`` requests at once: the same
target at different explicit alphas, so each is a cache miss running the default repair, the
init card and the write. Throughput is jobs finished per second from the first POST of the batch
to the last job finished. ``cbd serve`` sizes each worker's torch pool to its share of the CPUs
(``cbd.core.threads``: 2 threads for one worker on 2 cores, 1 each for two), so the question is
whether two single-threaded workers do at least as much as one with both cores, or collapse.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.quality import DATA  # noqa: E402

TARGET = dict(num_hidden_layers=8, hidden_size=320, num_attention_heads=5, num_key_value_heads=1,
              intermediate_size=896)  # between tiny's a2 and a1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_jobs(client: httpx.Client, ids: list[str], timeout: float = 1800) -> list[dict]:
    deadline, done = time.monotonic() + timeout, {}
    while len(done) < len(ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids) - len(done)} jobs not finished")
        for i in ids:
            if i not in done:
                job = client.get(f"/jobs/{i}").json()
                if job["status"] in ("finished", "failed"):
                    done[i] = job
        time.sleep(0.2)
    failed = [j for j in done.values() if j["status"] != "finished"]
    if failed:
        raise RuntimeError(f"jobs failed: {failed[:2]}")
    return list(done.values())


def post_all(client: httpx.Client, chain: str, alphas: list[float]) -> list[str]:
    ids = []
    for a in alphas:
        r = client.post("/initialize", json={"chain": chain, "architecture": TARGET, "alpha": a})
        if r.status_code not in (200, 202):
            raise RuntimeError(f"POST /initialize: {r.status_code} {r.text[:300]}")
        ids.append(r.json()["id"])
    return ids


def run(chain: str, workers: int, jobs: int, chains_root: Path, offset: int) -> dict:
    port = free_port()
    # the service's log goes to a file, not a pipe nobody reads (a full pipe blocks the service)
    with tempfile.TemporaryDirectory(prefix="cbdw") as home, open(f"{home}/serve.log", "wb") as log:
        env = os.environ | {"CBD_HOME": home, "CBD_CHAINS": str(chains_root), "CBD_ARTIFACTS": f"{home}/artifacts",
                            "CBD_SYNC_WAIT_S": "0", "CBD_LOG_LEVEL": "WARNING"}
        env.pop("REDIS_URL", None)
        env.pop("OMP_NUM_THREADS", None)  # cbd serve sizes the pools itself
        proc = subprocess.Popen([sys.executable, "-m", "cbd.cli", "serve", "--port", str(port), "--workers",
                                 str(workers)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                deadline = time.monotonic() + 300
                while True:
                    try:
                        if client.get("/healthz").json().get("workers", 0) >= workers:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("cbd serve did not start: " + Path(f"{home}/serve.log").read_text()[-2000:])
                    time.sleep(0.5)
                # distinct alphas per run so no job is a cache hit (each run has its own store anyway)
                step = 0.9 / (workers + jobs)
                alphas = [round(0.05 + step * k, 4) + offset * 1e-4 for k in range(workers + jobs)]
                wait_jobs(client, post_all(client, chain, alphas[:workers]))  # warm-up: one per worker
                t0 = time.perf_counter()
                wait_jobs(client, post_all(client, chain, alphas[workers:]))
                wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"workers": workers, "jobs": jobs, "wall_s": round(wall, 2), "jobs_per_s": round(jobs / wall, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--chains-root", type=Path, default=None, help="default: the cache's chains folder")
    args = ap.parse_args()
    from cbd.core import paths

    root = args.chains_root or paths.chains_dir()
    rows = []
    for k, n in enumerate((1, 2)):
        rows.append(run(args.chain, n, args.jobs, root, k))
        print(f"{n} worker(s): {args.jobs} jobs in {rows[-1]['wall_s']:.1f} s, {rows[-1]['jobs_per_s']:.3f} jobs/s",
              flush=True)
    ratio = rows[1]["jobs_per_s"] / rows[0]["jobs_per_s"]
    # per core: each of the two workers has one core, the single worker has both; so the per-core
    # ratio (2 workers' throughput / 2) / (1 worker's / 2) is the total ratio itself
    print(f"2 workers / 1 worker: {ratio:.2f}x throughput, per core alike (goal: at least 0.8x)")
    out = {"command": "python bench/workers.py " + " ".join(sys.argv[1:]), "chain": args.chain,
           "target": TARGET, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "rows": rows,
           "ratio_2_over_1": round(ratio, 3)}
    (DATA / f"workers-{args.chain}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
