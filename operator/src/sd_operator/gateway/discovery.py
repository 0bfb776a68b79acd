"""Kubernetes discovery: SDInstances say which model an endpoint serves; EndpointSlices say where.

EndpointSlices of an SDInstance's Service carry the Service's labels (sd-operator.dev/instance), so
one watch finds every ready WebUI pod. A backend is added from what the API says (model, checksum,
GPU memory) without contacting the pod; it gets traffic only when a request for its model comes.

When the API server goes away (an upgrade, an etcd outage) the gateway keeps serving the backends it
knew: a failed watch or list never removes one. It says so once when the outage begins and once when it
ends (log lines, and the sd_gateway_discovery_up / _stale_seconds gauges), retries with exponential
backoff, and on reconnecting lists everything again, so that what changed meanwhile (a deleted
EndpointSlice, a new SDInstance) is applied.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from sd_operator import API_GROUP, API_VERSION, kube
from sd_operator.gateway import metrics
from sd_operator.gateway.app import State
from sd_operator.gateway.dispatch import Backend
from sd_operator.gateway.registry import DeclaredModel, family_of, pixel_budget
from sd_operator.render.common import INSTANCE_LABEL

# Set on SDInstances that an external autoscaler (KEDA, an HPA) brings back from zero: the gateway then
# holds their requests through the cold start as it does for spec.autoscaling.
SCALE_FROM_ZERO_ANNOTATION = f"{API_GROUP}/scale-from-zero"

log = logging.getLogger("sd_operator.gateway.discovery")

# Re-list and re-watch after a failure: the first retry after BACKOFF_FIRST, doubling up to BACKOFF_MAX.
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 4.0
WATCH_SECONDS = 300  # the server ends a watch after this; the next one resumes from the last resourceVersion
LIST_TIMEOUT = 15.0


def backoff_delays(first: float = BACKOFF_FIRST, cap: float = BACKOFF_MAX) -> Iterator[float]:
    """first, 2*first, 4*first, ... capped at `cap` (pure)."""
    delay = first
    while True:
        yield min(delay, cap)
        delay = min(delay * 2, cap)


def relist_events(known: set[tuple[str, str]], items: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The events that bring a view holding `known` up to a fresh list (pure): every listed object as
    MODIFIED, and a DELETED for each known object the list no longer has (deleted while unwatched)."""
    listed = {(i["metadata"].get("namespace", ""), i["metadata"]["name"]) for i in items}
    gone = [(ns, name) for ns, name in sorted(known) if (ns, name) not in listed]
    deleted = [("DELETED", {"metadata": {"namespace": ns, "name": name}}) for ns, name in gone]
    return deleted + [("MODIFIED", i) for i in items]


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


