"""`sd-operator batch` as a real process against a real gateway and WebUI emulators (and a real S3 server).

Everything talks over sockets on 127.0.0.1; nothing is mocked. The emulators run at a tiny --speed so a
thousand items take seconds; each item's sidecar carries the emulator's own render start and end, from
which the test computes how many generations ever overlapped: the bound the runner must keep.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from PIL import Image

from processes import BIN, Proc, emulator, gateway

MODEL = "animeA_v1.safetensors"
SPEED = 0.0005
EMULATORS = 4  # one more than the runner may use, so a runner that overshot would be caught
SIDECAR = re.compile(r"^(\d+)-(\d+)\.json$")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("fleet")
    procs: list[Proc] = []
    try:
        emus = [emulator(tmp, f"e{i}", MODEL, speed=SPEED) for i in range(EMULATORS)]
        procs += emus
        gw = gateway(tmp, emus)
        procs.append(gw)
        yield {"gw": gw, "emulators": emus}
    finally:
        for p in procs:
            p.stop()


def emulator_stats(fleet: dict[str, Any]) -> list[dict[str, Any]]:
    return [requests.get(f"{e.url}/emulator/stats", timeout=5).json() for e in fleet["emulators"]]


def generations(fleet: dict[str, Any]) -> int:
    return sum(s["generations"] for s in emulator_stats(fleet))


def write_batch(tmp: Path, uid: str, spec: dict[str, Any]) -> Path:
    doc = {
        "apiVersion": "sd-operator.dev/v1alpha1",
        "kind": "GenerationBatch",
        "metadata": {"name": f"b-{uid}", "namespace": "tests", "uid": uid},
        "spec": {"target": {"model": MODEL}, "output": {"pvc": {"claimName": "out", "path": "x"}}, **spec},
    }
    path = tmp / f"batch-{uid}.json"
    path.write_text(json.dumps(doc))
    return path


def write_items(path: Path, n: int, *extra: str) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"a lighthouse, study {i}", "width": 128, "height": 128}) + "\n")
        for line in extra:
            f.write(line + "\n")
    return path


def runner_cmd(tmp: Path, batch: Path, gw: Proc, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "sd_operator.batch.cli",
        "--batch-file", str(batch), "--gateway-url", gw.url,
        "--report", "file", "--report-file", str(tmp / "report.json"), *args,
    ]  # fmt: skip


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def report(tmp: Path) -> dict[str, Any]:
    return json.loads((tmp / "report.json").read_text())


def sidecars(out: Path) -> dict[int, list[Path]]:
    found: dict[int, list[Path]] = {}
    for p in out.iterdir():
        if m := SIDECAR.match(p.name):
            found.setdefault(int(m[1]), []).append(p)
    return found


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end at t closes before a start at t opens)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def backend_intervals(paths: list[Path]) -> list[tuple[float, float]]:
    out = []
    for p in paths:
        backend = json.loads(p.read_text())["timings"]["backend"]
        out.append((backend["started"], backend["finished"]))
    return out


def test_thousand_items_finish_with_bounded_concurrency(fleet: dict[str, Any], tmp_path: Path) -> None:
    before = generations(fleet)
    items = write_items(tmp_path / "items.jsonl", 1000)
    batch = write_batch(
        tmp_path, "thousand", {"items": {"file": {"claimName": "in", "path": "items.jsonl"}}, "concurrency": 3}
    )
    out = tmp_path / "out"
    started = time.monotonic()
    r = run(runner_cmd(tmp_path, batch, fleet["gw"], "--items-file", str(items), "--output-dir", str(out)))
    seconds = time.monotonic() - started
    assert r.returncode == 0, r.stderr[-3000:]
    found = sidecars(out)
    assert sorted(found) == list(range(1000)) and all(len(v) == 1 for v in found.values())
    assert len(list(out.glob("*.png"))) == 1000
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    stats = emulator_stats(fleet)
    assert all(s["max_concurrency"] <= 1 for s in stats)
    assert sum(s["generations"] for s in stats) - before == 1000
    # The emulators' own render times: never more than 3 generations at once, although 4 instances were free.
    overlap = max_overlap(backend_intervals([v[0] for v in found.values()]))
    assert 2 <= overlap <= 3, overlap
    rep = report(tmp_path)
    assert rep["status"]["progress"] == "1000/1000"
    assert (rep["status"]["succeeded"], rep["status"]["failed"], rep["status"]["running"]) == (1000, 0, 0)
    assert rep["status"]["outputLocation"] == str(out)
    assert rep["runner"]["concurrency"] == 3 and rep["runner"]["maxInFlight"] == 3
    assert "succeeded=1000, failed=0, images=1000" in r.stderr
    sample = json.loads(found[7][0].read_text())
    assert sample["index"] == 7 and sample["prompt"] == "a lighthouse, study 7"
    assert sample["model"] == "animeA_v1" and sample["model_hash"]
    assert f"Seed: {sample['seed']}" in sample["infotext"]
    assert sample["parameters"]["width"] == 128 and "images" not in sample["parameters"]
    assert (out / sample["images"][0]).exists()
    print(f"1000 items: {seconds:.1f}s wall, {rep['runner']['imagesPerSecond']} images/s, overlap {overlap}")


def test_killed_runner_resumes_without_losing_or_duplicating_items(fleet: dict[str, Any], tmp_path: Path) -> None:
    n, concurrency = 1000, 3
    before = generations(fleet)
    items = write_items(tmp_path / "items.jsonl", n)
    batch = write_batch(tmp_path, "killed", {"items": {"file": {"claimName": "in", "path": "items.jsonl"}}})
    out = tmp_path / "out"
    cmd = runner_cmd(
        tmp_path, batch, fleet["gw"], "--items-file", str(items), "--output-dir", str(out),
        "--concurrency", str(concurrency),
    )  # fmt: skip
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and first.poll() is None:
        if out.exists() and sum(1 for p in os.scandir(out) if p.name.endswith(".json")) >= n // 2:
            break
        time.sleep(0.01)
    assert first.poll() is None, "the runner finished before it could be killed"
    first.kill()  # SIGKILL: no cleanup, no final report
    first.wait()
    done_at_kill = len(sidecars(out))
    assert n // 2 <= done_at_kill < n
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    found = sidecars(out)
    assert sorted(found) == list(range(n)) and all(len(v) == 1 for v in found.values())
    images = Counter(int(p.name.split("-")[0]) for p in out.glob("*.png"))
    assert sorted(images) == list(range(n)) and set(images.values()) == {1}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp file survives
    redone = generations(fleet) - before - n
    assert 0 <= redone <= concurrency, redone
    rep = report(tmp_path)
    assert rep["status"]["progress"] == f"{n}/{n}"
    assert rep["runner"]["alreadyDone"] == done_at_kill and rep["runner"]["images"] == n - done_at_kill
    print(f"killed at {done_at_kill}/{n} done; re-rendered {redone} (bound {concurrency})")


def test_sigterm_stops_taking_items_reports_and_exits_143(fleet: dict[str, Any], tmp_path: Path) -> None:
    items = write_items(tmp_path / "items.jsonl", 1000)
    batch = write_batch(tmp_path, "sigterm", {"items": {"file": {"claimName": "in", "path": "items.jsonl"}}})
    out = tmp_path / "out"
    cmd = runner_cmd(tmp_path, batch, fleet["gw"], "--items-file", str(items), "--output-dir", str(out))
    runner = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (out.exists() and len(sidecars(out)) >= 100):
        assert runner.poll() is None
        time.sleep(0.01)
    runner.send_signal(signal.SIGTERM)
    _, stderr = runner.communicate(timeout=20)
    assert runner.returncode == 143, stderr[-2000:]
    rep = report(tmp_path)["status"]
    assert rep["running"] == 0 and rep["succeeded"] == len(sidecars(out)) < 1000
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_permanent_failures_are_recorded_once_and_exit_3(fleet: dict[str, Any], tmp_path: Path) -> None:
    def oom_errors() -> float:
        text = requests.get(f"{fleet['gw'].url}/metrics", timeout=5).text
        found = re.search(r'sd_gateway_errors_total\{kind="OutOfMemoryError"\} (\S+)', text)
        return float(found[1]) if found else 0.0

    before_gen, before_oom = generations(fleet), oom_errors()
    huge = json.dumps({"prompt": "a huge poster", "width": 2048, "height": 2048, "batchSize": 8})
    items = write_items(tmp_path / "items.jsonl", 10, huge, "{this is not json", "# a comment")
    batch = write_batch(tmp_path, "failing", {"items": {"file": {"claimName": "in", "path": "items.jsonl"}}})
    out = tmp_path / "out"
    term = tmp_path / "termination-log"
    r = run(
        runner_cmd(tmp_path, batch, fleet["gw"], "--items-file", str(items), "--output-dir", str(out)),
        env={"SD_TERMINATION_LOG": str(term)},
    )
    assert r.returncode == 3, r.stderr[-3000:]
    rep = report(tmp_path)["status"]
    assert (rep["total"], rep["succeeded"], rep["failed"], rep["progress"]) == (12, 10, 2, "10/12")
    reasons = {f["index"]: f["reason"] for f in rep["failures"]}
    assert set(reasons) == {10, 11}
    assert reasons[10].startswith("HTTP 413 OutOfMemoryError") and "2048x2048 x batch 8" in reasons[10]
    assert reasons[11].startswith("line 12: not valid JSON")
    assert oom_errors() - before_oom == 1  # asked once, never retried
    assert generations(fleet) - before_gen == 10
    assert sorted(sidecars(out)) == list(range(10))
    assert term.read_text().startswith("2 of 12 items failed; first: item 10: HTTP 413")


def test_unusable_input_exits_1_with_one_clear_line(fleet: dict[str, Any], tmp_path: Path) -> None:
    batch = write_batch(
        tmp_path, "nomodel", {"target": {"model": "nope.safetensors"}, "items": {"inline": [{"prompt": "x"}]}}
    )
    term = tmp_path / "termination-log"
    cmd = runner_cmd(tmp_path, batch, fleet["gw"], "--output-dir", str(tmp_path / "out"), "--model-wait", "1")
    r = run(cmd, env={"SD_TERMINATION_LOG": str(term)})
    assert r.returncode == 1
    assert "waiting for model nope.safetensors" in r.stderr  # it waited for the model before giving up
    assert r.stderr.strip().splitlines()[-1].startswith("sd-operator batch: unknown target model 'nope.safetensors'")
    assert MODEL in term.read_text()
    at = cmd.index("--gateway-url") + 1
    gone = run([*cmd[:at], f"http://127.0.0.1:{free_port()}", *cmd[at + 1 :]], env={"SD_TERMINATION_LOG": str(term)})
    assert gone.returncode == 1 and "unreachable" in gone.stderr.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "moto.log").open("wb")
    process = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and process.poll() is None, (tmp_path / "moto.log").read_text()
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_s3_output_and_a_second_run_renders_nothing(
    fleet: dict[str, Any], tmp_path: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret"}
    for key, value in creds.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="renders")
    inline = [{"prompt": f"a fox, {i}", "width": 128, "height": 128} for i in range(19)]
    inline.append({"prompt": "twins", "width": 128, "height": 128, "batchSize": 2, "seed": 42})
    spec = {
        "items": {"inline": inline},
        "output": {"s3": {"bucket": "renders", "key": "runs/one/", "endpoint": s3_server}, "format": "webp"},
    }
    batch = write_batch(tmp_path, "s3", spec)
    before = generations(fleet)
    r = run(runner_cmd(tmp_path, batch, fleet["gw"]), env=creds)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "testing-secret" not in r.stderr
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="renders")
    keys = {obj["Key"] for page in pages for obj in page.get("Contents", [])}
    assert all(k.startswith("runs/one/") for k in keys)
    metas = {k: json.loads(s3.get_object(Bucket="renders", Key=k)["Body"].read()) for k in keys if k.endswith(".json")}
    assert sorted(m["index"] for m in metas.values()) == list(range(20))
    expected = {f"runs/one/{name}" for m in metas.values() for name in m["images"]} | set(metas)
    assert keys == expected and len(keys) == 20 + 21
    twins = next(m for m in metas.values() if m["index"] == 19)
    assert twins["images"] == ["000019-42.webp", "000019-42-1.webp"] and twins["seeds"] == [42, 43]
    obj = s3.get_object(Bucket="renders", Key="runs/one/000019-42-1.webp")
    assert obj["ContentType"] == "image/webp"
    with Image.open(io.BytesIO(obj["Body"].read())) as image:
        assert image.format == "WEBP" and image.size == (128, 128)
    assert report(tmp_path)["status"]["outputLocation"] == "s3://renders/runs/one"
    assert generations(fleet) - before == 20

    again = run(runner_cmd(tmp_path, batch, fleet["gw"]), env=creds)
    assert again.returncode == 0, again.stderr[-3000:]
    assert generations(fleet) - before == 20
    rep = report(tmp_path)
    assert rep["status"]["progress"] == "20/20" and rep["runner"]["alreadyDone"] == 20 and rep["runner"]["images"] == 0
