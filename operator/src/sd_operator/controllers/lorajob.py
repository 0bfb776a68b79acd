"""LoRAJob controller: train (a Job), publish (a Job per instance, then a LoRA rescan through the
services layer), evaluate (a GenerationBatch). Every step is derived again from what the cluster says
whenever one of the LoRAJob's children changes (indexes, no polling)."""

from __future__ import annotations

import logging
from typing import Any

import kopf
import requests
from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from sd_operator import API_GROUP, API_VERSION, kube
from sd_operator.api.lorajob import LoRAJobSpec, Phase
from sd_operator.api.models import ModelFile
from sd_operator.api.sdinstance import SDInstanceSpec
from sd_operator.conditions import now, set_condition
from sd_operator.controllers.statusmemo import StatusMemo
from sd_operator.metrics import instrumented
from sd_operator.render.common import owner_object
from sd_operator.render.lorajob import (
    LORAJOB_LABEL,
    STEP_LABEL,
    eval_name,
    publish_name,
    render_configmap,
    render_evaluation,
    render_publish_job,
    render_rbac,
    render_train_job,
)
from sd_operator.render.sdinstance import RenderSettings
from sd_operator.settings import operator_settings

log = logging.getLogger("sd_operator.lorajob")
PLURAL, KIND = "lorajobs", "LoRAJob"
CONTROLLER = f"{PLURAL}.{API_GROUP}"
_memo = StatusMemo()


def _settings() -> RenderSettings:
    s = operator_settings()
    return RenderSettings(
        operator_image=s.operator_image, image_pull_secrets=tuple(s.image_pull_secrets), hf_endpoint=s.hf_endpoint
    )


def _owner(namespace: str, name: str, uid: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return owner_object(KIND, namespace, name, uid, labels)


def _instance(namespace: str, name: str) -> SDInstanceSpec:
    try:
        obj = client.CustomObjectsApi(kube.api_client()).get_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, "sdinstances", name
        )
    except ApiException as e:
        if e.status == 404:
            raise kopf.TemporaryError(f"SDInstance {name} not found; waiting for it", delay=10) from e
        raise
    return SDInstanceSpec.model_validate(obj["spec"])


def base_model(spec: LoRAJobSpec, namespace: str) -> ModelFile:
    if spec.base_model.checkpoint:
        return spec.base_model.checkpoint
    assert spec.base_model.from_instance is not None
    return _instance(namespace, spec.base_model.from_instance.name).model.checkpoint


def unsupported(spec: LoRAJobSpec) -> str | None:
    """What this version cannot do yet, said plainly instead of failing later inside a pod."""
    if not spec.dataset.source.pvc:
        return "dataset.source: only pvc is supported by this version (copy the dataset onto a PVC)"
    if not spec.output.destination.pvc:
        return "output.destination: only pvc is supported by this version"
    return None


def training_notes(spec: LoRAJobSpec) -> list[str]:
    """What the VRAM-aware defaults chose and why (from the train wrapper's own rules)."""
    from sd_operator.training.args import effective_training

    _, notes = effective_training(spec.training, spec.base_model.family, spec.gpu.memory_gib)
    return notes


def spec_conditions(spec: LoRAJobSpec, conditions: list[dict[str, Any]], gen: int | None) -> list[dict[str, Any]]:
    """Conditions that follow from the spec alone (both writers of the status keep them)."""
    warning = next((n for n in training_notes(spec) if "overfit" in n), None)
    if warning:
        return set_condition(conditions, "NetworkDimWarning", True, "HighNetworkDim", warning, gen)
    return conditions


# ---------------------------------------------------------------------------------------------
# Indexes


@kopf.index(API_GROUP, API_VERSION, PLURAL)
def lorajobs_by_name(namespace: str, name: str, body: kopf.Body, meta: kopf.Meta, **_: Any) -> dict[Any, Any]:
    return {
        (namespace, name): {
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
            "generation": meta.get("generation"),
            "spec": dict(body.spec),
            "status": dict(body.status),
            "deleting": bool(meta.get("deletionTimestamp")),
        }
    }


