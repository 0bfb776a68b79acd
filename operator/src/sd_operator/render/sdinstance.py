"""What an SDInstance becomes: pure functions from the spec to the manifests of its children.

ConfigMap (the fetch manifest and the WebUI settings), Deployment (init container `sd-operator
fetch-model`, the WebUI container with its one fixed model), Service (labelled with the model, for
discovery) and NetworkPolicy (only the services layer and the operator reach the WebUI port).
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from sd_operator import API_GROUP
from sd_operator.api.base import SecretKeyRef
from sd_operator.api.models import ModelFamily, ModelFile
from sd_operator.api.sdinstance import Attention, SDInstanceSpec, VRAMMode
from sd_operator.fetch.manifest import CHECKPOINT_SUBDIR
from sd_operator.render.common import (
    INSTANCE_LABEL,
    MANAGED_BY,
    MODEL_ANNOTATION,
    MODEL_LABEL,
    WEBUI_CLIENT_LABEL,
    content_hash,
    label_value,
    owner_reference,
    pod_security_context,
    restricted_security_context,
    user_labels,
)
from sd_operator.render.scheduling import (
    gpu_affinity,
    gpu_node_selector,
    gpu_tolerations,
    scheduling_extras,
)
from sd_operator.settings import DEFAULT_HF_ENDPOINT

MODELS_DIR = "/models"
CONFIG_DIR = "/etc/sd-operator"
SOURCES_DIR = "/sources"
# Folders under the model cache, as the WebUI names them.
SUBDIRS = {
    "checkpoint": CHECKPOINT_SUBDIR,
    "vae": "VAE",
    "lora": "Lora",
    "controlnet": "ControlNet",
    "embedding": "embeddings",
}
DEFAULT_EPHEMERAL_SIZE = "64Gi"
HF_ENDPOINT = DEFAULT_HF_ENDPOINT
CONFIG_HASH_ANNOTATION = f"{API_GROUP}/config-hash"


@dataclass(frozen=True)
class RenderSettings:
    """Operator-wide settings the render functions need (from the operator's configuration)."""

    operator_image: str = "ghcr.io/sd-operator/sd-operator:0.1.0"
    image_pull_secrets: tuple[str, ...] = ()
    extra_pod_labels: dict[str, str] = field(default_factory=dict)
    # For huggingFace sources without their own endpoint (SD_HF_ENDPOINT: a mirror when air-gapped).
    hf_endpoint: str = HF_ENDPOINT
    log_format: str = "plain"  # SD_LOG_FORMAT of the runner Jobs: the operator's own


def child_name(instance: str) -> str:
    return f"{instance}-webui"


def selector_labels(instance: str) -> dict[str, str]:
    """The Deployment's selector: stable for the object's lifetime (selectors are immutable)."""
    return {INSTANCE_LABEL: instance, "app.kubernetes.io/component": "webui"}


def common_labels(meta: dict[str, Any], spec: SDInstanceSpec) -> dict[str, str]:
    return {
        **user_labels(meta),
        **selector_labels(meta["name"]),
        "app.kubernetes.io/name": "sd-webui",
        "app.kubernetes.io/part-of": "sd-operator",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        MODEL_LABEL: label_value(spec.model.checkpoint.name),
        f"{API_GROUP}/family": spec.model.family.value,
    }


# ---------------------------------------------------------------------------------------------
# WebUI flags


def vram_flag(family: ModelFamily, memory_gib: int | None, mode: VRAMMode) -> str | None:
    """The VRAM-saving flag: chosen from the GPU's memory and the family when the mode is auto."""
    if mode != VRAMMode.AUTO:
        return None if mode == VRAMMode.NONE else f"--{mode.value}"
    if memory_gib is None:
        return None
    if memory_gib < 8:
        return "--lowvram"
    if family == ModelFamily.SDXL and memory_gib < 16:
        return "--medvram-sdxl"
    if memory_gib <= 12:
        return "--medvram"
    return None


def attention_flag(attention: Attention) -> str:
    return "--opt-sdp-attention" if attention == Attention.SDP else "--xformers"


def no_half_vae(spec: SDInstanceSpec) -> bool:
    """SDXL's VAE overflows in fp16 (black images) unless it runs in full precision."""
    if spec.webui.no_half_vae is not None:
        return spec.webui.no_half_vae
    return spec.model.family == ModelFamily.SDXL


def model_path(kind: str, name: str) -> str:
    return f"{MODELS_DIR}/{SUBDIRS[kind]}/{name}"


def webui_args(spec: SDInstanceSpec) -> list[str]:
    """The WebUI command line: API only, the one checkpoint fixed, settings frozen, flags last."""
    model = spec.model
    args = [
        "--api",
        "--nowebui",
        "--listen",
        "--port",
        str(spec.webui.port),
        "--ckpt",
        model_path("checkpoint", model.checkpoint.name),
        "--ui-settings-file",
        f"{CONFIG_DIR}/webui-config.json",
        "--freeze-settings",
        "--no-download-sd-model",
        "--skip-prepare-environment",
        "--skip-install",
        "--skip-version-check",
        "--lora-dir",
        f"{MODELS_DIR}/{SUBDIRS['lora']}",
        "--embeddings-dir",
        f"{MODELS_DIR}/{SUBDIRS['embedding']}",
        "--controlnet-dir",
        f"{MODELS_DIR}/{SUBDIRS['controlnet']}",
    ]
    if model.vae:
        args += ["--vae-path", model_path("vae", model.vae.name)]
    args.append(attention_flag(spec.webui.attention))
    vram = vram_flag(model.family, spec.gpu.memory_gib, spec.webui.vram_mode)
    if vram:
        args.append(vram)
    if no_half_vae(spec):
        args.append("--no-half-vae")
    if spec.webui.api_auth_secret:
        # Kubernetes expands $(VAR) from the container's env, so the secret never appears in the spec.
        args += ["--api-auth", "$(SD_API_AUTH)"]
    args += spec.webui.extra_args or []
    return args


def webui_settings(spec: SDInstanceSpec) -> dict[str, Any]:
    """WebUI settings (config.json) that keep exactly one checkpoint loaded."""
    return {
        "sd_model_checkpoint": spec.model.checkpoint.name,
        "sd_checkpoints_limit": 1,
        "sd_checkpoints_keep_in_cpu": False,
        "sd_vae": spec.model.vae.name if spec.model.vae else "Automatic",
        "samples_format": "png",
        # mmap of a file on network storage stalls loads; read it into memory instead.
        "disable_mmap_load_safetensors": bool(spec.storage and spec.storage.pvc),
    }


# ---------------------------------------------------------------------------------------------
# Model fetching


class _SecretEnv:
    """Collects secret references and gives each an env var name for the fetch manifest."""

    def __init__(self) -> None:
        self.env: list[dict[str, Any]] = []
        self._names: dict[tuple[str, str], str] = {}

    def var(self, secret: str, key: str) -> str:
        if (secret, key) not in self._names:
            name = f"SD_SECRET_{len(self._names)}"
            self._names[(secret, key)] = name
            self.env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
        return self._names[(secret, key)]

    def ref(self, ref: SecretKeyRef) -> str:
        return self.var(ref.name, ref.key)


def _source_claim_volume(claim: str) -> str:
    return f"src-{content_hash(claim)[:10]}"


def fetch_entry(kind: str, model: ModelFile, secrets: _SecretEnv, hf_endpoint: str) -> dict[str, Any]:
    """One file of the fetch manifest: where to get it, how to check it. `hf_endpoint` serves
    huggingFace sources that name no endpoint of their own."""
    entry: dict[str, Any] = {
        "name": model.name,
        "subdir": SUBDIRS[kind],
        "sha256": model.sha256.lower() if model.sha256 else None,
        "allowUnsafePickle": model.allow_unsafe_pickle,
    }
    src = model.source
    if src.http:
        entry["url"] = src.http.url
        if src.http.auth_secret:
            entry["headers"] = {"Authorization": {"env": secrets.ref(src.http.auth_secret), "prefix": "Bearer "}}
    elif src.hugging_face:
        hf = src.hugging_face
        path = urllib.parse.quote(hf.file)
        revision = urllib.parse.quote(hf.revision, safe="")
        entry["url"] = f"{(hf.endpoint or hf_endpoint).rstrip('/')}/{hf.repo}/resolve/{revision}/{path}"
        if hf.token_secret:
            entry["headers"] = {"Authorization": {"env": secrets.ref(hf.token_secret), "prefix": "Bearer "}}
    elif src.s3:
        s3 = src.s3
        entry["s3"] = {"bucket": s3.bucket, "key": s3.key, "endpoint": s3.endpoint, "region": s3.region}
        if s3.credentials_secret:
            entry["s3"]["accessKeyEnv"] = secrets.var(s3.credentials_secret.name, "AWS_ACCESS_KEY_ID")
            entry["s3"]["secretKeyEnv"] = secrets.var(s3.credentials_secret.name, "AWS_SECRET_ACCESS_KEY")
    elif src.pvc:
        claim_dir = f"{SOURCES_DIR}/{_source_claim_volume(src.pvc.claim_name)}"
        entry["path"] = f"{claim_dir}/{src.pvc.path}".rstrip("/")
    return entry


def model_files(spec: SDInstanceSpec) -> list[tuple[str, ModelFile]]:
    m = spec.model
    files: list[tuple[str, ModelFile]] = [("checkpoint", m.checkpoint)]
    if m.vae:
        files.append(("vae", m.vae))
    files += [("lora", f) for f in m.loras or []]
    files += [("controlnet", f) for f in m.control_nets or []]
    files += [("embedding", f) for f in m.embeddings or []]
    return files


def fetch_manifest(spec: SDInstanceSpec, settings: RenderSettings) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The fetch manifest and the env vars (from Secrets) it refers to."""
    secrets = _SecretEnv()
    files = [fetch_entry(kind, model, secrets, settings.hf_endpoint) for kind, model in model_files(spec)]
    return {"files": files}, secrets.env


def source_claims(spec: SDInstanceSpec) -> list[str]:
    claims = {m.source.pvc.claim_name for _, m in model_files(spec) if m.source.pvc}
    return sorted(claims)


# ---------------------------------------------------------------------------------------------
# Manifests


def render_configmap(owner: dict[str, Any], spec: SDInstanceSpec, settings: RenderSettings) -> dict[str, Any]:
    meta = owner["metadata"]
    manifest, _ = fetch_manifest(spec, settings)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": child_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": common_labels(meta, spec),
            "ownerReferences": [owner_reference(owner)],
        },
        "data": {
            "models.json": json.dumps(manifest, indent=2, sort_keys=True),
            "webui-config.json": json.dumps(webui_settings(spec), indent=2, sort_keys=True),
        },
    }


def _resources(spec: SDInstanceSpec) -> dict[str, Any]:
    defaults = {"cpu": "2", "memory": "16Gi" if spec.model.family == ModelFamily.SDXL else "8Gi"}
    requests: dict[str, Any] = dict(defaults)
    limits: dict[str, Any] = {}
    if spec.resources:
        requests.update(spec.resources.requests or {})
        limits.update(spec.resources.limits or {})
    limits[spec.gpu.resource_name] = spec.gpu.count
    return {"requests": requests, "limits": limits}


def _probe(path: str, *, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


# Readiness means the checkpoint is loaded and the API answers (served by the WebUI image's
# sd-operator extension and by the emulator); liveness only asks whether the server answers at all,
# from the event loop, so a long generation holding the WebUI's queue lock never fails it.
READY_PATH = "/sd-operator/ready"
LIVE_PATH = "/sd-operator/live"
# The webui container's preStop hook (same extension, same emulator). On scale-down or deletion the kubelet
# runs preStop before it sends SIGTERM and waits for it within terminationGracePeriodSeconds; the route
# answers once the WebUI has no generation running or queued (or gives up just before the grace period
# ends), so the generation it is rendering finishes instead of failing. The gateway sends no new work
# meanwhile: the pod's endpoint is no longer ready once the pod is terminating.
DRAIN_PATH = "/sd-operator/drain"


def render_deployment(
    owner: dict[str, Any], spec: SDInstanceSpec, settings: RenderSettings, replicas: int | None = None
) -> dict[str, Any]:
    """`replicas`: the autoscaler's count when spec.autoscaling is set (spec.replicas is then ignored)."""
    meta = owner["metadata"]
    name = meta["name"]
    labels = common_labels(meta, spec)
    manifest, secret_env = fetch_manifest(spec, settings)
    port = spec.webui.port
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": child_name(name)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    storage = spec.storage
    models_mount: dict[str, Any] = {"name": "models", "mountPath": MODELS_DIR}
    if storage and storage.pvc:
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": storage.pvc.claim_name}})
        if storage.pvc.path:
            models_mount["subPath"] = storage.pvc.path
    else:
        size = storage.ephemeral.size if storage and storage.ephemeral else DEFAULT_EPHEMERAL_SIZE
        volumes.append({"name": "models", "emptyDir": {"sizeLimit": size}})
    fetch_mounts = [dict(models_mount), {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    fetch_mounts.append({"name": "tmp", "mountPath": "/tmp"})  # noqa: S108 - the pod's own emptyDir
    for claim in source_claims(spec):
        vol = _source_claim_volume(claim)
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        fetch_mounts.append({"name": vol, "mountPath": f"{SOURCES_DIR}/{vol}", "readOnly": True})

    fetcher = {
        "name": "fetch-model",
        "image": settings.operator_image,
        "command": [
            "sd-operator",
            "fetch-model",
            "--manifest",
            f"{CONFIG_DIR}/models.json",
            "--models-dir",
            MODELS_DIR,
        ],
        "env": secret_env,
        "volumeMounts": fetch_mounts,
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": restricted_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    env: list[dict[str, Any]] = []
    if spec.webui.api_auth_secret:
        ref = spec.webui.api_auth_secret
        env.append({"name": "SD_API_AUTH", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    webui = {
        "name": "webui",
        "image": spec.webui.image,
        "imagePullPolicy": spec.webui.image_pull_policy,
        "args": webui_args(spec),
        "env": env,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "resources": _resources(spec),
        "volumeMounts": [
            {**models_mount, "readOnly": True},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - the pod's own emptyDir
        ],
        # A model load can take many minutes (download done, weights to GPU): up to 30 minutes.
        "startupProbe": _probe(READY_PATH, period=10, failures=180),
        "readinessProbe": _probe(READY_PATH, period=10, failures=3),
        "livenessProbe": _probe(LIVE_PATH, period=30, failures=5, timeout=10),
        "lifecycle": {"preStop": {"httpGet": {"path": DRAIN_PATH, "port": "http"}}},
        "securityContext": restricted_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    node_selector = gpu_node_selector(spec.gpu, spec.scheduling)
    pod_spec: dict[str, Any] = {
        "initContainers": [fetcher],
        "containers": [webui],
        "volumes": volumes,
        "tolerations": gpu_tolerations(spec.scheduling),
        "securityContext": pod_security_context(),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # Let an in-flight generation finish before the pod goes.
        "terminationGracePeriodSeconds": 120,
    }
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    affinity = gpu_affinity(spec.gpu, spec.scheduling)
    if affinity:
        pod_spec["affinity"] = affinity
    pod_spec.update(scheduling_extras(spec.scheduling))
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    config_hash = content_hash(manifest, webui_settings(spec))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": child_name(name),
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": {MODEL_ANNOTATION: spec.model.checkpoint.name},
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "replicas": spec.replicas if replicas is None else replicas,
            "selector": {"matchLabels": selector_labels(name)},
            # A GPU is never spare: replace pods one at a time instead of surging.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {
                    "labels": {**labels, **settings.extra_pod_labels},
                    "annotations": {
                        MODEL_ANNOTATION: spec.model.checkpoint.name,
                        CONFIG_HASH_ANNOTATION: config_hash,
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def render_service(owner: dict[str, Any], spec: SDInstanceSpec) -> dict[str, Any]:
    """A headless Service: its EndpointSlices tell the gateway each pod (it picks an idle one itself, which
    a virtual IP's blind balancing could not), and its DNS name resolves to the ready pods. A ClusterIP
    would cost an allocation per instance (serialised in the API server: the slowest child at 1,000
    instances) and a kube-proxy rule set on every node, for an address nothing uses."""
    meta = owner["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": child_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": common_labels(meta, spec),
            "annotations": {MODEL_ANNOTATION: spec.model.checkpoint.name},
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "None",
            "selector": selector_labels(meta["name"]),
            "ports": [{"name": "http", "port": spec.webui.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render_network_policy(owner: dict[str, Any], spec: SDInstanceSpec) -> dict[str, Any]:
    """The WebUI API has no authentication of its own by default: admit only labelled clients."""
    meta = owner["metadata"]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": child_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": common_labels(meta, spec),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "podSelector": {"matchLabels": selector_labels(meta["name"])},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {WEBUI_CLIENT_LABEL: "true"}}}],
                    "ports": [{"port": spec.webui.port, "protocol": "TCP"}],
                }
            ],
        },
    }


def render_all(
    owner: dict[str, Any], spec: SDInstanceSpec, settings: RenderSettings, replicas: int | None = None
) -> list[dict[str, Any]]:
    """Every child, in the order they are applied (the ConfigMap before the pods that mount it)."""
    return [
        render_configmap(owner, spec, settings),
        render_service(owner, spec),
        render_network_policy(owner, spec),
        render_deployment(owner, spec, settings, replicas),
    ]


def endpoint(name: str, namespace: str, spec: SDInstanceSpec) -> str:
    return f"http://{child_name(name)}.{namespace}.svc:{spec.webui.port}"


def gpu_summary(spec: SDInstanceSpec) -> str:
    what = spec.gpu.product or spec.gpu.resource_name
    memory = f" ({spec.gpu.memory_gib}GiB)" if spec.gpu.memory_gib else ""
    return f"{spec.gpu.count}x {what}{memory}"
