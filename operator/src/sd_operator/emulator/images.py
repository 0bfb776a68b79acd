"""Real PNGs with A1111's metadata, whose pixels are a pure function of (model, seed, prompt).

Images have the requested size (floored to a multiple of 8, as the VAE does). The content is an 8x8
mosaic of colours from sha256(model, seed, prompt) scaled up with nearest-neighbour: identical
requests give identical bytes, a different model, seed or prompt a visibly different image, and the
PNG stays a few KB even at 2048². The 64 tiles are stored as a 64-colour palette PNG at the fastest
deflate level (decoders give the same RGB pixels): a 1024² image takes ~4 ms instead of ~30 ms as RGB at
level 6. Encoding is CPU time a real GPU would not spend, and it runs under the emulated queue lock, so
the cheaper it is, the less it distorts the timing that the dispatch benchmark measures.
"""

from __future__ import annotations

import hashlib
import io
import json

from PIL import Image
from PIL.PngImagePlugin import PngInfo

GRID = 8
MAX_SIDE = 8192  # beyond every profile's pixel budget anyway; keeps a bad request from eating RAM


def mosaic_bytes(model: str, seed: int, prompt: str) -> bytes:
    """GRID*GRID RGB pixels, chained sha256 of the identity."""
    identity = f"{model}\0{seed}\0{prompt}".encode()
    out = b""
    block = hashlib.sha256(identity).digest()
    while len(out) < GRID * GRID * 3:
        out += block
        block = hashlib.sha256(block).digest()
    return out[: GRID * GRID * 3]


def render_png(*, model: str, seed: int, prompt: str, width: int, height: int, infotext: str) -> bytes:
    size = (min(max(8, width - width % 8), MAX_SIDE), min(max(8, height - height % 8), MAX_SIDE))
    tiles = Image.frombytes("P", (GRID, GRID), bytes(range(GRID * GRID)))  # tile i has colour i
    tiles.putpalette(mosaic_bytes(model, seed, prompt))
    image = tiles.resize(size, Image.Resampling.NEAREST)
    info = PngInfo()
    # Pillow writes iTXt for values that are not latin-1 (prompts in any language survive).
    info.add_text("parameters", infotext)
    info.add_text("sd-emulator-model", model)
    info.add_text("sd-emulator-seed", str(seed))
    info.add_text("sd-emulator-prompt", prompt)
    buf = io.BytesIO()
    image.save(buf, "PNG", pnginfo=info, compress_level=1)
    return buf.getvalue()


def quote(value: object) -> str:
    """A1111's infotext quoting: values with separators become JSON strings."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """`<prompt>\\nNegative prompt: ...\\nSteps: 20, Sampler: ..., ...` (None values left out)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)
