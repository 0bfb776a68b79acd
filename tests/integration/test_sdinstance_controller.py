"""The SDInstance controller (`sd-operator run` as a real process) on the local cluster.

Pods under kwok become Running and Ready without running anything, so these tests see the operator's
children and status logic against a real apiserver, scheduler, garbage collector and Deployment
controller. A model fetch failure is simulated the way a kubelet would report it: the pod is
annotated `sim.sd-operator.dev/init-failure: <the fetcher's line>`, and a kwok stage
(tools/cluster/kwok-stages.yaml) puts that exit into the init container's status.
"""

from __future__ import annotations

import copy
import subprocess
import time

import pytest
import requests
from kubernetes import client
from kubernetes.client.rest import ApiException

from cluster_support import ROOT, Cluster, Operator
from helpers import wait_for
from objects import GROUP, PLURAL, VERSION, get, sdi, wait_phase


def test_sdinstance_becomes_ready_with_its_children(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str, gpu_pool: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi("xl", gpu_pool))
    obj = wait_phase(custom, namespace, "xl", "Ready")
    status = obj["status"]
    assert status["readyReplicas"] == 1 and status["ready"] == "1/1"
    assert status["endpoint"] == f"http://xl-webui.{namespace}.svc:7861"
    assert status["modelSHA256"].startswith("31e35c80")
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True",
        "PodScheduled": "True",
        "ModelFetched": "True",
    }
    uid = obj["metadata"]["uid"]

    deployment = cluster.apps.read_namespaced_deployment("xl-webui", namespace)
    assert deployment.metadata.owner_references[0].uid == uid
    assert deployment.spec.strategy.rolling_update.max_surge == 0
    pod_spec = deployment.spec.template.spec
    webui = pod_spec.containers[0]
    assert webui.args[webui.args.index("--ckpt") + 1] == "/models/Stable-diffusion/sd_xl_base_1.0.safetensors"
    assert "--no-half-vae" in webui.args and "--medvram-sdxl" not in webui.args
    assert webui.resources.limits["nvidia.com/gpu"] == "1"
    assert pod_spec.init_containers[0].command[:2] == ["sd-operator", "fetch-model"]
    assert pod_spec.init_containers[0].image == "sd-operator:test"
    assert webui.security_context.run_as_non_root and webui.security_context.capabilities.drop == ["ALL"]

    service = cluster.core.read_namespaced_service("xl-webui", namespace)
    assert service.metadata.labels["sd-operator.dev/model"] == "sd_xl_base_1.0.safetensors"
    assert service.metadata.owner_references[0].uid == uid
    policy = client.NetworkingV1Api(cluster.api).read_namespaced_network_policy("xl-webui", namespace)
    assert policy.spec.ingress[0].ports[0].port == 7861
    config = cluster.core.read_namespaced_config_map("xl-webui", namespace)
    assert "sd_xl_base_1.0.safetensors" in config.data["models.json"]

    # kopf posts Events from a queue, a moment after the status.
    wait_for(
        lambda: any(
            e.reason == "Ready" and e.involved_object.kind == "SDInstance"
            for e in cluster.core.list_namespaced_event(namespace, field_selector="involvedObject.name=xl").items
        ),
        timeout=30,
        what="the Ready event",
    )
    metrics = requests.get(operator.metrics_url, timeout=5).text
    assert 'controller_runtime_reconcile_total{controller="sdinstances.sd-operator.dev",result="success"}' in metrics


def test_more_gpu_replicas_than_the_fleet_has_shows_the_scheduler_reason(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str, gpu_pool: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi("many", gpu_pool, replicas=3))
    wait_for(lambda: get(custom, namespace, "many").get("status", {}).get("ready") == "2/3", timeout=60, what="2/3")
    assert get(custom, namespace, "many")["status"]["phase"] == "Degraded"
    status = wait_for(
        lambda: (
            (st := get(custom, namespace, "many")["status"]) and "Insufficient nvidia.com/gpu" in st["message"] and st
        ),
        timeout=90,  # the scheduler reports after its retry back-off when nodes changed meanwhile
        what="the scheduler's reason in the message",
    )
    unscheduled = {c["type"]: c for c in status["conditions"]}["PodScheduled"]
    assert unscheduled["status"] == "False" and "nvidia.com/gpu" in unscheduled["message"]

    body = sdi("nowhere", gpu_pool)
    body["spec"]["gpu"]["product"] = "NVIDIA-H100-80GB-HBM3"
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    wait_phase(custom, namespace, "nowhere", "Pending")
    wait_for(
        lambda: "node affinity/selector" in get(custom, namespace, "nowhere")["status"]["message"],
        timeout=30,
        what="the scheduler's reason for an absent GPU product",
    )


