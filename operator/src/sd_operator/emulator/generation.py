"""POST /sdapi/v1/txt2img and /sdapi/v1/img2img: validate like A1111 (before the queue lock), run under
the lock, answer `{images, parameters, info}` with deterministic PNGs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image, UnidentifiedImageError

from sd_operator import __version__
from sd_operator.emulator import EMULATOR_NAME
from sd_operator.emulator.catalog import resolve_sampler
from sd_operator.emulator.controlnet import unit_infotext, validate_alwayson
from sd_operator.emulator.engine import EMULATOR, ApiError, Emulator, Outcome, Plan
from sd_operator.emulator.images import infotext, render_png
from sd_operator.emulator.schema import GenerationRequest, Img2ImgRequest, Txt2ImgRequest, parse

# A1111's extra-network syntax, <lora:name:te_weight[:unet_weight]>; lyco is the old LyCORIS alias.
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::([^:>]*))?[^>]*>")
CONTROLNET_COST = 0.35  # each ControlNet unit adds roughly a third to a sampling step
VERSION = f"{EMULATOR_NAME}-{__version__}"


@dataclass
class Job:
    """A validated request: sampler, seeds, passes and the infotext fields beyond the basic ones."""

    req: GenerationRequest
    sampler: str
    scheduler: str
    width: int  # of the output (after hires fix)
    height: int
    phases: list[tuple[int, int]]
    seeds: list[int]
    subseed: int
    clip_skip: int
    params: dict[str, object] = field(default_factory=dict)
    loras: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    units: list[dict[str, Any]] = field(default_factory=list)


def _random_seed() -> int:
    return secrets.randbelow(4294967294)  # A1111: random.randrange(4294967294)


async def _loras(emu: Emulator, job: Job) -> None:
    tags = [] if job.req.disable_extra_networks else LORA_TAG.findall(job.req.prompt)
    if any(name not in emu.loras.loras for name, _ in tags):
        emu.loras.refresh()  # A1111 rescans its Lora folder once when a prompt names an unknown one
    missing = []
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
        job.loras.append({"name": name, "weight": w, "hash": digest, "path": str(lora.path)})
    if job.loras:
        job.params["Lora hashes"] = ", ".join(f"{lo['name']}: {lo['hash']}" for lo in job.loras)
    if missing:  # A1111 generates anyway and only warns
        job.warnings.append(f"Lora not found: {', '.join(missing)}")


def _check_init_images(images: list[str] | None) -> None:
    """img2img's init images must be base64 images (data: URLs allowed), as A1111 decodes them."""
    if not images:
        raise ApiError(422, "HTTPException", "init_images is required for img2img (a list of base64 images)")
    for encoded in images:
        data = encoded.split(",", 1)[1] if encoded.startswith("data:image/") else encoded
        try:
            Image.open(io.BytesIO(base64.b64decode(data, validate=True))).verify()
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
            raise ApiError(500, "HTTPException", "Invalid encoded image") from e


async def prepare(emu: Emulator, req: GenerationRequest) -> Job:
    """Everything A1111 checks before taking the queue lock; ApiError on the first problem."""
    if req.script_name:
        raise ApiError(422, "HTTPException", f"Script '{req.script_name}' not found")
    resolved = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler)
    if resolved is None:
        raise ApiError(400, "HTTPException", "Sampler not found")
    overrides = emu.vet_settings(req.override_settings or {})
    units = validate_alwayson(emu, req.alwayson_scripts)
    seed = req.seed if req.seed != -1 else _random_seed()
    clip_skip = int(overrides.get("CLIP_stop_at_last_layers", emu.options.get("CLIP_stop_at_last_layers", 1)))
    job = Job(
        req=req,
        sampler=resolved[0],
        scheduler=resolved[1],
        width=req.width,
        height=req.height,
        phases=[(req.steps, req.width * req.height)],
        seeds=[seed + i for i in range(req.batch_size * req.n_iter)],
        subseed=req.subseed if req.subseed != -1 else _random_seed(),
        clip_skip=clip_skip,
        units=units,
    )
    if isinstance(req, Txt2ImgRequest) and req.enable_hr:
        job.width, job.height = req.final_size()
        job.phases.append((req.hr_second_pass_steps or req.steps, job.width * job.height))
        job.params.update({"Denoising strength": req.denoising_strength or 0.7, "Hires upscale": req.hr_scale})
        job.params.update({"Hires steps": req.hr_second_pass_steps or None, "Hires upscaler": req.hr_upscaler})
    elif isinstance(req, Img2ImgRequest):
        _check_init_images(req.init_images)
        # img2img samples only the denoised fraction of the schedule.
        job.phases = [(max(1, int(req.steps * req.denoising_strength)), req.width * req.height)]
        job.params["Denoising strength"] = req.denoising_strength
    await _loras(emu, job)
    for i, unit in enumerate(units):
        job.params[f"ControlNet {i}"] = unit_infotext(unit)
    return job


