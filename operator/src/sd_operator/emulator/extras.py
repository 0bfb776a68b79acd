"""The WebUI's routes beside generation: extras (upscaling, face restoration), png-info, interrogate, the
checkpoint unload/reload calls, and the read-only catalogs of a stock v1.10.1 install.

What each does follows AUTOMATIC1111/stable-diffusion-webui: routes and bodies from modules/api/api.py
(@ 2fec947) and modules/api/models.py; extras from modules/postprocessing.py (@ 0365002),
scripts/postprocessing_upscale.py (@ 01c1a40) and modules/upscaler.py; png-info from modules/images.py
(read_info_from_image) and modules/infotext_utils.py (parse_generation_parameters, @ 0365002). Extras and
interrogate run under the queue lock and take time from the GPU profile (units of work as the gateway counts
them: gateway/budget.py); png-info takes neither, as in the WebUI. The upscalers only resize (no model runs),
face restoration leaves the pixels as they are, and a caption comes from the prompt the emulator wrote into
its PNGs.
"""

from __future__ import annotations

import base64
import binascii
import html
import io
import json
import math
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from aiohttp import web
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sd_operator.emulator.catalog import scripts_api
from sd_operator.emulator.engine import EMULATOR, ApiError, Emulator
from sd_operator.emulator.images import quote
from sd_operator.emulator.profiles import Family

M = TypeVar("M", bound=BaseModel)
STEPS_PER_UNIT = 20  # the gateway's work unit: a 512x512 image at 20 steps
TILE = 512 * 512
# Simulated time in sampling steps of one 512x512 image on the profile's card (gateway/budget.py: units x 20).
UPSCALE_STEPS_PER_TILE = 2.5  # a model upscaler, per 512x512 tile of its output
RESAMPLE_STEPS_PER_TILE = 0.05  # Lanczos / Nearest (CPU)
FACE_RESTORE_STEPS = 5.0  # GFPGAN or CodeFormer, per image
INTERROGATE_STEPS = {"clip": 40.0, "deepdanbooru": 10.0}
MAX_OUTPUT_SIDE = 16384  # the emulator holds every output in RAM: refuse what would not fit a test machine

# Upscalers a stock v1.10.1 install lists (sd_upscalers: None, Lanczos, Nearest, then the model upscalers
# with their default enabled models), as (name, scale). No weights are present, so model_name/model_path
# are null in GET /sdapi/v1/upscalers.
UPSCALERS: tuple[tuple[str, int], ...] = (
    ("None", 4),
    ("Lanczos", 4),
    ("Nearest", 4),
    ("DAT x2", 2),
    ("DAT x3", 3),
    ("DAT x4", 4),
    ("ESRGAN_4x", 4),
    ("LDSR", 4),
    ("R-ESRGAN 4x+", 4),
    ("R-ESRGAN 4x+ Anime6B", 4),
    ("ScuNET GAN", 4),
    ("ScuNET PSNR", 4),
    ("SwinIR 4x", 4),
)
UPSCALER_NAMES = frozenset(name for name, _ in UPSCALERS)
CPU_UPSCALERS = frozenset({"Lanczos", "Nearest"})
_RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download"
REALESRGAN_MODELS = (  # modules/realesrgan_model.py get_realesrgan_models
    ("R-ESRGAN General 4xV3", f"{_RELEASES}/v0.2.5.0/realesr-general-x4v3.pth", 4),
    ("R-ESRGAN General WDN 4xV3", f"{_RELEASES}/v0.2.5.0/realesr-general-wdn-x4v3.pth", 4),
    ("R-ESRGAN AnimeVideo", f"{_RELEASES}/v0.2.5.0/realesr-animevideov3.pth", 4),
    ("R-ESRGAN 4x+", f"{_RELEASES}/v0.1.0/RealESRGAN_x4plus.pth", 4),
    ("R-ESRGAN 4x+ Anime6B", f"{_RELEASES}/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth", 4),
    ("R-ESRGAN 2x+", f"{_RELEASES}/v0.2.1/RealESRGAN_x2plus.pth", 2),
)
LATENT_UPSCALE_MODES = (  # modules/shared.py latent_upscale_modes
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
)
FACE_RESTORERS = ("CodeFormer", "GFPGAN")
# images.IGNORED_INFO_KEYS: image.info entries png-info does not report.
IGNORED_INFO_KEYS = frozenset(
    {
        "jfif",
        "jfif_version",
        "jfif_unit",
        "jfif_density",
        "dpi",
        "exif",
        "loop",
        "background",
        "timestamp",
        "duration",
        "progressive",
        "progression",
        "icc_profile",
        "chromaticity",
        "photoshop",
    }
)


