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
    assert "lower batch_size to 2 and raise n_iter to 4" in body["detail"]  # one 2048x2048 image fits
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
    assert r.json()["error"] == "OutOfMemoryError" and "lower batch_size" in r.json()["detail"]
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


# ---------------------------------------------------------------------------------------------
# The rest of the A1111 API through the gateway, and the pixel budget of hires fix


def b64_png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "navy").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_png_info_of_a_generated_image_through_the_gateway(fleet: dict[str, Any]) -> None:
    gw = fleet["gw"]
    made = txt2img(gw, MODEL_B, seed=21, prompt="a lighthouse, dusk", negative_prompt="blurry", steps=4)
    assert made.status_code == 200
    r = requests.post(f"{gw.url}/sdapi/v1/png-info", json={"image": made.json()["images"][0]}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"info", "items", "parameters"}
    assert body["info"] == json.loads(made.json()["info"])["infotexts"][0]
    params = body["parameters"]
    assert (params["Prompt"], params["Negative prompt"], params["Seed"]) == ("a lighthouse, dusk", "blurry", "21")
    assert (params["Size-1"], params["Size-2"], params["Steps"]) == ("512", "512", "4")
    assert body["items"]["sd-emulator-seed"] == "21" and "parameters" not in body["items"]
    # Outside the queues: no generation ran for it anywhere.
    assert sum(stats(p)["generations"] for p in (*fleet["a"], fleet["b"])) == 1


def test_extras_upscale_through_the_gateway_single_and_batch(fleet: dict[str, Any]) -> None:
    gw = fleet["gw"]
    source = txt2img(gw, MODEL_A, seed=5, width=256, height=256, steps=2).json()["images"][0]
    body = {"image": source, "upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 2.5}
    r = requests.post(f"{gw.url}/sdapi/v1/extra-single-image", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))
    assert out.size == (640, 640)
    assert out.text["sd-emulator-seed"] == "5"  # type: ignore[attr-defined]
    assert out.text["postprocessing"] == "Postprocess upscale by: 2.5, Postprocess upscaler: R-ESRGAN 4x+"  # type: ignore[attr-defined]
    assert r.json()["html_info"] == f"<p>{out.text['postprocessing']}</p>"  # type: ignore[attr-defined]
    batch = {
        "imageList": [{"data": b64_png(300, 200), "name": "a.png"}, {"data": b64_png(120, 90), "name": "b.png"}],
        "upscaler_1": "Lanczos",
        "resize_mode": 1,
        "upscaling_resize_w": 640,
        "upscaling_resize_h": 480,
    }
    many = requests.post(
        f"{gw.url}/sdapi/v1/extra-batch-images", json=batch, headers={"X-SD-Model": MODEL_B}, timeout=60
    )
    assert many.status_code == 200, many.text
    assert many.headers["X-SD-Backend"] == fleet["b"].url  # the model asked for
    sizes = [Image.open(io.BytesIO(base64.b64decode(i))).size for i in many.json()["images"]]
    assert sizes == [(640, 480), (640, 480)]
    bad = requests.post(f"{gw.url}/sdapi/v1/extra-single-image", json={"image": source, "upscaler_1": "x"}, timeout=30)
    assert bad.status_code == 500 and bad.json()["errors"] == "could not find upscaler named x"


