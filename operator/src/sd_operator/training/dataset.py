"""`sd-operator dataset lint`: check a LoRA training dataset the way kohya-ss sd-scripts will read it.

The controller runs the same check before training (its result is the DatasetValid condition), so a
broken dataset fails in seconds instead of after the GPU pod started. Rules, from sd-scripts'
`library/train_util.py` and `library/config_util.py`:

- A subset is a folder `<repeats>_<class tokens>` (`100_mystyle person`); folders without a leading
  number are ignored, as sd-scripts ignores them. Folders named `reg`/`regularization` hold
  regularization subsets. Explicit subsets (the LoRAJob spec) replace discovery.
- Images are the files directly in a subset folder (not recursive) ending in .png .jpg .jpeg .webp .bmp.
- A caption is the FIRST LINE of `<image stem><caption extension>`, read as UTF-8. A zero-byte or
  non-UTF-8 caption file makes sd-scripts abort, so both are problems even in regularization subsets.
- Captions are comma-separated tags. The first tag must be the trigger word, or start with
  "<trigger> " ("mystyle person"), matched case-sensitively: with shuffle_caption and keep_tokens=1
  sd-scripts keeps only the first tag in place, so a trigger elsewhere gets shuffled around.
- Steps per epoch follow sd-scripts' DreamBoothDataset; see `steps_per_epoch`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from sd_operator.api.lorajob import Subset

__all__ = [
    "IMAGE_EXTENSIONS",
    "REG_DIR_NAMES",
    "Finding",
    "Ignored",
    "ImageEntry",
    "Layout",
    "LintReport",
    "SubsetInfo",
    "add_parser",
    "dataset_toml",
    "discover_subsets",
    "lint",
    "main",
    "scan_layout",
    "steps_per_epoch",
    "subsets_from_spec",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
REG_DIR_NAMES = ("reg", "regularization")
MIN_SIDE = 64
_FOLDER_NAME = re.compile(r"^(\d+)(?:_(.*))?$", re.ASCII | re.DOTALL)
# The first line as Python's universal-newline readlines() (what sd-scripts uses) splits it.
_FIRST_LINE = re.compile(r"([^\r\n]*)(\r\n|\r|\n)?")
_BOM = "\ufeff"


@dataclass(frozen=True)
class SubsetInfo:
    """One sd-scripts subset; `path` is relative to the dataset root, `images` is filled in by lint."""

    path: str
    repeats: int
    class_tokens: str | None = None
    is_reg: bool = False
    keep_tokens: int | None = None
    images: int = 0


@dataclass(frozen=True)
class Ignored:
    path: str
    reason: str


@dataclass(frozen=True)
class Layout:
    subsets: list[SubsetInfo]
    ignored: list[Ignored]


@dataclass(frozen=True)
class Finding:
    """A problem, warning or fix. `kind` is a stable token for machines, `message` is for people."""

    path: str
    kind: str
    message: str


@dataclass(frozen=True)
class ImageEntry:
    path: str
    width: int
    height: int
    is_reg: bool


@dataclass
class LintReport:
    root: str
    batch_size: int
    epochs: int
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    fixed: list[Finding] = field(default_factory=list)
    ignored: list[Ignored] = field(default_factory=list)
    subsets: list[SubsetInfo] = field(default_factory=list)
    images: list[ImageEntry] = field(default_factory=list)
    train_entries: int = 0  # training images x repeats, per epoch
    reg_entries: int = 0  # regularization images sd-scripts registers per epoch
    steps_per_epoch: int = 0
    total_steps: int = 0

    @property
    def ok(self) -> bool:
        """Usable for training: warnings allowed, problems not."""
        return not self.problems

    @property
    def train_images(self) -> int:
        return sum(not i.is_reg for i in self.images)

    @property
    def reg_images(self) -> int:
        return sum(i.is_reg for i in self.images)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(ok=self.ok, train_images=self.train_images, reg_images=self.reg_images)
        return out

    def summary_lines(self) -> list[str]:
        verdict = "OK" if self.ok else f"NOT USABLE ({len(self.problems)} problem(s))"
        lines = [f"dataset {self.root}: {verdict}"]
        for s in self.subsets:
            reg = " (regularization)" if s.is_reg else ""
            lines.append(f"  subset {s.path!r}{reg}: {s.images} image(s) x {s.repeats} repeat(s)")
        lines.append(f"  images: {self.train_images} training, {self.reg_images} regularization")
        lines.append(
            f"  steps per epoch: {self.steps_per_epoch} (batch size {self.batch_size}; {self.train_entries} training"
            f" + {self.reg_entries} regularization samples), total steps: {self.total_steps} ({self.epochs} epoch(s))"
        )
        lines += [f"  fixed: {f.path}: {f.message}" for f in self.fixed]
        lines += [f"  warning: {f.path}: {f.message} [{f.kind}]" for f in self.warnings]
        lines += [f"  problem: {f.path}: {f.message} [{f.kind}]" for f in self.problems]
        return lines


# ---------------------------------------------------------------------------------------------
# Subsets: discovered from folder names, or given by the spec


def parse_folder_name(name: str) -> tuple[int, str | None] | str:
    """(repeats, class tokens) of a `<repeats>_<class tokens>` folder, or why it is not a subset.

    Splits at the first '_' like sd-scripts' extract_dreambooth_params: `5_cat_dog` -> (5, "cat_dog").
    """
    m = _FOLDER_NAME.match(name)
    if not m:
        return "no leading '<repeats>_' (sd-scripts ignores folders without a repeat count)"
    repeats = int(m.group(1))
    if repeats < 1:
        return "0 repeats: its images would never be trained on"
    return repeats, (m.group(2) or None)


def _visible(path: Path) -> list[Path]:
    # Hidden entries (.ipynb_checkpoints, .DS_Store) are skipped silently, as sd-scripts' glob does.
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _named_subsets(root: Path, parent: Path, *, is_reg: bool) -> Layout:
    subsets, ignored = [], []
    for d in (p for p in _visible(parent) if p.is_dir()):
        rel = d.relative_to(root).as_posix()
        parsed = parse_folder_name(d.name)
        if isinstance(parsed, str):
            ignored.append(Ignored(rel, parsed))
        else:
            subsets.append(SubsetInfo(rel, parsed[0], parsed[1], is_reg=is_reg))
    return Layout(subsets, ignored)


def scan_layout(root: Path, reg_dir_names: Sequence[str] = REG_DIR_NAMES) -> Layout:
    """Subsets found under root, and the folders that were skipped with the reason."""
    reg_names = {n.lower() for n in reg_dir_names}
    top = _named_subsets(root, root, is_reg=False)
    subsets, ignored = list(top.subsets), []
    for item in top.ignored:
        reg_dir = root / item.path
        if reg_dir.name.lower() not in reg_names:
            ignored.append(item)
            continue
        # Images right inside reg/ are one subset (repeats 1); reg/<n>_<class>/ folders are more.
        if any(_is_image(p) for p in _visible(reg_dir)):
            subsets.append(SubsetInfo(item.path, 1, None, is_reg=True))
        nested = _named_subsets(root, reg_dir, is_reg=True)
        subsets += nested.subsets
        ignored += nested.ignored
    return Layout(subsets, ignored)


def discover_subsets(root: Path, reg_dir_names: Sequence[str] = REG_DIR_NAMES) -> list[SubsetInfo]:
    """Subsets from folder names; `scan_layout` also says which folders were ignored and why."""
    return scan_layout(root, reg_dir_names).subsets


def subsets_from_spec(root: Path, subsets: Iterable[Subset | Mapping[str, Any]]) -> list[SubsetInfo]:
    """Explicit subsets (LoRAJob spec.dataset.subsets, camelCase or snake_case keys); root is not read."""
    del root  # paths stay relative to root; accepted so callers treat both sources alike
    out = []
    for item in subsets:
        s = item if isinstance(item, Subset) else Subset.model_validate(item)
        out.append(SubsetInfo(s.path, s.repeats, s.class_tokens, s.is_reg, s.keep_tokens))
    return out


# ---------------------------------------------------------------------------------------------
# Steps


def _reg_entries(subsets: Sequence[SubsetInfo], train_entries: int) -> int:
    """How many regularization samples sd-scripts puts in an epoch (DreamBoothDataset.__init__).

    It registers reg images one by one with their subset's repeats until it has at least as many as
    training samples (so it can overshoot by up to repeats-1); if it runs out first, it adds one repeat
    at a time round-robin until the counts are exactly equal. No training samples: no reg samples.
    """
    n = 0
    for s in (s for s in subsets if s.is_reg and s.images):
        if n + s.images * s.repeats >= train_entries:
            return n + math.ceil((train_entries - n) / s.repeats) * s.repeats
        n += s.images * s.repeats
    return train_entries if n else 0


def steps_per_epoch(subsets: Sequence[SubsetInfo], batch_size: int) -> tuple[int, int, int]:
    """(steps, training samples, regularization samples) per epoch.

    steps = ceil((T + R) / batch_size), T = sum(images x repeats) of the training subsets and R the
    regularization samples (`_reg_entries`; R == T in the usual case, so regularization doubles the
    steps). Exact for one process without aspect-ratio bucketing; with bucketing each bucket rounds up
    on its own, so this is a lower bound. Gradient accumulation and several GPUs divide it further.
    """
    train = sum(s.images * s.repeats for s in subsets if not s.is_reg)
    reg = _reg_entries(subsets, train)
    return math.ceil((train + reg) / batch_size), train, reg


# ---------------------------------------------------------------------------------------------
# Captions and the trigger word


def _word(trigger: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)")


def _trigger_first(line: str, trigger: str) -> bool:
    first = line.split(",", 1)[0].strip()
    return first == trigger or first.startswith(trigger + " ")


def _fixed_line(line: str, trigger: str) -> tuple[str, str]:
    """The caption line with the trigger in front, and what was done ("moved" or "prepended")."""
    tags = [t.strip() for t in line.split(",")]
    for i, tag in enumerate(tags):
        if tag == trigger or tag.startswith(trigger + " "):
            rest = [t for j, t in enumerate(tags) if j != i and t]
            return ", ".join([tag, *rest]), "moved"
    word = _word(trigger)
    for i, tag in enumerate(tags):
        if word.search(tag):
            # Inside prose ("a photo of mystyle"): take it out there, so the caption does not say it twice.
            tags[i] = " ".join(word.sub("", tag, count=1).split())
            return ", ".join([trigger, *(t for t in tags if t)]), "moved"
    stripped = line.strip()
    return (f"{trigger}, {stripped}" if stripped else trigger), "prepended"


@dataclass(frozen=True)
class _Caption:
    raw: str  # the whole file, newlines untouched
    first: str  # the first line, without its line break and without a byte order mark
    bom: bool
    more_lines: bool  # non-blank lines after the first, which sd-scripts does not read


def _read_caption(path: Path) -> _Caption | str:
    """The caption, or why sd-scripts would fail on it."""
    data = path.read_bytes()
    if not data:
        return "zero-byte caption file (sd-scripts aborts with 'caption file is empty')"
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 (byte {e.start}); sd-scripts aborts on it"
    m = _FIRST_LINE.match(raw)
    assert m is not None  # the pattern matches every string
    first = m.group(1)
    return _Caption(raw, first.removeprefix(_BOM), first.startswith(_BOM), bool(raw[m.end() :].strip()))


def _write_atomic(path: Path, text: str) -> None:
    """Replace the file in one rename, keeping its mode, so a crash never leaves half a caption."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rewrite_first_line(cap: _Caption, new_first: str) -> str:
    m = _FIRST_LINE.match(cap.raw)
    assert m is not None
    return new_first + cap.raw[m.end(1) :]


