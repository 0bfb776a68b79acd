"""Kubernetes discovery: SDInstances say which model an endpoint serves; EndpointSlices say where.

EndpointSlices of an SDInstance's Service carry the Service's labels (sd-operator.dev/instance), so
one watch finds every ready WebUI pod. A backend is added from what the API says (model, checksum,
GPU memory) without contacting the pod; it gets traffic only when a request for its model comes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from sd_operator import API_GROUP, API_VERSION, kube
from sd_operator.gateway.app import State
from sd_operator.gateway.dispatch import Backend
from sd_operator.gateway.registry import DeclaredModel, family_of, pixel_budget
from sd_operator.render.common import INSTANCE_LABEL

# Set on SDInstances that an external autoscaler (KEDA, an HPA) brings back from zero: the gateway then
# holds their requests through the cold start as it does for spec.autoscaling.
SCALE_FROM_ZERO_ANNOTATION = f"{API_GROUP}/scale-from-zero"

log = logging.getLogger("sd_operator.gateway.discovery")


def backends_from_slice(slice_: dict[str, Any], instance: dict[str, Any] | None, inflight: int) -> list[Backend]:
    """Ready endpoints of one EndpointSlice, as backends of the SDInstance's model (pure)."""
    if instance is None or (declared := declared_model(instance)) is None:
        return []
    name, sha = declared.model, declared.sha256
    spec = instance.get("spec") or {}
    family = (spec.get("model") or {}).get("family")
    memory = (spec.get("gpu") or {}).get("memoryGiB")
    ports = [p for p in slice_.get("ports") or [] if p.get("name") in ("http", None)]
    if not ports:
        return []
    port = ports[0]["port"]
    out = []
    for endpoint in slice_.get("endpoints") or []:
        if (endpoint.get("conditions") or {}).get("ready") is False:
            continue
        for address in endpoint.get("addresses") or []:
            host = f"[{address}]" if ":" in address else address
            out.append(
                Backend(
                    url=f"http://{host}:{port}",
                    model=name,
                    title=f"{name} [{sha[:10]}]" if sha else None,
                    sha256=sha,
                    instance=declared.instance,
                    gpu=f"{memory}GiB" if memory else None,
                    pixel_budget=pixel_budget(memory, family_of(name, family)) if memory else None,
                    max_inflight=inflight,
                )
            )
    return out


def declared_model(instance: dict[str, Any]) -> DeclaredModel | None:
    """The model an SDInstance serves, and how far it is (phase, and why when not Ready) (pure)."""
    checkpoint = ((instance.get("spec") or {}).get("model") or {}).get("checkpoint") or {}
    if not checkpoint.get("name"):
        return None
    status = instance.get("status") or {}
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    meta = instance["metadata"]
    autoscaling = (instance.get("spec") or {}).get("autoscaling") or {}
    external = (meta.get("annotations") or {}).get(SCALE_FROM_ZERO_ANNOTATION) == "true"
    return DeclaredModel(
        model=checkpoint["name"],
        instance=f"{meta['namespace']}/{meta['name']}",
        # Declared, else what the instance's fetchers computed (status): either names the model by hash.
        sha256=(checkpoint.get("sha256") or status.get("modelSHA256") or "").lower() or None,
        phase=status.get("phase"),
        message=ready.get("message") if ready.get("status") != "True" else None,
        reason=ready.get("reason"),
        family=((instance.get("spec") or {}).get("model") or {}).get("family"),
        scalable=external or int(autoscaling.get("maxReplicas") or 0) > 0,
    )


