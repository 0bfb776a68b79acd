"""Shared fixtures: a real local cluster for the session, a namespace per test.

The cluster is the one named by KUBECONFIG when that is set (kind, a real cluster, or `make
cluster-up`'s), otherwise a fresh local cluster on free 127.0.0.1 ports that is stopped at the end.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

import localcluster  # tools/cluster, on pytest's pythonpath
from helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Cluster:
    kubeconfig: Path
    api: client.ApiClient
    local: object | None  # the LocalCluster when this session started it

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api)

    def kwok_nodes(self) -> list[client.V1Node]:
        nodes = self.core.list_node().items
        return [n for n in nodes if (n.metadata.annotations or {}).get("kwok.x-k8s.io/node") == "fake"]


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    named = os.environ.get("KUBECONFIG")
    if named:
        path = Path(named.split(os.pathsep)[0])
        yield Cluster(path, config.new_client_from_config(config_file=str(path)), None)
        return
    with localcluster.temporary_cluster() as local:
        api = config.new_client_from_config(config_file=str(local.cfg.kubeconfig))
        yield Cluster(local.cfg.kubeconfig, api, local)
        api.close()


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
