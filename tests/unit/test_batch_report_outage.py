"""The batch runner's progress publishing through an outage of the API server (report.Publisher).

A fake reporter stands in for the status patch (it fails while `down`); a fake clock makes the backoff
and the durations exact. What reaches the real API server is tested in
tests/integration/test_control_plane_outage.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import pytest
from kubernetes.client.rest import ApiException
from urllib3.exceptions import MaxRetryError, NewConnectionError

from sd_operator.batch.report import Counters, Publisher, _one_line, status


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


class FlakyReporter:
    """Records what it published; raises while `down` (as the client does when the API server is away)."""

    def __init__(self) -> None:
        self.down = False
        self.sent: list[dict[str, Any]] = []
        self.attempts = 0

    def publish(self, status: dict[str, Any], runner: dict[str, Any]) -> None:
        self.attempts += 1
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        self.sent.append(status)


def setup() -> tuple[Clock, FlakyReporter, Publisher, Counters]:
    clock = Clock()
    reporter = FlakyReporter()
    return clock, reporter, Publisher(reporter, "ns/b", clock=clock, sleep=clock.sleep), Counters(total=100)


def snapshot(c: Counters) -> Any:
    return lambda: (status(c, "s3://out/b"), {})


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == "sd_operator.batch"]


def test_an_outage_logs_one_warning_and_one_line_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    clock, reporter, pub, c = setup()
    caplog.set_level(logging.INFO, logger="sd_operator.batch")

    async def scenario() -> None:
        assert await pub.publish(snapshot(c))
        reporter.down = True
        # The runner asks every 2 s (its rate limit) for 65 s; the work goes on meanwhile.
        for _ in range(33):
            c.succeeded += 1
            await pub.publish(snapshot(c))
            clock.now += 2
        reporter.down = False
        c.succeeded += 1
        while not await pub.publish(snapshot(c)):
            clock.now += 2

    asyncio.run(scenario())
    warnings = messages(caplog, logging.WARNING)
    assert warnings == [
        "batch ns/b: could not publish progress: ConnectionRefusedError: [Errno 111] Connection refused; "
        "will retry, the work goes on"
    ]
    (back,) = [m for m in messages(caplog, logging.INFO) if "published again" in m]
    assert back.startswith("batch ns/b: progress published again after 1m0") and "failed attempts" in back
    # The first status after the outage carries the counts of that moment, not those of a failed attempt.
    assert [s["succeeded"] for s in reporter.sent] == [0, 34]


def test_failed_attempts_back_off_doubling_up_to_the_cap() -> None:
    clock, reporter, pub, c = setup()
    reporter.down = True
    attempts_at: list[float] = []

    async def scenario() -> None:
        start = clock.now
        while clock.now - start < 60:
            before = reporter.attempts
            await pub.publish(snapshot(c))
            if reporter.attempts > before:
                attempts_at.append(clock.now - start)
            clock.now += 0.25  # the runner's tick

    asyncio.run(scenario())
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(attempts_at)]
    assert gaps[:4] == [1.0, 2.0, 4.0, 8.0]
    assert set(gaps[4:]) == {10.0}  # capped: one request every 10 s while the API server is away


def test_published_counts_never_go_back() -> None:
    clock, reporter, pub, c = setup()

    async def scenario() -> None:
        for step in range(200):
            reporter.down = 40 <= step < 120 or step % 7 == 3  # an outage, and single failed patches
            c.succeeded = min(c.total, step // 2 + 1)
            await pub.publish(snapshot(c))
            clock.now += 0.5
        reporter.down = False
        assert await pub.publish_final(snapshot(c), 300)

    asyncio.run(scenario())
    sent = [s["succeeded"] for s in reporter.sent]
    assert sent == sorted(sent) and sent[-1] == c.total


def test_the_final_publish_is_retried_until_it_goes_through(caplog: pytest.LogCaptureFixture) -> None:
    clock, reporter, pub, c = setup()
    caplog.set_level(logging.INFO, logger="sd_operator.batch")
    reporter.down = True
    c.succeeded = 100

    async def scenario() -> bool:
        async def api_back_after_45s(seconds: float) -> None:
            await clock.sleep(seconds)
            reporter.down = clock.now - 1000.0 < 45

        pub.sleep = api_back_after_45s
        return await pub.publish_final(snapshot(c), 300)

    assert asyncio.run(scenario())
    assert reporter.sent == [status(c, "s3://out/b")]
    assert 45 <= clock.now - 1000.0 <= 55  # within one capped backoff of the API server's return
    assert len(messages(caplog, logging.WARNING)) == 1
    assert any("published again after 4" in m for m in messages(caplog, logging.INFO))


def test_the_final_publish_gives_up_after_its_bound() -> None:
    clock, reporter, pub, c = setup()
    reporter.down = True
    assert not asyncio.run(pub.publish_final(snapshot(c), 300))
    assert clock.now - 1000.0 == 300  # the last wait is cut to the bound, then one more attempt
    # At 0, 1, 3, 7 and 15 s, then every 10 s up to 295 s, and once more at the bound.
    assert reporter.attempts == 5 + 28 + 1


def test_an_api_error_is_one_short_line_without_the_response_headers() -> None:
    e = ApiException(status=504, reason="Gateway Timeout")
    e.headers = {"Audit-Id": "x", "Content-Type": "application/json"}
    e.body = '{"kind":"Status","message":"Timeout: request did not complete within requested timeout"}'
    assert _one_line(e) == "HTTP 504 Gateway Timeout"
    assert _one_line(TimeoutError()) == "TimeoutError"
    refused = NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")
    retried = MaxRetryError(None, "/apis/sd-operator.dev/v1alpha1/namespaces/ns/generationbatches/b/status", refused)
    line = _one_line(retried)  # not the URL and retry count: what the last attempt met
    assert line.startswith("NewConnectionError: ") and line.endswith("[Errno 111] Connection refused"), line
    assert len(_one_line(OSError("x" * 1000))) == 300
