"""What one emulator process serves: its checkpoint (hashed like A1111), folders, profile and speed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd_operator.emulator.profiles import Family, GpuProfile

CHUNK = 1024 * 1024


class EmulatorError(Exception):
    """A start-up problem the emulator reports and exits on (missing checkpoint, bad flag value)."""


def sidecar_sha256(path: Path) -> str | None:
    """The sha256 that `sd-operator fetch-model` recorded in `.<name>.verified`, if it still matches the file.

    Hashing a multi-GB checkpoint takes minutes; the fetcher already did it."""
    try:
        record = json.loads((path.parent / f".{path.name}.verified").read_text())
        st = path.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return None
    # A record without size/mtime is accepted (hand-written for tests); one that disagrees is stale.
    if record.get("size", st.st_size) != st.st_size or record.get("mtime_ns", st.st_mtime_ns) != st.st_mtime_ns:
        return None
    return str(record["sha256"]).lower()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def legacy_hash(path: Path) -> str:
    """A1111's old 8-hex model hash (64 KiB at 1 MiB offset), which ControlNet still puts in model names."""
    with path.open("rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    sha256: str | None  # None only with --no-hashing and no sidecar, as in A1111

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model_name(self) -> str:
        return self.path.stem

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]" if self.shorthash else self.name

    def aliases(self) -> set[str]:
        """Every name A1111 would accept for this checkpoint in sd_model_checkpoint."""
        names = {self.title, self.name, self.model_name, str(self.path)}
        if self.sha256 and self.shorthash:
            names |= {self.sha256, self.shorthash, f"{self.model_name} [{self.shorthash}]"}
        return names

    @classmethod
    def load(cls, path: Path, *, hashing: bool = True) -> Checkpoint:
        if not path.is_file():
            raise EmulatorError(f"checkpoint not found: {path} (--ckpt must name an existing model file)")
        sha = sidecar_sha256(path)
        if sha is None and hashing:
            sha = file_sha256(path)
        return cls(path.absolute(), sha)


@dataclass(frozen=True)
class EmulatorConfig:
    checkpoint: Checkpoint
    family: Family
    profile: GpuProfile
    speed: float = 1.0  # multiplies every simulated duration; 0.001 for fast tests
    load_seconds: float = 0.0  # wall-clock seconds before /sd-operator/ready turns 200 (not scaled)
    lora_dir: Path | None = None
    embeddings_dir: Path | None = None
    controlnet_dir: Path | None = None
    vae_path: Path | None = None
    settings_file: Path | None = None
    freeze_settings: bool = False
    api_auth: dict[str, str] = field(default_factory=dict)
    api_log: bool = False
    cmd_flags: dict[str, Any] = field(default_factory=dict)  # what /sdapi/v1/cmd-flags shows


def guess_family(checkpoint: Path) -> Family:
    return Family.SDXL if "xl" in checkpoint.name.lower() else Family.SD15


def parse_api_auth(value: str | None) -> dict[str, str]:
    """`user:pass[,user2:pass2]`, split like A1111 (the password may contain ':')."""
    users: dict[str, str] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        user, sep, password = item.strip().partition(":")
        if not sep:
            raise EmulatorError(f"--api-auth entries must be user:password, got {item.strip()!r}")
        users[user] = password
    return users
