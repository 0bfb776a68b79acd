from __future__ import annotations

from typing import Any

import pytest

from sd_operator.api.lorajob import LRScheduler, MixedPrecision, Optimizer, Training
from sd_operator.api.models import ModelFamily
from sd_operator.training.args import EffectiveTraining, effective_training, sd_scripts_command

SD15, SD2, SDXL = ModelFamily.SD15, ModelFamily.SD2, ModelFamily.SDXL


@pytest.fixture(autouse=True)
def _default_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SD_SCRIPTS_DIR", raising=False)
    monkeypatch.delenv("SD_TRAIN_LAUNCHER", raising=False)


def training(**spec: Any) -> Training:
    """A Training parsed from camelCase, as the controller reads it from the CR (so fields_set is real)."""
    return Training.model_validate(spec)


def command(eff: EffectiveTraining, family: ModelFamily = SD15, **kwargs: Any) -> list[str]:
    return sd_scripts_command(
        eff,
        family=family,
        pretrained_model="/models/base.safetensors",
        dataset_config="/work/dataset.toml",
        output_dir="/out",
        output_name="mystyle",
        caption_extension=".txt",
        **kwargs,
    )


def flag_names(cmd: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in cmd if arg.startswith("--")]


# --- effective_training -------------------------------------------------------------------------------


def test_defaults_follow_what_works() -> None:
    eff, notes = effective_training(training(), SD15, None)
    assert eff.network_dim == 32
    assert eff.network_alpha == 16
    assert eff.learning_rate == 1e-4
    assert eff.lr_scheduler is LRScheduler.COSINE_WITH_RESTARTS
    assert eff.lr_scheduler_num_cycles == 3
    assert eff.optimizer is Optimizer.ADAMW8BIT
    assert eff.mixed_precision is MixedPrecision.FP16
    assert eff.gradient_checkpointing is True
    assert eff.resolution == 512
    assert notes == [
        "defaults: network alpha 16 (half of network dim 32), resolution 512 (SD 1.5 default), "
        "gradient checkpointing on"
    ]


@pytest.mark.parametrize(("family", "resolution"), [(SD15, 512), (SD2, 768), (SDXL, 1024)])
def test_resolution_default_per_family(family: ModelFamily, resolution: int) -> None:
    assert effective_training(training(), family, None)[0].resolution == resolution


@pytest.mark.parametrize(("dim", "alpha"), [(8, 4), (32, 16), (33, 16.5), (64, 32)])
def test_alpha_is_half_the_dim_when_unset(dim: int, alpha: float) -> None:
    assert effective_training(training(networkDim=dim), SD15, None)[0].network_alpha == alpha


def test_sdxl_on_12_gib_saves_memory_and_says_why() -> None:
    eff, notes = effective_training(training(), SDXL, 12)
    assert eff.optimizer is Optimizer.ADAMW8BIT
    assert eff.gradient_checkpointing is True
    assert eff.resolution == 768
    assert any(
        n.startswith("SDXL on a 12 GiB GPU (under 16 GiB): resolution 768, optimizer AdamW8bit, gradient checkpointing")
        for n in notes
    ), notes


def test_sdxl_on_24_gib_trains_at_1024() -> None:
    eff, notes = effective_training(training(), SDXL, 24)
    assert eff.resolution == 1024
    assert not any("GiB" in n for n in notes)


def test_sd15_on_6_gib_picks_the_memory_savers_too() -> None:
    eff, notes = effective_training(training(optimizer="AdamW"), SD15, 6)
    assert eff.resolution == 512
    assert eff.optimizer is Optimizer.ADAMW  # explicit wins...
    assert any("optimizer AdamW was set explicitly and may run out of memory" in n for n in notes)  # ...with a note


def test_explicit_spec_values_win_over_memory_aware_choices() -> None:
    spec = training(optimizer="Lion", gradientCheckpointing=False, resolution=1024, networkAlpha=8)
    eff, notes = effective_training(spec, SDXL, 12)
    assert eff.optimizer is Optimizer.LION
    assert eff.gradient_checkpointing is False
    assert eff.resolution == 1024
    assert eff.network_alpha == 8
    assert not any(n.startswith("defaults:") for n in notes)
    assert any("resolution 1024 was set explicitly" in n for n in notes)
    assert any("gradient checkpointing was turned off" in n for n in notes)


def test_explicit_default_valued_optimizer_is_still_explicit() -> None:
    # AdamW8bit written in the spec equals the default: nothing to warn about, nothing to choose.
    eff, notes = effective_training(training(optimizer="AdamW8bit", gradientCheckpointing=True), SDXL, 12)
    assert eff.optimizer is Optimizer.ADAMW8BIT
    assert any(n.endswith("resolution 768 so training fits in GPU memory") for n in notes), notes


