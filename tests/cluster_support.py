"""What the test suites share about clusters: the session's cluster handle and the operator process.

Kept out of conftest.py so that suites with a conftest.py of their own (tests/e2e) import it by a
name that is not ambiguous.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Cluster:
    kubeconfig: Path
    api: client.ApiClient
    local: object | None  # the LocalCluster when this session started it

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api)

    def kwok_nodes(self) -> list[client.V1Node]:
        nodes = self.core.list_node().items
        return [n for n in nodes if (n.metadata.annotations or {}).get("kwok.x-k8s.io/node") == "fake"]


def cluster_from_kubeconfig() -> Cluster | None:
    """The cluster named by KUBECONFIG (its first file), or None when that is unset."""
    named = os.environ.get("KUBECONFIG")
    if not named:
        return None
    path = Path(named.split(os.pathsep)[0])
    return Cluster(path, config.new_client_from_config(config_file=str(path)), None)


@dataclass
class Operator:
    process: subprocess.Popen
    metrics_url: str
    liveness_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_operator(cluster: Cluster, log_path: Path, *extra: str, env: dict[str, str] | None = None) -> Operator:
    """`sd-operator run` as a real process against the test cluster (standalone unless `extra` peers it)."""
    metrics_port, liveness_port = free_port(), free_port()
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "SD_OPERATOR_IMAGE": "sd-operator:test", **(env or {})}
    log = log_path.open("ab")
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "sd-operator"),
            "run",
            "--all-namespaces",
            *([] if any(a.startswith("--peering") for a in extra) else ["--standalone"]),
            f"--metrics-port={metrics_port}",
            f"--liveness=http://127.0.0.1:{liveness_port}/healthz",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    log.close()
    op = Operator(
        process, f"http://127.0.0.1:{metrics_port}/metrics", f"http://127.0.0.1:{liveness_port}/healthz", log_path
    )

    def alive() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the operator exited: {op.log()[-2000:]}")
        try:
            return requests.get(op.liveness_url, timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(alive, timeout=60, what="the operator's liveness endpoint")
    return op


def stop_operator(op: Operator) -> None:
    if op.process.poll() is None:
        os.killpg(op.process.pid, signal.SIGTERM)
        try:
            op.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(op.process.pid, signal.SIGKILL)
            op.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_when_back(request: Callable[[], object], timeout: float = 120) -> None:
    """Sends a write until the API server takes it (a 409: an earlier attempt that timed out went through)."""

    def attempt() -> bool:
        try:
            request()
        except ApiException as e:
            if e.status == 409:
                return True
            if e.status >= 500:
                return False
            raise
        except urllib3.exceptions.HTTPError:  # refused, reset, timed out: the API server still away
            return False
        return True

    wait_for(attempt, timeout=timeout, interval=0.5, what="the API server to take a write")


def wait_control_plane_settled(cluster: Cluster, timeout: float = 150) -> None:
    """After an API server or etcd outage, waits until the controller-manager works again: a new
    namespace gets its default ServiceAccount. The controller-manager and the scheduler reconnect by
    themselves, but client-go's reflectors back off up to 30 s between attempts; a test that stopped a
    component waits for this so that the next test does not meet a half-recovered cluster."""
    core = cluster.core
    name = f"settle-{uuid.uuid4().hex[:8]}"

    def has_default_sa() -> bool:
        try:
            core.read_namespaced_service_account("default", name)
            return True
        except ApiException as e:
            if e.status == 404 or e.status >= 500:
                return False
            raise

    write_when_back(
        lambda: core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name))), timeout=timeout
    )
    try:
        wait_for(has_default_sa, timeout=timeout, interval=0.5, what="the controller-manager to serve again")
    finally:
        core.delete_namespace(name)
