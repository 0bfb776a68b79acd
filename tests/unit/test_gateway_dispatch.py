"""Dispatch order: idle-only binding, priorities, fairness between tenants, bounded queues."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sd_operator.gateway.dispatch import Backend, Dispatcher, NoBackend, QueueFull, work_units


def run(coro):
    return asyncio.run(coro)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_work_units_scale_with_pixels_steps_and_batch() -> None:
    assert work_units(512, 512, 20) == 1
    assert work_units(1024, 1024, 30, batch=2) == 12


def test_a_request_binds_only_to_an_idle_backend() -> None:
    async def scenario() -> list[str]:
        d = Dispatcher()
        b = Backend("http://a", "m")
        d.add(b)
        first = await d.acquire("m")
        assert first is b and b.inflight == 1
        second = asyncio.create_task(d.acquire("m"))
        await _settle()
        assert not second.done() and d.queue_depth("m") == 1  # busy: the second waits in the gateway
        d.release(b, ok=True)
        assert (await second) is b
        return [b.state]

    assert run(scenario()) == ["busy"]


def _recorder(d: Dispatcher, order: list[str]) -> Callable[..., Awaitable[None]]:
    """A request that records its tag once bound, then gives its slot back at the next turn of the loop."""

    async def req(tag: str, **acquire: Any) -> None:
        got = await d.acquire("m", **acquire)
        order.append(tag)
        await asyncio.sleep(0)
        d.release(got, ok=True)

    return req


def test_higher_priority_goes_first_and_tenants_take_turns() -> None:
    async def scenario() -> list[str]:
        d = Dispatcher()
        b = Backend("http://a", "m")
        d.add(b)
        await d.acquire("m")  # occupy the only slot
        order: list[str] = []
        req = _recorder(d, order)
        tasks = [asyncio.create_task(req(f"a{i}", tenant="alice", priority=0)) for i in range(3)]
        await _settle()
        tasks += [asyncio.create_task(req(f"b{i}", tenant="bob", priority=0)) for i in range(2)]
        tasks.append(asyncio.create_task(req("urgent", tenant="carol", priority=10)))
        await _settle()
        d.release(b, ok=True)
        await asyncio.gather(*tasks)
        return order

    order = run(scenario())
    assert order[0] == "urgent"
    # alice queued 3 before bob's 2, yet bob is served in between: a1 b0 a... alternate.
    assert order[1:] == ["a0", "b0", "a1", "b1", "a2"]


def test_bounded_queue_raises_queue_full_with_retry_after() -> None:
    async def scenario() -> QueueFull:
        d = Dispatcher(max_queue=2)
        d.add(Backend("http://a", "m"))
        await d.acquire("m")
        waiting = [asyncio.create_task(d.acquire("m")) for _ in range(2)]
        await _settle()
        try:
            await d.acquire("m")
        except QueueFull as e:
            for t in waiting:
                t.cancel()
            return e
        raise AssertionError("no QueueFull")

    e = run(scenario())
    assert e.depth == 2 and e.retry_after >= 1


def test_cancelled_waiter_leaves_the_queue_and_never_takes_a_slot() -> None:
    async def scenario() -> tuple[int, int]:
        d = Dispatcher()
        b = Backend("http://a", "m")
        d.add(b)
        await d.acquire("m")
        gone = asyncio.create_task(d.acquire("m"))
        stays = asyncio.create_task(d.acquire("m"))
        await _settle()
        gone.cancel()
        await _settle()
        depth = d.queue_depth("m")
        d.release(b, ok=True)
        assert (await stays) is b
        return depth, b.inflight

    assert run(scenario()) == (1, 1)


def test_the_fastest_idle_backend_is_chosen_and_exclusions_hold() -> None:
    async def scenario() -> tuple[str, str]:
        d = Dispatcher()
        slow, fast = Backend("http://slow", "m"), Backend("http://fast", "m")
        slow.seconds_per_unit, fast.seconds_per_unit = 4.0, 1.0
        d.add(slow)
        d.add(fast)
        first = await d.acquire("m", units=2)
        d.release(first, ok=True)
        retried = await d.acquire("m", exclude=[fast])
        return first.url, retried.url

    assert run(scenario()) == ("http://fast", "http://slow")


def test_service_times_are_learned_per_unit() -> None:
    async def scenario() -> float | None:
        d = Dispatcher()
        b = Backend("http://a", "m")
        d.add(b)
        got = await d.acquire("m")
        d.release(got, ok=True, seconds=6.0, units=3.0)
        return b.seconds_per_unit

    assert run(scenario()) == 2.0


def test_ejected_backend_gets_no_work_until_reinstated() -> None:
    async def scenario() -> bool:
        d = Dispatcher()
        b = Backend("http://a", "m")
        d.add(b)
        d.eject(b, cool_off=60)
        waiting = asyncio.create_task(d.acquire("m"))
        await _settle()
        assert not waiting.done() and b.state == "ejected"
        d.reinstate(b)
        return (await waiting) is b

    assert run(scenario())


def test_unknown_model_has_no_backend() -> None:
    with pytest.raises(NoBackend):
        run(Dispatcher().acquire("nope"))


def test_token_bucket_rate_limit() -> None:
    from sd_operator.gateway.auth import KeyStore

    keys = KeyStore([{"key": "k1", "tenant": "t", "priority": 3, "rateLimit": 2, "burst": 2}])
    tenant = keys.lookup("k1")
    assert tenant is not None and tenant.priority == 3 and keys.lookup("other") is None
    assert tenant.allow(now=100.0) == 0 and tenant.allow(now=100.0) == 0
    assert tenant.allow(now=100.0) == 0.5  # empty: the next token comes in 1/rate seconds
    assert tenant.allow(now=100.5) == 0


def _fleet(d: Dispatcher, **speeds: float) -> dict[str, Backend]:
    """Backends named by their learned seconds per unit, all of model m."""
    out = {}
    for name, spu in speeds.items():
        b = Backend(f"http://{name}", "m")
        b.seconds_per_unit = spu
        d.add(b)
        out[name] = b
    return out


async def _occupy(d: Dispatcher, *backends: Backend, units: float = 1.0) -> None:
    """Binds one request to each backend (idle ones, in the given order)."""
    for b in backends:
        got = await d.acquire("m", units=units, exclude=[o for o in d.all_backends() if o is not b])
        assert got is b


def test_the_big_request_goes_to_the_fast_card_and_the_small_one_to_the_slow_card() -> None:
    async def scenario() -> dict[str, str]:
        d = Dispatcher()
        f = _fleet(d, slow=3.0, fast=1.0)
        await _occupy(d, f["fast"], f["slow"])
        got: dict[str, str] = {}

        async def req(tag: str, units: float) -> None:
            got[tag] = (await d.acquire("m", units=units)).url

        tasks = [asyncio.create_task(req("small", 1)), asyncio.create_task(req("big", 6))]
        await _settle()
        d.release(f["fast"], ok=True)  # the fast card frees first: it takes the big one, not the head
        await _settle()
        assert got == {"big": "http://fast"}
        d.release(f["slow"], ok=True)
        await asyncio.gather(*tasks)
        return got

    assert run(scenario()) == {"big": "http://fast", "small": "http://slow"}


def test_an_idle_slow_card_waits_when_a_busy_fast_card_finishes_the_request_sooner() -> None:
    async def scenario() -> tuple[bool, str]:
        d = Dispatcher()
        f = _fleet(d, slow=4.0, fast=1.0)
        await _occupy(d, f["fast"], units=0.01)  # expected free in 10 ms
        big = asyncio.create_task(d.acquire("m", units=5))  # 20 s on the slow card, ~5 s on the fast
        await _settle()
        held = not big.done() and f["slow"].state == "idle"
        d.release(f["fast"], ok=True)
        return held, (await big).url

    assert run(scenario()) == (True, "http://fast")


def test_no_request_waits_for_a_gain_of_a_few_milliseconds() -> None:
    async def scenario() -> str:
        d = Dispatcher()
        f = _fleet(d, slow=4.0, fast=1.0)
        await _occupy(d, f["fast"], units=0.01)  # expected free in 10 ms
        # 40 ms on the idle slow card against ~20 ms after waiting for the fast one: not worth a wait.
        return (await d.acquire("m", units=0.01)).url

    assert run(scenario()) == "http://slow"


def test_a_late_backend_stops_attracting_reservations() -> None:
    async def scenario() -> str:
        d = Dispatcher()
        f = _fleet(d, slow=2.0, fast=1.0)
        await _occupy(d, f["fast"], units=1)
        f["fast"].expected_ends = [f["fast"].expected_ends[0] - 100]  # it is 100 s past its expected end
        return (await d.acquire("m", units=5)).url

    assert run(scenario()) == "http://slow"


def test_a_request_is_skipped_at_most_max_skips_times() -> None:
    async def scenario() -> list[str]:
        d = Dispatcher(max_skips=2)
        (b,) = _fleet(d, only=1.0).values()
        await _occupy(d, b)
        order: list[str] = []
        req = _recorder(d, order)
        tasks = [asyncio.create_task(req("small", units=1))]
        await _settle()
        tasks += [asyncio.create_task(req(f"big{i}", units=4)) for i in range(4)]
        await _settle()
        d.release(b, ok=True)
        await asyncio.gather(*tasks)
        return order

    # Largest first would leave "small" to the end; after two skips it is served next.
    assert run(scenario()) == ["big0", "big1", "small", "big2", "big3"]


def test_priority_comes_before_size() -> None:
    async def scenario() -> list[str]:
        d = Dispatcher()
        (b,) = _fleet(d, only=1.0).values()
        await _occupy(d, b)
        order: list[str] = []
        req = _recorder(d, order)
        tasks = [
            asyncio.create_task(req("big-low", units=8, priority=0)),
            asyncio.create_task(req("small-high", units=1, priority=5)),
            asyncio.create_task(req("mid-low", units=4, priority=0)),
        ]
        await _settle()
        d.release(b, ok=True)
        await asyncio.gather(*tasks)
        return order

    assert run(scenario()) == ["small-high", "big-low", "mid-low"]


def test_an_idle_backend_the_whole_window_excludes_goes_to_a_waiter_behind_it() -> None:
    async def scenario() -> str:
        d = Dispatcher(window=1)
        f = _fleet(d, a=1.0, b=1.0)
        await _occupy(d, f["a"], f["b"])
        retry = asyncio.create_task(d.acquire("m", exclude=[f["b"]]))  # a retry that failed on b
        other = asyncio.create_task(d.acquire("m"))
        await _settle()
        d.release(f["b"], ok=True)
        url = (await other).url
        assert not retry.done()
        d.release(f["a"], ok=True)
        assert (await retry).url == "http://a"
        return url

    assert run(scenario()) == "http://b"
