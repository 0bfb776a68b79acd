"""SDInstance end to end: applied -> fetched and verified -> WebUI (emulator) up with --ckpt -> Ready ->
discovered by the gateway through EndpointSlices -> a txt2img request answered with a PNG of that model."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from typing import Any

import requests
from e2e_support import Chain, instance, wait_phase, webui_pods
from kubernetes import client
from PIL import Image

from helpers import wait_for
from modelserver import stand_in_sha256

GROUP, VERSION = "sd-operator.dev", "v1alpha1"
CHECKPOINT = "e2e-anime-sd15.safetensors"


def test_applied_instance_serves_txt2img_through_the_gateway(
    chain: Chain, custom: client.CustomObjectsApi, namespace: str
) -> None:
    sha = stand_in_sha256(CHECKPOINT)
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "sdinstances", instance("anime", CHECKPOINT, sha=sha)
    )
    obj = wait_phase(custom, namespace, "anime", "Ready", timeout=180)
    status = obj["status"]
    assert status["ready"] == "1/1"
    assert status["endpoint"] == f"http://anime-webui.{namespace}.svc:7861"
    assert status["modelSHA256"] == sha
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["ModelFetched"]["status"] == "True"

    (pod,) = webui_pods(chain, namespace, "anime")
    fetch = pod.status.init_container_statuses[0]
    assert fetch.name == "fetch-model" and fetch.state.terminated.exit_code == 0
    webui = pod.status.container_statuses[0]
    assert webui.ready and webui.restart_count == 0

    if chain.local:
        # The fetcher's download is in the pod's model volume, byte for byte what the host served.
        models = chain.pod_volume(pod, "models")
        assert hashlib.sha256((models / "Stable-diffusion" / CHECKPOINT).read_bytes()).hexdigest() == sha
        # The WebUI process was started with the rendered command line and answers at the pod's IP.
        options = requests.get(f"http://{pod.status.pod_ip}:7861/sdapi/v1/options", timeout=10).json()
        assert options["sd_model_checkpoint"].startswith(CHECKPOINT.removesuffix(".safetensors"))

    def discovered() -> dict[str, Any] | None:
        listed = requests.get(f"{chain.gateway_url}/v1/instances", timeout=10).json()
        mine = [i for i in listed if pod.status.pod_ip in i.get("url", "")]
        return mine[0] if mine else None

    backend = wait_for(discovered, timeout=60, what="the gateway to discover the instance's endpoint")
    assert backend["model"].startswith(CHECKPOINT.removesuffix(".safetensors"))

    answer = requests.post(
        f"{chain.gateway_url}/sdapi/v1/txt2img",
        json={
            "prompt": f"a lighthouse on a cliff at dusk, {namespace}",  # not in the gateway's cache
            "steps": 8,
            "width": 512,
            "height": 512,
            "seed": 7,
            "override_settings": {"sd_model_checkpoint": CHECKPOINT},
        },
        timeout=120,
    )
    assert answer.status_code == 200, answer.text[:500]
    body = answer.json()
    png = base64.b64decode(body["images"][0])
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (512, 512)
    info = json.loads(body["info"])
    assert info["sd_model_name"] == CHECKPOINT.removesuffix(".safetensors")
    assert info["sd_model_hash"] == sha[:10]


def test_bad_checksum_fails_the_instance_with_the_fetchers_line(
    chain: Chain, custom: client.CustomObjectsApi, namespace: str
) -> None:
    wrong = "0" * 64
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "sdinstances", instance("tampered", CHECKPOINT, sha=wrong)
    )
    obj = wait_phase(custom, namespace, "tampered", "Failed", timeout=180)
    status = obj["status"]
    assert (
        f"sha256 mismatch for {CHECKPOINT}: expected {wrong}, got {stand_in_sha256(CHECKPOINT)}" in (status["message"])
    )
    fetched = next(c for c in status["conditions"] if c["type"] == "ModelFetched")
    assert fetched["status"] == "False" and fetched["reason"] == "ModelFetchFailed"
    (pod,) = webui_pods(chain, namespace, "tampered")
    init = pod.status.init_container_statuses[0]
    last = init.last_state.terminated or init.state.terminated
    assert last.exit_code != 0 and "sha256 mismatch" in last.message
    # The WebUI never started on an unverified file.
    assert pod.status.container_statuses[0].state.running is None
