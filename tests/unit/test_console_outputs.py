"""Batch outputs as the console reads them: markers, paging, items, the evaluation grid and thumbnails, over
files written by the runner's own store code (batch/output.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from sd_operator.batch.output import LocalStore, commit, image_name, sidecar_name
from sd_operator.gateway.outputs import (
    LRU,
    Entry,
    LocalReader,
    Outputs,
    OutputsUnavailable,
    evaluation_grid,
    finished_items,
    image_file,
    item_view,
    open_reader,
    page_bounds,
    parse_mounts,
    sweep_start,
)

BASE = "/v1/batches/ns/b"


def png(size: tuple[int, int] = (64, 48), color: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def write_item(store: LocalStore, index: int, seed: int, prompt: str, images: int = 1, weight: float = 1.0) -> None:
    """One item the way the runner writes it: images, then the sidecar (the marker) last."""
    files = [(image_name(index, seed, k, "png"), png()) for k in range(images)]
    sidecar = {
        "index": index,
        "prompt": prompt,
        "seed": seed,
        "images": [n for n, _ in files],
        "parameters": {"prompt": f"{prompt} <lora:style:{weight}>", "seed": seed, "steps": 20},
    }
    commit(store, files, (sidecar_name(index, seed), json.dumps(sidecar).encode()))


def test_finished_items_are_the_markers_in_index_order(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for index in (12, 3, 7):
        write_item(store, index, 1000 + index, f"p{index}", images=2 if index == 7 else 1)
    (tmp_path / image_name(20, 5, 0, "png")).write_bytes(png())  # images without a sidecar: not finished
    (tmp_path / ".000021-5.json.abcd1234.tmp").write_bytes(b"{")  # a killed runner's temporary file
    (tmp_path / "notes.txt").write_text("x")
    entries = finished_items(LocalReader(tmp_path).names(), "json")
    assert entries == [Entry(3, 1003, "000003-1003.json"), Entry(7, 1007, "000007-1007.json"),
                       Entry(12, 1012, "000012-1012.json")]  # fmt: skip
    # Without metadata the first image is the marker; the k-th images of a batch_size > 1 item are not.
    assert [e.index for e in finished_items(LocalReader(tmp_path).names(), "png")] == [3, 7, 12, 20]


def test_page_bounds() -> None:
    assert page_bounds(None, None) == (0, 24)
    assert page_bounds("48", "24") == (48, 24)
    assert page_bounds("-5", "0") == (0, 1)
    assert page_bounds("0", "100000") == (0, 100)
    with pytest.raises(ValueError):
        page_bounds("x", "1")


def test_item_view_from_a_sidecar_and_without_one() -> None:
    side = {"prompt": "a fox", "negative_prompt": "blurry", "images": ["000004-9.png", "000004-9-1.png"],
            "parameters": {"steps": 20}, "infotext": "a fox\nSteps: 20", "model": "m.safetensors"}  # fmt: skip
    view = item_view(BASE, Entry(4, 9, "000004-9.json"), side, "png")
    assert view["image"] == f"{BASE}/files/000004-9.png" and view["thumbnail"] == f"{BASE}/thumbnails/000004-9.png"
    assert view["images"] == [f"{BASE}/files/000004-9.png", f"{BASE}/files/000004-9-1.png"]
    assert (view["index"], view["seed"], view["prompt"], view["parameters"]) == (4, 9, "a fox", {"steps": 20})
    bare = item_view(BASE, Entry(5, 7, "000005-7.webp"), None, "webp")
    assert bare["image"] == f"{BASE}/files/000005-7.webp" and bare["prompt"] is None and bare["parameters"] == {}
    # A sidecar naming files the runner never names is not trusted for URLs.
    odd = item_view(BASE, Entry(6, 1, "000006-1.json"), {"images": ["../../etc/passwd"]}, "jpeg")
    assert odd["image"] == f"{BASE}/files/000006-1.jpeg"


def test_paging_through_fifty_items_written_by_the_runners_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for index in range(50):
        write_item(store, index, 7 * index, f"study {index}")
    batch = {"metadata": {"namespace": "ns", "name": "b", "uid": "u", "resourceVersion": "1"},
             "spec": {"output": {"pvc": {"claimName": "out", "path": ""}}},
             "status": {"phase": "Succeeded"}}  # fmt: skip
    outputs = Outputs({("ns", "out"): tmp_path})
    entries = outputs.entries(batch)
    seen = []
    for offset in range(0, 50, 24):
        for entry in entries[offset : offset + 24]:
            seen.append(item_view(BASE, entry, outputs.sidecar(batch, entry), "png"))
    assert [v["index"] for v in seen] == list(range(50))
    assert seen[49]["prompt"] == "study 49" and seen[49]["seed"] == 343
    data, content_type = outputs.file(batch, "000049-343.png")
    assert content_type == "image/png" and data == (tmp_path / "000049-343.png").read_bytes()


def evaluation_batch(prompts: list[str], weights: list[float], **sweep: object) -> dict:
    return {"sweep": {"prompts": prompts, "lora": "style", "loraWeights": weights, **sweep},
            "output": {"pvc": {"claimName": "loras", "path": "style/evaluation"}}}  # fmt: skip


def test_evaluation_grid_from_the_sidecars_of_a_sweep(tmp_path: Path) -> None:
    prompts, weights = ["style, a lighthouse", "style, a sailor"], [0.6, 0.8, 1.0]
    store = LocalStore(tmp_path)
    # The sweep's cells in items.py order (prompts x weights), one row sharing a seed; one cell not done yet.
    for p, prompt in enumerate(prompts):
        for w, weight in enumerate(weights):
            if (p, w) != (1, 2):
                write_item(store, p * 3 + w, 100 + p, prompt, weight=weight)
    entries = finished_items(LocalReader(tmp_path).names(), "json")
    grid = evaluation_grid("style-eval", evaluation_batch(prompts, weights), 6, entries, BASE, "png")
    assert grid["batch"] == "style-eval" and grid["prompts"] == prompts and grid["weights"] == weights
    assert len(grid["cells"]) == 2 and all(len(row) == 3 for row in grid["cells"])
    assert grid["cells"][0][1] == {"index": 1, "seed": 100, "image": f"{BASE}/files/000001-100.png",
                                   "thumbnail": f"{BASE}/thumbnails/000001-100.png"}  # fmt: skip
    assert grid["cells"][1][0]["seed"] == 101 and grid["cells"][1][2] is None
    # Each cell's sidecar says which prompt and weight it rendered: the grid put it where it belongs.
    for p, row in enumerate(grid["cells"]):
        for w, cell in enumerate(row):
            if cell is not None:
                side = json.loads((tmp_path / sidecar_name(cell["index"], cell["seed"])).read_text())
                assert side["prompt"] == prompts[p] and f"<lora:style:{weights[w]}>" in side["parameters"]["prompt"]


def test_grid_cells_skip_items_and_extra_axes() -> None:
    spec = evaluation_batch(["a", "b"], [0.5, 1.0], seeds=[1, 2], cfgScales=[5, 7])
    spec["items"] = {"inline": [{"prompt": "x", "count": 3}, {"prompt": "y"}]}
    assert sweep_start(spec, None) == 4
    # index = 4 + ((p*2 + w) * 2 seeds) * 2 cfgs: the cell at the first seed and CFG scale.
    entries = [Entry(i, i, f"{i:06d}-{i}.json") for i in range(4, 4 + 2 * 2 * 2 * 2)]
    grid = evaluation_grid("g", spec, None, entries, BASE, "png")
    assert [[c["index"] for c in row] for row in grid["cells"]] == [[4, 8], [12, 16]]
    from_file = evaluation_batch(["a"], [1.0])
    from_file["items"] = {"configMap": {"name": "c", "key": "k"}}
    assert sweep_start(from_file, 11) == 10 and sweep_start(from_file, None) is None
    assert evaluation_grid("g", from_file, None, entries, BASE, "png")["cells"] == [[None]]


def test_thumbnails_are_small_jpegs_and_the_cache_is_bounded(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("000000-1.png", png((1024, 768)))
    (tmp_path / "000000-1.json").write_text("{}")
    batch = {"metadata": {"namespace": "ns", "name": "b", "uid": "u"},
             "spec": {"output": {"pvc": {"claimName": "out"}}}}  # fmt: skip
    outputs = Outputs({("ns", "out"): tmp_path}, thumbnail_bytes=64 * 1024)
    thumb = outputs.thumbnail(batch, "000000-1.png")
    with Image.open(io.BytesIO(thumb)) as image:
        assert image.format == "JPEG" and image.size == (256, 192)
    assert outputs.thumbnails.bytes == len(thumb) < 64 * 1024
    lru = LRU(max_items=10, max_bytes=10)
    for i in range(5):
        lru.put(i, b"abcd")
    assert list(lru.data) == [3, 4] and lru.bytes == 8
    lru.put("big", b"x" * 11)  # larger than the whole cache: not kept
    assert "big" not in lru.data


def test_an_unmounted_claim_answers_404_with_advice_and_paths_stay_inside(tmp_path: Path) -> None:
    batch = {"metadata": {"namespace": "team-a", "name": "b"},
             "spec": {"output": {"pvc": {"claimName": "renders", "path": "x"}}}}  # fmt: skip
    with pytest.raises(OutputsUnavailable) as e:
        open_reader(batch, {})
    assert e.value.status == 404
    assert "team-a/renders" in str(e.value) and "gateway.console.outputs" in str(e.value)
    mounts = parse_mounts(["team-a/renders=" + str(tmp_path), "own=/mnt/own"], "sdo")
    assert mounts == {("team-a", "renders"): tmp_path, ("sdo", "own"): Path("/mnt/own")}
    assert isinstance(open_reader(batch, mounts), LocalReader)
    batch["spec"]["output"]["pvc"]["path"] = "../.."
    with pytest.raises(OutputsUnavailable) as e:
        open_reader(batch, mounts)
    assert e.value.status == 403
    with pytest.raises(ValueError, match="CLAIM=PATH"):
        parse_mounts(["renders"], "sdo")


def test_only_the_runners_image_names_are_served() -> None:
    assert image_file("000001-42.png") and image_file("000001-42-1.webp") and image_file("000001-42.jpeg")
    for name in ("000001-42.json", "..", "x.png", ".000001-42.png.ab12.tmp", "000001-42.png/../x"):
        assert not image_file(name)
