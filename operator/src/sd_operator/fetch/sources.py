"""Streaming one file from its source (http(s), S3 or a mounted volume) into its .partial file.

Downloads resume where a previous attempt (or a previous pod) stopped, with a Range request, and the
sha256 is computed while the bytes stream in, so a multi-GB checkpoint is read from disk only once.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3

from sd_operator.fetch.manifest import FetchError, FileSpec, S3Object

CHUNK = 1 << 20
Log = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    attempts: int = 5  # consecutive attempts without progress before giving up
    backoff: float = 2.0  # seconds before the first retry; doubles per failed attempt
    max_backoff: float = 60.0
    timeout: float = 60.0  # connect timeout and the longest wait for the next bytes
    progress_interval: float = 5.0


class Transient(Exception):
    """A failure worth retrying (connection lost, 5xx). The message must be safe to show."""

    def __init__(self, message: str, *, immediate: bool = False) -> None:
        super().__init__(message)
        self.immediate = immediate  # a restart from zero, not a failure: retry at once, uncounted


def safe_url(url: str) -> str:
    """The URL without credentials, query or fragment: signed URLs carry their secret in the query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def strip_queries(text: str) -> str:
    return re.sub(r"\?[^\s'\"()]*", "", text)


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def secret(env: Mapping[str, str], name: str, what: str, spec: FileSpec) -> str:
    value = env.get(name)
    if not value:
        raise FetchError(f"cannot fetch {spec.name}: environment variable {name} ({what}) is not set")
    return value


class Progress:
    """Progress lines at a bounded rate: every `interval` seconds or each 10%, whichever comes first."""

    def __init__(self, name: str, log: Log, interval: float) -> None:
        self.name, self.log, self.interval = name, log, interval
        self.total: int | None = None
        self.t0 = self.last = time.monotonic()
        self.base = 0
        self.next_pct = 10.0

    def start(self, done: int, total: int | None) -> None:
        self.t0 = self.last = time.monotonic()
        self.base, self.total = done, total
        self.next_pct = self._pct(done) // 10 * 10 + 10

    def _pct(self, done: int) -> float:
        return done * 100 / self.total if self.total else 0.0

    def rate(self, done: int) -> float:
        """MB/s over this run (bytes resumed from an earlier run don't count)."""
        return (done - self.base) / 1e6 / max(time.monotonic() - self.t0, 1e-6)

    def update(self, done: int) -> None:
        now = time.monotonic()
        pct = self._pct(done)
        if now - self.last < self.interval and (not self.total or pct < self.next_pct):
            return
        self.last = now
        of = f" / {human(self.total)} ({pct:.0f}%)" if self.total else ""
        self.log(f"{self.name}: {human(done)}{of} at {self.rate(done):.1f} MB/s")
        self.next_pct = pct // 10 * 10 + 10


class PartialFile:
    """The .partial file a download appends to, with the running sha256 of everything it holds."""

    def __init__(self, path: Path, progress: Progress) -> None:
        self.path, self.progress = path, progress
        self.size = 0
        self._hash = hashlib.sha256()
        self._fh: BinaryIO | None = None

    def open(self) -> int:
        """Opens for appending after hashing what an earlier attempt left; returns that size."""
        if self.path.exists():
            with self.path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    self._hash.update(chunk)
                    self.size += len(chunk)
        self._fh = self.path.open("ab")
        return self.size

    @property
    def fh(self) -> BinaryIO:
        if self._fh is None:
            raise RuntimeError("partial file is not open")
        return self._fh

    def restart(self) -> None:
        self.fh.truncate(0)
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.fh.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)
        self.progress.update(self.size)

    def digest(self) -> str:
        return self._hash.hexdigest()

    def finish(self) -> str:
        """Flushes to disk (so the rename that follows never exposes a half-written file) and returns the sha256."""
        self.fh.flush()
        os.fsync(self.fh.fileno())
        return self.digest()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def with_retries(spec: FileSpec, part: PartialFile, attempt: Callable[[], None], opts: Options, log: Log) -> None:
    """Runs `attempt` until it succeeds. Attempts that moved the download forward reset the count, so a
    flaky link still finishes a large file, while a dead one fails after `opts.attempts` tries."""
    failures = restarts = 0
    while True:
        before = part.size
        try:
            attempt()
            return
        except Transient as e:
            # A restart from zero is retried at once, but a server that keeps forcing them is broken.
            if e.immediate and (restarts := restarts + 1) <= 3:
                log(f"{spec.name}: {e}")
                continue
            failures = 1 if part.size > before else failures + 1
            if failures >= opts.attempts:
                raise FetchError(f"download of {spec.name} failed: {e} (after {failures} attempts)") from None
            delay = min(opts.backoff * 2 ** (failures - 1), opts.max_backoff)
            log(f"{spec.name}: {e}; retrying in {delay:.1f} s (attempt {failures + 1} of {opts.attempts})")
            time.sleep(delay)


