"""The LoRAJob controller on the local cluster: train Job -> publish -> rescan -> evaluation batch.

Under kwok the pods run nothing (GPU training cannot run here at all): the training, publish and
batch Jobs complete at once, so this checks the controller's Jobs, its status path and its calls;
`sd-operator train` itself is tested against a stand-in trainer in test_train_wrapper.py. The LoRA
rescan goes through a real gateway process to a real emulator, which the test then asks what it saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from kubernetes import client

from cluster_support import Cluster, Operator, start_operator, stop_operator
from helpers import wait_for
from processes import Proc, emulator, gateway

GROUP, VERSION = "sd-operator.dev", "v1alpha1"
MODEL = "sd_xl_base_1.0.safetensors"


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    tmp = tmp_path_factory.mktemp("services")
    emu = emulator(tmp, "xl", MODEL)
    gw = gateway(tmp, [emu])
    yield gw
    gw.stop()
    emu.stop()


@pytest.fixture(scope="module")
def lj_operator(
    cluster: Cluster, crds: None, services: Proc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    op = start_operator(cluster, tmp_path_factory.mktemp("op") / "operator.log", env={"SD_GATEWAY_URL": services.url})
    yield op
    stop_operator(op)


def bound_claims(cluster: Cluster, namespace: str, names: list[str]) -> None:
    """PersistentVolumeClaims bound to pre-made PersistentVolumes (the PV controller binds them)."""
    for name in names:
        pv = f"{namespace}-{name}"[:63]
        cluster.core.create_persistent_volume(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": pv},
                "spec": {
                    "capacity": {"storage": "10Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "hostPath": {"path": f"/nonexistent/{pv}"},
                    "persistentVolumeReclaimPolicy": "Delete",
                    "claimRef": {"namespace": namespace, "name": name},
                },
            }
        )
        cluster.core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": name},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "volumeName": pv,
                    "resources": {"requests": {"storage": "10Gi"}},
                },
            },
        )
    wait_for(
        lambda: all(
            cluster.core.read_namespaced_persistent_volume_claim(n, namespace).status.phase == "Bound" for n in names
        ),
        timeout=60,
        what="the claims to bind",
    )


def lorajob(name: str, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoRAJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"family": "sdxl", "fromInstance": {"name": "xl"}},
            "dataset": {"source": {"pvc": {"claimName": "datasets", "path": "mystyle"}}, "triggerWord": "mystyle"},
            "training": {"networkDim": 128, "networkAlpha": 64, "epochs": 4, "saveEveryNEpochs": 2},
            "output": {"name": "mystyle-xl", "destination": {"pvc": {"claimName": "loras", "path": "out"}}},
            "gpu": {"memoryGiB": 12},
            "publishTo": [{"name": "xl"}],
            "evaluation": {"prompts": ["a lighthouse"], "weights": [0.6, 1.0]},
        },
    }
    body["spec"].update(spec)
    return body


def get(custom: client.CustomObjectsApi, ns: str, name: str) -> dict[str, Any]:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, "lorajobs", name)


@pytest.fixture
def xl_instance(cluster: Cluster, custom: client.CustomObjectsApi, namespace: str) -> None:
    bound_claims(cluster, namespace, ["datasets", "loras", "models"])
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "sdinstances",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "SDInstance",
            "metadata": {"name": "xl"},
            "spec": {
                "replicas": 0,
                "model": {
                    "family": "sdxl",
                    "checkpoint": {
                        "name": MODEL,
                        "source": {"huggingFace": {"repo": "stabilityai/stable-diffusion-xl-base-1.0", "file": MODEL}},
                    },
                },
                "storage": {"pvc": {"claimName": "models", "path": "cache"}},
            },
        },
    )


def test_train_publish_rescan_and_evaluate(
    cluster: Cluster,
    lj_operator: Operator,
    custom: client.CustomObjectsApi,
    namespace: str,
    services: Proc,
    xl_instance: None,
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "lorajobs", lorajob("style"))
    done = wait_for(
        lambda: (
            get(custom, namespace, "style").get("status", {}).get("phase") == "Succeeded"
            and get(custom, namespace, "style")
        ),
        timeout=90,
        what="the LoRAJob to succeed",
    )
    status = done["status"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["DatasetValid"]["status"] == "True" and conditions["Complete"]["status"] == "True"
    assert (
        conditions["NetworkDimWarning"]["status"] == "True" and "dim 32" in conditions["NetworkDimWarning"]["message"]
    )
    assert status["published"][0]["instance"] == "xl"
    assert status["published"][0]["path"].endswith("/models/cache/Lora/mystyle-xl.safetensors")
    assert status["evaluationBatch"] == "style-eval" and status["startTime"] and status["completionTime"]

    train = cluster.batch.read_namespaced_job("style-train", namespace)
    pod = train.spec.template.spec
    assert [c.name for c in pod.init_containers] == ["dataset-lint", "fetch-model"]
    assert pod.init_containers[0].command[:3] == ["sd-operator", "dataset", "lint"]
    trainer = pod.containers[0].command
    assert trainer[:2] == ["sd-operator", "train"] and "--gpu-memory-gib" in trainer
    assert pod.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    publish = cluster.batch.read_namespaced_job("style-publish-xl", namespace)
    command = publish.spec.template.spec.containers[0].command
    assert command[:2] == ["sd-operator", "publish-lora"] and command[-1].endswith("/Lora/mystyle-xl.safetensors")
    evaluation = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "generationbatches", "style-eval")
    assert evaluation["spec"]["sweep"] == {
        "prompts": ["mystyle, a lighthouse"],
        "lora": "mystyle-xl",
        "loraWeights": [0.6, 1.0],
    }
    assert evaluation["metadata"]["ownerReferences"][0]["name"] == "style"
    assert evaluation["status"]["phase"] == "Succeeded"
    # The rescan went through the gateway to the instance of the model.
    emulator_url = requests.get(f"{services.url}/v1/instances", timeout=5).json()[0]["url"]
    seen = requests.get(f"{emulator_url}/emulator/stats", timeout=5).json()["requests"]
    assert seen.get("POST /sdapi/v1/refresh-loras", 0) >= 1
    wait_for(  # kopf posts Events from a queue, a moment after the status
        lambda: any(
            e.reason == "TrainingDefaults"
            for e in cluster.core.list_namespaced_event(namespace, field_selector="involvedObject.name=style").items
        ),
        timeout=30,
        what="the event of style",
    )


def test_training_failure_ends_in_failed_with_the_trainers_line(
    lj_operator: Operator, custom: client.CustomObjectsApi, namespace: str, xl_instance: None
) -> None:
    line = "training failed with exit code 1: torch.cuda.OutOfMemoryError: CUDA out of memory"
    body = lorajob("oom", podMetadata={"annotations": {"sim.sd-operator.dev/job-failure": line}}, publishTo=None)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "lorajobs", body)
    done = wait_for(
        lambda: (
            get(custom, namespace, "oom").get("status", {}).get("phase") == "Failed" and get(custom, namespace, "oom")
        ),
        timeout=90,
        what="the LoRAJob to fail",
    )
    assert done["status"]["message"] == line


def test_unsupported_dataset_source_is_reported(
    lj_operator: Operator, custom: client.CustomObjectsApi, namespace: str, xl_instance: None
) -> None:
    body = lorajob("s3", dataset={"source": {"s3": {"bucket": "data", "key": "mystyle/"}}, "triggerWord": "mystyle"})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "lorajobs", body)
    done = wait_for(
        lambda: (
            get(custom, namespace, "s3").get("status", {}).get("phase") == "Failed" and get(custom, namespace, "s3")
        ),
        timeout=60,
        what="the unsupported source to be reported",
    )
    assert "only pvc" in done["status"]["message"]


def test_training_spec_is_immutable(
    lj_operator: Operator, custom: client.CustomObjectsApi, namespace: str, xl_instance: None, tmp_path: Path
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "lorajobs", lorajob("fixed", suspend=True))
    with pytest.raises(client.ApiException) as rejected:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "lorajobs", "fixed", {"spec": {"training": {"epochs": 20}}}
        )
    assert "immutable" in rejected.value.body
