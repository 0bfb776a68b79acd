"""LoRAJob: a kohya-ss sd-scripts LoRA training run as a Kubernetes Job."""

from __future__ import annotations

from enum import StrEnum

from pydantic import ConfigDict, Field

from sd_operator.api.base import (
    DNS_SUBDOMAIN,
    GPU,
    RELATIVE_PATH,
    ApiModel,
    Condition,
    PodMetadata,
    PVCPath,
    Resources,
    S3Location,
    Scheduling,
    exactly_one,
    immutable,
    rule,
    validations,
)
from sd_operator.api.generation import GenerationParams
from sd_operator.api.models import HTTPSource, InstanceRef, ModelFamily, ModelFile

DEFAULT_TRAINER_IMAGE = "ghcr.io/sd-operator/trainer:0.1.0"
_IMMUTABLE_ADVICE = "; create a new LoRAJob to train with other settings"


class Phase(StrEnum):
    PENDING = "Pending"
    VALIDATING = "Validating"
    RUNNING = "Running"
    PUBLISHING = "Publishing"
    EVALUATING = "Evaluating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class LRScheduler(StrEnum):
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    LINEAR = "linear"
    COSINE = "cosine"
    COSINE_WITH_RESTARTS = "cosine_with_restarts"
    POLYNOMIAL = "polynomial"
    ADAFACTOR = "adafactor"


class Optimizer(StrEnum):
    ADAMW = "AdamW"
    ADAMW8BIT = "AdamW8bit"
    PAGED_ADAMW8BIT = "PagedAdamW8bit"
    LION = "Lion"
    LION8BIT = "Lion8bit"
    SGD_NESTEROV = "SGDNesterov"
    DADAPT_ADAM = "DAdaptAdam"
    PRODIGY = "Prodigy"
    ADAFACTOR = "AdaFactor"


class MixedPrecision(StrEnum):
    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"


