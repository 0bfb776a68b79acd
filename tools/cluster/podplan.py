"""Pure parts of the local pod runner: what a container's process is (argv, environment), how its
image maps to a local program, what its status looks like. No I/O here; podrunner.py does that.

The rules follow the kubelet's where the product depends on them: `$(VAR)` expansion in command,
args and env values; env from fieldRef/configMapKeyRef/secretKeyRef and envFrom; `command` replacing
the image's ENTRYPOINT and `args` its CMD; a termination message from the file, else (with
FallbackToLogsOnError and a failure) from the log's tail; on a container's stop, its preStop hook
first (httpGet/exec/sleep), bounded by the grace period, then SIGTERM with what is left of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Emulator profiles by the GPU Feature Discovery product label of the node.
GPU_PROFILES = {
    "rtx-4090": "rtx4090",
    "rtx-3090": "rtx3090",
    "rtx-3060": "rtx3060",
    "a100": "a100-40gb",
    "l4": "l4",
    "t4": "t4",
}
DEFAULT_GPU_PROFILE = "rtx3090"
MAX_TERMINATION_MESSAGE = 4096  # bytes of the file's end, as the kubelet
MAX_TERMINATION_LOG_MESSAGE = 2048  # bytes of the log's end with FallbackToLogsOnError (kubelet: 2048)
LOG_TAIL_LINES = 80  # FallbackToLogsOnError takes at most this many lines (kubelet: 80)
DEFAULT_GRACE_SECONDS = 30.0  # terminationGracePeriodSeconds when the pod sets none (the API's default)
MIN_STOP_SECONDS = 2.0  # the kubelet always leaves a container this long after SIGTERM (minimumGracePeriodInSeconds)

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class PodError(Exception):
    """The pod cannot be run as specified; `reason` is what the pod status shows."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined variables are replaced, `$$` escapes, the rest stays."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR.sub(repl, value)


def field_ref(pod: Mapping[str, Any], path: str) -> str:
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
    }
    if path in simple:
        return str(simple[path] or "")
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise PodError("CreateContainerConfigError", f"unsupported fieldRef {path!r}")


# lookup(kind, namespace, name) -> the ConfigMap's or Secret's decoded data, or None when missing.
Lookup = Callable[[str, str, str], "dict[str, str] | None"]