def _reason(e: BaseException) -> str:
    """A short cause for a requests/botocore error: their messages embed request URLs (with queries)."""
    errno = re.search(r"\[Errno -?\d+\] [^'\")\]]*", str(e))
    return f"{type(e).__name__}: {errno.group(0).strip()}" if errno else type(e).__name__


def _received(chunks: Iterator[bytes], errors: tuple[type[BaseException], ...], where: str) -> Iterator[bytes]:
    """The chunks, with a read failure turned into a Transient. Only reading is guarded: an error while
    writing (a full disk) must not be retried."""
    it = iter(chunks)
    while True:
        try:
            chunk = next(it)
        except StopIteration:
            return
        except errors as e:
            raise Transient(f"{_reason(e)} {where}") from None
        yield chunk


def _read1(r: requests.Response) -> Iterator[bytes]:
    """The body as it arrives. Unlike iter_content, read1 hands over every byte received before the
    connection dropped, so the partial file keeps them and the resume starts exactly there."""
    while chunk := r.raw.read1(CHUNK, decode_content=False):
        yield chunk


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) of a Content-Range header such as `bytes 100-199/1000` or `bytes */1000`."""
    m = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not m:
        return None, None
    start, total = m.groups()
    return (int(start) if start else None), (int(total) if total and total != "*" else None)


def _http_start(r: requests.Response, have: int, spec: FileSpec, part: PartialFile, shown: str, log: Log) -> int | None:
    """Checks a response's status and positions the partial file to match; returns the full size if known."""
    code = r.status_code
    length = r.headers.get("Content-Length")
    if code in (200, 206) and r.headers.get("Content-Encoding", "identity") != "identity":
        encoding = r.headers["Content-Encoding"]
        raise FetchError(f"download of {spec.name} failed: {shown} sent a {encoding}-encoded body, not the file")
    if code == 416 and have:
        _, total = _content_range(r.headers.get("Content-Range"))
        if total == have:  # an earlier attempt got every byte but did not get to finish
            return have
        part.restart()
        raise Transient(f"server refused to resume at byte {have} (size {total}); restarting", immediate=True)
    if code == 206:
        start, total = _content_range(r.headers.get("Content-Range"))
        if start != have:
            part.restart()
            raise Transient(f"server resumed at byte {start}, not {have}; restarting", immediate=True)
        return total
    if code == 200:
        if have:
            log(f"{spec.name}: server ignored the Range request; downloading from the start")
            part.restart()
        return int(length) if length and length.isdigit() else None
    if code in (408, 425, 429) or code >= 500:
        raise Transient(f"HTTP {code} from {shown}")
    raise FetchError(f"download of {spec.name} failed: HTTP {code} from {shown}")


def http_download(spec: FileSpec, part: PartialFile, env: Mapping[str, str], opts: Options, log: Log) -> None:
    assert spec.url is not None
    url, shown = spec.url, safe_url(spec.url)
    # identity: a compressed response would make Content-Length and Range offsets refer to other bytes.
    headers = {"Accept-Encoding": "identity"}
    for header, ref in spec.headers.items():
        headers[header] = ref.prefix + secret(env, ref.env, f"header {header}", spec)
    session = requests.Session()

    def attempt() -> None:
        have = part.size
        ranged = {"Range": f"bytes={have}-"} if have else {}
        total: int | None = None
        try:
            with session.get(url, headers=headers | ranged, stream=True, timeout=opts.timeout) as r:
                total = _http_start(r, have, spec, part, shown, log)
                if r.status_code == 416:  # _http_start found the partial file already complete
                    return
                part.progress.start(part.size, total)
                for chunk in _received(_read1(r), (urllib3.exceptions.HTTPError, OSError), f"from {shown}"):
                    part.write(chunk)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            raise Transient(f"{_reason(e)} from {shown}") from None
        except requests.RequestException as e:
            raise FetchError(f"download of {spec.name} failed: {_reason(e)} from {shown}") from None
        if total is not None and part.size != total:
            raise Transient(f"connection closed after {part.size} of {total} bytes from {shown}")

    try:
        with_retries(spec, part, attempt, opts, log)
    finally:
        session.close()


