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
