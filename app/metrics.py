"""``GET /metrics``: request counts and latency (prometheus-fastapi-instrumentator) plus the
service's own: cache hits/misses (this process), queue depths and job durations (read from
Redis at scrape time, so every API replica reports what all workers recorded)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from prometheus_fastapi_instrumentator import Instrumentator
from redis import Redis
from redis.exceptions import RedisError

from worker import queue, store_budget


class QueueCollector(Collector):
    def __init__(self, redis: Callable[[], Redis]) -> None:
        self.redis = redis

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("cbd_redis_up", "1 when the scrape could read Redis")
        try:
            depths = queue.queue_depths(self.redis())
            jobs = queue.read_jobs_metrics(self.redis())
        except RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        gauge = GaugeMetricFamily("cbd_queue_jobs", "jobs per queue and state", labels=["queue", "state"])
        for name, states in depths.items():
            for state, n in states.items():
                gauge.add_metric([name, state], n)
        yield gauge
        hist = HistogramMetricFamily("cbd_job_duration_seconds", "job run time", labels=["job"])
        outcomes = CounterMetricFamily("cbd_jobs", "jobs run by the workers", labels=["job", "outcome"])
        for func, fields in sorted(jobs.items()):
            buckets = [(floatToGoString(b), fields.get(f"le:{b}", 0.0)) for b in queue.DURATION_BUCKETS]
            hist.add_metric([func], buckets, sum_value=fields.get("sum", 0.0))
            for outcome in ("ok", "failed"):
                outcomes.add_metric([func, outcome], fields.get(outcome, 0.0))
        yield hist
        yield outcomes


class StoreCollector(Collector):
    """The artifact store as its last eviction round left it (``worker.store_budget``: ``.budget.json``)."""

    def collect(self) -> Iterator[Metric]:
        stats = store_budget.read_stats()
        for name, key, help_ in (
                ("cbd_store_bytes", "bytes", "bytes under CBD_ARTIFACTS after the last eviction round"),
                ("cbd_store_checkpoints", "checkpoints", "published checkpoints after the last eviction round"),
                ("cbd_store_max_bytes", "max_bytes", "CBD_STORE_MAX_BYTES in force at the last round (0: no cap)"),
                ("cbd_store_min_free_bytes", "min_free_bytes", "CBD_STORE_MIN_FREE_BYTES at the last round")):
            g = GaugeMetricFamily(name, help_)
            g.add_metric([], stats.get(key, 0.0))
            yield g
        for name, key, help_ in (("cbd_store_evictions", "evictions", "checkpoints evicted (least recently used)"),
                                 ("cbd_store_evicted_bytes", "evicted_bytes", "bytes freed by evictions")):
            c = CounterMetricFamily(name, help_)
            c.add_metric([], stats.get(key, 0.0))
            yield c


class Metrics:
    """One registry per app (tests build many apps in one process)."""

    def __init__(self, app: FastAPI) -> None:
        self.registry = CollectorRegistry()
        self.cache_requests = Counter("cbd_cache_requests", "POST /initialize answered from an existing "
                                      "checkpoint (hit) or needing a job (miss)", ["result"],
                                      registry=self.registry)
        self.refusals = Counter("cbd_admission_refused", "POST /initialize refused by a quota (429) or a queue "
                                "bound (503), by the limit", ["limit"], registry=self.registry)
        self.registry.register(QueueCollector(lambda: app.state.redis))
        self.registry.register(StoreCollector())
        Instrumentator(registry=self.registry, excluded_handlers=["/metrics"]).instrument(app).expose(
            app, endpoint="/metrics", include_in_schema=True, tags=["health"],
            response_class=PlainTextResponse, summary="Prometheus metrics")

    def limits(self, configured: dict[str, object]) -> None:
        """The quotas in force as gauges (0: none); refusals counted by ``refused``."""
        gauge = Gauge("cbd_quota_limit", "configured quotas and bounds (0: none; rate_limit: requests per "
                      "window, its window in the label)", ["limit", "window"], registry=self.registry)
        for name, value in configured.items():
            if name == "rate_limit":
                amount, _, window = str(value or "0").partition("/")
                gauge.labels(name, window.strip() or "-").set(float(amount.split()[0]) if value else 0)
            else:
                gauge.labels(name, "-").set(float(value or 0))

    def refused(self, limit: str) -> None:
        self.refusals.labels(limit).inc()

    def cache(self, *, hit: bool) -> None:
        self.cache_requests.labels("hit" if hit else "miss").inc()
