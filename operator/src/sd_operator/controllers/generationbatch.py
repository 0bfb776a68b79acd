"""GenerationBatch controller: spec -> a Job running `sd-operator batch`; the Job -> phase and conditions.

The runner reports item counts into the status itself (through a ServiceAccount that may patch only
this batch's status); the controller owns phase, conditions, start and completion times.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from sd_operator import API_GROUP, API_VERSION, kube
from sd_operator.api.generationbatch import GenerationBatchSpec, Phase
from sd_operator.conditions import set_condition
from sd_operator.controllers.statusmemo import StatusMemo
from sd_operator.metrics import instrumented
from sd_operator.render.common import owner_object
from sd_operator.render.generationbatch import (
    BATCH_LABEL,
    output_location,
    render_configmap,
    render_job,
    render_rbac,
)
from sd_operator.render.sdinstance import RenderSettings
from sd_operator.settings import operator_settings

PLURAL = "generationbatches"
KIND = "GenerationBatch"
CONTROLLER = f"{PLURAL}.{API_GROUP}"
EVENTS = {
    Phase.RUNNING.value: ("Normal", "Started"),
    Phase.SUCCEEDED.value: ("Normal", "Completed"),
    Phase.FAILED.value: ("Warning", "Failed"),
    Phase.SUSPENDED.value: ("Normal", "Suspended"),
}
_memo = StatusMemo()


def parse_spec(spec: Any) -> GenerationBatchSpec:
    try:
        return GenerationBatchSpec.model_validate(dict(spec))
    except ValidationError as e:
        raise kopf.PermanentError(f"spec does not match the operator's API: {e}") from e


def resolve_model(spec: GenerationBatchSpec, namespace: str) -> str:
    """The model name the services layer routes by: given, or the checkpoint of the target SDInstance."""
    if spec.target.model:
        return spec.target.model
    assert spec.target.instance is not None
    try:
        instance = client.CustomObjectsApi(kube.api_client()).get_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, "sdinstances", spec.target.instance
        )
    except ApiException as e:
        if e.status == 404:
            raise kopf.TemporaryError(f"SDInstance {spec.target.instance} not found; waiting for it", delay=10) from e
        raise
    return str(instance["spec"]["model"]["checkpoint"]["name"])


def _owner(namespace: str, name: str, uid: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return owner_object(KIND, namespace, name, uid, labels)


def apply_children(owner: dict[str, Any], raw_spec: dict[str, Any], spec: GenerationBatchSpec, model: str) -> None:
    s = operator_settings()
    settings = RenderSettings(
        operator_image=s.operator_image, image_pull_secrets=tuple(s.image_pull_secrets), log_format=s.log_format
    )
    for child in [render_configmap(owner, raw_spec), *render_rbac(owner)]:
        kube.apply(child)
    kube.apply(render_job(owner, spec, model, settings, s.gateway_url))


@kopf.index(API_GROUP, API_VERSION, PLURAL)
def generationbatches_by_name(namespace: str, name: str, body: kopf.Body, meta: kopf.Meta, **_: Any) -> dict[Any, Any]:
    return {
        (namespace, name): {
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
            "spec": dict(body.spec),
            "status": dict(body.status),
            "deleting": bool(meta.get("deletionTimestamp")),
        }
    }


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec")
@instrumented(CONTROLLER)
def reconcile(body: kopf.Body, spec: kopf.Spec, name: str, namespace: str, logger: logging.Logger, **_: Any) -> None:
    parsed = parse_spec(spec)
    status = dict(body.status)
    if status.get("phase") in (Phase.SUCCEEDED.value, Phase.FAILED.value):
        return  # finished work is not started again
    model = resolve_model(parsed, namespace)
    owner = _owner(namespace, name, body.meta["uid"], dict(body.meta.get("labels") or {}))
    try:
        apply_children(owner, dict(spec), parsed, model)
    except ApiException as e:
        if not kube.namespace_going(e):
            raise
        # The batch goes with its namespace: nothing to make, and nothing to retry.
        logger.info("namespace %s is being deleted; the batch's Job is not made", namespace)
        return
    logger.info("applied GenerationBatch job for model %s", model)
    # Written now rather than through kopf's `patch` (sent after the handler returns), so a newer
    # phase written meanwhile from the Job's events is not overwritten by this older view.
    key = (namespace, name)
    with _memo.lock(key):
        current = {**status, **_memo.last(key)}
        update: dict[str, Any] = {
            "model": model,
            "outputLocation": output_location(parsed, namespace),
            "observedGeneration": body.meta.get("generation"),
        }
        if not current.get("phase"):
            update["phase"] = Phase.SUSPENDED.value if parsed.suspend else Phase.PENDING.value
            update["message"] = "suspended" if parsed.suspend else "waiting for the runner to start"
        kube.patch_status(f"{API_GROUP}/{API_VERSION}", KIND, namespace, name, update)
        _memo.remember(key, {**current, **update})


def derive_status(job: dict[str, Any], previous: dict[str, Any], generation: int | None) -> dict[str, Any]:
    """Phase, conditions and times of the batch from its Job (pure)."""
    jstatus = job.get("status") or {}
    conds = {c["type"]: c for c in jstatus.get("conditions") or [] if c.get("status") == "True"}
    if "Complete" in conds:
        phase, reason, message = Phase.SUCCEEDED, "Completed", "all items rendered"
    elif "Failed" in conds:
        cond = conds["Failed"]
        phase, reason = Phase.FAILED, cond.get("reason") or "Failed"
        message = cond.get("message") or "the runner failed"
        if reason == "PodFailurePolicy":
            message = f"some items failed for good (see status.failures): {message}"
    elif "Suspended" in conds or (job.get("spec") or {}).get("suspend"):
        phase, reason, message = Phase.SUSPENDED, "Suspended", "suspended; finished items are kept"
    elif jstatus.get("active") and jstatus.get("ready"):
        phase, reason, message = Phase.RUNNING, "Running", "rendering"
    elif jstatus.get("active"):
        phase, reason, message = Phase.PENDING, "RunnerStarting", "the runner's pod is starting"
    else:
        phase, reason, message = Phase.PENDING, "Pending", "waiting for the runner to start"
    conditions = list(previous.get("conditions") or [])
    conditions = set_condition(conditions, "Complete", phase == Phase.SUCCEEDED, reason, message, generation)
    conditions = set_condition(conditions, "Failed", phase == Phase.FAILED, reason, message, generation)
    conditions = set_condition(conditions, "Suspended", phase == Phase.SUSPENDED, reason, message, generation)
    status: dict[str, Any] = {"phase": phase.value, "message": message, "conditions": conditions}
    if jstatus.get("startTime"):
        status["startTime"] = previous.get("startTime") or jstatus["startTime"]
    finished = jstatus.get("completionTime") or (conds.get("Failed") or {}).get("lastTransitionTime")
    if phase in (Phase.SUCCEEDED, Phase.FAILED) and finished:
        status["completionTime"] = finished
    return status


@kopf.on.event("batch", "v1", "jobs", labels={BATCH_LABEL: kopf.PRESENT})
def job_changed(
    type: str,
    body: kopf.Body,
    namespace: str,
    labels: kopf.Labels,
    generationbatches_by_name: kopf.Index,
    logger: logging.Logger,
    **_: Any,
) -> None:
    name = labels[BATCH_LABEL]
    key = (namespace, name)
    if key not in generationbatches_by_name:
        return
    (batch,) = generationbatches_by_name[key]
    if batch["deleting"]:
        return
    job = dict(body)
    finished = any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in (job.get("status") or {}).get("conditions") or []
    )
    if type == "DELETED":
        if finished and batch["spec"].get("ttlSecondsAfterFinished") is not None:
            # The Job's TTL ran out: the batch goes with it (its outputs stay where they were written).
            client.CustomObjectsApi(kube.api_client()).delete_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, name
            )
        elif not finished:
            # Someone deleted an unfinished Job: start it again; the runner resumes.
            parsed = GenerationBatchSpec.model_validate(batch["spec"])
            owner = _owner(namespace, name, batch["uid"], batch["labels"])
            try:
                # The model the Job ran with: a target SDInstance may be gone already, with the namespace.
                model = batch["status"].get("model") or resolve_model(parsed, namespace)
                apply_children(owner, batch["spec"], parsed, model)
            except ApiException as e:
                if not kube.namespace_going(e):
                    raise
                # A namespace's deletion removes the Job, possibly before it removes the batch (the index
                # does not say "deleting" yet): the Job is not made again, and the refusal is no error.
                logger.info("namespace %s is being deleted; the Job of %s is not made again", namespace, name)
        return
    with _memo.lock(key):
        previous = _memo.last(key) or batch["status"]
        status = derive_status(job, previous, None)
        if all(previous.get(k) == v for k, v in status.items() if k != "conditions") and _same_conditions(
            previous, status
        ):
            return
        kube.patch_status(f"{API_GROUP}/{API_VERSION}", KIND, namespace, name, status)
        _memo.remember(key, {**previous, **status})
    if status["phase"] != previous.get("phase") and status["phase"] in EVENTS:
        kind, reason = EVENTS[status["phase"]]
        kopf.event(_owner(namespace, name, batch["uid"]), type=kind, reason=reason, message=status["message"])


def _same_conditions(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def strip(s: dict[str, Any]) -> list[dict[str, Any]]:
        conds = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in s.get("conditions") or []]
        return sorted(conds, key=lambda c: c["type"])

    return strip(a) == strip(b)


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL, optional=True)
def forget(namespace: str, name: str, **_: Any) -> None:
    _memo.forget((namespace, name))
