"""`make dev` end to end: the session comes up, the three commands it prints work as printed from
outside its network namespace, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from cluster_support import ROOT, free_port
from helpers import wait_for


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base() -> int:
    """Seven consecutive ports for the session's cluster, its API server's port free here too."""
    for _ in range(100):
        base = random.randrange(20000, 30000)  # noqa: S311 - a port number, not a secret
        if all(_free(base + i) for i in range(7)):
            return base
    raise AssertionError("no free port range")


def printed_commands(output: str) -> list[str]:
    """The commands under '# 1.', '# 2.', '# 3.', continuation lines joined."""
    commands = []
    for block in re.split(r"\n\s*# \d\. [^\n]*\n", output)[1:4]:
        lines = []
        for line in block.splitlines():
            if not line.strip():
                break
            lines.append(line.strip())
        commands.append("\n".join(lines))
    return commands


def session_processes(state: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(state) in cmdline:
                found.append(cmdline)
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="make dev needs root (network and mount namespaces)")
@pytest.mark.skipif(bool(os.environ.get("KUBECONFIG")), reason="make dev is this machine's tooling, not the cluster's")
def test_dev_session_prints_three_commands_that_work_and_stops_clean(tmp_path: Path) -> None:
    state = tmp_path / "state"
    gateway_port = free_port()
    env = {
        **os.environ,
        "SD_DEV_DIR": str(state),
        "SD_DEV_PORT_BASE": str(free_base()),
        "SD_DEV_GATEWAY_PORT": str(gateway_port),
        "SD_DEV_EXAMPLES": "examples/storage/claims.yaml examples/sdinstance-anime-sd15.yaml",
    }
    env.pop("KUBECONFIG", None)
    out_path = tmp_path / "dev.out"
    with out_path.open("wb") as out:
        dev = subprocess.Popen(
            [sys.executable, str(ROOT / "tools/dev.py")],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def printed() -> bool:
            if dev.poll() is not None:
                raise AssertionError(f"make dev exited: {out_path.read_text()[-3000:]}")
            return "Everything runs" in out_path.read_text()

        wait_for(printed, timeout=300, interval=0.5, what="the session to print its commands")
        time.sleep(0.5)  # the rest of the message
        commands = printed_commands(out_path.read_text())
        assert len(commands) == 3, out_path.read_text()

        work = tmp_path / "work"
        work.mkdir()
        run = {"shell": True, "cwd": work, "capture_output": True, "text": True, "timeout": 300}
        listed = subprocess.run(commands[0], check=False, **run)  # type: ignore[call-overload]
        assert listed.returncode == 0, listed.stderr
        assert re.search(r"sdinstance.sd-operator.dev/anime-sd15\s.*1/1\s+1\s+Ready", listed.stdout), listed.stdout

        generated = subprocess.run(commands[1], check=False, **run)  # type: ignore[call-overload]
        assert generated.returncode == 0 and "wrote txt2img.png" in generated.stdout, generated.stderr
        with Image.open(work / "txt2img.png") as image:
            assert image.format == "PNG"

        batch = subprocess.run(commands[2], check=False, **run)  # type: ignore[call-overload]
        assert batch.returncode == 0, batch.stdout + batch.stderr
        names = batch.stdout.split()
        assert (
            len([n for n in names if n.endswith(".png")]) == 6 and len([n for n in names if n.endswith(".json")]) == 6
        )
        assert (state / "dev/volumes/sd-outputs/batches/quick-look").is_dir()
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGINT)  # Ctrl-C
        code = dev.wait(timeout=180)
    assert code == 0, out_path.read_text()[-3000:]
    assert "nothing left running" in out_path.read_text()
    assert session_processes(state) == []
