"""The trainer held against the real kohya-ss sd-scripts, as recorded in tests/fixtures/real/sd-scripts/.

The record (flags with nargs, types and choices; the free-text values get_optimizer and get_scheduler_fix check;
the dataset TOML schema of library/config_util.py) was read from sd-scripts at the commit the trainer image pins.
Every command line the trainer can build, over every family, GPU size, optimizer, scheduler, precision and option
the LoRAJob API allows, must parse with the real parser and pass the real runtime checks; every dataset TOML it
writes must validate against the real schema; and the stand-in scripts the other tests run must refuse what the
real ones refuse.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.numpy import save_file

from sd_operator.api.lorajob import LRScheduler, MixedPrecision, Optimizer, Training
from sd_operator.api.models import ModelFamily
from sd_operator.training.args import SCRIPTS, effective_training, sd_scripts_command
from sd_operator.training.dataset import SubsetInfo, dataset_toml, lint, subsets_from_spec

ROOT = Path(__file__).resolve().parents[2]
RECORD = ROOT / "tests" / "fixtures" / "real" / "sd-scripts"
FAKE = ROOT / "tests" / "fixtures" / "fake_sd_scripts"
DOCKERFILE = ROOT / "images" / "trainer" / "Dockerfile"
CRD = ROOT / "crds" / "sd-operator.dev_lorajobs.yaml"


def _interface() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sd_scripts_interface", FAKE / "sd_scripts_interface.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("sd_scripts_interface", module)
    spec.loader.exec_module(module)
    return module


real = _interface()
FAMILIES = [ModelFamily.SD15, ModelFamily.SD2, ModelFamily.SDXL]
GPU_SIZES = [None, 6, 8, 12, 16, 24, 80]


@pytest.fixture(autouse=True)
def _default_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SD_SCRIPTS_DIR", raising=False)
    monkeypatch.delenv("SD_TRAIN_LAUNCHER", raising=False)


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    return {script: real.build_parser(script) for script in real.SCRIPTS}


def training(**spec: Any) -> Training:
    return Training.model_validate(spec)


def trainer_argv(spec: Training, family: ModelFamily, gpu: int | None) -> tuple[str, list[str]]:
    """(script name, its arguments) exactly as `sd-operator train` starts it."""
    eff, _ = effective_training(spec, family, gpu)
    cmd = sd_scripts_command(
        eff,
        family=family,
        pretrained_model="/models/base.safetensors",
        dataset_config="/work/dataset.toml",
        output_dir="/out",
        output_name="mystyle",
        caption_extension=".txt",
        logging_dir="/work/logs",
        extra_args=spec.extra_args or (),
    )
    script_at = next(i for i, arg in enumerate(cmd) if arg.endswith(".py"))
    return Path(cmd[script_at]).name, cmd[script_at + 1 :]


def api_allows(spec: dict[str, Any]) -> bool:
    """The LoRAJob CRD's CEL rules on training that the local pydantic parse does not run (the test below checks
    that the CRD has them)."""
    return spec.get("lrScheduler") != "adafactor" or spec.get("optimizer") == "AdaFactor"


def parse_and_check(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The real parser's verdict, then the checks sd-scripts makes when training starts."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed why on stderr
        raise AssertionError(f"sd-scripts' parser refuses {argv}") from e
    refused = real.optimizer_scheduler_refusal(args)
    assert refused is None, f"sd-scripts would stop at {refused.exception} for {argv}"
    return args


# --- the record itself ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["train_network_flags.json", "sdxl_train_network_flags.json", "dataset_config_schema.json"]
)
def test_each_record_says_where_it_came_from_and_matches_the_pinned_commit(name: str) -> None:
    record = json.loads((RECORD / name).read_text(encoding="utf-8"))
    source = record["source"]
    assert source["repository"] == "https://github.com/kohya-ss/sd-scripts"
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    assert source["paths"] and all(isinstance(p, str) for p in source["paths"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", source["date_read"])
    # The trainer image builds exactly the commit the record was read at.
    pins = re.findall(r"^ARG SD_SCRIPTS_COMMIT=(\S+)$", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)
    assert pins and set(pins) == {source["commit"]}


def test_the_sdxl_script_has_the_sd_flags_plus_its_own() -> None:
    sd, sdxl = real.flag_names("train_network.py"), real.flag_names("sdxl_train_network.py")
    assert sd < sdxl
    assert sdxl - sd == {
        "--cache_text_encoder_outputs",
        "--cache_text_encoder_outputs_to_disk",
        "--disable_mmap_load_safetensors",
    }


def test_recorded_choices_are_sd_scripts_own() -> None:
    flags = {f["flag"]: f for f in real.flags_record("train_network.py")["flags"]}
    assert flags["--mixed_precision"]["choices"] == ["no", "fp16", "bf16"]
    assert flags["--save_precision"]["choices"] == [None, "float", "fp16", "bf16"]
    assert flags["--save_model_as"]["choices"] == [None, "ckpt", "pt", "safetensors"]
    # Free text at the parser, checked later by get_optimizer / get_scheduler_fix.
    for free in ("--optimizer_type", "--lr_scheduler", "--network_module"):
        assert flags[free]["choices"] is None and flags[free]["type"] == "str"
    assert flags["--text_encoder_lr"]["nargs"] == "*"
    assert flags["--lr_warmup_steps"]["type"] == "int_or_float"


# --- every command line the trainer builds ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_every_optimizer_scheduler_precision_and_gpu_size_is_accepted(
    family: ModelFamily, parsers: dict[str, argparse.ArgumentParser]
) -> None:
    script = SCRIPTS[family]
    checked = 0
    for gpu, optimizer, scheduler, precision in itertools.product(
        GPU_SIZES, Optimizer, [None, *LRScheduler], MixedPrecision
    ):
        spec: dict[str, Any] = {"optimizer": optimizer.value, "mixedPrecision": precision.value}
        if scheduler is not None:
            spec["lrScheduler"] = scheduler.value
        if not api_allows(spec):
            continue
        name, argv = trainer_argv(training(**spec), family, gpu)
        assert name == script
        args = parse_and_check(parsers[script], argv)
        assert args.mixed_precision == precision.value
        assert args.optimizer_type.lower() in real.optimizer_names()
        assert (
            args.network_module
            in real.flags_record(script)["free_text_values"]["--network_module"][
                "modules_with_create_network_at_commit"
            ]
        )
        assert args.save_model_as == "safetensors"
        assert not (family is ModelFamily.SDXL and args.v2)  # sdxl_train_network.py asserts v2 is off
        checked += 1
    # Every combination but the adafactor schedule with another optimizer (the CRD refuses that).
    per_size = len(Optimizer) * (len(LRScheduler) + 1) - (len(Optimizer) - 1)
    assert checked == len(GPU_SIZES) * len(MixedPrecision) * per_size


OPTIONS: list[dict[str, Any]] = [
    {},
    {"networkDim": 128, "networkAlpha": 1.5, "learningRate": 5e-5, "unetLr": 2e-4, "textEncoderLr": 5e-5},
    {"lrWarmupSteps": 50, "lrScheduler": "constant"},
    {"lrWarmupSteps": 50, "lrScheduler": "cosine_with_restarts", "lrSchedulerNumCycles": 7},
    {"lrWarmupSteps": 50, "optimizer": "AdaFactor"},
    {"lrWarmupSteps": 50, "optimizer": "AdaFactor", "lrScheduler": "adafactor"},
    {"lrWarmupSteps": 5, "optimizer": "AdaFactor", "lrScheduler": "cosine_with_restarts"},
    {"optimizer": "AdaFactor", "lrScheduler": "cosine", "extraArgs": ["--optimizer_args", "relative_step=False"]},
    {"optimizer": "Prodigy", "lrWarmupSteps": 10},
    {"optimizer": "DAdaptAdam", "learningRate": 0.5, "lrScheduler": "linear"},
    {"gradientCheckpointing": False, "resolution": 2048, "maxGradNorm": 0, "seed": 0, "saveEveryNEpochs": 1},
    {"epochs": 1000, "batchSize": 64, "networkDim": 1024, "lrScheduler": "polynomial"},
    {"extraArgs": ["--clip_skip=2", "--noise_offset=0.05", "--min_snr_gamma=5", "--xformers"]},
    {"extraArgs": ["--network_args", "conv_dim=4", "conv_alpha=1", "--v_parameterization", "--flip_aug"]},
]


@pytest.mark.parametrize("family", FAMILIES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
@pytest.mark.parametrize("gpu", [None, 8, 24])
def test_every_option_the_api_allows_is_accepted(
    family: ModelFamily, options: dict[str, Any], gpu: int | None, parsers: dict[str, argparse.ArgumentParser]
) -> None:
    spec = training(**options)
    name, argv = trainer_argv(spec, family, gpu)
    args = parse_and_check(parsers[name], argv)
    if "unetLr" in options:
        assert (args.unet_lr, args.text_encoder_lr) == (options["unetLr"], [options["textEncoderLr"]])
    if family is ModelFamily.SD2:
        assert args.v2


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_every_flag_the_trainer_passes_is_a_real_flag_with_the_right_arity(family: ModelFamily) -> None:
    """Not just "parses": each flag is written whole (no reliance on argparse's prefix matching), a switch
    carries no value and a valued flag carries exactly one."""
    record = {f["flag"]: f for f in real.flags_record(SCRIPTS[family])["flags"]}
    spec = training(unetLr=1e-4, textEncoderLr=1e-5, seed=1, saveEveryNEpochs=2, lrScheduler="cosine_with_restarts")
    _, argv = trainer_argv(spec, family, None)
    for arg in argv:
        name, has_value = arg.split("=", 1)[0], "=" in arg
        assert name in record, f"{name} is not a flag of {SCRIPTS[family]}"
        flag = record[name]
        assert has_value == (flag["action"] == "store"), arg


def test_notes_name_only_real_flags() -> None:
    """The trainer's advice ("add --v_parameterization to extraArgs") must name flags that exist."""
    flags = real.flag_names("sdxl_train_network.py")
    advised: set[str] = set()
    for family, options in itertools.product(FAMILIES, OPTIONS):
        _, notes = effective_training(training(**options), family, 6)
        for note in notes:
            advised |= set(re.findall(r"'(--[a-z0-9_]+)", note))
    assert advised >= {"--v_parameterization", "--optimizer_args"}
    assert advised <= flags


@pytest.mark.parametrize(
    ("options", "scheduler", "warmup"),
    [
        ({"lrScheduler": "constant", "lrWarmupSteps": 100}, "constant_with_warmup", 100),
        ({"optimizer": "AdaFactor"}, "adafactor", 0),
        ({"optimizer": "AdaFactor", "lrScheduler": "linear", "lrWarmupSteps": 10}, "adafactor", 0),
        ({"optimizer": "Prodigy"}, "constant", 0),
        ({"optimizer": "DAdaptAdam", "lrWarmupSteps": 5}, "constant_with_warmup", 5),
    ],
)
def test_schedules_sd_scripts_would_refuse_become_ones_it_runs(
    options: dict[str, Any], scheduler: str, warmup: int
) -> None:
    eff, notes = effective_training(training(**options), ModelFamily.SD15, None)
    assert (eff.lr_scheduler.value, eff.lr_warmup_steps) == (scheduler, warmup)
    if "lrWarmupSteps" in options or "lrScheduler" in options:
        assert notes, "a changed schedule is always explained"


def test_adaptive_optimizers_get_the_learning_rate_sd_scripts_wants() -> None:
    for optimizer in ("DAdaptAdam", "Prodigy"):
        eff, notes = effective_training(training(optimizer=optimizer), ModelFamily.SDXL, 24)
        assert (eff.learning_rate, eff.lr_scheduler) == (1.0, LRScheduler.CONSTANT)
        assert any("learning rate 1" in n for n in notes)
        # A learning rate get_optimizer calls too low is kept (explicit) but explained.
        eff, notes = effective_training(training(optimizer=optimizer, learningRate=1e-4), ModelFamily.SDXL, 24)
        assert eff.learning_rate == 1e-4
        assert any("too low" in n for n in notes)
    eff, _ = effective_training(training(), ModelFamily.SDXL, 24)
    assert (eff.learning_rate, eff.lr_scheduler) == (1e-4, LRScheduler.COSINE_WITH_RESTARTS)


def _crd_rules(field: str) -> list[str]:
    """The CEL rules on spec.<field> of the LoRAJob CRD."""
    crd = yaml.safe_load(CRD.read_text(encoding="utf-8"))
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return [v["rule"] for v in spec["properties"][field].get("x-kubernetes-validations", [])]


def test_the_adafactor_schedule_without_the_adafactor_optimizer_is_refused_before_training() -> None:
    """sd-scripts asserts it after loading the model; the CRD refuses it at admission and the trainer at start."""
    assert any("self.lrScheduler != 'adafactor'" in rule for rule in _crd_rules("training"))
    eff, _ = effective_training(training(lrScheduler="adafactor"), ModelFamily.SD15, None)
    with pytest.raises(ValueError, match="works only with optimizer AdaFactor"):
        sd_scripts_command(
            eff,
            family=ModelFamily.SD15,
            pretrained_model="m",
            dataset_config="d",
            output_dir="o",
            output_name="n",
            caption_extension=".txt",
        )


def test_families_without_a_trainer_are_refused_at_admission() -> None:
    allowed = set(SCRIPTS)
    assert allowed == {ModelFamily.SD15, ModelFamily.SD2, ModelFamily.SDXL}
    assert "self.family != 'sd3'" in _crd_rules("baseModel")
    assert set(ModelFamily) - allowed == {ModelFamily.SD3}


# --- the image has what each optimizer imports -----------------------------------------------------------------

# An optimizer the API offers whose package the pinned image does not install. Remove the entry once the image
# installs it (the test then says so).
IMAGE_GAPS: dict[str, str] = {}


def _image_packages() -> set[str]:
    """Packages the trainer image installs: sd-scripts' requirements.txt (recorded) and the Dockerfile's own."""
    requirements = real.flags_record("train_network.py")["requirements"]["packages"]
    names = {re.split(r"[=<>\[]", r, maxsplit=1)[0].lower() for r in requirements if not r.startswith("-")}
    text = DOCKERFILE.read_text(encoding="utf-8")
    names |= {m.lower() for m in re.findall(r'"([A-Za-z0-9_.-]+)==\$\{', text)}
    return names


@pytest.mark.parametrize("optimizer", list(Optimizer), ids=str)
def test_the_trainer_image_installs_what_each_optimizer_imports(optimizer: Optimizer) -> None:
    package = real.optimizer_names()[optimizer.value.lower()]["package"]
    installed = package in _image_packages()
    if optimizer.value in IMAGE_GAPS:
        assert not installed, f"images/trainer now installs {package}: drop {optimizer.value} from IMAGE_GAPS"
        pytest.xfail(f"images/trainer does not install {package}: sd-scripts raises 'No {package}' at the start")
    assert installed, f"{optimizer.value} needs {package}, which images/trainer does not install"


# --- every dataset TOML the trainer writes ----------------------------------------------------------------------


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (10, 20, 30)).save(path)
    path.with_suffix(".txt").write_text("mystyle, a square\n", encoding="utf-8")