def container_env(
    pod: Mapping[str, Any], container: Mapping[str, Any], lookup: Lookup, base: Mapping[str, str]
) -> dict[str, str]:
    """The process environment: `base` (image ENV, service variables), then envFrom, then env."""
    namespace = pod["metadata"]["namespace"]
    env = dict(base)
    for source in container.get("envFrom") or []:
        kind, ref = (
            ("configmap", source["configMapRef"]) if "configMapRef" in source else ("secret", source["secretRef"])
        )
        data = lookup(kind, namespace, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise PodError("CreateContainerConfigError", f"{kind} {ref['name']!r} not found")
        prefix = source.get("prefix", "")
        env.update({prefix + k: v for k, v in data.items()})
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[name] = field_ref(pod, source["fieldRef"]["fieldPath"])
        elif "configMapKeyRef" in source or "secretKeyRef" in source:
            kind = "configmap" if "configMapKeyRef" in source else "secret"
            ref = source.get("configMapKeyRef") or source["secretKeyRef"]
            data = lookup(kind, namespace, ref["name"])
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise PodError("CreateContainerConfigError", f"{kind} {ref['name']!r} has no key {ref['key']!r}")
            env[name] = data[ref["key"]]
        elif "resourceFieldRef" in source:
            resource = source["resourceFieldRef"]["resource"]
            kind, _, res = resource.partition(".")
            env[name] = str(((container.get("resources") or {}).get(kind) or {}).get(res, "0"))
        else:
            raise PodError("CreateContainerConfigError", f"env {name}: unsupported valueFrom {sorted(source)}")
    return env


@dataclass(frozen=True)
class Program:
    """What a container image stands for locally."""

    entrypoint: list[str]
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def repository(image: str) -> str:
    """`ghcr.io/sd-operator/webui:0.1.0@sha256:..` -> `webui`."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[0]


def image_program(image: str, table: Sequence[Mapping[str, Any]], values: Mapping[str, str]) -> Program:
    repo = repository(image)
    for entry in table:
        if entry["repository"] == repo:

            def fill(s: str) -> str:
                return s.format_map(values)

            return Program(
                entrypoint=[fill(a) for a in entry.get("entrypoint") or []],
                cmd=[fill(a) for a in entry.get("cmd") or []],
                env={k: fill(v) for k, v in (entry.get("env") or {}).items()},
            )
    raise PodError("ErrImageNeverPull", f"local runner: no program for image {image!r} (tools/cluster/images.yaml)")


def container_argv(container: Mapping[str, Any], program: Program, env: Mapping[str, str]) -> list[str]:
    """`command` replaces the ENTRYPOINT and drops CMD; `args` replaces CMD (as Docker and the kubelet)."""
    # Only the container's own command and args are expanded, never the image's ENTRYPOINT/CMD; an
    # empty `args` is no `args` (the API server drops it; containerd then takes the image's CMD).
    command = [expand(a, env) for a in container.get("command") or []]
    args = [expand(a, env) for a in container.get("args") or []]
    if command:
        argv = command + args
        if argv[0] == "sd-operator" and program.entrypoint and program.entrypoint[0].endswith("/sd-operator"):
            argv[0] = program.entrypoint[0]  # the image's PATH: the venv's CLI
    else:
        argv = program.entrypoint + (args or program.cmd)
    if not argv:
        raise PodError("CreateContainerError", "no command: the image has no entrypoint and the container none")
    return argv


def gpu_profile(node_labels: Mapping[str, str]) -> str:
    product = node_labels.get("nvidia.com/gpu.product", "").lower()
    for key, profile in GPU_PROFILES.items():
        if key in product:
            return profile
    return DEFAULT_GPU_PROFILE


def termination_message(file_text: str, log_tail: str, policy: str | None, exit_code: int) -> str:
    """The message of a terminated container, as the kubelet builds it: the file's last 4096 bytes; when
    the file is empty, with FallbackToLogsOnError and a failure, the last 2048 bytes of the log's last 80
    lines."""
    message = _tail_bytes(file_text, MAX_TERMINATION_MESSAGE)
    if not message and policy == "FallbackToLogsOnError" and exit_code != 0:
        lines = log_tail.splitlines()[-LOG_TAIL_LINES:]
        message = _tail_bytes("\n".join(lines), MAX_TERMINATION_LOG_MESSAGE)
    return message


def _tail_bytes(text: str, limit: int) -> str:
    """The end of `text` that fits in `limit` UTF-8 bytes (a character cut in half is left out)."""
    data = text.encode("utf-8", "surrogateescape")
    return text if len(data) <= limit else data[-limit:].decode("utf-8", "ignore")


def condition(type_: str, ok: bool, now: str, previous: list[dict[str, Any]], reason: str = "") -> dict[str, Any]:
    """A pod condition that keeps its transition time while its status stays the same."""
    status = "True" if ok else "False"
    before = next((c for c in previous if c.get("type") == type_), None)
    since = before["lastTransitionTime"] if before and before.get("status") == status else now
    cond: dict[str, Any] = {"type": type_, "status": status, "lastProbeTime": None, "lastTransitionTime": since}
    if reason and not ok:
        cond["reason"] = reason
    return cond


def probe_address(probe: Mapping[str, Any], container: Mapping[str, Any], pod_ip: str) -> tuple[str, Any, int]:
    """(kind, detail, port) of an httpGet or tcpSocket probe; named ports resolve from the container."""
    for kind in ("httpGet", "tcpSocket", "grpc"):
        if kind in probe:
            spec = probe[kind]
            port = spec.get("port")
            if isinstance(port, str) and not port.isdigit():
                named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
                if port not in named:
                    raise PodError("ProbeError", f"probe port {port!r} is not a port of the container")
                port = named[port]
            host = spec.get("host") or pod_ip
            if kind == "httpGet":
                scheme = (spec.get("scheme") or "HTTP").lower()
                return kind, f"{scheme}://{host}:{int(port)}{spec.get('path') or '/'}", int(port)
            return kind, host, int(port)
    if "exec" in probe:
        return "exec", list(probe["exec"]["command"]), 0
    raise PodError("ProbeError", f"unsupported probe {sorted(probe)}")


def grace_period(pod: Mapping[str, Any]) -> float:
    """The seconds a deleted pod's containers get to stop: metadata.deletionGracePeriodSeconds (what the
    deletion asked for), else spec.terminationGracePeriodSeconds, else 30."""
    grace = (pod.get("metadata") or {}).get("deletionGracePeriodSeconds")
    if grace is None:
        grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds")
    return DEFAULT_GRACE_SECONDS if grace is None else max(0.0, float(grace))


def remaining_grace(grace: float, hook_seconds: float) -> float:
    """The SIGTERM-to-SIGKILL time left once the preStop hook took `hook_seconds` of `grace`: never less
    than MIN_STOP_SECONDS (the kubelet's `gracePeriod - preStop time`, floored at 2 s)."""
    return max(grace - max(0.0, hook_seconds), MIN_STOP_SECONDS)


@dataclass(frozen=True)
class Hook:
    """A container's lifecycle handler, resolved: an HTTP GET (`url`, `headers`), a command run in the
    container (`command`), or a pause (`seconds`, the `sleep` action)."""

    kind: str  # "httpGet", "exec" or "sleep"
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    seconds: float = 0.0


def pre_stop_hook(container: Mapping[str, Any], pod_ip: str) -> Hook | None:
    """The container's `lifecycle.preStop`, or None. httpGet goes to the pod's IP (unless `host` is set) on
    a numbered or named container port, with the spec's scheme (default HTTP) and path (default /)."""
    handler = (container.get("lifecycle") or {}).get("preStop")
    if not handler:
        return None
    if "httpGet" in handler:
        try:
            _, url, _ = probe_address({"httpGet": handler["httpGet"]}, container, pod_ip)
        except PodError as e:
            raise PodError("FailedPreStopHook", str(e).replace("probe port", "preStop hook port")) from None
        headers = {h["name"]: h["value"] for h in handler["httpGet"].get("httpHeaders") or []}
        return Hook("httpGet", url=url, headers=headers)
    if "exec" in handler:
        return Hook("exec", command=[str(a) for a in handler["exec"].get("command") or []])
    if "sleep" in handler:
        return Hook("sleep", seconds=float(handler["sleep"]["seconds"]))
    raise PodError("FailedPreStopHook", f"unsupported preStop handler {sorted(handler)}")
