"""SDInstance controller: spec -> children (server-side apply), children -> status.

Level-based: every event of an SDInstance (and a retry after a failure) runs `reconcile`, which renders
all children and applies those this process has not applied yet as rendered: all of them for a new
generation and on first sight after a start, within a generation only a child whose rendering changed
(the owner's labels, say) or that was deleted (the children are watched: one deleted by hand comes back
at once). The events of an instance's own status writes therefore cost no request. kopf writes nothing to
SDInstances (but the finalizer of the autoscaler's timer): there are no create/update/resume handlers,
so no last-handled annotation to patch after each, and no handler that kopf could run twice (under load
it re-ran the create handler on the stale event of the status written during the handler: its own
annotation patch, though already received, was checked for only after its 5 s consistency timeout,
while the indexing of that stale event waited for a free handler thread). A failed reconcile is retried
with backoff, and posted as a Warning Event.

Status comes from the pods through an index (no polling): a pod change, and a reconcile that applied
children, schedule a refresh of the instance's status a moment later (the changes of that moment make
one write: a new instance whose pod starts at once gets one status write, Ready, not one per step),
which patches it only when it differs from what was last written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from sd_operator import API_GROUP, API_VERSION, kube
from sd_operator.api.sdinstance import Phase, SDInstanceSpec
from sd_operator.controllers.scalestore import ScaleStore
from sd_operator.controllers.sdinstance_status import derive_status, pod_view
from sd_operator.controllers.statusmemo import AppliedMemo, Backoff, Pending, StatusMemo
from sd_operator.metrics import instrumented
from sd_operator.render.common import INSTANCE_LABEL, owner_object, rendered_hash
from sd_operator.render.sdinstance import RenderSettings, render_all
from sd_operator.settings import operator_settings

PLURAL = "sdinstances"
KIND = "SDInstance"
CONTROLLER = f"{PLURAL}.{API_GROUP}"
WARNING_PHASES = {Phase.FAILED.value, Phase.DEGRADED.value}
# A status refresh runs once the instance's pods have not changed for this long (but at the latest
# STATUS_COALESCE_CAP_SECONDS after the first change): a pod's quick steps (created, scheduled, started)
# make one status write instead of one each.
STATUS_COALESCE_SECONDS = 1.0
STATUS_COALESCE_CAP_SECONDS = 5.0

log = logging.getLogger("sd_operator.sdinstance")
Logger = logging.Logger | logging.LoggerAdapter[Any]
Index = Mapping[Any, Iterable[dict[str, Any]]]  # a kopf.Index (or a dict of lists, in tests)
_memo = StatusMemo()
scaling = ScaleStore()  # autoscaled instances (controllers/autoscaler.py changes their counts)
_applied = AppliedMemo()
_status_pending, _retry_pending, _heal_pending = Pending(), Pending(), Pending()
_status_backoff, _retry_backoff = Backoff(first=2.0), Backoff()


def parse_spec(spec: Any) -> SDInstanceSpec:
    try:
        return SDInstanceSpec.model_validate(dict(spec))
    except ValidationError as e:
        # The apiserver validated the object; this only happens when the CRD is older than the operator.
        raise kopf.PermanentError(f"spec does not match the operator's API: {e}") from e


def render_settings() -> RenderSettings:
    s = operator_settings()
    return RenderSettings(
        operator_image=s.operator_image, image_pull_secrets=tuple(s.image_pull_secrets), hf_endpoint=s.hf_endpoint
    )


def child_id(child: dict[str, Any]) -> str:
    return f"{child['kind']}/{child['metadata']['name']}"


def child_hash(child: dict[str, Any], autoscaled: bool) -> str:
    """The rendered child's hash. An autoscaled Deployment's count is the autoscaler's to change (it patches
    it under the instance's lock): a changed count alone is no reason to apply the Deployment again."""
    ignore = [("spec", "replicas")] if autoscaled and child["kind"] == "Deployment" else []
    return rendered_hash(child, ignore)


def _ref(namespace: str, name: str, uid: str | None) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
    }


# ---------------------------------------------------------------------------------------------
# Indexes: what the reconcile and the status need, kept current by watches. Async: they run in the
# event loop as the events arrive, never queued behind handlers waiting for a thread.


def instance_view(body: kopf.Body) -> dict[str, Any]:
    """What the controllers need of an SDInstance (also the value of its index)."""
    meta = body.meta
    return {
        "uid": meta.get("uid"),
        "spec": dict(body.spec),
        "status": dict(body.status),
        "generation": meta.get("generation"),
        "labels": dict(meta.get("labels") or {}),
        "deleting": bool(meta.get("deletionTimestamp")),
    }


