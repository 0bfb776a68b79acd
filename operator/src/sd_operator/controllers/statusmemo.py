"""What this process last wrote into each object (its status, the children it applied), one lock per
object, and the bookkeeping of delayed calls (coalesced status refreshes, retries).

Status is derived from indexes in kopf's handler threads (events of different children run in
parallel). Holding the object's lock while deriving and writing means an older view never overwrites
a newer one, and remembering the last write skips patches that would change nothing while the
index still lags behind this process's own writes. Remembering the hash of every child applied for
the object's generation skips applies that would change nothing (no I/O here: pure bookkeeping).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

Key = tuple[str, str]


class StatusMemo:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Key, threading.Lock] = {}
        self._written: dict[Key, dict[str, Any]] = {}

    def lock(self, key: Key) -> threading.Lock:
        """The lock to hold while deriving and writing the status of `key`."""
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def last(self, key: Key) -> dict[str, Any]:
        """The fields this process wrote (merged over time); empty when it wrote none."""
        with self._guard:
            return dict(self._written.get(key, {}))

    def remember(self, key: Key, fields: dict[str, Any]) -> None:
        with self._guard:
            self._written[key] = {**self._written.get(key, {}), **fields}

    def forget(self, key: Key) -> None:
        with self._guard:
            self._written.pop(key, None)
            self._locks.pop(key, None)


@dataclass
class Applied:
    """The children applied for one object: its uid and generation then, and each child's rendered hash."""

    uid: str
    generation: int | None
    hashes: dict[str, str] = field(default_factory=dict)
    complete: bool = False  # every child of this generation applied


def children_to_apply(
    rendered: Mapping[str, str], applied: Applied | None, uid: str, generation: int | None
) -> list[str]:
    """The children (ids, in rendering order) a reconcile applies, given their rendered hashes.

    All of them on first sight (after a start nothing is known about the live children), for a new uid
    (an object deleted and created again under the same name) and for a new generation: a spec change
    re-applies every child. Within a generation only the children whose rendering changed (the owner's
    labels, say), whose apply has not succeeded yet, or that were deleted since (AppliedMemo.lost)."""
    if applied is None or applied.uid != uid or applied.generation != generation:
        return list(rendered)
    return [child for child, digest in rendered.items() if applied.hashes.get(child) != digest]


class AppliedMemo:
    """Per object: the hashes of the children this process applied for its current generation."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._items: dict[Key, Applied] = {}

    def plan(self, key: Key, uid: str, generation: int | None, rendered: Mapping[str, str]) -> list[str]:
        with self._guard:
            return children_to_apply(rendered, self._items.get(key), uid, generation)

    def remember(self, key: Key, uid: str, generation: int | None, child: str, digest: str) -> None:
        """One child applied (call after the apply succeeded)."""
        with self._guard:
            item = self._items.get(key)
            if item is None or item.uid != uid or item.generation != generation:
                item = self._items[key] = Applied(uid, generation)
            item.hashes[child] = digest

    def completed(self, key: Key, uid: str, generation: int | None) -> None:
        """Every child of `generation` is applied (call when a reconcile applied all it planned)."""
        with self._guard:
            item = self._items.get(key)
            if item is None or item.uid != uid or item.generation != generation:
                item = self._items[key] = Applied(uid, generation)
            item.complete = True

    def lost(self, key: Key, child: str) -> None:
        """A child is gone (deleted by hand): the next reconcile applies it again."""
        with self._guard:
            item = self._items.get(key)
            if item is not None:
                item.hashes.pop(child, None)

    def observed(self, key: Key) -> int | None:
        """The generation whose children this process has all applied (the status's observedGeneration);
        None when it does not know one."""
        with self._guard:
            item = self._items.get(key)
            return item.generation if item is not None and item.complete else None

    def forget(self, key: Key) -> None:
        with self._guard:
            self._items.pop(key, None)


class Pending:
    """Keys with a delayed call scheduled (a debounce). A request for a key whose call is still pending
    joins that call, which reads the state when it runs and so covers the request, and postpones it to
    `quiet` seconds after the latest request, but never beyond `cap` seconds after the first: steps
    that follow each other quickly make one call. Times are the caller's (time.monotonic())."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._due: dict[Hashable, tuple[float, float]] = {}  # key -> (first request, due)

    def request(self, key: Hashable, now: float, quiet: float, cap: float | None = None) -> bool:
        """Records a request; True when the caller must schedule the call (at due(key))."""
        with self._guard:
            new = key not in self._due
            first = now if new else self._due[key][0]
            self._due[key] = (first, min(first + (quiet if cap is None else cap), now + quiet))
            return new

    def due(self, key: Hashable) -> float | None:
        with self._guard:
            return self._due[key][1] if key in self._due else None

    def release_if_due(self, key: Hashable, now: float) -> float | None:
        """At the scheduled time: None (the key is released: make the call now, and a request from now on
        schedules another), or the seconds still to wait when requests postponed it."""
        with self._guard:
            if key not in self._due:
                return None
            wait = self._due[key][1] - now
            if wait > 0:
                return wait
            del self._due[key]
            return None

    def __contains__(self, key: object) -> bool:
        with self._guard:
            return key in self._due


class Backoff:
    """Exponential delays between retries of one key's failed work: first, 2x first, ... up to cap."""

    def __init__(self, first: float = 1.0, cap: float = 60.0) -> None:
        self.first, self.cap = first, cap
        self._guard = threading.Lock()
        self._failures: dict[Hashable, int] = {}

    def failed(self, key: Hashable) -> float:
        """Records a failure; returns the delay before the next attempt."""
        with self._guard:
            n = self._failures[key] = self._failures.get(key, 0) + 1
        return min(self.cap, self.first * 2 ** (n - 1))

    def succeeded(self, key: Hashable) -> None:
        with self._guard:
            self._failures.pop(key, None)
