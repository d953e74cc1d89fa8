"""Mixed traffic against the real service (loopback only): latency, status counts, API memory.

A private redis-server, one worker and ``uvicorn --limit-concurrency`` serve a tiny random chain
(``tests/random_chain.py``) from a temporary CBD_HOME. ``--clients`` threads (more than the concurrency
limit, so uvicorn sheds load with deliberate 503s) then, for ``--seconds``, mix

    downloads of existing checkpoints (whole files, Range and If-None-Match),
    POST /initialize for an existing checkpoint (answered from the store),
    POST /initialize for new interpolations (unique alpha: a job each) and polls of their jobs,
    GET /healthz, /chains, /metrics.

Reported: requests and statuses per kind, p50/p99 latency, the API process's RSS (after warm-up,
at the end, and the least-squares slope per 1000 requests), every new job's end state (finished
and sha256-verified, or "lost"), p50/p99 of POST /initialize for an existing checkpoint with one
quiet client, and download throughput of the same file from the API and from a plain Starlette
``FileResponse`` app started beside it. Exit status 1 if a request got a 5xx other than a
limit-concurrency 503, a request got no response, a client thread died, or a job was lost.

    .venv/bin/python bench/load.py                      # 120 s, as in docs/reliability.md
    .venv/bin/python bench/load.py --seconds 20 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest_service import Children, RedisServer, free_port  # noqa: E402  (test helpers: one copy)

PLAIN_APP = """
import os, sys, uvicorn
from pathlib import Path
from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Route
root = Path(os.environ["PLAIN_ROOT"])
async def serve(request):
    return FileResponse(root / request.path_params["name"])
uvicorn.run(Starlette(routes=[Route("/files/{name}", serve)]), host="127.0.0.1", port=int(sys.argv[1]),
            log_level="warning")