# ---------------------------------------------------------------------------------------------
# The lint pass


def _probe_image(path: Path) -> tuple[int, int] | str:
    """(width, height), or why Pillow cannot read it.

    verify() checks the container (PNG chunk CRCs, headers) but decodes nothing, so the image is
    opened again and loaded: that is what catches a truncated download.
    """
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return f"{type(e).__name__}: {e}"
    return size


@dataclass
class _Linter:
    root: Path
    trigger: str | None  # None: the trigger word itself is invalid, captions are not checked for it
    ext: str
    fix: bool
    report: LintReport

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() or "."

    def problem(self, path: Path, kind: str, message: str) -> None:
        self.report.problems.append(Finding(self._rel(path), kind, message))

    def warn(self, path: Path, kind: str, message: str) -> None:
        self.report.warnings.append(Finding(self._rel(path), kind, message))

    def check_subset(self, s: SubsetInfo) -> SubsetInfo:
        folder = self.root / s.path
        if not folder.is_dir():
            self.problem(folder, "missing-subset", "subset folder does not exist")
            return s
        files = [p for p in _visible(folder) if p.is_file()]
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        good = sum(self.check_image(p, s) for p in images)
        self.check_caption_files(folder, files, images, s)
        if s.is_reg and s.class_tokens and self.trigger and _word(self.trigger).search(s.class_tokens):
            self.warn(folder, "trigger-in-reg", f"class tokens {s.class_tokens!r} contain the trigger word")
        if not good:
            self.warn(folder, "empty-subset", "no usable images; sd-scripts skips this subset")
        return replace(s, images=good)

    def check_image(self, path: Path, s: SubsetInfo) -> bool:
        probed = _probe_image(path)
        if isinstance(probed, str):
            self.problem(path, "unreadable-image", f"Pillow cannot read it ({probed})")
            return False
        w, h = probed
        if min(w, h) < MIN_SIDE:
            self.warn(path, "small-image", f"{w}x{h} is smaller than {MIN_SIDE} px on a side")
        self.report.images.append(ImageEntry(self._rel(path), w, h, s.is_reg))
        return True

    def check_caption_files(self, folder: Path, files: list[Path], images: list[Path], s: SubsetInfo) -> None:
        by_stem: dict[str, list[Path]] = {}
        for img in images:
            by_stem.setdefault(img.stem, []).append(img)
        for stem, imgs in by_stem.items():
            if len(imgs) > 1:
                names = ", ".join(p.name for p in imgs)
                self.warn(imgs[0], "shared-caption", f"{names} share one caption file {stem}{self.ext}")
            self.check_caption(folder / f"{stem}{self.ext}", imgs[0], s)
        for p in files:
            # sd-scripts looks for <stem><ext> exactly, so only that spelling can be an orphan.
            if p.name.endswith(self.ext) and p.name[: -len(self.ext)] not in by_stem:
                self.problem(p, "orphan-caption", "caption without an image of the same name")

    def check_caption(self, path: Path, image: Path, s: SubsetInfo) -> None:
        if not path.is_file():
            if not s.is_reg:  # regularization images fall back to the class tokens
                self.problem(image, "missing-caption", f"no caption file {path.name}{self._other_ext_hint(path)}")
            elif not s.class_tokens:
                self.warn(image, "missing-caption", "no caption and no class tokens: it trains with an empty caption")
            return
        cap = _read_caption(path)
        if isinstance(cap, str):
            self.problem(path, "empty-caption" if cap.startswith("zero-byte") else "caption-encoding", cap)
            return
        if cap.more_lines:
            self.warn(path, "multiline-caption", "sd-scripts reads only the first line")
        if s.is_reg:
            self.check_reg_caption(path, cap)
        else:
            self.check_train_caption(path, cap)

    def _other_ext_hint(self, path: Path) -> str:
        others = sorted(p.name for p in path.parent.glob(f"{path.stem}.*") if p.suffix in {".txt", ".caption"})
        return f" (found {', '.join(others)}: is the caption extension right?)" if others else ""

    def check_reg_caption(self, path: Path, cap: _Caption) -> None:
        if cap.bom:
            self.problem(path, "caption-encoding", "starts with a byte order mark, which sd-scripts keeps in the text")
        if not cap.first.strip():
            self.warn(path, "empty-caption", "empty caption: the image trains with an empty caption")
        elif self.trigger and _word(self.trigger).search(cap.first):
            self.warn(path, "trigger-in-reg", "regularization caption contains the trigger word")

    def check_train_caption(self, path: Path, cap: _Caption) -> None:
        if not cap.first.strip():
            self.problem(path, "empty-caption", "caption is empty")
            return
        trigger_ok = self.trigger is None or _trigger_first(cap.first, self.trigger)
        if self.fix and self.trigger and (cap.bom or not trigger_ok):
            self.fix_caption(path, cap, self.trigger, trigger_ok)
            return
        if cap.bom:
            self.problem(path, "caption-encoding", "starts with a byte order mark, which sd-scripts keeps in the text")
        if not trigger_ok:
            first = cap.first.split(",", 1)[0].strip()
            self.problem(path, "trigger-not-first", f"first tag is {first!r}, not the trigger word {self.trigger!r}")

    def fix_caption(self, path: Path, cap: _Caption, trigger: str, trigger_ok: bool) -> None:
        new_first, how = (cap.first, "") if trigger_ok else _fixed_line(cap.first, trigger)
        _write_atomic(path, _rewrite_first_line(cap, new_first))
        done = [] if trigger_ok else [f"{how} the trigger word to the front"]
        if cap.bom:
            done.append("removed the byte order mark")
        self.report.fixed.append(Finding(self._rel(path), f"trigger-{how}" if how else "bom-removed", "; ".join(done)))


