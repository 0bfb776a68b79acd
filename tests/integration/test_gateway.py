"""The gateway and WebUI emulators as real processes over real sockets on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from processes import Proc, emulator, gateway

MODEL_A = "animeA_v1.safetensors"
MODEL_B = "realB_v2.safetensors"


def png_text(response: requests.Response, index: int = 0) -> dict[str, str]:
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][index])))
    return dict(image.text)  # type: ignore[attr-defined]


def txt2img(gw: Proc, model: str | None = None, timeout: float = 60, headers: dict | None = None, **params: Any):
    body: dict[str, Any] = {"prompt": "a lighthouse", "steps": 20, "width": 512, "height": 512, **params}
    if model:
        body["override_settings"] = {"sd_model_checkpoint": model}
    return requests.post(f"{gw.url}/sdapi/v1/txt2img", json=body, headers=headers or {}, timeout=timeout)


def stats(proc: Proc) -> dict[str, Any]:
    return requests.get(f"{proc.url}/emulator/stats", timeout=5).json()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


@pytest.fixture
def fleet(tmp_path: Path, procs: list[Proc]) -> dict[str, Any]:
    """Two instances of model A (fast and slow cards) and one of model B behind one gateway."""
    a1 = emulator(tmp_path, "a1", MODEL_A, profile="rtx4090")
    a2 = emulator(tmp_path, "a2", MODEL_A, profile="rtx3060")
    b1 = emulator(tmp_path, "b1", MODEL_B, profile="rtx3090")
    procs += [a1, a2, b1]
    gw = gateway(tmp_path, [a1, a2, b1], "--default-model", MODEL_A)
    procs.append(gw)
    return {"gw": gw, "a": [a1, a2], "b": b1}


def test_routes_by_model_name_title_hash_and_header(fleet: dict[str, Any]) -> None:
    gw = fleet["gw"]
    models = requests.get(f"{gw.url}/sdapi/v1/sd-models", timeout=5).json()
    assert sorted(m["filename"] for m in models) == [MODEL_A, MODEL_B]
    b_title = next(m["title"] for m in models if m["filename"] == MODEL_B)
    b_hash = next(m["hash"] for m in models if m["filename"] == MODEL_B)
    for seed, name in enumerate((MODEL_B, "realB_v2", b_title, b_hash)):
        r = txt2img(gw, name, seed=seed)
        assert r.status_code == 200, r.text
        assert png_text(r)["sd-emulator-model"].startswith(MODEL_B), name
    r = txt2img(gw, headers={"X-SD-Model": MODEL_B}, seed=6)
    assert png_text(r)["sd-emulator-model"].startswith(MODEL_B)
    assert png_text(txt2img(gw, seed=7))["sd-emulator-model"].startswith(MODEL_A)  # the default model
    missing = txt2img(gw, "nope.safetensors")
    assert missing.status_code == 404 and MODEL_A in missing.json()["detail"]


def test_dispatch_is_idle_only_and_spreads_over_instances(fleet: dict[str, Any]) -> None:
    gw, (a1, a2) = fleet["gw"], fleet["a"]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: txt2img(gw, MODEL_A, seed=100 + i), range(8)))
    assert all(r.status_code == 200 for r in results)
    s1, s2 = stats(a1), stats(a2)
    assert s1["max_concurrency"] == 1 and s2["max_concurrency"] == 1
    assert s1["generations"] + s2["generations"] == 8
    assert s1["generations"] >= 1 and s2["generations"] >= 1


def test_model_switch_through_options_is_refused_with_advice(fleet: dict[str, Any]) -> None:
    r = requests.post(f"{fleet['gw'].url}/sdapi/v1/options", json={"sd_model_checkpoint": MODEL_B}, timeout=5)
    assert r.status_code == 400 and "X-SD-Model" in r.json()["detail"]


def test_priority_overtakes_the_queue(tmp_path: Path, procs: list[Proc]) -> None:
    one = emulator(tmp_path, "one", MODEL_A, speed=0.02)
    procs.append(one)
    gw = gateway(tmp_path, [one])
    procs.append(gw)
    finished: list[str] = []

    def run(tag: str, priority: int, steps: int, size: int = 512) -> None:
        r = txt2img(gw, MODEL_A, headers={"X-Priority": str(priority)}, steps=steps, seed=1, width=size, height=size)
        assert r.status_code == 200
        finished.append(tag)

    with ThreadPoolExecutor(6) as pool:
        pool.submit(run, "blocker", 0, 150, 2048)  # occupies the only instance (~1.6 s)
        time.sleep(0.3)
        low = [pool.submit(run, f"low{i}", 0, 20) for i in range(3)]
        time.sleep(0.3)
        high = pool.submit(run, "high", 10, 20)
        for f in [*low, high]:
            f.result(timeout=60)
    assert finished[0] == "blocker" and finished[1] == "high", finished


def test_bounded_queue_answers_429_with_retry_after(tmp_path: Path, procs: list[Proc]) -> None:
    one = emulator(tmp_path, "one", MODEL_A, speed=0.02)
    procs.append(one)
    gw = gateway(tmp_path, [one], "--max-queue", "2")
    procs.append(gw)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: txt2img(gw, MODEL_A, steps=100, seed=i), range(8)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) >= 3 and 429 in codes
    rejected = next(r for r in results if r.status_code == 429)
    assert int(rejected.headers["Retry-After"]) >= 1 and rejected.json()["error"] == "QueueFull"


def test_a_backend_killed_mid_run_loses_no_request(tmp_path: Path, procs: list[Proc]) -> None:
    doomed = emulator(tmp_path, "doomed", MODEL_A, speed=0.05)
    healthy = emulator(tmp_path, "healthy", MODEL_A, speed=0.05)
    procs += [doomed, healthy]
    gw = gateway(tmp_path, [doomed, healthy], "--cool-off", "30")
    procs.append(gw)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(txt2img, gw, MODEL_A, steps=60, seed=i) for i in range(6)]
        deadline = time.monotonic() + 10
        while stats(doomed)["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        doomed.stop(signal.SIGKILL)  # dies in the middle of a generation
        results = [f.result(timeout=120) for f in futures]
    assert [r.status_code for r in results] == [200] * 6
    assert {png_text(r)["sd-emulator-seed"] for r in results} == {str(i) for i in range(6)}
    instances = requests.get(f"{gw.url}/v1/instances", timeout=5).json()
    assert {i["url"]: i["state"] for i in instances}[doomed.url] == "ejected"


def test_a_backend_past_the_request_timeout_is_ejected_and_the_request_retried(
    tmp_path: Path, procs: list[Proc]
) -> None:
    slow = emulator(tmp_path, "slow", MODEL_A, profile="rtx3060", speed=1.0)  # seconds per image
    quick = emulator(tmp_path, "quick", MODEL_A, speed=0.001)
    procs += [slow, quick]
    gw = gateway(tmp_path, [slow, quick], "--request-timeout", "1.5", "--cool-off", "60")
    procs.append(gw)
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:  # idle-only dispatch: one request on each instance
        results = list(pool.map(lambda i: txt2img(gw, MODEL_A, seed=i), range(2)))
    assert [r.status_code for r in results] == [200, 200]
    assert {r.headers["X-SD-Backend"] for r in results} == {quick.url}
    assert sorted(r.headers.get("X-SD-Attempts", "1") for r in results) == ["1", "2"]
    assert {png_text(r)["sd-emulator-seed"] for r in results} == {"0", "1"}
    assert time.monotonic() - started < 10  # not the slow card's time
    instances = requests.get(f"{gw.url}/v1/instances", timeout=5).json()
    assert {i["url"]: i["state"] for i in instances}[slow.url] == "ejected"


def test_oversized_request_is_refused_before_any_gpu_with_the_budget(fleet: dict[str, Any]) -> None:
    before = stats(fleet["b"])["requests"].get("POST /sdapi/v1/txt2img", 0)
    r = txt2img(fleet["gw"], MODEL_B, width=2048, height=2048, batch_size=8)
    assert r.status_code == 413
    body = r.json()
    assert body["error"] == "OutOfMemoryError" and body["pixel_budget"] > 0
    assert "hr_scale" in body["detail"] or "hires" in body["detail"]
    assert stats(fleet["b"])["requests"].get("POST /sdapi/v1/txt2img", 0) == before


def test_api_keys_auth_and_keys_never_logged(tmp_path: Path, procs: list[Proc]) -> None:
    one = emulator(tmp_path, "one", MODEL_A)
    procs.append(one)
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - {key: sk-studio-a-123456, tenant: studio-a, priority: 5}\n")
    gw = gateway(tmp_path, [one], "--keys-file", str(keys), "--access-log", env={"SD_LOG_FORMAT": "json"})
    procs.append(gw)
    assert txt2img(gw, MODEL_A).status_code == 401
    assert txt2img(gw, MODEL_A, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = txt2img(gw, MODEL_A, headers={"Authorization": "Bearer sk-studio-a-123456"}, seed=3)
    assert ok.status_code == 200
    assert requests.get(f"{gw.url}/healthz", timeout=5).status_code == 200  # open without a key
    text = gw.log.read_text()
    assert "sk-studio-a-123456" not in text
    # JSON logs with one access line per request; the tenant is named, the key never is.
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    access = [d for d in lines if d["logger"] == "sd_operator.gateway.access" and d["route"] == "/sdapi/v1/txt2img"]
    assert [d["status"] for d in access] == [401, 401, 200]
    assert [d["tenant"] for d in access] == [None, None, "studio-a"]
    assert access[2]["model"] == MODEL_A and access[2]["instance"] == one.url


def test_small_and_large_answers_come_through_whole_and_are_cached(fleet: dict[str, Any]) -> None:
    # The WebUI echoes the prompt (parameters, info, PNG text): a long prompt makes an answer larger than
    # the gateway's 256 KiB chunk, which is relayed chunk by chunk; a short one goes out in one write.
    gw, b = fleet["gw"], fleet["b"]
    for words in (3, 60_000):
        prompt = " ".join(f"tower{i}" for i in range(words))
        first = txt2img(gw, MODEL_B, seed=7, prompt=prompt, steps=2)
        assert first.status_code == 200, first.text[:500]
        assert (int(first.headers["Content-Length"]) > 256 * 1024) == (words > 3)
        assert len(first.content) == int(first.headers["Content-Length"])
        assert png_text(first)["sd-emulator-prompt"] == prompt and first.json()["parameters"]["prompt"] == prompt
        again = txt2img(gw, MODEL_B, seed=7, prompt=prompt, steps=2)
        assert again.headers.get("X-Cache") == "hit" and again.content == first.content
    assert stats(b)["generations"] == 2


def test_cache_hits_for_fixed_seeds_only(fleet: dict[str, Any]) -> None:
    gw, b = fleet["gw"], fleet["b"]
    first = txt2img(gw, MODEL_B, seed=42)
    second = txt2img(gw, MODEL_B, seed=42)
    assert first.headers.get("X-Cache") != "hit" and second.headers.get("X-Cache") == "hit"
    assert second.json()["images"] == first.json()["images"]
    assert stats(b)["generations"] == 1
    txt2img(gw, MODEL_B, seed=-1)
    again = txt2img(gw, MODEL_B, seed=-1)
    assert again.headers.get("X-Cache") != "hit" and stats(b)["generations"] == 3
    metrics = requests.get(f"{gw.url}/metrics", timeout=5).text
    assert 'sd_gateway_cache_total{result="hit"} 1.0' in metrics
    assert "sd_gateway_queue_depth" in metrics


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = shutil.which("redis-server")
    if not server:
        pytest.fail("redis-server not installed: run `make deps`")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, cwd=tmp_path)  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def test_redis_cache_is_shared_between_gateways(tmp_path: Path, procs: list[Proc], redis_url: str) -> None:
    one = emulator(tmp_path, "one", MODEL_A)
    procs.append(one)
    gw1 = gateway(tmp_path, [one], "--cache-url", redis_url, name="gw1")
    gw2 = gateway(tmp_path, [one], "--cache-url", redis_url, name="gw2")
    procs += [gw1, gw2]
    assert txt2img(gw1, MODEL_A, seed=9).headers.get("X-Cache") != "hit"
    hit = txt2img(gw2, MODEL_A, seed=9)
    assert hit.status_code == 200 and hit.headers.get("X-Cache") == "hit"
    assert stats(one)["generations"] == 1


def test_convenience_api_builds_preset_and_lora_payloads(fleet: dict[str, Any]) -> None:
    r = requests.post(
        f"{fleet['gw'].url}/v1/generate",
        json={"prompt": "a fox", "preset": "anime_portrait", "lora": "foxstyle", "lora_weight": 0.7,
              "model": MODEL_B, "seed": 11},
        timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    text = png_text(r)
    assert text["sd-emulator-model"].startswith(MODEL_B)
    assert "masterpiece" in text["sd-emulator-prompt"] and "<lora:foxstyle:0.7>" in text["sd-emulator-prompt"]
    assert "Size: 512x768" in text["parameters"]
    bad = requests.post(f"{fleet['gw'].url}/v1/generate", json={"prompt": "x", "width": 500}, timeout=10)
    assert bad.status_code == 422 and "width" in bad.json()["detail"]
    presets = requests.get(f"{fleet['gw'].url}/v1/presets", timeout=5).json()["presets"]
    assert {"anime_portrait", "realistic_photo", "icon_design"} <= set(presets)


def test_client_disconnect_while_running_interrupts_the_backend(tmp_path: Path, procs: list[Proc]) -> None:
    one = emulator(tmp_path, "one", MODEL_A, speed=0.2)
    procs.append(one)
    gw = gateway(tmp_path, [one])
    procs.append(gw)
    with pytest.raises(requests.exceptions.ReadTimeout):
        txt2img(gw, MODEL_A, steps=150, width=1024, height=1024, timeout=1.0)
    deadline = time.monotonic() + 10
    while stats(one)["interrupted"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats(one)["interrupted"] == 1
    # The slot is free again: the next request is served at once.
    assert txt2img(gw, MODEL_A, steps=5, seed=1).status_code == 200


def test_openapi_document(fleet: dict[str, Any]) -> None:
    doc = requests.get(f"{fleet['gw'].url}/openapi.json", timeout=5).json()
    assert doc["openapi"].startswith("3.") and "/v1/generate" in doc["paths"]
    assert "GenerateRequest" in doc["components"]["schemas"]


def test_an_out_of_memory_answer_comes_back_with_advice_and_is_not_retried(tmp_path: Path, procs: list[Proc]) -> None:
    one = emulator(tmp_path, "one", MODEL_A, profile="rtx3060")
    procs.append(one)
    # A budget larger than the card's: the request reaches the GPU, which runs out of memory.
    gw = gateway(tmp_path, [{"url": one.url, "pixelBudget": 100_000_000}])
    procs.append(gw)
    r = txt2img(gw, MODEL_A, width=2048, height=2048, batch_size=8)
    assert r.status_code == 500
    assert r.json()["error"] == "OutOfMemoryError" and "hr_scale" in r.json()["detail"]
    assert stats(one)["oom_count"] == 1  # tried once: the same card would fail again


def test_fleet_listings(fleet: dict[str, Any]) -> None:
    gw = fleet["gw"]
    models = {m["filename"]: m for m in requests.get(f"{gw.url}/v1/models", timeout=5).json()}
    assert models[MODEL_A]["instances"] == 2 and models[MODEL_B]["instances"] == 1
    loras = requests.get(f"{gw.url}/sdapi/v1/loras", headers={"X-SD-Model": MODEL_B}, timeout=5)
    assert loras.status_code == 200 and loras.json() == []
    samplers = requests.get(f"{gw.url}/sdapi/v1/samplers", timeout=5).json()
    assert any(s["name"] == "DPM++ 2M" for s in samplers)
    instances = requests.get(f"{gw.url}/v1/instances", timeout=5).json()
    assert {i["model"] for i in instances} == {MODEL_A, MODEL_B} and all(i["pixelBudget"] for i in instances)
