"""The local pod runner's preStop hooks, as the kubelet runs them when a container stops: the hook first
(httpGet to the pod's IP on a named or numbered port, or exec), bounded by the grace period, then SIGTERM
with what is left of it (at least 2 s), then SIGKILL; a failed hook does not keep the container running."""

from __future__ import annotations

import http.server
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import podrunner
from podplan import (
    DEFAULT_GRACE_SECONDS,
    MIN_STOP_SECONDS,
    Hook,
    PodError,
    grace_period,
    pre_stop_hook,
    remaining_grace,
)

WEBUI = {
    "name": "webui",
    "ports": [{"name": "http", "containerPort": 7861, "protocol": "TCP"}, {"containerPort": 9000}],
    "lifecycle": {"preStop": {"httpGet": {"path": "/sd-operator/drain", "port": "http"}}},
}


# -- the pure parts (podplan) -----------------------------------------------------------------------------


def test_http_get_hook_goes_to_the_pod_ip_on_the_named_port() -> None:
    assert pre_stop_hook(WEBUI, "10.244.128.7") == Hook("httpGet", url="http://10.244.128.7:7861/sd-operator/drain")


def test_http_get_hook_numbered_port_scheme_host_headers_and_default_path() -> None:
    handler = {
        "port": 9000,
        "scheme": "HTTPS",
        "host": "127.0.0.1",
        "httpHeaders": [{"name": "X-Why", "value": "scale-down"}],
    }
    container = {**WEBUI, "lifecycle": {"preStop": {"httpGet": handler}}}
    hook = pre_stop_hook(container, "10.244.128.7")
    assert hook == Hook("httpGet", url="https://127.0.0.1:9000/", headers={"X-Why": "scale-down"})
    string_port = {**WEBUI, "lifecycle": {"preStop": {"httpGet": {"port": "9000", "path": "/x"}}}}
    assert pre_stop_hook(string_port, "10.0.0.1") == Hook("httpGet", url="http://10.0.0.1:9000/x")