def _trigger_error(trigger: str) -> str | None:
    if not trigger:
        return "the trigger word is empty"
    if "," in trigger:
        return "the trigger word contains a comma, so it cannot be the first comma-separated tag"
    return None


def _check_layout(linter: _Linter, layout: Layout, discovered: bool) -> None:
    root = linter.root
    for item in layout.ignored:
        linter.warn(root / item.path, "ignored-folder", f"ignored: {item.reason}")
    if discovered:
        loose = [p for p in _visible(root) if _is_image(p)]
        if loose:
            msg = (
                f"{len(loose)} image(s) directly in the dataset root are in no subset; move them to <repeats>_<class>/"
            )
            linter.warn(root, "loose-images", msg)


def lint(
    root: Path,
    *,
    trigger_word: str,
    caption_extension: str = ".txt",
    subsets: Sequence[Subset | Mapping[str, Any]] | None = None,
    batch_size: int = 1,
    epochs: int = 1,
    fix: bool = False,
    reg_dir_names: Sequence[str] = REG_DIR_NAMES,
) -> LintReport:
    """Checks the dataset under root; with fix=True, puts the trigger word first in captions that lack it.

    Raises ValueError for bad arguments (batch size, epochs, caption extension); everything about the
    data itself is a problem or a warning in the report.
    """
    if batch_size < 1 or epochs < 1:
        raise ValueError("batch size and epochs must be at least 1")
    if not re.fullmatch(r"\.[A-Za-z0-9]+", caption_extension):
        raise ValueError(f"caption extension must look like '.txt', not {caption_extension!r}")
    root = Path(root).resolve()
    report = LintReport(str(root), batch_size, epochs)
    trigger = trigger_word.strip()
    linter = _Linter(root, None if _trigger_error(trigger) else trigger, caption_extension, fix, report)
    if error := _trigger_error(trigger):
        linter.problem(root, "bad-trigger-word", error)
    if not root.is_dir():
        linter.problem(root, "missing-dataset", "the dataset folder does not exist")
        return report
    layout = scan_layout(root, reg_dir_names) if subsets is None else Layout(subsets_from_spec(root, subsets), [])
    report.ignored = layout.ignored
    _check_layout(linter, layout, discovered=subsets is None)
    report.subsets = [linter.check_subset(s) for s in layout.subsets]
    report.steps_per_epoch, report.train_entries, report.reg_entries = steps_per_epoch(report.subsets, batch_size)
    report.total_steps = report.steps_per_epoch * epochs
    if not layout.subsets:
        where = "no subsets given" if subsets is not None else "no folder named <repeats>_<class tokens>"
        linter.problem(root, "no-subsets", f"{where} (e.g. '10_mystyle')")
    elif not report.train_entries:
        linter.problem(root, "no-training-images", "no usable training (non-regularization) images")
    return report


