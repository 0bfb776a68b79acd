"""Dispatch: a queue per model inside the gateway; a request is bound to a backend only when it is idle.

The WebUI runs one generation at a time, so queueing at the backend only hides work from the
scheduler. Here every request waits in the gateway until some backend of its model has a free slot
(`max_inflight`, default 1). Waiting requests are served by priority; within a priority, API keys
(tenants) take turns, so one tenant's burst cannot starve the others.

Which request goes where: a fleet mixes cards 3x apart in speed and requests 10x apart in size, and a
big request that lands on the slowest card last decides the makespan. So the gateway looks at a small
window of the next requests in serving order (`window`, default twice the model's backends) and, largest
first, gives each to the backend expected to *finish* it soonest (earliest completion time, counting
when a busy backend should be free). A request whose best backend is busy is reserved for it, and the
next one is considered for the idle backends; when every request of the window is better served by a
busy backend by more than HOLD_MIN_GAIN, the idle ones wait for that release (a list-scheduling rule
known as LPT with earliest completion). A request passed over `max_skips` times is served next whatever
its size, so reordering within the window never starves anyone.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# One unit of work: a 512x512 image at 20 steps. Service times are learned per unit.
UNIT_PIXELS_STEPS = 512 * 512 * 20
EWMA_ALPHA = 0.3
HOLD_MIN_GAIN = 0.05  # seconds an idle backend must lose against a busy one before a request waits


def work_units(width: int, height: int, steps: int, batch: int = 1, n_iter: int = 1) -> float:
    return max(width * height * steps * batch * n_iter / UNIT_PIXELS_STEPS, 0.01)


class QueueFull(Exception):
    def __init__(self, model: str, depth: int, retry_after: float):
        super().__init__(f"the queue for {model} is full ({depth} waiting); retry after {retry_after:.0f}s")
        self.model, self.depth, self.retry_after = model, depth, retry_after


class NoBackend(Exception):
    def __init__(self, model: str):
        super().__init__(f"no instance serves {model}")
        self.model = model


class ColdStartTimeout(Exception):
    """A request for a model at zero waited `seconds` and still no instance of it is ready."""

    def __init__(self, model: str, seconds: float):
        super().__init__(f"no instance of {model} became ready within {seconds:g}s")
        self.model, self.seconds = model, seconds


COLD_START_POLL = 0.25  # seconds between checks whether a model at zero got a backend


@dataclass(eq=False)
class Backend:
    """One WebUI instance (a pod, or an emulator) with the one model it serves."""

    url: str
    model: str
    title: str | None = None
    sha256: str | None = None
    aliases: frozenset[str] = frozenset()
    instance: str | None = None
    gpu: str | None = None
    pixel_budget: int | None = None  # largest width*height*batch it can render
    max_inflight: int = 1
    inflight: int = 0
    ejected_until: float = 0.0
    consecutive_failures: int = 0
    seconds_per_unit: float | None = None  # learned service time of one work unit
    completed: int = 0
    last_latency: float | None = None
    removed: bool = False
    expected_ends: list[float] = field(default_factory=list)  # monotonic time each running request should end

    @property
    def ejected(self) -> bool:
        return self.ejected_until > time.monotonic()

    @property
    def has_slot(self) -> bool:
        return self.inflight < self.max_inflight and not self.removed and not self.ejected

    @property
    def state(self) -> str:
        if self.ejected:
            return "ejected"
        return "busy" if self.inflight >= self.max_inflight else "idle"

    def expected_seconds(self, units: float, default_speed: float) -> float:
        return units * (self.seconds_per_unit or default_speed)

    def free_at(self, now: float) -> float:
        """When a slot should be free: now if one is; else the earliest expected end. A request running
        past its expected end is assumed to need as long again as it is late, so a slow or stuck backend
        stops attracting reservations."""
        if self.has_slot or not self.expected_ends:
            return now
        end = min(self.expected_ends)
        return now + (now - end) if end < now else end


@dataclass(eq=False)
class Waiter:
    tenant: str
    priority: int
    units: float
    exclude: frozenset[int]
    future: asyncio.Future[Backend]
    enqueued: float = field(default_factory=time.monotonic)
    skipped: int = 0  # times a request behind it in serving order was bound first
    ticket: str | None = None  # the caller's request id (X-Request-Id), for GET /v1/requests/{id}


class ModelQueue:
    """Waiting requests of one model: priority levels, and per level a FIFO per tenant served in turn."""

    def __init__(self) -> None:
        self.levels: dict[int, OrderedDict[str, deque[Waiter]]] = {}
        self.size = 0

    def push(self, w: Waiter) -> None:
        self.levels.setdefault(w.priority, OrderedDict()).setdefault(w.tenant, deque()).append(w)
        self.size += 1

    def remove(self, w: Waiter) -> None:
        tenants = self.levels.get(w.priority)
        if not tenants or w.tenant not in tenants:
            return
        try:
            tenants[w.tenant].remove(w)
        except ValueError:
            return
        self.size -= 1
        if not tenants[w.tenant]:
            del tenants[w.tenant]
        if not tenants:
            del self.levels[w.priority]

    def candidates(self) -> Iterable[Waiter]:
        """Waiters in serving order: highest priority first; tenants in turn within a priority."""
        for priority in sorted(self.levels, reverse=True):
            tenants = self.levels[priority]
            # The head of each tenant's FIFO, in the rotation order (a served tenant moves to the back).
            yield from (q[0] for q in list(tenants.values()) if q)
            # Then the rest, so an excluded head does not block others of the same tenant.
            for q in list(tenants.values()):
                yield from itertools.islice(q, 1, None)

    def served(self, w: Waiter) -> None:
        tenants = self.levels[w.priority]
        self.remove(w)
        if w.tenant in tenants:
            tenants.move_to_end(w.tenant)


class Dispatcher:
    def __init__(
        self,
        max_queue: int = 1000,
        default_seconds_per_unit: float = 2.0,
        window: int | None = None,
        max_skips: int | None = None,
    ) -> None:
        self.max_queue = max_queue
        self.default_seconds_per_unit = default_seconds_per_unit
        self.window = window  # None: twice the model's backends
        self.max_skips = max_skips  # None: the window size
        self.backends: dict[str, list[Backend]] = {}
        self.queues: dict[str, ModelQueue] = {}
        self.version = 0  # changes whenever a backend comes or goes (what the registry's index follows)
        self.tickets: dict[str, tuple[str, Waiter]] = {}  # request id -> (model, waiter) while it waits

    # -- backends ----------------------------------------------------------------------------

    def add(self, backend: Backend) -> None:
        self.backends.setdefault(backend.model, []).append(backend)
        self.version += 1
        self._dispatch(backend.model)

    def remove(self, backend: Backend) -> None:
        backend.removed = True
        group = self.backends.get(backend.model, [])
        if backend in group:
            group.remove(backend)
        self.version += 1

    def all_backends(self) -> list[Backend]:
        return [b for group in self.backends.values() for b in group]

    def models(self) -> list[str]:
        return sorted(m for m, group in self.backends.items() if group)

    def eject(self, backend: Backend, cool_off: float) -> None:
        backend.ejected_until = time.monotonic() + cool_off
        backend.consecutive_failures += 1

    def reinstate(self, backend: Backend) -> None:
        backend.ejected_until = 0.0
        backend.consecutive_failures = 0
        self._dispatch(backend.model)

    # -- requests ----------------------------------------------------------------------------

    def queue_depth(self, model: str) -> int:
        q = self.queues.get(model)
        return q.size if q else 0

    def demand(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per model with any: requests waiting, requests rendering and the oldest wait (what autoscaling
        follows; a model at zero has waiting requests and no backends)."""
        now = time.monotonic() if now is None else now
        out: dict[str, dict[str, Any]] = {}
        for model in set(self.backends) | set(self.queues):
            queued = self.queue_depth(model)
            running = sum(b.inflight for b in self.backends.get(model, ()))
            if not queued and not running:
                continue
            oldest = min((w.enqueued for w in self.queues[model].candidates()), default=now) if queued else now
            out[model] = {"queued": queued, "running": running, "oldestWaitSeconds": round(now - oldest, 3)}
        return out

    def _speed(self, model: str) -> float:
        known = [b.seconds_per_unit for b in self.backends.get(model, []) if b.seconds_per_unit]
        return sum(known) / len(known) if known else self.default_seconds_per_unit

    def retry_after(self, model: str) -> float:
        """A fair guess of when a slot frees: the queue's work spread over the model's backends."""
        group = [b for b in self.backends.get(model, []) if not b.removed]
        slots = max(sum(b.max_inflight for b in group), 1)
        depth = self.queue_depth(model)
        return max(1.0, (depth + 1) * self._speed(model) / slots)

    async def acquire(
        self,
        model: str,
        *,
        tenant: str = "",
        priority: int = 0,
        units: float = 1.0,
        exclude: Iterable[Backend] = (),
        cold_start: float | None = None,
        ticket: str | None = None,
    ) -> Backend:
        """Waits until a backend of `model` has a free slot, and takes it. Cancelling the wait leaves the queue.

        A model without backends is refused (NoBackend), unless `cold_start` seconds are given: then the
        request waits in the queue (where it counts as demand, which scales the model up) for that long for
        a first backend, and from then on like any other (ColdStartTimeout when none came)."""
        cold = not self.backends.get(model)
        if cold and cold_start is None:
            raise NoBackend(model)
        queue = self.queues.setdefault(model, ModelQueue())
        excluded = frozenset(id(b) for b in exclude)
        if not queue.size:
            # Nobody waits: the window rule for a lone request, without queueing it.
            now, speed = time.monotonic(), self._speed(model)
            rows = self._rows(model, now, speed)
            best = self._earliest(rows, units, excluded)
            if best is not None and rows[best][3]:
                backend = rows[best][0]
                self._take(backend, units, now, speed)
                return backend
        if queue.size >= self.max_queue:
            raise QueueFull(model, queue.size, self.retry_after(model))
        loop = asyncio.get_running_loop()
        waiter = Waiter(tenant, priority, units, excluded, loop.create_future(), ticket=ticket)
        queue.push(waiter)
        if ticket is not None:
            self.tickets[ticket] = (model, waiter)
        self._dispatch(model)
        try:
            if cold and cold_start is not None:
                await self._first_backend(model, waiter, cold_start)
            return await waiter.future
        except (asyncio.CancelledError, ColdStartTimeout):
            queue.remove(waiter)
            if waiter.future.done() and not waiter.future.cancelled():
                # Bound just as the caller went away: give the slot back.
                self.release(waiter.future.result(), ok=True)
            raise
        finally:
            if ticket is not None and self.tickets.get(ticket, (None, None))[1] is waiter:
                del self.tickets[ticket]

    def position(self, ticket: str) -> tuple[int, int, float] | None:
        """(position in serving order, 1 = next; the queue's depth; seconds until it should start) of a waiting
        request, or None when it does not wait. The serving order is the queue's (priority, tenants in turn);
        the window may still reorder the next few by size. The wait is the work ahead of it spread over the
        model's slots, plus the time until the earliest busy slot frees."""
        found = self.tickets.get(ticket)
        if found is None:
            return None
        model, waiter = found
        queue = self.queues.get(model)
        if queue is None:
            return None
        ahead = 0.0
        for position, other in enumerate(queue.candidates(), 1):
            if other is waiter:
                now, speed = time.monotonic(), self._speed(model)
                group = [b for b in self.backends.get(model, []) if not b.removed]
                slots = max(sum(b.max_inflight for b in group), 1)
                free = min((b.free_at(now) for b in group), default=now) - now
                return position, queue.size, max(0.0, free) + ahead * speed / slots
            ahead += other.units
        return None

    async def _first_backend(self, model: str, waiter: Waiter, seconds: float) -> None:
        """Returns once the waiter is bound or the model has a backend; ColdStartTimeout after `seconds`."""
        deadline = time.monotonic() + seconds
        while not waiter.future.done() and not self.backends.get(model):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ColdStartTimeout(model, seconds)
            await asyncio.wait([waiter.future], timeout=min(left, COLD_START_POLL))

    def release(self, backend: Backend, *, ok: bool, seconds: float | None = None, units: float | None = None) -> None:
        backend.inflight = max(0, backend.inflight - 1)
        if backend.expected_ends:  # which of its requests ended is not known; the earliest is the best guess
            backend.expected_ends.remove(min(backend.expected_ends))
        if ok and seconds is not None and units:
            per_unit = seconds / units
            prev = backend.seconds_per_unit
            backend.seconds_per_unit = per_unit if prev is None else prev + EWMA_ALPHA * (per_unit - prev)
            backend.completed += 1
            backend.last_latency = seconds
        if ok:
            backend.consecutive_failures = 0
        self._dispatch(backend.model)

    def _dispatch(self, model: str) -> None:
        queue = self.queues.get(model)
        if not queue or not queue.size:
            return
        while any(b.has_slot for b in self.backends.get(model, [])) and self._bind_one(model, queue):
            pass

    def _window(self, model: str, queue: ModelQueue) -> list[Waiter]:
        """The next live waiters in serving order, at most `window`; just the head once it was skipped
        `max_skips` times. Waiters cancelled meanwhile are dropped on the way."""
        size = self.window or 2 * len(self.backends.get(model, []))
        out, stale = [], []
        for waiter in queue.candidates():
            if waiter.future.done():  # cancelled while waiting
                stale.append(waiter)
                continue
            out.append(waiter)
            if len(out) >= size:
                break
        for waiter in stale:  # removed after the walk: the queue must not change under it
            queue.remove(waiter)
        if out and out[0].skipped >= (self.max_skips or size):
            return out[:1]
        return out

    def _rows(self, model: str, now: float, speed: float) -> list[list[Any]]:
        """[backend, when it is free, seconds per unit, idle] for each backend that may take work.
        (Runs for every request: one pass, `now` read once instead of through the properties.)"""
        rows = []
        for b in self.backends.get(model, ()):
            if b.removed or b.ejected_until > now:
                continue
            idle = b.inflight < b.max_inflight
            rows.append([b, now if idle else b.free_at(now), b.seconds_per_unit or speed, idle])
        return rows

    def _bind_one(self, model: str, queue: ModelQueue) -> bool:
        """Binds one waiter to an idle backend (see the module docstring); False when none should be."""
        window = self._window(model, queue)
        if not window:
            return False
        now, speed = time.monotonic(), self._speed(model)
        rows = self._rows(model, now, speed)
        backends = [row[0] for row in rows]
        # Higher priority first, then largest first; sorted() is stable, so equal ones keep serving order.
        for waiter in sorted(window, key=lambda w: (-w.priority, -w.units)):
            best = self._earliest(rows, waiter.units, waiter.exclude)
            if best is None:
                continue
            if rows[best][3]:
                self._bind(queue, window, waiter, rows[best][0], now, speed)
                return True
            rows[best][1] += waiter.units * rows[best][2]  # reserved for that busy backend
        # Everything in the window is better served by a busy backend: the idle ones wait for its release
        # (which dispatches again). Only an idle backend that no waiter of the window may use (retries
        # exclude the backends they failed on) goes to the first waiter behind the window that can.
        idle = [b for b in backends if b.has_slot and all(id(b) in w.exclude for w in window)]
        if idle:
            for waiter in itertools.islice(queue.candidates(), len(window), None):
                usable = [b for b in idle if id(b) not in waiter.exclude]
                if usable and not waiter.future.done():
                    best = min(usable, key=lambda b: b.expected_seconds(waiter.units, speed))
                    self._bind(queue, window, waiter, best, now, speed)
                    return True
        return False

    @staticmethod
    def _earliest(rows: list[list[Any]], units: float, exclude: frozenset[int]) -> int | None:
        """The row of the backend expected to finish `units` first (from when it is free). A busy one only
        when it beats the best idle one by more than HOLD_MIN_GAIN: waiting a few milliseconds on estimates
        that noisy gains nothing and costs a round through the queue. (A plain loop: this runs for every
        request, and for every waiter of the window on every release.)"""
        best = best_idle = None
        best_done = idle_done = math.inf
        for i, (backend, free_at, per_unit, idle) in enumerate(rows):
            if id(backend) in exclude:
                continue
            done = free_at + units * per_unit
            if done < best_done or (done == best_done and idle):
                best, best_done = i, done
            if idle and done < idle_done:
                best_idle, idle_done = i, done
        if best is not None and best_idle is not None and idle_done - best_done <= HOLD_MIN_GAIN:
            return best_idle
        return best

    def _bind(
        self, queue: ModelQueue, window: list[Waiter], waiter: Waiter, backend: Backend, now: float, speed: float
    ) -> None:
        for ahead in itertools.takewhile(lambda w: w is not waiter, window):
            ahead.skipped += 1
        queue.served(waiter)
        self._take(backend, waiter.units, now, speed)
        waiter.future.set_result(backend)

    @staticmethod
    def _take(backend: Backend, units: float, now: float, speed: float) -> None:
        backend.inflight += 1
        backend.expected_ends.append(now + backend.expected_seconds(units, speed))