@kopf.index("batch", "v1", "jobs", labels={LORAJOB_LABEL: kopf.PRESENT})
def lorajob_jobs(namespace: str, name: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    status = body.get("status") or {}
    done = {c["type"] for c in status.get("conditions") or [] if c.get("status") == "True"}
    failed: dict[str, Any] = next((c for c in status.get("conditions") or [] if c["type"] == "Failed"), {})
    return {
        (namespace, labels[LORAJOB_LABEL]): {
            "name": name,
            "step": labels.get(STEP_LABEL),
            "target": (body.spec.get("template", {}).get("metadata", {}).get("labels") or {}).get(
                f"{API_GROUP}/instance-target"
            ),
            "complete": "Complete" in done,
            "failed": "Failed" in done,
            "message": failed.get("message") or "",
            "reason": failed.get("reason") or "",
            "active": bool(status.get("active")) and bool(status.get("ready")),
            "suspended": bool(body.spec.get("suspend")),
            "startTime": status.get("startTime"),
            "completionTime": status.get("completionTime"),
        }
    }


def _terminated(status: dict[str, Any]) -> dict[str, Any] | None:
    for state in (status.get("state") or {}, status.get("lastState") or {}):
        if state.get("terminated"):
            return dict(state["terminated"])
    return None


@kopf.index("pods", labels={LORAJOB_LABEL: kopf.PRESENT, STEP_LABEL: "train"})
def lorajob_lint(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """The dataset lint's verdict (its init container's exit) and the trainer's last words when it failed."""
    status = body.get("status") or {}
    found: dict[str, Any] = {}
    for init in status.get("initContainerStatuses") or []:
        term = _terminated(init) if init.get("name") == "dataset-lint" else None
        if term:
            found.update(ok=term.get("exitCode") == 0, message=(term.get("message") or "").strip())
    for container in status.get("containerStatuses") or []:
        term = _terminated(container) if container.get("name") == "trainer" else None
        if term and term.get("exitCode"):
            lines = (term.get("message") or "").strip().splitlines()
            found["trainer"] = lines[-1] if lines else f"exit code {term['exitCode']}"
    return {(namespace, labels[LORAJOB_LABEL]): found} if found else {}


@kopf.index(API_GROUP, API_VERSION, "generationbatches", labels={LORAJOB_LABEL: kopf.PRESENT})
def lorajob_evaluations(namespace: str, name: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LORAJOB_LABEL]): {"name": name, "phase": (body.get("status") or {}).get("phase")}}


# ---------------------------------------------------------------------------------------------
# Reconcile: spec -> training Job


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec")
@instrumented(CONTROLLER)
def reconcile(
    body: kopf.Body, spec: kopf.Spec, name: str, namespace: str, patch: kopf.Patch, logger: logging.Logger, **_: Any
) -> None:
    try:
        parsed = LoRAJobSpec.model_validate(dict(spec))
    except ValidationError as e:
        raise kopf.PermanentError(f"spec does not match the operator's API: {e}") from e
    status = dict(body.status)
    if status.get("phase") in (Phase.SUCCEEDED.value, Phase.FAILED.value):
        return
    problem = unsupported(parsed)
    if problem:
        patch.status.update({"phase": Phase.FAILED.value, "message": problem})
        raise kopf.PermanentError(problem)
    model = base_model(parsed, namespace)
    owner = _owner(namespace, name, body.meta["uid"], dict(body.meta.get("labels") or {}))
    settings = _settings()
    for child in [render_configmap(owner, dict(spec), model, settings), *render_rbac(owner)]:
        kube.apply(child)
    kube.apply(render_train_job(owner, parsed, model, settings))
    logger.info("applied LoRAJob training Job (base model %s)", model.name)
    gen = body.meta.get("generation")
    for note in training_notes(parsed):
        kopf.event(body, type="Warning" if "overfit" in note else "Normal", reason="TrainingDefaults", message=note)
    # Written now rather than through kopf's `patch` (sent after the handler returns), so a newer
    # status written meanwhile from the children's events is not overwritten by this older view.
    key = (namespace, name)
    with _memo.lock(key):
        current = {**status, **_memo.last(key)}
        update: dict[str, Any] = {
            "conditions": spec_conditions(parsed, list(current.get("conditions") or []), gen),
            "observedGeneration": gen,
        }
        if not current.get("phase"):
            update["phase"] = Phase.SUSPENDED.value if parsed.suspend else Phase.PENDING.value
            update["message"] = "suspended" if parsed.suspend else "waiting for the training pod"
        kube.patch_status(f"{API_GROUP}/{API_VERSION}", KIND, namespace, name, update)
        _memo.remember(key, update)


