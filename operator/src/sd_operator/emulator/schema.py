"""Request bodies of txt2img and img2img: A1111 v1.10.1's fields and defaults (modules/api/models.py, built
from StableDiffusionProcessingTxt2Img/Img2Img's __init__ parameters; recorded in
tests/fixtures/real/webui/api.json), validated as the WebUI's pydantic v1 models do: unknown keys ignored,
null taking the default where the WebUI's type allows it, and FastAPI's own 422 answer on a bad body."""

from __future__ import annotations

import json
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sd_operator.emulator.engine import ApiError
from sd_operator.emulator.images import MAX_SIDE

M = TypeVar("M", bound=BaseModel)


# The additional fields models.py declares without Optional and with a default other than None: the WebUI
# refuses null for them ("none is not an allowed value"); every other field takes null (then its default here).
NOT_NULLABLE = frozenset({"sampler_index", "script_args", "send_images", "save_images", "alwayson_scripts"})


class GenerationRequest(BaseModel):
    # Unknown fields are ignored, neither refused nor echoed back in `parameters`: pydantic v1's default
    # (Extra.ignore) in the WebUI's generated models. Numbers are taken for strings, as pydantic v1 does.
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)
    not_nullable: ClassVar[frozenset[str]] = NOT_NULLABLE

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=1000)
    steps: int = Field(50, ge=1, le=1000)
    cfg_scale: float = 7.0
    width: int = Field(512, ge=64, le=MAX_SIDE)
    height: int = Field(512, ge=64, le=MAX_SIDE)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _like_pydantic_v1(cls, data: Any) -> Any:
        """null means the default where the WebUI's field allows None; a float for an int field is truncated."""
        if not isinstance(data, dict):
            return data
        out = {}
        for key, value in data.items():
            field = cls.model_fields.get(key)
            if value is None and field is not None and key not in cls.not_nullable:
                continue
            truncate = isinstance(value, float) and field is not None and field.annotation in (int, int | None)
            out[key] = int(value) if truncate else value
        return out


class Txt2ImgRequest(GenerationRequest):
    denoising_strength: float | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = Field(2.0, gt=0, le=8)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(0, ge=0, le=1000)
    hr_resize_x: int = Field(0, ge=0, le=MAX_SIDE)
    hr_resize_y: int = Field(0, ge=0, le=MAX_SIDE)
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""

    def final_size(self) -> tuple[int, int]:
        """The output size: hires fix's target (A1111's hr_resize / hr_scale rules) or width x height."""
        if not self.enable_hr:
            return self.width, self.height
        x, y = self.hr_resize_x, self.hr_resize_y
        if x == 0 and y == 0:
            return int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        if y == 0:
            return x, x * self.height // self.width
        if x == 0:
            return y * self.width // self.height, y
        return x, y


class Img2ImgRequest(GenerationRequest):
    not_nullable: ClassVar[frozenset[str]] = NOT_NULLABLE | {"denoising_strength", "include_init_images"}

    init_images: list[str] | None = None
    mask: str | None = None
    denoising_strength: float = Field(0.75, ge=0, le=1)
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


# pydantic v2 error types -> pydantic v1's (type, message) as the WebUI's FastAPI 0.94 answers them.
_V1_ERRORS = {
    **dict.fromkeys(
        ("int_parsing", "int_type", "int_from_float"), ("type_error.integer", "value is not a valid integer")
    ),
    **dict.fromkeys(("float_parsing", "float_type"), ("type_error.float", "value is not a valid float")),
    **dict.fromkeys(("bool_parsing", "bool_type"), ("type_error.bool", "value could not be parsed to a boolean")),
    "string_type": ("type_error.str", "str type expected"),
    "list_type": ("type_error.list", "value is not a valid list"),
    **dict.fromkeys(
        ("dict_type", "model_type", "model_attributes_type"), ("type_error.dict", "value is not a valid dict")
    ),
    "missing": ("value_error.missing", "field required"),
}
_V1_LIMITS = {
    "greater_than_equal": ("ge", "value_error.number.not_ge", "ensure this value is greater than or equal to {}"),
    "greater_than": ("gt", "value_error.number.not_gt", "ensure this value is greater than {}"),
    "less_than_equal": ("le", "value_error.number.not_le", "ensure this value is less than or equal to {}"),
    "less_than": ("lt", "value_error.number.not_lt", "ensure this value is less than {}"),
}


class RequestValidationError(ApiError):
    """FastAPI's own 422 answer to a body that does not validate: `{"detail": [{loc, msg, type}, ...]}`, not
    the WebUI's {error, detail, body, errors} (FastAPI's handler for RequestValidationError comes first)."""

    def __init__(self, errors: list[dict[str, Any]], body: str) -> None:
        super().__init__(422, "RequestValidationError", errors, body=body, errors=json.dumps(errors))

    def payload(self) -> dict[str, Any]:
        return {"detail": self.detail}


def v1_errors(e: ValidationError) -> list[dict[str, Any]]:
    """A pydantic v2 ValidationError as pydantic v1 reports it, each `loc` under "body" as FastAPI puts it."""
    out: list[dict[str, Any]] = []
    for err in e.errors(include_url=False):
        loc = ["body", *err["loc"]]
        kind = err["type"]
        if err.get("input", ...) is None and kind != "missing":
            out.append({"loc": loc, "msg": "none is not an allowed value", "type": "type_error.none.not_allowed"})
        elif kind in _V1_ERRORS:
            out.append({"loc": loc, "type": _V1_ERRORS[kind][0], "msg": _V1_ERRORS[kind][1]})
        elif kind in _V1_LIMITS:
            key, v1_type, template = _V1_LIMITS[kind]
            limit = (err.get("ctx") or {}).get(key)
            out.append({"loc": loc, "msg": template.format(limit), "type": v1_type, "ctx": {"limit_value": limit}})
        else:
            out.append({"loc": loc, "msg": err["msg"], "type": "value_error"})
    return out


def parse(model: type[M], text: str) -> M:
    """The body as `model`; a 422 as the WebUI's FastAPI gives it when the body is empty, not JSON, or does
    not validate (unknown keys are not an error: they are ignored)."""
    if not text:
        raise RequestValidationError([{"loc": ["body"], "msg": "field required", "type": "value_error.missing"}], text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        ctx = {"msg": e.msg, "doc": e.doc[:2000], "pos": e.pos, "lineno": e.lineno, "colno": e.colno}
        raise RequestValidationError(
            [{"loc": ["body", e.pos], "msg": str(e), "type": "value_error.jsondecode", "ctx": ctx}], text[:2000]
        ) from e
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(v1_errors(e), text[:2000]) from e
