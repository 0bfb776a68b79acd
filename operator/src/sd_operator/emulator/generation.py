"""POST /sdapi/v1/txt2img and /sdapi/v1/img2img: validate like A1111, run under the queue lock, answer
`{images, parameters, info}` with deterministic PNGs."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from PIL import Image, UnidentifiedImageError

from sd_operator import __version__
from sd_operator.emulator import EMULATOR_NAME
from sd_operator.emulator.catalog import resolve_sampler
from sd_operator.emulator.controlnet import unit_infotext, validate_alwayson
from sd_operator.emulator.engine import EMULATOR, ApiError, Emulator, Plan
from sd_operator.emulator.images import infotext, render_png
from sd_operator.emulator.schema import GenerationRequest, Img2ImgRequest, Txt2ImgRequest, parse

# A1111's extra-network syntax, <lora:name:te_weight[:unet_weight]>; lyco is the old LyCORIS alias.
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::([^:>]*))?[^>]*>")
CONTROLNET_COST = 0.35  # each ControlNet unit adds roughly a third to a sampling step
VERSION = f"{EMULATOR_NAME}-{__version__}"


@dataclass
class Extras:
    """What the prompt and scripts add: LoRAs found/missing, ControlNet units, infotext fields."""

    loras: list[dict[str, Any]]
    warnings: list[str]
    units: list[dict[str, Any]]
    params: dict[str, object]


def _random_seed() -> int:
    return secrets.randbelow(4294967294)  # A1111: random.randrange(4294967294)


async def _extras(emu: Emulator, req: GenerationRequest) -> Extras:
    import asyncio

    units = validate_alwayson(emu, req.alwayson_scripts)
    tags = [] if req.disable_extra_networks else LORA_TAG.findall(req.prompt)
    if any(name not in emu.loras.loras for name, _ in tags):
        emu.loras.refresh()  # A1111 rescans its Lora folder once when a prompt names an unknown one
    loras, missing = [], []
    for name, weight in tags:
        lora = emu.loras.loras.get(name)
        if lora is None:
            missing.append(name)
            continue
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            w = 1.0
        digest = await asyncio.to_thread(emu.loras.shorthash, lora)
        loras.append({"name": name, "weight": w, "hash": digest, "path": str(lora.path)})
    params: dict[str, object] = {}
    if loras:
        params["Lora hashes"] = ", ".join(f"{lo['name']}: {lo['hash']}" for lo in loras)
    for i, unit in enumerate(units):
        params[f"ControlNet {i}"] = unit_infotext(unit)
    warnings = [f"Lora not found: {', '.join(missing)}"] if missing else []
    return Extras(loras, warnings, units, params)


def _init_image_digest(images: list[str] | None) -> str:
    """Validates img2img's init images (base64, data: URLs allowed) and returns a digest of them."""
    if not images:
        raise ApiError(422, "HTTPException", "init_images is required for img2img (a list of base64 images)")
    digest = hashlib.sha256()
    for encoded in images:
        data = encoded.split(",", 1)[1] if encoded.startswith("data:image/") else encoded
        try:
            raw = base64.b64decode(data, validate=True)
            Image.open(io.BytesIO(raw)).verify()
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
            raise ApiError(500, "HTTPException", "Invalid encoded image") from e
        digest.update(raw)
    return digest.hexdigest()[:12]


