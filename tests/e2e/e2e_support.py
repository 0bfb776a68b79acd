"""Builders and waits the end-to-end tests share."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from cluster_support import Cluster, Operator
from helpers import wait_for
from processes import BIN, Proc, _start

GROUP, VERSION = "sd-operator.dev", "v1alpha1"


@dataclass
class Chain:
    cluster: Cluster
    local: bool  # pods run as processes on this machine (their volumes and processes are reachable)
    gateway_url: str
    operator: Operator | None = None
    # Distinguishes this session's prompts from earlier ones: the gateway caches results.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def require_local(self) -> None:
        if not self.local:
            pytest.skip("needs the local pod runner (make e2e)")

    @property
    def runner_dir(self) -> Path:
        self.require_local()
        return self.cluster.local.cfg.workdir / "runner"  # type: ignore[attr-defined]

    def pod_volume(self, pod: client.V1Pod, volume: str) -> Path:
        """A pod's emptyDir as the runner made it (the pod's own folder on this machine)."""
        return self.runner_dir / "pods" / pod.metadata.uid / "volumes" / volume

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """The folder behind a claim: the runner provisions PersistentVolumes as local folders."""
        self.require_local()
        core = self.cluster.core
        pvc = core.read_namespaced_persistent_volume_claim(claim, namespace)
        return Path(core.read_persistent_volume(pvc.spec.volume_name).spec.host_path.path)


def instance(name: str, checkpoint: str, sha: str | None = None, replicas: int = 1, **spec: Any) -> dict[str, Any]:
    """An SDInstance whose checkpoint comes from Hugging Face (the stand-in host, via SD_HF_ENDPOINT)."""
    ckpt: dict[str, Any] = {
        "name": checkpoint,
        "source": {"huggingFace": {"repo": "e2e/models", "file": checkpoint}},
    }
    if sha:
        ckpt["sha256"] = sha
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SDInstance",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "model": {"family": "sd15", "checkpoint": ckpt},
            "gpu": {"memoryGiB": 12},
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
        },
    }
    body["spec"].update(spec)
    return body


def get(custom: client.CustomObjectsApi, ns: str, plural: str, name: str) -> dict[str, Any]:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, plural, name)


def wait_phase(
    custom: client.CustomObjectsApi, ns: str, name: str, phase: str, timeout: float = 120, plural: str = "sdinstances"
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        obj = get(custom, ns, plural, name)
        status = obj.get("status") or {}
        seen = status.get("observedGeneration") == obj["metadata"]["generation"]
        return obj if status.get("phase") == phase and seen else None

    try:
        return wait_for(reached, timeout=timeout, what=f"{plural}/{name} to be {phase}")
    except AssertionError as e:
        raise AssertionError(f"{e}; status now: {get(custom, ns, plural, name).get('status')}") from None


def webui_pods(chain: Chain, namespace: str, name: str) -> list[client.V1Pod]:
    pods = chain.cluster.core.list_namespaced_pod(namespace, label_selector=f"sd-operator.dev/instance={name}").items
    return [p for p in pods if not p.metadata.deletion_timestamp]


def claims(chain: Chain, namespace: str, names: list[str]) -> None:
    """Claims of the default StorageClass (no storageClassName): the runner provisions a folder each."""
    core = chain.cluster.core
    for name in names:
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": name},
                "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
            },
        )

    def bound() -> bool:
        return all(core.read_namespaced_persistent_volume_claim(n, namespace).status.phase == "Bound" for n in names)

    wait_for(bound, timeout=60, what=f"claims {names} to be provisioned and bound")


def start_gateway(cluster: Cluster, log: Path, *flags: str) -> Proc:
    """A gateway as the chart runs it: discovery in-cluster, demand published for the autoscaler."""
    return _start(
        [str(BIN / "sd-operator"), "gateway", "--host=127.0.0.1", "--port=0", "--kubernetes", "--report-demand",
         "--demand-namespace=default", *flags],
        log,
        "GATEWAY_PORT",
        env={"KUBECONFIG": str(cluster.kubeconfig)},
    )  # fmt: skip
