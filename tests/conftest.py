"""Shared fixtures: a real local cluster for the session, a namespace per test.

The cluster is the one named by KUBECONFIG when that is set (kind, a real cluster, or `make
cluster-up`'s), otherwise a fresh local cluster on free 127.0.0.1 ports that is stopped at the end.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

import localcluster  # tools/cluster, on pytest's pythonpath
from cluster_support import ROOT, Cluster, Operator, cluster_from_kubeconfig, start_operator, stop_operator
from helpers import wait_for


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    named = cluster_from_kubeconfig()
    if named:
        yield named
        return
    with localcluster.temporary_cluster() as local:
        api = config.new_client_from_config(config_file=str(local.cfg.kubeconfig))
        yield Cluster(local.cfg.kubeconfig, api, local)
        api.close()


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> None:
    """The project's CRDs (crds/), applied server-side and Established."""
    subprocess.run(
        [
            str(ROOT / ".local/bin/kubectl"),
            f"--kubeconfig={cluster.kubeconfig}",
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            str(ROOT / "crds"),
        ],
        check=True,
        capture_output=True,
    )
    ext = client.ApiextensionsV1Api(cluster.api)
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in (ROOT / "crds").glob("*.yaml")]

    def established() -> bool:
        for name in names:
            crd = ext.read_custom_resource_definition(name)
            if not any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
                return False
        return True

    wait_for(established, timeout=30, what="the CRDs to be Established")


@pytest.fixture(scope="module")
def operator(cluster: Cluster, crds: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    op = start_operator(cluster, tmp_path_factory.mktemp("operator") / "operator.log")
    yield op
    stop_operator(op)


@pytest.fixture
def custom(cluster: Cluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api)


@pytest.fixture
def kwok_cluster(cluster: Cluster) -> Cluster:
    if not cluster.kwok_nodes():
        pytest.skip("the cluster has no kwok fake nodes")
    return cluster


@pytest.fixture
def gpu_pool(kwok_cluster: Cluster) -> Iterator[str]:
    """Two fake GPU nodes of this test's own (1 GPU each, 24 GiB), so tests never share GPUs.

    Pods reach them with the node selector `sd-test/pool: <pool>`."""
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    group = {
        "name": pool,
        "labels": {"sd-test/pool": pool},
        "gpu": {"count": 1, "product": "NVIDIA-L4", "memoryMiB": 23034},
    }
    nodes = [localcluster.render_node(f"{pool}-{i}", group) for i in range(2)]
    core = kwok_cluster.core
    for node in nodes:
        core.create_node(node)

    def ready() -> bool:
        listed = core.list_node(label_selector=f"sd-test/pool={pool}").items
        return len(listed) == 2 and all(
            any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or [])) for n in listed
        )

    wait_for(ready, timeout=30, what="the test's GPU nodes to become Ready")
    yield pool
    for node in nodes:
        core.delete_node(node["metadata"]["name"])


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of the test's own, with its default ServiceAccount ready; deleted afterwards."""
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"t-{base}-{uuid.uuid4().hex[:6]}"
    core = cluster.core
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    def has_default_sa() -> bool:
        try:
            core.read_namespaced_service_account("default", name)
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    wait_for(has_default_sa, timeout=30, what=f"ServiceAccount default in {name}")
    yield name
    core.delete_namespace(name)
