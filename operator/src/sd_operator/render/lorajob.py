"""What a LoRAJob becomes: a training Job (base model fetch, dataset lint, `sd-operator train`), then
publish Jobs that copy the LoRA onto instances' model volumes, then an evaluation GenerationBatch."""

from __future__ import annotations

import json
from typing import Any

from sd_operator import API_GROUP, API_VERSION
from sd_operator.api.lorajob import LoRAJobSpec
from sd_operator.api.models import ModelFile
from sd_operator.render.common import (
    MANAGED_BY,
    owner_reference,
    pod_security_context,
    restricted_security_context,
    user_labels,
)
from sd_operator.render.scheduling import gpu_affinity, gpu_node_selector, gpu_tolerations, scheduling_extras
from sd_operator.render.sdinstance import RenderSettings, _SecretEnv, fetch_entry

LORAJOB_LABEL = f"{API_GROUP}/lorajob"
STEP_LABEL = f"{API_GROUP}/step"
JOB_DIR = "/etc/sd-train"
DATASET_DIR = "/var/run/sd-train/dataset"
MODELS_DIR = "/var/run/sd-train/models"
OUTPUT_DIR = "/var/run/sd-train/output"
DATASET_INVALID_EXIT = 1  # `sd-operator dataset lint` found the dataset unusable: retrying will not help


def train_name(name: str) -> str:
    return f"{name}-train"


def publish_name(name: str, instance: str) -> str:
    return f"{name}-publish-{instance}"[:63].rstrip("-")


def eval_name(name: str) -> str:
    return f"{name}-eval"


def labels(meta: dict[str, Any], step: str) -> dict[str, str]:
    return {
        **user_labels(meta),
        LORAJOB_LABEL: meta["name"],
        STEP_LABEL: step,
        "app.kubernetes.io/name": "sd-lora-training",
        "app.kubernetes.io/component": step,
        "app.kubernetes.io/part-of": "sd-operator",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def _meta(owner: dict[str, Any], name: str, step: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner["metadata"]["namespace"],
        "labels": labels(owner["metadata"], step),
        "ownerReferences": [owner_reference(owner)],
    }


def render_configmap(
    owner: dict[str, Any], raw_spec: dict[str, Any], base_model: ModelFile, settings: RenderSettings
) -> dict[str, Any]:
    meta = owner["metadata"]
    manifest, _ = base_model_manifest(base_model, settings)
    doc = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "LoRAJob",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
        "spec": raw_spec,
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(owner, train_name(meta["name"]), "train"),
        "data": {"job.json": json.dumps(doc, indent=2, sort_keys=True), "models.json": json.dumps(manifest, indent=2)},
    }


def base_model_manifest(base_model: ModelFile, settings: RenderSettings) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    secrets = _SecretEnv()
    return {"files": [fetch_entry("checkpoint", base_model, secrets, settings.hf_endpoint)]}, secrets.env


