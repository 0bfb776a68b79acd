"""The web console's API on the real gateway process, in front of WebUI emulators and the local cluster.

Over real sockets on 127.0.0.1: the static shell and the keys, request state while a generation waits and
renders, the fleet following an SDInstance's phase, and batches whose outputs a real `sd-operator batch`
run wrote (a mounted folder, and S3 read with the batch's own Secret). SDInstance and LoRAJob statuses are
written by the test the way the operator writes them (no operator runs); EndpointSlices carry fictitious
pod IPs the gateway never connects to.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from kubernetes import client
from PIL import Image
from test_batch_runner import s3_server
from test_gateway_discovery import endpoint_slice

import sd_operator
from cluster_support import Cluster
from helpers import wait_for
from processes import BIN, Proc, _start, _wait_ok, checkpoint, emulator

__all__ = ["s3_server"]  # the S3 server fixture of the runner's tests

MODEL = "animeA_v1.safetensors"
GROUP, VERSION = "sd-operator.dev", "v1alpha1"
KEY, OTHER_KEY = "sk-console-a-123456", "sk-console-b-654321"
A = {"Authorization": f"Bearer {KEY}"}
B = {"X-API-Key": OTHER_KEY}
NEW_ROUTES = (
    "/v1/fleet",
    "/v1/batches",
    "/v1/batches/ns/b/outputs?offset=0&limit=24",
    "/v1/batches/ns/b/files/000000-1.png",
    "/v1/batches/ns/b/thumbnails/000000-1.png",
    "/v1/lorajobs",
    "/v1/lorajobs/ns/j/evaluation",
    "/v1/requests/5f0c8a1e-0000-4000-8000-000000000001",
)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()


def keys_file(tmp: Path) -> Path:
    path = tmp / "keys.yaml"
    path.write_text(f"keys:\n  - {{key: {KEY}, tenant: studio-a}}\n  - {{key: {OTHER_KEY}, tenant: studio-b}}\n")
    return path


def start_gateway(tmp: Path, backends: list[Proc], *args: str, env: dict[str, str] | None = None) -> Proc:
    """The gateway with API keys on (waits with a key until it serves every backend)."""
    backends_file = tmp / "backends.yaml"
    backends_file.write_text(json.dumps({"backends": [{"url": b.url} for b in backends]}))
    cmd = [str(BIN / "sd-operator"), "gateway", "--port", "0", "--keys-file", str(keys_file(tmp))]
    if backends:
        cmd += ["--backends-file", str(backends_file)]
    gw = _start([*cmd, *args], tmp / "gateway.log", "GATEWAY_PORT", env)
    _wait_ok(f"{gw.url}/healthz")
    wait_for(
        lambda: len(requests.get(f"{gw.url}/v1/instances", headers=A, timeout=5).json()) == len(backends),
        timeout=30,
        what="the gateway to take up its backends",
    )
    return gw


def get(gw: Proc, path: str, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.get(f"{gw.url}{path}", headers=A if headers is None else headers, timeout=30)


def image_of(response: requests.Response) -> Image.Image:
    assert response.status_code == 200, response.text[:300]
    return Image.open(io.BytesIO(response.content))


# ---------------------------------------------------------------------------------------------
# Without a cluster


def test_the_shell_is_open_and_every_new_route_needs_a_key(tmp_path: Path, procs: list[Proc]) -> None:
    one = emulator(tmp_path, "one", MODEL)
    procs.append(one)
    gw = start_gateway(tmp_path, [one])
    procs.append(gw)

    shell = requests.get(f"{gw.url}/ui/", timeout=5)
    assert shell.status_code == 200 and shell.headers["Content-Type"] == "text/html; charset=utf-8"
    assert shell.headers["Cache-Control"] == "no-cache" and "<html" in shell.text.lower()
    redirect = requests.get(f"{gw.url}/ui", timeout=5, allow_redirects=False)
    assert redirect.status_code == 302 and redirect.headers["Location"] == "/ui/"
    ui_dir = Path(sd_operator.__file__).parent / "gateway/ui"
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
    for path in sorted(p for p in ui_dir.iterdir() if p.suffix in types):
        served = requests.get(f"{gw.url}/ui/{path.name}", timeout=5)
        assert served.status_code == 200 and served.headers["Content-Type"] == types[path.suffix], path.name
        assert served.content == path.read_bytes() and served.headers["Cache-Control"] == "no-cache"
    for escape in ("/ui/%2e%2e/console.py", "/ui/..%2fconsole.py", "/ui/%2e%2e/%2e%2e/app.py", "/ui/nothing.js"):
        assert requests.get(f"{gw.url}{escape}", timeout=5).status_code == 404, escape

    for route in NEW_ROUTES:
        assert get(gw, route, {}).status_code == 401, route
        assert get(gw, route, {"Authorization": "Bearer sk-wrong"}).status_code == 401, route
        assert get(gw, route, {"X-API-Key": "sk-wrong"}).status_code == 401, route
        # With a key: answered (404 for objects that do not exist: this gateway watches no cluster).
        assert get(gw, route).status_code in (200, 404), route
    fleet = get(gw, "/v1/fleet").json()
    assert [m["model"] for m in fleet["models"]] == [MODEL] and fleet["models"][0]["state"] == "Ready"
    assert fleet["models"][0]["instances"][0]["readyReplicas"] == 1
    assert get(gw, "/v1/batches").json()["items"] == []
    assert KEY not in gw.log.read_text() and "Traceback" not in gw.log.read_text()


def test_request_state_while_it_waits_renders_and_is_done(tmp_path: Path, procs: list[Proc]) -> None:
    # 40 steps at 30 it/s take 1.3 s at speed 1: speed 3 gives each request 4 s, so the second is
    # sent, queued and seen queued while the first still renders, even on a loaded 2-core machine.
    one = emulator(tmp_path, "one", MODEL, speed=3.0)
    procs.append(one)
    gw = start_gateway(tmp_path, [one])
    procs.append(gw)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    answers: dict[str, requests.Response] = {}

    def generate(request_id: str) -> None:
        body = {"prompt": "a lighthouse", "steps": 40, "width": 512, "height": 512, "seed": 1}
        headers = {**A, "X-Request-Id": request_id}
        answers[request_id] = requests.post(f"{gw.url}/v1/generate", json=body, headers=headers, timeout=120)

    def state(request_id: str, headers: dict[str, str] = A) -> dict[str, Any]:
        r = get(gw, f"/v1/requests/{request_id}", headers)
        assert r.status_code == 200
        return dict(r.json())

    senders = [threading.Thread(target=generate, args=(first,))]
    senders[0].start()
    wait_for(lambda: state(first)["state"] == "running", timeout=30, what="the first request to render")
    senders.append(threading.Thread(target=generate, args=(second,)))
    senders[1].start()
    queued = wait_for(lambda: (s := state(second))["state"] == "queued" and s, timeout=30, what="a queued request")
    assert queued["position"] == 1 and queued["queueDepth"] == 1 and queued["etaSeconds"] >= 0
    # Another key does not see it: the id is unknown to that tenant.
    assert state(second, B) == {"state": "unknown", "position": None, "queueDepth": 0, "progress": None,
                                "etaSeconds": None}  # fmt: skip
    seen: list[dict[str, Any]] = []

    def rendering_with_progress() -> bool:
        seen.append(state(second))
        return seen[-1]["state"] == "running" and (seen[-1]["progress"] or 0) > 0.05

    wait_for(rendering_with_progress, timeout=60, interval=0.05, what="the second request's progress")
    running = seen[-1]
    assert running["position"] is None and 0 < running["progress"] <= 1 and running["instance"] == one.url
    for sender in senders:
        sender.join(timeout=120)
    assert answers[first].status_code == 200 and answers[second].status_code == 200
    done = state(second)
    assert (done["state"], done["progress"], done["status"]) == ("done", 1.0, 200)
    assert state(str(uuid.uuid4()))["state"] == "unknown"


# ---------------------------------------------------------------------------------------------
# With the local cluster


def kube_env(cluster: Cluster, **more: str) -> dict[str, str]:
    # The gateway and the runner get no AWS credentials from the test's environment.
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**base, "KUBECONFIG": str(cluster.kubeconfig), **more}


def cluster_gateway(
    cluster: Cluster, namespace: str, tmp: Path, backends: list[Proc], *args: str
) -> Proc:  # fmt: skip
    cmd = [
        str(BIN / "sd-operator"), "gateway", "--port", "0", "--keys-file", str(keys_file(tmp)),
        "--kubernetes", "-n", namespace, *args,
    ]  # fmt: skip
    if backends:
        backends_file = tmp / "backends.yaml"
        backends_file.write_text(json.dumps({"backends": [{"url": b.url} for b in backends]}))
        cmd += ["--backends-file", str(backends_file)]
    gw = _start(cmd, tmp / "gateway.log", "GATEWAY_PORT", kube_env(cluster))
    _wait_ok(f"{gw.url}/healthz")
    return gw


def fleet_instance(gw: Proc, model: str, name: str) -> dict[str, Any] | None:
    for m in get(gw, "/v1/fleet").json()["models"]:
        if m["model"] == model:
            return next(({**i, "modelState": m["state"]} for i in m["instances"] if i["name"] == name), None)
    return None


def test_fleet_follows_an_sdinstance_phase(cluster: Cluster, crds: None, namespace: str, tmp_path: Path) -> None:
    custom = client.CustomObjectsApi(cluster.api)
    xl, sha = "sd_xl_base_1.0.safetensors", "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b"
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "sdinstances", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "SDInstance", "metadata": {"name": "xl"},
        "spec": {"model": {"family": "sdxl", "checkpoint": {"name": xl, "sha256": sha,
                 "source": {"http": {"url": "http://models.invalid/x.safetensors"}}}}, "gpu": {"memoryGiB": 24}},
    })  # fmt: skip
    gw = cluster_gateway(cluster, namespace, tmp_path, [])
    try:
        first = wait_for(lambda: fleet_instance(gw, xl, "xl"), timeout=30, what="the SDInstance in /v1/fleet")
        assert first["phase"] == "Pending" and first["modelState"] == "Pending" and first["gpu"] == "24GiB"

        def status(body: dict[str, Any]) -> None:
            custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, "sdinstances", "xl", body)

        status({"status": {"phase": "Downloading", "replicas": 1, "readyReplicas": 0, "conditions": [
            {"type": "Ready", "status": "False", "reason": "Downloading", "message": "fetching the checkpoint",
             "lastTransitionTime": "2026-12-05T00:00:00Z"}]}})  # fmt: skip
        downloading = wait_for(
            lambda: (i := fleet_instance(gw, xl, "xl")) and i["phase"] == "Downloading" and i,
            timeout=30,
            what="Downloading in /v1/fleet",
        )
        assert downloading["modelState"] == "Downloading" and downloading["message"] == "fetching the checkpoint"
        assert (downloading["replicas"], downloading["readyReplicas"]) == (1, 0)

        status({"status": {"phase": "Ready", "readyReplicas": 1, "gpu": "1x NVIDIA-L4 (23034 MiB)", "conditions": [
            {"type": "Ready", "status": "True", "reason": "Ready", "message": "1/1 replicas ready",
             "lastTransitionTime": "2026-12-05T00:01:00Z"}]}})  # fmt: skip
        client.DiscoveryV1Api(cluster.api).create_namespaced_endpoint_slice(
            namespace, endpoint_slice("xl-a", "xl", ["10.244.9.1"])
        )
        ready = wait_for(
            lambda: (i := fleet_instance(gw, xl, "xl")) and i["modelState"] == "Ready" and i,
            timeout=30,
            what="Ready in /v1/fleet",
        )
        assert ready["phase"] == "Ready" and ready["readyReplicas"] == 1 and ready["gpu"] == "1x NVIDIA-L4 (23034 MiB)"
        fleet = get(gw, "/v1/fleet").json()
        assert fleet["discovery"] == {"up": True, "staleSeconds": 0.0}
        assert get(gw, "/v1/fleet", {}).status_code == 401
        assert "Traceback" not in gw.log.read_text()
    finally:
        gw.stop()


def create(custom: client.CustomObjectsApi, namespace: str, plural: str, body: dict[str, Any]) -> dict[str, Any]:
    return dict(custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body))


def run_batch(cluster: Cluster, tmp: Path, batch: dict[str, Any], gw: Proc, *args: str, **env: str) -> None:
    """`sd-operator batch` as the batch Job runs it: progress into the object's status (--report kubernetes)."""
    path = tmp / f"{batch['metadata']['name']}.json"
    path.write_text(json.dumps(batch))
    cmd = [
        sys.executable, "-m", "sd_operator.batch.cli", "--batch-file", str(path), "--gateway-url", gw.url,
        "--report", "kubernetes", "--api-key-env", "SD_TEST_KEY", *args,
    ]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, env=kube_env(cluster, SD_TEST_KEY=KEY, **env), check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]


