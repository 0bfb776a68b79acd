"""The v1alpha1 API at a real apiserver: examples accepted, bad objects rejected with the field named,
immutability, kubectl explain and the scale subresource."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from cluster_support import ROOT, Cluster

GROUP, VERSION = "sd-operator.dev", "v1alpha1"
PLURALS = {"SDInstance": "sdinstances", "LoRAJob": "lorajobs", "GenerationBatch": "generationbatches"}
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
DELETE = object()

HF = {"huggingFace": {"repo": "stabilityai/stable-diffusion-xl-base-1.0", "file": "sd_xl_base_1.0.safetensors"}}
SDI: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "SDInstance",
    "metadata": {"name": "x"},
    "spec": {
        "model": {
            "family": "sdxl",
            "checkpoint": {"name": "sd_xl_base_1.0.safetensors", "source": HF},
            "loras": [
                {"name": "style.safetensors", "source": {"http": {"url": "https://example.com/style.safetensors"}}}
            ],
        },
        "gpu": {"memoryGiB": 24},
    },
}
LJ: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "LoRAJob",
    "metadata": {"name": "x"},
    "spec": {
        "baseModel": {"family": "sd15", "fromInstance": {"name": "anime"}},
        "dataset": {
            "source": {"pvc": {"claimName": "data", "path": "mystyle"}},
            "triggerWord": "mystyle",
            "subsets": [{"path": "100_mystyle person", "repeats": 100}],
        },
        "training": {"networkDim": 32, "networkAlpha": 16},
        "output": {"name": "mystyle", "destination": {"pvc": {"claimName": "out"}}},
        "evaluation": {"prompts": ["a cat"]},
    },
}
GB: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "GenerationBatch",
    "metadata": {"name": "x"},
    "spec": {
        "target": {"model": "sd_xl_base_1.0.safetensors"},
        "defaults": {
            "width": 1024,
            "height": 1024,
            "steps": 30,
            "cfgScale": 7,
            "loras": [{"name": "style", "weight": 0.8}],
            "controlNets": [
                {"type": "canny", "image": "aGVsbG8=", "weight": 1.0, "guidanceStart": 0, "guidanceEnd": 1}
            ],
        },
        "items": {"inline": [{"prompt": "a cat"}]},
        "sweep": {"prompts": ["a dog"], "lora": "style", "loraWeights": [0.6, 0.8, 1.0]},
        "output": {"pvc": {"claimName": "out", "path": "run1"}},
    },
}


def mutated(base: dict, changes: dict[str, Any]) -> dict:
    """A copy of `base` with dotted paths set (list indices as numbers), or removed with DELETE."""
    obj = copy.deepcopy(base)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node: Any = obj
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        key: Any = int(last) if last.isdigit() else last
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    return obj


# (id, base, changes, text the rejection must contain: the offending field, and the reason)
INVALID = [
    # --- SDInstance
    ("sdi-pickle-ckpt", SDI, {"spec.model.checkpoint.name": "model.ckpt"}, ["spec.model.checkpoint.name", "pickle"]),
    (
        "sdi-pickle-lora",
        SDI,
        {"spec.model.loras.0.name": "style.pt"},
        ["spec.model.loras[0].name", "allowUnsafePickle"],
    ),
    (
        "sdi-two-sources",
        SDI,
        {"spec.model.checkpoint.source.http": {"url": "https://x.dev/a.safetensors"}},
        ["spec.model.checkpoint.source", "exactly one"],
    ),
    ("sdi-no-source", SDI, {"spec.model.checkpoint.source": {}}, ["spec.model.checkpoint.source", "exactly one"]),
    ("sdi-bad-sha256", SDI, {"spec.model.checkpoint.sha256": "abc"}, ["spec.model.checkpoint.sha256"]),
    ("sdi-negative-replicas", SDI, {"spec.replicas": -1}, ["spec.replicas", "greater than or equal to 0"]),
    ("sdi-zero-gpus", SDI, {"spec.gpu.count": 0}, ["spec.gpu.count"]),
    ("sdi-bad-attention", SDI, {"spec.webui": {"attention": "flash"}}, ["spec.webui.attention", "Unsupported value"]),
    ("sdi-bad-vram-mode", SDI, {"spec.webui": {"vramMode": "tiny"}}, ["spec.webui.vramMode"]),
    ("sdi-privileged-port", SDI, {"spec.webui": {"port": 80}}, ["spec.webui.port"]),
    (
        "sdi-ftp-url",
        SDI,
        {"spec.model.loras.0.source.http.url": "ftp://x.dev/a"},
        ["spec.model.loras[0].source.http.url"],
    ),
    (
        "sdi-bad-hf-repo",
        SDI,
        {"spec.model.checkpoint.source.huggingFace.repo": "no-owner"},
        ["spec.model.checkpoint.source.huggingFace.repo"],
    ),
    (
        "sdi-hf-path-traversal",
        SDI,
        {"spec.model.checkpoint.source.huggingFace.file": "../etc/passwd"},
        ["spec.model.checkpoint.source.huggingFace.file"],
    ),
    ("sdi-bad-family", SDI, {"spec.model.family": "sd9"}, ["spec.model.family", "Unsupported value"]),
    (
        "sdi-two-storages",
        SDI,
        {"spec.storage": {"pvc": {"claimName": "c"}, "ephemeral": {"size": "10Gi"}}},
        ["spec.storage", "at most one"],
    ),
    ("sdi-no-model", SDI, {"spec.model": DELETE}, ["spec.model", "Required value"]),
    ("sdi-file-name-with-dir", SDI, {"spec.model.checkpoint.name": "../x.safetensors"}, ["spec.model.checkpoint.name"]),
    ("sdi-zero-gpu-memory", SDI, {"spec.gpu.memoryGiB": 0}, ["spec.gpu.memoryGiB"]),
    (
        "sdi-medvram-sdxl-on-sd15",
        SDI,
        {"spec.model.family": "sd15", "spec.webui": {"vramMode": "medvram-sdxl"}},
        ["spec.webui.vramMode", "SDXL"],
    ),
    (
        "sdi-extra-args-switch-model",
        SDI,
        {"spec.webui": {"extraArgs": ["--ckpt=other.safetensors"]}},
        ["spec.webui.extraArgs", "--ckpt"],
    ),
    (
        "sdi-match-memory-without-memory",
        SDI,
        {"spec.gpu": {"matchMemory": True}},
        ["spec.gpu.matchMemory", "memoryGiB"],
    ),
    ("sdi-bad-gpu-resource", SDI, {"spec.gpu.resourceName": "nvidia gpu"}, ["spec.gpu.resourceName"]),
    ("sdi-bad-pvc-name", SDI, {"spec.storage": {"pvc": {"claimName": "Bad_Name"}}}, ["spec.storage.pvc.claimName"]),
    # --- LoRAJob
    ("lj-alpha-above-dim", LJ, {"spec.training.networkAlpha": 64}, ["spec.training.networkAlpha", "networkDim"]),
    ("lj-zero-dim", LJ, {"spec.training.networkDim": 0}, ["spec.training.networkDim"]),
    ("lj-negative-lr", LJ, {"spec.training.learningRate": -0.001}, ["spec.training.learningRate"]),
    ("lj-bad-scheduler", LJ, {"spec.training.lrScheduler": "step"}, ["spec.training.lrScheduler", "Unsupported value"]),
    ("lj-bad-optimizer", LJ, {"spec.training.optimizer": "Adam9000"}, ["spec.training.optimizer"]),
    ("lj-zero-epochs", LJ, {"spec.training.epochs": 0}, ["spec.training.epochs"]),
    # sd-scripts has no SD3 LoRA trainer at the pinned commit, and its adafactor schedule asserts AdaFactor.
    ("lj-sd3-family", LJ, {"spec.baseModel.family": "sd3"}, ["spec.baseModel.family", "sd3 is not supported"]),
    (
        "lj-adafactor-schedule-without-adafactor",
        LJ,
        {"spec.training.lrScheduler": "adafactor", "spec.training.optimizer": "AdamW8bit"},
        ["spec.training.lrScheduler", "adafactor works only with optimizer AdaFactor"],
    ),
    ("lj-resolution-not-64", LJ, {"spec.training.resolution": 1000}, ["spec.training.resolution", "multiple of 64"]),
    (
        "lj-two-base-models",
        LJ,
        {"spec.baseModel.checkpoint": {"name": "a.safetensors", "source": HF}},
        ["spec.baseModel", "exactly one"],
    ),
    ("lj-zero-repeats", LJ, {"spec.dataset.subsets.0.repeats": 0}, ["spec.dataset.subsets[0].repeats"]),
    ("lj-eval-weight-3", LJ, {"spec.evaluation.weights": [0.5, 3]}, ["spec.evaluation.weights[1]"]),
    ("lj-bad-precision", LJ, {"spec.training.mixedPrecision": "fp8"}, ["spec.training.mixedPrecision"]),
    ("lj-bad-output-name", LJ, {"spec.output.name": "my lora/v1"}, ["spec.output.name"]),
    ("lj-no-dataset-source", LJ, {"spec.dataset.source": {}}, ["spec.dataset.source", "exactly one"]),
    ("lj-no-trigger-word", LJ, {"spec.dataset.triggerWord": DELETE}, ["spec.dataset.triggerWord", "Required value"]),
    ("lj-absolute-subset", LJ, {"spec.dataset.subsets.0.path": "/etc"}, ["spec.dataset.subsets[0].path"]),
    ("lj-bad-caption-ext", LJ, {"spec.dataset.captionExtension": "txt"}, ["spec.dataset.captionExtension"]),
    # --- GenerationBatch
    ("gb-width-not-8", GB, {"spec.defaults.width": 500}, ["spec.defaults.width", "multiple of 8"]),
    ("gb-height-too-big", GB, {"spec.defaults.height": 4096}, ["spec.defaults.height", "2048"]),
    ("gb-width-too-small", GB, {"spec.items.inline.0.width": 32}, ["spec.items.inline[0].width"]),
    ("gb-zero-steps", GB, {"spec.defaults.steps": 0}, ["spec.defaults.steps"]),
    ("gb-too-many-steps", GB, {"spec.items.inline.0.steps": 151}, ["spec.items.inline[0].steps", "150"]),
    ("gb-cfg-31", GB, {"spec.defaults.cfgScale": 31}, ["spec.defaults.cfgScale", "30"]),
    ("gb-lora-weight", GB, {"spec.defaults.loras.0.weight": 2.5}, ["spec.defaults.loras[0].weight"]),
    ("gb-sweep-lora-weight", GB, {"spec.sweep.loraWeights": [0.5, -3]}, ["spec.sweep.loraWeights[1]"]),
    ("gb-controlnet-weight", GB, {"spec.defaults.controlNets.0.weight": 3}, ["spec.defaults.controlNets[0].weight"]),
    (
        "gb-guidance-start-after-end",
        GB,
        {"spec.defaults.controlNets.0.guidanceStart": 0.8, "spec.defaults.controlNets.0.guidanceEnd": 0.2},
        ["spec.defaults.controlNets[0].guidanceStart", "guidanceEnd"],
    ),
    (
        "gb-bad-controlnet-type",
        GB,
        {"spec.defaults.controlNets.0.type": "laser"},
        ["spec.defaults.controlNets[0].type"],
    ),
    ("gb-two-targets", GB, {"spec.target.instance": "anime"}, ["spec.target", "exactly one"]),
    ("gb-no-target", GB, {"spec.target": {}}, ["spec.target", "exactly one"]),
    ("gb-zero-concurrency", GB, {"spec.concurrency": 0}, ["spec.concurrency"]),
    ("gb-nothing-to-do", GB, {"spec.items": DELETE, "spec.sweep": DELETE}, ["spec", "items or sweep"]),
    (
        "gb-two-item-sources",
        GB,
        {"spec.items.configMap": {"name": "prompts", "key": "items.jsonl"}},
        ["spec.items", "exactly one"],
    ),
    ("gb-gif", GB, {"spec.output.format": "gif"}, ["spec.output.format", "Unsupported value"]),
    ("gb-two-outputs", GB, {"spec.output.s3": {"bucket": "out", "key": "x"}}, ["spec.output", "exactly one"]),
    ("gb-batch-size-9", GB, {"spec.defaults.batchSize": 9}, ["spec.defaults.batchSize"]),
    ("gb-seed-below-minus-one", GB, {"spec.defaults.seed": -2}, ["spec.defaults.seed"]),
    ("gb-empty-prompt", GB, {"spec.items.inline.0.prompt": ""}, ["spec.items.inline[0].prompt"]),
    ("gb-negative-retries", GB, {"spec.retries": -1}, ["spec.retries"]),
]


@pytest.fixture(scope="module")
def api(cluster: Cluster, crds: None) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api)


def create(api: client.CustomObjectsApi, namespace: str, obj: dict) -> dict:
    return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[obj["kind"]], obj)


def kubectl(cluster: Cluster, *args: str) -> str:
    out = subprocess.run(
        [str(ROOT / ".local/bin/kubectl"), f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_is_accepted(api: client.CustomObjectsApi, namespace: str, path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    created = create(api, namespace, obj)
    assert created["metadata"]["uid"]


def test_the_base_objects_of_the_invalid_cases_are_valid(api: client.CustomObjectsApi, namespace: str) -> None:
    for obj in (SDI, LJ, GB):
        create(api, namespace, copy.deepcopy(obj))


def test_at_least_forty_invalid_cases() -> None:
    assert len(INVALID) >= 40


@pytest.mark.parametrize(("base", "changes", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_object_is_rejected_naming_the_field(
    api: client.CustomObjectsApi, namespace: str, base: dict, changes: dict, expected: list[str]
) -> None:
    with pytest.raises(ApiException) as rejected:
        create(api, namespace, mutated(base, changes))
    assert rejected.value.status == 422, rejected.value.body
    message = json.loads(rejected.value.body)["message"]
    for text in expected:
        assert text in message, message


def test_defaults_are_applied_by_the_apiserver(api: client.CustomObjectsApi, namespace: str) -> None:
    got = create(api, namespace, copy.deepcopy(SDI))["spec"]
    assert got["replicas"] == 1
    assert got["gpu"]["resourceName"] == "nvidia.com/gpu" and got["gpu"]["count"] == 1
    assert got["webui"]["attention"] == "auto" and got["webui"]["port"] == 7861
    assert got["model"]["checkpoint"]["allowUnsafePickle"] is False


def test_pickle_checkpoint_is_accepted_when_explicitly_allowed(api: client.CustomObjectsApi, namespace: str) -> None:
    obj = mutated(SDI, {"spec.model.checkpoint.name": "model.ckpt", "spec.model.checkpoint.allowUnsafePickle": True})
    assert create(api, namespace, obj)["spec"]["model"]["checkpoint"]["name"] == "model.ckpt"


def test_lorajob_training_is_immutable_but_suspend_is_not(api: client.CustomObjectsApi, namespace: str) -> None:
    create(api, namespace, copy.deepcopy(LJ))
    api.patch_namespaced_custom_object(GROUP, VERSION, namespace, "lorajobs", "x", {"spec": {"suspend": True}})
    assert_immutable(
        api,
        namespace,
        "lorajobs",
        ({"spec": {"training": {"networkDim": 64}}}, "spec.training"),
        ({"spec": {"dataset": {"triggerWord": "other"}}}, "spec.dataset"),
        ({"spec": {"output": {"name": "other"}}}, "spec.output"),
    )


def assert_immutable(
    api: client.CustomObjectsApi, namespace: str, plural: str, *patches: tuple[dict[str, Any], str]
) -> None:
    """Each patch of object x is refused by the API server with a message naming the field as immutable."""
    for patch, field in patches:
        with pytest.raises(ApiException) as rejected:
            api.patch_namespaced_custom_object(GROUP, VERSION, namespace, plural, "x", patch)
        message = json.loads(rejected.value.body)["message"]
        assert field in message and "immutable" in message, message


def test_generationbatch_work_is_immutable_but_concurrency_is_not(api: client.CustomObjectsApi, namespace: str) -> None:
    body = copy.deepcopy(GB)
    body["spec"] |= {"apiKeySecret": {"name": "batch-key", "key": "token"}, "inputs": {"claimName": "data"}}
    create(api, namespace, body)
    api.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "generationbatches", "x", {"spec": {"concurrency": 8, "suspend": True}}
    )
    assert_immutable(
        api,
        namespace,
        "generationbatches",
        ({"spec": {"items": {"inline": [{"prompt": "a bird"}]}}}, "spec.items"),
        ({"spec": {"apiKeySecret": {"key": "other"}}}, "spec.apiKeySecret"),
        ({"spec": {"inputs": {"path": "poses"}}}, "spec.inputs"),
    )


def test_kubectl_explain_shows_the_descriptions(api: client.CustomObjectsApi, cluster: Cluster) -> None:
    out = " ".join(kubectl(cluster, "explain", "sdinstance.spec.webui.vramMode").split())
    assert "lowvram under 8 GiB" in out and "ENUM: auto" in out
    out = " ".join(kubectl(cluster, "explain", "lj.spec.training.networkDim").split())
    assert "Above 64 tends to overfit" in out


def test_scale_subresource(api: client.CustomObjectsApi, cluster: Cluster, namespace: str) -> None:
    create(api, namespace, copy.deepcopy(SDI))
    kubectl(cluster, "-n", namespace, "scale", "sdi/x", "--replicas=3")
    assert api.get_namespaced_custom_object(GROUP, VERSION, namespace, "sdinstances", "x")["spec"]["replicas"] == 3
    scale = api.get_namespaced_custom_object_scale(GROUP, VERSION, namespace, "sdinstances", "x")
    assert scale["spec"]["replicas"] == 3
    with pytest.raises(ApiException) as rejected:
        api.patch_namespaced_custom_object_scale(
            GROUP, VERSION, namespace, "sdinstances", "x", {"spec": {"replicas": -1}}
        )
    assert rejected.value.status == 422


def test_get_sd_lists_all_three_kinds_with_their_columns(
    api: client.CustomObjectsApi, cluster: Cluster, namespace: str
) -> None:
    for obj in (SDI, LJ, GB):
        create(api, namespace, copy.deepcopy(obj))
    out = kubectl(cluster, "-n", namespace, "get", "sd")
    assert "sdinstance.sd-operator.dev/x" in out
    assert "lorajob.sd-operator.dev/x" in out
    assert "generationbatch.sd-operator.dev/x" in out
    header = kubectl(cluster, "-n", namespace, "get", "sdi").splitlines()[0].split()
    assert header == ["NAME", "MODEL", "READY", "DESIRED", "PHASE", "GPU", "AGE"]
    header = kubectl(cluster, "-n", namespace, "get", "gb").splitlines()[0].split()
    assert header == ["NAME", "MODEL", "PROGRESS", "FAILED", "PHASE", "AGE"]
