"""The rest of the A1111 API through the gateway (in process, fake WebUI backends on 127.0.0.1): every route
of the pinned WebUI is served or refused with advice, png-info skips the queues, extras and interrogate are
queued with their own work units and go to the model with the most idle capacity unless one is named."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sd_operator.gateway import budget
from sd_operator.gateway.app import GPU_TASKS, READ_ONLY_GETS, REFUSED, STATE, create_app, most_idle_model
from sd_operator.gateway.config import GatewayConfig
from sd_operator.gateway.dispatch import Backend, Dispatcher

# Every route of modules/api/api.py at v1.10.1 (AUTOMATIC1111/stable-diffusion-webui @ 2fec947), server-* only
# with --api-server-stop.
WEBUI_ROUTES = {
    ("POST", "/sdapi/v1/txt2img"),
    ("POST", "/sdapi/v1/img2img"),
    ("POST", "/sdapi/v1/extra-single-image"),
    ("POST", "/sdapi/v1/extra-batch-images"),
    ("POST", "/sdapi/v1/png-info"),
    ("GET", "/sdapi/v1/progress"),
    ("POST", "/sdapi/v1/interrogate"),
    ("POST", "/sdapi/v1/interrupt"),
    ("POST", "/sdapi/v1/skip"),
    ("GET", "/sdapi/v1/options"),
    ("POST", "/sdapi/v1/options"),
    ("GET", "/sdapi/v1/cmd-flags"),
    ("GET", "/sdapi/v1/samplers"),
    ("GET", "/sdapi/v1/schedulers"),
    ("GET", "/sdapi/v1/upscalers"),
    ("GET", "/sdapi/v1/latent-upscale-modes"),
    ("GET", "/sdapi/v1/sd-models"),
    ("GET", "/sdapi/v1/sd-vae"),
    ("GET", "/sdapi/v1/hypernetworks"),
    ("GET", "/sdapi/v1/face-restorers"),
    ("GET", "/sdapi/v1/realesrgan-models"),
    ("GET", "/sdapi/v1/prompt-styles"),
    ("GET", "/sdapi/v1/embeddings"),
    ("POST", "/sdapi/v1/refresh-embeddings"),
    ("POST", "/sdapi/v1/refresh-checkpoints"),
    ("POST", "/sdapi/v1/refresh-vae"),
    ("POST", "/sdapi/v1/create/embedding"),
    ("POST", "/sdapi/v1/create/hypernetwork"),
    ("POST", "/sdapi/v1/train/embedding"),
    ("POST", "/sdapi/v1/train/hypernetwork"),
    ("GET", "/sdapi/v1/memory"),
    ("POST", "/sdapi/v1/unload-checkpoint"),
    ("POST", "/sdapi/v1/reload-checkpoint"),
    ("GET", "/sdapi/v1/scripts"),
    ("GET", "/sdapi/v1/script-info"),
    ("GET", "/sdapi/v1/extensions"),
    ("POST", "/sdapi/v1/server-kill"),
    ("POST", "/sdapi/v1/server-restart"),
    ("POST", "/sdapi/v1/server-stop"),
    ("GET", "/sdapi/v1/loras"),  # the built-in Lora extension's
    ("POST", "/sdapi/v1/refresh-loras"),
}


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


def backend(model: str, *, inflight: int = 0, url: str = "http://x") -> Backend:
    b = Backend(url, model)
    b.inflight = inflight
    return b


# --- choosing a model for work that does not depend on the checkpoint ---------------------------------------------


def test_most_idle_model_prefers_free_slots_beyond_the_queue() -> None:
    d = Dispatcher()
    assert most_idle_model(d) is None
    d.add(backend("a", inflight=1))
    d.add(backend("b"))
    assert most_idle_model(d) == "b"
    d.add(backend("a"))
    d.add(backend("a"))
    assert most_idle_model(d) == "a"  # two free slots against one


def test_most_idle_model_counts_waiting_requests_ejected_and_removed_backends() -> None:
    d = Dispatcher()
    busy_a, idle_b = backend("a", inflight=1), backend("b", inflight=1)
    for b in (busy_a, idle_b):
        d.add(b)

    async def queue_one_for_a() -> None:
        waiter = asyncio.create_task(d.acquire("a"))
        await asyncio.sleep(0)
        assert d.queue_depth("a") == 1
        assert most_idle_model(d) == "b"  # both busy; a has a request waiting too
        waiter.cancel()

    asyncio.run(queue_one_for_a())
    idle_b.inflight = 0
    spare = backend("a")
    d.add(spare)
    assert most_idle_model(d) == "a"
    d.eject(spare, 60)
    assert most_idle_model(d) == "b"
    d.reinstate(spare)
    d.remove(spare)
    assert most_idle_model(d) == "b"


def test_ties_go_to_more_instances_then_to_the_name() -> None:
    d = Dispatcher()
    for b in (backend("z"), backend("a"), backend("m", inflight=1), backend("m")):
        d.add(b)
    assert most_idle_model(d) == "m"  # one free slot each; m has two instances
    d.remove(d.backends["m"][0])
    assert most_idle_model(d) == "a"


# --- through the gateway, in process -------------------------------------------------------------------------------


class FakeWebUI:
    """Records what reaches it; answers like the WebUI with a marker of who answered."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, str, Any]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        parsed = json.loads(body) if body else None
        self.calls.append((request.method, request.path, parsed))
        if isinstance(parsed, dict) and "fail" in parsed:  # the WebUI's error answer, with that exception type
            error = {"error": parsed["fail"], "detail": "", "body": "", "errors": "it failed"}
            return web.json_response(error, status=500)
        if request.path.startswith("/sdapi/v1/extra") or request.path.endswith("/txt2img"):
            await self.release.wait()
        return web.json_response({"served_by": self.name, "path": request.path})


