"""The autoscaling simulation of bench/autoscale_trace.py on short traces: it accounts for every request and
pod-second, keeps within the policy, and the real scaling rule scales to zero when the demand is gone."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # bench/ is not a package
import autoscale_trace as bench

from sd_operator.autoscaling import Policy
from sd_operator.emulator.profiles import Family

# 5 min of near silence, a 5-minute burst, then 30 quiet minutes (longer than the scale-down delay).
TRACE = "quiet:300:0.5,burst:300:60,quiet:1800:0"
SETTINGS = bench.Settings(cold_start=60.0, timeout=600.0)


@pytest.fixture(scope="module")
def trace() -> tuple[list[bench.Request], float, float]:
    phases = bench.parse_trace(TRACE)
    render = bench.service_seconds(bench.Kind(1024, 1024, 30), "rtx4090", Family.SDXL)
    arrivals = bench.make_arrivals(phases, [(render, 1.0)], seed=7)
    return arrivals, sum(p.seconds for p in phases), render


def check_consistent(run: bench.Run) -> None:
    """Every request resolved once; renders start after arrival, in FIFO order, one at a time per ready pod."""
    for r in run.requests:
        assert (r.end is not None) != (r.failed is not None)
        if r.end is not None:
            assert r.start is not None and r.pod is not None
            assert r.arrival <= r.start and r.end == pytest.approx(r.start + r.service)
            assert r.start >= run.pods[r.pod].ready_at
            assert r.wait <= SETTINGS.timeout
    starts = [r.start for r in sorted(run.requests, key=lambda r: r.arrival) if r.start is not None]
    assert starts == sorted(starts)
    for pod in run.pods:
        mine = sorted((r for r in run.requests if r.pod == pod.id), key=lambda r: r.arrival)
        for a, b in itertools.pairwise(mine):
            assert a.end is not None and b.start is not None and b.start >= a.end
        if pod.removed is not None and mine:
            assert mine[-1].end is not None and mine[-1].end <= pod.removed  # drained before it went


def test_trace_is_seeded_and_follows_the_phases(trace: tuple[list[bench.Request], float, float]) -> None:
    arrivals, _, render = trace
    again = bench.make_arrivals(bench.parse_trace(TRACE), [(render, 1.0)], seed=7)
    assert [r.arrival for r in again] == [r.arrival for r in arrivals]
    assert render == pytest.approx(30 * 4 / 5.5 / 4)  # 30 steps of SDXL at 5.5 it/s
    by_phase = [sum(1 for r in arrivals if r.phase == i) for i in range(3)]
    assert by_phase[2] == 0 and 200 < by_phase[1] < 400  # 60/min for 5 min
    assert all(300 <= r.arrival < 600 for r in arrivals if r.phase == 1)


def test_autoscaled_accounts_for_everything_and_returns_to_zero(
    trace: tuple[list[bench.Request], float, float],
) -> None:
    arrivals, duration, _ = trace
    policy = Policy(min_replicas=0, max_replicas=4, target_per_replica=2, scale_down_delay=600.0)
    run = bench.simulate(arrivals, duration, SETTINGS, policy=policy)
    summary = bench.summarize(run)
    assert summary["completed"] + summary["failed"] == len(arrivals) > 0
    check_consistent(run)
    # The burst asks for more than 4 pods; the fleet never exceeds maxReplicas (draining pods aside).
    assert run.max_live == policy.max_replicas
    assert all(live <= policy.max_replicas for _, live, _ in run.timeline)
    assert any(e.reason == "ScaledUp" for e in run.events)
    # In the long quiet tail it scales to zero within the trace, after the delay since the last render.
    last_end = max(r.end for r in run.requests if r.end is not None)
    zero = [t for t, live, _ in run.timeline if live == 0 and t > last_end]
    assert zero and zero[0] <= duration
    assert zero[0] >= last_end + policy.scale_down_delay - SETTINGS.interval
    assert run.events[-1].reason == "ScaledToZero" and run.events[-1].replicas == 0
    assert all(p.removed is not None for p in run.pods)
    assert run.end == duration
    # GPU time covers every render and every cold start.
    busy = sum(r.service for r in run.requests if r.end is not None)
    assert run.gpu_seconds() >= busy + SETTINGS.cold_start * len(run.pods)


def test_static_fleet_costs_replicas_times_duration(trace: tuple[list[bench.Request], float, float]) -> None:
    arrivals, duration, _ = trace
    run = bench.simulate(arrivals, duration, SETTINGS, static=3)
    check_consistent(run)
    assert run.gpu_seconds() == pytest.approx(3 * duration)
    summary = bench.summarize(run, reference_gpu_seconds=run.gpu_seconds())
    assert summary["ratio_to_static_peak"] == 1.0
    assert summary["completed"] + summary["failed"] == len(arrivals)
    assert summary["scale_events"] == 0 and summary["cold_starts"] == 0 and run.max_live == 3


def test_overloaded_static_fleet_fails_requests_at_the_timeout() -> None:
    arrivals = [bench.Request(i, i * 0.5, 10.0) for i in range(200)]  # 2/s against 0.1/s of capacity
    run = bench.simulate(arrivals, 100.0, bench.Settings(timeout=60.0), static=1)
    check_consistent(run)
    failed = [r for r in run.requests if r.failed]
    assert failed and all(r.failed == "timeout" and r.resolved == pytest.approx(r.arrival + 60.0) for r in failed)
    assert len(failed) + sum(1 for r in run.requests if r.end is not None) == 200
    assert bench.quantile([r.wait for r in run.requests], 99) == float("inf")


def test_cold_start_longer_than_the_timeout_fails_a_request_at_zero() -> None:
    arrivals = [bench.Request(0, 5.0, 5.0)]
    policy = Policy(min_replicas=0, max_replicas=2)
    run = bench.simulate(arrivals, 3000.0, bench.Settings(cold_start=700.0, timeout=600.0), policy=policy)
    (req,) = run.requests
    assert req.failed == "timeout" and req.start is None and req.resolved == pytest.approx(605.0)
    assert len(run.pods) == 1 and run.pods[0].created == pytest.approx(6.0)  # the next 2 s evaluation
    # Nobody waits any more: the pod that came up too late goes after the delay.
    assert run.pods[0].removed is not None and run.pods[0].removed <= 3000.0
    # With a cold start inside the timeout the same request is served.
    ok = bench.simulate(arrivals, 3000.0, bench.Settings(cold_start=60.0, timeout=600.0), policy=policy)
    assert ok.requests[0].end is not None and ok.requests[0].wait == pytest.approx(61.0)
