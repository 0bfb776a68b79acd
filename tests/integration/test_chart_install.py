"""The Helm chart and the `make dist` bundle against a real API server (kwok makes the pods Ready).

Nothing here pulls an image: kwok fakes the containers. Releases, namespaces and cluster-scoped objects
get unique names, and everything is removed again; the CRDs stay (other tests of the session use them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from cluster_support import Cluster, free_port
from helpers import wait_for
from objects import GROUP, PLURAL, VERSION, sdi, wait_phase
from processes import _start

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".local/bin"
CHART = ROOT / "charts/sd-operator"
CI = CHART / "ci"

pytestmark = pytest.mark.skipif(not (BIN / "helm").exists(), reason="helm is not built (make tools)")


class Tools:
    """helm and kubectl on the test cluster; helm's cache and config live in a scratch directory."""

    def __init__(self, cluster: Cluster, home: Path) -> None:
        self.cluster = cluster
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "KUBECONFIG"},
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(self, tool: str, *args: str, stdin: str | None = None, timeout: float = 180) -> str:
        cmd = [str(BIN / tool), f"--kubeconfig={self.cluster.kubeconfig}", *args]
        done = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, env=self.env, timeout=timeout, check=False
        )
        assert done.returncode == 0, f"{tool} {' '.join(args[:3])}: {done.stderr}{done.stdout[-2000:]}"
        return done.stdout

    def helm(self, *args: str, timeout: float = 180) -> str:
        return self.run("helm", *args, timeout=timeout)

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return self.run("kubectl", *args, stdin=stdin)

    def template(self, release: str, namespace: str, *args: str) -> str:
        return self.helm("template", release, str(CHART), "--namespace", namespace, *args)


