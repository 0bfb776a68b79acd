"""`sd-operator train`: check the dataset, run kohya-ss sd-scripts, report progress and the files it saved.

The trainer pod's main container. The trainer's own output goes to our stdout unchanged (so `kubectl logs`
reads like a plain sd-scripts run); progress parsed from it is written to the LoRAJob's status at a
bounded rate. Exit codes: 0 done; 2 bad input (job file, dataset, base model) before training starts;
1 the trainer exited 0 without writing its final file; otherwise the trainer's own code (128+N for a signal).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import yaml
from pydantic import ValidationError

from sd_operator import API_GROUP, API_VERSION
from sd_operator.api.lorajob import Artifact, LoRAJobSpec
from sd_operator.termination import write_termination_message
from sd_operator.training.args import EffectiveTraining, effective_training, sd_scripts_command, training_script
from sd_operator.training.dataset import LintReport, dataset_toml, lint
from sd_operator.training.progress import Progress, ProgressParser

REPORT_INTERVAL_SECONDS = 10.0
MAX_PROBLEMS_SHOWN = 3
# Files a run writes get mtimes at or after its start; the slack covers coarse filesystem timestamps.
MTIME_SLACK_SECONDS = 2.0
CHUNK = 1024 * 1024


class InputError(Exception):
    """Bad input found before training starts (exit 2)."""


@dataclass(frozen=True)
class Job:
    namespace: str
    name: str
    spec: LoRAJobSpec


def load_job(path: Path) -> Job:
    """The LoRAJob document the controller mounts (JSON, or YAML for people running this by hand)."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"cannot read job file {path}: {e}") from e
    if not isinstance(doc, dict) or doc.get("kind") != "LoRAJob" or not isinstance(doc.get("spec"), dict):
        raise InputError(f"job file {path} is not a LoRAJob (need kind: LoRAJob and a spec)")
    meta = doc.get("metadata") or {}
    try:
        spec = LoRAJobSpec.model_validate(doc["spec"])
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InputError(f"job file {path}: spec.{where}: {first['msg']} ({e.error_count()} problem(s))") from e
    return Job(namespace=str(meta.get("namespace") or "default"), name=str(meta.get("name") or ""), spec=spec)


# --- reporting -------------------------------------------------------------------------------------------


class Reporter(Protocol):
    def report(self, status: dict[str, Any]) -> None:
        """Merge status (progress, artifacts) into the LoRAJob's status."""


class NullReporter:
    def report(self, status: dict[str, Any]) -> None:
        pass


class FileReporter:
    """The status as a JSON file, replaced atomically so a reader never sees half of it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.status: dict[str, Any] = {}

    def report(self, status: dict[str, Any]) -> None:
        self.status.update(status)  # top-level keys replace, like a merge patch of these fields
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.status, f, indent=2, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class KubernetesReporter:
    """A merge patch of the LoRAJob's status subresource (the trainer's Role allows exactly that)."""

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace, self.name = namespace, name

    def report(self, status: dict[str, Any]) -> None:
        from sd_operator import kube

        try:
            kube.patch_status(f"{API_GROUP}/{API_VERSION}", "LoRAJob", self.namespace, self.name, status)
        except Exception as e:  # a status hiccup must never stop hours of training
            _say(f"warning: could not report status to LoRAJob {self.namespace}/{self.name}: {e}")


class BackgroundReporter:
    """Sends reports from a thread, newest merged over older: a slow or hung API server must not stop us
    reading the trainer's output (a full pipe would block its writes, and with them the training)."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self._pending: dict[str, Any] | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="status-reporter", daemon=True)
        self._thread.start()

    def report(self, status: dict[str, Any]) -> None:
        with self._cond:
            self._pending = {**(self._pending or {}), **status}
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Sends what is pending, then stops (gives up waiting after timeout)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                status, self._pending = self._pending, None
            self.reporter.report(status)


