"""The product held against the real AUTOMATIC1111 WebUI v1.10.1: its launch flags and its API as recorded from
its source (tests/fixtures/real/webui/flags.json, api.json; each file names repository, commit and paths).

Every command line the operator can render parses with a parser built from the recorded flags (the WebUI's
own argparse, so arity and abbreviations behave as in the real program); the image's own command lines too;
the emulator accepts exactly those flags and refuses others like the WebUI; its request models have the
WebUI's field names, defaults and null handling; the gateway's answers carry the WebUI's fields."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from sd_operator.api.sdinstance import RESERVED_FLAGS, RESERVED_SPELLINGS, SDInstanceSpec, WebUI
from sd_operator.emulator import cli as emulator_cli
from sd_operator.emulator.schema import GenerationRequest, Img2ImgRequest, Txt2ImgRequest, parse
from sd_operator.gateway.app import STATE, create_app
from sd_operator.gateway.config import GatewayConfig
from sd_operator.gateway.dispatch import Backend
from sd_operator.render.sdinstance import webui_args

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "tests/fixtures/real/webui"
FLAGS_DOC = json.loads((REAL / "flags.json").read_text())
API = json.loads((REAL / "api.json").read_text())
FLAGS = {f["flag"]: f for f in FLAGS_DOC["flags"]}
CONTROLNET = "extension:sd-webui-controlnet"
DOCKERFILE = ROOT / "images/webui/Dockerfile"
HEX40 = re.compile(r"^[0-9a-f]{40}$")
EMULATOR_ONLY = {"--host", "--gpu-profile", "--speed", "--load-seconds", "--family", "--print-port"}


class ArgvError(Exception):
    """What argparse would print before exiting 2."""


class WebUIParser(argparse.ArgumentParser):
    """The WebUI's parser rebuilt from the recorded flags (stock argparse, abbreviations allowed as there)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise ArgvError(message)


def _kwargs(flag: dict[str, Any]) -> dict[str, Any]:
    arity = flag["arity"]
    if arity == "switch":
        return {"action": flag.get("action", "store_true")}
    kw: dict[str, Any] = {"type": {"int": int, "json.loads": json.loads}.get(flag.get("type", "str"), str)}
    if arity == "append":
        kw["action"] = "append"
    elif arity.startswith("nargs:"):
        kw["nargs"] = arity.split(":", 1)[1]
    if "choices" in flag:
        kw["choices"] = flag["choices"]
    return kw


def webui_parser(*, controlnet: bool = True) -> WebUIParser:
    """cmd_args.py + the built-in extensions' preload.py (+ ControlNet's while the extension loads)."""
    parser = WebUIParser(prog="launch.py")
    for flag in FLAGS.values():
        if controlnet or flag["origin"] != CONTROLNET:
            parser.add_argument(flag["flag"], **_kwargs(flag))
    return parser


PARSERS = {True: webui_parser(controlnet=True), False: webui_parser(controlnet=False)}


def parse_webui(argv: list[str], *, controlnet: bool = True) -> argparse.Namespace:
    ns, unknown = PARSERS[controlnet].parse_known_args(argv)
    if unknown:
        raise ArgvError(f"unrecognized arguments: {' '.join(unknown)}")
    return ns


def dockerfile_argv(instruction: str) -> list[str]:
    """The JSON-array form of an ENTRYPOINT/CMD instruction of images/webui/Dockerfile."""
    (line,) = [x for x in DOCKERFILE.read_text().splitlines() if x.startswith(f"{instruction} [")]
    return list(json.loads(line[len(instruction) :]))


ENTRYPOINT = dockerfile_argv("ENTRYPOINT")


def launch_flags(argv: list[str]) -> list[str]:
    """What launch.py's parser sees of a `python launch.py ...` argv."""
    assert argv[:2] == ["python", "launch.py"], argv
    return argv[2:]


# ---------------------------------------------------------------------------------------------
# The recorded data


