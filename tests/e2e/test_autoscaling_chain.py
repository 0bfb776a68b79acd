"""Autoscaling end to end: SDInstances with spec.autoscaling follow the demand the gateways hold, from zero
and back, and no request is lost on the way (real operator, real gateways, pods run by the local runner)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from e2e_support import GROUP, VERSION, Chain, get, instance, start_gateway, wait_phase, webui_pods
from kubernetes import client

from helpers import wait_for
from processes import Proc


def autoscaled(name: str, checkpoint: str, **autoscaling: Any) -> dict[str, Any]:
    body = instance(name, checkpoint, autoscaling={"minReplicas": 0, **autoscaling})
    body["spec"].pop("replicas")
    return body


def txt2img(
    url: str, checkpoint: str, tag: str, *, steps: int = 60, size: int = 768, n_iter: int = 1
) -> requests.Response:
    return requests.post(
        f"{url}/sdapi/v1/txt2img",
        json={
            "prompt": f"a lighthouse in fog, {tag}",
            "steps": steps,
            "width": size,
            "height": size,
            "n_iter": n_iter,
            "seed": 1234,
            "override_settings": {"sd_model_checkpoint": checkpoint},
        },
        timeout=600,
    )


def status(custom: client.CustomObjectsApi, ns: str, name: str) -> dict[str, Any]:
    return get(custom, ns, "sdinstances", name).get("status") or {}


def scale_events(chain: Chain, ns: str, name: str) -> list[client.CoreV1Event]:
    events = chain.cluster.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return sorted(
        (e for e in events if e.reason in ("ScaledUp", "ScaledDown", "ScaledToZero")),
        key=lambda e: e.first_timestamp or e.event_time or e.metadata.creation_timestamp,
    )


def wait_at_zero(chain: Chain, custom: client.CustomObjectsApi, ns: str, name: str, timeout: float = 120) -> None:
    def at_zero() -> bool:
        s = status(custom, ns, name)
        ready = next((c for c in s.get("conditions") or [] if c["type"] == "Ready"), {})
        return (
            s.get("desiredReplicas") == 0
            and s.get("phase") == "Ready"
            and ready.get("reason") == "ScaledToZero"
            and not webui_pods(chain, ns, name)
        )

    wait_for(at_zero, timeout=timeout, what=f"{name} at zero with no pods")


def listed(url: str, checkpoint: str) -> dict[str, Any] | None:
    models = requests.get(f"{url}/v1/models", timeout=10).json()
    return next((m for m in models if m["filename"] == checkpoint), None)


@pytest.fixture
def extra_gateways(chain: Chain, tmp_path: Path) -> Iterator[list[Proc]]:
    """Gateways started by a test (besides the chain's), stopped afterwards."""
    chain.require_local()
    started: list[Proc] = []
    yield started
    for gw in started:
        gw.stop()


def test_a_burst_scales_from_zero_to_three_and_back_to_zero_with_every_request_answered(
    chain: Chain, custom: client.CustomObjectsApi, namespace: str
) -> None:
    ckpt = f"e2e-burst-{chain.run_id}.safetensors"
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "sdinstances",
        autoscaled("burst", ckpt, maxReplicas=3, targetPerReplica=2, scaleDownDelaySeconds=8),
    )
    wait_at_zero(chain, custom, namespace, "burst", timeout=60)
    wait_for(lambda: (listed(chain.gateway_url, ckpt) or {}).get("state") == "ScaledToZero", timeout=30,
             what="the gateway to list the model at zero")  # fmt: skip
    assert requests.get(f"{chain.gateway_url}/sdapi/v1/sd-models", timeout=10).json()

    # 24 requests at once for a model with no pod: all held, the fleet scales up (capped at 3), all answered.
    seen_desired: set[int] = set()
    limited = []
    with ThreadPoolExecutor(24) as pool:
        pending = [pool.submit(txt2img, chain.gateway_url, ckpt, f"burst {i} {chain.run_id}") for i in range(24)]
        while not all(f.done() for f in pending):
            s = status(custom, namespace, "burst")
            seen_desired.add(s.get("desiredReplicas", -1))
            limited += [c for c in s.get("conditions") or [] if c["type"] == "ScalingLimited" and c["status"] == "True"]
            time.sleep(0.3)
        answers = [f.result() for f in pending]
    assert [a.status_code for a in answers] == [200] * 24, [a.text[:200] for a in answers if a.status_code != 200]
    assert not [a for a in answers if "X-SD-Attempts" in a.headers], "a request was retried"
    assert 3 in seen_desired, seen_desired
    assert limited and "maxReplicas is 3" in limited[0]["message"]
    served = {a.headers["X-SD-Backend"] for a in answers}
    assert served == {f"{namespace}/burst"}
    # Each request rendered once: the gateway counted 24 completions over the replicas it used.
    done = sum(b["completed"] for b in requests.get(f"{chain.gateway_url}/v1/instances", timeout=10).json()
               if b["model"] == ckpt)  # fmt: skip
    assert done == 24

    # No demand: after the delay, back to zero; the status and Events tell each step and why.
    wait_at_zero(chain, custom, namespace, "burst", timeout=120)
    final = status(custom, namespace, "burst")
    assert final["lastScaleReason"].startswith("scaled ") and final["lastScaleReason"].endswith("no demand for 8s")
    events = scale_events(chain, namespace, "burst")
    reasons = [e.reason for e in events]
    assert reasons[0] == "ScaledUp" and reasons[-1] == "ScaledToZero", reasons
    assert "demand" in events[0].message and "queued" in events[0].message, events[0].message
    assert (listed(chain.gateway_url, ckpt) or {}).get("state") in ("ScaledToZero", "Ready")


