"""Autoscaling of SDInstances with spec.autoscaling: demand from the gateways' reports -> replicas.

The gateways publish their demand per model in labelled ConfigMaps (gateway/demand.py); an index keeps
them by model, so the sum is read from memory. A report that changes re-evaluates the instances of its
models at once (scaling up is immediate: a cold start someone waits for); a timer per autoscaled instance
re-evaluates every few seconds (for the scale-down delay, and for reports that age out when a gateway
vanishes). A changed count is written to the Deployment (the only runtime write besides the status: the
SDInstance's spec stays what Git says), then the status and an Event record it with the demand behind it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf
from pydantic import ValidationError

from sd_operator import API_GROUP, API_VERSION, kube
from sd_operator.api.sdinstance import SDInstanceSpec
from sd_operator.autoscaling import Demand, sum_reports
from sd_operator.controllers import sdinstance
from sd_operator.gateway.demand import DEMAND_LABEL, parse_report
from sd_operator.metrics import instrumented
from sd_operator.render.sdinstance import child_name

log = logging.getLogger("sd_operator.autoscaler")
CONTROLLER = f"sdinstance-autoscaler.{API_GROUP}"
EVALUATE_SECONDS = 2.0


def _autoscaled(spec: kopf.Spec, **_: Any) -> bool:
    return bool(spec.get("autoscaling"))


@kopf.index("configmaps", labels={DEMAND_LABEL: "true"})
def demand_reports(body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """model -> the reports (one per gateway) that mention it."""
    report = parse_report(dict(body))
    return {model: report for model in (report or {}).get("models", {})}


@kopf.index(API_GROUP, API_VERSION, sdinstance.PLURAL, when=_autoscaled)
def autoscaled_by_model(namespace: str, name: str, spec: kopf.Spec, **_: Any) -> dict[Any, Any]:
    return {((spec.get("model") or {}).get("checkpoint") or {}).get("name"): (namespace, name)}


def demand_for(model: str, key: tuple[str, str], reports: kopf.Index, autoscaled: kopf.Index, now: float) -> Demand:
    """This instance's part of the model's demand: the sum over fresh gateway reports, split evenly among
    the autoscaled instances of the model (in name order, so the split is stable)."""
    total = sum_reports(list(reports.get(model, [])), model, now)
    peers = sorted(autoscaled.get(model, [])) or [key]
    return total.share(peers.index(key) if key in peers else 0, len(peers))


# Gateway id -> the models its last report named: a report that drops a model lowers that model's demand.
_last_models: dict[str, set[str]] = {}


@kopf.on.event("configmaps", labels={DEMAND_LABEL: "true"})
def demand_changed(
    type: str,
    body: kopf.Body,
    demand_reports: kopf.Index,
    autoscaled_by_model: kopf.Index,
    sdinstances_by_name: kopf.Index,
    instance_pods: kopf.Index,
    **_: Any,
) -> None:
    source = f"{body.meta.get('namespace')}/{body.meta.get('name')}"
    report = parse_report(dict(body)) if type != "DELETED" else None
    models = set((report or {}).get("models", {}))
    touched = models | _last_models.get(source, set())
    _last_models[source] = models
    for model in touched:
        for key in list(autoscaled_by_model.get(model, [])):
            evaluate(key, demand_reports, autoscaled_by_model, sdinstances_by_name, instance_pods)


@kopf.timer(API_GROUP, API_VERSION, sdinstance.PLURAL, interval=EVALUATE_SECONDS, when=_autoscaled)
def reevaluate(
    namespace: str,
    name: str,
    demand_reports: kopf.Index,
    autoscaled_by_model: kopf.Index,
    sdinstances_by_name: kopf.Index,
    instance_pods: kopf.Index,
    **_: Any,
) -> None:
    evaluate((namespace, name), demand_reports, autoscaled_by_model, sdinstances_by_name, instance_pods)


@instrumented(CONTROLLER)
def evaluate(
    key: tuple[str, str],
    demand_reports: kopf.Index,
    autoscaled_by_model: kopf.Index,
    sdinstances_by_name: kopf.Index,
    instance_pods: kopf.Index,
) -> None:
    """Runs the rule for one instance; on a change: Deployment replicas, then status and an Event."""
    if key not in sdinstances_by_name:
        return
    (indexed,) = sdinstances_by_name[key]
    try:
        spec = SDInstanceSpec.model_validate(indexed["spec"])
    except ValidationError:
        return  # reconcile reports it
    if spec.autoscaling is None:
        return
    now = time.monotonic()
    demand = demand_for(spec.model.checkpoint.name, key, demand_reports, autoscaled_by_model, time.time())
    with sdinstance._memo.lock(key):
        last = sdinstance._memo.last(key) or indexed["status"]
        outcome = sdinstance.scaling.evaluate(key, spec, last, demand, now)
        if outcome is None:
            return
        decision, previous = outcome
        if decision.changed:
            scale_deployment(key, decision.replicas)
    # The status follows (also when only ScalingLimited changed; unchanged statuses are not written).
    sdinstance.refresh_status(key[0], key[1], spec, None, lambda: list(instance_pods.get(key, [])), indexed)
    if decision.changed:
        item = sdinstance.scaling.get(key, spec, last, now)
        message = item.last_reason if item and item.last_reason else f"scaled {previous} -> {decision.replicas}"
        log.info("%s/%s %s", key[0], key[1], message)
        ref = {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": sdinstance.KIND,
            "metadata": {"name": key[1], "namespace": key[0], "uid": indexed["uid"]},
        }
        kopf.event(ref, type="Normal", reason=decision.reason, message=message)


def scale_deployment(key: tuple[str, str], replicas: int) -> None:
    """The Deployment's count only (a merge patch): the rest of it is the reconcile's server-side apply,
    which renders this same count from the store while it holds the instance's lock."""
    meta = {"namespace": key[0], "name": child_name(key[1])}
    obj = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta}
    kube.merge_patch(obj, {"spec": {"replicas": replicas}})
