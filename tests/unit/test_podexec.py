"""tools/cluster/podexec.py for real: a process in a mount namespace of its own, with the pod's volumes at
their mount paths (which need not exist on the host), its exact environment and working directory, and
nothing left behind on the host. Needs root (CAP_SYS_ADMIN), as the pod runner does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PODEXEC = ROOT / "tools" / "cluster" / "podexec.py"

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="podexec.py needs root (mount namespaces, bind mounts, chroot)",
)

# Paths a pod spec mounts to that must never appear on the host. Where one already exists on this machine
# (e.g. when the tests run inside a Kubernetes pod), only the others are checked.
HOST_PATHS = (
    "/models",
    "/etc/sd-e2e-test",
    "/run/secrets",
    "/var/run/secrets/kubernetes.io",
    "/dev/termination-log",
    "/srv/sd-e2e-test",
)
LISTED_DIRS = ("/", "/etc", "/dev", "/run", "/srv")
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "POD_NAME": "sd-a-0", "ODD": "a b=c $(X)"}


def run(spec: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "exec.json"
    path.write_text(json.dumps(spec))
    return subprocess.run(
        [sys.executable, str(PODEXEC), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def host_state() -> tuple[dict[str, bool], dict[str, set[str]], list[str]]:
    exists = {p: os.path.lexists(p) for p in HOST_PATHS}
    listings = {d: set(os.listdir(d)) for d in LISTED_DIRS if os.path.isdir(d)}
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    return exists, listings, mounts


@pytest.fixture
def pod(tmp_path: Path) -> dict[str, Path]:
    """Volume sources on the host, as the runner lays them out, and an empty root for the view."""
    dirs = {name: tmp_path / name for name in ("root", "models", "loras", "cfg", "sa", "opt", "out")}
    for d in dirs.values():
        d.mkdir()
    (dirs["models"] / "v1-5.safetensors").write_text("weights")
    (dirs["loras"] / "style.safetensors").write_text("lora")
    (dirs["cfg"] / "settings.yaml").write_text("mode: fast\n")
    (dirs["sa"] / "token").write_text("tok-123")
    (dirs["sa"] / "namespace").write_text("team-a")
    (dirs["opt"] / "only-in-volume").write_text("v")
    dirs["termlog"] = tmp_path / "termination-log"
    dirs["termlog"].write_text("")
    dirs["conf"] = tmp_path / "app.conf"
    dirs["conf"].write_text("key=value\n")
    return dirs


def mounts(pod: dict[str, Path]) -> list[dict[str, Any]]:
    # The nested volume comes first: podexec must still mount its parent first.
    return [
        {"source": str(pod["loras"]), "target": "/models/loras", "readOnly": False},
        {"source": str(pod["models"]), "target": "/models", "readOnly": False},
        {"source": str(pod["cfg"]), "target": "/etc/sd-e2e-test/cfg", "readOnly": True},
        {"source": str(pod["conf"]), "target": "/etc/sd-e2e-test/app.conf", "readOnly": True},
        {"source": str(pod["sa"]), "target": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True},
        {"source": str(pod["termlog"]), "target": "/dev/termination-log"},
        {"source": str(pod["opt"]), "target": "/opt"},  # over an existing host directory
        {"source": str(pod["out"]), "target": "/srv/sd-e2e-test/out"},
    ]


SCRIPT = r"""
set -u
echo "== models"; ls /models
echo "== loras"; ls /models/loras
echo "== cfg"; cat /etc/sd-e2e-test/cfg/settings.yaml
echo "== conf"; cat /etc/sd-e2e-test/app.conf
echo "== sa"; cat /var/run/secrets/kubernetes.io/serviceaccount/token; echo
echo "== sa via /run"; cat /run/secrets/kubernetes.io/serviceaccount/namespace; echo
echo "== opt"; ls /opt
echo "== pwd"; pwd
echo "== env"; tr '\0' '\n' < /proc/$$/environ | sort
echo "== writes"
echo lora-out > /models/loras/new.safetensors && echo "loras: ok"
echo model-out > /models/new.txt && echo "models: ok"
echo result > /srv/sd-e2e-test/out/result.txt && echo "out: ok"
if echo x > /etc/sd-e2e-test/cfg/evil 2>/dev/null; then echo "cfg: WRITABLE"; else echo "cfg: refused"; fi
if echo x > /var/run/secrets/kubernetes.io/serviceaccount/token 2>/dev/null; then echo "sa: WRITABLE"
else echo "sa: refused"; fi
if echo x >> /etc/sd-e2e-test/app.conf 2>/dev/null; then echo "conf: WRITABLE"; else echo "conf: refused"; fi
echo "model sha256 mismatch" > /dev/termination-log
echo "== end"
"""


def section(out: str, name: str) -> list[str]:
    lines = out.splitlines()
    start = lines.index(f"== {name}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("== ")), len(lines))
    return lines[start:end]


def test_volumes_env_and_working_dir_in_the_view(tmp_path: Path, pod: dict[str, Path]) -> None:
    before = host_state()
    spec = {
        "root": str(pod["root"]),
        "mounts": mounts(pod),
        "argv": ["sh", "-c", SCRIPT],
        "env": ENV,
        "workingDir": "/models/loras",
    }
    result = run(spec, tmp_path)
    out = result.stdout
    assert result.returncode == 0, (out, result.stderr)
    assert out.endswith("== end\n")  # the whole script ran

    # Every volume at its mount path, the nested one on top of its parent.
    assert section(out, "models") == ["loras", "v1-5.safetensors"]
    assert section(out, "loras") == ["style.safetensors"]
    assert section(out, "cfg") == ["mode: fast"]
    assert section(out, "conf") == ["key=value"]
    assert section(out, "sa") == ["tok-123"]
    assert section(out, "sa via /run") == ["team-a"]  # /var/run is the host's symlink to /run
    assert section(out, "opt") == ["only-in-volume"]  # the volume hides the host's /opt
    assert section(out, "pwd") == ["/models/loras"]

    # Exactly the spec's environment, nothing of the test process's.
    assert section(out, "env") == sorted(f"{k}={v}" for k, v in ENV.items())

    # Read-only mounts refuse writes; writable volumes write through to their host folders.
    assert section(out, "writes") == [
        "loras: ok",
        "models: ok",
        "out: ok",
        "cfg: refused",
        "sa: refused",
        "conf: refused",
    ]
    assert (pod["loras"] / "new.safetensors").read_text() == "lora-out\n"
    assert (pod["models"] / "new.txt").read_text() == "model-out\n"
    assert not (pod["models"] / "loras" / "new.safetensors").exists()  # went to the nested volume's source
    assert (pod["out"] / "result.txt").read_text() == "result\n"
    assert not (pod["cfg"] / "evil").exists()
    assert (pod["sa"] / "token").read_text() == "tok-123"
    assert pod["conf"].read_text() == "key=value\n"
    assert pod["termlog"].read_text() == "model sha256 mismatch\n"  # the file mount is the host's file
    assert sorted(p.name for p in pod["opt"].iterdir()) == ["only-in-volume"]

    assert_host_untouched(before, pod)


def assert_host_untouched(before: tuple[dict[str, bool], dict[str, set[str]], list[str]], pod: dict[str, Path]) -> None:
    exists, listings, mountinfo = before
    after_exists, after_listings, after_mountinfo = host_state()
    created = [p for p in HOST_PATHS if not exists[p] and after_exists[p]]
    assert created == [], f"podexec created {created} on the host"
    for d, names in listings.items():
        assert after_listings[d] - names == set(), f"new entries in the host's {d}"
    # The mounts lived in the process's namespace only: none is left in ours, the root is still empty.
    assert after_mountinfo == mountinfo
    assert not any(str(pod["root"]) in line for line in after_mountinfo)
    assert list(pod["root"].iterdir()) == []
    if os.path.isdir("/opt"):
        assert "only-in-volume" not in os.listdir("/opt")


def test_default_working_dir_is_the_root(tmp_path: Path, pod: dict[str, Path]) -> None:
    spec = {"root": str(pod["root"]), "mounts": [], "argv": ["sh", "-c", "pwd"], "env": ENV, "workingDir": None}
    result = run(spec, tmp_path)
    assert (result.returncode, result.stdout) == (0, "/\n"), result.stderr


def test_exit_code_and_output_pass_through(tmp_path: Path, pod: dict[str, Path]) -> None:
    spec = {
        "root": str(pod["root"]),
        "mounts": [{"source": str(pod["models"]), "target": "/models", "readOnly": True}],
        "argv": ["sh", "-c", "cat /models/v1-5.safetensors; echo oops >&2; exit 3"],
        "env": ENV,
        "workingDir": None,
    }
    result = run(spec, tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (3, "weights", "oops\n")


def test_a_missing_program_exits_127(tmp_path: Path, pod: dict[str, Path]) -> None:
    before = host_state()
    spec = {
        "root": str(pod["root"]),
        "mounts": mounts(pod),
        "argv": ["no-such-program-sd-e2e", "--flag"],
        "env": ENV,
        "workingDir": "/models",
    }
    result = run(spec, tmp_path)
    assert result.returncode == 127
    assert result.stdout == ""
    assert result.stderr == "podexec: cannot run 'no-such-program-sd-e2e': No such file or directory\n"
    assert_host_untouched(before, pod)


def test_a_program_that_is_not_executable_exits_126(tmp_path: Path, pod: dict[str, Path]) -> None:
    (pod["models"] / "run.sh").write_text("#!/bin/sh\necho never\n")  # no x bit
    spec = {
        "root": str(pod["root"]),
        "mounts": [{"source": str(pod["models"]), "target": "/models"}],
        "argv": ["/models/run.sh"],
        "env": ENV,
        "workingDir": None,
    }
    result = run(spec, tmp_path)
    assert result.returncode == 126
    assert result.stderr == "podexec: cannot run '/models/run.sh': Permission denied\n"


def test_program_is_found_on_the_specs_path(tmp_path: Path, pod: dict[str, Path]) -> None:
    tool = pod["models"] / "bin" / "pod-tool"
    tool.parent.mkdir()
    tool.write_text('#!/bin/sh\necho "pod-tool $*"\n')
    tool.chmod(0o755)
    spec = {
        "root": str(pod["root"]),
        "mounts": [{"source": str(pod["models"]), "target": "/models", "readOnly": True}],
        "argv": ["pod-tool", "a", "b c"],
        "env": {**ENV, "PATH": "/models/bin:/usr/bin:/bin"},
        "workingDir": None,
    }
    result = run(spec, tmp_path)
    assert (result.returncode, result.stdout) == (0, "pod-tool a b c\n"), result.stderr


def test_kept_paths_stay_visible_under_a_volume(tmp_path: Path, pod: dict[str, Path]) -> None:
    """A checkout under /tmp still runs in a pod whose emptyDir covers /tmp: `keep` binds it back, read-only."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "tool.sh").write_text("echo from the checkout\n")
    covering = tmp_path / "empty-tmp"
    covering.mkdir()
    spec = {
        "root": str(pod["root"]),
        "mounts": [{"source": str(covering), "target": str(tmp_path)}],
        "argv": ["sh", "-c", f"sh {checkout}/tool.sh; touch {checkout}/new 2>/dev/null || echo read-only"],
        "env": ENV,
        "keep": [str(checkout)],
    }
    done = run(spec, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["from the checkout", "read-only"]
    assert not (checkout / "new").exists()
    spec["keep"] = []
    hidden = run(spec, tmp_path)
    assert "from the checkout" not in hidden.stdout  # without keep, the volume hides it