@pytest.mark.parametrize("doc", [FLAGS_DOC, API], ids=["flags.json", "api.json"])
def test_the_recorded_files_name_their_source(doc: dict[str, Any]) -> None:
    source = doc["source"]
    assert source["repository"] == "https://github.com/AUTOMATIC1111/stable-diffusion-webui"
    assert HEX40.match(source["commit"]) and source["tag"] == "v1.10.1"
    assert re.match(r"^\d{4}-\d{2}-\d{2}$", source["date_read"]) and source["paths"]
    # The tag is the image's pin.
    assert f"ARG WEBUI_VERSION={source['tag']}" in DOCKERFILE.read_text()


def test_the_flags_file_proves_its_version_and_names_the_controlnet_pin() -> None:
    source = FLAGS_DOC["source"]
    proof = " ".join(FLAGS_DOC["version_proof"])
    assert source["commit"] in proof and "v1.10.1" in proof and "annotated tag" in proof
    extension = source["extension"]
    assert extension["repository"] == "https://github.com/Mikubill/sd-webui-controlnet"
    assert f"ARG CONTROLNET_COMMIT={extension['commit']}" in DOCKERFILE.read_text()
    assert {f["origin"] for f in FLAGS.values()} == {
        "webui",
        "builtin-extension:LDSR",
        "builtin-extension:Lora",
        "builtin-extension:ScuNET",
        "builtin-extension:SwinIR",
        CONTROLNET,
    }
    assert all(f["arity"] in {"switch", "one", "append", "nargs:+"} for f in FLAGS.values())
    assert len(FLAGS) == len(FLAGS_DOC["flags"])  # no flag twice


def test_the_emulators_copy_of_the_flags_is_the_recorded_file() -> None:
    shipped = ROOT / "operator/src/sd_operator/emulator" / emulator_cli.FLAGS_FILE
    assert shipped.read_bytes() == (REAL / "flags.json").read_bytes()
    pyproject = (ROOT / "operator/pyproject.toml").read_text()
    assert '"emulator/*.json"' in pyproject  # shipped as package data
    assert [f["flag"] for f in emulator_cli.webui_flags()] == list(FLAGS)


# ---------------------------------------------------------------------------------------------
# Every command line the operator renders, and the image's own


def _extra_args_in_use() -> list[list[str]]:
    """extraArgs of the examples and README, and those the tests render with."""
    found: list[list[str]] = [[]]
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "SDInstance":
                extra = ((doc.get("spec") or {}).get("webui") or {}).get("extraArgs")
                if extra:
                    found.append(list(extra))
    for block in re.findall(r"extraArgs:\s*(\[[^\]]*\])", (ROOT / "README.md").read_text()):
        found.append(list(yaml.safe_load(block)))
    found += [
        ["--no-half", "--opt-channelslast", "--cors-allow-origins=https://x.example"],  # test_render_sdinstance
        ["--api-log", "--opt-channelslast"],  # test_emulator
    ]
    return found


def _specs() -> list[SDInstanceSpec]:
    """Families x VRAM modes (auto over GPU sizes) x attention x VAE x auth x noHalfVAE, without extraArgs;
    then every extraArgs in use over families x attention x auth."""
    vram: list[tuple[str, int | None]] = [("auto", m) for m in (None, 4, 6, 8, 10, 12, 16, 24, 80)]
    vram += [("none", 24), ("medvram", 12), ("lowvram", 6), ("medvram-sdxl", 12)]
    families = ("sd15", "sd2", "sdxl", "sd3")
    options = list(itertools.product(("auto", "xformers", "sdp"), (False, True), (False, True), (None, True, False)))
    combos = [(f, v, o, []) for f, v, o in itertools.product(families, vram, options)]
    combos += [
        (f, ("auto", 12), (attention, True, auth, None), extra)
        for f, attention, auth, extra in itertools.product(
            families, ("auto", "sdp"), (False, True), _extra_args_in_use()
        )
    ]
    specs = []
    for family, (mode, memory), (attention, vae, auth, no_half_vae), extra in combos:
        if mode == "medvram-sdxl" and family != "sdxl":
            continue  # refused by the CRD (webui.vramMode: medvram-sdxl applies to SDXL models only)
        hf = {"huggingFace": {"repo": "owner/repo", "file": "x.safetensors"}}
        model: dict[str, Any] = {"family": family, "checkpoint": {"name": "ckpt.safetensors", "source": hf}}
        if vae:
            model["vae"] = {"name": "vae.safetensors", "source": hf}
        webui: dict[str, Any] = {"attention": attention, "vramMode": mode, "extraArgs": extra}
        if auth:
            webui["apiAuthSecret"] = {"name": "creds", "key": "auth"}
        if no_half_vae is not None:
            webui["noHalfVAE"] = no_half_vae
        gpu = {"memoryGiB": memory} if memory is not None else {}
        specs.append(SDInstanceSpec.model_validate({"model": model, "webui": webui, "gpu": gpu}))
    return specs


