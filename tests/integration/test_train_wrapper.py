"""`sd-operator train` end to end, as a real process, against a stand-in sd-scripts.

GPU training cannot run here (no GPU, no torch), so SD_SCRIPTS_DIR points at tests/fixtures/fake_sd_scripts:
scripts with sd-scripts' names and flag names (unknown flags fail), which read the dataset TOML the wrapper
wrote, print sd-scripts-shaped output and write real safetensors files under sd-scripts' file names.
SD_TRAIN_LAUNCHER replaces `accelerate launch` with this Python. Everything else is real: the job file, the
dataset tree (Pillow images and captions), the dataset check, the subprocess, the status file, sha256s.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
FAKE_SD_SCRIPTS = ROOT / "tests" / "fixtures" / "fake_sd_scripts"
IMAGES = 3
REPEATS = 10
EPOCHS = 10


def make_dataset(root: Path, *, bad_caption: str | None = None) -> Path:
    """`10_mystyle/` with three real PNGs and captions that start with the trigger word."""
    folder = root / f"{REPEATS}_mystyle"
    folder.mkdir(parents=True)
    for i in range(IMAGES):
        Image.new("RGB", (128, 128), (40 * i, 90, 200)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"mystyle, a square in colour {i}\n", encoding="utf-8")
    if bad_caption is not None:
        (folder / bad_caption).write_text("a square without the trigger word\n", encoding="utf-8")
    return root


def job_doc(family: str = "sd15", **training: Any) -> dict[str, Any]:
    return {
        "apiVersion": "sd-operator.dev/v1alpha1",
        "kind": "LoRAJob",
        "metadata": {"name": "mystyle", "namespace": "ns1", "uid": "0000-1111"},
        "spec": {
            "baseModel": {
                "family": family,
                "checkpoint": {"name": "base.safetensors", "source": {"http": {"url": "https://example.com/b"}}},
            },
            "dataset": {"source": {"pvc": {"claimName": "datasets"}}, "triggerWord": "mystyle"},
            "training": {"epochs": EPOCHS, "saveEveryNEpochs": 2, **training},
            "output": {"name": "mystyle", "destination": {"pvc": {"claimName": "loras"}}},
        },
    }


class Run:
    def __init__(self, tmp: Path, doc: dict[str, Any], dataset: Path) -> None:
        self.tmp = tmp
        self.job = tmp / "job.json"
        self.job.write_text(json.dumps(doc), encoding="utf-8")
        self.model = tmp / "models" / "base.safetensors"
        self.model.parent.mkdir(parents=True, exist_ok=True)
        save_file({"w": np.ones((2, 2), dtype=np.float32)}, str(self.model))
        self.dataset = dataset
        self.output = tmp / "output"
        self.work = tmp / "work"
        self.status_file = tmp / "status.json"
        self.termination_log = tmp / "termination-log"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "sd_operator.training.train",
            "--job-file", str(self.job),
            "--dataset-dir", str(self.dataset),
            "--model-path", str(self.model),
            "--output-dir", str(self.output),
            "--work-dir", str(self.work),
            "--report", "file",
            "--report-file", str(self.status_file),
        ]  # fmt: skip

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "SD_SCRIPTS_DIR": str(FAKE_SD_SCRIPTS),
            "SD_TRAIN_LAUNCHER": sys.executable,
            "SD_TERMINATION_LOG": str(self.termination_log),
            "FAKE_STEP_SECONDS": "0.001",
            **extra,
        }

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        # Bytes, decoded by hand: text mode would turn tqdm's '\r' into '\n'.
        cmd = [*self.command(), *args]
        done = subprocess.run(cmd, check=False, env=self.env(**env), capture_output=True, timeout=120)
        out, err = done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")
        return subprocess.CompletedProcess(done.args, done.returncode, out, err)

    def status(self) -> dict[str, Any]:
        return json.loads(self.status_file.read_text(encoding="utf-8"))


def last_line(out: str) -> str:
    return [line for line in out.splitlines() if line.strip()][-1]


def test_training_reports_progress_and_every_saved_file(tmp_path: Path) -> None:
    run = Run(tmp_path, job_doc(), make_dataset(tmp_path / "dataset"))
    result = run.run()
    assert result.returncode == 0, result.stdout + result.stderr

    # The trainer's own output reaches our stdout (what `kubectl logs` shows), tqdm's '\r' updates included.
    assert "running training / 学習開始" in result.stdout
    assert "epoch 10/10" in result.stdout
    assert "\rsteps:" in result.stdout
    toml = (run.work / "dataset.toml").read_text(encoding="utf-8")
    assert 'caption_extension = ".txt"' in toml

    steps = IMAGES * REPEATS * EPOCHS
    status = run.status()
    progress = status["progress"]
    assert progress["percent"] == 100
    assert progress["step"] == progress["totalSteps"] == steps
    assert progress["epoch"] == progress["totalEpochs"] == EPOCHS
    assert progress["etaSeconds"] == 0
    assert 0 < progress["loss"] < 1
    assert progress["updated"].endswith("Z")

    # sd-scripts saves every 2nd epoch but never the last one as a numbered file: the final file is epoch 10.
    artifacts = status["artifacts"]
    assert [a.get("epoch") for a in artifacts] == [2, 4, 6, 8, None]
    assert [Path(a["path"]).name for a in artifacts] == [
        "mystyle-000002.safetensors",
        "mystyle-000004.safetensors",
        "mystyle-000006.safetensors",
        "mystyle-000008.safetensors",
        "mystyle.safetensors",
    ]
    for artifact in artifacts:
        path = Path(artifact["path"])
        assert path.parent == run.output
        assert artifact["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert artifact["sizeBytes"] == path.stat().st_size
        assert load_file(str(path))  # a real safetensors file
    assert not run.termination_log.exists()


def test_sdxl_runs_the_sdxl_script_with_memory_aware_defaults(tmp_path: Path) -> None:
    run = Run(tmp_path, job_doc("sdxl", saveEveryNEpochs=5), make_dataset(tmp_path / "dataset"))
    result = run.run("--gpu-memory-gib", "12")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sdxl_train_network.py (stand-in)" in result.stdout
    assert "note: SDXL on a 12 GiB GPU" in result.stdout
    assert "resolution = 768" in (run.work / "dataset.toml").read_text(encoding="utf-8")
    assert [a.get("epoch") for a in run.status()["artifacts"]] == [5, None]


def test_a_failing_trainer_exits_with_its_code_and_one_clear_line(tmp_path: Path) -> None:
    run = Run(tmp_path, job_doc(), make_dataset(tmp_path / "dataset"))
    result = run.run(FAKE_FAIL_AT_EPOCH="3")
    assert result.returncode == 1
    line = last_line(result.stdout)
    assert line.startswith("training failed with exit code 1: torch.OutOfMemoryError: CUDA out of memory.")
    assert run.termination_log.read_text(encoding="utf-8").strip() == line
    # What was saved before the failure is still reported (epoch 2), with progress stopped in epoch 3.
    status = run.status()
    assert [a["epoch"] for a in status["artifacts"]] == [2]
    assert status["progress"]["epoch"] == 3
    assert status["progress"]["percent"] == 20


def test_a_missing_final_file_after_exit_0_is_a_failure(tmp_path: Path) -> None:
    run = Run(tmp_path, job_doc(), make_dataset(tmp_path / "dataset"))
    result = run.run(FAKE_SKIP_FINAL_SAVE="1")
    assert result.returncode == 1
    assert last_line(result.stdout) == (
        f"training exited 0 but did not write its final file {run.output / 'mystyle.safetensors'}"
    )


def test_a_caption_without_the_trigger_word_stops_before_training(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "dataset", bad_caption="img1.txt")
    run = Run(tmp_path, job_doc(), dataset)
    result = run.run()
    assert result.returncode == 2, result.stdout + result.stderr
    line = last_line(result.stdout)
    assert line.startswith("dataset check failed:")
    assert "img1.txt" in line
    assert "running training" not in result.stdout  # the trainer never started
    assert not run.output.exists() or not any(run.output.iterdir())
    assert run.termination_log.read_text(encoding="utf-8").strip() == line


def test_sigterm_is_passed_on_to_the_trainer(tmp_path: Path) -> None:
    run = Run(tmp_path, job_doc(), make_dataset(tmp_path / "dataset"))
    log = tmp_path / "wrapper.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(run.command(), env=run.env(FAKE_STEP_SECONDS="0.05"), stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while "epoch 1/10" not in log.read_text(encoding="utf-8", errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(encoding="utf-8", errors="replace")
    assert code == 128 + signal.SIGTERM, text
    assert last_line(text).startswith(f"training failed with exit code {128 + signal.SIGTERM}")


@pytest.mark.parametrize("flag", ["--no_such_flag=1"])
def test_an_unknown_trainer_flag_fails_the_run(tmp_path: Path, flag: str) -> None:
    """The stand-in refuses unknown flags like sd-scripts does, so the other tests prove our names are real."""
    run = Run(tmp_path, job_doc(extraArgs=[flag]), make_dataset(tmp_path / "dataset"))
    result = run.run()
    assert result.returncode == 2
    assert "unrecognized arguments: --no_such_flag=1" in last_line(result.stdout)


def test_add_parser_registers_the_train_subcommand() -> None:
    import argparse

    from sd_operator.training import train

    parser = argparse.ArgumentParser(prog="sd-operator")
    train.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["train", "--job-file", "j", "--dataset-dir", "d", "--model-path", "m", "--output-dir", "o"]
    )
    assert args.func is train.command
    assert (args.report, args.work_dir, args.gpu_memory_gib) == ("none", None, None)
