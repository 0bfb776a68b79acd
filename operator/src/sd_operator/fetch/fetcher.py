"""`sd-operator fetch-model`: put the manifest's model files into the models folder, verified.

Runs as the WebUI pod's init container. Per file, under an exclusive lock shared by every pod that
mounts the same volume: skip it when a sidecar says it was verified and it has not changed since,
otherwise download into `.<name>.partial` (resuming), verify, fsync and rename into place.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sd_operator.fetch.manifest import CHECKPOINT_SUBDIR, FETCHED_KEY, FetchError, FileSpec, Manifest, load_manifest
from sd_operator.fetch.safetensors_check import check_safetensors
from sd_operator.fetch.sources import CHUNK, Options, PartialFile, Progress, human, safe_url, strip_queries, transfer
from sd_operator.termination import MAX_CHARS, write_termination_message

__all__ = ["FetchError", "FetchResult", "Options", "add_parser", "fetch_all", "fetch_file", "main"]

Log = Callable[[str], None]


def log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class FetchResult:
    name: str
    subdir: str
    path: Path
    size: int
    sha256: str
    status: Literal["fetched", "already present"]


@dataclass(frozen=True)
class _Paths:
    folder: Path
    final: Path
    partial: Path
    sidecar: Path
    lock: Path

    @classmethod
    def of(cls, models_dir: Path, spec: FileSpec) -> _Paths:
        folder = models_dir / spec.subdir
        n = spec.name
        # Dot-prefixed so the WebUI's model listing never shows a half-downloaded file.
        return cls(folder, folder / n, folder / f".{n}.partial", folder / f".{n}.verified", folder / f".{n}.lock")


def _source_id(spec: FileSpec) -> str:
    """Where the file came from, without secrets: without a sha256, a new source means a new file."""
    if spec.url is not None:
        return safe_url(spec.url)
    if spec.s3 is not None:
        return f"s3://{spec.s3.bucket}/{spec.s3.key}@{spec.s3.endpoint or 'aws'}"
    return f"file://{spec.path}"


@contextlib.contextmanager
def _locked(path: Path, name: str, log: Log) -> Iterator[None]:
    """An exclusive flock: pods sharing the volume take turns, and the second finds the file verified.
    The kernel drops the lock when the process dies, so a killed pod never leaves a stale lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{name}: another fetcher is working on it; waiting for its lock")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _verify(spec: FileSpec, path: Path, digest: str) -> None:
    if spec.sha256 and digest != spec.sha256:
        raise FetchError(f"sha256 mismatch for {spec.name}: expected {spec.sha256}, got {digest}")
    if spec.is_safetensors:
        check_safetensors(path, spec.name)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_sidecar(paths: _Paths, spec: FileSpec, digest: str) -> int:
    st = paths.final.stat()
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest, "source": _source_id(spec)}
    tmp = paths.sidecar.with_name(paths.sidecar.name + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, paths.sidecar)
    return st.st_size


def _read_sidecar(paths: _Paths) -> dict[str, object] | None:
    try:
        record = json.loads(paths.sidecar.read_text())
    except (OSError, ValueError):
        return None
    keys = {"size", "mtime_ns", "sha256", "source"}
    return record if isinstance(record, dict) and keys <= record.keys() else None


