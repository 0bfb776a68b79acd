"""Request bodies of txt2img and img2img: A1111's fields and defaults (modules/api/models.py)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sd_operator.emulator.engine import ApiError
from sd_operator.emulator.images import MAX_SIDE

M = TypeVar("M", bound=BaseModel)


class GenerationRequest(BaseModel):
    # Unknown fields are kept and echoed back in `parameters`, as A1111's generated models do.
    model_config = ConfigDict(extra="allow")

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
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


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
    init_images: list[str] | None = None
    mask: str | None = None
    denoising_strength: float = Field(0.75, ge=0, le=1)
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask_blur: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


def parse(model: type[M], text: str) -> M:
    """The body as `model`; 422 with A1111's error shape when it is not JSON or does not validate."""
    try:
        return model.model_validate_json(text or "{}")
    except ValidationError as e:
        detail = json.loads(e.json(include_url=False))
        raise ApiError(422, "RequestValidationError", detail, body=text[:2000], errors=str(e)) from e
