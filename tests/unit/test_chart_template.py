"""The Helm chart (charts/sd-operator), rendered by the real helm binary; no cluster.

helm-unittest is not available offline, so the rendered YAML stream is parsed and checked here, with
the operator's own code as the reference where there is one (image, labels, CLI flags, keys and
presets file formats, the children the operator creates and the CRDs)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sd_operator import __version__, crds, kube
from sd_operator.api.generationbatch import GenerationBatchSpec
from sd_operator.api.lorajob import LoRAJobSpec
from sd_operator.api.sdinstance import SDInstanceSpec
from sd_operator.cli import build_parser
from sd_operator.controllers.sdinstance import CHILD_KINDS
from sd_operator.gateway.auth import KeyStore
from sd_operator.gateway.presets import PresetStore
from sd_operator.render import generationbatch as gb
from sd_operator.render import lorajob as lj
from sd_operator.render.common import WEBUI_CLIENT_LABEL
from sd_operator.render.sdinstance import RenderSettings, render_all
from sd_operator.settings import DEFAULT_OPERATOR_IMAGE, parse_hf_endpoint

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".local/bin/helm"
CHART = ROOT / "charts/sd-operator"
CI = CHART / "ci"
RELEASE, NAMESPACE = "rel", "sdo"
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
)
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
# Values scenarios: the chart's ci/ files (chart-testing's convention); "full" also has the
# Prometheus Operator's API, so its ServiceMonitors are rendered too.
SCENARIOS: dict[str, list[str]] = {
    "defaults": [],
    "namespaced": ["-f", str(CI / "namespaced-values.yaml")],
    "auth-external-redis": ["-f", str(CI / "auth-external-redis-values.yaml")],
    "full": ["-f", str(CI / "full-values.yaml"), "--api-versions", SERVICE_MONITOR_API],
    "resources": ["-f", str(CI / "resources-values.yaml")],
}

pytestmark = pytest.mark.skipif(not HELM.exists(), reason="helm is not built (make tools)")


@pytest.fixture(scope="module", autouse=True)
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """helm keeps its cache and config in a scratch directory, never in $HOME."""
    home = tmp_path_factory.mktemp("helm")
    saved = {k: os.environ.get(k) for k in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME")}
    for key in saved:
        os.environ[key] = str(home / key.lower())
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def render(*args: str) -> list[dict[str, Any]]:
    done = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def render_fails(*args: str) -> str:
    done = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert done.returncode != 0, "helm template should have failed"
    return done.stderr


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(objs: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objs)


def pod_templates(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield o["metadata"]["name"], o["spec"]["template"]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env") or []}


def allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(
        group in r.get("apiGroups", []) and resource in r.get("resources", []) and verb in r.get("verbs", [])
        for r in rules
    )


def operator_rules(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return find(objs, "ClusterRole", f"{RELEASE}-sd-operator")["rules"]


OPERATOR = f"{RELEASE}-sd-operator"
GATEWAY = f"{RELEASE}-sd-operator-gateway"


# ---------------------------------------------------------------------------------------------
# Lint, schema and rendering errors


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict(scenario: str) -> None:
    values = [a for a in SCENARIOS[scenario] if a not in ("--api-versions", SERVICE_MONITOR_API)]
    done = helm("lint", "--strict", str(CHART), *values)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--set", "gateway.replica=3"], ["/gateway", "replica"]),
        (["--set", "gateway.replicas=two"], ["/gateway/replicas", "integer"]),
        (["--set", "operatr.replicas=1"], ["operatr"]),
        (["--set", "redis.image.tag=7", "--set", "redis.imge.tag=7"], ["/redis", "imge"]),
        (["--set", "gateway.presets.fast.stepz=4"], ["/gateway/presets/fast", "stepz"]),
        (["--set", "gateway.presets.fast.width=500"], ["/gateway/presets/fast/width"]),
        (["--set", "networkPolicy.enabled=yes"], ["/networkPolicy/enabled", "boolean"]),
        (["--set", "gateway.service.type=Ingress"], ["/gateway/service/type"]),
        (["--set", "instances[0].name=x"], ["/instances/0", "spec"]),
    ],
)
def test_schema_rejects_typos_and_wrong_types(args: list[str], names: list[str]) -> None:
    err = render_fails(*args)
    for name in names:
        assert name in err, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "rbac.clusterWide=false"], "rbac.clusterWide=false needs operator.watchNamespaces"),
        (["--set", "redis.enabled=true", "--set", "redis.external.url=redis://r:6379"], "redis.enabled or redis"),
        (
            ["--set", "gateway.auth.existingSecret=k", "--set", "gateway.auth.keys[0].key=abc"],
            "gateway.auth.existingSecret or gateway.auth.keys",
        ),
        (["--kube-version", "1.28.0"], "kubeVersion"),
    ],
)
def test_contradicting_values_fail_with_a_message(args: list[str], message: str) -> None:
    assert message in render_fails(*args)


# ---------------------------------------------------------------------------------------------
# Properties of every scenario


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rbac_has_no_wildcards(scenario: str) -> None:
    objs = render(*SCENARIOS[scenario])
    rules = [r for o in objs if o["kind"] in ("Role", "ClusterRole") for r in o["rules"]]
    assert rules
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert not any("*" in value for value in rule.get(field, [])), rule
        assert not rule.get("nonResourceURLs"), rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


@pytest.mark.parametrize("scenario", ["defaults", "namespaced"])
def test_the_operator_may_watch_and_apply_every_child_kind_it_watches(scenario: str) -> None:
    """The kinds the SDInstance controller watches (a child deleted by hand comes back), as its RBAC sees them;
    and delete on Services (a ClusterIP Service of an earlier operator is made again headless)."""
    objs = render(*SCENARIOS[scenario])
    operator_roles = [o for o in objs if o["kind"] in ("Role", "ClusterRole") and o["metadata"]["name"] == OPERATOR]
    assert operator_roles
    for role in operator_roles:
        for group, _version, plural in CHILD_KINDS:
            verbs = {
                v for r in role["rules"] if group in r["apiGroups"] and plural in r["resources"] for v in r["verbs"]
            }
            assert {"get", "list", "watch", "create", "patch"} <= verbs, (role["kind"], plural, verbs)
        services = {
            v for r in role["rules"] if "" in r["apiGroups"] and "services" in r["resources"] for v in r["verbs"]
        }
        assert "delete" in services


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_container_is_hardened_and_has_resources(scenario: str) -> None:
    templates = list(pod_templates(render(*SCENARIOS[scenario])))
    assert templates
    for name, template in templates:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 1000, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        mounts_of = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
            assert "memory" in c["resources"]["limits"], name
            # A read-only root file system needs writable scratch space.
            tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
            assert "emptyDir" in mounts_of[tmp["name"]], name


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_standard_labels_on_every_object(scenario: str) -> None:
    for obj in render(*SCENARIOS[scenario]):
        labels = obj["metadata"].get("labels") or {}
        for key in STANDARD_LABELS:
            assert key in labels, f"{obj['kind']}/{obj['metadata']['name']} lacks {key}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == __version__


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_service_account_tokens_only_where_the_api_is_used(scenario: str) -> None:
    objs = render(*SCENARIOS[scenario])
    for sa in (o for o in objs if o["kind"] == "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    for name, template in pod_templates(objs):
        uses_api = name in (OPERATOR, GATEWAY)
        assert template["spec"]["automountServiceAccountToken"] is uses_api, name


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gateway_and_operator_pods_may_reach_webui_pods(scenario: str) -> None:
    objs = render(*SCENARIOS[scenario])
    for name in (OPERATOR, GATEWAY):
        labels = find(objs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert labels[WEBUI_CLIENT_LABEL] == "true", name


# ---------------------------------------------------------------------------------------------
# Defaults


def test_default_image_is_the_operators_default() -> None:
    objs = render()
    assert DEFAULT_OPERATOR_IMAGE == "ghcr.io/sd-operator/sd-operator:0.1.0"
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__ == chart["version"]
    for name in (OPERATOR, GATEWAY):
        assert container(find(objs, "Deployment", name))["image"] == DEFAULT_OPERATOR_IMAGE
    assert env_of(container(find(objs, "Deployment", OPERATOR)))["SD_OPERATOR_IMAGE"] == DEFAULT_OPERATOR_IMAGE
    digest = "sha256:" + "a" * 64
    pinned = render("--set", f"image.digest={digest}", "--set", "image.registry=registry.local:5000")
    image = container(find(pinned, "Deployment", OPERATOR))["image"]
    assert image == f"registry.local:5000/sd-operator/sd-operator@{digest}"


def test_default_objects() -> None:
    objs = render()
    assert kinds(objs) == sorted(
        ["ClusterRole", "ClusterRoleBinding"] * 2
        + ["ConfigMap", "Deployment", "Deployment", "PodDisruptionBudget", "Service", "Service"]
        + ["ServiceAccount", "ServiceAccount"]
        + ["Role", "RoleBinding"]  # the gateway's demand reports
    )
    namespaced = [o for o in objs if not o["kind"].startswith("Cluster")]
    assert all(o["metadata"]["namespace"] == NAMESPACE for o in namespaced)
    # What is optional stays off: no Ingress, HPA, NetworkPolicy, Redis, dashboard, keys, ServiceMonitor.


def test_operator_deployment_flags_env_and_probes() -> None:
    dep = find(render(), "Deployment", OPERATOR)
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    c = container(dep)
    assert c["command"] == ["sd-operator"]
    assert c["args"] == [
        "run",
        "--all-namespaces",
        "--liveness=http://0.0.0.0:8081/healthz",
        "--metrics-port=8080",
        "--metrics-address=0.0.0.0",
        f"--peering={OPERATOR}",
        "--priority=0",
    ]
    args = build_parser().parse_args(c["args"])  # the real CLI accepts them
    assert args.all_namespaces and args.metrics_port == 8080 and args.peering == OPERATOR
    env = env_of(c)
    assert env["SD_GATEWAY_URL"] == f"http://{GATEWAY}.{NAMESPACE}.svc:8080"
    assert env["SD_IMAGE_PULL_SECRETS"] == ""
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}


def test_operator_options() -> None:
    c = container(
        find(
            render(
                "--set",
                "imagePullSecrets={regcred,mirror}",
                "--set",
                "operator.childImage=registry.local/sd:dev",
                "--set",
                "operator.priority=100",
                "--set",
                "operator.verbose=true",
                "--set",
                "operator.gatewayUrl=http://gw.example:8080",
            ),
            "Deployment",
            OPERATOR,
        )
    )
    env = env_of(c)
    assert env["SD_IMAGE_PULL_SECRETS"] == "regcred,mirror"
    assert env["SD_OPERATOR_IMAGE"] == "registry.local/sd:dev"
    assert env["SD_GATEWAY_URL"] == "http://gw.example:8080"
    assert "--priority=100" in c["args"] and "--verbose" in c["args"]
    build_parser().parse_args(c["args"])
    standalone = container(find(render("--set", "operator.standalone=true"), "Deployment", OPERATOR))
    assert "--standalone" in standalone["args"]
    assert not any(a.startswith("--peering") for a in standalone["args"])


def test_hugging_face_endpoint_is_set_only_when_given() -> None:
    assert "SD_HF_ENDPOINT" not in env_of(container(find(render(), "Deployment", OPERATOR)))
    mirror = "https://hf-mirror.internal/hf"
    env = env_of(container(find(render("--set", f"huggingFace.endpoint={mirror}"), "Deployment", OPERATOR)))
    assert env["SD_HF_ENDPOINT"] == mirror
    assert parse_hf_endpoint(env["SD_HF_ENDPOINT"]) == mirror  # what the operator accepts
    # The schema refuses what the operator would refuse, and typos of the key.
    assert "/huggingFace/endpoint" in render_fails("--set", "huggingFace.endpoint=hf-mirror.internal")
    assert "endpiont" in render_fails("--set", f"huggingFace.endpiont={mirror}")


def test_gateway_deployment_service_and_pdb() -> None:
    objs = render()
    dep = find(objs, "Deployment", GATEWAY)
    assert dep["spec"]["replicas"] == 2
    c = container(dep)
    assert c["args"][:4] == ["gateway", "--host=0.0.0.0", "--port=8080", "--kubernetes"]
    assert "--presets-file=/etc/sd-gateway/presets/presets.yaml" in c["args"]
    assert not any(a.startswith(("--keys-file", "--cache-url", "--namespace", "--access-log")) for a in c["args"])
    args = build_parser().parse_args(c["args"])
    assert args.kubernetes and args.port == 8080 and args.max_queue == 1000 and args.cool_off == 10
    assert args.host == "0.0.0.0"  # noqa: S104 - a pod listens on its own address
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    svc = find(objs, "Service", GATEWAY)
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    pdb = find(objs, "PodDisruptionBudget", GATEWAY)
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    # One replica: no PDB (it would block every drain).
    assert "PodDisruptionBudget" not in kinds(render("--set", "gateway.replicas=1"))
    # The presets file is mounted from the ConfigMap, and an empty one is a valid presets file.
    cm = find(objs, "ConfigMap", f"{GATEWAY}-presets")
    assert len(PresetStore.from_yaml(cm["data"]["presets.yaml"])) == 0


def test_log_format_reaches_the_operator_and_the_gateway() -> None:
    for args, expected in (((), "json"), (("--set", "logFormat=plain"), "plain")):
        objs = render(*args)
        for name in (OPERATOR, GATEWAY):
            assert env_of(container(find(objs, "Deployment", name)))["SD_LOG_FORMAT"] == expected
    assert "logFormat" in render_fails("--set", "logFormat=xml")


def test_gateway_tunables_reach_the_cli() -> None:
    dep = find(
        render(
            "--set",
            "gateway.maxQueue=50",
            "--set",
            "gateway.coolOff=2.5",
            "--set",
            "gateway.requestTimeout=120",
            "--set",
            "gateway.dispatchWindow=3",
            "--set",
            "gateway.accessLog=true",
            "--set",
            "gateway.defaultModel=sd_xl_base_1.0.safetensors",
            "--set",
            "gateway.extraArgs={--retries=5}",
        ),
        "Deployment",
        GATEWAY,
    )
    args = build_parser().parse_args(container(dep)["args"])
    assert (args.max_queue, args.cool_off, args.request_timeout, args.dispatch_window) == (50, 2.5, 120.0, 3)
    assert args.default_model == "sd_xl_base_1.0.safetensors" and args.retries == 5 and args.access_log


def test_gateway_can_be_left_out() -> None:
    objs = render("--set", "gateway.enabled=false")
    assert not [o for o in objs if o["metadata"]["name"].startswith(GATEWAY)]
    assert "SD_GATEWAY_URL" not in env_of(container(find(objs, "Deployment", OPERATOR)))


# ---------------------------------------------------------------------------------------------
# RBAC


def test_operator_rbac_covers_what_the_operator_does() -> None:
    rules = operator_rules(render())
    # Watched kinds (kopf list+watch) and kopf's own needs.
    for group, resource in [
        ("sd-operator.dev", "sdinstances"),
        ("sd-operator.dev", "lorajobs"),
        ("sd-operator.dev", "generationbatches"),
        ("", "pods"),
        ("batch", "jobs"),
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("", "namespaces"),
        ("kopf.dev", "clusterkopfpeerings"),
    ]:
        assert allows(rules, group, resource, "list") and allows(rules, group, resource, "watch"), resource
    for resource in ("sdinstances", "lorajobs", "generationbatches"):
        assert allows(rules, "sd-operator.dev", resource, "patch")
        assert allows(rules, "sd-operator.dev", f"{resource}/status", "patch")
    assert allows(rules, "sd-operator.dev", "generationbatches", "delete")
    assert allows(rules, "", "events", "create")
    assert allows(rules, "kopf.dev", "clusterkopfpeerings", "create")
    # Nothing the operator never touches.
    assert not allows(rules, "", "secrets", "get")
    assert not allows(rules, "", "pods", "delete")
    assert not allows(rules, "kopf.dev", "kopfpeerings", "create")  # cluster-wide peering only


def _children() -> list[dict[str, Any]]:
    """Everything the operator's renderers make for the examples (what it server-side applies)."""
    docs = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "examples").glob("*.yaml")}
    settings = RenderSettings(operator_image="op:1")
    out: list[dict[str, Any]] = []

    def owner(doc: dict[str, Any]) -> dict[str, Any]:
        meta = {**doc["metadata"], "namespace": "ns", "uid": "u-1"}
        return {"apiVersion": doc["apiVersion"], "kind": doc["kind"], "metadata": meta}

    for doc in docs.values():
        if doc["kind"] == "SDInstance":
            out += render_all(owner(doc), SDInstanceSpec.model_validate(doc["spec"]), settings)
        elif doc["kind"] == "GenerationBatch":
            spec = GenerationBatchSpec.model_validate(doc["spec"])
            out += [gb.render_configmap(owner(doc), doc["spec"]), *gb.render_rbac(owner(doc))]
            out.append(gb.render_job(owner(doc), spec, "m.safetensors", settings, "http://gw:8080"))
        elif doc["kind"] == "LoRAJob":
            spec = LoRAJobSpec.model_validate(doc["spec"])
            base = SDInstanceSpec.model_validate(docs["sdinstance-sdxl-base"]["spec"]).model.checkpoint
            out += [lj.render_configmap(owner(doc), doc["spec"], base, settings), *lj.render_rbac(owner(doc))]
            out.append(lj.render_train_job(owner(doc), spec, base, settings))
            out.append(lj.render_publish_job(owner(doc), spec, "sdxl-base", "models", "sdxl", None, settings))
            out.append(lj.render_evaluation(owner(doc), spec, "sdxl-base"))
    return out