def test_exec_and_sleep_hooks() -> None:
    container = {"name": "c", "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "sleep 1"]}}}}
    assert pre_stop_hook(container, "10.0.0.1") == Hook("exec", command=["sh", "-c", "sleep 1"])
    container = {"name": "c", "lifecycle": {"preStop": {"sleep": {"seconds": 5}}}}
    assert pre_stop_hook(container, "10.0.0.1") == Hook("sleep", seconds=5.0)


@pytest.mark.parametrize("container", [{"name": "c"}, {"name": "c", "lifecycle": {}}, {"lifecycle": {"postStart": {}}}])
def test_no_hook(container: dict[str, Any]) -> None:
    assert pre_stop_hook(container, "10.0.0.1") is None


def test_unknown_port_name_or_handler_is_a_hook_failure() -> None:
    bad_port = {**WEBUI, "lifecycle": {"preStop": {"httpGet": {"path": "/", "port": "metrics"}}}}
    with pytest.raises(PodError, match="preStop hook port 'metrics'") as err:
        pre_stop_hook(bad_port, "10.0.0.1")
    assert err.value.reason == "FailedPreStopHook"
    with pytest.raises(PodError, match="unsupported preStop handler"):
        pre_stop_hook({"lifecycle": {"preStop": {"tcpSocket": {"port": 80}}}}, "10.0.0.1")


@pytest.mark.parametrize(
    ("metadata", "spec", "seconds"),
    [
        ({"deletionGracePeriodSeconds": 45}, {"terminationGracePeriodSeconds": 120}, 45.0),  # what the delete asked
        ({"deletionGracePeriodSeconds": 0}, {"terminationGracePeriodSeconds": 120}, 0.0),  # force deletion
        ({}, {"terminationGracePeriodSeconds": 120}, 120.0),
        ({}, {}, DEFAULT_GRACE_SECONDS),
    ],
)
def test_grace_period(metadata: dict[str, Any], spec: dict[str, Any], seconds: float) -> None:
    assert grace_period({"metadata": metadata, "spec": spec}) == seconds


@pytest.mark.parametrize(
    ("grace", "hook", "left"),
    [(120, 0, 120), (120, 30.5, 89.5), (120, 119, MIN_STOP_SECONDS), (120, 500, MIN_STOP_SECONDS), (0, 0, 2)],
)
def test_remaining_grace_after_the_hook(grace: float, hook: float, left: float) -> None:
    assert remaining_grace(grace, hook) == pytest.approx(left)


# -- a container stopped by the runner ----------------------------------------------------------------------

# Records SIGTERM's arrival, then exits.
PROCESS = textwrap.dedent(
    """
    import signal, sys, time
    def term(*_):
        open(sys.argv[1], "w").write(repr(time.monotonic()))
        sys.exit(0)
    signal.signal(signal.SIGTERM, term)
    print("up", flush=True)
    while True:
        time.sleep(0.05)
    """
)


class Hooked:
    """An HTTP server standing in for the container's drain route: records when it was called and answers
    after `delay` seconds."""

    def __init__(self, delay: float) -> None:
        hooked = self
        self.calls: list[tuple[str, float, float]] = []  # (path, called, answered)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                called = time.monotonic()
                time.sleep(delay)
                body = b'{"status": "drained"}'
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the runner gave up waiting
                    pass
                hooked.calls.append((self.path, called, time.monotonic()))

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooked() -> Iterator[Any]:
    servers: list[Hooked] = []

    def make(delay: float) -> Hooked:
        servers.append(Hooked(delay))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def container(tmp_path: Path, spec: dict[str, Any]) -> tuple[podrunner.Container, Path]:
    """A runner Container with a running process (its own process group, as the runner starts them)."""
    worker = SimpleNamespace(dir=tmp_path / "pod", logs=tmp_path / "logs", key="team-a/sd-a-0", name="sd-a-0")
    worker.ip = "127.0.0.1"
    worker.logs.mkdir(parents=True)
    c = podrunner.Container(worker, spec, init=False)
    termed = tmp_path / "sigterm"
    c.proc = subprocess.Popen(
        [sys.executable, "-c", PROCESS, str(termed)], stdout=subprocess.PIPE, start_new_session=True
    )
    assert c.proc.stdout is not None and c.proc.stdout.readline() == b"up\n"
    c.state = {"running": {"startedAt": podrunner.now()}}
    return c, termed


def webui_on(port: int) -> dict[str, Any]:
    return {**WEBUI, "image": "webui", "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}]}


def test_the_hook_runs_to_its_end_before_sigterm(tmp_path: Path, hooked: Any) -> None:
    server = hooked(delay=0.5)
    c, termed = container(tmp_path, webui_on(server.port))
    started = time.monotonic()
    c.terminate(30)
    (path, called, answered) = server.calls[0]
    assert path == "/sd-operator/drain" and called >= started
    assert float(termed.read_text()) >= answered, "SIGTERM came before the preStop hook had answered"
    assert c.proc is None and c.state["terminated"]["exitCode"] == 0
    assert time.monotonic() - started < 5


def test_a_hook_that_overruns_the_grace_period_is_cut_short(tmp_path: Path, hooked: Any) -> None:
    server = hooked(delay=4)
    c, termed = container(tmp_path, webui_on(server.port))
    started = time.monotonic()
    c.terminate(1)
    assert 1 <= float(termed.read_text()) - started < 3  # the hook had 1 s, then SIGTERM at once
    assert c.state["terminated"]["exitCode"] == 0


def test_a_failing_hook_does_not_keep_the_container(tmp_path: Path, hooked: Any) -> None:
    server = hooked(delay=0)
    port = server.port
    server.close()  # nothing listens: connection refused
    c, termed = container(tmp_path, webui_on(port))
    c.terminate(30)
    assert termed.exists() and c.state["terminated"]["exitCode"] == 0


def test_no_hook_when_the_grace_period_is_zero(tmp_path: Path, hooked: Any) -> None:
    server = hooked(delay=0)
    c, termed = container(tmp_path, webui_on(server.port))
    c.terminate(0)
    assert server.calls == [] and termed.exists()  # SIGTERM, still MIN_STOP_SECONDS before SIGKILL
