"""Training progress read from sd-scripts' output (stdout and stderr merged).

The shapes follow kohya-ss/sd-scripts `train_network.py` (its `accelerator.print` lines: "running training /
学習開始", "num epochs / epoch数: N", "epoch N/M", "saving checkpoint: PATH", `logger.info("model saved.")`)
and tqdm's default meter for the `desc="steps"` bar with `set_postfix(avr_loss=...)`:
`steps:  42%|████▏     | 840/2000 [05:12<07:10,  2.69it/s, avr_loss=0.0912]`. tqdm rewrites its line
with carriage returns, so input is split on both '\\r' and '\\n'. Lines that match nothing are ignored:
sd-scripts prints a great deal else (rich-formatted logs, warnings, bucket tables).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_LINE_SPLIT = re.compile(r"[\r\n]")
_EPOCH = re.compile(r"\bepoch (\d+)/(\d+)\b")
_RUNNING = re.compile(r"running training")
_TRAIN_IMAGES = re.compile(r"num train images \* repeats[^:\n]*:\s*(\d+)")
_BATCHES_PER_EPOCH = re.compile(r"num batches per epoch[^:\n]*:\s*(\d+)")
_NUM_EPOCHS = re.compile(r"num epochs[^:\n]*:\s*(\d+)")
_TOTAL_STEPS = re.compile(r"total optimization steps[^:\n]*:\s*(\d+)")
_SAVING = re.compile(r"saving checkpoint:\s*(.+?\.(?:safetensors|ckpt|pt))(?=\s|$)")
_REMOVING = re.compile(r"removing old checkpoint:\s*(.+?\.(?:safetensors|ckpt|pt))(?=\s|$)")
_MODEL_SAVED = re.compile(r"\bmodel saved\.")
# The training bar only: sd-scripts also draws a "validation steps" bar whose counts are not training steps.
_BAR = re.compile(
    r"(?<!validation )\bsteps:\s*(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)"
    r"(?:\s*\[(?P<elapsed>[^<\]]*)<(?P<remaining>[^,\]]*)(?:,\s*(?P<rate>[^,\]]*))?(?P<postfix>[^\]]*)\])?"
)
_RATE = re.compile(r"(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>it/s|s/it)")
_INTERVAL = re.compile(r"^(?:(?P<d>\d+)d\s*)?(?:(?P<h>\d+):)?(?P<m>\d+):(?P<s>\d{2})$")
_LOSS = re.compile(r"\bavr_loss=(?P<loss>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))")
# A Python exception line, a CUDA OOM, an argparse/usage error, a rich ERROR log line, the kernel's OOM kill,
# and voluptuous' exceptions (sd-scripts validates the dataset TOML with it: `...MultipleInvalid: extra keys
# not allowed @ data['datasets'][0]['foo']`, which names the key, after a generic "Invalid user config" line).
_ERROR = re.compile(r"\b\w*(?:Error|Exception|Invalid)\b:|CUDA out of memory|\berror:|\bERROR\b|^Killed\b")
# accelerate's own traceback after its child fails ends with this; the trainer's real error came before it.
_LAUNCHER_ERROR = re.compile(r"CalledProcessError: Command .* returned non-zero exit status")


@dataclass
class Progress:
    """What is known about a run so far."""

    epoch: int | None = None
    total_epochs: int | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    eta_seconds: int | None = None
    it_per_second: float | None = None
    train_images: int | None = None  # images x repeats per epoch
    batches_per_epoch: int | None = None
    started: bool = False  # "running training" seen
    finished: bool = False  # "model saved." seen: the final file is written
    saved: list[str] = field(default_factory=list)  # checkpoints written and not removed again, in order

    @property
    def percent(self) -> int | None:
        """Whole percent of steps done, floored like tqdm's (so 100 means every step ran)."""
        if self.step is None or not self.total_steps:
            return None
        return max(0, min(100, self.step * 100 // self.total_steps))

    def to_status(self) -> dict[str, int | float]:
        """The LoRAJob status.progress fields (camelCase) that are known; `updated` is the caller's."""
        values: dict[str, int | float | None] = {
            "epoch": self.epoch,
            "totalEpochs": self.total_epochs,
            "step": self.step,
            "totalSteps": self.total_steps,
            "loss": self.loss,
            "percent": self.percent,
            "etaSeconds": self.eta_seconds,
        }
        return {k: v for k, v in values.items() if v is not None}


class ProgressParser:
    """Feed it the trainer's output as it arrives, in chunks of any size; read `.progress`."""

    def __init__(self, *, total_epochs: int | None = None, total_steps: int | None = None) -> None:
        # Expected totals (from the spec and the dataset check) until the trainer prints its own.
        self.progress = Progress(total_epochs=total_epochs, total_steps=total_steps)
        self.last_error: str | None = None  # the last line that looks like an error
        self.last_line: str | None = None  # the last non-empty line that is not a progress bar
        self._partial = ""

    def feed(self, text: str) -> bool:
        """Parses every complete line in text (ended by '\\r' or '\\n'); keeps the rest for the next call.
        Returns whether the progress changed."""
        pieces = _LINE_SPLIT.split(self._partial + text)
        self._partial = pieces.pop()
        changed = False
        for piece in pieces:
            changed |= self.feed_line(piece)
        return changed

    def flush(self) -> bool:
        """Parses what is left without a line end (the output ended mid-line)."""
        rest, self._partial = self._partial, ""
        return self.feed_line(rest) if rest else False

    def feed_line(self, line: str) -> bool:
        """Parses one line; returns whether the progress changed."""
        line = line.strip()
        if not line:
            return False
        before = _snapshot(self.progress)
        if self._bar(line):
            # What is left once the bars are cut out: a print that landed mid-bar (stdout and stderr
            # interleave), e.g. "steps:  10%|█ | 20/200 [...]epoch 2/10".
            line = _BAR.sub(" ", line).strip()
        if line:
            self.last_line = line
            self._note_error(line)
            self._info(line)
        return _snapshot(self.progress) != before

    def complete(self) -> None:
        """The trainer exited 0 and its final file is there: every step ran, whatever the output showed."""
        p = self.progress
        if p.total_steps is not None:
            p.step = p.total_steps
        if p.total_epochs is not None:
            p.epoch = p.total_epochs
        p.eta_seconds = 0
        p.finished = True

    def _bar(self, line: str) -> bool:
        # A segment can hold a bar and other text when stdout and stderr interleave: take the last bar.
        matches = list(_BAR.finditer(line))
        if not matches:
            return False
        m = matches[-1]
        p = self.progress
        p.step, p.total_steps = int(m["n"]), int(m["total"])
        rate = _rate(m["rate"] or "")
        if rate is not None:
            p.it_per_second = rate
        remaining = _seconds(m["remaining"] or "")
        if remaining is None and rate and p.total_steps >= p.step:
            # tqdm prints '?' until it has a rate; when it has one, left/rate is what it would print.
            remaining = round((p.total_steps - p.step) / rate)
        if remaining is not None:
            p.eta_seconds = remaining
        loss = _LOSS.search(m["postfix"] or "")
        if loss:
            value = float(loss["loss"])
            # NaN/inf cannot go into a JSON status; keep the last finite average.
            if math.isfinite(value):
                p.loss = value
        return True

    def _info(self, line: str) -> None:
        p = self.progress
        if m := _EPOCH.search(line):
            p.epoch, p.total_epochs = int(m[1]), int(m[2])
        elif _RUNNING.search(line):
            p.started = True
        elif m := _TRAIN_IMAGES.search(line):
            p.train_images = int(m[1])
        elif m := _BATCHES_PER_EPOCH.search(line):
            p.batches_per_epoch = int(m[1])
        elif m := _NUM_EPOCHS.search(line):
            p.total_epochs = int(m[1])
        elif m := _TOTAL_STEPS.search(line):
            p.total_steps = int(m[1])
        elif m := _SAVING.search(line):
            if m[1] not in p.saved:
                p.saved.append(m[1])
        elif m := _REMOVING.search(line):
            if m[1] in p.saved:
                p.saved.remove(m[1])
        elif _MODEL_SAVED.search(line):
            p.finished = True

    def _note_error(self, line: str) -> None:
        if not _ERROR.search(line):
            return
        if _LAUNCHER_ERROR.search(line) and self.last_error is not None:
            return
        self.last_error = line


def _snapshot(p: Progress) -> tuple[object, ...]:
    return (
        p.epoch,
        p.total_epochs,
        p.step,
        p.total_steps,
        p.loss,
        p.eta_seconds,
        p.it_per_second,
        p.train_images,
        p.batches_per_epoch,
        p.started,
        p.finished,
        tuple(p.saved),
    )


def _rate(text: str) -> float | None:
    """'2.69it/s' -> 2.69; '1.25s/it' -> 0.8; '?it/s' -> None."""
    m = _RATE.search(text)
    if not m:
        return None
    value = float(m["value"])
    if m["unit"] == "it/s":
        return value
    return 1 / value if value > 0 else None


def _seconds(text: str) -> int | None:
    """tqdm's interval: '07:10' -> 430, '1:02:03' -> 3723; '?' (no rate yet) -> None."""
    m = _INTERVAL.match(text.strip())
    if not m:
        return None
    days, hours = int(m["d"] or 0), int(m["h"] or 0)
    return ((days * 24 + hours) * 60 + int(m["m"])) * 60 + int(m["s"])