def _present(spec: FileSpec, paths: _Paths, log: Log) -> FetchResult | None:
    """The file as found on the volume, when it can be used; None when it has to be downloaded."""
    try:
        st = paths.final.stat()
    except FileNotFoundError:
        return None
    record = _read_sidecar(paths)
    unchanged = record is not None and (record["size"], record["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    if record is not None and not spec.sha256 and record["source"] != _source_id(spec):
        # Nothing to compare against but the source, and that changed: the old file is replaced.
        log(f"{spec.name}: the source changed since it was fetched; fetching it again")
        return None
    if record is not None and unchanged and (not spec.sha256 or record["sha256"] == spec.sha256):
        digest = str(record["sha256"])
    else:
        # Placed by someone else, changed since, or verified against another sha256: check the bytes.
        log(f"{spec.name}: present without a matching {paths.sidecar.name}; verifying it")
        digest = _hash_file(paths.final)
        try:
            _verify(spec, paths.final, digest)
        except FetchError as e:
            log(f"{spec.name}: the file present is not usable ({e}); fetching it again")
            paths.final.unlink()
            paths.sidecar.unlink(missing_ok=True)
            return None
        _write_sidecar(paths, spec, digest)
    log(f"already present {spec.subdir}/{spec.name}: {human(st.st_size)}, sha256 {digest}")
    return FetchResult(spec.name, spec.subdir, paths.final, st.st_size, digest, "already present")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _download(spec: FileSpec, paths: _Paths, env: Mapping[str, str], opts: Options, log: Log) -> FetchResult:
    progress = Progress(spec.name, log, opts.progress_interval)
    part = PartialFile(paths.partial, progress)
    started = time.monotonic()
    try:
        if have := part.open():
            log(f"{spec.name}: resuming after {human(have)} already downloaded")
        transfer(spec, part, env, opts, log)
        rate = progress.rate(part.size)  # of the transfer alone, before fsync and verification
        digest = part.finish()
    finally:
        part.close()  # the partial file stays: the next attempt resumes from it
    try:
        _verify(spec, paths.partial, digest)
    except FetchError:
        paths.partial.unlink(missing_ok=True)  # wrong bytes: resuming from them would fail again
        raise
    os.replace(paths.partial, paths.final)
    _fsync_dir(paths.folder)  # make the rename durable before the sidecar claims the file
    size = _write_sidecar(paths, spec, digest)
    secs = time.monotonic() - started
    log(f"fetched {spec.subdir}/{spec.name}: {human(size)}, sha256 {digest} ({secs:.1f} s, {rate:.1f} MB/s)")
    return FetchResult(spec.name, spec.subdir, paths.final, size, digest, "fetched")


def fetch_file(
    spec: FileSpec, models_dir: Path, env: Mapping[str, str], log: Log = log_stderr, opts: Options | None = None
) -> FetchResult:
    """Makes <models_dir>/<subdir>/<name> present and verified; raises FetchError otherwise."""
    if spec.is_pickle and not spec.allow_unsafe_pickle:
        raise FetchError(f"refusing pickle file {spec.name}: set allowUnsafePickle to load .ckpt/.pt files")
    paths = _Paths.of(models_dir, spec)
    paths.folder.mkdir(parents=True, exist_ok=True)
    with _locked(paths.lock, spec.name, log):
        return _present(spec, paths, log) or _download(spec, paths, env, opts or Options(), log)


def _scrub(message: str, secrets: Sequence[str]) -> str:
    """Last line of defence: no message leaves with a secret value or a URL query in it."""
    for value in secrets:
        message = message.replace(value, "***")
    return strip_queries(message)


def fetch_all(
    manifest: Manifest,
    models_dir: Path,
    env: Mapping[str, str] = os.environ,
    log: Log = log_stderr,
    *,
    options: Options | None = None,
) -> list[FetchResult]:
    """Fetches every file in order; stops at the first failure with a FetchError of one line."""
    secrets = [v for v in (env.get(n) for n in manifest.secret_envs()) if v]
    results = []
    for spec in manifest.files:
        try:
            results.append(fetch_file(spec, models_dir, env, log, options))
        except FetchError as e:
            raise FetchError(_scrub(str(e), secrets)) from None
        except OSError as e:  # disk full, permissions, ...
            where = f": {e.filename}" if e.filename else ""
            raise FetchError(_scrub(f"fetch of {spec.name} failed: {e.strerror or e}{where}", secrets)) from None
        except Exception as e:  # a bug or an unforeseen library error: still one line, still scrubbed
            raise FetchError(_scrub(f"fetch of {spec.name} failed: {type(e).__name__}: {e}", secrets)) from None
    return results


def command(args: argparse.Namespace) -> int:
    env = os.environ
    try:
        manifest = load_manifest(Path(args.manifest))
        results = fetch_all(manifest, Path(args.models_dir), env)
    except FetchError as e:
        line = str(e)
        log_stderr(line)
        write_termination_message(line, env)
        return 1
    log_stderr(f"{len(results)} model file(s) ready in {args.models_dir}")
    write_termination_message(fetched_summary(results), env)
    return 0


def fetched_summary(results: list[FetchResult]) -> str:
    """One JSON line with the sha256 of every file, for the termination message the operator reads (it
    holds 4 KiB: when every file does not fit, the checkpoints alone, whose hash the status reports)."""
    digests = {f"{r.subdir}/{r.name}": r.sha256 for r in results}
    line = json.dumps({FETCHED_KEY: digests}, separators=(",", ":"))
    if len(line) > MAX_CHARS:
        checkpoints = {k: v for k, v in digests.items() if k.startswith(f"{CHECKPOINT_SUBDIR}/")}
        line = json.dumps({FETCHED_KEY: checkpoints}, separators=(",", ":"))
    return line


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="fetch manifest (JSON), usually mounted from a ConfigMap")
    p.add_argument("--models-dir", required=True, help="models folder; files go to <models-dir>/<subdir>/<name>")
    p.set_defaults(func=command)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fetch-model", help="download and verify model files (the WebUI pod's init container)")
    _arguments(p)


def main(argv: Sequence[str] | None = None) -> int:
    """The fetch-model command on its own: `python -m sd_operator.fetch.fetcher --manifest M --models-dir D`."""
    parser = argparse.ArgumentParser(prog="sd-operator fetch-model", description=__doc__)
    _arguments(parser)
    return command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
