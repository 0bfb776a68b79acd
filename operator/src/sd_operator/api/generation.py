"""txt2img parameters, LoRA and ControlNet units: the vocabulary of GenerationBatch and evaluations."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from sd_operator.api.base import ApiModel, rule, validations

# ---------------------------------------------------------------------------------------------
# The ControlNet extension the WebUI image pins (Mikubill/sd-webui-controlnet 56cec5b2, v1.1.455), as recorded
# in tests/fixtures/real/controlnet/ and held against it by tests/unit/test_real_controlnet.py.

# A1111 copies `alwayson_scripts.controlnet.args` into the extension's unit slots, one per unit the
# `control_net_unit_count` setting makes (3 unless changed, and the operator does not change it); it drops the
# units past the last slot without a word, so more than this many are refused here instead.
CONTROLNET_UNIT_SLOTS = 3
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")


@dataclass(frozen=True)
class PreprocessorSlider:
    """A preprocessor parameter; the extension replaces a unit's value outside [minimum, maximum] by `value`."""

    label: str
    minimum: float
    maximum: float
    value: float
    step: float = 0.01
    visible: bool = True  # hidden: the preprocessor does not use the parameter

    def api_json(self) -> dict[str, Any]:
        """As `/controlnet/module_list` describes it in module_detail."""
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}


_S = PreprocessorSlider
_HIDDEN = _S("EMPTY_LABEL", 0.0, 1.0, 0.5, visible=False)
# Every preprocessor without its own keeps this one (the legacy ones too: their table's resolution is not used).
_RESOLUTION = _S("Resolution", 64, 2048, 512, 8)


def _hidden(value: float) -> PreprocessorSlider:
    return replace(_HIDDEN, value=value)


@dataclass(frozen=True)
class ControlNetPreprocessor:
    """A preprocessor ("module") of the extension: `name` and its UI `label` both select it in a unit."""

    name: str
    label: str = ""  # "" means the same as name
    tags: tuple[str, ...] = ()
    resolution: PreprocessorSlider = _RESOLUTION  # bounds processor_res
    slider_1: PreprocessorSlider = _HIDDEN  # bounds threshold_a
    slider_2: PreprocessorSlider = _HIDDEN  # bounds threshold_b
    priority: int = 0  # module_list order: higher first
    model_free: bool = False
    returns_image: bool = True
    accepts_mask: bool = False
    requires_mask: bool = False
    sliders: Mapping[str, PreprocessorSlider] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self.label or self.name)
        bounds = {"processor_res": self.resolution, "threshold_a": self.slider_1, "threshold_b": self.slider_2}
        object.__setattr__(self, "sliders", bounds)


