"""The aiohttp application: A1111's /sdapi/v1 routes, ControlNet's, the operator's probes, drain and stats."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from sd_operator.emulator import controlnet, extras, generation
from sd_operator.emulator.catalog import samplers_api, schedulers_api, scripts_api
from sd_operator.emulator.config import EmulatorConfig
from sd_operator.emulator.engine import EMULATOR, ApiError, Emulator
from sd_operator.emulator.files import embeddings, vae_files
from sd_operator.emulator.profiles import Family

log = logging.getLogger("sd_operator.emulator")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROBE_PREFIX = "/sd-operator/"  # the operator's pod probes: never behind --api-auth
VECTOR_SIZE = {Family.SD15: 768, Family.SD2: 1024, Family.SDXL: 2048}
# GET /sd-operator/drain, the webui container's preStop hook: as the WebUI image's extension
# (images/webui/extension/sd-operator/scripts/sd_operator_probes.py).
DRAIN_TIMEOUT = 110.0  # seconds: under the pod's terminationGracePeriodSeconds (120), leaving time for SIGTERM
DRAIN_POLL = 0.25
DRAIN_IDLE_CHECKS = 2  # idle on this many looks in a row counts as drained, as the extension


def _authorized(emu: Emulator, request: web.Request) -> ApiError | None:
    users = emu.config.api_auth
    if not users or request.path.startswith(PROBE_PREFIX):
        return None
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return ApiError(401, "HTTPException", "Not authenticated")
    try:
        user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return ApiError(401, "HTTPException", "Not authenticated")
    expected = users.get(user)
    if expected is not None and secrets.compare_digest(password.encode(), expected.encode()):
        return None
    return ApiError(401, "HTTPException", "Incorrect username or password")


def _error_response(error: ApiError) -> web.Response:
    response = web.json_response(error.payload(), status=error.status)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = "Basic"
    return response


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counting, auth, A1111's error JSON for every failure, and X-Process-Time on every response."""
    emu = request.app[EMULATOR]
    started = time.perf_counter()
    resource = request.match_info.route.resource
    emu.requests[f"{request.method} {resource.canonical if resource else 'unmatched'}"] += 1
    response: web.StreamResponse
    try:
        denied = _authorized(emu, request)
        if denied:
            raise denied
        response = await handler(request)
    except ApiError as e:
        response = _error_response(e)
    except web.HTTPException as e:  # the router's 404/405
        response = _error_response(ApiError(e.status, "HTTPException", e.reason))
    except Exception as e:
        log.exception("error answering %s %s", request.method, request.path)
        response = _error_response(ApiError(500, type(e).__name__, "", errors=str(e)))
    elapsed = time.perf_counter() - started
    response.headers["X-Process-Time"] = f"{elapsed:.4f}"
    if emu.config.api_log:
        log.info("API %s %s %s %.4fs", response.status, request.method, request.path_qs, elapsed)
    return response


def _emu(request: web.Request) -> Emulator:
    return request.app[EMULATOR]


def _json(data: Any) -> web.Response:
    return web.json_response(data)


async def live(_: web.Request) -> web.Response:
    return _json({"status": "alive", "emulator": True})


async def ready(request: web.Request) -> web.Response:
    emu = _emu(request)
    title = emu.config.checkpoint.title
    if not emu.loaded.is_set():
        return web.json_response({"status": "loading", "model": title}, status=503)
    return _json({"status": "ready", "model": title})


def drain_timeout(value: str | None) -> float:
    """`?timeout=` in seconds; the default when absent or not a number >= 0 (the hook never fails)."""
    try:
        seconds = float(value) if value else DRAIN_TIMEOUT
    except ValueError:
        return DRAIN_TIMEOUT
    return seconds if math.isfinite(seconds) and seconds >= 0 else DRAIN_TIMEOUT


async def drain(request: web.Request) -> web.Response:
    """200 {"status": "drained", "waitedSeconds"} once no generation runs or is queued (seen idle twice in
    a row, DRAIN_POLL apart), or 200 {"status": "timeout", ..., "busy"} after `?timeout=` seconds. The
    kubelet runs it before SIGTERM; new work stops coming meanwhile (the endpoint is no longer ready)."""
    emu = _emu(request)
    limit = drain_timeout(request.query.get("timeout"))
    started = time.monotonic()
    idle_checks = 0
    while True:
        what = emu.busy()
        elapsed = time.monotonic() - started
        if what is None:
            idle_checks += 1
            if idle_checks >= DRAIN_IDLE_CHECKS or elapsed >= limit:
                log.info("drained after %.2fs", elapsed)
                return _json({"status": "drained", "waitedSeconds": round(elapsed, 3)})
        else:
            idle_checks = 0
            if elapsed >= limit:
                log.warning("drain gave up after %.2fs: %s", elapsed, what)
                return _json({"status": "timeout", "waitedSeconds": round(elapsed, 3), "busy": what})
        await asyncio.sleep(min(DRAIN_POLL, max(0.0, limit - elapsed)))


