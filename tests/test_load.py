"""A short, bounded run of bench/load.py: mixed traffic through uvicorn --limit-concurrency.

20 seconds of downloads, POSTs of existing and new checkpoints and polls from more clients than
the concurrency limit. Properties only, none of them a speed: every request got a response (no
transport error, every client thread ran to the end), every kind of request was made, no 5xx
but uvicorn's deliberate 503s, every new job finished and verified, the API's RSS flat. How many
requests a shared machine gets through is a number for bench/load.py to report (its two-minute
run is in docs/reliability.md), not a floor to assert.
"""

from __future__ import annotations

import importlib.util
import sys

from conftest_service import REPO

spec = importlib.util.spec_from_file_location("cbd_bench_load", REPO / "bench" / "load.py")
load = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = load  # its dataclasses look their module up
spec.loader.exec_module(load)


def test_twenty_seconds_of_mixed_traffic():
    r = load.run(seconds=20, clients=12, limit_concurrency=8, throughput_s=3, warmup_s=3, quiet_posts=100)
    print(load.report(r))
    assert r["errors"] == [] and r["clients_done"] == 12, (r["errors"], r["clients_done"])  # every request completed
    assert r["unexpected_5xx"] == 0, r["statuses"]
    assert set(r["statuses"]) == {kind for kind, _ in load.MIX}, r["statuses"]  # client 0 makes one of each first
    assert all(set(codes) - {503} for codes in r["statuses"].values()), r["statuses"]  # ... until it is answered
    assert set(r["new_jobs"]) == {"finished_verified"}, r["new_jobs"]
    assert r["statuses"]["post_existing"].keys() <= {200, 503}
    rss = r["rss_mib"]
    assert rss["end"] - rss["after_warmup"] < 20, rss  # MiB: flat, allowing for allocator noise
    assert r["download_throughput"]["cbd_api"]["requests_per_s"] > 0  # the throughput phase downloaded something
