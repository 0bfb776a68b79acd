"""An SDInstance's status, derived from its pods and Deployment (pure functions).

Each pod is summarised once when it changes (`pod_view`, kept in an index); the instance's phase,
message and conditions follow from those summaries (`derive_status`) with reasons a person can act on.
"""

from __future__ import annotations

from typing import Any

from sd_operator.api.sdinstance import Phase, SDInstanceSpec
from sd_operator.conditions import set_condition
from sd_operator.fetch.manifest import CHECKPOINT_SUBDIR, fetched_digests
from sd_operator.render.sdinstance import endpoint, gpu_summary, selector_labels

IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
FETCH_CONTAINER = "fetch-model"
WEBUI_CONTAINER = "webui"

# Pod states, from worst to best for picking the phase of a not-yet-ready instance.
FAILED, UNSCHEDULABLE, PENDING, DOWNLOADING, LOADING, READY, TERMINATING = (
    "Failed",
    "Unschedulable",
    "Pending",
    "Downloading",
    "Loading",
    "Ready",
    "Terminating",
)
PROGRESS_ORDER = [UNSCHEDULABLE, PENDING, DOWNLOADING, LOADING]


def _terminated_message(status: dict[str, Any]) -> tuple[int, str] | None:
    """Exit code and message of a terminated container (now, or before its restart)."""
    for state in (status.get("state") or {}, status.get("lastState") or {}):
        term = state.get("terminated")
        if term and term.get("exitCode", 0) != 0:
            msg = (term.get("message") or "").strip().splitlines()
            return term["exitCode"], msg[-1] if msg else (term.get("reason") or "")
    return None


def pod_view(pod: dict[str, Any]) -> dict[str, Any]:
    """What the status needs of a pod: its state, and why, in one line."""
    meta, status = pod.get("metadata", {}), pod.get("status") or {}
    name = meta.get("name", "")
    if meta.get("deletionTimestamp"):
        return {"name": name, "state": TERMINATING, "reason": "Terminating", "message": f"pod {name} is terminating"}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    scheduled = conditions.get("PodScheduled")
    if scheduled and scheduled.get("status") == "False":
        return {
            "name": name,
            "state": UNSCHEDULABLE,
            "reason": scheduled.get("reason") or "Unschedulable",
            "message": scheduled.get("message") or "the pod cannot be scheduled",
        }
    fetched: dict[str, str] = {}
    for init in status.get("initContainerStatuses") or []:
        if init.get("name") != FETCH_CONTAINER:
            continue
        done = (init.get("state") or {}).get("terminated") or {}
        if done.get("exitCode") == 0:
            fetched = fetched_digests(done.get("message") or "")
        failed = _terminated_message(init)
        if failed:
            code, message = failed
            return {
                "name": name,
                "state": FAILED,
                "reason": "ModelFetchFailed",
                "message": message or f"model fetch failed with exit code {code}",
            }
        if "running" in (init.get("state") or {}):
            return {"name": name, "state": DOWNLOADING, "reason": "Downloading", "message": "fetching model files"}
    for container in status.get("containerStatuses") or []:
        if container.get("name") != WEBUI_CONTAINER:
            continue
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in IMAGE_PULL_REASONS:
            return {
                "name": name,
                "state": FAILED,
                "reason": "ImagePullFailed",
                "message": f"{container.get('image')}: {waiting.get('message') or waiting['reason']}",
            }
        if waiting.get("reason") == "CrashLoopBackOff":
            crashed = _terminated_message(container)
            detail = crashed[1] if crashed and crashed[1] else waiting.get("message") or "restarting"
            return {"name": name, "state": FAILED, "reason": "CrashLoopBackOff", "message": f"WebUI crashes: {detail}"}
        # Past the fetch: what it computed goes with the view (the status reports the checkpoint's hash).
        if container.get("ready"):
            return {"name": name, "state": READY, "reason": "Ready", "message": "model loaded, API answers",
                    "fetched": fetched}  # fmt: skip
        if "running" in (container.get("state") or {}):
            return {"name": name, "state": LOADING, "reason": "Loading", "message": "loading the model",
                    "fetched": fetched}  # fmt: skip
    return {"name": name, "state": PENDING, "reason": "Pending", "message": "waiting for the pod to start"}


