"""The web console's side of the gateway: its static page under /ui/ and the read endpoints it polls.

The page (sd_operator/gateway/ui/) is served without a key: it is an empty shell that asks for one and
sends it on every call. Everything with data is under /v1 and needs a key like the rest of the API:

- GET /v1/fleet: models with their SDInstances (phase, GPU, replicas), queue and wait, discovery's health
- GET /v1/batches, /v1/batches/{ns}/{name}/outputs (paged), .../files/{file}, .../thumbnails/{file}
- GET /v1/lorajobs, /v1/lorajobs/{ns}/{name}/evaluation (prompts x LoRA weights)
- GET /v1/requests/{id}: a generation sent with X-Request-Id: queued (position), running (progress), done
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sd_operator.gateway import tracking
from sd_operator.gateway.app import STATE, State, error
from sd_operator.gateway.config import GatewayConfig
from sd_operator.gateway.discovery import KubeDiscovery, declared_model
from sd_operator.gateway.dispatch import Backend
from sd_operator.gateway.objects import (
    ObjectWatcher,
    batch_summary,
    instance_summary,
    lorajob_summary,
    model_state,
)
from sd_operator.gateway.outputs import (
    NotFound,
    Outputs,
    OutputsUnavailable,
    evaluation_grid,
    image_file,
    item_view,
    page_bounds,
    parse_mounts,
)

log = logging.getLogger("sd_operator.gateway.console")
UI_DIR = Path(__file__).parent / "ui"
# Types the page's files need, whatever the host's mime database says (a missing /etc/mime.types would
# serve .js as text/plain, which browsers refuse to run with nosniff).
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain; charset=utf-8",
}
PROGRESS_TIMEOUT = 2.0  # seconds an instance gets to answer /sdapi/v1/progress for a poll


class Console:
    """What the console's handlers read besides the gateway's State: discovery's SDInstances and the watched
    batches and LoRAJobs (both set by the server when it runs with --kubernetes), and batch outputs."""

    def __init__(self, cfg: GatewayConfig, ui_dir: Path = UI_DIR) -> None:
        self.discovery: KubeDiscovery | None = None
        self.objects: ObjectWatcher | None = None
        self.outputs = Outputs(parse_mounts(cfg.outputs_dirs, cfg.own_namespace), cfg.thumbnail_cache_bytes)
        self.ui_dir = ui_dir


CONSOLE: web.AppKey[Console] = web.AppKey("console", Console)


def _console(request: web.Request) -> Console:
    return request.app[CONSOLE]


# ---------------------------------------------------------------------------------------------
# Static files


async def ui_redirect(_: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


async def ui_file(request: web.Request) -> web.StreamResponse:
    root = _console(request).ui_dir.resolve()
    path = (root / (request.match_info["path"] or "index.html")).resolve()
    if path.is_dir():
        path = path / "index.html"
    if not path.is_relative_to(root) or not path.is_file():
        return web.Response(status=404, text="not found", headers={"Cache-Control": "no-cache"})
    content_type = CONTENT_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    headers = {
        "Content-Type": content_type,
        # Revalidated on every load (ETag / Last-Modified): an upgraded gateway serves its new page at once.
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Content-Security-Policy": "frame-ancestors 'none'",  # no framing (clickjacking); scripts unaffected
    }
    return web.FileResponse(path, headers=headers)


# ---------------------------------------------------------------------------------------------
# Fleet


def _file_instances(backends: list[Backend], known: set[str]) -> list[dict[str, Any]]:
    """Backends of no watched SDInstance (a static backends file) as instances: one per instance name or URL."""
    groups: dict[str, list[Backend]] = {}
    for b in backends:
        name = b.instance or b.url
        if name not in known:
            groups.setdefault(name, []).append(b)
    out = []
    for name, group in sorted(groups.items()):
        ns, _, short = name.rpartition("/") if "/" in name and "://" not in name else ("", "", name)
        ready = [b for b in group if not b.ejected]
        out.append(
            {
                "namespace": ns,
                "name": short,
                "phase": "Ready" if ready else "Degraded",
                "reason": None if ready else "Ejected",
                "message": None if ready else "the gateway got errors from it and waits before trying again",
                "gpu": group[0].gpu,
                "replicas": len(group),
                "readyReplicas": len(ready),
                "desiredReplicas": None,
                "specReplicas": None,
                "autoscaling": False,
            }
        )
    return out


def fleet(state: State, console: Console) -> dict[str, Any]:
    dispatcher = state.dispatcher
    demand = dispatcher.demand()
    raw = list(console.discovery.instances.values()) if console.discovery else []
    by_model: dict[str, list[dict[str, Any]]] = {}
    for instance in raw:
        declared = declared_model(instance)
        if declared is not None:
            by_model.setdefault(declared.model, []).append(instance)
    models = []
    for info in state.registry.sd_models():
        model = info["filename"]
        backends = dispatcher.backends.get(model, [])
        instances = [instance_summary(i) for i in by_model.get(model, [])]
        known = {f"{i['namespace']}/{i['name']}" for i in instances}
        instances = sorted(instances, key=lambda i: (i["namespace"], i["name"])) + _file_instances(backends, known)
        wants = demand.get(model) or {}
        models.append(
            {
                "model": model,
                "title": info["title"],
                "state": model_state(len(backends), instances),
                "queue": dispatcher.queue_depth(model),
                "running": sum(b.inflight for b in backends),
                "oldestWaitSeconds": wants.get("oldestWaitSeconds") if wants.get("queued") else None,
                "instances": instances,
            }
        )
    if console.discovery is not None:
        health = {"up": console.discovery.up(), "staleSeconds": round(console.discovery.stale_seconds(), 1)}
    else:
        health = {"up": True, "staleSeconds": 0.0, "kubernetes": False}  # a static backends file: nothing stale
    return {"models": models, "discovery": health}


async def v1_fleet(request: web.Request) -> web.Response:
    return web.json_response(fleet(request.app[STATE], _console(request)))


# ---------------------------------------------------------------------------------------------
# Batches and LoRAJobs


def _watch_health(console: Console) -> dict[str, Any]:
    if console.objects is None:
        return {"up": False, "reason": "the gateway runs without --kubernetes (or with --no-console-watch)"}
    return {"up": console.objects.up(), "staleSeconds": round(console.objects.stale_seconds(), 1)}


async def v1_batches(request: web.Request) -> web.Response:
    console = _console(request)
    items = [batch_summary(b) for b in console.objects.batches()] if console.objects else []
    return web.json_response({"items": items, "watch": _watch_health(console)})


async def v1_lorajobs(request: web.Request) -> web.Response:
    console = _console(request)
    items = [lorajob_summary(j) for j in console.objects.lorajobs()] if console.objects else []
    return web.json_response({"items": items, "watch": _watch_health(console)})


def _batch(request: web.Request, namespace: str, name: str) -> dict[str, Any] | web.Response:
    console = _console(request)
    batch = console.objects.batch(namespace, name) if console.objects else None
    if batch is None:
        return error(404, f"no GenerationBatch {namespace}/{name} (GET /v1/batches lists them)", "NotFound")
    return batch


async def _store_call(fn: Any, *args: Any) -> Any:
    """A blocking store access in a thread; the store's failures as answers (never with credentials)."""
    try:
        return await asyncio.to_thread(fn, *args)
    except OutputsUnavailable as e:
        return error(e.status, str(e), "OutputsUnavailable")
    except NotFound as e:
        return error(404, f"no output file {e}", "NotFound")
    except Exception as e:  # the store refused or is unreachable (S3 errors name no credentials)
        log.warning("console: reading batch outputs failed: %s", e.__class__.__name__)
        return error(502, f"the batch's output store failed: {e.__class__.__name__}: {e}", "OutputsUnavailable")


