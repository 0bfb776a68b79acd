"""The model fetcher against real sockets: a local HTTP server, a moto S3 server and real safetensors files."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import requests
from safetensors.numpy import save_file

from helpers import wait_for
from sd_operator.fetch import fetcher
from sd_operator.fetch.fetcher import FetchError, Options, fetch_all
from sd_operator.fetch.manifest import Manifest, fetched_digests, parse_manifest
from sd_operator.fetch.safetensors_check import check_safetensors
from sd_operator.termination import MAX_CHARS

pytestmark = pytest.mark.timeout(60)

FAST = Options(attempts=3, backoff=0.01, timeout=10)
TOKEN = "hf_s3cr3t-T0ken-do-not-leak"
SUBDIR = "Stable-diffusion"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_safetensors(path: Path, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    tensors = {"w": rng.standard_normal((32, 32)).astype(np.float32), "b": np.arange(16, dtype=np.int64)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path.read_bytes()


@pytest.fixture
def model(tmp_path: Path) -> bytes:
    return make_safetensors(tmp_path / "source.safetensors")


# --- a local HTTP file server ----------------------------------------------------------------------------------------


@dataclass
class Served:
    files: dict[str, bytes] = field(default_factory=dict)
    token: str | None = None  # when set, `Authorization: Bearer <token>` is required
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> absolute offset; the next response stops there
    fail_next: dict[str, list[int]] = field(default_factory=dict)  # path -> statuses to answer before serving
    ignore_range: bool = False
    gate: threading.Event = field(default_factory=threading.Event)  # the body is sent once this is set
    requests: list[dict[str, str]] = field(default_factory=list)

    def count(self, path: str) -> int:
        return sum(1 for r in self.requests if r["path"].split("?")[0] == path)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in (headers | {"Content-Length": str(len(body))}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        state: Served = self.server.state  # type: ignore[attr-defined]
        path = self.path.split("?")[0]
        state.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        if state.token and self.headers.get("Authorization") != f"Bearer {state.token}":
            return self._reply(401, {}, b"unauthorized")
        if state.fail_next.get(path):
            return self._reply(state.fail_next[path].pop(0), {}, b"try again")
        data = state.files.get(path)
        if data is None:
            return self._reply(404, {}, b"not found")
        start, status, headers = 0, 200, {"Content-Type": "application/octet-stream"}
        rng = self.headers.get("Range")
        if rng and not state.ignore_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                return self._reply(416, {"Content-Range": f"bytes */{len(data)}"})
            status, headers["Content-Range"] = 206, f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        state.gate.wait(timeout=30)
        cut = state.cut_after.pop(path, None)
        self.send_response(status)
        for k, v in (headers | {"Content-Length": str(len(body))}).items():
            self.send_header(k, v)
        self.end_headers()
        if cut is None:
            self.wfile.write(body)
            return
        # The connection drops mid-body: the client got `cut` bytes of the file in all.
        self.wfile.write(body[: cut - start])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def http() -> Iterator[tuple[Served, str]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Served()
    state.gate.set()
    server.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "termination-log"
    monkeypatch.setenv("SD_TERMINATION_LOG", str(path))
    return path


def manifest(**file: Any) -> Manifest:
    return Manifest.model_validate({"files": [{"name": "model.safetensors", "subdir": SUBDIR} | file]})


class Log(list[str]):
    def __call__(self, line: str) -> None:
        self.append(line)


# --- http(s) ---------------------------------------------------------------------------------------------------------


def test_download_verifies_sha256_and_writes_the_sidecar(
    tmp_path: Path, http: tuple[Served, str], model: bytes
) -> None:
    state, base = http
    state.files["/m.safetensors"] = model
    log = Log()
    models = tmp_path / "models"
    [result] = fetch_all(manifest(url=f"{base}/m.safetensors", sha256=sha(model)), models, {}, log, options=FAST)
    final = models / SUBDIR / "model.safetensors"
    assert result.status == "fetched" and result.sha256 == sha(model) and result.path == final
    assert final.read_bytes() == model
    assert not (models / SUBDIR / ".model.safetensors.partial").exists()
    sidecar = json.loads((models / SUBDIR / ".model.safetensors.verified").read_text())
    st = final.stat()
    assert sidecar == {
        "size": len(model),
        "mtime_ns": st.st_mtime_ns,
        "sha256": sha(model),
        "source": sidecar["source"],
    }
    assert any(line.startswith(f"fetched {SUBDIR}/model.safetensors:") and sha(model) in line for line in log)
    assert any("(100%)" in line and "MB/s" in line for line in log)


def test_a_second_run_neither_downloads_nor_rehashes(tmp_path: Path, http: tuple[Served, str], model: bytes) -> None:
    state, base = http
    state.files["/m.safetensors"] = model
    spec = manifest(url=f"{base}/m.safetensors", sha256=sha(model))
    fetch_all(spec, tmp_path, {}, Log(), options=FAST)
    log = Log()
    [again] = fetch_all(spec, tmp_path, {}, log, options=FAST)
    assert again.status == "already present"
    assert state.count("/m.safetensors") == 1
    assert not any("verifying" in line for line in log)
    # Touched (mtime changed) but intact: re-verified from the bytes, still not downloaded.
    final = tmp_path / SUBDIR / "model.safetensors"
    os.utime(final, ns=(1, 1))
    log = Log()
    assert fetch_all(spec, tmp_path, {}, log, options=FAST)[0].status == "already present"
    assert any("verifying" in line for line in log) and state.count("/m.safetensors") == 1
    # Damaged in place: downloaded again.
    final.write_bytes(model[:-1] + b"\0")
    assert fetch_all(spec, tmp_path, {}, Log(), options=FAST)[0].status == "fetched"
    assert final.read_bytes() == model and state.count("/m.safetensors") == 2


def test_a_new_sha256_or_a_new_source_replaces_the_file(tmp_path: Path, http: tuple[Served, str], model: bytes) -> None:
    state, base = http
    newer = make_safetensors(tmp_path / "newer.safetensors", seed=1)
    state.files |= {"/m.safetensors": model, "/v2.safetensors": newer}
    final = tmp_path / SUBDIR / "model.safetensors"
    fetch_all(manifest(url=f"{base}/m.safetensors", sha256=sha(model)), tmp_path, {}, Log(), options=FAST)
    state.files["/m.safetensors"] = newer  # same URL, new content, and the manifest pins the new sha256
    [result] = fetch_all(manifest(url=f"{base}/m.safetensors", sha256=sha(newer)), tmp_path, {}, Log(), options=FAST)
    assert result.status == "fetched" and final.read_bytes() == newer
    # Without a sha256 only the source tells versions apart: another URL means another file.
    fetch_all(manifest(url=f"{base}/m.safetensors"), tmp_path, {}, Log(), options=FAST)
    assert state.count("/m.safetensors") == 2
    state.files["/v2.safetensors"] = model
    assert fetch_all(manifest(url=f"{base}/v2.safetensors"), tmp_path, {}, Log(), options=FAST)[0].status == "fetched"
    assert final.read_bytes() == model


def test_sha256_mismatch_is_one_line_removes_the_file_and_exits_non_zero(
    tmp_path: Path, http: tuple[Served, str], model: bytes, capsys: pytest.CaptureFixture[str], termination_log: Path
) -> None:
    state, base = http
    state.files["/m.safetensors"] = model
    wrong = "0" * 64
    path = tmp_path / "manifest.json"
    spec = {"name": "sd_xl_base_1.0.safetensors", "subdir": SUBDIR, "url": f"{base}/m.safetensors", "sha256": wrong}
    path.write_text(json.dumps({"files": [spec]}))
    assert fetcher.main(["--manifest", str(path), "--models-dir", str(tmp_path / "models")]) == 1
    line = f"sha256 mismatch for sd_xl_base_1.0.safetensors: expected {wrong}, got {sha(model)}"
    assert capsys.readouterr().err.splitlines()[-1] == line
    assert termination_log.read_text() == line + "\n"
    left = {p.name for p in (tmp_path / "models" / SUBDIR).iterdir()}
    assert left == {".sd_xl_base_1.0.safetensors.lock"}  # neither the file nor its partial download


def test_main_succeeds_and_add_parser_registers_fetch_model(tmp_path: Path, http: tuple[Served, str]) -> None:
    import argparse

    state, base = http
    state.files["/c.yaml"] = b"model: {}\n"
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"files": [{"name": "c.yaml", "subdir": "Stable-diffusion", "url": f"{base}/c.yaml"}]}))
    parser = argparse.ArgumentParser()
    fetcher.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fetch-model", "--manifest", str(path), "--models-dir", str(tmp_path / "m")])
    assert args.func(args) == 0
    assert (tmp_path / "m" / "Stable-diffusion" / "c.yaml").read_bytes() == b"model: {}\n"


def test_success_leaves_every_files_sha256_for_the_status(
    tmp_path: Path, http: tuple[Served, str], model: bytes, termination_log: Path
) -> None:
    state, base = http
    state.files["/m.safetensors"] = model
    state.files["/l.yaml"] = b"trigger: ohwx\n"
    files = [
        {"name": "m.safetensors", "subdir": SUBDIR, "url": f"{base}/m.safetensors"},
        {"name": "l.yaml", "subdir": "Lora", "url": f"{base}/l.yaml"},
    ]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"files": files}))
    assert fetcher.main(["--manifest", str(path), "--models-dir", str(tmp_path / "models")]) == 0
    digests = fetched_digests(termination_log.read_text())
    assert digests == {f"{SUBDIR}/m.safetensors": sha(model), "Lora/l.yaml": sha(b"trigger: ohwx\n")}


def test_a_summary_too_long_for_the_message_keeps_the_checkpoints() -> None:
    def result(subdir: str, name: str) -> fetcher.FetchResult:
        return fetcher.FetchResult(name, subdir, Path(name), 1, "ab" * 32, "fetched")

    results = [result(SUBDIR, "ckpt.safetensors")] + [result("Lora", f"lora-{i:03}.safetensors") for i in range(60)]
    line = fetcher.fetched_summary(results)
    assert len(line) <= MAX_CHARS and fetched_digests(line) == {f"{SUBDIR}/ckpt.safetensors": "ab" * 32}
    assert len(fetcher.fetched_summary(results[:5])) < MAX_CHARS  # all five fit: all five are listed
    assert len(fetched_digests(fetcher.fetched_summary(results[:5]))) == 5


def test_http_errors_name_the_file_status_and_url_without_query(tmp_path: Path, http: tuple[Served, str]) -> None:
    _, base = http
    with pytest.raises(FetchError) as err:
        fetch_all(manifest(url=f"{base}/nope.safetensors?X-Signature=abc123"), tmp_path, {}, Log(), options=FAST)
    assert str(err.value) == f"download of model.safetensors failed: HTTP 404 from {base}/nope.safetensors"


def test_5xx_is_retried(tmp_path: Path, http: tuple[Served, str], model: bytes) -> None:
    state, base = http
    state.files["/m.safetensors"] = model
    state.fail_next["/m.safetensors"] = [503, 502]
    log = Log()
    assert fetch_all(manifest(url=f"{base}/m.safetensors"), tmp_path, {}, log, options=FAST)[0].sha256 == sha(model)
    assert state.count("/m.safetensors") == 3
    assert any("HTTP 503" in line and "retrying" in line for line in log)


def test_connection_refused_gives_up_after_bounded_attempts(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(FetchError) as err:
        fetch_all(manifest(url=f"http://127.0.0.1:{port}/m.safetensors"), tmp_path, {}, Log(), options=FAST)
    assert str(err.value).startswith("download of model.safetensors failed: ConnectionError")
    assert str(err.value).endswith(f"from http://127.0.0.1:{port}/m.safetensors (after 3 attempts)")


# --- resuming --------------------------------------------------------------------------------------------------------


def test_an_interrupted_download_resumes_with_a_range_request(
    tmp_path: Path, http: tuple[Served, str], model: bytes
) -> None:
    state, base = http
    state.files["/m.safetensors"] = model
    state.cut_after["/m.safetensors"] = 1000
    spec = manifest(url=f"{base}/m.safetensors", sha256=sha(model))
    [result] = fetch_all(spec, tmp_path, {}, Log(), options=FAST)
    assert [r.get("range") for r in state.requests] == [None, "bytes=1000-"]
    assert result.sha256 == sha(model) and (tmp_path / SUBDIR / "model.safetensors").read_bytes() == model


def test_the_partial_file_survives_a_failed_run_and_the_next_run_resumes(
    tmp_path: Path, http: tuple[Served, str], model: bytes
) -> None:
    state, base = http
    state.files["/m.safetensors"] = model
    state.cut_after["/m.safetensors"] = 2048
    spec = manifest(url=f"{base}/m.safetensors", sha256=sha(model))
    with pytest.raises(FetchError, match=r"^download of model.safetensors failed: .*after 1 attempts\)$"):
        fetch_all(spec, tmp_path, {}, Log(), options=Options(attempts=1))
    assert (tmp_path / SUBDIR / ".model.safetensors.partial").read_bytes() == model[:2048]
    log = Log()
    assert fetch_all(spec, tmp_path, {}, log, options=FAST)[0].sha256 == sha(model)
    assert state.requests[-1]["range"] == "bytes=2048-"
    assert any("resuming after 2.0 kB" in line for line in log)


def test_a_complete_partial_file_answered_416_is_finished(
    tmp_path: Path, http: tuple[Served, str], model: bytes
) -> None:
    state, base = http
    state.files["/m.safetensors"] = model
    (tmp_path / SUBDIR).mkdir()
    (tmp_path / SUBDIR / ".model.safetensors.partial").write_bytes(model)
    [result] = fetch_all(manifest(url=f"{base}/m.safetensors", sha256=sha(model)), tmp_path, {}, Log(), options=FAST)
    assert result.status == "fetched" and state.requests[0]["range"] == f"bytes={len(model)}-"


def test_a_server_ignoring_range_restarts_from_zero(tmp_path: Path, http: tuple[Served, str], model: bytes) -> None:
    state, base = http
    state.files["/m.safetensors"] = model
    state.ignore_range = True
    (tmp_path / SUBDIR).mkdir()
    (tmp_path / SUBDIR / ".model.safetensors.partial").write_bytes(b"stale bytes from another version")
    [result] = fetch_all(manifest(url=f"{base}/m.safetensors", sha256=sha(model)), tmp_path, {}, Log(), options=FAST)
    assert result.sha256 == sha(model) and (tmp_path / SUBDIR / "model.safetensors").read_bytes() == model


# --- secrets ---------------------------------------------------------------------------------------------------------


def test_bearer_token_comes_from_env_and_never_shows(
    tmp_path: Path, http: tuple[Served, str], model: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    state, base = http
    state.files["/m.safetensors"] = model
    state.token = TOKEN
    headers = {"Authorization": {"env": "SD_SECRET_0", "prefix": "Bearer "}}
    spec = manifest(url=f"{base}/m.safetensors?token={TOKEN}", headers=headers)
    log = Log()
    fetch_all(spec, tmp_path / "a", {"SD_SECRET_0": TOKEN}, log, options=FAST)
    assert state.requests[0]["authorization"] == f"Bearer {TOKEN}"
    # A wrong token: the error names the status and URL, neither the token nor the URL's query.
    with pytest.raises(FetchError) as err:
        fetch_all(spec, tmp_path / "b", {"SD_SECRET_0": "wrong-" + TOKEN}, log, options=FAST)
    assert str(err.value) == f"download of model.safetensors failed: HTTP 401 from {base}/m.safetensors"
    with pytest.raises(FetchError, match=r"environment variable SD_SECRET_0 \(header Authorization\) is not set"):
        fetch_all(spec, tmp_path / "c", {}, log, options=FAST)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"files": [spec.model_dump(by_alias=True)]}))
    os.environ["SD_SECRET_0"] = "bad-" + TOKEN
    try:
        assert fetcher.main(["--manifest", str(path), "--models-dir", str(tmp_path / "d")]) == 1
    finally:
        del os.environ["SD_SECRET_0"]
    out = capsys.readouterr()
    for text in [*log, out.out, out.err, str(err.value), (tmp_path / "termination-log").read_text()]:
        assert TOKEN not in text
    assert all(TOKEN not in p.read_text() for p in tmp_path.rglob(".*.verified"))


# --- file format checks ----------------------------------------------------------------------------------------------


def test_a_truncated_safetensors_download_is_refused_and_removed(
    tmp_path: Path, http: tuple[Served, str], model: bytes
) -> None:
    state, base = http
    state.files["/m.safetensors"] = model[:-100]
    with pytest.raises(FetchError) as err:
        fetch_all(manifest(url=f"{base}/m.safetensors"), tmp_path, {}, Log(), options=FAST)
    assert str(err.value).startswith("invalid safetensors file model.safetensors: truncated: tensor ")
    assert "beyond the data section" in str(err.value)
    assert {p.name for p in (tmp_path / SUBDIR).iterdir()} == {".model.safetensors.lock"}


def _header_len(data: bytes) -> int:
    return int(struct.unpack("<Q", data[:8])[0])


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda d: d[:8] + b"{" + b"x" * (_header_len(d) - 1) + d[8 + _header_len(d) :], "header is not valid JSON"),
        (lambda d: struct.pack("<Q", 1 << 40) + d[8:], "header length 1099511627776 is implausible"),
        (lambda d: d[:8] + b"[" + b" " * (_header_len(d) - 2) + b"]" + d[8 + _header_len(d) :], "not a JSON object"),
        (lambda d: d + b"junk", "4 bytes of trailing data after the last tensor"),
        (lambda d: d[:5], "truncated: 5 bytes"),
        (lambda d: d.replace(b'"F32"', b'"F99"'), "tensor w: unknown dtype 'F99'"),
        (lambda d: d.replace(b"[32,32]", b"[32,31]"), "tensor w: 4096 bytes of data for shape [32, 31] F32"),
    ],
)
def test_corrupt_safetensors_files_are_named_with_a_reason(
    tmp_path: Path, model: bytes, corrupt: Any, reason: str
) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(corrupt(model))
    with pytest.raises(FetchError) as err:
        check_safetensors(path, "x.safetensors")
    assert str(err.value).startswith("invalid safetensors file x.safetensors: ")
    assert reason in str(err.value)


def test_a_valid_file_passes_the_check(tmp_path: Path, model: bytes) -> None:
    info = check_safetensors(tmp_path / "source.safetensors")
    assert info.tensors == 2 and info.metadata == {"format": "pt"} and info.data_bytes == 32 * 32 * 4 + 16 * 8


def test_a_corrupt_header_over_http_is_deleted(tmp_path: Path, http: tuple[Served, str], model: bytes) -> None:
    state, base = http
    state.files["/m.safetensors"] = struct.pack("<Q", 1 << 40) + model[8:]
    with pytest.raises(FetchError, match=r"^invalid safetensors file model\.safetensors: header length"):
        fetch_all(manifest(url=f"{base}/m.safetensors"), tmp_path, {}, Log(), options=FAST)
    assert not (tmp_path / SUBDIR / ".model.safetensors.partial").exists()


def test_pickle_is_refused_unless_allowed(tmp_path: Path, http: tuple[Served, str]) -> None:
    state, base = http
    payload = pickle.dumps({"state_dict": {"w": [1.0, 2.0]}})
    state.files["/model.ckpt"] = payload
    spec = {"name": "model.ckpt", "url": f"{base}/model.ckpt"}
    with pytest.raises(FetchError) as err:
        fetch_all(manifest(**spec), tmp_path, {}, Log(), options=FAST)
    assert str(err.value) == "refusing pickle file model.ckpt: set allowUnsafePickle to load .ckpt/.pt files"
    assert state.requests == [] and not (tmp_path / SUBDIR / "model.ckpt").exists()
    [result] = fetch_all(manifest(**spec, allowUnsafePickle=True), tmp_path, {}, Log(), options=FAST)
    assert result.status == "fetched" and (tmp_path / SUBDIR / "model.ckpt").read_bytes() == payload


def test_a_pickle_named_safetensors_fails_the_header_check(tmp_path: Path, http: tuple[Served, str]) -> None:
    state, base = http
    state.files["/m.safetensors"] = pickle.dumps(list(range(1000)))
    with pytest.raises(FetchError, match=r"^invalid safetensors file model\.safetensors: header length"):
        fetch_all(manifest(url=f"{base}/m.safetensors"), tmp_path, {}, Log(), options=FAST)


# --- volume copy and manifest ----------------------------------------------------------------------------------------


def test_copy_from_a_mounted_volume(tmp_path: Path, model: bytes) -> None:
    src = tmp_path / "sources" / "claim-a" / "models" / "x.safetensors"
    src.parent.mkdir(parents=True)
    src.write_bytes(model)
    [result] = fetch_all(manifest(path=str(src), sha256=sha(model)), tmp_path / "m", {}, Log(), options=FAST)
    assert result.status == "fetched" and (tmp_path / "m" / SUBDIR / "model.safetensors").read_bytes() == model
    with pytest.raises(FetchError) as err:
        fetch_all(manifest(name="y.safetensors", path=str(src) + ".gone"), tmp_path / "m", {}, Log(), options=FAST)
    assert str(err.value) == f"copy of y.safetensors failed: No such file or directory: {src}.gone"


@pytest.mark.parametrize(
    ("file", "message"),
    [
        ({"url": "http://h/x", "path": "/x"}, "model.safetensors: set exactly one of url, s3 or path (got url, path)"),
        ({}, "model.safetensors: set exactly one of url, s3 or path (got none)"),
        ({"s3": {"bucket": "b", "key": "k", "accessKeyEnv": "A"}}, "set both accessKeyEnv and secretKeyEnv"),
        ({"path": "/x", "name": "../x.safetensors"}, "files.0.name"),
        ({"path": "/x", "subdir": "../etc"}, "files.0.subdir"),
        ({"path": "/x", "sha256": "abc"}, "files.0.sha256"),
    ],
)
def test_manifest_validation_is_one_clear_line(file: dict[str, Any], message: str) -> None:
    text = json.dumps({"files": [{"name": "model.safetensors", "subdir": SUBDIR} | file]})
    with pytest.raises(FetchError) as err:
        parse_manifest(text, "m.json")
    assert str(err.value).startswith("invalid fetch manifest m.json: ") and message in str(err.value)
    assert "\n" not in str(err.value)


# --- S3 (moto server) ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(endpoint, timeout=1).status_code < 500
        except requests.ConnectionError:
            return False

    try:
        wait_for(up, timeout=30, what="moto_server")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


S3_ENV = {"SD_SECRET_1": "AKIDTESTING", "SD_SECRET_2": "s3cr3t-access-key"}


@pytest.fixture
def bucket(moto: str, model: bytes, monkeypatch: pytest.MonkeyPatch) -> str:
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, os.devnull)  # no stray ~/.aws settings
    s3 = boto3.client(
        "s3",
        endpoint_url=moto,
        region_name="us-east-1",
        aws_access_key_id=S3_ENV["SD_SECRET_1"],
        aws_secret_access_key=S3_ENV["SD_SECRET_2"],
    )
    name = f"models-{os.urandom(4).hex()}"
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="sdxl/model.safetensors", Body=model)
    return name


def test_s3_download_with_credentials_from_env(tmp_path: Path, moto: str, bucket: str, model: bytes) -> None:
    src = {"bucket": bucket, "key": "sdxl/model.safetensors", "endpoint": moto, "region": "us-east-1"}
    src |= {"accessKeyEnv": "SD_SECRET_1", "secretKeyEnv": "SD_SECRET_2"}
    log = Log()
    [result] = fetch_all(manifest(s3=src, sha256=sha(model)), tmp_path, S3_ENV, log, options=FAST)
    assert result.status == "fetched" and (tmp_path / SUBDIR / "model.safetensors").read_bytes() == model
    assert all(S3_ENV["SD_SECRET_2"] not in line for line in log)
    with pytest.raises(FetchError) as err:
        fetch_all(manifest(s3=src | {"key": "nope"}), tmp_path / "x", S3_ENV, log, options=FAST)
    assert (
        str(err.value)
        == f"download of model.safetensors failed: S3 NoSuchKey (HTTP 404) for s3://{bucket}/nope at {moto}"
    )


def test_s3_resumes_a_partial_file_and_uses_the_default_chain(
    tmp_path: Path, moto: str, bucket: str, model: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTING")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-default-chain")
    (tmp_path / SUBDIR).mkdir()
    (tmp_path / SUBDIR / ".model.safetensors.partial").write_bytes(model[:3000])
    src = {"bucket": bucket, "key": "sdxl/model.safetensors", "endpoint": moto, "region": "us-east-1"}
    log = Log()
    [result] = fetch_all(manifest(s3=src, sha256=sha(model)), tmp_path, {}, log, options=FAST)
    assert result.sha256 == sha(model) and any("resuming after 3.0 kB" in line for line in log)


# --- concurrency -----------------------------------------------------------------------------------------------------


def test_two_pods_fetching_one_file_download_it_once(tmp_path: Path, http: tuple[Served, str], model: bytes) -> None:
    state, base = http
    state.files["/m.safetensors"] = model
    state.gate.clear()  # hold the first download until the second fetcher is waiting for the lock
    path = tmp_path / "manifest.json"
    path.write_text(manifest(url=f"{base}/m.safetensors", sha256=sha(model)).model_dump_json(by_alias=True))
    cmd = [sys.executable, "-m", "sd_operator.fetch.fetcher", "--manifest", str(path), "--models-dir", str(tmp_path)]

    def start() -> tuple[subprocess.Popen[str], list[str]]:
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        assert proc.stderr is not None
        threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True).start()
        return proc, lines

    first, first_log = start()
    wait_for(lambda: state.count("/m.safetensors") == 1, what="the first download to start")
    second, second_log = start()
    wait_for(lambda: any("waiting for its lock" in line for line in second_log), what="the second to wait")
    state.gate.set()
    assert first.wait(timeout=30) == 0 and second.wait(timeout=30) == 0
    wait_for(lambda: any("ready in" in line for line in first_log + second_log), what="the logs")
    assert state.count("/m.safetensors") == 1
    assert any(line.startswith("fetched ") for line in first_log)
    assert any(line.startswith("already present ") for line in second_log)
    assert (tmp_path / SUBDIR / "model.safetensors").read_bytes() == model
    assert sorted(p.name for p in (tmp_path / SUBDIR).iterdir()) == [
        ".model.safetensors.lock",
        ".model.safetensors.verified",
        "model.safetensors",
    ]
