"""Builders and waits for the project's custom resources, shared by the integration tests."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from helpers import wait_for

GROUP, VERSION, PLURAL = "sd-operator.dev", "v1alpha1", "sdinstances"


def sdi(name: str, pool: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SDInstance",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "family": "sdxl",
                "checkpoint": {
                    "name": "sd_xl_base_1.0.safetensors",
                    "sha256": "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
                    "source": {"http": {"url": "http://models.invalid/sd_xl_base_1.0.safetensors"}},
                },
            },
            "gpu": {"memoryGiB": 24},
            "scheduling": {"nodeSelector": {"sd-test/pool": pool}},
        },
    }
    body["spec"].update(spec)
    return body


def get(custom: client.CustomObjectsApi, ns: str, name: str) -> dict[str, Any]:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def wait_phase(custom: client.CustomObjectsApi, ns: str, name: str, phase: str, timeout: float = 60) -> dict:
    def reached() -> dict | None:
        obj = get(custom, ns, name)
        status = obj.get("status") or {}
        generation_seen = status.get("observedGeneration") == obj["metadata"]["generation"]
        return obj if status.get("phase") == phase and generation_seen else None

    return wait_for(reached, timeout=timeout, what=f"{name} to be {phase}")
