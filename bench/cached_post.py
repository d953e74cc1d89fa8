"""Cached ``POST /initialize`` against a bare FastAPI endpoint, API memory over many requests, downloads.

Issue 15's "What it must show", in one run on loopback (127.0.0.1) only:

- a cached ``POST /initialize`` at 1 client within 1.5x (+1 ms) of a bare FastAPI endpoint returning
  the same JSON (p99), and at 32 clients at least 0.9x its throughput;
- download throughput of the init's ``model.safetensors`` at least 0.9x a plain Starlette
  ``FileResponse`` of the same file;
- the API's memory flat over 10,000 requests.

The real service runs as bench/load.py runs it (its ``Service``: a private redis-server, one worker,
``uvicorn app.main:create_app --factory --limit-concurrency L``, the tiny random chain of
tests/random_chain.py in a temporary CBD_HOME). One init is made, so that it is cached; the exact
bytes a cached POST answers are captured (twice, compared). Beside it a bare FastAPI app
(``bare:create_app``, written to the temporary folder) is started with the API's own uvicorn command
line, only the app and the port replaced (same workers, loop, http implementation, limit-concurrency,
log level, environment); its ``POST /initialize`` parses the JSON body, as any POST endpoint does,
and answers the captured bytes with the same content type. Then, after a warm-up of both:

1. 1 client, sequential, on one keep-alive connection: ``--latency-requests`` per server, in
   ``--rounds`` blocks alternated API, bare, API, bare (so that drift on the machine hits both):
   p50/p99; the ratio of p99s and their difference in ms; target p99 <= 1.5 x bare + 1 ms.
2. ``--clients`` (32) concurrent clients, each a thread with its own keep-alive connection, spread
   over ``--client-procs`` processes (one Python process's GIL would otherwise cap both servers
   alike): ``--seconds`` per server in ``--rounds`` alternated blocks: requests/s, p50/p99, and the
   server process's CPU ms per request (steadier than requests/s on a shared machine); target
   throughput >= 0.9 x bare.
3. ``--requests`` (10,000) cached POSTs to the API by ``--clients`` threads: its RSS at start (booted,
   before any POST), after the warm-up, at this phase's start and end, sampled every 1% of the
   requests, and the least-squares slope in MiB per 1000 requests ("flat" here: under 0.2 MiB per
   1000 requests, this script's reading of the issue).
4. whole-file downloads of the init's model.safetensors through the API and from a plain Starlette
   ``FileResponse`` app of the same folder (bench/load.py's ``compare_downloads``: alternated rounds,
   the median of each number). The random chain's files are small (hundreds of KB), so this measures
   per-request cost more than streaming; then the same for a ``--download-mib`` (64) MiB checkpoint
   published into the store as a worker publishes one (random bytes), where streaming sets the pace.

Every answer must be 200 with the captured bytes; any other answer, or none, is counted and makes
the exit status 1 (with ``--strict`` also a missed target). Full run (on a quiet machine; a few
minutes):

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python bench/cached_post.py --json cached-post.json

Smoke run (seconds; the numbers mean nothing):

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python bench/cached_post.py --requests 500 --seconds 3 \
        --latency-requests 200 --download-seconds 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402  (bench/load.py: Service, pct, ms, rss_slope, compare_downloads)
from conftest_service import child_env, free_port, wait_job  # noqa: E402  (on sys.path via load)

BARE_APP = '''
"""A bare FastAPI app: POST /initialize parses its JSON body and answers fixed bytes."""
import os
from pathlib import Path

from fastapi import FastAPI, Response

BODY = Path(os.environ["BARE_BODY"]).read_bytes()
MEDIA_TYPE = os.environ["BARE_MEDIA_TYPE"]


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/initialize")
    async def initialize(body: dict) -> Response:
        return Response(BODY, media_type=MEDIA_TYPE)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    return app
'''
SLOPE_FLAT = 0.2  # MiB per 1000 requests


def ms3(values: list[float]) -> dict[str, float]:
    """p50 and p99 in ms to the microsecond (bench/load.py's ``ms`` rounds to 0.1 ms: too coarse here)."""
    return {"p50_ms": round(1000 * load.pct(values, 0.50), 3), "p99_ms": round(1000 * load.pct(values, 0.99), 3)}


def mib(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def start_bare(svc: load.Service, tmp: Path, body: bytes, media_type: str) -> tuple[str, int]:
    """The bare app, started with the API's own uvicorn arguments (app and port replaced)."""
    folder = tmp / "bare"
    folder.mkdir()
    (folder / "bare.py").write_text(BARE_APP)
    (folder / "body.json").write_bytes(body)
    args = list(svc.api.args)
    port = free_port()
    args[args.index("app.main:create_app")] = "bare:create_app"
    args[args.index("--port") + 1] = str(port)
    args += ["--app-dir", str(folder)]
    proc = svc.kids.start("bare", args, child_env(BARE_BODY=str(folder / "body.json"), BARE_MEDIA_TYPE=media_type))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return base, proc.pid
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"the bare FastAPI app did not start: {args}")
        time.sleep(0.1)


def sequential(base: str, request: dict, expected: bytes, n: int) -> dict:
    """``n`` POSTs one after another on one keep-alive connection: seconds each, and what went wrong."""
    times, bad = [], []
    with httpx.Client(base_url=base, timeout=30) as c:
        for _ in range(n):
            timed_post(c, request, expected, times, bad)
    return {"times": times, "bad": bad}


def timed_post(c: httpx.Client, request: dict, expected: bytes, times: list[float], bad: list[str]) -> None:
    """One POST: its seconds into ``times`` (when it got an answer), anything but a 200 with
    ``expected`` into ``bad``."""
    t0 = time.perf_counter()
    try:
        r = c.post("/initialize", json=request)
    except httpx.HTTPError as exc:
        bad.append(f"{type(exc).__name__}: {exc}"[:200])
        return
    times.append(time.perf_counter() - t0)
    if r.status_code != 200 or r.content != expected:
        bad.append(f"{r.status_code} {r.text[:200]}")


def burst(base: str, request: dict, expected: bytes, threads: int, start_at: float, seconds: float) -> dict:
    """One client process: ``threads`` keep-alive clients POSTing from ``start_at`` (time.time()) for
    ``seconds``. Top-level, so that a spawned process can run it."""
    times: list[float] = []
    bad: list[str] = []
    last = [start_at]
    lock = threading.Lock()

    def client() -> None:
        mine, wrong = [], []
        with httpx.Client(base_url=base, timeout=30) as c:
            time.sleep(max(0.0, start_at - time.time()))
            while time.time() < start_at + seconds:
                timed_post(c, request, expected, mine, wrong)
        with lock:
            times.extend(mine)
            bad.extend(wrong)
            last[0] = max(last[0], time.time())

    pool = [threading.Thread(target=client) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return {"times": times, "bad": bad, "end": last[0]}


def concurrent_round(procs: concurrent.futures.Executor, n_procs: int, base: str, pid: int, request: dict,
                     expected: bytes, clients: int, seconds: float) -> dict:
    """``clients`` threads over ``n_procs`` processes for ``seconds``: requests, elapsed, server CPU."""
    server = psutil.Process(pid)
    cpu0 = sum(server.cpu_times()[:2])
    start_at = time.time() + 0.5  # every process has its threads up and connected by then
    shares = [clients // n_procs + (i < clients % n_procs) for i in range(n_procs)]
    futures = [procs.submit(burst, base, request, expected, k, start_at, seconds) for k in shares if k]
    got = [f.result() for f in futures]
    cpu = sum(server.cpu_times()[:2]) - cpu0
    return {"times": [t for g in got for t in g["times"]], "bad": [b for g in got for b in g["bad"]],
            "elapsed": max(g["end"] for g in got) - start_at, "server_cpu_s": cpu}


def memory_phase(base: str, pid: int, request: dict, expected: bytes, requests: int, clients: int,
                 timeout: float) -> dict:
    """``requests`` cached POSTs by ``clients`` threads; the API's RSS every 1% of them."""
    server = psutil.Process(pid)
    step = max(1, requests // 100)
    samples: list[tuple[int, float]] = [(0, server.memory_info().rss / 2**20)]
    started, done, bad, lock = [0], [0], [], threading.Lock()
    deadline = time.monotonic() + timeout

    def client() -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            while time.monotonic() < deadline:
                with lock:  # exactly ``requests`` are sent
                    if started[0] >= requests:
                        return
                    started[0] += 1
                try:
                    r = c.post("/initialize", json=request)
                    wrong = r.status_code != 200 or r.content != expected
                    what = f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    wrong, what = True, f"{type(exc).__name__}: {exc}"[:200]
                with lock:
                    done[0] += 1
                    n = done[0]
                    if wrong:
                        bad.append(what)
                    if n % step == 0:
                        samples.append((n, server.memory_info().rss / 2**20))

    t0 = time.monotonic()
    pool = [threading.Thread(target=client) for _ in range(clients)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    slope = load.rss_slope(samples)
    return {"requests": done[0], "complete": done[0] >= requests, "seconds": round(time.monotonic() - t0, 1),
            "bad": len(bad), "bad_examples": bad[:5], "start_mib": round(samples[0][1], 1),
            "end_mib": round(samples[-1][1], 1), "max_mib": round(max(m for _, m in samples), 1),
            "slope_mib_per_1000_requests": slope, "samples": len(samples),
            "by_tenth": [(n, round(m, 1)) for n, m in samples[:: max(1, len(samples) // 10)]],
            "flat": slope is not None and slope < SLOPE_FLAT}


def big_checkpoint(svc: load.Service, mib: int) -> dict:
    """A ``mib``-MiB checkpoint published into the service's store as a worker publishes one (random bytes:
    the download route never reads what a file holds), for downloads where streaming, not the
    per-request work, sets the pace; returned in the shape of a POST answer."""
    from cbd.core import artifacts

    root = Path(svc.env["CBD_ARTIFACTS"])
    aid = "b" * 32
    tmp = artifacts.staging_dir(aid, root)
    with open(tmp / "model.safetensors", "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    artifacts.publish(tmp, aid, {"alpha": 0.5, "plan": {"chain": "load"}}, root)
    size = (root / aid / "model.safetensors").stat().st_size
    return {"id": aid, "files": {"model.safetensors": {
        "url": f"{svc.base}/checkpoints/{aid}/model.safetensors", "size": size}}}


def run(*, requests: int = 10_000, seconds: float = 20, latency_requests: int = 2000, clients: int = 32,
        client_procs: int = 0, rounds: int = 4, limit_concurrency: int = 64, download_seconds: float = 40,
        download_clients: int = 4, warmup: int = 300, download_mib: int = 64) -> dict:
    client_procs = client_procs or max(1, min(4, (os.cpu_count() or 2) // 2))
    with tempfile.TemporaryDirectory(prefix="cbd-cached-post-") as tmp_, \
            concurrent.futures.ProcessPoolExecutor(client_procs, mp_context=multiprocessing.get_context("spawn")) as procs:
        tmp = Path(tmp_)
        list(procs.map(time.sleep, [0.0] * client_procs))  # the client processes are up before anything is timed
        svc = load.Service(tmp, limit_concurrency, sync_wait_s=5)
        try:
            rss = {"start": mib(svc.api.pid)}  # booted, /healthz answered, no POST yet
            request = {"architecture": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}}
            with httpx.Client(base_url=svc.base, timeout=300) as c:
                r = c.post("/initialize", json=request)
                made = r.json() if r.status_code == 200 else wait_job(c, r.headers["location"], timeout=300)
                assert made["status"] == "finished", made
                first, again = c.post("/initialize", json=request), c.post("/initialize", json=request)
            assert first.status_code == again.status_code == 200, (first.status_code, first.text)
            body, media_type = again.content, again.headers["content-type"]
            bare, bare_pid = start_bare(svc, tmp, body, media_type)
            with httpx.Client(base_url=bare, timeout=30) as c:
                r = c.post("/initialize", json=request)
            assert r.content == body and r.headers["content-type"] == media_type, (r.headers, r.text[:300])
            servers = {"cbd_api": (svc.base, svc.api.pid), "bare_fastapi": (bare, bare_pid)}

            for base, pid in servers.values():  # warm-up, not counted
                sequential(base, request, body, warmup)
                concurrent_round(procs, client_procs, base, pid, request, body, clients, 1.0)
            rss["after_warmup"] = mib(svc.api.pid)

            one: dict[str, dict] = {name: {"times": [], "bad": []} for name in servers}
            many: dict[str, dict] = {name: {"times": [], "bad": [], "elapsed": 0.0, "server_cpu_s": 0.0}
                                     for name in servers}
            for _ in range(rounds):  # API, bare, API, bare, ...
                for name, (base, _) in servers.items():
                    got = sequential(base, request, body, max(1, latency_requests // rounds))
                    one[name]["times"] += got["times"]
                    one[name]["bad"] += got["bad"]
            for _ in range(rounds):
                for name, (base, pid) in servers.items():
                    got = concurrent_round(procs, client_procs, base, pid, request, body, clients, seconds / rounds)
                    for k in many[name]:
                        many[name][k] += got[k]

            rss["before_memory_phase"] = mib(svc.api.pid)
            memory = memory_phase(svc.base, svc.api.pid, request, body, requests, clients,
                                  timeout=max(120.0, requests / 20))
            rss["end"] = mib(svc.api.pid)
            downloads = load.compare_downloads(svc, made, download_seconds, download_clients)
            big = (load.compare_downloads(svc, big_checkpoint(svc, download_mib), download_seconds, download_clients)
                   if download_mib else None)
        finally:
            svc.stop()

    lat = {name: ms3(v["times"]) | {"requests": len(v["times"]), "bad": len(v["bad"])} for name, v in one.items()}
    p99 = {name: 1000 * load.pct(v["times"], 0.99) for name, v in one.items()}
    conc = {name: ms3(v["times"]) | {
        "requests": len(v["times"]), "bad": len(v["bad"]), "requests_per_s": round(len(v["times"]) / v["elapsed"], 1),
        "server_cpu_ms_per_request": round(1000 * v["server_cpu_s"] / max(1, len(v["times"])), 3)}
        for name, v in many.items()}
    api_dl, plain_dl = downloads["cbd_api"], downloads["plain_starlette_FileResponse"]
    targets = {
        "1_client_p99": {"api_p99_ms": round(p99["cbd_api"], 3), "bare_p99_ms": round(p99["bare_fastapi"], 3),
                         "ratio": round(p99["cbd_api"] / p99["bare_fastapi"], 2),
                         "difference_ms": round(p99["cbd_api"] - p99["bare_fastapi"], 3),
                         "limit_ms": round(1.5 * p99["bare_fastapi"] + 1, 3),
                         "met": p99["cbd_api"] <= 1.5 * p99["bare_fastapi"] + 1},
        f"{clients}_clients_throughput": {
            "ratio": round(conc["cbd_api"]["requests_per_s"] / conc["bare_fastapi"]["requests_per_s"], 3),
            "target": 0.9, "met": conc["cbd_api"]["requests_per_s"] >= 0.9 * conc["bare_fastapi"]["requests_per_s"]},
        "download_throughput": {"ratio": round(api_dl["MB_per_s"] / plain_dl["MB_per_s"], 3), "target": 0.9,
                                "met": api_dl["MB_per_s"] >= 0.9 * plain_dl["MB_per_s"]},
        **({"download_throughput_large": {
            "ratio": round(big["cbd_api"]["MB_per_s"] / big["plain_starlette_FileResponse"]["MB_per_s"], 3),
            "target": 0.9, "met": big["cbd_api"]["MB_per_s"] >= 0.9 * big["plain_starlette_FileResponse"]["MB_per_s"]}}
           if big else {}),
        "memory_flat": {"slope_mib_per_1000_requests": memory["slope_mib_per_1000_requests"],
                        "requests": memory["requests"], "target_requests": 10_000,
                        "met": memory["flat"] and memory["requests"] >= 10_000},
    }
    errors = (sum(v["bad"] for v in lat.values()) + sum(v["bad"] for v in conc.values()) + memory["bad"]
              + (not memory["complete"]))
    return {
        "config": {"requests": requests, "seconds_per_server": seconds, "latency_requests_per_server": latency_requests,
                   "clients": clients, "client_procs": client_procs, "rounds": rounds,
                   "limit_concurrency": limit_concurrency, "api_workers": 1, "cpus": os.cpu_count(),
                   "load_average": os.getloadavg(), "response_bytes": len(body), "request": request},
        "one_client": lat, "concurrent": conc, "memory": memory, "api_rss_mib": rss, "download_throughput": downloads,
        "download_throughput_large": big, "targets": targets, "errors": errors,
        "error_examples": [b for v in (*one.values(), *many.values()) for b in v["bad"]][:5] + memory["bad_examples"],
        "ok": errors == 0,
    }


def report(r: dict) -> str:
    cfg, t = r["config"], r["targets"]
    one, conc, mem, rss, dl = r["one_client"], r["concurrent"], r["memory"], r["api_rss_mib"], r["download_throughput"]
    tick = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    p1, pc = t["1_client_p99"], t[f"{cfg['clients']}_clients_throughput"]
    lines = [f"cached POST /initialize ({cfg['response_bytes']} B answer), API vs bare FastAPI, same uvicorn flags "
             f"(--limit-concurrency {cfg['limit_concurrency']}), {cfg['rounds']} alternated rounds; "
             f"{cfg['cpus']} CPUs, load {tuple(round(x, 1) for x in cfg['load_average'])}"]
    for name in ("cbd_api", "bare_fastapi"):
        lines.append(f"  1 client   {name:13s} p50 {one[name]['p50_ms']:7.2f} ms  p99 {one[name]['p99_ms']:7.2f} ms  "
                     f"({one[name]['requests']} requests)")
    lines.append(f"  -> p99 {p1['ratio']}x bare, {p1['difference_ms']:+.3f} ms (target <= 1.5x + 1 ms = "
                 f"{p1['limit_ms']} ms): {tick(p1['met'])}")
    for name in ("cbd_api", "bare_fastapi"):
        c = conc[name]
        lines.append(f"  {cfg['clients']} clients {name:13s} {c['requests_per_s']:8.1f} requests/s  p50 {c['p50_ms']:7.2f} ms  "
                     f"p99 {c['p99_ms']:7.2f} ms  server CPU {c['server_cpu_ms_per_request']} ms/request  "
                     f"({c['requests']} requests, {cfg['client_procs']} client processes)")
    lines.append(f"  -> throughput {pc['ratio']}x bare (target >= 0.9): {tick(pc['met'])}")
    lines.append(f"API RSS MiB: start {rss['start']}, after warm-up {rss['after_warmup']}, before the memory phase "
                 f"{rss['before_memory_phase']}, end {rss['end']}; over {mem['requests']} cached POSTs "
                 f"({mem['seconds']} s): {mem['start_mib']} -> {mem['end_mib']} (max {mem['max_mib']}), slope "
                 f"{mem['slope_mib_per_1000_requests']} MiB per 1000 requests (flat: < {SLOPE_FLAT}; "
                 f">= 10,000 requests): {tick(t['memory_flat']['met'])}")
    lines.append(f"  (requests, MiB): {mem['by_tenth']}")
    lines.append(f"download model.safetensors ({dl['file_bytes']} B) x {dl['clients']} clients, median of {dl['rounds']} "
                 f"alternated rounds: cbd {dl['cbd_api']} vs plain Starlette FileResponse "
                 f"{dl['plain_starlette_FileResponse']}")
    lines.append(f"  -> {t['download_throughput']['ratio']}x (target >= 0.9): {tick(t['download_throughput']['met'])}")
    if r.get("download_throughput_large"):
        big = r["download_throughput_large"]
        lines.append(f"download a {big['file_bytes']} B file x {big['clients']} clients, median of {big['rounds']} "
                     f"alternated rounds: cbd {big['cbd_api']} vs plain Starlette FileResponse "
                     f"{big['plain_starlette_FileResponse']}")
        lines.append(f"  -> {t['download_throughput_large']['ratio']}x (target >= 0.9): "
                     f"{tick(t['download_throughput_large']['met'])}")
    lines.append(f"errors (non-200, wrong bytes, no answer, memory phase incomplete): {r['errors']}")
    lines += [f"  ! {e}" for e in r["error_examples"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000, help="cached POSTs of the memory phase")
    ap.add_argument("--seconds", type=float, default=20, help="seconds at --clients, per server (all rounds)")
    ap.add_argument("--latency-requests", type=int, default=2000, help="sequential POSTs at 1 client, per server")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--client-procs", type=int, default=0,
                    help="processes the concurrent clients are spread over (0: min(4, CPUs/2))")
    ap.add_argument("--rounds", type=int, default=4, help="alternated rounds per measurement")
    ap.add_argument("--limit-concurrency", type=int, default=64, help="uvicorn's, for both (cbd serve's default)")
    ap.add_argument("--download-seconds", type=float, default=40, help="per file, all rounds together")
    ap.add_argument("--download-clients", type=int, default=4)
    ap.add_argument("--download-mib", type=int, default=64,
                    help="also download a checkpoint of this many MiB (0: only the init's small weights)")
    ap.add_argument("--warmup", type=int, default=300, help="sequential POSTs per server before measuring")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--strict", action="store_true", help="exit status 1 also when a target is missed")
    args = ap.parse_args(argv)
    r = run(requests=args.requests, seconds=args.seconds, latency_requests=args.latency_requests,
            clients=args.clients, client_procs=args.client_procs, rounds=args.rounds,
            limit_concurrency=args.limit_concurrency, download_seconds=args.download_seconds, download_mib=args.download_mib,
            download_clients=args.download_clients, warmup=args.warmup)
    r["command"] = "bench/cached_post.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(report(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1) + "\n")
    missed = not all(v["met"] for v in r["targets"].values())
    return 0 if r["ok"] and not (args.strict and missed) else 1


if __name__ == "__main__":
    raise SystemExit(main())
