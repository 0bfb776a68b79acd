"""`sd-operator batch` without processes: items and sweeps, seeds, payloads, file names, resume, rate limits."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sd_operator.api.generationbatch import MAX_FAILURES_IN_STATUS, GenerationBatchSpec, ImageFormat
from sd_operator.batch.client import RetriableError, backoff, classify, match_model, parse_answer
from sd_operator.batch.items import SEED_SPACE, ItemsError, ItemSource, Task, derived_seed
from sd_operator.batch.output import LocalStore, commit, encode, image_name, marker_index, sidecar_name
from sd_operator.batch.payload import PermanentItemError, build_body
from sd_operator.batch.report import Counters, RateLimit, format_duration, progress_line, status
from sd_operator.gateway.presets import Preset

UID = "3f2a9c1e-uid"


def spec(**fields: Any) -> GenerationBatchSpec:
    base: dict[str, Any] = {"target": {"model": "m.safetensors"}, "output": {"pvc": {"claimName": "out"}}}
    return GenerationBatchSpec.model_validate({**base, **fields})


def file_spec(**fields: Any) -> GenerationBatchSpec:
    return spec(items={"file": {"claimName": "in", "path": "items.jsonl"}}, **fields)


def jsonl(tmp_path: Path, *lines: str | dict[str, Any]) -> Path:
    path = tmp_path / "items.jsonl"
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def png(width: int = 16, height: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (width, height), (200, 10, 10, 255)).save(buf, "PNG")
    return buf.getvalue()


# --- items ---------------------------------------------------------------------------------------------------------


def test_inline_items_expand_count_into_consecutive_indexes_with_seed_plus_k() -> None:
    s = spec(items={"inline": [{"prompt": "a", "count": 3, "seed": 100}, {"prompt": "b"}, {"prompt": "c", "count": 2}]})
    source = ItemSource(s, UID)
    tasks = list(source.tasks())
    assert source.total == 6
    assert [(t.index, t.params.prompt if t.params else None) for t in tasks] == [
        (0, "a"), (1, "a"), (2, "a"), (3, "b"), (4, "c"), (5, "c"),
    ]  # fmt: skip
    assert [t.seed for t in tasks[:3]] == [100, 101, 102]
    assert [t.seed for t in tasks[3:]] == [derived_seed(UID, i) for i in (3, 4, 5)]
    assert all(t.params is not None and t.params.seed == t.seed and t.params.count is None for t in tasks)


def test_jsonl_skips_blank_and_comment_lines_and_a_bad_line_fails_alone_with_its_line_number(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        "# a comment",
        {"prompt": "first", "count": 2},
        "",
        "   ",
        "{not json",
        {"prompt": "third", "cfgScale": 5},
        {"prompt": "bad", "width": 100},  # not a multiple of 8
        {"prompt": "unknown field", "colour": "red"},
        '["a list"]',
        {"prompt": "last"},
    )
    source = ItemSource(file_spec(), UID, path)
    tasks = list(source.tasks())
    assert source.total == len(tasks) == 8
    assert [t.index for t in tasks] == list(range(8))
    assert [t.line for t in tasks] == [2, 2, 5, 6, 7, 8, 9, 10]
    errors = {t.index: t.error for t in tasks if t.error}
    assert set(errors) == {2, 4, 5, 6}
    assert errors[2] is not None and errors[2].startswith("line 5: not valid JSON")
    assert errors[4] is not None and errors[4].startswith("line 7: width") and "multiple of 8" in errors[4]
    assert errors[5] is not None and "line 8: colour" in errors[5]
    assert errors[6] == "line 9: expected a JSON object, got list"
    assert tasks[3].params is not None and tasks[3].params.cfg_scale == 5
    # Stable: a second source over the same file numbers everything the same way.
    again = [(t.index, t.seed, t.error) for t in ItemSource(file_spec(), UID, path).tasks()]
    assert again == [(t.index, t.seed, t.error) for t in tasks]


def test_done_items_are_skipped_without_renumbering_the_rest(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"prompt": "a", "count": 3}, {"prompt": "b"}, {"prompt": "c", "count": 2})
    source = ItemSource(file_spec(), UID, path)
    everything = {t.index: t for t in source.tasks()}
    done = {0, 1, 2, 4}
    rest = list(source.tasks(lambda i: i in done))
    assert [t.index for t in rest] == [3, 5]
    assert all(t == everything[t.index] for t in rest)


def test_items_file_is_required_for_configmap_or_file_items() -> None:
    with pytest.raises(ItemsError, match="--items-file"):
        ItemSource(spec(items={"configMap": {"name": "prompts", "key": "items.jsonl"}}), UID)


def test_defaults_apply_unless_the_item_overrides() -> None:
    s = spec(
        defaults={"width": 512, "height": 768, "steps": 28, "negativePrompt": "blurry", "loras": [{"name": "x"}]},
        items={"inline": [{"prompt": "a"}, {"prompt": "b", "width": 640, "loras": [{"name": "y", "weight": 0.5}]}]},
    )
    a, b = (t.params for t in ItemSource(s, UID).tasks())
    assert a is not None and b is not None
    assert (a.width, a.height, a.steps, a.negative_prompt) == (512, 768, 28, "blurry")
    assert [(lo.name, lo.weight) for lo in a.loras or []] == [("x", 1.0)]
    assert (b.width, b.height) == (640, 768)
    assert [(lo.name, lo.weight) for lo in b.loras or []] == [("y", 0.5)]  # the item's list replaces the defaults'


def test_sweep_expands_prompts_x_weights_x_seeds_x_cfgs_in_that_order_after_the_items() -> None:
    s = spec(
        items={"inline": [{"prompt": "inline", "count": 2}]},
        defaults={"loras": [{"name": "other", "weight": 0.3}, {"name": "mine", "weight": 0.1}]},
        sweep={
            "prompts": ["p", "q"],
            "lora": "mine",
            "loraWeights": [0.6, 0.8, 1.0],
            "seeds": [1, 2],
            "cfgScales": [5],
        },
    )
    source = ItemSource(s, UID)
    assert (source.item_total, source.sweep_total, source.total) == (2, 12, 14)
    cells = list(source.tasks())[2:]
    assert [t.index for t in cells] == list(range(2, 14))
    coords = []
    for t in cells:
        assert t.params is not None
        swept = [lo for lo in t.params.loras or [] if lo.name == "mine"]
        assert len(swept) == 1 and any(lo.name == "other" for lo in t.params.loras or [])
        coords.append((t.params.prompt, swept[0].weight, t.seed, t.params.cfg_scale))
    assert coords == [
        (p, w, seed, 5) for p in ("p", "q") for w in (0.6, 0.8, 1.0) for seed in (1, 2)
    ]  # fmt: skip


def test_sweep_without_seeds_shares_one_derived_seed_per_prompt_row() -> None:
    s = spec(sweep={"prompts": ["p", "q"], "lora": "mine", "loraWeights": [0.6, 1.0]})
    cells = list(ItemSource(s, UID).tasks())
    assert [t.seed for t in cells] == [derived_seed(UID, 0)] * 2 + [derived_seed(UID, 2)] * 2
    plain = list(ItemSource(spec(sweep={"prompts": ["p", "q"], "cfgScales": [4, 6, 8]}), UID).tasks())
    assert len(plain) == 6 and all(t.params is not None and not t.params.loras for t in plain)
    with pytest.raises(ItemsError, match="loraWeights needs"):
        ItemSource(spec(sweep={"prompts": ["p"], "loraWeights": [0.5]}), UID)


def test_derived_seeds_are_stable_in_range_and_differ_by_index_and_batch() -> None:
    seeds = [derived_seed(UID, i) for i in range(2000)]
    assert seeds == [derived_seed(UID, i) for i in range(2000)]
    assert all(0 <= s < SEED_SPACE for s in seeds)
    assert len(set(seeds)) == len(seeds)
    assert derived_seed("another-uid", 5) != derived_seed(UID, 5)
    s = spec(items={"inline": [{"prompt": "a", "seed": -1, "count": 2}]})
    assert [t.seed for t in ItemSource(s, UID).tasks()] == [derived_seed(UID, 0), derived_seed(UID, 1)]


# --- payloads ------------------------------------------------------------------------------------------------------


def task_params(s: GenerationBatchSpec) -> Any:
    first: Task = next(ItemSource(s, UID).tasks())
    return first.params


def test_payload_has_prefix_lora_tags_and_gateway_defaults() -> None:
    params = task_params(
        spec(items={"inline": [{"prompt": "a cat", "seed": 7, "loras": [{"name": "ink", "weight": 0.6}]}]})
    )
    body, recorded = build_body(params, prompt_prefix="masterpiece, ")
    assert body["prompt"] == "masterpiece, a cat, <lora:ink:0.6>"
    assert (body["width"], body["height"], body["steps"], body["cfg_scale"]) == (512, 512, 20, 7.0)
    assert (body["seed"], body["batch_size"], body["sampler_name"]) == (7, 1, "Euler a")
    assert recorded is body  # nothing to leave out


def test_preset_fills_what_the_batch_and_item_leave_unset() -> None:
    preset = Preset(
        name="anime", prompt_prefix="best quality, ", negative_prompt="lowres", width=512, height=768, steps=28,
        cfg_scale=7, sampler_name="DPM++ 2M", scheduler="Karras",
    )  # fmt: skip
    params = task_params(
        spec(defaults={"steps": 12, "negativePrompt": "blurry"}, items={"inline": [{"prompt": "a fox", "width": 640}]})
    )
    body, _ = build_body(params, preset=preset)
    assert body["prompt"] == "best quality, a fox"
    assert body["negative_prompt"] == "blurry, lowres"  # the item's, then the preset's (as A1111 styles do)
    assert (body["width"], body["height"], body["steps"], body["cfg_scale"]) == (640, 768, 12, 7)
    assert (body["sampler_name"], body["scheduler"]) == ("DPM++ 2M", "Karras")


def test_control_images_are_read_from_the_inputs_folder_and_left_out_of_the_record(tmp_path: Path) -> None:
    (tmp_path / "pose.png").write_bytes(b"PNGDATA")
    units = [{"type": "openpose", "image": "pose.png"}, {"type": "canny", "image": "aGVsbG8="}]
    params = task_params(spec(items={"inline": [{"prompt": "a dancer", "controlNets": units}]}))
    body, recorded = build_body(params, inputs_dir=tmp_path)
    sent = body["alwayson_scripts"]["controlnet"]["args"]
    kept = recorded["alwayson_scripts"]["controlnet"]["args"]
    assert [u["image"] for u in sent] == [base64.b64encode(b"PNGDATA").decode(), "aGVsbG8="]
    assert [u["image"] for u in kept] == ["pose.png", None]
    assert sent[0]["module"] == "openpose_full"
    with pytest.raises(PermanentItemError, match="no --inputs-dir"):
        build_body(params)
    escape = task_params(
        spec(items={"inline": [{"prompt": "x", "controlNets": [{"type": "canny", "image": "../a.png"}]}]})
    )
    with pytest.raises(PermanentItemError, match="outside"):
        build_body(escape, inputs_dir=tmp_path)


def test_parameters_the_gateway_would_refuse_fail_the_item_for_good() -> None:
    params = task_params(spec(items={"inline": [{"prompt": "x", "loras": [{"name": "a:b"}]}]}))
    with pytest.raises(PermanentItemError, match="loras"):
        build_body(params)


# --- answers and errors --------------------------------------------------------------------------------------------


def test_errors_are_classified_retriable_or_permanent() -> None:
    oom = json.dumps({"error": "OutOfMemoryError", "detail": "CUDA out of memory: 2048x2048 x batch 8"}).encode()
    assert isinstance(classify(413, oom), PermanentItemError)
    assert isinstance(classify(500, oom), PermanentItemError)
    assert "HTTP 413 OutOfMemoryError: CUDA out of memory" in str(classify(413, oom))
    for code in (400, 401, 404, 422):
        assert isinstance(classify(code, b'{"error": "ValidationError", "detail": "no"}'), PermanentItemError)
    for code in (500, 502, 503, 504):
        assert isinstance(classify(code, b'{"error": "BackendUnavailable", "detail": "x"}'), RetriableError)
    full = classify(429, b'{"error": "QueueFull", "detail": "full"}', "7")
    assert isinstance(full, RetriableError) and full.retry_after == 7
    assert isinstance(classify(502, b"<html>bad gateway</html>"), RetriableError)


def test_backoff_grows_is_capped_jittered_and_honours_retry_after() -> None:
    assert backoff(0, rand=lambda: 0.0) == 0.25 and backoff(0, rand=lambda: 1.0) == 0.5
    assert backoff(3, rand=lambda: 1.0) == 4.0
    assert backoff(20, rand=lambda: 1.0) == 30.0
    assert backoff(0, retry_after=5, rand=lambda: 1.0) == 5


def test_answers_keep_the_generated_images_only() -> None:
    b64 = base64.b64encode(png()).decode()
    info = json.dumps({"seed": 5, "all_seeds": [5, 6], "sd_model_hash": "abc"})
    answer = parse_answer(json.dumps({"images": [b64, b64, b64], "info": info}).encode(), expected=2)
    assert len(answer.images) == 2 and answer.info["sd_model_hash"] == "abc"
    with pytest.raises(RetriableError, match="no images"):
        parse_answer(b'{"images": []}', expected=1)
    with pytest.raises(RetriableError, match="unreadable"):
        parse_answer(b"<html>", expected=1)


def test_target_model_matches_file_name_stem_title_and_hash() -> None:
    models = [
        {"filename": "animeA_v1.safetensors", "title": "animeA_v1.safetensors [0123456789]", "hash": "0123456789"}
    ]
    for name in ("animeA_v1.safetensors", "animeA_v1", "ANIMEA_V1", "0123456789", "animeA_v1.safetensors [0123456789]"):
        assert match_model(models, name) == models, name
    assert match_model(models, "other.safetensors") == []


# --- output names, encoding, commit order and resume -----------------------------------------------------------


def test_file_names() -> None:
    assert image_name(42, 123, 0, "png") == "000042-123.png"
    assert image_name(42, 123, 2, "webp") == "000042-123-2.webp"
    assert image_name(1234567, 9, 0, "jpeg") == "1234567-9.jpeg"
    assert sidecar_name(42, 123) == "000042-123.json"
    assert marker_index("000042-123.json", "json") == 42
    assert marker_index("1234567-9.json", "json") == 1234567
    assert marker_index("000042-123.png", "json") is None
    assert marker_index("000042-123.png", "png") == 42
    assert marker_index("000042-123-1.png", "png") is None  # not the plain-named first image
    assert marker_index(".000042-123.json.ab12cd34.tmp", "json") is None
    assert marker_index("notes.json", "json") is None


def test_encode_converts_to_the_batch_format() -> None:
    source = png()
    assert encode(source, ImageFormat.PNG) is source
    with Image.open(io.BytesIO(encode(source, ImageFormat.JPEG))) as jpeg:
        assert jpeg.format == "JPEG" and jpeg.mode == "RGB"
    with Image.open(io.BytesIO(encode(source, ImageFormat.WEBP))) as webp:
        assert webp.format == "WEBP"


class RecordingStore:
    location = "memory"

    def __init__(self) -> None:
        self.names: list[str] = []

    def scan(self, marker_ext: str, mark: Any) -> int:
        return 0

    def put(self, name: str, data: bytes) -> None:
        self.names.append(name)


def test_commit_writes_the_marker_last() -> None:
    store = RecordingStore()
    files = [(image_name(3, 9, k, "png"), b"x") for k in range(3)]
    commit(store, files, ("000003-9.json", b"{}"))
    assert store.names == ["000003-9-1.png", "000003-9-2.png", "000003-9.png", "000003-9.json"]
    store.names.clear()
    commit(store, files, None)
    assert store.names[-1] == "000003-9.png"  # without sidecars the first image is the marker


def test_resume_scan_counts_only_committed_items_and_removes_temp_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    store = LocalStore(out)
    store.put("000000-11.png", b"img")
    store.put("000000-11.json", b"{}")
    store.put("000001-12.png", b"img")  # images written, killed before the sidecar: not done
    store.put("000002-13-1.png", b"img")
    store.put("000003-14.png", b"img")
    store.put("000003-14.json", b"{}")
    (out / ".000004-15.png.0a1b2c3d.tmp").write_bytes(b"half")
    (out / ".000004-15.json.ffffffff.tmp").write_bytes(b"half")
    (out / "README.txt").write_text("not ours")
    found: list[int] = []
    assert store.scan("json", found.append) == 2
    assert sorted(found) == [0, 3]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert (out / "README.txt").exists()
    images: list[int] = []
    store.scan("png", images.append)  # metadata: false -> the plain first image is the marker
    assert sorted(images) == [0, 1, 3]


# --- progress ------------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_every_two_seconds_or_one_percent_never_faster_than_the_gap() -> None:
    clock = FakeClock()
    rate = RateLimit(1000, clock=clock)  # 1% = 10 items
    assert rate.due(0)  # nothing published yet
    rate.mark(0)
    clock.now += 1.0
    assert not rate.due(9)
    assert rate.due(10)
    rate.mark(10)
    clock.now += 0.1
    assert not rate.due(500)  # a burst of progress still waits for the minimum gap
    clock.now += 0.4
    assert rate.due(20)
    rate.mark(20)
    clock.now += 1.99
    assert not rate.due(21)
    clock.now += 0.01
    assert rate.due(21)  # two seconds without a 1% step
    small = RateLimit(7, clock=clock)
    small.mark(0)
    clock.now += 0.5
    assert small.due(1)  # 1% of 7 rounds up to one item


def test_status_body_and_progress_line() -> None:
    c = Counters(total=1000, succeeded=340, already_done=100, images=240, running=4)
    for i in range(30):
        c.fail(i, f"reason {i}")
    body = status(c, "s3://bucket/prefix")
    assert body["progress"] == "340/1000" and body["failed"] == 30 and body["running"] == 4
    assert len(body["failures"]) == MAX_FAILURES_IN_STATUS and body["failures"][0] == {"index": 0, "reason": "reason 0"}
    assert body["outputLocation"] == "s3://bucket/prefix"
    assert set(body) == {"total", "succeeded", "failed", "running", "progress", "failures", "outputLocation"}
    line = progress_line("ns/b", c, elapsed=80.0)
    assert line == "batch ns/b: 340/1000 done, 30 failed, 4 in flight, 3.0 images/s, eta 3m07s"
    assert format_duration(4000) == "1h06m" and format_duration(59.6) == "1m00s"


# --- the command line ----------------------------------------------------------------------------------------------


def test_batch_file_in_yaml_and_the_subcommand_wiring(tmp_path: Path) -> None:
    import argparse

    from sd_operator.batch.cli import add_parser, load_batch_file
    from sd_operator.batch.runner import BatchError

    path = tmp_path / "batch.yaml"
    path.write_text(
        "apiVersion: sd-operator.dev/v1alpha1\nkind: GenerationBatch\nmetadata: {name: b, namespace: ns, uid: u}\n"
        "spec:\n  target: {instance: anime}\n  sweep: {prompts: [a]}\n  output: {pvc: {claimName: out}}\n"
    )
    meta, s, api_version = load_batch_file(path)
    assert (meta["name"], s.target.instance, api_version) == ("b", "anime", "sd-operator.dev/v1alpha1")
    path.write_text('{"metadata": {"name": "b"}, "spec": {"target": {"model": "m"}, "output": {}, "retries": 99}}')
    with pytest.raises(BatchError, match="invalid spec: retries"):
        load_batch_file(path)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["batch", "--batch-file", "b.json", "--gateway-url", "http://gw", "--concurrency", "4"])
    assert (args.batch_file, args.concurrency, args.report) == ("b.json", 4, "none")
    with pytest.raises(SystemExit):
        parser.parse_args(["batch", "--batch-file", "b.json", "--concurrency", "0"])


def test_answers_classified_retriable_waited_out_or_permanent() -> None:
    import json as _json

    from sd_operator.batch.client import FleetUnavailable, PermanentItemError, RetriableError, classify

    def body(kind: str, detail: str = "x") -> bytes:
        return _json.dumps({"error": kind, "detail": detail}).encode()

    assert isinstance(classify(404, body("UnknownModel")), FleetUnavailable)  # instances restarting
    assert isinstance(classify(503, body("NoBackend")), FleetUnavailable)
    assert isinstance(classify(429, body("QueueFull"), "7"), RetriableError)
    assert classify(429, body("QueueFull"), "7").retry_after == 7
    assert isinstance(classify(413, body("OutOfMemoryError")), PermanentItemError)
    assert isinstance(classify(500, body("OutOfMemoryError", "CUDA out of memory")), PermanentItemError)
    assert isinstance(classify(422, body("ValidationError")), PermanentItemError)