SPEC_SUBSETS: list[dict[str, Any]] = [
    {"path": "100_mystyle", "repeats": 100},
    {"path": "10_x", "repeats": 10, "classTokens": 'a "quoted" \\ backslash, ünïcode ✓', "keepTokens": 2},
    {"path": "reg/1_person", "repeats": 1, "classTokens": "person", "isReg": True, "keepTokens": 0},
    {"path": "5_tab\tname", "repeats": 5, "classTokens": ""},
]


def _written_tomls(root: Path) -> list[str]:
    """The TOMLs train.py writes: from discovered folders and from explicit subsets, for each family's
    resolutions, batch sizes and caption extensions."""
    for folder in ("100_mystyle", "10_a 'quoted' folder", "reg/1_person", "3_ünïcode ✓"):
        _png(root / folder / "img.png")
    discovered = lint(root, trigger_word="mystyle").subsets
    explicit = subsets_from_spec(root, SPEC_SUBSETS)
    assert discovered and all(isinstance(s, SubsetInfo) for s in discovered)
    out = []
    for subsets, family, gpu, batch, ext in itertools.product(
        [discovered, explicit, []], FAMILIES, [None, 8, 12], [1, 64], [".txt", ".caption"]
    ):
        eff, _ = effective_training(training(batchSize=batch), family, gpu)
        out.append(
            dataset_toml(
                subsets,
                root=root,
                resolution=eff.resolution,
                batch_size=eff.batch_size,
                caption_extension=ext,
                keep_tokens=1,
            )
        )
    return out