def test_demand_of_two_gateways_is_summed(
    chain: Chain, custom: client.CustomObjectsApi, namespace: str, extra_gateways: list[Proc], tmp_path: Path
) -> None:
    """Two requests held in each gateway: one gateway's demand (2) asks for one replica, the sum (4) for two."""
    second = start_gateway(chain.cluster, tmp_path / "gateway-2.log", "--gateway-id=e2e-second")
    extra_gateways.append(second)
    ckpt = f"e2e-pair-{chain.run_id}.safetensors"
    # A slow model load keeps the requests waiting while the operator reads both reports.
    body = autoscaled("pair", ckpt, maxReplicas=3, targetPerReplica=2, scaleDownDelaySeconds=120)
    body["spec"]["webui"] = {"extraArgs": ["--load-seconds", "10"]}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "sdinstances", body)
    wait_at_zero(chain, custom, namespace, "pair", timeout=60)
    for url in (chain.gateway_url, second.url):
        wait_for(lambda url=url: listed(url, ckpt) is not None, timeout=30, what="both gateways to know the model")

    with ThreadPoolExecutor(4) as pool:
        urls = [chain.gateway_url, chain.gateway_url, second.url, second.url]
        pending = [pool.submit(txt2img, url, ckpt, f"pair {i} {chain.run_id}") for i, url in enumerate(urls)]
        wait_for(lambda: status(custom, namespace, "pair").get("desiredReplicas") == 2, timeout=60,
                 what="two replicas for the summed demand")  # fmt: skip
        answers = [f.result() for f in pending]
    assert [a.status_code for a in answers] == [200] * 4
    # The scale to 2 came from more demand than either gateway held (2 each; reports land one at a time).
    messages = [e.message for e in scale_events(chain, namespace, "pair")]
    to_two = [int(m[1]) for m in (re.search(r"-> 2: demand (\d+)", m) for m in messages) if m]
    assert to_two and to_two[0] > 2, messages


