"""The emulator's run-time state: the queue lock, progress, settings, memory counters and statistics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from sd_operator.emulator.catalog import default_options
from sd_operator.emulator.config import EmulatorConfig
from sd_operator.emulator.files import LoraIndex
from sd_operator.emulator.profiles import GIB, PIXELS_PER_GIB, UNIT_PIXELS, WEIGHTS_GIB, oom_message

log = logging.getLogger("sd_operator.emulator")
SLICE = 0.05  # longest single sleep: how quickly interrupt/skip take effect
T = TypeVar("T")


class ApiError(Exception):
    """An error answered with A1111's JSON shape {error, detail, body, errors}."""

    def __init__(self, status: int, error: str, detail: Any, *, body: str = "", errors: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.body = status, error, detail, body
        if errors is None:
            errors = f"{status}: {detail}" if error == "HTTPException" else str(detail)
        self.errors = errors

    def payload(self) -> dict[str, Any]:
        return {"error": self.error, "detail": self.detail, "body": self.body, "errors": self.errors}


@dataclass
class Plan:
    """One generation: `phases` are (steps, width*height) passes per iteration (hires fix adds one)."""

    job: str
    phases: list[tuple[int, int]]
    batch_size: int
    n_iter: int
    work_factor: float = 1.0  # extra cost per step, e.g. ControlNet units

    @property
    def peak_pixels(self) -> int:
        return max(pixels for _, pixels in self.phases) * self.batch_size


@dataclass
class Outcome:
    iterations: int  # iterations that produced images (the interrupted one included, as in A1111)
    interrupted: bool
    started: float
    finished: float
    simulated_seconds: float
    images: list[bytes] = field(default_factory=list)


@dataclass
class Progress:
    """A1111's shared.state, the fields /sdapi/v1/progress reports."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    skipped: bool = False
    job_timestamp: str = "0"
    time_start: float = 0.0

    def api(self) -> dict[str, Any]:
        state = {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "stopping_generation": False,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": self.job_timestamp,
            "job_no": self.job_no,
            "sampling_step": self.sampling_step,
            "sampling_steps": self.sampling_steps,
        }
        if self.job_count == 0:
            return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None}
        # A1111's formula (modules/api/api.py progressapi), including its 0.01 head start.
        progress = 0.01 + self.job_no / self.job_count
        if self.sampling_steps > 0:
            progress += self.sampling_step / self.sampling_steps / self.job_count
        elapsed = time.time() - self.time_start
        eta = elapsed / progress - elapsed
        return {
            "progress": min(progress, 1.0),
            "eta_relative": eta,
            "state": state,
            "current_image": None,
            "textinfo": "In progress...",
        }


class Emulator:
    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.queue_lock = asyncio.Lock()  # A1111's queue_lock: one generation at a time
        self.loaded = asyncio.Event()
        self.progress = Progress()
        self.loras = LoraIndex(config.lora_dir)
        self.requests: Counter[str] = Counter()
        self.generations = self.images = self.interrupted = self.oom_count = 0
        self.active = self.max_concurrency = self.waiting = 0
        self.busy_seconds = 0.0
        self.peak_bytes = self.current_bytes = 0
        ckpt = config.checkpoint
        vae = config.vae_path.name if config.vae_path else None
        self.options: dict[str, Any] = default_options(ckpt.title, ckpt.sha256, vae)
        self.options.update(self._settings_file())
        self.options["sd_model_checkpoint"] = ckpt.title  # --ckpt wins over the file, as in A1111

    def _settings_file(self) -> dict[str, Any]:
        path = self.config.settings_file
        if path is None or not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            # A1111 reverts to defaults on a corrupt config.json rather than refusing to start.
            log.warning("could not read settings file %s (%s); using defaults", path, e)
            return {}
        return data if isinstance(data, dict) else {}

    def vet_settings(self, changes: dict[str, Any]) -> dict[str, Any]:
        """`changes` with checkpoint aliases normalised to the title. Refused (400) when they would switch
        the model, which one process never does, or change anything under --freeze-settings, where
        A1111 asserts "changing settings is disabled" (for override_settings too)."""
        ckpt, frozen = self.config.checkpoint, self.config.freeze_settings
        changes = dict(changes)
        if "sd_model_checkpoint" in changes:
            wanted = str(changes["sd_model_checkpoint"])
            if wanted not in ckpt.aliases():
                why = "settings are frozen" if frozen else f"model {wanted!r} not found"
                raise ApiError(400, "RuntimeError", f"{why}; this instance serves only {ckpt.title}")
            changes["sd_model_checkpoint"] = ckpt.title
        changed = sorted(k for k, v in changes.items() if k not in self.options or self.options[k] != v)
        if frozen and changed:
            detail = f"settings are frozen (changing settings is disabled): {', '.join(changed)}"
            raise ApiError(400, "AssertionError", detail)
        return changes

    def save_settings(self) -> None:
        if self.config.settings_file is None:
            return
        try:
            self.config.settings_file.write_text(json.dumps(self.options, indent=4))
        except OSError as e:  # read-only ConfigMap mounts are normal in a pod
            log.warning("could not save settings to %s: %s", self.config.settings_file, e)

    async def load_model(self) -> None:
        """The simulated checkpoint load: /sd-operator/ready is 503 until it is done."""
        started = time.monotonic()
        await asyncio.sleep(self.config.load_seconds)
        self.loaded.set()
        log.info("model %s loaded in %.1fs (simulated)", self.config.checkpoint.title, time.monotonic() - started)

    def step_seconds(self, plan: Plan, pixels: int) -> float:
        cfg = self.config
        per_step = cfg.profile.seconds_per_step(cfg.family) * pixels / UNIT_PIXELS * plan.batch_size
        return per_step * plan.work_factor * cfg.speed

    def _check_memory(self, plan: Plan) -> None:
        cfg = self.config
        if plan.peak_pixels > cfg.profile.pixel_budget(cfg.family):
            self.oom_count += 1
            message = oom_message(cfg.profile, cfg.family, plan.peak_pixels)
            log.warning("simulated OOM: %s", message)
            raise ApiError(500, "OutOfMemoryError", message, errors=message)
        used = WEIGHTS_GIB[cfg.family] + plan.peak_pixels / PIXELS_PER_GIB[cfg.family]
        self.current_bytes = int(used * GIB)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """A1111's queue lock, counted as waiting until it is held; held, it waits for the model load too."""
        self.waiting += 1
        acquired = False
        try:
            async with self.queue_lock:
                self.waiting -= 1
                acquired = True
                await self.loaded.wait()  # requests before the model is loaded wait, as in A1111
                yield
        finally:
            if not acquired:  # cancelled while queued
                self.waiting -= 1

    async def run(self, plan: Plan, render: Callable[[int], list[bytes]]) -> Outcome:
        """Runs under the queue lock: OOM check, the timed sampling loop, then `render(iterations)`."""
        async with self.locked():
            return await self._locked_run(plan, render)

    async def exclusive(
        self, job: str, seconds: Sequence[float], work: Callable[[int], T], *, interruptible: bool = True
    ) -> T:
        """Work other than sampling that A1111 runs under its queue lock (extras, interrogate): one progress job
        per entry of `seconds` (simulated time, already scaled), then `work(jobs done)` in a thread. Interrupt
        ends it between jobs when `interruptible`, as extras check it between images."""
        async with self.locked():
            self.active += 1
            self.max_concurrency = max(self.max_concurrency, self.active)
            started = time.monotonic()
            p = self.progress
            try:
                p.job, p.job_count, p.job_no, p.interrupted, p.skipped = job, len(seconds), 0, False, False
                p.job_timestamp, p.time_start = time.strftime("%Y%m%d%H%M%S"), time.time()
                done = 0
                for number, duration in enumerate(seconds):
                    if interruptible and p.interrupted:
                        break
                    p.job_no = number
                    end = time.monotonic() + duration
                    while not (interruptible and p.interrupted):
                        left = end - time.monotonic()
                        if left <= 0:
                            break
                        await asyncio.sleep(min(SLICE, left))
                    done += 1
                return await asyncio.to_thread(work, done)
            finally:
                self.active -= 1
                self.busy_seconds += time.monotonic() - started
                p.job, p.job_count, p.job_no = "", 0, 0

    async def _locked_run(self, plan: Plan, render: Callable[[int], list[bytes]]) -> Outcome:
        self.active += 1
        self.max_concurrency = max(self.max_concurrency, self.active)
        started_mono, started = time.monotonic(), time.time()
        p = self.progress
        try:
            self._check_memory(plan)
            p.job, p.job_count, p.job_no, p.interrupted, p.skipped = plan.job, plan.n_iter, 0, False, False
            p.job_timestamp, p.time_start = time.strftime("%Y%m%d%H%M%S"), started
            iterations = await self._sample(plan)
            images = await asyncio.to_thread(render, iterations)  # VAE decode + save, still under the lock
            self.generations += 1
            self.images += len(images)
            self.interrupted += p.interrupted
            simulated = sum(self.step_seconds(plan, px) * steps for steps, px in plan.phases) * plan.n_iter
            return Outcome(iterations, p.interrupted, started, time.time(), simulated, images)
        finally:
            # Also on OOM and on cancellation (client gone): the lock is released by `async with`.
            self.active -= 1
            self.busy_seconds += time.monotonic() - started_mono
            p.job, p.job_count, p.sampling_step, p.sampling_steps = "", 0, 0, 0

    async def _sample(self, plan: Plan) -> int:
        p = self.progress
        for iteration in range(plan.n_iter):
            p.job_no, p.skipped = iteration, False
            for steps, pixels in plan.phases:
                step = self.step_seconds(plan, pixels)
                p.sampling_steps, p.sampling_step = steps, 0
                start = time.monotonic()
                while p.sampling_step < steps and not (p.interrupted or p.skipped):
                    elapsed = time.monotonic() - start
                    p.sampling_step = steps if step <= 0 else min(steps, int(elapsed / step))
                    if p.sampling_step < steps:
                        wake = start + (p.sampling_step + 1) * step
                        await asyncio.sleep(min(SLICE, max(0.0, wake - time.monotonic())))
                if p.interrupted or p.skipped:
                    break
            if p.interrupted:
                return iteration + 1  # the current latents are still decoded, as in A1111
        return plan.n_iter

    def busy(self) -> dict[str, Any] | None:
        """What keeps the emulator busy, or None when no generation runs or waits for the queue lock (the
        WebUI's drain reads the same from its queue lock and shared.state)."""
        held = self.queue_lock.locked()
        if held or self.active or self.waiting:
            return {"job": self.progress.job, "lockHeld": held, "active": self.active, "queued": self.waiting}
        return None

    def memory(self) -> dict[str, Any]:
        cfg = self.config
        total = int(cfg.profile.vram_gib * GIB)
        weights = int(WEIGHTS_GIB[cfg.family] * GIB) if self.loaded.is_set() else int(0.3 * GIB)
        current = max(self.current_bytes, weights) if self.active else weights
        pair = {"current": current, "peak": max(self.peak_bytes, weights)}
        return {
            "ram": _ram(),
            "cuda": {
                "system": {"free": total - current, "used": current, "total": total},
                "active": pair,
                "allocated": pair,
                "reserved": {"current": current + int(0.2 * GIB), "peak": pair["peak"] + int(0.2 * GIB)},
                "inactive": {"current": 0, "peak": 0},
                "events": {"retries": 0, "oom": self.oom_count},
            },
        }

    def stats(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "emulator": "sd-emulator",
            "model": cfg.checkpoint.title,
            "requests": dict(sorted(self.requests.items())),
            "generations": self.generations,
            "images": self.images,
            "interrupted": self.interrupted,
            "max_concurrency": self.max_concurrency,
            "active": self.active,
            "waiting": self.waiting,
            "total_busy_seconds": round(self.busy_seconds, 6),
            "oom_count": self.oom_count,
            "profile": cfg.profile.describe(cfg.family),
            "speed": cfg.speed,
            "ready": self.loaded.is_set(),
        }


def _ram() -> dict[str, int]:
    page = os.sysconf("SC_PAGE_SIZE")
    total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    return {"free": free, "used": total - free, "total": total}


EMULATOR = web.AppKey("emulator", Emulator)
