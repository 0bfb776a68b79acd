"""A real local Kubernetes control plane on 127.0.0.1, for development and tests.

Starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (fake nodes and pod
lifecycle) as plain processes built from pinned Go modules (tools/build-tools.sh), writes a
kubeconfig, creates the fake node fleet and waits until the nodes are Ready.

Everything is configurable (work directory, binaries, ports, fleet, pod and service CIDRs) so the
same cluster can run several times side by side (a `make dev` cluster and a test session), or inside
a network namespace later. Nothing listens on anything but the configured host (127.0.0.1).

    python tools/cluster/localcluster.py up [--fleet FILE] [--workdir DIR] [--port-base N]
    python tools/cluster/localcluster.py down|status [--workdir DIR]
    python tools/cluster/localcluster.py stop-component|start-component NAME [--workdir DIR]

`stop-component` / `start-component` stop and start one component of a running cluster (an API
server or etcd outage, for fault tests), with the command line and ports `up` used.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DEFAULT_WORKDIR = ROOT / ".local" / "cluster"
DEFAULT_BINDIR = ROOT / ".local" / "bin"
DEFAULT_FLEET = HERE / "fleet.yaml"
KWOK_STAGES = HERE / "kwok-stages.yaml"

# The order matters: each component needs the ones before it.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# With --runner: pods on the fleet's nodes run as local processes (podrunner.py), and a stand-in model
# host serves the checkpoints their init containers download (modelserver.py).
RUNNER_COMPONENTS = ("modelserver", "podrunner")
RUNNER_ANNOTATION = "local.sd-operator.dev/runner"
STORAGE_CLASS = {
    "apiVersion": "storage.k8s.io/v1",
    "kind": "StorageClass",
    "metadata": {"name": "local", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
    "provisioner": "local.sd-operator.dev/runner",
    "reclaimPolicy": "Delete",
    "volumeBindingMode": "Immediate",
}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


class ClusterError(RuntimeError):
    """The local cluster could not be started or stopped; the message says which component and why."""


@dataclass
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int
    models: int

    @classmethod
    def from_base(cls, base: int) -> Ports:
        return cls(*range(base, base + 7))

    @classmethod
    def free(cls, host: str) -> Ports:
        """Ports the kernel reports free right now (for test sessions beside a dev cluster)."""
        with contextlib.ExitStack() as stack:
            socks = [stack.enter_context(socket.socket()) for _ in range(7)]
            for s in socks:
                s.bind((host, 0))
            return cls(*(s.getsockname()[1] for s in socks))

    def all(self) -> list[int]:
        return list(asdict(self).values())


@dataclass
class ClusterConfig:
    workdir: Path = DEFAULT_WORKDIR
    bindir: Path = DEFAULT_BINDIR
    host: str = "127.0.0.1"
    ports: Ports = field(default_factory=lambda: Ports.from_base(16440))
    fleet_file: Path = DEFAULT_FLEET
    # Pod IPs are fictitious under kwok: never connect to them from the host.
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/16"
    start_timeout: float = 60.0
    # Extra flags per component, e.g. {"kube-apiserver": ["--audit-log-path=..."]} for benchmarks.
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    # Run the fleet's pods as local processes (needs a loopback-only network namespace: tools/netns.sh).
    runner: bool = False

    @property
    def components(self) -> tuple[str, ...]:
        return COMPONENTS + (RUNNER_COMPONENTS if self.runner else ())

    @property
    def pod_ranges(self) -> tuple[str, str]:
        """kwok's half of the pod CIDR and the runner's, so their addresses never collide."""
        kwok, runner = ipaddress.ip_network(self.pod_cidr).subnets(prefixlen_diff=1)
        return str(kwok), str(runner)

    @property
    def model_url(self) -> str:
        return f"http://{self.host}:{self.ports.models}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def state_file(self) -> Path:
        return self.workdir / "state.json"

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.ports.apiserver}"


# ---------------------------------------------------------------------------------------------
# Fleet: the fake nodes


def load_fleet(path: Path, runner: bool = False) -> list[dict]:
    """Reads a fleet file and returns the Node manifests it describes (run by kwok, or by the runner)."""
    doc = yaml.safe_load(path.read_text()) or {}
    nodes = []
    for group in doc.get("nodes", []):
        for i in range(int(group.get("count", 1))):
            nodes.append(render_node(f"{group['name']}-{i}", group, runner))
    names = [n["metadata"]["name"] for n in nodes]
    if len(names) != len(set(names)):
        raise ClusterError(f"fleet {path}: node names are not unique: {sorted(names)}")
    return nodes


def render_node(name: str, group: dict, runner: bool = False) -> dict:
    """A fake Node with the resources, labels and taints of a GPU (or CPU-only) machine; kwok keeps it
    and its pods, or (runner) podrunner.py, which runs the pods as processes."""
    resources = {
        "cpu": str(group.get("cpu", "8")),
        "memory": str(group.get("memory", "32Gi")),
        "pods": str(group.get("pods", "110")),
        "ephemeral-storage": str(group.get("ephemeralStorage", "500Gi")),
    }
    labels = {
        "type": "kwok",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        **{str(k): str(v) for k, v in (group.get("labels") or {}).items()},
    }
    # No kwok taint: this cluster has no real nodes to protect, and workloads must schedule exactly as
    # they would on real GPU nodes (which carry only the GPU taint).
    taints = []
    gpu = group.get("gpu")
    if gpu:
        resource = gpu.get("resource", "nvidia.com/gpu")
        resources[resource] = str(gpu.get("count", 1))
        labels.update(
            {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.count": str(gpu.get("count", 1)),
                "nvidia.com/gpu.product": str(gpu["product"]),
                "nvidia.com/gpu.memory": str(gpu["memoryMiB"]),
            }
        )
        if gpu.get("taint", True):
            taints.append(GPU_TAINT)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {
                (RUNNER_ANNOTATION if runner else "kwok.x-k8s.io/node"): "true" if runner else "fake",
                "node.alpha.kubernetes.io/ttl": "0",
            },
        },
        "spec": {"taints": taints},
        "status": {"allocatable": resources, "capacity": dict(resources)},
    }


# ---------------------------------------------------------------------------------------------
# PKI and kubeconfig


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ClusterError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def ensure_pki(cfg: ClusterConfig) -> None:
    """A CA, a serving cert for the apiserver, an admin client cert and the service-account keys."""
    p = cfg.pki
    if (p / "complete").exists():
        return
    shutil.rmtree(p, ignore_errors=True)
    p.mkdir(parents=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=sd-operator-local-ca",
        cwd=p,
    )
    sans = f"IP:{cfg.host},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
    (p / "server.ext").write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
    (p / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subject, ext in (
        ("apiserver", "/CN=kube-apiserver", "server.ext"),
        ("admin", "/O=system:masters/CN=admin", "client.ext"),
    ):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            subject,
            cwd=p,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            ext,
            "-out",
            f"{name}.crt",
            cwd=p,
        )
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=p)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=p)
    (p / "complete").touch()


def write_kubeconfig(cfg: ClusterConfig) -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "sd-local", "cluster": {"server": cfg.server, "certificate-authority": str(cfg.pki / "ca.crt")}}
        ],
        "users": [
            {
                "name": "sd-local-admin",
                "user": {
                    "client-certificate": str(cfg.pki / "admin.crt"),
                    "client-key": str(cfg.pki / "admin.key"),
                },
            }
        ],
        "contexts": [{"name": "sd-local", "context": {"cluster": "sd-local", "user": "sd-local-admin"}}],
        "current-context": "sd-local",
    }
    cfg.kubeconfig.write_text(yaml.safe_dump(doc, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Component command lines


def commands(cfg: ClusterConfig) -> dict[str, list[str]]:
    b, h, pt, pki, kc = cfg.bindir, cfg.host, cfg.ports, cfg.pki, str(cfg.kubeconfig)
    secure_serving = [
        f"--kubeconfig={kc}",
        f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}",
        f"--bind-address={h}",
        "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
        "--leader-elect=false",
    ]
    base = {
        "etcd": [
            str(b / "etcd"),
            "--name=default",
            f"--data-dir={cfg.workdir / 'etcd'}",
            f"--listen-client-urls=http://{h}:{pt.etcd_client}",
            f"--advertise-client-urls=http://{h}:{pt.etcd_client}",
            f"--listen-peer-urls=http://{h}:{pt.etcd_peer}",
            f"--initial-advertise-peer-urls=http://{h}:{pt.etcd_peer}",
            f"--initial-cluster=default=http://{h}:{pt.etcd_peer}",
            "--listen-metrics-urls=",
            # A throwaway cluster: durability is not worth an fsync per write.
            "--unsafe-no-fsync=true",
            "--auto-compaction-retention=1",
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ],
        "kube-apiserver": [
            str(b / "kube-apiserver"),
            f"--etcd-servers=http://{h}:{pt.etcd_client}",
            f"--bind-address={h}",
            # Required where there is no default route (a loopback-only network namespace).
            f"--advertise-address={h}",
            f"--secure-port={pt.apiserver}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=Node,RBAC",
            f"--service-cluster-ip-range={cfg.service_cidr}",
            f"--service-account-issuer={cfg.server}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--allow-privileged=true",
            # The 'kubernetes' Endpoints would hold 127.0.0.1, which endpoint validation rejects.
            "--endpoint-reconciler-type=none",
            # Benchmarks create hundreds of objects quickly; do not let local throttling skew them.
            "--max-requests-inflight=800",
            "--max-mutating-requests-inflight=400",
            "--profiling=false",
        ],
        "kube-controller-manager": [
            str(b / "kube-controller-manager"),
            *secure_serving,
            f"--secure-port={pt.controller_manager}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--use-service-account-credentials=false",
            "--controllers=*",
            "--node-monitor-grace-period=40s",
            "--kube-api-qps=500",
            "--kube-api-burst=1000",
            "--concurrent-gc-syncs=20",
        ],
        "kube-scheduler": [
            str(b / "kube-scheduler"),
            *secure_serving,
            f"--secure-port={pt.scheduler}",
            "--kube-api-qps=500",
            "--kube-api-burst=1000",
        ],
        "kwok": [
            str(b / "kwok"),
            f"--kubeconfig={kc}",
            f"--config={KWOK_STAGES}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--cidr={cfg.pod_ranges[0] if cfg.runner else cfg.pod_cidr}",
            f"--node-ip={h}",
            f"--node-port={pt.kwok}",
            f"--server-address={h}:{pt.kwok}",
            "--node-lease-duration-seconds=40",
        ],
        "modelserver": [
            sys.executable,
            str(HERE / "modelserver.py"),
            f"--host={h}",
            f"--port={pt.models}",
        ],
        "podrunner": [
            sys.executable,
            str(HERE / "podrunner.py"),
            f"--kubeconfig={kc}",
            f"--workdir={cfg.workdir / 'runner'}",
            f"--apiserver={h}:{pt.apiserver}",
            f"--ip-range={cfg.pod_ranges[1]}",
        ],
    }
    return {name: argv + cfg.extra_args.get(name, []) for name, argv in base.items()}


# ---------------------------------------------------------------------------------------------
# Processes


def loopback_only() -> bool:
    """Inside a network namespace whose only interface is lo (tools/netns.sh)."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()] == ["lo"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is not running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _ssl_context(cfg: ClusterConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cfg.pki / "ca.crt"))
    ctx.load_cert_chain(str(cfg.pki / "admin.crt"), str(cfg.pki / "admin.key"))
    return ctx


