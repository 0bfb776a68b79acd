"""The GenerationBatch controller on the local cluster: the Job, its status, suspend, deletion, TTL.

Under kwok a Job's pod completes at once without running the runner (the runner itself is tested
against real gateway and emulator processes in test_batch_runner.py). A runner that ends with "some
items failed for good" (exit code 3) is simulated with pod annotations that a kwok stage acts on,
passed through spec.podMetadata.
"""

from __future__ import annotations

import uuid
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from cluster_support import Cluster, Operator
from helpers import wait_for

GROUP, VERSION, PLURAL = "sd-operator.dev", "v1alpha1", "generationbatches"


def batch(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GenerationBatch",
        "metadata": {"name": name},
        "spec": {
            "target": {"model": "sd_xl_base_1.0.safetensors"},
            "items": {"configMap": {"name": "prompts", "key": "items.jsonl"}},
            "output": {"s3": {"bucket": "out", "key": f"batches/{name}", "credentialsSecret": {"name": "s3"}}},
            "priority": 5,
        },
    }
    body["spec"].update(spec)
    return body


def status(custom: client.CustomObjectsApi, ns: str, name: str) -> dict[str, Any]:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}


def wait_batch_phase(custom: client.CustomObjectsApi, ns: str, name: str, phase: str) -> dict[str, Any]:
    return wait_for(lambda: status(custom, ns, name).get("phase") == phase and status(custom, ns, name),
                    timeout=60, what=f"{name} to be {phase}")  # fmt: skip


def test_batch_becomes_a_job_that_succeeds(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, batch("b1"))
    st = wait_batch_phase(custom, namespace, "b1", "Succeeded")
    assert st["model"] == "sd_xl_base_1.0.safetensors" and st["outputLocation"] == "s3://out/batches/b1"
    assert st["startTime"] and st["completionTime"]
    conditions = {c["type"]: c["status"] for c in st["conditions"]}
    assert conditions == {"Complete": "True", "Failed": "False", "Suspended": "False"}

    job = cluster.batch.read_namespaced_job("b1-batch", namespace)
    pod = job.spec.template.spec
    runner = pod.containers[0]
    assert runner.command[:2] == ["sd-operator", "batch"]
    assert runner.command[runner.command.index("--model") + 1] == "sd_xl_base_1.0.safetensors"
    assert "--items-file" in runner.command and "--output-dir" not in runner.command
    assert {e.name for e in runner.env} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(e.value_from.secret_key_ref.name == "s3" for e in runner.env if e.name.startswith("AWS_"))
    assert pod.volumes[1].config_map.name == "prompts" and pod.service_account_name == "b1-batch"
    assert job.spec.pod_failure_policy.rules[0].on_exit_codes.values == [3]
    role = client.RbacAuthorizationV1Api(cluster.api).read_namespaced_role("b1-batch", namespace)
    assert role.rules[0].resources == ["generationbatches/status"] and role.rules[0].resource_names == ["b1"]
    config = cluster.core.read_namespaced_config_map("b1-batch", namespace)
    assert '"priority": 5' in config.data["batch.json"]
    wait_for(  # kopf posts Events from a queue, a moment after the status
        lambda: any(
            e.reason == "Completed"
            for e in cluster.core.list_namespaced_event(namespace, field_selector="involvedObject.name=b1").items
        ),
        timeout=30,
        what="the event of b1",
    )


def test_api_key_and_inputs_reach_the_runner_pod(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str
) -> None:
    key, inputs = {"name": "batch-key", "key": "token"}, {"claimName": "data", "path": "poses"}
    body = batch("b6", apiKeySecret=key, inputs=inputs)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    # The Job as the API server stored it (its pod waits for the claim, which this test does not make).
    job = wait_for(lambda: cluster.batch.list_namespaced_job(namespace, field_selector="metadata.name=b6-batch").items,
                   timeout=60, what="the Job of b6")  # fmt: skip
    pod = job[0].spec.template.spec
    runner = pod.containers[0]
    assert runner.command[runner.command.index("--api-key-env") + 1] == "SD_API_KEY"
    assert runner.command[runner.command.index("--inputs-dir") + 1] == "/var/run/sd-batch/inputs"
    key = next(e for e in runner.env if e.name == "SD_API_KEY").value_from.secret_key_ref
    assert (key.name, key.key) == ("batch-key", "token")
    inputs = next(v for v in pod.volumes if v.name == "inputs").persistent_volume_claim
    assert inputs.claim_name == "data" and inputs.read_only
    mount = next(m for m in runner.volume_mounts if m.name == "inputs")
    assert mount.sub_path == "poses" and mount.read_only


