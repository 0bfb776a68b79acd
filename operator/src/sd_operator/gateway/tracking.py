"""Request state for `GET /v1/requests/{id}`: a caller names its request (`X-Request-Id`) and polls how far it is.

Entries are keyed by tenant and id, so a caller reads only its own requests (another key's id is simply
unknown) and two tenants' ids never collide. Finished entries are kept a while for the last poll, within a
bound: the tracker never grows with traffic.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sd_operator.gateway.dispatch import Backend

HEADER = "X-Request-Id"
VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # a UUID, or any short token; nothing that needs escaping
KEEP_SECONDS = 600.0  # a finished request's state stays readable this long
MAX_ENTRIES = 10_000


@dataclass(eq=False)
class Tracked:
    tenant: str
    request_id: str
    created: float
    state: str = "queued"  # queued | running | done | failed
    model: str | None = None
    backend: Backend | None = None
    ended: float | None = None
    status: int | None = None

    @property
    def ticket(self) -> str:
        """The request's name in the dispatcher's queue: unique across tenants."""
        return f"{self.tenant}\x00{self.request_id}"


def valid_id(value: str | None) -> str | None:
    return value if value is not None and VALID_ID.match(value) else None


class RequestTracker:
    def __init__(
        self,
        keep_seconds: float = KEEP_SECONDS,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keep_seconds, self.max_entries, self.clock = keep_seconds, max_entries, clock
        self.entries: OrderedDict[tuple[str, str], Tracked] = OrderedDict()

    def begin(self, tenant: str, request_id: str | None) -> Tracked | None:
        """Starts tracking a request (None without a usable id). A second request with the same id
        replaces the first one's entry: the id names the caller's latest request."""
        if valid_id(request_id) is None:
            return None
        assert request_id is not None
        now = self.clock()
        self._expire(now)
        tracked = Tracked(tenant, request_id, now)
        key = (tenant, request_id)
        self.entries.pop(key, None)
        self.entries[key] = tracked
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return tracked

    def get(self, tenant: str, request_id: str) -> Tracked | None:
        self._expire(self.clock())
        return self.entries.get((tenant, request_id))

    def end(self, tracked: Tracked | None, status: int | None) -> None:
        """Done on a 2xx answer; failed on anything else, or when the caller went away (status None)."""
        if tracked is None:
            return
        tracked.state = "done" if status is not None and 200 <= status < 300 else "failed"
        tracked.status, tracked.ended, tracked.backend = status, self.clock(), None

    def _expire(self, now: float) -> None:
        # Entries are in creation order; a finished one older than keep_seconds goes. Scanning stops at the
        # first entry young enough, so the cost is what expires (plus one).
        for key, tracked in list(self.entries.items()):
            if now - tracked.created < self.keep_seconds:
                break
            if tracked.ended is not None or now - tracked.created > 4 * self.keep_seconds:
                del self.entries[key]


def describe(
    tracked: Tracked | None,
    queue: tuple[int, int, float] | None,
    depth: int,
    progress: dict[str, Any] | None,
) -> dict[str, Any]:
    """The answer of GET /v1/requests/{id} (pure): `queue` is the dispatcher's (position, depth, wait) while
    the request waits, `depth` the model's queue depth otherwise, `progress` the instance's
    /sdapi/v1/progress answer while it renders."""
    out: dict[str, Any] = {"state": "unknown", "position": None, "queueDepth": depth, "progress": None}
    out["etaSeconds"] = None
    if tracked is None:
        return out
    out["state"] = tracked.state
    out["model"] = tracked.model
    if tracked.state == "queued" and queue is not None:
        position, queue_depth, wait = queue
        out.update(position=position, queueDepth=queue_depth, progress=0.0, etaSeconds=round(wait, 1))
    elif tracked.state == "running":
        out["instance"] = tracked.backend.instance or tracked.backend.url if tracked.backend else None
        if progress is not None:
            value = progress.get("progress")
            eta = progress.get("eta_relative")
            if isinstance(value, int | float):
                out["progress"] = round(min(max(float(value), 0.0), 1.0), 4)
            if isinstance(eta, int | float) and eta >= 0:
                out["etaSeconds"] = round(float(eta), 1)
    elif tracked.state == "done":
        out.update(progress=1.0, etaSeconds=0.0)
    if tracked.status is not None:
        out["status"] = tracked.status
    return out
