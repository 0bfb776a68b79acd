"""The local cluster is a real one: schema validation, scheduling of GPUs, garbage collection, Jobs.

These run against a real kube-apiserver + etcd, controller-manager, scheduler and kwok. They also
pass against any cluster named by KUBECONFIG that has kwok-managed fake nodes.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from cluster_support import ROOT, Cluster
from helpers import wait_for

GPU = "nvidia.com/gpu"
GPU_TOLERATION = client.V1Toleration(key=GPU, operator="Exists", effect="NoSchedule")
KWOK_TOLERATION = client.V1Toleration(key="kwok.x-k8s.io/node", operator="Exists", effect="NoSchedule")


def test_server_reports_a_stamped_version(cluster: Cluster) -> None:
    info = client.VersionApi(cluster.api).get_code()
    assert info.git_version.startswith("v1."), info.git_version
    assert "master" not in info.git_version and info.major == "1" and info.minor


def test_default_fleet_has_gpu_nodes_with_gfd_labels_and_taint(kwok_cluster: Cluster) -> None:
    gpu_nodes = [n for n in kwok_cluster.kwok_nodes() if GPU in (n.status.allocatable or {})]
    cpu_nodes = [n for n in kwok_cluster.kwok_nodes() if GPU not in (n.status.allocatable or {})]
    assert len(gpu_nodes) >= 2 and cpu_nodes
    memories = set()
    for node in gpu_nodes:
        labels = node.metadata.labels
        assert labels["nvidia.com/gpu.product"]
        memories.add(int(labels["nvidia.com/gpu.memory"]))
        assert any(t.key == GPU and t.effect == "NoSchedule" for t in node.spec.taints)
        assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
    assert len(memories) >= 2, "the default fleet mixes GPU memory classes"


def test_crd_schema_rejects_invalid_objects(cluster: Cluster) -> None:
    group = f"t{uuid.uuid4().hex[:6]}.sd-operator.dev"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["size"],
                                    "properties": {"size": {"type": "integer", "minimum": 1, "maximum": 8}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    ext = client.ApiextensionsV1Api(cluster.api)
    ext.create_custom_resource_definition(crd)
    try:

        def established() -> bool:
            got = ext.read_custom_resource_definition(f"widgets.{group}")
            return any(c.type == "Established" and c.status == "True" for c in (got.status.conditions or []))

        wait_for(established, timeout=30, what="the CRD to be Established")
        custom = client.CustomObjectsApi(cluster.api)

        def create(size: object) -> dict:
            body = {
                "apiVersion": f"{group}/v1",
                "kind": "Widget",
                "metadata": {"name": f"w{size}"},
                "spec": {"size": size},
            }
            return custom.create_namespaced_custom_object(group, "v1", "default", "widgets", body)

        # The CRD may be Established a moment before its REST endpoint serves.
        wait_for(lambda: _creates(create, 3), timeout=30, what="a valid Widget to be accepted")
        with pytest.raises(ApiException) as rejected:
            create(99)
        assert rejected.value.status == 422
        assert "spec.size" in rejected.value.body and "less than or equal to 8" in rejected.value.body
    finally:
        ext.delete_custom_resource_definition(f"widgets.{group}")


def _creates(create, size) -> bool:
    try:
        create(size)
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


def _gpu_deployment(name: str, replicas: int, pool: str) -> client.V1Deployment:
    labels = {"app": name}
    container = client.V1Container(
        name="main",
        image="registry.invalid/gpu-workload:1",
        resources=client.V1ResourceRequirements(limits={GPU: "1"}, requests={"cpu": "100m", "memory": "64Mi"}),
    )
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[container],
                    tolerations=[GPU_TOLERATION, KWOK_TOLERATION],
                    node_selector={"sd-test/pool": pool},
                ),
            ),
        ),
    )


def test_gpu_pods_are_bin_packed_and_the_extra_one_stays_pending(
    kwok_cluster: Cluster, namespace: str, gpu_pool: str
) -> None:
    apps, core = kwok_cluster.apps, kwok_cluster.core
    apps.create_namespaced_deployment(namespace, _gpu_deployment("sd", 2, gpu_pool))

    def available() -> bool:
        d = apps.read_namespaced_deployment("sd", namespace)
        return (d.status.ready_replicas or 0) == 2

    wait_for(available, timeout=60, what="both GPU replicas Ready")
    pods = core.list_namespaced_pod(namespace, label_selector="app=sd").items
    assert sorted(p.spec.node_name for p in pods) == [f"{gpu_pool}-0", f"{gpu_pool}-1"]

    apps.patch_namespaced_deployment_scale("sd", namespace, {"spec": {"replicas": 3}})

    def unschedulable_pod() -> client.V1PodCondition | None:
        for pod in core.list_namespaced_pod(namespace, label_selector="app=sd").items:
            for cond in pod.status.conditions or []:
                if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
                    return cond
        return None

    cond = wait_for(unschedulable_pod, timeout=60, what="the third GPU pod to be Unschedulable")
    assert f"Insufficient {GPU}" in cond.message, cond.message
    events = core.list_namespaced_event(namespace, field_selector="reason=FailedScheduling").items
    assert any(GPU in (e.message or "") for e in events)
    assert apps.read_namespaced_deployment("sd", namespace).status.ready_replicas == 2


def test_a_pod_without_the_gpu_toleration_never_lands_on_a_gpu_node(kwok_cluster: Cluster, namespace: str) -> None:
    core = kwok_cluster.core
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="cpu-only"),
        spec=client.V1PodSpec(
            containers=[client.V1Container(name="main", image="registry.invalid/app:1")],
            tolerations=[KWOK_TOLERATION],
        ),
    )
    core.create_namespaced_pod(namespace, pod)
    scheduled = wait_for(
        lambda: core.read_namespaced_pod("cpu-only", namespace).spec.node_name, timeout=30, what="scheduling"
    )
    node = core.read_node(scheduled)
    assert GPU not in (node.status.allocatable or {})


def test_garbage_collector_deletes_children_of_a_deleted_owner(cluster: Cluster, namespace: str) -> None:
    core = cluster.core
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"), data={"a": "1"})
    )
    ref = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="child", owner_references=[ref]))
    )
    core.delete_namespaced_config_map("owner", namespace)

    def child_gone() -> bool:
        return not core.list_namespaced_config_map(namespace, field_selector="metadata.name=child").items

    wait_for(child_gone, timeout=60, what="the garbage collector to delete the child")


def test_job_pod_completes_and_job_succeeds(kwok_cluster: Cluster, namespace: str) -> None:
    batch = kwok_cluster.batch
    job = client.V1Job(
        metadata=client.V1ObjectMeta(name="once"),
        spec=client.V1JobSpec(
            backoff_limit=0,
            template=client.V1PodTemplateSpec(
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[client.V1Container(name="main", image="registry.invalid/job:1")],
                    tolerations=[KWOK_TOLERATION],
                )
            ),
        ),
    )
    batch.create_namespaced_job(namespace, job)

    def complete() -> bool:
        status = batch.read_namespaced_job_status("once", namespace).status
        return any(c.type == "Complete" and c.status == "True" for c in status.conditions or [])

    wait_for(complete, timeout=60, what="the Job to complete")
    assert batch.read_namespaced_job_status("once", namespace).status.succeeded == 1


def test_kubectl_talks_to_the_cluster(cluster: Cluster) -> None:
    out = subprocess.run(
        [str(ROOT / ".local" / "bin" / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", "version", "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    versions = json.loads(out.stdout)
    assert versions["serverVersion"]["gitVersion"].startswith("v1.")
    assert versions["clientVersion"]["gitVersion"] == versions["serverVersion"]["gitVersion"] or cluster.local is None
