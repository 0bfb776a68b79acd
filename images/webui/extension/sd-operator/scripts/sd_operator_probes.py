"""sd-operator probes for the AUTOMATIC1111 WebUI: GET /sd-operator/live, /sd-operator/ready and /sd-operator/drain.

The operator points the WebUI container's probes here (render/sdinstance.py READY_PATH, LIVE_PATH):

- live: 200 whenever the HTTP server answers. Both handlers are `async def`, so they run on the event loop
  and never wait for a thread-pool worker, and neither takes the WebUI's `queue_lock`: a long generation
  never fails liveness.
- ready: 200 with {"model": title} once the checkpoint given with --ckpt is loaded; 503 while it loads,
  when loading failed, or when another checkpoint is loaded.

- drain: the webui container's preStop hook (render/sdinstance.py DRAIN_PATH). The kubelet calls it before
  SIGTERM and waits for it within the pod's grace period (120 s); it answers 200 {"status": "drained"} once
  the WebUI has no generation running or queued, or 200 {"status": "timeout"} after `?timeout=` seconds
  (110 by default). It polls on the event loop (asyncio.sleep) and only looks at the queue lock and
  `shared.state`: it never takes the lock, and never fails (the kubelet only logs a hook's answer).

The model is read from `modules.sd_models.model_data` directly. Reading `modules.shared.sd_model` would go
through `model_data.get_sd_model()`, which loads the model when none is loaded yet, and blocks on the load
lock while the startup thread loads it: a probe must not do either.

Loaded by the WebUI from extensions/sd-operator/scripts/ on its own Python (3.10 in the image): keep this
file free of newer syntax and of imports outside the WebUI's environment.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable
from typing import Any

from modules import script_callbacks

LIVE_PATH = "/sd-operator/live"
READY_PATH = "/sd-operator/ready"
DRAIN_PATH = "/sd-operator/drain"
DRAIN_TIMEOUT = 110.0  # seconds: under the pod's terminationGracePeriodSeconds (120), leaving time for SIGTERM
DRAIN_POLL = 0.25  # seconds between two looks at the WebUI
DRAIN_IDLE_CHECKS = 2  # idle on this many looks in a row (one poll apart) counts as drained


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def expected_checkpoint(cmd_opts: Any, default_ckpt: str | None) -> str | None:
    """The checkpoint the process was started with (--ckpt), or None when any loaded model will do.

    --ckpt defaults to <webui>/model.ckpt; that default only counts when such a file exists."""
    ckpt = getattr(cmd_opts, "ckpt", None)
    if not ckpt:
        return None
    if default_ckpt and _same_file(ckpt, default_ckpt) and not os.path.exists(ckpt):
        return None
    return str(ckpt)


def probe_state(model_data: Any, expected: str | None) -> tuple[int, dict[str, Any]]:
    """(status code, body) of the ready probe, from the WebUI's model holder; never loads or waits."""
    expected_name = os.path.basename(expected) if expected else None
    model = getattr(model_data, "sd_model", None)
    lock = getattr(model_data, "lock", None)
    loading = lock is not None and lock.locked()
    info = getattr(model, "sd_checkpoint_info", None) if model is not None else None
    if info is None or loading or not getattr(model_data, "was_loaded_at_least_once", True):
        return 503, {"status": "loading", "model": expected_name}
    title = str(getattr(info, "title", "") or getattr(info, "filename", ""))
    filename = getattr(info, "filename", None)
    if expected and not (filename and _same_file(str(filename), expected)):
        return 503, {"status": "wrong-model", "model": title, "expected": expected_name}
    return 200, {"status": "ready", "model": title}


def _ready_state() -> tuple[int, dict[str, Any]]:
    from modules import paths_internal, sd_models, shared

    expected = expected_checkpoint(shared.cmd_opts, getattr(paths_internal, "sd_model_file", None))
    return probe_state(sd_models.model_data, expected)


def lock_activity(lock: Any) -> tuple[bool, int]:
    """(held, queued) of the WebUI's queue lock, read without taking it.

    A1111 v1.10.1's `modules.call_queue.queue_lock` is a `modules.fifo_lock.FIFOLock`: a threading.Lock
    `_lock` and a deque `_pending_threads` of the threads waiting for it (it has no locked() of its own).
    Older WebUIs used a plain threading.Lock, which is read the same way (held, nobody seen waiting)."""
    inner = getattr(lock, "_lock", lock)
    locked = getattr(inner, "locked", None)
    held = bool(locked()) if callable(locked) else False
    queued = len(getattr(lock, "_pending_threads", None) or ())
    return held, queued


