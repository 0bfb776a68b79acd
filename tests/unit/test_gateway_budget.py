"""The pixel-budget guard's arithmetic (gateway/budget.py): what the GPU holds at once for hires fix, img2img
init images and batches, the work units of a request, and the advice of a 413."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from sd_operator.gateway import budget
from sd_operator.gateway.budget import (
    describe,
    extras_size,
    extras_units,
    hires_target,
    image_size,
    img2img_load,
    interrogate_units,
    plain_load,
    request_load,
    txt2img_load,
)

RTX4090_SD15 = 9_675_000  # registry.pixel_budget(24, sd15)


def b64_image(width: int, height: int, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "teal").save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def hires(**body: Any) -> budget.Load:
    return txt2img_load({"enable_hr": True, "width": 512, "height": 512, **body})


# --- hires fix ---------------------------------------------------------------------------------------------------


def test_hires_by_scale_peaks_at_the_upscaled_second_pass() -> None:
    load = hires(width=1024, height=1024, hr_scale=8)
    peak = load.peak
    assert (peak.label, peak.width, peak.height, peak.batch) == ("hires fix", 8192, 8192, 1)
    assert load.pixels == 8192 * 8192
    assert peak.describe() == "hires fix: 1024x1024 x hr_scale 8 = 8192x8192 x batch 1 = 67,108,864 pixels at once"


def test_hires_scale_truncates_like_the_webui() -> None:
    assert hires_target(832, 1216, 1.5, 0, 0)[:2] == (1248, 1824)
    assert hires_target(513, 777, 1.3, 0, 0)[:2] == (666, 1010)  # int(513 * 1.3), int(777 * 1.3)
    assert hires().peak.size == "1024x1024"  # hr_scale defaults to 2


def test_hires_by_resize_x_only_keeps_the_aspect() -> None:
    load = hires(width=512, height=768, hr_resize_x=1024, hr_scale=8)  # hr_scale is ignored once a resize is set
    assert load.peak.size == "1024x1536"
    assert "512x768 to hr_resize_x 1024 = 1024x1536" in load.peak.describe()


def test_hires_by_resize_y_only_keeps_the_aspect() -> None:
    assert hires(width=768, height=512, hr_resize_y=1024).peak.size == "1536x1024"
    assert hires_target(640, 448, 2, 0, 900)[:2] == (900 * 640 // 448, 900)  # floor division, as the WebUI


def test_hires_by_both_resizes_upscales_to_cover_then_crops() -> None:
    # A square first pass to 1024x768 is upscaled to 1024x1024 (then cropped in latent space): that is held.
    assert hires(width=512, height=512, hr_resize_x=1024, hr_resize_y=768).peak.size == "1024x1024"
    assert hires(width=768, height=512, hr_resize_x=1024, hr_resize_y=1024).peak.size == "1536x1024"
    assert hires(width=512, height=512, hr_resize_x=1024, hr_resize_y=1024).peak.size == "1024x1024"


def test_firstphase_size_is_the_first_pass() -> None:
    load = hires(width=2048, height=2048, firstphase_width=512, firstphase_height=512, hr_scale=2)
    assert [p.size for p in load.passes] == ["512x512", "1024x1024"]


def test_without_enable_hr_the_hires_fields_do_not_count() -> None:
    assert txt2img_load({"width": 1024, "height": 1024, "hr_scale": 8}).pixels == 1024 * 1024
    assert txt2img_load({"enable_hr": "false", "hr_scale": 8}).pixels == 512 * 512
    assert txt2img_load({"enable_hr": "true", "hr_scale": 4}).pixels == 2048 * 2048


def test_a_hires_pass_smaller_than_the_first_leaves_the_first_as_the_peak() -> None:
    load = hires(width=1024, height=1024, hr_resize_x=512, hr_resize_y=512)
    assert load.peak.label == "first pass" and load.pixels == 1024 * 1024


# --- batch and n_iter --------------------------------------------------------------------------------------------


def test_batch_multiplies_the_peak_and_n_iter_does_not() -> None:
    assert txt2img_load({"width": 768, "height": 768, "batch_size": 4, "n_iter": 8}).pixels == 768 * 768 * 4
    assert hires(batch_size=3, n_iter=5).pixels == 1024 * 1024 * 3


def test_units_count_every_pass_and_iteration() -> None:
    assert txt2img_load({"steps": 20}).units() == 1
    assert txt2img_load({"steps": 20, "n_iter": 3, "batch_size": 2}).units() == 6
    assert hires(steps=20).units() == 5  # 512x512 then 1024x1024, 20 steps each
    assert hires(steps=20, hr_second_pass_steps=10).units() == 3
    assert txt2img_load({}).units() == 2.5  # the WebUI's default 50 steps


def test_unreadable_fields_fall_back_to_the_webui_defaults() -> None:
    load = txt2img_load({"width": "wide", "height": None, "batch_size": True, "enable_hr": 1, "hr_scale": "x"})
    assert load.peak.size == "1024x1024" and load.peak.batch == 1


# --- img2img -----------------------------------------------------------------------------------------------------


def test_img2img_init_images_are_resized_to_width_and_height() -> None:
    body = {"init_images": [b64_image(2048, 2048)], "width": 512, "height": 512, "batch_size": 2}
    for mode in (0, 1, 2):
        load = img2img_load({**body, "resize_mode": mode})
        assert load.pixels == 512 * 512 * 2 and load.peak.label == "img2img"


def test_img2img_latent_resize_encodes_the_init_image_at_its_own_size() -> None:
    body = {"init_images": [b64_image(2048, 1536)], "width": 512, "height": 512, "batch_size": 2, "resize_mode": 3}
    peak = img2img_load(body).peak
    assert (peak.label, peak.size, peak.batch) == ("init image", "2048x1536", 2)
    assert "resize_mode 3 encodes the init image at its own 2048x1536" in peak.describe()


def test_img2img_an_inpaint_full_res_mask_crops_and_resizes_to_width_and_height() -> None:
    body = {"init_images": [b64_image(2048, 2048)], "mask": b64_image(2048, 2048), "resize_mode": 3}
    assert img2img_load(body).peak.label == "img2img"  # inpaint_full_res defaults to true
    assert img2img_load({**body, "inpaint_full_res": False}).peak.size == "2048x2048"


def test_img2img_several_init_images_make_the_batch() -> None:
    images = [b64_image(64, 64)] * 3
    assert img2img_load({"init_images": images, "batch_size": 8}).peak.batch == 3
    assert img2img_load({"init_images": images[:1], "batch_size": 8}).peak.batch == 8


def test_img2img_samples_the_denoised_part_of_the_steps() -> None:
    assert img2img_load({"steps": 20, "denoising_strength": 0.5, "init_images": ["x"]}).units() == 0.5
    assert img2img_load({"steps": 20, "init_images": ["x"]}).units() == 0.75  # denoising_strength 0.75


def test_request_load_goes_by_the_path() -> None:
    body = {"enable_hr": True, "init_images": [b64_image(4096, 4096)], "resize_mode": 3}
    assert request_load("/sdapi/v1/txt2img", body).peak.label == "hires fix"
    assert request_load("/sdapi/v1/img2img", body).peak.label == "init image"


def test_image_size_reads_headers_of_base64_and_data_urls() -> None:
    png = b64_image(300, 200)
    assert image_size(png) == (300, 200)
    assert image_size(f"data:image/png;base64,{png}") == (300, 200)
    assert image_size(b64_image(123, 45, "JPEG")) == (123, 45)
    assert image_size("https://example.com/a.png") is None
    assert image_size("not an image") is None
    assert image_size(None) is None


# --- extras and interrogate --------------------------------------------------------------------------------------


def test_extras_output_sizes_follow_the_upscale_script() -> None:
    assert extras_size(500, 300, {"upscaler_1": "None", "upscaling_resize": 4}) == (500, 300)  # no upscaler
    assert extras_size(500, 300, {"upscaler_1": "Lanczos", "upscaling_resize": 1.5}) == (744, 448)  # // 8 * 8
    assert extras_size(500, 300, {"upscaler_1": "Lanczos"}) == (1000, 600)  # upscaling_resize defaults to 2
    to = {"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 1000, "upscaling_resize_h": 1000}
    assert extras_size(500, 300, to) == (1000, 1000)  # cropped to the asked size
    assert extras_size(500, 300, {**to, "upscaling_crop": False}) == (1664, 1000)  # covers it: scale 10/3


def test_extras_units_grow_with_the_upscaled_pixels() -> None:
    image = b64_image(512, 512)
    four = extras_units({"image": image, "upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 4})
    two = extras_units({"image": image, "upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 2})
    assert four == 16 * budget.EXTRAS_UNITS_PER_TILE and two == 4 * budget.EXTRAS_UNITS_PER_TILE
    lanczos = extras_units({"image": image, "upscaler_1": "Lanczos", "upscaling_resize": 4})
    assert lanczos < two
    batch = extras_units({"imageList": [{"data": image, "name": "a"}] * 3, "upscaler_1": "R-ESRGAN 4x+"})
    assert batch == 3 * two
    faces = extras_units({"image": image, "gfpgan_visibility": 0.5, "codeformer_visibility": 1})
    assert faces == 2 * budget.FACE_RESTORE_UNITS
    assert extras_units({"image": image}) == 0.01  # nothing to do


def test_interrogate_units_are_fixed_per_model() -> None:
    assert interrogate_units({}) == interrogate_units({"model": "clip"}) == 2.0
    assert interrogate_units({"model": "deepdanbooru"}) == 0.5


# --- advice ------------------------------------------------------------------------------------------------------


def test_the_issue_example_names_the_real_target_and_a_scale_that_fits() -> None:
    load = hires(width=1024, height=1024, hr_scale=8)
    text = describe(load, RTX4090_SD15, what="too large for the GPUs serving m", where="the largest of them")
    assert text.startswith("too large for the GPUs serving m: hires fix: 1024x1024 x hr_scale 8 = 8192x8192")
    assert "the largest of them handles about 9,675,000" in text
    assert "hr_scale 3 (3072x3072)" in text  # 3072^2 = 9,437,184 fits; 3.05 would not
    assert "upscale 3072x3072 to 8192x8192 with POST /sdapi/v1/extra-single-image" in text
    assert "upscaling_resize 2.67" in text


def test_hires_advice_when_even_the_first_pass_does_not_fit() -> None:
    text = describe(hires(width=4096, height=4096, hr_scale=2), RTX4090_SD15)
    assert "no hires fix at 3104x3104" in text and "to 8192x8192" in text


def test_a_batch_that_fits_one_image_at_a_time_is_told_to_use_n_iter() -> None:
    text = describe(txt2img_load({"width": 2048, "height": 2048, "batch_size": 8, "n_iter": 2}), RTX4090_SD15)
    assert "lower batch_size to 2 and raise n_iter to 8 for as many images" in text
    assert "smaller size" not in text


def test_a_plain_request_too_large_gets_a_size_that_fits_and_an_extras_upscale() -> None:
    text = describe(plain_load(4096, 4096), RTX4090_SD15)
    assert "use a smaller size such as 3104x3104, then upscale 3104x3104 to 4096x4096" in text


def test_an_init_image_too_large_for_latent_resize_gets_resize_mode_advice() -> None:
    load = img2img_load({"init_images": [b64_image(4096, 4096)], "resize_mode": 3})
    text = describe(load, RTX4090_SD15)
    assert "init image: resize_mode 3 encodes the init image at its own 4096x4096" in text
    assert "resize_mode 0, 1 or 2" in text and "at most 3104x3104" in text


def test_a_larger_gpu_of_the_fleet_is_named_only_when_it_holds_the_request() -> None:
    load = hires(width=1024, height=1024, hr_scale=3.5)  # 3584^2 = 12.8M
    holds = describe(load, RTX4090_SD15, larger=[("80GiB", 34_875_000), ("40GiB", 16_875_000)])
    assert "an instance of this model on a larger GPU (40GiB: about 16,875,000 pixels)" in holds
    assert "larger GPU" not in describe(
        hires(hr_scale=8, width=1024, height=1024), RTX4090_SD15, larger=[("40GiB", 16_875_000)]
    )


@pytest.mark.parametrize("unknown", [None, 0])
def test_without_a_known_budget_the_advice_has_no_numbers_it_cannot_know(unknown: int | None) -> None:
    text = describe(hires(width=1024, height=1024, hr_scale=4), unknown)
    assert "handles about" not in text and "a smaller hr_scale" in text