def test_model_change_rolls_out(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str, gpu_pool: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi("roll", gpu_pool))
    wait_phase(custom, namespace, "roll", "Ready")
    new_model = {  # a merge patch: null removes the old source and checksum
        "name": "juggernautXL_v9.safetensors",
        "sha256": None,
        "source": {
            "http": None,
            "huggingFace": {"repo": "RunDiffusion/Juggernaut-XL-v9", "file": "Juggernaut-XL_v9.safetensors"},
        },
    }
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "roll", {"spec": {"model": {"checkpoint": new_model}}}
    )

    def rolled() -> bool:
        pods = cluster.core.list_namespaced_pod(namespace, label_selector="sd-operator.dev/instance=roll").items
        live = [p for p in pods if not p.metadata.deletion_timestamp]
        return (
            len(live) == 1
            and "/models/Stable-diffusion/juggernautXL_v9.safetensors" in live[0].spec.containers[0].args
            and bool(live[0].status.container_statuses)
            and all(c.ready for c in live[0].status.container_statuses)
        )

    wait_for(rolled, timeout=60, what="the new model's pod to replace the old one")
    obj = wait_phase(custom, namespace, "roll", "Ready")
    assert obj["metadata"]["generation"] == 2
    assert "modelSHA256" not in obj["status"]  # the new model has no declared checksum
    deployment = cluster.apps.read_namespaced_deployment("roll-webui", namespace)
    assert deployment.metadata.labels["sd-operator.dev/model"] == "juggernautXL_v9.safetensors"


def test_scale_up_and_down(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str, gpu_pool: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi("sc", gpu_pool))
    wait_phase(custom, namespace, "sc", "Ready")
    kubectl = [str(ROOT / ".local/bin/kubectl"), f"--kubeconfig={cluster.kubeconfig}", "-n", namespace]
    subprocess.run([*kubectl, "scale", "sdi/sc", "--replicas=2"], check=True, capture_output=True)
    wait_for(lambda: get(custom, namespace, "sc").get("status", {}).get("ready") == "2/2", timeout=60, what="2/2")
    assert get(custom, namespace, "sc")["status"]["phase"] == "Ready"
    subprocess.run([*kubectl, "scale", "sdi/sc", "--replicas=0"], check=True, capture_output=True)

    def scaled_to_zero() -> bool:
        status = get(custom, namespace, "sc")["status"]
        pods = cluster.core.list_namespaced_pod(namespace, label_selector="sd-operator.dev/instance=sc").items
        return status["ready"] == "0/0" and status["replicas"] == 0 and not pods

    wait_for(scaled_to_zero, timeout=60, what="scale to zero")


def test_delete_removes_everything(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str, gpu_pool: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi("gone", gpu_pool))
    wait_phase(custom, namespace, "gone", "Ready")
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gone")

    def nothing_left() -> bool:
        selector = "sd-operator.dev/instance=gone"
        return not (
            cluster.apps.list_namespaced_deployment(namespace, label_selector=selector).items
            or cluster.core.list_namespaced_service(namespace, label_selector=selector).items
            or cluster.core.list_namespaced_config_map(namespace, label_selector=selector).items
            or cluster.core.list_namespaced_pod(namespace, label_selector=selector).items
            or client.NetworkingV1Api(cluster.api)
            .list_namespaced_network_policy(namespace, label_selector=selector)
            .items
        )

    wait_for(nothing_left, timeout=60, what="the garbage collector to remove every child")
    with pytest.raises(ApiException) as gone:
        get(custom, namespace, "gone")
    assert gone.value.status == 404


def test_model_fetch_failure_ends_in_failed_with_the_fetchers_line(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str, gpu_pool: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi("bad", gpu_pool))
    wait_phase(custom, namespace, "bad", "Ready")
    line = "sha256 mismatch for sd_xl_base_1.0.safetensors: expected 31e35c80fc48, got 0badc0ffee00"
    (pod,) = cluster.core.list_namespaced_pod(namespace, label_selector="sd-operator.dev/instance=bad").items
    cluster.core.patch_namespaced_pod(
        pod.metadata.name, namespace, {"metadata": {"annotations": {"sim.sd-operator.dev/init-failure": line}}}
    )
    obj = wait_phase(custom, namespace, "bad", "Failed")
    assert obj["status"]["message"] == line
    conditions = {c["type"]: c for c in obj["status"]["conditions"]}
    assert conditions["ModelFetched"]["status"] == "False" and conditions["ModelFetched"]["message"] == line
    assert conditions["Ready"]["reason"] == "ModelFetchFailed"
    wait_for(
        lambda: any(
            e.type == "Warning" and e.reason == "Failed" and e.message == line
            for e in cluster.core.list_namespaced_event(namespace, field_selector="involvedObject.name=bad").items
        ),
        timeout=30,
        what="the Warning event with the fetcher's line",
    )


def test_user_labels_reach_children_but_gitops_tracking_labels_do_not(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str, gpu_pool: str
) -> None:
    body = copy.deepcopy(sdi("lbl", gpu_pool))
    body["metadata"]["labels"] = {"team": "art", "app.kubernetes.io/instance": "my-argo-app"}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    wait_phase(custom, namespace, "lbl", "Ready")
    labels = cluster.apps.read_namespaced_deployment("lbl-webui", namespace).metadata.labels
    assert labels["team"] == "art" and "app.kubernetes.io/instance" not in labels