# ---------------------------------------------------------------------------------------------
# Request bodies (modules/api/models.py). Plain pydantic models in the WebUI: unknown fields are ignored.


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


Visibility = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class ExtrasRequest(_Body):
    resize_mode: Literal[0, 1] = 0
    show_extras_results: bool = True
    gfpgan_visibility: Visibility = 0
    codeformer_visibility: Visibility = 0
    codeformer_weight: Visibility = 0
    upscaling_resize: float = Field(2, ge=1, le=8)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: Visibility = 0
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasRequest):
    image: str = ""


class FileData(_Body):
    data: str
    name: str


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[FileData]  # the WebUI's own (camelCase) field name


class PNGInfoRequest(_Body):
    image: str


class InterrogateRequest(_Body):
    image: str = ""
    model: str = "clip"


def parse(model: type[M], text: str) -> M:
    """The body as `model`; 422 with the WebUI's error shape when it is not JSON or does not validate."""
    try:
        return model.model_validate_json(text or "{}")
    except ValidationError as e:
        detail = json.loads(e.json(include_url=False))
        raise ApiError(422, "RequestValidationError", detail, body=text[:2000], errors=str(e)) from e


def decode_image(encoded: str) -> Image.Image:
    """api.decode_base64_to_image: base64 or a data: URL. The emulator fetches no URLs: an http(s) address
    is answered as the WebUI answers one that gives no image."""
    if encoded.startswith(("http://", "https://")):
        raise ApiError(500, "HTTPException", "Invalid image url")
    if encoded.startswith("data:image/"):
        encoded = encoded.split(";")[1].split(",")[1] if ";" in encoded and "," in encoded else ""
    try:
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        image.load()  # text chunks after the image data are read too
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ApiError(500, "HTTPException", "Invalid encoded image") from e
    return image


# ---------------------------------------------------------------------------------------------
# png-info


def _user_comment(raw: bytes) -> str:
    """EXIF UserComment as piexif.helper.UserComment.load reads it (undefined prefixes: UTF-8, as the WebUI)."""
    codecs = {b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis", b"UNICODE\0": "utf_16_be"}
    codec = codecs.get(raw[:8])
    if codec is not None:
        try:
            return raw[8:].decode(codec)
        except UnicodeDecodeError:
            pass
    return raw.decode("utf8", errors="ignore")


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf8", errors="replace")
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def read_info(image: Image.Image) -> tuple[str | None, dict[str, Any]]:
    """images.read_info_from_image: the `parameters` text (or the EXIF UserComment of a JPEG/WebP, or a GIF's
    comment) and the image's other info entries, without the ones the WebUI ignores."""
    items = dict(image.info or {})
    geninfo = items.pop("parameters", None)
    if "exif" in items:
        raw = image.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD, UserComment
        comment = _user_comment(raw) if isinstance(raw, bytes) else ""
        if comment:
            geninfo = comment
    elif "comment" in items:
        comment = items["comment"]
        geninfo = comment.decode("utf8", errors="ignore") if isinstance(comment, bytes) else comment
    return geninfo, {str(k): _jsonable(v) for k, v in items.items() if k not in IGNORED_INFO_KEYS}


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)(?:-(\w+))?")
# (infotext default when absent) in the order parse_generation_parameters adds them
_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("Hires sampler", "Use same sampler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
)
_LATE_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0),
    ("Schedule min sigma", 0),
    ("Schedule rho", 0),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
)


