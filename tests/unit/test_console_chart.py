"""The chart's console values: RBAC for batches and LoRAJobs (and Secrets only when asked), PVC mounts of batch
outputs reaching `sd-operator gateway --outputs-dir` as read-only volumes."""

from __future__ import annotations

import pytest
from test_chart_template import GATEWAY, HELM, container, find, helm_home, render, render_fails

from sd_operator.cli import build_parser

pytestmark = pytest.mark.skipif(not HELM.exists(), reason="helm is not built (make tools)")
__all__ = ["helm_home"]  # the chart tests' autouse fixture: helm never writes to $HOME


def granted(objs: list[dict], kind: str = "ClusterRole") -> set[tuple[str, str, str]]:
    rules = find(objs, kind, GATEWAY)["rules"]
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_console_rbac_reads_batches_and_lorajobs_and_secrets_only_when_asked() -> None:
    default = granted(render())
    for kind in ("generationbatches", "lorajobs"):
        assert {("sd-operator.dev", kind, v) for v in ("get", "list", "watch")} <= default
    assert not any(r == "secrets" for _, r, _ in default)
    with_secrets = granted(render("--set", "gateway.console.readS3Secrets=true"))
    assert {(g, r, v) for g, r, v in with_secrets if r == "secrets"} == {("", "secrets", "get")}
    off = render("--set", "gateway.console.watch=false")
    assert not any(r in ("generationbatches", "lorajobs") for _, r, _ in granted(off))
    assert build_parser().parse_args(container(find(off, "Deployment", GATEWAY))["args"]).console_watch is False


def test_namespaced_rbac_has_the_console_rules_in_each_namespace() -> None:
    objs = render("--set", "rbac.clusterWide=false", "--set", "operator.watchNamespaces={team-a,team-b}")
    roles = [o for o in objs if o["kind"] == "Role" and o["metadata"]["name"] == GATEWAY]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        resources = {r for rule in role["rules"] for r in rule["resources"]}
        assert {"generationbatches", "lorajobs"} <= resources


def test_outputs_claims_are_mounted_read_only_and_passed_to_the_gateway() -> None:
    objs = render(
        "--set", "gateway.console.outputs[0].claimName=renders",
        "--set", "gateway.console.outputs[1].claimName=lora-outputs",
        "--set", "gateway.console.outputs[1].mountPath=/data/lora",
        "--set", "gateway.console.thumbnailCacheMiB=8",
    )  # fmt: skip
    dep = find(objs, "Deployment", GATEWAY)
    c = container(dep)
    args = build_parser().parse_args(c["args"])
    assert args.outputs_dir == ["renders=/var/lib/sd-outputs/renders", "lora-outputs=/data/lora"]
    assert args.thumbnail_cache_mib == 8 and args.console_watch is True
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    for i, (claim, path) in enumerate((("renders", "/var/lib/sd-outputs/renders"), ("lora-outputs", "/data/lora"))):
        assert volumes[f"outputs-{i}"]["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
        assert mounts[f"outputs-{i}"] == {"name": f"outputs-{i}", "mountPath": path, "readOnly": True}
    # Without outputs: no extra volume, and the default cache size.
    plain = container(find(render(), "Deployment", GATEWAY))
    assert not any(m["name"].startswith("outputs-") for m in plain["volumeMounts"])
    assert build_parser().parse_args(plain["args"]).thumbnail_cache_mib == 32


def test_console_values_are_checked_by_the_schema() -> None:
    assert "claimName" in render_fails("--set", "gateway.console.outputs[0].mountPath=/x")
    assert "readS3Secret" in render_fails("--set", "gateway.console.readS3Secret=true")
