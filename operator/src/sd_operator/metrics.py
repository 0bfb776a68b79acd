"""Prometheus metrics that mirror controller-runtime's names, so existing dashboards and alerts apply."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import kopf
from prometheus_client import Counter, Gauge, Histogram

RECONCILE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
    1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5, 6, 7, 8, 9, 10, 15, 20, 25, 30, 40, 50, 60,
)  # fmt: skip
RESULTS = ("success", "error", "requeue", "requeue_after")

reconcile_total = Counter(
    "controller_runtime_reconcile_total", "Total number of reconciliations per controller", ["controller", "result"]
)
reconcile_errors = Counter(
    "controller_runtime_reconcile_errors_total", "Total number of reconciliation errors per controller", ["controller"]
)
terminal_errors = Counter(
    "controller_runtime_terminal_reconcile_errors_total",
    "Total number of terminal reconciliation errors per controller",
    ["controller"],
)
reconcile_time = Histogram(
    "controller_runtime_reconcile_time_seconds",
    "Length of time per reconciliation per controller",
    ["controller"],
    buckets=RECONCILE_BUCKETS,
)
active_workers = Gauge(
    "controller_runtime_active_workers", "Number of currently used workers per controller", ["controller"]
)

F = TypeVar("F", bound=Callable[..., Any])


def instrumented(controller: str) -> Callable[[F], F]:
    """Counts and times a kopf handler the way controller-runtime counts a Reconcile."""
    for result in RESULTS:
        reconcile_total.labels(controller, result)
    reconcile_errors.labels(controller)
    terminal_errors.labels(controller)

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            active_workers.labels(controller).inc()
            try:
                result = fn(*args, **kwargs)
            except kopf.TemporaryError as e:
                outcome = "requeue_after" if e.delay else "error"
                if outcome == "error":
                    reconcile_errors.labels(controller).inc()
                reconcile_total.labels(controller, outcome).inc()
                raise
            except kopf.PermanentError:
                reconcile_total.labels(controller, "error").inc()
                reconcile_errors.labels(controller).inc()
                terminal_errors.labels(controller).inc()
                raise
            except Exception:
                reconcile_total.labels(controller, "error").inc()
                reconcile_errors.labels(controller).inc()
                raise
            else:
                reconcile_total.labels(controller, "success").inc()
                return result
            finally:
                active_workers.labels(controller).dec()
                reconcile_time.labels(controller).observe(time.perf_counter() - start)

        return wrapper  # type: ignore[return-value]

    return decorate
