"""What an SDInstance renders to: WebUI flags, the fetch manifest and the child manifests (pure functions)."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sd_operator.api.models import ModelFamily
from sd_operator.api.sdinstance import Attention, SDInstanceSpec, VRAMMode
from sd_operator.controllers.sdinstance import render_settings
from sd_operator.emulator.app import DRAIN_TIMEOUT
from sd_operator.fetch.manifest import parse_manifest
from sd_operator.render.common import label_value
from sd_operator.render.sdinstance import (
    CONFIG_HASH_ANNOTATION,
    DRAIN_PATH,
    RenderSettings,
    attention_flag,
    endpoint,
    fetch_manifest,
    gpu_summary,
    no_half_vae,
    render_all,
    render_configmap,
    render_deployment,
    render_network_policy,
    render_service,
    vram_flag,
    webui_args,
    webui_settings,
)
from sd_operator.settings import SettingsError, operator_settings, parse_hf_endpoint

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("sdinstance-*.yaml"))
VRAM_FLAGS = {"--lowvram", "--medvram", "--medvram-sdxl"}
SHA = "31E35C80FC4829D14F90153F4C74CD59C90B779F6AFE05A74CD6120B893F7E5B"
UID = "5d7f2a1c-0000-4000-8000-000000000001"
SETTINGS = RenderSettings(operator_image="registry.example/sd-operator:9.9.9")


# ---------------------------------------------------------------------------------------------
# Builders


def hf(name: str = "model.safetensors", **extra: Any) -> dict[str, Any]:
    """A model file from the Hugging Face Hub."""
    return {"name": name, "source": {"huggingFace": {"repo": "owner/repo", "file": name}}, **extra}


def make_spec(
    family: str = "sd15",
    *,
    checkpoint: dict[str, Any] | None = None,
    gpu: dict[str, Any] | None = None,
    webui: dict[str, Any] | None = None,
    **extra: Any,
) -> SDInstanceSpec:
    body: dict[str, Any] = {"model": {"family": family, "checkpoint": checkpoint or hf("ckpt.safetensors")}}
    if gpu is not None:
        body["gpu"] = gpu
    if webui is not None:
        body["webui"] = webui
    for key, value in extra.items():
        if key in ("vae", "loras", "controlNets", "embeddings"):
            body["model"][key] = value
        else:
            body[key] = value
    return SDInstanceSpec.model_validate(body)


def make_owner(name: str = "demo", namespace: str = "team-a", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "sd-operator.dev/v1alpha1",
        "kind": "SDInstance",
        "metadata": {"name": name, "namespace": namespace, "uid": UID, "labels": labels or {}},
    }


def deployment(spec: SDInstanceSpec, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    return render_deployment(owner or make_owner(), spec, SETTINGS)


def pod_spec(spec: SDInstanceSpec) -> dict[str, Any]:
    return deployment(spec)["spec"]["template"]["spec"]


def container(spec: SDInstanceSpec, name: str) -> dict[str, Any]:
    pod = pod_spec(spec)
    found = [c for c in pod["containers"] + pod["initContainers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name}"
    return found[0]


def volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in pod["volumes"] if v["name"] == name)


def after(args: list[str], flag: str) -> str:
    """The value following a flag on a command line."""
    return args[args.index(flag) + 1]


def manifest_files(spec: SDInstanceSpec) -> list[dict[str, Any]]:
    return json.loads(render_configmap(make_owner(), spec, SETTINGS)["data"]["models.json"])["files"]


def config_hash(spec: SDInstanceSpec) -> str:
    return deployment(spec)["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]


# ---------------------------------------------------------------------------------------------
# 1. VRAM flags


@pytest.mark.parametrize(
    ("family", "memory", "expected"),
    [
        (ModelFamily.SD15, 4, "--lowvram"),
        (ModelFamily.SD15, 7, "--lowvram"),
        (ModelFamily.SD15, 8, "--medvram"),
        (ModelFamily.SD15, 12, "--medvram"),
        (ModelFamily.SD15, 13, None),
        (ModelFamily.SD15, 15, None),
        (ModelFamily.SD15, 16, None),
        (ModelFamily.SD15, 24, None),
        (ModelFamily.SDXL, 4, "--lowvram"),
        (ModelFamily.SDXL, 7, "--lowvram"),
        (ModelFamily.SDXL, 8, "--medvram-sdxl"),
        (ModelFamily.SDXL, 12, "--medvram-sdxl"),
        (ModelFamily.SDXL, 13, "--medvram-sdxl"),
        (ModelFamily.SDXL, 15, "--medvram-sdxl"),
        (ModelFamily.SDXL, 16, None),
        (ModelFamily.SDXL, 24, None),
        (ModelFamily.SD2, 7, "--lowvram"),
        (ModelFamily.SD2, 12, "--medvram"),
        (ModelFamily.SD2, 13, None),
        (ModelFamily.SD3, 6, "--lowvram"),
        (ModelFamily.SD3, 10, "--medvram"),
        (ModelFamily.SD3, 80, None),
        (ModelFamily.SD15, None, None),
        (ModelFamily.SDXL, None, None),
    ],
)
def test_vram_flag_auto(family: ModelFamily, memory: int | None, expected: str | None) -> None:
    assert vram_flag(family, memory, VRAMMode.AUTO) == expected


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (VRAMMode.NONE, None),
        (VRAMMode.MEDVRAM, "--medvram"),
        (VRAMMode.LOWVRAM, "--lowvram"),
        (VRAMMode.MEDVRAM_SDXL, "--medvram-sdxl"),
    ],
)
@pytest.mark.parametrize("family", [ModelFamily.SD15, ModelFamily.SDXL])
@pytest.mark.parametrize("memory", [None, 4, 10, 14, 24, 80])
def test_explicit_vram_mode_overrides_auto(
    mode: VRAMMode, expected: str | None, family: ModelFamily, memory: int | None
) -> None:
    assert vram_flag(family, memory, mode) == expected


@pytest.mark.parametrize(
    ("gpu", "family", "expected"),
    [
        ({"product": "NVIDIA-GeForce-GTX-1650", "memoryGiB": 4}, "sd15", "--lowvram"),
        ({"product": "NVIDIA-GeForce-GTX-1650", "memoryGiB": 4}, "sdxl", "--lowvram"),
        ({"product": "NVIDIA-GeForce-RTX-3060", "memoryGiB": 12}, "sd15", "--medvram"),
        ({"product": "NVIDIA-GeForce-RTX-3060", "memoryGiB": 12}, "sdxl", "--medvram-sdxl"),
        ({"resourceName": "nvidia.com/mig-1g.10gb", "memoryGiB": 10}, "sd15", "--medvram"),
        ({"resourceName": "nvidia.com/mig-1g.10gb", "memoryGiB": 10}, "sdxl", "--medvram-sdxl"),
        ({"product": "Tesla-T4", "memoryGiB": 16}, "sd15", None),
        ({"product": "Tesla-T4", "memoryGiB": 16}, "sdxl", None),
        ({"product": "NVIDIA-GeForce-RTX-4090", "memoryGiB": 24}, "sdxl", None),
        ({"product": "NVIDIA-A100-SXM4-80GB", "memoryGiB": 80}, "sd3", None),
        ({}, "sdxl", None),
    ],
)
def test_gpu_class_chooses_exactly_one_vram_flag(gpu: dict[str, Any], family: str, expected: str | None) -> None:
    args = webui_args(make_spec(family, gpu=gpu))
    assert [a for a in args if a in VRAM_FLAGS] == ([expected] if expected else [])


def test_explicit_vram_mode_in_spec_wins_over_the_gpu_memory() -> None:
    args = webui_args(make_spec("sd15", gpu={"memoryGiB": 24}, webui={"vramMode": "lowvram"}))
    assert [a for a in args if a in VRAM_FLAGS] == ["--lowvram"]
    args = webui_args(make_spec("sdxl", gpu={"memoryGiB": 8}, webui={"vramMode": "none"}))
    assert not [a for a in args if a in VRAM_FLAGS]


# ---------------------------------------------------------------------------------------------
# 2. WebUI command line


def test_webui_args_fix_the_model_and_disable_everything_interactive() -> None:
    args = webui_args(make_spec(checkpoint=hf("my ckpt+v2.safetensors"), webui={"port": 9000}))
    for flag in (
        "--api",
        "--nowebui",
        "--listen",
        "--freeze-settings",
        "--no-download-sd-model",
        "--skip-prepare-environment",
        "--skip-install",
    ):
        assert flag in args
    assert after(args, "--port") == "9000"
    assert after(args, "--ckpt") == "/models/Stable-diffusion/my ckpt+v2.safetensors"
    assert args.count("--ckpt") == 1


def test_default_port_is_used_when_unset() -> None:
    assert after(webui_args(make_spec()), "--port") == "7861"


@pytest.mark.parametrize(
    ("attention", "flag", "absent"),
    [
        ("auto", "--xformers", "--opt-sdp-attention"),
        ("xformers", "--xformers", "--opt-sdp-attention"),
        ("sdp", "--opt-sdp-attention", "--xformers"),
    ],
)
def test_attention_flags(attention: str, flag: str, absent: str) -> None:
    assert attention_flag(Attention(attention)) == flag
    args = webui_args(make_spec(webui={"attention": attention}))
    assert flag in args
    assert absent not in args


@pytest.mark.parametrize(
    ("family", "setting", "expected"),
    [
        ("sdxl", None, True),
        ("sd15", None, False),
        ("sd2", None, False),
        ("sd3", None, False),
        ("sd15", True, True),
        ("sdxl", False, False),
        ("sdxl", True, True),
        ("sd15", False, False),
    ],
)
def test_no_half_vae(family: str, setting: bool | None, expected: bool) -> None:
    spec = make_spec(family, webui={} if setting is None else {"noHalfVAE": setting})
    assert no_half_vae(spec) is expected
    assert ("--no-half-vae" in webui_args(spec)) is expected


def test_vae_path_only_with_a_vae() -> None:
    assert "--vae-path" not in webui_args(make_spec())
    args = webui_args(make_spec(vae=hf("sdxl_vae.safetensors")))
    assert after(args, "--vae-path") == "/models/VAE/sdxl_vae.safetensors"


def test_api_auth_refers_to_the_env_var_and_never_names_the_secret() -> None:
    spec = make_spec(webui={"apiAuthSecret": {"name": "webui-credentials", "key": "auth-pair"}})
    args = webui_args(spec)
    assert after(args, "--api-auth") == "$(SD_API_AUTH)"
    assert not any("webui-credentials" in a or "auth-pair" in a for a in args)
    assert "--api-auth" not in webui_args(make_spec())
    env = container(spec, "webui")["env"]
    assert env == [
        {"name": "SD_API_AUTH", "valueFrom": {"secretKeyRef": {"name": "webui-credentials", "key": "auth-pair"}}}
    ]


def test_extra_args_come_last_in_their_order() -> None:
    extra = ["--no-half", "--opt-channelslast", "--cors-allow-origins=https://x.example"]
    spec = make_spec(
        "sdxl",
        gpu={"memoryGiB": 8},
        webui={"extraArgs": extra, "apiAuthSecret": {"name": "a", "key": "b"}},
        vae=hf("v.safetensors"),
    )
    args = webui_args(spec)
    assert args[-3:] == extra
    # The operator's own flags all come before them.
    assert args.index("--api-auth") < args.index("--no-half")
    assert args.index("--medvram-sdxl") < args.index("--no-half")


# ---------------------------------------------------------------------------------------------
# 3. Deployment


def test_gpu_limit_uses_the_resource_name_and_count() -> None:
    spec = make_spec(gpu={"resourceName": "nvidia.com/mig-1g.10gb", "count": 2})
    limits = container(spec, "webui")["resources"]["limits"]
    assert limits["nvidia.com/mig-1g.10gb"] == 2
    assert "nvidia.com/gpu" not in limits
    assert container(make_spec(), "webui")["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_user_resources_are_kept_beside_the_gpu_limit() -> None:
    spec = make_spec(resources={"requests": {"cpu": "4"}, "limits": {"memory": "24Gi"}})
    resources = container(spec, "webui")["resources"]
    assert resources["requests"]["cpu"] == "4"
    assert resources["limits"] == {"memory": "24Gi", "nvidia.com/gpu": 1}


def test_default_gpu_toleration_and_user_tolerations() -> None:
    default = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert pod_spec(make_spec())["tolerations"] == [default]
    user = {"key": "dedicated", "operator": "Equal", "value": "sd", "effect": "NoExecute", "tolerationSeconds": 60}
    tolerations = pod_spec(make_spec(scheduling={"tolerations": [user]}))["tolerations"]
    assert default in tolerations
    assert user in tolerations
    assert len(tolerations) == 2


def test_gpu_product_node_selector_is_merged_with_the_users() -> None:
    assert "nodeSelector" not in pod_spec(make_spec())
    spec = make_spec(gpu={"product": "NVIDIA-GeForce-RTX-4090"}, scheduling={"nodeSelector": {"zone": "a"}})
    assert pod_spec(spec)["nodeSelector"] == {"zone": "a", "nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090"}
    only_user = make_spec(scheduling={"nodeSelector": {"zone": "b"}})
    assert pod_spec(only_user)["nodeSelector"] == {"zone": "b"}


def memory_requirement(gib: int) -> dict[str, Any]:
    return {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": [str(gib * 1000 - 1)]}


def test_match_memory_without_user_affinity_adds_one_term() -> None:
    affinity = pod_spec(make_spec(gpu={"memoryGiB": 24, "matchMemory": True}))["affinity"]
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [memory_requirement(24)]}]
    assert memory_requirement(24)["values"] == ["23999"]


def test_no_affinity_without_match_memory() -> None:
    assert "affinity" not in pod_spec(make_spec(gpu={"memoryGiB": 24}))
    assert "affinity" not in pod_spec(make_spec(gpu={"memoryGiB": 24, "matchMemory": False}))


def test_match_memory_is_anded_into_every_user_term_without_mutating_the_spec() -> None:
    zone_a = {"key": "zone", "operator": "In", "values": ["a"]}
    pool = {"key": "pool", "operator": "In", "values": ["gpu"]}
    user_affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [zone_a]},
                    {
                        "matchExpressions": [pool],
                        "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}],
                    },
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]},
                ]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 10, "preference": {"matchExpressions": [zone_a]}}
            ],
        },
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []},
    }
    spec = make_spec(gpu={"memoryGiB": 16, "matchMemory": True}, scheduling={"affinity": user_affinity})
    before = copy.deepcopy(spec.scheduling.affinity)
    affinity = pod_spec(spec)["affinity"]
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert len(terms) == 3
    for term in terms:
        assert memory_requirement(16) in term["matchExpressions"]
    assert terms[0]["matchExpressions"] == [zone_a, memory_requirement(16)]
    assert terms[1]["matchExpressions"] == [pool, memory_requirement(16)]
    assert (
        terms[1]["matchFields"]
        == user_affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][1][
            "matchFields"
        ]
    )
    assert terms[2]["matchExpressions"] == [memory_requirement(16)]
    assert "matchFields" in terms[2]
    # The rest of the user's affinity is kept, and the spec's own object is untouched.
    assert affinity["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == [
        {"weight": 10, "preference": {"matchExpressions": [zone_a]}}
    ]
    assert affinity["podAntiAffinity"] == user_affinity["podAntiAffinity"]
    assert spec.scheduling.affinity == before
    # Rendering twice does not accumulate requirements.
    again = pod_spec(spec)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert again["nodeSelectorTerms"][0]["matchExpressions"] == [zone_a, memory_requirement(16)]


def test_priority_and_runtime_class_pass_through() -> None:
    assert "priorityClassName" not in pod_spec(make_spec())
    assert "runtimeClassName" not in pod_spec(make_spec())
    spec = make_spec(scheduling={"priorityClassName": "gpu-high", "runtimeClassName": "nvidia"})
    pod = pod_spec(spec)
    assert pod["priorityClassName"] == "gpu-high"
    assert pod["runtimeClassName"] == "nvidia"


def test_rolling_update_never_surges() -> None:
    strategy = deployment(make_spec(replicas=3))["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxSurge"] == 0
    assert strategy["rollingUpdate"]["maxUnavailable"] >= 1
    assert deployment(make_spec(replicas=3))["spec"]["replicas"] == 3


def test_probes_allow_a_long_model_load_and_tolerate_a_busy_server() -> None:
    webui = container(make_spec(), "webui")
    startup, ready, live = webui["startupProbe"], webui["readinessProbe"], webui["livenessProbe"]
    assert startup["httpGet"]["path"] == "/sd-operator/ready"
    assert ready["httpGet"]["path"] == "/sd-operator/ready"
    assert live["httpGet"]["path"] == "/sd-operator/live"
    for probe in (startup, ready, live):
        assert probe["httpGet"]["port"] == "http"
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 1800
    assert live["failureThreshold"] * live["periodSeconds"] >= 120
    assert webui["ports"] == [{"name": "http", "containerPort": 7861, "protocol": "TCP"}]


def test_security_contexts_are_restricted() -> None:
    pod = pod_spec(make_spec())
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for c in pod["initContainers"] + pod["containers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
        assert not sc.get("privileged"), c["name"]


def test_fetch_init_container_runs_the_operator_image() -> None:
    pod = pod_spec(make_spec())
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-model"]
    fetcher = pod["initContainers"][0]
    assert fetcher["image"] == "registry.example/sd-operator:9.9.9"
    command = fetcher["command"]
    assert command[:2] == ["sd-operator", "fetch-model"]
    assert after(command, "--models-dir") == "/models"
    manifest_path = after(command, "--manifest")
    # The manifest file is the ConfigMap key, in the mounted config directory.
    config_mount = next(m for m in fetcher["volumeMounts"] if m["name"] == "config")
    assert manifest_path == f"{config_mount['mountPath']}/models.json"
    assert volume(pod, "config") == {"name": "config", "configMap": {"name": "demo-webui"}}
    assert "models.json" in render_configmap(make_owner(), make_spec(), SETTINGS)["data"]


def test_image_settings() -> None:
    spec = make_spec(webui={"image": "registry.example/webui:1.2.3", "imagePullPolicy": "Always"})
    webui = container(spec, "webui")
    assert webui["image"] == "registry.example/webui:1.2.3"
    assert webui["imagePullPolicy"] == "Always"
    pulls = RenderSettings(image_pull_secrets=("regcred",))
    assert render_deployment(make_owner(), spec, pulls)["spec"]["template"]["spec"]["imagePullSecrets"] == [
        {"name": "regcred"}
    ]


def secrets_spec() -> SDInstanceSpec:
    return make_spec(
        checkpoint={
            "name": "ckpt.safetensors",
            "source": {
                "huggingFace": {
                    "repo": "owner/gated",
                    "file": "ckpt.safetensors",
                    "tokenSecret": {"name": "hf-token", "key": "token"},
                }
            },
        },
        vae={
            "name": "vae.safetensors",
            "source": {
                "http": {
                    "url": "https://files.example/vae.safetensors",
                    "authSecret": {"name": "http-auth", "key": "bearer"},
                }
            },
        },
        loras=[
            {
                "name": "style.safetensors",
                "source": {
                    "s3": {"bucket": "loras", "key": "style.safetensors", "credentialsSecret": {"name": "s3-creds"}}
                },
            }
        ],
    )


def test_secrets_become_secret_key_ref_env_vars_named_by_the_manifest() -> None:
    spec = secrets_spec()
    env = container(spec, "fetch-model")["env"]
    assert all("value" not in e and set(e["valueFrom"]) == {"secretKeyRef"} for e in env)
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env}
    assert sorted(refs.values(), key=lambda r: (r["name"], r["key"])) == [
        {"name": "hf-token", "key": "token"},
        {"name": "http-auth", "key": "bearer"},
        {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"},
        {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"},
    ]
    files = {f["name"]: f for f in manifest_files(spec)}
    hf_header = files["ckpt.safetensors"]["headers"]["Authorization"]
    assert hf_header["prefix"] == "Bearer "
    assert refs[hf_header["env"]] == {"name": "hf-token", "key": "token"}
    http_header = files["vae.safetensors"]["headers"]["Authorization"]
    assert http_header["prefix"] == "Bearer "
    assert refs[http_header["env"]] == {"name": "http-auth", "key": "bearer"}
    s3 = files["style.safetensors"]["s3"]
    assert refs[s3["accessKeyEnv"]] == {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
    assert refs[s3["secretKeyEnv"]] == {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    # Every env var the manifest names is provided; the readable ConfigMap names no Secret.
    manifest_text = render_configmap(make_owner(), spec, SETTINGS)["data"]["models.json"]
    assert set(parse_manifest(manifest_text).secret_envs()) == set(refs)
    for secret in ("hf-token", "http-auth", "s3-creds"):
        assert secret not in manifest_text
    # The WebUI container gets none of the fetch secrets.
    assert container(spec, "webui")["env"] == []


def test_fetch_manifest_returns_the_same_env_as_the_deployment() -> None:
    spec = secrets_spec()
    _, env = fetch_manifest(spec, SETTINGS)
    assert env == container(spec, "fetch-model")["env"]


def test_default_storage_is_a_64gi_empty_dir() -> None:
    pod = pod_spec(make_spec())
    assert volume(pod, "models") == {"name": "models", "emptyDir": {"sizeLimit": "64Gi"}}
    mounts = [m for c in pod["initContainers"] + pod["containers"] for m in c["volumeMounts"] if m["name"] == "models"]
    assert len(mounts) == 2
    assert all(m["mountPath"] == "/models" and "subPath" not in m for m in mounts)


def test_ephemeral_size_is_honoured() -> None:
    pod = pod_spec(make_spec(storage={"ephemeral": {"size": "20Gi"}}))
    assert volume(pod, "models")["emptyDir"] == {"sizeLimit": "20Gi"}


def test_pvc_storage_mounts_the_claim_with_the_path_as_sub_path() -> None:
    pod = pod_spec(make_spec(storage={"pvc": {"claimName": "model-cache", "path": "models/sd"}}))
    assert volume(pod, "models") == {"name": "models", "persistentVolumeClaim": {"claimName": "model-cache"}}
    fetch_mount = next(m for m in pod["initContainers"][0]["volumeMounts"] if m["name"] == "models")
    webui_mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models")
    assert fetch_mount["subPath"] == webui_mount["subPath"] == "models/sd"
    assert fetch_mount["mountPath"] == webui_mount["mountPath"] == "/models"
    assert not fetch_mount.get("readOnly")  # the fetcher writes the cache
    assert webui_mount["readOnly"] is True
    assert "emptyDir" not in volume(pod, "models")


def test_pvc_model_source_is_mounted_read_only_and_the_manifest_points_under_it() -> None:
    checkpoint = {
        "name": "ckpt.safetensors",
        "source": {"pvc": {"claimName": "shared-models", "path": "sd/ckpt.safetensors"}},
    }
    spec = make_spec(checkpoint=checkpoint)
    pod = pod_spec(spec)
    claim_volumes = [
        v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "shared-models"
    ]
    assert len(claim_volumes) == 1
    vol = claim_volumes[0]
    assert vol["persistentVolumeClaim"]["readOnly"] is True
    fetcher = pod["initContainers"][0]
    mount = next(m for m in fetcher["volumeMounts"] if m["name"] == vol["name"])
    assert mount["readOnly"] is True
    # The WebUI never sees the source claim.
    assert all(m["name"] != vol["name"] for m in pod["containers"][0]["volumeMounts"])
    path = manifest_files(spec)[0]["path"]
    assert path == f"{mount['mountPath']}/sd/ckpt.safetensors"


def test_children_are_owned_by_the_instance() -> None:
    for child in render_all(make_owner(), make_spec(), SETTINGS):
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref["controller"] is True, child["kind"]
        assert ref["uid"] == UID
        assert ref["kind"] == "SDInstance"
        assert ref["name"] == "demo"
        assert ref["apiVersion"] == "sd-operator.dev/v1alpha1"
        assert child["metadata"]["namespace"] == "team-a"
        assert child["metadata"]["name"] == "demo-webui"


def test_render_all_applies_the_config_map_first() -> None:
    kinds = [c["kind"] for c in render_all(make_owner(), make_spec(), SETTINGS)]
    assert kinds == ["ConfigMap", "Service", "NetworkPolicy", "Deployment"]


def test_tracking_labels_are_not_copied_to_children() -> None:
    owner = make_owner(
        labels={
            "team": "vision",
            "cost-center": "42",
            "app.kubernetes.io/instance": "argo-app",
            "argocd.argoproj.io/instance": "argo-app",
            "argocd.argoproj.io/secret-type": "x",
        }
    )
    for child in render_all(owner, make_spec(), SETTINGS):
        labels = child["metadata"]["labels"]
        assert labels["team"] == "vision", child["kind"]
        assert labels["cost-center"] == "42"
        assert "app.kubernetes.io/instance" not in labels
        assert not [k for k in labels if k.startswith("argocd.argoproj.io/")]
    template_labels = render_deployment(owner, make_spec(), SETTINGS)["spec"]["template"]["metadata"]["labels"]
    assert template_labels["team"] == "vision"
    assert "app.kubernetes.io/instance" not in template_labels


def test_pod_template_labels_match_the_selector() -> None:
    dep = render_deployment(
        make_owner(), make_spec(), RenderSettings(extra_pod_labels={"sidecar.istio.io/inject": "false"})
    )
    selector = dep["spec"]["selector"]["matchLabels"]
    template_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()
    assert template_labels["sidecar.istio.io/inject"] == "false"


def test_config_hash_rolls_pods_on_a_model_change_only() -> None:
    base = make_spec(checkpoint=hf("ckpt.safetensors", sha256="a" * 64))
    same = make_spec(checkpoint=hf("ckpt.safetensors", sha256="a" * 64))
    other_sha = make_spec(checkpoint=hf("ckpt.safetensors", sha256="b" * 64))
    assert config_hash(base) == config_hash(same)
    assert config_hash(base) != config_hash(other_sha)
    assert config_hash(base) != config_hash(make_spec(checkpoint=hf("other.safetensors", sha256="a" * 64)))
    # Scaling or scheduling changes are not model changes.
    scaled = make_spec(checkpoint=hf("ckpt.safetensors", sha256="a" * 64), replicas=4)
    assert config_hash(base) == config_hash(scaled)
    moved = make_spec(checkpoint=hf("ckpt.safetensors", sha256="a" * 64), scheduling={"priorityClassName": "gpu-high"})
    assert config_hash(base) == config_hash(moved)
    # The same model under another name hashes the same (nothing instance-specific in it).
    other_owner = deployment(base, make_owner(name="other", namespace="team-b"))
    assert other_owner["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] == config_hash(base)


def test_model_annotations_name_the_checkpoint() -> None:
    dep = deployment(make_spec(checkpoint=hf("ckpt.safetensors")))
    assert dep["metadata"]["annotations"]["sd-operator.dev/model-name"] == "ckpt.safetensors"
    assert dep["spec"]["template"]["metadata"]["annotations"]["sd-operator.dev/model-name"] == "ckpt.safetensors"


# ---------------------------------------------------------------------------------------------
# 4. Fetch manifest and ConfigMap


def test_hugging_face_url() -> None:
    (entry,) = manifest_files(make_spec(checkpoint=hf("ckpt.safetensors")))
    assert entry["url"] == "https://huggingface.co/owner/repo/resolve/main/ckpt.safetensors"
    assert "headers" not in entry


def test_hugging_face_custom_endpoint_revision_and_quoted_path() -> None:
    checkpoint = {
        "name": "my model.safetensors",
        "source": {
            "huggingFace": {
                "repo": "owner/repo",
                "file": "sub dir/my model+v2.safetensors",
                "revision": "v1.0",
                "endpoint": "https://hf-mirror.example.com/",
                "tokenSecret": {"name": "hf", "key": "token"},
            }
        },
    }
    (entry,) = manifest_files(make_spec(checkpoint=checkpoint))
    assert entry["url"] == "https://hf-mirror.example.com/owner/repo/resolve/v1.0/sub%20dir/my%20model%2Bv2.safetensors"
    assert entry["headers"] == {"Authorization": {"env": entry["headers"]["Authorization"]["env"], "prefix": "Bearer "}}
    assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", entry["headers"]["Authorization"]["env"])


MIRROR = "http://models.mirror.internal:8080/hf"


def test_hugging_face_sources_without_an_endpoint_use_the_operators_mirror() -> None:
    spec = make_spec(checkpoint=hf("ckpt.safetensors"), vae=hf("vae.safetensors"), loras=[hf("l.safetensors")])
    mirrored = RenderSettings(hf_endpoint=MIRROR)
    manifest, _ = fetch_manifest(spec, mirrored)
    urls = [f["url"] for f in manifest["files"]]
    assert urls == [
        f"{MIRROR}/owner/repo/resolve/main/{n}" for n in ("ckpt.safetensors", "vae.safetensors", "l.safetensors")
    ]
    # The ConfigMap the fetcher reads and the Deployment's config hash follow the same setting.
    data = render_configmap(make_owner(), spec, mirrored)["data"]["models.json"]
    assert [f.url for f in parse_manifest(data).files] == urls
    hashes = {
        render_deployment(make_owner(), spec, s)["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        for s in (SETTINGS, mirrored)
    }
    assert len(hashes) == 2  # a new mirror rolls the pods, so their init container fetches from it


def test_a_sources_own_endpoint_wins_over_the_operators_mirror() -> None:
    own = hf("ckpt.safetensors")
    own["source"]["huggingFace"]["endpoint"] = "https://hf-mirror.example.com/"
    manifest, _ = fetch_manifest(
        make_spec(checkpoint=own, vae=hf("vae.safetensors")), RenderSettings(hf_endpoint=MIRROR)
    )
    assert [f["url"] for f in manifest["files"]] == [
        "https://hf-mirror.example.com/owner/repo/resolve/main/ckpt.safetensors",
        f"{MIRROR}/owner/repo/resolve/main/vae.safetensors",
    ]
    http = {"name": "x.safetensors", "source": {"http": {"url": "https://h.example/x.safetensors"}}}
    manifest, _ = fetch_manifest(make_spec(checkpoint=http), RenderSettings(hf_endpoint=MIRROR))
    assert manifest["files"][0]["url"] == "https://h.example/x.safetensors"  # only huggingFace sources move


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    operator_settings.cache_clear()
    yield
    operator_settings.cache_clear()


@pytest.mark.usefixtures("fresh_settings")
def test_sd_hf_endpoint_reaches_the_controllers_render_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SD_HF_ENDPOINT", raising=False)
    assert operator_settings().hf_endpoint == "https://huggingface.co"
    assert render_settings().hf_endpoint == RenderSettings().hf_endpoint == "https://huggingface.co"
    operator_settings.cache_clear()
    monkeypatch.setenv("SD_HF_ENDPOINT", MIRROR + "/")
    assert operator_settings().hf_endpoint == MIRROR  # the trailing slash goes
    (entry,) = fetch_manifest(make_spec(checkpoint=hf("ckpt.safetensors")), render_settings())[0]["files"]
    assert entry["url"] == f"{MIRROR}/owner/repo/resolve/main/ckpt.safetensors"


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_sd_hf_endpoint_means_hugging_face(value: str) -> None:
    assert parse_hf_endpoint(value) == parse_hf_endpoint(None) == "https://huggingface.co"


@pytest.mark.usefixtures("fresh_settings")
@pytest.mark.parametrize("value", ["huggingface.co", "ftp://mirror/hf", "https://", "https://mirror example/hf"])
def test_a_bad_sd_hf_endpoint_is_refused_naming_the_variable(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_HF_ENDPOINT", value)
    with pytest.raises(SettingsError) as err:
        operator_settings()
    assert str(err.value) == f"SD_HF_ENDPOINT must be an http:// or https:// URL, got {value!r}"


def test_sha256_lowercased_and_pickle_permission_carried() -> None:
    spec = make_spec(
        checkpoint=hf("ckpt.ckpt", sha256=SHA, allowUnsafePickle=True),
        vae=hf("vae.safetensors"),
    )
    files = {f["name"]: f for f in manifest_files(spec)}
    assert files["ckpt.ckpt"]["sha256"] == SHA.lower()
    assert files["ckpt.ckpt"]["allowUnsafePickle"] is True
    assert files["vae.safetensors"]["sha256"] is None
    assert files["vae.safetensors"]["allowUnsafePickle"] is False
    parsed = parse_manifest(render_configmap(make_owner(), spec, SETTINGS)["data"]["models.json"])
    assert parsed.files[0].allow_unsafe_pickle is True
    assert parsed.files[0].sha256 == SHA.lower()


def test_subdirs_per_kind() -> None:
    spec = make_spec(
        checkpoint=hf("c.safetensors"),
        vae=hf("v.safetensors"),
        loras=[hf("l1.safetensors"), hf("l2.safetensors")],
        controlNets=[hf("cn.safetensors")],
        embeddings=[hf("e.safetensors")],
    )
    subdirs = {f["name"]: f["subdir"] for f in manifest_files(spec)}
    assert subdirs == {
        "c.safetensors": "Stable-diffusion",
        "v.safetensors": "VAE",
        "l1.safetensors": "Lora",
        "l2.safetensors": "Lora",
        "cn.safetensors": "ControlNet",
        "e.safetensors": "embeddings",
    }


def test_http_and_s3_sources() -> None:
    spec = make_spec(
        checkpoint={"name": "c.safetensors", "source": {"http": {"url": "https://files.example/c.safetensors"}}},
        loras=[
            {
                "name": "l.safetensors",
                "source": {
                    "s3": {"bucket": "b-1", "key": "k/l.safetensors", "endpoint": "http://minio:9000", "region": "eu"}
                },
            }
        ],
    )
    files = {f["name"]: f for f in manifest_files(spec)}
    assert files["c.safetensors"]["url"] == "https://files.example/c.safetensors"
    assert "headers" not in files["c.safetensors"]
    assert files["l.safetensors"]["s3"] == {
        "bucket": "b-1",
        "key": "k/l.safetensors",
        "endpoint": "http://minio:9000",
        "region": "eu",
    }
    assert container(spec, "fetch-model")["env"] == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_manifests_parse(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    spec = SDInstanceSpec.model_validate(doc["spec"])
    owner = {**doc, "metadata": {**doc["metadata"], "namespace": "default", "uid": UID}}
    children = render_all(owner, spec, SETTINGS)
    configmap = children[0]
    manifest = parse_manifest(configmap["data"]["models.json"], path.name)
    names = [f.name for f in manifest.files]
    assert names[0] == spec.model.checkpoint.name
    assert manifest.files[0].subdir == "Stable-diffusion"
    assert len(manifest.files) == 1 + bool(spec.model.vae) + len(spec.model.control_nets or []) + len(
        spec.model.loras or []
    ) + len(spec.model.embeddings or [])
    settings = json.loads(configmap["data"]["webui-config.json"])
    assert settings["sd_model_checkpoint"] == spec.model.checkpoint.name
    assert settings["sd_checkpoints_limit"] == 1


def test_sdxl_example_renders_its_declared_choices() -> None:
    doc = yaml.safe_load((ROOT / "examples/sdinstance-sdxl-base.yaml").read_text())
    spec = SDInstanceSpec.model_validate(doc["spec"])
    args = webui_args(spec)
    assert "--no-half-vae" in args
    assert not [a for a in args if a in VRAM_FLAGS]  # 24 GiB
    assert pod_spec(spec)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090"}


def test_webui_settings_keep_one_checkpoint() -> None:
    settings = webui_settings(make_spec(checkpoint=hf("ckpt.safetensors"), vae=hf("v.safetensors")))
    assert settings["sd_model_checkpoint"] == "ckpt.safetensors"
    assert settings["sd_checkpoints_limit"] == 1
    assert settings["sd_vae"] == "v.safetensors"
    assert webui_settings(make_spec())["sd_vae"] == "Automatic"
    data = render_configmap(make_owner(), make_spec(checkpoint=hf("ckpt.safetensors")), SETTINGS)["data"]
    assert json.loads(data["webui-config.json"])["sd_model_checkpoint"] == "ckpt.safetensors"


# ---------------------------------------------------------------------------------------------
# 5. Service and NetworkPolicy


def test_service_selects_the_deployment_pods() -> None:
    spec = make_spec(checkpoint=hf("ckpt.safetensors"), webui={"port": 8080})
    service = render_service(make_owner(), spec)
    dep = deployment(spec)
    assert service["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    assert service["metadata"]["labels"]["sd-operator.dev/model"] == "ckpt.safetensors"
    # Headless: the gateway routes to the pods of the EndpointSlices itself; no virtual IP to allocate.
    assert (service["spec"]["type"], service["spec"]["clusterIP"]) == ("ClusterIP", "None")


def test_service_model_label_is_label_safe() -> None:
    spec = make_spec(checkpoint=hf("my model+v2.safetensors"))
    label = render_service(make_owner(), spec)["metadata"]["labels"]["sd-operator.dev/model"]
    assert label == label_value("my model+v2.safetensors")
    assert re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?", label)
    assert " " not in label and "+" not in label


LABEL_RE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?")


@pytest.mark.parametrize(
    "text",
    [
        "my model+v2.safetensors",
        "  spaced  out  ",
        "__leading_and_trailing__.safetensors.",
        "x" * 63,
        "a" * 100 + ".safetensors",
        "Realistic Vision + Detail Tweaker " * 3,
    ],
)
def test_label_value_is_always_a_valid_label(text: str) -> None:
    value = label_value(text)
    assert len(value) <= 63
    assert LABEL_RE.fullmatch(value), value


def test_label_value_keeps_short_names_recognisable() -> None:
    assert label_value("my model+v2.safetensors") == "my_model_v2.safetensors"
    assert label_value("sd_xl_base_1.0.safetensors") == "sd_xl_base_1.0.safetensors"
    assert label_value("x" * 63) == "x" * 63


def test_long_label_values_get_a_unique_suffix() -> None:
    prefix = "a_very_long_checkpoint_name_that_goes_on_and_on_and_on_and_on_"
    one, two = label_value(prefix + "v1.safetensors"), label_value(prefix + "v2.safetensors")
    assert len(prefix) > 54
    assert len(one) <= 63 and len(two) <= 63
    assert one != two
    assert one.startswith(prefix[:40])
    assert label_value(prefix + "v1.safetensors") == one  # stable


def test_network_policy_admits_only_labelled_clients_on_the_webui_port() -> None:
    spec = make_spec(webui={"port": 9001})
    policy = render_network_policy(make_owner(), spec)
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment(spec)["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"sd-operator.dev/webui-client": "true"}}}
    ]
    assert rule["ports"] == [{"port": 9001, "protocol": "TCP"}]


def test_endpoint_and_gpu_summary() -> None:
    spec = make_spec(webui={"port": 7000}, gpu={"count": 2, "product": "NVIDIA-L4", "memoryGiB": 24})
    assert endpoint("demo", "team-a", spec) == "http://demo-webui.team-a.svc:7000"
    assert gpu_summary(spec) == "2x NVIDIA-L4 (24GiB)"
    assert gpu_summary(make_spec(gpu={"resourceName": "nvidia.com/mig-1g.10gb"})) == "1x nvidia.com/mig-1g.10gb"


def test_webui_drains_before_it_stops() -> None:
    # preStop runs before SIGTERM, inside terminationGracePeriodSeconds: the drain route answers once no
    # generation runs or is queued, and gives up (DRAIN_TIMEOUT, the extension's and the emulator's
    # default) early enough for the WebUI to stop on SIGTERM before the grace period ends.
    spec = make_spec(webui={"port": 9001})
    webui, pod = container(spec, "webui"), pod_spec(spec)
    assert DRAIN_PATH == "/sd-operator/drain"
    assert webui["lifecycle"] == {"preStop": {"httpGet": {"path": DRAIN_PATH, "port": "http"}}}
    assert {"name": "http", "containerPort": 9001, "protocol": "TCP"} in webui["ports"]
    assert pod["terminationGracePeriodSeconds"] >= DRAIN_TIMEOUT + 5
    assert "lifecycle" not in container(spec, "fetch-model")
