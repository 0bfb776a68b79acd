"""Pieces every rendered child shares: labels, owner references, the hardened security context."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

from sd_operator import API_GROUP, API_VERSION

MANAGED_BY = "sd-operator"
FIELD_MANAGER = "sd-operator"
# Pods with this label may reach WebUI pods through their NetworkPolicy (gateway, operator, batch runner).
WEBUI_CLIENT_LABEL = f"{API_GROUP}/webui-client"
INSTANCE_LABEL = f"{API_GROUP}/instance"
MODEL_LABEL = f"{API_GROUP}/model"
MODEL_ANNOTATION = f"{API_GROUP}/model-name"
# Labels and annotations a GitOps tool uses to track its own objects; never copied onto children,
# or Argo CD would see the operator's children as its own (and prune them).
TRACKING_PREFIXES = ("app.kubernetes.io/instance", "argocd.argoproj.io/", "kopf.zalando.org/", "kubectl.kubernetes.io/")


def owner_object(
    kind: str, namespace: str, name: str, uid: str, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """The parts of a custom resource its children's renderers need: identity, and labels to pass on."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": dict(labels or {})},
    }


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    """A controller owner reference, so deleting the owner deletes the child (garbage collector)."""
    return {
        "apiVersion": owner.get("apiVersion", f"{API_GROUP}/{API_VERSION}"),
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def label_value(text: str) -> str:
    """A label value (<= 63 chars of [A-Za-z0-9_.-], alphanumeric at both ends) that stays recognisable."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.-")
    if len(value) > 63:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        value = value[:54].rstrip("_.-") + "-" + digest
    return value


def user_labels(meta: dict[str, Any]) -> dict[str, str]:
    """The owner's labels minus tracking labels."""
    return {k: v for k, v in (meta.get("labels") or {}).items() if not k.startswith(TRACKING_PREFIXES)}


def content_hash(*parts: Any) -> str:
    """A stable short hash of rendered content: put on a pod template, a change rolls the pods."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def rendered_hash(obj: dict[str, Any], ignore: Iterable[tuple[str, ...]] = ()) -> str:
    """A stable hash of a rendered child, without the fields at the `ignore` paths (fields another writer
    sets, such as the autoscaler's count of an autoscaled Deployment): equal hashes, same apply."""
    for path in ignore:
        obj = _without(obj, path)
    return content_hash(obj)


def _without(obj: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """A copy of `obj` without the field at `path` (only the dicts along the path are copied)."""
    if not path or not isinstance(obj, dict) or path[0] not in obj:
        return obj
    head, rest = path[0], path[1:]
    if not rest:
        return {k: v for k, v in obj.items() if k != head}
    return {**obj, head: _without(obj[head], rest)}


def restricted_security_context() -> dict[str, Any]:
    """Container security context that passes the 'restricted' Pod Security Standard."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context(uid: int = 1000) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
