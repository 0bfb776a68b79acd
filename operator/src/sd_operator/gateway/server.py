"""`sd-operator gateway`: run the gateway with its backends from a file and/or Kubernetes discovery."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
from pathlib import Path

import uvloop
from aiohttp import web

from sd_operator import logs
from sd_operator.gateway.app import STATE, State, create_app
from sd_operator.gateway.config import GatewayConfig
from sd_operator.gateway.demand import default_gateway_id, default_namespace
from sd_operator.gateway.dispatch import Backend
from sd_operator.gateway.outputs import parse_mounts
from sd_operator.gateway.registry import load_backends_file

log = logging.getLogger("sd_operator.gateway")


def file_changes(
    owned: dict[str, Backend], listed: list[Backend], served: set[str]
) -> tuple[list[Backend], list[Backend]]:
    """What a re-read of the backends file changes (pure): which of the file's own backends go (no longer
    listed) and which listed ones come (new to the file, and not served already from another source).

    Only backends the file brought are ever removed: those Kubernetes discovery found are its own, and a
    file change must not drop them (nor a discovery update the file's)."""
    wanted = {b.url: b for b in listed}
    gone = [b for url, b in owned.items() if url not in wanted]
    new = [b for url, b in wanted.items() if url not in owned and url not in served]
    return gone, new


class FileBackends:
    """The backends that came from --backends-file, by URL: the file's source of the backend set."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.owned: dict[str, Backend] = {}

    def pending(self, state: State) -> bool:
        """Some listed backend is not served yet (it did not answer before): worth a sync."""
        served = {b.url for b in state.dispatcher.all_backends()}
        return bool({b.url for b in load_backends_file(self.path, 1)} - served)

    async def sync(self, state: State) -> None:
        """Adds and removes the file's backends to match it; a backend that does not answer is retried later."""
        listed = load_backends_file(self.path, state.cfg.inflight_per_backend)
        others = {b.url for b in state.dispatcher.all_backends()} - set(self.owned)
        gone, new = file_changes(self.owned, listed, others)
        for backend in gone:
            del self.owned[backend.url]
            state.dispatcher.remove(backend)
            log.info("backend %s removed", backend.url)
        for backend in new:
            if await state.add_backend(backend):
                self.owned[backend.url] = backend
            else:
                log.warning("backend %s does not answer yet; retrying", backend.url)


async def watch_backends_file(state: State, path: Path, interval: float = 2.0) -> None:
    """Backends come and go without a restart: the file is re-read when it changes (and periodically,
    which also retries backends that did not answer before)."""
    source = FileBackends(path)
    last = None
    while True:
        try:
            stamp = path.stat().st_mtime_ns  # noqa: ASYNC240 - one stat of a small local file
            if stamp != last or source.pending(state):
                await source.sync(state)
                last = stamp
        except (OSError, ValueError) as e:
            log.error("backends file %s: %s", path, e)
        await asyncio.sleep(interval)


async def serve(cfg: GatewayConfig, ready: asyncio.Event | None = None) -> None:
    app = create_app(cfg)
    state = app[STATE]
    # Handler cancellation: a client that disconnects cancels its handler, which leaves the queue or
    # interrupts the backend's work.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, backlog=1024)
    await site.start()
    tasks = []
    if cfg.backends_file:
        tasks.append(asyncio.create_task(watch_backends_file(state, cfg.backends_file)))
    if cfg.kubernetes:
        from sd_operator.gateway.console import CONSOLE
        from sd_operator.gateway.discovery import KubeDiscovery
        from sd_operator.gateway.objects import ObjectWatcher

        discovery = app[CONSOLE].discovery = KubeDiscovery(state, cfg.namespaces)
        tasks.append(asyncio.create_task(discovery.run()))
        if cfg.console_watch:
            objects = app[CONSOLE].objects = ObjectWatcher(cfg.namespaces)
            tasks.append(asyncio.create_task(objects.run()))
    if cfg.report_demand:
        from sd_operator.gateway.demand import DemandPublisher

        publisher = DemandPublisher(state.dispatcher, cfg.gateway_id, cfg.demand_namespace)
        tasks.append(asyncio.create_task(publisher.run()))
    # What startup built (the kubernetes client, kopf, pydantic models: ~110k objects) stays for good; frozen,
    # a full collection scans only what requests leave behind (113 ms -> 0.02 ms for this part of the heap)
    # instead of stalling every request in flight for that long.
    gc.collect()
    gc.freeze()
    port = runner.addresses[0][1] if runner.addresses else cfg.port
    log.info("gateway listening on http://%s:%s", cfg.host, port)
    print(f"GATEWAY_PORT={port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready:
        ready.set()
    await stop.wait()
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await runner.cleanup()


def command(args: argparse.Namespace) -> int:
    logs.setup(logs.format_of(args))
    cfg = GatewayConfig(
        host=args.host,
        port=args.port,
        default_model=args.default_model,
        max_queue=args.max_queue,
        inflight_per_backend=args.inflight,
        dispatch_window=args.dispatch_window,
        retries=args.retries,
        cool_off=args.cool_off,
        request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_mib * 1024 * 1024,
        keys_file=args.keys_file,
        presets_file=args.presets_file,
        backends_file=args.backends_file,
        cache_url=args.cache_url,
        cache_bytes=args.cache_mib * 1024 * 1024,
        kubernetes=args.kubernetes,
        namespaces=tuple(args.namespace or ()),
        access_log=args.access_log,
        cold_start_timeout=args.cold_start_timeout,
        report_demand=args.report_demand,
        gateway_id=args.gateway_id or default_gateway_id(),
        demand_namespace=args.demand_namespace or default_namespace(),
        outputs_dirs=tuple(args.outputs_dir or ()),
        own_namespace=default_namespace(),
        thumbnail_cache_bytes=args.thumbnail_cache_mib * 1024 * 1024,
        console_watch=args.console_watch,
    )
    if not cfg.backends_file and not cfg.kubernetes:
        raise SystemExit("sd-operator gateway: give --backends-file or --kubernetes (or both)")
    try:
        parse_mounts(cfg.outputs_dirs, cfg.own_namespace)
    except ValueError as e:
        raise SystemExit(f"sd-operator gateway: {e}") from None
    uvloop.run(serve(cfg))  # asyncio on libuv: the same semantics, less CPU per request
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gateway", help="the services layer: an AUTOMATIC1111-compatible API for the whole fleet")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=8080, help="port (0 picks a free one and prints GATEWAY_PORT=)")
    p.add_argument("--default-model", help="model for requests that name none")
    p.add_argument("--backends-file", type=Path, help="static backends (YAML: backends: [{url, model?, ...}])")
    p.add_argument("--kubernetes", action="store_true", help="discover SDInstances and their EndpointSlices")
    p.add_argument("-n", "--namespace", action="append", help="namespaces to discover in (default: all)")
    p.add_argument("--keys-file", type=Path, help="API keys (YAML: keys: [{key|keySha256, tenant, priority, ...}])")
    p.add_argument("--presets-file", type=Path, help="extra presets (YAML), e.g. a mounted ConfigMap")
    p.add_argument("--cache-url", help="redis://… for a shared result cache (default: in memory)")
    p.add_argument("--cache-mib", type=int, default=256, help="in-memory result cache size")
    p.add_argument("--max-queue", type=int, default=1000, help="waiting requests per model before 429")
    p.add_argument("--inflight", type=int, default=1, help="generations per instance at a time")
    p.add_argument(
        "--dispatch-window",
        type=int,
        default=0,
        help="waiting requests weighed by size, largest first, for the card that finishes each soonest "
        "(0: twice the model's instances; 1: strict serving order)",
    )
    p.add_argument("--retries", type=int, default=2, help="other instances tried when one fails")
    p.add_argument("--cool-off", type=float, default=10.0, help="seconds a failing instance gets no work")
    p.add_argument("--request-timeout", type=float, default=900.0, help="seconds one generation may take")
    p.add_argument("--max-body-mib", type=int, default=64, help="largest request body")
    p.add_argument("--access-log", action="store_true", help="log one line per request (never the API key)")
    p.add_argument(
        "--cold-start-timeout",
        type=float,
        default=600.0,
        help="seconds a request for a model at zero (autoscaled SDInstances) waits for a first pod before 503",
    )
    p.add_argument(
        "--report-demand",
        action="store_true",
        help="publish per-model demand (queued + running) in a ConfigMap for the operator's autoscaler",
    )
    p.add_argument("--gateway-id", help="names this replica's demand report (default: $POD_NAME, else the hostname)")
    p.add_argument("--demand-namespace", help="namespace of the demand report (default: $POD_NAMESPACE, else default)")
    p.add_argument(
        "--outputs-dir",
        action="append",
        metavar="[NAMESPACE/]CLAIM=PATH",
        help="where a PersistentVolumeClaim that batches write to is mounted, for the console's galleries "
        "(repeatable; a claim without NAMESPACE/ is one of the gateway's own namespace)",
    )
    p.add_argument("--thumbnail-cache-mib", type=int, default=32, help="memory for the console's thumbnails")
    p.add_argument(
        "--console-watch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --kubernetes, watch GenerationBatches and LoRAJobs for the console (/v1/batches, /v1/lorajobs)",
    )
    p.set_defaults(func=command)


__all__ = ["Backend", "add_parser", "serve"]