def test_every_command_line_the_operator_renders_parses_as_the_webui_parses_it() -> None:
    specs = _specs()
    assert len(specs) > 1500
    seen: set[str] = set()
    for spec in specs:
        args = webui_args(spec)
        # The container's argv: the image's ENTRYPOINT, then the pod's args (which replace its CMD).
        ns = parse_webui(launch_flags(ENTRYPOINT) + args)
        assert ns.ckpt == "/models/Stable-diffusion/ckpt.safetensors" and ns.nowebui and ns.api
        assert ns.port == spec.webui.port and ns.controlnet_dir == "/models/ControlNet"
        own = args[: len(args) - len(spec.webui.extra_args or [])]
        for token in own:
            if token.startswith("-"):
                assert token in FLAGS, f"{token}: not a flag of the WebUI v1.10.1 (nor an abbreviation to rely on)"
                seen.add(token)
    # What the variations reached: every VRAM and attention flag, the VAE, auth and --no-half-vae.
    assert {"--lowvram", "--medvram", "--medvram-sdxl", "--xformers", "--opt-sdp-attention"} <= seen
    assert {"--vae-path", "--api-auth", "--no-half-vae", "--lora-dir", "--controlnet-dir"} <= seen


def test_the_operators_webui_flags_and_where_they_come_from() -> None:
    """--lora-dir is the built-in Lora extension's and --controlnet-dir the ControlNet extension's: the
    latter exists only while that extension loads, which no allowed extraArgs can prevent."""
    assert FLAGS["--lora-dir"]["origin"] == "builtin-extension:Lora"
    assert FLAGS["--controlnet-dir"]["origin"] == CONTROLNET
    hf = {"huggingFace": {"repo": "owner/repo", "file": "x.safetensors"}}
    spec = {"model": {"family": "sd15", "checkpoint": {"name": "ckpt.safetensors", "source": hf}}}
    argv = webui_args(SDInstanceSpec.model_validate(spec))
    with pytest.raises(ArgvError, match="unrecognized arguments: --controlnet-dir"):
        parse_webui(argv, controlnet=False)
    assert {"--disable-extra-extensions", "--disable-all-extensions", "--data-dir"} <= set(RESERVED_FLAGS)


def test_the_images_own_command_lines_parse() -> None:
    entry, cmd = launch_flags(ENTRYPOINT), dockerfile_argv("CMD")
    ns = parse_webui(entry + cmd)
    assert ns.skip_prepare_environment and ns.skip_install and ns.skip_version_check
    assert ns.nowebui and ns.port == 7861 and ns.ckpt_dir == "/models/Stable-diffusion"
    # The build's environment preparation: --exit is launch.py's own (handled before the WebUI parses).
    (run,) = re.findall(r"RUN python launch\.py ([^\\\n]*)", DOCKERFILE.read_text())
    build = shlex.split(run)
    launch_only = {x["token"] for x in FLAGS_DOC["launch_only"]}
    assert "--exit" in build and "--skip-prepare-environment" not in build
    parse_webui([a for a in build if a not in launch_only])


