"""/v1/generate's ControlNet defaults are SD 1.5 models: for another family a unit must name its model (the
real extension refuses an SD 1.5 ControlNet on SDXL and renders without control, still answering 200)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from sd_operator.gateway.app import STATE, create_app
from sd_operator.gateway.config import GatewayConfig
from sd_operator.gateway.registry import DeclaredModel


def post(family: str, unit: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async def scenario() -> tuple[int, dict[str, Any]]:
        app = create_app(GatewayConfig())
        app[STATE].registry.declared["ns/a"] = DeclaredModel(
            model="base.safetensors", instance="ns/a", phase="Loading", family=family
        )
        async with TestClient(TestServer(app, host="127.0.0.1")) as http:
            answer = await http.post(
                "/v1/generate",
                json={"prompt": "a house", "model": "base.safetensors", "controlnet": {"type": "canny", **unit}},
            )
            return answer.status, await answer.json()

    return asyncio.run(scenario())


def test_an_sdxl_unit_without_a_model_is_refused_with_the_way_to_find_one() -> None:
    status, body = post("sdxl", {"image": "aGVsbG8="})
    assert status == 422
    assert (
        "base.safetensors is sdxl" in body["detail"]
        and "/controlnet/model_list?model=base.safetensors" in body["detail"]
    )


def test_an_sdxl_unit_naming_its_model_and_an_sd15_unit_pass_the_check() -> None:
    # Both go on to routing: the model's only instance is still loading (503), not a 422.
    assert post("sdxl", {"image": "aGVsbG8=", "model": "diffusers_xl_canny_full"})[0] == 503
    assert post("sd15", {"image": "aGVsbG8="})[0] == 503