def test_extras_and_interrogate_queue_behind_a_generation_on_the_most_idle_model(
    tmp_path: Path, procs: list[Proc]
) -> None:
    a = emulator(tmp_path, "a", MODEL_A, speed=0.3)
    b = emulator(tmp_path, "b", MODEL_B, speed=0.3)
    procs += [a, b]
    gw = gateway(tmp_path, [a, b], "--default-model", MODEL_A)
    procs.append(gw)
    image = b64_png(512, 512)
    with ThreadPoolExecutor(4) as pool:
        long = pool.submit(txt2img, gw, MODEL_B, steps=60, width=1024, height=1024)  # ~2 s on b
        deadline = time.monotonic() + 10
        while stats(b)["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        # No model named: extras go to the model with an idle instance (a), not to the busy b.
        free = requests.post(
            f"{gw.url}/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "SwinIR 4x"}, timeout=60
        )
        assert free.status_code == 200 and free.headers["X-SD-Backend"] == a.url
        # Named: it waits in b's queue until the generation is done, and runs alone on the card.
        started = time.monotonic()
        queued = pool.submit(
            requests.post,
            f"{gw.url}/sdapi/v1/interrogate",
            json={"image": image},
            headers={"X-SD-Model": MODEL_B},
            timeout=60,
        )
        time.sleep(0.3)
        assert not queued.done()
        assert requests.get(f"{gw.url}/v1/demand", timeout=5).json()["models"][MODEL_B]["queued"] == 1
        assert long.result(timeout=60).status_code == 200
        caption = queued.result(timeout=60)
    assert caption.status_code == 200 and caption.json() == {"caption": "a picture of a mosaic of coloured squares"}
    assert caption.headers["X-SD-Backend"] == b.url and time.monotonic() - started > 0.5
    sb = stats(b)
    assert sb["max_concurrency"] == 1 and sb["requests"]["POST /sdapi/v1/interrogate"] == 1
    assert stats(a)["requests"]["POST /sdapi/v1/extra-single-image"] == 1


def test_interrogate_with_deepdanbooru_and_an_unknown_model(fleet: dict[str, Any]) -> None:
    gw = fleet["gw"]
    source = txt2img(gw, MODEL_A, seed=2, prompt="1girl, red hair", steps=2).json()["images"][0]
    tags = requests.post(f"{gw.url}/sdapi/v1/interrogate", json={"image": source, "model": "deepdanbooru"}, timeout=30)
    assert tags.status_code == 200 and tags.json()["caption"].startswith("1girl, red hair")
    unknown = requests.post(f"{gw.url}/sdapi/v1/interrogate", json={"image": source, "model": "blip"}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["detail"] == "Model not found"


def test_read_only_webui_gets_through_the_gateway(fleet: dict[str, Any]) -> None:
    gw = fleet["gw"]
    for path in ("upscalers", "latent-upscale-modes", "face-restorers", "realesrgan-models", "prompt-styles",
                 "hypernetworks", "scripts", "script-info", "extensions", "sd-vae", "embeddings"):  # fmt: skip
        r = requests.get(f"{gw.url}/sdapi/v1/{path}", headers={"X-SD-Model": MODEL_B}, timeout=10)
        assert r.status_code == 200, (path, r.text)
        assert isinstance(r.json(), list | dict)
    upscalers = requests.get(f"{gw.url}/sdapi/v1/upscalers", timeout=10).json()
    assert {"None", "Lanczos", "R-ESRGAN 4x+"} <= {u["name"] for u in upscalers}
    assert stats(fleet["b"])["requests"]["GET /sdapi/v1/script-info"] == 1


def test_routes_that_would_change_an_instance_are_refused_with_advice(fleet: dict[str, Any]) -> None:
    gw = fleet["gw"]
    for path in ("refresh-checkpoints", "reload-checkpoint", "unload-checkpoint", "create/embedding",
                 "create/hypernetwork", "train/embedding", "train/hypernetwork", "server-kill", "server-restart",
                 "server-stop"):  # fmt: skip
        r = requests.post(f"{gw.url}/sdapi/v1/{path}", json={}, timeout=10)
        assert r.status_code == 403 and r.json()["error"] == "Forbidden", path
        assert "SDInstance" in r.json()["detail"] or "LoRAJob" in r.json()["detail"], path
    settings = requests.post(f"{gw.url}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}, timeout=10)
    assert settings.status_code == 403
    for proc in (*fleet["a"], fleet["b"]):
        assert not [k for k in stats(proc)["requests"] if "checkpoint" in k or "train" in k or "options" in k]
    # Refreshing VAE and embedding folders changes nothing the gateway routes by: every instance does it.
    refreshed = requests.post(f"{gw.url}/sdapi/v1/refresh-embeddings", timeout=30).json()["refreshed"]
    assert sorted(x["status"] for x in refreshed) == [200, 200, 200]


def test_hires_fix_beyond_the_budget_is_refused_with_the_real_target_size(fleet: dict[str, Any]) -> None:
    """The issue's example: 1024x1024 with hr_scale 8 renders its second pass at 8192x8192."""
    gw, b = fleet["gw"], fleet["b"]
    before = stats(b)["requests"].get("POST /sdapi/v1/txt2img", 0)
    r = txt2img(gw, MODEL_B, width=1024, height=1024, enable_hr=True, hr_scale=8, hr_upscaler="Latent")
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["peak"] == {"pass": "hires fix", "width": 8192, "height": 8192, "batch": 1}
    assert "hires fix: 1024x1024 x hr_scale 8 = 8192x8192 x batch 1 = 67,108,864 pixels at once" in body["detail"]
    assert "hr_scale 3 (3072x3072)" in body["detail"]  # what fits the RTX 3090 profile (9,675,000 pixels)
    assert "POST /sdapi/v1/extra-single-image" in body["detail"]
    assert stats(b)["requests"].get("POST /sdapi/v1/txt2img", 0) == before  # refused before any GPU
    # The advice holds: hr_scale 3 renders, and extras take it on to 8192x8192.
    fits = txt2img(gw, MODEL_B, width=1024, height=1024, enable_hr=True, hr_scale=3, steps=2, seed=1)
    assert fits.status_code == 200, fits.text
    assert Image.open(io.BytesIO(base64.b64decode(fits.json()["images"][0]))).size == (3072, 3072)
    # The same body straight to the emulator: it runs out of memory as the real card would.
    direct = requests.post(
        f"{b.url}/sdapi/v1/txt2img",
        json={"prompt": "x", "width": 1024, "height": 1024, "enable_hr": True, "hr_scale": 8, "steps": 2},
        timeout=60,
    )
    assert direct.status_code == 500 and direct.json()["error"] == "OutOfMemoryError"


def test_an_oom_answer_for_hires_fix_names_the_second_pass(tmp_path: Path, procs: list[Proc]) -> None:
    one = emulator(tmp_path, "one", MODEL_A, profile="rtx3060")
    procs.append(one)
    gw = gateway(tmp_path, [{"url": one.url, "pixelBudget": 100_000_000}])  # a budget larger than the card's
    procs.append(gw)
    r = txt2img(gw, MODEL_A, width=768, height=768, enable_hr=True, hr_resize_x=4096, steps=2)
    assert r.status_code == 500 and r.json()["error"] == "OutOfMemoryError"
    assert "hires fix: 768x768 to hr_resize_x 4096 = 4096x4096" in r.json()["detail"]
    assert stats(one)["oom_count"] == 1
