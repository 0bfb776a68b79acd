"""The container images under images/: hadolint, pins, users, probes and the default image references.

No Docker engine is needed (nor available on the development machine): the Dockerfiles are linted with
hadolint and parsed; the WebUI probe extension runs against stand-ins for the A1111 modules it imports.
"""

from __future__ import annotations

import ast
import asyncio
import collections
import importlib.util
import inspect
import json
import os
import py_compile
import re
import subprocess
import sys
import threading
import time
import types
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from helpers import wait_for
from sd_operator.api.lorajob import DEFAULT_TRAINER_IMAGE
from sd_operator.api.sdinstance import DEFAULT_WEBUI_IMAGE
from sd_operator.render.sdinstance import DRAIN_PATH, LIVE_PATH, READY_PATH
from sd_operator.settings import DEFAULT_OPERATOR_IMAGE
from sd_operator.training.args import SD_SCRIPTS_DIR

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
NAMES = ("sd-operator", "webui", "trainer")
HADOLINT_CONFIG = IMAGES / ".hadolint.yaml"
PROBES = IMAGES / "webui" / "extension" / "sd-operator" / "scripts" / "sd_operator_probes.py"
VERSION = version("sd-operator")
SHA1 = re.compile(r"[0-9a-f]{40}")
# xformers wheels require one exact torch version; the pairs the images may use.
XFORMERS_TORCH = {"0.0.23.post1": "2.1.2", "0.0.29.post3": "2.6.0"}


# --- a small Dockerfile reader ----------------------------------------------------------------------------


def instructions(name: str) -> list[tuple[str, str]]:
    """(KEYWORD, rest) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in (IMAGES / name / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, rest = (buf + line).partition(" ")
        out.append((keyword.upper(), " ".join(rest.split())))
        buf = ""
    assert not buf, f"{name}: dangling line continuation"
    return out


def final_stage(name: str) -> list[tuple[str, str]]:
    ins = instructions(name)
    last_from = max(i for i, (kw, _) in enumerate(ins) if kw == "FROM")
    return ins[last_from:]


def arg_defaults(name: str) -> dict[str, str]:
    """ARG defaults; an ARG repeated in several stages must keep one value."""
    defaults: dict[str, str] = {}
    for kw, rest in instructions(name):
        if kw == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            assert defaults.setdefault(key, value) == value, f"{name}: ARG {key} has two defaults"
    return defaults


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def run_text(name: str) -> str:
    """Every RUN of the image, with the ARG defaults substituted."""
    args = arg_defaults(name)
    return "\n".join(expand(rest, args) for kw, rest in instructions(name) if kw == "RUN")


def env_values(name: str) -> dict[str, str]:
    """The final stage's ENV values, with the ARG defaults substituted."""
    args = arg_defaults(name)
    env: dict[str, str] = {}
    for kw, rest in final_stage(name):
        if kw == "ENV":
            env.update(re.findall(r'(\w+)=("[^"]*"|\S+)', rest))
    return {k: expand(v.strip('"'), args) for k, v in env.items()}


def json_form(name: str, keyword: str) -> list[str]:
    values = [rest for kw, rest in final_stage(name) if kw == keyword]
    assert values, f"{name}: no {keyword}"
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list), f"{name}: {keyword} must use the JSON (exec) form"
    return parsed


def final_user(name: str) -> str:
    users = [rest for kw, rest in final_stage(name) if kw == "USER"]
    assert users, f"{name}: the final stage sets no USER (it would run as root)"
    return users[-1]


def pip_pin(text: str, package: str) -> str:
    pins = set(re.findall(rf"(?<![\w-]){re.escape(package)}==([\w.+]+)", text))
    assert len(pins) == 1, f"{package} must be pinned to exactly one version, found {pins or 'none'}"
    return pins.pop()


# --- hadolint -----------------------------------------------------------------------------------------------


def hadolint() -> Path:
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.is_file():
        pytest.fail("hadolint not installed: run make venv")
    return binary