# ---------------------------------------------------------------------------------------------
# Children -> next step and status


@kopf.on.event("batch", "v1", "jobs", labels={LORAJOB_LABEL: kopf.PRESENT})
@kopf.on.event("pods", labels={LORAJOB_LABEL: kopf.PRESENT, STEP_LABEL: "train"})
@kopf.on.event(API_GROUP, API_VERSION, "generationbatches", labels={LORAJOB_LABEL: kopf.PRESENT})
def child_changed(
    namespace: str,
    labels: kopf.Labels,
    lorajobs_by_name: kopf.Index,
    lorajob_jobs: kopf.Index,
    lorajob_lint: kopf.Index,
    lorajob_evaluations: kopf.Index,
    **_: Any,
) -> None:
    key = (namespace, labels[LORAJOB_LABEL])
    # Events of the Jobs, pods and batch of one LoRAJob arrive in parallel threads: one at a time derives
    # the next step, from the indexes as they are then.
    with _memo.lock(key):
        if key not in lorajobs_by_name:
            return
        (lj,) = lorajobs_by_name[key]
        if lj["deleting"]:
            return
        advance(
            key,
            lj,
            list(lorajob_jobs.get(key, [])),
            list(lorajob_lint.get(key, [])),
            list(lorajob_evaluations.get(key, [])),
        )


def advance(
    key: tuple[str, str],
    lj: dict[str, Any],
    jobs: list[dict[str, Any]],
    lint_all: list[dict[str, Any]],
    evaluations: list[dict[str, Any]],
) -> None:
    namespace, name = key
    spec = LoRAJobSpec.model_validate(lj["spec"])
    previous = {**lj["status"], **_memo.last(key)}
    status: dict[str, Any] = {}
    gen = lj["generation"]
    conditions = spec_conditions(spec, list(previous.get("conditions") or []), gen)
    owner = _owner(namespace, name, lj["uid"], lj["labels"])
    train = next((j for j in jobs if j["step"] == "train"), None)
    lint = [entry for entry in lint_all if "ok" in entry]
    trainer_said = next((e["trainer"] for e in lint_all if "trainer" in e), None)
    if lint:
        ok, message = lint[0]["ok"], lint[0]["message"]
        conditions = set_condition(
            conditions,
            "DatasetValid",
            ok,
            "Checked" if ok else "DatasetInvalid",
            "dataset checked" if ok else message or "the dataset is not usable",
            gen,
        )
    phase = previous.get("phase") or Phase.PENDING.value
    message = previous.get("message") or ""
    if train and train["startTime"]:
        status["startTime"] = previous.get("startTime") or train["startTime"]
    if train is None or phase in (Phase.SUCCEEDED.value, Phase.FAILED.value):
        pass
    elif train["failed"]:
        phase, message = Phase.FAILED.value, trainer_said or train["message"] or "training failed"
        if lint and not lint[0]["ok"]:
            message = f"the dataset is not usable: {lint[0]['message']}"
        conditions = set_condition(conditions, "Failed", True, train["reason"] or "TrainingFailed", message, gen)
    elif not train["complete"]:
        if train["suspended"]:
            phase, message = Phase.SUSPENDED.value, "suspended"
        elif train["active"]:
            phase, message = Phase.RUNNING.value, "training"
        else:
            phase, message = Phase.PENDING.value, "waiting for the training pod"
    else:
        phase, message = _after_training(owner, spec, previous, jobs, evaluations, status)
        if phase == Phase.SUCCEEDED.value:
            conditions = set_condition(conditions, "Complete", True, "Completed", message, gen)
    status.update({"phase": phase, "message": message, "conditions": conditions})
    if phase in (Phase.SUCCEEDED.value, Phase.FAILED.value):
        status["completionTime"] = previous.get("completionTime") or now()
    changed = {k: v for k, v in status.items() if previous.get(k) != v}
    if not changed:
        return
    kube.patch_status(f"{API_GROUP}/{API_VERSION}", KIND, namespace, name, changed)
    _memo.remember(key, changed)
    if phase != previous.get("phase"):
        kind = "Warning" if phase == Phase.FAILED.value else "Normal"
        kopf.event(owner, type=kind, reason=phase, message=message)


