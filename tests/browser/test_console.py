"""The web console in headless Chromium against the real gateway, emulators and cluster (see conftest.py).

What a person does in the page, checked by what the page shows and what the gateway answered: the image is
the chosen model's (its PNG info names it), a wrong key shows nothing but the refusal, the fleet follows an
SDInstance's status, a batch's 50 outputs page by 24, and the form works with the keyboard alone.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from kubernetes import client
from PIL import Image
from playwright.sync_api import Page, expect

from cluster_support import Cluster, wait_control_plane_settled
from conftest import CLAIM, CONTROLNET_MODEL, KEY, LORA, MODEL_A, MODEL_B, Console, screenshot
from helpers import wait_for
from objects import GROUP, PLURAL, VERSION
from sd_operator.batch.output import LocalStore, commit, image_name, sidecar_name
from sd_operator.emulator.images import render_png

VIEWS = ("generate", "fleet", "batches", "training")
BATCH = "portraits"  # 50 outputs
SWEEP = "mystyle-eval"  # a LoRAJob's evaluation: 2 prompts x 3 weights
LORAJOB = "mystyle"
XL_MODEL = "sd_xl_base_1.0.safetensors"  # declared by an SDInstance only: no instance serves it
SWEEP_PROMPTS = ["mystyle, a lighthouse at dusk", "mystyle, portrait of an old sailor"]
SWEEP_WEIGHTS = [0.6, 0.8, 1.0]


def open_console(page: Page, console: Console, view: str = "") -> None:
    page.goto(f"{console.url}/ui/" + (f"#{view}" if view else ""))
    expect(page.locator("#app")).to_be_visible()


def write_outputs(console: Console, batch: str, prompts: list[str], model: str) -> None:
    """Item i as the batch runner writes it (batch/output.py): the PNG, then its JSON sidecar."""
    store = LocalStore(console.outputs / batch)
    store.root.mkdir(parents=True, exist_ok=True)
    for index, prompt in enumerate(prompts):
        seed = 1000 + index
        infotext = f"{prompt}\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: {seed}, Size: 128x128, Model: {model}"
        png = render_png(model=model, seed=seed, prompt=prompt, width=128, height=128, infotext=infotext)
        name = image_name(index, seed, 0, "png")
        sidecar = {"batch": batch, "index": index, "prompt": prompt, "seed": seed, "images": [name], "model": model,
                   "infotext": infotext, "parameters": {"prompt": prompt, "seed": seed, "steps": 20}}  # fmt: skip
        commit(store, [(name, png)], (sidecar_name(index, seed), json.dumps(sidecar).encode()))


def batch_object(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    base = {
        "target": {"model": MODEL_A},
        "output": {"pvc": {"claimName": CLAIM, "path": name}, "format": "png", "metadata": True},
    }
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "GenerationBatch", "metadata": {"name": name},
            "spec": {**base, **spec}}  # fmt: skip


@pytest.fixture(scope="module")
def batches(console: Console) -> Iterator[None]:
    """A finished 50-item batch and a LoRAJob in training with its evaluation batch, as their controllers
    would leave them (the statuses are written here: no operator runs), with their outputs in the store."""
    custom = client.CustomObjectsApi(console.api)
    ns = console.namespace
    prompts = [f"portrait {i}, studio light" for i in range(50)]
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, "generationbatches", batch_object(
        BATCH, {"items": {"inline": [{"prompt": "portrait, studio light", "count": 50}]}}))  # fmt: skip
    write_outputs(console, BATCH, prompts, MODEL_A)
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, "generationbatches", BATCH, {"status": {
        "phase": "Succeeded", "model": MODEL_A, "total": 50, "succeeded": 50, "failed": 0, "running": 0,
        "progress": "50/50"}})  # fmt: skip

    sweep = {"sweep": {"prompts": SWEEP_PROMPTS, "lora": "mystyle", "loraWeights": SWEEP_WEIGHTS}}
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, "generationbatches", batch_object(SWEEP, sweep))
    cells = [p for p in SWEEP_PROMPTS for _ in SWEEP_WEIGHTS]
    write_outputs(console, SWEEP, cells[:5], MODEL_A)  # the last cell is still rendering
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, "generationbatches", SWEEP, {"status": {
        "phase": "Running", "model": MODEL_A, "total": 6, "succeeded": 5, "failed": 0, "running": 1}})  # fmt: skip
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, "lorajobs", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRAJob", "metadata": {"name": LORAJOB},
        "spec": {
            "baseModel": {"family": "sd15", "checkpoint": {"name": MODEL_A,
                          "source": {"http": {"url": "http://models.invalid/a.safetensors"}}}},
            "dataset": {"source": {"pvc": {"claimName": "datasets", "path": "mystyle"}}, "triggerWord": "mystyle"},
            "training": {"epochs": 10},
            "output": {"name": "mystyle", "destination": {"pvc": {"claimName": "loras", "path": "mystyle"}}},
            "evaluation": {"prompts": SWEEP_PROMPTS, "weights": SWEEP_WEIGHTS},
        },
    })  # fmt: skip
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, "lorajobs", LORAJOB, {"status": {
        "phase": "Evaluating", "message": "rendering the evaluation grid", "evaluationBatch": SWEEP,
        "progress": {"epoch": 10, "totalEpochs": 10, "step": 1500, "totalSteps": 1500, "loss": 0.0734},
        "artifacts": [{"path": "mystyle/mystyle.safetensors", "epoch": 10}]}})  # fmt: skip
    yield


def no_horizontal_scroll(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def test_every_view_loads_with_no_console_errors_at_desktop_and_phone_width(
    console: Console, batches: None, open_page: Any
) -> None:
    for width, height in ((1280, 900), (375, 812)):
        page, watched = open_page(width=width, height=height)
        open_console(page, console)
        expect(page.locator("#g-model option")).to_have_count(2)
        expect(page.locator("#g-model")).to_contain_text("animeA_v1 (Ready)")
        page.click("#tab-fleet")
        expect(page.locator(f'[data-model="{MODEL_B}"]')).to_contain_text("Ready")
        page.click("#tab-batches")
        expect(page.locator(f'[data-batch="{console.namespace}/{BATCH}"]')).to_contain_text("50 of 50 done")
        expect(page.locator("#batches-watch")).to_be_hidden()  # the gateway's watch is up
        page.click("#tab-training")
        expect(page.locator("#training-watch")).to_be_hidden()
        job = page.locator(f'[data-lorajob="{console.namespace}/{LORAJOB}"]')
        expect(job).to_contain_text("1500 of 1500")
        expect(job).to_contain_text("0.07340")
        job.get_by_role("button", name="Show evaluation grid").click()
        grid = job.locator("table")
        expect(grid.locator("tbody tr")).to_have_count(len(SWEEP_PROMPTS))
        expect(grid.locator("img")).to_have_count(5)
        expect(grid).to_contain_text("not rendered yet")  # the sixth cell
        page.wait_for_function(
            "[...document.querySelectorAll('[data-lorajob] table img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        suffix = "" if width > 400 else "-375"
        assert no_horizontal_scroll(page), f"training is wider than {width} px"
        screenshot(page, f"console-training{suffix}")
        for view in VIEWS[:3]:
            page.click(f"#tab-{view}")
            expect(page.locator(f"#panel-{view}")).to_be_visible()
            assert no_horizontal_scroll(page), f"{view} is wider than {width} px"
            screenshot(page, f"console-{view}{suffix}")
        assert no_horizontal_scroll(page)
        assert watched.errors == []


def png_info_of_displayed_image(page: Page) -> dict[str, str]:
    src = page.get_attribute("#g-image", "src") or ""
    assert src.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    return dict(image.text)  # type: ignore[attr-defined]


def record_statuses(page: Page) -> None:
    """Every text the wait's status line shows, kept in the page (the line changes faster than a test polls)."""
    page.evaluate("""() => {
        window.__statuses = [];
        const status = document.getElementById('g-status');
        new MutationObserver(() => window.__statuses.push(status.textContent))
            .observe(status, {childList: true, characterData: true, subtree: true});
    }""")