def _unquote(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _old_first_pass(width: int, height: int) -> tuple[int, int]:
    """processing.old_hires_fix_first_pass_dimensions: about 512x512 pixels, sides rounded up to 64."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def _version(text: Any) -> tuple[int, int, int, int] | None:
    """infotext_versions.parse_version for the comparisons backcompat makes (v1.7.0-225 is 1.7.0 post 225)."""
    if not isinstance(text, str):
        return None
    trimmed = re.match(r"([^-]+-[^-]+)-.*", text)
    match = _VERSION.fullmatch(trimmed[1] if trimmed else text)
    if match is None:
        return None
    post = int(match[4]) if match[4] and match[4].isdigit() else 0
    return int(match[1]), int(match[2]), int(match[3]), post


def parse_generation_parameters(text: str) -> dict[str, Any]:
    """infotext_utils.parse_generation_parameters with the settings' defaults (no styles, nothing skipped)."""
    res: dict[str, Any] = {}
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt = negative = ""
    in_negative = False
    for raw_line in lines:
        line = raw_line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[16:].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for key, value in _PARAM.findall(last):
        if not value:  # the WebUI fails on it, reports it and goes on
            continue
        parsed = _unquote(value) if value[0] == '"' and value[-1] == '"' else value
        size = _IMAGE_SIZE.match(parsed) if isinstance(parsed, str) else None
        if size is not None:
            res[f"{key}-1"], res[f"{key}-2"] = size[1], size[2]
        else:
            res[key] = parsed
    return _with_defaults(res)


def _with_defaults(res: dict[str, Any]) -> dict[str, Any]:
    """What parse_generation_parameters adds after reading the fields: defaults for what an infotext leaves
    out, the old first-pass size turned into a hires resize, and infotext_versions.backcompat's flags."""
    res.setdefault("Clip skip", "1")
    if (hypernet := res.get("Hypernet")) is not None:
        res["Prompt"] += f"<hypernet:{hypernet}:{res.get('Hypernet strength', '1.0')}>"
    if "Hires resize-1" not in res:
        res["Hires resize-1"], res["Hires resize-2"] = 0, 0
    for key, default in _DEFAULTS:
        res.setdefault(key, default)
    first_w, first_h = res.get("First pass size-1"), res.get("First pass size-2")
    if first_w is not None and first_h is not None:  # restore_old_hires_fix_params
        width, height = int(res.get("Size-1", 512)), int(res.get("Size-2", 512))
        fw, fh = int(first_w), int(first_h)
        if fw == 0 or fh == 0:
            fw, fh = _old_first_pass(width, height)
        res["Size-1"], res["Size-2"], res["Hires resize-1"], res["Hires resize-2"] = fw, fh, width, height
    for key, default in _LATE_DEFAULTS:
        res.setdefault(key, default)
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False
    version = _version(res.get("Version"))  # infotext_versions.backcompat
    if version is not None:
        if version < (1, 6, 0, 0) and "[" in res.get("Prompt", ""):
            res["Old prompt editing timelines"] = True
        if version < (1, 6, 0, 0) and res.get("Sampler", "") in ("DDIM", "PLMS"):
            res["Pad conds v0"] = True
        if version < (1, 7, 0, 225):
            res["Downcast alphas_cumprod"] = True
        if version < (1, 8, 0, 0) and res.get("Refiner"):
            res["Refiner switch by sampling steps"] = True
    return res


# ---------------------------------------------------------------------------------------------
# Extras


def _find_upscaler(name: str) -> str | None:
    """The upscaler of that name, None for "None"; the WebUI's assertion (a 500) for one it does not have."""
    if name == "None":
        return None
    if name not in UPSCALER_NAMES:
        raise ApiError(500, "AssertionError", "", errors=f"could not find upscaler named {name}")
    return name


def _resize(image: Image.Image, upscaler: str, size: tuple[int, int]) -> Image.Image:
    if max(size) > MAX_OUTPUT_SIDE:
        message = f"{size[0]}x{size[1]} is beyond what the emulator holds in RAM (sides up to {MAX_OUTPUT_SIDE})"
        raise ApiError(500, "MemoryError", "", errors=message)
    method = Image.Resampling.NEAREST if upscaler == "Nearest" else Image.Resampling.LANCZOS
    return image.resize(size, method)


def upscale_plan(width: int, height: int, req: ExtrasRequest) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(the upscaler's output size, the crop canvas or None), as ScriptPostprocessingUpscale.upscale and
    Upscaler.upscale compute them: int(side * scale) // 8 * 8, then centred on a canvas of the asked size."""
    if req.resize_mode == 1:
        scale = max(req.upscaling_resize_w / width, req.upscaling_resize_h / height)
    else:
        scale = req.upscaling_resize
    size = (int((width * scale) // 8 * 8), int((height * scale) // 8 * 8))
    canvas = (req.upscaling_resize_w, req.upscaling_resize_h) if req.resize_mode == 1 and req.upscaling_crop else None
    return size, canvas


def postprocess(image: Image.Image, req: ExtrasRequest) -> tuple[Image.Image, str]:
    """run_postprocessing for one image: upscale (order 1000), GFPGAN (2000), CodeFormer (3000); the result
    carries the image's own info and `postprocessing` (the infotext, also returned)."""
    parameters, existing = read_info(image)
    if parameters:
        existing["parameters"] = parameters
    out = image.convert("RGB")
    info: dict[str, Any] = {}
    first, second = _find_upscaler(req.upscaler_1), _find_upscaler(req.upscaler_2)
    if first is not None:
        size, canvas = upscale_plan(out.width, out.height, req)
        upscaled = _resize(out, first, size)
        if req.resize_mode == 1:
            info["Postprocess upscale to"] = f"{req.upscaling_resize_w}x{req.upscaling_resize_h}"
        else:
            info["Postprocess upscale by"] = req.upscaling_resize
        if canvas is not None:
            cropped = Image.new("RGB", canvas)
            cropped.paste(upscaled, (canvas[0] // 2 - upscaled.width // 2, canvas[1] // 2 - upscaled.height // 2))
            upscaled = cropped
            info["Postprocess crop to"] = f"{canvas[0]}x{canvas[1]}"
        info["Postprocess upscaler"] = first
        if second is not None and req.extras_upscaler_2_visibility > 0:
            other = _resize(out, second, size)
            if canvas is not None:
                blank = Image.new("RGB", canvas)
                blank.paste(other, (canvas[0] // 2 - other.width // 2, canvas[1] // 2 - other.height // 2))
                other = blank
            upscaled = Image.blend(upscaled, other, req.extras_upscaler_2_visibility)
            info["Postprocess upscaler 2"] = second
        out = upscaled
    if req.gfpgan_visibility > 0:
        info["GFPGAN visibility"] = round(req.gfpgan_visibility, 3)
    if req.codeformer_visibility > 0:
        info["CodeFormer visibility"] = round(req.codeformer_visibility, 3)
        info["CodeFormer weight"] = round(req.codeformer_weight, 3)
    text = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in info.items() if v is not None)
    out.info.clear()
    out.info.update(existing)
    out.info["postprocessing"] = text
    return out, text


def encode_png(image: Image.Image) -> str:
    """api.encode_pil_to_base64 for samples_format png: the string info entries become text chunks."""
    meta = PngInfo()
    for key, value in image.info.items():
        if isinstance(key, str) and isinstance(value, str):
            meta.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, "PNG", pnginfo=meta, compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def plaintext_to_html(text: str) -> str:
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def _seconds(emu: Emulator, steps: float) -> float:
    """Simulated seconds of `steps` sampling steps of a 512x512 image on the profile's card (upscalers and
    interrogators do not depend on the checkpoint's family: SD 1.5 speed)."""
    return steps * emu.config.profile.seconds_per_step(Family.SD15) * emu.config.speed


def extras_seconds(emu: Emulator, req: ExtrasRequest, width: int, height: int) -> float:
    steps = FACE_RESTORE_STEPS * ((req.gfpgan_visibility > 0) + (req.codeformer_visibility > 0))
    if req.upscaler_1 != "None":
        size, _ = upscale_plan(width, height, req)
        per_tile = RESAMPLE_STEPS_PER_TILE if req.upscaler_1 in CPU_UPSCALERS else UPSCALE_STEPS_PER_TILE
        steps += size[0] * size[1] / TILE * per_tile
    return _seconds(emu, steps)


async def _extras(emu: Emulator, req: ExtrasRequest, images: list[Image.Image]) -> tuple[list[str], str]:
    for name in (req.upscaler_1, req.upscaler_2):
        _find_upscaler(name)  # refused before the lock, as the WebUI's assertion fails before any work
    durations = [extras_seconds(emu, req, image.width, image.height) for image in images]

    def work(done: int) -> tuple[list[str], str]:
        encoded, text = [], ""
        for image in images[:done]:
            out, text = postprocess(image, req)
            encoded.append(encode_png(out))
        return encoded, plaintext_to_html(text)

    return await emu.exclusive("extras", durations, work)


async def extra_single_image(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR]
    req = parse(ExtrasSingleImageRequest, await request.text())
    images, html_info = await _extras(emu, req, [decode_image(req.image)])
    if not images:  # interrupted before the one image
        raise ApiError(500, "IndexError", "", errors="list index out of range")
    return web.json_response({"html_info": html_info, "image": images[0]})


async def extra_batch_images(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR]
    req = parse(ExtrasBatchImagesRequest, await request.text())
    images, html_info = await _extras(emu, req, [decode_image(item.data) for item in req.imageList])
    return web.json_response({"html_info": html_info, "images": images})


async def png_info(request: web.Request) -> web.Response:
    """No queue lock and no GPU, as in the WebUI: answered even while a generation runs."""
    req = parse(PNGInfoRequest, await request.text())
    geninfo, items = read_info(decode_image(req.image.strip()))
    geninfo = geninfo or ""
    return web.json_response({"info": geninfo, "items": items, "parameters": parse_generation_parameters(geninfo)})


def caption(image: Image.Image, model: str) -> str:
    """A caption from the prompt the emulator wrote into its own PNGs (LoRA tags left out), else a description
    of the mosaic: `a picture of ...` for clip, comma-separated tags for deepdanbooru."""
    prompt = str(image.info.get("sd-emulator-prompt") or "")
    subject = re.sub(r"<[^>]*>", "", prompt).strip(" ,") or "a mosaic of coloured squares"
    if model == "clip":
        return f"a picture of {subject}"
    tags = [t.strip().lower() for t in subject.split(",") if t.strip()]
    return ", ".join(dict.fromkeys([*tags, "no humans" if not prompt else "realistic"]))


async def interrogate(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR]
    req = parse(InterrogateRequest, await request.text())
    image = decode_image(req.image)
    if req.model not in INTERROGATE_STEPS:
        raise ApiError(404, "HTTPException", "Model not found")
    text = caption(image, req.model)
    job = "interrogate" if req.model == "clip" else ""
    result = await emu.exclusive(
        job, [_seconds(emu, INTERROGATE_STEPS[req.model])], lambda _: text, interruptible=False
    )
    return web.json_response({"caption": result})


async def checkpoint_noop(_: web.Request) -> web.Response:
    """unload-checkpoint / reload-checkpoint answer {} without the queue lock, as in the WebUI; the emulated
    weights take no memory to move (the gateway refuses both: instances keep their one model loaded)."""
    return web.json_response({})


def _json(data: Any) -> Callable[[web.Request], Any]:
    async def handler(_: web.Request) -> web.Response:
        return web.json_response(data)

    return handler


def upscalers_api() -> list[dict[str, Any]]:
    return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": s} for n, s in UPSCALERS]


def script_info_api() -> list[dict[str, Any]]:
    """GET /sdapi/v1/script-info: the always-on scripts of txt2img then img2img (their UI arguments not listed)."""
    return [
        {"name": name, "is_alwayson": True, "is_img2img": tab == "img2img", "args": []}
        for tab, names in scripts_api().items()
        for name in names
    ]


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/sdapi/v1/extra-single-image", extra_single_image)
    r.add_post("/sdapi/v1/extra-batch-images", extra_batch_images)
    r.add_post("/sdapi/v1/png-info", png_info)
    r.add_post("/sdapi/v1/interrogate", interrogate)
    r.add_post("/sdapi/v1/unload-checkpoint", checkpoint_noop)
    r.add_post("/sdapi/v1/reload-checkpoint", checkpoint_noop)
    r.add_get("/sdapi/v1/upscalers", _json(upscalers_api()))
    r.add_get("/sdapi/v1/latent-upscale-modes", _json([{"name": n} for n in LATENT_UPSCALE_MODES]))
    r.add_get("/sdapi/v1/face-restorers", _json([{"name": n, "cmd_dir": None} for n in FACE_RESTORERS]))
    r.add_get(
        "/sdapi/v1/realesrgan-models",
        _json([{"name": n, "path": p, "scale": s} for n, p, s in REALESRGAN_MODELS]),
    )
    r.add_get("/sdapi/v1/prompt-styles", _json([]))  # no styles.csv
    r.add_get("/sdapi/v1/hypernetworks", _json([]))  # none in the emulator's folders
    r.add_get("/sdapi/v1/script-info", _json(script_info_api()))
    # The image checks ControlNet out at a pinned commit (a detached HEAD): the WebUI reads no branch, drops the
    # remote and lists only extensions with one (modules/extensions.py do_read_info_from_repo): none.
    r.add_get("/sdapi/v1/extensions", _json([]))
