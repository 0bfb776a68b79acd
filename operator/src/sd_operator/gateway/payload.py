"""From the convenience API (`POST /v1/generate`) to an AUTOMATIC1111 txt2img body, and cache keys for bodies.

Pure functions without I/O: the gateway decides routing, caching and retries around them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeGuard, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from sd_operator.api.generation import (
    CONTROLNET_UNIT_SLOTS,
    ControlNetModule,
    ControlNetType,
    find_preprocessor,
)
from sd_operator.gateway import budget
from sd_operator.gateway.presets import CfgScale, Dimension, Preset, Steps, bounded

DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 512
DEFAULT_STEPS = 20
DEFAULT_CFG = 7.0
DEFAULT_SAMPLER = "Euler a"
DEFAULT_LORA_WEIGHT = 0.8
# Keys that change how results are delivered or stored, never the pixels.
_DELIVERY_KEYS = frozenset({"send_images", "save_images", "do_not_save_samples", "do_not_save_grid", "force_task_id"})


@dataclass(frozen=True)
class ControlNetDefaults:
    """What works for a control type with SD 1.5 ControlNet 1.1 models; ranges are (low, high)."""

    module: str
    model: str
    weight: float = 1.0
    weight_range: tuple[float, float] | None = None
    cfg: float | None = None
    cfg_range: tuple[float, float] | None = None


_T = ControlNetType
# Keyed by the enum, whose members are strings, so RECOMMENDED["canny"] works too.
RECOMMENDED: Mapping[str, ControlNetDefaults] = {
    _T.CANNY: ControlNetDefaults("canny", "control_v11p_sd15_canny", 0.9, (0.8, 1.0), 6, (5, 7)),
    _T.OPENPOSE: ControlNetDefaults("openpose_full", "control_v11p_sd15_openpose", 0.9, (0.8, 1.0), 6, (5, 7)),
    _T.DEPTH: ControlNetDefaults("depth_midas", "control_v11f1p_sd15_depth", 0.7, (0.6, 0.8), 8, (7, 9)),
    _T.LINEART: ControlNetDefaults("lineart_realistic", "control_v11p_sd15_lineart", 0.9, (0.8, 1.0), 6, (5, 7)),
    _T.SOFTEDGE: ControlNetDefaults("softedge_pidinet", "control_v11p_sd15_softedge"),
    _T.SCRIBBLE: ControlNetDefaults("scribble_pidinet", "control_v11p_sd15_scribble"),
    _T.SEG: ControlNetDefaults("seg_ofade20k", "control_v11p_sd15_seg"),
    _T.NORMAL: ControlNetDefaults("normal_bae", "control_v11p_sd15_normalbae"),
    _T.TILE: ControlNetDefaults("tile_resample", "control_v11f1e_sd15_tile"),
    _T.IP_ADAPTER: ControlNetDefaults("ip-adapter_clip_sd15", "ip-adapter_sd15"),
}


def _lora_name(name: str) -> str:
    # ':', '<' and '>' would end the <lora:name:weight> tag early and let the name inject prompt syntax.
    if not name.strip() or any(c in name for c in ":<>"):
        raise PydanticCustomError(
            "lora_name", "must be a LoRA name without ':', '<' or '>' (got {name})", {"name": repr(name)}
        )
    return name


LoraName = Annotated[str, AfterValidator(_lora_name)]
LoraWeight = Annotated[float, bounded(-2, 2)]
Fraction = Annotated[float, bounded(0, 1)]


class _Body(BaseModel):
    # Unknown fields are refused so a typo ("cfg") is an error, not a silently ignored setting; `extra` is the hatch.
    model_config = ConfigDict(extra="forbid")


class LoraSpec(_Body):
    name: LoraName
    weight: LoraWeight = DEFAULT_LORA_WEIGHT


class ControlNetSpec(_Body):
    """One ControlNet unit; unset values come from RECOMMENDED for the type.

    The sd-webui-controlnet extension does not refuse a bad unit: it logs the error and generates without any
    ControlNet, or quietly replaces an out-of-range parameter by the module's default. So what it would drop or
    replace is refused here, with the rule, before a GPU spends time on it.
    """

    type: ControlNetType
    image: str = Field(min_length=1, description="Control image, base64 (a data: URL prefix is fine).")
    model: str | None = None
    module: ControlNetModule | None = None
    weight: Annotated[float, bounded(0, 2)] | None = None
    guidance_start: Fraction = 0.0
    guidance_end: Fraction = 1.0
    control_mode: Literal["Balanced", "My prompt is more important", "ControlNet is more important"] = "Balanced"
    resize_mode: Literal["Just Resize", "Crop and Resize", "Resize and Fill"] = "Crop and Resize"
    # Unset: on, unless processor_res is given (with pixel perfect the extension computes the resolution itself).
    pixel_perfect: bool | None = None
    processor_res: Annotated[int, bounded(-1, 2048)] | None = None
    threshold_a: float | None = None
    threshold_b: float | None = None
    # The extension appends each unit's detected map to the answer's images unless told not to.
    save_detected_map: bool = False

    @model_validator(mode="after")
    def _guidance_order(self) -> ControlNetSpec:
        if self.guidance_start > self.guidance_end:
            raise PydanticCustomError(
                "guidance_order",
                "guidance_start ({start}) must be less than or equal to guidance_end ({end})",
                {"start": self.guidance_start, "end": self.guidance_end},
            )
        return self

    @model_validator(mode="after")
    def _module_parameters(self) -> ControlNetSpec:
        if self.pixel_perfect and self.processor_res not in (None, -1):
            raise PydanticCustomError(
                "pixel_perfect_resolution",
                "processor_res ({res}) is not used with pixel_perfect: the extension computes the resolution; "
                "set pixel_perfect to false or leave processor_res out",
                {"res": self.processor_res},
            )
        module = self.effective_module()
        preprocessor = find_preprocessor(module)
        assert preprocessor is not None  # the module field and RECOMMENDED only hold known modules
        for key, slider in preprocessor.sliders.items():
            value = getattr(self, key)
            if value is None or value == -1:  # -1: the module's default, as the extension reads it
                continue
            if not slider.visible:
                raise PydanticCustomError(
                    "module_parameter",
                    "module {module} does not use {key}; leave it out",
                    {"module": module, "key": key},
                )
            if not slider.minimum <= value <= slider.maximum:
                raise PydanticCustomError(
                    "module_parameter",
                    "{key} for module {module} ({label}) must be from {low} to {high} (got {value}); "
                    "the extension would use {default} instead",
                    {
                        "key": key,
                        "module": module,
                        "label": slider.label,
                        "low": format_weight(slider.minimum),
                        "high": format_weight(slider.maximum),
                        "value": value,
                        "default": format_weight(slider.value),
                    },
                )
        return self

    def effective_module(self) -> str:
        return self.module or RECOMMENDED[self.type].module

    def effective_pixel_perfect(self) -> bool:
        return self.pixel_perfect if self.pixel_perfect is not None else self.processor_res in (None, -1)


class GenerateRequest(_Body):
    """Body of `POST /v1/generate`. Unset values come from the preset, then from the gateway's defaults."""

    prompt: str = Field(max_length=8192)
    negative_prompt: str | None = Field(None, max_length=8192)
    width: Dimension | None = None
    height: Dimension | None = None
    steps: Steps | None = None
    cfg_scale: CfgScale | None = None
    sampler_name: str | None = Field(None, max_length=100)
    scheduler: str | None = Field(None, max_length=100)
    seed: Annotated[int, bounded(-1, 2**32 - 1)] = -1
    batch_size: Annotated[int, bounded(1, 8)] = 1
    n_iter: Annotated[int, bounded(1, 16)] = 1
    model: str | None = Field(None, description="Checkpoint to route to; the gateway picks instances by it.")
    preset: str | None = None
    lora: LoraName | None = None
    lora_weight: LoraWeight = DEFAULT_LORA_WEIGHT
    loras: list[LoraSpec] = Field(default_factory=list, max_length=20)
    controlnet: ControlNetSpec | None = None
    controlnets: list[ControlNetSpec] = Field(default_factory=list, max_length=CONTROLNET_UNIT_SLOTS)
    enable_hr: bool = False
    hr_scale: Annotated[float, bounded(1, 4)] | None = None
    hr_upscaler: str | None = None
    denoising_strength: Fraction | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="Merged last into the WebUI body.")

    @model_validator(mode="after")
    def _no_checkpoint_switch(self) -> GenerateRequest:
        # Switching checkpoints in place stalls the instance and breaks routing by model.
        overrides = self.extra.get("override_settings")
        if isinstance(overrides, Mapping) and "sd_model_checkpoint" in overrides:
            raise PydanticCustomError("checkpoint_override", "extra must not set sd_model_checkpoint; use model")
        if len(self.control_units()) > CONTROLNET_UNIT_SLOTS:
            raise PydanticCustomError(
                "too_many_units",
                "at most {slots} ControlNet units (controlnet plus controlnets): the WebUI has {slots} unit slots "
                "and would drop the rest",
                {"slots": CONTROLNET_UNIT_SLOTS},
            )
        return self

    def lora_uses(self) -> list[LoraSpec]:
        single = [LoraSpec(name=self.lora, weight=self.lora_weight)] if self.lora else []
        return single + self.loras

    def control_units(self) -> list[ControlNetSpec]:
        return ([self.controlnet] if self.controlnet else []) + self.controlnets


