"""Benchmark: N SDInstances on a local cluster with N fake GPU nodes.

Measures the time until every instance has its children, the time until every one is Ready, the
API requests the operator makes per instance (from the apiserver's audit log, by user agent; in total and
by verb and resource), the operator's peak memory, and the requests it makes per minute when nothing
changes.

    .venv/bin/python bench/sdinstances.py [--count 200] [--idle-seconds 60]
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
import time
from pathlib import Path
from typing import Any

import requests
import yaml
from kubernetes import client, config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools" / "cluster"))
import localcluster  # noqa: E402

OPERATOR_AGENTS = ("sd-operator/", "kopf/")
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


def operator_requests(audit_log: Path, start: float, end: float) -> collections.Counter[str]:
    """Operator requests in [start, end) from the audit log, keyed 'verb resource[/subresource]'."""
    counts: collections.Counter[str] = collections.Counter()
    with audit_log.open() as f:
        for line in f:
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
            resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            counts[f"{event['verb']} {resource}"] += 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--idle-seconds", type=int, default=60)
    args = parser.parse_args()
    n = args.count
    work = Path(tempfile.mkdtemp(prefix="sd-bench-"))
    fleet = work / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"nodes": [
        {"name": "gpu", "count": n, "gpu": {"count": 1, "product": "NVIDIA-GeForce-RTX-4090", "memoryMiB": 24564}},
        {"name": "cpu", "count": 1},
    ]}))  # fmt: skip
    policy = work / "audit-policy.yaml"
    policy.write_text(yaml.safe_dump(AUDIT_POLICY))
    audit_log = work / "audit.log"
    extra = {"kube-apiserver": [f"--audit-policy-file={policy}", f"--audit-log-path={audit_log}",
                                "--audit-log-format=json", "--audit-log-maxsize=0"]}  # fmt: skip
    results: dict[str, Any] = {"instances": n, "workdir": str(work)}  # the audit and operator logs stay there
    with localcluster.temporary_cluster(fleet_file=fleet, extra_args=extra) as cluster:
        kubeconfig = cluster.cfg.kubeconfig
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        cluster.kubectl("create", "namespace", "bench")
        api = config.new_client_from_config(config_file=str(kubeconfig))
        custom, apps = client.CustomObjectsApi(api), client.AppsV1Api(api)
        metrics_port, live_port = free_port(), free_port()
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        log = (work / "operator.log").open("wb")
        op = subprocess.Popen(
            [str(ROOT / ".venv/bin/sd-operator"), "run", "-A", "--standalone", f"--metrics-port={metrics_port}",
             f"--liveness=http://127.0.0.1:{live_port}/healthz"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if requests.get(f"http://127.0.0.1:{live_port}/healthz", timeout=1).ok:
                        break
                except requests.ConnectionError:
                    time.sleep(0.2)
            t0 = time.time()
            for i in range(n):
                custom.create_namespaced_custom_object("sd-operator.dev", "v1alpha1", "bench", "sdinstances",
                                                       sdinstance(i))  # fmt: skip
            results["create_seconds"] = round(time.time() - t0, 2)
            t_children = t_ready = None
            while time.time() - t0 < 600 and t_ready is None:
                if t_children is None:
                    deployments = apps.list_namespaced_deployment("bench").items
                    if len(deployments) == n:
                        t_children = time.time()
                items = custom.list_namespaced_custom_object("sd-operator.dev", "v1alpha1", "bench", "sdinstances")
                ready = sum(1 for o in items["items"] if (o.get("status") or {}).get("phase") == "Ready")
                if ready == n and t_children:
                    t_ready = time.time()
                else:
                    time.sleep(0.5)
            if t_children is None or t_ready is None:
                raise SystemExit(f"not converged after 600s (children: {t_children}, ready: {t_ready})")
            results["seconds_until_all_have_children"] = round(t_children - t0, 2)
            results["seconds_until_all_ready"] = round(t_ready - t0, 2)
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
            time.sleep(args.idle_seconds)
            time.sleep(2)
            idle = operator_requests(audit_log, t_idle, t_idle + args.idle_seconds)
            per_minute = {k: round(v * 60 / args.idle_seconds, 1) for k, v in idle.items()}
            results["idle_operator_requests_per_minute"] = per_minute
            results["idle_non_watch_requests_per_minute"] = round(
                sum(v for k, v in per_minute.items() if not k.startswith("watch")), 1
            )
            results["operator_peak_rss_mib"] = round(rss_mib(op.pid, "VmHWM"), 1)
            pids = json.loads(cluster.cfg.state_file.read_text())["pids"]
            results["apiserver_rss_mib"] = round(rss_mib(pids["kube-apiserver"]), 1)
            results["etcd_rss_mib"] = round(rss_mib(pids["etcd"]), 1)
        finally:
            os.killpg(op.pid, signal.SIGTERM)
            op.wait(timeout=30)
            log.close()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
