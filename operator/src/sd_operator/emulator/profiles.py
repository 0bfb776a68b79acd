"""GPU profiles: how fast a step is and how many pixels fit in VRAM, per model family.

Speeds are typical A1111 numbers (fp16, sdp/xformers attention, batch 1) at each family's native
size: SD1.5 at 512², SD2 at 768², SDXL at 1024². The emulator scales them linearly by pixel count,
which is close enough for routing and queueing tests (real attention cost grows a little faster).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

GIB = 1024**3
UNIT_PIXELS = 512 * 512  # the generation-time formula counts work in 512² tiles


class Family(StrEnum):
    SD15 = "sd15"
    SD2 = "sd2"
    SDXL = "sdxl"


NATIVE_SIDE = {Family.SD15: 512, Family.SD2: 768, Family.SDXL: 1024}
# VRAM taken by the fp16 weights (UNet, text encoders, VAE) plus the CUDA context.
WEIGHTS_GIB = {Family.SD15: 2.5, Family.SD2: 3.0, Family.SDXL: 7.0}
# Activation memory per generated pixel (whole batch), expressed as pixels per free GiB.
PIXELS_PER_GIB = {Family.SD15: 450_000, Family.SD2: 400_000, Family.SDXL: 350_000}


@dataclass(frozen=True)
class GpuProfile:
    name: str
    product: str
    vram_gib: float
    its: dict[Family, float]  # iterations per second at the family's native size, batch 1

    def seconds_per_step(self, family: Family) -> float:
        """Seconds for one sampling step of one 512² image."""
        native_units = NATIVE_SIDE[family] ** 2 / UNIT_PIXELS
        return 1.0 / self.its[family] / native_units

    def pixel_budget(self, family: Family) -> int:
        """The most width*height*batch_size one generation can hold before CUDA runs out of memory."""
        return int((self.vram_gib - WEIGHTS_GIB[family]) * PIXELS_PER_GIB[family])

    def describe(self, family: Family) -> dict[str, object]:
        return {
            "name": self.name,
            "product": self.product,
            "vram_gib": self.vram_gib,
            "family": family.value,
            "its_native": self.its[family],
            "native_size": NATIVE_SIDE[family],
            "seconds_per_step_512": round(self.seconds_per_step(family), 6),
            "pixel_budget": self.pixel_budget(family),
        }


def _profile(name: str, product: str, vram: float, sd15: float, sd2: float, sdxl: float) -> GpuProfile:
    return GpuProfile(name, product, vram, {Family.SD15: sd15, Family.SD2: sd2, Family.SDXL: sdxl})


PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in (
        _profile("rtx3060", "NVIDIA-GeForce-RTX-3060", 12.0, 9.0, 3.6, 1.5),
        _profile("rtx3090", "NVIDIA-GeForce-RTX-3090", 24.0, 18.0, 7.5, 3.3),
        _profile("rtx4090", "NVIDIA-GeForce-RTX-4090", 24.0, 30.0, 13.0, 5.5),
        _profile("a100-40gb", "NVIDIA-A100-SXM4-40GB", 40.0, 25.0, 11.0, 4.8),
        _profile("l4", "NVIDIA-L4", 24.0, 11.0, 4.5, 2.0),
        _profile("t4", "Tesla-T4", 16.0, 5.5, 2.2, 0.9),
    )
}
DEFAULT_PROFILE = "rtx4090"


def oom_message(profile: GpuProfile, family: Family, pixels: int) -> str:
    """PyTorch's CUDA OOM text, with numbers that follow from the profile."""
    free = max(0.0, profile.vram_gib - WEIGHTS_GIB[family]) * 0.9
    wanted = pixels / PIXELS_PER_GIB[family]
    allocated = profile.vram_gib - free - 0.3
    return (
        f"CUDA out of memory. Tried to allocate {max(wanted - free, 0.01):.2f} GiB (GPU 0; "
        f"{profile.vram_gib:.2f} GiB total capacity; {allocated:.2f} GiB already allocated; {free:.2f} GiB free; "
        f"{allocated + 0.2:.2f} GiB reserved in total by PyTorch) If reserved memory is >> allocated memory try "
        "setting max_split_size_mb to avoid fragmentation.  See documentation for Memory Management and "
        "PYTORCH_CUDA_ALLOC_CONF"
    )
