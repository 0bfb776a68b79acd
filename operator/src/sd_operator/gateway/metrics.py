"""Gateway metrics: queue depth per model, wait and service time, backend states, cache hits, errors."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from sd_operator.gateway.cache import ResultCache
    from sd_operator.gateway.dispatch import Dispatcher

# Its own registry: the gateway's /metrics shows only gateway metrics, also when embedded in tests.
REGISTRY = CollectorRegistry()
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

requests = Counter(
    "sd_gateway_requests_total", "HTTP requests by route and status", ["route", "code"], registry=REGISTRY
)
request_seconds = Histogram(
    "sd_gateway_request_seconds", "Time to answer a request", ["route"], buckets=SECONDS, registry=REGISTRY
)
wait_seconds = Histogram(
    "sd_gateway_queue_wait_seconds",
    "Time a generation waited for an idle instance",
    ["model"],
    buckets=SECONDS,
    registry=REGISTRY,
)
service_seconds = Histogram(
    "sd_gateway_service_seconds", "Time an instance took to render", ["model"], buckets=SECONDS, registry=REGISTRY
)
queue_depth = Gauge("sd_gateway_queue_depth", "Generations waiting for an idle instance", ["model"], registry=REGISTRY)
backends = Gauge("sd_gateway_backends", "Instances by state", ["model", "state"], registry=REGISTRY)
demand = Gauge(
    "sd_gateway_demand",
    "Generations waiting or rendering: what autoscaling follows (sum over gateway replicas)",
    ["model"],
    registry=REGISTRY,
)
running = Gauge("sd_gateway_running", "Generations rendering on an instance", ["model"], registry=REGISTRY)
oldest_wait = Gauge(
    "sd_gateway_oldest_wait_seconds", "Age of the longest-waiting generation", ["model"], registry=REGISTRY
)
cache = Counter("sd_gateway_cache_total", "Result cache lookups", ["result"], registry=REGISTRY)
errors = Counter("sd_gateway_errors_total", "Errors by kind", ["kind"], registry=REGISTRY)
ejections = Counter(
    "sd_gateway_backend_ejections_total", "Instances taken out after failures", ["model"], registry=REGISTRY
)

# Kubernetes discovery's view of the API server; registered by track_discovery (a gateway with a static
# backends file has no discovery to report on).
discovery_up = Gauge(
    "sd_gateway_discovery_up",
    "1 while Kubernetes discovery watches the API server; 0 while it cannot (the last known backends are served)",
    registry=None,
)
discovery_stale_seconds = Gauge(
    "sd_gateway_discovery_stale_seconds",
    "Seconds since Kubernetes discovery last reached the API server (0 while it does)",
    registry=None,
)


def track_discovery(up: Callable[[], bool], stale_seconds: Callable[[], float]) -> None:
    """Reports a discovery's state at scrape time (the gauges read the two functions)."""
    discovery_up.set_function(lambda: 1.0 if up() else 0.0)
    discovery_stale_seconds.set_function(stale_seconds)
    for gauge in (discovery_up, discovery_stale_seconds):
        with contextlib.suppress(ValueError):  # registered by an earlier discovery in this process
            REGISTRY.register(gauge)


@functools.lru_cache(maxsize=4096)
def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, remembered: the lookup validates and locks on every call, which the request
    path pays several times per request. Only for counters and histograms (gauges here are cleared and
    rebuilt at scrape time, which would leave remembered children stale)."""
    return metric.labels(*labels)


def refresh_gauges(dispatcher: Dispatcher, result_cache: ResultCache) -> None:
    """Gauges are read at scrape time from the dispatcher's own state (no bookkeeping on the hot path)."""
    for gauge in (queue_depth, backends, demand, running, oldest_wait):
        gauge.clear()
    held = dispatcher.demand()
    # Every model with backends or demand: a model at zero has waiting requests and no backends.
    for model in sorted(set(dispatcher.models()) | set(held)):
        queue_depth.labels(model).set(dispatcher.queue_depth(model))
        now = held.get(model) or {}
        demand.labels(model).set(now.get("queued", 0) + now.get("running", 0))
        running.labels(model).set(now.get("running", 0))
        oldest_wait.labels(model).set(now.get("oldestWaitSeconds", 0.0))
        counts = {"idle": 0, "busy": 0, "ejected": 0}
        for b in dispatcher.backends.get(model, []):
            counts[b.state] += 1
        for state, n in counts.items():
            backends.labels(model, state).set(n)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