Scenario = Callable[[TestClient, dict[str, FakeWebUI], Any], Awaitable[None]]


def run(scenario: Scenario, models: dict[str, str], cfg: GatewayConfig | None = None) -> None:
    """`models`: fake instance name -> the model it serves."""

    async def main() -> None:
        fakes = {name: FakeWebUI(name) for name in models}
        servers = {name: TestServer(f.app, host="127.0.0.1") for name, f in fakes.items()}
        app = create_app(cfg or GatewayConfig())
        async with TestClient(TestServer(app, host="127.0.0.1")) as http:
            state = app[STATE]
            for name, server in servers.items():
                await server.start_server()
                state.dispatcher.add(Backend(str(server.make_url("")).rstrip("/"), models[name], instance=name))
            try:
                await scenario(http, fakes, state)
            finally:
                for server in servers.values():
                    await server.close()

    asyncio.run(main())


def test_every_webui_route_is_served_or_refused_never_unknown() -> None:
    async def scenario(http: TestClient, _: dict[str, FakeWebUI], __: Any) -> None:
        for method, path in sorted(WEBUI_ROUTES):
            r = await http.request(method, path, json={})
            assert r.status not in (404, 405), (method, path, r.status)

    run(scenario, {})


def test_refused_routes_answer_403_with_advice_and_reach_no_instance() -> None:
    async def scenario(http: TestClient, fakes: dict[str, FakeWebUI], _: Any) -> None:
        advice = {
            "/sdapi/v1/refresh-checkpoints": "SDInstance",
            "/sdapi/v1/reload-checkpoint": "one checkpoint",
            "/sdapi/v1/unload-checkpoint": "scaling the SDInstance",
            "/sdapi/v1/create/embedding": "LoRAJob",
            "/sdapi/v1/train/hypernetwork": "LoRAJob",
            "/sdapi/v1/server-restart": "delete a pod",
        }
        for path, words in advice.items():
            r = await http.post(path, json={})
            body = await r.json()
            assert r.status == 403 and body["error"] == "Forbidden" and words in body["detail"], path
            assert set(body) >= {"error", "detail", "body", "errors"}
        switch = await http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "x"})
        assert switch.status == 400 and "X-SD-Model" in (await switch.json())["detail"]
        assert fakes["one"].calls == []

    run(scenario, {"one": "a.safetensors"})
    assert set(REFUSED) == {p for m, p in WEBUI_ROUTES if m == "POST"} - {
        "/sdapi/v1/txt2img",
        "/sdapi/v1/img2img",
        "/sdapi/v1/options",
        "/sdapi/v1/interrupt",
        "/sdapi/v1/skip",
        "/sdapi/v1/png-info",
        "/sdapi/v1/refresh-loras",
        "/sdapi/v1/refresh-vae",
        "/sdapi/v1/refresh-embeddings",
        *GPU_TASKS,
    }


