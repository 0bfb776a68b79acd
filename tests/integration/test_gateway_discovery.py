"""Gateway discovery from the local cluster: SDInstances name the model, EndpointSlices the addresses.

The EndpointSlices are created by the test with fictitious pod IPs; the gateway only lists them as
backends and never connects to them (no generation request is sent).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import requests
from kubernetes import client

from cluster_support import Cluster, wait_control_plane_settled
from helpers import wait_for
from objects import GROUP, PLURAL, VERSION
from processes import BIN, _start

MODEL = "sd_xl_base_1.0.safetensors"
SHA = "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b"


def endpoint_slice(name: str, instance: str, ips: list[str], ready: bool = True) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/service-name": f"{instance}-webui", "sd-operator.dev/instance": instance},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip in ips],
        "ports": [{"name": "http", "port": 7861, "protocol": "TCP"}],
    }


def test_backends_follow_sdinstances_and_endpointslices(
    cluster: Cluster, crds: None, namespace: str, tmp_path: Path
) -> None:
    custom = client.CustomObjectsApi(cluster.api)
    discovery = client.DiscoveryV1Api(cluster.api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "SDInstance", "metadata": {"name": "xl"},
        "spec": {"model": {"family": "sdxl", "checkpoint": {"name": MODEL, "sha256": SHA,
                 "source": {"http": {"url": "http://models.invalid/x.safetensors"}}}}, "gpu": {"memoryGiB": 24}},
    })  # fmt: skip
    discovery.create_namespaced_endpoint_slice(namespace, endpoint_slice("xl-a", "xl", ["10.244.9.1", "10.244.9.2"]))
    gw = _start(
        [str(BIN / "sd-operator"), "gateway", "--port", "0", "--kubernetes", "-n", namespace],
        tmp_path / "gateway.log",
        "GATEWAY_PORT",
        env={"KUBECONFIG": str(cluster.kubeconfig), **({"PATH": os.environ["PATH"]})},
    )
    try:

        def instances() -> dict[str, dict]:
            return {i["url"]: i for i in requests.get(f"{gw.url}/v1/instances", timeout=5).json()}

        found = wait_for(lambda: len(instances()) == 2 and instances(), timeout=30, what="two discovered backends")
        first = found["http://10.244.9.1:7861"]
        assert first["model"] == MODEL and first["instance"] == f"{namespace}/xl"
        assert first["pixelBudget"] > 1024 * 1024 and first["state"] == "idle"
        models = requests.get(f"{gw.url}/sdapi/v1/sd-models", timeout=5).json()
        assert models == [{"title": f"{MODEL} [{SHA[:10]}]", "model_name": MODEL[:-12], "hash": SHA[:10],
                           "sha256": SHA, "filename": MODEL, "config": None}]  # fmt: skip

        # A pod that stops being ready leaves the rotation; a new slice adds pods; deletion removes them.
        discovery.replace_namespaced_endpoint_slice(
            "xl-a", namespace, endpoint_slice("xl-a", "xl", ["10.244.9.1", "10.244.9.2"], ready=False)
        )
        wait_for(lambda: not instances(), timeout=30, what="not-ready endpoints to leave")
        discovery.create_namespaced_endpoint_slice(namespace, endpoint_slice("xl-b", "xl", ["10.244.9.3"]))
        wait_for(lambda: list(instances()) == ["http://10.244.9.3:7861"], timeout=30, what="the new slice")
        discovery.delete_namespaced_endpoint_slice("xl-b", namespace)
        wait_for(lambda: not instances(), timeout=30, what="the deleted slice to leave")

        # No ready pod, but the SDInstance declares the model: 503 + Retry-After saying how far it is
        # (no backend exists, so nothing is sent anywhere).
        custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "xl", {"status": {
            "phase": "Downloading",
            "conditions": [{"type": "Ready", "status": "False", "reason": "Downloading",
                            "message": "fetching the checkpoint", "lastTransitionTime": "2026-11-26T00:00:00Z"}],
        }})  # fmt: skip

        def ask() -> requests.Response:
            body = {"prompt": "x", "override_settings": {"sd_model_checkpoint": SHA[:10]}}
            return requests.post(f"{gw.url}/sdapi/v1/txt2img", json=body, timeout=10)

        # (a 503 Response is falsy, hence the tuples)
        (not_ready,) = wait_for(lambda: "Downloading" in (r := ask()).text and (r,), timeout=30, what="ModelNotReady")
        assert not_ready.status_code == 503 and not_ready.json()["error"] == "ModelNotReady"
        assert f"{namespace}/xl Downloading (fetching the checkpoint)" in not_ready.json()["detail"]
        assert int(not_ready.headers["Retry-After"]) > 0
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "xl")
        (gone,) = wait_for(lambda: (r := ask()).json()["error"] == "UnknownModel" and (r,), timeout=30, what="404")
        assert gone.status_code == 503  # nothing is served at all: the fleet is empty
        time.sleep(0.5)
        assert "Traceback" not in gw.log.read_text()
    finally:
        gw.stop()


# How long the API server stays away. The scenario is 60 s (run it so with SD_OUTAGE_SECONDS=60);
# 20 s shows the same behaviour (several failed retries at the backoff's cap) within `make test`.
OUTAGE_SECONDS = float(os.environ.get("SD_OUTAGE_SECONDS", "20"))


def gauge(gw_url: str, name: str) -> float | None:
    for line in requests.get(f"{gw_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def test_gateway_serves_its_last_known_backends_through_an_api_server_outage(
    cluster: Cluster, crds: None, namespace: str, tmp_path: Path
) -> None:
    if cluster.local is None:
        pytest.skip("stopping the API server needs the session's own local cluster")
    local = cluster.local
    custom = client.CustomObjectsApi(cluster.api)
    discovery = client.DiscoveryV1Api(cluster.api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "SDInstance", "metadata": {"name": "xl"},
        "spec": {"model": {"family": "sdxl", "checkpoint": {"name": MODEL, "sha256": SHA,
                 "source": {"http": {"url": "http://models.invalid/x.safetensors"}}}}, "gpu": {"memoryGiB": 24}},
    })  # fmt: skip
    # Fictitious pod IPs (an EndpointSlice may not hold a loopback address, so no emulator can be reached
    # through one outside a network namespace): the test reads what the gateway holds and serves about them.
    a, b, c = "http://10.244.9.1:7861", "http://10.244.9.2:7861", "http://10.244.9.3:7861"
    discovery.create_namespaced_endpoint_slice(namespace, endpoint_slice("xl-a", "xl", ["10.244.9.1"]))
    discovery.create_namespaced_endpoint_slice(namespace, endpoint_slice("xl-b", "xl", ["10.244.9.2"]))
    gw = _start(
        [str(BIN / "sd-operator"), "gateway", "--port", "0", "--kubernetes", "-n", namespace],
        tmp_path / "gateway.log",
        "GATEWAY_PORT",
        env={"KUBECONFIG": str(cluster.kubeconfig)},
    )
    codes: list[int] = []
    stop = threading.Event()

    def instances() -> set[str]:
        return {i["url"] for i in requests.get(f"{gw.url}/v1/instances", timeout=5).json()}

    def traffic() -> None:
        # What the gateway answers from the backends it holds: the model list and the instances.
        while not stop.is_set():
            for path in ("/sdapi/v1/sd-models", "/v1/instances"):
                try:
                    r = requests.get(f"{gw.url}{path}", timeout=30)
                    ok = r.status_code == 200 and (MODEL in r.text or a in r.text)
                    codes.append(r.status_code if ok else -r.status_code)
                except requests.RequestException:
                    codes.append(0)
            time.sleep(0.05)

    sender = threading.Thread(target=traffic, daemon=True)
    try:
        wait_for(lambda: instances() == {a, b}, timeout=30, what="the two backends discovered")
        wait_for(lambda: gauge(gw.url, "sd_gateway_discovery_up") == 1, timeout=30, what="discovery up")
        sender.start()
        wait_for(lambda: len(codes) >= 5, timeout=30, what="requests through the gateway")

        local.stop_component("kube-apiserver")
        try:
            outage = time.monotonic()
            wait_for(lambda: gauge(gw.url, "sd_gateway_discovery_up") == 0, timeout=15, what="discovery down")
            during = len(codes)
            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - outage)))
            # Still both backends, still answering; the gauges say how stale the view is.
            assert instances() == {a, b}
            assert gauge(gw.url, "sd_gateway_discovery_up") == 0
            stale = gauge(gw.url, "sd_gateway_discovery_stale_seconds")
            assert stale is not None and stale >= OUTAGE_SECONDS - 5, stale
            assert len(codes) > during + 10, "requests stopped flowing during the outage"
        finally:
            local.start_component("kube-apiserver")
            wait_control_plane_settled(cluster)
        wait_for(lambda: gauge(gw.url, "sd_gateway_discovery_up") == 1, timeout=30, what="discovery up again")
        assert gauge(gw.url, "sd_gateway_discovery_stale_seconds") == 0

        # Changes after the outage are picked up: a new backend joins, a deleted one leaves.
        discovery.create_namespaced_endpoint_slice(namespace, endpoint_slice("xl-c", "xl", ["10.244.9.3"]))
        wait_for(lambda: instances() == {a, b, c}, timeout=30, what="the new backend")
        discovery.delete_namespaced_endpoint_slice("xl-a", namespace)
        wait_for(lambda: instances() == {b, c}, timeout=30, what="the deleted backend to leave")
        stop.set()
        sender.join(timeout=35)
        assert codes and set(codes) == {200}, {code: codes.count(code) for code in set(codes)}

        log = gw.log.read_text()
        lost = [line for line in log.splitlines() if "discovery lost the Kubernetes API" in line]
        back = [line for line in log.splitlines() if "discovery reached the Kubernetes API again" in line]
        assert len(lost) == 1 and "serving the 2 last known backends" in lost[0], lost
        assert len(back) == 1, back
        assert "Traceback" not in log
    finally:
        stop.set()
        gw.stop()
