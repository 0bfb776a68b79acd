"""What the console shows about the fleet's work: GenerationBatches and LoRAJobs, listed and watched like
discovery watches SDInstances (the same threads, backoff and re-list; see discovery.Watcher), and the
summaries `/v1/fleet`, `/v1/batches` and `/v1/lorajobs` answer with (pure functions of the objects).

A gateway whose ServiceAccount may not read these kinds (an older chart) keeps serving; the console's
lists stay empty and say so (`watch.up` false), and one log line names the missing permission.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kubernetes import client

from sd_operator import API_GROUP, API_VERSION, kube
from sd_operator.gateway.discovery import Watcher, declared_model

log = logging.getLogger("sd_operator.gateway.console")
Key = tuple[str, str]  # namespace, name


class ObjectWatcher(Watcher):
    """GenerationBatches and LoRAJobs of the watched namespaces, as the API server last said."""

    label = "the console's watch"
    KINDS = ("generationbatches", "lorajobs")

    def __init__(self, namespaces: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.namespaces = namespaces or ("",)
        self.objects: dict[str, dict[Key, dict[str, Any]]] = {kind: {} for kind in self.KINDS}

    def kept(self) -> str:
        return "the last known batches and LoRAJobs"

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        custom = client.CustomObjectsApi(kube.api_client())
        for ns in self.namespaces:
            for kind in self.KINDS:
                if ns:
                    lister = self._lister(custom.list_namespaced_custom_object, API_GROUP, API_VERSION, ns, kind)
                else:
                    lister = self._lister(custom.list_cluster_custom_object, API_GROUP, API_VERSION, kind)
                self._watch(lister, self._handler(kind), f"{kind} in {ns or 'all namespaces'}")
        try:
            await asyncio.Event().wait()
        finally:
            self.stop.set()

    def _handler(self, kind: str) -> Any:
        def on_event(event: str, body: dict[str, Any]) -> None:
            meta = body["metadata"]
            key = (meta.get("namespace", ""), meta["name"])
            if event == "DELETED":
                self.objects[kind].pop(key, None)
            else:
                self.objects[kind][key] = body

        return on_event

    def batches(self) -> list[dict[str, Any]]:
        return [self.objects["generationbatches"][k] for k in sorted(self.objects["generationbatches"])]

    def lorajobs(self) -> list[dict[str, Any]]:
        return [self.objects["lorajobs"][k] for k in sorted(self.objects["lorajobs"])]

    def batch(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects["generationbatches"].get((namespace, name))

    def lorajob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects["lorajobs"].get((namespace, name))


# ---------------------------------------------------------------------------------------------
# Summaries (pure)


def _ratio(done: Any, total: Any) -> float | None:
    if not isinstance(done, int) or not isinstance(total, int) or total <= 0:
        return None
    return round(min(done / total, 1.0), 4)


def batch_summary(batch: dict[str, Any]) -> dict[str, Any]:
    """One GenerationBatch for /v1/batches. `progress` is finished items (succeeded + failed) / total, 0..1;
    `progressText` is the status' own succeeded/total."""
    meta, spec, status = batch["metadata"], batch.get("spec") or {}, batch.get("status") or {}
    target = spec.get("target") or {}
    succeeded, failed, total = status.get("succeeded"), status.get("failed"), status.get("total")
    finished = (succeeded or 0) + (failed or 0) if isinstance(total, int) else None
    output = spec.get("output") or {}
    return {
        "namespace": meta.get("namespace", ""),
        "name": meta["name"],
        "model": status.get("model") or target.get("model") or target.get("instance"),
        "phase": status.get("phase") or "Pending",
        "total": total,
        "succeeded": succeeded,
        "failed": failed,
        "running": status.get("running"),
        "progress": _ratio(finished, total),
        "progressText": status.get("progress"),
        "outputLocation": status.get("outputLocation") or output_location(batch),
        "format": output.get("format") or "png",
        "message": status.get("message"),
        "created": meta.get("creationTimestamp"),
        "failures": (status.get("failures") or [])[:5],
    }


def output_location(batch: dict[str, Any]) -> str | None:
    """Where the spec says the images go, as the controller writes it (pvc://ns/claim/path, s3://bucket/key)."""
    output = (batch.get("spec") or {}).get("output") or {}
    ns = batch["metadata"].get("namespace", "")
    if pvc := output.get("pvc"):
        return f"pvc://{ns}/{pvc.get('claimName')}/{pvc.get('path') or ''}".rstrip("/")
    if s3 := output.get("s3"):
        key = str(s3.get("key") or "").strip("/")
        return f"s3://{s3.get('bucket')}/{key}".rstrip("/")
    return None


def lorajob_summary(job: dict[str, Any]) -> dict[str, Any]:
    meta, status = job["metadata"], job.get("status") or {}
    progress = status.get("progress") or {}
    return {
        "namespace": meta.get("namespace", ""),
        "name": meta["name"],
        "phase": status.get("phase") or "Pending",
        "message": status.get("message"),
        "epoch": progress.get("epoch"),
        "totalEpochs": progress.get("totalEpochs"),
        "step": progress.get("step"),
        "totalSteps": progress.get("totalSteps"),
        "loss": progress.get("loss"),
        "percent": progress.get("percent"),
        "etaSeconds": progress.get("etaSeconds"),
        "evaluationBatch": status.get("evaluationBatch"),
        "outputs": [
            {k: a.get(k) for k in ("path", "epoch", "sha256", "sizeBytes")} for a in status.get("artifacts") or []
        ],
        "published": [p.get("instance") for p in status.get("published") or []],
        "created": meta.get("creationTimestamp"),
    }


def instance_summary(instance: dict[str, Any]) -> dict[str, Any]:
    """One SDInstance as /v1/fleet shows it."""
    meta, spec, status = instance["metadata"], instance.get("spec") or {}, instance.get("status") or {}
    declared = declared_model(instance)
    gpu = spec.get("gpu") or {}
    autoscaling = spec.get("autoscaling") or {}
    memory = gpu.get("memoryGiB")
    return {
        "namespace": meta.get("namespace", ""),
        "name": meta["name"],
        "phase": status.get("phase") or "Pending",
        "reason": declared.reason if declared else None,
        "message": status.get("message") or (declared.message if declared else None),
        "gpu": status.get("gpu") or gpu.get("product") or (f"{memory}GiB" if memory else None),
        "replicas": int(status.get("replicas") or 0),
        "readyReplicas": int(status.get("readyReplicas") or 0),
        "desiredReplicas": status.get("desiredReplicas"),
        "specReplicas": spec.get("replicas"),
        "autoscaling": int(autoscaling.get("maxReplicas") or 0) > 0,
    }


def model_state(ready_backends: int, instances: list[dict[str, Any]]) -> str:
    """Ready when a backend serves the model; else the most advanced of its instances' states."""
    if ready_backends:
        return "Ready"
    if not instances:
        return "Pending"
    if any(i["reason"] == "ScaledToZero" for i in instances):
        return "ScaledToZero"
    for phase in ("Loading", "Downloading", "Pending", "Degraded", "Failed"):
        if any(i["phase"] == phase for i in instances):
            return phase
    return str(instances[0]["phase"])