"""
MIX = [("download", 45), ("download_conditional", 15), ("post_existing", 18), ("post_new", 2), ("poll", 10),
       ("health", 10)]


@dataclass
class Tally:
    """Thread-safe record of every request: kind, status, seconds, bytes."""

    rows: list[tuple[str, int, float, int]] = field(default_factory=list)
    limit_503: int = 0  # uvicorn's own "Service Unavailable" (text): deliberate load shedding
    unexpected: list[str] = field(default_factory=list)  # the first few other 5xx, for the report
    errors: list[str] = field(default_factory=list)  # requests that got no response (transport errors)
    clients_done: int = 0  # client threads that ran until the time was up (none died on an exception)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, kind: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")

    def add(self, kind: str, r: httpx.Response, seconds: float) -> None:
        shed = r.status_code == 503 and not r.headers.get("content-type", "").startswith("application/json")
        with self.lock:
            self.rows.append((kind, r.status_code, seconds, len(r.content)))
            self.limit_503 += shed
            if r.status_code >= 500 and not shed and len(self.unexpected) < 10:
                self.unexpected.append(f"{kind} {r.request.method} {r.request.url.path}: {r.status_code} {r.text[:300]}")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def ms(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(1000 * pct(values, 0.50), 1), "p99_ms": round(1000 * pct(values, 0.99), 1)}


class Service:
    """redis-server + worker + API (+ the plain file app) in a temporary CBD_HOME."""

    def __init__(self, tmp: Path, limit_concurrency: int, sync_wait_s: float) -> None:
        from random_chain import build_random_chain

        self.tmp = tmp
        self.env = {"CBD_HOME": str(tmp / "home"), "CBD_CHAINS": str(tmp / "chains"),
                    "CBD_ARTIFACTS": str(tmp / "artifacts"), "CBD_DEFAULT_CHAIN": "load"}
        build_random_chain(tmp / "chains", "load")  # this process's own environment stays as it is
        (tmp / "redis").mkdir()
        (tmp / "logs").mkdir()
        self.redis = RedisServer(tmp / "redis")
        self.redis.start()
        self.kids = Children(tmp / "logs")
        url = self.redis.url + "/0"
        self.kids.worker(url, **self.env)
        self.base, self.api = self.kids.api(url, limit_concurrency=limit_concurrency,
                                            CBD_SYNC_WAIT_S=str(sync_wait_s), **self.env)

    def start_plain(self, root: Path) -> tuple[str, int]:
        port = free_port()
        env = dict(os.environ, PLAIN_ROOT=str(root))
        proc = self.kids.start("plain", [sys.executable, "-c", PLAIN_APP, str(port)], env)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(base + "/files/config.json", timeout=2)
                return base, proc.pid
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("the plain Starlette app did not start")

    def stop(self) -> None:
        self.kids.stop()
        self.redis.stop()


def seed(c: httpx.Client, n: int = 3) -> list[dict]:
    """A few finished checkpoints to download and to ask for again."""
    from conftest_service import arch, wait_job

    out = []
    for layers, heads in [(2, 2), (3, 3), (2, 4)][:n]:
        request = {"architecture": arch(layers, heads)}
        r = c.post("/initialize", json=request)
        body = r.json() if r.status_code == 200 else wait_job(c, r.headers["location"], timeout=300)
        assert body["status"] == "finished", body
        out.append(body | {"request": request})
    return out


def mixed(base: str, existing: list[dict], seconds: float, clients: int, tally: Tally, jobs: list[str]) -> None:
    """``clients`` threads, each a keep-alive connection, drawing requests from MIX until time is up."""
    from conftest_service import arch

    stop = time.monotonic() + seconds
    alphas = itertools.count(1)
    kinds, weights = zip(*MIX, strict=True)

    def client(seed_: int) -> None:
        rng = random.Random(seed_)
        # Client 0 starts with one request of each kind, in MIX order, each retried while shed (503),
        # so that every kind is answered at least once however few requests a loaded machine gets through.
        first = list(kinds) if seed_ == 0 else []
        unanswered = set(first)
        with httpx.Client(base_url=base, timeout=60) as c:
            while time.monotonic() < stop:
                asked = first.pop(0) if first else rng.choices(kinds, weights)[0]
                ck = rng.choice(existing)
                link = ck["files"][rng.choice(["model.safetensors", "config.json", "tokenizer.json"])]
                t0 = time.perf_counter()
                try:
                    kind, r = one(c, rng, asked, ck, link)
                except httpx.HTTPError as exc:  # no response at all: counted, never silently dropped
                    tally.error(asked, exc)
                    continue
                tally.add(kind, r, time.perf_counter() - t0)
                if r.status_code == 503:
                    time.sleep(0.05)  # as a client honouring the shedding would
                    if asked in unanswered:
                        first.insert(0, asked)
                else:
                    unanswered.discard(asked)
        with tally.lock:
            tally.clients_done += 1

    def one(c: httpx.Client, rng: random.Random, kind: str, ck: dict, link: dict) -> tuple[str, httpx.Response]:
        if kind == "download":
            return kind, c.get(link["url"])
        if kind == "download_conditional":
            headers = rng.choice([{"Range": "bytes=0-7"}, {"If-None-Match": f'"{link["sha256"]}"'}])
            return kind, c.get(link["url"], headers=headers)
        if kind == "post_existing":
            return kind, c.post("/initialize", json=ck["request"])
        if kind == "post_new":
            alpha = round(next(alphas) * 1e-4, 4) % 1  # a new plan each time
            r = c.post("/initialize", json={"architecture": arch(3, 3), "alpha": alpha})
            if r.status_code in (200, 202):
                jobs.append(r.json()["id"])
            return kind, r
        if kind == "poll" and jobs:
            return kind, c.get(f"/jobs/{rng.choice(jobs)}")
        return "health", c.get(rng.choice(["/healthz", "/chains", "/metrics"]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def sample_rss(pid: int, tally: Tally, stop: threading.Event, out: list[tuple[int, float]]) -> None:
    proc = psutil.Process(pid)
    while not stop.wait(1.0):
        with tally.lock:
            n = len(tally.rows)
        out.append((n, proc.memory_info().rss / 2**20))


def quiet_post_existing(base: str, existing: list[dict], n: int = 300) -> dict[str, float]:
    times = []
    with httpx.Client(base_url=base, timeout=30) as c:
        for i in range(n):
            t0 = time.perf_counter()
            r = c.post("/initialize", json=existing[i % len(existing)]["request"])
            times.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    return ms(times)


def throughput(url: str, seconds: float, clients: int, pid: int) -> dict[str, float]:
    """Whole-file downloads of ``url`` by ``clients`` keep-alive threads: MB/s, requests/s and the
    server process's CPU time per request (steadier than MB/s when the machine is shared)."""
    server = psutil.Process(pid)
    cpu0 = sum(server.cpu_times()[:2])
    total, count, lock = [0], [0], threading.Lock()
    stop = time.monotonic() + seconds

    def run() -> None:
        with httpx.Client(timeout=30) as c:
            while time.monotonic() < stop:
                n = len(c.get(url).content)
                with lock:
                    total[0] += n
                    count[0] += 1

    threads = [threading.Thread(target=run) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    cpu_ms = 1000 * (sum(server.cpu_times()[:2]) - cpu0) / max(1, count[0])
    return {"MB_per_s": round(total[0] / elapsed / 1e6, 1), "requests_per_s": round(count[0] / elapsed, 1),
            "server_cpu_ms_per_request": round(cpu_ms, 2)}


def settle(base: str, jobs: list[str], root: Path, timeout: float = 300) -> dict[str, int]:
    """Every job a POST created ends finished with files matching artifact.json; else it counts as lost."""
    from cbd.core import artifacts

    ends: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base, timeout=30) as c:
        for jid in dict.fromkeys(jobs):
            while True:
                body = c.get(f"/jobs/{jid}").json()
                if body.get("status") in ("finished", "failed") or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            ok = body.get("status") == "finished"
            if ok:
                info = artifacts.load_artifact(jid, root)
                data = c.get(body["files"]["model.safetensors"]["url"]).content
                ok = info is not None and hashlib.sha256(data).hexdigest() == info.files["model.safetensors"].sha256
            ends["finished_verified" if ok else f"lost ({body.get('status')})"] += 1
    return dict(ends)


