"""What a GenerationBatch becomes: a Job running `sd-operator batch`, its batch description and the
narrow permissions the runner needs to report progress into the batch's status."""

from __future__ import annotations

import json
from typing import Any

from sd_operator import API_GROUP
from sd_operator.api.generationbatch import GenerationBatchSpec
from sd_operator.render.common import (
    MANAGED_BY,
    owner_reference,
    pod_security_context,
    restricted_security_context,
    user_labels,
)
from sd_operator.render.sdinstance import RenderSettings

BATCH_LABEL = f"{API_GROUP}/batch"
BATCH_DIR = "/etc/sd-batch"
ITEMS_DIR = "/var/run/sd-batch/items"
OUTPUT_DIR = "/var/run/sd-batch/output"
INPUTS_DIR = "/var/run/sd-batch/inputs"
API_KEY_ENV = "SD_API_KEY"  # the runner reads the key from this variable (never from its command line)
# The runner's "finished, but some items failed for good" exit code: fail the Job without retrying.
PERMANENT_FAILURE_EXIT = 3
RUNNER_RETRIES = 3  # pod restarts after crashes or evictions; each restart resumes


def child_name(name: str) -> str:
    return f"{name}-batch"


def labels(meta: dict[str, Any]) -> dict[str, str]:
    return {
        **user_labels(meta),
        BATCH_LABEL: meta["name"],
        "app.kubernetes.io/name": "sd-batch",
        "app.kubernetes.io/component": "batch-runner",
        "app.kubernetes.io/part-of": "sd-operator",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def _meta(owner: dict[str, Any], kind_labels: dict[str, str]) -> dict[str, Any]:
    meta = owner["metadata"]
    return {
        "name": child_name(meta["name"]),
        "namespace": meta["namespace"],
        "labels": kind_labels,
        "ownerReferences": [owner_reference(owner)],
    }


def batch_document(owner: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    meta = owner["metadata"]
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
        "spec": spec,
    }


def render_configmap(owner: dict[str, Any], raw_spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(owner, labels(owner["metadata"])),
        "data": {"batch.json": json.dumps(batch_document(owner, raw_spec), indent=2, sort_keys=True)},
    }


def render_rbac(owner: dict[str, Any]) -> list[dict[str, Any]]:
    """A ServiceAccount that may patch the status of this one batch, and nothing else."""
    meta = owner["metadata"]
    lbl = labels(meta)
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(owner, lbl),
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(owner, lbl),
            "rules": [
                {
                    "apiGroups": [API_GROUP],
                    "resources": ["generationbatches/status"],
                    "resourceNames": [meta["name"]],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(owner, lbl),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": child_name(meta["name"])},
            "subjects": [{"kind": "ServiceAccount", "name": child_name(meta["name"]), "namespace": meta["namespace"]}],
        },
    ]


def runner_args(spec: GenerationBatchSpec, model: str, gateway_url: str) -> list[str]:
    args = [
        "sd-operator", "batch",
        "--batch-file", f"{BATCH_DIR}/batch.json",
        "--gateway-url", spec.gateway_url or gateway_url,
        "--model", model,
        "--report", "kubernetes",
    ]  # fmt: skip
    if spec.items and (spec.items.config_map or spec.items.file):
        args += ["--items-file", f"{ITEMS_DIR}/items.jsonl"]
    if spec.output.pvc:
        args += ["--output-dir", OUTPUT_DIR]
    if spec.inputs:
        args += ["--inputs-dir", INPUTS_DIR]
    if spec.api_key_secret:
        args += ["--api-key-env", API_KEY_ENV]
    # concurrency and priority are read from the batch file: a Job's pod template cannot change.
    return args


def render_job(
    owner: dict[str, Any],
    spec: GenerationBatchSpec,
    model: str,
    settings: RenderSettings,
    gateway_url: str,
) -> dict[str, Any]:
    meta = owner["metadata"]
    name = child_name(meta["name"])
    volumes: list[dict[str, Any]] = [{"name": "batch", "configMap": {"name": name}}]
    mounts: list[dict[str, Any]] = [{"name": "batch", "mountPath": BATCH_DIR, "readOnly": True}]
    if spec.items and spec.items.config_map:
        ref = spec.items.config_map
        volumes.append(
            {"name": "items", "configMap": {"name": ref.name, "items": [{"key": ref.key, "path": "items.jsonl"}]}}
        )
        mounts.append({"name": "items", "mountPath": ITEMS_DIR, "readOnly": True})
    elif spec.items and spec.items.file:
        volumes.append(
            {"name": "items", "persistentVolumeClaim": {"claimName": spec.items.file.claim_name, "readOnly": True}}
        )
        mounts.append(
            {
                "name": "items",
                "mountPath": f"{ITEMS_DIR}/items.jsonl",
                "subPath": spec.items.file.path,
                "readOnly": True,
            }
        )
    if spec.inputs:
        inputs: dict[str, Any] = {"name": "inputs", "mountPath": INPUTS_DIR, "readOnly": True}
        if spec.inputs.path:
            inputs["subPath"] = spec.inputs.path
        volumes.append(
            {"name": "inputs", "persistentVolumeClaim": {"claimName": spec.inputs.claim_name, "readOnly": True}}
        )
        mounts.append(inputs)
    env: list[dict[str, Any]] = [
        {"name": "SD_BATCH_NAME", "value": meta["name"]},
        {"name": "SD_LOG_FORMAT", "value": settings.log_format},
    ]
    if spec.api_key_secret:
        key_ref = {"name": spec.api_key_secret.name, "key": spec.api_key_secret.key}
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": key_ref}})
    if spec.output.pvc:
        out: dict[str, Any] = {"name": "output", "mountPath": OUTPUT_DIR}
        if spec.output.pvc.path:
            out["subPath"] = spec.output.pvc.path
        volumes.append({"name": "output", "persistentVolumeClaim": {"claimName": spec.output.pvc.claim_name}})
        mounts.append(out)
    elif spec.output.s3 and spec.output.s3.credentials_secret:
        secret = spec.output.s3.credentials_secret.name
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        ]
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})  # noqa: S108 - the pod's own emptyDir
    pod_labels = {**labels(meta), **((spec.pod_metadata.labels or {}) if spec.pod_metadata else {})}
    annotations = dict((spec.pod_metadata.annotations or {}) if spec.pod_metadata else {})
    job_spec: dict[str, Any] = {
        "suspend": spec.suspend,
        "backoffLimit": RUNNER_RETRIES,
        # Items that failed for good do not get better on a new pod; a crash or an eviction does.
        "podFailurePolicy": {
            "rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": "runner", "operator": "In",
                                                      "values": [PERMANENT_FAILURE_EXIT]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {
            "metadata": {"labels": pod_labels, "annotations": annotations},
            "spec": {
                "restartPolicy": "Never",
                "serviceAccountName": name,
                "automountServiceAccountToken": True,
                "enableServiceLinks": False,
                "securityContext": pod_security_context(),
                "terminationGracePeriodSeconds": 30,
                "containers": [
                    {
                        "name": "runner",
                        "image": settings.operator_image,
                        "command": runner_args(spec, model, gateway_url),
                        "env": env,
                        "volumeMounts": mounts,
                        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
                        "securityContext": {**restricted_security_context(), "readOnlyRootFilesystem": True},
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                    }
                ],
                "volumes": volumes,
            },
        },
    }  # fmt: skip
    if settings.image_pull_secrets:
        job_spec["template"]["spec"]["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(owner, labels(meta)), "spec": job_spec}


def output_location(spec: GenerationBatchSpec, namespace: str) -> str:
    if spec.output.s3:
        return f"s3://{spec.output.s3.bucket}/{spec.output.s3.key}"
    assert spec.output.pvc is not None
    return f"pvc://{namespace}/{spec.output.pvc.claim_name}/{spec.output.pvc.path}".rstrip("/")
