"""The model folders the WebUI lists: LoRAs, ControlNet models, embeddings and VAEs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sd_operator.emulator.config import file_sha256, legacy_hash, sidecar_sha256

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def scan(folder: Path | None, suffixes: tuple[str, ...]) -> list[Path]:
    """Model files under `folder`, recursively, sorted; dot-files are the fetcher's partial downloads."""
    if folder is None or not folder.is_dir():
        return []
    found = (p for p in folder.rglob("*") if p.suffix.lower() in suffixes and not p.name.startswith("."))
    return sorted(p for p in found if p.is_file())


@dataclass(frozen=True)
class Lora:
    name: str
    path: Path

    def api(self) -> dict[str, object]:
        return {"name": self.name, "alias": self.name, "path": str(self.path), "metadata": {}}


class LoraIndex:
    """What A1111's Lora extension knows: rescanned on refresh-loras and, like A1111, on a miss."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.loras: dict[str, Lora] = {}
        self._hashes: dict[tuple[Path, int, int], str] = {}
        self.refresh()

    def refresh(self) -> None:
        self.loras = {p.stem: Lora(p.stem, p) for p in scan(self.folder, LORA_SUFFIXES)}

    def shorthash(self, lora: Lora) -> str:
        """sha256[:12] as A1111 writes into `Lora hashes`; cached per (path, size, mtime)."""
        st = lora.path.stat()
        key = (lora.path, st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = (sidecar_sha256(lora.path) or file_sha256(lora.path))[:12]
        return self._hashes[key]


def controlnet_models(folder: Path | None) -> dict[str, str]:
    """ControlNet model names as the extension lists them, `stem [legacyhash]`, keyed by lower-case stem."""
    return {p.stem.lower(): f"{p.stem} [{legacy_hash(p)}]" for p in scan(folder, CONTROLNET_SUFFIXES)}


def vae_files(vae_path: Path | None) -> list[dict[str, str]]:
    """`GET /sdapi/v1/sd-vae`: the VAEs beside the one given with --vae-path."""
    if vae_path is None:
        return []
    return [{"model_name": p.name, "filename": str(p)} for p in scan(vae_path.parent, VAE_SUFFIXES)]


def embeddings(folder: Path | None, vector_size: int, checkpoint: str) -> dict[str, object]:
    """`GET /sdapi/v1/embeddings`: every file counts as a loaded one-vector embedding."""
    loaded = {
        p.stem: {
            "step": None,
            "sd_checkpoint": None,
            "sd_checkpoint_name": checkpoint,
            "shape": vector_size,
            "vectors": 1,
        }
        for p in scan(folder, EMBEDDING_SUFFIXES)
    }
    return {"loaded": loaded, "skipped": {}}
