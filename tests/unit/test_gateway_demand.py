"""What the gateway does for autoscaling: demand per model, requests held through a cold start, models
at zero still listed, and when a demand report is written."""

from __future__ import annotations

import asyncio
import json

import pytest

from sd_operator.autoscaling import DEMAND_HEARTBEAT_SECONDS
from sd_operator.gateway.demand import (
    DEMAND_LABEL,
    MIN_INTERVAL,
    DemandPublisher,
    parse_report,
    render_report,
    report_name,
)
from sd_operator.gateway.discovery import declared_model
from sd_operator.gateway.dispatch import Backend, ColdStartTimeout, Dispatcher, NoBackend
from sd_operator.gateway.registry import ModelNotReady, Registry


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_demand_counts_queued_and_running_per_model() -> None:
    async def scenario() -> None:
        d = Dispatcher()
        b = Backend("http://a", "m")
        d.add(b)
        await d.acquire("m")
        waiting = [asyncio.create_task(d.acquire("m")) for _ in range(3)]
        await _settle()
        demand = d.demand()
        assert set(demand) == {"m"}
        assert (demand["m"]["queued"], demand["m"]["running"]) == (3, 1)
        assert demand["m"]["oldestWaitSeconds"] >= 0
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        d.release(b, ok=True)
        assert d.demand() == {}

    asyncio.run(scenario())


def test_a_model_without_backends_is_refused_unless_it_may_cold_start() -> None:
    async def scenario() -> None:
        d = Dispatcher()
        with pytest.raises(NoBackend):
            await d.acquire("m")
        held = asyncio.create_task(d.acquire("m", cold_start=30))
        await _settle()
        assert not held.done()
        assert d.demand() == {"m": {"queued": 1, "running": 0, "oldestWaitSeconds": pytest.approx(0, abs=1)}}
        b = Backend("http://a", "m")
        d.add(b)  # the first pod is ready: the held request goes to it
        assert await asyncio.wait_for(held, 2) is b

    asyncio.run(scenario())


def test_a_cold_start_slower_than_the_timeout_leaves_the_queue() -> None:
    async def scenario() -> None:
        d = Dispatcher()
        with pytest.raises(ColdStartTimeout, match=r"within 0\.3s"):
            await d.acquire("m", cold_start=0.3)
        assert d.queue_depth("m") == 0 and d.demand() == {}

    asyncio.run(scenario())


def test_after_the_first_backend_the_timeout_no_longer_applies() -> None:
    """Requests behind the first one wait their turn on the pod that came up, however long that takes."""

    async def scenario() -> None:
        d = Dispatcher()
        first, second = (asyncio.create_task(d.acquire("m", cold_start=0.5)) for _ in range(2))
        await _settle()
        b = Backend("http://a", "m")
        d.add(b)
        assert await asyncio.wait_for(first, 1) is b
        await asyncio.sleep(0.8)  # past the cold-start timeout, still queued behind `first`
        assert not second.done()
        d.release(b, ok=True)
        assert await asyncio.wait_for(second, 1) is b

    asyncio.run(scenario())


def test_a_client_gone_during_a_cold_start_leaves_the_queue() -> None:
    async def scenario() -> None:
        d = Dispatcher()
        held = asyncio.create_task(d.acquire("m", cold_start=30))
        await _settle()
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
        assert d.queue_depth("m") == 0

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------
# Discovery and the registry: instances at zero


def instance(name: str, *, autoscaling: bool, phase: str, reason: str, annotations: dict | None = None) -> dict:
    spec: dict = {"model": {"family": "sd15", "checkpoint": {"name": "cold.safetensors"}}}
    if autoscaling:
        spec["autoscaling"] = {"minReplicas": 0, "maxReplicas": 2}
    return {
        "metadata": {"namespace": "ns", "name": name, "annotations": annotations or {}},
        "spec": spec,
        "status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if phase == "Ready" else "False", "reason": reason}],
        },
    }


def test_an_autoscaled_instance_at_zero_takes_requests() -> None:
    registry = Registry(Dispatcher())
    model = declared_model(instance("a", autoscaling=True, phase="Ready", reason="ScaledToZero"))
    assert model is not None and model.scalable and model.state == "ScaledToZero"
    registry.declared[model.instance] = model
    assert registry.resolve("cold") == "cold.safetensors"
    assert registry.cold_start("cold.safetensors")
    listed = registry.sd_models()
    assert [m["filename"] for m in listed] == ["cold.safetensors"]


