"""Presets and the /v1/generate -> /sdapi/v1/txt2img translation, OOM advice and cache keys."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from sd_operator.api.generation import ControlNetType
from sd_operator.gateway.payload import (
    RECOMMENDED,
    GenerateRequest,
    build_txt2img_payload,
    canonical_request,
    describe_oom,
    format_weight,
    is_deterministic,
)
from sd_operator.gateway.presets import Preset, PresetFileError, PresetStore, UnknownPreset

IMG = "iVBORw0KGgo="  # any base64 will do: the builder passes the image through


def req(**fields: Any) -> GenerateRequest:
    return GenerateRequest.model_validate({"prompt": "a cat", **fields})


def payload(preset: Preset | None = None, models: dict[str, str] | None = None, **fields: Any) -> dict[str, Any]:
    return build_txt2img_payload(req(**fields), preset, models)


def units(body: dict[str, Any]) -> list[dict[str, Any]]:
    return body["alwayson_scripts"]["controlnet"]["args"]


# --- presets -----------------------------------------------------------------------------------------------------


def test_default_presets_load_with_their_values() -> None:
    store = PresetStore.load_default()
    assert store.names() == ["anime_portrait", "icon_design", "realistic_photo"]
    anime = store.get("anime_portrait")
    assert anime.prompt_prefix == "masterpiece, best quality, 1girl, portrait, "
    assert (anime.width, anime.height, anime.steps, anime.cfg_scale) == (512, 768, 28, 7)
    assert (anime.sampler_name, anime.scheduler) == ("DPM++ 2M", "Karras")
    assert "bad hands" in anime.negative_prompt
    assert anime.negative_prompt.endswith("signature, watermark")
    photo = store.get("realistic_photo")
    assert photo.prompt_prefix == "RAW photo, "
    assert (photo.cfg_scale, photo.sampler_name, photo.steps) == (5.5, "DPM++ 2M SDE", 30)
    assert "3d render" in photo.negative_prompt
    icon = store.get("icon_design")
    assert (icon.width, icon.height, icon.steps, icon.sampler_name, icon.scheduler) == (512, 512, 25, "Euler a", None)


def test_override_file_replaces_a_preset_and_adds_new_ones(tmp_path) -> None:
    path = tmp_path / "presets.yaml"
    path.write_text(
        "presets:\n"
        "  anime_portrait:\n"
        "    prompt_prefix: 'anime, '\n"
        "    steps: 40\n"
        "  sketch:\n"
        "    prompt_suffix: ', pencil sketch'\n"
        "    width: 640\n"
    )
    merged = PresetStore.load_default().merged(PresetStore.from_file(path))
    assert merged.names() == ["anime_portrait", "icon_design", "realistic_photo", "sketch"]
    anime = merged.get("anime_portrait")
    assert (anime.prompt_prefix, anime.steps) == ("anime, ", 40)
    assert anime.width is None  # replaced as a whole, so its size falls back to the gateway defaults
    assert merged.get("sketch").width == 640
    assert merged.get("realistic_photo").cfg_scale == 5.5  # untouched defaults stay


def test_empty_override_file_changes_nothing() -> None:
    merged = PresetStore.load_default().merged(PresetStore.from_yaml(""))
    assert len(merged) == 3


@pytest.mark.parametrize(
    ("entry", "field", "rule"),
    [
        ("width: 500", "width", "multiple of 8 from 64 to 2048 (got 500)"),
        ("height: 4096", "height", "from 64 to 2048 (got 4096)"),
        ("steps: 0", "steps", "from 1 to 150 (got 0)"),
        ("cfg_scale: 31", "cfg_scale", "from 1 to 30 (got 31"),
        ("colour: red", "colour", "Extra inputs are not permitted"),
        ("family: sd9", "family", "sd15"),
    ],
)
def test_bad_preset_file_names_the_preset_and_field(entry: str, field: str, rule: str) -> None:
    with pytest.raises(PresetFileError) as err:
        PresetStore.from_yaml(f"presets:\n  good: {{steps: 10}}\n  broken:\n    {entry}\n", source="cm.yaml")
    message = str(err.value)
    assert message.startswith("cm.yaml: preset 'broken': ")
    assert f"{field}: " in message
    assert rule in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "presets: [a]\n", "presets: {}\nother: 1\n", "presets: {a: 3}\n"])
def test_malformed_preset_files_are_refused(text: str) -> None:
    with pytest.raises(PresetFileError):
        PresetStore.from_yaml(text)


def test_unknown_preset_lists_the_available_names() -> None:
    with pytest.raises(UnknownPreset) as err:
        PresetStore.load_default().get("anime")
    assert err.value.name == "anime"
    assert err.value.available == ["anime_portrait", "icon_design", "realistic_photo"]
    assert str(err.value) == "unknown preset 'anime'; available presets: anime_portrait, icon_design, realistic_photo"


# --- precedence and prompt ---------------------------------------------------------------------------------------


def test_builtin_defaults_without_preset() -> None:
    body = payload()
    expected = {"prompt": "a cat", "negative_prompt": "", "width": 512, "height": 512, "steps": 20, "cfg_scale": 7}
    assert {k: body[k] for k in expected} == expected
    assert (body["sampler_name"], body["seed"], body["batch_size"], body["n_iter"]) == ("Euler a", -1, 1, 1)
    assert (body["send_images"], body["save_images"]) == (True, False)
    assert "scheduler" not in body
    assert "alwayson_scripts" not in body
    assert "enable_hr" not in body
    assert "override_settings" not in body


def test_preset_values_beat_defaults_and_request_values_beat_preset() -> None:
    anime = PresetStore.load_default().get("anime_portrait")
    from_preset = payload(anime)
    assert (from_preset["width"], from_preset["height"], from_preset["steps"]) == (512, 768, 28)
    assert (from_preset["sampler_name"], from_preset["scheduler"]) == ("DPM++ 2M", "Karras")
    explicit = payload(anime, width=640, height=640, steps=12, cfg_scale=9, sampler_name="Euler", scheduler="Uniform")
    assert (explicit["width"], explicit["height"], explicit["steps"], explicit["cfg_scale"]) == (640, 640, 12, 9)
    assert (explicit["sampler_name"], explicit["scheduler"]) == ("Euler", "Uniform")


def test_model_is_not_put_into_the_body() -> None:
    body = payload(model="dreamshaper_8")
    assert "dreamshaper_8" not in canonical_request(body)


def test_preset_wraps_the_prompt_and_adds_its_negative_prompt() -> None:
    photo = PresetStore.load_default().get("realistic_photo")
    body = payload(photo, prompt="an old fisherman", negative_prompt="hat")
    assert body["prompt"] == "RAW photo, an old fisherman, 8k uhd, dslr, soft lighting, high quality, film grain"
    assert body["negative_prompt"].startswith("hat, cartoon, anime, painting")


def test_empty_prompt_with_preset_leaves_no_dangling_commas() -> None:
    preset = Preset(name="p", prompt_prefix="best quality, ", prompt_suffix=", film grain")
    assert payload(preset, prompt="")["prompt"] == "best quality, film grain"
    assert payload(preset, prompt="a dog, ")["prompt"] == "best quality, a dog, film grain"


def test_hires_fix_fields_only_when_enabled() -> None:
    body = payload(enable_hr=True, hr_scale=1.5)
    assert (body["enable_hr"], body["hr_scale"], body["hr_upscaler"], body["denoising_strength"]) == (
        True,
        1.5,
        "Latent",
        0.7,
    )
    assert "hr_scale" not in payload(hr_scale=1.5)


def test_extra_is_merged_last_and_deeply() -> None:
    body = payload(
        controlnet={"type": "canny", "image": IMG},
        extra={"steps": 3, "restore_faces": True, "alwayson_scripts": {"adetailer": {"args": []}}},
    )
    assert (body["steps"], body["restore_faces"]) == (3, True)
    assert set(body["alwayson_scripts"]) == {"controlnet", "adetailer"}


def test_extra_cannot_switch_the_checkpoint() -> None:
    with pytest.raises(ValidationError, match="sd_model_checkpoint"):
        req(extra={"override_settings": {"sd_model_checkpoint": "other.safetensors"}})


# --- LoRA --------------------------------------------------------------------------------------------------------


def test_single_lora_uses_default_weight() -> None:
    assert payload(lora="add_detail")["prompt"] == "a cat, <lora:add_detail:0.8>"


def test_several_loras_in_order_with_their_weights() -> None:
    body = payload(lora="a", lora_weight=1.0, loras=[{"name": "b", "weight": 0.55}, {"name": "c", "weight": -1.25}])
    assert body["prompt"] == "a cat, <lora:a:1>, <lora:b:0.55>, <lora:c:-1.25>"


@pytest.mark.parametrize(
    ("weight", "text"), [(0.8, "0.8"), (1.0, "1"), (1, "1"), (0.125, "0.125"), (-0.5, "-0.5"), (0.0, "0"), (2, "2")]
)
def test_weight_formatting_drops_trailing_zeros(weight: float, text: str) -> None:
    assert format_weight(weight) == text


def test_lora_already_in_prompt_or_given_twice_is_not_repeated() -> None:
    body = payload(prompt="a cat <lora:add_detail:0.5>", lora="add_detail", loras=[{"name": "x"}, {"name": "x"}])
    assert body["prompt"] == "a cat <lora:add_detail:0.5>, <lora:x:0.8>"


@pytest.mark.parametrize("name", ["a:b", "<x>", " "])
def test_lora_names_that_would_break_the_tag_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="LoRA name"):
        req(lora=name)


# --- ControlNet --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cn_type", "module", "model", "weight", "cfg"),
    [
        ("canny", "canny", "control_v11p_sd15_canny", 0.9, 6),
        ("openpose", "openpose_full", "control_v11p_sd15_openpose", 0.9, 6),
        ("depth", "depth_midas", "control_v11f1p_sd15_depth", 0.7, 8),
        ("lineart", "lineart_realistic", "control_v11p_sd15_lineart", 0.9, 6),
        ("softedge", "softedge_pidinet", "control_v11p_sd15_softedge", 1.0, 7),
        ("scribble", "scribble_pidinet", "control_v11p_sd15_scribble", 1.0, 7),
        ("seg", "seg_ofade20k", "control_v11p_sd15_seg", 1.0, 7),
        ("normal", "normal_bae", "control_v11p_sd15_normalbae", 1.0, 7),
        ("tile", "tile_resample", "control_v11f1e_sd15_tile", 1.0, 7),
        ("ip-adapter", "ip-adapter_clip_sd15", "ip-adapter_sd15", 1.0, 7),
    ],
)
def test_unit_per_type_gets_recommended_module_model_weight_and_cfg(
    cn_type: str, module: str, model: str, weight: float, cfg: float
) -> None:
    body = payload(controlnet={"type": cn_type, "image": IMG})
    [unit] = units(body)
    assert unit == {
        "enabled": True,
        "image": IMG,
        "module": module,
        "model": model,
        "weight": weight,
        "resize_mode": "Crop and Resize",
        "guidance_start": 0.0,
        "guidance_end": 1.0,
        "control_mode": "Balanced",
        "pixel_perfect": True,
        "save_detected_map": False,
    }
    assert body["cfg_scale"] == cfg  # types without advice keep the default 7


def test_recommended_table_is_complete_and_consistent() -> None:
    assert set(RECOMMENDED) == set(ControlNetType)
    for advice in RECOMMENDED.values():
        if advice.weight_range:
            assert advice.weight_range[0] <= advice.weight <= advice.weight_range[1]
        if advice.cfg_range:
            assert advice.cfg == sum(advice.cfg_range) / 2
    assert RECOMMENDED["depth"].cfg_range == (7, 9)


def test_explicit_unit_values_win_over_recommendations() -> None:
    spec = {
        "type": "depth",
        "image": IMG,
        "weight": 0.4,
        "module": "depth_leres",
        "model": "my_depth",
        "guidance_start": 0.1,
        "guidance_end": 0.6,
        "control_mode": "ControlNet is more important",
        "resize_mode": "Resize and Fill",
        "pixel_perfect": False,
        "processor_res": 768,
        "threshold_a": 50,
        "threshold_b": 15,
        "save_detected_map": True,
    }
    [unit] = units(payload(controlnet=spec, models={"depth": "instance_depth"}))
    assert (unit["weight"], unit["module"], unit["model"]) == (0.4, "depth_leres", "my_depth")
    assert (unit["guidance_start"], unit["guidance_end"], unit["pixel_perfect"]) == (0.1, 0.6, False)
    assert (unit["control_mode"], unit["resize_mode"]) == ("ControlNet is more important", "Resize and Fill")
    assert (unit["processor_res"], unit["threshold_a"], unit["threshold_b"]) == (768, 50, 15)
    assert unit["save_detected_map"] is True


def test_instance_controlnet_models_replace_the_default_names() -> None:
    body = payload(
        controlnets=[{"type": "canny", "image": IMG}, {"type": "depth", "image": IMG}], models={"depth": "d"}
    )
    assert [u["model"] for u in units(body)] == ["control_v11p_sd15_canny", "d"]


def test_request_and_preset_cfg_beat_the_controlnet_recommendation() -> None:
    cn = {"type": "depth", "image": IMG}
    assert payload(controlnet=cn, cfg_scale=4)["cfg_scale"] == 4
    assert payload(Preset(name="p", cfg_scale=11), controlnet=cn)["cfg_scale"] == 11
    assert payload(Preset(name="p"), controlnet=cn)["cfg_scale"] == 8  # a preset without a CFG does not count


def test_single_and_list_units_are_combined_single_first() -> None:
    body = payload(controlnet={"type": "openpose", "image": "A"}, controlnets=[{"type": "depth", "image": "B"}])
    assert [(u["module"], u["image"], u["weight"]) for u in units(body)] == [
        ("openpose_full", "A", 0.9),
        ("depth_midas", "B", 0.7),
    ]


@pytest.mark.parametrize(
    ("types", "cfg"),
    [
        (["canny", "openpose"], 6),  # 5-7 and 5-7
        (["canny", "depth"], 7),  # 5-7 and 7-9 meet at 7
        (["depth", "softedge"], 8),  # softedge has no advice, so depth alone decides
        (["softedge", "depth"], 8),
        (["tile", "seg"], 7),  # nobody advises: the default
    ],
)
def test_cfg_for_several_units_is_the_midpoint_of_the_common_range(types: list[str], cfg: float) -> None:
    body = payload(controlnets=[{"type": t, "image": IMG} for t in types])
    assert body["cfg_scale"] == cfg


def test_cfg_falls_back_to_the_first_unit_when_ranges_do_not_meet(monkeypatch: pytest.MonkeyPatch) -> None:
    from sd_operator.gateway import payload as module

    table = dict(module.RECOMMENDED)
    table["tile"] = module.ControlNetDefaults("tile_resample", "t", cfg=10, cfg_range=(9, 11))
    monkeypatch.setattr(module, "RECOMMENDED", table)
    assert module.recommended_cfg(["canny", "tile"]) == 6
    assert module.recommended_cfg(["tile", "canny"]) == 10


# --- validation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "where", "message"),
    [
        ({"width": 500}, "width", "must be a multiple of 8 from 64 to 2048 (got 500)"),
        ({"width": 56}, "width", "from 64 to 2048"),
        ({"height": 2056}, "height", "from 64 to 2048"),
        ({"steps": 0}, "steps", "from 1 to 150"),
        ({"steps": 151}, "steps", "from 1 to 150"),
        ({"cfg_scale": 0.5}, "cfg_scale", "from 1 to 30"),
        ({"cfg_scale": 30.5}, "cfg_scale", "from 1 to 30"),
        ({"batch_size": 0}, "batch_size", "from 1 to 8"),
        ({"batch_size": 9}, "batch_size", "from 1 to 8"),
        ({"seed": -2}, "seed", "from -1 to"),
        ({"lora": "x", "lora_weight": 2.5}, "lora_weight", "from -2 to 2"),
        ({"loras": [{"name": "x", "weight": -2.1}]}, "loras.0.weight", "from -2 to 2"),
        ({"controlnet": {"type": "canny", "image": IMG, "weight": 2.1}}, "controlnet.weight", "from 0 to 2"),
        ({"controlnet": {"type": "canny", "image": IMG, "weight": -0.1}}, "controlnet.weight", "from 0 to 2"),
        ({"controlnet": {"type": "canny", "image": IMG, "guidance_end": 1.5}}, "controlnet.guidance_end", "0 to 1"),
        (
            {"controlnets": [{"type": "canny", "image": IMG, "guidance_start": 0.8, "guidance_end": 0.5}]},
            "controlnets.0",
            "guidance_start (0.8) must be less than or equal to guidance_end (0.5)",
        ),
        ({"controlnet": {"type": "sketch", "image": IMG}}, "controlnet.type", "canny"),
        ({"controlnet": {"type": "canny"}}, "controlnet.image", "Field required"),
        ({"cfg": 7}, "cfg", "Extra inputs are not permitted"),
    ],
)
def test_validation_errors_name_the_field_and_the_rule(fields: dict[str, Any], where: str, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        req(**fields)
    [error] = err.value.errors()
    assert ".".join(str(p) for p in error["loc"]) == where
    assert message in error["msg"]


def test_prompt_is_required() -> None:
    with pytest.raises(ValidationError, match="prompt"):
        GenerateRequest.model_validate({"width": 512})


def test_bounds_themselves_are_accepted() -> None:
    ok = req(width=64, height=2048, steps=150, cfg_scale=1, batch_size=8, lora="x", lora_weight=-2)
    assert (ok.width, ok.height, ok.steps, ok.lora_weight) == (64, 2048, 150, -2)


# --- OOM advice --------------------------------------------------------------------------------------------------


def test_oom_message_gives_the_load_and_an_extras_upscale_plan() -> None:
    # Not hires fix: its second pass holds as much as rendering at the target size (gateway/budget.py).
    text = describe_oom(1024, 1024, 1, None)
    assert "1024x1024 x batch 1 = 1,048,576 pixels" in text
    assert "512x512, then upscale 512x512 to 1024x1024 with POST /sdapi/v1/extra-single-image" in text
    assert "enable_hr" not in text and "batch_size" not in text  # nothing to lower


def test_oom_message_with_a_batch_and_a_budget() -> None:
    text = describe_oom(768, 768, 4, budget_pixels=600_000)
    assert "2,359,296 pixels" in text
    assert "about 600,000" in text
    assert "lower batch_size to 1 and raise n_iter to 4" in text
    assert "smaller size" not in text and "extra-single-image" not in text  # one image fits


def test_oom_suggests_a_size_that_fits_the_budget() -> None:
    text = describe_oom(1024, 1024, 1, budget_pixels=500_000)
    assert "smaller size such as 704x704" in text  # sqrt(500000) = 707 -> down to a multiple of 8


# --- cache keys --------------------------------------------------------------------------------------------------


def test_canonical_request_ignores_key_order_number_spelling_and_delivery_options() -> None:
    a = {"prompt": "cat", "cfg_scale": 7, "seed": 1, "alwayson_scripts": {"controlnet": {"args": [{"weight": 1}]}}}
    b = {
        "alwayson_scripts": {"controlnet": {"args": [{"weight": 1.0}]}},
        "seed": 1,
        "cfg_scale": 7.0,
        "prompt": "cat",
        "send_images": True,
        "save_images": True,
        "do_not_save_samples": True,
        "do_not_save_grid": True,
        "force_task_id": "task(abc)",
        "override_settings_restore_afterwards": True,
    }
    assert canonical_request(a) == canonical_request(b)
    assert " " not in canonical_request(a).replace('"cat"', "")


def test_canonical_request_keeps_what_changes_the_result() -> None:
    base = {"prompt": "cat", "cfg_scale": 7, "seed": 1}
    key = canonical_request(base)
    assert canonical_request({**base, "prompt": "dog"}) != key
    assert canonical_request({**base, "seed": 2}) != key
    assert canonical_request({**base, "cfg_scale": 7.5}) != key
    # Not restoring settings leaves them changed for later requests, so it is a different request.
    assert canonical_request({**base, "override_settings_restore_afterwards": False}) != key


def test_canonical_request_of_built_payloads() -> None:
    one = payload(prompt="x", seed=5, cfg_scale=7)
    two = payload(prompt="x", seed=5, cfg_scale=7.0)
    assert canonical_request(one) == canonical_request(two)
    assert canonical_request(one) != canonical_request(payload(prompt="x", seed=6, cfg_scale=7))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"seed": 42}, True),
        ({"seed": 0}, True),
        ({"seed": -1}, False),
        ({}, False),
        ({"seed": None}, False),
        ({"seed": "42"}, False),
        ({"seed": 42.0}, False),
        ({"seed": True}, False),
        ({"seed": 42, "subseed": 7}, True),
        ({"seed": 42, "subseed": -1}, True),  # subseed_strength defaults to 0: the subseed is not mixed in
        ({"seed": 42, "subseed": -1, "subseed_strength": 0}, True),
        ({"seed": 42, "subseed": -1, "subseed_strength": 0.0}, True),
        ({"seed": 42, "subseed": -1, "subseed_strength": 0.3}, False),
        ({"seed": 42, "subseed": 3, "subseed_strength": 0.3}, True),
        ({"seed": -1, "subseed": 3, "subseed_strength": 0}, False),
    ],
)
def test_is_deterministic(body: dict[str, Any], expected: bool) -> None:
    assert is_deterministic(body) is expected
