"""The gateway: an AUTOMATIC1111-compatible API in front of the whole fleet.

`POST /sdapi/v1/txt2img` and `/img2img` keep the WebUI's request and response bodies; the model comes
from `override_settings.sd_model_checkpoint`, an `X-SD-Model` header or the configured default. Each
request waits in the gateway's queue for its model until a backend is idle (see dispatch.py), then
its body goes to that backend and the answer streams back. `/v1/...` is a convenience API on top.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from sd_operator.emulator.profiles import Family
from sd_operator.gateway import budget
from sd_operator.gateway import metrics as m
from sd_operator.gateway.auth import ANONYMOUS, KeyStore, Tenant, presented_key
from sd_operator.gateway.cache import CachedResponse, ResultCache, cache_key, make_cache
from sd_operator.gateway.config import GatewayConfig
from sd_operator.gateway.dispatch import Backend, ColdStartTimeout, Dispatcher, NoBackend, QueueFull
from sd_operator.gateway.payload import (
    RECOMMENDED,
    GenerateRequest,
    build_txt2img_payload,
    canonical_request,
    is_deterministic,
)
from sd_operator.gateway.presets import PresetStore, UnknownPreset
from sd_operator.gateway.registry import ModelNotReady, Registry, UnknownModel, family_of, pixel_budget, probe
from sd_operator.gateway.tracking import HEADER as REQUEST_ID
from sd_operator.gateway.tracking import RequestTracker, Tracked
from sd_operator.gateway.upstream import Upstream, UpstreamError, UpstreamResponse

log = logging.getLogger("sd_operator.gateway")
access_log = logging.getLogger("sd_operator.gateway.access")
OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/openapi.json"}
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}
SMALL_ANSWER = 256 * 1024  # answers up to this size go to the client in one write
_GIB = re.compile(r"(\d+(?:\.\d+)?)\s*GiB")  # a backend's GPU memory as probes and discovery note it
SWITCH_ADVICE = (
    "this gateway never switches a backend's model: every instance serves one fixed model. Choose the model "
    "per request with override_settings.sd_model_checkpoint or the X-SD-Model header; GET /sdapi/v1/sd-models "
    "lists the models"
)

CONFIG: web.AppKey[GatewayConfig] = web.AppKey("config", GatewayConfig)
STATE: web.AppKey[State] = web.AppKey("state", object)  # type: ignore[arg-type]


def error(status: int, message: str, kind: str, **extra: Any) -> web.Response:
    """Errors in the WebUI's shape ({error, detail, body, errors}) so clients need no new parsing; `body` is a
    string as in the WebUI's (vars(e).get('body', ''))."""
    m.child(m.errors, kind).inc()
    body = {"error": kind, "detail": message, "body": "", "errors": message, **extra}
    headers = {"Retry-After": str(round(extra["retry_after"]))} if "retry_after" in extra else None
    return web.json_response(body, status=status, headers=headers)


NOT_READY_RETRY_SECONDS = 15.0
COLD_START_RETRY_SECONDS = 10.0


def unresolved(e: UnknownModel | ModelNotReady) -> web.Response:
    """404 for a model nobody serves; 503 + Retry-After while the fleet is empty or the model's
    SDInstances are still downloading or loading (a batch or script should wait, not give up)."""
    if isinstance(e, ModelNotReady):
        return error(503, str(e), "ModelNotReady", retry_after=NOT_READY_RETRY_SECONDS)
    return error(404 if e.available else 503, str(e), "UnknownModel")


class State:
    """Everything a request needs: dispatcher, registry, presets, cache, keys and the HTTP client session."""

    def __init__(self, cfg: GatewayConfig, dispatcher: Dispatcher | None = None) -> None:
        self.cfg = cfg
        self.dispatcher = dispatcher or Dispatcher(max_queue=cfg.max_queue, window=cfg.dispatch_window or None)
        self.registry = Registry(self.dispatcher)
        presets = PresetStore.load_default()
        if cfg.presets_file:
            presets = presets.merged(PresetStore.from_file(cfg.presets_file))
        self.presets = presets
        self.keys = KeyStore.from_file(cfg.keys_file) if cfg.keys_file else KeyStore()
        self.cache: ResultCache = make_cache(cfg.cache_url, cfg.cache_bytes)
        self.session: aiohttp.ClientSession | None = None  # probes, interrupts and GETs
        self.upstream = Upstream()  # generation requests (the hot path; see upstream.py)
        self.running: dict[str, set[Backend]] = {}  # tenant -> backends rendering its requests
        self.requests = RequestTracker()  # X-Request-Id -> queued / running / done (GET /v1/requests/{id})
        self.background: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def add_backend(self, backend: Backend, family: str | None = None) -> bool:
        assert self.session is not None
        if not await probe(self.session, backend, family) or not backend.model:
            return False
        self.dispatcher.add(backend)
        log.info("backend %s serves %s (budget %s px)", backend.url, backend.model, backend.pixel_budget)
        return True

    def eject(self, backend: Backend) -> None:
        """No work for a cool-off, then probe until it answers again."""
        self.dispatcher.eject(backend, self.cfg.cool_off)
        m.child(m.ejections, backend.model).inc()
        log.warning("backend %s ejected for %.0fs", backend.url, self.cfg.cool_off)
        self.spawn(self._probe_back(backend))

    async def _probe_back(self, backend: Backend) -> None:
        assert self.session is not None
        while not backend.removed:
            await asyncio.sleep(self.cfg.cool_off)
            try:
                async with self.session.get(
                    f"{backend.url}/sdapi/v1/progress", timeout=aiohttp.ClientTimeout(total=5)
                ) as r:
                    if r.status == 200:
                        self.dispatcher.reinstate(backend)
                        log.info("backend %s answers again", backend.url)
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            self.dispatcher.eject(backend, self.cfg.cool_off)