def derive_status(
    name: str,
    namespace: str,
    spec: SDInstanceSpec,
    pods: list[dict[str, Any]],
    previous: dict[str, Any] | None,
    observed_generation: int | None,
    scaling: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The full status from the pod summaries; conditions keep their transition times. `scaling`: the
    autoscaler's view (controllers/scalestore.py) when spec.autoscaling is set."""
    previous = previous or {}
    live = [p for p in pods if p["state"] != TERMINATING]
    desired = spec.replicas if scaling is None else scaling["desiredReplicas"]
    ready = sum(1 for p in live if p["state"] == READY)
    failed = [p for p in live if p["state"] == FAILED]
    waiting = [p for p in live if p["state"] in PROGRESS_ORDER]

    if desired == 0 and scaling is not None:
        phase, reason = Phase.READY, "ScaledToZero"
        message = "scaled to zero for lack of demand; the gateway holds the next request while a pod starts"
    elif desired == 0:
        phase, reason, message = Phase.READY, "ScaledToZero", "scaled to 0 replicas"
    elif ready >= desired:
        phase, reason, message = Phase.READY, "Ready", f"{ready}/{desired} replicas ready"
    elif failed and ready == 0:
        phase, reason, message = Phase.FAILED, failed[0]["reason"], failed[0]["message"]
    elif ready > 0 and scaling is not None and not failed and all(p["state"] != UNSCHEDULABLE for p in waiting):
        # The autoscaler added replicas that are on their way: serving, not degraded (Argo CD: Healthy).
        starting = (
            max(waiting, key=lambda p: PROGRESS_ORDER.index(p["state"]))["message"] if waiting else "pods creating"
        )
        phase, reason, message = Phase.READY, "ScalingUp", f"{ready}/{desired} ready; scaling up: {starting}"
    elif ready > 0:
        stuck = [p for p in waiting if p["state"] == UNSCHEDULABLE]
        worst = (failed or stuck or waiting or [{"message": "replicas starting"}])[0]
        phase, reason, message = Phase.DEGRADED, "ReplicasNotReady", f"{ready}/{desired} ready; {worst['message']}"
    elif waiting:
        best = max(waiting, key=lambda p: PROGRESS_ORDER.index(p["state"]))
        phase = {
            UNSCHEDULABLE: Phase.PENDING,
            PENDING: Phase.PENDING,
            DOWNLOADING: Phase.DOWNLOADING,
            LOADING: Phase.LOADING,
        }[best["state"]]
        # Unschedulable is the message that matters while nothing runs.
        unschedulable = [p for p in waiting if p["state"] == UNSCHEDULABLE]
        shown = unschedulable[0] if phase == Phase.PENDING and unschedulable else best
        reason, message = shown["reason"], shown["message"]
    else:
        phase, reason, message = Phase.PENDING, "PodsCreating", "waiting for pods to be created"

    gen = observed_generation if observed_generation is not None else previous.get("observedGeneration")
    conditions = list(previous.get("conditions") or [])
    conditions = set_condition(conditions, "Ready", phase == Phase.READY, reason, message, gen)
    unschedulable = [p for p in live if p["state"] == UNSCHEDULABLE]
    conditions = set_condition(
        conditions,
        "PodScheduled",
        not unschedulable,
        unschedulable[0]["reason"] if unschedulable else "Scheduled",
        unschedulable[0]["message"] if unschedulable else "all pods are scheduled",
        gen,
    )
    fetch_failed = [p for p in failed if p["reason"] == "ModelFetchFailed"]
    fetched = any(p["state"] in (LOADING, READY) for p in live)
    conditions = set_condition(
        conditions,
        "ModelFetched",
        False if fetch_failed else (True if fetched else None),
        "ModelFetchFailed" if fetch_failed else ("Fetched" if fetched else "Waiting"),
        fetch_failed[0]["message"] if fetch_failed else ("model files verified" if fetched else "not fetched yet"),
        gen,
    )
    conditions = _scaling_conditions(conditions, scaling, desired, gen)
    status: dict[str, Any] = {
        "phase": phase.value,
        "message": message,
        "conditions": conditions,
        "replicas": len(live),
        "readyReplicas": ready,
        "ready": f"{ready}/{desired}",
        "selector": ",".join(f"{k}={v}" for k, v in selector_labels(name).items()),
        "endpoint": endpoint(name, namespace, spec),
        "gpu": gpu_summary(spec),
        "desiredReplicas": desired,
        # None removes them (merge patch) once autoscaling is taken off.
        "lastScaleTime": scaling["lastScaleTime"] if scaling else None,
        "lastScaleReason": scaling["lastScaleReason"] if scaling else None,
    }
    if gen is not None:
        status["observedGeneration"] = gen
    status["modelSHA256"] = model_sha256(spec, live)  # None removes a stale one (merge patch)
    return status


SCALING_CONDITIONS = ("ScaledToZero", "ScalingLimited")


def _scaling_conditions(
    conditions: list[dict[str, Any]], scaling: dict[str, Any] | None, desired: int, gen: int | None
) -> list[dict[str, Any]]:
    """ScaledToZero and ScalingLimited while autoscaling is set; neither once it is not."""
    if scaling is None:
        return [c for c in conditions if c.get("type") not in SCALING_CONDITIONS]
    zero = desired == 0
    conditions = set_condition(
        conditions,
        "ScaledToZero",
        zero,
        "NoDemand" if zero else "Demand",
        (scaling.get("lastScaleReason") or "no demand") if zero else f"{desired} replica(s) wanted",
        gen,
    )
    limited = scaling.get("limited")
    return set_condition(
        conditions,
        "ScalingLimited",
        bool(limited),
        "TooManyReplicas" if limited else "DesiredWithinRange",
        limited or "the demand fits within minReplicas and maxReplicas",
        gen,
    )


def model_sha256(spec: SDInstanceSpec, pods: list[dict[str, Any]]) -> str | None:
    """The checkpoint's sha256: the declared one (the fetcher refuses other bytes), else the one the fetchers
    of the running pods computed, when they agree (pods that fetched different bytes from a changing source
    show none rather than one of them)."""
    if spec.model.checkpoint.sha256:
        return spec.model.checkpoint.sha256.lower()
    key = f"{CHECKPOINT_SUBDIR}/{spec.model.checkpoint.name}"
    seen = {p["fetched"][key] for p in pods if key in (p.get("fetched") or {})}
    return seen.pop() if len(seen) == 1 else None