async def get_options(request: web.Request) -> web.Response:
    return _json(_emu(request).options)


async def set_options(request: web.Request) -> web.Response:
    emu = _emu(request)
    try:
        body = await request.json()
    except ValueError as e:
        raise ApiError(422, "RequestValidationError", f"invalid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(422, "RequestValidationError", "expected a JSON object of settings")
    changes = emu.vet_settings(body)
    if changes:
        emu.options.update(changes)
        emu.save_settings()  # A1111 writes config.json on every POST /options
    return _json(None)


async def sd_models(request: web.Request) -> web.Response:
    ckpt = _emu(request).config.checkpoint
    model = {
        "title": ckpt.title,
        "model_name": ckpt.model_name,
        "hash": ckpt.shorthash,
        "sha256": ckpt.sha256,
        "filename": str(ckpt.path),
        "config": None,
    }
    return _json([model])


async def loras(request: web.Request) -> web.Response:
    return _json([lora.api() for lora in _emu(request).loras.loras.values()])


async def refresh_loras(request: web.Request) -> web.Response:
    emu = _emu(request)
    async with emu.queue_lock:  # refresh-* run under the queue lock in A1111
        await asyncio.to_thread(emu.loras.refresh)
    return _json(None)


async def refresh_noop(request: web.Request) -> web.Response:
    """refresh-checkpoints/-vae/-embeddings: the one checkpoint cannot change; the rest is read per call."""
    async with _emu(request).queue_lock:
        pass
    return _json(None)


async def embeddings_route(request: web.Request) -> web.Response:
    cfg = _emu(request).config
    return _json(embeddings(cfg.embeddings_dir, VECTOR_SIZE[cfg.family], cfg.checkpoint.title))


async def progress(request: web.Request) -> web.Response:
    return _json(_emu(request).progress.api())


async def interrupt(request: web.Request) -> web.Response:
    _emu(request).progress.interrupted = True
    return _json({})


async def skip(request: web.Request) -> web.Response:
    _emu(request).progress.skipped = True
    return _json({})


def _static(data: Any) -> Handler:
    async def handler(_: web.Request) -> web.Response:
        return _json(data)

    return handler


def _computed(func: Callable[[Emulator], Any]) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return _json(func(_emu(request)))

    return handler


def create_app(config: EmulatorConfig) -> web.Application:
    """The emulator for `config`; the model 'loads' (load_seconds) when the application starts."""
    app = web.Application(middlewares=[middleware], client_max_size=64 * 1024**2)
    emu = Emulator(config)
    app[EMULATOR] = emu

    async def loading(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(emu.load_model())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(loading)
    r = app.router
    r.add_get("/sd-operator/live", live)
    r.add_get("/sd-operator/ready", ready)
    r.add_get("/sd-operator/drain", drain)
    r.add_post("/sdapi/v1/txt2img", generation.txt2img)
    r.add_post("/sdapi/v1/img2img", generation.img2img)
    r.add_get("/sdapi/v1/options", get_options)
    r.add_post("/sdapi/v1/options", set_options)
    r.add_get("/sdapi/v1/sd-models", sd_models)
    r.add_get("/sdapi/v1/loras", loras)
    r.add_post("/sdapi/v1/refresh-loras", refresh_loras)
    for what in ("checkpoints", "vae", "embeddings"):
        r.add_post(f"/sdapi/v1/refresh-{what}", refresh_noop)
    r.add_get("/sdapi/v1/samplers", _static(samplers_api()))
    r.add_get("/sdapi/v1/schedulers", _static(schedulers_api()))
    r.add_get("/sdapi/v1/scripts", _static(scripts_api()))
    r.add_get("/sdapi/v1/sd-vae", _computed(lambda e: vae_files(e.config.vae_path)))
    r.add_get("/sdapi/v1/embeddings", embeddings_route)
    r.add_get("/sdapi/v1/progress", progress)
    r.add_post("/sdapi/v1/interrupt", interrupt)
    r.add_post("/sdapi/v1/skip", skip)
    r.add_get("/sdapi/v1/memory", _computed(Emulator.memory))
    r.add_get("/sdapi/v1/cmd-flags", _computed(lambda e: e.config.cmd_flags))
    r.add_get("/emulator/stats", _computed(Emulator.stats))
    controlnet.add_routes(app)
    extras.add_routes(app)  # extras, png-info, interrogate, catalogs
    return app