@kopf.index(API_GROUP, API_VERSION, PLURAL)
async def sdinstances_by_name(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): instance_view(body)}


@kopf.index("pods", labels={INSTANCE_LABEL: kopf.PRESENT})
async def instance_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[INSTANCE_LABEL]): pod_view(dict(body))}


# ---------------------------------------------------------------------------------------------
# Delayed calls (status refreshes, retries) run in the threads of kopf's synchronous handlers.

_loop: asyncio.AbstractEventLoop | None = None
_executor: concurrent.futures.Executor | None = None


@kopf.on.startup()
async def _bind_loop(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _loop, _executor  # the one event loop of the operator, and its handler threads
    _loop, _executor = asyncio.get_running_loop(), settings.execution.executor


def later(
    pending: Pending,
    key: Hashable,
    delay: float,
    fn: Callable[[], None],
    backoff: Backoff | None = None,
    cap: float | None = None,
) -> None:
    """Runs `fn` in a thread `delay` seconds from now, once for every request for `key` made meanwhile;
    with a `cap`, each request postpones it to `delay` after itself, up to `cap` after the first. When
    `fn` fails, it runs again after the key's `backoff` (if given; else the failure is only logged).
    Callable from any thread."""
    if not pending.request(key, time.monotonic(), delay, cap):
        return
    context = contextvars.copy_context()  # kopf's event poster, for the Events fn posts
    loop = _loop
    if loop is None:  # not in the operator (no event loop bound): now, and failures go to the caller
        pending.release_if_due(key, float("inf"))
        context.run(fn)
        return

    def run() -> None:
        try:
            context.run(fn)
        except Exception as e:
            if backoff is None:
                log.exception("%s failed", key)
                return
            retry = backoff.failed(key)
            log.warning("%s failed (%s: %s); again in %.0fs", key, type(e).__name__, e, retry)
            later(pending, key, retry, fn, backoff)
        else:
            if backoff is not None:
                backoff.succeeded(key)

    def fire() -> None:  # in the event loop
        wait = pending.release_if_due(key, time.monotonic())
        if wait is None:
            loop.run_in_executor(_executor, run)
        else:
            loop.call_later(wait, fire)

    loop.call_soon_threadsafe(loop.call_later, delay, fire)


# ---------------------------------------------------------------------------------------------
# Reconcile: spec -> children


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
def sdinstance_event(
    event: dict[str, Any],
    body: kopf.Body,
    name: str,
    namespace: str,
    logger: logging.Logger,
    instance_pods: kopf.Index,
    sdinstances_by_name: kopf.Index,
    **_: Any,
) -> None:
    key = (namespace, name)
    if event["type"] == "DELETED":
        forget(key)  # children go with the owner (garbage collector); only the local memory needs cleaning
        return
    view = instance_view(body)
    if not view["deleting"]:
        reconcile_or_retry(key, view, logger, sdinstances_by_name, instance_pods)


def reconcile_or_retry(
    key: tuple[str, str], view: dict[str, Any], logger: Logger, instances: Index, pods: Index
) -> None:
    """Reconciles; a failure is logged and posted as a Warning Event, and retried with backoff (a spec the
    operator cannot read is not: the next spec change brings another reconcile)."""
    ref = _ref(key[0], key[1], view["uid"])
    try:
        reconcile(key, view, logger, instances, pods)
    except kopf.PermanentError as e:
        _retry_backoff.succeeded(key)
        logger.error("%s", e)
        kopf.event(ref, type="Warning", reason="InvalidSpec", message=str(e))
    except ApiException as e:
        if not kube.namespace_going(e):
            retry_later(key, e, logger, ref, instances, pods)
            return
        # A namespace's deletion can remove a child before the instance is marked deleting: nothing to make.
        _retry_backoff.succeeded(key)
        logger.info("namespace %s is being deleted; the children are not applied again", key[0])
    except Exception as e:
        retry_later(key, e, logger, ref, instances, pods)
    else:
        _retry_backoff.succeeded(key)


def retry_later(
    key: tuple[str, str], e: Exception, logger: Logger, ref: dict[str, Any], instances: Index, pods: Index
) -> None:
    """A failed reconcile: logged, posted as a Warning Event, retried with backoff."""
    delay = _retry_backoff.failed(key)
    logger.error("reconcile failed (%s: %s); again in %.0fs", type(e).__name__, e, delay)
    kopf.event(ref, type="Warning", reason="ReconcileError", message=f"{type(e).__name__}: {e}")
    later(_retry_pending, key, delay, lambda: _retry(key, instances, pods))


def _retry(key: tuple[str, str], instances: Index, pods: Index) -> None:
    """A failed reconcile, again, with the instance as the index has it now (nothing if it is gone)."""
    if key not in instances:
        return
    (view,) = instances[key]
    if not view["deleting"]:
        reconcile_or_retry(key, view, object_log(key), instances, pods)


class _ObjectLog(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['object']}] {msg}", kwargs  # type: ignore[index]


