"""What this process last wrote into each object's status, and one lock per object.

Status is derived from indexes in kopf's handler threads (events of different children run in
parallel). Holding the object's lock while deriving and writing means an older view never overwrites
a newer one, and remembering the last write skips patches that would change nothing while the
index still lags behind this process's own writes.
"""

from __future__ import annotations

import threading
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