def test_read_only_gets_go_to_an_instance_of_the_requested_model() -> None:
    async def scenario(http: TestClient, fakes: dict[str, FakeWebUI], _: Any) -> None:
        for path in READ_ONLY_GETS:
            r = await http.get(f"/sdapi/v1/{path}", headers={"X-SD-Model": "b.safetensors"})
            assert r.status == 200 and (await r.json())["served_by"] == "b1", path
        assert fakes["a1"].calls == []

    run(scenario, {"a1": "a.safetensors", "b1": "b.safetensors"})


def test_extras_go_to_the_most_idle_model_unless_one_is_named() -> None:
    async def scenario(http: TestClient, fakes: dict[str, FakeWebUI], state: Any) -> None:
        fakes["a1"].release.clear()
        blocked = asyncio.create_task(http.post("/sdapi/v1/txt2img", json={"steps": 2}))  # a1 busy (default: a)
        await until(lambda: bool(fakes["a1"].calls))
        r = await http.post("/sdapi/v1/extra-single-image", json={"image": "", "upscaler_1": "Lanczos"})
        assert (await r.json())["served_by"] == "b1" and r.headers["X-SD-Backend"] == "b1"
        r = await http.post("/sdapi/v1/interrogate?model=b.safetensors", json={"image": "x"})
        assert (await r.json())["served_by"] == "b1"
        # Named: it waits in a's queue for the busy a1.
        named = asyncio.create_task(
            http.post("/sdapi/v1/extra-batch-images", json={"imageList": []}, headers={"X-SD-Model": "a"})
        )
        await until(lambda: state.dispatcher.queue_depth("a.safetensors") > 0)
        fakes["a1"].release.set()
        assert (await (await named).json())["served_by"] == "a1"
        await blocked
        assert [c[1] for c in fakes["b1"].calls] == ["/sdapi/v1/extra-single-image", "/sdapi/v1/interrogate"]

    run(scenario, {"a1": "a.safetensors", "b1": "b.safetensors"}, GatewayConfig(default_model="a.safetensors"))