def rss_slope(rss: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of (requests so far, RSS MiB) samples, in MiB per 1000 requests."""
    if len(rss) < 3:
        return None
    xs, ys = [float(n) for n, _ in rss], [m for _, m in rss]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return round(1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var, 3) if var else 0.0


def compare_downloads(svc: Service, ck: dict, seconds: float, clients: int, rounds: int = 4) -> dict:
    """Whole-file downloads of ``ck``'s model.safetensors through the API and from a plain Starlette
    ``FileResponse`` app of the same folder, in ``rounds`` alternated rounds (so that other load on the
    machine hits both alike): the median of each number over the rounds."""
    weights = ck["files"]["model.safetensors"]
    plain, plain_pid = svc.start_plain(Path(svc.env["CBD_ARTIFACTS"]) / ck["id"])
    got: dict[str, list[dict]] = {"cbd_api": [], "plain_starlette_FileResponse": []}
    for _ in range(rounds):
        got["cbd_api"].append(throughput(weights["url"], seconds / rounds, clients, svc.api.pid))
        got["plain_starlette_FileResponse"].append(
            throughput(f"{plain}/files/model.safetensors", seconds / rounds, clients, plain_pid))
    return {"file_bytes": weights["size"], "clients": clients, "rounds": rounds} | {
        name: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]} for name, rs in got.items()}


def summarize(tally: Tally, rss: list[tuple[int, float]], seconds: float) -> dict:
    by_kind: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, Counter] = defaultdict(Counter)
    for kind, status, sec, _ in tally.rows:
        statuses[kind][status] += 1
        if status < 500:
            by_kind[kind].append(sec)
    all_ok = [sec for _, status, sec, _ in tally.rows if status < 500]
    unexpected = sum(1 for _, s, _, _ in tally.rows if s >= 500) - tally.limit_503
    slope = rss_slope(rss)
    return {
        "requests": len(tally.rows), "seconds": seconds, "requests_per_s": round(len(tally.rows) / seconds, 1),
        "errors": list(tally.errors), "clients_done": tally.clients_done,
        "statuses": {k: dict(sorted(v.items())) for k, v in sorted(statuses.items())},
        "deliberate_503": tally.limit_503, "unexpected_5xx": unexpected, "unexpected_examples": tally.unexpected,
        "latency_all": ms(all_ok), "latency": {k: ms(v) for k, v in sorted(by_kind.items())},
        "rss_mib": {"after_warmup": round(rss[0][1], 1) if rss else None, "end": round(rss[-1][1], 1) if rss else None,
                    "max": round(max(m for _, m in rss), 1) if rss else None, "slope_per_1000_requests": slope,
                    "samples": len(rss), "by_fifth": [(n, round(m, 1)) for n, m in rss[::max(1, len(rss) // 5)]]},
    }


def run(seconds: float = 120, clients: int = 24, limit_concurrency: int = 16, sync_wait_s: float = 5,
        throughput_s: float = 8, warmup_s: float = 5, quiet_posts: int = 300) -> dict:
    with tempfile.TemporaryDirectory(prefix="cbd-load-") as tmp:
        svc = Service(Path(tmp), limit_concurrency, sync_wait_s)
        try:
            with httpx.Client(base_url=svc.base, timeout=300) as c:
                existing = seed(c)
            tally, jobs, rss, stop = Tally(), [], [], threading.Event()
            mixed(svc.base, existing, warmup_s, clients, Tally(), jobs)  # warm-up, not counted
            sampler = threading.Thread(target=sample_rss, args=(svc.api.pid, tally, stop, rss))
            sampler.start()
            t0 = time.monotonic()
            mixed(svc.base, existing, seconds, clients, tally, jobs)
            elapsed = time.monotonic() - t0
            stop.set()
            sampler.join()
            result = summarize(tally, rss, elapsed)
            result["config"] = {"clients": clients, "limit_concurrency": limit_concurrency,
                                "sync_wait_s": sync_wait_s, "workers": 1, "mix": dict(MIX)}
            result["new_jobs"] = settle(svc.base, jobs, Path(svc.env["CBD_ARTIFACTS"]))
            result["post_existing_quiet"] = quiet_post_existing(svc.base, existing, quiet_posts)
            result["download_throughput"] = compare_downloads(svc, existing[1], throughput_s,
                                                              max(1, min(4, limit_concurrency // 2)))
            result["ok"] = (result["unexpected_5xx"] == 0 and not result["errors"] and result["clients_done"] == clients
                            and set(result["new_jobs"]) <= {"finished_verified"})
            return result
        finally:
            svc.stop()


def report(r: dict) -> str:
    lines = [f"{r['requests']} requests in {r['seconds']:.0f} s ({r['requests_per_s']}/s), "
             f"{r['config']['clients']} clients, --limit-concurrency {r['config']['limit_concurrency']}",
             f"unexpected 5xx: {r['unexpected_5xx']}   deliberate 503 (limit-concurrency): {r['deliberate_503']}   "
             f"no response: {len(r['errors'])}   clients that ran to the end: {r['clients_done']}",
             *(f"  ! {line}" for line in r["errors"][:10]),
             *(f"  ! {line}" for line in r["unexpected_examples"]),
             f"latency all non-5xx: p50 {r['latency_all']['p50_ms']} ms, p99 {r['latency_all']['p99_ms']} ms"]
    for kind, lat in r["latency"].items():
        lines.append(f"  {kind:22s} p50 {lat['p50_ms']:8.1f} ms  p99 {lat['p99_ms']:8.1f} ms  statuses {r['statuses'][kind]}")
    m = r["rss_mib"]
    lines += [f"API RSS: {m['after_warmup']} MiB after warm-up -> {m['end']} MiB at the end (max {m['max']}); "
              f"slope {m['slope_per_1000_requests']} MiB per 1000 requests; (requests, MiB) {m['by_fifth']}",
              f"new interpolation jobs: {r['new_jobs']}",
              f"POST /initialize, existing checkpoint, 1 quiet client: p50 {r['post_existing_quiet']['p50_ms']} ms, "
              f"p99 {r['post_existing_quiet']['p99_ms']} ms"]
    t = r["download_throughput"]
    lines.append(f"download {t['file_bytes']} B x {t['clients']} clients (median of {t['rounds']} alternated rounds): "
                 f"cbd {t['cbd_api']} vs plain Starlette FileResponse {t['plain_starlette_FileResponse']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--limit-concurrency", type=int, default=16)
    parser.add_argument("--sync-wait", type=float, default=5, help="CBD_SYNC_WAIT_S of the API")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.clients, args.limit_concurrency, args.sync_wait)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
