"""SDInstance controller: spec -> children (server-side apply), children -> status.

Level-based and idempotent: every reconcile renders all children from the spec and applies them.
Status comes from the pods through an index (no polling): each pod change recomputes the owning
instance's status and patches it only when it differs from what was last written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import kopf
from pydantic import ValidationError

from sd_operator import API_GROUP, API_VERSION, kube
from sd_operator.api.sdinstance import Phase, SDInstanceSpec
from sd_operator.controllers.scalestore import ScaleStore
from sd_operator.controllers.sdinstance_status import derive_status, pod_view
from sd_operator.controllers.statusmemo import StatusMemo
from sd_operator.metrics import instrumented
from sd_operator.render.common import INSTANCE_LABEL, owner_object
from sd_operator.render.sdinstance import RenderSettings, render_all
from sd_operator.settings import operator_settings

PLURAL = "sdinstances"
KIND = "SDInstance"
CONTROLLER = f"{PLURAL}.{API_GROUP}"
WARNING_PHASES = {Phase.FAILED.value, Phase.DEGRADED.value}

_memo = StatusMemo()
scaling = ScaleStore()  # autoscaled instances (controllers/autoscaler.py changes their counts)


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


def _owner(body: kopf.Body) -> dict[str, Any]:
    meta = body.meta
    return owner_object(KIND, meta["namespace"], meta["name"], meta["uid"], dict(meta.get("labels") or {}))


# ---------------------------------------------------------------------------------------------
# Indexes: what the status needs, kept current by watches.


@kopf.index(API_GROUP, API_VERSION, PLURAL)
def sdinstances_by_name(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {
        (namespace, name): {
            "uid": body.meta.get("uid"),
            "spec": dict(body.spec),
            "status": dict(body.status),
            "generation": body.meta.get("generation"),
        }
    }


@kopf.index("pods", labels={INSTANCE_LABEL: kopf.PRESENT})
def instance_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[INSTANCE_LABEL]): pod_view(dict(body))}


# ---------------------------------------------------------------------------------------------
# Reconcile: spec -> children


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec")
@instrumented(CONTROLLER)
def reconcile(
    body: kopf.Body,
    spec: kopf.Spec,
    name: str,
    namespace: str,
    logger: logging.Logger,
    instance_pods: kopf.Index,
    **_: Any,
) -> None:
    parsed = parse_spec(spec)
    key = (namespace, name)
    # Under the instance's lock: the autoscaler changes the Deployment's count under it too, so this
    # apply never puts back a count it just replaced.
    with _memo.lock(key):
        item = scaling.get(key, parsed, dict(body.status), time.monotonic())
        replicas = item.state.desired if item else None
        for child in render_all(_owner(body), parsed, render_settings(), replicas):
            kube.apply(child)
    logger.info("applied %s children for model %s", KIND, parsed.model.checkpoint.name)
    # Written now, under the instance's lock, not through kopf's `patch`: kopf sends that after the
    # handler returns, and a newer status written meanwhile by a pod event would be overwritten by
    # this older view. kopf runs this handler again only once its own patched version arrives
    # (settings.persistence.consistency_timeout), so the status event in between does not re-trigger it.
    refresh_status(namespace, name, parsed, body, lambda: list(instance_pods.get((namespace, name), [])))


# ---------------------------------------------------------------------------------------------
# Status: children -> status


@kopf.on.event("pods", labels={INSTANCE_LABEL: kopf.PRESENT})
def pod_changed(
    namespace: str,
    labels: kopf.Labels,
    instance_pods: kopf.Index,
    sdinstances_by_name: kopf.Index,
    **_: Any,
) -> None:
    instance = labels[INSTANCE_LABEL]
    key = (namespace, instance)
    if key not in sdinstances_by_name:
        return  # the instance is gone; its pods follow through garbage collection
    (indexed,) = sdinstances_by_name[key]
    try:
        parsed = SDInstanceSpec.model_validate(indexed["spec"])
    except ValidationError:
        return  # reconcile reports the problem
    refresh_status(namespace, instance, parsed, None, lambda: list(instance_pods.get(key, [])), indexed)


def refresh_status(
    namespace: str,
    name: str,
    spec: SDInstanceSpec,
    body: kopf.Body | None,
    pods: Callable[[], list[dict[str, Any]]],
    indexed: dict[str, Any] | None = None,
) -> None:
    """Derives the status and writes it (PATCH of the status subresource) if it changed; posts an
    Event when the phase changes."""
    if body is not None:
        previous, generation = dict(body.status), body.meta.get("generation")
        uid = body.meta.get("uid")
    else:
        assert indexed is not None
        previous, generation, uid = indexed["status"], None, indexed["uid"]
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
        ref = {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
        }
        kind = "Warning" if status["phase"] in WARNING_PHASES else "Normal"
        kopf.event(ref, type=kind, reason=status["phase"], message=status["message"])


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal apart from condition transition times (which only change along with a status)."""

    def strip(s: dict[str, Any]) -> dict[str, Any]:
        conds = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in s.get("conditions") or []]
        # None in a merge patch deletes a field; an absent field and None mean the same.
        return {**{k: v for k, v in s.items() if v is not None}, "conditions": sorted(conds, key=lambda c: c["type"])}

    return strip(a) == strip(b)


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL, optional=True)
def forget(namespace: str, name: str, **_: Any) -> None:
    """Children go with the owner (garbage collector); only the local cache needs cleaning."""
    _memo.forget((namespace, name))
    scaling.forget((namespace, name))