def test_extras_bodies_reach_the_instance_unchanged_with_their_work_units() -> None:
    body = {"image": "", "upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 4, "unknown_field": 1}
    seen: list[float] = []

    async def scenario(http: TestClient, fakes: dict[str, FakeWebUI], state: Any) -> None:
        acquire = state.dispatcher.acquire

        async def spy(model: str, **kw: Any) -> Backend:
            seen.append(kw["units"])
            return await acquire(model, **kw)

        state.dispatcher.acquire = spy
        assert (await http.post("/sdapi/v1/extra-single-image", json=body)).status == 200
        assert (await http.post("/sdapi/v1/interrogate", json={"model": "deepdanbooru"})).status == 200
        assert fakes["one"].calls[0][2] == body

    run(scenario, {"one": "a.safetensors"})
    assert seen == [budget.extras_units(body), budget.INTERROGATE_UNITS["deepdanbooru"]]


def test_png_info_is_answered_beside_a_running_generation_outside_the_queue() -> None:
    async def scenario(http: TestClient, fakes: dict[str, FakeWebUI], state: Any) -> None:
        fakes["one"].release.clear()
        busy = [asyncio.create_task(http.post("/sdapi/v1/txt2img", json={"steps": 2})) for _ in range(2)]
        await until(lambda: state.dispatcher.queue_depth("a.safetensors") > 0)
        r = await http.post("/sdapi/v1/png-info", json={"image": "abc"})
        assert r.status == 200 and (await r.json())["served_by"] == "one"
        assert fakes["one"].calls[-1] == ("POST", "/sdapi/v1/png-info", {"image": "abc"})
        fakes["one"].release.set()
        await asyncio.gather(*busy)

    run(scenario, {"one": "a.safetensors"})


def test_png_info_without_any_ready_instance_is_a_503_with_retry_after() -> None:
    async def scenario(http: TestClient, _: dict[str, FakeWebUI], __: Any) -> None:
        r = await http.post("/sdapi/v1/png-info", json={"image": "abc"})
        assert r.status == 503 and "Retry-After" in r.headers

    run(scenario, {})


def test_skip_reaches_only_the_callers_running_generations() -> None:
    async def scenario(http: TestClient, fakes: dict[str, FakeWebUI], _: Any) -> None:
        assert await (await http.post("/sdapi/v1/skip")).json() == {"skipped": 0}
        fakes["one"].release.clear()
        running = asyncio.create_task(http.post("/sdapi/v1/txt2img", json={"steps": 2}))
        await until(lambda: bool(fakes["one"].calls))
        assert await (await http.post("/sdapi/v1/skip")).json() == {"skipped": 1}
        assert ("POST", "/sdapi/v1/skip", None) in fakes["one"].calls
        fakes["one"].release.set()
        await running

    run(scenario, {"one": "a.safetensors"})


def test_refresh_vae_and_embeddings_reach_every_instance() -> None:
    async def scenario(http: TestClient, fakes: dict[str, FakeWebUI], _: Any) -> None:
        for what in ("vae", "embeddings"):
            r = await http.post(f"/sdapi/v1/refresh-{what}")
            assert [x["status"] for x in (await r.json())["refreshed"]] == [200, 200]
        assert all(
            [c[1] for c in f.calls] == ["/sdapi/v1/refresh-vae", "/sdapi/v1/refresh-embeddings"] for f in fakes.values()
        )

    run(scenario, {"a1": "a.safetensors", "b1": "b.safetensors"})


def test_a_hires_request_over_the_budget_is_a_413_naming_the_target() -> None:
    async def scenario(http: TestClient, fakes: dict[str, FakeWebUI], state: Any) -> None:
        for b in state.dispatcher.all_backends():
            b.pixel_budget, b.gpu = 9_675_000, "24GiB"
        big = Backend("http://big", "other.safetensors", gpu="80GiB", pixel_budget=34_875_000, instance="ns/big")
        state.dispatcher.add(big)
        body = {"enable_hr": True, "hr_scale": 5, "width": 1024, "height": 1024}
        r = await http.post("/sdapi/v1/txt2img", json=body, headers={"X-SD-Model": "a.safetensors"})
        answer = await r.json()
        assert r.status == 413 and answer["peak"] == {"pass": "hires fix", "width": 5120, "height": 5120, "batch": 1}
        assert "1024x1024 x hr_scale 5 = 5120x5120" in answer["detail"]
        assert "a larger GPU (80GiB, as ns/big has: about 34,875,000 pixels)" in answer["detail"]
        assert fakes["one"].calls == []

    run(scenario, {"one": "a.safetensors"})


def test_a_webui_error_about_the_request_goes_back_as_it_is_and_others_are_retried() -> None:
    async def scenario(http: TestClient, fakes: dict[str, FakeWebUI], state: Any) -> None:
        r = await http.post("/sdapi/v1/extra-single-image", json={"fail": "AssertionError"})
        assert r.status == 500 and (await r.json())["errors"] == "it failed"
        assert len(fakes["a1"].calls) + len(fakes["a2"].calls) == 1  # not retried: any instance says the same
        assert not any(b.ejected for b in state.dispatcher.all_backends())
        r = await http.post("/sdapi/v1/interrogate", json={"fail": "RuntimeError"})
        assert r.status == 502  # the instance's own failure: ejected, the other one tried, then given up
        assert len(fakes["a1"].calls) + len(fakes["a2"].calls) == 3
        assert all(b.ejected for b in state.dispatcher.all_backends())

    run(scenario, {"a1": "a.safetensors", "a2": "a.safetensors"}, GatewayConfig(retries=1))
