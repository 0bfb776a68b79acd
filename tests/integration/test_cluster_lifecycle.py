"""`cluster-up` / `cluster-down` as a person runs them: the real script, a fleet file, ports freed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from cluster_support import ROOT

SCRIPT = ROOT / "tools" / "cluster" / "localcluster.py"


def _free_port_base() -> int:
    # Six consecutive free ports; probe a few bases in a high range.
    for base in range(31000, 32000, 17):
        ok = True
        for port in range(base, base + 6):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise AssertionError("no six consecutive free ports")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_with_a_fleet_file_then_down_leaves_nothing(tmp_path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "nodes:\n"
        "  - {name: big, count: 3, gpu: {count: 2, product: NVIDIA-A100-SXM4-80GB, memoryMiB: 81920}}\n"
        "  - {name: small, count: 1}\n"
    )
    base = _free_port_base()
    args = [
        sys.executable,
        str(SCRIPT),
        "--workdir",
        str(tmp_path / "c"),
        "--fleet",
        str(fleet),
        "--port-base",
        str(base),
    ]
    up = subprocess.run([*args[:2], "up", *args[2:]], capture_output=True, text=True, check=False)
    assert up.returncode == 0, up.stderr
    try:
        kubectl = [str(ROOT / ".local" / "bin" / "kubectl"), f"--kubeconfig={tmp_path / 'c' / 'kubeconfig'}"]
        nodes = json.loads(
            subprocess.run([*kubectl, "get", "nodes", "-o", "json"], capture_output=True, text=True, check=True).stdout
        )["items"]
        names = sorted(n["metadata"]["name"] for n in nodes)
        assert names == ["big-0", "big-1", "big-2", "small-0"]
        big = next(n for n in nodes if n["metadata"]["name"] == "big-0")
        assert big["status"]["allocatable"]["nvidia.com/gpu"] == "2"
        assert big["metadata"]["labels"]["nvidia.com/gpu.memory"] == "81920"
        state = json.loads((tmp_path / "c" / "state.json").read_text())
        pids = list(state["pids"].values())
        # Every component's port answers; etcd's peer port is unused alone, the model host's runs with --runner.
        listening = {k: _listening(p) for k, p in state["ports"].items() if k not in ("etcd_peer", "models")}
        assert len(pids) == 5 and all(listening.values()), listening
    finally:
        down = subprocess.run([*args[:2], "down", *args[2:]], capture_output=True, text=True, check=False)
    assert down.returncode == 0, down.stderr
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z", f"pid {pid} still runs"
    assert not any(_listening(p) for p in range(base, base + 6))


def test_stop_and_start_the_api_server_of_a_running_cluster(tmp_path) -> None:
    """`stop-component kube-apiserver` frees its port while etcd keeps running; `start-component` brings
    it back on the same port, answering with the objects it had (an API server outage, for fault tests)."""
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("nodes:\n  - {name: n, count: 1}\n")
    base = _free_port_base()
    args = [sys.executable, str(SCRIPT)]
    opts = ["--workdir", str(tmp_path / "c"), "--fleet", str(fleet), "--port-base", str(base)]
    kubectl = [str(ROOT / ".local" / "bin" / "kubectl"), f"--kubeconfig={tmp_path / 'c' / 'kubeconfig'}"]

    def run(*action: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args, *action, *opts], capture_output=True, text=True, check=False)

    up = run("up")
    assert up.returncode == 0, up.stderr
    try:
        state = json.loads((tmp_path / "c" / "state.json").read_text())
        apiserver, etcd = state["ports"]["apiserver"], state["ports"]["etcd_client"]
        etcd_pid = state["pids"]["etcd"]
        made = subprocess.run([*kubectl, "create", "namespace", "kept"], capture_output=True, text=True, check=False)
        assert made.returncode == 0, made.stderr

        stopped = run("stop-component", "kube-apiserver")
        assert stopped.returncode == 0, stopped.stderr
        assert not _listening(apiserver) and _listening(etcd)
        status = run("status").stdout
        assert "kube-apiserver             stopped" in status and "etcd                       running" in status
        down_api = subprocess.run([*kubectl, "get", "ns", "--request-timeout=2s"], capture_output=True, check=False)
        assert down_api.returncode != 0
        state = json.loads((tmp_path / "c" / "state.json").read_text())
        assert "kube-apiserver" not in state["pids"] and state["stopped"] == ["kube-apiserver"]

        started = run("start-component", "kube-apiserver")
        assert started.returncode == 0, started.stderr
        assert _listening(apiserver)
        got = subprocess.run([*kubectl, "get", "ns", "kept", "-o", "name"], capture_output=True, text=True, check=False)
        assert got.returncode == 0 and got.stdout.strip() == "namespace/kept", got.stderr
        state = json.loads((tmp_path / "c" / "state.json").read_text())
        # Same etcd; the API server recorded again, in the components' order (`down` stops in reverse).
        assert state["pids"]["etcd"] == etcd_pid and state["stopped"] == []
        assert list(state["pids"]) == ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"]
        assert "stopped" not in run("status").stdout
        again = run("start-component", "kube-apiserver")
        assert again.returncode == 1 and "already running" in again.stderr
        unknown = run("stop-component", "nope")
        assert unknown.returncode == 1 and "unknown component" in unknown.stderr
    finally:
        down = run("down")
    assert down.returncode == 0, down.stderr
    assert not any(_listening(p) for p in range(base, base + 6))