def _state(request: web.Request) -> State:
    return request.app[STATE]


# ---------------------------------------------------------------------------------------------
# Middleware: auth, rate limits, request metrics


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    state = _state(request)
    start = time.perf_counter()
    response = await _authorised(state, request, handler)
    seconds = time.perf_counter() - start
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
    m.child(m.requests, route, str(response.status)).inc()
    m.child(m.request_seconds, route).observe(seconds)
    if state.cfg.access_log:
        tenant = request.get("tenant")
        fields = {
            "method": request.method,
            "route": route,
            "status": response.status,
            "seconds": round(seconds, 4),
            "tenant": tenant.name if tenant else None,  # the tenant, never the key
            "model": request.get("model"),
            "instance": response.headers.get("X-SD-Backend"),
            "cache": response.headers.get("X-Cache"),
        }
        access_log.info("%s %s %s %.3fs", request.method, request.path, response.status, seconds, extra=fields)
    return response


def open_path(path: str) -> bool:
    """Paths served without a key: probes, metrics, the OpenAPI document and the console's static shell (the
    page asks for a key and sends it on every API call; without one it shows nothing)."""
    return path in OPEN_PATHS or path == "/ui" or path.startswith("/ui/")


async def _authorised(state: State, request: web.Request, handler: Any) -> web.StreamResponse:
    tenant: Tenant | None = ANONYMOUS
    if not open_path(request.path) and state.keys.enabled:
        tenant = state.keys.lookup(presented_key(request.headers))
        if tenant is None:
            return error(401, "a valid API key is required (Authorization: Bearer <key>)", "Unauthorized")
        wait = tenant.allow()
        if wait > 0:
            request["tenant"] = tenant
            return error(429, f"rate limit of {tenant.rate_limit:g}/s exceeded", "RateLimited", retry_after=wait)
    request["tenant"] = tenant
    return await handler(request)


# ---------------------------------------------------------------------------------------------
# Generation


def _model_for(state: State, request: web.Request, payload: dict[str, Any], explicit: str | None = None) -> str:
    settings = payload.get("override_settings") or {}
    name = explicit or settings.get("sd_model_checkpoint") or request.headers.get("X-SD-Model")
    name = name or state.cfg.default_model
    if not name:
        models = state.dispatcher.models()
        if len(models) == 1:
            return models[0]
        raise UnknownModel("(none given)", models)
    return state.registry.resolve(str(name))


def _priority(state: State, request: web.Request) -> int:
    tenant: Tenant = request["tenant"]
    header = request.headers.get("X-Priority")
    if header is None or not state.cfg.priority_header:
        return tenant.priority
    try:
        asked = int(header)
    except ValueError:
        return tenant.priority
    # With API keys a caller may lower its priority but not raise it above its key's.
    return min(asked, tenant.priority) if state.keys.enabled else asked


async def generate(request: web.Request, path: str, payload: dict[str, Any], raw: bytes | None) -> web.StreamResponse:
    """A generation; with an X-Request-Id header its state can be polled (GET /v1/requests/{id})."""
    state = _state(request)
    tracked = state.requests.begin(request["tenant"].name, request.headers.get(REQUEST_ID))
    request["tracked"] = tracked
    status = None
    try:
        response = await _generate(request, path, payload, raw)
        status = response.status
        return response
    finally:
        state.requests.end(tracked, status)


