"""GenerationBatch: many images rendered through the services layer, resumable, with progress."""

from __future__ import annotations

from enum import StrEnum

from pydantic import ConfigDict, Field

from sd_operator.api.base import (
    DNS_SUBDOMAIN,
    ApiModel,
    Condition,
    PodMetadata,
    PVCPath,
    S3Location,
    SecretKeyRef,
    exactly_one,
    immutable,
    rule,
    validations,
)
from sd_operator.api.generation import GenerationParams

MAX_FAILURES_IN_STATUS = 20


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class ImageFormat(StrEnum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"


class Target(ApiModel):
    """Which model renders the batch: a model name the services layer knows, or an SDInstance."""

    model_config = ConfigDict(json_schema_extra=validations(exactly_one("model", "instance", what="target")))

    model: str | None = Field(
        None, description="Checkpoint name, title, short hash or alias, as the services layer routes it.", min_length=1
    )
    instance: str | None = Field(
        None, description="Name of an SDInstance in the same namespace; its model is used.", pattern=DNS_SUBDOMAIN
    )


class Item(GenerationParams):
    """One prompt, with overrides of the batch defaults."""

    prompt: str = Field(description="The prompt.", min_length=1, max_length=8192)
    count: int | None = Field(None, description="How many images of this prompt (different seeds).", ge=1, le=10000)


class ConfigMapKeyRef(ApiModel):
    """A key of a ConfigMap in the same namespace."""

    name: str = Field(description="Name of the ConfigMap.", pattern=DNS_SUBDOMAIN)
    key: str = Field(description="Key holding JSON Lines, one item per line.", min_length=1)


class Items(ApiModel):
    """The prompts: inline, or JSON Lines (one item object per line) in a ConfigMap or on a volume."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            exactly_one("inline", "configMap", "file", what="items"),
        )
    )

    inline: list[Item] | None = Field(None, description="Items written in the object itself.", max_length=1000)
    config_map: ConfigMapKeyRef | None = Field(None, description="JSON Lines in a ConfigMap key.")
    file: PVCPath | None = Field(None, description="A JSON Lines file on a PersistentVolumeClaim (large batches).")


class Sweep(ApiModel):
    """A grid: every prompt at every LoRA weight (and seed, CFG), the usual way to judge a LoRA."""

    prompts: list[str] = Field(description="Prompts of the grid.", min_length=1, max_length=1000)
    lora: str | None = Field(None, description="LoRA whose weight is swept.", min_length=1)
    lora_weights: list[float] | None = Field(
        None,
        description="LoRA weights, each within -2..2 (e.g. 0.6, 0.8, 1.0).",
        max_length=20,
        json_schema_extra={"items": {"type": "number", "minimum": -2, "maximum": 2}},
    )
    seeds: list[int] | None = Field(None, description="Seeds; each cell is rendered once per seed.", max_length=100)
    cfg_scales: list[float] | None = Field(
        None,
        description="CFG scales, each within 1..30.",
        max_length=20,
        json_schema_extra={"items": {"type": "number", "minimum": 1, "maximum": 30}},
    )


class Output(ApiModel):
    """Where images and their metadata go: a volume path or an S3-compatible bucket prefix."""

    model_config = ConfigDict(json_schema_extra=validations(exactly_one("pvc", "s3", what="output")))

    pvc: PVCPath | None = Field(None, description="A folder on a PersistentVolumeClaim.")
    s3: S3Location | None = Field(None, description="A bucket and key prefix.")
    format: ImageFormat = Field(ImageFormat.PNG, description="Image format: png, jpeg or webp.")
    metadata: bool = Field(
        True, description="Write a JSON sidecar (prompt, parameters, seed, model, timings) per image."
    )


class GenerationBatchSpec(ApiModel):
    """The desired state of a GenerationBatch. Only suspend, concurrency, priority and TTL may change."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule("has(self.items) || has(self.sweep)", "spec: set items or sweep (or both)"),
        )
    )

    target: Target = Field(description="The model that renders the images.", json_schema_extra=immutable("target"))
    preset: str | None = Field(None, description="Preset of the services layer (e.g. anime_portrait).", min_length=1)
    prompt_prefix: str | None = Field(None, description="Text put before every prompt.", max_length=2048)
    defaults: GenerationParams | None = Field(
        None,
        description="Parameters for every item, unless it overrides them.",
        json_schema_extra=immutable("defaults"),
    )
    items: Items | None = Field(None, description="The prompts.", json_schema_extra=immutable("items"))
    sweep: Sweep | None = Field(
        None, description="A grid of prompts x LoRA weights x seeds x CFG scales.", json_schema_extra=immutable("sweep")
    )
    concurrency: int | None = Field(
        None,
        description="Requests in flight at most; default: twice the ready instances of the model "
        "(one rendering, one waiting in the gateway, so no instance waits for the runner).",
        ge=1,
        le=1024,
    )
    retries: int = Field(3, description="Retries per item on retriable errors.", ge=0, le=20)
    item_timeout_seconds: int = Field(600, description="Timeout of one item, in seconds.", ge=1, le=86400)
    priority: int = Field(0, description="Priority in the services layer's queue; higher goes first.", ge=-100, le=100)
    suspend: bool = Field(False, description="Stop work without losing what is done; false resumes.")
    ttl_seconds_after_finished: int | None = Field(None, description="Delete the batch this long after it ends.", ge=0)
    output: Output = Field(description="Where the images go.", json_schema_extra=immutable("output"))
    pod_metadata: PodMetadata | None = Field(None, description="Extra labels and annotations for the runner's pod.")
    gateway_url: str | None = Field(
        None, description="Services layer URL; default: the operator's configured gateway.", pattern=r"^https?://.+"
    )
    api_key_secret: SecretKeyRef | None = Field(
        None,
        description="The runner's API key for the services layer, from a key of a Secret in this namespace "
        "(needed when the gateway's API keys are on; the key's tenant and priority apply).",
        json_schema_extra=immutable("apiKeySecret"),
    )
    inputs: PVCPath | None = Field(
        None,
        description="A folder on a PersistentVolumeClaim that ControlNet images given as file names "
        "(instead of base64) are read from.",
        json_schema_extra=immutable("inputs"),
    )


class Failure(ApiModel):
    """An item that failed for good."""

    index: int = Field(description="Index of the item.")
    reason: str = Field(description="Why it failed.")


class GenerationBatchStatus(ApiModel):
    """The observed state of a GenerationBatch."""

    phase: Phase | None = Field(None, description="Pending, Running, Succeeded, Failed or Suspended.")
    message: str | None = Field(None, description="Why the batch is in its phase, for a person.")
    conditions: list[Condition] | None = Field(None, description="Standard conditions (Complete, Failed, Suspended).")
    observed_generation: int | None = Field(None, description="The generation the status describes.")
    model: str | None = Field(None, description="The model that renders the batch.")
    total: int | None = Field(None, description="Items in the batch.")
    succeeded: int | None = Field(None, description="Items done.")
    failed: int | None = Field(None, description="Items that failed for good.")
    running: int | None = Field(None, description="Items in flight.")
    progress: str | None = Field(None, description="succeeded/total, for kubectl get.")
    start_time: str | None = Field(None, description="When work started.", json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(
        None, description="When the batch ended.", json_schema_extra={"format": "date-time"}
    )
    output_location: str | None = Field(None, description="Where the images are (a path or an s3:// URL).")
    failures: list[Failure] | None = Field(
        None,
        description=f"Up to {MAX_FAILURES_IN_STATUS} failed items with reasons.",
        max_length=MAX_FAILURES_IN_STATUS,
    )