def _http_ok(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=ctx) as r:  # noqa: S310 - fixed local URL
            return r.status == 200
    except OSError:
        return False


class LocalCluster:
    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg

    # -- state -------------------------------------------------------------------------------

    def _state(self) -> dict:
        try:
            return json.loads(self.cfg.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _save_state(self, state: dict) -> None:
        self.cfg.state_file.write_text(json.dumps(state, indent=2))

    def running(self) -> dict[str, int]:
        return {name: pid for name, pid in self._state().get("pids", {}).items() if _pid_alive(pid)}

    # -- lifecycle ---------------------------------------------------------------------------

    def check_binaries(self) -> None:
        missing = [c for c in COMPONENTS if not (self.cfg.bindir / c).exists()]
        if missing:
            raise ClusterError(f"missing binaries in {self.cfg.bindir}: {', '.join(missing)} (run `make tools`)")

    def up(self) -> None:
        cfg = self.cfg
        self.check_binaries()
        if self.running():
            raise ClusterError(f"a cluster is already running from {cfg.workdir} (`make cluster-down` first)")
        if cfg.runner and not loopback_only():
            raise ClusterError("--runner needs a loopback-only network namespace: run this through tools/netns.sh")
        busy = [p for p in cfg.ports.all() if _port_open(cfg.host, p)]
        if busy:
            raise ClusterError(f"ports already in use on {cfg.host}: {busy}")
        (cfg.workdir / "logs").mkdir(parents=True, exist_ok=True)
        ensure_pki(cfg)
        write_kubeconfig(cfg)
        pids: dict[str, int] = {}
        state = {
            "ports": asdict(cfg.ports),
            "host": cfg.host,
            "pids": pids,
            "runner": cfg.runner,
            "extra_args": cfg.extra_args,
        }
        self._save_state(state)
        cmds = commands(cfg)
        try:
            for name in cfg.components:
                self._start_one(name, cmds[name], state)
            self.apply_fleet(load_fleet(cfg.fleet_file, cfg.runner))
            if cfg.runner:
                self.kubectl("apply", "-f", "-", input=json.dumps(STORAGE_CLASS))
            self._wait_nodes_ready()
            self._wait_default_service_account("default")
            if cfg.workdir == DEFAULT_WORKDIR:
                # The well-known path for the default cluster: .local/kubeconfig.
                link = DEFAULT_WORKDIR.parent / "kubeconfig"
                link.unlink(missing_ok=True)
                link.symlink_to(cfg.kubeconfig)
        except BaseException:
            self.down()
            raise

    def _start_one(self, name: str, cmd: list[str], state: dict) -> None:
        """Spawns one component, records its pid in the state file, and waits until it answers."""
        if name == "kwok":
            # Leases left from an earlier run make a restarted kwok stall before it manages nodes.
            self.kubectl("delete", "leases", "--all", "-n", "kube-node-lease", "--ignore-not-found", check=False)
        pids = state["pids"]
        pids[name] = self._spawn(name, cmd)
        # `down` stops in reverse order of `pids`: keep the components' order (also for a restarted one).
        ordered = {n: pids[n] for n in self.cfg.components if n in pids}
        pids.clear()
        pids.update(ordered)
        self._save_state(state)
        self._wait_component(name)

    def _running_config(self) -> tuple[dict, ClusterConfig]:
        """The state of the running cluster, and its configuration as `up` wrote it (ports, host, runner)."""
        state = self._state()
        if "pids" not in state:
            raise ClusterError(f"no cluster was started from {self.cfg.workdir}")
        cfg = self.cfg
        if "ports" in state:
            cfg = ClusterConfig(
                workdir=cfg.workdir,
                bindir=cfg.bindir,
                host=state.get("host", cfg.host),
                ports=Ports(**state["ports"]),
                fleet_file=cfg.fleet_file,
                pod_cidr=cfg.pod_cidr,
                service_cidr=cfg.service_cidr,
                start_timeout=cfg.start_timeout,
                extra_args=state.get("extra_args", cfg.extra_args),
                runner=state.get("runner", cfg.runner),
            )
        return state, cfg

    def stop_component(self, name: str, timeout: float = 15.0) -> None:
        """Stops one component of the running cluster (SIGTERM, then SIGKILL) and waits until its port is
        free; the others keep running. `start_component` brings it back with the same command line."""
        state, cfg = self._running_config()
        if name not in cfg.components:
            raise ClusterError(f"unknown component {name!r}; one of {', '.join(cfg.components)}")
        pid = state["pids"].get(name)
        if pid and _pid_alive(pid):
            _stop_group(pid, timeout)
            if _pid_alive(pid):
                raise ClusterError(f"could not stop {name} (pid {pid})")
        port = _component_port(cfg, name)
        if port is not None:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _port_open(cfg.host, port):
                time.sleep(0.1)
            if _port_open(cfg.host, port):
                raise ClusterError(f"port {port} still bound after stopping {name}")
        # Out of `pids` (a dead pid may be reused by another process), remembered as stopped for `status`.
        state["pids"].pop(name, None)
        state["stopped"] = sorted(set(state.get("stopped", [])) | {name})
        self._save_state(state)

    def start_component(self, name: str) -> None:
        """Starts one stopped component of the running cluster again, as `up` started it, and waits until
        it answers (etcd healthy, the API server ready, ...)."""
        state, cfg = self._running_config()
        if name not in cfg.components:
            raise ClusterError(f"unknown component {name!r}; one of {', '.join(cfg.components)}")
        pid = state["pids"].get(name)
        if pid and _pid_alive(pid):
            raise ClusterError(f"{name} is already running (pid {pid})")
        state["stopped"] = [n for n in state.get("stopped", []) if n != name]
        LocalCluster(cfg)._start_one(name, commands(cfg)[name], state)

    def _spawn(self, name: str, cmd: list[str]) -> int:
        log = open(self.cfg.workdir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        with log:
            # A session of its own: the component outlives this script, and `down` can stop its group.
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.cfg.workdir,
            )
        return proc.pid

    def _wait(self, what: str, check: Callable[[], bool], component: str | None = None) -> None:
        deadline = time.monotonic() + self.cfg.start_timeout
        while time.monotonic() < deadline:
            if check():
                return
            if component and component not in self.running():
                raise ClusterError(f"{component} exited while starting; see {self._log_tail(component)}")
            time.sleep(0.2)
        where = f"; see {self._log_tail(component)}" if component else ""
        raise ClusterError(f"timed out after {self.cfg.start_timeout:.0f}s waiting for {what}{where}")

    def _log_tail(self, component: str) -> str:
        path = self.cfg.workdir / "logs" / f"{component}.log"
        try:
            tail = path.read_text(errors="replace").strip().splitlines()[-5:]
        except FileNotFoundError:
            tail = []
        return f"{path}:\n  " + "\n  ".join(tail)

    def _wait_component(self, name: str) -> None:
        cfg, pt, h = self.cfg, self.cfg.ports, self.cfg.host
        if name == "etcd":
            self._wait("etcd health", lambda: _http_ok(f"http://{h}:{pt.etcd_client}/health"), name)
        elif name == "kube-apiserver":
            ctx = _ssl_context(cfg)
            self._wait("apiserver /readyz", lambda: _http_ok(f"{cfg.server}/readyz", ctx), name)
        elif name == "kube-controller-manager":
            self._wait("controller-manager", lambda: _port_open(h, pt.controller_manager), name)
        elif name == "kube-scheduler":
            self._wait("scheduler", lambda: _port_open(h, pt.scheduler), name)
        elif name == "kwok":
            self._wait("kwok", lambda: _port_open(h, pt.kwok), name)
        elif name == "modelserver":
            self._wait("model server", lambda: _port_open(h, pt.models), name)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.cfg.bindir / "kubectl"), f"--kubeconfig={self.cfg.kubeconfig}", *args]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, check=False)
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def apply_fleet(self, nodes: list[dict]) -> None:
        """Creates (or updates) fake nodes; used by `up` and by benchmarks that need a bigger fleet."""
        docs = yaml.safe_dump_all(nodes, sort_keys=False)
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=docs)

    def _wait_nodes_ready(self) -> None:
        def all_ready() -> bool:
            out = self.kubectl("get", "nodes", "-o", "json", check=False)
            if out.returncode != 0:
                return False
            items = json.loads(out.stdout)["items"]
            return bool(items) and all(
                any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
                for n in items
            )

        self._wait("all nodes Ready", all_ready, "podrunner" if self.cfg.runner else "kwok")

    def _wait_default_service_account(self, namespace: str) -> None:
        self._wait(
            f"ServiceAccount default in {namespace}",
            lambda: self.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode == 0,
            "kube-controller-manager",
        )

    def down(self, timeout: float = 15.0) -> None:
        """Stops every component (reverse order), then checks no process or port is left."""
        state = self._state()
        pids = state.get("pids", {})
        for name in reversed(list(pids)):
            pid = pids.get(name)
            if pid and _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids.values()):
            time.sleep(0.1)
        for pid in pids.values():
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids.values()):
            time.sleep(0.1)
        left = [n for n, p in pids.items() if _pid_alive(p)]
        if left:
            raise ClusterError(f"could not stop: {left}")
        host = state.get("host", self.cfg.host)
        ports = list(state.get("ports", {}).values())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_port_open(host, p) for p in ports):
            time.sleep(0.1)
        bound = [p for p in ports if _port_open(host, p)]
        if bound:
            raise ClusterError(f"ports still bound after stopping: {bound}")
        with contextlib.suppress(FileNotFoundError):
            self.cfg.state_file.unlink()

    def status(self) -> dict:
        state = self._state()
        running = self.running()
        names = [*state.get("pids", {}), *(n for n in state.get("stopped", []) if n not in state.get("pids", {}))]
        return {name: ("running" if name in running else "stopped") for name in names}


