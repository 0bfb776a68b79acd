"""The emulator's extras, png-info and interrogate (emulator/extras.py): the WebUI's parsing and sizes as pure
functions, and the routes in process on 127.0.0.1 (queue lock and timing like the WebUI)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sd_operator.emulator import cli
from sd_operator.emulator.app import create_app
from sd_operator.emulator.engine import EMULATOR
from sd_operator.emulator.extras import (
    ExtrasRequest,
    parse_generation_parameters,
    postprocess,
    read_info,
    upscale_plan,
)

A1111_INFOTEXT = (
    "masterpiece, a castle on a hill, <lora:styleA:0.8>\n"
    "second prompt line\n"
    "Negative prompt: blurry, lowres\n"
    "more negative\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 832x1216, "
    "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Denoising strength: 0.45, Hires upscale: 1.5, "
    'Hires upscaler: R-ESRGAN 4x+, Lora hashes: "styleA: 0123456789ab", Version: v1.10.1'
)


def png(width: int = 64, height: int = 48, **text: str) -> Image.Image:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "orange").save(buf, "PNG", pnginfo=info)
    return Image.open(io.BytesIO(buf.getvalue()))


def b64(image: Image.Image, fmt: str = "PNG", **save: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return base64.b64encode(buf.getvalue()).decode()


# --- png-info parsing --------------------------------------------------------------------------------------------


def test_parse_generation_parameters_reads_prompts_fields_and_sizes() -> None:
    p = parse_generation_parameters(A1111_INFOTEXT)
    assert p["Prompt"] == "masterpiece, a castle on a hill, <lora:styleA:0.8>\nsecond prompt line"
    assert p["Negative prompt"] == "blurry, lowres\nmore negative"
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"]) == ("28", "DPM++ 2M", "6.5", "1234")
    assert (p["Size-1"], p["Size-2"]) == ("832", "1216") and "Size" not in p
    assert p["Lora hashes"] == "styleA: 0123456789ab"  # unquoted
    assert p["Schedule type"] == "Karras" and p["Hires upscaler"] == "R-ESRGAN 4x+"


def test_parse_generation_parameters_fills_the_webuis_defaults() -> None:
    p = parse_generation_parameters("a cat\nSteps: 20, Sampler: Euler a, Seed: 1")
    assert p["Clip skip"] == "1" and p["Hires resize-1"] == 0 and p["Hires sampler"] == "Use same sampler"
    assert p["RNG"] == "GPU" and p["Schedule type"] == "Automatic" and p["FP8 weight"] == "Disable"
    assert p["Masked area padding"] == 32 and "Cache FP16 weight for LoRA" not in p
    assert "Downcast alphas_cumprod" not in p  # no Version: no back-compatibility flags


def test_a_last_line_with_fewer_than_three_fields_belongs_to_the_prompt() -> None:
    p = parse_generation_parameters("a: b, c: d")
    assert p["Prompt"] == "a: b, c: d" and "a" not in p
    assert parse_generation_parameters("")["Prompt"] == ""


def test_old_versions_get_their_back_compatibility_flags() -> None:
    old = parse_generation_parameters("[a:b:5]\nSteps: 20, Sampler: DDIM, Seed: 1, Version: v1.5.1")
    assert old["Old prompt editing timelines"] and old["Pad conds v0"] and old["Downcast alphas_cumprod"]
    mid = parse_generation_parameters("x\nSteps: 20, Sampler: DDIM, Seed: 1, Version: v1.7.0-225-gabcdef")
    assert "Downcast alphas_cumprod" not in mid and "Pad conds v0" not in mid
    own = parse_generation_parameters("x\nSteps: 20, Sampler: Euler, Seed: 1, Version: sd-emulator-0.1.0")
    assert "Downcast alphas_cumprod" not in own


def test_an_old_first_pass_size_becomes_a_hires_resize() -> None:
    p = parse_generation_parameters("x\nSteps: 20, Seed: 1, Size: 1024x1024, First pass size: 0x0")
    assert (p["Size-1"], p["Size-2"], p["Hires resize-1"], p["Hires resize-2"]) == (512, 512, 1024, 1024)


def test_read_info_splits_parameters_from_the_other_chunks() -> None:
    geninfo, items = read_info(png(parameters="a\nSteps: 1, Seed: 2, Size: 8x8", **{"sd-emulator-seed": "2"}))
    assert geninfo.startswith("a\nSteps") and items == {"sd-emulator-seed": "2"}


def test_read_info_reads_a_jpegs_exif_user_comment() -> None:
    image = Image.new("RGB", (32, 32), "blue")
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + "a dog\nSteps: 5, Seed: 9, Size: 32x32".encode("utf_16_be")
    jpeg = Image.open(io.BytesIO(base64.b64decode(b64(image, "JPEG", exif=exif.tobytes()))))
    geninfo, items = read_info(jpeg)
    assert geninfo == "a dog\nSteps: 5, Seed: 9, Size: 32x32" and "exif" not in items and "jfif" not in items


# --- extras ------------------------------------------------------------------------------------------------------


def test_upscale_sizes_follow_the_upscale_script() -> None:
    assert upscale_plan(500, 300, ExtrasRequest(upscaling_resize=1.5)) == ((744, 448), None)
    to = ExtrasRequest(resize_mode=1, upscaling_resize_w=1000, upscaling_resize_h=1000)
    assert upscale_plan(500, 300, to) == ((1664, 1000), (1000, 1000))
    no_crop = ExtrasRequest(resize_mode=1, upscaling_resize_w=1000, upscaling_resize_h=1000, upscaling_crop=False)
    assert upscale_plan(500, 300, no_crop) == ((1664, 1000), None)


def test_postprocess_keeps_the_images_info_and_adds_what_it_did() -> None:
    source = png(100, 60, parameters="a cat\nSteps: 20, Seed: 3, Size: 100x60", note="kept")
    out, text = postprocess(source, ExtrasRequest(upscaler_1="R-ESRGAN 4x+", upscaling_resize=2, gfpgan_visibility=0.5))
    assert out.size == (200, 120) and out.mode == "RGB"
    assert text == "Postprocess upscale by: 2.0, Postprocess upscaler: R-ESRGAN 4x+, GFPGAN visibility: 0.5"
    assert out.info["parameters"].startswith("a cat") and out.info["note"] == "kept"
    assert out.info["postprocessing"] == text


def test_upscaler_none_leaves_the_size_as_it_is() -> None:
    out, text = postprocess(png(100, 60), ExtrasRequest(upscaling_resize=4))
    assert out.size == (100, 60) and text == ""


# --- routes in process ---------------------------------------------------------------------------------------------


Scenario = Callable[[TestClient, Any], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario, speed: str = "0.001") -> None:
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"\0" * 2048)
    config = cli.config_from_argv(["--api", "--nowebui", "--ckpt", str(ckpt), "--speed", speed])

    async def main() -> None:
        app = create_app(config)
        async with TestClient(TestServer(app, host="127.0.0.1")) as http:
            await scenario(http, app[EMULATOR])

    asyncio.run(main())


def test_extras_single_and_batch_images(tmp_path: Path) -> None:
    async def scenario(http: TestClient, emu: Any) -> None:
        txt = await (await http.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "steps": 2, "seed": 5})).json()
        r = await http.post(
            "/sdapi/v1/extra-single-image",
            json={"image": txt["images"][0], "upscaler_1": "Nearest", "upscaling_resize": 3, "ignored": True},
        )
        body = await r.json()
        assert r.status == 200 and set(body) == {"html_info", "image"}
        out = Image.open(io.BytesIO(base64.b64decode(body["image"])))
        assert out.size == (1536, 1536) and out.text["sd-emulator-prompt"] == "a fox"  # type: ignore[attr-defined]
        assert body["html_info"] == "<p>Postprocess upscale by: 3.0, Postprocess upscaler: Nearest</p>"
        batch = {
            "imageList": [{"data": b64(png(80, 40)), "name": "a.png"}, {"data": b64(png(40, 80)), "name": "b.png"}],
            "upscaler_1": "Lanczos",
            "resize_mode": 1,
            "upscaling_resize_w": 100,
            "upscaling_resize_h": 100,
        }
        many = await (await http.post("/sdapi/v1/extra-batch-images", json=batch)).json()
        sizes = [Image.open(io.BytesIO(base64.b64decode(i))).size for i in many["images"]]
        assert sizes == [(100, 100), (100, 100)]
        assert emu.generations == 1  # extras are not generations

    run(tmp_path, scenario)


def test_extras_and_interrogate_errors_are_the_webuis(tmp_path: Path) -> None:
    async def scenario(http: TestClient, _: Any) -> None:
        image = b64(png())
        unknown = await http.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "Magic 9x"})
        assert unknown.status == 500
        assert await unknown.json() == {
            "error": "AssertionError",
            "detail": "",
            "body": "",
            "errors": "could not find upscaler named Magic 9x",
        }
        broken = await http.post("/sdapi/v1/extra-single-image", json={"image": "bm90IGFuIGltYWdl"})
        assert broken.status == 500 and (await broken.json())["detail"] == "Invalid encoded image"
        too_much = await http.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaling_resize": 9})
        assert too_much.status == 422 and (await too_much.json())["error"] == "RequestValidationError"
        no_list = await http.post("/sdapi/v1/extra-batch-images", json={})
        assert no_list.status == 422
        model = await http.post("/sdapi/v1/interrogate", json={"image": image, "model": "blip2"})
        assert model.status == 404 and (await model.json())["detail"] == "Model not found"

    run(tmp_path, scenario)


def test_png_info_answers_the_webuis_three_fields(tmp_path: Path) -> None:
    async def scenario(http: TestClient, _: Any) -> None:
        txt = await (await http.post("/sdapi/v1/txt2img", json={"prompt": "a, b", "steps": 3, "seed": 8})).json()
        r = await http.post("/sdapi/v1/png-info", json={"image": "  " + txt["images"][0] + "\n"})
        body = await r.json()
        assert set(body) == {"info", "items", "parameters"}
        assert body["info"] == json.loads(txt["info"])["infotexts"][0]
        assert body["parameters"]["Seed"] == "8" and body["parameters"]["Prompt"] == "a, b"
        assert body["items"]["sd-emulator-seed"] == "8" and "parameters" not in body["items"]
        plain = await (await http.post("/sdapi/v1/png-info", json={"image": b64(png())})).json()
        assert plain["info"] == "" and plain["parameters"]["Prompt"] == ""

    run(tmp_path, scenario)


def test_extras_wait_for_the_queue_lock_and_png_info_does_not(tmp_path: Path) -> None:
    async def scenario(http: TestClient, emu: Any) -> None:
        image = b64(png(512, 512))
        long = asyncio.create_task(http.post("/sdapi/v1/txt2img", json={"steps": 40, "width": 1024, "height": 1024}))
        for _ in range(1000):
            if emu.queue_lock.locked():
                break
            await asyncio.sleep(0.005)
        started = time.monotonic()
        info = await http.post("/sdapi/v1/png-info", json={"image": image})
        assert info.status == 200 and time.monotonic() - started < 0.3  # beside the generation
        extras = asyncio.create_task(
            http.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "ESRGAN_4x"})
        )
        await asyncio.sleep(0.1)
        assert not extras.done() and emu.waiting == 1
        assert (await long).status == 200 and (await extras).status == 200
        assert emu.max_concurrency == 1

    run(tmp_path, scenario, speed="0.2")  # the 1024x1024 generation takes about 1 s on the rtx4090 profile


def test_interrogate_captions_from_the_prompt(tmp_path: Path) -> None:
    async def scenario(http: TestClient, emu: Any) -> None:
        txt = await (await http.post("/sdapi/v1/txt2img", json={"prompt": "a red fox, snow, <lora:x:1>"})).json()
        clip = await (await http.post("/sdapi/v1/interrogate", json={"image": txt["images"][0]})).json()
        assert clip == {"caption": "a picture of a red fox, snow"}
        tags = await http.post("/sdapi/v1/interrogate", json={"image": txt["images"][0], "model": "deepdanbooru"})
        assert (await tags.json())["caption"].startswith("a red fox, snow")
        assert emu.busy_seconds > 0

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    ("path", "check"),
    [
        ("upscalers", lambda b: {"None", "Lanczos", "R-ESRGAN 4x+"} <= {u["name"] for u in b}),
        ("latent-upscale-modes", lambda b: b[0] == {"name": "Latent"} and len(b) == 6),
        ("face-restorers", lambda b: [f["name"] for f in b] == ["CodeFormer", "GFPGAN"]),
        ("realesrgan-models", lambda b: {"name", "path", "scale"} == set(b[0])),
        ("prompt-styles", lambda b: b == []),
        ("hypernetworks", lambda b: b == []),
        ("script-info", lambda b: {"name", "is_alwayson", "is_img2img", "args"} == set(b[0])),
        ("extensions", lambda b: b == []),
    ],
)
def test_catalog_routes(tmp_path: Path, path: str, check: Callable[[Any], bool]) -> None:
    async def scenario(http: TestClient, _: Any) -> None:
        r = await http.get(f"/sdapi/v1/{path}")
        assert r.status == 200 and check(await r.json())

    run(tmp_path, scenario)