def test_reserved_flags_and_every_abbreviation_argparse_resolves_to_them_are_refused() -> None:
    """The CRD refuses extraArgs that are, or abbreviate, a reserved flag (argparse's allow_abbrev), and
    nothing else: checked against the recorded parser itself."""
    assert set(RESERVED_FLAGS) <= set(FLAGS)

    def refused(arg: str) -> bool:  # the CEL rule's predicate
        return any(arg == p or arg.startswith(p + "=") for p in RESERVED_SPELLINGS)

    parser = webui_parser()
    before = vars(parser.parse_args([]))

    def resolves_to(token: str) -> str | None:
        """The flag the WebUI's parser takes `token` for, None when it refuses it (unknown or ambiguous)."""
        try:
            ns, unknown = parser.parse_known_args([token, "1"])
        except ArgvError:
            return None
        changed = [k for k, v in vars(ns).items() if v != before[k]]
        if not changed or (unknown and unknown != ["1"]):
            return None
        (dest,) = changed
        return next(f for f, x in FLAGS.items() if x["dest"] == dest)

    checked = 0
    for flag in RESERVED_FLAGS:
        for n in range(3, len(flag) + 1):
            for token in (flag[:n], flag[:n] + "=1"):
                target = resolves_to(token)
                if target == flag:
                    assert refused(token), f"{token} means {flag} to the WebUI but is not refused"
                    checked += 1
                elif target is not None and target not in RESERVED_FLAGS:
                    assert not refused(token), f"{token} means {target}, which is allowed"
    assert checked >= len(RESERVED_FLAGS) * 2
    for flag in FLAGS:
        assert refused(flag) == (flag in RESERVED_FLAGS), flag
    rule = next(r["rule"] for r in WebUI.model_json_schema()["x-kubernetes-validations"])
    assert all(f"'{s}'" in rule for s in RESERVED_SPELLINGS)


# ---------------------------------------------------------------------------------------------
# The emulator's command line: the WebUI's flags, no other