async def v1_batch_outputs(request: web.Request) -> web.Response:
    ns, name = request.match_info["namespace"], request.match_info["name"]
    batch = _batch(request, ns, name)
    if isinstance(batch, web.Response):
        return batch
    try:
        offset, limit = page_bounds(request.query.get("offset"), request.query.get("limit"))
    except ValueError:
        return error(422, "offset and limit must be integers", "ValidationError")
    outputs = _console(request).outputs
    entries = await _store_call(outputs.entries, batch)
    if isinstance(entries, web.Response):
        return entries
    page = entries[offset : offset + limit]
    sidecars = await asyncio.gather(*(_store_call(outputs.sidecar, batch, e) for e in page))
    fmt = str(((batch.get("spec") or {}).get("output") or {}).get("format") or "png")
    base = f"/v1/batches/{ns}/{name}"
    items = [
        item_view(base, entry, side if isinstance(side, dict) else None, fmt)
        for entry, side in zip(page, sidecars, strict=True)
    ]
    return web.json_response({"total": len(entries), "offset": offset, "limit": limit, "items": items})


async def _image(request: web.Request, thumbnail: bool) -> web.Response:
    ns, name, file = request.match_info["namespace"], request.match_info["name"], request.match_info["file"]
    if not image_file(file):
        return error(404, f"{file!r} is not an output image of a batch", "NotFound")
    batch = _batch(request, ns, name)
    if isinstance(batch, web.Response):
        return batch
    outputs = _console(request).outputs
    if thumbnail:
        data = await _store_call(outputs.thumbnail, batch, file)
        content_type = "image/jpeg"
    else:
        got = await _store_call(outputs.file, batch, file)
        data, content_type = got if isinstance(got, tuple) else (got, "")
    if isinstance(data, web.Response):
        return data
    # An output file never changes once written (atomic rename, single put): the browser may keep it.
    headers = {"Cache-Control": "private, max-age=86400, immutable", "X-Content-Type-Options": "nosniff"}
    return web.Response(body=data, content_type=content_type, headers=headers)