def batch_item(gw: Proc, name: str) -> dict[str, Any] | None:
    return next((b for b in get(gw, "/v1/batches").json()["items"] if b["name"] == name), None)


def test_batch_progress_and_a_gallery_of_fifty_outputs(
    cluster: Cluster, crds: None, namespace: str, tmp_path: Path, procs: list[Proc]
) -> None:
    emus = [emulator(tmp_path, f"e{i}", MODEL, speed=0.0005) for i in range(2)]
    procs += emus
    renders = tmp_path / "renders"  # the claim "renders", as the gateway pod would mount it
    gw = cluster_gateway(cluster, namespace, tmp_path, emus, "--outputs-dir", f"{namespace}/renders={renders}")
    procs.append(gw)
    custom = client.CustomObjectsApi(cluster.api)
    inline = [{"prompt": f"a lighthouse, study {i}", "width": 128, "height": 128} for i in range(50)]
    batch = create(custom, namespace, "generationbatches", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "GenerationBatch", "metadata": {"name": "portraits"},
        "spec": {"target": {"model": MODEL}, "items": {"inline": inline},
                 "output": {"pvc": {"claimName": "renders", "path": "portraits"}}},
    })  # fmt: skip
    listed = wait_for(lambda: batch_item(gw, "portraits"), timeout=30, what="the batch in /v1/batches")
    assert listed["progress"] is None and listed["outputLocation"] == f"pvc://{namespace}/renders/portraits"

    run_batch(cluster, tmp_path, batch, gw, "--output-dir", str(renders / "portraits"))
    finished = wait_for(
        lambda: (b := batch_item(gw, "portraits")) and b["succeeded"] == 50 and b,
        timeout=30,
        what="the runner's progress in /v1/batches",
    )
    assert (finished["total"], finished["failed"], finished["progress"], finished["model"]) == (50, 0, 1.0, MODEL)

    base = f"/v1/batches/{namespace}/portraits"
    pages = [get(gw, f"{base}/outputs?offset={offset}&limit=24").json() for offset in (0, 24, 48)]
    assert [(p["total"], p["offset"], p["limit"], len(p["items"])) for p in pages] == [
        (50, 0, 24, 24), (50, 24, 24, 24), (50, 48, 24, 2),
    ]  # fmt: skip
    items = [item for page in pages for item in page["items"]]
    assert [item["index"] for item in items] == list(range(50))
    assert [item["prompt"] for item in items] == [f"a lighthouse, study {i}" for i in range(50)]
    last = items[49]
    assert last["image"] == f"{base}/files/000049-{last['seed']}.png" and last["parameters"]["width"] == 128
    full = image_of(get(gw, last["image"]))
    assert full.format == "PNG" and full.size == (128, 128)
    thumb = image_of(get(gw, items[0]["thumbnail"]))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    for url in (last["image"], items[0]["thumbnail"], f"{base}/outputs"):
        assert get(gw, url, {}).status_code == 401 and get(gw, url, {"X-API-Key": "nope"}).status_code == 401
    assert get(gw, f"{base}/files/000049-1.json").status_code == 404  # sidecars are not image files
    assert get(gw, f"{base}/files/000999-1.png").status_code == 404
    assert get(gw, f"{base}/outputs?offset=x").status_code == 422

    # A batch on a claim the gateway has not mounted: 404 that says what to do.
    create(custom, namespace, "generationbatches", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "GenerationBatch", "metadata": {"name": "elsewhere"},
        "spec": {"target": {"model": MODEL}, "items": {"inline": inline[:1]},
                 "output": {"pvc": {"claimName": "not-mounted", "path": "x"}}},
    })  # fmt: skip
    wait_for(lambda: batch_item(gw, "elsewhere"), timeout=30, what="the second batch")
    unmounted = get(gw, f"/v1/batches/{namespace}/elsewhere/outputs")
    assert unmounted.status_code == 404 and "not mounted into the gateway" in unmounted.json()["detail"]
    assert "Traceback" not in gw.log.read_text()


