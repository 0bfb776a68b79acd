"""Fixed lists the WebUI reports: samplers, schedulers, scripts, default settings, ControlNet modules."""

from __future__ import annotations

from typing import Any

# (name, aliases) as in A1111 1.9's modules/sd_samplers_kdiffusion.py, timesteps.py and lcm.
SAMPLERS: list[tuple[str, list[str]]] = [
    ("DPM++ 2M", ["k_dpmpp_2m"]),
    ("DPM++ SDE", ["k_dpmpp_sde"]),
    ("DPM++ 2M SDE", ["k_dpmpp_2m_sde"]),
    ("DPM++ 2M SDE Heun", ["k_dpmpp_2m_sde_heun"]),
    ("DPM++ 2S a", ["k_dpmpp_2s_a"]),
    ("DPM++ 3M SDE", ["k_dpmpp_3m_sde"]),
    ("Euler a", ["k_euler_a", "k_euler_ancestral"]),
    ("Euler", ["k_euler"]),
    ("LMS", ["k_lms"]),
    ("Heun", ["k_heun"]),
    ("DPM2", ["k_dpm_2"]),
    ("DPM2 a", ["k_dpm_2_a"]),
    ("DPM fast", ["k_dpm_fast"]),
    ("DPM adaptive", ["k_dpm_ad"]),
    ("Restart", ["restart"]),
    ("DDIM", ["ddim"]),
    ("DDIM CFG++", ["ddim_cfgpp"]),
    ("PLMS", ["plms"]),
    ("UniPC", ["unipc"]),
    ("LCM", ["k_lcm"]),
]
# (name, label)
SCHEDULERS: list[tuple[str, str]] = [
    ("automatic", "Automatic"),
    ("uniform", "Uniform"),
    ("karras", "Karras"),
    ("exponential", "Exponential"),
    ("polyexponential", "Polyexponential"),
    ("sgm_uniform", "SGM Uniform"),
    ("kl_optimal", "KL Optimal"),
    ("align_your_steps", "Align Your Steps"),
    ("simple", "Simple"),
    ("normal", "Normal"),
    ("ddim", "DDIM"),
    ("beta", "Beta"),
]

_SAMPLER_NAMES = {alias.lower(): name for name, aliases in SAMPLERS for alias in [name, *aliases]}
_SCHEDULER_LABELS = {key.lower(): label for name, label in SCHEDULERS for key in (name, label)}


def resolve_sampler(name: str, scheduler: str | None) -> tuple[str, str] | None:
    """(sampler, scheduler label) for a sampler name or alias; old names like "DPM++ 2M Karras" carry
    their scheduler in the name, as A1111's get_sampler_and_scheduler splits them. None: unknown."""
    sched = _SCHEDULER_LABELS.get((scheduler or "automatic").lower())
    if sched is None:
        return None
    if name.lower() in _SAMPLER_NAMES:
        return _SAMPLER_NAMES[name.lower()], sched
    for _, label in SCHEDULERS:
        base = name[: -len(label)].rstrip().lower()
        if name.lower().endswith(" " + label.lower()) and base in _SAMPLER_NAMES:
            return _SAMPLER_NAMES[base], label
    return None


def samplers_api() -> list[dict[str, Any]]:
    return [{"name": n, "aliases": a, "options": {}} for n, a in SAMPLERS]


def schedulers_api() -> list[dict[str, Any]]:
    return [
        {"name": n, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for n, label in SCHEDULERS
    ]


# Always-on scripts a stock A1111 1.9 (plus the ControlNet extension) runs; keys compared lower-case.
ALWAYSON_SCRIPTS = {"controlnet", "refiner", "seed", "sampler", "extra options", "hypertile", "soft inpainting"}


def scripts_api() -> dict[str, list[str]]:
    always = ["controlnet", "refiner", "seed", "sampler", "extra options", "hypertile"]
    return {"txt2img": always, "img2img": [*always, "soft inpainting"]}


def default_options(title: str, sha256: str | None, vae: str | None) -> dict[str, Any]:
    """The settings GET /sdapi/v1/options reports before --ui-settings-file is applied."""
    return {
        "sd_model_checkpoint": title,
        "sd_checkpoint_hash": sha256,
        "sd_vae": vae or "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "samples_save": True,
        "grid_save": True,
        "enable_pnginfo": True,
        "sd_checkpoints_limit": 1,
        "sd_checkpoints_keep_in_cpu": True,
        "sd_checkpoint_cache": 0,
        "lora_in_memory_limit": 0,
        "disable_mmap_load_safetensors": False,
        "eta_noise_seed_delta": 0,
        "live_previews_enable": True,
        "show_progressbar": True,
        "control_net_unit_count": 3,
        "control_net_model_cache_size": 2,
    }


CONTROLNET_MODULES = [
    "none",
    "canny",
    "depth_midas",
    "depth_leres",
    "depth_leres++",
    "depth_zoe",
    "depth_anything",
    "inpaint_only",
    "inpaint_only+lama",
    "instant_id_face_embedding",
    "ip-adapter_clip_sd15",
    "ip-adapter_clip_sdxl",
    "lineart_anime",
    "lineart_realistic",
    "lineart_standard",
    "mlsd",
    "normal_bae",
    "openpose",
    "openpose_face",
    "openpose_faceonly",
    "openpose_full",
    "openpose_hand",
    "dw_openpose_full",
    "reference_only",
    "recolor_luminance",
    "scribble_hed",
    "scribble_pidinet",
    "scribble_xdog",
    "seg_ofade20k",
    "seg_ufade20k",
    "shuffle",
    "softedge_hed",
    "softedge_pidinet",
    "t2ia_color_grid",
    "threshold",
    "tile_colorfix",
    "tile_resample",
    "invert",
    "blur_gaussian",
]
# Control type -> (module prefixes, model-name keyword), as the extension's control_types groups them.
CONTROL_TYPES: dict[str, tuple[tuple[str, ...], str]] = {
    "Canny": (("canny", "invert"), "canny"),
    "Depth": (("depth_",), "depth"),
    "NormalMap": (("normal_",), "normal"),
    "OpenPose": (("openpose", "dw_openpose"), "openpose"),
    "MLSD": (("mlsd",), "mlsd"),
    "Lineart": (("lineart_",), "lineart"),
    "SoftEdge": (("softedge_",), "softedge"),
    "Scribble/Sketch": (("scribble_", "t2ia_sketch"), "scribble"),
    "Segmentation": (("seg_",), "seg"),
    "Shuffle": (("shuffle",), "shuffle"),
    "Tile/Blur": (("tile_", "blur_"), "tile"),
    "Inpaint": (("inpaint_",), "inpaint"),
    "IP-Adapter": (("ip-adapter",), "ip-adapter"),
    "Recolor": (("recolor_",), "recolor"),
    "Reference": (("reference_",), "reference"),
}


def control_types(models: list[str]) -> dict[str, Any]:
    """GET /controlnet/control_types: each type with its modules and the models whose name fits."""
    types: dict[str, Any] = {
        "All": {"module_list": CONTROLNET_MODULES, "model_list": ["None", *models], "default_option": "none"}
    }
    types["All"]["default_model"] = "None"
    for name, (prefixes, keyword) in CONTROL_TYPES.items():
        modules = ["none", *(m for m in CONTROLNET_MODULES if m.startswith(prefixes))]
        fitting = [m for m in models if keyword in m.lower()]
        types[name] = {
            "module_list": modules,
            "model_list": ["None", *fitting],
            "default_option": modules[1] if len(modules) > 1 else "none",
            "default_model": fitting[0] if fitting else "None",
        }
    return {"control_types": types}
