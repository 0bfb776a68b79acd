"""Starts one container's process for the local pod runner, with the pod's volumes at their mount paths.

    python podexec.py SPEC.json

SPEC: {"root": dir, "mounts": [{"source", "target", "readOnly"}], "argv": [...], "env": {...},
"workingDir": str|null, "keep": [host paths that must stay visible, read-only]}.

The process gets a mount namespace of its own whose root is a tmpfs at `root` mirroring the host's
top-level entries (bind mounts and symlinks), with each volume bound at its mount path, and then
chroots into it. So `/models`, `/etc/sd-operator` or `/var/run/secrets/...` exist for this process
only: nothing is created on the host's file system outside `root`, and the programs run with exactly
the paths of the operator's rendered pod spec. A directory on the way to a mount path that mirrors a
host directory is "shadowed" first (a tmpfs holding mirrors of that directory's entries), so a mount
point can be created in it without touching the host. Needs root (CAP_SYS_ADMIN), as a kubelet does.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

CLONE_NEWNS = 0x00020000
PR_SET_PDEATHSIG = 1
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [s.encode() if s is not None else None for s in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], flags, enc[3]), f"mount {source} -> {target}")


def mirror(host_dir: str, view_dir: str) -> None:
    """Fills an empty directory of the view with the host directory's entries (binds and symlinks)."""
    for name in sorted(os.listdir(host_dir)):
        src, dst = os.path.join(host_dir, name), os.path.join(view_dir, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            os.mkdir(dst)
            mount(src, dst, None, MS_BIND | MS_REC)
        else:
            open(dst, "w").close()
            try:
                mount(src, dst, None, MS_BIND)
            except OSError:
                os.unlink(dst)  # sockets and such: leave them out


class View:
    """The container's file system view under `root`. Paths of the view are absolute ("/etc"); a view
    path is either still a bind of the host's path, or owned: a tmpfs of ours, or inside a volume."""

    def __init__(self, root: str):
        self.root = root
        mount("tmpfs", root, "tmpfs", 0, "mode=755")
        mirror("/", root)
        self.own: set[str] = {"/"}
        self.volumes: list[str] = []

    def owns(self, path: str) -> bool:
        return path in self.own or any(path == v or path.startswith(v + "/") for v in self.volumes)

    def ensure_dir(self, path: str) -> str:
        """Makes `path` a directory of the view (following symlinks) and returns its view path."""
        current = "/"
        parts = [p for p in path.split("/") if p]
        hops = 0
        while parts:
            name = parts.pop(0)
            candidate = os.path.normpath(os.path.join(current, name))
            where = self.root + candidate
            if os.path.islink(where):
                hops += 1
                if hops > 40:
                    raise OSError(f"too many symlinks on the way to {path}")
                target = os.readlink(where)
                parts = [p for p in target.split("/") if p] + parts
                current = "/" if target.startswith("/") else current
                continue
            if not os.path.exists(where):
                self.shadow(current)
                os.mkdir(where)
                self.own.add(candidate)
            current = candidate
        return current

    def shadow(self, path: str) -> None:
        """Replaces the host bind at `path` (and the ones above it) by a tmpfs of mirrors."""
        if self.owns(path):
            return
        self.shadow(os.path.dirname(path))
        where = self.root + path
        mount("tmpfs", where, "tmpfs", 0, "mode=755")
        mirror(path, where)
        self.own.add(path)

    def bind(self, source: str, target: str, read_only: bool) -> None:
        if os.path.isdir(source):
            at = self.ensure_dir(target)
        else:
            parent = self.ensure_dir(os.path.dirname(target))
            at = os.path.join(parent, os.path.basename(target))
            if not os.path.exists(self.root + at):
                self.shadow(parent)
                open(self.root + at, "w").close()
        where = self.root + at
        mount(source, where, None, MS_BIND | MS_REC)
        if read_only:
            mount(None, where, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_REC)
        self.volumes.append(at)


def main(spec_path: str) -> None:
    # If the runner dies (SIGKILL), its containers die with it instead of living on unsupervised.
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() == 1:
        sys.exit("podexec: the pod runner is gone")
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Nothing mounted here may propagate back to the host's mount namespace.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    view = View(spec["root"])
    # Parents first, so a volume inside another volume lands on top of it.
    for m in sorted(spec["mounts"], key=lambda m: m["target"].count("/")):
        view.bind(m["source"], m["target"], bool(m.get("readOnly")))
    # The programs themselves (the checkout, its virtualenv, the Python it points to) stay visible even
    # where a volume covers their parent, e.g. a checkout under /tmp in a pod with an emptyDir at /tmp.
    for path in spec.get("keep") or []:
        if any(path == v or path.startswith(v + "/") for v in view.volumes):
            view.bind(path, path, read_only=True)
    os.chroot(view.root)
    os.chdir(spec.get("workingDir") or "/")
    argv, env = spec["argv"], spec["env"]
    try:
        os.execvpe(argv[0], argv, env)  # noqa: S606 - the container's own command, as a runtime runs it
    except OSError as e:
        # What a container runtime reports as StartError; exit code 127/126 like a shell.
        print(f"podexec: cannot run {argv[0]!r}: {e.strerror}", file=sys.stderr, flush=True)
        os._exit(127 if isinstance(e, FileNotFoundError) else 126)


if __name__ == "__main__":
    main(sys.argv[1])