_V = TypeVar("_V")


def _pick(default: _V, *candidates: _V | None) -> _V:
    """The first value that is set, in precedence order."""
    return next((c for c in candidates if c is not None), default)


def format_weight(weight: float) -> str:
    """0.8 -> "0.8", 1.0 -> "1", 0.125 -> "0.125": what people write in a <lora:...> tag."""
    text = f"{weight:.4f}".rstrip("0").rstrip(".")
    return "0" if text in {"-0", ""} else text


def _join_prompt(prefix: str, prompt: str, suffix: str) -> str:
    text = prompt.strip()
    if prefix:
        text = prefix + text.lstrip(", ")
    if suffix:
        text = text.rstrip(", ") + suffix
    # An empty prompt with a preset would otherwise leave a dangling ", " at either end.
    return text.strip(" ,") if prefix or suffix else text


def _with_loras(prompt: str, loras: Sequence[LoraSpec]) -> str:
    for lora in loras:
        if f"<lora:{lora.name}:" not in prompt:  # already in the prompt (or given twice): the first one counts
            tag = f"<lora:{lora.name}:{format_weight(lora.weight)}>"
            prompt = f"{prompt}, {tag}" if prompt else tag
    return prompt


def recommended_cfg(types: Sequence[ControlNetType | str]) -> float | None:
    """CFG for these control types: the midpoint of their common range, else the first type's; None if no advice."""
    advised = [RECOMMENDED[t] for t in types if RECOMMENDED[t].cfg_range is not None]
    if not advised:
        return None
    low = max(d.cfg_range[0] for d in advised if d.cfg_range)
    high = min(d.cfg_range[1] for d in advised if d.cfg_range)
    if len(advised) > 1 and low <= high:
        return (low + high) / 2
    return advised[0].cfg