def test_a_large_network_dim_gets_a_warning_note() -> None:
    _, notes = effective_training(training(networkDim=128), SD15, None)
    assert "network dim 128 tends to overfit: try dim 32 with more epochs and cosine_with_restarts" in notes
    _, notes = effective_training(training(networkDim=64), SD15, None)
    assert not any("overfit" in n for n in notes)


# --- sd_scripts_command --------------------------------------------------------------------------------


def test_sd15_command_uses_exact_sd_scripts_flags() -> None:
    eff, _ = effective_training(training(saveEveryNEpochs=2, seed=42), SD15, None)
    assert command(eff) == [
        "accelerate", "launch", "--num_cpu_threads_per_process", "1",
        "/opt/sd-scripts/train_network.py",
        "--pretrained_model_name_or_path=/models/base.safetensors",
        "--dataset_config=/work/dataset.toml",
        "--output_dir=/out",
        "--output_name=mystyle",
        "--save_model_as=safetensors",
        "--network_module=networks.lora",
        "--network_dim=32",
        "--network_alpha=16",
        "--learning_rate=0.0001",
        "--lr_scheduler=cosine_with_restarts",
        "--lr_scheduler_num_cycles=3",
        "--lr_warmup_steps=0",
        "--optimizer_type=AdamW8bit",
        "--max_train_epochs=10",
        "--train_batch_size=1",
        "--mixed_precision=fp16",
        "--gradient_checkpointing",
        "--max_grad_norm=1",
        "--seed=42",
        "--save_every_n_epochs=2",
        "--caption_extension=.txt",
        "--sdpa",
        "--cache_latents",
    ]  # fmt: skip


def test_sdxl_command_uses_the_sdxl_script() -> None:
    eff, _ = effective_training(training(unetLr=2e-4, textEncoderLr=5e-5), SDXL, 24)
    cmd = command(eff, SDXL)
    assert cmd[4] == "/opt/sd-scripts/sdxl_train_network.py"
    assert "--unet_lr=0.0002" in cmd
    assert "--text_encoder_lr=5e-05" in cmd
    assert "--v2" not in cmd
    # Unset optional values are left out rather than passed empty.
    assert "--seed" not in flag_names(cmd)
    assert "--save_every_n_epochs" not in flag_names(cmd)


def test_sd2_adds_v2_only() -> None:
    cmd = command(effective_training(training(), SD2, None)[0], SD2)
    assert "--v2" in cmd
    assert "--v_parameterization" not in cmd
    assert cmd[4].endswith("/train_network.py")


def test_every_flag_uses_the_equals_form_or_is_a_switch() -> None:
    cmd = command(effective_training(training(), SD15, None)[0])
    switches = {"--gradient_checkpointing", "--sdpa", "--cache_latents", "--num_cpu_threads_per_process"}
    for arg in cmd[5:]:
        assert arg.startswith("--")
        assert "=" in arg or arg in switches, arg


def test_caption_extension_is_always_explicit() -> None:
    eff, _ = effective_training(training(), SD15, None)
    cmd = sd_scripts_command(
        eff,
        family=SD15,
        pretrained_model="m",
        dataset_config="d",
        output_dir="o",
        output_name="n",
        caption_extension=".caption",
    )
    assert "--caption_extension=.caption" in cmd


@pytest.mark.parametrize("scheduler", ["constant", "cosine", "linear", "constant_with_warmup"])
def test_num_cycles_only_with_cosine_with_restarts(scheduler: str) -> None:
    cmd = command(effective_training(training(lrScheduler=scheduler, lrSchedulerNumCycles=5), SD15, None)[0])
    assert f"--lr_scheduler={scheduler}" in cmd
    assert "--lr_scheduler_num_cycles" not in flag_names(cmd)


def test_gradient_checkpointing_flag_only_when_on() -> None:
    cmd = command(effective_training(training(gradientCheckpointing=False), SD15, None)[0])
    assert "--gradient_checkpointing" not in cmd


def test_extra_args_come_last_and_logging_dir_is_optional() -> None:
    eff, _ = effective_training(training(), SD15, None)
    cmd = command(eff, extra_args=["--clip_skip=2", "--noise_offset=0.05"], logging_dir="/work/logs")
    assert cmd[-2:] == ["--clip_skip=2", "--noise_offset=0.05"]
    assert cmd[-3] == "--logging_dir=/work/logs"


def test_launcher_and_scripts_dir_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_SCRIPTS_DIR", "/src/sd-scripts")
    monkeypatch.setenv("SD_TRAIN_LAUNCHER", "/usr/bin/python3 -u")
    cmd = command(effective_training(training(), SDXL, None)[0], SDXL)
    assert cmd[:3] == ["/usr/bin/python3", "-u", "/src/sd-scripts/sdxl_train_network.py"]


def test_sd3_is_refused_with_a_clear_error() -> None:
    eff, _ = effective_training(training(), ModelFamily.SD3, None)
    with pytest.raises(ValueError, match="sd3 is not supported"):
        command(eff, ModelFamily.SD3)
