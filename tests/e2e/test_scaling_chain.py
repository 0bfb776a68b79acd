"""Scaling an SDInstance end to end: from 1 to 3 replicas the gateway spreads work over all three; back
to 1, the work already queued still completes (on the replica that stays)."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import requests
from e2e_support import GROUP, VERSION, Chain, get, instance, wait_phase, webui_pods
from kubernetes import client

from cluster_support import ROOT
from helpers import wait_for
from modelserver import stand_in_sha256

CHECKPOINT = "e2e-scale-sd15.safetensors"


def txt2img(chain: Chain, i: int, steps: int) -> int:
    """A request no earlier run made (the gateway caches results), as its status code."""
    answer = requests.post(
        f"{chain.gateway_url}/sdapi/v1/txt2img",
        json={
            "prompt": f"a harbour at night, {i}, {chain.run_id}",
            "steps": steps,
            "width": 768,
            "height": 768,
            "seed": i,
            "override_settings": {"sd_model_checkpoint": CHECKPOINT},
        },
        timeout=300,
    )
    return answer.status_code


def discovered(chain: Chain, ips: list[str]) -> bool:
    listed = requests.get(f"{chain.gateway_url}/v1/instances", timeout=10).json()
    urls = [b.get("url", "") for b in listed if b.get("model", "").startswith(CHECKPOINT.removesuffix(".safetensors"))]
    return sorted(ips) == sorted(u.split("//")[1].split(":")[0] for u in urls)


def images_by_pod(chain: Chain, pods: list[client.V1Pod]) -> dict[str, int]:
    """Requests each replica completed, as the gateway counts them (by the pod's address in its URL)."""
    listed = requests.get(f"{chain.gateway_url}/v1/instances", timeout=10).json()
    completed = {b["url"].split("//")[1].split(":")[0]: b["completed"] for b in listed}
    return {p.metadata.name: completed.get(p.status.pod_ip, 0) for p in pods}


def test_scale_one_to_three_spreads_work_and_back_to_one_loses_none(
    chain: Chain, custom: client.CustomObjectsApi, namespace: str
) -> None:
    # No sha256 declared: the status shows the one the fetchers computed (the same bytes on every replica).
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "sdinstances", instance("scaled", CHECKPOINT))
    assert wait_phase(custom, namespace, "scaled", "Ready", timeout=180)["status"]["modelSHA256"] == stand_in_sha256(
        CHECKPOINT
    )
    kubectl = [str(ROOT / ".local/bin/kubectl"), f"--kubeconfig={chain.cluster.kubeconfig}", "-n", namespace]
    subprocess.run([*kubectl, "scale", "sdinstance/scaled", "--replicas=3"], check=True, capture_output=True)
    wait_for(
        lambda: get(custom, namespace, "sdinstances", "scaled")["status"].get("ready") == "3/3",
        timeout=180,
        what="3/3 replicas ready",
    )
    assert get(custom, namespace, "sdinstances", "scaled")["status"]["modelSHA256"] == stand_in_sha256(CHECKPOINT)
    pods = webui_pods(chain, namespace, "scaled")
    assert len(pods) == 3
    wait_for(lambda: discovered(chain, [p.status.pod_ip for p in pods]), timeout=60, what="3 backends in the gateway")

    # Twelve requests at once: the gateway hands them to idle replicas, so each renders some.
    before = images_by_pod(chain, pods)
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda i: txt2img(chain, i, steps=30), range(12)))
    assert codes == [200] * 12
    after = images_by_pod(chain, pods)
    served = {name: after[name] - before[name] for name in after}
    assert sum(served.values()) == 12 and all(n > 0 for n in served.values()), served

    # Queue more work than three replicas finish at once (~1 s each), then scale to 1 while it runs.
    with ThreadPoolExecutor(24) as pool:
        pending = [pool.submit(txt2img, chain, 100 + i, 150) for i in range(24)]
        wait_for(
            lambda: sum(images_by_pod(chain, pods).values()) > sum(after.values()), timeout=60, what="work under way"
        )
        subprocess.run([*kubectl, "scale", "sdinstance/scaled", "--replicas=1"], check=True, capture_output=True)
        codes = [f.result() for f in pending]
    assert codes == [200] * 24, codes

    def one_left() -> bool:
        status = get(custom, namespace, "sdinstances", "scaled")["status"]
        return status.get("ready") == "1/1" and len(webui_pods(chain, namespace, "scaled")) == 1

    wait_for(one_left, timeout=180, what="one replica left")
    (survivor,) = webui_pods(chain, namespace, "scaled")
    wait_for(lambda: discovered(chain, [survivor.status.pod_ip]), timeout=60, what="the gateway to drop the others")
    assert txt2img(chain, 999, steps=10) == 200
