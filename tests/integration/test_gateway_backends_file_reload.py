"""A gateway with both --kubernetes and --backends-file: re-reading the changed file replaces only the file's
backends, never those discovery found (real gateway and emulator processes, the local cluster; the
EndpointSlices carry fictitious pod IPs that the gateway lists but never connects to)."""

from __future__ import annotations

import os
from pathlib import Path

import requests
import yaml
from kubernetes import client

from cluster_support import Cluster
from helpers import wait_for
from objects import GROUP, PLURAL, VERSION
from processes import emulator, gateway

MODEL = "sd_xl_base_1.0.safetensors"
PODS = {"http://10.244.7.1:7861", "http://10.244.7.2:7861"}


def test_a_backends_file_change_keeps_the_discovered_backends(
    cluster: Cluster, crds: None, namespace: str, tmp_path: Path
) -> None:
    custom = client.CustomObjectsApi(cluster.api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "SDInstance", "metadata": {"name": "xl"},
        "spec": {"model": {"family": "sdxl", "checkpoint": {"name": MODEL,
                 "source": {"http": {"url": "http://models.invalid/x.safetensors"}}}}, "gpu": {"memoryGiB": 24}},
    })  # fmt: skip
    client.DiscoveryV1Api(cluster.api).create_namespaced_endpoint_slice(namespace, {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "xl-a", "labels": {"kubernetes.io/service-name": "xl-webui",
                                                "sd-operator.dev/instance": "xl"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [url[7:-5]], "conditions": {"ready": True}} for url in sorted(PODS)],
        "ports": [{"name": "http", "port": 7861, "protocol": "TCP"}],
    })  # fmt: skip
    emu = emulator(tmp_path, "local", "local.safetensors")
    env = {"KUBECONFIG": str(cluster.kubeconfig), "PATH": os.environ["PATH"]}
    gw = gateway(tmp_path, [emu], "--kubernetes", "-n", namespace, env=env)
    backends_file = tmp_path / "gateway-backends.yaml"
    try:

        def urls() -> set[str]:
            return {i["url"] for i in requests.get(f"{gw.url}/v1/instances", timeout=5).json()}

        wait_for(lambda: urls() == PODS | {emu.url}, timeout=30, what="the file's and the discovered backends")
        # The file is emptied, then lists the emulator again: each re-read changes only the file's backend.
        backends_file.write_text(yaml.safe_dump({"backends": []}))
        wait_for(lambda: emu.url not in urls(), timeout=30, what="the file's backend to leave")
        assert urls() == PODS
        backends_file.write_text(yaml.safe_dump({"backends": [{"url": emu.url}]}))
        wait_for(lambda: urls() == PODS | {emu.url}, timeout=30, what="the file's backend to come back")
        assert "Traceback" not in gw.log.read_text()
    finally:
        gw.stop()
        emu.stop()
