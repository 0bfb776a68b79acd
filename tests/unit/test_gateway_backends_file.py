"""--backends-file next to Kubernetes discovery: a re-read of the file changes only the backends the file
brought, and a discovery update only those discovery found (fake WebUIs on 127.0.0.1 answer the probes)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from sd_operator.gateway.app import State
from sd_operator.gateway.config import GatewayConfig
from sd_operator.gateway.discovery import KubeDiscovery
from sd_operator.gateway.dispatch import Backend
from sd_operator.gateway.server import FileBackends, file_changes

MODEL = "sd_xl_base_1.0.safetensors"


def b(url: str) -> Backend:
    return Backend(url=url, model=MODEL)


def test_a_file_change_removes_only_the_files_own_backends() -> None:
    owned = {"http://a": b("http://a"), "http://b": b("http://b")}
    gone, new = file_changes(owned, [b("http://b"), b("http://c")], served={"http://10.0.0.1:7861"})
    assert [x.url for x in gone] == ["http://a"] and [x.url for x in new] == ["http://c"]


def test_an_emptied_file_leaves_other_sources_alone() -> None:
    owned = {"http://a": b("http://a")}
    gone, new = file_changes(owned, [], served={"http://10.0.0.1:7861", "http://10.0.0.2:7861"})
    assert [x.url for x in gone] == ["http://a"] and new == []


def test_a_url_another_source_serves_is_not_added_twice() -> None:
    gone, new = file_changes({}, [b("http://10.0.0.1:7861"), b("http://a")], served={"http://10.0.0.1:7861"})
    assert gone == [] and [x.url for x in new] == ["http://a"]


def test_an_unchanged_file_changes_nothing() -> None:
    owned = {"http://a": b("http://a")}
    assert file_changes(owned, [b("http://a")], served={"http://a", "http://10.0.0.1:7861"}) == ([], [])


def fake_webui(model: str) -> web.Application:
    """Just what the gateway's probe reads."""

    async def models(_: web.Request) -> web.Response:
        return web.json_response([{"title": model, "filename": f"/models/{model}", "sha256": None}])

    async def memory(_: web.Request) -> web.Response:
        return web.json_response({"cuda": {"system": {"total": 24 * 1024**3}}})

    app = web.Application()
    app.router.add_get("/sdapi/v1/sd-models", models)
    app.router.add_get("/sdapi/v1/memory", memory)
    return app


def instance(name: str) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": name},
        "spec": {"model": {"family": "sdxl", "checkpoint": {"name": MODEL}}, "gpu": {"memoryGiB": 24}},
    }


def endpoint_slice(name: str, instance: str, ips: list[str]) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": name, "labels": {"sd-operator.dev/instance": instance}},
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
        "ports": [{"name": "http", "port": 7861}],
    }


def test_file_and_discovery_backends_are_merged(tmp_path: Path) -> None:
    async def main() -> None:
        servers = [TestServer(fake_webui(MODEL), host="127.0.0.1") for _ in range(2)]
        for s in servers:
            await s.start_server()
        a, c = (str(s.make_url("")).rstrip("/") for s in servers)
        path = tmp_path / "backends.yaml"
        state = State(GatewayConfig(backends_file=path, kubernetes=True))
        state.session = aiohttp.ClientSession()
        try:
            # Discovery found two pods (its callbacks, as its watches would call them; no API server needed).
            discovery = KubeDiscovery(state, ("ns",))
            discovery._on_instance("ADDED", instance("xl"))
            discovery._on_slice("ADDED", endpoint_slice("xl-a", "xl", ["10.0.0.1", "10.0.0.2"]))
            pods = {"http://10.0.0.1:7861", "http://10.0.0.2:7861"}

            def urls() -> set[str]:
                return {x.url for x in state.dispatcher.all_backends()}

            source = FileBackends(path)
            path.write_text(yaml.safe_dump({"backends": [{"url": a}]}))
            await source.sync(state)
            assert urls() == pods | {a}

            # The file changes: its backend a goes, c comes; discovery's stay.
            path.write_text(yaml.safe_dump({"backends": [{"url": c}]}))
            await source.sync(state)
            assert urls() == pods | {c}
            assert not source.pending(state)

            # Discovery changes: one pod goes, the file's backend stays.
            discovery._on_slice("MODIFIED", endpoint_slice("xl-a", "xl", ["10.0.0.2"]))
            assert urls() == {"http://10.0.0.2:7861", c}

            # The file empties: only its own backend goes.
            path.write_text("backends: []\n")
            await source.sync(state)
            assert urls() == {"http://10.0.0.2:7861"}
        finally:
            await state.session.close()
            for s in servers:
                await s.close()

    asyncio.run(main())
