"""tools/cluster/modelserver.py: the offline stand-in for Hugging Face, as a pure function and as a real
server (a subprocess on 127.0.0.1) that the operator's own fetcher downloads from."""

from __future__ import annotations

import hashlib
import json
import os
import select
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from modelserver import stand_in_bytes, stand_in_sha256  # tools/cluster, on pytest's pythonpath
from sd_operator.fetch.safetensors_check import check_safetensors

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools/cluster/modelserver.py"
SIZE_KIB = 64  # the server runs with --size-kib 64: the flag is honoured and the tests stay quick
HF_PATH = "/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"


def header(data: bytes) -> dict[str, object]:
    (n,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8 : 8 + n]))


# --- the pure function -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("sd_xl_base_1.0.safetensors", "conditioner.embedders.1.model.ln_final.weight"),
        ("v1-5-pruned-emaonly.safetensors", "cond_stage_model.transformer.text_model.final_layer_norm.weight"),
        ("pixel-art-LoRA.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"),
        ("sdxl-lora.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"),
        ("sdxl_vae.safetensors", "decoder.conv_in.weight"),
        ("control_v11p_sd15_canny.safetensors", "control_model.input_blocks.0.0.weight"),
    ],
)
def test_the_stand_in_passes_the_fetchers_check_with_family_like_keys(tmp_path: Path, name: str, key: str) -> None:
    data = stand_in_bytes(name)
    path = tmp_path / name
    path.write_bytes(data)
    info = check_safetensors(path)  # raises FetchError on anything the fetcher would refuse
    assert info.tensors == 2 and info.metadata == {"format": "pt", "sd_operator_stand_in": name}
    assert info.data_bytes == 256 * 1024 and info.header_bytes % 8 == 0
    assert key in header(data)
    assert data[-info.data_bytes :].count(0) < info.data_bytes // 100  # pseudo-random, not zeros


def test_the_bytes_depend_on_the_base_name_and_size_only() -> None:
    name = "sd_xl_base_1.0.safetensors"
    assert stand_in_bytes(name) == stand_in_bytes(name)
    assert stand_in_sha256(name) == hashlib.sha256(stand_in_bytes(name)).hexdigest()
    assert stand_in_sha256(name) != stand_in_sha256("sd_xl_refiner_1.0.safetensors")
    assert stand_in_sha256(name, 8) != stand_in_sha256(name)
    assert len(stand_in_bytes(name, 8)) - len(header(stand_in_bytes(name, 8))) < 8 * 1024 + 1024
    with pytest.raises(ValueError, match="at least 1"):
        stand_in_bytes(name, 0)


def test_a_ckpt_name_gets_a_zip_like_pickle_blob() -> None:
    data = stand_in_bytes("model.ckpt", 4)
    assert data.startswith(b"PK\x03\x04") and len(data) == 4096 and data == stand_in_bytes("model.ckpt", 4)