class KubeDiscovery:
    def __init__(self, state: State, namespaces: tuple[str, ...] = ()) -> None:
        self.state = state
        self.namespaces = namespaces or ("",)
        self.instances: dict[tuple[str, str], dict[str, Any]] = {}
        self.slices: dict[tuple[str, str], dict[str, Any]] = {}
        self.by_slice: dict[tuple[str, str], list[Backend]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop = threading.Event()

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        api = kube.api_client()
        custom, discovery = client.CustomObjectsApi(api), client.DiscoveryV1Api(api)
        threads = []
        for ns in self.namespaces:
            if ns:
                instances = self._lister(
                    custom.list_namespaced_custom_object, API_GROUP, API_VERSION, ns, "sdinstances"
                )
                slices = self._lister(discovery.list_namespaced_endpoint_slice, ns, label_selector=INSTANCE_LABEL)
            else:
                instances = self._lister(custom.list_cluster_custom_object, API_GROUP, API_VERSION, "sdinstances")
                slices = self._lister(discovery.list_endpoint_slice_for_all_namespaces, label_selector=INSTANCE_LABEL)
            threads += [self._watch(instances, self._on_instance), self._watch(slices, self._on_slice)]
        try:
            await asyncio.Event().wait()
        finally:
            self.stop.set()

    @staticmethod
    def _lister(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
        def call(**extra: Any) -> Any:
            return fn(*args, **kwargs, **extra)

        call.__doc__ = fn.__doc__  # the watch helper inspects it for the return type
        return call

    def _watch(self, lister: Callable[..., Any], handler: Callable[[str, dict[str, Any]], None]) -> threading.Thread:
        def loop() -> None:
            while not self.stop.is_set():
                try:
                    for event in watch.Watch().stream(lister, timeout_seconds=300, _request_timeout=330):
                        obj = event["object"]
                        body = obj if isinstance(obj, dict) else kube.api_client().sanitize_for_serialization(obj)
                        assert self.loop is not None
                        self.loop.call_soon_threadsafe(handler, event["type"], body)
                        if self.stop.is_set():
                            return
                except ApiException as e:
                    log.warning("discovery watch failed (%s); restarting", e.status)
                    self.stop.wait(2)
                except Exception as e:
                    log.warning("discovery watch error %s; restarting", e.__class__.__name__)
                    self.stop.wait(2)

        thread = threading.Thread(target=loop, daemon=True, name="sd-gateway-discovery")
        thread.start()
        return thread

    def _on_instance(self, kind: str, body: dict[str, Any]) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        declared = self.state.registry.declared
        declared.pop(f"{key[0]}/{key[1]}", None)
        if kind == "DELETED":
            self.instances.pop(key, None)
        else:
            self.instances[key] = body
            model = declared_model(body)
            if model is not None:
                declared[model.instance] = model
        for slice_key, slice_ in list(self.slices.items()):
            if (slice_["metadata"].get("labels") or {}).get(INSTANCE_LABEL) == key[1] and slice_key[0] == key[0]:
                self._sync(slice_key)

    def _on_slice(self, kind: str, body: dict[str, Any]) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if kind == "DELETED":
            self.slices.pop(key, None)
        else:
            self.slices[key] = body
        self._sync(key)

    def _sync(self, key: tuple[str, str]) -> None:
        slice_ = self.slices.get(key)
        instance = None
        if slice_ is not None:
            name = (slice_["metadata"].get("labels") or {}).get(INSTANCE_LABEL)
            instance = self.instances.get((key[0], name)) if name else None
        wanted = backends_from_slice(slice_, instance, self.state.cfg.inflight_per_backend) if slice_ else []
        current = {(b.url, b.model): b for b in self.by_slice.get(key, [])}
        target = {(b.url, b.model): b for b in wanted}
        for k, backend in current.items():
            if k not in target:
                self.state.dispatcher.remove(backend)
                log.info("backend %s (%s) gone", backend.url, backend.instance)
        kept = [current[k] for k in current if k in target]
        for k, backend in target.items():
            if k not in current:
                self.state.dispatcher.add(backend)
                kept.append(backend)
                log.info("backend %s serves %s (%s)", backend.url, backend.model, backend.instance)
        self.by_slice[key] = kept