def test_instance_target_resolves_to_the_instances_model(
    operator: Operator, custom: client.CustomObjectsApi, namespace: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, batch("b2", target={"instance": "xl"}))
    assert status(custom, namespace, "b2").get("phase") is None  # the instance does not exist yet: it waits
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "sdinstances", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "SDInstance", "metadata": {"name": "xl"},
        "spec": {"replicas": 0, "model": {"family": "sdxl", "checkpoint": {
            "name": "juggernautXL.safetensors", "source": {"http": {"url": "http://models.invalid/j.safetensors"}}}}},
    })  # fmt: skip
    st = wait_batch_phase(custom, namespace, "b2", "Succeeded")
    assert st["model"] == "juggernautXL.safetensors"


def test_items_that_failed_for_good_fail_the_batch_without_retries(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str
) -> None:
    annotations = {
        "sim.sd-operator.dev/job-failure": "2 of 40 items failed for good",
        "sim.sd-operator.dev/exit-code": "3",
    }
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, batch("b3", podMetadata={"annotations": annotations})
    )
    st = wait_batch_phase(custom, namespace, "b3", "Failed")
    assert "failed for good" in st["message"]
    assert {c["type"]: c["status"] for c in st["conditions"]}["Failed"] == "True"
    pods = cluster.core.list_namespaced_pod(namespace, label_selector="sd-operator.dev/batch=b3").items
    assert len(pods) == 1  # exit code 3: no new pod was tried
    wait_for(  # kopf posts Events from a queue, a moment after the status
        lambda: any(
            e.type == "Warning" and e.reason == "Failed"
            for e in cluster.core.list_namespaced_event(namespace, field_selector="involvedObject.name=b3").items
        ),
        timeout=30,
        what="the event of b3",
    )


def test_suspend_and_resume(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, batch("b4", suspend=True))
    wait_batch_phase(custom, namespace, "b4", "Suspended")
    assert cluster.batch.read_namespaced_job("b4-batch", namespace).spec.suspend is True
    assert not cluster.core.list_namespaced_pod(namespace, label_selector="sd-operator.dev/batch=b4").items
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "b4", {"spec": {"suspend": False}})
    wait_batch_phase(custom, namespace, "b4", "Succeeded")


def test_deletion_removes_the_job_and_ttl_removes_the_batch(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi, namespace: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, batch("b5", suspend=True))
    wait_for(lambda: cluster.batch.list_namespaced_job(namespace).items, timeout=30, what="the Job")
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "b5")
    wait_for(lambda: not cluster.batch.list_namespaced_job(namespace).items, timeout=60, what="the Job to go")

    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, batch("b6", ttlSecondsAfterFinished=0))

    def gone() -> bool:
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "b6")
            return False
        except ApiException as e:
            return e.status == 404

    wait_for(gone, timeout=60, what="the finished batch to be removed after its TTL")


def test_namespace_deletion_with_a_suspended_batch_is_quiet(
    cluster: Cluster, operator: Operator, custom: client.CustomObjectsApi
) -> None:
    """Tearing down a namespace deletes the batch's Job, sometimes before the batch (the namespace controller
    takes the kinds in no fixed order): the controller must not apply the children again into the
    terminating namespace (403 "because it is being terminated"), nor log that refusal as a failure.

    Three namespaces, one suspended batch each, so that at least one Job likely goes first (each is a coin
    toss; without the fix this failed 3 runs of 3)."""
    core = cluster.core
    names = [f"t-gb-teardown-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    try:
        for ns in names:
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, batch("b7", suspend=True))
        for ns in names:
            wait_batch_phase(custom, ns, "b7", "Suspended")
            wait_for(
                lambda ns=ns: cluster.batch.list_namespaced_job(ns).items, timeout=30, what=f"the Job of b7 in {ns}"
            )
    finally:
        start = len(operator.log())
        for ns in names:
            core.delete_namespace(ns)

    def gone(ns: str) -> bool:
        try:
            core.read_namespace(ns)
            return False
        except ApiException as e:
            return e.status == 404

    for ns in names:
        wait_for(lambda ns=ns: gone(ns), timeout=120, what=f"namespace {ns} to go")
    # A Job's DELETED event is handled while its namespace still exists (the namespace waits for the Job's
    # pods and the Events to go, seconds): what the operator said about it is in the log by now.
    log = operator.log()[start:]
    assert "Traceback" not in log, log[-4000:]
    failures = [line for line in log.splitlines() if any(ns in line for ns in names) and " ERROR " in line]
    assert not failures and "reconcile failed" not in log, failures
