"""Request state for GET /v1/requests/{id}: the tracker (per tenant, bounded), the dispatcher's queue
position of a named request, and the answer built from both."""

from __future__ import annotations

import asyncio

import pytest

from sd_operator.gateway.dispatch import Backend, Dispatcher
from sd_operator.gateway.tracking import RequestTracker, describe


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_request_is_readable_only_by_its_tenant_and_ids_do_not_collide() -> None:
    t = RequestTracker()
    mine = t.begin("studio-a", "5f0c8a1e-0000-4000-8000-000000000001")
    theirs = t.begin("studio-b", "5f0c8a1e-0000-4000-8000-000000000001")
    assert mine is not None and theirs is not None and mine.ticket != theirs.ticket
    assert t.get("studio-a", mine.request_id) is mine
    assert t.get("studio-b", mine.request_id) is theirs
    assert t.get("studio-c", mine.request_id) is None


def test_unusable_ids_are_not_tracked() -> None:
    t = RequestTracker()
    for bad in (None, "", "x" * 129, "a b", "../x", "<script>"):
        assert t.begin("t", bad) is None
    assert not t.entries


def test_done_on_2xx_failed_otherwise_or_when_the_caller_left() -> None:
    t = RequestTracker()
    ok, bad, gone = t.begin("t", "ok"), t.begin("t", "bad"), t.begin("t", "gone")
    t.end(ok, 200)
    t.end(bad, 503)
    t.end(gone, None)
    assert (ok.state, bad.state, gone.state) == ("done", "failed", "failed")  # type: ignore[union-attr]
    assert bad.status == 503  # type: ignore[union-attr]


def test_finished_entries_expire_and_the_tracker_is_bounded() -> None:
    clock = Clock()
    t = RequestTracker(keep_seconds=60, max_entries=3, clock=clock)
    first = t.begin("t", "first")
    t.end(first, 200)
    running = t.begin("t", "running")
    clock.now += 61
    assert t.get("t", "first") is None  # finished and older than keep_seconds
    assert t.get("t", "running") is running  # still in flight: kept
    for i in range(5):
        t.begin("t", f"r{i}")
    assert len(t.entries) == 3 and t.get("t", "r4") is not None and t.get("t", "running") is None


def test_a_reused_id_names_the_latest_request() -> None:
    t = RequestTracker()
    old = t.begin("t", "same")
    new = t.begin("t", "same")
    assert t.get("t", "same") is new and new is not old


def test_queue_position_follows_the_serving_order() -> None:
    async def scenario() -> list[tuple[int, int, float] | None]:
        d = Dispatcher(default_seconds_per_unit=2.0)
        backend = Backend("http://a", "m")
        d.add(backend)
        held = await d.acquire("m")  # the only slot is busy from now on
        waiting = [asyncio.create_task(d.acquire("m", tenant="a", units=1.0, ticket=f"a{i}")) for i in range(2)]
        high = asyncio.create_task(d.acquire("m", tenant="b", priority=5, units=3.0, ticket="high"))
        for _ in range(5):
            await asyncio.sleep(0)
        found = [d.position("high"), d.position("a0"), d.position("a1"), d.position("nobody")]
        d.release(held, ok=True)
        assert await high is backend
        found.append(d.position("high"))  # bound: no longer waits
        found.append(d.position("a0"))
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert d.tickets == {}
        return found

    high, a0, a1, nobody, high_after, a0_after = asyncio.run(scenario())
    assert nobody is None and high_after is None
    assert high is not None and a0 is not None and a1 is not None
    assert (high[0], a0[0], a1[0]) == (1, 2, 3) and high[1] == a0[1] == 3
    # The wait grows with the work ahead: 'a1' waits for 'high' (3 units) and 'a0' (1 unit) at 2 s per unit.
    # (positions are read a moment apart: the busy slot's expected end moves closer meanwhile)
    assert a1[2] - a0[2] == pytest.approx(2.0, abs=0.05) and a0[2] - high[2] == pytest.approx(6.0, abs=0.05)
    assert a0_after is not None and a0_after[:2] == (1, 2)


def test_the_answer_for_each_state() -> None:
    t = RequestTracker()
    assert describe(None, None, 4, None) == {
        "state": "unknown", "position": None, "queueDepth": 4, "progress": None, "etaSeconds": None,
    }  # fmt: skip
    tracked = t.begin("t", "r")
    assert tracked is not None
    tracked.model = "m.safetensors"
    queued = describe(tracked, (2, 5, 7.25), 5, None)
    assert queued["state"] == "queued" and queued["position"] == 2 and queued["queueDepth"] == 5
    assert queued["etaSeconds"] == 7.2 and queued["progress"] == 0.0
    tracked.state, tracked.backend = "running", Backend("http://a", "m.safetensors", instance="ns/one")
    running = describe(tracked, None, 0, {"progress": 0.4567, "eta_relative": 3.21})
    assert running["state"] == "running" and running["position"] is None
    assert running["progress"] == 0.4567 and running["etaSeconds"] == 3.2 and running["instance"] == "ns/one"
    assert describe(tracked, None, 0, None)["progress"] is None  # the instance did not answer
    t.end(tracked, 200)
    done = describe(tracked, None, 0, None)
    assert (done["state"], done["progress"], done["etaSeconds"], done["status"]) == ("done", 1.0, 0.0, 200)
