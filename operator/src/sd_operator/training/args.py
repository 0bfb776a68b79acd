"""What a LoRAJob's training section becomes: effective hyperparameters and the sd-scripts command line.

Pure functions: no I/O apart from reading two environment variables that say where sd-scripts lives and
how it is launched (so tests can point them at a stand-in trainer).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sd_operator.api.lorajob import LRScheduler, MixedPrecision, Optimizer, Training
from sd_operator.api.models import ModelFamily

SD_SCRIPTS_DIR = "/opt/sd-scripts"
# `--num_cpu_threads_per_process 1` is what sd-scripts' docs use: more threads per process only slow the
# data loader workers down and accelerate warns about it otherwise.
DEFAULT_LAUNCHER = ("accelerate", "launch", "--num_cpu_threads_per_process", "1")

DEFAULT_RESOLUTION = {ModelFamily.SD15: 512, ModelFamily.SD2: 768, ModelFamily.SDXL: 1024, ModelFamily.SD3: 1024}
# Below these sizes the family's usual settings run out of memory; the resolution is the one that still fits.
LOW_MEMORY_GIB = {ModelFamily.SD15: 8, ModelFamily.SD2: 8, ModelFamily.SDXL: 16, ModelFamily.SD3: 16}
LOW_MEMORY_RESOLUTION = {ModelFamily.SD15: 512, ModelFamily.SD2: 512, ModelFamily.SDXL: 768, ModelFamily.SD3: 768}
# Optimizers whose state is small enough for a small GPU (8-bit states, or factored second moments).
MEMORY_SAVING_OPTIMIZERS = {Optimizer.ADAMW8BIT, Optimizer.PAGED_ADAMW8BIT, Optimizer.LION8BIT, Optimizer.ADAFACTOR}
# Optimizers that find their own step size: sd-scripts (train_util.get_optimizer) warns that a learning rate at
# or below 0.1 is too low for them and recommends about 1.0; its docs recommend the constant schedule with them.
DEFAULT_LEARNING_RATE = 1e-4
DEFAULT_LR_SCHEDULER = LRScheduler.COSINE_WITH_RESTARTS
ADAPTIVE_OPTIMIZERS = {Optimizer.DADAPT_ADAM, Optimizer.PRODIGY}
ADAPTIVE_LEARNING_RATE = 1.0
ADAPTIVE_LOW_LEARNING_RATE = 0.1
OVERFIT_DIM = 64
SCRIPTS = {
    ModelFamily.SD15: "train_network.py",
    ModelFamily.SD2: "train_network.py",
    ModelFamily.SDXL: "sdxl_train_network.py",
}
_FAMILY_NAMES = {ModelFamily.SD15: "SD 1.5", ModelFamily.SD2: "SD 2", ModelFamily.SDXL: "SDXL", ModelFamily.SD3: "SD 3"}


@dataclass(frozen=True)
class EffectiveTraining:
    """The hyperparameters a run uses: the spec's values, with every unset one filled in."""

    network_dim: int
    network_alpha: float
    learning_rate: float
    unet_lr: float | None
    text_encoder_lr: float | None
    lr_scheduler: LRScheduler
    lr_scheduler_num_cycles: int
    lr_warmup_steps: int
    optimizer: Optimizer
    epochs: int
    batch_size: int
    resolution: int
    mixed_precision: MixedPrecision
    gradient_checkpointing: bool
    max_grad_norm: float
    seed: int | None
    save_every_n_epochs: int | None