def _s3_client(spec: FileSpec, src: S3Object, env: Mapping[str, str], opts: Options) -> Any:
    import boto3  # imported here: only S3 sources pay for botocore's start-up
    from botocore.config import Config

    creds: dict[str, str] = {}
    if src.access_key_env and src.secret_key_env:
        creds["aws_access_key_id"] = secret(env, src.access_key_env, "accessKeyEnv", spec)
        creds["aws_secret_access_key"] = secret(env, src.secret_key_env, "secretKeyEnv", spec)
    # Otherwise boto3's default chain (pod identity, AWS_* variables, ...). Retries are ours, so resumes work.
    config = Config(connect_timeout=opts.timeout, read_timeout=opts.timeout, retries={"max_attempts": 1})
    session = boto3.session.Session()  # the default session is not thread-safe
    return session.client("s3", endpoint_url=src.endpoint, region_name=src.region, config=config, **creds)


def s3_download(spec: FileSpec, part: PartialFile, env: Mapping[str, str], opts: Options, log: Log) -> None:
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        ConnectionError,
        IncompleteReadError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    src = spec.s3
    assert src is not None
    shown = f"s3://{src.bucket}/{src.key}" + (f" at {safe_url(src.endpoint)}" if src.endpoint else "")
    client = _s3_client(spec, src, env, opts)
    transient = (ConnectionError, ConnectionClosedError, ReadTimeoutError, IncompleteReadError, ResponseStreamingError)

    def attempt() -> None:
        have = part.size
        try:
            resp = client.get_object(Bucket=src.bucket, Key=src.key, **({"Range": f"bytes={have}-"} if have else {}))
        except ClientError as e:
            error, status = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
            code, http = error.get("Code", "error"), int(status.get("HTTPStatusCode", 0))
            if http == 416 and have:
                size = int(client.head_object(Bucket=src.bucket, Key=src.key)["ContentLength"])
                if size == have:  # an earlier attempt got every byte but did not get to finish
                    return
                part.restart()
                raise Transient(f"cannot resume at byte {have} (size {size}); restarting", immediate=True) from None
            if http >= 500 or code in ("SlowDown", "RequestTimeout"):
                raise Transient(f"S3 {code} for {shown}") from None
            raise FetchError(f"download of {spec.name} failed: S3 {code} (HTTP {http}) for {shown}") from None
        except (NoCredentialsError, PartialCredentialsError):
            raise FetchError(
                f"download of {spec.name} failed: no S3 credentials for {shown} "
                "(name accessKeyEnv/secretKeyEnv or give the pod an identity)"
            ) from None
        except transient as e:
            raise Transient(f"{_reason(e)} for {shown}") from None
        except BotoCoreError as e:
            raise FetchError(f"download of {spec.name} failed: {_reason(e)} for {shown}") from None
        start, total = _content_range(resp.get("ContentRange"))
        if have and start != have:  # the store ignored the Range: take the whole object
            part.restart()
        if total is None:
            total = int(resp["ContentLength"])
        part.progress.start(part.size, total)
        # Some bytes of a chunk cut short are dropped here; the resume simply asks for them again.
        for chunk in _received(resp["Body"].iter_chunks(CHUNK), (*transient, OSError), f"for {shown}"):
            part.write(chunk)
        if part.size != total:
            raise Transient(f"stream ended after {part.size} of {total} bytes for {shown}")

    with_retries(spec, part, attempt, opts, log)


def copy_from_volume(spec: FileSpec, part: PartialFile) -> None:
    """Copies from a mounted volume. Always from the start: a local copy is cheap, and resuming would
    silently mix two versions if the source file was replaced in between."""
    assert spec.path is not None
    src = Path(spec.path)
    try:
        f = src.open("rb")
    except OSError as e:
        raise FetchError(f"copy of {spec.name} failed: {e.strerror}: {src}") from None
    with f:
        total = os.fstat(f.fileno()).st_size
        part.restart()
        part.progress.start(0, total)
        while chunk := f.read(CHUNK):
            part.write(chunk)


def transfer(spec: FileSpec, part: PartialFile, env: Mapping[str, str], opts: Options, log: Log) -> None:
    if spec.url is not None:
        http_download(spec, part, env, opts, log)
    elif spec.s3 is not None:
        s3_download(spec, part, env, opts, log)
    else:
        copy_from_volume(spec, part)
