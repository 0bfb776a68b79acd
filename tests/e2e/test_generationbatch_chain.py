"""GenerationBatch end to end: 200 items rendered by two WebUI instances through the gateway, the
runner's process killed half-way, the next pod resuming from what is on the volume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import requests
from e2e_support import GROUP, VERSION, Chain, claims, get, instance, wait_phase, webui_pods
from kubernetes import client
from PIL import Image

from helpers import wait_for
from modelserver import stand_in_sha256

CHECKPOINT = "e2e-batch-sd15.safetensors"
ITEMS = 200


def finished_items(folder: Path) -> set[int]:
    return {int(p.name.split("-")[0]) for p in folder.glob("*.json")} if folder.exists() else set()


def runner_pods(chain: Chain, namespace: str, batch: str) -> list[client.V1Pod]:
    return chain.cluster.core.list_namespaced_pod(namespace, label_selector=f"sd-operator.dev/batch={batch}").items


def test_two_hundred_items_across_two_instances_survive_a_killed_runner(
    chain: Chain, custom: client.CustomObjectsApi, namespace: str
) -> None:
    sha = stand_in_sha256(CHECKPOINT)
    for name in ("render-a", "render-b"):
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, "sdinstances", instance(name, CHECKPOINT, sha=sha)
        )
    for name in ("render-a", "render-b"):
        wait_phase(custom, namespace, name, "Ready", timeout=180)
    backends = [p.status.pod_ip for name in ("render-a", "render-b") for p in webui_pods(chain, namespace, name)]

    def both_discovered() -> bool:
        listed = requests.get(f"{chain.gateway_url}/v1/instances", timeout=10).json()
        return all(any(ip in b.get("url", "") for b in listed) for ip in backends)

    wait_for(both_discovered, timeout=60, what="the gateway to discover both instances")

    claims(chain, namespace, ["outputs"])
    batch = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GenerationBatch",
        "metadata": {"name": "twohundred"},
        "spec": {
            "target": {"model": CHECKPOINT},
            "defaults": {"width": 512, "height": 512, "steps": 20, "seed": 1000},
            # The namespace in the prompts: nothing an earlier run left in the gateway's cache matches.
            "items": {
                "inline": [
                    {"prompt": f"a lighthouse, variation {i}, {namespace}", "count": 10} for i in range(ITEMS // 10)
                ]
            },
            "concurrency": 4,
            "retries": 3,
            "output": {"pvc": {"claimName": "outputs", "path": "runs/twohundred"}, "format": "png", "metadata": True},
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "generationbatches", batch)

    def succeeded() -> int:
        return int(
            (get(custom, namespace, "generationbatches", "twohundred").get("status") or {}).get("succeeded") or 0
        )

    # Half-way, the runner dies as in a crash: locally its process gets SIGKILL (no chance to flush or
    # report); on a real cluster its pod is force-deleted.
    wait_for(lambda: succeeded() >= ITEMS // 2, timeout=120, interval=0.05, what="half the items")
    (pod,) = [p for p in runner_pods(chain, namespace, "twohundred") if p.status.phase == "Running"]
    if chain.local:
        os.kill(int(pod.status.container_statuses[0].container_id.removeprefix("local://")), signal.SIGKILL)
    else:
        chain.cluster.core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)
    assert succeeded() < ITEMS, "the batch finished before the runner could be killed"

    obj = wait_phase(custom, namespace, "twohundred", "Succeeded", timeout=300, plural="generationbatches")
    status = obj["status"]
    assert (status["total"], status["succeeded"], status["failed"]) == (ITEMS, ITEMS, 0)

    # Another pod of the Job finished the batch (locally the killed one stays, failed with the signal's code).
    pods = runner_pods(chain, namespace, "twohundred")
    codes = sorted(p.status.container_statuses[0].state.terminated.exit_code for p in pods)
    assert codes == ([0, 137] if chain.local else [0]), codes

    # Both instances rendered, and nothing finished before the kill was rendered again: together they
    # completed at most one request per item plus what was in flight when the runner died.
    listed = requests.get(f"{chain.gateway_url}/v1/instances", timeout=10).json()
    rendered = [b["completed"] for b in listed if any(ip in b["url"] for ip in backends)]
    assert len(rendered) == 2 and all(n > 0 for n in rendered), listed
    assert ITEMS <= sum(rendered) <= ITEMS + batch["spec"]["concurrency"], rendered

    if chain.local:
        # Every item once: an image and its sidecar, each a real PNG of the requested size.
        out = chain.claim_dir(namespace, "outputs") / "runs" / "twohundred"
        sidecars = sorted(out.glob("*.json"))
        images = sorted(out.glob("*.png"))
        assert len(sidecars) == ITEMS and len(images) == ITEMS
        assert finished_items(out) == set(range(ITEMS))
        assert not list(out.glob(".*.tmp")), "a temporary file of the interrupted write was left behind"
        for png in images[:: ITEMS // 10]:
            with Image.open(png) as im:
                assert im.format == "PNG" and im.size == (512, 512)
        meta = json.loads(sidecars[0].read_text())
        assert meta["prompt"] == f"a lighthouse, variation 0, {namespace}"
        assert CHECKPOINT.removesuffix(".safetensors") in json.dumps(meta)