def _applied_lines(operator: Operator, namespace: str, name: str) -> list[str]:
    """The operator's log lines of the applies for one instance (one per reconcile that applied children)."""
    prefix = f"[{namespace}/{name}] applied SDInstance children"
    return [line for line in operator.log().splitlines() if line.startswith(prefix)]


def test_children_are_applied_once_per_generation_and_one_deleted_by_hand_returns_at_once(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str, gpu_pool: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi("once", gpu_pool))
    first = wait_phase(custom, namespace, "once", "Ready")
    time.sleep(3)  # the events of the status writes (each one a reconcile) have long been handled
    (line,) = _applied_lines(operator, namespace, "once")
    for child in ("ConfigMap", "Deployment", "NetworkPolicy", "Service"):
        assert f"{child}/once-webui" in line
    # Unchanged children are not applied again, and an unchanged status is not written again.
    assert get(custom, namespace, "once")["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]

    # Deleted by hand: applied again at once, without a spec change, and only that child.
    net = client.NetworkingV1Api(cluster.api)
    old = net.read_namespaced_network_policy("once-webui", namespace)
    net.delete_namespaced_network_policy("once-webui", namespace)
    back = wait_for(
        lambda: net.list_namespaced_network_policy(namespace, field_selector="metadata.name=once-webui").items,
        timeout=30,
        what="the deleted NetworkPolicy to be applied again",
    )
    assert back[0].metadata.uid != old.metadata.uid and back[0].spec.pod_selector == old.spec.pod_selector
    wait_for(lambda: len(_applied_lines(operator, namespace, "once")) > 1, what="the log line of the apply")
    lines = _applied_lines(operator, namespace, "once")
    assert len(lines) == 2 and lines[1].endswith(": NetworkPolicy/once-webui")
    # The Deployment too; its pods are made again and the instance is Ready again, still generation 1.
    cluster.apps.delete_namespaced_deployment("once-webui", namespace)
    wait_for(
        lambda: len(_applied_lines(operator, namespace, "once")) == 3, timeout=30, what="the Deployment applied again"
    )
    assert _applied_lines(operator, namespace, "once")[2].endswith(": Deployment/once-webui")
    wait_for(
        lambda: (cluster.apps.read_namespaced_deployment("once-webui", namespace).status.ready_replicas or 0) == 1,
        timeout=60,
        what="the new Deployment's pod to be ready",
    )
    obj = wait_phase(custom, namespace, "once", "Ready")
    assert obj["metadata"]["generation"] == 1 and obj["status"]["observedGeneration"] == 1
    assert "Traceback" not in operator.log()


def test_a_label_change_reaches_the_children_without_a_spec_change(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str, gpu_pool: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi("relabel", gpu_pool))
    wait_phase(custom, namespace, "relabel", "Ready")
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "relabel", {"metadata": {"labels": {"team": "art"}}}
    )
    wait_for(
        lambda: (
            (cluster.core.read_namespaced_service("relabel-webui", namespace).metadata.labels or {}).get("team")
            == "art"
        ),
        timeout=30,
        what="the new label on the Service",
    )
    assert cluster.apps.read_namespaced_deployment("relabel-webui", namespace).metadata.labels["team"] == "art"
    assert get(custom, namespace, "relabel")["metadata"]["generation"] == 1


def test_a_cluster_ip_service_of_an_earlier_operator_is_made_again_headless(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str, gpu_pool: str
) -> None:
    # What operators before headless instance Services applied: the same Service with a ClusterIP.
    legacy = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "legacy-webui", "labels": {"sd-operator.dev/instance": "legacy"}},
        "spec": {
            "type": "ClusterIP",
            "selector": {"sd-operator.dev/instance": "legacy"},
            "ports": [{"name": "http", "port": 7860, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    old = cluster.core.create_namespaced_service(namespace, legacy)
    assert old.spec.cluster_ip not in (None, "None")
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi("legacy", gpu_pool))
    wait_phase(custom, namespace, "legacy", "Ready")
    service = cluster.core.read_namespaced_service("legacy-webui", namespace)
    assert service.spec.cluster_ip == "None" and service.metadata.uid != old.metadata.uid
    assert service.metadata.owner_references[0].name == "legacy"
    events = cluster.core.list_namespaced_event(namespace, field_selector="involvedObject.name=legacy").items
    assert [e.message for e in events if e.reason == "ServiceRecreated"] == [
        "Service legacy-webui made again headless (clusterIP: None); its ClusterIP is released"
    ]
    # The new Service's EndpointSlice lists the ready pod, as the gateways' discovery needs.
    slices = wait_for(
        lambda: [
            s
            for s in client.DiscoveryV1Api(cluster.api)
            .list_namespaced_endpoint_slice(namespace, label_selector="kubernetes.io/service-name=legacy-webui")
            .items
            if any(e.conditions.ready for e in s.endpoints or [])
        ],
        timeout=30,
        what="a ready endpoint in the headless Service's EndpointSlice",
    )
    assert slices[0].metadata.owner_references[0].uid == service.metadata.uid
    assert "Traceback" not in operator.log()