class Watcher:
    """List-then-watch threads for some kinds of object, sharing one view of the API server's reachability:
    an outage begins when the first watch fails and ends when every failed one has listed again. `label`
    names the watcher in its two log lines (the discovery, the console's objects)."""

    label = "discovery"

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._failing: dict[str, str] = {}
        self._down_since: float | None = None
        self._synced: set[str] = set()
        self._watches: set[str] = set()

    @staticmethod
    def _lister(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
        def call(**extra: Any) -> Any:
            return fn(*args, **kwargs, **extra)

        call.__doc__ = fn.__doc__  # the watch helper inspects it for the return type
        return call

    def up(self) -> bool:
        """Every watch has listed, and none has failed since."""
        with self._lock:
            return self._down_since is None and bool(self._watches) and self._synced >= self._watches

    def stale_seconds(self) -> float:
        """How long the view has been what the API server said last (0 while it answers)."""
        with self._lock:
            return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    def kept(self) -> str:
        """What is served from the last known view during an outage, for the log line."""
        return "the last known objects"

    def _lost(self, what: str, why: str) -> None:
        with self._lock:
            self._failing[what] = why
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        log.warning(
            "%s lost the Kubernetes API (%s: %s); serving %s until it is back", self.label, what, why, self.kept()
        )

    def _reached(self, what: str) -> None:
        with self._lock:
            self._synced.add(what)
            self._failing.pop(what, None)
            if self._down_since is None or self._failing:
                return
            lasted, self._down_since = time.monotonic() - self._down_since, None
        log.warning("%s reached the Kubernetes API again after %.1fs; listed everything again", self.label, lasted)

    def _emit(self, handler: Callable[[str, dict[str, Any]], None], kind: str, body: dict[str, Any]) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(handler, kind, body)

    def _watch(
        self, lister: Callable[..., Any], handler: Callable[[str, dict[str, Any]], None], what: str
    ) -> threading.Thread:
        """List, then watch from the list's resourceVersion; after a failure, back off and list again. A
        failed list or watch changes nothing: the view stays what the last successful one said."""
        with self._lock:
            self._watches.add(what)

        def loop() -> None:
            known: set[tuple[str, str]] = set()
            version: str | None = None  # None: list (again) before watching
            delays = backoff_delays()
            while not self.stop.is_set():
                try:
                    if version is None:
                        listed = json.loads(lister(_preload_content=False, _request_timeout=LIST_TIMEOUT).data)
                        items = listed.get("items") or []
                        for kind, body in relist_events(known, items):
                            self._emit(handler, kind, body)
                        known = {(i["metadata"].get("namespace", ""), i["metadata"]["name"]) for i in items}
                        version = listed["metadata"]["resourceVersion"]
                        self._reached(what)
                        delays = backoff_delays()
                    stream = watch.Watch().stream(
                        lister,
                        resource_version=version,
                        timeout_seconds=WATCH_SECONDS,
                        _request_timeout=WATCH_SECONDS + 30,
                        deserialize=False,
                    )
                    for event in stream:
                        kind, body = event["type"], event["object"]
                        if kind not in ("ADDED", "MODIFIED", "DELETED"):
                            continue
                        meta = body["metadata"]
                        version = meta.get("resourceVersion") or version
                        key = (meta.get("namespace", ""), meta["name"])
                        if kind == "DELETED":
                            known.discard(key)
                        else:
                            known.add(key)
                        self._emit(handler, kind, body)
                        if self.stop.is_set():
                            return
                    # The server ended the watch (its timeout, or a shutdown): resume from the last version.
                except ApiException as e:
                    version = None
                    if e.status == 410:  # the version is too old to resume from: list again, now
                        continue
                    self._lost(what, f"HTTP {e.status} {e.reason}")
                    self.stop.wait(next(delays))
                except Exception as e:
                    version = None
                    self._lost(what, e.__class__.__name__)
                    self.stop.wait(next(delays))

        thread = threading.Thread(target=loop, daemon=True, name=f"sd-gateway-{self.label}")
        thread.start()
        return thread


class KubeDiscovery(Watcher):
    def __init__(self, state: State, namespaces: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.state = state
        self.namespaces = namespaces or ("",)
        self.instances: dict[tuple[str, str], dict[str, Any]] = {}
        self.slices: dict[tuple[str, str], dict[str, Any]] = {}
        self.by_slice: dict[tuple[str, str], list[Backend]] = {}

    def kept(self) -> str:
        return f"the {sum(len(b) for b in list(self.by_slice.values()))} last known backends"

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        api = kube.api_client()
        custom, discovery = client.CustomObjectsApi(api), client.DiscoveryV1Api(api)
        metrics.track_discovery(self.up, self.stale_seconds)
        for ns in self.namespaces:
            if ns:
                instances = self._lister(
                    custom.list_namespaced_custom_object, API_GROUP, API_VERSION, ns, "sdinstances"
                )
                slices = self._lister(discovery.list_namespaced_endpoint_slice, ns, label_selector=INSTANCE_LABEL)
            else:
                instances = self._lister(custom.list_cluster_custom_object, API_GROUP, API_VERSION, "sdinstances")
                slices = self._lister(discovery.list_endpoint_slice_for_all_namespaces, label_selector=INSTANCE_LABEL)
            where = ns or "all namespaces"
            self._watch(instances, self._on_instance, f"SDInstances in {where}")
            self._watch(slices, self._on_slice, f"EndpointSlices in {where}")
        try:
            await asyncio.Event().wait()
        finally:
            self.stop.set()

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
