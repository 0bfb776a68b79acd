"""Thin I/O on the official Kubernetes client: server-side apply of rendered manifests, status patches."""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from sd_operator import API_GROUP, API_VERSION, __version__
from sd_operator.render.common import FIELD_MANAGER

# apiVersion, kind -> (URL prefix, plural) of the kinds the operator writes.
RESOURCES: dict[tuple[str, str], tuple[str, str]] = {
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "Secret"): ("/api/v1", "secrets"),
    ("v1", "PersistentVolumeClaim"): ("/api/v1", "persistentvolumeclaims"),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts"),
    ("rbac.authorization.k8s.io/v1", "Role"): ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments"),
    ("batch/v1", "Job"): ("/apis/batch/v1", "jobs"),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("/apis/networking.k8s.io/v1", "networkpolicies"),
    (f"{API_GROUP}/{API_VERSION}", "SDInstance"): (f"/apis/{API_GROUP}/{API_VERSION}", "sdinstances"),
    (f"{API_GROUP}/{API_VERSION}", "LoRAJob"): (f"/apis/{API_GROUP}/{API_VERSION}", "lorajobs"),
    (f"{API_GROUP}/{API_VERSION}", "GenerationBatch"): (f"/apis/{API_GROUP}/{API_VERSION}", "generationbatches"),
}
_api_client: client.ApiClient | None = None
# How long a write may hold a handler thread. With etcd down, or just back, the API server takes a write
# and answers 504 only after its own timeout (40-60 s measured); from a server gone without closing the
# connection no answer ever comes. A write that timed out fails like any other and its caller retries it
# (server-side apply and merge patches are idempotent).
REQUEST_TIMEOUT = 15.0


def api_client() -> client.ApiClient:
    """One shared client: in-cluster config in a pod, else the kubeconfig (KUBECONFIG)."""
    global _api_client  # noqa: PLW0603 - a process-wide connection pool
    if _api_client is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        _api_client = client.ApiClient()
        # Named requests: audit logs and apiserver metrics tell the operator's traffic apart.
        _api_client.user_agent = f"sd-operator/{__version__}"
    return _api_client


def _path(obj: dict[str, Any], subresource: str = "") -> str:
    key = (obj["apiVersion"], obj["kind"])
    if key not in RESOURCES:
        raise ValueError(f"no REST mapping for {key}")
    prefix, plural = RESOURCES[key]
    meta = obj["metadata"]
    path = f"{prefix}/namespaces/{meta['namespace']}/{plural}/{meta['name']}"
    return f"{path}/{subresource}" if subresource else path


def apply(
    obj: dict[str, Any],
    *,
    field_manager: str = FIELD_MANAGER,
    api: client.ApiClient | None = None,
    timeout: float | None = REQUEST_TIMEOUT,
) -> Any:
    """Server-side apply: idempotent, and fields the operator no longer renders are removed."""
    api = api or api_client()
    return api.call_api(
        _path(obj),
        "PATCH",
        query_params=[("fieldManager", field_manager), ("force", "true")],
        header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
        body=obj,
        response_types_map={200: "object", 201: "object"},
        auth_settings=["BearerToken"],
        _return_http_data_only=True,
        _request_timeout=timeout,
    )


def merge_patch(
    obj: dict[str, Any],
    patch: dict[str, Any],
    *,
    subresource: str = "",
    api: client.ApiClient | None = None,
    timeout: float | None = REQUEST_TIMEOUT,
) -> Any:
    """A merge patch of an object (apiVersion, kind, metadata name and namespace) or of one of its
    subresources; None when the object is gone."""
    api = api or api_client()
    try:
        return api.call_api(
            _path(obj, subresource),
            "PATCH",
            header_params={"Content-Type": "application/merge-patch+json", "Accept": "application/json"},
            body=patch,
            response_types_map={200: "object"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _request_timeout=timeout,
        )
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def delete(
    obj: dict[str, Any], *, api: client.ApiClient | None = None, timeout: float | None = REQUEST_TIMEOUT
) -> bool:
    """Deletes an object (apiVersion, kind, metadata name and namespace), its dependents in the background;
    False when it was already gone."""
    api = api or api_client()
    try:
        api.call_api(
            _path(obj),
            "DELETE",
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            body={"propagationPolicy": "Background"},
            response_types_map={200: "object", 202: "object"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _request_timeout=timeout,
        )
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def patch_status(
    api_version: str,
    kind: str,
    namespace: str,
    name: str,
    status: dict[str, Any],
    *,
    api: client.ApiClient | None = None,
    timeout: float | None = REQUEST_TIMEOUT,
) -> Any:
    """A merge patch of the status subresource; None when the object is gone."""
    obj = {"apiVersion": api_version, "kind": kind, "metadata": {"namespace": namespace, "name": name}}
    return merge_patch(obj, {"status": status}, subresource="status", api=api, timeout=timeout)


def namespace_going(error: ApiException) -> bool:
    """The API server refused a write because the namespace is being deleted (403 with the cause
    NamespaceTerminating) or is gone (404 on an apply, which creates): children cannot, and need not, be made."""
    if error.status == 404:
        return True
    if error.status != 403:
        return False
    try:
        doc = json.loads(error.body or "{}")
    except (TypeError, ValueError):
        doc = {}
    causes = ((doc.get("details") or {}).get("causes") or []) if isinstance(doc, dict) else []
    if any(c.get("reason") == "NamespaceTerminating" or c.get("type") == "NamespaceTerminating" for c in causes):
        return True
    return "because it is being terminated" in str(error.body)
