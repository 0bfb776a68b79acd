"""`sd-operator emulator`: an AUTOMATIC1111 WebUI API emulator for tests, local runs and benchmarks.

Takes the WebUI command line the operator renders (`--api --nowebui --listen --port N --ckpt PATH
...`), so a pod can run it in place of the real WebUI; flags it does not know are logged and ignored.
Emulator-only flags: --host, --gpu-profile, --speed, --load-seconds, --family, --print-port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sd_operator.emulator import EMULATOR_NAME
from sd_operator.emulator.config import Checkpoint, EmulatorConfig, EmulatorError, guess_family, parse_api_auth
from sd_operator.emulator.profiles import DEFAULT_PROFILE, PROFILES, Family

log = logging.getLogger("sd_operator.emulator")
DEFAULT_PORT = 7861  # A1111's port with --nowebui
SHUTDOWN_SECONDS = 90.0  # on SIGTERM, let the generation in progress finish (the pod allows 120 s)
# WebUI flags accepted and ignored: they tune a real GPU, the bootstrap or the UI.
IGNORED_SWITCHES = (
    "--no-download-sd-model",
    "--skip-prepare-environment",
    "--skip-install",
    "--skip-version-check",
    "--skip-python-version-check",
    "--skip-torch-cuda-test",
    "--xformers",
    "--opt-sdp-attention",
    "--opt-sdp-no-mem-attention",
    "--opt-split-attention",
    "--opt-sub-quad-attention",
    "--medvram",
    "--lowvram",
    "--lowram",
    "--medvram-sdxl",
    "--no-half",
    "--no-half-vae",
    "--upcast-sampling",
    "--disable-safe-unpickle",
    "--reinstall-xformers",
    "--reinstall-torch",
    "--no-gradio-queue",
    "--disable-all-extensions",
    "--disable-extra-extensions",
    "--enable-insecure-extension-access",
    "--log-startup",
    "--api-server-stop",
    "--skip-load-model-at-start",
    "--ui-debug-mode",
    "--no-half-controlnet",
    "-f",
)
IGNORED_VALUES = (
    "--subpath",
    "--tls-keyfile",
    "--tls-certfile",
    "--cors-allow-origins",
    "--cors-allow-origins-regex",
    "--timeout-keep-alive",
    "--ckpt-dir",
    "--vae-dir",
    "--hypernetwork-dir",
    "--data-dir",
    "--models-dir",
    "--precision",
    "--device-id",
    "--controlnet-annotator-models-path",
    "--controlnet-preprocessor-cache-size",
    "--controlnet-loglevel",
)


def _arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("WebUI flags honoured")
    for flag in ("--api", "--nowebui", "--listen", "--freeze-settings", "--api-log", "--no-hashing"):
        w.add_argument(flag, action="store_true")
    w.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (see --print-port)")
    w.add_argument("--server-name", help="address to bind (as A1111); --host takes precedence")
    w.add_argument("--ckpt", type=Path, help="the one checkpoint this instance serves (must exist)")
    w.add_argument("--api-auth", help="user:password[,user2:password2], HTTP Basic on every API route")
    for flag in ("--lora-dir", "--embeddings-dir", "--controlnet-dir", "--vae-path", "--ui-settings-file"):
        w.add_argument(flag, type=Path)
    w.add_argument("--loglevel", default=None, help="log level (DEBUG, INFO, ...)")
    ignored = p.add_argument_group("WebUI flags accepted and ignored")
    for flag in IGNORED_SWITCHES:
        ignored.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in IGNORED_VALUES:
        ignored.add_argument(flag, help=argparse.SUPPRESS)
    e = p.add_argument_group("emulator flags")
    e.add_argument("--host", help="address to bind (default 127.0.0.1, or 0.0.0.0 with --listen)")
    e.add_argument("--gpu-profile", choices=sorted(PROFILES), help=f"env SD_EMULATOR_GPU_PROFILE; {DEFAULT_PROFILE}")
    e.add_argument("--speed", type=float, help="time multiplier, e.g. 0.001 in tests (env SD_EMULATOR_SPEED; 1)")
    e.add_argument("--load-seconds", type=float, default=0.0, help="simulated model load before ready")
    e.add_argument("--family", choices=[f.value for f in Family], help="default: sdxl if 'xl' in the name")
    e.add_argument("--print-port", action="store_true", help="print EMULATOR_PORT=<n> once listening")


class _KeepUnknown(argparse.ArgumentParser):
    """A subcommand parser that keeps unknown flags instead of letting the top-level parser reject them:
    the operator passes the user's `webui.extraArgs` through, and the emulator must still start."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, unknown = super().parse_known_args(args, namespace)
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
    flags: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
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
        controlnet_dir=args.controlnet_dir,
        vae_path=args.vae_path,
        settings_file=args.ui_settings_file,
        freeze_settings=args.freeze_settings,
        api_auth=parse_api_auth(args.api_auth),
        api_log=args.api_log,
        cmd_flags=flags,
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sd-operator emulator", description=__doc__, allow_abbrev=False)
    _arguments(parser)
    args, unknown = parser.parse_known_args(argv)
    args.webui_unknown_args = unknown
    return args


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
    if unknown:
        log.info("ignoring WebUI flags the emulator does not know: %s", " ".join(unknown))
    listen_all = "0.0.0.0"  # noqa: S104 - --listen means every interface, as in A1111
    host = args.host or args.server_name or (listen_all if args.listen else "127.0.0.1")
    return asyncio.run(serve(config, host, args.port, print_port=args.print_port))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "emulator",
        help="an AUTOMATIC1111 WebUI API emulator for tests and benchmarks (not a real WebUI)",
        description=__doc__,
        allow_abbrev=False,
    )
    p.__class__ = _KeepUnknown
    _arguments(p)
    p.set_defaults(func=command)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sd_operator.emulator.cli --api --nowebui --ckpt model.safetensors ...`"""
    return command(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