def infotexts(emu: Emulator, job: Job) -> list[str]:
    req, ckpt, batch = job.req, emu.config.checkpoint, job.req.batch_size
    vae = emu.config.vae_path.name if emu.config.vae_path else None
    return [
        infotext(
            req.prompt,
            req.negative_prompt,
            {
                "Steps": req.steps,
                "Sampler": job.sampler,
                "Schedule type": None if job.scheduler == "Automatic" else job.scheduler,
                "CFG scale": req.cfg_scale,
                "Seed": seed,
                "Size": f"{req.width}x{req.height}",
                "Model hash": ckpt.shorthash,
                "Model": ckpt.model_name,
                "VAE": vae,
                "Batch size": batch if batch > 1 else None,
                "Batch pos": i % batch if batch > 1 else None,
                "Variation seed": job.subseed + i if req.subseed_strength else None,
                "Variation seed strength": req.subseed_strength or None,
                "Clip skip": job.clip_skip if job.clip_skip > 1 else None,
                **job.params,
                "Version": VERSION,
            },
        )
        for i, seed in enumerate(job.seeds)
    ]


def info(emu: Emulator, job: Job, texts: list[str], outcome: Outcome) -> dict[str, Any]:
    """A1111's Processed.js() fields, plus the emulator's: warnings, LoRAs, ControlNet units, timing."""
    req, ckpt, total = job.req, emu.config.checkpoint, len(job.seeds)
    return {
        "prompt": req.prompt,
        "all_prompts": [req.prompt] * total,
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * total,
        "seed": job.seeds[0],
        "all_seeds": job.seeds,
        "subseed": job.subseed,
        "all_subseeds": [job.subseed + i for i in range(total)],
        "subseed_strength": req.subseed_strength,
        "width": job.width,
        "height": job.height,
        "sampler_name": job.sampler,
        "scheduler": job.scheduler,
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": req.batch_size,
        "restore_faces": bool(req.restore_faces),
        "face_restoration_model": None,
        "sd_model_name": ckpt.model_name,
        "sd_model_hash": ckpt.shorthash,
        "sd_vae_name": emu.config.vae_path.name if emu.config.vae_path else None,
        "sd_vae_hash": None,
        "seed_resize_from_w": req.seed_resize_from_w,
        "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": getattr(req, "denoising_strength", None),
        "extra_generation_params": job.params,
        "index_of_first_image": 0,
        "infotexts": texts[: len(outcome.images)],
        "styles": req.styles or [],
        "job_timestamp": emu.progress.job_timestamp,
        "clip_skip": job.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": VERSION,
        "comments": "".join(f"{w}\n" for w in job.warnings),
        "extra_networks_warnings": job.warnings,
        "loras": job.loras,
        "controlnet_units": job.units,
        "interrupted": outcome.interrupted,
        "emulator": {
            "profile": emu.config.profile.name,
            "simulated_seconds": round(outcome.simulated_seconds, 6),
            "started": outcome.started,
            "finished": outcome.finished,
        },
    }


async def generate(request: web.Request, kind: str) -> web.Response:
    emu = request.app[EMULATOR]
    text = await request.text()
    req: GenerationRequest = parse(Txt2ImgRequest if kind == "txt2img" else Img2ImgRequest, text)
    job = await prepare(emu, req)
    texts = infotexts(emu, job)
    title = emu.config.checkpoint.title

    def render(iterations: int) -> list[bytes]:
        return [
            render_png(model=title, seed=seed, prompt=req.prompt, width=job.width, height=job.height, infotext=t)
            for seed, t in list(zip(job.seeds, texts, strict=True))[: iterations * req.batch_size]
        ]

    work = 1.0 + CONTROLNET_COST * len(job.units)
    outcome = await emu.run(Plan(f"scripts_{kind}", job.phases, req.batch_size, req.n_iter, work), render)
    parameters = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        parameters["init_images"] = parameters["mask"] = None  # as A1111: not echoed unless asked
    images = [base64.b64encode(png).decode() for png in outcome.images] if req.send_images else []
    body = {"images": images, "parameters": parameters, "info": json.dumps(info(emu, job, texts, outcome))}
    return web.json_response(body)


async def txt2img(request: web.Request) -> web.Response:
    return await generate(request, "txt2img")


async def img2img(request: web.Request) -> web.Response:
    return await generate(request, "img2img")