# ---------------------------------------------------------------------------------------------
# The sd-scripts dataset config


def _toml_str(value: str) -> str:
    """A TOML basic string: backslash, quote and control characters escaped."""
    named = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    out = []
    for ch in value:
        if ch in named:
            out.append(named[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: str | int | bool) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return _toml_str(value)


def _table(header: str, values: Mapping[str, str | int | bool | None]) -> list[str]:
    return [header, *(f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None), ""]


def dataset_toml(
    report_or_subsets: LintReport | Sequence[SubsetInfo],
    *,
    root: Path,
    resolution: int,
    batch_size: int,
    caption_extension: str,
    keep_tokens: int | None,
    shuffle_caption: bool = True,
) -> str:
    """The `--dataset_config` TOML for sd-scripts: one DreamBooth-style dataset, one entry per subset.

    caption_extension is always written: sd-scripts' own default is '.caption', not our '.txt'.
    With a config file sd-scripts does not parse folder names, so repeats and class tokens are explicit.
    """
    if resolution < 1 or batch_size < 1:
        raise ValueError("resolution and batch size must be positive")
    subsets = report_or_subsets.subsets if isinstance(report_or_subsets, LintReport) else report_or_subsets
    general: dict[str, str | int | bool | None] = {
        "caption_extension": caption_extension,
        "shuffle_caption": shuffle_caption,
        "keep_tokens": keep_tokens,
    }
    lines = _table("[general]", general)
    lines += _table("[[datasets]]", {"resolution": resolution, "batch_size": batch_size})
    for s in subsets:
        lines += _table(
            "[[datasets.subsets]]",
            {
                "image_dir": str((Path(root) / s.path).resolve()),
                "num_repeats": s.repeats,
                "class_tokens": s.class_tokens,
                "is_reg": s.is_reg,
                "keep_tokens": s.keep_tokens,
            },
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def lint_command(args: argparse.Namespace) -> int:
    """Exit 0: usable (warnings allowed); 1: problems; 2: bad arguments."""
    try:
        report = lint(
            Path(args.path),
            trigger_word=args.trigger_word,
            caption_extension=args.caption_extension,
            batch_size=args.batch_size,
            epochs=args.epochs,
            fix=args.fix,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(report.summary_lines()))
    return 0 if report.ok else 1


def _lint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="dataset root: folders named <repeats>_<class tokens>, optional reg/")
    p.add_argument("--trigger-word", required=True, help="must be the first tag of every training caption")
    p.add_argument("--caption-extension", default=".txt", help="caption file extension (default .txt)")
    p.add_argument("--batch-size", type=_positive, default=1, help="training batch size, for the step count")
    p.add_argument("--epochs", type=_positive, default=1, help="epochs, for the total step count")
    p.add_argument("--fix", action="store_true", help="put the trigger word first in captions, rewriting them")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=lint_command)


def _dataset_subcommands(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="dataset_command", metavar="SUBCOMMAND", required=True)
    _lint_arguments(sub.add_parser("lint", help="check images, captions and the trigger word; count steps"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help="check LoRA training datasets")
    _dataset_subcommands(p)


def main(argv: Sequence[str] | None = None) -> int:
    """The dataset command on its own: `python -m sd_operator.training.dataset lint PATH --trigger-word W`."""
    parser = argparse.ArgumentParser(prog="sd-operator dataset", description=__doc__)
    _dataset_subcommands(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
