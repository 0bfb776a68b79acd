"""`sd-operator dataset lint` on real folder trees: Pillow-written images, caption files, a reg folder."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from sd_operator.api.lorajob import Subset
from sd_operator.training import dataset as ds
from sd_operator.training.dataset import SubsetInfo, dataset_toml, discover_subsets, lint, scan_layout

TRIGGER = "mystyle"


def image(path: Path, size: tuple[int, int] = (96, 80), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 40, 90)).save(path, format=fmt)
    return path


def caption(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_bytes(text.encode("utf-8"))  # bytes: no newline translation, the test controls them
    return path


def pair(folder: Path, stem: str, text: str | None, ext: str = ".png") -> None:
    image(folder / f"{stem}{ext}")
    if text is not None:
        caption(folder / f"{stem}.txt", text)


def kinds(findings: list[ds.Finding]) -> set[tuple[str, str]]:
    return {(f.path, f.kind) for f in findings}


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """One of each mistake; the expected findings are spelled out in the test that uses it."""
    train = tmp_path / "10_mystyle person"
    pair(train, "good", "mystyle, red hair, smiling")
    pair(train, "prose", "mystyle person standing in the rain")
    pair(train, "middle", "portrait, mystyle, smiling", ext=".jpg")
    pair(train, "blank", "   \n")
    pair(train, "nocap", None)
    image(train / "tiny.PNG", (32, 40))
    caption(train / "tiny.txt", "mystyle, tiny")
    (train / "corrupt.png").write_bytes(os.urandom(512))
    caption(train / "corrupt.txt", "mystyle, broken")
    caption(train / "orphan.txt", "mystyle, nobody")
    (train / "notes.md").write_text("not an image, not a caption")
    (tmp_path / "drafts").mkdir()
    image(tmp_path / "drafts" / "x.png")
    reg = tmp_path / "reg" / "1_person"
    pair(reg, "r1", None)
    pair(reg, "r2", "person, outdoors")
    pair(reg, "r3", "mystyle, person")
    return tmp_path


def test_reports_each_mistake_exactly(messy: Path) -> None:
    report = lint(messy, trigger_word=TRIGGER, batch_size=2, epochs=3)

    t = "10_mystyle person"
    assert kinds(report.problems) == {
        (f"{t}/middle.txt", "trigger-not-first"),
        (f"{t}/blank.txt", "empty-caption"),
        (f"{t}/nocap.png", "missing-caption"),
        (f"{t}/corrupt.png", "unreadable-image"),
        (f"{t}/orphan.txt", "orphan-caption"),
    }
    assert kinds(report.warnings) == {
        (f"{t}/tiny.PNG", "small-image"),
        ("drafts", "ignored-folder"),
        ("reg/1_person/r3.txt", "trigger-in-reg"),
    }
    assert not report.ok
    assert [f.message for f in report.problems if f.kind == "trigger-not-first"] == [
        "first tag is 'portrait', not the trigger word 'mystyle'"
    ]
    assert [i.path for i in report.ignored] == ["drafts"]


def test_counts_and_steps_double_with_regularization(messy: Path) -> None:
    report = lint(messy, trigger_word=TRIGGER, batch_size=2, epochs=3)

    by_path = {s.path: s for s in report.subsets}
    assert by_path["10_mystyle person"] == SubsetInfo("10_mystyle person", 10, "mystyle person", False, None, 6)
    assert by_path["reg/1_person"] == SubsetInfo("reg/1_person", 1, "person", True, None, 3)
    assert (report.train_images, report.reg_images) == (6, 3)  # the corrupt image is not counted
    # T = 6 images x 10 repeats = 60; 3 reg images are topped up to R = 60; ceil(120 / 2) = 60.
    assert (report.train_entries, report.reg_entries) == (60, 60)
    assert report.steps_per_epoch == 60
    assert report.total_steps == 180
    sizes = {i.path: (i.width, i.height) for i in report.images}
    assert sizes["10_mystyle person/tiny.PNG"] == (32, 40)
    assert sizes["10_mystyle person/good.png"] == (96, 80)


def test_clean_dataset_without_regularization(tmp_path: Path) -> None:
    for i in range(3):
        pair(tmp_path / "10_mystyle", f"a{i}", f"mystyle, pose {i}")
    for i in range(2):
        pair(tmp_path / "5_mystyle closeup", f"b{i}", "mystyle closeup, face", ext=".webp")

    report = lint(tmp_path, trigger_word=TRIGGER, batch_size=4, epochs=2)

    assert report.ok, report.problems
    assert report.warnings == []
    assert [(s.path, s.images, s.repeats) for s in report.subsets] == [
        ("10_mystyle", 3, 10),
        ("5_mystyle closeup", 2, 5),
    ]
    assert (report.train_entries, report.reg_entries) == (40, 0)
    assert report.steps_per_epoch == 10  # ceil(40 / 4): no doubling without reg images
    assert report.total_steps == 20


def test_reg_samples_follow_sd_scripts_not_a_plain_doubling(tmp_path: Path) -> None:
    pair(tmp_path / "3_mystyle", "a", "mystyle")
    # Reg images come with 2 repeats each: sd-scripts registers whole images until it has >= 3 samples: 4.
    pair(tmp_path / "reg" / "2_person", "r1", None)
    pair(tmp_path / "reg" / "2_person", "r2", None)

    report = lint(tmp_path, trigger_word=TRIGGER)

    assert (report.train_entries, report.reg_entries, report.steps_per_epoch) == (3, 4, 7)


def test_a_reg_folder_without_images_does_not_double_steps(tmp_path: Path) -> None:
    pair(tmp_path / "4_mystyle", "a", "mystyle")
    (tmp_path / "reg" / "1_person").mkdir(parents=True)

    report = lint(tmp_path, trigger_word=TRIGGER)

    assert report.steps_per_epoch == 4
    assert kinds(report.warnings) == {("reg/1_person", "empty-subset")}
    assert report.ok


def test_steps_formula_directly() -> None:
    subsets = [SubsetInfo("t", 10, images=7), SubsetInfo("r", 1, is_reg=True, images=100)]
    assert ds.steps_per_epoch(subsets, 3) == (47, 70, 70)  # ceil(140 / 3)
    assert ds.steps_per_epoch([SubsetInfo("r", 1, is_reg=True, images=5)], 1) == (0, 0, 0)


def test_fix_moves_or_prepends_the_trigger_and_a_second_lint_is_clean(tmp_path: Path) -> None:
    t = tmp_path / "10_mystyle"
    pair(t, "middle", "portrait, mystyle, smiling")
    pair(t, "tagged", "smiling,  mystyle person ,outdoors")
    pair(t, "inprose", "a photo of mystyle in the rain, night")
    pair(t, "absent", "red hair, blue eyes\r\nsecond line\r\n")
    pair(t, "bom", "\ufeffmystyle, freckles\n")
    pair(t, "good", "mystyle, fine\n")
    pair(tmp_path / "reg" / "1_person", "r", "mystyle, person")
    before_good = (t / "good.txt").stat().st_mtime_ns

    report = lint(tmp_path, trigger_word=TRIGGER, fix=True)

    def text(stem: str) -> bytes:
        return (t / f"{stem}.txt").read_bytes()

    assert text("middle") == b"mystyle, portrait, smiling"
    assert text("tagged") == b"mystyle person, smiling, outdoors"
    assert text("inprose") == b"mystyle, a photo of in the rain, night"
    assert text("absent") == b"mystyle, red hair, blue eyes\r\nsecond line\r\n"  # only line 1 changes
    assert text("bom") == b"mystyle, freckles\n"
    assert text("good") == b"mystyle, fine\n"
    assert (t / "good.txt").stat().st_mtime_ns == before_good
    assert (tmp_path / "reg" / "1_person" / "r.txt").read_text() == "mystyle, person"  # reg captions untouched
    assert {(f.path, f.kind) for f in report.fixed} == {
        ("10_mystyle/middle.txt", "trigger-moved"),
        ("10_mystyle/tagged.txt", "trigger-moved"),
        ("10_mystyle/inprose.txt", "trigger-moved"),
        ("10_mystyle/absent.txt", "trigger-prepended"),
        ("10_mystyle/bom.txt", "bom-removed"),
    }
    assert report.ok
    assert not list(t.glob(".*.tmp"))

    again = lint(tmp_path, trigger_word=TRIGGER)
    assert again.ok and again.fixed == []
    assert kinds(again.warnings) == {
        ("10_mystyle/absent.txt", "multiline-caption"),
        ("reg/1_person/r.txt", "trigger-in-reg"),
    }


def test_without_fix_files_are_not_changed(tmp_path: Path) -> None:
    pair(tmp_path / "1_mystyle", "a", "portrait, mystyle")
    report = lint(tmp_path, trigger_word=TRIGGER)
    assert kinds(report.problems) == {("1_mystyle/a.txt", "trigger-not-first")}
    assert (tmp_path / "1_mystyle" / "a.txt").read_text() == "portrait, mystyle"


def test_trigger_match_is_case_sensitive_and_whole_tag(tmp_path: Path) -> None:
    pair(tmp_path / "1_mystyle", "upper", "Mystyle, portrait")
    pair(tmp_path / "1_mystyle", "longer", "mystyles, portrait")
    pair(tmp_path / "1_mystyle", "ok", "mystyle woman, portrait")
    report = lint(tmp_path, trigger_word=TRIGGER)
    assert kinds(report.problems) == {
        ("1_mystyle/upper.txt", "trigger-not-first"),
        ("1_mystyle/longer.txt", "trigger-not-first"),
    }


def test_folders_without_a_leading_integer_are_ignored_with_the_reason(tmp_path: Path) -> None:
    for name in ("100_mystyle person", "5_cat_dog", "20", "mystyle", "0_zero", "reg_extra"):
        (tmp_path / name).mkdir()
    (tmp_path / ".cache").mkdir()
    image(tmp_path / "regularization" / "loose.png")
    (tmp_path / "regularization" / "2_woman").mkdir()
    (tmp_path / "regularization" / "misc").mkdir()

    layout = scan_layout(tmp_path)

    assert layout.subsets == [
        SubsetInfo("100_mystyle person", 100, "mystyle person"),
        SubsetInfo("20", 20, None),
        SubsetInfo("5_cat_dog", 5, "cat_dog"),
        SubsetInfo("regularization", 1, None, is_reg=True),
        SubsetInfo("regularization/2_woman", 2, "woman", is_reg=True),
    ]
    reasons = {i.path: i.reason for i in layout.ignored}
    assert set(reasons) == {"0_zero", "mystyle", "reg_extra", "regularization/misc"}
    assert "no leading '<repeats>_'" in reasons["mystyle"]
    assert "0 repeats" in reasons["0_zero"]
    assert discover_subsets(tmp_path) == layout.subsets


def test_loose_root_images_and_no_subsets(tmp_path: Path) -> None:
    pair(tmp_path, "a", "mystyle")
    report = lint(tmp_path, trigger_word=TRIGGER)
    assert kinds(report.problems) == {(".", "no-subsets")}
    assert kinds(report.warnings) == {(".", "loose-images")}


def test_explicit_subsets_override_discovery(tmp_path: Path) -> None:
    pair(tmp_path / "imgs", "a", "mystyle, a")
    pair(tmp_path / "imgs", "b", "mystyle, b")
    pair(tmp_path / "10_unused", "c", "no trigger here")  # not in the spec: not read
    pair(tmp_path / "people", "p", None)
    spec: list[Subset | dict[str, object]] = [
        {"path": "imgs", "repeats": 7, "classTokens": "mystyle", "keepTokens": 1},
        Subset(path="people", repeats=1, class_tokens="person", is_reg=True),
        {"path": "gone", "repeats": 2},
    ]

    report = lint(tmp_path, trigger_word=TRIGGER, subsets=spec)

    assert [(s.path, s.repeats, s.class_tokens, s.is_reg, s.keep_tokens, s.images) for s in report.subsets] == [
        ("imgs", 7, "mystyle", False, 1, 2),
        ("people", 1, "person", True, None, 1),
        ("gone", 2, None, False, None, 0),
    ]
    assert kinds(report.problems) == {("gone", "missing-subset")}
    assert report.steps_per_epoch == 28  # (2 x 7) + 14 reg samples
    assert report.ignored == []


def test_caption_extension_is_respected_and_missing_ones_get_a_hint(tmp_path: Path) -> None:
    image(tmp_path / "1_mystyle" / "a.png")
    caption(tmp_path / "1_mystyle" / "a.caption", "mystyle, a")

    report = lint(tmp_path, trigger_word=TRIGGER)  # default .txt
    assert kinds(report.problems) == {("1_mystyle/a.png", "missing-caption")}
    assert "found a.caption" in report.problems[0].message

    assert lint(tmp_path, trigger_word=TRIGGER, caption_extension=".caption").ok


def test_captions_sd_scripts_would_abort_on(tmp_path: Path) -> None:
    pair(tmp_path / "1_mystyle", "latin1", None)
    caption(tmp_path / "1_mystyle" / "latin1.txt", "mystyle, caf\xe9".encode("latin-1"))
    pair(tmp_path / "reg", "zero", None)
    caption(tmp_path / "reg" / "zero.txt", b"")
    pair(tmp_path / "reg", "nocap", None)  # fine: reg captions are optional... but no class tokens here

    report = lint(tmp_path, trigger_word=TRIGGER)

    assert kinds(report.problems) == {("1_mystyle/latin1.txt", "caption-encoding"), ("reg/zero.txt", "empty-caption")}
    assert kinds(report.warnings) == {("reg/nocap.png", "missing-caption")}


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg"])
def test_truncated_images_are_unreadable(tmp_path: Path, name: str) -> None:
    # Noise does not compress, so the cut lands inside the pixel data. verify() alone misses a cut JPEG
    # (it reads headers only); decoding the pixels catches it.
    path = tmp_path / "1_mystyle" / name
    path.parent.mkdir()
    Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    caption(tmp_path / "1_mystyle" / "cut.txt", "mystyle")

    report = lint(tmp_path, trigger_word=TRIGGER)

    assert kinds(report.problems) == {(f"1_mystyle/{name}", "unreadable-image"), (".", "no-training-images")}
    assert report.images == []


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch size"):
        lint(Path("."), trigger_word=TRIGGER, batch_size=0)
    with pytest.raises(ValueError, match="caption extension"):
        lint(Path("."), trigger_word=TRIGGER, caption_extension="txt")


def test_bad_trigger_and_missing_root_are_problems(tmp_path: Path) -> None:
    report = lint(tmp_path / "nope", trigger_word="a, b")
    assert {f.kind for f in report.problems} == {"bad-trigger-word", "missing-dataset"}


def test_report_to_dict_is_json_ready(messy: Path) -> None:
    data = json.loads(json.dumps(lint(messy, trigger_word=TRIGGER, batch_size=2).to_dict()))
    assert data["ok"] is False
    assert data["steps_per_epoch"] == 60
    assert {"path": "10_mystyle person/orphan.txt", "kind": "orphan-caption"} in [
        {"path": p["path"], "kind": p["kind"]} for p in data["problems"]
    ]
    assert data["subsets"][0] == {
        "path": "10_mystyle person",
        "repeats": 10,
        "class_tokens": "mystyle person",
        "is_reg": False,
        "keep_tokens": None,
        "images": 6,
    }
    assert (data["train_images"], data["reg_images"]) == (6, 3)


# --- dataset TOML -------------------------------------------------------------------------------


def test_dataset_toml_parses_and_says_everything_explicitly(messy: Path) -> None:
    report = lint(messy, trigger_word=TRIGGER)
    text = dataset_toml(report, root=messy, resolution=512, batch_size=2, caption_extension=".txt", keep_tokens=1)

    config = tomllib.loads(text)

    assert config["general"] == {"caption_extension": ".txt", "shuffle_caption": True, "keep_tokens": 1}
    (dataset,) = config["datasets"]
    assert (dataset["resolution"], dataset["batch_size"]) == (512, 2)
    assert dataset["subsets"] == [
        {
            "image_dir": str((messy / "10_mystyle person").resolve()),
            "num_repeats": 10,
            "class_tokens": "mystyle person",
            "is_reg": False,
        },
        {
            "image_dir": str((messy / "reg" / "1_person").resolve()),
            "num_repeats": 1,
            "class_tokens": "person",
            "is_reg": True,
        },
    ]


def test_dataset_toml_escapes_quotes_backslashes_and_control_characters(tmp_path: Path) -> None:
    odd = 'say "hi"\\now\tthen'
    subsets = [SubsetInfo(f"3_{odd}", 3, odd, keep_tokens=2), SubsetInfo("reg", 1, None, is_reg=True)]

    text = dataset_toml(
        subsets,
        root=tmp_path,
        resolution=768,
        batch_size=1,
        caption_extension=".caption",
        keep_tokens=None,
        shuffle_caption=False,
    )
    config = tomllib.loads(text)

    assert config["general"] == {"caption_extension": ".caption", "shuffle_caption": False}
    first, reg = config["datasets"][0]["subsets"]
    assert first["image_dir"] == str(tmp_path.resolve() / f"3_{odd}")
    assert first["class_tokens"] == odd
    assert first["keep_tokens"] == 2
    assert reg == {"image_dir": str(tmp_path.resolve() / "reg"), "num_repeats": 1, "is_reg": True}


# --- command line -------------------------------------------------------------------------------


def test_cli_exit_1_lists_problems(messy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = ds.main(["lint", str(messy), "--trigger-word", TRIGGER, "--batch-size", "2", "--epochs", "3"])
    out = capsys.readouterr().out
    assert code == 1
    assert "NOT USABLE (5 problem(s))" in out
    assert "steps per epoch: 60" in out and "total steps: 180" in out
    assert "10_mystyle person/orphan.txt: caption without an image of the same name [orphan-caption]" in out


def test_cli_exit_0_with_warnings_only_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pair(tmp_path / "2_mystyle", "a", "mystyle, a")
    image(tmp_path / "2_mystyle" / "small.png", (16, 16))
    caption(tmp_path / "2_mystyle" / "small.txt", "mystyle, small")

    code = ds.main(["lint", str(tmp_path), "--trigger-word", TRIGGER, "--json"])
    data = json.loads(capsys.readouterr().out)

    assert code == 0
    assert data["ok"] is True
    assert [w["kind"] for w in data["warnings"]] == ["small-image"]
    assert (data["steps_per_epoch"], data["total_steps"]) == (4, 4)


def test_cli_fix_then_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pair(tmp_path / "1_mystyle", "a", "portrait")
    assert ds.main(["lint", str(tmp_path), "--trigger-word", TRIGGER]) == 1
    assert ds.main(["lint", str(tmp_path), "--trigger-word", TRIGGER, "--fix"]) == 0
    assert "fixed: 1_mystyle/a.txt: prepended the trigger word to the front" in capsys.readouterr().out
    assert ds.main(["lint", str(tmp_path), "--trigger-word", TRIGGER]) == 0


def test_cli_rejects_bad_numbers(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ds.main(["lint", str(tmp_path), "--trigger-word", TRIGGER, "--batch-size", "0"])
    assert exit_info.value.code == 2


def test_add_parser_registers_dataset_lint(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="sd-operator")
    ds.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["dataset", "lint", str(tmp_path), "--trigger-word", "w", "--caption-extension", ".caption"]
    )
    assert (args.path, args.trigger_word, args.caption_extension, args.batch_size, args.epochs) == (
        str(tmp_path),
        "w",
        ".caption",
        1,
        1,
    )
    assert args.func is ds.lint_command


def test_python_dash_m_runs_the_command(messy: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "sd_operator.training.dataset", "lint", str(messy), "--trigger-word", TRIGGER, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 1, run.stderr
    assert json.loads(run.stdout)["ok"] is False