class BaseModelSpec(ApiModel):
    """The model the LoRA is trained on: a checkpoint source, or the model of an SDInstance."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            exactly_one("checkpoint", "fromInstance", what="baseModel"),
            rule(
                "self.family != 'sd3'",
                "baseModel.family: LoRA training supports sd15, sd2 and sdxl; sd3 is not supported yet",
                ".family",
            ),
        )
    )

    family: ModelFamily = Field(
        description="Model family: sd15, sd2 or sdxl (sdxl uses sdxl_train_network.py; sd3 is not supported yet)."
    )
    checkpoint: ModelFile | None = Field(None, description="The base checkpoint and its source.")
    from_instance: InstanceRef | None = Field(None, description="Train on the checkpoint an SDInstance serves.")


class Subset(ApiModel):
    """A folder of images (and captions) with its repeats; the sd-scripts dataset subset."""

    path: str = Field(
        description="Folder relative to the dataset root, e.g. '100_mystyle person'.",
        pattern=RELATIVE_PATH,
        max_length=1024,
    )
    repeats: int = Field(description="How often each image is seen per epoch (num_repeats).", ge=1, le=10000)
    class_tokens: str | None = Field(None, description="Class tokens, used when an image has no caption.")
    is_reg: bool = Field(False, description="Regularization images (prior preservation).")
    keep_tokens: int | None = Field(None, description="Caption tokens kept in front when shuffling.", ge=0, le=32)


class DatasetSource(ApiModel):
    """Where the dataset folder comes from: exactly one of pvc, s3 (a prefix) or http (a .tar or .zip)."""

    model_config = ConfigDict(json_schema_extra=validations(exactly_one("pvc", "s3", "http", what="dataset.source")))

    pvc: PVCPath | None = Field(None, description="A folder on a PersistentVolumeClaim.")
    s3: S3Location | None = Field(None, description="A key prefix in an S3-compatible store.")
    http: HTTPSource | None = Field(None, description="An archive (.tar, .tar.gz or .zip) over http(s).")


class Dataset(ApiModel):
    """Training images and captions. Without subsets, folders named <repeats>_<class tokens> become subsets."""

    source: DatasetSource = Field(description="Where the dataset comes from.")
    trigger_word: str = Field(
        description="The word that activates the LoRA; it must come first in every caption.",
        min_length=1,
        max_length=100,
    )
    caption_extension: str = Field(
        ".txt", description="Caption file extension (sd-scripts' default is .caption).", pattern=r"^\.[A-Za-z0-9]+$"
    )
    subsets: list[Subset] | None = Field(
        None, description="Explicit subsets; default: one per folder named like '100_mystyle person'.", max_length=100
    )


class Training(ApiModel):
    """sd-scripts hyperparameters. Unset values follow what works for the family and the GPU's memory."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule(
                "!has(self.networkAlpha) || self.networkAlpha <= double(self.networkDim)",
                "training.networkAlpha must be less than or equal to training.networkDim",
                ".networkAlpha",
            ),
            # sd-scripts' adafactor schedule asserts the Adafactor optimizer (train_util.get_scheduler_fix).
            rule(
                "!has(self.lrScheduler) || self.lrScheduler != 'adafactor'"
                " || (has(self.optimizer) && self.optimizer == 'AdaFactor')",
                "training.lrScheduler adafactor works only with optimizer AdaFactor",
                ".lrScheduler",
            ),
        )
    )

    network_dim: int = Field(32, description="LoRA rank (--network_dim). Above 64 tends to overfit.", ge=1, le=1024)
    network_alpha: float | None = Field(None, description="LoRA alpha (--network_alpha); default networkDim/2.", gt=0)
    learning_rate: float | None = Field(
        None,
        description="Learning rate (--learning_rate); default 1e-4, or 1 for DAdaptAdam and Prodigy (they adapt it).",
        gt=0,
        le=1,
    )
    unet_lr: float | None = Field(None, description="U-Net learning rate (--unet_lr).", gt=0, le=1)
    text_encoder_lr: float | None = Field(
        None, description="Text encoder learning rate (--text_encoder_lr).", gt=0, le=1
    )
    lr_scheduler: LRScheduler | None = Field(
        None,
        description=(
            "Learning-rate schedule; default cosine_with_restarts, or constant for DAdaptAdam and Prodigy. "
            "AdaFactor uses its own adafactor schedule; adafactor needs optimizer AdaFactor."
        ),
    )
    lr_scheduler_num_cycles: int = Field(3, description="Restarts of cosine_with_restarts.", ge=1, le=100)
    lr_warmup_steps: int = Field(
        0, description="Warm-up steps (with constant, the schedule becomes constant_with_warmup).", ge=0
    )
    optimizer: Optimizer = Field(Optimizer.ADAMW8BIT, description="Optimizer (--optimizer_type).")
    epochs: int = Field(10, description="Epochs (--max_train_epochs).", ge=1, le=1000)
    batch_size: int = Field(1, description="Batch size (--train_batch_size).", ge=1, le=64)
    resolution: int | None = Field(
        None,
        description="Training resolution; default 512 (sd15), 768 (sd2), 1024 (sdxl; 768 on GPUs under 16 GiB).",
        ge=256,
        le=2048,
        multiple_of=64,
    )
    mixed_precision: MixedPrecision = Field(MixedPrecision.FP16, description="no, fp16 or bf16.")
    gradient_checkpointing: bool | None = Field(None, description="Trade speed for memory; default on.")
    max_grad_norm: float = Field(1.0, description="Gradient clipping (--max_grad_norm); 0 disables.", ge=0)
    seed: int | None = Field(None, description="Random seed.", ge=0)
    save_every_n_epochs: int | None = Field(None, description="Save an intermediate LoRA every N epochs.", ge=1)
    extra_args: list[str] | None = Field(None, description="Extra sd-scripts flags, appended last.", max_length=50)


class Destination(ApiModel):
    """Where the trained files are kept."""

    model_config = ConfigDict(json_schema_extra=validations(exactly_one("pvc", "s3", what="output.destination")))

    pvc: PVCPath | None = Field(None, description="A folder on a PersistentVolumeClaim.")
    s3: S3Location | None = Field(None, description="A bucket and key prefix.")


class TrainingOutput(ApiModel):
    """Name and destination of the trained LoRA."""

    name: str = Field(
        description="Output name: files are <name>.safetensors and <name>-<epoch>.safetensors.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        max_length=100,
    )
    destination: Destination = Field(description="Where the files go.")


class Evaluation(ApiModel):
    """A GenerationBatch that renders prompts at several LoRA weights once training is done."""

    prompts: list[str] = Field(
        description="Evaluation prompts (the trigger word is added).", min_length=1, max_length=100
    )
    weights: list[float] = Field(
        [0.6, 0.8, 1.0],
        description="LoRA weights to render, each within -2..2.",
        min_length=1,
        max_length=20,
        json_schema_extra={"items": {"type": "number", "minimum": -2, "maximum": 2}},
    )
    params: GenerationParams | None = Field(None, description="txt2img parameters of the evaluation images.")
    instance: InstanceRef | None = Field(None, description="SDInstance that renders; default: the first in publishTo.")