_P = ControlNetPreprocessor
CONTROLNET_PREPROCESSORS: tuple[ControlNetPreprocessor, ...] = (
    _P("none", tags=("InstructP2P",), priority=10),
    _P(
        "canny",
        tags=("Canny",),
        slider_1=_S("Low Threshold", 1, 255, 100, 1),
        slider_2=_S("High Threshold", 1, 255, 200, 1),
        priority=100,
    ),
    _P(
        "invert",
        label="invert (from white bg & black line)",
        tags=(
            "Canny",
            "Lineart",
            "Scribble",
            "MLSD",
        ),
        resolution=_HIDDEN,
        priority=20,
    ),
    _P("blur_gaussian", tags=("Tile",), slider_1=_S("Sigma", 0.01, 64.0, 9.0)),
    _P(
        "scribble_xdog",
        tags=(
            "Scribble",
            "SparseCtrl",
        ),
        slider_1=_S("XDoG Threshold", 1, 64, 32),
    ),
    _P("shuffle", tags=("Shuffle",), resolution=_hidden(512)),
    _P(
        "inpaint",
        label="inpaint_global_harmonious",
        tags=("Inpaint",),
        resolution=_HIDDEN,
        accepts_mask=True,
        requires_mask=True,
    ),
    _P("inpaint_only", tags=("Inpaint",), resolution=_HIDDEN, priority=100, accepts_mask=True, requires_mask=True),
    _P("inpaint_only+lama", tags=("Inpaint",), resolution=_HIDDEN, accepts_mask=True, requires_mask=True),
    _P("ip-adapter-auto", tags=("IP-Adapter",), priority=1000, returns_image=False),
    _P("mobile_sam", tags=("Segmentation",)),
    _P(
        "normal_dsine", tags=("NormalMap",), slider_1=_S("Fov", 0, 360, 60, 0.1), slider_2=_S("Iterations", 1, 20, 5, 1)
    ),
    _P("facexlib", tags=(), resolution=_HIDDEN),
    _P("ip-adapter_pulid", tags=("IP-Adapter",), resolution=_HIDDEN, returns_image=False),
    _P("softedge_teed", tags=("SoftEdge",), slider_1=_S("Safe Steps", 0, 10, 2, 1)),
    _P(
        "softedge_anyline",
        tags=("SoftEdge",),
        resolution=_S("Resolution", 64, 2048, 1280, 8),
        slider_1=_S("Safe Steps", 0, 10, 2, 1),
    ),
    _P("animal_openpose", tags=("OpenPose",)),
    _P("densepose", label="densepose (pruple bg & purple torso)", tags=("OpenPose",)),
    _P("densepose_parula", label="densepose_parula (black bg & blue torso)", tags=("OpenPose",)),
    _P("depth_anything", tags=("Depth",)),
    _P("depth_anything_v2", tags=("Depth",)),
    _P("depth_hand_refiner", tags=("Depth",)),
    _P(
        "depth_leres",
        tags=("Depth",),
        slider_1=_S("Remove Near %", 0, 100, 0, 0.1),
        slider_2=_S("Remove Background %", 0, 100, 0, 0.1),
    ),
    _P(
        "depth_leres++",
        tags=("Depth",),
        slider_1=_S("Remove Near %", 0, 100, 0, 0.1),
        slider_2=_S("Remove Background %", 0, 100, 0, 0.1),
    ),
    _P("depth", label="depth_midas", tags=("Depth",), priority=100),
    _P("depth_zoe", tags=("Depth",)),
    _P("dw_openpose_full", tags=("OpenPose",)),
    _P("instant_id_face_embedding", tags=("Instant-ID",), returns_image=False),
    _P("instant_id_face_keypoints", tags=("Instant-ID",)),
    _P(
        "ip-adapter_clip_sd15",
        label="ip-adapter_clip_h",
        tags=("IP-Adapter",),
        priority=100,
        returns_image=False,
        accepts_mask=True,
    ),
    _P("ip-adapter_clip_sdxl", label="ip-adapter_clip_g", tags=("IP-Adapter",), returns_image=False, accepts_mask=True),
    _P("ip-adapter_clip_sdxl_plus_vith", tags=("IP-Adapter",), returns_image=False, accepts_mask=True),
    _P("ip-adapter_face_id", tags=("IP-Adapter",), returns_image=False),
    _P("ip-adapter_face_id_plus", tags=("IP-Adapter",), returns_image=False),
    _P("lineart_anime", tags=("Lineart",)),
    _P("lineart_anime_denoise", tags=("Lineart",)),
    _P("lineart_coarse", tags=("Lineart",)),
    _P("lineart", label="lineart_realistic", tags=("Lineart",)),
    _P("lineart_standard", label="lineart_standard (from white bg & black line)", tags=("Lineart",), priority=100),
    _P(
        "mediapipe_face",
        tags=(),
        slider_1=_S("Max Faces", 1, 10, 1, 1),
        slider_2=_S("Min Face Confidence", 0.01, 1.0, 0.5),
    ),
    _P(
        "mlsd",
        tags=("MLSD",),
        slider_1=_S("MLSD Value Threshold", 0.01, 2.0, 0.1),
        slider_2=_S("MLSD Distance Threshold", 0.01, 20.0, 0.1),
        priority=100,
    ),
    _P("normal_bae", tags=("NormalMap",), priority=100),
    _P(
        "normal_map",
        label="normal_midas",
        tags=("NormalMap",),
        slider_1=_S("Normal Background Threshold", 0.0, 1.0, 0.4),
    ),
    _P("openpose", tags=("OpenPose",)),
    _P("openpose_face", tags=("OpenPose",)),
    _P("openpose_faceonly", tags=("OpenPose",)),
    _P("openpose_full", tags=("OpenPose",), priority=100),
    _P("openpose_hand", tags=("OpenPose",)),
    _P("recolor_intensity", tags=("Recolor",), slider_1=_S("Gamma Correction", 0.1, 2.0, 1.0, 0.001)),
    _P("recolor_luminance", tags=("Recolor",), slider_1=_S("Gamma Correction", 0.1, 2.0, 1.0, 0.001), priority=100),
    _P(
        "reference_adain",
        tags=("Reference",),
        slider_1=_S("Style Fidelity (only for Balanced mode)", 0.0, 1.0, 0.5),
        model_free=True,
    ),
    _P(
        "reference_adain+attn",
        tags=("Reference",),
        slider_1=_S("Style Fidelity (only for Balanced mode)", 0.0, 1.0, 0.5),
        model_free=True,
    ),
    _P(
        "reference_only",
        tags=("Reference",),
        slider_1=_S("Style Fidelity (only for Balanced mode)", 0.0, 1.0, 0.5),
        priority=100,
        model_free=True,
    ),
    _P(
        "revision_clipvision",
        tags=("Revision",),
        slider_1=_S("Noise Augmentation", 0.0, 1.0, 0.0),
        priority=100,
        model_free=True,
        returns_image=False,
    ),
    _P(
        "revision_ignore_prompt",
        tags=("Revision",),
        slider_1=_S("Noise Augmentation", 0.0, 1.0, 0.0),
        model_free=True,
        returns_image=False,
    ),
    _P(
        "scribble_hed",
        tags=(
            "Scribble",
            "SparseCtrl",
        ),
    ),
    _P(
        "pidinet_scribble",
        label="scribble_pidinet",
        tags=(
            "Scribble",
            "SparseCtrl",
        ),
        priority=100,
    ),
    _P("anime_face_segment", label="seg_anime_face", tags=("Segmentation",)),
    _P("oneformer_ade20k", label="seg_ofade20k", tags=("Segmentation",), priority=100),
    _P("oneformer_coco", label="seg_ofcoco", tags=("Segmentation",)),
    _P("segmentation", label="seg_ufade20k", tags=("Segmentation",)),
    _P("hed", label="softedge_hed", tags=("SoftEdge",)),
    _P("hed_safe", label="softedge_hedsafe", tags=("SoftEdge",)),
    _P("pidinet", label="softedge_pidinet", tags=("SoftEdge",), priority=100),
    _P("pidinet_safe", label="softedge_pidisafe", tags=("SoftEdge",)),
    _P("color", label="t2ia_color_grid", tags=("T2I-Adapter",)),
    _P("pidinet_sketch", label="t2ia_sketch_pidi", tags=("T2I-Adapter",)),
    _P("clip_vision", label="t2ia_style_clipvision", tags=("T2I-Adapter",), returns_image=False),
    _P("threshold", tags=(), slider_1=_S("Binarization Threshold", 0, 255, 127)),
    _P("tile_colorfix", tags=("Tile",), slider_1=_S("Variation", 3.0, 32.0, 8.0, 1.0)),
    _P(
        "tile_colorfix+sharp",
        tags=("Tile",),
        slider_1=_S("Variation", 3.0, 32.0, 8.0, 1.0),
        slider_2=_S("Sharpness", 0.0, 2.0, 1.0),
    ),
    _P("tile_resample", tags=("Tile",), slider_1=_S("Down Sampling Rate", 1.0, 8.0, 1.0), priority=100),
)
_BY_LABEL = {p.label: p for p in CONTROLNET_PREPROCESSORS}
_BY_NAME = {p.name: p for p in CONTROLNET_PREPROCESSORS}
CONTROLNET_MODULES = frozenset(_BY_LABEL) | frozenset(_BY_NAME)