def test_the_emulator_accepts_every_webui_flag_with_its_arity() -> None:
    base = ["--ckpt", "m.safetensors"]
    defaults = vars(emulator_cli.parse_args(base))
    for flag, info in FLAGS.items():
        value = {"switch": [], "nargs:+": ["a", "b"]}.get(info["arity"], [str(info.get("choices", ["1"])[0])])
        args = emulator_cli.parse_args([*base, flag, *value])
        assert vars(args)[info["dest"]] != defaults[info["dest"]] or flag == "--gradio-queue", flag
    assert set(emulator_cli.HONOURED) <= set(FLAGS)
    parser = argparse.ArgumentParser()
    emulator_cli._arguments(parser)
    own = {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - set(FLAGS)
    assert own == EMULATOR_ONLY | {"--help"}


@pytest.mark.parametrize(
    "argv",
    [
        ["--some-future-flag"],
        ["--xformers", "on"],  # a switch takes no value
        ["--port"],  # a value is required
        ["--precision", "fp8"],  # not one of the choices
        ["--controlnet-dir", "/m", "--disable-extra-extensions"],  # no ControlNet extension, no such flag
    ],
)
def test_the_emulator_refuses_what_the_webui_refuses(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    full = ["--api", "--nowebui", "--ckpt", "m.safetensors", *argv]
    with pytest.raises(ArgvError):  # the WebUI itself (ControlNet's flags exist unless it is disabled)
        parse_webui(full, controlnet="--disable-extra-extensions" not in argv)
    with pytest.raises(SystemExit) as exited:
        emulator_cli.parse_args(full)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: sd-operator emulator") and "sd-operator emulator: error: " in err


def test_the_emulator_drops_controlnets_flags_when_the_settings_file_disables_it(tmp_path: Path) -> None:
    settings = tmp_path / "config.json"
    argv = ["--ckpt", "m.safetensors", "--ui-settings-file", str(settings), "--controlnet-dir", "/cn"]
    settings.write_text(json.dumps({"disabled_extensions": ["sd-webui-controlnet"]}))
    with pytest.raises(SystemExit):
        emulator_cli.parse_args(argv)
    settings.write_text(json.dumps({"disabled_extensions": ["some-other"], "disable_all_extensions": "none"}))
    assert str(emulator_cli.parse_args(argv).controlnet_dir) == "/cn"
    settings.write_text(json.dumps({"disable_all_extensions": "extra"}))
    with pytest.raises(SystemExit):
        emulator_cli.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Request bodies: the WebUI's field names, defaults, nulls and unknown keys


@pytest.mark.parametrize(("route", "model"), [("txt2img", Txt2ImgRequest), ("img2img", Img2ImgRequest)])
def test_the_emulators_request_fields_are_the_webuis(route: str, model: type[GenerationRequest]) -> None:
    recorded = API["request_models"][route]["fields"]
    assert set(model.model_fields) == set(recorded)
    for name, info in recorded.items():
        default = model.model_fields[name].get_default(call_default_factory=True)
        assert default == info["default"], name
        # null: accepted (the default then) exactly where the WebUI's pydantic v1 field allows None.
        try:
            model.model_validate({name: None})
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == info["nullable"], name


def test_unknown_request_fields_are_ignored_as_by_the_webui() -> None:
    assert API["unknown_fields"]["behaviour"] == "ignored"
    req = parse(Txt2ImgRequest, json.dumps({"prompt": "a", "not_a_field": 1, "hr_scheduler": "Karras"}))
    dumped = req.model_dump()
    assert "not_a_field" not in dumped and dumped["hr_scheduler"] == "Karras"
    # pydantic v1's coercions: numbers for strings, a float's whole part for an int.
    coerced = parse(Txt2ImgRequest, json.dumps({"prompt": 5, "steps": 7.9}))
    assert (coerced.prompt, coerced.steps) == ("5", 7)


def test_bad_bodies_get_fastapis_422() -> None:
    shape = API["validation_errors"]
    messages = shape["pydantic_v1_messages"]
    cases = {
        json.dumps({"steps": "many"}): [["body", "steps"], "type_error.integer"],
        json.dumps({"send_images": None}): [["body", "send_images"], "type_error.none.not_allowed"],
        json.dumps([1, 2]): [["body"], "type_error.dict"],
        "": [["body"], "value_error.missing"],
    }
    for body, (loc, kind) in cases.items():
        with pytest.raises(Exception) as raised:
            parse(Txt2ImgRequest, body)
        error = raised.value
        assert getattr(error, "status", None) == shape["status"]
        payload = error.payload()  # type: ignore[attr-defined]
        assert list(payload) == ["detail"]
        (item,) = payload["detail"]
        assert (item["loc"], item["type"], item["msg"]) == (loc, kind, messages[kind])
    with pytest.raises(Exception) as raised:
        parse(Txt2ImgRequest, "{not json")
    (item,) = raised.value.payload()["detail"]  # type: ignore[attr-defined]
    assert item["loc"] == ["body", 1] and item["type"] == "value_error.jsondecode"


# ---------------------------------------------------------------------------------------------
# The gateway's A1111 answers


def _model_fields(name: str) -> set[str]:
    return set(API["models"][name]["fields"])


def test_the_gateways_a1111_answers_carry_the_webuis_fields() -> None:
    async def scenario() -> dict[str, Any]:
        app = create_app(GatewayConfig())
        sha = "ab" * 32
        app[STATE].dispatcher.add(Backend("http://127.0.0.1:9", "dreamy.safetensors", sha256=sha, title=None))
        async with TestClient(TestServer(app, host="127.0.0.1")) as http:
            out = {}
            out["sd-models"] = await (await http.get("/sdapi/v1/sd-models")).json()
            out["progress"] = await (await http.get("/sdapi/v1/progress")).json()
            switch = await http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"})
            other = await http.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
            unknown = await http.post("/sdapi/v1/txt2img", json={"override_settings": {"sd_model_checkpoint": "x"}})
            out["errors"] = [(r.status, await r.json()) for r in (switch, other, unknown)]
            return out

    answers = asyncio.run(scenario())
    (item,) = answers["sd-models"]
    assert set(item) == _model_fields("SDModelItem") == set(API["sd_models_item"]["fields"])
    assert item["title"] == f"dreamy.safetensors [{'ab' * 5}]" and item["hash"] == "ab" * 5
    assert item["model_name"] == "dreamy" and item["sha256"] == "ab" * 32
    progress = answers["progress"]
    assert set(progress) == _model_fields("ProgressResponse") == set(API["progress"]["response_fields"])
    assert list(progress["state"]) == API["progress"]["state_keys"]
    assert isinstance(progress["progress"], float) and isinstance(progress["eta_relative"], float)
    for status, body in answers["errors"]:
        assert status >= 400
        assert set(API["errors"]["keys"]) <= set(body)
        assert all(isinstance(body[k], str) for k in ("error", "detail", "body", "errors"))
