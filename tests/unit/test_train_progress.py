"""ProgressParser on output shaped like a real sd-scripts run.

The samples are not captured from a GPU run (none can run here): they are built from kohya-ss/sd-scripts
`train_network.py`'s print and log statements and tqdm's default meter format
(`{desc}: {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}, {rate_fmt}{postfix}]`), with the
rich log prefix sd-scripts' `setup_logging` adds to `logger.info` lines.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sd_operator.training.progress import ProgressParser
from sd_operator.training.train import BackgroundReporter, FileReporter, KubernetesReporter, Throttle

HEADER = """\
2025-03-01 10:00:01 INFO     Loading dataset config from /tmp/sd-train/dataset.toml              train_network.py:379
                    INFO     [Dataset 0]                                                          config_util.py:575
                             batch_size: 2
                             resolution: (1024, 1024)
caching latents.
100%|██████████| 150/150 [00:41<00:00,  3.62it/s]
running training / 学習開始
  num train images * repeats / 学習画像の数×繰り返し回数: 1500
  num validation images * repeats / 学習画像の数×繰り返し回数: 0
  num reg images / 正則化画像の数: 0
  num batches per epoch / 1epochのバッチ数: 750
  num epochs / epoch数: 10
  batch size per device / バッチサイズ: 2
  gradient accumulation steps / 勾配を合計するステップ数 = 1
  total optimization steps / 学習ステップ数: 7500