async def _generate(request: web.Request, path: str, payload: dict[str, Any], raw: bytes | None) -> web.StreamResponse:
    state = _state(request)
    try:
        model = _model_for(state, request, payload)
    except (UnknownModel, ModelNotReady) as e:
        return unresolved(e)
    request["model"] = model
    settings = payload.get("override_settings")
    if isinstance(settings, dict) and "sd_model_checkpoint" in settings:
        # The model was picked by routing; the backend must not try to load anything else.
        payload["override_settings"] = {k: v for k, v in settings.items() if k != "sd_model_checkpoint"}
        raw = None
    load = budget.request_load(path, payload)
    limit = state.registry.budget(model)
    if limit is not None and load.pixels > limit:
        peak = load.peak
        text = budget.describe(
            load,
            limit,
            what=f"too large for the GPUs serving {model}",
            where="the largest of them",
            larger=_larger_gpus(state, model, limit),
        )
        target = {"pass": peak.label, "width": peak.width, "height": peak.height, "batch": peak.batch}
        return error(413, text, "OutOfMemoryError", pixel_budget=limit, pixels=peak.pixels, peak=target)
    body = raw if raw is not None else json.dumps(payload).encode()

    key = None
    if is_deterministic(payload):
        backends = state.dispatcher.backends.get(model) or []
        model_id = next((b.sha256 or b.title for b in backends if b.sha256 or b.title), model)
        key = cache_key(model_id or model, path + "\n" + canonical_request(payload))
        hit = CachedResponse.decode(await state.cache.get(key) or b"")
        if hit is not None:
            m.child(m.cache, "hit").inc()
            return web.Response(body=hit.body, headers={"Content-Type": hit.content_type, "X-Cache": "hit"})
        m.child(m.cache, "miss").inc()
    return await _dispatch(request, state, model, path, body, load.units(), key, lambda b: budget.describe(load, b))


async def _dispatch(
    request: web.Request,
    state: State,
    model: str,
    path: str,
    body: bytes,
    units: float,
    key: str | None,
    oom_advice: Callable[[int | None], str],
) -> web.StreamResponse:
    """Waits in the model's queue for an idle backend, sends the body and relays the answer; retries on another
    backend after a failure, and after an out-of-memory answer only on backends with a larger budget."""
    tenant: Tenant = request["tenant"]
    tracked: Tracked | None = request.get("tracked")
    if tracked is not None:
        tracked.model, tracked.state = model, "queued"
    tried: list[Backend] = []
    for attempt in range(state.cfg.retries + 1):
        waited = time.perf_counter()
        # A model at zero that scales on demand: the request waits (and counts as demand) for a first pod.
        cold = state.cfg.cold_start_timeout if state.registry.cold_start(model) else None
        try:
            backend = await state.dispatcher.acquire(
                model,
                tenant=tenant.name,
                priority=_priority(state, request),
                units=units,
                exclude=tried,
                cold_start=cold,
                ticket=tracked.ticket if tracked is not None else None,
            )
        except QueueFull as e:
            return error(429, str(e), "QueueFull", retry_after=e.retry_after)
        except NoBackend as e:
            return error(503, str(e), "NoBackend")
        except ColdStartTimeout as e:
            states = ", ".join(d.describe() for d in state.registry.instances_of(model))
            return error(
                503,
                f"{e}: {states or 'no instance'}; the model is starting, retry later",
                "ColdStartTimeout",
                retry_after=COLD_START_RETRY_SECONDS,
                instances=[{"instance": d.instance, "phase": d.phase} for d in state.registry.instances_of(model)],
            )
        m.child(m.wait_seconds, model).observe(time.perf_counter() - waited)
        if tracked is not None:
            tracked.state, tracked.backend = "running", backend
        outcome = await _forward(request, state, backend, path, body, units, key, attempt, tenant.name)
        if isinstance(outcome, web.StreamResponse):
            return outcome
        tried.append(backend)
        if outcome == "oom":
            bigger = [
                b
                for b in state.dispatcher.backends.get(model, [])
                if (b.pixel_budget or 0) > (backend.pixel_budget or 0)
            ]
            if not bigger:
                return error(500, oom_advice(backend.pixel_budget), "OutOfMemoryError")
            # The same class of GPU would fail again: only larger cards are worth a try.
            tried += [b for b in state.dispatcher.backends.get(model, []) if b not in bigger]
    return error(502, f"no backend of {model} answered after {len(tried)} attempt(s)", "BackendUnavailable")


def _larger_gpus(state: State, model: str, limit: int) -> list[tuple[str, int]]:
    """GPUs of the fleet (any model's instances) with more memory than `model`'s largest, and the pixel budget
    `model` would have on each: where an SDInstance of it could hold what its own GPUs cannot."""
    family = family_of(model)
    seen: dict[float, tuple[str, int]] = {}
    for backend in state.dispatcher.all_backends():
        match = _GIB.fullmatch(backend.gpu or "")
        if match is None:
            continue
        vram = float(match[1])
        pixels = pixel_budget(vram, family)
        if pixels > limit and vram not in seen:
            seen[vram] = (f"{backend.gpu}, as {backend.instance or backend.url} has", pixels)
    return list(seen.values())


