"""Log formats: plain lines for a terminal, JSON lines (with `extra=` fields) for a log pipeline."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from sd_operator import cli, logs


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("sd_operator.gateway", logging.WARNING, __file__, 1, "backend %s ejected", ("u",), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_level_logger_message_and_extra_fields() -> None:
    doc = json.loads(logs.JsonFormatter().format(_record(model="sd15", seconds=1.5)))
    assert doc["level"] == "warning" and doc["logger"] == "sd_operator.gateway"
    assert doc["message"] == "backend u ejected"
    assert doc["model"] == "sd15" and doc["seconds"] == 1.5
    assert doc["time"].endswith("+00:00")
    assert "args" not in doc and "msg" not in doc  # the record's own attributes stay out


def test_json_lines_include_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record()
        record.exc_info = sys.exc_info()
    doc = json.loads(logs.JsonFormatter().format(record))
    assert "ValueError: boom" in doc["exception"]


def _sd_operator(*args: str, env_format: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SD_LOG_FORMAT": env_format or ""}
    code = "import sys, logging; from sd_operator import cli; sys.argv[0] = 'sd-operator'; " + (
        "cli.main(sys.argv[1:]); logging.getLogger('sd_operator.test').info('hello')"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_the_cli_logs_json_when_asked_by_flag_or_environment() -> None:
    by_flag = _sd_operator("--log-format", "json", "version")
    assert json.loads(by_flag.stderr.strip().splitlines()[-1])["message"] == "hello"
    by_env = _sd_operator("version", env_format="json")
    assert json.loads(by_env.stderr.strip().splitlines()[-1])["logger"] == "sd_operator.test"
    plain = _sd_operator("version")
    assert plain.stderr.strip().endswith("INFO sd_operator.test: hello")


def test_a_bad_log_format_in_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["version"])
    assert "SD_LOG_FORMAT" in str(exit_info.value.code)
