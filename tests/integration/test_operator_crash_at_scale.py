"""kill -9 of the operator while 500 SDInstances are being created: the next operator converges.

The operator dies in the middle of the work (some instances with all their children and a status,
some with only a few children applied, some not seen yet) while creates continue; the instances
created while no operator runs are picked up by the next one. Converged means: every instance has
a status of its current generation, exactly one child of each kind (none duplicated, none missing),
no child without a live owner, one ReplicaSet per Deployment (re-applying a child changed no pod
template), and no kopf bookkeeping left on the instances.

The pods stay Pending (their node selector matches no node): the instances' phase is then Pending
with the scheduler's reason, which costs the small machine less than pods that start.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client

from cluster_support import Cluster, start_operator, stop_operator
from helpers import wait_for
from objects import GROUP, PLURAL, VERSION, sdi

COUNT = 500
FIRST_BATCH = 200  # created before the operator is killed ...
STATUSES_BEFORE_KILL = 100  # ... once this many of them have a status (the operator is mid-work) ...
KILL_AT = 300  # ... and it dies once this many exist, while the rest are still being created
CREATE_THREADS = 4
INSTANCE_LABEL = f"{GROUP}/instance"
CHILD_KINDS = ("ConfigMap", "Service", "NetworkPolicy", "Deployment")


def test_kill_during_500_creates_converges_without_duplicates(
    cluster: Cluster, crds: None, namespace: str, tmp_path: Path
) -> None:
    custom = client.CustomObjectsApi(cluster.api)
    names = [f"crash-{i:03d}" for i in range(COUNT)]

    def create(name: str) -> None:
        # A pool no node has: the pod stays Pending (Unschedulable), the instance's phase Pending.
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi(name, "nowhere"))

    def with_status() -> int:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        return sum(1 for o in items if (o.get("status") or {}).get("phase"))

    op = start_operator(cluster, tmp_path / "first.log")
    created = threading.Semaphore(0)
    try:
        with ThreadPoolExecutor(CREATE_THREADS) as pool:
            list(pool.map(create, names[:FIRST_BATCH]))
            wait_for(
                lambda: with_status() >= STATUSES_BEFORE_KILL,
                timeout=90,
                interval=0.5,
                what=f"{STATUSES_BEFORE_KILL} instances to have a status",
            )

            def create_counted(name: str) -> None:
                create(name)
                created.release()

            rest = pool.map(create_counted, names[FIRST_BATCH:])
            for _ in range(KILL_AT - FIRST_BATCH):
                assert created.acquire(timeout=60), "the creates stalled"
            # No graceful shutdown: the process dies wherever it is, while the creates go on.
            os.killpg(op.process.pid, signal.SIGKILL)
            op.process.wait()
            op = start_operator(cluster, tmp_path / "second.log")
            list(rest)  # every create succeeded

        def converged() -> bool:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
            done = [
                o
                for o in items
                if (o.get("status") or {}).get("phase")
                and o["status"].get("observedGeneration") == o["metadata"]["generation"]
            ]
            return len(done) == COUNT

        wait_for(converged, timeout=150, interval=1, what=f"all {COUNT} instances to have a current status")
        instances = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        assert sorted(o["metadata"]["name"] for o in instances) == names
        phases = collections.Counter(o["status"]["phase"] for o in instances)
        assert phases == {"Pending": COUNT}, phases
        # kopf keeps no progress or last-handled annotations and no finalizer on them (event handlers only):
        # none left behind by the killed process.
        leftovers = {
            o["metadata"]["name"]: (
                [k for k in o["metadata"].get("annotations") or {} if k.startswith(f"{GROUP}/")],
                o["metadata"].get("finalizers"),
            )
            for o in instances
        }
        assert {n: v for n, v in leftovers.items() if any(v)} == {}

        uids = {o["metadata"]["uid"]: o["metadata"]["name"] for o in instances}
        per_owner, orphans = _count_by_owner(_children(cluster, namespace), uids)
        assert orphans == []
        expected = {(name, kind): 1 for name in names for kind in CHILD_KINDS}
        wrong = {k: per_owner.get(k, 0) for k in expected if per_owner.get(k, 0) != 1}
        assert wrong == {}, f"{len(wrong)} (instance, kind) pairs without exactly one child, e.g. {list(wrong)[:5]}"
        # A Deployment applied again by the second operator rendered the same pod template: still one
        # ReplicaSet each (once the controller-manager has made them all).
        deployments = {
            d.metadata.uid: d.metadata.name for d in cluster.apps.list_namespaced_deployment(namespace).items
        }

        def replica_sets() -> dict[tuple[str, str], int] | None:
            items = cluster.apps.list_namespaced_replica_set(namespace).items
            counted, strays = _count_by_owner([("ReplicaSet", rs) for rs in items], deployments)
            assert strays == []
            return counted if len(counted) == COUNT else None

        assert set(wait_for(replica_sets, timeout=60, interval=1, what="a ReplicaSet per Deployment").values()) == {1}
    finally:
        stop_operator(op)
        _empty(cluster, namespace)


def _empty(cluster: Cluster, namespace: str, bound: float = 90) -> None:
    """Deletes what the test made (a request per kind) and waits, for at most `bound` seconds, until the
    instances and pods are gone. Left to the namespace's deletion (which the fixture does not wait for),
    they were still being deleted when the next test started its operator (run with --all-namespaces),
    and that test took a minute instead of 10 s."""
    custom, core, apps = client.CustomObjectsApi(cluster.api), cluster.core, cluster.apps
    custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    apps.delete_collection_namespaced_deployment(namespace)
    apps.delete_collection_namespaced_replica_set(namespace)
    core.delete_collection_namespaced_pod(namespace)
    core.delete_collection_namespaced_service(namespace)
    core.delete_collection_namespaced_config_map(namespace, label_selector=INSTANCE_LABEL)
    client.NetworkingV1Api(cluster.api).delete_collection_namespaced_network_policy(namespace)
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        left = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, limit=1)["items"]
        if not left and not core.list_namespaced_pod(namespace, limit=1).items:
            return
        time.sleep(1)


def _children(cluster: Cluster, namespace: str) -> list[tuple[str, Any]]:
    """Every object labelled as an instance's, with its kind."""
    net = client.NetworkingV1Api(cluster.api)
    found: list[tuple[str, Any]] = []
    for kind, items in (
        ("ConfigMap", cluster.core.list_namespaced_config_map(namespace, label_selector=INSTANCE_LABEL).items),
        ("Service", cluster.core.list_namespaced_service(namespace, label_selector=INSTANCE_LABEL).items),
        ("NetworkPolicy", net.list_namespaced_network_policy(namespace, label_selector=INSTANCE_LABEL).items),
        ("Deployment", cluster.apps.list_namespaced_deployment(namespace, label_selector=INSTANCE_LABEL).items),
    ):
        found += [(kind, item) for item in items]
    return found


def _count_by_owner(
    objects: list[tuple[str, Any]], owners: dict[str, str]
) -> tuple[dict[tuple[str, str], int], list[str]]:
    """(owner name, kind) -> how many objects that owner controls; and the objects whose controller is not
    one of `owners` (uid -> name), or that have none."""
    counted: collections.Counter[tuple[str, str]] = collections.Counter()
    strays = []
    for kind, obj in objects:
        controllers = [r for r in obj.metadata.owner_references or [] if r.controller]
        if len(controllers) != 1 or controllers[0].uid not in owners:
            strays.append(f"{kind}/{obj.metadata.name}")
        else:
            counted[(owners[controllers[0].uid], kind)] += 1
    return counted, strays