async def _forward(
    request: web.Request,
    state: State,
    backend: Backend,
    path: str,
    body: bytes,
    units: float,
    key: str | None,
    attempt: int,
    tenant: str,
) -> web.StreamResponse | str:
    """Sends the request to one backend. Returns the client's response, or 'retry' / 'oom'."""
    started = time.perf_counter()
    response: web.StreamResponse | None = None
    state.running.setdefault(tenant, set()).add(backend)
    try:
        async with state.upstream.request(
            backend.url, "POST", path, body, timeout=state.cfg.request_timeout
        ) as upstream:
            if upstream.status >= 500:
                text = await upstream.read()
                if b"OutOfMemory" in text or b"out of memory" in text:
                    state.dispatcher.release(backend, ok=True)
                    m.child(m.errors, "OutOfMemoryError").inc()
                    return "oom"
                if _about_the_request(text):
                    # A healthy WebUI refusing this request (an unknown upscaler, an unreadable image): every
                    # instance would answer the same, so it goes to the client as it is.
                    state.dispatcher.release(backend, ok=True)
                    headers = {"Content-Type": "application/json", "X-SD-Backend": backend.instance or backend.url}
                    return web.Response(status=upstream.status, body=text, headers=headers)
                # A 5xx before any byte reached the client: another backend may do better.
                state.eject(backend)
                state.dispatcher.release(backend, ok=False)
                return "retry"
            headers = {k: v for k, v in upstream.raw_headers if k.lower() not in HOP_HEADERS}
            headers["X-SD-Backend"] = backend.instance or backend.url
            if attempt:
                headers["X-SD-Attempts"] = str(attempt + 1)
            # Only plain 200 answers are kept (a compressed body would be served later without its encoding).
            keep = key is not None and upstream.status == 200 and "content-encoding" not in upstream.headers
            length = upstream.content_length
            if length is not None and length <= SMALL_ANSWER:
                # A small answer goes out in one piece (headers and body in one write).
                parts = [await upstream.read()]
                response = web.Response(status=upstream.status, headers=headers, body=parts[0])
            else:
                response = web.StreamResponse(status=upstream.status, headers=headers)
                parts = await _stream(request, upstream, response, keep)
        seconds = time.perf_counter() - started
        state.dispatcher.release(backend, ok=True, seconds=seconds, units=units)
        m.child(m.service_seconds, backend.model).observe(seconds)
        if keep and key is not None:
            content_type = upstream.headers.get("content-type", "application/json")
            await state.cache.set(key, CachedResponse(b"".join(parts), content_type).encode())
        return response
    except asyncio.CancelledError:
        # The client went away: stop the backend's work instead of rendering for nobody.
        state.spawn(_interrupt(state, backend))
        state.dispatcher.release(backend, ok=True)
        m.child(m.errors, "ClientDisconnected").inc()
        raise
    except (UpstreamError, TimeoutError) as e:
        state.dispatcher.release(backend, ok=False)
        if response is not None:
            raise  # bytes already went to the client: cannot retry
        log.warning("backend %s failed: %s", backend.url, str(e) or e.__class__.__name__)
        state.eject(backend)
        m.child(m.errors, "BackendError").inc()
        return "retry"
    finally:
        state.running.get(tenant, set()).discard(backend)


REQUEST_ERRORS = frozenset({"HTTPException", "AssertionError", "RequestValidationError"})


def _about_the_request(text: bytes) -> bool:
    """A WebUI error answer ({error, detail, body, errors}) for an error in the request: the WebUI raises
    HTTPException (e.g. 500 "Invalid encoded image") or fails an assertion (e.g. "could not find upscaler
    named ...") on what it was sent. Other errors (RuntimeError, CUDA errors) may be the instance's own."""
    try:
        body = json.loads(text)
    except ValueError:
        return False
    return isinstance(body, dict) and "errors" in body and body.get("error") in REQUEST_ERRORS


async def _stream(
    request: web.Request, upstream: UpstreamResponse, response: web.StreamResponse, keep: bool
) -> list[bytes]:
    """Relays a large answer chunk by chunk (never whole in memory, unless it is kept for the cache)."""
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    await response.prepare(request)
    parts: list[bytes] = []
    async for chunk in upstream.iter_chunks():
        await response.write(chunk)
        if keep:
            parts.append(chunk)
    await response.write_eof()
    return parts


