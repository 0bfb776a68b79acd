"""The operator's autoscaler on the local cluster: demand reports in, Deployment replicas, status and Events out.

The reports are the gateway's own ConfigMaps (rendered by sd_operator.gateway.demand.render_report, the
code the gateway publishes with); the gateway itself is exercised end to end in tests/e2e. Under kwok the
pods become Ready without running anything, so these tests see the scaling decisions against a real API
server, Deployment controller and scheduler.
"""

from __future__ import annotations

import time
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from cluster_support import Cluster, Operator
from helpers import wait_for
from objects import GROUP, PLURAL, VERSION, get, sdi
from sd_operator.gateway.demand import render_report, report_name

MODEL = "sd_xl_base_1.0.safetensors"


def publish(
    core: client.CoreV1Api, namespace: str, gateway: str, queued: int, running: int = 0, age: float = 0
) -> None:
    """What a gateway writes when it holds `queued` + `running` requests for MODEL (renewed `age` seconds ago)."""
    models = {MODEL: {"queued": queued, "running": running, "oldestWaitSeconds": 1.0}} if queued + running else {}
    body = render_report(gateway, namespace, models, time.time() - age, None)
    try:
        core.replace_namespaced_config_map(report_name(gateway), namespace, body)
    except ApiException as e:
        if e.status != 404:
            raise
        core.create_namespaced_config_map(namespace, body)


def status(custom: client.CustomObjectsApi, ns: str, name: str) -> dict[str, Any]:
    return get(custom, ns, name).get("status") or {}


def deployment_replicas(cluster: Cluster, ns: str, name: str) -> int | None:
    try:
        return cluster.apps.read_namespaced_deployment(f"{name}-webui", ns).spec.replicas
    except ApiException:
        return None


def desired_is(custom: client.CustomObjectsApi, cluster: Cluster, ns: str, name: str, n: int) -> bool:
    return status(custom, ns, name).get("desiredReplicas") == n and deployment_replicas(cluster, ns, name) == n


def condition(s: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in s.get("conditions") or [] if c["type"] == type_), {})


def test_demand_scales_an_instance_from_zero_and_back_without_touching_its_spec(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str, gpu_pool: str
) -> None:
    body = sdi(
        "auto", gpu_pool, replicas=5, autoscaling={"minReplicas": 0, "maxReplicas": 2, "scaleDownDelaySeconds": 4}
    )
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    core = cluster.core

    # No demand: at zero (spec.replicas 5 is ignored), Ready with the reason.
    wait_for(lambda: desired_is(custom, cluster, namespace, "auto", 0), timeout=30, what="the instance at zero")
    wait_for(lambda: status(custom, namespace, "auto").get("phase"), timeout=30, what="a phase")
    s = status(custom, namespace, "auto")
    assert (s["phase"], s["ready"]) == ("Ready", "0/0")
    assert condition(s, "Ready")["reason"] == "ScaledToZero" and condition(s, "ScaledToZero")["status"] == "True"

    # A stale report (its gateway vanished 60 s ago) does not count.
    publish(core, namespace, "gone", queued=8, age=60)
    time.sleep(5)  # two evaluations of the timer
    assert desired_is(custom, cluster, namespace, "auto", 0)

    # Two gateways each holding 2 requests: 2 alone asks for one replica, the sum (4) for two.
    publish(core, namespace, "gw-a", queued=2)
    wait_for(lambda: desired_is(custom, cluster, namespace, "auto", 1), timeout=30, what="one replica")
    publish(core, namespace, "gw-b", queued=2)
    wait_for(lambda: desired_is(custom, cluster, namespace, "auto", 2), timeout=30, what="two replicas (summed)")
    wait_for(lambda: status(custom, namespace, "auto").get("ready") == "2/2", timeout=60, what="2/2 ready")
    assert "demand 4 (4 queued, 0 running)" in status(custom, namespace, "auto")["lastScaleReason"]

    # More demand than maxReplicas allows: capped, and the status says so.
    publish(core, namespace, "gw-a", queued=9, running=1)
    wait_for(lambda: condition(status(custom, namespace, "auto"), "ScalingLimited").get("status") == "True",
             timeout=30, what="ScalingLimited")  # fmt: skip
    limited = condition(status(custom, namespace, "auto"), "ScalingLimited")
    assert limited["reason"] == "TooManyReplicas" and "maxReplicas is 2" in limited["message"]
    assert deployment_replicas(cluster, namespace, "auto") == 2

    # Demand gone (one gateway's report is deleted, the other says so): after the delay, back to zero.
    # (In this order no lower count stands in between: the rule would rightly step down through it.)
    core.delete_namespaced_config_map(report_name("gw-b"), namespace)
    publish(core, namespace, "gw-a", queued=0)
    time.sleep(1)
    assert desired_is(custom, cluster, namespace, "auto", 2), "scaled down before the delay"
    wait_for(lambda: desired_is(custom, cluster, namespace, "auto", 0), timeout=30, what="back to zero")
    pods = cluster.core.list_namespaced_pod
    wait_for(
        lambda: not pods(namespace, label_selector="sd-operator.dev/instance=auto").items, timeout=60, what="no pods"
    )
    s = status(custom, namespace, "auto")
    assert s["phase"] == "Ready" and condition(s, "ScalingLimited")["status"] == "False"
    assert s["lastScaleReason"] == "scaled 2 -> 0: no demand for 4s"

    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=auto").items
    messages = [(e.reason, e.message) for e in events if e.reason in ("ScaledUp", "ScaledDown", "ScaledToZero")]
    assert ("ScaledUp", "scaled 0 -> 1: demand 2 (2 queued, 0 running), target 2 per replica") in messages, messages
    assert any(r == "ScaledToZero" for r, _ in messages), messages

    # GitOps: the operator never wrote the SDInstance's spec.
    obj = get(custom, namespace, "auto")
    assert obj["metadata"]["generation"] == 1 and obj["spec"]["replicas"] == 5


def test_without_autoscaling_spec_replicas_rules_and_reports_change_nothing(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str, gpu_pool: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, sdi("fixed", gpu_pool, replicas=1))
    wait_for(lambda: status(custom, namespace, "fixed").get("ready") == "1/1", timeout=60, what="1/1")
    publish(cluster.core, namespace, "gw-x", queued=20)
    time.sleep(5)
    assert deployment_replicas(cluster, namespace, "fixed") == 1
    s = status(custom, namespace, "fixed")
    assert s["desiredReplicas"] == 1 and not condition(s, "ScaledToZero") and "lastScaleTime" not in s
    cluster.core.delete_namespaced_config_map(report_name("gw-x"), namespace)  # the model is shared by other tests


def test_invalid_bounds_are_refused_by_the_api_server(
    cluster: Cluster, crds: None, custom: client.CustomObjectsApi, namespace: str
) -> None:
    body = sdi("bad", "none", autoscaling={"minReplicas": 3, "maxReplicas": 2})
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    except ApiException as e:
        assert e.status == 422
        assert "autoscaling.maxReplicas must be at least autoscaling.minReplicas" in e.body
        assert "spec.autoscaling.maxReplicas" in e.body
    else:
        raise AssertionError("minReplicas above maxReplicas was accepted")
    body = sdi("bad", "none", autoscaling={"minReplicas": 0})
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    except ApiException as e:
        assert e.status == 422 and "spec.autoscaling.maxReplicas: Required value" in e.body
    else:
        raise AssertionError("autoscaling without maxReplicas was accepted")