async def generate(request: web.Request, kind: str) -> web.Response:
    emu = request.app[EMULATOR]
    text = await request.text()
    req: GenerationRequest = parse(Txt2ImgRequest if kind == "txt2img" else Img2ImgRequest, text)
    if req.script_name:
        raise ApiError(422, "HTTPException", f"Script '{req.script_name}' not found")
    resolved = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler)
    if resolved is None:
        raise ApiError(400, "HTTPException", "Sampler not found")
    sampler, scheduler = resolved
    emu.vet_settings(req.override_settings or {})
    extras = await _extras(emu, req)
    width, height, steps = req.width, req.height, req.steps
    phases = [(steps, width * height)]
    params: dict[str, object] = {}
    if isinstance(req, Txt2ImgRequest) and req.enable_hr:
        width, height = req.final_size()
        hr_steps = req.hr_second_pass_steps or steps
        phases.append((hr_steps, width * height))
        params = {
            "Denoising strength": req.denoising_strength or 0.7,
            "Hires upscale": req.hr_scale,
            "Hires steps": req.hr_second_pass_steps or None,
            "Hires upscaler": req.hr_upscaler or "Latent",
        }
    elif isinstance(req, Img2ImgRequest):
        _init_image_digest(req.init_images)
        # img2img samples only the denoised fraction of the schedule.
        phases = [(max(1, int(steps * req.denoising_strength)), width * height)]
        params = {"Denoising strength": req.denoising_strength}
    total = req.batch_size * req.n_iter
    seed = req.seed if req.seed != -1 else _random_seed()
    subseed = req.subseed if req.subseed != -1 else _random_seed()
    seeds = [seed + i for i in range(total)]
    ckpt = emu.config.checkpoint
    vae = emu.config.vae_path.name if emu.config.vae_path else None
    clip_skip = int((req.override_settings or {}).get("CLIP_stop_at_last_layers", emu.options["CLIP_stop_at_last_layers"]))

    def info_for(i: int) -> str:
        return infotext(
            req.prompt,
            req.negative_prompt,
            {
                "Steps": steps,
                "Sampler": sampler,
                "Schedule type": None if scheduler == "Automatic" else scheduler,
                "CFG scale": req.cfg_scale,
                "Seed": seeds[i],
                "Size": f"{req.width}x{req.height}",
                "Model hash": ckpt.shorthash,
                "Model": ckpt.model_name,
                "VAE": vae,
                "Batch size": req.batch_size if req.batch_size > 1 else None,
                "Batch pos": i % req.batch_size if req.batch_size > 1 else None,
                "Variation seed": subseed + i if req.subseed_strength else None,
                "Variation seed strength": req.subseed_strength or None,
                "Clip skip": clip_skip if clip_skip > 1 else None,
                **params,
                **extras.params,
                "Version": VERSION,
            },
        )

    infotexts = [info_for(i) for i in range(total)]

    def render(iterations: int) -> list[bytes]:
        count = iterations * req.batch_size
        return [
            render_png(model=ckpt.title, seed=seeds[i], prompt=req.prompt, width=width, height=height, infotext=t)
            for i, t in enumerate(infotexts[:count])
        ]

    job = f"scripts_{kind}"
    plan = Plan(job, phases, req.batch_size, req.n_iter, 1.0 + CONTROLNET_COST * len(extras.units))
    outcome = await emu.run(plan, render)
    info = {
        "prompt": req.prompt,
        "all_prompts": [req.prompt] * total,
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * total,
        "seed": seed,
        "all_seeds": seeds,
        "subseed": subseed,
        "all_subseeds": [subseed + i for i in range(total)],
        "subseed_strength": req.subseed_strength,
        "width": width,
        "height": height,
        "sampler_name": sampler,
        "scheduler": scheduler,
        "cfg_scale": req.cfg_scale,
        "steps": steps,
        "batch_size": req.batch_size,
        "n_iter": req.n_iter,
        "restore_faces": bool(req.restore_faces),
        "face_restoration_model": None,
        "sd_model_name": ckpt.model_name,
        "sd_model_hash": ckpt.shorthash,
        "sd_vae_name": vae,
        "sd_vae_hash": None,
        "seed_resize_from_w": req.seed_resize_from_w,
        "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": getattr(req, "denoising_strength", None),
        "extra_generation_params": {**params, **extras.params},
        "index_of_first_image": 0,
        "infotexts": infotexts[: len(outcome.images)],
        "styles": req.styles or [],
        "job_timestamp": emu.progress.job_timestamp,
        "clip_skip": clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": VERSION,
        "extra_networks_warnings": extras.warnings,
        "comments": "".join(f"{w}\n" for w in extras.warnings),
        "loras": extras.loras,
        "controlnet_units": extras.units,
        "interrupted": outcome.interrupted,
        "emulator": {
            "profile": emu.config.profile.name,
            "simulated_seconds": round(outcome.simulated_seconds, 6),
            "started": outcome.started,
            "finished": outcome.finished,
        },
    }
    parameters = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        parameters["init_images"] = parameters["mask"] = None  # as A1111: not echoed unless asked
    images = [base64.b64encode(png).decode() for png in outcome.images] if req.send_images else []
    return web.json_response({"images": images, "parameters": parameters, "info": json.dumps(info)})


async def txt2img(request: web.Request) -> web.Response:
    return await generate(request, "txt2img")


async def img2img(request: web.Request) -> web.Response:
    return await generate(request, "img2img")