steps:   0%|          | 0/7500 [00:00<?, ?it/s]
epoch 1/10
"""  # noqa: RUF001 - sd-scripts prints a multiplication sign there


def bar(n: int, pct: int, elapsed: str, remaining: str, rate: str, loss: str) -> str:
    return f"steps: {pct:3d}%|████▏     | {n}/7500 [{elapsed}<{remaining}, {rate}, avr_loss={loss}]"


def test_header_sets_totals_and_start() -> None:
    parser = ProgressParser()
    parser.feed(HEADER)
    p = parser.progress
    assert p.started
    assert (p.train_images, p.batches_per_epoch, p.total_epochs, p.total_steps) == (1500, 750, 10, 7500)
    assert (p.epoch, p.step) == (1, 0)
    assert p.percent == 0
    assert p.eta_seconds is None  # tqdm prints '?' before it has a rate
    assert p.loss is None


def test_tqdm_updates_separated_by_carriage_returns() -> None:
    parser = ProgressParser()
    parser.feed(HEADER)
    stream = "".join(
        "\r" + bar(n, n * 100 // 7500, "05:12", "07:10", "2.69it/s", loss)
        for n, loss in [(838, "0.0915"), (839, "0.0913"), (3150, "0.0912")]
    )
    assert parser.feed(stream) is True  # the first two complete; the last waits for its '\r'
    assert parser.progress.step == 839
    parser.feed("\r")
    p = parser.progress
    assert p.step == 3150
    assert p.percent == 42
    assert p.eta_seconds == 7 * 60 + 10
    assert p.it_per_second == pytest.approx(2.69)
    assert p.loss == pytest.approx(0.0912)


def test_chunks_split_anywhere_give_the_same_result() -> None:
    text = HEADER + "\r" + bar(840, 11, "05:12", "1:02:03", "2.69it/s", "0.0912") + "\r"
    whole, bytewise = ProgressParser(), ProgressParser()
    whole.feed(text)
    for ch in text:
        bytewise.feed(ch)
    assert whole.progress == bytewise.progress
    assert whole.progress.eta_seconds == 3723


def test_slow_steps_in_seconds_per_iteration() -> None:
    parser = ProgressParser(total_steps=7500)
    parser.feed_line("steps:   1%|          | 50/7500 [02:05<5:10:25,  2.50s/it, avr_loss=0.121]")
    p = parser.progress
    assert p.it_per_second == pytest.approx(0.4)
    assert p.eta_seconds == 5 * 3600 + 10 * 60 + 25
    assert p.percent == 0


def test_eta_is_computed_from_the_rate_when_tqdm_prints_none() -> None:
    parser = ProgressParser()
    parser.feed_line("steps:  50%|█████     | 100/200 [00:50<?, 2.00it/s, avr_loss=0.1]")
    assert parser.progress.eta_seconds == 50


def test_percent_is_floored_like_progress_and_capped() -> None:
    parser = ProgressParser()
    parser.feed_line("steps: 100%|█████████▉| 1999/2000 [10:00<00:00,  3.33it/s, avr_loss=0.08]")
    assert parser.progress.percent == 99  # not done until every step ran, whatever tqdm rounds to
    parser.feed_line("steps: 100%|██████████| 2000/2000 [10:00<00:00,  3.33it/s, avr_loss=0.08]")
    assert parser.progress.percent == 100


def test_epochs_saves_removals_and_the_end() -> None:
    parser = ProgressParser()
    parser.feed(
        HEADER
        + "\nsaving checkpoint: /out/mystyle-000002.safetensors\n"
        + "\nepoch 3/10\n\n"
        + "\nsaving checkpoint: /out/mystyle-000004.safetensors\n"
        + "removing old checkpoint: /out/mystyle-000002.safetensors\n"
        + "\nepoch 10/10\n\n"
        + "\nsaving checkpoint: /out/my style.safetensors\n"
        + "2025-03-01 12:00:00 INFO     model saved.                                      train_network.py:1259\n"
    )
    p = parser.progress
    assert (p.epoch, p.total_epochs) == (10, 10)
    assert p.saved == ["/out/mystyle-000004.safetensors", "/out/my style.safetensors"]
    assert p.finished


def test_validation_bar_is_not_training_progress() -> None:
    parser = ProgressParser()
    parser.feed_line("steps:  10%|█         | 750/7500 [04:40<42:00,  2.68it/s, avr_loss=0.1]")
    parser.feed_line("validation steps:  50%|█████     | 8/16 [00:03<00:03,  2.41it/s, val_epoch_avg_loss=0.13]")
    assert parser.progress.step == 750
    assert parser.progress.total_steps == 7500


def test_a_print_landing_inside_a_bar_segment_is_still_read() -> None:
    parser = ProgressParser()
    parser.feed_line("steps:  10%|█         | 750/7500 [04:40<42:00,  2.68it/s, avr_loss=0.1]epoch 2/10")
    assert (parser.progress.step, parser.progress.epoch) == (750, 2)


def test_nan_loss_keeps_the_last_finite_value() -> None:
    parser = ProgressParser()
    parser.feed_line("steps:  10%|█         | 750/7500 [04:40<42:00,  2.68it/s, avr_loss=0.1]")
    parser.feed_line("steps:  10%|█         | 751/7500 [04:40<42:00,  2.68it/s, avr_loss=nan]")
    assert parser.progress.loss == 0.1
    assert parser.progress.step == 751


def test_garbage_is_ignored() -> None:
    parser = ProgressParser(total_epochs=10, total_steps=100)
    changed = parser.feed(
        "\x1b[1m\x1b[0m\n"
        "steps: lots of them\n"
        "epoch: n/a\n"
        "100%|██████████| 3/3 [00:00<00:00, 12.10it/s]\n"
        "num epochs / epoch数: many\n"
        "\ufffd\ufffd\n"
        "steps:  x%|?| a/b [..]\n"
    )
    assert changed is False
    p = parser.progress
    assert (p.epoch, p.step, p.total_epochs, p.total_steps, p.loss) == (None, None, 10, 100, None)
    assert p.to_status() == {"totalEpochs": 10, "totalSteps": 100}


def test_to_status_uses_the_api_field_names() -> None:
    parser = ProgressParser()
    parser.feed(HEADER + "\r" + bar(3750, 50, "23:00", "23:00", "2.72it/s", "0.0875") + "\r")
    assert parser.progress.to_status() == {
        "epoch": 1,
        "totalEpochs": 10,
        "step": 3750,
        "totalSteps": 7500,
        "loss": 0.0875,
        "percent": 50,
        "etaSeconds": 1380,
    }


def test_complete_marks_every_step_done() -> None:
    parser = ProgressParser(total_epochs=10, total_steps=300)
    parser.feed_line("steps:  99%|█████████▉| 299/300 [00:10<00:00, 29.90it/s, avr_loss=0.05]")
    parser.complete()
    assert parser.progress.to_status() == {
        "epoch": 10,
        "totalEpochs": 10,
        "step": 300,
        "totalSteps": 300,
        "loss": 0.05,
        "percent": 100,
        "etaSeconds": 0,
    }


def test_last_error_prefers_the_trainers_error_over_accelerates() -> None:
    parser = ProgressParser()
    parser.feed(
        "epoch 3/10\n"
        "Traceback (most recent call last):\n"
        '  File "/opt/sd-scripts/train_network.py", line 1531, in <module>\n'
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB.\n"
        "Traceback (most recent call last):\n"
        '  File "/usr/local/bin/accelerate", line 8, in <module>\n'
        "subprocess.CalledProcessError: Command '['/usr/bin/python', 'train_network.py']' returned non-zero "
        "exit status 1.\n"
    )
    assert parser.last_error == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB."
    assert parser.last_line is not None and parser.last_line.startswith("subprocess.CalledProcessError")


def test_argparse_errors_and_unterminated_output_are_caught_by_flush() -> None:
    parser = ProgressParser()
    parser.feed("usage: train_network.py [-h]\ntrain_network.py: error: unrecognized arguments: --nope=1")
    assert parser.last_error is None  # no line end yet
    parser.flush()
    assert parser.last_error == "train_network.py: error: unrecognized arguments: --nope=1"


def test_an_invalid_dataset_config_reports_the_key_sd_scripts_names() -> None:
    """sd-scripts logs a generic line, then voluptuous' exception naming the offending key (the stand-in prints
    the same, from tests/fixtures/real/sd-scripts/dataset_config_schema.json)."""
    parser = ProgressParser()
    parser.feed(
        "ERROR Invalid user config / ユーザ設定の形式が正しくないようです      config_util.py:378\n"
        "Traceback (most recent call last):\n"
        "voluptuous.error.MultipleInvalid: extra keys not allowed @ data['datasets'][0]['flip']\n"
    )
    assert parser.last_error == "voluptuous.error.MultipleInvalid: extra keys not allowed @ data['datasets'][0]['flip']"


# --- the wrapper's reporting rate (sd_operator.training.train.Throttle) ------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def report(self, status: dict[str, Any]) -> None:
        self.reports.append(status)


def test_reports_are_bounded_in_rate_but_epoch_changes_go_out_at_once() -> None:
    now = [0.0]
    recorder = Recorder()
    throttle = Throttle(recorder, 10.0, clock=lambda: now[0])
    parser = ProgressParser(total_epochs=10, total_steps=7500)
    parser.feed("epoch 1/10\n")
    throttle.offer(parser.progress)  # the first report goes out at once
    for n in range(1, 200):  # many bar updates within a few seconds: no report
        now[0] += 0.02
        parser.feed_line(f"steps:   0%|          | {n}/7500 [00:0{n // 100}<?, ?it/s, avr_loss=0.1]")
        throttle.offer(parser.progress)
    assert len(recorder.reports) == 1
    now[0] += 0.1
    parser.feed("epoch 2/10\n")
    throttle.offer(parser.progress)
    assert recorder.reports[-1]["progress"]["epoch"] == 2
    now[0] += 10.5
    parser.feed_line("steps:  10%|█         | 750/7500 [04:40<42:00,  2.68it/s, avr_loss=0.1]")
    throttle.offer(parser.progress)
    throttle.offer(parser.progress)  # unchanged: nothing new to say
    assert [r["progress"].get("step") for r in recorder.reports] == [None, 199, 750]
    assert all(r["progress"]["updated"].endswith("Z") for r in recorder.reports)


def test_file_reporter_merges_top_level_fields_atomically(tmp_path: Path) -> None:
    path = tmp_path / "status" / "status.json"
    reporter = FileReporter(path)
    reporter.report({"progress": {"percent": 10}})
    reporter.report({"artifacts": [{"path": "/out/a.safetensors"}]})
    reporter.report({"progress": {"percent": 20}})
    assert json.loads(path.read_text()) == {"progress": {"percent": 20}, "artifacts": [{"path": "/out/a.safetensors"}]}
    assert [p.name for p in path.parent.iterdir()] == ["status.json"]  # no temporary files left behind


def test_kubernetes_reporter_patches_the_lorajob_status_and_survives_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sd_operator import kube

    calls: list[tuple[Any, ...]] = []

    def patch_status(*args: Any) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise ConnectionError("apiserver went away")

    monkeypatch.setattr(kube, "patch_status", patch_status)
    reporter = KubernetesReporter("ns1", "mystyle")
    reporter.report({"progress": {"percent": 1}})
    reporter.report({"progress": {"percent": 2}})  # fails: logged, training goes on
    assert calls[0] == ("sd-operator.dev/v1alpha1", "LoRAJob", "ns1", "mystyle", {"progress": {"percent": 1}})
    assert "could not report status to LoRAJob ns1/mystyle: apiserver went away" in capsys.readouterr().out


def test_background_reporter_never_blocks_and_sends_the_newest_status() -> None:
    gate = threading.Event()

    class Slow(Recorder):
        def report(self, status: dict[str, Any]) -> None:
            gate.wait(5)  # a hung API server
            super().report(status)

    slow = Slow()
    background = BackgroundReporter(slow)
    started = time.monotonic()
    for n in range(100):
        background.report({"progress": {"step": n}})
    background.report({"artifacts": []})
    assert time.monotonic() - started < 1  # the caller (the output loop) was never held up
    gate.set()
    background.close()
    assert slow.reports[-1] == {"progress": {"step": 99}, "artifacts": []}
    assert len(slow.reports) <= 2  # the first one in flight, then everything else merged into one