def busy(state: Any, lock: Any) -> dict[str, Any] | None:
    """What keeps the WebUI busy, or None when it is idle: no generation running or queued.

    Running: the queue lock is held, or `shared.state` has a job (State.begin() sets `job` and
    job_count -1, State.end() clears both; the API's txt2img/img2img run both under the lock).
    Queued: requests blocked on the FIFO lock, each one entry of its `_pending_threads`."""
    held, queued = lock_activity(lock)
    job = str(getattr(state, "job", "") or "")
    job_count = getattr(state, "job_count", 0) or 0
    if held or queued or job or job_count:
        return {"job": job, "jobCount": job_count, "lockHeld": held, "queued": queued}
    return None


def drain_timeout(value: str | None) -> float:
    """The `?timeout=` of the drain route in seconds; the default when it is absent or not a number >= 0."""
    try:
        seconds = float(value) if value not in (None, "") else DRAIN_TIMEOUT
    except (TypeError, ValueError):
        return DRAIN_TIMEOUT
    return seconds if math.isfinite(seconds) and seconds >= 0 else DRAIN_TIMEOUT


async def wait_until_idle(
    check: Callable[[], dict[str, Any] | None], limit: float, poll: float = DRAIN_POLL
) -> dict[str, Any]:
    """Polls `check` (None when idle) until it reads idle DRAIN_IDLE_CHECKS times in a row, or `limit`
    seconds passed; the drain route's answer. Sleeps with asyncio.sleep: the event loop keeps serving.

    Two looks in a row rather than one: the FIFO lock hands over to the next queued thread in two steps
    (pop it from `_pending_threads`, release; the woken thread then takes `_lock`), so one look can fall
    between them. A `check` that raises counts as busy: it cannot tell that nothing runs."""
    started = time.monotonic()
    idle_checks = 0
    while True:
        try:
            what = check()
        except Exception as e:  # an unexpected WebUI internals change: keep the generation safe, wait
            what = {"error": f"{type(e).__name__}: {e}"}
        elapsed = time.monotonic() - started
        if what is None:
            idle_checks += 1
            if idle_checks >= DRAIN_IDLE_CHECKS or elapsed >= limit:
                return {"status": "drained", "waitedSeconds": round(elapsed, 3)}
        else:
            idle_checks = 0
            if elapsed >= limit:
                return {"status": "timeout", "waitedSeconds": round(elapsed, 3), "busy": what}
        await asyncio.sleep(min(poll, max(0.0, limit - elapsed)))


def _webui_busy() -> dict[str, Any] | None:
    from modules import call_queue, shared

    return busy(shared.state, call_queue.queue_lock)


def register(app: Any) -> None:
    """Adds the three routes to the WebUI's FastAPI app (once, even if the script is loaded again)."""
    from fastapi.responses import JSONResponse

    async def live() -> Any:
        return JSONResponse({"status": "alive"})

    async def ready() -> Any:
        try:
            code, body = _ready_state()
        except Exception as e:  # an unexpected WebUI internals change must read as not ready, not as a 500
            code, body = 503, {"status": "unknown", "error": f"{type(e).__name__}: {e}"}
        return JSONResponse(body, status_code=code)

    # `timeout` is the query parameter, taken as text so that no value makes FastAPI answer 422.
    async def drain(timeout: str = "") -> Any:  # noqa: ASYNC109 - the query parameter's name
        try:
            body = await wait_until_idle(_webui_busy, drain_timeout(timeout))
        except Exception as e:  # never fail the hook; the kubelet would only log it
            body = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        return JSONResponse(body)

    present = {getattr(route, "path", None) for route in getattr(app, "routes", [])}
    for path, handler in ((LIVE_PATH, live), (READY_PATH, ready), (DRAIN_PATH, drain)):
        if path not in present:
            app.add_api_route(path, handler, methods=["GET"], include_in_schema=False)


def on_app_started(_demo: Any, app: Any) -> None:
    register(app)


script_callbacks.on_app_started(on_app_started)
