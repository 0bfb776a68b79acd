"""Logging set-up shared by the long-running subcommands: plain lines for a terminal, JSON lines for a
cluster's log pipeline (one object per line: time, level, logger, message, and any `extra=` fields)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

FORMATS = ("plain", "json")
# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (test runners swap it meanwhile)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def format_of(args: argparse.Namespace | None = None) -> str:
    """--log-format when the top-level CLI parsed one, else $SD_LOG_FORMAT, else plain."""
    return getattr(args, "log_format", None) or os.environ.get("SD_LOG_FORMAT") or "plain"


def setup(fmt: str = "plain", level: int = logging.INFO) -> None:
    """Sends the root logger's records to stderr in `fmt` (a second call replaces the first one's handler,
    and leaves handlers that others installed alone)."""
    handler = _StderrHandler()
    handler.set_name("sd-operator")
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "sd-operator"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