def test_lorajob_progress_and_its_evaluation_grid(
    cluster: Cluster, crds: None, namespace: str, tmp_path: Path, procs: list[Proc]
) -> None:
    checkpoint(tmp_path / "e0/models/Lora", "style.safetensors")  # the trained LoRA, on the instance
    emu = emulator(tmp_path, "e0", MODEL, speed=0.0005)
    procs.append(emu)
    loras = tmp_path / "loras"
    gw = cluster_gateway(cluster, namespace, tmp_path, [emu], "--outputs-dir", f"{namespace}/loras={loras}")
    procs.append(gw)
    custom = client.CustomObjectsApi(cluster.api)
    prompts, weights = ["style, a lighthouse", "style, an old sailor"], [0.6, 0.8, 1.0]
    create(custom, namespace, "lorajobs", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRAJob", "metadata": {"name": "style"},
        "spec": {"baseModel": {"family": "sd15", "fromInstance": {"name": "anime"}},
                 "dataset": {"source": {"pvc": {"claimName": "datasets", "path": "style"}}, "triggerWord": "style"},
                 "output": {"name": "style", "destination": {"pvc": {"claimName": "loras", "path": "style"}}},
                 "evaluation": {"prompts": ["a lighthouse", "an old sailor"], "weights": weights}},
    })  # fmt: skip
    # The evaluation batch as the operator renders it (render/lorajob.py render_evaluation), run by the runner.
    evaluation = create(custom, namespace, "generationbatches", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "GenerationBatch", "metadata": {"name": "style-evaluate"},
        "spec": {"target": {"model": MODEL}, "defaults": {"width": 128, "height": 128},
                 "sweep": {"prompts": prompts, "lora": "style", "loraWeights": weights},
                 "output": {"pvc": {"claimName": "loras", "path": "style/evaluation"}}},
    })  # fmt: skip
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, "lorajobs", "style", {"status": {
        "phase": "Evaluating", "message": "rendering the evaluation on anime",
        "progress": {"epoch": 10, "totalEpochs": 10, "step": 400, "totalSteps": 400, "loss": 0.0731},
        "artifacts": [{"path": f"pvc://{namespace}/loras/style/style.safetensors", "sizeBytes": 10}],
        "evaluationBatch": "style-evaluate",
    }})  # fmt: skip
    job = wait_for(
        lambda: next((j for j in get(gw, "/v1/lorajobs").json()["items"] if j["evaluationBatch"]), None),
        timeout=30,
        what="the LoRAJob in /v1/lorajobs",
    )
    assert (job["name"], job["phase"], job["epoch"], job["totalSteps"], job["loss"]) == (
        "style", "Evaluating", 10, 400, 0.0731,
    )  # fmt: skip
    assert job["outputs"][0]["path"].endswith("style.safetensors")
    wait_for(lambda: batch_item(gw, "style-evaluate"), timeout=30, what="the evaluation batch")
    run_batch(cluster, tmp_path, evaluation, gw, "--output-dir", str(loras / "style/evaluation"))

    grid = get(gw, f"/v1/lorajobs/{namespace}/style/evaluation").json()
    assert grid["batch"] == "style-evaluate" and grid["prompts"] == prompts and grid["weights"] == weights
    cells = grid["cells"]
    assert len(cells) == 2 and all(len(row) == 3 and all(cell is not None for cell in row) for row in cells)
    # Each cell is the image of its prompt at its weight, as the runner's sidecar recorded it.
    for p, row in enumerate(cells):
        assert len({cell["seed"] for cell in row}) == 1  # a row shares its seed: only the weight differs
        for w, cell in enumerate(row):
            name = cell["image"].rsplit("/", 1)[-1]
            sidecar = json.loads((loras / "style/evaluation" / name.replace(".png", ".json")).read_text())
            assert sidecar["prompt"] == f"{prompts[p]}, <lora:style:{weights[w]:g}>"
    assert image_of(get(gw, cells[1][2]["thumbnail"])).format == "JPEG"
    assert get(gw, f"/v1/lorajobs/{namespace}/style/evaluation", B).status_code == 200  # any valid key
    assert get(gw, f"/v1/lorajobs/{namespace}/style/evaluation", {}).status_code == 401
    assert "Traceback" not in gw.log.read_text()