async def _interrupt(state: State, backend: Backend, action: str = "interrupt") -> None:
    """POST /sdapi/v1/interrupt (or skip) to one backend."""
    assert state.session is not None
    try:
        async with state.session.post(f"{backend.url}/sdapi/v1/{action}", timeout=aiohttp.ClientTimeout(total=5)):
            pass
    except (aiohttp.ClientError, TimeoutError):
        log.warning("could not %s %s", action, backend.url)


async def _json_body(request: web.Request) -> tuple[dict[str, Any], bytes] | web.Response:
    raw = await request.read()
    try:
        payload = json.loads(raw or b"{}")
    except ValueError:
        return error(422, "the body is not valid JSON", "ValidationError")
    if not isinstance(payload, dict):
        return error(422, "the body must be a JSON object", "ValidationError")
    return payload, raw


async def txt2img(request: web.Request) -> web.StreamResponse:
    parsed = await _json_body(request)
    if isinstance(parsed, web.Response):
        return parsed
    return await generate(request, "/sdapi/v1/txt2img", *parsed)


async def img2img(request: web.Request) -> web.StreamResponse:
    parsed = await _json_body(request)
    if isinstance(parsed, web.Response):
        return parsed
    if not parsed[0].get("init_images"):
        return error(422, "img2img needs init_images", "ValidationError")
    return await generate(request, "/sdapi/v1/img2img", *parsed)


async def v1_generate(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    parsed = await _json_body(request)
    if isinstance(parsed, web.Response):
        return parsed
    try:
        req = GenerateRequest.model_validate(parsed[0])
        preset = state.presets.get(req.preset) if req.preset else None
    except ValidationError as e:
        return error(
            422, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()), "ValidationError"
        )
    except UnknownPreset as e:
        return error(404, str(e), "UnknownPreset")
    unnamed = [i for i, unit in enumerate(req.control_units()) if not unit.model]
    if unnamed:
        # The recommended ControlNet models are SD 1.5's; the extension refuses them for another family and
        # renders without control (still a 200), so a unit for another family must name its model.
        try:
            model = _model_for(state, request, {}, req.model)
        except ModelNotReady as e:
            model = e.model  # its family is known all the same; generate() answers the 503
        except UnknownModel as e:
            return unresolved(e)
        family = state.registry.family(model)
        if family != Family.SD15:
            return error(
                422,
                f"controlnet unit(s) {unnamed}: the recommended ControlNet models are for SD 1.5, and {model} is "
                f"{family.value}: name each unit's model (GET /controlnet/model_list?model={model} lists them)",
                "ValidationError",
            )
    payload = build_txt2img_payload(req, preset)
    if req.model:
        payload["override_settings"] = {**(payload.get("override_settings") or {}), "sd_model_checkpoint": req.model}
    return await generate(request, "/sdapi/v1/txt2img", payload, None)


# ---------------------------------------------------------------------------------------------
# Fleet-wide and per-model GETs


async def sd_models(request: web.Request) -> web.Response:
    return web.json_response(_state(request).registry.sd_models())


async def options_get(request: web.Request) -> web.StreamResponse:
    return await proxy_get(request)


async def options_post(request: web.Request) -> web.Response:
    parsed = await _json_body(request)
    if isinstance(parsed, web.Response):
        return parsed
    if "sd_model_checkpoint" in parsed[0]:
        return error(400, SWITCH_ADVICE, "ModelSwitchRefused")
    return error(403, "settings of the fleet's instances are managed by sd-operator (SDInstance spec)", "Forbidden")


async def proxy_get(request: web.Request) -> web.StreamResponse:
    """A read-only WebUI GET answered by an instance of the requested (or default) model."""
    state = _state(request)
    try:
        model = _model_for(state, request, {}, request.query.get("model"))
    except (UnknownModel, ModelNotReady) as e:
        return unresolved(e)
    backends = [b for b in state.dispatcher.backends.get(model, []) if not b.ejected]
    if not backends:
        return error(503, f"no healthy instance of {model}", "NoBackend")
    backend = min(backends, key=lambda b: b.inflight)
    assert state.session is not None
    path = request.path if not request.path.startswith("/v1/") else "/sdapi/v1/loras"
    # The caller's query goes along (e.g. ControlNet's ?alias_names), less the gateway's own ?model.
    query = {k: v for k, v in request.query.items() if k != "model"}
    try:
        async with state.session.get(
            f"{backend.url}{path}", params=query, timeout=aiohttp.ClientTimeout(total=30)
        ) as upstream:
            data = await upstream.read()
            return web.Response(body=data, status=upstream.status, content_type=upstream.content_type)
    except (aiohttp.ClientError, TimeoutError):
        state.eject(backend)
        return error(502, f"instance {backend.url} did not answer", "BackendUnavailable")