@pytest.mark.parametrize("scenario", ["defaults", "namespaced"])
def test_operator_may_apply_every_child_and_grant_every_role(scenario: str) -> None:
    objs = render(*SCENARIOS[scenario])
    # Cluster-wide: the ClusterRole; namespaced: the Role in a watched namespace.
    kind = "ClusterRole" if scenario == "defaults" else "Role"
    rules = next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == OPERATOR)["rules"]
    children = _children()
    assert {c["kind"] for c in children} >= {"Deployment", "Service", "Job", "Role", "RoleBinding", "GenerationBatch"}
    for child in children:
        prefix, plural = kube.RESOURCES[(child["apiVersion"], child["kind"])]
        group = "" if prefix == "/api/v1" else prefix.split("/")[2]
        for verb in ("create", "patch"):  # server-side apply of a new or an existing object
            assert allows(rules, group, plural, verb), f"{verb} {child['kind']}"
        # RBAC escalation check: the operator can create a Role only with permissions it holds itself.
        for rule in child.get("rules", []):
            for g in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        assert allows(rules, g, resource, verb), f"{verb} {resource} (in Role {child['kind']})"


def test_namespaced_rbac_in_each_watched_namespace() -> None:
    objs = render(*SCENARIOS["namespaced"])
    for name in (OPERATOR, GATEWAY):
        roles = [o for o in objs if o["kind"] == "Role" and o["metadata"]["name"] == name]
        bindings = [o for o in objs if o["kind"] == "RoleBinding" and o["metadata"]["name"] == name]
        assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
        assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
        for b in bindings:
            assert b["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]
    # The only cluster-wide grant: kopf's read-only scanning of CRDs and Namespaces.
    (cluster_role,) = [o for o in objs if o["kind"] == "ClusterRole"]
    assert cluster_role["metadata"]["name"] == f"{OPERATOR}-cluster"
    granted = {(r, v) for rule in cluster_role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {(r, v) for r in ("customresourcedefinitions", "namespaces") for v in ("list", "watch")}
    role = next(o for o in objs if o["kind"] == "Role" and o["metadata"]["name"] == OPERATOR)
    assert allows(role["rules"], "kopf.dev", "kopfpeerings", "create")
    op_args = container(find(objs, "Deployment", OPERATOR))["args"]
    assert "--namespace=team-a" in op_args and "--namespace=team-b" in op_args
    assert "--all-namespaces" not in op_args
    assert build_parser().parse_args(op_args).namespace == ["team-a", "team-b"]
    gw_args = container(find(objs, "Deployment", GATEWAY))["args"]
    assert build_parser().parse_args(gw_args).namespace == ["team-a", "team-b"]


def test_gateway_rbac_reads_only_discovery() -> None:
    rules = find(render(), "ClusterRole", GATEWAY)["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    read = (("sd-operator.dev", "sdinstances"), ("discovery.k8s.io", "endpointslices"))
    # The web console's batches and LoRAJobs (gateway.console.watch; tests/unit/test_console_chart.py).
    read += (("sd-operator.dev", "generationbatches"), ("sd-operator.dev", "lorajobs"))
    assert granted == {(g, r, v) for g, r in read for v in ("get", "list", "watch")}


# ---------------------------------------------------------------------------------------------
# Auth, cache, presets, extras


def test_chart_made_keys_and_external_redis(tmp_path: Path) -> None:
    objs = render(*SCENARIOS["auth-external-redis"])
    secret = find(objs, "Secret", f"{GATEWAY}-keys")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(secret["stringData"]["keys.yaml"])
    store = KeyStore.from_file(keys_file)  # the gateway's own loader
    assert store.lookup("test-key-studio-a").name == "studio-a"
    assert store.lookup("test").name == "batch"  # keySha256 of "test"
    assert store.lookup("wrong") is None
    dep = find(objs, "Deployment", GATEWAY)
    c = container(dep)
    args = build_parser().parse_args(c["args"])
    assert str(args.keys_file) == "/etc/sd-gateway/keys/keys.yaml"
    assert args.cache_url == "redis://cache.example.svc:6379/0"
    assert args.default_model == "Counterfeit-V3.0_fp16.safetensors"
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == f"{GATEWAY}-keys"
    assert {"name": "keys", "mountPath": "/etc/sd-gateway/keys", "readOnly": True} in c["volumeMounts"]
    assert "checksum/keys" in dep["spec"]["template"]["metadata"]["annotations"]
    assert "Deployment" not in [o["kind"] for o in objs if "redis" in o["metadata"]["name"]]


def test_existing_keys_secret_and_redis_url_from_a_secret() -> None:
    objs = render(
        "--set",
        "gateway.auth.existingSecret=team-keys",
        "--set",
        "redis.external.existingSecret=cache-url",
    )
    assert "Secret" not in kinds(objs)
    c = container(find(objs, "Deployment", GATEWAY))
    volumes = {v["name"]: v for v in find(objs, "Deployment", GATEWAY)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == "team-keys"
    assert "--cache-url=$(SD_CACHE_URL)" in c["args"]
    assert env_of(c)["SD_CACHE_URL"] == {"secretKeyRef": {"name": "cache-url", "key": "url"}}


def test_full_scenario_redis_ingress_hpa_pdb_netpol_dashboard() -> None:
    objs = render(*SCENARIOS["full"])
    redis = find(objs, "Deployment", f"{OPERATOR}-redis")
    rc = container(redis)
    assert rc["image"] == "redis:7.0.15-alpine"
    assert "--save" in rc["args"] and rc["args"][rc["args"].index("--save") + 1] == ""
    assert not redis["spec"]["template"]["spec"].get("volumes", [])[1:]  # only /tmp: no persistence
    gw = find(objs, "Deployment", GATEWAY)
    args = build_parser().parse_args(container(gw)["args"])
    assert args.cache_url == f"redis://{OPERATOR}-redis.{NAMESPACE}.svc:6379/0"
    assert "replicas" not in gw["spec"]  # the HPA owns it
    hpa = find(objs, "HorizontalPodAutoscaler", GATEWAY)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": GATEWAY}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert find(objs, "PodDisruptionBudget", GATEWAY)["spec"]["minAvailable"] == 1
    ing = find(objs, "Ingress", GATEWAY)
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend == {"service": {"name": GATEWAY, "port": {"name": "http"}}}
    assert ing["spec"]["ingressClassName"] == "nginx" and ing["spec"]["tls"][0]["secretName"] == "sd-example-tls"
    policies = {o["metadata"]["name"]: o for o in objs if o["kind"] == "NetworkPolicy"}
    assert set(policies) == {OPERATOR, GATEWAY, f"{OPERATOR}-redis"}
    gw_ports = [p["port"] for rule in policies[GATEWAY]["spec"]["ingress"] for p in rule["ports"]]
    assert gw_ports == [8080]
    op_ports = sorted(p["port"] for rule in policies[OPERATOR]["spec"]["ingress"] for p in rule["ports"])
    assert op_ports == [8080, 8081]
    (redis_rule,) = policies[f"{OPERATOR}-redis"]["spec"]["ingress"]
    assert redis_rule["from"] == [{"podSelector": {"matchLabels": gw["spec"]["selector"]["matchLabels"]}}]
    cm = find(objs, "ConfigMap", f"{OPERATOR}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["sd-operator.json"]) == json.loads((CHART / "dashboards/sd-operator.json").read_text())
    presets = PresetStore.from_yaml(find(objs, "ConfigMap", f"{GATEWAY}-presets")["data"]["presets.yaml"])
    assert presets.get("product_shot").steps == 30
    assert "checksum/presets" in gw["spec"]["template"]["metadata"]["annotations"]


def test_service_monitors_only_with_the_api() -> None:
    assert "ServiceMonitor" not in kinds(render())
    objs = render("--api-versions", SERVICE_MONITOR_API)
    monitors = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ServiceMonitor"}
    assert set(monitors) == {f"{OPERATOR}-operator", f"{OPERATOR}-gateway"}
    for monitor, service in ((f"{OPERATOR}-operator", f"{OPERATOR}-metrics"), (f"{OPERATOR}-gateway", GATEWAY)):
        svc = find(objs, "Service", service)
        spec = monitors[monitor]["spec"]
        assert spec["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert spec["endpoints"][0]["port"] in [p["name"] for p in svc["spec"]["ports"]]
        assert spec["endpoints"][0]["path"] == "/metrics"
    off = render("--api-versions", SERVICE_MONITOR_API, "--set", "metrics.serviceMonitor.enabled=false")
    assert "ServiceMonitor" not in kinds(off)


# ---------------------------------------------------------------------------------------------
# Custom resources, CRDs, dashboard, dist


def test_custom_resources_from_values() -> None:
    objs = render(*SCENARIOS["resources"])
    examples = {}
    for path in (ROOT / "examples").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        examples[(doc["kind"], doc["metadata"]["name"])] = doc["spec"]
    custom = [o for o in objs if o["apiVersion"] == "sd-operator.dev/v1alpha1"]
    assert sorted(o["kind"] for o in custom) == ["GenerationBatch", "LoRAJob", "SDInstance", "SDInstance"]
    for obj in custom:
        meta = obj["metadata"]
        assert meta["namespace"] == NAMESPACE
        assert meta["annotations"]["argocd.argoproj.io/sync-wave"] == "1"
        assert meta["annotations"]["argocd.argoproj.io/sync-options"] == "SkipDryRunOnMissingResource=true"
        assert "helm.sh/resource-policy" not in meta["annotations"]  # deleted with the release
        assert obj["spec"] == examples[(obj["kind"], meta["name"])]
    for obj in custom:
        model = {"SDInstance": SDInstanceSpec, "LoRAJob": LoRAJobSpec, "GenerationBatch": GenerationBatchSpec}
        model[obj["kind"]].model_validate(obj["spec"])


def test_chart_crds_equal_the_generated_crds() -> None:
    chart_files = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    repo_files = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    assert chart_files == repo_files
    assert {name: text.encode() for name, text in crds.rendered().items()} == chart_files


def test_dashboard_is_valid_and_matches_the_deploy_copy() -> None:
    chart_copy = CHART / "dashboards/sd-operator.json"
    dashboard = json.loads(chart_copy.read_text())
    assert dashboard["panels"] and dashboard["title"]
    deploy_copy = ROOT / "deploy/grafana/sd-operator-dashboard.json"
    if deploy_copy.exists():
        assert chart_copy.read_bytes() == deploy_copy.read_bytes(), "copy deploy/grafana's dashboard into the chart"


def test_dist_bundle_is_ordered_and_deterministic(tmp_path: Path) -> None:
    outs = []
    for i in range(2):
        out = tmp_path / f"install-{i}.yaml"
        done = subprocess.run(
            ["bash", str(ROOT / "tools/dist.sh"), str(out)], capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    objs = [d for d in yaml.safe_load_all(outs[0]) if d]
    order = [o["kind"] for o in objs]
    n_crds = len(list((CHART / "crds").glob("*.yaml")))
    assert order[:n_crds] == ["CustomResourceDefinition"] * n_crds
    assert order[n_crds] == "Namespace" and objs[n_crds]["metadata"]["name"] == "sd-operator"
    assert "CustomResourceDefinition" not in order[n_crds + 1 :]
    assert {"Deployment", "ClusterRole", "Service", "ServiceAccount"} <= set(order[n_crds + 1 :])
    for obj in objs[n_crds + 1 :]:
        if not obj["kind"].startswith("Cluster"):
            assert obj["metadata"]["namespace"] == "sd-operator", obj["metadata"]["name"]
    deployments = {o["metadata"]["name"] for o in objs if o["kind"] == "Deployment"}
    assert deployments == {"sd-operator", "sd-operator-gateway"}
    operator = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "sd-operator")
    env = env_of(container(operator))
    # The release name equals the chart name: the operator's built-in gateway URL default applies.
    assert env["SD_GATEWAY_URL"] == "http://sd-operator-gateway.sd-operator.svc:8080"


# ---------------------------------------------------------------------------------------------
# Demand reports for SDInstance autoscaling


def demand_role(objs: list[dict[str, Any]], kind: str = "Role") -> dict[str, Any]:
    return find(objs, kind, f"{GATEWAY}-demand")


def test_gateway_reports_demand_as_its_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    from sd_operator.gateway.demand import default_gateway_id, default_namespace

    c = container(find(render(), "Deployment", GATEWAY))
    assert "--report-demand" in c["args"] and "--cold-start-timeout=600" in c["args"]
    args = build_parser().parse_args(c["args"])
    assert args.report_demand and args.cold_start_timeout == 600.0
    # No --gateway-id or --demand-namespace: the gateway takes them from its pod, by the downward API.
    assert args.gateway_id is None and args.demand_namespace is None
    env = env_of(c)
    fields = {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "POD_UID": "metadata.uid"}
    for name, field in fields.items():
        assert env[name] == {"fieldRef": {"fieldPath": field}}, name
    monkeypatch.setenv("POD_NAME", "rel-sd-operator-gateway-7c9d-x2x")
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    assert (default_gateway_id(), default_namespace()) == ("rel-sd-operator-gateway-7c9d-x2x", NAMESPACE)
    tuned = container(find(render("--set", "gateway.coldStartTimeout=90"), "Deployment", GATEWAY))
    assert build_parser().parse_args(tuned["args"]).cold_start_timeout == 90.0
    full = container(find(render(*SCENARIOS["full"]), "Deployment", GATEWAY))
    assert build_parser().parse_args(full["args"]).cold_start_timeout == 300.0
    assert "/gateway/coldStartTimeout" in render_fails("--set", "gateway.coldStartTimeout=-1")
    assert "/gateway/autoscaling/reportDemand" in render_fails("--set", "gateway.autoscaling.reportDemand=yes")


@pytest.mark.parametrize("scenario", ["defaults", "namespaced"])
def test_gateway_demand_role_writes_configmaps_in_its_own_namespace_only(scenario: str) -> None:
    objs = render(*SCENARIOS[scenario])
    role = demand_role(objs)
    assert role["metadata"]["namespace"] == NAMESPACE
    # By verb, not by name: report names follow pod names, and create cannot be limited by resourceNames.
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update", "patch", "delete"]}
    ]
    binding = demand_role(objs, "RoleBinding")
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{GATEWAY}-demand"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": GATEWAY, "namespace": NAMESPACE}]
    # Nowhere else may the gateway write: its other (Cluster)Roles only read.
    for o in objs:
        if o["kind"] in ("Role", "ClusterRole") and o["metadata"]["name"] == GATEWAY:
            assert not allows(o["rules"], "", "configmaps", "get"), o["metadata"].get("namespace")
            assert {v for rule in o["rules"] for v in rule["verbs"]} == {"get", "list", "watch"}


def test_report_demand_off_drops_the_flag_and_the_role() -> None:
    objs = render("--set", "gateway.autoscaling.reportDemand=false")
    c = container(find(objs, "Deployment", GATEWAY))
    assert "--report-demand" not in c["args"]
    args = build_parser().parse_args(c["args"])
    assert not args.report_demand
    assert args.cold_start_timeout == 600.0  # still holds requests for instances scaled by others
    assert not [o for o in objs if o["metadata"]["name"] == f"{GATEWAY}-demand"]
    assert kinds(objs) == kinds([o for o in render() if o["metadata"]["name"] != f"{GATEWAY}-demand"])
    # No RBAC at all from the chart: no demand Role either, the flag stays.
    no_rbac = render("--set", "rbac.create=false")
    assert not [o for o in no_rbac if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]
    assert "--report-demand" in container(find(no_rbac, "Deployment", GATEWAY))["args"]


@pytest.mark.parametrize("scenario", ["defaults", "namespaced"])
def test_operator_may_read_demand_reports_and_scale(scenario: str) -> None:
    objs = render(*SCENARIOS[scenario])
    kind = "ClusterRole" if scenario == "defaults" else "Role"
    roles = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == OPERATOR]
    assert len(roles) == (1 if scenario == "defaults" else 2)  # namespaced: team-a and team-b
    for role in roles:
        rules = role["rules"]
        for verb in ("get", "list", "watch"):  # the gateways' reports, in every watched namespace
            assert allows(rules, "", "configmaps", verb), verb
        assert allows(rules, "apps", "deployments", "patch")  # the replica count it owns
        assert allows(rules, "", "events", "create")  # ScaledUp, ScaledDown, ScaledToZero
        assert allows(rules, "sd-operator.dev", "sdinstances/status", "patch")  # desiredReplicas, lastScale*
        assert not allows(rules, "", "configmaps", "delete")  # the gateways' reports are theirs
