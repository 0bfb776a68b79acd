"""`sd-operator emulator`: an AUTOMATIC1111 WebUI API emulator for tests, local runs and benchmarks.

Takes the WebUI command line the operator renders (`--api --nowebui --listen --port N --ckpt PATH
...`), so a pod can run it in place of the real WebUI. It accepts exactly the flags AUTOMATIC1111 v1.10.1
accepts (webui_flags.json: modules/cmd_args.py, the built-in extensions' and the pinned ControlNet
extension's preload.py, recorded from their source) and refuses any other as the WebUI does: argparse's
`error: unrecognized arguments: ...` and exit status 2 (unless IGNORE_CMD_ARGS_ERRORS is set, as in the
WebUI). The ControlNet extension's flags exist only while the extension loads (not with
--disable-extra-extensions, --disable-all-extensions, or when the --ui-settings-file disables it).
Emulator-only flags: --host, --gpu-profile, --speed, --load-seconds, --family, --print-port.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from sd_operator.emulator import EMULATOR_NAME
from sd_operator.emulator.config import Checkpoint, EmulatorConfig, EmulatorError, guess_family, parse_api_auth
from sd_operator.emulator.profiles import DEFAULT_PROFILE, PROFILES, Family

log = logging.getLogger("sd_operator.emulator")
DEFAULT_PORT = 7861  # A1111's port with --nowebui
SHUTDOWN_SECONDS = 90.0  # on SIGTERM, let the generation in progress finish (the pod allows 120 s)
FLAGS_FILE = "webui_flags.json"  # a copy of tests/fixtures/real/webui/flags.json (a unit test keeps them equal)
WEBUI_ORIGIN = "webui"  # modules/cmd_args.py; the rest come from extensions' preload.py
CONTROLNET_ORIGIN = "extension:sd-webui-controlnet"
CONTROLNET_FOLDER = "sd-webui-controlnet"  # extensions/<folder> in images/webui/Dockerfile
_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "json.loads": json.loads, "str.lower": str.lower}
# WebUI flags the emulator acts on (the rest of the WebUI's flags are accepted and ignored: they tune a real
# GPU, the bootstrap or the UI). Each is one of the WebUI's, with the WebUI's arity.
HONOURED: dict[str, dict[str, Any]] = {
    **{
        flag: {"action": "store_true"}
        for flag in ("--api", "--nowebui", "--listen", "--freeze-settings", "--api-log", "--no-hashing")
    },
    "--port": {"type": int, "default": DEFAULT_PORT, "help": "0 picks a free port (see --print-port)"},
    "--server-name": {"help": "address to bind (as A1111); --host takes precedence"},
    "--ckpt": {"type": Path, "help": "the one checkpoint this instance serves (must exist)"},
    "--api-auth": {"help": "user:password[,user2:password2], HTTP Basic on every API route"},
    **{
        flag: {"type": Path}
        for flag in ("--lora-dir", "--embeddings-dir", "--controlnet-dir", "--vae-path", "--ui-settings-file")
    },
    "--loglevel": {"default": None, "help": "log level (DEBUG, INFO, ...)"},
}


@functools.cache
def webui_flags() -> tuple[dict[str, Any], ...]:
    """The pinned WebUI's launch flags, as recorded from its source (package data)."""
    text = resources.files("sd_operator.emulator").joinpath(FLAGS_FILE).read_text(encoding="utf-8")
    return tuple(json.loads(text)["flags"])


def _flag_kwargs(flag: dict[str, Any]) -> dict[str, Any]:
    """add_argument() keywords giving a recorded flag its arity, type, choices and (literal) default."""
    default = flag.get("default")
    kw: dict[str, Any] = {"default": None if isinstance(default, dict) else default}
    arity = flag["arity"]
    if arity == "switch":
        kw["action"] = flag.get("action", "store_true")
        if kw["default"] is None and kw["action"] == "store_true":
            kw["default"] = False
        return kw
    if arity == "append":
        kw["action"] = "append"
    elif arity.startswith("nargs:"):
        kw["nargs"] = arity.split(":", 1)[1]
    kw["type"] = _TYPES.get(flag.get("type", "str"), str)
    if "choices" in flag:
        kw["choices"] = flag["choices"]
    return kw