async def refresh_loras(request: web.Request) -> web.Response:
    """Asks every instance of the model (or of every model) to rescan its LoRA folder (refresh-loras), or its
    VAE or embeddings folder (refresh-vae, refresh-embeddings: the same request to every instance)."""
    state = _state(request)
    assert state.session is not None
    model = request.headers.get("X-SD-Model") or request.query.get("model")
    try:
        targets = (
            state.dispatcher.backends.get(state.registry.resolve(model)) if model else state.dispatcher.all_backends()
        )
    except (UnknownModel, ModelNotReady) as e:
        return unresolved(e)
    done = []
    for backend in targets or []:
        try:
            async with state.session.post(f"{backend.url}{request.path}", timeout=aiohttp.ClientTimeout(total=60)) as r:
                done.append({"instance": backend.instance or backend.url, "status": r.status})
        except (aiohttp.ClientError, TimeoutError):
            done.append({"instance": backend.instance or backend.url, "status": "unreachable"})
    return web.json_response({"refreshed": done})


async def progress(request: web.Request) -> web.Response:
    state = _state(request)
    running = sum(b.inflight for b in state.dispatcher.all_backends())
    queued = sum(state.dispatcher.queue_depth(mdl) for mdl in state.dispatcher.models())
    return web.json_response(
        {
            "progress": 0.0,
            "eta_relative": 0.0,
            # The keys of the WebUI's shared.state.dict() (modules/shared_state.py), all of them.
            "state": {
                "skipped": False,
                "interrupted": False,
                "stopping_generation": False,
                "job": "",
                "job_count": running + queued,
                "job_timestamp": "0",
                "job_no": 0,
                "sampling_step": 0,
                "sampling_steps": 0,
            },
            "current_image": None,
            "textinfo": f"sd-operator gateway: {running} running, {queued} queued",
        }
    )


async def interrupt(request: web.Request) -> web.Response:
    """Interrupts the calling tenant's running generations (never other tenants')."""
    state = _state(request)
    tenant: Tenant = request["tenant"]
    backends = list(state.running.get(tenant.name, set()))
    await asyncio.gather(*(_interrupt(state, b) for b in backends))
    return web.json_response({"interrupted": len(backends)})


async def skip(request: web.Request) -> web.Response:
    """Skips the current image of the calling tenant's running generations (never other tenants')."""
    state = _state(request)
    tenant: Tenant = request["tenant"]
    backends = list(state.running.get(tenant.name, set()))
    await asyncio.gather(*(_interrupt(state, b, "skip") for b in backends))
    return web.json_response({"skipped": len(backends)})


# ---------------------------------------------------------------------------------------------
# The rest of the WebUI's API (modules/api/api.py of v1.10.1): png-info on any ready instance, extras and
# interrogate through the queues like generations, and the routes that would change an instance, refused.

# GETs that only read: answered by an instance of the requested (or default) model.
READ_ONLY_GETS = (
    "loras",
    "samplers",
    "schedulers",
    "upscalers",
    "latent-upscale-modes",
    "sd-vae",
    "hypernetworks",
    "face-restorers",
    "realesrgan-models",
    "prompt-styles",
    "embeddings",
    "scripts",
    "script-info",
    "extensions",
    "cmd-flags",
    "memory",
)
# POSTs that use the GPU under the WebUI's queue lock without depending on the checkpoint, and their work units.
GPU_TASKS: dict[str, Callable[[dict[str, Any]], float]] = {
    "/sdapi/v1/extra-single-image": budget.extras_units,
    "/sdapi/v1/extra-batch-images": budget.extras_units,
    "/sdapi/v1/interrogate": budget.interrogate_units,
}
_FIXED = "every instance serves the one checkpoint it loaded at start (SDInstance spec.model)"
_TRAINING = (
    "training does not run in serving instances: train a LoRA with a LoRAJob (sd-scripts); the instances pick "
    "it up from their LoRA folder (POST /sdapi/v1/refresh-loras)"
)
_POD = (
    "instances are pods managed by sd-operator: delete a pod to restart it, scale the SDInstance (spec.replicas) "
    "to stop them"
)
# POSTs that would change an instance: refused (403) with what to do instead. POST /sdapi/v1/options: options_post.
REFUSED = {
    "/sdapi/v1/refresh-checkpoints": f"{_FIXED}: another checkpoint is served by another SDInstance; "
    "GET /sdapi/v1/sd-models lists the fleet's models",
    "/sdapi/v1/reload-checkpoint": f"{_FIXED} and keeps it in GPU memory: nothing to reload",
    "/sdapi/v1/unload-checkpoint": f"{_FIXED} and keeps it in GPU memory while it runs: free GPUs by scaling the "
    "SDInstance (spec.replicas, or autoscaling down to zero), not by unloading its model",
    "/sdapi/v1/create/embedding": _TRAINING,
    "/sdapi/v1/create/hypernetwork": _TRAINING,
    "/sdapi/v1/train/embedding": _TRAINING,
    "/sdapi/v1/train/hypernetwork": _TRAINING,
    "/sdapi/v1/server-kill": _POD,
    "/sdapi/v1/server-restart": _POD,
    "/sdapi/v1/server-stop": _POD,
}