def effective_training(
    training: Training, family: ModelFamily, gpu_memory_gib: int | None
) -> tuple[EffectiveTraining, list[str]]:
    """Fills unset hyperparameters; returns them and notes for a person saying what was chosen and why.

    "Explicit" means present in the spec (pydantic's fields_set): a value the user wrote wins over the
    memory-aware choice even when it equals the schema default. learningRate and lrScheduler have no schema
    default (the API server would write it into every object), so for them unset is None; their defaults depend
    on the optimizer, and values sd-scripts would refuse once training started are changed here, with a note.
    """
    explicit = training.model_fields_set
    notes: list[str] = []
    name = _FAMILY_NAMES.get(family, str(family))
    low_memory = gpu_memory_gib is not None and gpu_memory_gib < LOW_MEMORY_GIB[family]

    chosen: list[str] = []
    alpha = training.network_alpha
    if alpha is None:
        # dim/2 keeps the effective learning rate (lr * alpha/dim) the same whatever the rank.
        alpha = training.network_dim / 2
        chosen.append(f"network alpha {_num(alpha)} (half of network dim {training.network_dim})")

    optimizer = training.optimizer
    gradient_checkpointing = training.gradient_checkpointing
    resolution = training.resolution
    if low_memory:
        saving: list[str] = []
        if resolution is None:
            resolution = LOW_MEMORY_RESOLUTION[family]
            saving.append(f"resolution {resolution}")
        if "optimizer" not in explicit:
            optimizer = Optimizer.ADAMW8BIT
            saving.append("optimizer AdamW8bit")
        if gradient_checkpointing is None:
            gradient_checkpointing = True
            saving.append("gradient checkpointing")
        why = f"{name} on a {gpu_memory_gib} GiB GPU (under {LOW_MEMORY_GIB[family]} GiB)"
        if saving:
            notes.append(f"{why}: {', '.join(saving)} so training fits in GPU memory")
        # Explicit values win, but say that they may not fit: the OOM would otherwise come minutes later.
        if training.resolution is not None and training.resolution > LOW_MEMORY_RESOLUTION[family]:
            notes.append(f"{why}: resolution {training.resolution} was set explicitly and may run out of memory")
        if "optimizer" in explicit and optimizer not in MEMORY_SAVING_OPTIMIZERS:
            notes.append(f"{why}: optimizer {optimizer.value} was set explicitly and may run out of memory")
        if training.gradient_checkpointing is False:
            notes.append(f"{why}: gradient checkpointing was turned off and training may run out of memory")
    if resolution is None:
        resolution = DEFAULT_RESOLUTION[family]
        chosen.append(f"resolution {resolution} ({name} default)")
    if gradient_checkpointing is None:
        # On by default: ~20% slower, but the difference between fitting and OOM on most cards.
        gradient_checkpointing = True
        chosen.append("gradient checkpointing on")
    learning_rate, lr_scheduler, lr_warmup_steps = _schedule(training, optimizer, chosen, notes)
    if family is ModelFamily.SD2 and "--v_parameterization" not in (training.extra_args or ()):
        notes.append(
            "SD 2 trains with --v2; a 768-v model (SD 2.0-v, 2.1-768) also needs '--v_parameterization' in extraArgs"
        )
    if chosen:
        notes.insert(0, f"defaults: {', '.join(chosen)}")

    if training.network_dim > OVERFIT_DIM:
        notes.append(
            f"network dim {training.network_dim} tends to overfit: try dim 32 with more epochs and cosine_with_restarts"
        )

    eff = EffectiveTraining(
        network_dim=training.network_dim,
        network_alpha=alpha,
        learning_rate=learning_rate,
        unet_lr=training.unet_lr,
        text_encoder_lr=training.text_encoder_lr,
        lr_scheduler=lr_scheduler,
        lr_scheduler_num_cycles=training.lr_scheduler_num_cycles,
        lr_warmup_steps=lr_warmup_steps,
        optimizer=optimizer,
        epochs=training.epochs,
        batch_size=training.batch_size,
        resolution=resolution,
        mixed_precision=training.mixed_precision,
        gradient_checkpointing=gradient_checkpointing,
        max_grad_norm=training.max_grad_norm,
        seed=training.seed,
        save_every_n_epochs=training.save_every_n_epochs,
    )
    return eff, notes