@pytest.fixture(scope="module")
def tools(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Tools:
    return Tools(cluster, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture
def release() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def extra_namespace(cluster: Cluster) -> Iterator[str]:
    """A second fresh namespace (the release's, when the test's own is the watched one)."""
    name = f"t-chart-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    cluster.core.delete_namespace(name)


def docs(stream: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(stream) if d]


def deployments_ready(cluster: Cluster, namespace: str, expected: dict[str, int]) -> bool:
    found = {d.metadata.name: d for d in cluster.apps.list_namespaced_deployment(namespace).items}
    return all(
        name in found and (found[name].status.ready_replicas or 0) == replicas and found[name].spec.replicas == replicas
        for name, replicas in expected.items()
    )


def release_objects(cluster: Cluster, namespace: str, release: str) -> list[str]:
    selector = f"app.kubernetes.io/instance={release}"
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    found = [f"Deployment/{d.metadata.name}" for d in cluster.apps.list_namespaced_deployment(namespace).items]
    found += [
        f"Service/{s.metadata.name}"
        for s in cluster.core.list_namespaced_service(namespace, label_selector=selector).items
    ]
    found += [
        f"ConfigMap/{c.metadata.name}"
        for c in cluster.core.list_namespaced_config_map(namespace, label_selector=selector).items
    ]
    found += [f"ClusterRole/{r.metadata.name}" for r in rbac.list_cluster_role(label_selector=selector).items]
    found += [
        f"ClusterRoleBinding/{r.metadata.name}" for r in rbac.list_cluster_role_binding(label_selector=selector).items
    ]
    sdis = client.CustomObjectsApi(cluster.api).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    found += [f"SDInstance/{o['metadata']['name']}" for o in sdis["items"]]
    return found


# ---------------------------------------------------------------------------------------------


def test_every_rendered_object_passes_a_server_side_dry_run(
    tools: Tools, crds: None, namespace: str, release: str
) -> None:
    keys = '[{"key": "k-1", "tenant": "a"}, {"keySha256": "' + "0" * 64 + '", "tenant": "b"}]'
    renderings = {
        # Everything on, with SDInstances, a LoRAJob and a GenerationBatch, and chart-made keys.
        "full": tools.template(
            release,
            namespace,
            "-f",
            str(CI / "full-values.yaml"),
            "-f",
            str(CI / "resources-values.yaml"),
            "--set-json",
            f"gateway.auth.keys={keys}",
        ),
        # Namespaced RBAC (Roles in the watched namespace) and an external Redis.
        "namespaced": tools.template(
            f"{release}-ns",
            namespace,
            "--set",
            "rbac.clusterWide=false",
            "--set",
            f"operator.watchNamespaces={{{namespace}}}",
            "-f",
            str(CI / "auth-external-redis-values.yaml"),
        ),
    }
    for name, stream in renderings.items():
        objs = docs(stream)
        out = tools.kubectl("apply", "--dry-run=server", "--server-side", "-f", "-", stdin=stream)
        accepted = [line for line in out.splitlines() if "(server dry run)" in line]
        assert len(accepted) == len(objs), f"{name}: {out}"
        kinds = {o["kind"] for o in objs}
        if name == "full":
            assert {"SDInstance", "LoRAJob", "GenerationBatch", "Ingress", "HorizontalPodAutoscaler"} <= kinds
            assert {"NetworkPolicy", "PodDisruptionBudget", "Secret", "ClusterRole"} <= kinds
        else:
            assert {"Role", "RoleBinding", "ClusterRole"} <= kinds


def test_install_upgrade_uninstall(tools: Tools, cluster: Cluster, crds: None, namespace: str, release: str) -> None:
    fullname = f"{release}-sd-operator"
    installed = False
    try:
        tools.helm(
            "install",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "-f",
            str(CI / "resources-values.yaml"),
            "--set",
            "redis.enabled=true",
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "grafana.dashboard.enabled=true",
            "--wait",
            "--timeout",
            "120s",
        )
        installed = True
        expected = {fullname: 1, f"{fullname}-gateway": 2, f"{fullname}-redis": 1}
        assert deployments_ready(cluster, namespace, expected)
        for name in (fullname, f"{fullname}-gateway"):
            labels = cluster.apps.read_namespaced_deployment(name, namespace).spec.template.metadata.labels
            assert labels["sd-operator.dev/webui-client"] == "true"
        notes = tools.helm("get", "notes", release, "--namespace", namespace)
        assert f"port-forward svc/{fullname}-gateway" in notes and "X-SD-Model" in notes
        assert "no SDInstance is defined" not in notes
        sdis = client.CustomObjectsApi(cluster.api).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        assert sorted(o["metadata"]["name"] for o in sdis["items"]) == ["anime-sd15", "sdxl-base"]

        gateway = cluster.apps.read_namespaced_deployment(f"{fullname}-gateway", namespace)
        tools.helm(
            "upgrade",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--reuse-values",
            "--set",
            "gateway.replicas=3",
            "--wait",
            "--timeout",
            "120s",
        )
        upgraded = cluster.apps.read_namespaced_deployment(f"{fullname}-gateway", namespace)
        assert upgraded.spec.replicas == 3 and upgraded.status.ready_replicas == 3
        assert upgraded.metadata.generation > gateway.metadata.generation
        assert "REVISION: 2" in tools.helm("status", release, "--namespace", namespace)

        tools.helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s")
        installed = False
        wait_for(
            lambda: not release_objects(cluster, namespace, release),
            timeout=60,
            what="the release's objects to be gone",
        )
    finally:
        if installed:
            tools.helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s")


def test_operator_and_gateway_work_with_the_charts_rbac(
    tools: Tools,
    cluster: Cluster,
    crds: None,
    namespace: str,
    extra_namespace: str,
    release: str,
    gpu_pool: str,
    tmp_path: Path,
) -> None:
    """The operator and the gateway, as real processes, with the tokens of the chart's ServiceAccounts.

    Namespaced mode (Roles in the watched namespace, the test's own), so no other test's objects are
    touched; the rules are the same as the ClusterRole's."""
    watched, home = namespace, extra_namespace
    fullname = f"{release}-sd-operator"
    tools.helm(
        "install",
        release,
        str(CHART),
        "--namespace",
        home,
        "--set",
        "rbac.clusterWide=false",
        "--set",
        f"operator.watchNamespaces={{{watched}}}",
        # The in-cluster pods are fakes (kwok); the real processes run here.
        "--set",
        "operator.replicas=0",
        "--set",
        "gateway.replicas=0",
    )
    operator = gateway = None
    try:
        operator_cfg = token_kubeconfig(tools, cluster, home, fullname, tmp_path / "operator.kubeconfig")
        gateway_cfg = token_kubeconfig(tools, cluster, home, f"{fullname}-gateway", tmp_path / "gateway.kubeconfig")
        operator_log, liveness = tmp_path / "operator.log", f"http://127.0.0.1:{free_port()}/healthz"
        operator = start_as(
            [
                "run",
                f"--namespace={watched}",
                f"--peering={fullname}",
                f"--metrics-port={free_port()}",
                f"--liveness={liveness}",
            ],
            operator_cfg,
            operator_log,
        )
        wait_for(lambda: alive(operator, liveness, operator_log), timeout=60, what="the operator's liveness endpoint")
        gateway = _start(
            [str(Path(sys.executable).parent / "sd-operator"), "gateway", "--kubernetes", "--port=0", "-n", watched],
            tmp_path / "gateway.log",
            "GATEWAY_PORT",
            env={"KUBECONFIG": str(gateway_cfg)},
        )
        custom = client.CustomObjectsApi(cluster.api)
        custom.create_namespaced_custom_object(GROUP, VERSION, watched, PLURAL, sdi("one", gpu_pool))
        custom.create_namespaced_custom_object(GROUP, VERSION, watched, "generationbatches", batch("b1", "one"))
        # Children applied, pods watched, status patched: the instance gets Ready.
        wait_phase(custom, watched, "one", "Ready", timeout=90)
        wait_for(
            lambda: _exists(lambda: cluster.batch.read_namespaced_job("b1-batch", watched)),
            timeout=60,
            what="the batch's Job",
        )
        rbac = client.RbacAuthorizationV1Api(cluster.api)
        assert rbac.read_namespaced_role("b1-batch", watched).rules[0].resources == ["generationbatches/status"]
        assert custom.get_namespaced_custom_object("kopf.dev", "v1", watched, "kopfpeerings", fullname)
        # The gateway discovered the instance's ready endpoint through its own permissions.
        wait_for(
            lambda: requests.get(f"{gateway.url}/readyz", timeout=5).status_code == 200,
            timeout=60,
            what="the gateway to discover the instance",
        )
        for log in (operator_log, gateway.log):
            text = log.read_text(errors="replace")
            assert "forbidden" not in text.lower() and "(403)" not in text, text[-3000:]
    finally:
        for proc in (operator, gateway and gateway.process):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
        tools.helm("uninstall", release, "--namespace", home, "--wait", "--timeout", "120s")


def test_dist_bundle_applies_and_deletes_cleanly(tools: Tools, cluster: Cluster, crds: None, tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:6]
    namespace, release = f"t-dist-{suffix}", f"dist-{suffix}"
    bundle = tmp_path / "install.yaml"
    done = subprocess.run(
        ["bash", str(ROOT / "tools/dist.sh"), str(bundle)],
        env={**tools.env, "DIST_NAMESPACE": namespace, "DIST_RELEASE": release},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    objs = docs(bundle.read_text())
    crd_names = {o["metadata"]["name"] for o in objs if o["kind"] == "CustomResourceDefinition"}
    assert crd_names == {yaml.safe_load(p.read_text())["metadata"]["name"] for p in (ROOT / "crds").glob("*.yaml")}
    # Deleting the bundle as a whole would delete the CRDs and every custom resource in the cluster:
    # the test removes everything but the CRDs.
    without_crds = tmp_path / "without-crds.yaml"
    without_crds.write_text(yaml.safe_dump_all([o for o in objs if o["kind"] != "CustomResourceDefinition"]))
    try:
        tools.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(bundle))
        fullname = f"{release}-sd-operator"
        wait_for(
            lambda: deployments_ready(cluster, namespace, {fullname: 1, f"{fullname}-gateway": 2}),
            timeout=120,
            what="the bundle's Deployments to be ready",
        )
        labels = cluster.core.read_namespace(namespace).metadata.labels
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"  # and the pods were admitted
    finally:
        tools.kubectl("delete", "--ignore-not-found", "--wait", "--timeout=120s", "-f", str(without_crds))
    assert not _exists(lambda: cluster.core.read_namespace(namespace))
    assert not release_objects_cluster_wide(cluster, release)
    ext = client.ApiextensionsV1Api(cluster.api)
    for name in crd_names:
        ext.read_custom_resource_definition(name)  # still there


# ---------------------------------------------------------------------------------------------


def batch(name: str, instance: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GenerationBatch",
        "metadata": {"name": name},
        "spec": {
            "target": {"instance": instance},
            "items": {"inline": [{"prompt": "a lighthouse", "count": 2}]},
            "output": {"pvc": {"claimName": "outputs", "path": "runs/b1"}},
            "suspend": True,
        },
    }


def token_kubeconfig(tools: Tools, cluster: Cluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as a ServiceAccount (a TokenRequest token), nothing else."""
    token = tools.kubectl("create", "token", account, "--namespace", namespace, "--duration=1h").strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    entry = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [entry],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": entry["name"], "user": account}}],
        "current-context": account,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start_as(args: list[str], kubeconfig: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "SD_OPERATOR_IMAGE": "sd-operator:test"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "sd-operator"), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return process


def alive(process: subprocess.Popen, url: str, log: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"the operator exited: {log.read_text(errors='replace')[-2000:]}")
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def _exists(read: Any) -> bool:
    try:
        read()
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


def release_objects_cluster_wide(cluster: Cluster, release: str) -> list[str]:
    selector = f"app.kubernetes.io/instance={release}"
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    return [r.metadata.name for r in rbac.list_cluster_role(label_selector=selector).items] + [
        r.metadata.name for r in rbac.list_cluster_role_binding(label_selector=selector).items
    ]
