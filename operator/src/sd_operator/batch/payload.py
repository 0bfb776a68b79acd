"""From a task's parameters to the A1111 txt2img body, built the way `POST /v1/generate` builds it.

Reusing the gateway's builder keeps one meaning of a preset (prefix/suffix, negative prompt appended,
size/steps/CFG/sampler where unset), of <lora:name:weight> tags and of ControlNet unit defaults.
"""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sd_operator.api.generationbatch import Item
from sd_operator.gateway.payload import GenerateRequest, build_txt2img_payload
from sd_operator.gateway.presets import Preset

# base64 has no '.', so a short value ending in an image extension is a file name, not image data.
CONTROL_IMAGE_FILE = re.compile(r"^[^\s<>]{1,1024}\.(png|jpe?g|webp)$", re.IGNORECASE)


class PermanentItemError(Exception):
    """An item that can never succeed as written (bad parameters, a missing control image)."""


def join_prompt(prefix: str | None, prompt: str) -> str:
    parts = (part.strip().strip(",").strip() for part in (prefix or "", prompt))
    return ", ".join(part for part in parts if part)


def _control_units(params: Item) -> list[dict[str, Any]]:
    return [unit.model_dump(exclude_none=True, mode="json") for unit in params.control_nets or []]


def generate_request(params: Item, prompt_prefix: str | None = None) -> GenerateRequest:
    fields: dict[str, Any] = {
        "prompt": join_prompt(prompt_prefix, params.prompt),
        "negative_prompt": params.negative_prompt,
        "width": params.width,
        "height": params.height,
        "steps": params.steps,
        "cfg_scale": params.cfg_scale,
        "sampler_name": params.sampler,
        "scheduler": params.scheduler,
        "seed": params.seed,
        "batch_size": params.batch_size,
        "loras": [{"name": lo.name, "weight": lo.weight} for lo in params.loras or []],
        "controlnets": _control_units(params),
    }
    try:
        return GenerateRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        why = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise PermanentItemError(f"invalid parameters: {why}") from None


def is_file_name(image: str) -> bool:
    return not image.startswith("data:") and CONTROL_IMAGE_FILE.match(image) is not None


def read_control_image(image: str, inputs_dir: Path | None) -> str:
    """base64 of a control image given as a file name under `inputs_dir`; base64 data passes through."""
    if not is_file_name(image):
        return image
    if inputs_dir is None:
        raise PermanentItemError(f"control image {image!r} is a file name, but no --inputs-dir was given")
    root = inputs_dir.resolve()
    path = (root / image).resolve()
    if not path.is_relative_to(root):
        raise PermanentItemError(f"control image {image!r} is outside the inputs folder")
    try:
        return base64.b64encode(path.read_bytes()).decode()
    except OSError as e:
        raise PermanentItemError(f"control image {image!r}: {e.strerror or e}") from None


def build_body(
    params: Item, *, prompt_prefix: str | None = None, preset: Preset | None = None, inputs_dir: Path | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the body to send, the body to record in the sidecar: control images as given, base64 data left out)."""
    body = build_txt2img_payload(generate_request(params, prompt_prefix), preset)
    units = (body.get("alwayson_scripts") or {}).get("controlnet", {}).get("args") or []
    if not units:
        return body, body
    recorded = copy.deepcopy(body)
    for sent, kept in zip(units, recorded["alwayson_scripts"]["controlnet"]["args"], strict=True):
        given = sent["image"]
        sent["image"] = read_control_image(given, inputs_dir)
        kept["image"] = given if is_file_name(given) else None
    return body, recorded
