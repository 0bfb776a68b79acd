"""Restarting the operator (even with kill -9 in the middle of work) creates no duplicates."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import requests
from kubernetes import client

from cluster_support import Cluster, start_operator, stop_operator
from helpers import wait_for
from objects import GROUP, PLURAL, VERSION, get, sdi, wait_phase


def test_restart_mid_work_creates_no_duplicates(
    cluster: Cluster, crds: None, namespace: str, gpu_pool: str, tmp_path: Path
) -> None:
    custom = client.CustomObjectsApi(cluster.api)
    op = start_operator(cluster, tmp_path / "first.log")
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi("one", gpu_pool, replicas=2))
        wait_for(
            lambda: cluster.apps.list_namespaced_deployment(namespace).items, timeout=30, what="the first Deployment"
        )
    finally:
        # No graceful shutdown: the process dies wherever it is.
        os.killpg(op.process.pid, signal.SIGKILL)
        op.process.wait()
    # Work that arrives while no operator runs is picked up by the next one.
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi("two", gpu_pool, replicas=0))
    op = start_operator(cluster, tmp_path / "second.log")
    try:
        wait_phase(custom, namespace, "one", "Ready")
        wait_phase(custom, namespace, "two", "Ready")
        generation_before = cluster.apps.read_namespaced_deployment("one-webui", namespace).metadata.generation
        stop_operator(op)
        op = start_operator(cluster, tmp_path / "third.log")
        # The third start resumes both objects; let it finish before counting.
        wait_for(
            lambda: (
                "sdinstances.sd-operator.dev" in requests.get(op.metrics_url, timeout=5).text
                and _successes(op.metrics_url) >= 2
            ),
            timeout=30,
            what="the restarted operator to resume both instances",
        )
        deployments = cluster.apps.list_namespaced_deployment(namespace).items
        assert sorted(d.metadata.name for d in deployments) == ["one-webui", "two-webui"]
        replica_sets = cluster.apps.list_namespaced_replica_set(
            namespace, label_selector="sd-operator.dev/instance=one"
        )
        assert len(replica_sets.items) == 1
        pods = cluster.core.list_namespaced_pod(namespace, label_selector="sd-operator.dev/instance=one").items
        assert len(pods) == 2
        assert len(cluster.core.list_namespaced_service(namespace).items) == 2
        # Re-applying identical children is a no-op: the Deployment did not change.
        assert cluster.apps.read_namespaced_deployment("one-webui", namespace).metadata.generation == generation_before
        assert get(custom, namespace, "one")["status"]["ready"] == "2/2"
    finally:
        stop_operator(op)


def _successes(metrics_url: str) -> float:
    for line in requests.get(metrics_url, timeout=5).text.splitlines():
        if line.startswith(
            'controller_runtime_reconcile_total{controller="sdinstances.sd-operator.dev",result="success"}'
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_peering_lets_only_one_replica_act(
    cluster: Cluster, crds: None, namespace: str, gpu_pool: str, tmp_path: Path
) -> None:
    peering = f"peer-{namespace[-6:]}"
    custom = client.CustomObjectsApi(cluster.api)

    def peers() -> int:
        obj = custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", peering)
        return len(obj.get("status") or {})

    leader = start_operator(cluster, tmp_path / "leader.log", f"--peering={peering}", "--priority=100")
    follower = start_operator(cluster, tmp_path / "follower.log", f"--peering={peering}", "--priority=10")
    try:
        wait_for(lambda: peers() == 2, timeout=60, what="both replicas in the peering object")
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi("peered", gpu_pool))
        wait_phase(custom, namespace, "peered", "Ready")
        assert "applied SDInstance children" in leader.log()
        assert "applied SDInstance children" not in follower.log()
        # When the leader goes, the follower takes over.
        stop_operator(leader)
        wait_for(lambda: "Resuming operations" in follower.log(), timeout=60, what="the follower to resume")
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi("takeover", gpu_pool))
        wait_phase(custom, namespace, "takeover", "Ready")
        assert "applied SDInstance children" in follower.log()
    finally:
        stop_operator(follower)
        stop_operator(leader)