# --- the server ------------------------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("modelserver") / "stderr.log"
    with log.open("wb") as err:
        cmd = [sys.executable, str(SCRIPT), "--host", "127.0.0.1", "--port", "0", "--print-port"]
        proc = subprocess.Popen([*cmd, "--size-kib", str(SIZE_KIB)], stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("MODELSERVER_PORT="), f"no port line: {line!r} {log.read_text()}"
        yield Server(f"http://127.0.0.1:{int(line.split('=')[1])}", log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_hugging_face_paths_serve_the_stand_in(server: Server) -> None:
    name = "sd_xl_base_1.0.safetensors"
    sha = stand_in_sha256(name, SIZE_KIB)
    r = requests.get(server.url + HF_PATH, timeout=10)
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == sha
    assert r.headers["Content-Length"] == str(len(r.content)) and r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["ETag"] == f'"{sha}"'
    # Another repo, revision or a plain path: the same base name, the same bytes.
    for path in (f"/someone/else/resolve/0123abc/{name}", f"/models/{name}"):
        assert hashlib.sha256(requests.get(server.url + path, timeout=10).content).hexdigest() == sha
    head = requests.head(server.url + HF_PATH, timeout=10)
    assert head.status_code == 200 and head.content == b"" and head.headers["Content-Length"] == str(len(r.content))
    assert f"GET {HF_PATH} 200 {len(r.content)} bytes" in server.log.read_text()


def test_range_requests_return_the_tail_or_416(server: Server) -> None:
    data = stand_in_bytes("sd_xl_base_1.0.safetensors", SIZE_KIB)
    r = requests.get(server.url + HF_PATH, headers={"Range": "bytes=1000-"}, timeout=10)
    assert r.status_code == 206 and r.content == data[1000:]
    assert r.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    r = requests.get(server.url + HF_PATH, headers={"Range": f"bytes={len(data)}-"}, timeout=10)
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"


def test_injected_statuses_and_unknown_paths(server: Server) -> None:
    r = requests.get(server.url + "/__status_503__/org/repo/resolve/main/x.safetensors", timeout=10)
    assert r.status_code == 503 and "503" in r.text
    assert (
        requests.get(server.url + "/org/repo/resolve/main/__status_401__/x.safetensors", timeout=10).status_code == 401
    )
    r = requests.get(server.url + "/org/repo/resolve/main/config.json", timeout=10)
    assert r.status_code == 404 and "not found" in r.text
    assert requests.get(server.url + "/", timeout=10).status_code == 404


# --- the operator's fetcher against it -------------------------------------------------------------------------------


def fetch_model(tmp_path: Path, files: list[dict[str, object]]) -> subprocess.CompletedProcess[str]:
    manifest = tmp_path / "models.json"
    manifest.write_text(json.dumps({"files": files}))
    cmd = [str(Path(sys.executable).with_name("sd-operator")), "fetch-model", "--manifest", str(manifest)]
    cmd += ["--models-dir", str(tmp_path / "models")]
    env = {**os.environ, "SD_TERMINATION_LOG": str(tmp_path / "termination-log")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)


def test_fetch_model_downloads_and_verifies_from_the_stand_in(tmp_path: Path, server: Server) -> None:
    name = "sd_xl_base_1.0.safetensors"
    sha = stand_in_sha256(name, SIZE_KIB)
    done = fetch_model(
        tmp_path, [{"name": name, "subdir": "Stable-diffusion", "url": server.url + HF_PATH, "sha256": sha}]
    )
    assert done.returncode == 0, done.stderr
    final = tmp_path / "models/Stable-diffusion" / name
    assert final.read_bytes() == stand_in_bytes(name, SIZE_KIB)
    assert json.loads((final.parent / f".{name}.verified").read_text())["sha256"] == sha
    assert f"fetched Stable-diffusion/{name}:" in done.stderr


def test_fetch_model_fails_on_a_wrong_sha256_naming_the_checksum(tmp_path: Path, server: Server) -> None:
    name = "sd_xl_base_1.0.safetensors"
    wrong = stand_in_sha256("another.safetensors", SIZE_KIB)
    done = fetch_model(
        tmp_path, [{"name": name, "subdir": "Stable-diffusion", "url": server.url + HF_PATH, "sha256": wrong}]
    )
    assert done.returncode != 0
    line = f"sha256 mismatch for {name}: expected {wrong}, got {stand_in_sha256(name, SIZE_KIB)}"
    assert done.stderr.splitlines()[-1] == line
    assert (tmp_path / "termination-log").read_text() == line + "\n"
    assert not (tmp_path / "models/Stable-diffusion" / name).exists()


def test_fetch_model_refuses_the_pickle_stand_in_unless_allowed(tmp_path: Path, server: Server) -> None:
    spec = {"name": "model.ckpt", "subdir": "Stable-diffusion", "url": server.url + "/org/repo/resolve/main/model.ckpt"}
    done = fetch_model(tmp_path, [spec])
    assert done.returncode != 0 and "refusing pickle file model.ckpt" in done.stderr
    done = fetch_model(tmp_path, [spec | {"allowUnsafePickle": True}])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "models/Stable-diffusion/model.ckpt").read_bytes() == stand_in_bytes("model.ckpt", SIZE_KIB)