def test_every_dataset_toml_the_trainer_writes_validates_against_the_real_schema(tmp_path: Path) -> None:
    tomls = _written_tomls(tmp_path / "dataset")
    assert len(tomls) == 3 * 3 * 3 * 2 * 2
    for text in tomls:
        config = tomllib.loads(text)
        assert real.dataset_config_errors(config) == [], text
        # One DreamBooth-style dataset with the caption extension written out (sd-scripts' default is .caption).
        assert len(config["datasets"]) == 1
        assert config["general"]["caption_extension"] in {".txt", ".caption"}
        for subset in config["datasets"][0].get("subsets", []):
            assert "metadata_file" not in subset and Path(subset["image_dir"]).is_absolute()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"general": {"repeats": 1}}, "extra keys not allowed @ data['general']['repeats']"),
        ({"datasets": [{"is_reg": True}]}, "extra keys not allowed @ data['datasets'][0]['is_reg']"),
        (
            {"datasets": [{"subsets": [{"image_dir": "/d", "num_repeats": "3"}]}]},
            "expected int for dictionary value @ data['datasets'][0]['subsets'][0]['num_repeats']",
        ),
        (
            {"datasets": [{"subsets": [{"num_repeats": 3}]}]},
            "required key not provided @ data['datasets'][0]['subsets'][0]['image_dir']",
        ),
        (
            {"general": {"shuffle_caption": 1}},
            "expected bool for dictionary value @ data['general']['shuffle_caption']",
        ),
        (
            {"datasets": [{"validation_split": 0}]},
            "expected float for dictionary value @ data['datasets'][0]['validation_split']",
        ),
        (
            {"datasets": [{"resolution": [512]}]},
            "expected int for dictionary value @ data['datasets'][0]['resolution']",
        ),
        (
            {"datasets": [{"caption_extension": ".txt"}]},
            "extra keys not allowed @ data['datasets'][0]['caption_extension']",
        ),
        ({"sample": {}}, "extra keys not allowed @ data['sample']"),
    ],
)
def test_the_schema_validator_refuses_as_sd_scripts_does(config: dict[str, Any], message: str) -> None:
    """Messages as sd-scripts' ConfigSanitizer (voluptuous 0.15.2) words them, recorded by running it."""
    assert real.dataset_config_errors(config)[0] == message


