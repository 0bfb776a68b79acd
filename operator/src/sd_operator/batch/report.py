"""Progress: counters, the status body, how often it is published, and where (the CR, a file, nowhere).

The status is patched at a bounded rate, never per item: a 100,000-item batch must not turn into
100,000 writes to the API server. The runner never writes phase or conditions: the controller owns them.
When the API server (or etcd behind it) is away, the work goes on and publishing retries with a capped
backoff: one warning when it starts failing, one line when it works again (Publisher).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sd_operator.api.generationbatch import MAX_FAILURES_IN_STATUS

Clock = Callable[[], float]
Snapshot = Callable[[], tuple[dict[str, Any], dict[str, Any]]]  # (status, runner) as of now
log = logging.getLogger("sd_operator.batch")

# A failed publish is tried again after 1 s, 2 s, 4 s, ... at most PUBLISH_RETRY_CAP: soon after an
# outage ends the status catches up, and a long outage costs one request every 10 s.
PUBLISH_RETRY_FIRST = 1.0
PUBLISH_RETRY_CAP = 10.0
# One status patch may take this long: with etcd down the API server accepts the connection and then
# answers nothing for a minute; the progress loop must not wait on it for longer.
PUBLISH_TIMEOUT = 10.0


@dataclass
class Counters:
    total: int
    succeeded: int = 0  # including items found done when the run started
    failed: int = 0
    running: int = 0
    already_done: int = 0
    images: int = 0  # written by this run
    max_in_flight: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed

    def fail(self, index: int, reason: str) -> None:
        self.failed += 1
        if len(self.failures) < MAX_FAILURES_IN_STATUS:  # the first ones: the usual cause shows up early
            self.failures.append({"index": index, "reason": reason[:500]})


def status(c: Counters, location: str) -> dict[str, Any]:
    """The fields of GenerationBatch.status the runner owns."""
    return {
        "total": c.total,
        "succeeded": c.succeeded,
        "failed": c.failed,
        "running": c.running,
        "progress": f"{c.succeeded}/{c.total}",
        "failures": sorted(c.failures, key=lambda f: f["index"]),  # the first 20 to fail, in index order
        "outputLocation": location,
    }


class RateLimit:
    """Due every `interval` seconds, or when another `fraction` of the total finished, but never twice
    within `min_gap` seconds (a fast batch would otherwise report 1% steps many times a second)."""

    def __init__(
        self,
        total: int,
        *,
        interval: float = 2.0,
        fraction: float = 0.01,
        min_gap: float = 0.5,
        clock: Clock = time.monotonic,
    ) -> None:
        self.step = max(1, math.ceil(total * fraction))
        self.interval, self.min_gap, self.clock = interval, min_gap, clock
        self.last_time = -math.inf
        self.last_done = 0

    def due(self, done: int) -> bool:
        elapsed = self.clock() - self.last_time
        if elapsed < self.min_gap:
            return False
        return elapsed >= self.interval or done - self.last_done >= self.step

    def mark(self, done: int) -> None:
        self.last_time, self.last_done = self.clock(), done


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(name: str, c: Counters, elapsed: float) -> str:
    """`batch ns/name: 340/1000 done, 2 failed, 4 in flight, 3.1 images/s, eta 3m20s`"""
    rate = c.images / elapsed if elapsed > 0 else 0.0
    items_rate = (c.finished - c.already_done) / elapsed if elapsed > 0 else 0.0
    left = c.total - c.finished
    eta = format_duration(left / items_rate) if items_rate > 0 else "unknown" if left else "0s"
    return (
        f"batch {name}: {c.succeeded}/{c.total} done, {c.failed} failed, {c.running} in flight, "
        f"{rate:.1f} images/s, eta {eta}"
    )


class Reporter(Protocol):
    """Publishes a status; blocking (the runner calls it in a thread)."""

    def publish(self, status: dict[str, Any], runner: dict[str, Any]) -> None: ...


class NoReporter:
    def publish(self, status: dict[str, Any], runner: dict[str, Any]) -> None:
        return None


class FileReporter:
    """`{"status": {...}, "runner": {...}}` written atomically; `runner` has figures the CRD has no field for
    (the most items in flight at once, images this run), for tests and local runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def publish(self, status: dict[str, Any], runner: dict[str, Any]) -> None:
        temp = self.path.with_name(f".{self.path.name}.tmp")
        temp.write_text(json.dumps({"status": status, "runner": runner}, indent=2))
        os.replace(temp, self.path)


