"""What a request holds on the GPU at once, what it costs in work units, and what to say when it does not fit.

Pure functions, no I/O. The rules follow the pinned WebUI (AUTOMATIC1111/stable-diffusion-webui v1.10.1,
read at the stored commits named below; the code is unchanged between them and 1.10 in what matters here):

- A batch is rendered together, the iterations of `n_iter` one after another, so memory follows the largest
  single pass times `batch_size`; `n_iter` adds time, not memory.
- txt2img with hires fix (`enable_hr`) renders twice: the first pass at width x height (`firstphase_width/height`
  when set), then the second pass samples the latents at the hires target, which is the peak
  (modules/processing.py @ 0027ce1: StableDiffusionProcessingTxt2Img.calculate_target_resolution and
  sample_hr_pass). The target: `hr_resize_x` and `hr_resize_y` both 0: int(width * hr_scale) x
  int(height * hr_scale); only `hr_resize_x`: that width and hr_resize_x * height // width; only
  `hr_resize_y`: likewise; both: upscaled to cover hr_resize_x x hr_resize_y keeping the aspect (the larger
  side), then cropped in latent space. Hires fix therefore never saves memory: its second pass holds as much
  as a direct generation at the target size.
- img2img resizes every init image (and the mask) to width x height before encoding it (StableDiffusion-
  ProcessingImg2Img.init: images.resize_image(resize_mode, ...)), except resize_mode 3 ("Just resize (latent
  upscale)") without an inpaint-full-res mask: the init image is VAE-encoded at its own size, then the latents
  are interpolated. One init image is repeated batch_size times; several make the batch (as many as given, at
  most batch_size). Sampling runs int(steps * denoising_strength) steps.
- Extras (scripts/postprocessing_upscale.py, modules/upscaler.py @ 01c1a40): the output is
  int(w * scale) // 8 * 8 wide (scale = upscaling_resize, or max(w_to / w, h_to / h) with resize_mode 1);
  upscaler "None" leaves the image as it is. Model upscalers work in tiles (ESRGAN_tile), so their memory does
  not grow with the image: extras get work units, never a pixel budget.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from sd_operator.gateway.dispatch import UNIT_PIXELS_STEPS

# The WebUI's own defaults (StableDiffusionProcessing, StableDiffusionProcessingTxt2Img/Img2Img).
DEFAULT_SIDE = 512
DEFAULT_STEPS = 50
DEFAULT_HR_SCALE = 2.0
DEFAULT_DENOISING = 0.75
LATENT_UPSCALE = 3  # img2img resize_mode that encodes the init image at its own size
HR_SCALE_STEP = 0.05  # the WebUI's hr_scale slider step
EXTRAS_MAX_SCALE = 8  # ExtrasBaseRequest.upscaling_resize le=8

# Work units (dispatch.py: a 512x512 image at 20 steps) of what is not sampling. The emulator times the same
# work (emulator/extras.py, in steps of a 512x512 image: units x 20).
EXTRAS_UNITS_PER_TILE = 0.125  # a model upscaler's output, per 512x512 tile
RESAMPLE_UNITS_PER_TILE = 0.0025  # Lanczos / Nearest run on the CPU
FACE_RESTORE_UNITS = 0.25  # GFPGAN or CodeFormer, per image
INTERROGATE_UNITS = {"clip": 2.0, "deepdanbooru": 0.5}
TILE_PIXELS = 512 * 512
CPU_UPSCALERS = frozenset({"Lanczos", "Nearest"})
TILED_UPSCALER = "R-ESRGAN 4x+"  # in every stock install's upscaler list


def _int(body: Mapping[str, Any], key: str, default: int) -> int:
    """The field as the WebUI would read it; unset, null, 0 or unreadable give the default (the backend
    answers the unreadable ones itself)."""
    value = body.get(key)
    if value is None or isinstance(value, bool):
        return default
    try:
        return int(value) or default
    except (TypeError, ValueError):
        return default


def _float(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None or isinstance(value, bool):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


@dataclass(frozen=True)
class Pass:
    """One thing the GPU holds at once: `batch` images of width x height (`steps` 0: encoding, no sampling)."""

    label: str  # "txt2img", "hires fix", "img2img", "init image"
    how: str  # how the size follows from the request, e.g. "1024x1024 x hr_scale 8"
    width: int
    height: int
    batch: int
    steps: int

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.batch

    def describe(self) -> str:
        head = self.size if self.how == self.size else f"{self.how} = {self.size}"
        return f"{self.label}: {head} x batch {self.batch} = {self.pixels:,} pixels at once"


@dataclass(frozen=True)
class Load:
    """Every pass of one request (in order) and how often they run one after another."""

    passes: tuple[Pass, ...]
    n_iter: int = 1

    @property
    def peak(self) -> Pass:
        return max(self.passes, key=lambda p: p.pixels)  # the first of equals: the pass that comes first

    @property
    def pixels(self) -> int:
        return self.peak.pixels

    def units(self) -> float:
        """Work units of the whole request: every sampling pass, every iteration."""
        work = sum(p.width * p.height * p.steps * p.batch for p in self.passes)
        return max(work * self.n_iter / UNIT_PIXELS_STEPS, 0.01)

    def find(self, label: str) -> Pass | None:
        return next((p for p in self.passes if p.label == label), None)


def plain_load(width: int, height: int, batch: int = 1, steps: int = DEFAULT_STEPS, n_iter: int = 1) -> Load:
    """A single pass of width x height (what a request without hires fix or init image holds)."""
    return Load((Pass("txt2img", f"{width}x{height}", width, height, batch, steps),), n_iter)


def hires_target(width: int, height: int, hr_scale: float, hr_resize_x: int, hr_resize_y: int) -> tuple[int, int, str]:
    """The size the hires pass samples at, as calculate_target_resolution computes it, and how it follows."""
    width, height = max(width, 1), max(height, 1)
    if hr_resize_x <= 0 and hr_resize_y <= 0:
        return int(width * hr_scale), int(height * hr_scale), f"{width}x{height} x hr_scale {hr_scale:g}"
    if hr_resize_y <= 0:
        return hr_resize_x, hr_resize_x * height // width, f"{width}x{height} to hr_resize_x {hr_resize_x}"
    if hr_resize_x <= 0:
        return hr_resize_y * width // height, hr_resize_y, f"{width}x{height} to hr_resize_y {hr_resize_y}"
    how = f"{width}x{height} to cover hr_resize {hr_resize_x}x{hr_resize_y}"
    if width / height < hr_resize_x / hr_resize_y:
        return hr_resize_x, hr_resize_x * height // width, how
    return hr_resize_y * width // height, hr_resize_y, how


def txt2img_load(body: Mapping[str, Any]) -> Load:
    width, height = _int(body, "width", DEFAULT_SIDE), _int(body, "height", DEFAULT_SIDE)
    batch, n_iter = max(_int(body, "batch_size", 1), 1), max(_int(body, "n_iter", 1), 1)
    steps = _int(body, "steps", DEFAULT_STEPS)
    if not _flag(body.get("enable_hr")):
        return Load((Pass("txt2img", f"{width}x{height}", width, height, batch, steps),), n_iter)
    first_w, first_h = _int(body, "firstphase_width", 0), _int(body, "firstphase_height", 0)
    if first_w or first_h:  # the old way to ask for a first-pass size: width x height become the target
        width, height = max(first_w, 1), max(first_h, 1)
    x, y, how = hires_target(
        width,
        height,
        _float(body, "hr_scale", DEFAULT_HR_SCALE),
        _int(body, "hr_resize_x", 0),
        _int(body, "hr_resize_y", 0),
    )
    first = Pass("first pass", f"{width}x{height}", width, height, batch, steps)
    second = Pass("hires fix", how, x, y, batch, _int(body, "hr_second_pass_steps", 0) or steps)
    return Load((first, second), n_iter)


def image_size(encoded: Any) -> tuple[int, int] | None:
    """Width and height of a base64 image (a data: URL too) from its header; None for URLs and unreadable data.

    The header is near the start of a PNG, so the first 64 KiB are tried first; a JPEG may carry it later."""
    if not isinstance(encoded, str) or encoded.startswith(("http://", "https://")):
        return None
    if encoded.startswith("data:image/"):
        encoded = encoded.split(",", 1)[-1]
    for text in (encoded[:65536], encoded):
        size = _decoded_size(text[: len(text) // 4 * 4])
        if size is not None:
            return size
    return None


def _decoded_size(text: str) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(base64.b64decode(text))) as image:
            return image.size
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError, Image.DecompressionBombError):
        return None


def img2img_load(body: Mapping[str, Any], size_of: Callable[[Any], tuple[int, int] | None] = image_size) -> Load:
    width, height = _int(body, "width", DEFAULT_SIDE), _int(body, "height", DEFAULT_SIDE)
    batch, n_iter = max(_int(body, "batch_size", 1), 1), max(_int(body, "n_iter", 1), 1)
    images = body.get("init_images")
    images = images if isinstance(images, list) else []
    if len(images) > 1:  # several init images make the batch (the WebUI refuses more than batch_size)
        batch = min(len(images), batch)
    denoising = min(max(_float(body, "denoising_strength", DEFAULT_DENOISING), 0.0), 1.0)
    steps = max(1, int(_int(body, "steps", DEFAULT_STEPS) * denoising))
    passes = [Pass("img2img", f"{width}x{height}", width, height, batch, steps)]
    inpaint_full_res = body.get("inpaint_full_res")
    cropped = bool(body.get("mask")) and (inpaint_full_res is None or _flag(inpaint_full_res))
    if _int(body, "resize_mode", 0) == LATENT_UPSCALE and not cropped:
        sizes = [s for s in map(size_of, images) if s is not None]
        if sizes:
            w, h = max(sizes, key=lambda s: s[0] * s[1])
            how = f"resize_mode 3 encodes the init image at its own {w}x{h}"
            passes.append(Pass("init image", how, w, h, batch, 0))
    return Load(tuple(passes), n_iter)


def request_load(path: str, body: Mapping[str, Any]) -> Load:
    """The load of a txt2img or img2img body (by the WebUI path it goes to)."""
    return img2img_load(body) if path.endswith("/img2img") else txt2img_load(body)


# ---------------------------------------------------------------------------------------------
# Extras and interrogate: work units only


def extras_size(width: int, height: int, body: Mapping[str, Any]) -> tuple[int, int]:
    """The output size of an extras upscale of a width x height image (the input size with upscaler "None")."""
    if str(body.get("upscaler_1", "None")) == "None":
        return width, height
    if _int(body, "resize_mode", 0) == 1:
        to_w, to_h = _int(body, "upscaling_resize_w", 512), _int(body, "upscaling_resize_h", 512)
        if _flag(body.get("upscaling_crop", True)):
            return to_w, to_h
        scale = max(to_w / max(width, 1), to_h / max(height, 1))
    else:
        scale = _float(body, "upscaling_resize", 2.0)
    return int((width * scale) // 8 * 8), int((height * scale) // 8 * 8)


def extras_units(body: Mapping[str, Any], size_of: Callable[[Any], tuple[int, int] | None] = image_size) -> float:
    """Work units of extra-single-image (`image`) or extra-batch-images (`imageList`): upscaled pixels, plus
    face restoration per image. An image whose size cannot be read counts as 512x512."""
    images: list[Any]
    if isinstance(body.get("imageList"), list):
        images = [item.get("data") if isinstance(item, Mapping) else None for item in body["imageList"]]
    else:
        images = [body.get("image")]
    upscaler = str(body.get("upscaler_1", "None"))
    per_tile = RESAMPLE_UNITS_PER_TILE if upscaler in CPU_UPSCALERS else EXTRAS_UNITS_PER_TILE
    faces = FACE_RESTORE_UNITS * sum(
        _float(body, key, 0.0) > 0 for key in ("gfpgan_visibility", "codeformer_visibility")
    )
    units = 0.0
    for encoded in images:
        width, height = size_of(encoded) or (DEFAULT_SIDE, DEFAULT_SIDE)
        if upscaler != "None":
            out_w, out_h = extras_size(width, height, body)
            units += out_w * out_h / TILE_PIXELS * per_tile
        units += faces
    return max(units, 0.01)


def interrogate_units(body: Mapping[str, Any]) -> float:
    return INTERROGATE_UNITS.get(str(body.get("model", "clip")), INTERROGATE_UNITS["deepdanbooru"])


# ---------------------------------------------------------------------------------------------
# Advice


def _floor8(x: float) -> int:
    return max(64, int(x) // 8 * 8)


def _fitting_size(width: int, height: int, pixels: int) -> tuple[int, int]:
    """width x height scaled down (multiples of 8) to hold at most `pixels`."""
    scale = math.sqrt(pixels / max(width * height, 1))
    w, h = _floor8(width * scale), _floor8(height * scale)
    while w * h > pixels and min(w, h) > 64:
        w, h = _floor8(w - 8), _floor8(h * (w - 8) / w)
    return w, h


def _extras_tip(from_w: int, from_h: int, to_w: int, to_h: int) -> str:
    scale = max(to_w / max(from_w, 1), to_h / max(from_h, 1))
    resize = math.ceil(scale * 100) / 100
    twice = f" (at most {EXTRAS_MAX_SCALE} per call: upscale the result again)" if resize > EXTRAS_MAX_SCALE else ""
    return (
        f"then upscale {from_w}x{from_h} to {to_w}x{to_h} with POST /sdapi/v1/extra-single-image "
        f'(upscaler_1 "{TILED_UPSCALER}", upscaling_resize {resize:g}{twice}): upscalers work in tiles, so their '
        "output is not bounded by GPU memory"
    )


def _hires_tips(load: Load, second: Pass, budget: int | None) -> list[str]:
    """A hires scale whose second pass fits one image in `budget`, then an extras upscale to the size asked for."""
    first = load.find("first pass") or second
    target_w, target_h = second.width, second.height
    if budget is None:
        return [f"a smaller hr_scale, {_extras_tip(first.width, first.height, target_w, target_h)}"]
    steps = math.floor(math.sqrt(budget / max(first.width * first.height, 1)) / HR_SCALE_STEP)  # in slider steps
    while (
        steps * HR_SCALE_STEP > 1
        and int(first.width * steps * HR_SCALE_STEP) * int(first.height * steps * HR_SCALE_STEP) > budget
    ):
        steps -= 1
    scale = round(steps * HR_SCALE_STEP, 2)
    if scale <= 1:  # not even a small hires pass fits: the first pass alone, smaller if need be
        fit_w, fit_h = (first.width, first.height)
        if fit_w * fit_h > budget:
            fit_w, fit_h = _fitting_size(first.width, first.height, budget)
        return [f"no hires fix at {fit_w}x{fit_h}, {_extras_tip(fit_w, fit_h, target_w, target_h)}"]
    fit_w, fit_h = int(first.width * scale), int(first.height * scale)
    return [f"hr_scale {scale:g} ({fit_w}x{fit_h}), {_extras_tip(fit_w, fit_h, target_w, target_h)}"]


def describe(
    load: Load,
    budget: int | None,
    *,
    what: str = "CUDA out of memory",
    where: str = "this instance",
    larger: Sequence[tuple[str, int]] = (),
) -> str:
    """What the request holds at its peak, the budget, and ways that fit: fewer images at once, a smaller hires
    scale or size with an extras upscale after it, resize_mode 0 for a large init image, or a larger GPU the
    fleet has (`larger`: (label, pixel budget for this model) of GPUs larger than `budget`)."""
    budget = budget or None  # 0: unknown, as None
    peak = load.peak
    text = f"{what}: {peak.describe()}"
    if budget:
        text += f", {where} handles about {budget:,}"
    tips: list[str] = []
    per_image = peak.width * peak.height
    if peak.batch > 1:
        fits = max(1, min(peak.batch - 1, (budget or 0) // max(per_image, 1)))
        images = peak.batch * load.n_iter
        tips.append(f"lower batch_size to {fits} and raise n_iter to {math.ceil(images / fits)} for as many images")
    too_big = budget is None or per_image > budget
    if too_big and peak.label == "hires fix":
        tips += _hires_tips(load, peak, budget)
    elif too_big and peak.label == "init image":
        tips.append(
            "resize_mode 0, 1 or 2 (the init image is then resized to width x height before it is encoded), or a "
            "smaller init image"
            + (" of at most {}x{}".format(*_fitting_size(peak.width, peak.height, budget)) if budget else "")
        )
    elif too_big:
        fit_w, fit_h = (
            _fitting_size(peak.width, peak.height, budget)
            if budget
            else (_floor8(peak.width / 2), _floor8(peak.height / 2))
        )
        if (fit_w, fit_h) != (peak.width, peak.height):
            tips.append(
                f"use a smaller size such as {fit_w}x{fit_h}, {_extras_tip(fit_w, fit_h, peak.width, peak.height)}"
            )
    for label, pixels in sorted(larger, key=lambda item: item[1]):
        if pixels >= peak.pixels:
            tips.append(f"an instance of this model on a larger GPU ({label}: about {pixels:,} pixels)")
            break
    return text + ("; try: " + "; or ".join(tips) if tips else "") + "."
