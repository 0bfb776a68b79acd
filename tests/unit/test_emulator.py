"""The AUTOMATIC1111 API emulator over real sockets: in-process servers on 127.0.0.1 (the same command
line parsing as the CLI), and the real `python -m sd_operator.emulator.cli` process."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from aiohttp import web
from PIL import Image

from helpers import wait_for
from sd_operator.api.sdinstance import SDInstanceSpec
from sd_operator.emulator import cli
from sd_operator.emulator.app import create_app
from sd_operator.emulator.config import legacy_hash
from sd_operator.emulator.profiles import PROFILES, Family
from sd_operator.render.sdinstance import webui_args

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--speed", "0.001"]


@dataclass
class Models:
    root: Path
    ckpt: Path
    lora_dir: Path
    cn_dir: Path
    emb_dir: Path

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.ckpt.read_bytes()).hexdigest()

    @property
    def title(self) -> str:
        return f"{self.ckpt.name} [{self.sha256[:10]}]"

    def argv(self, *extra: str) -> list[str]:
        return [
            "--api",
            "--nowebui",
            "--ckpt",
            str(self.ckpt),
            "--lora-dir",
            str(self.lora_dir),
            "--controlnet-dir",
            str(self.cn_dir),
            "--embeddings-dir",
            str(self.emb_dir),
            *extra,
        ]


@pytest.fixture
def models(tmp_path: Path) -> Models:
    ckpt = tmp_path / "Stable-diffusion" / "dreamy-v1.safetensors"
    lora_dir, cn_dir, emb_dir = tmp_path / "Lora", tmp_path / "ControlNet", tmp_path / "embeddings"
    for folder in (ckpt.parent, lora_dir, cn_dir, emb_dir):
        folder.mkdir()
    ckpt.write_bytes(os.urandom(300_000))
    (lora_dir / "styleA.safetensors").write_bytes(b"lora-a" * 100)
    (lora_dir / ".half.safetensors.partial").write_bytes(b"partial download")
    (cn_dir / "control_v11p_sd15_canny.pth").write_bytes(os.urandom(0x110000))
    (emb_dir / "easynegative.safetensors").write_bytes(b"emb")
    return Models(tmp_path, ckpt, lora_dir, cn_dir, emb_dir)


class Server:
    """The emulator app on a real 127.0.0.1 socket, its event loop in a thread; talk to it with requests."""

    def __init__(self, argv: list[str]) -> None:
        self.config = cli.config_from_argv(argv)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.url = ""

    async def _start(self) -> str:
        self.runner = web.AppRunner(create_app(self.config), shutdown_timeout=2)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def __enter__(self) -> Server:
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()

    # No shared requests.Session: tests call these from several threads at once.
    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=30, **kw)

    def txt2img(self, **body: Any) -> tuple[list[Image.Image], dict[str, Any]]:
        r = self.post("/sdapi/v1/txt2img", {"steps": 20, **body})
        assert r.status_code == 200, r.text
        data = r.json()
        return [Image.open(io.BytesIO(base64.b64decode(b))) for b in data["images"]], json.loads(data["info"])


@pytest.fixture
def server(models: Models) -> Iterator[Server]:
    with Server(models.argv(*FAST)) as s:
        yield s


def png_bytes(color: str = "red") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def assert_a1111_error(r: requests.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail", "body", "errors"}
    return body


# ---------------------------------------------------------------------------------------------
# Generation


def test_txt2img_returns_pngs_carrying_model_seed_prompt_and_infotext(server: Server, models: Models) -> None:
    images, info = server.txt2img(prompt="a red fox", negative_prompt="blurry", seed=123, width=640, height=500)
    (image,) = images
    assert image.format == "PNG"
    assert image.size == (640, 496)  # floored to a multiple of 8, as the VAE does
    assert image.text["sd-emulator-model"] == models.title
    assert image.text["sd-emulator-seed"] == "123"
    assert image.text["sd-emulator-prompt"] == "a red fox"
    params = image.text["parameters"]
    assert params.startswith("a red fox\nNegative prompt: blurry\nSteps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 123")
    assert f"Model hash: {models.sha256[:10]}, Model: dreamy-v1" in params
    assert info["seed"] == 123 and info["all_seeds"] == [123]
    assert info["sd_model_hash"] == models.sha256[:10] and info["sd_model_name"] == "dreamy-v1"
    assert info["infotexts"] == [params]
    assert info["interrupted"] is False


def test_identical_requests_give_identical_images_and_others_differ(server: Server) -> None:
    body = {"prompt": "a lighthouse", "seed": 7, "steps": 5}
    first = server.post("/sdapi/v1/txt2img", body).json()["images"]
    assert server.post("/sdapi/v1/txt2img", body).json()["images"] == first
    assert server.post("/sdapi/v1/txt2img", {**body, "seed": 8}).json()["images"] != first
    assert server.post("/sdapi/v1/txt2img", {**body, "prompt": "a mill"}).json()["images"] != first


def test_seed_minus_one_picks_a_random_seed(server: Server) -> None:
    seeds = []
    for _ in range(2):
        (image,), info = server.txt2img(seed=-1, steps=2)
        assert info["seed"] != -1 and image.text["sd-emulator-seed"] == str(info["seed"])
        seeds.append(info["seed"])
    assert seeds[0] != seeds[1]


def test_batch_size_and_n_iter_give_one_image_per_seed(server: Server) -> None:
    images, info = server.txt2img(seed=100, batch_size=3, n_iter=2, steps=4, width=256, height=256)
    assert len(images) == 6
    assert info["all_seeds"] == [100, 101, 102, 103, 104, 105]
    assert [im.text["sd-emulator-seed"] for im in images] == [str(s) for s in info["all_seeds"]]
    assert "Batch size: 3, Batch pos: 2" in images[2].text["parameters"]
    assert len({im.convert("RGB").tobytes() for im in images}) == 6  # the pixels, not palette indices


def test_send_images_false_and_parameters_echo(server: Server) -> None:
    r = server.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": 3, "send_images": False, "custom_field": 1})
    data = r.json()
    assert data["images"] == []
    assert data["parameters"]["prompt"] == "x"
    assert "custom_field" not in data["parameters"]  # unknown keys are ignored (pydantic v1's Extra.ignore)
    assert data["parameters"]["cfg_scale"] == 7.0  # defaults filled in, as A1111 echoes its model


def test_old_sampler_names_carry_their_scheduler_and_unknown_ones_fail(server: Server) -> None:
    (image,), info = server.txt2img(sampler_name="DPM++ 2M Karras", steps=3)
    assert (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "Karras")
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in image.text["parameters"]
    body = assert_a1111_error(server.post("/sdapi/v1/txt2img", {"sampler_name": "Nope"}), 400)
    assert body["detail"] == "Sampler not found"


def test_img2img_needs_init_images(server: Server) -> None:
    missing = assert_a1111_error(server.post("/sdapi/v1/img2img", {"prompt": "x"}), 422)
    assert "init_images" in missing["detail"]
    assert_a1111_error(server.post("/sdapi/v1/img2img", {"init_images": ["bm90IGFuIGltYWdl"]}), 500)
    r = server.post("/sdapi/v1/img2img", {"prompt": "x", "seed": 3, "steps": 20, "init_images": [png_bytes()]})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["parameters"]["init_images"] is None  # not echoed unless include_init_images
    info = json.loads(data["info"])
    assert info["denoising_strength"] == 0.75 and "Denoising strength: 0.75" in info["infotexts"][0]


def test_validation_errors_use_fastapis_422_and_handler_errors_a1111_error_json(server: Server) -> None:
    bad_type = server.post("/sdapi/v1/txt2img", {"steps": "many"})
    assert bad_type.status_code == 422  # FastAPI's own answer, as the WebUI's (tests/fixtures/real/webui/api.json)
    assert bad_type.json() == {
        "detail": [{"loc": ["body", "steps"], "msg": "value is not a valid integer", "type": "type_error.integer"}]
    }
    r = requests.post(server.url + "/sdapi/v1/txt2img", data="{not json", timeout=10)
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", 1] and err["type"] == "value_error.jsondecode"
    script = assert_a1111_error(server.post("/sdapi/v1/txt2img", {"script_name": "x/y/z plot"}), 422)
    assert script["detail"] == "Script 'x/y/z plot' not found"
    assert_a1111_error(server.get("/sdapi/v1/nothing-here"), 404)


# ---------------------------------------------------------------------------------------------
# Timing, the queue lock, interrupt, OOM


def test_profiles_are_realistic() -> None:
    for profile in PROFILES.values():
        assert profile.seconds_per_step(Family.SDXL) > profile.seconds_per_step(Family.SD15)
        assert profile.pixel_budget(Family.SDXL) >= 1024 * 1024  # every card runs SDXL at 1024², batch 1
    assert PROFILES["rtx3060"].seconds_per_step(Family.SD15) > PROFILES["rtx4090"].seconds_per_step(Family.SD15)
    assert PROFILES["t4"].pixel_budget(Family.SD15) < PROFILES["a100-40gb"].pixel_budget(Family.SD15)
    assert set(PROFILES) == {"rtx3060", "rtx3090", "rtx4090", "a100-40gb", "l4", "t4"}


def test_time_grows_with_pixels_and_family(models: Models) -> None:
    with Server(models.argv("--speed", "0.05")) as s:
        _, small = s.txt2img(width=512, height=512, steps=10, send_images=False)
        _, large = s.txt2img(width=1024, height=1024, steps=10, send_images=False)
    took = {k: i["emulator"]["finished"] - i["emulator"]["started"] for k, i in (("small", small), ("large", large))}
    assert took["large"] > took["small"]
    assert large["emulator"]["simulated_seconds"] == pytest.approx(4 * small["emulator"]["simulated_seconds"], rel=1e-3)
    with Server(models.argv("--speed", "0.05", "--family", "sdxl")) as s:
        _, xl = s.txt2img(width=512, height=512, steps=10, send_images=False)
    assert xl["emulator"]["simulated_seconds"] > small["emulator"]["simulated_seconds"]


def test_concurrent_requests_run_one_at_a_time(models: Models) -> None:
    with Server(models.argv("--speed", "0.03")) as s, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda seed: s.txt2img(seed=seed, steps=20), range(4)))
        stats = s.get("/emulator/stats").json()
    assert stats["max_concurrency"] == 1 and stats["generations"] == 4
    assert stats["requests"]["POST /sdapi/v1/txt2img"] == 4 and stats["total_busy_seconds"] > 0
    spans = sorted((i["emulator"]["started"], i["emulator"]["finished"]) for _, i in results)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 1e-3  # each began after the previous one finished


def test_interrupt_stops_a_long_generation_and_returns_what_it_had(models: Models) -> None:
    with Server(models.argv("--speed", "1")) as server, ThreadPoolExecutor(1) as pool:
        # 1000 steps at 1024² on the simulated 4090: over two minutes per iteration unless interrupted.
        future = pool.submit(server.txt2img, steps=1000, width=1024, height=1024, seed=9, n_iter=3)

        def running() -> dict[str, Any] | None:
            p = server.get("/sdapi/v1/progress").json()
            return p if p["state"]["job_count"] == 3 and p["state"]["sampling_step"] > 0 else None

        progress = wait_for(running, timeout=10, interval=0.01, what="the generation to start sampling")
        assert 0 < progress["progress"] < 1 and progress["state"]["job"] == "scripts_txt2img"
        assert set(progress) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}
        assert server.post("/sdapi/v1/interrupt").json() == {}
        images, info = future.result(timeout=10)
        assert info["interrupted"] is True and len(images) == 1  # the first iteration's partial image
        idle = server.get("/sdapi/v1/progress").json()
        assert idle["state"]["job_count"] == 0 and idle["progress"] == 0
        _, after = server.txt2img(steps=2)  # the next generation is not interrupted
        assert after["interrupted"] is False


def test_skip_ends_the_current_iteration_only(models: Models) -> None:
    with Server(models.argv("--speed", "1")) as server, ThreadPoolExecutor(1) as pool:
        future = pool.submit(server.txt2img, steps=1000, width=1024, height=1024, n_iter=2)

        def at(job_no: int) -> bool:
            state = server.get("/sdapi/v1/progress").json()["state"]
            return state["job_count"] == 2 and state["job_no"] == job_no and state["sampling_step"] > 0

        wait_for(lambda: at(0), timeout=10, interval=0.01, what="the first iteration")
        server.post("/sdapi/v1/skip")
        wait_for(lambda: at(1), timeout=10, interval=0.01, what="the second iteration")
        server.post("/sdapi/v1/interrupt")
        images, info = future.result(timeout=10)
    assert len(images) == 2 and info["interrupted"] is True


def test_profile_and_speed_come_from_flags_or_environment(models: Models, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_EMULATOR_GPU_PROFILE", "t4")
    monkeypatch.setenv("SD_EMULATOR_SPEED", "0.5")
    config = cli.config_from_argv(models.argv())
    assert (config.profile.name, config.speed, config.family) == ("t4", 0.5, Family.SD15)
    config = cli.config_from_argv(models.argv("--gpu-profile", "l4", "--speed", "2", "--family", "sd2"))
    assert (config.profile.name, config.speed, config.family) == ("l4", 2.0, Family.SD2)


def test_out_of_memory_beyond_the_profile_budget(server: Server) -> None:
    r = server.post("/sdapi/v1/txt2img", {"width": 4096, "height": 4096, "steps": 2})
    body = assert_a1111_error(r, 500)
    assert body["error"] == "OutOfMemoryError"
    assert "CUDA out of memory. Tried to allocate" in body["detail"] and "24.00 GiB total capacity" in body["detail"]
    assert server.get("/sdapi/v1/memory").json()["cuda"]["events"]["oom"] == 1
    assert server.get("/emulator/stats").json()["oom_count"] == 1
    server.txt2img(width=1024, height=1024, batch_size=4, steps=2)  # fits; the lock was released
    assert server.post("/sdapi/v1/txt2img", {"width": 1024, "height": 1024, "batch_size": 16}).status_code == 500


def test_a_client_that_disconnects_does_not_keep_the_lock(models: Models) -> None:
    with Server(models.argv("--speed", "0.01")) as s:
        with pytest.raises(requests.ReadTimeout):
            # ~1.3 s of simulated sampling; the client gives up after 0.2 s.
            requests.post(s.url + "/sdapi/v1/txt2img", json={"steps": 1000, "width": 1024}, timeout=0.2)
        _, info = s.txt2img(steps=2)  # queued behind the abandoned one (A1111 finishes it too), then served
        assert info["interrupted"] is False
        stats = s.get("/emulator/stats").json()
        assert stats["generations"] == 2 and stats["max_concurrency"] == 1 and stats["active"] == 0


def test_drain_answers_once_the_running_and_the_queued_generation_finished(models: Models) -> None:
    # The webui container's preStop hook: the kubelet calls it before SIGTERM when the pod goes.
    with Server(models.argv("--speed", "0.01")) as s, ThreadPoolExecutor(2) as pool:

        def generate(seed: int) -> tuple[int, float]:  # ~0.65 s of sampling each
            r = s.post("/sdapi/v1/txt2img", {"steps": 500, "width": 1024, "seed": seed, "send_images": False})
            return r.status_code, time.monotonic()

        def stat(key: str) -> Any:
            return s.get("/emulator/stats").json()[key]

        assert s.get("/sd-operator/drain").json()["status"] == "drained"  # idle: at once
        running = pool.submit(generate, 1)
        wait_for(lambda: stat("active") == 1, timeout=10, interval=0.01, what="a generation")
        queued = pool.submit(generate, 2)
        wait_for(lambda: stat("waiting") == 1, timeout=10, interval=0.01, what="one queued behind it")
        r = s.get("/sd-operator/drain")
        answered = time.monotonic()
        body = r.json()
        assert r.status_code == 200 and body["status"] == "drained", body
        assert body["waitedSeconds"] > 0.5
        for future in (running, queued):
            code, finished = future.result(timeout=10)
            assert code == 200 and finished <= answered, "the drain answered before the generation did"
        stats = s.get("/emulator/stats").json()
        assert stats["generations"] == 2 and stats["requests"]["GET /sd-operator/drain"] == 2


def test_drain_gives_up_after_its_timeout_without_failing_the_generation(models: Models) -> None:
    with Server(models.argv("--speed", "0.01", "--api-auth", "u:p")) as s, ThreadPoolExecutor(1) as pool:
        auth = ("u", "p")  # the hook, as the probes, needs no credentials; the API does
        future = pool.submit(s.post, "/sdapi/v1/txt2img", {"steps": 1000, "width": 1024}, auth=auth)
        wait_for(lambda: s.get("/emulator/stats", auth=auth).json()["active"] == 1, timeout=10, interval=0.01)
        r = s.get("/sd-operator/drain", params={"timeout": "0.3"})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "timeout", body
        assert 0.3 <= body["waitedSeconds"] < 1 and body["busy"]["active"] == 1
        assert body["busy"]["job"] == "scripts_txt2img"
        assert future.result(timeout=10).status_code == 200
        assert s.get("/sd-operator/drain", params={"timeout": "not a number"}).json()["status"] == "drained"


# ---------------------------------------------------------------------------------------------
# Model, settings, LoRAs, ControlNet


def test_sd_models_lists_exactly_the_one_checkpoint(server: Server, models: Models) -> None:
    (model,) = server.get("/sdapi/v1/sd-models").json()
    assert model == {
        "title": models.title,
        "model_name": "dreamy-v1",
        "hash": models.sha256[:10],
        "sha256": models.sha256,
        "filename": str(models.ckpt),
        "config": None,
    }
    assert server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models.title


def test_the_fetchers_sidecar_saves_hashing(models: Models) -> None:
    fake = "ab" * 32
    (models.ckpt.parent / f".{models.ckpt.name}.verified").write_text(json.dumps({"sha256": fake}))
    with Server(models.argv(*FAST)) as s:
        assert s.get("/sdapi/v1/sd-models").json()[0]["title"] == f"{models.ckpt.name} [{fake[:10]}]"


def test_frozen_settings_refuse_another_model(models: Models) -> None:
    settings = models.root / "webui-config.json"
    settings.write_text(json.dumps({"sd_model_checkpoint": "dreamy-v1.safetensors", "CLIP_stop_at_last_layers": 2}))
    with Server(models.argv(*FAST, "--ui-settings-file", str(settings), "--freeze-settings")) as s:
        options = s.get("/sdapi/v1/options").json()
        assert options["sd_model_checkpoint"] == models.title and options["CLIP_stop_at_last_layers"] == 2
        refused = assert_a1111_error(s.post("/sdapi/v1/options", {"sd_model_checkpoint": "other.safetensors"}), 400)
        assert refused["detail"] == f"settings are frozen; this instance serves only {models.title}"
        assert s.post("/sdapi/v1/options", {"sd_model_checkpoint": models.ckpt.name}).status_code == 200
        assert_a1111_error(s.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 1}), 400)
        override = {"override_settings": {"sd_model_checkpoint": "other [0123456789]"}}
        assert_a1111_error(s.post("/sdapi/v1/txt2img", override), 400)
        _, info = s.txt2img(steps=2, override_settings={"sd_model_checkpoint": models.title})
        assert info["clip_skip"] == 2


def test_unfrozen_settings_accept_other_keys_but_never_another_model(models: Models) -> None:
    settings = models.root / "webui-config.json"
    with Server(models.argv(*FAST, "--ui-settings-file", str(settings))) as s:
        assert s.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2}).status_code == 200
        assert s.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        assert json.loads(settings.read_text())["CLIP_stop_at_last_layers"] == 2  # saved like config.json
        refused = assert_a1111_error(s.post("/sdapi/v1/options", {"sd_model_checkpoint": "other"}), 400)
        assert "not found" in refused["detail"] and models.title in refused["detail"]


def test_loras_listing_refresh_and_prompt_tags(server: Server, models: Models) -> None:
    assert [lo["name"] for lo in server.get("/sdapi/v1/loras").json()] == ["styleA"]
    (models.lora_dir / "styleB.safetensors").write_bytes(b"lora-b")
    assert [lo["name"] for lo in server.get("/sdapi/v1/loras").json()] == ["styleA"]
    assert server.post("/sdapi/v1/refresh-loras").status_code == 200
    listed = server.get("/sdapi/v1/loras").json()
    assert [lo["name"] for lo in listed] == ["styleA", "styleB"]
    assert listed[1] == {
        "name": "styleB",
        "alias": "styleB",
        "path": str(models.lora_dir / "styleB.safetensors"),
        "metadata": {},
    }
    (image,), info = server.txt2img(prompt="cat <lora:styleA:0.7> <lora:missing:1>", steps=2)
    short = hashlib.sha256((models.lora_dir / "styleA.safetensors").read_bytes()).hexdigest()[:12]
    assert f'Lora hashes: "styleA: {short}"' in image.text["parameters"]
    assert info["loras"][0]["name"] == "styleA" and info["loras"][0]["weight"] == 0.7
    assert info["extra_networks_warnings"] == ["Lora not found: missing"]


def test_controlnet_routes_and_unit_validation(server: Server, models: Models) -> None:
    cn_name = f"control_v11p_sd15_canny [{legacy_hash(models.cn_dir / 'control_v11p_sd15_canny.pth')}]"
    assert server.get("/controlnet/model_list").json() == {"model_list": [cn_name]}
    modules = server.get("/controlnet/module_list").json()["module_list"]
    assert {"none", "canny", "openpose", "depth", "lineart", "tile_resample"} <= set(modules)  # internal names
    labels = server.get("/controlnet/module_list?alias_names=true").json()["module_list"]
    assert {"none", "canny", "openpose", "depth_midas", "lineart_realistic", "tile_resample"} <= set(labels)
    types = server.get("/controlnet/control_types").json()["control_types"]
    assert types["Canny"]["model_list"] == ["None", cn_name]
    assert server.get("/controlnet/version").json()["version"] >= 1
    unit = {"enabled": True, "module": "canny", "model": "control_v11p_sd15_canny", "weight": 0.8, "image": png_bytes()}
    (image,), info = server.txt2img(steps=2, alwayson_scripts={"controlnet": {"args": [unit]}})
    assert (
        info["controlnet_units"][0]["model"] == "control_v11p_sd15_canny" and "image" not in info["controlnet_units"][0]
    )
    assert 'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny, Weight: 0.8' in image.text["parameters"]
    # As the extension: a model it cannot find is logged and the image is generated without ControlNet.
    (image,), info = server.txt2img(
        steps=2, alwayson_scripts={"controlnet": {"args": [{**unit, "model": "control_sdxl_depth"}]}}
    )
    assert info["controlnet_units"] == [] and "ControlNet 0" not in image.text["parameters"]
    script = assert_a1111_error(
        server.post("/sdapi/v1/txt2img", {"alwayson_scripts": {"adetailer": {"args": []}}}), 422
    )
    assert script["detail"] == "Script 'adetailer' not found"


def test_discovery_routes(server: Server) -> None:
    samplers = [s["name"] for s in server.get("/sdapi/v1/samplers").json()]
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= set(samplers)
    assert "karras" in [s["name"] for s in server.get("/sdapi/v1/schedulers").json()]
    assert server.get("/sdapi/v1/sd-vae").json() == []
    assert list(server.get("/sdapi/v1/embeddings").json()["loaded"]) == ["easynegative"]
    memory = server.get("/sdapi/v1/memory").json()
    assert set(memory["cuda"]) == {"system", "active", "allocated", "reserved", "inactive", "events"}
    assert memory["cuda"]["system"]["total"] == 24 * 1024**3 and memory["ram"]["total"] > 0
    flags = server.get("/sdapi/v1/cmd-flags").json()
    assert flags["sd_emulator"] is True and flags["nowebui"] is True and "emulator" in flags["emulator"]
    for path in ("/sdapi/v1/refresh-checkpoints", "/sdapi/v1/skip"):
        assert server.post(path).status_code == 200
    r = server.get("/sdapi/v1/progress")
    assert float(r.headers["X-Process-Time"]) >= 0
    assert "X-Process-Time" in server.get("/nope").headers


def test_stats_shape(server: Server) -> None:
    server.txt2img(steps=2)
    stats = server.get("/emulator/stats").json()
    assert {"requests", "generations", "max_concurrency", "total_busy_seconds", "oom_count", "profile", "speed"} <= set(
        stats
    )
    assert stats["profile"]["name"] == "rtx4090" and stats["speed"] == 0.001 and stats["generations"] == 1


# ---------------------------------------------------------------------------------------------
# Auth and probes


def test_api_auth_protects_everything_but_the_probes(models: Models) -> None:
    with Server(models.argv(*FAST, "--api-auth", "alice:s3cret,bob:pa:ss")) as s:
        denied = s.get("/sdapi/v1/options")
        assert_a1111_error(denied, 401)
        assert denied.headers["WWW-Authenticate"] == "Basic"
        assert s.get("/sdapi/v1/options", auth=("alice", "wrong")).status_code == 401
        assert s.get("/controlnet/model_list").status_code == 401
        assert s.get("/sdapi/v1/options", auth=("alice", "s3cret")).status_code == 200
        assert s.post("/sdapi/v1/txt2img", {"steps": 2}, auth=("bob", "pa:ss")).status_code == 200
        assert s.get("/sd-operator/live").status_code == 200
        assert s.get("/sd-operator/ready").status_code == 200
        assert s.get("/sdapi/v1/cmd-flags", auth=("bob", "pa:ss")).json()["api_auth"] == "***"


def test_ready_is_503_while_the_model_loads(models: Models) -> None:
    with Server(models.argv(*FAST, "--load-seconds", "0.6")) as s:
        loading = s.get("/sd-operator/ready")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        assert s.get("/sd-operator/live").status_code == 200
        _, info = s.txt2img(steps=2)  # waits for the model, as A1111 does
        assert info["interrupted"] is False
        assert s.get("/sd-operator/ready").json() == {"status": "ready", "model": models.title}


# ---------------------------------------------------------------------------------------------
# Command line and the real process


def test_add_parser_takes_webui_flags_and_refuses_unknown_ones(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="sd-operator")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_parser(sub)
    args = parser.parse_args(["emulator", "--api", "--xformers", "--ckpt", "m.safetensors", "--opt-channelslast"])
    assert args.func is cli.command and args.api and str(args.ckpt) == "m.safetensors"
    assert "emulator" in sub.choices and "AUTOMATIC1111" in (sub.choices["emulator"].description or "")
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["emulator", "--api", "--ckpt", "m.safetensors", "--future-flag", "1"])
    assert exited.value.code == 2
    assert "sd-operator emulator: error: unrecognized arguments: --future-flag 1" in capsys.readouterr().err


def test_missing_checkpoint_exits_non_zero_with_a_clear_message(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    cmd = [sys.executable, "-m", "sd_operator.emulator.cli", "--api", "--nowebui", "--ckpt", str(missing)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"checkpoint not found: {missing}" in done.stderr


def start_process(argv: list[str], log: Path) -> tuple[subprocess.Popen[str], str]:
    cmd = [
        sys.executable,
        "-m",
        "sd_operator.emulator.cli",
        *argv,
        "--port",
        "0",
        "--print-port",
        "--host",
        "127.0.0.1",
    ]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    port: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("EMULATOR_PORT="):
                port.append(line.strip().split("=", 1)[1])

    threading.Thread(target=read, daemon=True).start()
    try:
        wait_for(lambda: port or proc.poll() is not None, timeout=30, what="EMULATOR_PORT on stdout")
    except AssertionError:
        proc.kill()
        raise
    assert port, f"the emulator exited: {log.read_text()}"
    return proc, f"http://127.0.0.1:{port[0]}"


def test_the_real_process_accepts_the_operators_webui_command_line(models: Models, tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "examples/sdinstance-sdxl-base.yaml").read_text())
    doc["spec"].setdefault("webui", {})["extraArgs"] = ["--api-log", "--opt-channelslast"]
    args = webui_args(SDInstanceSpec.model_validate(doc["spec"]))
    # The pod's mounts, here in a temporary folder: /models/... and /etc/sd-operator/... .
    mounts = {"/models": models.root, "/etc/sd-operator": tmp_path / "etc"}
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/webui-config.json").write_text(json.dumps({"sd_model_checkpoint": "sd_xl_base_1.0.safetensors"}))
    xl = models.root / "Stable-diffusion/sd_xl_base_1.0.safetensors"
    xl.write_bytes(os.urandom(1000))
    (models.root / "VAE").mkdir()
    (models.root / "VAE/sdxl_vae.safetensors").write_bytes(b"vae")
    for i, arg in enumerate(args):
        for prefix, real in mounts.items():
            if arg.startswith(prefix + "/"):
                args[i] = str(real) + arg[len(prefix) :]
    assert {"--listen", "--freeze-settings", "--xformers", "--no-half-vae", "--vae-path"} <= set(args)
    proc, url = start_process([*args, "--speed", "0.001"], tmp_path / "emulator.log")
    try:
        assert requests.get(url + "/sd-operator/ready", timeout=10).json()["status"] == "ready"
        title = f"sd_xl_base_1.0.safetensors [{hashlib.sha256(xl.read_bytes()).hexdigest()[:10]}]"
        assert requests.get(url + "/sdapi/v1/options", timeout=10).json()["sd_model_checkpoint"] == title
        r = requests.post(url + "/sdapi/v1/txt2img", json={"prompt": "a castle", "seed": 4, "steps": 4}, timeout=30)
        assert r.status_code == 200 and "X-Process-Time" in r.headers
        image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert (image.text["sd-emulator-model"], image.text["sd-emulator-seed"]) == (title, "4")
        assert "VAE: sdxl_vae.safetensors" in image.text["parameters"]
        stats = requests.get(url + "/emulator/stats", timeout=10).json()
        assert stats["profile"]["family"] == "sdxl"  # guessed from the checkpoint name
        assert requests.get(url + "/sdapi/v1/cmd-flags", timeout=10).json()["freeze_settings"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "emulator.log").read_text()
    assert "AUTOMATIC1111 API emulator" in log
    assert "POST /sdapi/v1/txt2img" in log  # --api-log


def test_the_real_process_honours_load_seconds(models: Models, tmp_path: Path) -> None:
    # The load starts as the server starts listening, so the first probe falls well inside it.
    proc, url = start_process(models.argv(*FAST, "--load-seconds", "2"), tmp_path / "emulator.log")
    try:
        assert requests.get(url + "/sd-operator/ready", timeout=10).status_code == 503
        assert requests.get(url + "/sd-operator/live", timeout=10).status_code == 200
        wait_for(lambda: requests.get(url + "/sd-operator/ready", timeout=10).status_code == 200, timeout=20)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# As the real WebUI v1.10.1 (tests/fixtures/real/webui): its flags only, its field names, its 422s


def test_the_real_process_exits_like_the_webui_on_a_flag_the_webui_does_not_have(models: Models) -> None:
    cmd = [sys.executable, "-m", "sd_operator.emulator.cli", *models.argv(*FAST), "--some-future-flag", "--xformers"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("usage: sd-operator emulator ")
    assert done.stderr.rstrip().endswith("sd-operator emulator: error: unrecognized arguments: --some-future-flag")
    # As the WebUI: IGNORE_CMD_ARGS_ERRORS makes it parse_known_args (unknown flags ignored); then only the
    # checkpoint check fails here, after parsing.
    env = {**os.environ, "IGNORE_CMD_ARGS_ERRORS": "1"}
    cmd = [sys.executable, "-m", "sd_operator.emulator.cli", "--ckpt", str(models.root / "nope"), "--some-future-flag"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60, env=env)
    assert "unrecognized" not in done.stderr and "checkpoint not found" in done.stderr


def test_webui_flags_the_emulator_does_not_act_on_are_accepted_and_shown_in_cmd_flags(models: Models) -> None:
    argv = models.argv(*FAST, "--medvram-sdxl", "--use-cpu", "interrogate", "gfpgan", "--styles-file", "a.csv")
    with Server([*argv, "--precision", "half", "--controlnet-loglevel", "DEBUG", "--skip-load-model-at-start"]) as s:
        flags = s.get("/sdapi/v1/cmd-flags").json()
    assert flags["medvram_sdxl"] is True and flags["use_cpu"] == ["interrogate", "gfpgan"]
    assert flags["styles_file"] == ["a.csv"] and flags["precision"] == "half"
    assert flags["controlnet_loglevel"] == "DEBUG" and flags["timeout_keep_alive"] == 30  # the WebUI's default


def test_request_bodies_as_the_webui_reads_them(server: Server) -> None:
    body = {"prompt": "x", "steps": 2, "seed": None, "sampler_name": None, "no_such_field": 1, "eta": 0.5}
    r = server.post("/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    params = r.json()["parameters"]
    assert "no_such_field" not in params and params["eta"] == 0.5 and params["seed"] == -1
    refused = server.post("/sdapi/v1/txt2img", {"send_images": None})
    assert refused.status_code == 422
    assert refused.json()["detail"] == [
        {"loc": ["body", "send_images"], "msg": "none is not an allowed value", "type": "type_error.none.not_allowed"}
    ]
