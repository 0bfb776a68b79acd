"""The sd-webui-controlnet extension's API: discovery routes and validation of `alwayson_scripts` units."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from sd_operator.emulator.catalog import ALWAYSON_SCRIPTS, CONTROLNET_MODULES, control_types
from sd_operator.emulator.engine import EMULATOR, ApiError, Emulator
from sd_operator.emulator.files import controlnet_models

NO_MODEL = {"", "none"}
CONTROLNET_API_VERSION = 2
# The extension's unit defaults (internal_controlnet/args.py), echoed into info and infotext.
UNIT_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "module": "none",
    "model": "None",
    "weight": 1.0,
    "resize_mode": "Crop and Resize",
    "processor_res": -1,
    "threshold_a": -1,
    "threshold_b": -1,
    "guidance_start": 0.0,
    "guidance_end": 1.0,
    "pixel_perfect": False,
    "control_mode": "Balanced",
}


def _unprocessable(detail: str) -> ApiError:
    return ApiError(422, "HTTPException", detail)


def validate_alwayson(emu: Emulator, scripts: dict[str, Any]) -> list[dict[str, Any]]:
    """Checks `alwayson_scripts` like A1111's init_script_args; returns the enabled ControlNet units."""
    units: list[dict[str, Any]] = []
    for name, value in scripts.items():
        if name.lower() not in ALWAYSON_SCRIPTS:
            raise _unprocessable(f"always on script {name} not found")
        if not isinstance(value, dict) or not isinstance(value.get("args", []), list):
            raise _unprocessable(f"always on script {name}: expected {{'args': [...]}}")
        if name.lower() == "controlnet":
            units = _controlnet_units(emu, value.get("args", []))
    return units


def _controlnet_units(emu: Emulator, args: list[Any]) -> list[dict[str, Any]]:
    models = controlnet_models(emu.config.controlnet_dir)
    by_full = {full.lower(): full for full in models.values()}
    units = []
    for i, raw in enumerate(args):
        if not isinstance(raw, dict):
            raise _unprocessable(f"ControlNet unit {i}: expected an object, got {type(raw).__name__}")
        unit = {**UNIT_DEFAULTS, **raw}
        if not unit["enabled"]:
            continue
        model = str(unit["model"] or "None")
        if model.lower() not in NO_MODEL:
            found = by_full.get(model.lower()) or models.get(model.lower())
            if found is None:
                known = ", ".join(models.values()) or "none"
                raise _unprocessable(f"ControlNet unit {i}: model {model!r} not found (available: {known})")
            unit["model"] = found
        unit.pop("image", None)  # never echo base64 images into info
        unit.pop("mask", None)
        units.append(unit)
    return units


def unit_infotext(unit: dict[str, Any]) -> str:
    return (
        f"Module: {unit['module']}, Model: {unit['model']}, Weight: {unit['weight']}, "
        f"Resize Mode: {unit['resize_mode']}, Processor Res: {unit['processor_res']}, "
        f"Guidance Start: {unit['guidance_start']}, Guidance End: {unit['guidance_end']}, "
        f"Pixel Perfect: {unit['pixel_perfect']}, Control Mode: {unit['control_mode']}"
    )


def _emu(request: web.Request) -> Emulator:
    return request.app[EMULATOR]


async def version(_: web.Request) -> web.Response:
    return web.json_response({"version": CONTROLNET_API_VERSION})


async def model_list(request: web.Request) -> web.Response:
    # The extension rescans its folder on every call unless ?update=false; so does the emulator.
    return web.json_response({"model_list": list(controlnet_models(_emu(request).config.controlnet_dir).values())})


async def module_list(_: web.Request) -> web.Response:
    detail = {m: {"model_free": m == "none", "sliders": []} for m in CONTROLNET_MODULES}
    return web.json_response({"module_list": CONTROLNET_MODULES, "module_detail": detail})


async def types(request: web.Request) -> web.Response:
    models = list(controlnet_models(_emu(request).config.controlnet_dir).values())
    return web.json_response(control_types(models))


async def settings(request: web.Request) -> web.Response:
    return web.json_response({"control_net_unit_count": _emu(request).options.get("control_net_unit_count", 3)})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/controlnet/version", version)
    app.router.add_get("/controlnet/model_list", model_list)
    app.router.add_get("/controlnet/module_list", module_list)
    app.router.add_get("/controlnet/control_types", types)
    app.router.add_get("/controlnet/settings", settings)
