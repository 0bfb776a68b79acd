"""The console's summaries of SDInstances, GenerationBatches and LoRAJobs, and /v1/fleet built from the
dispatcher's backends and discovery's SDInstances."""

from __future__ import annotations

from typing import Any

from sd_operator.gateway.app import State
from sd_operator.gateway.config import GatewayConfig
from sd_operator.gateway.console import Console, fleet
from sd_operator.gateway.discovery import KubeDiscovery
from sd_operator.gateway.dispatch import Backend
from sd_operator.gateway.objects import batch_summary, instance_summary, lorajob_summary, model_state

XL = "sd_xl_base_1.0.safetensors"


def sdi(name: str, phase: str | None, **status: Any) -> dict[str, Any]:
    ready = status.pop("ready", None)
    body: dict[str, Any] = {
        "metadata": {"namespace": "ns", "name": name},
        "spec": {"model": {"checkpoint": {"name": XL}}, "gpu": {"memoryGiB": 24}, "replicas": 1},
        "status": {"phase": phase, **status},
    }
    if ready:
        body["status"]["conditions"] = [{"type": "Ready", "status": "False", **ready}]
    return body


def test_instance_summary() -> None:
    pending = sdi("a", "Pending", message="0/3 nodes are available: 1 Insufficient nvidia.com/gpu",
                  ready={"reason": "Unschedulable", "message": "0/3 nodes"})  # fmt: skip
    s = instance_summary(pending)
    assert (s["namespace"], s["name"], s["phase"], s["reason"]) == ("ns", "a", "Pending", "Unschedulable")
    assert s["message"].startswith("0/3 nodes are available") and s["gpu"] == "24GiB"
    assert (s["replicas"], s["readyReplicas"], s["desiredReplicas"], s["autoscaling"]) == (0, 0, None, False)
    scaled = sdi("b", "Ready", gpu="1x NVIDIA-L4 (23034 MiB)", replicas=2, readyReplicas=1, desiredReplicas=0)
    scaled["spec"]["autoscaling"] = {"minReplicas": 0, "maxReplicas": 3}
    s = instance_summary(scaled)
    assert s["gpu"] == "1x NVIDIA-L4 (23034 MiB)" and s["autoscaling"] is True
    assert (s["replicas"], s["readyReplicas"], s["desiredReplicas"]) == (2, 1, 0)
    assert instance_summary({"metadata": {"name": "new"}})["phase"] == "Pending"


def test_model_state() -> None:
    def inst(phase: str, reason: str | None = None) -> dict[str, Any]:
        return {"phase": phase, "reason": reason}

    assert model_state(1, [inst("Downloading")]) == "Ready"
    assert model_state(0, []) == "Pending"
    assert model_state(0, [inst("Ready", "ScaledToZero")]) == "ScaledToZero"
    assert model_state(0, [inst("Failed"), inst("Loading")]) == "Loading"
    assert model_state(0, [inst("Failed")]) == "Failed"


def test_batch_summary() -> None:
    batch = {
        "metadata": {"namespace": "ns", "name": "portraits", "creationTimestamp": "2026-12-05T10:00:00Z"},
        "spec": {"target": {"model": XL}, "output": {"pvc": {"claimName": "renders", "path": "p"}, "format": "webp"}},
        "status": {"phase": "Running", "total": 50, "succeeded": 20, "failed": 5, "running": 4, "progress": "20/50"},
    }
    s = batch_summary(batch)
    assert (s["model"], s["phase"], s["total"], s["succeeded"], s["failed"], s["running"]) == (
        XL, "Running", 50, 20, 5, 4,
    )  # fmt: skip
    assert s["progress"] == 0.5 and s["progressText"] == "20/50" and s["format"] == "webp"
    assert s["outputLocation"] == "pvc://ns/renders/p" and s["created"] == "2026-12-05T10:00:00Z"
    new = batch_summary({"metadata": {"namespace": "ns", "name": "n"}, "spec": {
        "target": {"instance": "xl"}, "output": {"s3": {"bucket": "b", "key": "runs/one/"}}}})  # fmt: skip
    assert (new["phase"], new["progress"], new["model"], new["outputLocation"]) == (
        "Pending", None, "xl", "s3://b/runs/one",
    )  # fmt: skip


def test_lorajob_summary() -> None:
    job = {
        "metadata": {"namespace": "ns", "name": "style"},
        "status": {
            "phase": "Evaluating",
            "message": "rendering the evaluation on xl",
            "progress": {"epoch": 10, "totalEpochs": 10, "step": 1000, "totalSteps": 1000, "loss": 0.0812},
            "artifacts": [{"path": "pvc://ns/loras/style/style.safetensors", "sha256": "ab", "sizeBytes": 10}],
            "evaluationBatch": "style-eval",
        },
    }
    s = lorajob_summary(job)
    assert (s["phase"], s["epoch"], s["totalSteps"], s["loss"]) == ("Evaluating", 10, 1000, 0.0812)
    assert s["evaluationBatch"] == "style-eval"
    assert s["outputs"] == [{"path": "pvc://ns/loras/style/style.safetensors", "epoch": None, "sha256": "ab",
                             "sizeBytes": 10}]  # fmt: skip
    assert lorajob_summary({"metadata": {"name": "x"}})["evaluationBatch"] is None


def test_fleet_joins_backends_sdinstances_and_queues() -> None:
    cfg = GatewayConfig()
    state = State(cfg)
    console = Console(cfg)
    console.discovery = KubeDiscovery(state)
    ready = sdi("xl", "Ready", replicas=1, readyReplicas=1)
    loading = sdi("xl-2", "Loading", ready={"reason": "Loading", "message": "loading the model"})
    sd15 = sdi("anime", "Ready", ready={"reason": "ScaledToZero", "message": "no demand"})
    sd15["spec"]["model"]["checkpoint"]["name"] = "anime.safetensors"
    for body in (ready, loading, sd15):
        console.discovery._on_instance("ADDED", body)
    state.dispatcher.add(Backend("http://10.0.0.1:7861", XL, instance="ns/xl", gpu="24GiB"))
    state.dispatcher.add(Backend("http://127.0.0.1:9000", XL, instance=None, gpu="12GiB"))  # a static backend
    out = fleet(state, console)
    assert out["discovery"] == {"up": False, "staleSeconds": 0.0}  # the discovery never listed (not running)
    models = {m["model"]: m for m in out["models"]}
    xl, anime = models[XL], models["anime.safetensors"]
    assert xl["state"] == "Ready" and xl["queue"] == 0 and xl["running"] == 0 and xl["oldestWaitSeconds"] is None
    assert [(i["name"], i["phase"]) for i in xl["instances"]] == [
        ("xl", "Ready"), ("xl-2", "Loading"), ("http://127.0.0.1:9000", "Ready"),
    ]  # fmt: skip
    assert xl["instances"][1]["message"] == "loading the model"
    assert anime["state"] == "ScaledToZero" and anime["instances"][0]["reason"] == "ScaledToZero"
    console.discovery = None
    assert fleet(state, console)["discovery"] == {"up": True, "staleSeconds": 0.0, "kubernetes": False}
