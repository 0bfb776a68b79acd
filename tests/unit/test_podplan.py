"""The pure parts of the local pod runner (tools/cluster/podplan.py), against the kubelet's rules:
`$(VAR)` expansion, the container environment, images to local programs, argv from command/args,
termination messages, pod conditions and probe addresses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import podplan
from podplan import (
    PodError,
    Program,
    condition,
    container_argv,
    container_env,
    expand,
    field_ref,
    gpu_profile,
    image_program,
    probe_address,
    repository,
    termination_message,
)

ROOT = Path(__file__).resolve().parents[2]
IMAGES_YAML = ROOT / "tools" / "cluster" / "images.yaml"

POD: dict[str, Any] = {
    "metadata": {
        "name": "sd-a-0",
        "namespace": "team-a",
        "uid": "0b5e-uid",
        "labels": {"app": "webui", "sd-operator.dev/instance": "a"},
        "annotations": {"note": "hello world"},
    },
    "spec": {"nodeName": "gpu-node-1", "serviceAccountName": "sd-webui"},
    "status": {"podIP": "10.244.0.7", "hostIP": "127.0.0.1"},
}


def store(**objects: dict[str, str]) -> Any:
    """A lookup over `kind/namespace/name` keys (e.g. `configmap__team-a__cfg`); records each call."""
    calls: list[tuple[str, str, str]] = []

    def lookup(kind: str, namespace: str, name: str) -> dict[str, str] | None:
        calls.append((kind, namespace, name))
        return objects.get(f"{kind}__{namespace}__{name}")

    lookup.calls = calls  # type: ignore[attr-defined]
    return lookup


NOTHING = store()


# -- expand ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("$(A)", "alpha"),
        ("x$(A)y$(B)z", "xalphaybetaz"),
        ("$(A)$(A)", "alphaalpha"),
        ("$(MISSING)", "$(MISSING)"),  # undefined: left as written
        ("pre-$(MISSING)-$(A)", "pre-$(MISSING)-alpha"),
        ("$$", "$"),
        ("$$$$", "$$"),
        ("$$(A)", "$(A)"),  # escaped: the literal reference, not its value
        ("$$$(A)", "$alpha"),  # an escaped $ followed by a reference
        ("$(A", "$(A"),  # unterminated: literal
        ("$A", "$A"),  # shell syntax is not Kubernetes syntax
        ("${A}", "${A}"),
        ("cost: $5", "cost: $5"),
        ("trailing $", "trailing $"),
        ("$()", "$()"),
        ("$(DOT.NAME)-$(dash-name)", "dotted-dashed"),
        ("$(EMPTY)|", "|"),  # defined as empty: replaced by nothing
        ("", ""),
    ],
)
def test_expand(value: str, expected: str) -> None:
    env = {"A": "alpha", "B": "beta", "DOT.NAME": "dotted", "dash-name": "dashed", "EMPTY": ""}
    assert expand(value, env) == expected


def test_expand_is_single_pass() -> None:
    # A value that itself looks like a reference is not expanded again (nor is an escape re-read).
    env = {"A": "$(B)", "B": "beta", "C": "$$"}
    assert expand("$(A)", env) == "$(B)"
    assert expand("$(C)", env) == "$$"


# -- field_ref ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("metadata.name", "sd-a-0"),
        ("metadata.namespace", "team-a"),
        ("metadata.uid", "0b5e-uid"),
        ("spec.nodeName", "gpu-node-1"),
        ("spec.serviceAccountName", "sd-webui"),
        ("status.podIP", "10.244.0.7"),
        ("status.hostIP", "127.0.0.1"),
        ("metadata.labels['app']", "webui"),
        ("metadata.labels['sd-operator.dev/instance']", "a"),
        ("metadata.labels['absent']", ""),
        ("metadata.annotations['note']", "hello world"),
        ("metadata.labels", 'app="webui"\nsd-operator.dev/instance="a"'),  # sorted, key="value" lines
        ("metadata.annotations", 'note="hello world"'),
    ],
)
def test_field_ref(path: str, expected: str) -> None:
    assert field_ref(POD, path) == expected


def test_field_ref_of_a_pod_without_status_or_labels_is_empty() -> None:
    pod = {"metadata": {"name": "p", "namespace": "ns"}, "spec": {}, "status": None}
    assert field_ref(pod, "status.podIP") == ""
    assert field_ref(pod, "spec.nodeName") == ""
    assert field_ref(pod, "metadata.labels") == ""
    assert field_ref(pod, "metadata.labels['app']") == ""


def test_field_ref_unsupported_path() -> None:
    with pytest.raises(PodError, match=r"unsupported fieldRef 'spec\.containers'") as e:
        field_ref(POD, "spec.containers")
    assert e.value.reason == "CreateContainerConfigError"


# -- container_env -----------------------------------------------------------------------------


def test_env_values_are_expanded_in_order() -> None:
    container = {
        "env": [
            {"name": "FIRST", "value": "one"},
            {"name": "SECOND", "value": "$(FIRST)-two-$(THIRD)"},  # THIRD is defined later: stays
            {"name": "THIRD", "value": "three"},
            {"name": "FOURTH", "value": "$(FIRST)+$(THIRD)+$(BASE)"},
            {"name": "LITERAL", "value": "$$(FIRST)"},
            {"name": "NOVALUE"},
        ]
    }
    env = container_env(POD, container, NOTHING, {"BASE": "b"})
    assert env == {
        "BASE": "b",
        "FIRST": "one",
        "SECOND": "one-two-$(THIRD)",
        "THIRD": "three",
        "FOURTH": "one+three+b",
        "LITERAL": "$(FIRST)",
        "NOVALUE": "",
    }


def test_env_overrides_base_and_a_later_entry_wins() -> None:
    container = {
        "env": [
            {"name": "PATH", "value": "/opt/bin:$(PATH)"},
            {"name": "X", "value": "1"},
            {"name": "X", "value": "$(X)2"},
        ]
    }
    env = container_env(POD, container, NOTHING, {"PATH": "/usr/bin", "HOME": "/root"})
    assert env == {"PATH": "/opt/bin:/usr/bin", "HOME": "/root", "X": "12"}


def test_env_does_not_change_base() -> None:
    base = {"A": "1"}
    container_env(POD, {"env": [{"name": "A", "value": "2"}]}, NOTHING, base)
    assert base == {"A": "1"}


def test_env_field_refs() -> None:
    container = {
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "URL", "value": "http://$(POD_IP):7860/$(POD_NAME)"},
        ]
    }
    env = container_env(POD, container, NOTHING, {})
    assert env == {"POD_NAME": "sd-a-0", "POD_IP": "10.244.0.7", "APP": "webui", "URL": "http://10.244.0.7:7860/sd-a-0"}


def test_env_unsupported_field_ref_fails_the_container() -> None:
    container = {"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.phase"}}}]}
    with pytest.raises(PodError) as e:
        container_env(POD, container, NOTHING, {})
    assert e.value.reason == "CreateContainerConfigError"


def test_env_from_keys_of_configmaps_and_secrets_in_the_pods_namespace() -> None:
    lookup = store(**{"configmap__team-a__cfg": {"MODE": "fast"}, "secret__team-a__auth": {"TOKEN": "s3cret"}})
    container = {
        "env": [
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "MODE"}}},
            {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "auth", "key": "TOKEN"}}},
            {"name": "AUTH", "value": "Bearer $(API_TOKEN)"},
        ]
    }
    env = container_env(POD, container, lookup, {})
    assert env == {"MODE": "fast", "API_TOKEN": "s3cret", "AUTH": "Bearer s3cret"}
    assert lookup.calls == [("configmap", "team-a", "cfg"), ("secret", "team-a", "auth")]


def test_env_from_key_values_are_not_expanded() -> None:
    lookup = store(**{"configmap__team-a__cfg": {"V": "$(HOME)/x"}})
    container = {"env": [{"name": "V", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "V"}}}]}
    assert container_env(POD, container, lookup, {"HOME": "/root"})["V"] == "$(HOME)/x"


@pytest.mark.parametrize("kind", ["configMapKeyRef", "secretKeyRef"])
@pytest.mark.parametrize(
    "objects", [{}, {"configmap__team-a__ref": {"OTHER": "x"}, "secret__team-a__ref": {"OTHER": "x"}}]
)
def test_env_from_a_missing_object_or_key(kind: str, objects: dict[str, dict[str, str]]) -> None:
    lookup = store(**objects)
    required = {"env": [{"name": "V", "valueFrom": {kind: {"name": "ref", "key": "KEY"}}}]}
    with pytest.raises(PodError, match="'ref' has no key 'KEY'") as e:
        container_env(POD, required, lookup, {})
    assert e.value.reason == "CreateContainerConfigError"

    optional = {
        "env": [
            {"name": "V", "valueFrom": {kind: {"name": "ref", "key": "KEY", "optional": True}}},
            {"name": "W", "value": "[$(V)]"},  # an optional variable that is not set stays unexpanded
        ]
    }
    assert container_env(POD, optional, lookup, {"B": "1"}) == {"B": "1", "W": "[$(V)]"}


def test_env_from_optional_false_is_required() -> None:
    container = {"env": [{"name": "V", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k", "optional": False}}}]}
    with pytest.raises(PodError):
        container_env(POD, container, NOTHING, {})


def test_env_resource_field_ref() -> None:
    container = {
        "resources": {"limits": {"memory": "1073741824", "nvidia.com/gpu": 1}, "requests": {"cpu": "2"}},
        "env": [
            {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"containerName": "c", "resource": "requests.cpu"}}},
            {"name": "NONE", "valueFrom": {"resourceFieldRef": {"resource": "requests.memory"}}},
        ],
    }
    assert container_env(POD, container, NOTHING, {}) == {"MEM": "1073741824", "CPU": "2", "NONE": "0"}


def test_env_unsupported_value_from() -> None:
    container = {"env": [{"name": "X", "valueFrom": {"fileKeyRef": {"path": "a"}}}]}
    with pytest.raises(PodError, match=r"env X: unsupported valueFrom \['fileKeyRef'\]") as e:
        container_env(POD, container, NOTHING, {})
    assert e.value.reason == "CreateContainerConfigError"


def test_env_from_sources_with_prefix_then_env_overrides() -> None:
    lookup = store(
        **{
            "configmap__team-a__settings": {"MODE": "fast", "LEVEL": "3"},
            "secret__team-a__creds": {"USER": "u", "PASS": "p"},
            "configmap__team-a__late": {"MODE": "slow"},
        }
    )
    container = {
        "envFrom": [
            {"configMapRef": {"name": "settings"}},
            {"secretRef": {"name": "creds"}, "prefix": "DB_"},
            {"configMapRef": {"name": "late"}},  # a later source wins over an earlier one
        ],
        "env": [
            {"name": "LEVEL", "value": "$(LEVEL)0"},  # env wins over envFrom, and can use its values
            {"name": "DSN", "value": "$(DB_USER):$(DB_PASS)@db"},
        ],
    }
    env = container_env(POD, container, lookup, {"MODE": "base", "KEEP": "k"})
    assert env == {
        "MODE": "slow",
        "KEEP": "k",
        "LEVEL": "30",
        "DB_USER": "u",
        "DB_PASS": "p",
        "DSN": "u:p@db",
    }
    assert "USER" not in env
    assert lookup.calls == [
        ("configmap", "team-a", "settings"),
        ("secret", "team-a", "creds"),
        ("configmap", "team-a", "late"),
    ]


@pytest.mark.parametrize(("ref", "kind"), [("configMapRef", "configmap"), ("secretRef", "secret")])
def test_env_from_missing_source(ref: str, kind: str) -> None:
    with pytest.raises(PodError, match=f"{kind} 'gone' not found") as e:
        container_env(POD, {"envFrom": [{ref: {"name": "gone"}}]}, NOTHING, {})
    assert e.value.reason == "CreateContainerConfigError"

    lookup = store(**{"configmap__team-a__here": {"A": "1"}})
    container = {"envFrom": [{ref: {"name": "gone", "optional": True}}, {"configMapRef": {"name": "here"}}]}
    assert container_env(POD, container, lookup, {}) == {"A": "1"}


def test_env_of_a_container_without_env_is_the_base() -> None:
    assert container_env(POD, {"env": None, "envFrom": None}, NOTHING, {"A": "1"}) == {"A": "1"}
    assert container_env(POD, {}, NOTHING, {}) == {}


# -- images ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "repo"),
    [
        ("webui", "webui"),
        ("webui:0.1.0", "webui"),
        ("ghcr.io/sd-operator/webui:0.1.0", "webui"),
        ("ghcr.io/sd-operator/webui@sha256:" + "a" * 64, "webui"),
        ("ghcr.io/sd-operator/webui:0.1.0@sha256:" + "b" * 64, "webui"),
        ("localhost:5000/trainer", "trainer"),  # a registry port is not a tag
        ("localhost:5000/team/trainer:1.2@sha256:" + "c" * 64, "trainer"),
        ("docker.io/library/busybox:1.36", "busybox"),
    ],
)
def test_repository(image: str, repo: str) -> None:
    assert repository(image) == repo


TABLE = [
    {"repository": "tool", "entrypoint": ["{bin}/tool", "--at", "{pod_ip}"], "cmd": ["serve"], "env": {"T": "{repo}"}},
    {"repository": "bare"},
]
VALUES = {"bin": "/venv/bin", "pod_ip": "10.0.0.9", "repo": "/src"}


def test_image_program_fills_the_placeholders() -> None:
    program = image_program("registry.local/x/tool:2@sha256:" + "d" * 64, TABLE, VALUES)
    assert program == Program(entrypoint=["/venv/bin/tool", "--at", "10.0.0.9"], cmd=["serve"], env={"T": "/src"})
    assert image_program("bare:latest", TABLE, VALUES) == Program(entrypoint=[], cmd=[], env={})


def test_unknown_image_is_never_pulled() -> None:
    with pytest.raises(PodError, match=r"no program for image 'ghcr\.io/x/unknown:1'") as e:
        image_program("ghcr.io/x/unknown:1", TABLE, VALUES)
    assert e.value.reason == "ErrImageNeverPull"


@pytest.fixture(scope="module")
def images() -> list[dict[str, Any]]:
    return yaml.safe_load(IMAGES_YAML.read_text())["images"]


@pytest.fixture
def values() -> dict[str, Any]:
    return {
        "python": "/repo/.venv/bin/python",
        "bin": "/repo/.venv/bin",
        "repo": "/repo",
        "pod_ip": "10.244.1.5",
        "gpu_profile": "rtx4090",
        "emulator_time_scale": 0.05,
    }


def test_images_yaml_entries_all_fill(images: list[dict[str, Any]], values: dict[str, Any]) -> None:
    repos = [entry["repository"] for entry in images]
    assert len(repos) == len(set(repos))
    assert {"sd-operator", "webui", "trainer"} <= set(repos)
    for repo in repos:
        program = image_program(f"ghcr.io/sd-operator/{repo}:0.1.0", images, values)
        assert program.entrypoint, repo
        assert not any("{" in a for a in [*program.entrypoint, *program.cmd, *program.env.values()]), repo


def test_webui_image_runs_the_emulator_on_the_pods_address(
    images: list[dict[str, Any]], values: dict[str, Any]
) -> None:
    program = image_program("ghcr.io/sd-operator/webui:0.1.0@sha256:" + "e" * 64, images, values)
    emulator = ["/repo/.venv/bin/sd-operator", "emulator", "--host", "10.244.1.5", "--gpu-profile", "rtx4090"]
    assert program.entrypoint == [*emulator, "--speed", "0.05"]

    # The pod's args (the WebUI's command line) follow the entrypoint, replacing the image's CMD.
    container = {"args": ["--api", "--port", "$(PORT)", "--ckpt", "/models/$(MODEL)"]}
    argv = container_argv(container, program, {"PORT": "7860", "MODEL": "v1-5.safetensors"})
    assert argv == [*emulator, "--speed", "0.05", "--api", "--port", "7860", "--ckpt", "/models/v1-5.safetensors"]

    # Without args the image's CMD applies.
    assert container_argv({}, program, {}) == [*program.entrypoint, "--api", "--nowebui", "--listen", "--port", "7861"]


def test_trainer_image_env(images: list[dict[str, Any]], values: dict[str, Any]) -> None:
    program = image_program("ghcr.io/sd-operator/trainer:0.1.0", images, values)
    assert program.env["SD_SCRIPTS_DIR"] == "/repo/tests/fixtures/fake_sd_scripts"
    assert program.env["SD_TRAIN_LAUNCHER"] == "/repo/.venv/bin/python"
    assert program.entrypoint == ["/repo/.venv/bin/sd-operator"]
    assert program.cmd == ["train", "--help"]
    assert (ROOT / "tests" / "fixtures" / "fake_sd_scripts").is_dir()  # what the placeholder points at


def test_utility_images_run_the_machines_shell(images: list[dict[str, Any]], values: dict[str, Any]) -> None:
    busybox = image_program("busybox:1.36", images, values)
    assert busybox == Program(entrypoint=["sh"])
    argv = container_argv({"command": ["sh", "-c", "echo $(MSG) $$HOME"]}, busybox, {"MSG": "hi"})
    assert argv == ["sh", "-c", "echo hi $HOME"]
    assert container_argv({"args": ["-c", "true"]}, busybox, {}) == ["sh", "-c", "true"]


# -- container_argv ----------------------------------------------------------------------------

IMAGE = Program(entrypoint=["/venv/bin/sd-operator"], cmd=["--help"])


def test_command_replaces_entrypoint_and_drops_cmd() -> None:
    assert container_argv({"command": ["python", "-V"]}, IMAGE, {}) == ["python", "-V"]
    assert container_argv({"command": ["python"], "args": ["-c", "1"]}, IMAGE, {}) == ["python", "-c", "1"]


def test_args_replace_cmd_after_the_entrypoint() -> None:
    assert container_argv({"args": ["fetch", "--x"]}, IMAGE, {}) == ["/venv/bin/sd-operator", "fetch", "--x"]


def test_neither_gives_entrypoint_and_cmd() -> None:
    assert container_argv({}, IMAGE, {}) == ["/venv/bin/sd-operator", "--help"]
    assert container_argv({"command": None, "args": None}, IMAGE, {}) == ["/venv/bin/sd-operator", "--help"]


def test_empty_lists_are_unset() -> None:
    # The API server drops empty lists; containerd takes an empty command/args as none given.
    assert container_argv({"command": [], "args": []}, IMAGE, {}) == ["/venv/bin/sd-operator", "--help"]
    assert container_argv({"command": ["x"], "args": []}, IMAGE, {}) == ["x"]


def test_sd_operator_command_is_the_images_cli() -> None:
    argv = container_argv({"command": ["sd-operator", "fetch-model"], "args": ["--to", "/models"]}, IMAGE, {})
    assert argv == ["/venv/bin/sd-operator", "fetch-model", "--to", "/models"]
    # Only the bare name of the image's own CLI is mapped, and only as the program.
    assert container_argv({"command": ["/usr/bin/sd-operator"]}, IMAGE, {}) == ["/usr/bin/sd-operator"]
    assert container_argv({"command": ["sh", "sd-operator"]}, IMAGE, {}) == ["sh", "sd-operator"]
    assert container_argv({"command": ["sd-operator"]}, Program(entrypoint=["sh"]), {}) == ["sd-operator"]


def test_command_and_args_are_expanded_with_the_final_env() -> None:
    env = {"MODEL": "sdxl", "DIR": "/models"}
    container = {"command": ["$(TOOL)", "$(DIR)/$(MODEL)"], "args": ["$$(DIR)", "$(UNSET)", "$$"]}
    assert container_argv(container, IMAGE, env) == ["$(TOOL)", "/models/sdxl", "$(DIR)", "$(UNSET)", "$"]
    # `$(VAR)` naming the CLI expands before the mapping to the image's CLI.
    assert container_argv({"command": ["$(CLI)"]}, IMAGE, {"CLI": "sd-operator"}) == ["/venv/bin/sd-operator"]


def test_the_images_own_entrypoint_and_cmd_are_not_expanded() -> None:
    image = Program(entrypoint=["/bin/tool", "$(A)"], cmd=["$$", "$(A)"])
    assert container_argv({}, image, {"A": "x"}) == ["/bin/tool", "$(A)", "$$", "$(A)"]
    assert container_argv({"args": ["$(A)"]}, image, {"A": "x"}) == ["/bin/tool", "$(A)", "x"]


def test_no_command_at_all() -> None:
    with pytest.raises(PodError, match="no command") as e:
        container_argv({}, Program(entrypoint=[]), {})
    assert e.value.reason == "CreateContainerError"
    # args alone make a command when the image has no entrypoint (as a runtime runs CMD).
    assert container_argv({"args": ["sh", "-c", "true"]}, Program(entrypoint=[]), {}) == ["sh", "-c", "true"]


# -- gpu_profile -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("product", "profile"),
    [
        ("NVIDIA-GeForce-RTX-4090", "rtx4090"),
        ("NVIDIA-GeForce-RTX-3090", "rtx3090"),
        ("NVIDIA-GeForce-RTX-3060", "rtx3060"),
        ("NVIDIA-A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA-A100-PCIE-40GB-SHARED", "a100-40gb"),
        ("NVIDIA-L4", "l4"),
        ("Tesla-T4", "t4"),
        ("nvidia-geforce-rtx-4090", "rtx4090"),
        ("NVIDIA-H100-80GB-HBM3", podplan.DEFAULT_GPU_PROFILE),
    ],
)
def test_gpu_profile(product: str, profile: str) -> None:
    assert gpu_profile({"nvidia.com/gpu.product": product, "kubernetes.io/os": "linux"}) == profile


def test_gpu_profile_of_a_node_without_the_label_is_the_default() -> None:
    assert gpu_profile({}) == podplan.DEFAULT_GPU_PROFILE == "rtx3090"


def test_gpu_profiles_are_the_emulators() -> None:
    from sd_operator.emulator.profiles import PROFILES

    assert set(podplan.GPU_PROFILES.values()) <= set(PROFILES)
    assert podplan.DEFAULT_GPU_PROFILE in PROFILES
    for profile in PROFILES.values():  # each profile's own product label selects it
        assert gpu_profile({"nvidia.com/gpu.product": profile.product}) == profile.name


# -- termination_message -----------------------------------------------------------------------

LOG = "".join(f"line {i}\n" for i in range(1, 201))  # 200 lines


def test_the_file_is_the_message_whatever_the_policy() -> None:
    for policy in (None, "File", "FallbackToLogsOnError"):
        for code in (0, 1):
            assert termination_message("model sha256 mismatch\n", LOG, policy, code) == "model sha256 mismatch\n"


def test_an_empty_file_falls_back_to_the_logs_only_on_error_with_the_policy() -> None:
    assert termination_message("", LOG, None, 1) == ""
    assert termination_message("", LOG, "File", 1) == ""
    assert termination_message("", LOG, "FallbackToLogsOnError", 0) == ""
    message = termination_message("", LOG, "FallbackToLogsOnError", 2)
    assert message.splitlines() == [f"line {i}" for i in range(121, 201)]  # the last 80 lines
    assert termination_message("", LOG, "FallbackToLogsOnError", 137).startswith("line 121\n")


def test_a_short_log_is_the_message_whole() -> None:
    assert termination_message("", "Traceback:\n  boom\nValueError: x\n", "FallbackToLogsOnError", 1) == (
        "Traceback:\n  boom\nValueError: x"
    )
    assert termination_message("", "", "FallbackToLogsOnError", 1) == ""


def test_a_non_empty_file_is_not_replaced_by_the_logs() -> None:
    # The kubelet falls back only when the file is empty: a newline is a message.
    assert termination_message("\n", LOG, "FallbackToLogsOnError", 1) == "\n"


def test_the_file_keeps_its_last_4096_bytes() -> None:
    text = "HEAD" + "x" * 5000 + "TAIL"
    message = termination_message(text, "", None, 0)
    assert len(message.encode()) == podplan.MAX_TERMINATION_MESSAGE == 4096
    assert message.endswith("TAIL")
    assert message == text[-4096:]
    exact = "y" * 4096
    assert termination_message(exact, "", None, 0) == exact


def test_the_byte_limit_counts_bytes_not_characters() -> None:
    text = "é" * 3000  # 6000 bytes
    message = termination_message(text, "", None, 0)
    assert message == "é" * 2048
    odd = "é" * 3000 + "a"  # the cut falls inside a character, which is left out
    assert termination_message(odd, "", None, 0) == "é" * 2047 + "a"
    three = "€" * 2000  # 3 bytes each: 4096 is no multiple of 3
    assert termination_message(three, "", None, 0) == "€" * 1365


def test_the_log_fallback_keeps_the_last_2048_bytes_of_the_last_80_lines() -> None:
    long_lines = "".join(f"{i:03d}:" + "z" * 96 + "\n" for i in range(100))  # 101-byte lines
    message = termination_message("", long_lines, "FallbackToLogsOnError", 1)
    assert len(message.encode()) == podplan.MAX_TERMINATION_LOG_MESSAGE == 2048
    assert message.endswith("099:" + "z" * 96)
    assert message == "\n".join(long_lines.splitlines()[-80:])[-2048:]
    one_line = "E" * 10_000
    assert termination_message("", one_line, "FallbackToLogsOnError", 1) == "E" * 2048


# -- condition ---------------------------------------------------------------------------------


def test_condition_new() -> None:
    assert condition("Ready", True, "T1", []) == {
        "type": "Ready",
        "status": "True",
        "lastProbeTime": None,
        "lastTransitionTime": "T1",
    }
    assert condition("Ready", False, "T1", [], reason="ContainersNotReady") == {
        "type": "Ready",
        "status": "False",
        "lastProbeTime": None,
        "lastTransitionTime": "T1",
        "reason": "ContainersNotReady",
    }


def test_condition_keeps_its_transition_time_while_the_status_stays() -> None:
    previous = [
        {"type": "Initialized", "status": "True", "lastTransitionTime": "T0"},
        {"type": "Ready", "status": "False", "lastTransitionTime": "T1", "reason": "ContainersNotReady"},
    ]
    assert condition("Ready", False, "T2", previous, "ContainersNotReady")["lastTransitionTime"] == "T1"
    assert condition("Initialized", True, "T2", previous)["lastTransitionTime"] == "T0"


def test_condition_changes_its_transition_time_with_the_status() -> None:
    previous = [{"type": "Ready", "status": "False", "lastTransitionTime": "T1", "reason": "ContainersNotReady"}]
    ready = condition("Ready", True, "T2", previous, reason="ContainersNotReady")
    assert ready == {"type": "Ready", "status": "True", "lastProbeTime": None, "lastTransitionTime": "T2"}
    assert "reason" not in ready  # a reason only explains a False condition
    # Another condition type's time is not borrowed.
    assert condition("ContainersReady", False, "T3", previous)["lastTransitionTime"] == "T3"


# -- probe_address -----------------------------------------------------------------------------

CONTAINER = {
    "ports": [{"name": "http", "containerPort": 7860}, {"containerPort": 9000}, {"name": "m", "containerPort": 9}]
}


def test_http_get_probe() -> None:
    probe = {"httpGet": {"path": "/sd-operator/ready", "port": 7860}}
    assert probe_address(probe, CONTAINER, "10.1.2.3") == ("httpGet", "http://10.1.2.3:7860/sd-operator/ready", 7860)


def test_http_get_probe_named_port_scheme_host_and_default_path() -> None:
    probe = {"httpGet": {"port": "http", "scheme": "HTTPS", "host": "127.0.0.1"}}
    assert probe_address(probe, CONTAINER, "10.1.2.3") == ("httpGet", "https://127.0.0.1:7860/", 7860)


def test_numeric_string_port() -> None:
    assert probe_address({"tcpSocket": {"port": "9000"}}, CONTAINER, "10.1.2.3") == ("tcpSocket", "10.1.2.3", 9000)


def test_tcp_socket_probe_named_port() -> None:
    assert probe_address({"tcpSocket": {"port": "m"}}, CONTAINER, "10.1.2.3") == ("tcpSocket", "10.1.2.3", 9)
    assert probe_address({"tcpSocket": {"port": 22, "host": "h"}}, {}, "10.1.2.3") == ("tcpSocket", "h", 22)


def test_grpc_probe() -> None:
    assert probe_address({"grpc": {"port": 50051}}, {}, "10.1.2.3") == ("grpc", "10.1.2.3", 50051)


def test_exec_probe() -> None:
    probe = {"exec": {"command": ["cat", "/tmp/healthy"]}, "periodSeconds": 5}
    assert probe_address(probe, CONTAINER, "10.1.2.3") == ("exec", ["cat", "/tmp/healthy"], 0)


@pytest.mark.parametrize("container", [CONTAINER, {}, {"ports": None}])
def test_named_port_not_found(container: dict[str, Any]) -> None:
    with pytest.raises(PodError, match="probe port 'metrics' is not a port of the container") as e:
        probe_address({"httpGet": {"path": "/", "port": "metrics"}}, container, "10.1.2.3")
    assert e.value.reason == "ProbeError"


def test_unsupported_probe() -> None:
    with pytest.raises(PodError, match=r"unsupported probe \['periodSeconds'\]") as e:
        probe_address({"periodSeconds": 5}, CONTAINER, "10.1.2.3")
    assert e.value.reason == "ProbeError"