# --- the stand-ins refuse what the real scripts refuse ------------------------------------------------------------


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(FAKE / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "FAKE_STEP_SECONDS": "0"},
    )


def _last(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.fixture
def job(tmp_path: Path) -> dict[str, Path]:
    """A base model, a one-image dataset and its TOML, as the wrapper would set them up."""
    model = tmp_path / "base.safetensors"
    save_file({"w": np.ones((2, 2), dtype=np.float32)}, str(model))
    _png(tmp_path / "data" / "10_mystyle" / "img.png")
    subsets = [SubsetInfo("10_mystyle", 10)]
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        dataset_toml(
            subsets, root=tmp_path / "data", resolution=512, batch_size=1, caption_extension=".txt", keep_tokens=1
        ),
        encoding="utf-8",
    )
    return {"dir": tmp_path, "model": model, "toml": toml, "out": tmp_path / "out"}


def _args(job: dict[str, Path], *extra: str, toml: Path | None = None) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={job['model']}",
        f"--dataset_config={toml or job['toml']}",
        f"--output_dir={job['out']}",
        "--output_name=mystyle",
        "--max_train_epochs=1",
        *extra,
    ]


@pytest.mark.parametrize("script", ["train_network.py", "sdxl_train_network.py"])
@pytest.mark.parametrize(
    ("flag", "error"),
    [
        ("--no_such_flag=1", "error: unrecognized arguments: --no_such_flag=1"),
        (
            "--mixed_precision=fp32",
            "error: argument --mixed_precision: invalid choice: 'fp32' (choose from 'no', 'fp16', 'bf16')",
        ),
        (
            "--save_model_as=onnx",
            "error: argument --save_model_as: invalid choice: 'onnx' (choose from None, 'ckpt', 'pt', 'safetensors')",
        ),
        ("--network_dim=x", "error: argument --network_dim: invalid int value: 'x'"),
        ("--lr_warmup_steps=1.5", "error: argument --lr_warmup_steps: '1.5' is not an int or float"),
        (
            "--max_token_length=300",
            "error: argument --max_token_length: invalid choice: 300 (choose from None, 150, 225)",
        ),
    ],
)
def test_the_stand_in_refuses_flags_like_argparse_in_sd_scripts(
    script: str, flag: str, error: str, job: dict[str, Path]
) -> None:
    done = _run(script, *_args(job, flag), cwd=job["dir"])
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(f"usage: {script} [-h]")
    assert _last(done.stderr) == f"{script}: {error}"
    assert not job["out"].exists()


