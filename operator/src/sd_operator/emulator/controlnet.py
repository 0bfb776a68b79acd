"""The sd-webui-controlnet extension the image pins (56cec5b2, v1.1.455): its routes and how it treats units.

What a real WebUI does with `alwayson_scripts.controlnet.args` (recorded in tests/fixtures/real/controlnet/):
A1111 keeps the first `control_net_unit_count` entries (3 by default) and drops the rest; the extension takes
the dict entries (skipping anything else), renames its legacy keys, ignores unknown ones and validates every
unit, enabled or not (`enabled` defaults to false). A unit it cannot use does not fail the request: A1111
prints "Error running process: .../controlnet.py" and generates without any ControlNet unit, answering 200.
The emulator does the same, so a client that sends a broken unit sees what it would see on a GPU.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from PIL import Image

from sd_operator.api.generation import (
    CONTROL_MODES,
    CONTROLNET_PREPROCESSORS,
    RESIZE_MODES,
    ControlNetPreprocessor,
    find_preprocessor,
)
from sd_operator.emulator.catalog import ALWAYSON_SCRIPTS
from sd_operator.emulator.engine import EMULATOR, ApiError, Emulator
from sd_operator.emulator.files import controlnet_models
from sd_operator.emulator.images import render_png
from sd_operator.emulator.profiles import Family

log = logging.getLogger("sd_operator.emulator")

CONTROLNET_API_VERSION = 3  # external_code.get_api_version() at the pinned commit
SCRIPT_FILE = "extensions/sd-webui-controlnet/scripts/controlnet.py"
DEFAULT_UNIT_SLOTS = 3  # the control_net_unit_count setting's default

# The fields of internal_controlnet/args.py ControlNetUnit and their defaults.
UNIT_DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "module": "none",
    "model": "None",
    "weight": 1.0,
    "image": None,
    "resize_mode": "Crop and Resize",
    "low_vram": False,
    "processor_res": -1,
    "threshold_a": -1.0,
    "threshold_b": -1.0,
    "guidance_start": 0.0,
    "guidance_end": 1.0,
    "pixel_perfect": False,
    "control_mode": "Balanced",
    "inpaint_crop_input_image": True,
    "hr_option": "Both",
    "save_detected_map": True,
    "advanced_weighting": None,
    "effective_region_mask": None,
    "pulid_mode": "Fidelity",
    "union_control_type": "Unknown",
    "ipadapter_input": None,
    "mask": None,
}
LEGACY_ALIASES = {"guidance": "guidance_end", "lowvram": "low_vram", "input_image": "image"}
RESIZE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Envelope (Outer Fit)": "Resize and Fill",
}
HR_OPTIONS = ("Both", "Low res only", "High res only")
PULID_MODES = ("Fidelity", "Extremely style")
UNION_CONTROL_TYPES = (
    "OpenPose",
    "Depth",
    "Soft Edge",
    "Hard Edge",
    "Normal Map",
    "Segmentation",
    "Tile",
    "Inpaint",
    "Unknown",
)
INFOTEXT_FIELDS = (
    "module",
    "model",
    "weight",
    "resize_mode",
    "processor_res",
    "threshold_a",
    "threshold_b",
    "guidance_start",
    "guidance_end",
    "pixel_perfect",
    "control_mode",
)
_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


class UnitError(Exception):
    """What makes the extension give up on a request's units: `kind` is the Python exception it raises."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Invalid(ValueError):
    pass


# Pydantic 1 coercion, which the extension's model uses.
def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise _Invalid("value could not be parsed to a boolean (type=type_error.bool)")


def _float(value: Any) -> float:
    try:
        if isinstance(value, bool | int | float | str):
            return float(value)
    except ValueError:
        pass
    raise _Invalid("value is not a valid float (type=type_error.float)")


def _int(value: Any) -> int:
    try:
        if isinstance(value, bool | int | float | str):
            return int(value)
    except ValueError:
        pass
    raise _Invalid("value is not a valid integer (type=type_error.integer)")


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    raise _Invalid("str type expected (type=type_error.str)")


