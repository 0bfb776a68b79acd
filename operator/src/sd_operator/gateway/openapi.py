"""The gateway's own OpenAPI document (GET /openapi.json)."""

from __future__ import annotations

from typing import Any

from sd_operator import __version__
from sd_operator.gateway.app import READ_ONLY_GETS, REFUSED
from sd_operator.gateway.payload import GenerateRequest

_GEN = {
    "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
    "responses": {
        "200": {"description": "AUTOMATIC1111 response: images (base64), parameters, info"},
        "404": {"description": "unknown model"},
        "413": {"description": "over the GPU budget"},
        "429": {"description": "queue full or rate limited (Retry-After)"},
    },
}

_OK = {"responses": {"200": {"description": "OK"}}}
_WEBUI = {
    "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
    "responses": {"200": {"description": "the WebUI's own answer"}, "503": {"description": "no instance is ready"}},
}
_TASK = {
    "requestBody": _WEBUI["requestBody"],
    "responses": {
        "200": {"description": "the WebUI's own answer"},
        "429": {"description": "queue full or rate limited (Retry-After)"},
    },
}
_REFUSED = {"responses": {"403": {"description": "what to do instead"}}}
REFRESHED = ("loras", "vae", "embeddings")


def document() -> dict[str, Any]:
    schema = GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    get = {"get": {"responses": {"200": {"description": "OK"}}}}
    paths: dict[str, Any] = {
        "/sdapi/v1/txt2img": {"post": {**_GEN, "summary": "txt2img on an idle instance of the requested model"}},
        "/sdapi/v1/img2img": {"post": {**_GEN, "summary": "img2img on an idle instance of the requested model"}},
        "/sdapi/v1/sd-models": {
            "get": {"summary": "the models of the fleet", "responses": {"200": {"description": "OK"}}}
        },
        "/sdapi/v1/options": {
            **get,
            "post": {
                "summary": "refused: models are fixed per instance",
                "responses": {"400": {"description": "use X-SD-Model"}},
            },
        },
        "/v1/generate": {
            "post": {
                "summary": "convenience API: prompt, preset, LoRA and ControlNet turned into a WebUI payload",
                "requestBody": {
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}}
                },
                "responses": _GEN["responses"],
            }
        },
        "/v1/models": get,
        "/v1/loras": get,
        "/v1/presets": get,
        "/v1/instances": get,
        "/sdapi/v1/progress": get,
        "/sdapi/v1/interrupt": {"post": {"responses": {"200": {"description": "OK"}}}},
        "/sdapi/v1/skip": {"post": {"summary": "skip the current image of the caller's generations", **_OK}},
        "/sdapi/v1/png-info": {
            "post": {
                **_WEBUI,
                "summary": "png-info on any ready instance, outside the queues: {info, items, parameters}",
            }
        },
        "/sdapi/v1/extra-single-image": {"post": {**_TASK, "summary": "extras (upscaling) on one image, queued"}},
        "/sdapi/v1/extra-batch-images": {"post": {**_TASK, "summary": "extras (upscaling) on imageList, queued"}},
        "/sdapi/v1/interrogate": {"post": {**_TASK, "summary": "a caption (model clip or deepdanbooru), queued"}},
        **{f"/sdapi/v1/refresh-{what}": {"post": {"summary": "on every instance", **_OK}} for what in REFRESHED},
        **{f"/sdapi/v1/{path}": get for path in READ_ONLY_GETS},
        **{path: {"post": {"summary": "refused: " + why, **_REFUSED}} for path, why in REFUSED.items()},
        "/healthz": get,
        "/readyz": get,
        "/metrics": get,
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "sd-operator gateway",
            "version": __version__,
            "description": "AUTOMATIC1111-compatible API for a fleet of Stable Diffusion instances. Pick the "
            "model with override_settings.sd_model_checkpoint or X-SD-Model; authenticate with "
            "Authorization: Bearer <key>.",
        },
        "paths": paths,
        "components": {
            "schemas": {"GenerateRequest": schema, **defs},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