def _schedule(
    training: Training, optimizer: Optimizer, chosen: list[str], notes: list[str]
) -> tuple[float, LRScheduler, int]:
    """Learning rate, schedule and warm-up steps that sd-scripts runs as meant with this optimizer (appends to
    chosen and notes what it picked or changed)."""
    learning_rate = training.learning_rate
    lr_scheduler = training.lr_scheduler
    lr_warmup_steps = training.lr_warmup_steps
    adaptive = optimizer in ADAPTIVE_OPTIMIZERS
    if learning_rate is None:
        learning_rate = ADAPTIVE_LEARNING_RATE if adaptive else DEFAULT_LEARNING_RATE
        if adaptive:
            chosen.append(f"learning rate 1 ({optimizer.value} adapts the step size; sd-scripts wants about 1)")
    elif adaptive and learning_rate <= ADAPTIVE_LOW_LEARNING_RATE:
        notes.append(
            f"learning rate {_num(learning_rate)} is too low for {optimizer.value}, which adapts the step size: "
            "sd-scripts recommends about 1"
        )
    if adaptive and (training.unet_lr is not None or training.text_encoder_lr is not None):
        notes.append(
            f"{optimizer.value} keeps one step size: sd-scripts uses only the first of learningRate, unetLr and "
            "textEncoderLr it is given"
        )
    if lr_scheduler is None:
        lr_scheduler = LRScheduler.CONSTANT if adaptive else DEFAULT_LR_SCHEDULER
        if adaptive:
            chosen.append(f"lr scheduler constant ({optimizer.value} adapts the step size)")
    if optimizer is Optimizer.ADAFACTOR and adafactor_relative_step(training.extra_args):
        # sd-scripts' get_optimizer replaces --lr_scheduler with its adafactor schedule whenever Adafactor runs with
        # relative_step (its default), and that schedule refuses warm-up steps.
        if training.lr_scheduler is not None and lr_scheduler is not LRScheduler.ADAFACTOR:
            notes.append(
                f"optimizer AdaFactor sets its own step size, so sd-scripts uses the adafactor schedule instead of "
                f"{lr_scheduler.value} (add '--optimizer_args relative_step=False' to extraArgs to keep "
                f"{lr_scheduler.value})"
            )
        lr_scheduler = LRScheduler.ADAFACTOR
        if lr_warmup_steps:
            notes.append(
                f"optimizer AdaFactor: the adafactor schedule has no warm-up, so lrWarmupSteps {lr_warmup_steps} "
                "is not used"
            )
            lr_warmup_steps = 0
    if lr_scheduler is LRScheduler.CONSTANT and lr_warmup_steps:
        # sd-scripts refuses warm-up steps with the constant schedule ("does not require `num_warmup_steps`").
        lr_scheduler = LRScheduler.CONSTANT_WITH_WARMUP
        notes.append(f"lr scheduler constant_with_warmup: constant has no warm-up ({lr_warmup_steps} warm-up steps)")
    return learning_rate, lr_scheduler, lr_warmup_steps


def adafactor_relative_step(extra_args: Sequence[str] | None) -> bool:
    """Whether Adafactor would run with relative_step: sd-scripts' default, unless extraArgs pass
    `--optimizer_args ... relative_step=False ...` (each value is read with ast.literal_eval there)."""
    for arg in extra_args or ():
        value = arg.removeprefix("--optimizer_args=").replace(" ", "")
        if value == "relative_step=False":
            return False
    return True


def launcher() -> list[str]:
    """`accelerate launch ...`, or SD_TRAIN_LAUNCHER (e.g. a plain python) where accelerate is not installed."""
    override = os.environ.get("SD_TRAIN_LAUNCHER", "").strip()
    return shlex.split(override) if override else list(DEFAULT_LAUNCHER)