def object_log(key: tuple[str, str]) -> Logger:
    """The module's logger, its lines prefixed like kopf's per-object ones ("[namespace/name] ...")."""
    return _ObjectLog(log, {"object": f"{key[0]}/{key[1]}"})


@instrumented(CONTROLLER)
def reconcile(key: tuple[str, str], view: dict[str, Any], logger: Logger, instances: Index, pods: Index) -> None:
    """Applies the children that need it (server-side apply); when it applied any, or the spec's generation
    is not yet the status's observedGeneration, asks for a status refresh."""
    namespace, name = key
    parsed = parse_spec(view["spec"])
    uid, generation = view["uid"], view["generation"]
    # Under the instance's lock: the autoscaler changes the Deployment's count under it too, so this
    # apply never puts back a count it just replaced.
    with _memo.lock(key):
        item = scaling.get(key, parsed, view["status"], time.monotonic())
        replicas = item.state.desired if item else None
        owner = owner_object(KIND, namespace, name, uid, view["labels"])
        children = {child_id(c): c for c in render_all(owner, parsed, render_settings(), replicas)}
        hashes = {cid: child_hash(c, autoscaled=item is not None) for cid, c in children.items()}
        todo = _applied.plan(key, uid, generation, hashes)
        for cid in todo:
            apply_child(children[cid], logger, _ref(namespace, name, uid))
            _applied.remember(key, uid, generation, cid, hashes[cid])
        _applied.completed(key, uid, generation)
        observed = (_memo.last(key) or view["status"]).get("observedGeneration")
    if todo:
        logger.info("applied %s children for model %s: %s", KIND, parsed.model.checkpoint.name, ", ".join(sorted(todo)))
    if todo or observed != generation:
        # Coalesced with the pod changes that follow (a new instance's pods often start within it): one
        # status write where the phases of the first second would each have taken one.
        request_status(key, instances, pods)


def apply_child(child: dict[str, Any], logger: Logger, ref: dict[str, Any]) -> None:
    """Server-side applies one child. An instance Service made by an earlier operator (before they were
    headless) holds a ClusterIP, which cannot be taken back: it is deleted and made again, headless (its
    EndpointSlices go and come back with it, so for that moment the gateways route no new request to it)."""
    try:
        kube.apply(child)
    except ApiException as e:
        if not cluster_ip_was_set(child, e):
            raise
        kube.delete(child)
        kube.apply(child)
        message = (
            f"Service {child['metadata']['name']} made again headless (clusterIP: None); its ClusterIP is released"
        )
        logger.info("%s", message)
        kopf.event(ref, type="Normal", reason="ServiceRecreated", message=message)


def cluster_ip_was_set(child: dict[str, Any], error: ApiException) -> bool:
    """The API server refused a headless Service because the live one holds a ClusterIP (immutable)."""
    if child["kind"] != "Service" or child["spec"].get("clusterIP") != "None" or error.status != 422:
        return False
    return "spec.clusterIP" in str(error.body) and "may not change once set" in str(error.body)


# ---------------------------------------------------------------------------------------------
# Children deleted by hand come back at once (as controller-runtime's Owns() would make them): a
# NetworkPolicy deleted and not restored would leave the WebUI open to every pod. The children's watches
# carry a server-side label selector (run.py); their other events (a Deployment's status) cost no request.

CHILD_KINDS = (("apps", "v1", "deployments"), ("", "v1", "services"), ("networking.k8s.io", "v1", "networkpolicies"),
               ("", "v1", "configmaps"))  # fmt: skip


