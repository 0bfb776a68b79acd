"""The container's termination message: the one line `kubectl describe` and the controllers show."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

DEFAULT_PATH = "/dev/termination-log"
MAX_CHARS = 4000  # Kubernetes keeps at most 4 KiB of it


def write_termination_message(line: str, env: Mapping[str, str] = os.environ) -> None:
    """Writes `line` to SD_TERMINATION_LOG, else to /dev/termination-log when it exists (only in a pod:
    outside one it is never created)."""
    path = env.get("SD_TERMINATION_LOG")
    if path is None and os.path.exists(DEFAULT_PATH):
        path = DEFAULT_PATH
    if path:
        with contextlib.suppress(OSError):  # read-only or gone: the log line still says it
            Path(path).write_text(line[:MAX_CHARS] + "\n", encoding="utf-8")
