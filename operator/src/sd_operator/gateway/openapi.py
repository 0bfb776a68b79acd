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

_NS_NAME = [
    {"name": "namespace", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
]
_FILE = {"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}
_PAGE = [
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 24}},
]
_NOT_FOUND = {"404": {"description": "no such object (or its PVC is not mounted into the gateway: see the detail)"}}


def _read(summary: str, parameters: list[dict[str, Any]] | None = None, **responses: Any) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            **({"parameters": parameters} if parameters else {}),
            "responses": {"200": {"description": "OK"}, **responses},
        }
    }


# The web console's read endpoints (gateway/console.py) and its static page (served without a key).
CONSOLE_PATHS: dict[str, Any] = {
    "/ui/": {
        "get": {
            "summary": "the web console (static files; no key needed: the page asks for one)",
            "security": [],
            "responses": {"200": {"description": "index.html"}},
        }
    },
    "/v1/fleet": _read("models with their SDInstances (phase, GPU, replicas), queue depth and wait"),
    "/v1/batches": _read("GenerationBatches with their progress (watched by the gateway)"),
    "/v1/batches/{namespace}/{name}/outputs": _read(
        "a page of a batch's finished items (index order): prompt, seed, image and thumbnail URLs, parameters",
        [*_NS_NAME, *_PAGE],
        **_NOT_FOUND,
    ),
    "/v1/batches/{namespace}/{name}/files/{file}": _read("one output image", [*_NS_NAME, _FILE], **_NOT_FOUND),
    "/v1/batches/{namespace}/{name}/thumbnails/{file}": _read(
        "a JPEG thumbnail of one output image (at most 256 px)", [*_NS_NAME, _FILE], **_NOT_FOUND
    ),
    "/v1/lorajobs": _read("LoRAJobs with epoch, step, loss and their evaluation batch"),
    "/v1/lorajobs/{namespace}/{name}/evaluation": _read(
        "a LoRAJob's evaluation grid: prompts x LoRA weights, from its evaluation batch's outputs",
        _NS_NAME,
        **_NOT_FOUND,
    ),
    "/v1/requests/{id}": _read(
        "the state of the caller's own generation sent with X-Request-Id: queued (position), running "
        "(progress), done or failed",
        [{"name": "id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 128}}],
    ),
}


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
                "parameters": [
                    {
                        "name": "X-Request-Id",
                        "in": "header",
                        "description": "names the request for GET /v1/requests/{id} (queue position, progress)",
                        "schema": {"type": "string", "maxLength": 128},
                    }
                ],
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
        **CONSOLE_PATHS,
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