def test_a_long_generation_completes_while_its_pod_is_scaled_away(
    chain: Chain, custom: client.CustomObjectsApi, namespace: str
) -> None:
    """The worst case of a scale-down: the pod removed is the one rendering. It drains (preStop, then the
    WebUI finishes what it runs) while the gateway sends it nothing new: the request still gets 200."""
    chain.require_local()
    ckpt = f"e2e-drain-{chain.run_id}.safetensors"
    body = autoscaled("drain", ckpt, minReplicas=1, maxReplicas=2, targetPerReplica=1, scaleDownDelaySeconds=2)
    # On the RTX 4090 nodes: the long generation's length is then known (about 33 s at the local time scale),
    # well past the scale-down and well within the drain's 110 s.
    body["spec"]["gpu"] = {"memoryGiB": 24, "product": "NVIDIA-GeForce-RTX-4090"}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "sdinstances", body)
    wait_phase(custom, namespace, "drain", "Ready", timeout=120)
    (first,) = webui_pods(chain, namespace, "drain")
    wait_for(lambda: (listed(chain.gateway_url, ckpt) or {}).get("instances") == 1, timeout=60,
             what="the gateway to use the first pod")  # fmt: skip

    with ThreadPoolExecutor(2) as pool:
        # Long: 5 x 1000 steps at 1024²; it takes the idle first pod.
        long = pool.submit(txt2img, chain.gateway_url, ckpt, f"long {chain.run_id}", steps=1000, size=1024, n_iter=5)
        wait_for(lambda: (listed(chain.gateway_url, ckpt) or {}).get("idle") == 0, timeout=30, what="long running")
        short = pool.submit(txt2img, chain.gateway_url, ckpt, f"short {chain.run_id}", steps=10, size=512)
        # The short one waits for a second pod (demand 2 -> 2 replicas). Make the scheduler keep that one when
        # the count drops back to 1, so the pod removed is the busy first one.
        wait_for(lambda: len(webui_pods(chain, namespace, "drain")) == 2, timeout=60, what="a second pod")
        (newer,) = [p for p in webui_pods(chain, namespace, "drain") if p.metadata.name != first.metadata.name]
        chain.cluster.core.patch_namespaced_pod(
            newer.metadata.name,
            namespace,
            {"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "1000"}}},
        )
        assert short.result().status_code == 200
        # Demand is the long request alone now: down to one replica, and the busy pod is the one to go.
        wait_for(lambda: status(custom, namespace, "drain").get("desiredReplicas") == 1, timeout=60,
                 what="a scale down to 1")  # fmt: skip
        wait_for(lambda: first.metadata.name not in {p.metadata.name for p in webui_pods(chain, namespace, "drain")},
                 timeout=60, what="the busy pod to be terminating")  # fmt: skip
        assert not long.done(), "the long generation ended before its pod was removed: the test proved nothing"
        answer = long.result()
    assert answer.status_code == 200, answer.text[:300]
    assert "X-SD-Attempts" not in answer.headers  # finished where it started, not retried elsewhere
    assert answer.json()["images"]


def test_a_cold_start_slower_than_the_timeout_gets_503_then_succeeds(
    chain: Chain, custom: client.CustomObjectsApi, namespace: str, extra_gateways: list[Proc], tmp_path: Path
) -> None:
    impatient = start_gateway(chain.cluster, tmp_path / "gateway-cold.log", "--gateway-id=e2e-cold",
                              "--cold-start-timeout=1")  # fmt: skip
    extra_gateways.append(impatient)
    ckpt = f"e2e-cold-{chain.run_id}.safetensors"
    body = autoscaled("cold", ckpt, maxReplicas=1, scaleDownDelaySeconds=120)
    body["spec"]["webui"] = {"extraArgs": ["--load-seconds", "6"]}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "sdinstances", body)
    wait_at_zero(chain, custom, namespace, "cold", timeout=60)
    wait_for(lambda: listed(impatient.url, ckpt) is not None, timeout=30, what="the gateway to know the model")

    refused = txt2img(impatient.url, ckpt, f"cold {chain.run_id}")
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["Retry-After"]) > 0
    detail = refused.json()
    assert detail["error"] == "ColdStartTimeout"
    assert f"{namespace}/cold" in detail["detail"] and detail["instances"][0]["instance"] == f"{namespace}/cold"

    # The held request counted as demand: a pod is on its way; retrying (as Retry-After says) succeeds.
    wait_for(lambda: status(custom, namespace, "cold").get("desiredReplicas") == 1, timeout=30, what="scale up")

    def retried() -> requests.Response | None:
        answer = txt2img(impatient.url, ckpt, f"cold {chain.run_id}")
        return answer if answer.status_code == 200 else None

    assert wait_for(retried, timeout=120, interval=1, what="a 200 after the cold start").json()["images"]