class LoRAJobSpec(ApiModel):
    """The desired state of a LoRAJob. Everything but suspend, publishTo and TTL is immutable."""

    base_model: BaseModelSpec = Field(
        description="The model to train on.", json_schema_extra=immutable("baseModel", _IMMUTABLE_ADVICE)
    )
    dataset: Dataset = Field(
        description="Images and captions.", json_schema_extra=immutable("dataset", _IMMUTABLE_ADVICE)
    )
    training: Training = Field(
        default_factory=Training,
        description="Hyperparameters.",
        json_schema_extra={"default": {}, **immutable("training", _IMMUTABLE_ADVICE)},
    )
    output: TrainingOutput = Field(
        description="Name and destination of the result.", json_schema_extra=immutable("output", _IMMUTABLE_ADVICE)
    )
    gpu: GPU = Field(
        default_factory=GPU,
        description="GPUs of the training pod.",
        json_schema_extra={"default": {}, **immutable("gpu", _IMMUTABLE_ADVICE)},
    )
    scheduling: Scheduling | None = Field(None, description="Node selection, tolerations, affinity, priority.")
    resources: Resources | None = Field(None, description="CPU and memory of the trainer container.")
    image: str = Field(DEFAULT_TRAINER_IMAGE, description="Trainer image (sd-scripts and the wrapper).", min_length=1)
    pod_metadata: PodMetadata | None = Field(None, description="Extra labels and annotations for the trainer's pod.")
    publish_to: list[InstanceRef] | None = Field(
        None, description="SDInstances that get the LoRA when training succeeds.", max_length=50
    )
    evaluation: Evaluation | None = Field(None, description="Render evaluation images after training.")
    suspend: bool = Field(False, description="Suspend the Job (as batch/v1 Job suspend).")
    active_deadline_seconds: int | None = Field(None, description="Time limit of the training Job.", ge=1)
    backoff_limit: int = Field(0, description="Retries of a failed training pod.", ge=0, le=10)
    ttl_seconds_after_finished: int | None = Field(None, description="Delete the Job this long after it ends.", ge=0)


class Progress(ApiModel):
    """Training progress read from the trainer's output."""

    epoch: int | None = Field(None, description="Current epoch.")
    total_epochs: int | None = Field(None, description="Epochs in total.")
    step: int | None = Field(None, description="Current step.")
    total_steps: int | None = Field(None, description="Steps in total.")
    loss: float | None = Field(None, description="Average loss.")
    percent: int | None = Field(None, description="Percent done.", ge=0, le=100)
    eta_seconds: int | None = Field(None, description="Estimated seconds left.")
    updated: str | None = Field(None, description="When progress was read.", json_schema_extra={"format": "date-time"})


class Artifact(ApiModel):
    """A saved LoRA file."""

    path: str = Field(description="Where the file is (a path or an s3:// URL).")
    epoch: int | None = Field(None, description="Epoch of an intermediate save; empty for the final file.")
    sha256: str | None = Field(None, description="SHA-256 of the file.")
    size_bytes: int | None = Field(None, description="Size in bytes.")


class Publication(ApiModel):
    """Where the LoRA was published."""

    instance: str = Field(description="SDInstance name.", pattern=DNS_SUBDOMAIN)
    path: str = Field(description="Where the instance reads it.")
    time: str | None = Field(None, description="When.", json_schema_extra={"format": "date-time"})


class LoRAJobStatus(ApiModel):
    """The observed state of a LoRAJob."""

    phase: Phase | None = Field(
        None, description="Pending, Validating, Running, Publishing, Evaluating, Succeeded, Failed or Suspended."
    )
    message: str | None = Field(None, description="Why the job is in its phase, for a person.")
    conditions: list[Condition] | None = Field(None, description="DatasetValid, Complete, Failed and warnings.")
    observed_generation: int | None = Field(None, description="The generation the status describes.")
    progress: Progress | None = Field(None, description="Training progress.")
    artifacts: list[Artifact] | None = Field(None, description="Saved LoRA files.")
    published: list[Publication] | None = Field(None, description="Where the LoRA was published.")
    evaluation_batch: str | None = Field(None, description="The GenerationBatch with the evaluation images.")
    start_time: str | None = Field(
        None, description="When training started.", json_schema_extra={"format": "date-time"}
    )
    completion_time: str | None = Field(
        None, description="When the job ended.", json_schema_extra={"format": "date-time"}
    )
