"""Validate a .safetensors file from its header alone, so a truncated or corrupt download is caught
before the WebUI tries to load it (and fails much later, or crashes on a short read).

Format: 8-byte little-endian header length N, N bytes of JSON, then the data section that the
tensors' `data_offsets` index into (relative to its start).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_operator.fetch.manifest import FetchError

# A header holds names, shapes and offsets only; real checkpoints stay far below this, and the bound
# keeps a corrupt length field from making us read (and JSON-parse) gigabytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# Element sizes in bits (sub-byte float formats exist in newer safetensors releases).
DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16,
    "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8,
    "BOOL": 8, "C64": 64,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}  # fmt: skip


@dataclass(frozen=True)
class SafetensorsInfo:
    tensors: int
    header_bytes: int
    data_bytes: int
    metadata: dict[str, Any]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_span(tensor: str, entry: object, data_bytes: int) -> tuple[int, int]:
    """Checks one header entry and returns its [begin, end) in the data section."""
    if not isinstance(entry, dict):
        raise ValueError(f"tensor {tensor}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise ValueError(f"tensor {tensor}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"tensor {tensor}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise ValueError(f"tensor {tensor}: data_offsets must be [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ValueError(f"tensor {tensor}: data_offsets [{begin}, {end}] are out of order")
    if end > data_bytes:
        raise ValueError(f"truncated: tensor {tensor} ends at byte {end} beyond the data section ({data_bytes} bytes)")
    bits = math.prod(shape) * DTYPE_BITS[str(dtype)]
    if bits % 8 or end - begin != bits // 8:
        raise ValueError(
            f"tensor {tensor}: {end - begin} bytes of data for shape {shape} {dtype} ({bits / 8:g} bytes expected)"
        )
    return begin, end


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


def _check(path: Path) -> SafetensorsInfo:
    file_size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"truncated: {file_size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > file_size - 8:
            raise ValueError(f"header length {n} is implausible for a file of {file_size} bytes")
        header = _parse_header(f.read(n))
    data_bytes = file_size - 8 - n
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise ValueError("__metadata__ is not an object")
    spans = sorted((_tensor_span(name, entry, data_bytes), name) for name, entry in header.items())
    # Tensors must tile the data section: a gap or overlap means a corrupt header, and an end short of
    # the file size means trailing bytes that no tensor owns.
    pos = 0
    for (begin, end), name in spans:
        if begin != pos:
            raise ValueError(f"tensor {name}: starts at byte {begin}, expected {pos} (gap or overlap)")
        pos = end
    if pos != data_bytes:
        raise ValueError(f"{data_bytes - pos} bytes of trailing data after the last tensor")
    return SafetensorsInfo(len(spans), n, data_bytes, metadata)


def check_safetensors(path: Path, name: str | None = None) -> SafetensorsInfo:
    """Validates the header and offsets of `path`; raises FetchError naming `name` (default: the file name)."""
    try:
        return _check(path)
    except ValueError as e:
        raise FetchError(f"invalid safetensors file {name or path.name}: {e}") from None