def test_s3_outputs_are_read_with_the_batchs_secret(
    cluster: Cluster, crds: None, namespace: str, tmp_path: Path, procs: list[Proc], s3_server: str
) -> None:
    creds = {"AWS_ACCESS_KEY_ID": "console-test", "AWS_SECRET_ACCESS_KEY": "console-test-secret"}
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", **{
        "aws_access_key_id": creds["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": creds["AWS_SECRET_ACCESS_KEY"],
    }).create_bucket(Bucket="renders")  # fmt: skip
    cluster.core.create_namespaced_secret(
        namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="s3-creds"), string_data=creds)
    )
    emu = emulator(tmp_path, "e0", MODEL, speed=0.0005)
    procs.append(emu)
    gw = cluster_gateway(cluster, namespace, tmp_path, [emu])  # no AWS_* in its environment
    procs.append(gw)
    custom = client.CustomObjectsApi(cluster.api)
    inline = [{"prompt": f"a fox, {i}", "width": 128, "height": 128} for i in range(5)]
    s3 = {"bucket": "renders", "key": "runs/one/", "endpoint": s3_server, "credentialsSecret": {"name": "s3-creds"}}
    batch = create(custom, namespace, "generationbatches", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "GenerationBatch", "metadata": {"name": "foxes"},
        "spec": {"target": {"model": MODEL}, "items": {"inline": inline}, "output": {"s3": s3, "format": "webp"}},
    })  # fmt: skip
    run_batch(cluster, tmp_path, batch, gw, **creds)
    wait_for(lambda: (b := batch_item(gw, "foxes")) and b["succeeded"] == 5, timeout=30, what="the S3 batch")
    page = get(gw, f"/v1/batches/{namespace}/foxes/outputs").json()
    assert page["total"] == 5 and [i["prompt"] for i in page["items"]] == [f"a fox, {i}" for i in range(5)]
    assert page["items"][0]["image"].endswith(".webp")
    full = image_of(get(gw, page["items"][4]["image"]))
    assert full.format == "WEBP" and full.size == (128, 128)
    assert image_of(get(gw, page["items"][4]["thumbnail"])).format == "JPEG"
    log = gw.log.read_text()
    assert "console-test-secret" not in log and "Traceback" not in log
    assert "cannot read Secret" not in log  # the batch's own credentials, not a fallback
