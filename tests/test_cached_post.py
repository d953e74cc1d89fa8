"""A very short run of bench/cached_post.py: the benchmark runs and measures what it says.

Properties only, none of them a speed (a shared machine's numbers are for the full run on a quiet
one): the bare FastAPI app answered the API's exact bytes (the script asserts it), every POST to
either got 200 with those bytes, the memory phase sent exactly ``requests`` POSTs and sampled the
API's RSS, and every target has a reading.
"""

from __future__ import annotations

import sys

from conftest_service import REPO

# Imported by its own name from bench/ (not from a file location): the client processes it spawns
# import its functions by that name, and a spawned process gets this sys.path.
sys.path.insert(0, str(REPO / "bench"))
import cached_post  # noqa: E402


def test_short_cached_post_run():
    r = cached_post.run(requests=200, seconds=1, latency_requests=40, clients=8, client_procs=1, rounds=2,
                        download_seconds=1, download_clients=2, warmup=10)
    print(cached_post.report(r))
    assert r["ok"] and r["errors"] == 0, r["error_examples"]
    assert all(v["requests"] == 40 and v["bad"] == 0 for v in r["one_client"].values()), r["one_client"]
    assert all(v["requests"] > 0 and v["bad"] == 0 for v in r["concurrent"].values()), r["concurrent"]
    assert r["memory"]["requests"] == 200 and r["memory"]["complete"] and r["memory"]["samples"] == 101, r["memory"]
    assert set(r["api_rss_mib"]) == {"start", "after_warmup", "before_memory_phase", "end"}
    assert r["download_throughput"]["cbd_api"]["requests_per_s"] > 0
    assert all("met" in v for v in r["targets"].values()), r["targets"]