def test_sdxl_only_flags_are_refused_by_train_network(job: dict[str, Path]) -> None:
    done = _run("train_network.py", *_args(job, "--cache_text_encoder_outputs"), cwd=job["dir"])
    assert done.returncode == 2
    assert _last(done.stderr) == "train_network.py: error: unrecognized arguments: --cache_text_encoder_outputs"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.replace("[general]\n", "[general]\nrepeats = 3\n"),
            "extra keys not allowed @ data['general']['repeats']",
        ),
        (
            lambda t: t.replace("num_repeats = 10", 'num_repeats = "10"'),
            "expected int for dictionary value @ data['datasets'][0]['subsets'][0]['num_repeats']",
        ),
        (
            lambda t: t.replace("resolution = 512", "resolution = 512.0"),
            "expected int for dictionary value @ data['datasets'][0]['resolution']",
        ),
        (
            lambda t: t.replace("image_dir", "folder"),
            "extra keys not allowed @ data['datasets'][0]['subsets'][0]['folder']",
        ),
    ],
)
def test_the_stand_in_refuses_an_invalid_dataset_toml_like_sd_scripts(
    edit: Any, message: str, job: dict[str, Path]
) -> None:
    bad = job["dir"] / "bad.toml"
    bad.write_text(edit(job["toml"].read_text(encoding="utf-8")), encoding="utf-8")
    done = _run("train_network.py", *_args(job, toml=bad), cwd=job["dir"])
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ERROR    Invalid user config / ユーザ設定の形式が正しくないようです" in done.stderr
    assert "Traceback (most recent call last):" in done.stderr
    assert _last(done.stderr) == f"voluptuous.error.MultipleInvalid: {message}"
    assert "running training" not in done.stdout


