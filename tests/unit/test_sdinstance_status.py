"""An SDInstance's status from its pods: one line per pod (pod_view), then phase and conditions (derive_status)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from sd_operator.api.sdinstance import SDInstanceSpec
from sd_operator.conditions import get_condition
from sd_operator.controllers.sdinstance_status import derive_status, pod_view
from sd_operator.render.sdinstance import RenderSettings, render_deployment

IMAGE = "ghcr.io/sd-operator/webui:0.1.0"
FETCHER_IMAGE = "ghcr.io/sd-operator/sd-operator:0.1.0"
OLD_TIME = "2020-01-01T00:00:00Z"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
UNSCHEDULABLE_MESSAGE = (
    "0/3 nodes are available: 1 Insufficient nvidia.com/gpu, 2 node(s) didn't match Pod's node affinity/selector. "
    "preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling."
)


# ---------------------------------------------------------------------------------------------
# Builders: pods shaped like the API server's JSON


def condition(type_: str, status: str, reason: str | None = None, message: str | None = None) -> dict[str, Any]:
    c = {"type": type_, "status": status, "lastProbeTime": None, "lastTransitionTime": "2024-05-01T10:00:00Z"}
    if reason:
        c["reason"] = reason
    if message:
        c["message"] = message
    return c


def running(started: str = "2024-05-01T10:00:05Z") -> dict[str, Any]:
    return {"running": {"startedAt": started}}


def waiting(reason: str, message: str | None = None) -> dict[str, Any]:
    w: dict[str, Any] = {"reason": reason}
    if message:
        w["message"] = message
    return {"waiting": w}


def terminated(exit_code: int, message: str | None = None, reason: str = "Error") -> dict[str, Any]:
    t: dict[str, Any] = {
        "exitCode": exit_code,
        "reason": reason,
        "startedAt": "2024-05-01T10:00:05Z",
        "finishedAt": "2024-05-01T10:00:09Z",
        "containerID": "containerd://0123abcd",
    }
    if message is not None:
        t["message"] = message
    return {"terminated": t}


def fetch_status(state: dict[str, Any], last_state: dict[str, Any] | None = None, restarts: int = 0) -> dict[str, Any]:
    return {
        "name": "fetch-model",
        "image": FETCHER_IMAGE,
        "imageID": "",
        "ready": False,
        "restartCount": restarts,
        "started": "running" in state,
        "state": state,
        "lastState": last_state or {},
    }


def webui_status(
    state: dict[str, Any], ready: bool = False, last_state: dict[str, Any] | None = None, restarts: int = 0
) -> dict[str, Any]:
    return {
        "name": "webui",
        "image": IMAGE,
        "imageID": "",
        "ready": ready,
        "restartCount": restarts,
        "started": "running" in state,
        "state": state,
        "lastState": last_state or {},
    }


def make_pod(
    name: str = "demo-webui-7c9f8d6b5-x2k4p",
    *,
    phase: str = "Pending",
    conditions: list[dict[str, Any]] | None = None,
    init: list[dict[str, Any]] | None = None,
    containers: list[dict[str, Any]] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": "team-a",
        "uid": f"uid-{name}",
        "labels": {"sd-operator.dev/instance": "demo", "app.kubernetes.io/component": "webui"},
        "creationTimestamp": "2024-05-01T10:00:00Z",
    }
    if deleting:
        metadata["deletionTimestamp"] = "2024-05-01T11:00:00Z"
        metadata["deletionGracePeriodSeconds"] = 120
    status: dict[str, Any] = {"phase": phase, "qosClass": "Burstable"}
    if conditions is not None:
        status["conditions"] = conditions
    if init is not None:
        status["initContainerStatuses"] = init
    if containers is not None:
        status["containerStatuses"] = containers
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": {"nodeName": "gpu-0"}, "status": status}


def scheduled_pod(name: str, init: list[dict[str, Any]], containers: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return make_pod(name, conditions=[condition("PodScheduled", "True")], init=init, containers=containers, **kw)


# Pods in each stage of an instance's life, as the kubelet reports them.


def unschedulable_pod(name: str = "p-unsched") -> dict[str, Any]:
    return make_pod(name, conditions=[condition("PodScheduled", "False", "Unschedulable", UNSCHEDULABLE_MESSAGE)])


def created_pod(name: str = "p-new") -> dict[str, Any]:
    return make_pod(name)


def downloading_pod(name: str = "p-dl") -> dict[str, Any]:
    return scheduled_pod(
        name,
        init=[fetch_status(running())],
        containers=[webui_status(waiting("PodInitializing"))],
    )


def loading_pod(name: str = "p-load") -> dict[str, Any]:
    return scheduled_pod(
        name,
        init=[fetch_status(terminated(0, reason="Completed"))],
        containers=[webui_status(running())],
        phase="Running",
    )


def ready_pod(name: str = "p-ready") -> dict[str, Any]:
    return make_pod(
        name,
        phase="Running",
        conditions=[
            condition("PodScheduled", "True"),
            condition("Initialized", "True"),
            condition("ContainersReady", "True"),
            condition("Ready", "True"),
        ],
        init=[fetch_status(terminated(0, reason="Completed"))],
        containers=[webui_status(running(), ready=True)],
    )


FETCH_FAILURE = "fetching Stable-diffusion/ckpt.safetensors\nchecking sha256\nsha256 mismatch for ckpt.safetensors\n"


def fetch_failed_pod(name: str = "p-fetchfail") -> dict[str, Any]:
    return scheduled_pod(
        name,
        init=[fetch_status(terminated(1, FETCH_FAILURE))],
        containers=[webui_status(waiting("PodInitializing"))],
    )


def image_pull_pod(name: str = "p-pull") -> dict[str, Any]:
    return scheduled_pod(
        name,
        init=[fetch_status(terminated(0, reason="Completed"))],
        containers=[webui_status(waiting("ImagePullBackOff", 'Back-off pulling image "' + IMAGE + '"'))],
    )


def views(*pods: dict[str, Any]) -> list[dict[str, Any]]:
    return [pod_view(p) for p in pods]


def make_spec(replicas: int = 1, sha256: str | None = None, **extra: Any) -> SDInstanceSpec:
    checkpoint: dict[str, Any] = {
        "name": "ckpt.safetensors",
        "source": {"huggingFace": {"repo": "owner/repo", "file": "ckpt.safetensors"}},
    }
    if sha256:
        checkpoint["sha256"] = sha256
    return SDInstanceSpec.model_validate(
        {"model": {"family": "sdxl", "checkpoint": checkpoint}, "replicas": replicas, **extra}
    )


def status_of(
    pods: list[dict[str, Any]],
    *,
    replicas: int = 1,
    spec: SDInstanceSpec | None = None,
    previous: dict[str, Any] | None = None,
    generation: int | None = 3,
) -> dict[str, Any]:
    return derive_status("demo", "team-a", spec or make_spec(replicas), pods, previous, generation)


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = get_condition(status["conditions"], type_)
    assert found is not None, f"no {type_} condition"
    return found


# ---------------------------------------------------------------------------------------------
# 6. pod_view


def test_terminating_pod() -> None:
    view = pod_view(make_pod("p-old", deleting=True, conditions=[condition("Ready", "True")]))
    assert view["state"] == "Terminating"
    assert view["name"] == "p-old"
    assert "p-old" in view["message"]


def test_unschedulable_pod_carries_the_scheduler_message() -> None:
    view = pod_view(unschedulable_pod("p-u"))
    assert view == {
        "name": "p-u",
        "state": "Unschedulable",
        "reason": "Unschedulable",
        "message": UNSCHEDULABLE_MESSAGE,
    }


def test_fetch_model_running_is_downloading() -> None:
    view = pod_view(downloading_pod())
    assert view["state"] == "Downloading"
    assert view["reason"] == "Downloading"


def test_fetch_model_failure_reports_the_last_line_of_its_message() -> None:
    view = pod_view(fetch_failed_pod())
    assert view["state"] == "Failed"
    assert view["reason"] == "ModelFetchFailed"
    assert view["message"] == "sha256 mismatch for ckpt.safetensors"


def test_fetch_model_crash_loop_uses_the_last_termination() -> None:
    pod = scheduled_pod(
        "p-crashfetch",
        init=[
            fetch_status(
                waiting("CrashLoopBackOff", "back-off 40s restarting failed container=fetch-model"),
                last_state=terminated(1, "download failed\nHTTP 401 from huggingface.co for ckpt.safetensors"),
                restarts=3,
            )
        ],
        containers=[webui_status(waiting("PodInitializing"))],
    )
    view = pod_view(pod)
    assert view["state"] == "Failed"
    assert view["reason"] == "ModelFetchFailed"
    assert view["message"] == "HTTP 401 from huggingface.co for ckpt.safetensors"


def test_fetch_model_failure_without_a_message_names_the_exit_code_or_reason() -> None:
    pod = scheduled_pod(
        "p-oom",
        init=[fetch_status(terminated(137, None, reason="OOMKilled"))],
        containers=[webui_status(waiting("PodInitializing"))],
    )
    view = pod_view(pod)
    assert view["state"] == "Failed"
    assert view["reason"] == "ModelFetchFailed"
    assert "OOMKilled" in view["message"] or "137" in view["message"]


def test_completed_fetch_is_not_a_failure() -> None:
    pod = scheduled_pod(
        "p-init-done",
        init=[fetch_status(terminated(0, "all files verified", reason="Completed"))],
        containers=[webui_status(waiting("ContainerCreating"))],
    )
    assert pod_view(pod)["state"] == "Pending"


@pytest.mark.parametrize("reason", ["ImagePullBackOff", "ErrImagePull"])
def test_image_pull_failure_names_the_image(reason: str) -> None:
    pod = scheduled_pod(
        "p-pull",
        init=[fetch_status(terminated(0, reason="Completed"))],
        containers=[webui_status(waiting(reason, f'Back-off pulling image "{IMAGE}"'))],
    )
    view = pod_view(pod)
    assert view["state"] == "Failed"
    assert view["reason"] == "ImagePullFailed"
    assert IMAGE in view["message"]


def test_webui_crash_loop_is_failed_with_the_crash_message() -> None:
    pod = scheduled_pod(
        "p-crash",
        init=[fetch_status(terminated(0, reason="Completed"))],
        containers=[
            webui_status(
                waiting("CrashLoopBackOff", "back-off 5m0s restarting failed container=webui"),
                last_state=terminated(
                    1, "Traceback (most recent call last):\ntorch.cuda.OutOfMemoryError: CUDA out of memory"
                ),
                restarts=6,
            )
        ],
        phase="Running",
    )
    view = pod_view(pod)
    assert view["state"] == "Failed"
    assert view["reason"] == "CrashLoopBackOff"
    assert "torch.cuda.OutOfMemoryError: CUDA out of memory" in view["message"]
    assert "Traceback" not in view["message"]


def test_running_not_ready_is_loading() -> None:
    assert pod_view(loading_pod())["state"] == "Loading"


def test_ready() -> None:
    view = pod_view(ready_pod("p-r"))
    assert view["state"] == "Ready"
    assert view["name"] == "p-r"


@pytest.mark.parametrize(
    "pod",
    [
        make_pod("p-empty"),
        {"metadata": {"name": "p-bare"}},
        make_pod("p-scheduled", conditions=[condition("PodScheduled", "True")]),
        scheduled_pod("p-creating", init=[fetch_status(waiting("PodInitializing"))], containers=[]),
    ],
    ids=["no-status", "bare", "scheduled", "init-waiting"],
)
def test_nothing_started_yet_is_pending(pod: dict[str, Any]) -> None:
    assert pod_view(pod)["state"] == "Pending"


# ---------------------------------------------------------------------------------------------
# 7. derive_status


def test_all_ready() -> None:
    status = status_of(views(ready_pod("a"), ready_pod("b")), replicas=2)
    assert status["phase"] == "Ready"
    assert status["ready"] == "2/2"
    assert status["readyReplicas"] == 2
    assert status["replicas"] == 2
    assert "2/2" in status["message"]
    assert cond(status, "Ready")["status"] == "True"
    assert cond(status, "PodScheduled")["status"] == "True"
    assert cond(status, "ModelFetched")["status"] == "True"


def test_terminating_pods_do_not_count() -> None:
    status = status_of(views(ready_pod("a"), make_pod("old", deleting=True)), replicas=1)
    assert status["phase"] == "Ready"
    assert status["replicas"] == 1


def test_scaled_to_zero_is_ready() -> None:
    status = status_of([], replicas=0)
    assert status["phase"] == "Ready"
    assert status["ready"] == "0/0"
    ready = cond(status, "Ready")
    assert ready["status"] == "True"
    assert ready["reason"] == "ScaledToZero"


def test_some_ready_and_one_failed_is_degraded_with_the_failure() -> None:
    status = status_of(views(ready_pod("a"), fetch_failed_pod("b")), replicas=2)
    assert status["phase"] == "Degraded"
    assert status["ready"] == "1/2"
    assert "sha256 mismatch for ckpt.safetensors" in status["message"]
    assert cond(status, "Ready")["status"] == "False"
    assert cond(status, "ModelFetched")["status"] == "False"


def test_some_ready_and_one_unschedulable_is_degraded_with_the_scheduler_message() -> None:
    status = status_of(views(ready_pod("a"), unschedulable_pod("b")), replicas=2)
    assert status["phase"] == "Degraded"
    assert UNSCHEDULABLE_MESSAGE in status["message"]
    assert cond(status, "PodScheduled")["status"] == "False"


def test_none_ready_and_one_failed_is_failed() -> None:
    status = status_of(views(image_pull_pod("a"), loading_pod("b")), replicas=2)
    assert status["phase"] == "Failed"
    assert IMAGE in status["message"]
    ready = cond(status, "Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == "ImagePullFailed"


def test_fetch_failure_fails_the_instance_and_the_model_fetched_condition() -> None:
    status = status_of(views(fetch_failed_pod()))
    assert status["phase"] == "Failed"
    assert status["message"] == "sha256 mismatch for ckpt.safetensors"
    fetched = cond(status, "ModelFetched")
    assert fetched["status"] == "False"
    assert fetched["reason"] == "ModelFetchFailed"
    assert fetched["message"] == "sha256 mismatch for ckpt.safetensors"


@pytest.mark.parametrize(
    ("pods", "phase", "message"),
    [
        ([unschedulable_pod("a"), loading_pod("b"), downloading_pod("c")], "Loading", "loading the model"),
        ([unschedulable_pod("a"), downloading_pod("b")], "Downloading", "fetching model files"),
        ([downloading_pod("a"), loading_pod("b")], "Loading", "loading the model"),
        ([created_pod("a"), unschedulable_pod("b")], "Pending", UNSCHEDULABLE_MESSAGE),
        ([unschedulable_pod("a")], "Pending", UNSCHEDULABLE_MESSAGE),
        ([created_pod("a"), created_pod("b")], "Pending", "waiting for the pod to start"),
    ],
    ids=["loading-wins", "downloading-wins", "loading-over-downloading", "pending-unsched", "unsched", "created"],
)
def test_none_ready_shows_the_most_advanced_phase(pods: list[dict[str, Any]], phase: str, message: str) -> None:
    status = status_of(views(*pods), replicas=len(pods))
    assert status["phase"] == phase
    assert status["message"] == message
    assert cond(status, "Ready")["status"] == "False"


def test_no_pods_yet_is_pending() -> None:
    status = status_of([], replicas=1)
    assert status["phase"] == "Pending"
    assert status["ready"] == "0/1"


@pytest.mark.parametrize(
    ("pods", "scheduled", "fetched"),
    [
        ([unschedulable_pod()], "False", "Unknown"),
        ([downloading_pod()], "True", "Unknown"),
        ([loading_pod()], "True", "True"),
        ([ready_pod()], "True", "True"),
        ([fetch_failed_pod()], "True", "False"),
        ([fetch_failed_pod("a"), ready_pod("b")], "True", "False"),
    ],
)
def test_scheduled_and_fetched_conditions(pods: list[dict[str, Any]], scheduled: str, fetched: str) -> None:
    status = status_of(views(*pods), replicas=len(pods))
    assert cond(status, "PodScheduled")["status"] == scheduled
    assert cond(status, "ModelFetched")["status"] == fetched
    if scheduled == "False":
        assert cond(status, "PodScheduled")["message"] == UNSCHEDULABLE_MESSAGE


def test_conditions_are_standard_and_carry_the_generation() -> None:
    status = status_of(views(ready_pod()), generation=7)
    assert [c["type"] for c in status["conditions"]] == ["Ready", "PodScheduled", "ModelFetched"]
    for c in status["conditions"]:
        assert c["status"] in ("True", "False", "Unknown")
        assert c["reason"]
        assert TIMESTAMP.fullmatch(c["lastTransitionTime"])
        assert c["observedGeneration"] == 7


def test_transition_time_kept_when_unchanged_and_renewed_when_changed() -> None:
    previous = {
        "observedGeneration": 2,
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "Ready", "message": "1/1", "lastTransitionTime": OLD_TIME},
            {
                "type": "PodScheduled",
                "status": "True",
                "reason": "Scheduled",
                "message": "",
                "lastTransitionTime": OLD_TIME,
            },
            {
                "type": "ModelFetched",
                "status": "True",
                "reason": "Fetched",
                "message": "",
                "lastTransitionTime": OLD_TIME,
            },
            {"type": "Custom", "status": "True", "reason": "Other", "message": "", "lastTransitionTime": OLD_TIME},
        ],
    }
    still_ready = status_of(views(ready_pod()), previous=previous)
    for type_ in ("Ready", "PodScheduled", "ModelFetched"):
        assert cond(still_ready, type_)["lastTransitionTime"] == OLD_TIME
    # An unrelated condition survives.
    assert cond(still_ready, "Custom")["lastTransitionTime"] == OLD_TIME

    unschedulable = status_of(views(unschedulable_pod()), previous=previous)
    for type_ in ("Ready", "PodScheduled", "ModelFetched"):
        renewed = cond(unschedulable, type_)["lastTransitionTime"]
        assert renewed != OLD_TIME, type_
        assert TIMESTAMP.fullmatch(renewed)
    assert cond(unschedulable, "Ready")["status"] == "False"
    assert cond(unschedulable, "ModelFetched")["status"] == "Unknown"


def test_reason_and_message_change_without_renewing_the_transition_time() -> None:
    previous = {
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "Downloading",
                "message": "x",
                "lastTransitionTime": OLD_TIME,
            }
        ]
    }
    status = status_of(views(loading_pod()), previous=previous)
    ready = cond(status, "Ready")
    assert ready["reason"] == "Loading"
    assert ready["lastTransitionTime"] == OLD_TIME


def test_observed_generation_from_the_argument_else_the_previous_status() -> None:
    previous = {"observedGeneration": 4, "conditions": []}
    assert status_of(views(ready_pod()), previous=previous, generation=5)["observedGeneration"] == 5
    from_previous = status_of(views(ready_pod()), previous=previous, generation=None)
    assert from_previous["observedGeneration"] == 4
    assert cond(from_previous, "Ready")["observedGeneration"] == 4
    assert "observedGeneration" not in status_of(views(ready_pod()), previous=None, generation=None)


@pytest.mark.parametrize(
    ("declared", "expected"),
    [("AB" * 32, "ab" * 32), ("0f" * 32, "0f" * 32), (None, None)],
)
def test_model_sha256_is_the_declared_one(declared: str | None, expected: str | None) -> None:
    status = status_of(views(ready_pod()), spec=make_spec(sha256=declared))
    assert "modelSHA256" in status  # None is written, to remove a stale value with a merge patch
    assert status["modelSHA256"] == expected


def fetched_pod(name: str, message: str, ready: bool = True) -> dict[str, Any]:
    pod = ready_pod(name) if ready else loading_pod(name)
    pod["status"]["initContainerStatuses"] = [fetch_status(terminated(0, message, reason="Completed"))]
    return pod


def summary(digest: str, extra: dict[str, str] | None = None) -> str:
    return json.dumps({"sha256": {"Stable-diffusion/ckpt.safetensors": digest, **(extra or {})}})


def test_undeclared_sha256_comes_from_what_the_fetchers_computed() -> None:
    lora = {"Lora/style.safetensors": "cd" * 32}
    pods = views(fetched_pod("a", summary("ab" * 32, lora)), fetched_pod("b", summary("AB" * 32), ready=False))
    assert status_of(pods, replicas=2)["modelSHA256"] == "ab" * 32  # loading pods count; hex is lower case
    # Pods that fetched different bytes (a source that changed between them): no hash rather than one.
    split = views(fetched_pod("a", summary("ab" * 32)), fetched_pod("b", summary("ef" * 32)))
    assert status_of(split, replicas=2)["modelSHA256"] is None
    # A declared hash wins (the fetcher refuses any other bytes); a message that is not a summary is ignored.
    assert status_of(pods, spec=make_spec(replicas=2, sha256="12" * 32))["modelSHA256"] == "12" * 32
    assert status_of(views(fetched_pod("a", "done")))["modelSHA256"] is None
    assert status_of(views(fetched_pod("a", summary("ab" * 32), ready=False)))["phase"] == "Loading"


def test_selector_endpoint_and_gpu() -> None:
    spec = make_spec(webui={"port": 7000}, gpu={"product": "NVIDIA-L4", "memoryGiB": 24})
    status = derive_status("demo", "team-a", spec, [], None, 1)
    owner = {"kind": "SDInstance", "metadata": {"name": "demo", "namespace": "team-a", "uid": "u1"}}
    match_labels = render_deployment(owner, spec, RenderSettings())["spec"]["selector"]["matchLabels"]
    assert status["selector"] == ",".join(f"{k}={v}" for k, v in match_labels.items())
    assert status["selector"] == "sd-operator.dev/instance=demo,app.kubernetes.io/component=webui"
    assert status["endpoint"] == "http://demo-webui.team-a.svc:7000"
    assert status["gpu"] == "1x NVIDIA-L4 (24GiB)"