def running(console: Console, model: str) -> bool:
    return any(m["model"] == model and m["running"] for m in console.get("/v1/fleet").json()["models"])


def test_a_prompt_renders_an_image_of_the_chosen_model_with_queue_position_and_progress(
    console: Console, open_page: Any
) -> None:
    page, watched = open_page()
    open_console(page, console)
    expect(page.locator("#g-model option")).to_have_count(2)
    page.select_option("#g-model", MODEL_B)
    page.fill("#g-prompt", "a lighthouse on a cliff at dusk")
    page.fill("#g-negative", "blurry")
    page.fill("#g-steps", "30")
    page.fill("#g-seed", "4242")
    record_statuses(page)

    # Another caller's long render holds model B's only instance: the page's request waits first in line.
    blocker_done = threading.Event()

    def blocker() -> None:
        body = {"prompt": "blocker", "model": MODEL_B, "steps": 40, "seed": 1}
        requests.post(f"{console.url}/v1/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        blocker_done.set()

    thread = threading.Thread(target=blocker)
    thread.start()
    wait_for(lambda: running(console, MODEL_B), timeout=20, what="the other caller's render to start")
    page.click("#g-submit")
    expect(page.locator("#g-cancel")).to_be_visible()
    expect(page.locator("#g-result")).to_be_visible(timeout=60_000)
    thread.join(60)
    assert blocker_done.is_set()

    statuses: list[str] = page.evaluate("window.__statuses")
    assert any(re.match(r"Queued: position 1\b", s) for s in statuses), statuses
    assert any(re.match(r"Rendering: \d+ %", s) for s in statuses), statuses
    # The image is model B's: its own PNG text and the infotext the page shows (read back through png-info).
    assert png_info_of_displayed_image(page)["sd-emulator-model"].startswith(MODEL_B)
    infotext = page.inner_text("#g-infotext")
    assert "Model: realB_v2" in infotext and "Seed: 4242" in infotext and "Steps: 30" in infotext
    assert infotext.startswith("a lighthouse on a cliff at dusk\nNegative prompt: blurry")
    expect(page.locator("#g-param-list")).to_contain_text("realB_v2")
    expect(page.locator("#g-status")).to_have_text("Done: realB_v2, seed 4242.")
    page.wait_for_function("document.querySelector('#history img')?.complete")
    screenshot(page, "console-generate-result")
    # The download is the PNG itself.
    with page.expect_download() as download:
        page.click("#g-download")
    assert download.value.suggested_filename == "realB_v2-4242.png"
    saved = Image.open(download.value.path())
    assert saved.text["sd-emulator-seed"] == "4242"  # type: ignore[attr-defined]
    # This browser's history keeps it (and survives a reload).
    expect(page.locator("#history li button")).to_have_count(1)
    page.reload()
    expect(page.locator("#history li button")).to_have_count(1)
    expect(page.locator("#history li button")).to_have_attribute("aria-label", re.compile("realB_v2, seed 4242"))
    page.fill("#g-prompt", "a lighthouse on a cliff at dusk")
    page.select_option("#g-model", MODEL_B)
    page.fill("#g-steps", "30")
    page.fill("#g-seed", "4242")
    page.fill("#g-negative", "blurry")
    page.click("#g-submit")  # the same request again: answered from the gateway's cache at once
    expect(page.locator("#history li button")).to_have_count(2)
    assert watched.errors == []


def test_a_wrong_key_is_refused_and_nothing_else_is_shown(console: Console, open_page: Any) -> None:
    page, watched = open_page(key=None)
    page.goto(f"{console.url}/ui/")
    expect(page.locator("#key-gate")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()
    page.fill("#key-input", "sk-not-a-key")
    page.press("#key-input", "Enter")
    expect(page.locator("#key-error")).to_have_text("The key was refused. Check it and try again.")
    expect(page.locator("#app")).to_be_hidden()
    text = page.inner_text("body")
    for secret in (MODEL_A, MODEL_B, "animeA", "realB", console.namespace, BATCH):
        assert secret not in text
    assert page.evaluate("sessionStorage.getItem('sd-console-key')") is None
    screenshot(page, "console-key-refused")
    # The only errors are the browser's notes about the refused calls.
    assert watched.errors and all("401" in e for e in watched.errors), watched.errors

    page.fill("#key-input", KEY)
    page.click("#key-submit")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#key-gate")).to_be_hidden()
    expect(page.locator("#g-model option")).to_have_count(2)
    assert page.evaluate("sessionStorage.getItem('sd-console-key')") == KEY
    page.click("#forget-key")
    expect(page.locator("#key-gate")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('sd-console-key')") is None


def test_the_fleet_view_follows_an_sdinstance_phase_change(console: Console, open_page: Any) -> None:
    custom = client.CustomObjectsApi(console.api)
    ns, name, model = console.namespace, "xl", XL_MODEL
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "SDInstance", "metadata": {"name": name},
        "spec": {"model": {"family": "sdxl", "checkpoint": {"name": model,
                 "source": {"http": {"url": "http://models.invalid/x.safetensors"}}}}, "gpu": {"memoryGiB": 24}},
    })  # fmt: skip

    def status(body: dict[str, Any]) -> None:
        custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, name, {"status": body})

    try:
        status({"phase": "Downloading", "message": "fetching the checkpoint (31%)", "replicas": 1, "readyReplicas": 0})
        page, watched = open_page()
        open_console(page, console, "fleet")
        row = page.locator(f'[data-instance="{ns}/{name}"]')
        expect(row.locator("[data-phase]")).to_have_attribute("data-phase", "Downloading")
        expect(row).to_contain_text("↓ Downloading")  # a symbol and a word, not only a colour
        expect(row).to_contain_text("fetching the checkpoint (31%)")
        expect(row).to_contain_text("24GiB")
        expect(row).to_contain_text("0 ready of 1")
        expect(page.locator(f'[data-model="{model}"] h3')).to_contain_text("Downloading")
        expect(page.locator("#fleet-discovery")).to_have_text("✓ Discovery is up to date.")
        page.click("#tab-generate")
        expect(page.locator(f'#g-model option[value="{model}"]')).to_have_text("sd_xl_base_1.0 (Downloading)")
        page.click("#tab-fleet")

        # The page refreshes by itself: no reload between the status changes.
        status({"phase": "Failed", "message": "fetch-model: sha256 mismatch for sd_xl_base_1.0.safetensors"})
        expect(row.locator("[data-phase]")).to_have_attribute("data-phase", "Failed")
        expect(row).to_contain_text("✗ Failed")
        expect(row).to_contain_text("sha256 mismatch")
        expect(page.locator(f'[data-model="{model}"] h3')).to_contain_text("Failed")
        screenshot(page, "console-fleet-failed")
        page.click("#tab-generate")
        expect(page.locator(f'#g-model option[value="{model}"]')).to_have_text("sd_xl_base_1.0 (Failed)")
        page.click("#tab-fleet")
        status({"phase": "Ready", "message": None, "replicas": 1, "readyReplicas": 1})
        expect(row.locator("[data-phase]")).to_have_attribute("data-phase", "Ready")
        expect(row).to_contain_text("1 ready of 1")
        screenshot(page, "console-fleet")
    finally:
        custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    expect(row).to_have_count(0)
    assert watched.errors == []