async def child_event(
    type: str,
    body: kopf.Body,
    namespace: str,
    labels: kopf.Labels,
    sdinstances_by_name: kopf.Index,
    instance_pods: kopf.Index,
    **_: Any,
) -> None:
    if type != "DELETED":
        return
    key = (namespace, labels[INSTANCE_LABEL])
    if key not in sdinstances_by_name:
        return  # the instance is gone: its children follow it (garbage collection)
    (view,) = sdinstances_by_name[key]
    owners = {ref.get("uid") for ref in body.meta.get("ownerReferences") or []}
    if view["deleting"] or view["uid"] not in owners:
        return  # going with its instance, or a child of an earlier instance of that name
    cid = child_id(dict(body))
    _applied.lost(key, cid)
    object_log(key).info("%s was deleted; applying it again", cid)
    later(_heal_pending, key, 0.0, lambda: _retry(key, sdinstances_by_name, instance_pods))


for _group, _version, _plural in CHILD_KINDS:
    kopf.on.event(_group, _version, _plural, labels={INSTANCE_LABEL: kopf.PRESENT})(child_event)


# ---------------------------------------------------------------------------------------------
# Status: children -> status


@kopf.on.event("pods", labels={INSTANCE_LABEL: kopf.PRESENT})
async def pod_changed(
    namespace: str,
    labels: kopf.Labels,
    instance_pods: kopf.Index,
    sdinstances_by_name: kopf.Index,
    **_: Any,
) -> None:
    key = (namespace, labels[INSTANCE_LABEL])
    if key in sdinstances_by_name:  # else the instance is gone; its pods follow through garbage collection
        request_status(key, sdinstances_by_name, instance_pods)


def request_status(key: tuple[str, str], instances: Index, pods: Index) -> None:
    """A status refresh once the instance is quiet for STATUS_COALESCE_SECONDS (joining one pending)."""
    later(
        _status_pending,
        key,
        STATUS_COALESCE_SECONDS,
        lambda: _refresh_from_index(key, instances, pods),
        _status_backoff,
        STATUS_COALESCE_CAP_SECONDS,
    )


def _refresh_from_index(key: tuple[str, str], instances: Index, pods: Index) -> None:
    """The status from the pods and the instance as the indexes have them when this runs. Its
    observedGeneration: the generation whose children this process has all applied (if it knows one)."""
    if key not in instances:
        return
    (indexed,) = instances[key]
    try:
        parsed = SDInstanceSpec.model_validate(indexed["spec"])
    except ValidationError:
        return  # reconcile reports the problem
    observed = _applied.observed(key)
    refresh_status(key[0], key[1], parsed, None, lambda: list(pods.get(key, [])), indexed, observed)


def refresh_status(
    namespace: str,
    name: str,
    spec: SDInstanceSpec,
    body: kopf.Body | None,
    pods: Callable[[], list[dict[str, Any]]],
    indexed: dict[str, Any] | None = None,
    generation: int | None = None,
) -> None:
    """Derives the status and writes it (PATCH of the status subresource) if it changed; posts an
    Event when the phase changes. From `body`, or else from `indexed` (an instance_view) and
    `generation` (the spec generation the children were applied from; None keeps observedGeneration)."""
    if body is not None:
        previous, generation = dict(body.status), body.meta.get("generation")
        uid = body.meta.get("uid")
    else:
        assert indexed is not None
        previous, uid = indexed["status"], indexed["uid"]
    key = (namespace, name)
    # Handlers of different pods run in parallel threads: one instance's status is derived and written
    # by one of them at a time, from the index as it is then, so an older view never overwrites a newer.
    with _memo.lock(key):
        last = _memo.last(key) or previous
        item = scaling.get(key, spec, last, time.monotonic())
        status = derive_status(name, namespace, spec, pods(), last, generation, item.status() if item else None)
        if _same(status, last):
            return
        kube.patch_status(f"{API_GROUP}/{API_VERSION}", KIND, namespace, name, status)
        _memo.remember(key, status)
    if status["phase"] != last.get("phase"):
        kind = "Warning" if status["phase"] in WARNING_PHASES else "Normal"
        kopf.event(_ref(namespace, name, uid), type=kind, reason=status["phase"], message=status["message"])


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal apart from condition transition times (which only change along with a status)."""

    def strip(s: dict[str, Any]) -> dict[str, Any]:
        conds = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in s.get("conditions") or []]
        # None in a merge patch deletes a field; an absent field and None mean the same.
        return {**{k: v for k, v in s.items() if v is not None}, "conditions": sorted(conds, key=lambda c: c["type"])}

    return strip(a) == strip(b)


def forget(key: tuple[str, str]) -> None:
    """The instance is gone: forget what this process remembers of it."""
    _memo.forget(key)
    _applied.forget(key)
    scaling.forget(key)
    _retry_backoff.succeeded(key)
    _status_backoff.succeeded(key)
