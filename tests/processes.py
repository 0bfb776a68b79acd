"""Real processes for HTTP tests: WebUI emulators (started with the WebUI's own command line) and the gateway."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import yaml
from safetensors.numpy import save_file

BIN = Path(sys.executable).parent


@dataclass
class Proc:
    process: subprocess.Popen
    url: str
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _start(cmd: list[str], log: Path, marker: str, env: dict[str, str] | None = None, timeout: float = 30) -> Proc:
    out = log.open("wb")
    process = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
    )
    out.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(rf"{marker}=(\d+)", log.read_text(errors="replace"))
        if found:
            return Proc(process, f"http://127.0.0.1:{found[1]}", log)
        if process.poll() is not None:
            raise AssertionError(f"{cmd[0]} exited: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"{cmd} did not report {marker}")


def checkpoint(folder: Path, name: str) -> Path:
    """A small real safetensors file standing in for a model."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    save_file({"w": np.full((4, 4), float(len(name)), dtype=np.float32)}, str(path))
    return path


def emulator(
    tmp: Path, name: str, model: str, *, profile: str = "rtx4090", speed: float = 0.001, extra: list[str] | None = None
) -> Proc:
    """An emulator started the way the operator starts the WebUI (the rendered flags), on a free port."""
    models = tmp / name / "models"
    ckpt = checkpoint(models / "Stable-diffusion", model)
    (models / "Lora").mkdir(parents=True, exist_ok=True)
    cmd = [
        str(BIN / "sd-operator"), "emulator",
        "--api", "--nowebui", "--listen", "--port", "0", "--host", "127.0.0.1", "--print-port",
        "--ckpt", str(ckpt), "--lora-dir", str(models / "Lora"), "--freeze-settings",
        "--xformers", "--no-half-vae",
        "--gpu-profile", profile, "--speed", str(speed), *(extra or []),
    ]  # fmt: skip
    proc = _start(cmd, tmp / f"{name}.log", "EMULATOR_PORT")
    _wait_ok(f"{proc.url}/sd-operator/ready")
    return proc


def gateway(
    tmp: Path, backends: list[Proc] | list[dict], *args: str, name: str = "gateway", env: dict[str, str] | None = None
) -> Proc:
    entries = [b if isinstance(b, dict) else {"url": b.url} for b in backends]
    backends_file = tmp / f"{name}-backends.yaml"
    backends_file.write_text(yaml.safe_dump({"backends": entries}))
    cmd = [str(BIN / "sd-operator"), "gateway", "--port", "0", "--backends-file", str(backends_file), *args]
    proc = _start(cmd, tmp / f"{name}.log", "GATEWAY_PORT", env)
    _wait_ok(f"{proc.url}/readyz")
    # Ready means one backend answered; tests want all of them probed and in the rotation.
    deadline = time.monotonic() + 30
    while len(requests.get(f"{proc.url}/v1/instances", timeout=5).json()) < len(entries):
        if time.monotonic() > deadline:
            raise AssertionError(f"the gateway did not take up all {len(entries)} backends")
        time.sleep(0.05)
    return proc


def _wait_ok(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not become ready")