def gallery_indexes(page: Page) -> list[int]:
    page.wait_for_function(
        "[...document.querySelectorAll('.gallery img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    return [int(x) for x in page.locator(".gallery [data-index]").evaluate_all("l => l.map(e => e.dataset.index)")]


def test_a_batch_gallery_pages_through_50_outputs(console: Console, batches: None, open_page: Any) -> None:
    page, watched = open_page()
    open_console(page, console, "batches")
    card = page.locator(f'[data-batch="{console.namespace}/{BATCH}"]')
    expect(card).to_contain_text("50 of 50 done (100 %)")
    expect(card).to_contain_text("✓ Succeeded")
    assert card.locator("progress").evaluate("p => [p.value, p.max]") == [50, 50]
    card.get_by_role("button", name="Show outputs").click()
    status = card.locator(".pager-status")
    prev = card.get_by_role("button", name="← Previous page")
    nxt = card.get_by_role("button", name="Next page →")

    expect(status).to_have_text("Outputs 1-24 of 50 (page 1 of 3)")
    assert gallery_indexes(page) == list(range(24))
    expect(prev).to_be_disabled()
    screenshot(page, "console-batches-gallery")
    nxt.click()
    expect(status).to_have_text("Outputs 25-48 of 50 (page 2 of 3)")
    assert gallery_indexes(page) == list(range(24, 48))
    nxt.click()
    expect(status).to_have_text("Outputs 49-50 of 50 (page 3 of 3)")
    assert gallery_indexes(page) == [48, 49]
    expect(nxt).to_be_disabled()
    expect(card.locator(".gallery figcaption").last).to_have_text("#49 · seed 1049")
    prev.click()
    expect(status).to_have_text("Outputs 25-48 of 50 (page 2 of 3)")
    assert gallery_indexes(page) == list(range(24, 48))

    # A thumbnail opens the full image (fetched with the key) with its prompt.
    card.locator('[data-index="30"]').click()
    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    expect(page.locator("#viewer-title")).to_have_text(f"{console.namespace}/{BATCH} #30, seed 1030")
    expect(page.locator("#viewer-info")).to_contain_text("portrait 30, studio light")
    page.wait_for_function("document.getElementById('viewer-image').naturalWidth === 128")
    page.keyboard.press("Escape")
    expect(viewer).to_be_hidden()
    assert watched.errors == []


def test_the_generate_form_works_with_the_keyboard_alone(console: Console, open_page: Any) -> None:
    page, watched = open_page()
    open_console(page, console)
    expect(page.locator("#g-model option")).to_have_count(2)
    page.locator("body").click(position={"x": 5, "y": 300})  # nowhere in particular: focus starts on the page

    def tab() -> tuple[str, str]:
        """Tab once: the focused element's id, and its outline (the focus ring keyboard focus must show)."""
        page.keyboard.press("Tab")
        return page.evaluate(
            "(e => [e.id || e.tagName, `${getComputedStyle(e).outlineStyle} ${getComputedStyle(e).outlineWidth}`])"
            "(document.activeElement)"
        )

    steps = [tab() for _ in range(15)]
    order = [element for element, _ in steps]
    form = ["tab-generate", "g-model", "g-preset", "g-prompt", "g-negative", "g-width", "g-height", "g-steps",
            "g-cfg", "g-seed", "g-lora", "g-lora-weight", "g-cn-on", "g-submit"]  # fmt: skip
    assert "tab-generate" in order and order[order.index("tab-generate") :][: len(form)] == form, order
    for element, ring in steps:
        style, width = ring.split()
        assert style == "solid" and float(width.removesuffix("px")) >= 2, (element, ring)

    # Back to the model select, and fill the form with keys only.
    while page.evaluate("document.activeElement.id") != "g-model":
        page.keyboard.press("Shift+Tab")
    page.keyboard.press("ArrowDown")  # the second model
    assert page.input_value("#g-model") == MODEL_B
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.type("a red bicycle against a brick wall")
    for _ in range(6):  # negative, width, height, steps, cfg, seed
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "g-seed"
    page.keyboard.press("Control+A")
    page.keyboard.type("77")
    for _ in range(4):  # lora, weight, controlnet, generate
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "g-submit"
    page.keyboard.press("Enter")
    expect(page.locator("#g-result")).to_be_visible(timeout=60_000)
    expect(page.locator("#g-caption")).to_have_text("realB_v2 · seed 77")
    assert png_info_of_displayed_image(page)["sd-emulator-prompt"] == "a red bicycle against a brick wall"

    # The tabs: arrows move between views, Enter/Space not needed.
    page.focus("#tab-generate")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#panel-fleet")).to_be_visible()
    assert page.evaluate("document.activeElement.id") == "tab-fleet"
    page.keyboard.press("End")
    expect(page.locator("#panel-training")).to_be_visible()
    page.keyboard.press("Home")
    expect(page.locator("#panel-generate")).to_be_visible()
    assert watched.errors == []


def test_a_lora_and_a_controlnet_unit_with_an_uploaded_image(console: Console, open_page: Any, tmp_path: Path) -> None:
    control = tmp_path / "edges.png"
    Image.new("RGB", (64, 64), "white").save(control)
    page, watched = open_page()
    open_console(page, console)
    page.select_option("#g-model", MODEL_A)
    expect(page.locator("#g-lora option")).to_have_text(["None", LORA])  # the instance's own LoRA folder
    page.select_option("#g-lora", LORA)
    page.fill("#g-lora-weight", "0.7")
    page.fill("#g-prompt", "a castle")
    page.fill("#g-seed", "9")
    page.check("#g-cn-on")
    expect(page.locator("#g-cn")).to_be_visible()
    # The choices are the instance's (through the gateway's /controlnet/* proxies).
    expect(page.locator("#g-cn-model option")).to_have_count(2)
    cn_model = page.locator("#g-cn-model option").nth(1).get_attribute("value") or ""
    assert cn_model.startswith(CONTROLNET_MODEL), cn_model
    assert page.locator("#g-cn-module option", has_text="canny").count() >= 1
    page.select_option("#g-cn-type", "canny")
    page.select_option("#g-cn-module", "canny")
    page.select_option("#g-cn-model", cn_model)
    page.set_input_files("#g-cn-image", str(control))
    page.click("#g-submit")
    expect(page.locator("#g-result")).to_be_visible()
    infotext = page.inner_text("#g-infotext")
    assert infotext.startswith(f"a castle, <lora:{LORA}:0.7>"), infotext
    assert f"Module: canny, Model: {cn_model}" in infotext, infotext
    assert png_info_of_displayed_image(page)["sd-emulator-model"].startswith(MODEL_A)
    assert watched.errors == []


def test_the_pages_pure_helpers(console: Console, open_page: Any) -> None:
    """format.js, imported by the browser as the page imports it: what the views print and send."""
    page, watched = open_page()
    open_console(page, console)
    got = page.evaluate("""async () => {
        const f = await import('/ui/format.js');
        return {
            label: f.modelOptionLabel({model_name: 'sd15', filename: 'sd15.safetensors', state: 'ScaledToZero'}),
            states: ['Ready', 'Failed', 'Downloading', 'ScaledToZero', 'Weird', null]
                .map(s => { const l = f.stateLabel(s); return `${l.symbol} ${l.word}`; }),
            seconds: [0.44, 42.4, 75, 7300, null].map(f.formatSeconds),
            pages: [f.pageInfo(0, 24, 50), f.pageInfo(48, 24, 50), f.pageInfo(0, 24, 0)],
            waits: [
                f.describeWait({state: 'queued', position: 2, queueDepth: 3}, 4.2),
                f.describeWait({state: 'running', progress: 0.456, etaSeconds: 3.2}, 9),
                f.describeWait(null, 0),
            ],
            request: f.buildGenerateRequest({prompt: 'a cat', model: 'm.safetensors', preset: '', width: '768',
                height: '', steps: '30', cfg_scale: '6.5', seed: '', lora: 'style', lora_weight: '0.6',
                negative_prompt: 'blurry'}),
            unit: f.buildGenerateRequest({prompt: 'x', seed: '3', controlnet: {type: 'canny', image: 'data:,',
                module: '', model: 'control_v11p_sd15_canny [0439b8c0]'}}).controlnet,
            summary: f.batchSummary({total: 50, succeeded: 12, failed: 1, running: 2, progress: 0.26}),
            field: ['Model', 'Seed', 'Lora hashes', 'Nope'].map(n => f.infotextField(
                'a cat\\nSteps: 20, Seed: 7, Model: sd15, Lora hashes: "style: abc, other: def"', n)),
            error: f.errorText(503, {error: 'ModelNotReady', detail: 'sd15 is Downloading'}),
            history: f.addToHistory([1, 2, 3], 0, 3),
            id: f.requestId(),
            watch: [{up: true, staleSeconds: 0}, {up: false, staleSeconds: 34}, {up: false, reason: 'no --kubernetes'}]
                .map(w => f.watchNote(w, 'LoRAJobs')),
        };
    }""")
    assert got["label"] == "sd15 (ScaledToZero)"
    assert got["states"] == ["✓ Ready", "✗ Failed", "↓ Downloading", "⏾ ScaledToZero", "? Weird", "? Unknown"]
    assert got["seconds"] == ["0.4 s", "42 s", "1 min 15 s", "2 h 1 min", "—"]
    assert [p["text"] for p in got["pages"]] == ["Outputs 1-24 of 50", "Outputs 49-50 of 50", "No outputs yet"]
    assert [(p["hasPrev"], p["hasNext"], p["page"], p["pages"]) for p in got["pages"]] == [
        (False, True, 1, 3),
        (True, False, 3, 3),
        (False, False, 1, 1),
    ]
    assert got["waits"] == [
        "Queued: position 2 of 3 waiting (4.2 s)",
        "Rendering: 46 %, about 3.2 s left",
        "Sent, waiting for the gateway (0 s)",
    ]
    assert got["request"] == {
        "prompt": "a cat",
        "model": "m.safetensors",
        "negative_prompt": "blurry",
        "width": 768,
        "steps": 30,
        "cfg_scale": 6.5,
        "seed": -1,
        "lora": "style",
        "lora_weight": 0.6,
    }
    assert got["unit"] == {"type": "canny", "image": "data:,", "model": "control_v11p_sd15_canny [0439b8c0]"}
    assert got["summary"] == "12 of 50 done, 1 failed, 2 running (26 %)"
    assert got["field"] == ["sd15", "7", '"style: abc, other: def"', None]
    assert got["error"] == "ModelNotReady: sd15 is Downloading"
    assert got["history"] == [0, 1, 2]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", got["id"])
    assert got["watch"] == [
        "",
        "⚠ Stale: the gateway has not heard from the Kubernetes API about LoRAJobs for 34 s; this may be out of date.",
        "⚠ The gateway does not watch LoRAJobs: no --kubernetes.",
    ]
    assert watched.errors == []


def test_the_fleet_view_says_when_discovery_is_stale(cluster: Cluster, console: Console, open_page: Any) -> None:
    """The API server stops: the gateway keeps its last known view, and the page says it may be out of date."""
    if cluster.local is None:
        pytest.skip("stopping the API server needs the session's own local cluster")
    page, watched = open_page()
    open_console(page, console, "fleet")
    note = page.locator("#fleet-discovery")
    expect(note).to_have_text("✓ Discovery is up to date.")
    cluster.local.stop_component("kube-apiserver")
    try:
        expect(note).to_have_attribute("data-stale", "true", timeout=30_000)
        expect(note).to_contain_text(re.compile(r"⚠ Stale: the gateway has not heard from the Kubernetes API for \d"))
        expect(page.locator(f'[data-model="{MODEL_B}"]')).to_contain_text("Ready")  # the last known fleet
        screenshot(page, "console-fleet-stale")
    finally:
        cluster.local.start_component("kube-apiserver")
        wait_control_plane_settled(cluster)
    expect(note).to_have_text("✓ Discovery is up to date.", timeout=60_000)
    assert watched.errors == []
