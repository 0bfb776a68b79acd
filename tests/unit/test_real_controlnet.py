"""The product against the ControlNet extension the WebUI image pins, as recorded from its source.

tests/fixtures/real/controlnet/ holds facts read from Mikubill/sd-webui-controlnet at the commit in
images/webui/Dockerfile: the unit fields the API accepts (unit_fields.json), the preprocessor ("module") names
and the extension's routes (modules.json), and its WebUI flags (preload_flags.json). Every ControlNet unit the
gateway (`/v1/generate`) and the batch runner build, the gateway's /controlnet/* proxies and the emulator's
ControlNet emulation are held against them here.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from pydantic import ValidationError

from sd_operator.api.generation import (
    CONTROL_MODES,
    CONTROLNET_MODULES,
    CONTROLNET_PREPROCESSORS,
    CONTROLNET_UNIT_SLOTS,
    RESIZE_MODES,
    ControlNetType,
    ControlNetUnit,
    find_preprocessor,
)
from sd_operator.api.generationbatch import Item
from sd_operator.batch.payload import PermanentItemError, build_body
from sd_operator.emulator import catalog, cli
from sd_operator.emulator import controlnet as emulated
from sd_operator.emulator.app import create_app as create_emulator
from sd_operator.emulator.engine import Emulator
from sd_operator.gateway.app import STATE
from sd_operator.gateway.app import create_app as create_gateway
from sd_operator.gateway.config import GatewayConfig
from sd_operator.gateway.dispatch import Backend
from sd_operator.gateway.payload import RECOMMENDED, GenerateRequest, build_txt2img_payload

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "tests" / "fixtures" / "real" / "controlnet"
UNIT = json.loads((REAL / "unit_fields.json").read_text())
MODULES = json.loads((REAL / "modules.json").read_text())
FLAGS = json.loads((REAL / "preload_flags.json").read_text())

FIELDS = {f["name"]: f for f in UNIT["fields"]}
ENUMS = {name: e["values"] for name, e in UNIT["enums"].items()}
RECORDED = {p["name"]: p for p in MODULES["preprocessors"]}
BY_LABEL = {p["label"]: p for p in MODULES["preprocessors"]}
ROUTES = {(r["method"], r["path"]): r for r in MODULES["routes"]}
# unit key -> the preprocessor slider that bounds it (internal_controlnet/args.py bound_check_params)
SLIDER_OF = {"processor_res": "slider_resolution", "threshold_a": "slider_1", "threshold_b": "slider_2"}
# The product's control types and the extension's tags they stand for.
TAG_OF = {
    ControlNetType.CANNY: "Canny",
    ControlNetType.OPENPOSE: "OpenPose",
    ControlNetType.DEPTH: "Depth",
    ControlNetType.LINEART: "Lineart",
    ControlNetType.SOFTEDGE: "SoftEdge",
    ControlNetType.SCRIBBLE: "Scribble",
    ControlNetType.SEG: "Segmentation",
    ControlNetType.NORMAL: "NormalMap",
    ControlNetType.TILE: "Tile",
    ControlNetType.IP_ADAPTER: "IP-Adapter",
}
IMG = "iVBORw0KGgo="


def recorded_preprocessor(module: str) -> dict[str, Any] | None:
    """Preprocessor.get_preprocessor: by label, then by name."""
    return BY_LABEL.get(module) or RECORDED.get(module)


def sd_version(model: str) -> str | None:
    """StableDiffusionVersion.detect_from_model_name, as recorded."""
    lower = model.lower()
    if any(f"sd{v}" in lower for v in ("14", "15", "16")):
        return "SD1x"
    if "sd21" in model or "2.1" in model:
        return "SD2x"
    return "SDXL" if "xl" in lower else None


def real_unit_problems(unit: dict[str, Any]) -> list[str]:
    """What the pinned extension would reject, drop or quietly replace in this unit, from the recorded facts only."""
    problems = []
    accepted = set(FIELDS) | set(UNIT["accepted_keys_extra"])
    problems += [f"{key}: not a unit field (the extension ignores it)" for key in unit if key not in accepted]
    if unit.get("enabled") is not True:
        problems.append(f"enabled is {unit.get('enabled')!r}: the unit is not applied (default false)")
    module = unit.get("module", FIELDS["module"]["default"])
    preprocessor = recorded_preprocessor(module)
    if preprocessor is None:
        problems.append(f"module {module!r} is not a registered preprocessor")
    for key in ("resize_mode", "control_mode", "hr_option", "pulid_mode", "union_control_type"):
        if key in unit and unit[key] not in ENUMS[key]:
            problems.append(f"{key} {unit[key]!r} is not one of {ENUMS[key]}")
    for key in ("weight", "guidance_start", "guidance_end"):
        f = FIELDS[key]
        if key in unit and not (isinstance(unit[key], int | float) and f["minimum"] <= unit[key] <= f["maximum"]):
            problems.append(f"{key} {unit[key]!r} outside {f['minimum']}..{f['maximum']}")
    if unit.get("guidance_start", 0.0) > unit.get("guidance_end", 1.0):
        problems.append("guidance_start > guidance_end")
    for key in ("enabled", "pixel_perfect", "low_vram", "save_detected_map"):
        if key in unit and not isinstance(unit[key], bool):
            problems.append(f"{key} is not a boolean")
    if preprocessor is not None:
        for key, slider_key in SLIDER_OF.items():
            slider = preprocessor[slider_key]
            if key in unit and unit[key] != -1 and not slider["minimum"] <= unit[key] <= slider["maximum"]:
                problems.append(f"{key} {unit[key]} outside {slider['minimum']}..{slider['maximum']}: replaced")
        if not preprocessor["model_free"] and unit.get("model", "None") == "None":
            problems.append("no model for a module that needs one")
    if unit.get("pixel_perfect") and unit.get("processor_res", -1) != -1:
        problems.append("processor_res is recomputed with pixel_perfect")
    if not isinstance(unit.get("image"), str) or not unit["image"]:
        problems.append("no image (txt2img: 'controlnet is enabled but no input image is given')")
    return problems


# --- the recorded data ----------------------------------------------------------------------------------------


def pinned_commit() -> str:
    match = re.search(r"^ARG CONTROLNET_COMMIT=([0-9a-f]{40})$", (ROOT / "images/webui/Dockerfile").read_text(), re.M)
    assert match, "images/webui/Dockerfile pins the ControlNet extension by a full commit"
    return match.group(1)


@pytest.mark.parametrize("doc", [UNIT, MODULES, FLAGS], ids=["unit_fields", "modules", "preload_flags"])
def test_recorded_files_name_the_pinned_commit_and_their_sources(doc: dict[str, Any]) -> None:
    source = doc["source"]
    assert source["repository"] == "Mikubill/sd-webui-controlnet"
    assert source["commit"] == pinned_commit()
    assert source["paths"] and all(isinstance(p, str) and not p.startswith("/") for p in source["paths"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", source["read_on"])


def test_preload_flags_have_an_arity_and_a_type() -> None:
    flags = FLAGS["flags"]
    assert len({f["flag"] for f in flags}) == len(flags)
    for f in flags:
        assert f["flag"].startswith("--controlnet") or f["flag"] == "--no-half-controlnet"
        assert (f["arity"], f["type"]) in {("switch", "bool"), ("one", "str"), ("one", "int")}
    assert {"--controlnet-dir", "--no-half-controlnet"} <= {f["flag"] for f in flags}


def test_recorded_module_data_is_consistent() -> None:
    names = [p["name"] for p in MODULES["preprocessors"]]
    labels = [p["label"] for p in MODULES["preprocessors"]]
    assert len(set(names)) == len(names) and len(set(labels)) == len(labels)
    assert sorted(MODULES["module_list_order"]["names"]) == sorted(names)
    assert sorted(MODULES["module_list_order"]["labels"]) == sorted(labels)
    assert MODULES["control_types"]["tags"] == [
        "All",
        *sorted({t for p in MODULES["preprocessors"] for t in p["tags"]}),
    ]
    assert MODULES["label_of_name"] == {
        p["name"]: p["label"] for p in MODULES["preprocessors"] if p["name"] != p["label"]
    }


# --- the product's module table -------------------------------------------------------------------------------


def test_the_products_preprocessor_table_is_the_recorded_one() -> None:
    assert {p.name for p in CONTROLNET_PREPROCESSORS} == set(RECORDED)
    assert set(CONTROLNET_MODULES) == set(RECORDED) | set(BY_LABEL)
    for p in CONTROLNET_PREPROCESSORS:
        real = RECORDED[p.name]
        assert p.label == real["label"], p.name
        assert list(p.tags) == real["tags"], p.name
        assert (p.priority, p.model_free, p.returns_image) == (
            real["sorting_priority"],
            real["model_free"],
            real["returns_image"],
        ), p.name
        assert (p.accepts_mask, p.requires_mask) == (real["accepts_mask"], real["requires_mask"]), p.name
        for key, slider_key in SLIDER_OF.items():
            mine, theirs = p.sliders[key], real[slider_key]
            assert (mine.label, mine.minimum, mine.maximum, mine.value, mine.step, mine.visible) == (
                theirs["label"],
                theirs["minimum"],
                theirs["maximum"],
                theirs["value"],
                theirs["step"],
                theirs["visible"],
            ), f"{p.name}.{key}"
        assert find_preprocessor(p.name) is p and find_preprocessor(p.label) is p


# --- units the gateway builds ---------------------------------------------------------------------------------


def gateway_units(**fields: Any) -> list[dict[str, Any]]:
    body = build_txt2img_payload(GenerateRequest.model_validate({"prompt": "a cat", **fields}), None)
    return body["alwayson_scripts"]["controlnet"]["args"]


def assert_real(unit: dict[str, Any]) -> None:
    assert real_unit_problems(unit) == [], unit
    # The emulator's reading of the extension agrees: the unit parses and nothing is replaced.
    parsed = emulated.parse_unit(unit)
    for key in ("module", "model", "weight", "resize_mode", "guidance_start", "guidance_end", "control_mode"):
        assert parsed[key] == unit[key], key
    for key in SLIDER_OF:
        if key in unit and unit[key] != -1:
            assert parsed[key] == unit[key], f"{key} would be replaced by the extension"


def test_recommended_defaults_are_real_modules_and_models_of_the_types_tag() -> None:
    assert set(RECOMMENDED) == set(ControlNetType) == set(TAG_OF)
    filters = MODULES["control_types"]["filter_aliases"]
    for cn_type, advice in RECOMMENDED.items():
        tag = TAG_OF[ControlNetType(cn_type)]
        real = recorded_preprocessor(advice.module)
        assert real is not None, advice.module
        assert tag in real["tags"], f"{advice.module} is not listed under {tag} in /controlnet/control_types"
        # The default model is one the extension lists under the type (its name holds the tag or an alias).
        keys = {tag.lower(), *filters.get(tag.lower(), [])}
        assert any(k in advice.model.lower() for k in keys), advice.model
        assert sd_version(advice.model) == "SD1x"  # the ControlNet 1.1 / IP-Adapter SD 1.5 models


OPTIONS = list(
    itertools.product(
        list(ControlNetType),
        ENUMS["control_mode"],
        ENUMS["resize_mode"],
        [None, True, False],  # pixel_perfect
        [False, True],  # save_detected_map
    )
)


@pytest.mark.parametrize(("cn_type", "control_mode", "resize_mode", "pixel_perfect", "save_map"), OPTIONS)
def test_every_gateway_unit_uses_real_fields_modules_and_values(
    cn_type: ControlNetType, control_mode: str, resize_mode: str, pixel_perfect: bool | None, save_map: bool
) -> None:
    spec: dict[str, Any] = {"type": cn_type, "image": IMG, "control_mode": control_mode, "resize_mode": resize_mode}
    spec["save_detected_map"] = save_map
    if pixel_perfect is not None:
        spec["pixel_perfect"] = pixel_perfect
    [unit] = gateway_units(controlnet=spec)
    assert_real(unit)
    assert unit["enabled"] is True
    assert unit["pixel_perfect"] is (pixel_perfect is not False)
    assert unit["save_detected_map"] is save_map


def test_gateway_units_with_every_modules_parameters_at_their_bounds() -> None:
    for p in MODULES["preprocessors"]:
        for key, slider_key in SLIDER_OF.items():
            slider = p[slider_key]
            if not slider["visible"]:
                continue
            for value in (slider["minimum"], slider["maximum"], slider["value"]):
                spec = {"type": "canny", "image": IMG, "module": p["name"], key: value}
                if key == "processor_res":
                    spec |= {"pixel_perfect": False, key: int(value)}
                [unit] = gateway_units(controlnet=spec)
                assert_real(unit)


@pytest.mark.parametrize(
    ("spec", "where", "message"),
    [
        ({"module": "cany"}, "controlnet.module", "unknown ControlNet module 'cany' (did you mean canny"),
        ({"module": "openpose_fulll"}, "controlnet.module", "openpose_full"),
        ({"threshold_a": 300}, "controlnet", "threshold_a for module canny (Low Threshold) must be from 1 to 255"),
        ({"threshold_b": 0}, "controlnet", "the extension would use 200 instead"),
        ({"module": "depth_midas", "threshold_a": 50}, "controlnet", "module depth_midas does not use threshold_a"),
        (
            {"module": "invert", "pixel_perfect": False, "processor_res": 512},
            "controlnet",
            "does not use processor_res",
        ),
        ({"pixel_perfect": False, "processor_res": 32}, "controlnet", "must be from 64 to 2048 (got 32)"),
        ({"pixel_perfect": True, "processor_res": 768}, "controlnet", "not used with pixel_perfect"),
        ({"resize_mode": "Inner Fit (Scale to Fit)"}, "controlnet.resize_mode", "Crop and Resize"),
        ({"control_mode": 0}, "controlnet.control_mode", "Balanced"),
    ],
)
def test_gateway_refuses_what_the_extension_would_drop_or_replace(
    spec: dict[str, Any], where: str, message: str
) -> None:
    with pytest.raises(ValidationError) as err:
        GenerateRequest.model_validate({"prompt": "x", "controlnet": {"type": "canny", "image": IMG, **spec}})
    [error] = err.value.errors()
    assert ".".join(str(p) for p in error["loc"]) == where
    assert message in error["msg"]


def test_minus_one_keeps_the_modules_default_and_processor_res_turns_pixel_perfect_off() -> None:
    [unit] = gateway_units(controlnet={"type": "depth", "image": IMG, "threshold_a": -1, "processor_res": -1})
    assert unit["pixel_perfect"] is True and (unit["threshold_a"], unit["processor_res"]) == (-1, -1)
    assert_real(unit)
    [unit] = gateway_units(controlnet={"type": "depth", "image": IMG, "processor_res": 768})
    assert (unit["pixel_perfect"], unit["processor_res"]) == (False, 768)
    assert_real(unit)


def test_no_more_units_than_the_webui_has_slots() -> None:
    assert UNIT["dict_to_unit"]["unit_slots_default"] == CONTROLNET_UNIT_SLOTS
    assert catalog.default_options("m", None, None)["control_net_unit_count"] == CONTROLNET_UNIT_SLOTS
    three = [{"type": "canny", "image": IMG}] * CONTROLNET_UNIT_SLOTS
    assert len(gateway_units(controlnets=three)) == CONTROLNET_UNIT_SLOTS
    with pytest.raises(ValidationError, match="at most 3 ControlNet units"):
        GenerateRequest.model_validate({"prompt": "x", "controlnet": three[0], "controlnets": three})
    with pytest.raises(ValidationError, match="at most 3 items"):
        GenerateRequest.model_validate({"prompt": "x", "controlnets": [*three, three[0]]})


# --- units the batch runner builds ----------------------------------------------------------------------------


BATCH_OPTIONS = list(
    itertools.product(list(ControlNetType), [None, *CONTROL_MODES], [None, *RESIZE_MODES], [None, True, False])
)


@pytest.mark.parametrize(("cn_type", "control_mode", "resize_mode", "pixel_perfect"), BATCH_OPTIONS)
def test_every_batch_unit_uses_real_fields_modules_and_values(
    cn_type: ControlNetType, control_mode: str | None, resize_mode: str | None, pixel_perfect: bool | None
) -> None:
    unit: dict[str, Any] = {"type": cn_type.value, "image": IMG, "weight": 0.5, "guidanceStart": 0.2}
    for key, value in (("controlMode", control_mode), ("resizeMode", resize_mode), ("pixelPerfect", pixel_perfect)):
        if value is not None:
            unit[key] = value
    body, _ = build_body(Item.model_validate({"prompt": "a fox", "controlNets": [unit]}))
    [sent] = body["alwayson_scripts"]["controlnet"]["args"]
    assert_real(sent)
    assert (sent["weight"], sent["guidance_start"]) == (0.5, 0.2)
    assert sent["control_mode"] == (control_mode or "Balanced")
    assert sent["resize_mode"] == (resize_mode or "Crop and Resize")
    assert sent["module"] == RECOMMENDED[cn_type].module


def test_batch_units_carry_module_parameters_and_refuse_what_the_extension_would_replace() -> None:
    unit = {"type": "canny", "image": IMG, "module": "canny", "thresholdA": 50, "thresholdB": 120}
    body, _ = build_body(Item.model_validate({"prompt": "x", "controlNets": [unit, {**unit, "processorRes": 768}]}))
    first, second = body["alwayson_scripts"]["controlnet"]["args"]
    assert (first["threshold_a"], first["threshold_b"], first["pixel_perfect"]) == (50, 120, True)
    assert (second["processor_res"], second["pixel_perfect"]) == (768, False)
    for sent in (first, second):
        assert_real(sent)
    with pytest.raises(PermanentItemError, match="threshold_a for module canny"):
        build_body(Item.model_validate({"prompt": "x", "controlNets": [{**unit, "thresholdA": 999}]}))


def test_the_crd_unit_knows_the_real_names_and_slots() -> None:
    with pytest.raises(ValidationError, match="unknown ControlNet module 'depth_midass'"):
        ControlNetUnit.model_validate({"type": "depth", "image": "a.png", "module": "depth_midass"})
    for module in ("depth", "depth_midas", "ip-adapter_clip_h", "ip-adapter_clip_sd15"):
        assert ControlNetUnit.model_validate({"type": "depth", "image": "a.png", "module": module}).module == module
    schema = ControlNetUnit.model_json_schema(by_alias=True)["properties"]
    assert schema["controlMode"]["enum"] == ENUMS["control_mode"]
    assert schema["resizeMode"]["enum"] == ENUMS["resize_mode"]
    crd = (ROOT / "crds" / "sd-operator.dev_generationbatches.yaml").read_text()
    assert f"maxItems: {CONTROLNET_UNIT_SLOTS}\n" in crd


# --- the emulator against the recorded extension ----------------------------------------------------------------


def test_emulator_unit_vocabulary_is_the_recorded_one() -> None:
    api_fields = {n: f for n, f in FIELDS.items() if f["group"] in ("general", "api_only")}
    assert set(emulated.UNIT_DEFAULTS) == set(api_fields)
    for name, value in emulated.UNIT_DEFAULTS.items():
        assert value == FIELDS[name]["default"], name
    assert UNIT["aliases"]["legacy_field_alias"] == emulated.LEGACY_ALIASES
    assert UNIT["aliases"]["resize_mode_aliases"] == emulated.RESIZE_ALIASES
    assert list(RESIZE_MODES) == ENUMS["resize_mode"] and list(CONTROL_MODES) == ENUMS["control_mode"]
    assert list(emulated.HR_OPTIONS) == ENUMS["hr_option"]
    assert list(emulated.PULID_MODES) == ENUMS["pulid_mode"]
    assert list(emulated.UNION_CONTROL_TYPES) == ENUMS["union_control_type"]
    assert list(emulated.INFOTEXT_FIELDS) == UNIT["infotext"]["fields_in_order"]
    assert MODULES["api_version"] == emulated.CONTROLNET_API_VERSION
    assert MODULES["control_types"]["filter_aliases"] == emulated.FILTER_ALIASES
    assert set(MODULES["control_types"]["union_tags"]["tags"]) == emulated.UNION_TAGS


def test_emulator_parses_units_like_the_extension() -> None:
    parse = emulated.parse_unit
    unit = parse({"module": "canny", "image": IMG, "brand_new_option": 1, "weight": "0.5"})
    assert unit["enabled"] is False and "brand_new_option" not in unit and unit["weight"] == 0.5
    assert unit["threshold_a"] == -1  # no bound check for a disabled unit
    enabled = parse({"enabled": "yes", "module": "canny", "threshold_a": 999, "processor_res": 10})
    assert (enabled["enabled"], enabled["threshold_a"], enabled["processor_res"]) == (True, 100, 512)
    aliased = parse({"enabled": True, "input_image": IMG, "lowvram": True, "guidance": 0.5, "mask_image": IMG})
    assert (aliased["image"], aliased["low_vram"], aliased["guidance_end"], aliased["mask"]) == (IMG, True, 0.5, IMG)
    assert parse({"resize_mode": "Envelope (Outer Fit)"})["resize_mode"] == "Resize and Fill"
    assert parse({"module": "depth_midas"})["module"] == "depth_midas"  # a label is kept as given
    for bad, kind in [
        ({"module": "cany"}, "ValidationError"),
        ({"resize_mode": 1}, "ValidationError"),  # ints are refused at this commit
        ({"control_mode": 2}, "ValidationError"),
        ({"weight": 2.5}, "ValidationError"),
        ({"guidance_start": 0.8, "guidance_end": 0.2}, "ValidationError"),
        ({"enabled": "maybe"}, "ValidationError"),
        ({"input_image": IMG, "image": IMG}, "AssertionError"),
        ({"mask": IMG, "mask_image": IMG}, "ValueError"),
        ({"effective_region_mask": "not an image"}, "HTTPException"),
    ]:
        with pytest.raises(emulated.UnitError) as err:
            parse(bad)
        assert err.value.kind == kind, bad


def test_emulator_routes_are_the_extensions() -> None:
    app = web.Application()
    emulated.add_routes(app)
    served = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    assert served - {("HEAD", path) for _, path in ROUTES} == set(ROUTES)


def test_emulator_module_list_and_control_types_answer_as_the_extension() -> None:
    body = emulated.module_list_body()
    assert set(body) == set(ROUTES[("GET", "/controlnet/module_list")]["response"])
    assert body["module_list"] == MODULES["module_list_order"]["names"]
    assert emulated.module_list_body(alias_names=True)["module_list"] == MODULES["module_list_order"]["labels"]
    for name, detail in body["module_detail"].items():
        real = RECORDED[name]
        visible = [real[k] for k in ("slider_resolution", "slider_1", "slider_2") if real[k]["visible"]]
        expected = [
            {"name": s["label"], "value": s["value"], "min": s["minimum"], "max": s["maximum"], "step": s["step"]}
            for s in visible
        ]
        assert detail == {"model_free": real["model_free"], "sliders": expected}, name
    models = [
        "control_v11p_sd15_canny [0123abcd]",
        "control_v11f1p_sd15_depth [89ab0123]",
        "diffusers_xl_canny_mid [1]",
    ]
    types = emulated.control_types_body(models)["control_types"]
    assert list(types) == MODULES["control_types"]["tags"]
    labels = MODULES["module_list_order"]["labels"]
    for tag, entry in types.items():
        assert set(entry) == {"module_list", "model_list", "default_option", "default_model"}
        if tag != "All":
            assert entry["module_list"] == [lb for lb in labels if lb == "none" or tag in BY_LABEL[lb]["tags"]]
    assert types["All"]["module_list"] == labels and types["All"]["model_list"] == ["None", *models]
    assert types["Canny"]["model_list"] == ["None", models[0], models[2]]
    assert (types["Canny"]["default_option"], types["Canny"]["default_model"]) == ("canny", models[0])
    assert (types["Depth"]["default_option"], types["Depth"]["default_model"]) == ("depth_midas", models[1])
    assert types["Reference"]["model_list"] == ["None"] and types["Reference"]["default_model"] == "None"


@pytest.fixture
def webui(tmp_path: Path) -> Iterator[dict[str, Path]]:
    ckpt = tmp_path / "Stable-diffusion" / "dreamy-v1.safetensors"
    cn_dir = tmp_path / "ControlNet"
    for folder in (ckpt.parent, cn_dir):
        folder.mkdir()
    ckpt.write_bytes(b"checkpoint" * 1000)
    xl = tmp_path / "Stable-diffusion" / "sdxl-base.safetensors"
    xl.write_bytes(b"xl" * 1000)
    for advice in RECOMMENDED.values():
        (cn_dir / f"{advice.model}.pth").write_bytes(advice.model.encode())
    yield {"ckpt": ckpt, "xl": xl, "cn_dir": cn_dir}


def emulator(paths: dict[str, Path], ckpt: str = "ckpt") -> Emulator:
    argv = ["--api", "--nowebui", "--ckpt", str(paths[ckpt]), "--controlnet-dir", str(paths["cn_dir"])]
    return Emulator(cli.config_from_argv([*argv, "--speed", "0.001"]))


def png(color: str = "red") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_emulator_applies_units_as_a_webui_would(webui: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    emu = emulator(webui)
    canny = {"enabled": True, "module": "canny", "model": "control_v11p_sd15_canny", "image": IMG, "extra": 1}
    # Three slots: the fourth unit is dropped; a non-dict in a slot is skipped, a disabled unit not applied.
    assert len(emulated.controlnet_units(emu, [canny, canny, canny, canny])) == 3
    applied = emulated.controlnet_units(emu, [canny, None, {**canny, "enabled": False}, canny])
    assert len(applied) == 1
    assert applied[0]["model"] == "control_v11p_sd15_canny" and "extra" not in applied[0]
    assert emulated.unit_infotext(applied[0]) == (
        "Module: canny, Model: control_v11p_sd15_canny, Weight: 1.0, Resize Mode: Crop and Resize, "
        "Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, "
        "Pixel Perfect: False, Control Mode: Balanced"
    )
    assert emulated.controlnet_units(emu, [{**canny, "model": "CANNY"}])  # the shortest stem holding it
    caplog.set_level(logging.INFO, logger="sd_operator.emulator")
    for broken in (
        {**canny, "module": "cany"},
        {**canny, "model": "control_v11p_sd15_mlsd"},
        {**canny, "model": "None"},
        {**canny, "model": "diffusers_xl_canny_mid"},  # an SDXL model on an SD 1.5 checkpoint
    ):
        caplog.clear()
        assert emulated.controlnet_units(emu, [canny, broken]) == []  # one bad unit: no ControlNet at all
        assert f"Error running process: {emulated.SCRIPT_FILE}" in caplog.text
    # A disabled unit is still validated.
    assert emulated.controlnet_units(emu, [canny, {"enabled": False, "module": "cany"}]) == []
    assert emulated.controlnet_units(emu, [{**canny, "module": "reference_only", "model": "None"}])  # model-free
    xl = emulator(webui, "xl")
    assert emulated.controlnet_units(xl, [canny]) == []


def test_gateway_units_run_on_the_emulator_and_its_controlnet_routes_answer_through_the_gateway(
    webui: dict[str, Path],
) -> None:
    argv = ["--api", "--nowebui", "--ckpt", str(webui["ckpt"]), "--controlnet-dir", str(webui["cn_dir"])]
    config = cli.config_from_argv([*argv, "--speed", "0.001"])

    async def scenario() -> tuple[list[Any], dict[str, Any], list[str]]:
        async with TestServer(create_emulator(config), host="127.0.0.1") as webui_server:
            gateway = create_gateway(GatewayConfig())
            async with TestClient(TestServer(gateway, host="127.0.0.1")) as http:
                assert await gateway[STATE].add_backend(
                    Backend(url=str(webui_server.make_url("")).rstrip("/"), model="")
                )
                applied = []
                for cn_type in ControlNetType:
                    spec = {"type": cn_type.value, "image": png()}
                    r = await http.post("/v1/generate", json={"prompt": "x", "steps": 2, "controlnet": spec})
                    assert r.status == 200, await r.text()
                    data = await r.json()
                    assert len(data["images"]) == 1  # save_detected_map false: only the generated image
                    applied.append(json.loads(data["info"])["controlnet_units"])
                answers = {}
                for method, path in ROUTES:
                    answer = await http.get(path) if method == "GET" else None
                    if answer is not None and answer.status != 404:  # the GETs the gateway serves
                        answers[path] = await answer.json()
                proxied = [
                    r.resource.canonical
                    for r in gateway.router.routes()
                    if r.resource is not None and r.resource.canonical.startswith("/controlnet/")
                ]
                return applied, answers, proxied

    applied, answers, proxied = asyncio.run(scenario())
    for cn_type, units in zip(ControlNetType, applied, strict=True):
        assert len(units) == 1 and units[0]["module"] == RECOMMENDED[cn_type].module, cn_type
    for path in proxied:
        methods = {m for m, p in ROUTES if p == path}
        assert methods, f"the gateway serves {path}, which the extension does not have"
    assert {"/controlnet/model_list", "/controlnet/module_list", "/controlnet/version"} <= set(answers)
    for path, body in answers.items():
        assert set(body) == set(ROUTES[("GET", path)]["response"]), path


def test_gateway_passes_the_query_of_controlnet_gets(webui: dict[str, Path]) -> None:
    argv = ["--api", "--nowebui", "--ckpt", str(webui["ckpt"]), "--controlnet-dir", str(webui["cn_dir"])]
    config = cli.config_from_argv([*argv, "--speed", "0.001"])

    async def scenario() -> list[str]:
        async with TestServer(create_emulator(config), host="127.0.0.1") as webui_server:
            gateway = create_gateway(GatewayConfig())
            async with TestClient(TestServer(gateway, host="127.0.0.1")) as http:
                assert await gateway[STATE].add_backend(
                    Backend(url=str(webui_server.make_url("")).rstrip("/"), model="")
                )
                r = await http.get("/controlnet/module_list", params={"alias_names": "true"})
                return (await r.json())["module_list"]

    assert asyncio.run(scenario()) == MODULES["module_list_order"]["labels"]


def test_emulator_detect_answers_as_the_extension(webui: dict[str, Path]) -> None:
    config = cli.config_from_argv(["--api", "--nowebui", "--ckpt", str(webui["ckpt"]), "--speed", "0.001"])
    route = ROUTES[("POST", "/controlnet/detect")]

    async def scenario() -> list[tuple[int, Any]]:
        async with TestClient(TestServer(create_emulator(config), host="127.0.0.1")) as http:
            out = []
            for body in (
                {"controlnet_module": "cany", "controlnet_input_images": [png()]},
                {"controlnet_module": "clip_vision", "controlnet_input_images": [png()]},
                {"controlnet_module": "canny"},
                {"controlnet_module": "inpaint_only", "controlnet_input_images": [png()]},
                {"controlnet_module": "openpose_full", "controlnet_input_images": [png(), png("blue")]},
                {"controlnet_module": "ip-adapter_clip_h", "controlnet_input_images": [png()]},
            ):
                r = await http.post("/controlnet/detect", json=body)
                out.append((r.status, await r.json()))
            r = await http.post("/controlnet/render_openpose_json", json=[])
            out.append((r.status, await r.json()))
            pose = {"people": [], "canvas_width": 64, "canvas_height": 48}
            r = await http.post("/controlnet/render_openpose_json", json=[pose])
            out.append((r.status, await r.json()))
            return out

    answers = asyncio.run(scenario())
    details = [e["detail"] for e in route["errors"]]
    for (status, body), detail in zip(answers[:4], details, strict=True):
        assert (status, body["detail"]) == (422, detail.replace("<module>", "inpaint_only"))
    status, pose = answers[4]
    assert status == 200 and set(pose) == {"info", "images", "poses"} and pose["info"] == "Success"
    assert len(pose["images"]) == 2 and pose["poses"][0]["canvas_width"] == 48
    status, tensor = answers[5]
    assert status == 200 and set(tensor) == {"info", "tensor"}
    assert answers[6] == (200, {"info": "No pose data detected."})
    status, rendered = answers[7]
    assert status == 200 and rendered["info"] == "Success" and len(rendered["images"]) == 1