class KubeReporter:
    """A merge patch of the GenerationBatch's status subresource (in-cluster config, or KUBECONFIG)."""

    def __init__(self, api_version: str, namespace: str, name: str) -> None:
        self.api_version, self.namespace, self.name = api_version, namespace, name

    def publish(self, status: dict[str, Any], runner: dict[str, Any]) -> None:
        from sd_operator import kube

        if not str(status.get("outputLocation", "")).startswith("s3://"):
            # A path inside the pod means nothing to a reader: the controller writes pvc://ns/claim/path.
            status = {k: v for k, v in status.items() if k != "outputLocation"}
        kube.patch_status(
            self.api_version, "GenerationBatch", self.namespace, self.name, status, timeout=PUBLISH_TIMEOUT
        )


class Publisher:
    """Publishes progress through a Reporter and rides out an outage of where it goes (an API server
    upgrade, an etcd outage) without ever holding up the work.

    Every attempt sends the counts of that moment (a snapshot taken when it is sent, never an older body
    resent), one attempt at a time: a newer status never lands before an older one. After a failure the
    next attempt waits PUBLISH_RETRY_FIRST, doubling up to PUBLISH_RETRY_CAP; attempts asked for meanwhile
    are skipped (the next one carries their counts). One warning when publishing starts failing, one info
    line when it works again, saying for how long it did not."""

    def __init__(
        self,
        reporter: Reporter,
        name: str,
        *,
        first: float = PUBLISH_RETRY_FIRST,
        cap: float = PUBLISH_RETRY_CAP,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.reporter, self.name = reporter, name
        self.first, self.cap, self.clock, self.sleep = first, cap, clock, sleep
        self.failing_since: float | None = None
        self.failures = 0  # consecutive failed attempts
        self.next_attempt = -math.inf
        self.published = 0  # successful attempts
        self._lock = asyncio.Lock()

    def due(self) -> bool:
        """Not waiting out the backoff of a failure."""
        return self.clock() >= self.next_attempt

    def retry_delay(self) -> float:
        return min(self.cap, self.first * 2 ** max(0, self.failures - 1))

    def attempt(self, status: dict[str, Any], runner: dict[str, Any]) -> bool:
        """One publish (blocking); True when it went through."""
        try:
            self.reporter.publish(status, runner)
        except Exception as e:  # progress is best effort: the work and its files are what counts
            self.failed(e)
            return False
        self.succeeded()
        return True

    def failed(self, error: BaseException) -> None:
        now = self.clock()
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = now
            log.warning(
                "batch %s: could not publish progress: %s; will retry, the work goes on", self.name, _one_line(error)
            )
        self.next_attempt = now + self.retry_delay()

    def succeeded(self) -> None:
        self.published += 1
        if self.failing_since is not None:
            log.info(
                "batch %s: progress published again after %s (%d failed attempts)",
                self.name, format_duration(self.clock() - self.failing_since), self.failures,
            )  # fmt: skip
        self.failing_since, self.failures, self.next_attempt = None, 0, -math.inf

    async def publish(self, snapshot: Snapshot) -> bool:
        """One attempt, unless a failure's backoff is not over (then False at once)."""
        async with self._lock:
            if not self.due():
                return False
            return await asyncio.to_thread(self.attempt, *snapshot())

    async def publish_final(self, snapshot: Snapshot, within: float) -> bool:
        """The last counts of a run: tried until they go through or `within` seconds pass (False then).
        Not asyncio.timeout: an attempt under way is let finish (it has its own request timeout)."""
        deadline = self.clock() + within
        async with self._lock:
            while True:
                if await asyncio.to_thread(self.attempt, *snapshot()):
                    return True
                left = deadline - self.clock()
                if left <= 0:
                    return False
                await self.sleep(min(self.retry_delay(), left))


def _one_line(error: BaseException) -> str:
    """An exception as one short line: the client's ApiException spans several lines, with the response's
    headers and body, of which the status says enough."""
    status, reason = getattr(error, "status", None), getattr(error, "reason", None)
    if isinstance(status, int) and status:
        return f"HTTP {status} {reason or ''}".rstrip()
    if isinstance(reason, BaseException):  # urllib3's MaxRetryError: what the last attempt met says it
        error = reason
    text = f"{error.__class__.__name__}: {' '.join(str(error).split())}".rstrip(": ")
    return text if len(text) <= 300 else text[:297] + "..."