def controlnet_loads(argv: Sequence[str], prog: str | None = None) -> bool:
    """Whether the WebUI would load the ControlNet extension (and so accept its preload.py flags): as
    modules/launch_utils.py, from a first parse of cmd_args.py's own flags and the settings file."""
    pre = argparse.ArgumentParser(prog=prog, add_help=False)
    for flag in webui_flags():
        if flag["origin"] == WEBUI_ORIGIN:
            pre.add_argument(flag["flag"], **_flag_kwargs(flag))
    known, _ = pre.parse_known_args(list(argv))
    if known.disable_extra_extensions or known.disable_all_extensions:
        return False
    settings: Any = {}
    if known.ui_settings_file:
        try:
            settings = json.loads(Path(known.ui_settings_file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            settings = {}
    if not isinstance(settings, dict):
        return True
    if settings.get("disable_all_extensions", "none") != "none":
        return False
    return CONTROLNET_FOLDER not in (settings.get("disabled_extensions") or [])


def _arguments(p: argparse.ArgumentParser, *, controlnet: bool = True) -> None:
    recorded = {f["flag"]: f for f in webui_flags()}
    w = p.add_argument_group("WebUI flags honoured")
    for flag, kw in HONOURED.items():
        if controlnet or recorded[flag]["origin"] != CONTROLNET_ORIGIN:
            w.add_argument(flag, **kw)
    ignored = p.add_argument_group("WebUI flags accepted and ignored")
    for flag, info in recorded.items():
        if flag in HONOURED or (not controlnet and info["origin"] == CONTROLNET_ORIGIN):
            continue
        ignored.add_argument(flag, **_flag_kwargs(info), help=argparse.SUPPRESS)
    e = p.add_argument_group("emulator flags")
    e.add_argument("--host", help="address to bind (default 127.0.0.1, or 0.0.0.0 with --listen)")
    e.add_argument("--gpu-profile", choices=sorted(PROFILES), help=f"env SD_EMULATOR_GPU_PROFILE; {DEFAULT_PROFILE}")
    e.add_argument("--speed", type=float, help="time multiplier, e.g. 0.001 in tests (env SD_EMULATOR_SPEED; 1)")
    e.add_argument("--load-seconds", type=float, default=0.0, help="simulated model load before ready")
    e.add_argument("--family", choices=[f.value for f in Family], help="default: sdxl if 'xl' in the name")
    e.add_argument("--print-port", action="store_true", help="print EMULATOR_PORT=<n> once listening")


class WebUIArgumentParser(argparse.ArgumentParser):
    """Parses like the WebUI's own parser (modules/shared_cmd_options.py): a flag the pinned WebUI does not
    have ends the program with argparse's `error: unrecognized arguments: ...` and status 2, unless
    IGNORE_CMD_ARGS_ERRORS is set (then they are logged and ignored, as the WebUI's parse_known_args)."""

    controlnet = True

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        if self.controlnet and not controlnet_loads(argv, self.prog):
            without = WebUIArgumentParser(prog=self.prog, description=self.description)
            without.controlnet = False
            _arguments(without, controlnet=False)
            without.set_defaults(**self._defaults)
            return without.parse_known_args(argv, namespace)
        ns, unknown = super().parse_known_args(argv, namespace)
        if unknown and os.environ.get("IGNORE_CMD_ARGS_ERRORS") is None:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        ns.webui_unknown_args = [*getattr(ns, "webui_unknown_args", []), *unknown]
        return ns, []


def build_config(args: argparse.Namespace) -> EmulatorConfig:
    if args.ckpt is None:
        raise EmulatorError("--ckpt is required: the emulator serves exactly one checkpoint")
    profile_name = args.gpu_profile or os.environ.get("SD_EMULATOR_GPU_PROFILE") or DEFAULT_PROFILE
    if profile_name not in PROFILES:
        raise EmulatorError(f"unknown GPU profile {profile_name!r}; known: {', '.join(sorted(PROFILES))}")
    try:
        speed = float(args.speed if args.speed is not None else os.environ.get("SD_EMULATOR_SPEED", "1"))
    except ValueError as e:
        raise EmulatorError(f"SD_EMULATOR_SPEED must be a number: {e}") from e
    if speed < 0 or args.load_seconds < 0:
        raise EmulatorError("--speed and --load-seconds must not be negative")
    if args.vae_path is not None and not args.vae_path.is_file():
        raise EmulatorError(f"VAE not found: {args.vae_path} (--vae-path)")
    checkpoint = Checkpoint.load(args.ckpt, hashing=not args.no_hashing)
    skip = {"func", "webui_unknown_args"}
    flags: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in skip}
    flags["api_auth"] = "***" if args.api_auth else None  # never echo credentials
    flags.update(sd_emulator=True, emulator=f"{EMULATOR_NAME}: AUTOMATIC1111 API emulator, not a real WebUI")
    return EmulatorConfig(
        checkpoint=checkpoint,
        family=Family(args.family) if args.family else guess_family(args.ckpt),
        profile=PROFILES[profile_name],
        speed=speed,
        load_seconds=args.load_seconds,
        lora_dir=args.lora_dir,
        embeddings_dir=args.embeddings_dir,
        controlnet_dir=getattr(args, "controlnet_dir", None),  # absent when the extension would not load
        vae_path=args.vae_path,
        settings_file=args.ui_settings_file,
        freeze_settings=args.freeze_settings,
        api_auth=parse_api_auth(args.api_auth),
        api_log=args.api_log,
        cmd_flags=flags,
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The emulator's command line; exits 2 with argparse's message on a flag the WebUI would refuse."""
    parser = WebUIArgumentParser(prog="sd-operator emulator", description=__doc__)
    _arguments(parser)
    return parser.parse_args(list(argv))


def config_from_argv(argv: Sequence[str]) -> EmulatorConfig:
    """The configuration a command line gives, for running the app in-process (tests)."""
    return build_config(parse_args(argv))


async def serve(config: EmulatorConfig, host: str, port: int, *, print_port: bool = False) -> int:
    from aiohttp import web

    from sd_operator.emulator.app import create_app

    runner = web.AppRunner(create_app(config), access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        log.error("cannot listen on %s:%s: %s", host, port, e)
        await runner.cleanup()
        return 1
    bound = runner.addresses[0][1]
    cfg = config
    log.info(
        "%s (AUTOMATIC1111 API emulator, not a real WebUI) on http://%s:%s: model %s, family %s, profile %s, speed %g",
        EMULATOR_NAME, host, bound, cfg.checkpoint.title, cfg.family.value, cfg.profile.name, cfg.speed,
    )  # fmt: skip
    if print_port:
        print(f"EMULATOR_PORT={bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: finishing requests in progress (up to %.0f s)", SHUTDOWN_SECONDS)
    await runner.cleanup()
    return 0


def command(args: argparse.Namespace) -> int:
    level = (args.loglevel or os.environ.get("SD_WEBUI_LOG_LEVEL") or "INFO").upper()
    fmt = f"%(asctime)s {EMULATOR_NAME} %(levelname)s %(message)s"  # like the WebUI, whatever --log-format says
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    try:
        config = build_config(args)
    except EmulatorError as e:
        print(f"{EMULATOR_NAME}: error: {e}", file=sys.stderr)
        return 2
    unknown = getattr(args, "webui_unknown_args", [])
    if unknown:  # only with IGNORE_CMD_ARGS_ERRORS set, as the WebUI
        log.warning("ignoring unknown flags (IGNORE_CMD_ARGS_ERRORS is set): %s", " ".join(unknown))
    listen_all = "0.0.0.0"  # noqa: S104 - --listen means every interface, as in A1111
    host = args.host or args.server_name or (listen_all if args.listen else "127.0.0.1")
    return asyncio.run(serve(config, host, args.port, print_port=args.print_port))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "emulator",
        help="an AUTOMATIC1111 WebUI API emulator for tests and benchmarks (not a real WebUI)",
        description=__doc__,
    )
    p.__class__ = WebUIArgumentParser
    _arguments(p)
    p.set_defaults(func=command)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sd_operator.emulator.cli --api --nowebui --ckpt model.safetensors ...`"""
    return command(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
