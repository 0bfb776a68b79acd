"""The web console in a real headless Chromium (Debian's `chromium`, driven by Playwright) against the real
gateway process in front of WebUI emulators, with the local cluster for what the gateway reads from it
(SDInstances, GenerationBatches, LoRAJobs).

One gateway serves the whole module: two models from emulators (a backends file), discovery and the console's
watches on a namespace of the module's own (--kubernetes -n NS), and a folder standing in for a mounted
output PVC (--outputs-dir NS/CLAIM=PATH). Screenshots go to $SD_TEST_ARTIFACTS, else tests/browser/artifacts.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from kubernetes import client
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, sync_playwright

from cluster_support import Cluster
from helpers import wait_for
from processes import BIN, Proc, _start, _wait_ok, emulator

CHROMIUM = Path(os.environ.get("SD_CHROMIUM", "/usr/bin/chromium"))
# No sandbox: tests may run as root (make e2e's namespaces); nothing of the internet is loaded.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEY = "sk-console-test-7f3a9c"
TENANT = "console"
MODEL_A = "animeA_v1.safetensors"
MODEL_B = "realB_v2.safetensors"
CLAIM = "outputs"
LORA = "mystyle"
CONTROLNET_MODEL = "control_v11p_sd15_canny"
ARTIFACTS = Path(os.environ.get("SD_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")


@dataclass
class Console:
    """The running gateway and what the tests reach through it."""

    url: str
    gateway: Proc
    namespace: str
    outputs: Path  # the folder the gateway reads as PVC `CLAIM` of `namespace`
    emulators: dict[str, Proc]
    api: client.ApiClient

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(f"{self.url}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=10, **kwargs)


@dataclass
class Watched:
    """Console messages and page errors of one page: the tests assert there are none (or only the expected)."""

    errors: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.errors.append(f"console.{message.type}: {message.text} ({message.location.get('url', '')})")

    def on_page_error(self, error: Exception) -> None:
        self.errors.append(f"page error: {error}")


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make deps` installs Debian's chromium"
    # Debian's build, never a downloaded one (`playwright install` is not used).
    b = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    yield b
    b.close()


@pytest.fixture(scope="module")
def module_namespace(cluster: Cluster, crds: None, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"t-console-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    cluster.core.delete_namespace(name)


@pytest.fixture(scope="module")
def console(cluster: Cluster, module_namespace: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    tmp = tmp_path_factory.mktemp("console")
    started: list[Proc] = []
    try:
        # Model B renders slowly enough (about 2 s for 30 steps) for a person, and a test, to see the wait.
        # Model A's instance has a LoRA and a ControlNet model in its folders, as an SDInstance would install them.
        (tmp / "a" / "models" / "Lora").mkdir(parents=True)
        (tmp / "a" / "models" / "Lora" / f"{LORA}.safetensors").write_bytes(b"lora" * 256)
        controlnets = tmp / "a" / "models" / "ControlNet"
        controlnets.mkdir()
        (controlnets / f"{CONTROLNET_MODEL}.pth").write_bytes(os.urandom(0x110000))
        a = emulator(tmp, "a", MODEL_A, profile="rtx4090", speed=0.001, extra=["--controlnet-dir", str(controlnets)])
        started.append(a)
        b = emulator(tmp, "b", MODEL_B, profile="rtx3060", speed=0.6)
        started.append(b)
        backends = tmp / "backends.yaml"
        backends.write_text(yaml.safe_dump({"backends": [{"url": a.url}, {"url": b.url}]}))
        keys = tmp / "keys.yaml"
        keys.write_text(yaml.safe_dump({"keys": [{"key": KEY, "tenant": TENANT, "priority": 5}]}))
        outputs = tmp / "outputs"
        outputs.mkdir()
        cmd = [str(BIN / "sd-operator"), "gateway", "--port", "0", "--backends-file", str(backends)]
        cmd += ["--keys-file", str(keys), "--kubernetes", "-n", module_namespace]
        cmd += ["--outputs-dir", f"{module_namespace}/{CLAIM}={outputs}"]  # the "mounted" output PVC
        gw = _start(
            cmd,
            tmp / "gateway.log",
            "GATEWAY_PORT",
            env={"KUBECONFIG": str(cluster.kubeconfig)},
        )
        started.append(gw)
        _wait_ok(f"{gw.url}/readyz")
        con = Console(gw.url, gw, module_namespace, outputs, {MODEL_A: a, MODEL_B: b}, cluster.api)

        def both_models() -> bool:
            r = con.get("/v1/models")
            return r.status_code == 200 and {m["filename"] for m in r.json()} == {MODEL_A, MODEL_B}

        wait_for(both_models, timeout=30, what="the gateway to serve both models")
        yield con
        assert KEY not in gw.log.read_text(), "the API key reached the gateway's log"
    finally:
        for proc in reversed(started):
            proc.stop()


def _page(browser: Browser, *, key: str | None, width: int, height: int) -> tuple[Page, Watched]:
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    if key is not None:
        # As if the key had been entered in this tab before (the page keeps it in sessionStorage).
        context.add_init_script(f"sessionStorage.setItem('sd-console-key', {key!r})")
    page = context.new_page()
    page.set_default_timeout(20_000)
    watched = Watched()
    page.on("console", watched.on_console)
    page.on("pageerror", watched.on_page_error)
    return page, watched


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Any]:
    """open_page(key=KEY | None, width=1280, height=900) -> (page, watched): a fresh browser context each."""
    pages: list[Page] = []

    def make(key: str | None = KEY, width: int = 1280, height: int = 900) -> tuple[Page, Watched]:
        page, watched = _page(browser, key=key, width=width, height=height)
        pages.append(page)
        return page, watched

    yield make
    for page in pages:
        page.context.close()


def screenshot(page: Page, name: str, *, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path
