"""Benchmark: N SDInstances on a local cluster with N fake GPU nodes (kwok), for one or more N.

Measures the time from the first create until every instance has its children and until every one is
Ready, the API requests the operator makes per instance once it has started (from the apiserver's audit
log, by user agent; in total and by verb and resource), its status patches per instance, the requests it
makes per minute when nothing changes, and its peak memory and CPU time. Each count runs on a fresh cluster of its own
(N GPU nodes), so the rows compare; they are printed as one markdown table (details in a JSON file).

    .venv/bin/python bench/sdinstances.py [--count 200 500 1000] [--idle-seconds 60]

The instances are created by a few threads at once (a `kubectl apply` of many objects is about as
quick); progress is followed with watches, so the benchmark's own polling does not load the API server.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import yaml
from kubernetes import client, config, watch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools" / "cluster"))
import localcluster  # noqa: E402

OPERATOR_AGENTS = ("sd-operator/", "kopf/")
CREATE_THREADS = 8
NAMESPACE = "bench"
AUDIT_POLICY = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
                "rules": [{"level": "Metadata"}]}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sdinstance(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "sd-operator.dev/v1alpha1",
        "kind": "SDInstance",
        "metadata": {"name": f"bench-{i:04d}"},
        "spec": {
            "model": {
                "family": "sd15",
                "checkpoint": {
                    "name": f"model-{i % 10}.safetensors",
                    "source": {"http": {"url": f"http://models.invalid/model-{i % 10}.safetensors"}},
                },
            },
            "gpu": {"memoryGiB": 24},
        },
    }


def wait_operator_settled(audit_log: Path, quiet: float = 2.0, timeout: float = 60.0) -> None:
    """Until the operator watches SDInstances and has made no request for `quiet` seconds: its start-up
    (API discovery, the first lists, retries while a new cluster's storage initialises) stays out of the
    counts, which then compare across rows."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = time.time()
        counts = operator_requests(audit_log, 0, now + 60)
        recent = operator_requests(audit_log, now - quiet, now + 60)
        if counts["watch sdinstances"] and not recent:
            return
        time.sleep(0.5)
    raise SystemExit(f"the operator did not settle within {timeout:.0f}s (see {audit_log})")


def operator_requests(audit_log: Path, start: float, end: float) -> collections.Counter[str]:
    """Operator requests in [start, end) from the audit log, keyed 'verb resource[/subresource]'."""
    counts: collections.Counter[str] = collections.Counter()
    with audit_log.open() as f:
        for line in f:
            if not any(f'"userAgent":"{agent}' in line for agent in OPERATOR_AGENTS):
                continue  # most lines, skipped without parsing them
            event = json.loads(line)
            if not event.get("userAgent", "").startswith(OPERATOR_AGENTS):
                continue
            # Count each request once, at its end (a watch also logs when its response starts).
            counted_stage = event.get("stage") in ("ResponseComplete", "Panic") or (
                event.get("verb") == "watch" and event.get("stage") == "ResponseStarted"
            )
            if not counted_stage:
                continue
            ts = datetime.datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
            if not start <= ts < end:
                continue
            ref = event.get("objectRef", {})
            resource = ref.get("resource", "(discovery)") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            counts[f"{event['verb']} {resource}"] += 1
    return counts


class Watcher:
    """Follows the objects of one kind in the namespace with a watch (in a thread): when each first appeared,
    and when each first met `done`. Read through the custom-objects API even for built-in kinds: plain dicts,
    which cost the benchmark's own process far less CPU than the client's models."""

    def __init__(self, kubeconfig: Path, group: str, version: str, plural: str, done: Callable[[dict], bool]):
        self.api = client.CustomObjectsApi(config.new_client_from_config(config_file=str(kubeconfig)))
        self.args = (group, version, NAMESPACE, plural)
        self.done = done
        self.seen: dict[str, float] = {}
        self.met: dict[str, float] = {}
        self._rv = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._rv = self._list()  # before the first create: nothing is missed
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def last(self, count: int, which: dict[str, float]) -> float | None:
        """The time the count-th object arrived in `which` (None while fewer have)."""
        return max(which.values()) if len(which) >= count else None

    def _see(self, obj: dict[str, Any]) -> None:
        now, name = time.time(), obj["metadata"]["name"]
        self.seen.setdefault(name, now)
        if name not in self.met and self.done(obj):
            self.met[name] = now

    def _list(self) -> str:
        listed = self.api.list_namespaced_custom_object(*self.args)
        for obj in listed["items"]:
            self._see(obj)
        return listed["metadata"]["resourceVersion"]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                stream = watch.Watch().stream(
                    self.api.list_namespaced_custom_object, *self.args, resource_version=self._rv, timeout_seconds=5
                )
                for event in stream:
                    self._see(event["object"])
                    self._rv = event["object"]["metadata"]["resourceVersion"]
            except Exception as e:  # the resource version too old (410), or a dropped connection: list again
                print(f"watch of {self.args[-1]}: {type(e).__name__}: {e}; listing again", file=sys.stderr)
                time.sleep(0.5)
                self._rv = self._list()


def is_ready(obj: dict[str, Any]) -> bool:
    return (obj.get("status") or {}).get("phase") == "Ready"


def run(n: int, idle_seconds: int, controller_manager_args: list[str]) -> dict[str, Any]:
    """One measurement: a fresh cluster with n GPU nodes, the operator, n SDInstances."""
    work = Path(tempfile.mkdtemp(prefix=f"sd-bench-{n}-"))
    fleet = work / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"nodes": [
        {"name": "gpu", "count": n, "gpu": {"count": 1, "product": "NVIDIA-GeForce-RTX-4090", "memoryMiB": 24564}},
        {"name": "cpu", "count": 1},
    ]}))  # fmt: skip
    policy = work / "audit-policy.yaml"
    policy.write_text(yaml.safe_dump(AUDIT_POLICY))
    audit_log = work / "audit.log"
    extra = {"kube-apiserver": [f"--audit-policy-file={policy}", f"--audit-log-path={audit_log}",
                                "--audit-log-format=json", "--audit-log-maxsize=0"],
             "kube-controller-manager": controller_manager_args}  # fmt: skip
    results: dict[str, Any] = {"instances": n, "workdir": str(work), "controller_manager_args": controller_manager_args}
    print(f"[{n}] starting a cluster with {n} fake GPU nodes in {work}", file=sys.stderr, flush=True)
    with localcluster.temporary_cluster(fleet_file=fleet, extra_args=extra) as cluster:
        kubeconfig = cluster.cfg.kubeconfig
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        cluster.kubectl("create", "namespace", NAMESPACE)
        api = config.new_client_from_config(config_file=str(kubeconfig))
        custom = client.CustomObjectsApi(api)
        metrics_port, live_port = free_port(), free_port()
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        log = (work / "operator.log").open("wb")
        op = subprocess.Popen(
            [str(ROOT / ".venv/bin/sd-operator"), "run", "-A", "--standalone", f"--metrics-port={metrics_port}",
             f"--liveness=http://127.0.0.1:{live_port}/healthz"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        deployments = Watcher(kubeconfig, "apps", "v1", "deployments", lambda _: True)
        instances = Watcher(kubeconfig, "sd-operator.dev", "v1alpha1", "sdinstances", is_ready)
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if requests.get(f"http://127.0.0.1:{live_port}/healthz", timeout=1).ok:
                        break
                except requests.ConnectionError:
                    time.sleep(0.2)
            wait_operator_settled(audit_log)
            deployments.start()
            instances.start()
            cpu_before = cpu_seconds(op.pid)
            components = json.loads(cluster.cfg.state_file.read_text())["pids"]
            components_before = {name: cpu_seconds(pid) for name, pid in components.items()}
            print(f"[{n}] creating {n} SDInstances", file=sys.stderr, flush=True)
            t0 = time.time()
            with ThreadPoolExecutor(CREATE_THREADS) as pool:
                list(pool.map(lambda i: custom.create_namespaced_custom_object(
                    "sd-operator.dev", "v1alpha1", NAMESPACE, "sdinstances", sdinstance(i)), range(n)))  # fmt: skip
            results["create_seconds"] = round(time.time() - t0, 2)
            t_children = t_ready = None
            while time.time() - t0 < 600 and t_ready is None:
                time.sleep(0.5)
                t_children = deployments.last(n, deployments.seen)
                t_ready = instances.last(n, instances.met) if t_children else None
            if t_children is None or t_ready is None:
                raise SystemExit(
                    f"[{n}] not converged after 600s: {len(deployments.seen)} Deployments, {len(instances.met)} Ready"
                )
            results["seconds_until_all_have_children"] = round(t_children - t0, 2)
            results["seconds_until_all_ready"] = round(t_ready - t0, 2)
            results["operator_cpu_seconds_until_ready"] = round(cpu_seconds(op.pid) - cpu_before, 1)
            # Where the machine's CPU went meanwhile: kwok's share is the 1,000 kubelets it plays, which a real
            # cluster runs on its nodes, not beside its control plane.
            results["cpu_seconds_until_ready_by_process"] = {
                "sd-operator": results["operator_cpu_seconds_until_ready"],
                **{name: round(cpu_seconds(pid) - components_before[name], 1) for name, pid in components.items()},
            }
            results["cpu_seconds_available_until_ready"] = round((t_ready - t0) * (os.cpu_count() or 1), 1)
            print(f"[{n}] all Ready after {t_ready - t0:.1f}s; idle for {idle_seconds}s", file=sys.stderr, flush=True)
            time.sleep(2)  # let the audit log flush
            busy = operator_requests(audit_log, t0 - 1, t_ready + 1)
            writes = {k: v for k, v in busy.items() if not k.startswith(("watch", "list", "get"))}
            results["operator_requests_until_ready"] = sum(busy.values())
            results["operator_requests_per_instance"] = round(sum(busy.values()) / n, 2)
            results["operator_requests_by_kind"] = dict(busy.most_common())
            results["operator_requests_per_instance_by_kind"] = {k: round(v / n, 2) for k, v in busy.most_common()}
            results["operator_writes_per_instance"] = round(sum(writes.values()) / n, 2)
            results["status_patches_per_instance"] = round(busy["patch sdinstances/status"] / n, 2)
            t_idle = time.time()
            time.sleep(idle_seconds)
            time.sleep(2)
            idle = operator_requests(audit_log, t_idle, t_idle + idle_seconds)
            per_minute = {k: round(v * 60 / idle_seconds, 1) for k, v in idle.items()}
            results["idle_operator_requests_per_minute"] = per_minute
            results["idle_non_watch_requests_per_minute"] = round(
                sum(v for k, v in per_minute.items() if not k.startswith("watch")), 1
            )
            results["operator_peak_rss_mib"] = round(rss_mib(op.pid, "VmHWM"), 1)
            pids = json.loads(cluster.cfg.state_file.read_text())["pids"]
            results["apiserver_rss_mib"] = round(rss_mib(pids["kube-apiserver"]), 1)
            results["etcd_rss_mib"] = round(rss_mib(pids["etcd"]), 1)
        finally:
            deployments.stop()
            instances.stop()
            os.killpg(op.pid, signal.SIGTERM)
            op.wait(timeout=30)
            log.close()
    (work / "results.json").write_text(json.dumps(results, indent=2))
    return results


COLUMNS = (
    ("instances", "instances"),
    ("create_seconds", "create (s)"),
    ("seconds_until_all_have_children", "all children (s)"),
    ("seconds_until_all_ready", "all Ready (s)"),
    ("operator_requests_per_instance", "operator requests / instance"),
    ("operator_writes_per_instance", "writes / instance"),
    ("status_patches_per_instance", "status patches / instance"),
    ("idle_non_watch_requests_per_minute", "idle non-watch requests / min"),
    ("operator_peak_rss_mib", "operator peak RSS (MiB)"),
    ("operator_cpu_seconds_until_ready", "operator CPU until Ready (s)"),
)


def markdown(rows: list[dict[str, Any]]) -> str:
    """One row per count; then the requests per instance by verb and resource."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + " ---: |" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |" for row in rows]
    processes = list(rows[0]["cpu_seconds_until_ready_by_process"])
    lines += ["", "CPU seconds from the first create until all Ready, by process (and the cores' total):", ""]
    lines += ["| instances | " + " | ".join(processes) + " | cores x seconds |", "|" + " ---: |" * (len(processes) + 2)]
    lines += [
        f"| {row['instances']} | "
        + " | ".join(str(row["cpu_seconds_until_ready_by_process"].get(p, 0)) for p in processes)
        + f" | {row['cpu_seconds_available_until_ready']} |"
        for row in rows
    ]
    kinds = sorted({k for row in rows for k in row["operator_requests_per_instance_by_kind"]})
    lines += ["", "| instances | " + " | ".join(kinds) + " |", "|" + " ---: |" * (len(kinds) + 1)]
    lines += [
        f"| {row['instances']} | "
        + " | ".join(str(row["operator_requests_per_instance_by_kind"].get(k, 0)) for k in kinds)
        + " |"
        for row in rows
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, nargs="+", default=[200], help="instances (one run per count)")
    parser.add_argument("--idle-seconds", type=int, default=60)
    parser.add_argument(
        "--controller-manager-arg", action="append", default=[], metavar="ARG",
        help="an extra kube-controller-manager flag, e.g. --concurrent-deployment-syncs=20 (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    rows = [run(n, args.idle_seconds, args.controller_manager_arg) for n in args.count]
    print(markdown(rows))
    print("\ndetails: " + ", ".join(str(Path(row["workdir"]) / "results.json") for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