@pytest.mark.parametrize("name", NAMES)
def test_dockerfile_passes_hadolint(name: str) -> None:
    dockerfile = IMAGES / name / "Dockerfile"
    out = subprocess.run(
        [hadolint(), "--config", HADOLINT_CONFIG, "--no-color", dockerfile], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"hadolint {dockerfile.relative_to(ROOT)}:\n{out.stdout}{out.stderr}"


def test_hadolint_config_still_fails_bad_dockerfiles(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\nUSER root\n", encoding="utf-8")
    out = subprocess.run(
        [hadolint(), "--config", HADOLINT_CONFIG, "--no-color", bad], capture_output=True, text=True, check=False
    )
    assert out.returncode != 0
    for rule in ("DL3007", "DL3003", "DL3013", "DL3002"):
        assert rule in out.stdout


def test_hadolint_ignores_are_justified() -> None:
    config = yaml.safe_load(HADOLINT_CONFIG.read_text(encoding="utf-8"))
    text = HADOLINT_CONFIG.read_text(encoding="utf-8")
    for rule in config.get("ignored", []):
        assert re.search(rf"#.*{rule}", text), f"ignored rule {rule} needs a comment saying why"


# --- image references and shared conventions ---------------------------------------------------------------


@pytest.mark.parametrize("reference", [DEFAULT_OPERATOR_IMAGE, DEFAULT_WEBUI_IMAGE, DEFAULT_TRAINER_IMAGE])
def test_default_image_references_name_an_image_here_at_the_package_version(reference: str) -> None:
    repository, _, tag = reference.rpartition(":")
    assert tag == VERSION, f"{reference} should end with :{VERSION}"
    assert repository.startswith("ghcr.io/sd-operator/")
    name = repository.rsplit("/", 1)[1]
    assert (IMAGES / name / "Dockerfile").is_file(), f"{reference} names no directory under images/"


@pytest.mark.parametrize("name", NAMES)
def test_image_conventions(name: str) -> None:
    assert arg_defaults(name)["VERSION"] == VERSION
    user = final_user(name)
    assert user.split(":")[0] == "1000", f"{name} must run as uid 1000 (the pods' runAsUser), not {user}"
    labels = " ".join(rest for kw, rest in final_stage(name) if kw == "LABEL")
    for key in ("source", "version", "title", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    for kw, rest in instructions(name):
        if kw == "FROM":
            image = rest.split()[0]
            assert re.search(r":\d+\.\d+\.\d+[\w.-]*$", image), f"{name}: base {image} is not pinned by version tag"


def dockerignore_included(patterns: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negated, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            included = negated
    return included


def dockerignore(name: str) -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in (IMAGES / name / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.lstrip("!").rstrip("/")
        regex = re.escape(glob).replace(r"\*\*", "\0").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = regex.replace(r"\[", "[").replace(r"\]", "]")
        regex = regex.replace("/\0", "(/.*)?").replace("\0/", "(.*/)?").replace("\0", ".*")
        patterns.append((negated, re.compile(regex)))
    return patterns


@pytest.mark.parametrize("name", NAMES)
def test_build_context_sends_only_what_the_image_copies(name: str) -> None:
    patterns = dockerignore(name)
    for unwanted in (".venv/bin/python", ".local/bin/kubectl", "tests/unit/test_images.py", ".git/HEAD"):
        assert not dockerignore_included(patterns, unwanted), f"{name}: {unwanted} reaches the build context"
    sources = [rest.split()[-2] for kw, rest in instructions(name) if kw == "COPY" and "--from=" not in rest]
    assert sources, f"{name}: copies nothing from the context"
    for source in sources:
        base = ROOT / source
        files = [p for p in base.rglob("*") if p.is_file()] if base.is_dir() else [base]
        sent = [p for p in files if dockerignore_included(patterns, p.relative_to(ROOT).as_posix())]
        assert sent, f"{name}: COPY {source} finds nothing in the context"
        for p in sent:
            rel = p.relative_to(ROOT).as_posix()
            assert "__pycache__" not in rel and ".egg-info" not in rel, f"{name}: {rel} reaches the context"
    if name != "webui":
        for needed in ("operator/pyproject.toml", "operator/constraints.txt", "operator/src/sd_operator/cli.py"):
            assert dockerignore_included(patterns, needed), f"{name}: {needed} is missing from the context"


# --- sd-operator ---------------------------------------------------------------------------------------------


def test_operator_image_installs_the_wheel_with_the_constraints() -> None:
    text = run_text("sd-operator")
    assert "pip wheel" in text and "./operator" in text
    assert re.search(r"pip install [^\n]*-c operator/constraints\.txt [^\n]*sd_operator-\*\.whl", text)
    assert json_form("sd-operator", "ENTRYPOINT") == ["sd-operator"]
    assert json_form("sd-operator", "CMD") == ["--help"]
    bases = [rest.split()[0] for kw, rest in instructions("sd-operator") if kw == "FROM"]
    assert all(re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", b) for b in bases), bases


# --- webui ---------------------------------------------------------------------------------------------------


def test_webui_pins_a1111_controlnet_torch_and_xformers() -> None:
    args = arg_defaults("webui")
    text = run_text("webui")
    assert args["WEBUI_VERSION"] == "v1.10.1"
    assert '--branch "v1.10.1" https://github.com/AUTOMATIC1111/stable-diffusion-webui.git' in text
    commit = args["CONTROLNET_COMMIT"]
    assert SHA1.fullmatch(commit) and commit.startswith("56cec5b")
    assert "https://github.com/Mikubill/sd-webui-controlnet.git extensions/sd-webui-controlnet" in text
    assert f'git -C extensions/sd-webui-controlnet checkout --quiet "{commit}"' in text
    torch = pip_pin(text, "torch")
    xformers = pip_pin(text, "xformers")
    assert (torch, pip_pin(text, "torchvision"), xformers) == ("2.1.2+cu121", "0.16.2+cu121", "0.0.23.post1")
    assert XFORMERS_TORCH[xformers] == torch.split("+")[0]
    assert "https://download.pytorch.org/whl/cu121" in text
    # The launcher's own install commands carry the same pins, so it never replaces them.
    env = env_values("webui")
    assert f"torch=={args['TORCH_VERSION']}" in env["TORCH_COMMAND"]
    assert env["XFORMERS_PACKAGE"] == f"xformers=={xformers}"
    assert env["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cu121"
    assert "python launch.py --skip-torch-cuda-test --xformers --exit" in text


def test_webui_runtime_contract() -> None:
    user = final_user("webui")
    assert user not in {"root", "0"} and not user.startswith(("root:", "0:"))
    entrypoint = json_form("webui", "ENTRYPOINT")
    assert entrypoint[:2] == ["python", "launch.py"]
    assert {"--skip-prepare-environment", "--skip-install"} <= set(entrypoint)
    health = [rest for kw, rest in final_stage("webui") if kw == "HEALTHCHECK"]
    assert len(health) == 1 and "CMD [" in health[0]
    assert f"http://127.0.0.1:7861{LIVE_PATH}" in health[0]
    assert ("EXPOSE", "7861") in final_stage("webui")
    text = run_text("webui")
    for mount in ("/models", "/etc/sd-operator"):
        assert mount in text, f"the image should create the operator's mount point {mount}"
    copies = [rest for kw, rest in final_stage("webui") if kw == "COPY"]
    assert any(c.endswith("images/webui/extension/sd-operator /opt/webui/extensions/sd-operator") for c in copies)
    assert env_values("webui")["STABLE_DIFFUSION_REPO"].endswith("/stablediffusion.git")


# --- the WebUI probe extension ------------------------------------------------------------------------------


def test_probe_extension_compiles_for_the_webui_python(tmp_path: Path) -> None:
    py_compile.compile(str(PROBES), cfile=str(tmp_path / "probes.pyc"), doraise=True)
    ast.parse(PROBES.read_text(encoding="utf-8"), feature_version=(3, 10))  # the image's Python is 3.10
    source = PROBES.read_text(encoding="utf-8")
    assert f'"{LIVE_PATH}"' in source and f'"{READY_PATH}"' in source and f'"{DRAIN_PATH}"' in source
    assert "script_callbacks.on_app_started(" in source
    # The drain looks at A1111's queue lock; nothing here may take it (or any lock).
    nodes = list(ast.walk(ast.parse(source)))
    takes = [n for n in nodes if isinstance(n, ast.With | ast.AsyncWith)]
    takes += [n for n in nodes if isinstance(n, ast.Attribute) and n.attr in ("acquire", "__enter__")]
    assert not takes, "the probes must not take A1111's queue lock"


class _Shared(types.ModuleType):
    cmd_opts: Any = None

    @property
    def sd_model(self) -> Any:  # A1111: a property that loads the model (and waits on the load lock)
        raise AssertionError("the probe must not read modules.shared.sd_model")


class _JSONResponse:
    def __init__(self, content: dict[str, Any], status_code: int = 200) -> None:
        self.content = content
        self.status_code = status_code


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


@pytest.fixture
def webui(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The probe extension loaded against stand-ins for A1111's modules and FastAPI."""
    callbacks: list[Any] = []
    model_data = SimpleNamespace(sd_model=None, was_loaded_at_least_once=False, lock=threading.Lock())
    shared = _Shared("modules.shared")
    shared.cmd_opts = SimpleNamespace(ckpt="/models/Stable-diffusion/a.safetensors")
    stubs = {
        "modules": _module("modules"),
        "modules.script_callbacks": _module("modules.script_callbacks", on_app_started=callbacks.append),
        "modules.sd_models": _module("modules.sd_models", model_data=model_data),
        "modules.shared": shared,
        "modules.paths_internal": _module("modules.paths_internal", sd_model_file="/opt/webui/model.ckpt"),
        "fastapi": _module("fastapi"),
        "fastapi.responses": _module("fastapi.responses", JSONResponse=_JSONResponse),
    }
    for full, module in stubs.items():
        monkeypatch.setitem(sys.modules, full, module)
        parent, _, child = full.rpartition(".")
        if parent:
            setattr(stubs[parent], child, module)
    spec = importlib.util.spec_from_file_location("sd_operator_probes_under_test", PROBES)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert len(callbacks) == 1, "the script registers one on_app_started callback"
    routes: list[SimpleNamespace] = []
    app = SimpleNamespace(
        routes=routes,
        add_api_route=lambda path, endpoint, **kw: routes.append(SimpleNamespace(path=path, **kw, f=endpoint)),
    )
    callbacks[0](None, app)
    callbacks[0](None, app)  # a second app_started (script reload) adds nothing twice

    def call(path: str) -> tuple[int, dict[str, Any]]:
        (route,) = [r for r in routes if r.path == path]
        response = asyncio.run(route.f())
        return response.status_code, response.content

    return SimpleNamespace(routes=routes, model_data=model_data, shared=shared, stubs=stubs, call=call, module=module)


def _checkpoint(path: str) -> SimpleNamespace:
    return SimpleNamespace(sd_checkpoint_info=SimpleNamespace(filename=path, title=os.path.basename(path)))


def test_probe_routes_are_registered_once_as_get(webui: SimpleNamespace) -> None:
    assert sorted(r.path for r in webui.routes) == sorted([LIVE_PATH, READY_PATH, DRAIN_PATH])
    assert all(r.methods == ["GET"] for r in webui.routes)
    assert all(inspect.iscoroutinefunction(r.f) for r in webui.routes), "handlers run on the event loop"


def test_live_answers_while_the_model_loads(webui: SimpleNamespace) -> None:
    with webui.model_data.lock:  # the startup thread holds the load lock
        assert webui.call(LIVE_PATH) == (200, {"status": "alive"})
        assert webui.call(READY_PATH)[0] == 503


def test_ready_once_the_given_checkpoint_is_loaded(webui: SimpleNamespace) -> None:
    assert webui.call(READY_PATH) == (503, {"status": "loading", "model": "a.safetensors"})
    webui.model_data.sd_model = _checkpoint("/models/Stable-diffusion/a.safetensors")
    webui.model_data.was_loaded_at_least_once = True
    assert webui.call(READY_PATH) == (200, {"status": "ready", "model": "a.safetensors"})


def test_not_ready_with_another_checkpoint(webui: SimpleNamespace) -> None:
    webui.model_data.sd_model = _checkpoint("/opt/webui/models/Stable-diffusion/b.safetensors")
    webui.model_data.was_loaded_at_least_once = True
    code, body = webui.call(READY_PATH)
    assert code == 503 and body["status"] == "wrong-model" and body["expected"] == "a.safetensors"


def test_without_ckpt_any_loaded_model_is_ready(webui: SimpleNamespace) -> None:
    webui.shared.cmd_opts = SimpleNamespace(ckpt="/opt/webui/model.ckpt")  # A1111's default, no such file
    webui.model_data.sd_model = _checkpoint("/models/Stable-diffusion/b.safetensors")
    webui.model_data.was_loaded_at_least_once = True
    assert webui.call(READY_PATH) == (200, {"status": "ready", "model": "b.safetensors"})


def test_unexpected_internals_read_as_not_ready(webui: SimpleNamespace) -> None:
    del webui.stubs["modules.sd_models"].model_data
    code, body = webui.call(READY_PATH)
    assert code == 503 and body["status"] == "unknown"


# --- the WebUI drain (the webui container's preStop hook) ----------------------------------------------------


class _FIFOLock:
    """A1111 v1.10.1's modules.call_queue.queue_lock (modules/fifo_lock.py FIFOLock): a threading.Lock `_lock`,
    the waiting threads' events in `_pending_threads`, handed over in arrival order; no locked() method."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inner_lock = threading.Lock()
        self._pending_threads: collections.deque[threading.Event] = collections.deque()

    def acquire(self) -> bool:
        with self._inner_lock:
            if self._lock.acquire(False):
                return True
            event = threading.Event()
            self._pending_threads.append(event)
        event.wait()
        return self._lock.acquire()

    def release(self) -> None:
        with self._inner_lock:
            if self._pending_threads:
                self._pending_threads.popleft().set()
            self._lock.release()


class _State:
    """A1111's shared.state (modules/shared_state.py State) as far as the drain reads it."""

    job = ""
    job_count = 0

    def begin(self, job: str = "(unknown)") -> None:
        self.job, self.job_count = job, -1

    def end(self) -> None:
        self.job, self.job_count = "", 0


@pytest.fixture
def drainable(webui: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The extension with A1111's queue lock (modules.call_queue) and shared.state stand-ins."""
    lock, state = _FIFOLock(), _State()
    call_queue = _module("modules.call_queue", queue_lock=lock)
    monkeypatch.setitem(sys.modules, "modules.call_queue", call_queue)
    monkeypatch.setattr(webui.stubs["modules"], "call_queue", call_queue, raising=False)
    webui.shared.state = state

    def drain(**query: str) -> tuple[int, dict[str, Any]]:
        (route,) = [r for r in webui.routes if r.path == DRAIN_PATH]
        response = asyncio.run(route.f(**query))
        return response.status_code, response.content

    return SimpleNamespace(lock=lock, state=state, drain=drain, module=webui.module)


def _generation(lock: _FIFOLock, state: _State, seconds: float, done: list[float]) -> None:
    """What the API's txt2img does: the queue lock, State.begin() ... State.end() inside it."""
    lock.acquire()
    try:
        state.begin(job="scripts_txt2img")
        time.sleep(seconds)
        state.end()
    finally:
        lock.release()
    done.append(time.monotonic())


def test_busy_reads_the_queue_lock_and_state_without_taking_them(drainable: SimpleNamespace) -> None:
    busy, lock, state = drainable.module.busy, drainable.lock, drainable.state
    assert busy(state, lock) is None
    state.begin(job="scripts_txt2img")
    assert busy(state, lock) == {"job": "scripts_txt2img", "jobCount": -1, "lockHeld": False, "queued": 0}
    state.end()
    assert lock.acquire()  # held by a generation (before State.begin, after State.end)
    assert busy(state, lock) == {"job": "", "jobCount": 0, "lockHeld": True, "queued": 0}
    queued = threading.Thread(target=lambda: (lock.acquire(), lock.release()))
    queued.start()
    wait_for(lambda: len(lock._pending_threads) == 1, timeout=5, what="a request queued on the lock")
    assert busy(state, lock) == {"job": "", "jobCount": 0, "lockHeld": True, "queued": 1}
    lock.release()
    queued.join(timeout=5)
    assert busy(state, lock) is None
    plain = threading.Lock()  # WebUIs before the FIFO lock
    with plain:
        assert busy(state, plain) == {"job": "", "jobCount": 0, "lockHeld": True, "queued": 0}
    assert busy(state, plain) is None


def test_drain_answers_at_once_when_idle(drainable: SimpleNamespace) -> None:
    started = time.monotonic()
    code, body = drainable.drain()
    assert code == 200 and body["status"] == "drained"
    assert body["waitedSeconds"] < 1 and time.monotonic() - started < 1  # one confirming look, 0.25 s later


def test_drain_waits_for_the_running_and_the_queued_generation(drainable: SimpleNamespace) -> None:
    lock, state, done = drainable.lock, drainable.state, []
    first = threading.Thread(target=_generation, args=(lock, state, 0.6, done))
    second = threading.Thread(target=_generation, args=(lock, state, 0.3, done))
    first.start()
    wait_for(lambda: state.job == "scripts_txt2img", timeout=5, what="the first generation")
    second.start()
    wait_for(lambda: len(lock._pending_threads) == 1, timeout=5, what="the second generation queued")
    ticks: list[float] = []

    async def drain_while_serving() -> Any:
        async def ticker() -> None:  # the event loop keeps serving other requests meanwhile
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.05)

        task = asyncio.create_task(ticker())
        try:
            return await drainable.module.wait_until_idle(drainable.module._webui_busy, 10.0)
        finally:
            task.cancel()

    body = asyncio.run(drain_while_serving())
    answered = time.monotonic()
    first.join(timeout=5)
    second.join(timeout=5)
    assert body["status"] == "drained" and body["waitedSeconds"] >= 0.5
    assert len(done) == 2 and max(done) <= answered, "the drain answered before both generations finished"
    assert len(ticks) >= 10, "the drain blocked the event loop"


def test_drain_gives_up_after_its_timeout(drainable: SimpleNamespace) -> None:
    drainable.state.begin(job="scripts_img2img")  # never ends
    started = time.monotonic()
    code, body = drainable.drain(timeout="0.4")
    assert code == 200 and body["status"] == "timeout"
    assert body["busy"]["job"] == "scripts_img2img"
    assert 0.4 <= body["waitedSeconds"] < 1.5 and time.monotonic() - started < 2


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, 110.0), ("", 110.0), ("2.5", 2.5), ("0", 0.0), ("abc", 110.0), ("-1", 110.0), ("nan", 110.0),
     ("inf", 110.0)],
)  # fmt: skip
def test_drain_timeout_parameter(drainable: SimpleNamespace, value: str | None, seconds: float) -> None:
    assert drainable.module.drain_timeout(value) == seconds


def test_drain_defaults_are_the_emulators(drainable: SimpleNamespace) -> None:
    from sd_operator.emulator import app as emulator

    module = drainable.module
    assert (module.DRAIN_PATH, module.DRAIN_TIMEOUT) == (DRAIN_PATH, emulator.DRAIN_TIMEOUT)
    assert (module.DRAIN_POLL, module.DRAIN_IDLE_CHECKS) == (emulator.DRAIN_POLL, emulator.DRAIN_IDLE_CHECKS)


def test_drain_never_fails_on_unexpected_internals(webui: SimpleNamespace) -> None:
    # No modules.call_queue at all: the drain cannot tell whether anything runs, so it waits, then answers.
    (route,) = [r for r in webui.routes if r.path == DRAIN_PATH]
    response = asyncio.run(route.f(timeout="0.3"))
    assert response.status_code == 200 and response.content["status"] == "timeout"
    assert "call_queue" in response.content["busy"]["error"]


# --- trainer -------------------------------------------------------------------------------------------------


def test_trainer_pins_sd_scripts_and_installs_the_training_stack() -> None:
    args = arg_defaults("trainer")
    text = run_text("trainer")
    commit = args["SD_SCRIPTS_COMMIT"]
    assert SHA1.fullmatch(commit) and commit.startswith("48d368f")
    assert "git clone --quiet https://github.com/kohya-ss/sd-scripts.git /opt/sd-scripts" in text
    assert f'git -C /opt/sd-scripts checkout --quiet "{commit}"' in text
    assert "pip install --no-cache-dir -r requirements.txt" in text
    assert pip_pin(text, "accelerate")
    assert pip_pin(text, "bitsandbytes")
    torch = pip_pin(text, "torch")
    xformers = pip_pin(text, "xformers")
    assert XFORMERS_TORCH[xformers] == torch.split("+")[0]
    assert torch.endswith("+cu124") and "https://download.pytorch.org/whl/cu124" in text
    assert re.search(r"pip install [^\n]*-c /wheels/constraints\.txt /wheels/sd_operator-\*\.whl", text)


def test_trainer_runtime_contract() -> None:
    user = final_user("trainer")
    assert user.split(":")[0] == "1000"
    env = env_values("trainer")
    assert env["SD_SCRIPTS_DIR"] == SD_SCRIPTS_DIR == "/opt/sd-scripts"
    assert json_form("trainer", "ENTRYPOINT") == ["sd-operator"]
    copies = [rest for kw, rest in final_stage("trainer") if kw == "COPY"]
    target = f"{env['HF_HOME']}/accelerate/default_config.yaml"
    assert any(c.endswith(f"images/trainer/accelerate/default_config.yaml {target}") for c in copies)
    config = yaml.safe_load((IMAGES / "trainer" / "accelerate" / "default_config.yaml").read_text(encoding="utf-8"))
    assert config["use_cpu"] is False and config["mixed_precision"] == "fp16"
    assert (config["num_processes"], config["num_machines"], config["distributed_type"]) == (1, 1, "NO")


# --- build.sh ------------------------------------------------------------------------------------------------


def _fake_docker(tmp_path: Path, *, engine: bool) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "docker.log"
    status = 0 if engine else 1
    script = f'#!/bin/sh\necho "$*" >> "{log}"\n[ "$1" = info ] && exit {status}\nexit 0\n'
    (bindir / "docker").write_text(script, encoding="utf-8")
    (bindir / "docker").chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}


def test_build_script_without_an_engine_says_so_and_succeeds(tmp_path: Path) -> None:
    out = subprocess.run(
        ["bash", IMAGES / "build.sh"],
        env=_fake_docker(tmp_path, engine=False),
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "no Docker engine here: images are not built (hadolint checks them in make lint)" in out.stdout
    assert (tmp_path / "docker.log").read_text(encoding="utf-8").split() == ["info"]


def test_build_script_builds_every_image_at_the_package_version(tmp_path: Path) -> None:
    out = subprocess.run(
        ["bash", IMAGES / "build.sh"],
        env=_fake_docker(tmp_path, engine=True),
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    builds = [line for line in (tmp_path / "docker.log").read_text(encoding="utf-8").splitlines() if "build" in line]
    assert len(builds) == len(NAMES)
    for name, line in zip(NAMES, builds, strict=True):
        assert line.startswith("buildx build ")
        assert f"--file images/{name}/Dockerfile" in line
        assert f"--tag ghcr.io/sd-operator/{name}:{VERSION}" in line
        assert f"--build-arg VERSION={VERSION}" in line
        assert line.endswith(" .")


# --- pins recorded as checked against the real projects (tests/fixtures/real/image_pins.json) --------------

IMAGE_PINS = ROOT / "tests" / "fixtures" / "real" / "image_pins.json"
PIN_STATUSES = {"agrees", "differs", "not checked"}
# A literal `name==version` in a RUN (the ARG-driven ones read `name==${ARG}` and are recorded as ARGs).
LITERAL_PIN = re.compile(r"(?<![\w.$-])([A-Za-z][\w.-]*)==(\d[\w.+]*)")


def recorded_pins(image: str) -> dict[tuple[str, str], dict[str, Any]]:
    data = json.loads(IMAGE_PINS.read_text(encoding="utf-8"))
    pins = [p for p in data["pins"] if p["image"] == image]
    keyed = {(p["kind"], p["name"]): p for p in pins}
    assert len(keyed) == len(pins), f"{image}: a pin is recorded twice in {IMAGE_PINS.name}"
    return keyed


def dockerfile_pins(image: str) -> dict[tuple[str, str], str]:
    """Every pin the Dockerfile sets, as (kind, name) -> value: ARG defaults, base images, literal pip pins, the
    Python package it installs with apt, and the ENV overrides of the upstream launcher's repositories/commits."""
    pins: dict[tuple[str, str], str] = {("arg", k): v for k, v in arg_defaults(image).items() if k != "VERSION"}
    for kw, rest in instructions(image):
        if kw == "FROM":
            base, _, tag = rest.split()[0].partition(":")
            assert pins.setdefault(("base", base), tag) == tag, f"{image}: two tags of {base}"
    raw_run = "\n".join(rest for kw, rest in instructions(image) if kw == "RUN")
    for package, pinned in LITERAL_PIN.findall(raw_run):
        assert pins.setdefault(("pip", package), pinned) == pinned, f"{image}: {package} pinned twice"
    for kw, rest in final_stage(image):
        if kw == "RUN" and "apt-get install" in rest:
            pythons = [word for word in rest.split() if re.fullmatch(r"python3(\.\d+)?", word)]
            assert len(pythons) <= 1, f"{image}: several Pythons installed: {pythons}"
            if pythons:
                pins["apt", "python"] = pythons[0]
    for key, value in env_values(image).items():
        if re.search(r"_(REPO|COMMIT_HASH|PACKAGE)$", key) and key != "XFORMERS_PACKAGE":
            pins["env", key] = value
    return pins


@pytest.mark.parametrize("name", NAMES)
def test_every_dockerfile_pin_is_the_value_recorded_as_checked(name: str) -> None:
    recorded = recorded_pins(name)
    actual = dockerfile_pins(name)
    unchecked = sorted(set(actual) - set(recorded))
    assert not unchecked, f"{name}: pins with no check recorded in {IMAGE_PINS.name}: {unchecked}"
    stale = sorted(set(recorded) - set(actual))
    assert not stale, f"{name}: {IMAGE_PINS.name} records pins the Dockerfile no longer sets: {stale}"
    for key, value in actual.items():
        checked = recorded[key]["value"]
        assert value == checked, (
            f"{name}: {key[0]} {key[1]} is {value!r} but {checked!r} is what was checked against the real project; "
            f"check the new value and record it in {IMAGE_PINS.name} and images/README.md"
        )


def test_every_recorded_pin_says_what_it_was_checked_against() -> None:
    data = json.loads(IMAGE_PINS.read_text(encoding="utf-8"))
    assert set(data["status_meanings"]) == PIN_STATUSES
    for pin in data["pins"]:
        where = f"{pin['image']} {pin['kind']} {pin['name']}"
        assert pin["image"] in NAMES, where
        assert pin["status"] in PIN_STATUSES, where
        assert pin["checked"].strip(), where
        if pin["status"] != "agrees":
            assert pin.get("reason", "").strip(), f"{where}: {pin['status']} needs a reason"
        assert pin["sources"], f"{where}: no source"
        for source in pin["sources"]:
            assert source.get("what", "").strip(), where
            if "registry" in source:
                assert source["package"] and source["version"], where
            elif "repository" in source:
                assert "/" in source["repository"], where
                # a file is named with its commit (or the stored copy read); an issue or a bare repository is enough
                named = "issue" in source or source.get("commit") or source.get("stored_copy")
                assert "path" not in source or named, where
            else:
                assert source.get("unavailable"), f"{where}: a source names a repository, a registry or why neither"
    for repo in data["webui_launch_defaults"]["repositories"]:
        assert SHA1.fullmatch(repo["commit"]), repo


def test_recorded_pins_agree_with_each_other() -> None:
    for name in ("webui", "trainer"):
        pins = recorded_pins(name)
        torch = pins["arg", "TORCH_VERSION"]["value"].split("+")[0]
        for package in ("TORCHVISION_VERSION", "XFORMERS_VERSION"):
            assert pins["arg", package]["requires"]["torch"] == torch, f"{name}: {package} checked for another torch"
        assert XFORMERS_TORCH[pins["arg", "XFORMERS_VERSION"]["value"]] == torch
    trainer = recorded_pins("trainer")
    requirements = trainer["arg", "SD_SCRIPTS_COMMIT"]["requirements"]
    assert trainer["arg", "ACCELERATE_VERSION"]["value"] == requirements["accelerate"], "sd-scripts pins accelerate"
    webui = recorded_pins("webui")
    assert webui["arg", "WEBUI_VERSION"]["resolves_to"] == "82a973c04367123ae98bd9abdf80d9eda9b910e2"
    assert webui["env", "STABLE_DIFFUSION_REPO"]["status"] == "differs"  # the upstream default is gone (see reason)


def test_images_readme_lists_every_checked_pin() -> None:
    readme = (IMAGES / "README.md").read_text(encoding="utf-8")
    _, _, section = readme.partition("## Pins checked against the real projects")
    section = section.split("\n## ", 1)[0]
    assert section, "images/README.md has no 'Pins checked against the real projects' section"
    data = json.loads(IMAGE_PINS.read_text(encoding="utf-8"))
    for pin in data["pins"]:
        assert pin["value"] in section, f"images/README.md does not mention the checked {pin['name']} {pin['value']}"