async def refused(request: web.Request) -> web.Response:
    return error(403, f"{request.path} is not served by this gateway: {REFUSED[request.path]}", "Forbidden")


def most_idle_model(dispatcher: Dispatcher) -> str | None:
    """The model whose instances have the most free slots beyond its waiting requests (ties: more instances,
    then the name): where work that any model's instance can do waits least. None without live instances."""
    best: tuple[int, int] | None = None
    chosen = None
    for model in sorted(dispatcher.backends):
        live = [b for b in dispatcher.backends[model] if not b.removed and not b.ejected]
        if not live:
            continue
        free = sum(max(0, b.max_inflight - b.inflight) for b in live)
        score = (free - dispatcher.queue_depth(model), len(live))
        if best is None or score > best:
            best, chosen = score, model
    return chosen


def _task_model(state: State, request: web.Request) -> str:
    """The model named by X-SD-Model or ?model; else, as extras and interrogate do not depend on the
    checkpoint, the model with the most idle capacity (the default model when no instance is up)."""
    explicit = request.query.get("model") or request.headers.get("X-SD-Model")
    if explicit:
        return state.registry.resolve(explicit)
    return most_idle_model(state.dispatcher) or _model_for(state, request, {})


async def gpu_task(request: web.Request) -> web.StreamResponse:
    """extra-single-image, extra-batch-images, interrogate: queued and dispatched like generations (the WebUI
    runs them under its queue lock), with their own work units; the bodies go to the instance unchanged."""
    parsed = await _json_body(request)
    if isinstance(parsed, web.Response):
        return parsed
    payload, raw = parsed
    state = _state(request)
    try:
        model = _task_model(state, request)
    except (UnknownModel, ModelNotReady) as e:
        return unresolved(e)
    request["model"] = model
    interrogate = request.path.endswith("/interrogate")

    def advice(_: int | None) -> str:
        if interrogate:
            return f"CUDA out of memory while interrogating on the instances of {model}: retry with a smaller image"
        return (
            f"CUDA out of memory while upscaling on the instances of {model}: try a smaller upscaling_resize, or "
            "upscale in two calls"
        )

    return await _dispatch(request, state, model, request.path, raw, GPU_TASKS[request.path](payload), None, advice)


async def png_info(request: web.Request) -> web.StreamResponse:
    """POST /sdapi/v1/png-info on the least busy ready instance (of ?model / X-SD-Model when given), outside the
    queues: the WebUI answers it without its queue lock and without the GPU. It is parsed by an instance, not
    here: the infotext parser's defaults and version back-compatibility, and the extensions' infotext callbacks
    (the Lora extension renames LoRAs by their hashes), are the instance's own; the gateway would only imitate
    them."""
    state = _state(request)
    raw = await request.read()
    explicit = request.query.get("model") or request.headers.get("X-SD-Model")
    try:
        model = state.registry.resolve(explicit) if explicit else None
    except (UnknownModel, ModelNotReady) as e:
        return unresolved(e)
    request["model"] = model
    group = state.dispatcher.backends.get(model, []) if model else state.dispatcher.all_backends()
    ready = sorted((b for b in group if not b.ejected and not b.removed), key=lambda b: b.inflight)
    if not ready:
        return error(
            503,
            "png-info is answered by any ready instance, and none is ready; retry later (GET /v1/models)",
            "NoBackend",
            retry_after=NOT_READY_RETRY_SECONDS,
        )
    assert state.session is not None
    for backend in ready[: state.cfg.retries + 1]:
        try:
            async with state.session.post(
                f"{backend.url}{request.path}",
                data=raw,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=60),
            ) as upstream:
                data = await upstream.read()
                return web.Response(
                    body=data,
                    status=upstream.status,
                    content_type=upstream.content_type,
                    headers={"X-SD-Backend": backend.instance or backend.url},
                )
        except (aiohttp.ClientError, TimeoutError):
            state.eject(backend)
    return error(502, "no instance answered png-info", "BackendUnavailable")