def training_script(family: ModelFamily, scripts_dir: str | None = None) -> str:
    """The sd-scripts entry point for a family, under SD_SCRIPTS_DIR (default /opt/sd-scripts)."""
    if family not in SCRIPTS:
        # sd3_train_network.py needs separate CLIP-L/CLIP-G/T5 files and other flags; not wired up yet.
        raise ValueError(f"LoRA training for model family {family.value} is not supported (sd15, sd2, sdxl are)")
    base = scripts_dir or os.environ.get("SD_SCRIPTS_DIR") or SD_SCRIPTS_DIR
    return str(Path(base) / SCRIPTS[family])


def sd_scripts_command(
    eff: EffectiveTraining,
    *,
    family: ModelFamily,
    pretrained_model: str,
    dataset_config: str,
    output_dir: str,
    output_name: str,
    caption_extension: str,
    logging_dir: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The full trainer command line. Flags use sd-scripts' exact names in `--flag=value` form, so a value
    that starts with '-' can never be read as a flag. ValueError for what sd-scripts would refuse only after
    loading the model."""
    if eff.lr_scheduler is LRScheduler.ADAFACTOR and not (
        eff.optimizer is Optimizer.ADAFACTOR and adafactor_relative_step(extra_args)
    ):
        # get_scheduler_fix asserts the Adafactor optimizer and reads the initial lr that get_optimizer appends
        # ("adafactor:<lr>") only when Adafactor runs with relative_step.
        raise ValueError(
            "lr scheduler adafactor works only with optimizer AdaFactor at its default relative_step "
            f"(optimizer {eff.optimizer.value}): choose another lrScheduler"
        )
    flags = [
        f"--pretrained_model_name_or_path={pretrained_model}",
        f"--dataset_config={dataset_config}",
        f"--output_dir={output_dir}",
        f"--output_name={output_name}",
        "--save_model_as=safetensors",
        "--network_module=networks.lora",
        f"--network_dim={eff.network_dim}",
        # sd-scripts defaults alpha to 1, which silently shrinks the LoRA's effect: always pass ours.
        f"--network_alpha={_num(eff.network_alpha)}",
        f"--learning_rate={_num(eff.learning_rate)}",
    ]
    if eff.unet_lr is not None:
        flags.append(f"--unet_lr={_num(eff.unet_lr)}")
    if eff.text_encoder_lr is not None:
        flags.append(f"--text_encoder_lr={_num(eff.text_encoder_lr)}")
    flags.append(f"--lr_scheduler={eff.lr_scheduler.value}")
    if eff.lr_scheduler is LRScheduler.COSINE_WITH_RESTARTS:
        flags.append(f"--lr_scheduler_num_cycles={eff.lr_scheduler_num_cycles}")
    flags += [
        f"--lr_warmup_steps={eff.lr_warmup_steps}",
        f"--optimizer_type={eff.optimizer.value}",
        f"--max_train_epochs={eff.epochs}",
        f"--train_batch_size={eff.batch_size}",
        f"--mixed_precision={eff.mixed_precision.value}",
    ]
    if eff.gradient_checkpointing:
        flags.append("--gradient_checkpointing")
    flags.append(f"--max_grad_norm={_num(eff.max_grad_norm)}")
    if eff.seed is not None:
        flags.append(f"--seed={eff.seed}")
    if eff.save_every_n_epochs is not None:
        flags.append(f"--save_every_n_epochs={eff.save_every_n_epochs}")
    # Always explicit: sd-scripts' default is .caption, and a mismatch trains on class tokens only, silently.
    flags.append(f"--caption_extension={caption_extension}")
    flags += ["--sdpa", "--cache_latents"]
    if family is ModelFamily.SD2:
        flags.append("--v2")
    if logging_dir is not None:
        flags.append(f"--logging_dir={logging_dir}")
    # Last, so that an extra flag repeating one of ours wins (argparse keeps the last value).
    flags += list(extra_args)
    return [*launcher(), training_script(family), *flags]


def _num(value: float) -> str:
    """16.0 -> '16', 0.0001 -> '0.0001', 5e-05 -> '5e-05': short, and parsed back exactly by float()."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