def render_rbac(owner: dict[str, Any]) -> list[dict[str, Any]]:
    """The trainer may patch this LoRAJob's status (progress, artifacts) and nothing else."""
    meta = owner["metadata"]
    name = train_name(meta["name"])
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(owner, name, "train"),
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(owner, name, "train"),
            "rules": [
                {
                    "apiGroups": [API_GROUP],
                    "resources": ["lorajobs/status"],
                    "resourceNames": [meta["name"]],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(owner, name, "train"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": meta["namespace"]}],
        },
    ]


def render_train_job(
    owner: dict[str, Any], spec: LoRAJobSpec, base_model: ModelFile, settings: RenderSettings
) -> dict[str, Any]:
    meta = owner["metadata"]
    name = train_name(meta["name"])
    _, secret_env = base_model_manifest(base_model, settings)
    dataset, destination = spec.dataset.source.pvc, spec.output.destination.pvc
    assert dataset is not None and destination is not None, "validated by the controller"
    volumes: list[dict[str, Any]] = [
        {"name": "job", "configMap": {"name": name}},
        {"name": "models", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dataset", "persistentVolumeClaim": {"claimName": dataset.claim_name, "readOnly": True}},
        {"name": "output", "persistentVolumeClaim": {"claimName": destination.claim_name}},
    ]
    job_mount = {"name": "job", "mountPath": JOB_DIR, "readOnly": True}
    dataset_mount = {"name": "dataset", "mountPath": DATASET_DIR, "readOnly": True}
    if dataset.path:
        dataset_mount["subPath"] = dataset.path
    output_mount: dict[str, Any] = {"name": "output", "mountPath": OUTPUT_DIR}
    if destination.path:
        output_mount["subPath"] = destination.path
    tmp_mount = {"name": "tmp", "mountPath": "/tmp"}  # noqa: S108 - the pod's own emptyDir
    small = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    lint = {
        "name": "dataset-lint",
        "image": settings.operator_image,
        "command": [
            "sd-operator",
            "dataset",
            "lint",
            DATASET_DIR,
            "--trigger-word",
            spec.dataset.trigger_word,
            "--caption-extension",
            spec.dataset.caption_extension,
            "--batch-size",
            str(spec.training.batch_size),
            "--epochs",
            str(spec.training.epochs),
        ],
        "volumeMounts": [dataset_mount, tmp_mount],
        "resources": small,
        "securityContext": restricted_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    fetch = {
        "name": "fetch-model",
        "image": settings.operator_image,
        "command": ["sd-operator", "fetch-model", "--manifest", f"{JOB_DIR}/models.json", "--models-dir", MODELS_DIR],
        "env": secret_env,
        "volumeMounts": [job_mount, {"name": "models", "mountPath": MODELS_DIR}, tmp_mount],
        "resources": small,
        "securityContext": restricted_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources: dict[str, Any] = {"requests": {"cpu": "4", "memory": "24Gi"}, "limits": {}}
    if spec.resources:
        resources["requests"].update(spec.resources.requests or {})
        resources["limits"].update(spec.resources.limits or {})
    resources["limits"][spec.gpu.resource_name] = spec.gpu.count
    trainer_cmd = [
        "sd-operator",
        "train",
        "--job-file",
        f"{JOB_DIR}/job.json",
        "--dataset-dir",
        DATASET_DIR,
        "--model-path",
        f"{MODELS_DIR}/Stable-diffusion/{base_model.name}",
        "--output-dir",
        OUTPUT_DIR,
        "--work-dir",
        "/tmp/sd-train",  # noqa: S108 - the pod's own emptyDir
        "--report",
        "kubernetes",
    ]
    if spec.gpu.memory_gib:
        trainer_cmd += ["--gpu-memory-gib", str(spec.gpu.memory_gib)]
    trainer = {
        "name": "trainer",
        "image": spec.image,
        "command": trainer_cmd,
        "volumeMounts": [
            job_mount,
            dataset_mount,
            output_mount,
            {"name": "models", "mountPath": MODELS_DIR},
            tmp_mount,
        ],
        "resources": resources,
        "securityContext": restricted_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_meta = spec.pod_metadata
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": name,
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "initContainers": [lint, fetch],
        "containers": [trainer],
        "volumes": volumes,
        "tolerations": gpu_tolerations(spec.scheduling),
        **scheduling_extras(spec.scheduling),
    }
    node_selector = gpu_node_selector(spec.gpu, spec.scheduling)
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    affinity = gpu_affinity(spec.gpu, spec.scheduling)
    if affinity:
        pod_spec["affinity"] = affinity
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    job_spec: dict[str, Any] = {
        "suspend": spec.suspend,
        "backoffLimit": spec.backoff_limit,
        "podFailurePolicy": {
            "rules": [
                # An unusable dataset fails the Job at once: a new pod would find the same dataset.
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": "dataset-lint",
                        "operator": "In",
                        "values": [DATASET_INVALID_EXIT],
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {
            "metadata": {
                "labels": {**labels(meta, "train"), **((pod_meta.labels or {}) if pod_meta else {})},
                "annotations": dict((pod_meta.annotations or {}) if pod_meta else {}),
            },
            "spec": pod_spec,
        },
    }
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(owner, name, "train"), "spec": job_spec}


def render_publish_job(
    owner: dict[str, Any],
    spec: LoRAJobSpec,
    instance: str,
    claim: str,
    claim_path: str,
    sha256: str | None,
    settings: RenderSettings,
) -> dict[str, Any]:
    """Copies the final LoRA into an instance's shared model volume (its Lora folder), verified."""
    meta = owner["metadata"]
    destination = spec.output.destination.pvc
    assert destination is not None
    file = f"{spec.output.name}.safetensors"
    src: dict[str, Any] = {"name": "source", "mountPath": "/var/run/sd-publish/source", "readOnly": True}
    if destination.path:
        src["subPath"] = destination.path
    dst: dict[str, Any] = {"name": "target", "mountPath": "/var/run/sd-publish/target"}
    if claim_path:
        dst["subPath"] = claim_path
    command = [
        "sd-operator",
        "publish-lora",
        "--source",
        f"/var/run/sd-publish/source/{file}",
        "--dest",
        f"/var/run/sd-publish/target/Lora/{file}",
    ]
    if sha256:
        command += ["--sha256", sha256]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(owner, publish_name(meta["name"], instance), "publish"),
        "spec": {
            "backoffLimit": 2,
            "template": {
                "metadata": {"labels": {**labels(meta, "publish"), f"{API_GROUP}/instance-target": instance}},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security_context(),
                    "containers": [
                        {
                            "name": "publish",
                            "image": settings.operator_image,
                            "command": command,
                            "volumeMounts": [src, dst],
                            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
                            "securityContext": {**restricted_security_context(), "readOnlyRootFilesystem": True},
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        }
                    ],
                    "volumes": [
                        {
                            "name": "source",
                            "persistentVolumeClaim": {"claimName": destination.claim_name, "readOnly": True},
                        },
                        {"name": "target", "persistentVolumeClaim": {"claimName": claim}},
                    ],
                },
            },
        },
    }


def render_evaluation(owner: dict[str, Any], spec: LoRAJobSpec, instance: str) -> dict[str, Any]:
    """A GenerationBatch owned by the LoRAJob: every evaluation prompt at every LoRA weight."""
    assert spec.evaluation is not None
    meta = owner["metadata"]
    destination = spec.output.destination.pvc
    assert destination is not None
    trigger = spec.dataset.trigger_word
    prompts = [p if p.startswith(trigger) else f"{trigger}, {p}" for p in spec.evaluation.prompts]
    batch_spec: dict[str, Any] = {
        "target": {"instance": instance},
        "sweep": {"prompts": prompts, "lora": spec.output.name, "loraWeights": spec.evaluation.weights},
        "output": {"pvc": {"claimName": destination.claim_name, "path": f"{destination.path}/evaluation".lstrip("/")}},
    }
    if spec.evaluation.params:
        batch_spec["defaults"] = spec.evaluation.params.to_api()
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "GenerationBatch",
        "metadata": _meta(owner, eval_name(meta["name"]), "evaluate"),
        "spec": batch_spec,
    }