def test_the_stand_in_refuses_an_unparsable_or_missing_config(job: dict[str, Path]) -> None:
    broken = job["dir"] / "broken.toml"
    broken.write_text("[general\n", encoding="utf-8")
    done = _run("train_network.py", *_args(job, toml=broken), cwd=job["dir"])
    assert done.returncode == 1
    assert "Error on parsing TOML config file" in done.stderr
    assert _last(done.stderr).startswith("toml.decoder.TomlDecodeError: ")
    done = _run("train_network.py", *_args(job, toml=job["dir"] / "dataset.yaml"), cwd=job["dir"])
    assert _last(done.stderr).startswith("ValueError: file not found / ファイルが見つかりません: ")


@pytest.mark.parametrize(
    ("script", "flags", "exception"),
    [
        (
            "train_network.py",
            ["--lr_scheduler=cosine_restarts"],
            "ValueError: cosine_restarts is not a valid SchedulerType",
        ),
        (
            "train_network.py",
            ["--lr_scheduler=constant", "--lr_warmup_steps=10"],
            "ValueError: SchedulerType.CONSTANT does not require `num_warmup_steps`. Set None or 0.",
        ),
        (
            "train_network.py",
            ["--lr_scheduler=adafactor"],
            "AssertionError: adafactor scheduler must be used with Adafactor",
        ),
        (
            "train_network.py",
            ["--optimizer_type=AdaFactor", "--lr_warmup_steps=10"],
            "ValueError: adafactor:2e-06 does not require `num_warmup_steps`. Set None or 0.",
        ),
        ("train_network.py", ["--optimizer_type=DAdaptAdamW"], "ValueError: Unknown optimizer type: dadaptadamw"),
        ("sdxl_train_network.py", ["--v2"], "AssertionError: v2 cannot be enabled in SDXL training"),
    ],
)
def test_the_stand_in_stops_where_sd_scripts_stops_once_training_starts(
    script: str, flags: list[str], exception: str, job: dict[str, Path]
) -> None:
    done = _run(script, *_args(job, *flags), cwd=job["dir"])
    assert done.returncode == 1, done.stdout + done.stderr
    assert _last(done.stderr).startswith(exception)
    assert "running training" not in done.stdout


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_the_stand_in_still_trains_on_what_the_trainer_builds(family: ModelFamily, job: dict[str, Path]) -> None:
    spec = training(optimizer="AdaFactor", lrWarmupSteps=10, saveEveryNEpochs=1, epochs=2, unetLr=1e-4)
    name, argv = trainer_argv(spec, family, 8)
    argv = [
        a
        for a in argv
        if not a.startswith(
            ("--pretrained_model_name_or_path=", "--dataset_config=", "--output_dir=", "--logging_dir=")
        )
    ]
    done = _run(name, *_args(job), *argv, cwd=job["dir"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "running training / 学習開始" in done.stdout
    assert sorted(p.name for p in job["out"].iterdir()) == ["mystyle-000001.safetensors", "mystyle.safetensors"]