def find_preprocessor(module: str) -> ControlNetPreprocessor | None:
    """The preprocessor a unit's `module` selects: by label first, then by internal name, as the extension looks."""
    return _BY_LABEL.get(module) or _BY_NAME.get(module)


def _known_module(module: str) -> str:
    if find_preprocessor(module) is None:
        close = difflib.get_close_matches(module, sorted(CONTROLNET_MODULES), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise PydanticCustomError(
            "controlnet_module",
            "unknown ControlNet module {module}{hint}: the extension would skip every unit of the request; "
            "GET /controlnet/module_list lists the modules",
            {"module": repr(module), "hint": hint},
        )
    return module


ControlNetModule = Annotated[str, AfterValidator(_known_module)]


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
    module: ControlNetModule | None = Field(
        None,
        description="Preprocessor (module_list name or label); default: the one for the type (none for ready maps).",
    )
    image: str = Field(
        description="Control image: base64 data, or a file path relative to the batch's input volume.", min_length=1
    )
    weight: float | None = Field(None, description="Control weight 0-2; default: recommended for the type.", ge=0, le=2)
    guidance_start: float | None = Field(None, description="Fraction of steps where control starts (0-1).", ge=0, le=1)
    guidance_end: float | None = Field(None, description="Fraction of steps where control ends (0-1).", ge=0, le=1)
    control_mode: str | None = Field(
        None,
        description="Balanced, My prompt is more important, or ControlNet is more important.",
        json_schema_extra={"enum": list(CONTROL_MODES)},
    )
    resize_mode: str | None = Field(
        None,
        description="Just Resize, Crop and Resize (default) or Resize and Fill: how the control image meets the size.",
        json_schema_extra={"enum": list(RESIZE_MODES)},
    )
    pixel_perfect: bool | None = Field(
        None, description="Let the extension pick the preprocessor resolution; default: on unless processorRes is set."
    )
    processor_res: int | None = Field(
        None, description="Preprocessor resolution (-1: the module's default); needs pixelPerfect off.", ge=-1, le=2048
    )
    threshold_a: float | None = Field(None, description="The module's first parameter (e.g. canny's low threshold).")
    threshold_b: float | None = Field(None, description="The module's second parameter (e.g. canny's high threshold).")


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
    control_nets: list[ControlNetUnit] | None = Field(
        None,
        description=f"ControlNet units, at most {CONTROLNET_UNIT_SLOTS} (the WebUI's ControlNet unit slots).",
        max_length=CONTROLNET_UNIT_SLOTS,
    )