async def v1_models(request: web.Request) -> web.Response:
    """The fleet's models, also those with no ready pod: `state` is Ready, or why not (ScaledToZero,
    Downloading, Loading, Pending, Failed)."""
    state = _state(request)
    out = []
    for info in state.registry.sd_models():
        group = state.dispatcher.backends.get(info["filename"], [])
        declared = state.registry.instances_of(info["filename"])
        out.append(
            {
                **info,
                "state": "Ready" if group else (declared[0].state if declared else "Pending"),
                "instances": len(group),
                "idle": sum(1 for b in group if b.state == "idle"),
                "queue": state.dispatcher.queue_depth(info["filename"]),
                "scalesFromZero": any(d.scalable for d in declared),
            }
        )
    return web.json_response(out)


async def v1_demand(request: web.Request) -> web.Response:
    """This gateway's demand per model (what it publishes for the operator's autoscaler)."""
    return web.json_response({"models": _state(request).dispatcher.demand()})


async def v1_presets(request: web.Request) -> web.Response:
    presets = _state(request).presets
    return web.json_response(
        {
            "presets": {name: presets.get(name).model_dump(mode="json") for name in presets.names()},
            "controlnet": {str(k): v.__dict__ if hasattr(v, "__dict__") else str(v) for k, v in RECOMMENDED.items()},
        },
        dumps=lambda o: json.dumps(o, default=str),
    )


async def v1_instances(request: web.Request) -> web.Response:
    state = _state(request)
    return web.json_response(
        [
            {
                "url": b.url,
                "instance": b.instance,
                "model": b.model,
                "state": b.state,
                "inflight": b.inflight,
                "queue": state.dispatcher.queue_depth(b.model),
                "gpu": b.gpu,
                "pixelBudget": b.pixel_budget,
                "completed": b.completed,
                "recentLatencySeconds": b.last_latency,
                "secondsPerUnit": b.seconds_per_unit,
            }
            for b in state.dispatcher.all_backends()
        ]
    )


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when some instance can take work now, or when a model at zero will get one on demand: a
    gateway that left its Service while every model sleeps would never see the request that wakes one."""
    state = _state(request)
    backends = state.dispatcher.all_backends()
    waking = sorted({d.model for d in state.registry.declared.values() if d.scalable and d.phase != "Failed"})
    ready = any(not b.ejected for b in backends) or bool(waking)
    return web.json_response(
        {"ready": ready, "backends": len(backends), "scalesFromZero": waking}, status=200 if ready else 503
    )


async def metrics_handler(request: web.Request) -> web.Response:
    state = _state(request)
    m.refresh_gauges(state.dispatcher, state.cache)
    body, content_type = m.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi(_: web.Request) -> web.Response:
    from sd_operator.gateway.openapi import document

    return web.json_response(document())


# ---------------------------------------------------------------------------------------------


def create_app(cfg: GatewayConfig, dispatcher: Dispatcher | None = None) -> web.Application:
    app = web.Application(middlewares=[auth_middleware], client_max_size=cfg.max_body_bytes)
    state = State(cfg, dispatcher)
    app[CONFIG] = cfg
    app[STATE] = state
    r = app.router
    r.add_post("/sdapi/v1/txt2img", txt2img)
    r.add_post("/sdapi/v1/img2img", img2img)
    r.add_get("/sdapi/v1/sd-models", sd_models)
    r.add_get("/sdapi/v1/options", options_get)
    r.add_post("/sdapi/v1/options", options_post)
    r.add_get("/sdapi/v1/progress", progress)
    r.add_post("/sdapi/v1/interrupt", interrupt)
    r.add_post("/sdapi/v1/skip", skip)
    for what in ("loras", "vae", "embeddings"):
        r.add_post(f"/sdapi/v1/refresh-{what}", refresh_loras)
    r.add_post("/sdapi/v1/png-info", png_info)
    for path in GPU_TASKS:
        r.add_post(path, gpu_task)
    for path in REFUSED:
        r.add_post(path, refused)
    for path in READ_ONLY_GETS:
        r.add_get(f"/sdapi/v1/{path}", proxy_get)
    for path in ("model_list", "module_list", "version", "control_types"):
        r.add_get(f"/controlnet/{path}", proxy_get)
    r.add_post("/v1/generate", v1_generate)
    r.add_get("/v1/models", v1_models)
    r.add_get("/v1/loras", proxy_get)
    r.add_get("/v1/presets", v1_presets)
    r.add_get("/v1/instances", v1_instances)
    r.add_get("/v1/demand", v1_demand)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_handler)
    r.add_get("/openapi.json", openapi)

    from sd_operator.gateway import console  # the web console's page and read endpoints (imports this module)

    console.setup(app, cfg)

    async def lifecycle(app: web.Application) -> Any:
        state.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60))
        yield
        for task in list(state.background):
            task.cancel()
        await state.session.close()
        state.upstream.close()
        await state.cache.close()

    app.cleanup_ctx.append(lifecycle)
    return app