def _unit(spec: ControlNetSpec, models: Mapping[str, str]) -> dict[str, Any]:
    advice = RECOMMENDED[spec.type]
    unit: dict[str, Any] = {
        "enabled": True,  # the extension's default is false: a unit without it is skipped
        "image": spec.image,
        "module": spec.effective_module(),
        "model": spec.model or models.get(spec.type) or advice.model,
        "weight": _pick(advice.weight, spec.weight),
        "resize_mode": spec.resize_mode,
        "guidance_start": spec.guidance_start,
        "guidance_end": spec.guidance_end,
        "control_mode": spec.control_mode,
        "pixel_perfect": spec.effective_pixel_perfect(),
        "save_detected_map": spec.save_detected_map,
    }
    # Unset, the extension's own defaults (-1: per-module) apply.
    for key in ("processor_res", "threshold_a", "threshold_b"):
        if getattr(spec, key) is not None:
            unit[key] = getattr(spec, key)
    return unit


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        old = out.get(key)
        out[key] = _merge(old, value) if isinstance(old, dict) and isinstance(value, Mapping) else value
    return out


def build_txt2img_payload(
    req: GenerateRequest, preset: Preset | None, controlnet_models: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The `/sdapi/v1/txt2img` body: request values, then the preset's, then ControlNet advice, then defaults.

    The negative prompt is the request's followed by the preset's, as A1111 applies a style's negative prompt.
    The model is not in the body: the gateway sends the request to an instance already serving it.
    """
    p = preset or Preset(name="none")
    units = req.control_units()
    negative = ", ".join(n.strip() for n in (req.negative_prompt or "", p.negative_prompt) if n.strip())
    body: dict[str, Any] = {
        "prompt": _with_loras(_join_prompt(p.prompt_prefix, req.prompt, p.prompt_suffix), req.lora_uses()),
        "negative_prompt": negative,
        "width": _pick(DEFAULT_WIDTH, req.width, p.width),
        "height": _pick(DEFAULT_HEIGHT, req.height, p.height),
        "steps": _pick(DEFAULT_STEPS, req.steps, p.steps),
        "cfg_scale": _pick(DEFAULT_CFG, req.cfg_scale, p.cfg_scale, recommended_cfg([u.type for u in units])),
        "sampler_name": _pick(DEFAULT_SAMPLER, req.sampler_name, p.sampler_name),
        "seed": req.seed,
        "batch_size": req.batch_size,
        "n_iter": req.n_iter,
        "send_images": True,
        "save_images": False,
    }
    if scheduler := _pick(None, req.scheduler, p.scheduler):
        body["scheduler"] = scheduler
    if req.enable_hr:
        body |= {
            "enable_hr": True,
            "hr_scale": _pick(2.0, req.hr_scale),
            "hr_upscaler": _pick("Latent", req.hr_upscaler),
            "denoising_strength": _pick(0.7, req.denoising_strength),
        }
    if units:
        body["alwayson_scripts"] = {"controlnet": {"args": [_unit(u, controlnet_models or {}) for u in units]}}
    return _merge(body, req.extra)


def describe_oom(width: int, height: int, batch_size: int, budget_pixels: int | None = None) -> str:
    """What to change after a CUDA out-of-memory answer for width x height x batch_size, with numbers the client
    can use as they are (budget.describe: requests with hires fix or init images have their own load)."""
    return budget.describe(budget.plain_load(width, height, batch_size), budget_pixels)


_AS_IS = frozenset({str, int, bool, type(None)})  # values _normalise returns unchanged (most of a body)


def _normalise(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): v if type(v) in _AS_IS else _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [v if type(v) in _AS_IS else _normalise(v) for v in value]
    if isinstance(value, float) and math.isfinite(value):
        value = float(f"{value:.12g}")  # 0.1 + 0.2 and 0.3 are the same setting
        return int(value) if value.is_integer() else value
    return value


_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # built once


def canonical_request(body: Mapping[str, Any]) -> str:
    """One string per distinct txt2img body (key order, 7 vs 7.0 and delivery options do not matter).

    The body carries no model name: a cache key must combine this with the model the request ran on.
    """
    kept = {k: v for k, v in body.items() if k not in _DELIVERY_KEYS}
    if kept.get("override_settings_restore_afterwards") is True:  # the default: settings are left unchanged
        del kept["override_settings_restore_afterwards"]
    return _CANONICAL_JSON.encode(_normalise(kept))


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def is_deterministic(body: Mapping[str, Any]) -> bool:
    """True when the same body gives the same images, so a cached result may be served."""
    seed, subseed = body.get("seed"), body.get("subseed")
    if not _is_int(seed) or seed < 0:
        return False
    if subseed is None or (_is_int(subseed) and subseed >= 0):
        return True
    return not body.get("subseed_strength")  # a random subseed only matters when it is mixed in
