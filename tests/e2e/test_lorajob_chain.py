"""LoRAJob end to end: the dataset on a claim is linted (DatasetValid) -> the base model is fetched and the
stand-in sd-scripts trains, writing a LoRA per saved epoch and the final one onto the output claim ->
the trainer reports the artifacts with their checksums -> a publish Job copies the LoRA into the
instance's shared model volume -> the instance lists it in /sdapi/v1/loras through the gateway -> the
evaluation GenerationBatch renders every prompt at every weight with that LoRA, PNGs on the claim."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import requests
from e2e_support import Chain, claims, get, instance, wait_phase, webui_pods
from kubernetes import client
from PIL import Image
from safetensors import safe_open

from helpers import wait_for
from modelserver import stand_in_sha256

GROUP, VERSION = "sd-operator.dev", "v1alpha1"
CHECKPOINT = "e2e-lora-base-sd15.safetensors"
TRIGGER = "mystyle"
LORA = "mystyle-sd15"
EPOCHS = 3
SUBSET = f"5_{TRIGGER} style"
PROMPTS = ["a lighthouse on a cliff at dusk", "portrait of an old sailor"]
WEIGHTS = [0.5, 1.0]


def write_dataset(root: Path) -> list[str]:
    """Three small images with captions that start with the trigger word, in `<repeats>_<tokens>/`."""
    subset = root / SUBSET
    subset.mkdir(parents=True)
    captions = {
        "red.png": ((200, 30, 30), f"{TRIGGER}, a red square on white"),
        "blue.jpg": ((30, 60, 200), f"{TRIGGER}, a blue circle, soft light"),
        "green.png": ((40, 170, 60), f"{TRIGGER} style, green stripes"),
    }
    for file, (color, caption) in captions.items():
        image = Image.new("RGB", (128, 96), color)
        for x in range(0, 128, 8):
            image.putpixel((x, x % 96), (255, 255, 255))
        image.save(subset / file)
        (subset / file).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return sorted(captions)


def lorajob(name: str, base: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoRAJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"family": "sd15", "fromInstance": {"name": base}},
            "dataset": {
                "source": {"pvc": {"claimName": "datasets", "path": TRIGGER}},
                "triggerWord": TRIGGER,
                "captionExtension": ".txt",
            },
            "training": {"networkDim": 8, "networkAlpha": 4, "epochs": EPOCHS, "saveEveryNEpochs": 1, "seed": 1},
            "output": {"name": LORA, "destination": {"pvc": {"claimName": "loras", "path": "out"}}},
            "gpu": {"memoryGiB": 12},
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
            "publishTo": [{"name": base}],
            "evaluation": {
                "prompts": PROMPTS,
                "weights": WEIGHTS,
                "params": {"steps": 6, "width": 512, "height": 512, "seed": 11},
            },
            "activeDeadlineSeconds": 600,
        },
    }


def pod_of(chain: Chain, namespace: str, job: str) -> client.V1Pod:
    (pod,) = chain.cluster.core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    return pod


def test_lorajob_trains_publishes_and_evaluates(chain: Chain, custom: client.CustomObjectsApi, namespace: str) -> None:
    chain.require_local()  # the dataset is written into, and the results read from, the claims' folders
    claims(chain, namespace, ["datasets", "loras", "models"])
    images = write_dataset(chain.claim_dir(namespace, "datasets") / TRIGGER)

    sha = stand_in_sha256(CHECKPOINT)
    body = instance("studio", CHECKPOINT, sha=sha, storage={"pvc": {"claimName": "models", "path": "cache"}})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "sdinstances", body)
    wait_phase(custom, namespace, "studio", "Ready", timeout=180)
    models = chain.claim_dir(namespace, "models") / "cache"
    assert hashlib.sha256((models / "Stable-diffusion" / CHECKPOINT).read_bytes()).hexdigest() == sha

    def listed() -> requests.Response:
        return requests.get(f"{chain.gateway_url}/sdapi/v1/loras", headers={"X-SD-Model": CHECKPOINT}, timeout=10)

    def loras() -> list[str]:
        answer = listed()
        assert answer.status_code == 200, answer.text[:500]
        return [entry["name"] for entry in answer.json()]

    # The gateway knows the instance (its EndpointSlice) before the LoRA exists: nothing listed yet.
    wait_for(lambda: listed().status_code == 200, timeout=60, what="the gateway to discover the instance")
    assert LORA not in loras()

    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "lorajobs", lorajob("style", "studio"))
    try:
        done = wait_phase(custom, namespace, "style", "Succeeded", timeout=300, plural="lorajobs")
    except AssertionError:
        _dump_logs(chain, namespace)
        raise
    status = done["status"]
    conditions = {c["type"]: c for c in status["conditions"]}
    valid = conditions["DatasetValid"]
    assert (valid["status"], valid["reason"], valid["message"]) == ("True", "Checked", "dataset checked"), valid
    assert conditions["Complete"]["status"] == "True"
    assert "Failed" not in conditions
    assert status["message"] == "trained, published and evaluated (GenerationBatch style-eval)"
    assert status["startTime"] <= status["completionTime"]

    # The lint init container ran the real `sd-operator dataset lint` over the claim's folder and passed.
    train_pod = pod_of(chain, namespace, "style-train")
    lint, fetch = train_pod.status.init_container_statuses
    assert (lint.name, lint.state.terminated.exit_code) == ("dataset-lint", 0)
    assert (fetch.name, fetch.state.terminated.exit_code) == ("fetch-model", 0)
    assert train_pod.status.container_statuses[0].state.terminated.exit_code == 0
    lint_log = _pod_log(chain, train_pod, "dataset-lint")
    assert f"subset '{SUBSET}': {len(images)} image(s) x 5 repeat(s)" in lint_log, lint_log
    assert f"images: {len(images)} training, 0 regularization" in lint_log
    trainer_log = _pod_log(chain, train_pod, "trainer")
    assert f"subset '{SUBSET}': {len(images)} image(s) x 5 repeat(s)" in trainer_log
    assert f"num epochs / epoch数: {EPOCHS}" in trainer_log

    # Progress ended at the last epoch, every step done.
    progress = status["progress"]
    steps = len(images) * 5 * EPOCHS
    assert (progress["epoch"], progress["totalEpochs"]) == (EPOCHS, EPOCHS)
    assert (progress["step"], progress["totalSteps"], progress["percent"]) == (steps, steps, 100)

    # Artifacts: one file per saved epoch (sd-scripts skips the last epoch's intermediate save), then the
    # final file; each checksum and size is that of the file on the output claim.
    out = chain.claim_dir(namespace, "loras") / "out"
    on_disk = sorted(p.name for p in out.glob("*.safetensors"))
    expected = [f"{LORA}-{e:06d}.safetensors" for e in range(1, EPOCHS)] + [f"{LORA}.safetensors"]
    assert on_disk == sorted(expected)
    artifacts = status["artifacts"]
    assert [Path(a["path"]).name for a in artifacts] == expected
    assert [a.get("epoch") for a in artifacts] == [*range(1, EPOCHS), None]
    for artifact in artifacts:
        file = out / Path(artifact["path"]).name
        data = file.read_bytes()
        assert artifact["sha256"] == hashlib.sha256(data).hexdigest(), file
        assert artifact["sizeBytes"] == len(data), file
    for epoch in range(1, EPOCHS):  # the stand-in writes real safetensors, marked with their epoch
        with safe_open(str(out / f"{LORA}-{epoch:06d}.safetensors"), "np") as f:
            assert f.metadata()["ss_epoch"] == str(epoch)
    final_sha = artifacts[-1]["sha256"]
    assert len({a["sha256"] for a in artifacts}) == len(artifacts)  # different weights per epoch

    # Published: the very file, in the instance's shared Lora folder, and the instance lists it.
    (published,) = status["published"]
    assert published["instance"] == "studio"
    assert published["path"] == f"pvc://{namespace}/models/cache/Lora/{LORA}.safetensors"
    copy = models / "Lora" / f"{LORA}.safetensors"
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == final_sha
    assert not list((models / "Lora").glob(".*.partial"))
    publish_pod = pod_of(chain, namespace, "style-publish-studio")
    assert publish_pod.status.container_statuses[0].state.terminated.exit_code == 0
    assert LORA in loras()
    # It is listed because the operator asked the model's instances to rescan, through the gateway.
    (webui,) = webui_pods(chain, namespace, "studio")
    stats = requests.get(f"http://{webui.status.pod_ip}:7861/emulator/stats", timeout=10).json()
    assert stats["requests"].get("POST /sdapi/v1/refresh-loras", 0) >= 1, stats["requests"]

    # The evaluation batch rendered every prompt at every weight with the trained LoRA.
    assert status["evaluationBatch"] == "style-eval"
    batch = get(custom, namespace, "generationbatches", "style-eval")
    bstatus = batch["status"]
    total = len(PROMPTS) * len(WEIGHTS)
    assert bstatus["phase"] == "Succeeded", bstatus
    assert (bstatus["total"], bstatus["succeeded"], bstatus.get("failed") or 0) == (total, total, 0)
    assert bstatus["outputLocation"] == f"pvc://{namespace}/loras/out/evaluation"
    evaluation = out / "evaluation"
    pngs = sorted(evaluation.glob("*.png"))
    assert len(pngs) == total, sorted(p.name for p in evaluation.iterdir())
    rendered: set[tuple[str, float]] = set()
    for png in pngs:
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size == (512, 512)
        sidecar = json.loads(png.with_suffix(".json").read_text())
        assert sidecar["model"] == CHECKPOINT.removesuffix(".safetensors")
        # The emulator found the LoRA by name and hashed the published file: A1111's `Lora hashes`.
        assert f"{LORA}: {final_sha[:12]}" in sidecar["infotext"], sidecar["infotext"]
        # The sweep's weight went into the prompt as the WebUI's LoRA tag, after the trigger-word prompt.
        tagged = re.fullmatch(rf"(.+), <lora:{re.escape(LORA)}:([0-9.]+)>", sidecar["prompt"])
        assert tagged, sidecar["prompt"]
        rendered.add((tagged[1], float(tagged[2])))
    assert rendered == {(f"{TRIGGER}, {p}", w) for p in PROMPTS for w in WEIGHTS}
    # ... rendered by the instance the LoRA was published to.
    stats = requests.get(f"http://{webui.status.pod_ip}:7861/emulator/stats", timeout=10).json()
    assert stats["images"] == total, stats


def _pod_log(chain: Chain, pod: client.V1Pod, container: str) -> str:
    logs = chain.runner_dir / "logs" / "pods" / f"{pod.metadata.namespace}_{pod.metadata.name}_{pod.metadata.uid}"
    return (logs / f"{container}.log").read_text(errors="replace")


def _dump_logs(chain: Chain, namespace: str) -> None:
    """On a failure: the pods' own logs, for the report."""
    folder = chain.runner_dir / "logs" / "pods"
    for pod_dir in sorted(folder.glob(f"{namespace}_*")):
        for log in sorted(pod_dir.glob("*.log")):
            print(f"===== {pod_dir.name}/{log.name}\n{log.read_text(errors='replace')[-4000:]}")
