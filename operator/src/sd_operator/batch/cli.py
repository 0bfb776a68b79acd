"""`sd-operator batch` (also `python -m sd_operator.batch.cli`): the command a GenerationBatch's Job runs.

Exit codes: 0 every item succeeded (also those done by an earlier run); 3 finished, but some items failed
for good (the controller fails the batch without another pod); 1 unusable input or a crash (one line on
stderr and in the termination log); 128+signal when stopped by SIGTERM/SIGINT (resume covers the rest).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sd_operator import API_GROUP, API_VERSION, logs
from sd_operator.api.generationbatch import GenerationBatchSpec
from sd_operator.batch.items import ItemsError, ItemSource
from sd_operator.batch.output import LocalStore, S3Store, Store
from sd_operator.batch.report import FileReporter, KubeReporter, NoReporter, Reporter
from sd_operator.batch.runner import EXIT_CRASH, EXIT_SOME_FAILED, BatchError, Runner, Settings
from sd_operator.termination import write_termination_message

log = logging.getLogger("sd_operator.batch")
THREADS = 32  # image encoding and file or S3 writes run in threads, off the event loop


def load_batch_file(path: Path) -> tuple[dict[str, Any], GenerationBatchSpec, str]:
    """(metadata, spec, apiVersion) of the batch document the controller mounts (JSON, or YAML)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise BatchError(f"cannot read the batch file {path}: {e.strerror or e}") from None
    try:
        doc = json.loads(text)
    except ValueError:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise BatchError(f"{path}: neither JSON nor YAML: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
        raise BatchError(f"{path}: expected a GenerationBatch with a spec")
    meta = doc.get("metadata") or {}
    if not meta.get("name"):
        raise BatchError(f"{path}: metadata.name is required")
    try:
        spec = GenerationBatchSpec.model_validate(doc["spec"])
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise BatchError(f"{path}: invalid spec: {problems}") from None
    return meta, spec, str(doc.get("apiVersion") or f"{API_GROUP}/{API_VERSION}")


def make_store(spec: GenerationBatchSpec, output_dir: str | None) -> Store:
    if spec.output.s3 is not None:
        s3 = spec.output.s3
        return S3Store(s3.bucket, s3.key, endpoint=s3.endpoint, region=s3.region, pool=THREADS)
    if output_dir:
        return LocalStore(Path(output_dir))
    raise BatchError("spec.output.pvc needs --output-dir (where the claim's path is mounted)")


def make_reporter(args: argparse.Namespace, meta: dict[str, Any], api_version: str) -> Reporter:
    if args.report == "kubernetes":
        return KubeReporter(api_version, meta.get("namespace") or "default", meta["name"])
    if args.report == "file":
        if not args.report_file:
            raise BatchError("--report file needs --report-file")
        return FileReporter(Path(args.report_file))
    return NoReporter()


def build(args: argparse.Namespace) -> Runner:
    meta, spec, api_version = load_batch_file(Path(args.batch_file))
    namespace = meta.get("namespace") or "default"
    model = args.model or spec.target.model
    if not model:
        raise BatchError(f"spec.target.instance {spec.target.instance!r}: pass --model (the instance's model)")
    gateway_url = args.gateway_url or spec.gateway_url
    if not gateway_url:
        raise BatchError("give --gateway-url (or spec.gatewayUrl)")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise BatchError(f"--api-key-env {args.api_key_env}: the variable is not set")
    # Without a uid (a hand-written batch file) the seeds derive from namespace/name: still stable across runs.
    uid = str(meta.get("uid") or f"{namespace}/{meta['name']}")
    try:
        source = ItemSource(spec, uid, Path(args.items_file) if args.items_file else None)
    except ItemsError as e:
        raise BatchError(str(e)) from None
    settings = Settings(
        name=f"{namespace}/{meta['name']}",
        batch=meta["name"],
        namespace=namespace,
        spec=spec,
        gateway_url=gateway_url,
        model=model,
        api_key=api_key,
        concurrency=args.concurrency,
        inputs_dir=Path(args.inputs_dir) if args.inputs_dir else None,
        model_wait_seconds=args.model_wait,
        final_publish_seconds=args.final_publish_timeout,
    )
    return Runner(settings, source, make_store(spec, args.output_dir), make_reporter(args, meta, api_version))


def termination_log(line: str) -> None:
    write_termination_message(line)


def _fail(message: str) -> int:
    line = f"sd-operator batch: {message}"
    print(line, file=sys.stderr, flush=True)
    termination_log(line)
    return EXIT_CRASH


async def _run(runner: Runner) -> int:
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(THREADS, thread_name_prefix="batch-io"))
    return await runner.main()


def command(args: argparse.Namespace) -> int:
    logs.setup(logs.format_of(args))  # also when run as `python -m sd_operator.batch.cli`
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Its "Retrying (...) after connection broken" warnings, three per failed status patch while the API
    # server is away: the runner says so itself, once (report.Publisher).
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    try:
        runner = build(args)
        code = asyncio.run(_run(runner))
    except BatchError as e:
        return _fail(str(e))
    except Exception as e:
        log.exception("sd-operator batch crashed")
        return _fail(f"crashed: {e.__class__.__name__}: {e}")
    if code == EXIT_SOME_FAILED:
        first = min(runner.c.failures, key=lambda f: f["index"], default={"index": "?", "reason": "?"})
        termination_log(
            f"{runner.c.failed} of {runner.c.total} items failed; first: item {first['index']}: {first['reason']}"
        )
    return code


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-file", required=True, help="the GenerationBatch (JSON or YAML: metadata and spec)")
    p.add_argument("--gateway-url", help="services layer URL (default: spec.gatewayUrl)")
    p.add_argument("--model", help="model name for the X-SD-Model header; required with spec.target.instance")
    p.add_argument("--items-file", help="JSON Lines items (where spec.items.configMap or .file is mounted)")
    p.add_argument("--output-dir", help="output folder (where spec.output.pvc is mounted)")
    p.add_argument("--inputs-dir", help="folder that control images given as file names are relative to")
    p.add_argument("--report", choices=["kubernetes", "file", "none"], default="none", help="where progress goes")
    p.add_argument("--report-file", help="status JSON file for --report file")
    p.add_argument("--api-key-env", metavar="NAME", help="environment variable holding the services layer API key")
    p.add_argument(
        "--model-wait",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for the target model to be served (its instance may still be starting)",
    )
    p.add_argument(
        "--final-publish-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long the last progress is retried while the API server is away (then the run ends with the "
        "work's exit code; the output holds every finished item)",
    )
    p.add_argument(
        "--concurrency",
        type=_positive,
        help="requests in flight (default: spec.concurrency, else the model's instances)",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="render a GenerationBatch through the services layer (the batch Job)")
    add_arguments(p)
    p.set_defaults(func=command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sd-operator batch", description=__doc__)
    add_arguments(parser)
    return command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