def _enum(values: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if isinstance(value, str) and value in values:
            return value
        permitted = ", ".join(repr(v) for v in values)
        raise _Invalid(f"value is not a valid enumeration member; permitted: {permitted} (type=type_error.enum)")

    return check


def _resize_mode(value: Any) -> str:
    if isinstance(value, str):
        return _enum(RESIZE_MODES)(RESIZE_ALIASES.get(value, value))
    raise _Invalid("(type=assertion_error)")  # the validator asserts a ResizeMode: ints are refused


def _module(value: Any) -> str:
    if not isinstance(value, str) or find_preprocessor(value) is None:
        raise _Invalid(f"module({value}) not found in supported modules. (type=value_error)")
    return value


def _ranged(convert: Callable[[Any], float], low: float, high: float) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        number = convert(value)
        if number < low:
            raise _Invalid(f"ensure this value is greater than or equal to {low} (type=value_error.number.not_ge)")
        if number > high:
            raise _Invalid(f"ensure this value is less than or equal to {high} (type=value_error.number.not_le)")
        return number

    return check


def _float_list(value: Any) -> list[float]:
    if not isinstance(value, list):
        raise _Invalid("value is not a valid list (type=type_error.list)")
    return [_float(v) for v in value]


def _image_string(value: Any) -> Any:
    if isinstance(value, str):  # effective_region_mask: a string is decoded as an image
        try:
            decode_image(value)
        except ApiError as e:  # A1111's HTTPException passes through pydantic and out of the script
            raise UnitError("HTTPException", f"{e.status}: {e.detail}") from None
    return value


def _tensors(value: Any) -> Any:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise _Invalid("input cannot be empty (type=assertion_error)")
    return items


_ANY = None  # fields the extension types as Any
_FIELDS: dict[str, Callable[[Any], Any] | None] = {
    "enabled": _bool,
    "module": _module,
    "model": _str,
    "weight": _ranged(_float, 0.0, 2.0),
    "image": _ANY,
    "resize_mode": _resize_mode,
    "low_vram": _bool,
    "processor_res": _int,
    "threshold_a": _float,
    "threshold_b": _float,
    "guidance_start": _ranged(_float, 0.0, 1.0),
    "guidance_end": _ranged(_float, 0.0, 1.0),
    "pixel_perfect": _bool,
    "control_mode": _enum(CONTROL_MODES),
    "inpaint_crop_input_image": _bool,
    "hr_option": _enum(HR_OPTIONS),
    "save_detected_map": _bool,
    "advanced_weighting": _float_list,
    "effective_region_mask": _image_string,
    "pulid_mode": _enum(PULID_MODES),
    "union_control_type": _enum(UNION_CONTROL_TYPES),
    "ipadapter_input": _tensors,
    "mask": _ANY,
}
_OPTIONAL = {"image", "mask", "advanced_weighting", "effective_region_mask", "ipadapter_input"}


def parse_unit(raw: dict[str, Any]) -> dict[str, Any]:
    """ControlNetUnit.from_dict: aliases, then the model's validation (unknown keys ignored); UnitError if invalid."""
    values = dict(raw)
    for alias, key in LEGACY_ALIASES.items():
        if alias in values:
            if key in values:
                raise UnitError("AssertionError", f"Conflict of field '{alias}' and '{key}'")
            values[key] = values[alias]
    if values.get("mask_image") is not None:
        if values.get("mask") is not None:
            raise UnitError("ValueError", "Cannot specify both 'mask' and 'mask_image'!")
        values["mask"] = values["mask_image"]
    unit: dict[str, Any] = {}
    errors: list[str] = []
    for key, check in _FIELDS.items():
        value = values.get(key, UNIT_DEFAULTS[key])
        try:
            if value is None and key not in _OPTIONAL:
                raise _Invalid("none is not an allowed value (type=type_error.none.not_allowed)")
            unit[key] = value if check is None or value is None else check(value)
        except _Invalid as e:
            errors.append(f"{key}\n  {e}")
    if not errors and unit["guidance_start"] > unit["guidance_end"]:
        errors.append(
            f"__root__\n  guidance_start({unit['guidance_start']}) > guidance_end({unit['guidance_end']}) "
            "(type=value_error)"
        )
    if errors:
        count = f"{len(errors)} validation error{'s' if len(errors) > 1 else ''}"
        raise UnitError("ValidationError", f"{count} for ControlNetUnit\n" + "\n".join(errors))
    if unit["enabled"]:
        _bound_check(unit)
    return unit


def _bound_check(unit: dict[str, Any]) -> None:
    """Out-of-range preprocessor parameters quietly become the module's defaults (bound_check_params)."""
    preprocessor = find_preprocessor(unit["module"])
    assert preprocessor is not None
    for key, slider in preprocessor.sliders.items():
        if not slider.minimum <= unit[key] <= slider.maximum:
            if unit[key] != -1:
                log.info(
                    "[%s.%s] Invalid value(%s), using default value %s.", unit["module"], key, unit[key], slider.value
                )
            unit[key] = slider.value


def _sd_version(name: str) -> str | None:
    """StableDiffusionVersion.detect_from_model_name: None when the name does not tell."""
    lower = name.lower()
    if any(f"sd{v}" in lower for v in ("14", "15", "16")):
        return "SD1x"
    if "sd21" in name or "2.1" in name:
        return "SD2x"
    return "SDXL" if "xl" in lower else None


FAMILY_VERSION = {Family.SD15: "SD1x", Family.SD2: "SD2x", Family.SDXL: "SDXL"}


def find_model(models: dict[str, str], name: str) -> str | None:
    """find_closest_lora_model_name: the listed title, the file stem (any case), else the shortest stem holding it."""
    if not name:
        return None
    if name in models.values():
        return name
    lower = name.lower()
    if lower in models:
        return models[lower]
    fitting = sorted((stem for stem in models if lower in stem), key=len)
    return models[fitting[0]] if fitting else None


def _check_enabled(emu: Emulator, unit: dict[str, Any], models: dict[str, str]) -> None:
    """The errors the extension raises while it sets an enabled unit up (after its infotext is written)."""
    sd_version = FAMILY_VERSION[emu.config.family]
    module, model = unit["module"], unit["model"]
    if "revision" in module.lower() and sd_version != "SDXL":
        raise UnitError(
            "Exception", f"Preprocessor 'revision' only supports SDXL. Current SD base model is {sd_version}."
        )
    cn_version = _sd_version(model)
    # Versions clash when exactly one of them is SDXL (an unknown one is let through, with a warning).
    if model.lower() != "none" and cn_version and (cn_version == "SDXL") != (sd_version == "SDXL"):
        raise UnitError(
            "Exception", f"ControlNet model {model}({cn_version}) is not compatible with sd model({sd_version})"
        )
    preprocessor = find_preprocessor(module)
    if preprocessor is not None and preprocessor.model_free:
        return
    if model == "None":
        raise UnitError("RuntimeError", "You have not selected any ControlNet Model.")
    if find_model(models, model) is None:
        raise UnitError("RuntimeError", f"model not found: {model or None}")


def controlnet_units(emu: Emulator, args: list[Any]) -> list[dict[str, Any]]:
    """The units a real WebUI applies for these args ([] when the extension gives up, with its error logged)."""
    slots = int(emu.options.get("control_net_unit_count", DEFAULT_UNIT_SLOTS) or DEFAULT_UNIT_SLOTS)
    if len(args) > slots:
        log.debug("ControlNet: %d units sent, %d slots: the rest are not used", len(args), slots)
    try:
        parsed = [parse_unit(raw) for raw in args[:slots] if isinstance(raw, dict)]
        enabled = [u for u in parsed if u["enabled"]]
        models = controlnet_models(emu.config.controlnet_dir)
        for unit in enabled:
            _check_enabled(emu, unit, models)
    except UnitError as e:
        log.error("*** Error running process: %s\n    %s: %s", SCRIPT_FILE, e.kind, e)
        return []
    for unit in enabled:
        for key in ("image", "mask", "effective_region_mask", "ipadapter_input"):
            unit.pop(key, None)  # never echo base64 data into info
    return enabled


def validate_alwayson(emu: Emulator, scripts: dict[str, Any]) -> list[dict[str, Any]]:
    """Checks `alwayson_scripts` like A1111's init_script_args; returns the ControlNet units that would apply."""
    units: list[dict[str, Any]] = []
    for name, value in scripts.items():
        if name.lower() not in ALWAYSON_SCRIPTS:
            raise ApiError(422, "HTTPException", f"Script '{name}' not found")
        if not isinstance(value, dict) or not isinstance(value.get("args", []), list):
            raise ApiError(422, "HTTPException", f"always on script {name}: expected {{'args': [...]}}")
        if name.lower() == "controlnet":
            units = controlnet_units(emu, value.get("args", []))
    return units


def unit_infotext(unit: dict[str, Any]) -> str:
    """ControlNetUnit.serialize: 'Module: canny, Model: ..., Threshold A: 100, ...' for the 'ControlNet N' entry.

    Empty when a value holds ',' or ':', which the extension refuses to write (it logs an error instead).
    """
    values = {" ".join(w.capitalize() for w in key.split("_")): str(unit[key]) for key in INFOTEXT_FIELDS}
    if any("," in v or ":" in v for v in values.values()):
        log.error("Unexpected tokens encountered:\n%s", values)
        return ""
    return ", ".join(f"{key}: {value}" for key, value in values.items())


# --- routes ----------------------------------------------------------------------------------------------------


def _emu(request: web.Request) -> Emulator:
    return request.app[EMULATOR]


def _query_bool(request: web.Request, name: str, default: bool) -> bool:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        return _bool(text)
    except _Invalid:
        detail = [{"loc": ["query", name], "msg": "value could not be parsed to a boolean", "type": "type_error.bool"}]
        raise ApiError(422, "RequestValidationError", detail) from None


def sorted_preprocessors() -> list[ControlNetPreprocessor]:
    """Preprocessor.get_sorted_preprocessors: none, then by priority and label, descending."""
    rest = [p for p in CONTROLNET_PREPROCESSORS if p.label != "none"]
    rest.sort(key=lambda p: str(p.priority).zfill(8) + p.label, reverse=True)
    none = find_preprocessor("none")
    assert none is not None
    return [none, *rest]


def module_list_body(alias_names: bool = False) -> dict[str, Any]:
    ordered = sorted_preprocessors()
    names = [p.label if alias_names else p.name for p in ordered]
    detail = {
        key: {
            "model_free": p.model_free,
            "sliders": [s.api_json() for s in (p.resolution, p.slider_1, p.slider_2) if s.visible],
        }
        for key, p in zip(names, ordered, strict=True)
    }
    return {"module_list": names, "module_detail": detail}


FILTER_ALIASES = {
    "instructp2p": ["ip2p"],
    "segmentation": ["seg"],
    "normalmap": ["normal"],
    "t2i-adapter": ["t2i_adapter", "t2iadapter", "t2ia"],
    "ip-adapter": ["ip_adapter", "ipadapter"],
    "openpose": ["openpose", "densepose"],
    "instant-id": ["instant_id", "instantid"],
    "scribble": ["sketch"],
    "tile": ["blur"],
}
UNION_TAGS = {
    "openpose",
    "depth",
    "softedge",
    "scribble",
    "canny",
    "lineart",
    "mlsd",
    "normalmap",
    "segmentation",
    "inpaint",
    "tile",
}


def _filters(tag: str) -> set[str]:
    lower = tag.lower()
    return {lower, *FILTER_ALIASES.get(lower, []), *(["union"] if lower in UNION_TAGS else [])}


def control_types_body(models: Iterable[str]) -> dict[str, Any]:
    """GET /controlnet/control_types as global_state.select_control_type answers for each tag."""
    titles = ["None", *models]
    ordered = sorted_preprocessors()
    tags = ["All", *sorted({t for p in CONTROLNET_PREPROCESSORS for t in p.tags})]
    types: dict[str, Any] = {}
    for tag in tags:
        if tag == "All":
            labels, fitting, default_option = [p.label for p in ordered], titles, "none"
        else:
            labels = [p.label for p in ordered if tag in p.tags or p.label == "none"]
            keys = _filters(tag)
            fitting = [m for m in titles if m.lower() == "none" or any(k in m.lower() for k in keys)]
            default_option = labels[1] if len(labels) > 1 else labels[0]
        default_model = "None"
        if len(fitting) > 1:
            default_model = next((m for m in fitting if "11" in m.split("[")[0]), fitting[1])
        types[tag] = {
            "module_list": labels,
            "model_list": fitting,
            "default_option": default_option,
            "default_model": default_model,
        }
    return {"control_types": types}


async def version(_: web.Request) -> web.Response:
    return web.json_response({"version": CONTROLNET_API_VERSION})


async def model_list(request: web.Request) -> web.Response:
    _query_bool(request, "update", True)  # the emulator rescans the folder on every call anyway
    return web.json_response({"model_list": list(controlnet_models(_emu(request).config.controlnet_dir).values())})


async def module_list(request: web.Request) -> web.Response:
    return web.json_response(module_list_body(_query_bool(request, "alias_names", False)))


async def types(request: web.Request) -> web.Response:
    return web.json_response(control_types_body(controlnet_models(_emu(request).config.controlnet_dir).values()))


async def settings(request: web.Request) -> web.Response:
    count = _emu(request).options.get("control_net_unit_count", DEFAULT_UNIT_SLOTS)
    return web.json_response({"control_net_unit_count": count})


def decode_image(encoded: str) -> Image.Image:
    """A1111's decode_base64_to_image for base64 (with or without a data: URL prefix)."""
    if encoded.startswith("data:image/"):
        encoded = encoded.split(";")[1].split(",")[1]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        image.load()
        return image
    except (binascii.Error, ValueError, OSError) as e:
        raise ApiError(500, "HTTPException", "Invalid encoded image") from e


async def _body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError as e:
        raise ApiError(422, "RequestValidationError", f"invalid JSON: {e}") from e


NOT_DETECTABLE = {"clip_vision", "revision_clipvision", "revision_ignore_prompt", "ip-adapter-auto"}


async def detect(request: web.Request) -> web.Response:
    """POST /controlnet/detect: the real route's checks and answer; the "detected map" is the input image itself."""
    body = await _body(request)
    if not isinstance(body, dict):
        raise ApiError(422, "RequestValidationError", "expected a JSON object")
    module = str(body.get("controlnet_module", "none"))
    images = body.get("controlnet_input_images") or []
    masks = body.get("controlnet_masks") or []
    preprocessor = find_preprocessor(module)
    if preprocessor is None:
        raise ApiError(422, "HTTPException", "Module not available")
    if module in NOT_DETECTABLE:
        raise ApiError(422, "HTTPException", "Module not supported")
    if not images:
        raise ApiError(422, "HTTPException", "No image selected")
    if preprocessor.requires_mask and len(masks) != len(images):
        raise ApiError(422, "HTTPException", f"Preprocessor {module} requires `controlnet_masks` param.")
    answer: dict[str, Any] = {"info": "Success"}
    decoded = [decode_image(str(i)) for i in images]
    if preprocessor.returns_image:
        answer["images"] = [_png_base64(image) for image in decoded]
    else:
        answer["tensor"] = [base64.b64encode(f"emulated embedding of {module}".encode()).decode() for _ in decoded]
    if "openpose" in module:
        answer["poses"] = [{"people": [], "canvas_width": i.width, "canvas_height": i.height} for i in decoded]
    return web.json_response(answer)


def _png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def render_openpose_json(request: web.Request) -> web.Response:
    """POST /controlnet/render_openpose_json: one (blank, emulated) pose image per canvas."""
    poses = await _body(request)
    if not poses:
        return web.json_response({"info": "No pose data detected."})
    if not isinstance(poses, list) or not all(isinstance(p, dict) for p in poses):
        raise ApiError(422, "RequestValidationError", "expected a list of pose objects")
    images = []
    for pose in poses:
        try:
            width, height = int(pose["canvas_width"]), int(pose["canvas_height"])
        except (KeyError, TypeError, ValueError) as e:
            raise ApiError(422, "RequestValidationError", f"pose: {e}") from None
        png = render_png(model="openpose", seed=0, prompt="", width=width, height=height, infotext="")
        images.append(base64.b64encode(png).decode())
    return web.json_response({"images": images, "info": "Success"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/controlnet/version", version)
    app.router.add_get("/controlnet/model_list", model_list)
    app.router.add_get("/controlnet/module_list", module_list)
    app.router.add_get("/controlnet/control_types", types)
    app.router.add_get("/controlnet/settings", settings)
    app.router.add_post("/controlnet/detect", detect)
    app.router.add_post("/controlnet/render_openpose_json", render_openpose_json)
