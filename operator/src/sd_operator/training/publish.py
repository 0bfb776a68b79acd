"""`sd-operator publish-lora`: copy a trained LoRA into an instance's model volume, verified and atomic.

The WebUI may rescan its LoRA folder at any moment, so the file appears under its final name only
when it is complete and its checksum matches.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from sd_operator.termination import write_termination_message

CHUNK = 4 * 1024 * 1024


def publish(source: Path, dest: Path, sha256: str | None = None) -> str:
    """Copies source to dest; returns the sha256. Raises ValueError on a checksum mismatch."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    digest = hashlib.sha256()
    with source.open("rb") as src, partial.open("wb") as out:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    got = digest.hexdigest()
    if sha256 and got != sha256.lower():
        partial.unlink(missing_ok=True)
        raise ValueError(f"sha256 mismatch for {source.name}: expected {sha256.lower()}, got {got}")
    os.replace(partial, dest)
    return got


def command(args: argparse.Namespace) -> int:
    try:
        got = publish(Path(args.source), Path(args.dest), args.sha256)
    except (OSError, ValueError) as e:
        line = f"publish of {Path(args.source).name} failed: {e}"
        print(line, file=sys.stderr)
        write_termination_message(line)
        return 1
    print(f"published {args.dest} sha256={got}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish-lora", help="copy a trained LoRA into an instance's model volume (verified)")
    p.add_argument("--source", required=True, help="the trained .safetensors file")
    p.add_argument("--dest", required=True, help="where the instance reads LoRAs, e.g. /models/Lora/x.safetensors")
    p.add_argument("--sha256", help="expected checksum (from the LoRAJob's artifacts)")
    p.set_defaults(func=command)