def test_a_fixed_instance_at_zero_or_a_failed_one_is_not_waited_for() -> None:
    for body in (
        instance("b", autoscaling=False, phase="Ready", reason="ScaledToZero"),
        instance("c", autoscaling=True, phase="Failed", reason="ModelFetchFailed"),
    ):
        registry = Registry(Dispatcher())
        model = declared_model(body)
        assert model is not None
        registry.declared[model.instance] = model
        with pytest.raises(ModelNotReady):
            registry.resolve("cold.safetensors")


def test_the_scale_from_zero_annotation_marks_an_externally_scaled_instance() -> None:
    body = instance(
        "k",
        autoscaling=False,
        phase="Ready",
        reason="ScaledToZero",
        annotations={"sd-operator.dev/scale-from-zero": "true"},
    )
    model = declared_model(body)
    assert model is not None and model.scalable


# ---------------------------------------------------------------------------------------------
# Demand reports


def test_report_round_trip_and_ownership() -> None:
    cm = render_report("gw-7f9c", "sd-system", {"m": {"queued": 2, "running": 1, "oldestWaitSeconds": 3.0}}, 1e9,
                       {"name": "gw-7f9c", "uid": "u-1"})  # fmt: skip
    assert cm["metadata"]["name"] == report_name("gw-7f9c") == "sd-gateway-demand-gw-7f9c"
    assert cm["metadata"]["labels"][DEMAND_LABEL] == "true"
    assert cm["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": "gw-7f9c", "uid": "u-1"}]
    parsed = parse_report(cm)
    assert parsed == {
        "gateway": "gw-7f9c",
        "renewTime": 1e9,
        "models": {"m": {"queued": 2, "running": 1, "oldestWaitSeconds": 3.0}},
    }
    assert parse_report({"data": {"demand.json": "not json"}}) is None
    assert json.loads(cm["data"]["demand.json"])["gateway"] == "gw-7f9c"


def test_report_names_are_valid_object_names() -> None:
    assert report_name("My_Host.local") == "sd-gateway-demand-my-host-local"


def test_when_a_report_is_written() -> None:
    pub = DemandPublisher(Dispatcher(), "gw", "ns")
    busy = {"m": {"queued": 2, "running": 1, "oldestWaitSeconds": 1.0}}
    assert pub.due({}, now=0)  # the first report, even empty (a restarted gateway clears its old one)
    pub.written, pub.written_at = {}, 0.0
    assert pub.due(busy, now=0.01)  # a model wakes up: at once
    pub.written, pub.written_at = {"m": (2, 1)}, 0.0
    older = {"m": {**busy["m"], "oldestWaitSeconds": 9.0}}
    assert not pub.due(older, now=0.5)  # only the age changed
    changed = {"m": {"queued": 3, "running": 1, "oldestWaitSeconds": 1.0}}
    assert not pub.due(changed, now=MIN_INTERVAL / 2)  # counts changed: not more often than MIN_INTERVAL
    assert pub.due(changed, now=MIN_INTERVAL)
    assert pub.due(busy, now=DEMAND_HEARTBEAT_SECONDS)  # unchanged demand is renewed
    pub.written = {}
    assert not pub.due({}, now=DEMAND_HEARTBEAT_SECONDS * 10)  # no demand: nothing to renew


def test_the_gateway_stays_ready_while_every_model_sleeps_at_zero() -> None:
    """Its readiness keeps it in its Service: else the request that wakes a model could never arrive."""
    from aiohttp.test_utils import TestClient, TestServer

    from sd_operator.gateway.app import STATE, create_app
    from sd_operator.gateway.config import GatewayConfig

    async def scenario() -> tuple[int, int, dict]:
        app = create_app(GatewayConfig())
        async with TestClient(TestServer(app, host="127.0.0.1")) as http:
            empty = (await http.get("/readyz")).status
            model = declared_model(instance("a", autoscaling=True, phase="Ready", reason="ScaledToZero"))
            assert model is not None
            app[STATE].registry.declared[model.instance] = model
            answer = await http.get("/readyz")
            return empty, answer.status, await answer.json()

    empty, sleeping, body = asyncio.run(scenario())
    assert (empty, sleeping) == (503, 200)
    assert body["scalesFromZero"] == ["cold.safetensors"]