def _stop_group(pid: int, timeout: float) -> None:
    """SIGTERM to a component's process group, SIGKILL after `timeout`, then waits a few seconds more."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.1)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.1)


def _component_port(cfg: ClusterConfig, name: str) -> int | None:
    """The port a component listens on (None for the pod runner, which has none of its own)."""
    pt = cfg.ports
    return {
        "etcd": pt.etcd_client,
        "kube-apiserver": pt.apiserver,
        "kube-controller-manager": pt.controller_manager,
        "kube-scheduler": pt.scheduler,
        "kwok": pt.kwok,
        "modelserver": pt.models,
    }.get(name)


@contextlib.contextmanager
def temporary_cluster(
    fleet_file: Path = DEFAULT_FLEET,
    bindir: Path = DEFAULT_BINDIR,
    extra_args: dict[str, list[str]] | None = None,
    runner: bool = False,
) -> Iterator[LocalCluster]:
    """A cluster on free ports in a temporary directory, stopped and removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="sd-cluster-"))
    cfg = ClusterConfig(
        workdir=workdir,
        bindir=bindir,
        ports=Ports.free("127.0.0.1"),
        fleet_file=fleet_file,
        extra_args=extra_args or {},
        runner=runner,
    )
    cluster = LocalCluster(cfg)
    try:
        cluster.up()
        yield cluster
    finally:
        try:
            cluster.down()
        finally:
            if os.environ.get("SD_KEEP_CLUSTER_DIR") == "1":  # logs of components and pods, for a post-mortem
                print(f"kept the cluster's folder {workdir}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "status", "clean", "stop-component", "start-component"])
    parser.add_argument("component", nargs="?", help=f"for stop-component / start-component: one of {COMPONENTS}")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("SD_CLUSTER_DIR", DEFAULT_WORKDIR)))
    parser.add_argument("--bindir", type=Path, default=Path(os.environ.get("SD_BIN_DIR", DEFAULT_BINDIR)))
    parser.add_argument("--fleet", type=Path, default=Path(os.environ.get("SD_FLEET", DEFAULT_FLEET)))
    parser.add_argument("--host", default=os.environ.get("SD_CLUSTER_HOST", "127.0.0.1"))
    parser.add_argument(
        "--port-base",
        type=int,
        default=int(os.environ.get("SD_CLUSTER_PORT_BASE", "16440")),
        help="first of seven consecutive ports (etcd client, etcd peer, apiserver, kcm, scheduler, kwok, models)",
    )
    parser.add_argument("--pod-cidr", default=os.environ.get("SD_POD_CIDR", "10.244.0.0/16"))
    parser.add_argument("--service-cidr", default=os.environ.get("SD_SERVICE_CIDR", "10.96.0.0/16"))
    parser.add_argument(
        "--runner",
        action="store_true",
        default=os.environ.get("SD_RUNNER") == "1",
        help="run the fleet's pods as local processes (inside tools/netns.sh only)",
    )
    args = parser.parse_args(argv)
    cfg = ClusterConfig(
        workdir=args.workdir.resolve(),
        bindir=args.bindir.resolve(),
        host=args.host,
        ports=Ports.from_base(args.port_base),
        fleet_file=args.fleet,
        pod_cidr=args.pod_cidr,
        service_cidr=args.service_cidr,
        runner=args.runner,
    )
    cluster = LocalCluster(cfg)
    try:
        if args.action == "up":
            start = time.monotonic()
            cluster.up()
            print(f"cluster up in {time.monotonic() - start:.1f}s; KUBECONFIG={cfg.kubeconfig}")
        elif args.action == "down":
            cluster.down()
            print("cluster down: no component running, no port bound")
        elif args.action in ("stop-component", "start-component"):
            if not args.component:
                parser.error(f"{args.action} needs a component name: one of {', '.join(cfg.components)}")
            if args.action == "stop-component":
                cluster.stop_component(args.component)
                print(f"{args.component} stopped")
            else:
                start = time.monotonic()
                cluster.start_component(args.component)
                print(f"{args.component} running again in {time.monotonic() - start:.1f}s")
        elif args.action == "clean":
            cluster.down()
            shutil.rmtree(cfg.workdir, ignore_errors=True)
            print(f"removed {cfg.workdir}")
        else:
            for name, st in cluster.status().items() or {"cluster": "not started"}.items():
                print(f"{name:26} {st}")
    except ClusterError as e:
        print(f"localcluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