async def v1_batch_file(request: web.Request) -> web.Response:
    return await _image(request, thumbnail=False)


async def v1_batch_thumbnail(request: web.Request) -> web.Response:
    return await _image(request, thumbnail=True)


async def v1_lorajob_evaluation(request: web.Request) -> web.Response:
    console = _console(request)
    ns, name = request.match_info["namespace"], request.match_info["name"]
    job = console.objects.lorajob(ns, name) if console.objects else None
    if job is None:
        return error(404, f"no LoRAJob {ns}/{name} (GET /v1/lorajobs lists them)", "NotFound")
    batch_name = (job.get("status") or {}).get("evaluationBatch")
    if not batch_name:
        return error(404, f"LoRAJob {ns}/{name} has no evaluation batch (yet)", "NotFound")
    batch = _batch(request, ns, batch_name)
    if isinstance(batch, web.Response):
        return batch
    entries = await _store_call(console.outputs.entries, batch)
    if isinstance(entries, web.Response):
        return entries
    spec = batch.get("spec") or {}
    fmt = str((spec.get("output") or {}).get("format") or "png")
    total = (batch.get("status") or {}).get("total")
    grid = evaluation_grid(batch_name, spec, total, entries, f"/v1/batches/{ns}/{batch_name}", fmt)
    grid["phase"] = (batch.get("status") or {}).get("phase") or "Pending"
    return web.json_response(grid)


# ---------------------------------------------------------------------------------------------
# Request state


async def _instance_progress(state: State, backend: Backend) -> dict[str, Any] | None:
    """The instance's own /sdapi/v1/progress (it renders one request at a time: this one)."""
    assert state.session is not None
    try:
        async with state.session.get(
            f"{backend.url}/sdapi/v1/progress",
            params={"skip_current_image": "true"},
            timeout=aiohttp.ClientTimeout(total=PROGRESS_TIMEOUT),
        ) as r:
            if r.status != 200:
                return None
            answer = await r.json(loads=json.loads)
            return answer if isinstance(answer, dict) else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def v1_request(request: web.Request) -> web.Response:
    """Only the caller's own requests (same key, hence tenant): another's id is unknown here."""
    state = request.app[STATE]
    tracked = state.requests.get(request["tenant"].name, request.match_info["id"])
    queue = depth = None
    progress = None
    if tracked is not None and tracked.model:
        depth = state.dispatcher.queue_depth(tracked.model)
        if tracked.state == "queued":
            queue = state.dispatcher.position(tracked.ticket)
        elif tracked.state == "running" and tracked.backend is not None:
            progress = await _instance_progress(state, tracked.backend)
    return web.json_response(tracking.describe(tracked, queue, depth or 0, progress))


# ---------------------------------------------------------------------------------------------


def setup(app: web.Application, cfg: GatewayConfig) -> Console:
    """Adds the console's routes; the server sets `discovery` and `objects` when it watches a cluster."""
    console = Console(cfg)
    app[CONSOLE] = console
    r = app.router
    r.add_get("/ui", ui_redirect)
    r.add_get("/ui/{path:.*}", ui_file)
    r.add_get("/v1/fleet", v1_fleet)
    r.add_get("/v1/batches", v1_batches)
    r.add_get("/v1/batches/{namespace}/{name}/outputs", v1_batch_outputs)
    r.add_get("/v1/batches/{namespace}/{name}/files/{file}", v1_batch_file)
    r.add_get("/v1/batches/{namespace}/{name}/thumbnails/{file}", v1_batch_thumbnail)
    r.add_get("/v1/lorajobs", v1_lorajobs)
    r.add_get("/v1/lorajobs/{namespace}/{name}/evaluation", v1_lorajob_evaluation)
    r.add_get("/v1/requests/{id}", v1_request)
    return console


__all__ = ["CONSOLE", "Console", "setup"]