class Throttle:
    """Reports progress at most every `interval` seconds, but at once when the epoch changes."""

    def __init__(self, reporter: Reporter, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.reporter, self.interval, self.clock = reporter, interval, clock
        self._last_time: float | None = None
        self._last: dict[str, Any] | None = None

    def offer(self, progress: Progress, *, force: bool = False) -> None:
        fields = progress.to_status()
        if fields == self._last and not force:
            return
        now = self.clock()
        due = self._last_time is None or now - self._last_time >= self.interval
        epoch_changed = self._last is not None and fields.get("epoch") != self._last.get("epoch")
        if force or due or epoch_changed:
            self.reporter.report({"progress": {**fields, "updated": _now()}})
            self._last, self._last_time = fields, now


# --- artifacts ---------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def collect_artifacts(output_dir: Path, name: str, since: float) -> list[dict[str, Any]]:
    """`<name>-00000N.safetensors` per saved epoch (in epoch order), then the final `<name>.safetensors`.

    Only files written since `since` (wall clock): a retried pod on the same volume must not report the
    epochs of the attempt before it.
    """
    epoch_file = re.compile(rf"^{re.escape(name)}-(\d{{6}})\.safetensors$")
    found: list[tuple[int, Path, int | None]] = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if not path.is_file() or path.stat().st_mtime < since - MTIME_SLACK_SECONDS:
                continue
            if m := epoch_file.match(path.name):
                found.append((int(m[1]), path, int(m[1])))
            elif path.name == f"{name}.safetensors":
                found.append((sys.maxsize, path, None))
    artifacts = []
    for _, path, epoch in sorted(found, key=lambda item: item[0]):
        artifact = Artifact(path=str(path), epoch=epoch, sha256=sha256_file(path), size_bytes=path.stat().st_size)
        artifacts.append(artifact.to_api())
    return artifacts


# --- running the trainer -------------------------------------------------------------------------------------


def run_trainer(
    cmd: Sequence[str],
    parser: ProgressParser,
    throttle: Throttle,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Runs cmd, copying its merged output to our stdout while parsing it; returns its exit code
    (128+N when a signal ended it, as a shell would say). SIGTERM and SIGINT are passed on to it."""
    out = getattr(sys.stdout, "buffer", None)
    sys.stdout.flush()
    # Its own session, so a forwarded signal reaches accelerate and the training process it starts.
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True
    )

    received: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        # No printing here: the handler may run in the middle of our own write to stdout.
        received.append(signum)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    ended_line = True
    try:
        # os.read, not readline: tqdm ends its updates with '\r', which readline would hold back for a
        # whole epoch.
        while chunk := os.read(fd, 65536):
            if out is not None:
                out.write(chunk)
                out.flush()
            text = decoder.decode(chunk)
            if out is None:
                sys.stdout.write(text)
                sys.stdout.flush()
            if parser.feed(text):
                throttle.offer(parser.progress)
            ended_line = chunk.endswith(b"\n")
        if not ended_line:  # a bar or a crash mid-line: our own last line must stand on its own line
            sys.stdout.write("\n")
            sys.stdout.flush()
        parser.feed(decoder.decode(b"", final=True))
        parser.flush()
        code = proc.wait()
        if received:
            _say(f"passed signal {signal.Signals(received[0]).name} on to the trainer")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # we are leaving on an exception: do not leave a GPU job behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        proc.stdout.close()
    return 128 - code if code < 0 else code


def train(args: argparse.Namespace) -> int:
    job = load_job(Path(args.job_file))
    spec = job.spec
    dataset_dir = Path(args.dataset_dir).resolve()
    model_path = Path(args.model_path).resolve()
    output_dir = Path(args.output_dir).resolve()
    work_dir = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="sd-train-"))
    if not dataset_dir.is_dir():
        raise InputError(f"dataset directory {dataset_dir} does not exist")
    if not model_path.exists():
        raise InputError(f"base model {model_path} does not exist")
    family = spec.base_model.family

    gpu_memory = args.gpu_memory_gib if args.gpu_memory_gib is not None else spec.gpu.memory_gib
    eff, notes = effective_training(spec.training, family, gpu_memory)
    for note in notes:
        _say(f"note: {note}")

    report, total_steps = _check_dataset(spec, dataset_dir, eff)
    work_dir.mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = work_dir / "dataset.toml"
    config.write_text(
        dataset_toml(
            report.subsets,
            root=dataset_dir,
            resolution=eff.resolution,
            batch_size=eff.batch_size,
            caption_extension=spec.dataset.caption_extension,
            # The trigger word is the first caption token: keep it in front when captions are shuffled.
            keep_tokens=1,
        ),
        encoding="utf-8",
    )
    try:
        script = Path(training_script(family))
        cmd = sd_scripts_command(
            eff,
            family=family,
            pretrained_model=str(model_path),
            dataset_config=str(config),
            output_dir=str(output_dir),
            output_name=spec.output.name,
            caption_extension=spec.dataset.caption_extension,
            extra_args=spec.training.extra_args or (),
        )
    except ValueError as e:
        raise InputError(str(e)) from e

    reporter = _reporter(args, job, work_dir)
    background = BackgroundReporter(reporter)
    throttle = Throttle(background, args.report_interval)
    parser = ProgressParser(total_epochs=eff.epochs, total_steps=total_steps)
    _say(f"starting: {shlex.join(cmd)}")
    started = time.time()
    throttle.offer(parser.progress, force=True)
    # sd-scripts' docs run it from its own directory; do the same (every path we pass is absolute).
    try:
        code = run_trainer(cmd, parser, throttle, cwd=script.parent if script.parent.is_dir() else None)
    finally:
        background.close()

    final = output_dir / f"{spec.output.name}.safetensors"
    final_written = final.is_file() and final.stat().st_mtime >= started - MTIME_SLACK_SECONDS
    if code == 0 and final_written:
        parser.complete()
    artifacts = collect_artifacts(output_dir, spec.output.name, started)
    reporter.report({"progress": {**parser.progress.to_status(), "updated": _now()}, "artifacts": artifacts})

    if code != 0:
        cause = parser.last_error or parser.last_line or "no output"
        return _fail(code, f"training failed with exit code {code}: {cause}")
    if not final_written:
        return _fail(1, f"training exited 0 but did not write its final file {final}")
    _say(f"training done: {len(artifacts)} file(s) in {output_dir}, final {final.name}")
    return 0


def _check_dataset(spec: LoRAJobSpec, dataset_dir: Path, eff: EffectiveTraining) -> tuple[LintReport, int | None]:
    """The same dataset check the controller runs, again here: the data may have changed since.
    Returns the report (its subsets become the TOML) and the expected total steps."""
    try:
        report = lint(
            dataset_dir,
            trigger_word=spec.dataset.trigger_word,
            caption_extension=spec.dataset.caption_extension,
            subsets=spec.dataset.subsets,
            batch_size=eff.batch_size,
            epochs=eff.epochs,
        )
    except ValueError as e:
        raise InputError(f"dataset check failed: {e}") from e
    problems = [_finding(p) for p in report.problems]
    if not report.ok:
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f" (and {len(problems) - MAX_PROBLEMS_SHOWN} more)" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise InputError(f"dataset check failed: {shown}{more}")
    total_steps = report.steps_per_epoch * eff.epochs if report.steps_per_epoch else None
    # The dataset report is for the log, not the status: the controller's own check sets DatasetValid.
    summary = getattr(report, "summary_lines", None)
    if callable(summary):
        for line in summary():
            _say(line)
    else:
        _say(f"dataset ok: {len(report.subsets)} subset(s), {report.steps_per_epoch} steps per epoch")
        for problem in problems:
            _say(f"dataset warning: {problem}")

    return report, total_steps


def _finding(finding: object) -> str:
    """'path: message' for a dataset finding; any other object as its str()."""
    path, message = getattr(finding, "path", None), getattr(finding, "message", None)
    return f"{path}: {message}" if path is not None and message is not None else str(finding)


def _reporter(args: argparse.Namespace, job: Job, work_dir: Path) -> Reporter:
    if args.report == "kubernetes":
        if not job.name:
            raise InputError("--report kubernetes needs metadata.name (and namespace) in the job file")
        return KubernetesReporter(job.namespace, job.name)
    if args.report == "file":
        return FileReporter(Path(args.report_file) if args.report_file else work_dir / "status.json")
    return NullReporter()


def _fail(code: int, message: str) -> int:
    """One clear last line, on stdout and in the termination log (what `kubectl describe` and the
    controller show)."""
    _say(message)
    write_termination_message(message)
    return code


def _say(message: str) -> None:
    print(message, flush=True)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def command(args: argparse.Namespace) -> int:
    try:
        return train(args)
    except InputError as e:
        return _fail(2, str(e))


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job-file", required=True, help="the LoRAJob as JSON or YAML (apiVersion, kind, metadata, spec)")
    p.add_argument("--dataset-dir", required=True, help="the dataset root (images and captions)")
    p.add_argument("--model-path", required=True, help="the base checkpoint file")
    p.add_argument("--output-dir", required=True, help="where sd-scripts writes the LoRA files")
    p.add_argument("--work-dir", help="for dataset.toml and the status file; default: a new temporary directory")
    p.add_argument("--report", choices=["kubernetes", "file", "none"], default="none", help="where progress goes")
    p.add_argument("--report-file", help="with --report file: the JSON file (default WORK_DIR/status.json)")
    p.add_argument("--gpu-memory-gib", type=int, help="GPU memory; overrides spec.gpu.memoryGiB for the defaults")
    p.add_argument(
        "--report-interval", type=float, default=REPORT_INTERVAL_SECONDS, help="seconds between progress reports"
    )
    p.set_defaults(func=command)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="check the dataset and train a LoRA with sd-scripts (the trainer pod)")
    _arguments(p)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sd_operator.training.train --job-file J --dataset-dir D --model-path M --output-dir O`."""
    parser = argparse.ArgumentParser(prog="sd-operator train", description=__doc__)
    _arguments(parser)
    return command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
