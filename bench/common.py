"""Shared helpers for the gateway benchmarks: start emulators, the gateway and nginx as real processes.

Every process runs in its own session (process group) so that `Proc.stop()` ends it together with
anything it spawned; `Fleet` stops everything it started, also on errors and Ctrl-C. Everything
listens on 127.0.0.1 only. The command lines match tests/processes.py (the way the operator starts
the WebUI), with optional `taskset -c <core>` pinning.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from safetensors.numpy import save_file

BIN = Path(sys.executable).parent
SD_OPERATOR = str(BIN / "sd-operator")
NGINX = "/usr/sbin/nginx"


@dataclass
class Proc:
    name: str
    process: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def pinned(cmd: list[str], core: int | None) -> list[str]:
    """`cmd` run under `taskset -c core` (when a core is given and taskset exists)."""
    if core is None or shutil.which("taskset") is None:
        return cmd
    return ["taskset", "-c", str(core), *cmd]


def checkpoint(folder: Path, name: str) -> Path:
    """A small real safetensors file standing in for a model (the family follows from the name)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if not path.exists():
        save_file({"w": np.full((4, 4), float(len(name)), dtype=np.float32)}, str(path))
    return path


def _spawn(name: str, cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_marker(name: str, process: subprocess.Popen, log: Path, marker: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(rf"{marker}=(\d+)", log.read_text(errors="replace"))
        if found:
            return f"http://127.0.0.1:{found[1]}"
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not print {marker}= within {timeout}s")


def wait_ok(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready within {timeout}s")


@dataclass
class Fleet:
    """Processes of one benchmark run, all stopped by `stop()` (use as a context manager)."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def stop_some(self, procs: list[Proc]) -> None:
        for proc in procs:
            proc.stop()
            if proc in self.procs:
                self.procs.remove(proc)

    def emulators(
        self, specs: list[tuple[str, str, float]], model: str, core: int | None = None, tag: str = "emu"
    ) -> list[Proc]:
        """Starts one emulator per (name, gpu profile, speed), all at once, and waits until all are ready."""
        ckpt = checkpoint(self.tmp / "models" / "Stable-diffusion", model)
        lora = self.tmp / "models" / "Lora"
        lora.mkdir(parents=True, exist_ok=True)
        started = []
        for name, profile, speed in specs:
            cmd = [
                SD_OPERATOR, "emulator",
                "--api", "--nowebui", "--port", "0", "--host", "127.0.0.1", "--print-port",
                "--ckpt", str(ckpt), "--lora-dir", str(lora), "--freeze-settings",
                "--gpu-profile", profile, "--speed", repr(speed),
            ]  # fmt: skip
            log = self.tmp / f"{tag}-{name}.log"
            started.append((name, _spawn(name, pinned(cmd, core), log), log))
        out = []
        for name, process, log in started:
            proc = Proc(name, process, "", log)
            self.procs.append(proc)
            proc.url = _wait_marker(name, process, log, "EMULATOR_PORT")
            out.append(proc)
        for proc in out:
            wait_ok(f"{proc.url}/sd-operator/ready")
        return out

    def gateway(
        self, backends: list[Proc] | list[str], *args: str, core: int | None = None, name: str = "gateway"
    ) -> Proc:
        """`sd-operator gateway` over `backends` (processes or URLs), ready once it has registered all."""
        urls = [b if isinstance(b, str) else b.url for b in backends]
        backends_file = self.tmp / f"{name}-backends.yaml"
        backends_file.write_text("backends:\n" + "".join(f"  - url: {u}\n" for u in urls))
        cmd = [SD_OPERATOR, "gateway", "--port", "0", "--backends-file", str(backends_file), *args]
        log = self.tmp / f"{name}.log"
        proc = Proc(name, _spawn(name, pinned(cmd, core), log), "", log)
        self.procs.append(proc)
        proc.url = _wait_marker(name, proc.process, log, "GATEWAY_PORT")
        # Ready once every backend has been probed and registered (the backends file is read at start).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException, ValueError):
                if len(requests.get(f"{proc.url}/v1/instances", timeout=2).json()) == len(backends):
                    return proc
            time.sleep(0.1)
        raise RuntimeError(f"gateway did not register {len(backends)} backends: {log.read_text()[-2000:]}")

    def nginx_stub(
        self, count: int, answers: dict[str, bytes], core: int | None = None, name: str = "nginx-stub"
    ) -> tuple[Proc, list[str]]:
        """One nginx serving `count` ports that answer each path in `answers` (any method) with its recorded
        JSON body, instantly: a WebUI stand-in that costs next to nothing, to find the gateway's own limit."""
        root = self.tmp / name
        root.mkdir(exist_ok=True)
        locations = ""
        for path, body in answers.items():
            text = body.decode()
            if "$" in text:
                raise ValueError(f"recorded answer of {path} contains '$', which nginx would interpolate")
            quoted = text.replace("\\", "\\\\").replace("'", "\\'")
            where = "/" if path == "*" else f"= {path}"
            locations += f"    location {where} {{ default_type application/json; return 200 '{quoted}'; }}\n"
        ports = [free_port() for _ in range(count)]
        servers = "".join(
            f"  server {{\n    listen 127.0.0.1:{port};\n    keepalive_requests 1000000;\n{locations}  }}\n"
            for port in ports
        )
        conf = root / "nginx.conf"
        conf.write_text(
            f"daemon off;\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/error.log;\n"
            "events { worker_connections 4096; }\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {root}/body;\n  proxy_temp_path {root}/proxy;\n"
            f"  fastcgi_temp_path {root}/fastcgi;\n  uwsgi_temp_path {root}/uwsgi;\n  scgi_temp_path {root}/scgi;\n"
            f"{servers}}}\n"
        )
        log = root / "stdout.log"
        process = _spawn("nginx", pinned([NGINX, "-c", str(conf), "-p", str(root)], core), log)
        proc = Proc(name, process, "", log)
        self.procs.append(proc)
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        proc.url = urls[0]
        for url in urls:
            deadline = time.monotonic() + 15
            while True:
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"{url}/sdapi/v1/sd-models", timeout=2).status_code == 200:
                        break
                if proc.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx stub did not start: {(root / 'error.log').read_text()[-2000:]}")
                time.sleep(0.05)
        return proc, urls

    def nginx_least_conn(self, backends: list[Proc], core: int | None = None) -> Proc:
        """nginx with a least_conn upstream over `backends` (keep-alive to them), on a free port."""
        if not Path(NGINX).exists():
            raise RuntimeError(f"{NGINX} is missing: apt-get install -y nginx-light")
        port = free_port()
        root = self.tmp / "nginx"
        root.mkdir(exist_ok=True)
        servers = "".join(f"    server {b.url.removeprefix('http://')};\n" for b in backends)
        conf = root / "nginx.conf"
        conf.write_text(
            f"daemon off;\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/error.log;\n"
            "events { worker_connections 4096; }\n"
            "http {\n  access_log off;\n"
            f"  client_body_temp_path {root}/body;\n  proxy_temp_path {root}/proxy;\n"
            f"  fastcgi_temp_path {root}/fastcgi;\n  uwsgi_temp_path {root}/uwsgi;\n  scgi_temp_path {root}/scgi;\n"
            f"  upstream sd {{\n    least_conn;\n{servers}    keepalive 64;\n  }}\n"
            f"  server {{\n    listen 127.0.0.1:{port};\n    client_max_body_size 64m;\n"
            "    location / {\n      proxy_pass http://sd;\n      proxy_http_version 1.1;\n"
            '      proxy_set_header Connection "";\n      proxy_read_timeout 3600s;\n    }\n  }\n}\n'
        )
        log = root / "stdout.log"
        proc = Proc("nginx", _spawn("nginx", pinned([NGINX, "-c", str(conf), "-p", str(root)], core), log), "", log)
        proc.url = f"http://127.0.0.1:{port}"
        self.procs.append(proc)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{proc.url}/sdapi/v1/progress", timeout=2).status_code == 200:
                    return proc
            if proc.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {(root / 'error.log').read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError("nginx did not answer")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_stats(proc: Proc) -> dict[str, Any]:
    return requests.get(f"{proc.url}/emulator/stats", timeout=5).json()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def summary_ms(latencies: list[float]) -> dict[str, float]:
    """p50/p99/mean/max of latencies given in seconds, in milliseconds."""
    if not latencies:
        return {"p50": float("nan"), "p99": float("nan"), "mean": float("nan"), "max": float("nan")}
    return {
        "p50": percentile(latencies, 50) * 1e3,
        "p99": percentile(latencies, 99) * 1e3,
        "mean": statistics.fmean(latencies) * 1e3,
        "max": max(latencies) * 1e3,
    }


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_times() -> dict[str, tuple[int, int]]:
    """Per core (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            out[name] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def background_busy(seconds: float = 2.0) -> dict[str, float]:
    """Busy % of each core while this benchmark runs nothing: other users of the machine skew every number."""
    before = cpu_times()
    time.sleep(seconds)
    after = cpu_times()
    return {core: round(100 * (after[core][0] - b[0]) / max(after[core][1] - b[1], 1), 1) for core, b in before.items()}


def wait_quiet(max_wait: float, threshold: float = 10.0) -> dict[str, float]:
    """Waits (at most `max_wait` s) until no core is busier than `threshold` % for a second; the last sample."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = background_busy(1.0)
        if max(busy.values(), default=0) <= threshold or time.monotonic() >= deadline:
            return busy


def sessions_cpu_seconds(sessions: set[int]) -> float:
    """CPU seconds (user + system) of all live processes in the given sessions (our process groups)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) in sessions:  # field 6 of /proc/<pid>/stat: the session id
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """How much CPU processes other than ours (the fleet, our children such as wrk, and this script)
    used during a measurement: other users of the machine skew latencies and throughput."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def _sample(self) -> tuple[float, float, float]:
        busy = sum(b for b, _ in cpu_times().values()) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        mine = sessions_cpu_seconds({p.process.pid for p in self.fleet.procs})
        mine += t.user + t.system + t.children_user + t.children_system
        return busy, mine, time.monotonic()

    def __enter__(self) -> ForeignLoad:
        self.start = self._sample()
        self.pct = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        busy, mine, now = self._sample()
        wall = max(now - self.start[2], 1e-9)
        self.pct = round(max(0.0, 100 * ((busy - self.start[0]) - (mine - self.start[1])) / wall), 1)


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
