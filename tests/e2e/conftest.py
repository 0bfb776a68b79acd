"""The end-to-end chain: real pods' commands, real downloads, the real gateway, PNGs on disk.

Locally (`make e2e`), the suite runs inside a loopback-only network namespace (tools/netns.sh) and
starts its own cluster in runner mode: the fleet's pods run as processes (tools/cluster/podrunner.py)
at pod IPs that answer inside the namespace, model sources resolve to the stand-in model host
(tools/cluster/modelserver.py, through the operator's SD_HF_ENDPOINT), and the operator and the
gateway run as the chart runs them (`sd-operator run`, `sd-operator gateway --kubernetes`).

Against a real cluster (KUBECONFIG set) this is the acceptance test: the operator and gateway must be
installed (the chart) with `huggingFace.endpoint` pointing at a stand-in model host the pods can reach
(tools/cluster/modelserver.py, e.g. as a Deployment; the tests' checkpoints are its made-up files, and
their checksums are declared), and SD_E2E_GATEWAY_URL names the gateway as this machine reaches it (e.g.
after `kubectl port-forward svc/sd-operator-gateway 8080`). Checks that need what only the local
runner gives (reading pod volumes on this machine, killing a pod's process, `make dev`) are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from e2e_support import Chain, start_gateway
from kubernetes import config

import localcluster
from cluster_support import ROOT, Cluster, cluster_from_kubeconfig, start_operator, stop_operator

LOCAL_FLEET = ROOT / "tools/cluster/fleet-local.yaml"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    named = cluster_from_kubeconfig()
    if named:
        yield named
        return
    if not localcluster.loopback_only():
        pytest.fail("the local end-to-end suite runs inside a loopback-only network namespace: `make e2e`")
    with localcluster.temporary_cluster(fleet_file=LOCAL_FLEET, runner=True) as local:
        api = config.new_client_from_config(config_file=str(local.cfg.kubeconfig))
        yield Cluster(local.cfg.kubeconfig, api, local)
        api.close()


@pytest.fixture(scope="session")
def chain(cluster: Cluster, crds: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    if cluster.local is None:
        gateway = os.environ.get("SD_E2E_GATEWAY_URL")
        if not gateway:
            pytest.skip("on a real cluster set SD_E2E_GATEWAY_URL (see tests/e2e/conftest.py)")
        yield Chain(cluster, False, gateway.rstrip("/"))
        return
    local: localcluster.LocalCluster = cluster.local  # type: ignore[assignment]
    logs = tmp_path_factory.mktemp("chain")
    # As the chart runs it: discovery of SDInstances and their EndpointSlices, in-cluster.
    gw = start_gateway(cluster, logs / "gateway.log", "--gateway-id=e2e-main")
    env = {
        "SD_HF_ENDPOINT": local.cfg.model_url,
        "SD_GATEWAY_URL": gw.url,
        "SD_OPERATOR_IMAGE": "ghcr.io/sd-operator/sd-operator:e2e",
    }
    op = start_operator(cluster, logs / "operator.log", env=env)
    yield Chain(cluster, True, gw.url, op)
    stop_operator(op)
    gw.stop()
