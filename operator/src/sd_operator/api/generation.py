"""txt2img parameters, LoRA and ControlNet units: the vocabulary of GenerationBatch and evaluations."""

from __future__ import annotations

from enum import StrEnum

from pydantic import ConfigDict, Field

from sd_operator.api.base import ApiModel, rule, validations


class ControlNetType(StrEnum):
    CANNY = "canny"
    OPENPOSE = "openpose"
    DEPTH = "depth"
    LINEART = "lineart"
    SOFTEDGE = "softedge"
    SCRIBBLE = "scribble"
    SEG = "seg"
    NORMAL = "normal"
    TILE = "tile"
    IP_ADAPTER = "ip-adapter"


class LoRAUse(ApiModel):
    """A LoRA applied to the prompt as <lora:name:weight>."""

    name: str = Field(description="LoRA name as the WebUI lists it (file name without extension).", min_length=1)
    weight: float = Field(1.0, description="Strength, -2 to 2 (usually 0.6 to 1.0).", ge=-2, le=2)


class ControlNetUnit(ApiModel):
    """One ControlNet unit (the extension's alwayson_scripts args)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule(
                "!has(self.guidanceStart) || !has(self.guidanceEnd) || self.guidanceStart <= self.guidanceEnd",
                "guidanceStart must be less than or equal to guidanceEnd",
                ".guidanceStart",
            ),
        )
    )

    type: ControlNetType = Field(description="Control type; chooses the preprocessor and recommended weight and CFG.")
    model: str | None = Field(None, description="ControlNet model name; default: the instance's model for the type.")
    module: str | None = Field(None, description="Preprocessor; default: the one for the type (none for ready maps).")
    image: str = Field(
        description="Control image: base64 data, or a file path relative to the batch's input volume.", min_length=1
    )
    weight: float | None = Field(None, description="Control weight 0-2; default: recommended for the type.", ge=0, le=2)
    guidance_start: float | None = Field(None, description="Fraction of steps where control starts (0-1).", ge=0, le=1)
    guidance_end: float | None = Field(None, description="Fraction of steps where control ends (0-1).", ge=0, le=1)
    control_mode: str | None = Field(
        None,
        description="Balanced, My prompt is more important, or ControlNet is more important.",
        json_schema_extra={"enum": ["Balanced", "My prompt is more important", "ControlNet is more important"]},
    )
    pixel_perfect: bool | None = Field(None, description="Let the extension pick the preprocessor resolution.")


class GenerationParams(ApiModel):
    """txt2img parameters. Unset values come from the preset, then from the services layer's defaults."""

    negative_prompt: str | None = Field(None, description="Negative prompt.", max_length=8192)
    width: int | None = Field(
        None, description="Width in pixels: a multiple of 8 within 64-2048.", ge=64, le=2048, multiple_of=8
    )
    height: int | None = Field(
        None, description="Height in pixels: a multiple of 8 within 64-2048.", ge=64, le=2048, multiple_of=8
    )
    steps: int | None = Field(None, description="Sampling steps, 1-150.", ge=1, le=150)
    cfg_scale: float | None = Field(None, description="Classifier-free guidance scale, 1-30.", ge=1, le=30)
    sampler: str | None = Field(None, description="Sampler name, e.g. DPM++ 2M.", max_length=100)
    scheduler: str | None = Field(None, description="Noise schedule, e.g. Karras.", max_length=100)
    seed: int | None = Field(
        None, description="Seed; -1 picks a random one (random seeds are never served from cache).", ge=-1
    )
    batch_size: int | None = Field(None, description="Images per request, 1-8.", ge=1, le=8)
    loras: list[LoRAUse] | None = Field(None, description="LoRAs applied to the prompt.", max_length=20)
    control_nets: list[ControlNetUnit] | None = Field(None, description="ControlNet units.", max_length=8)
