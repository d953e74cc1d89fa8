"""The longer fault soak: tests/test_faults.py with more kills and more Redis restarts, summarised.

CI runs that module with 3 worker kills that are retried (mid-interpolation, and again for bridge
jobs, alternately mid-run and mid-write), one job of each killed on every try and one Redis
restart per signal. This runs the same code with ``--kills`` (default 10) and ``--restarts`` per
signal (default 5), collects what each fault cost (tests/test_faults.py writes one JSON line per
event to CBD_FAULT_REPORT) and prints the table in docs/reliability.md. ``-k`` selects tests as
pytest's ``-k`` does (faults whose tests did not run get no row).

    nice -n 15 .venv/bin/python bench/soak.py --kills 10 --restarts 5
    nice -n 15 .venv/bin/python bench/soak.py --kills 10 -k mid_bridge    # the bridge kills alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


def summarize(events: list[dict]) -> str:
    by = lambda name: [e for e in events if e["event"] == name]  # noqa: E731
    rows = [
        "| fault | count | outcome | seconds (min / median / max) |",
        "|---|---|---|---|",
    ]
    ends = by("job_end")
    retried = [e for e in ends if e["kills"] == 1]
    exhausted = [e for e in ends if e["kills"] > 1]
    if ends:
        rows += [
            f"| worker SIGKILL mid-write, job retried | {len(retried)} | "
            f"{dict(Counter(e['status'] for e in retried))} | kill to finished: "
            f"{spread([e['recovered_s'] for e in retried])} |",
            f"| worker SIGKILL on every try (3) | {len(exhausted)} jobs, {sum(e['kills'] for e in exhausted)} kills | "
            f"{dict(Counter(e['status'] for e in exhausted))} (AbandonedJobError) | last kill to failed: "
            f"{spread([e['recovered_s'] for e in exhausted])} |",
            f"| orphaned staging folders | {len(by('worker_kill'))} | all removed by the next worker | "
            f"kill to removed: {spread([e['orphan_removed_s'] for e in by('worker_kill')])} |",
        ]
    rows += bridge_rows(by("bridge_job_end"), by("bridge_kill"))
    if by("slow_job_kill"):
        rows.append(f"| slow-queue job (chain build) SIGKILL mid-write | {len(by('slow_job_kill'))} | "
                    f"{dict(Counter(e['status'] for e in by('slow_job_kill')))} | kill to finished: "
                    f"{spread([e['recovered_s'] for e in by('slow_job_kill')])} |")
    restarts = by("redis_restart")
    for sig in ("SIGTERM", "SIGKILL"):
        rs = [e for e in restarts if e["signal"] == sig]
        if not rs:
            continue
        statuses = {}
        for e in rs:
            for k, v in e["statuses_while_down"].items():
                statuses.setdefault(k, set()).update(v)
        rows.append(f"| Redis {sig} + restart, 5 jobs queued/running each | {len(rs)} | "
                    f"{sum(e['finished'] for e in rs)}/{sum(e['jobs'] for e in rs)} jobs finished; "
                    f"{sum(e['requests_while_down'] for e in rs)} requests while down: "
                    f"{ {k: sorted(v) for k, v in statuses.items()} } | restart to all finished: "
                    f"{spread([e['all_done_s'] for e in rs])} |")
    for e in by("store_full"):
        rows.append(f"| artifact store full (tmpfs) | 1 | POST {e['post_status']}, /healthz {e['healthz_when_full']}, "
                    f"after freeing space POST {e['after_freeing']} | - |")
    for name, what in (("watcher", "interpolation"), ("bridge_watcher", "bridge")):
        for e in by(name):
            rows.append(f"| downloads during the {what} kills, sha256 checked | {e['downloads_verified']} | "
                        f"{e['bad']} mismatched, {e['not_yet_published']} answered 404 before publication | - |")
    return "\n".join(rows)


def bridge_rows(ends: list[dict], kills: list[dict]) -> list[str]:
    """Rows for bridge jobs killed mid-run (training) or mid-write (tests/test_faults.py)."""
    if not ends:
        return []
    phases = {}
    for e in kills:
        phases.setdefault(e["job"], []).append(e["phase"])
    retried = [e for e in ends if e["kills"] == 1]
    exhausted = [e for e in ends if e["kills"] > 1]
    once = Counter(phases[e["job"]][0] for e in retried)
    orphans = [e for e in kills if e["orphan"]]
    return [
        f"| worker SIGKILL mid-bridge, job retried | {len(retried)} ({once['train']} mid-run, {once['write']} "
        f"mid-write) | {dict(Counter(e['status'] for e in retried))} | kill to finished: "
        f"{spread([e['recovered_s'] for e in retried])}; whole job {spread([e['job_s'] for e in retried])} |",
        f"| bridge job SIGKILLed on every try (3) | {len(exhausted)} jobs, {sum(e['kills'] for e in exhausted)} kills "
        f"({', '.join('/'.join(phases[e['job']]) for e in exhausted)}) | "
        f"{dict(Counter(e['status'] for e in exhausted))} (AbandonedJobError) | last kill to failed: "
        f"{spread([e['recovered_s'] for e in exhausted])} |",
        f"| orphaned staging folders (bridge kills mid-write) | {len(orphans)} of {len(kills)} kills | "
        f"all removed by the next worker | kill to removed: {spread([e['orphan_removed_s'] for e in orphans])} |",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="jobs killed once each (plus one killed 3 times)")
    parser.add_argument("--restarts", type=int, default=5, help="Redis restarts per signal")
    parser.add_argument("--report", type=Path, help="keep the JSON lines here")
    parser.add_argument("-k", dest="select", help="run only the tests pytest -k selects (e.g. mid_bridge)")
    args = parser.parse_args(argv)
    report = args.report or Path(tempfile.mkstemp(prefix="cbd-soak-", suffix=".jsonl")[1])
    report.write_text("")
    env = dict(os.environ, CBD_FAULT_KILLS=str(args.kills), CBD_FAULT_RESTARTS=str(args.restarts),
               CBD_FAULT_REPORT=str(report))
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_faults.py"]
    rc = subprocess.call([*cmd, "-k", args.select] if args.select else cmd, cwd=REPO, env=env)
    events = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    print(f"\npytest exit status {rc}; {time.monotonic() - start:.0f} s; events in {report}\n")
    print(summarize(events))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
