"""sd-operator probes for the AUTOMATIC1111 WebUI: GET /sd-operator/live and GET /sd-operator/ready.

The operator points the WebUI container's probes here (render/sdinstance.py READY_PATH, LIVE_PATH):

- live: 200 whenever the HTTP server answers. Both handlers are `async def`, so they run on the event loop
  and never wait for a thread-pool worker, and neither takes the WebUI's `queue_lock`: a long generation
  never fails liveness.
- ready: 200 with {"model": title} once the checkpoint given with --ckpt is loaded; 503 while it loads,
  when loading failed, or when another checkpoint is loaded.

The model is read from `modules.sd_models.model_data` directly. Reading `modules.shared.sd_model` would go
through `model_data.get_sd_model()`, which loads the model when none is loaded yet, and blocks on the load
lock while the startup thread loads it: a probe must not do either.

Loaded by the WebUI from extensions/sd-operator/scripts/ on its own Python (3.10 in the image): keep this
file free of newer syntax and of imports outside the WebUI's environment.
"""

from __future__ import annotations

import os
from typing import Any

from modules import script_callbacks

LIVE_PATH = "/sd-operator/live"
READY_PATH = "/sd-operator/ready"


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


def register(app: Any) -> None:
    """Adds the two routes to the WebUI's FastAPI app (once, even if the script is loaded again)."""
    from fastapi.responses import JSONResponse

    async def live() -> Any:
        return JSONResponse({"status": "alive"})

    async def ready() -> Any:
        try:
            code, body = _ready_state()
        except Exception as e:  # an unexpected WebUI internals change must read as not ready, not as a 500
            code, body = 503, {"status": "unknown", "error": f"{type(e).__name__}: {e}"}
        return JSONResponse(body, status_code=code)

    present = {getattr(route, "path", None) for route in getattr(app, "routes", [])}
    for path, handler in ((LIVE_PATH, live), (READY_PATH, ready)):
        if path not in present:
            app.add_api_route(path, handler, methods=["GET"], include_in_schema=False)


def on_app_started(_demo: Any, app: Any) -> None:
    register(app)


script_callbacks.on_app_started(on_app_started)