def _after_training(
    owner: dict[str, Any],
    spec: LoRAJobSpec,
    previous: dict[str, Any],
    jobs: list[dict[str, Any]],
    evaluations: list[dict[str, Any]],
    status: dict[str, Any],
) -> tuple[str, str]:
    """Publish, then evaluate; returns the phase and message for where the LoRAJob now stands."""
    namespace, name = owner["metadata"]["namespace"], owner["metadata"]["name"]
    final = next((a for a in previous.get("artifacts") or [] if a.get("epoch") is None), None)
    published = {p["instance"]: p for p in previous.get("published") or []}
    pending = []
    for ref in spec.publish_to or []:
        if ref.name in published:
            continue
        instance = _instance(namespace, ref.name)
        storage = instance.storage.pvc if instance.storage else None
        if storage is None:
            published[ref.name] = {
                "instance": ref.name,
                "path": "",
                "time": now(),
                "message": "per-pod model storage: add the LoRA to the instance's spec.model.loras",
            }
            continue
        job = next((j for j in jobs if j["step"] == "publish" and j["target"] == ref.name), None)
        if job is None:
            sha = final.get("sha256") if final else None
            kube.apply(render_publish_job(owner, spec, ref.name, storage.claim_name, storage.path, sha, _settings()))
            pending.append(ref.name)
        elif job["failed"]:
            return Phase.FAILED.value, f"publishing to {ref.name} failed: {job['message']}"
        elif job["complete"]:
            path = f"pvc://{namespace}/{storage.claim_name}/{storage.path}/Lora/{spec.output.name}.safetensors"
            published[ref.name] = {"instance": ref.name, "path": path.replace("//Lora", "/Lora"), "time": now()}
            refresh_loras(instance.model.checkpoint.name)
        else:
            pending.append(ref.name)
    if published:
        status["published"] = list(published.values())
    if pending:
        return Phase.PUBLISHING.value, f"publishing to {', '.join(pending)}"
    if spec.evaluation:
        target = spec.evaluation.instance or (spec.publish_to[0] if spec.publish_to else None)
        if target is None:
            return Phase.SUCCEEDED.value, "trained; no instance to evaluate on (set evaluation.instance)"
        evaluation = next(iter(evaluations), None)
        if evaluation is None:
            kube.apply(render_evaluation(owner, spec, target.name))
            status["evaluationBatch"] = eval_name(name)
            return Phase.EVALUATING.value, f"rendering the evaluation on {target.name}"
        status["evaluationBatch"] = evaluation["name"]
        if evaluation["phase"] == "Succeeded":
            return Phase.SUCCEEDED.value, f"trained, published and evaluated (GenerationBatch {evaluation['name']})"
        if evaluation["phase"] == "Failed":
            return Phase.SUCCEEDED.value, f"trained and published; the evaluation batch {evaluation['name']} failed"
        return Phase.EVALUATING.value, f"rendering the evaluation on {target.name}"
    return Phase.SUCCEEDED.value, "trained" + (" and published" if published else "")


def refresh_loras(model: str) -> None:
    """Asks the model's instances to rescan their LoRA folder, through the services layer."""
    url = f"{operator_settings().gateway_url.rstrip('/')}/sdapi/v1/refresh-loras"
    try:
        requests.post(url, headers={"X-SD-Model": model}, timeout=30).raise_for_status()
    except requests.RequestException as e:
        # The file is in place; the next WebUI start (or a later rescan) finds it anyway.
        log.warning("refresh-loras through %s failed: %s", url, e.__class__.__name__)


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL, optional=True)
def forget(namespace: str, name: str, **_: Any) -> None:
    _memo.forget((namespace, name))


__all__ = ["publish_name", "reconcile"]
