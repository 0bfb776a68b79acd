"""SDInstance: one AUTOMATIC1111 WebUI deployment serving one fixed model."""

from __future__ import annotations

from enum import StrEnum

from pydantic import ConfigDict, Field

from sd_operator.api.base import (
    GPU,
    ApiModel,
    Condition,
    PVCPath,
    Quantity,
    Resources,
    Scheduling,
    SecretKeyRef,
    at_most_one,
    rule,
    validations,
)
from sd_operator.api.models import ModelFamily, ModelFile

DEFAULT_WEBUI_IMAGE = "ghcr.io/sd-operator/webui:0.1.0"
DEFAULT_PORT = 7861

# Flags the operator owns, or that would break what it renders: letting extraArgs set them would break the
# one-model guarantee, the probes or the start. --data-dir moves the WebUI's extensions folder, and
# --disable-extra-extensions/--disable-all-extensions leave it out: the sd-operator probe extension and the
# ControlNet extension would not load, and without ControlNet's preload.py the WebUI exits on the
# --controlnet-dir the operator passes (argparse: unrecognized arguments). A1111's parser takes any unique
# prefix of a flag (argparse allow_abbrev), so each is given with its shortest such abbreviation, refused
# too (tests/unit/test_real_webui.py checks them against the flags recorded from the WebUI v1.10.1).
RESERVED_FLAGS: dict[str, str] = {
    "--ckpt": "--ckpt",
    "--ckpt-dir": "--ckpt-",
    "--port": "--po",
    "--api-auth": "--api-a",
    "--nowebui": "--now",
    "--ui-settings-file": "--ui-s",
    "--data-dir": "--data",
    "--disable-extra-extensions": "--disable-e",
    "--disable-all-extensions": "--disable-a",
}
# Every spelling argparse resolves to a reserved flag: the flag and its unique abbreviations.
RESERVED_SPELLINGS = tuple(
    flag[:n] for flag, shortest in RESERVED_FLAGS.items() for n in range(len(shortest), len(flag) + 1)
)


class Attention(StrEnum):
    AUTO = "auto"
    XFORMERS = "xformers"
    SDP = "sdp"


class VRAMMode(StrEnum):
    AUTO = "auto"
    NONE = "none"
    MEDVRAM = "medvram"
    LOWVRAM = "lowvram"
    MEDVRAM_SDXL = "medvram-sdxl"


class Phase(StrEnum):
    PENDING = "Pending"
    DOWNLOADING = "Downloading"
    LOADING = "Loading"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"


class InstanceModel(ApiModel):
    """The one model the instance serves, and the extra networks it preloads."""

    family: ModelFamily = Field(description="Model family: sd15, sd2, sdxl or sd3. Chooses flags and defaults.")
    checkpoint: ModelFile = Field(description="The checkpoint loaded at start (--ckpt); it never changes at runtime.")
    vae: ModelFile | None = Field(None, description="A VAE to use instead of the checkpoint's own.")
    loras: list[ModelFile] | None = Field(None, description="LoRAs to place in the LoRA folder.", max_length=200)
    control_nets: list[ModelFile] | None = Field(
        None, description="ControlNet models for the ControlNet extension.", max_length=50
    )
    embeddings: list[ModelFile] | None = Field(None, description="Textual-inversion embeddings.", max_length=200)


class WebUI(ApiModel):
    """How the AUTOMATIC1111 WebUI runs."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule(
                "!has(self.extraArgs) || !self.extraArgs.exists(a, ["
                + ", ".join(f"'{s}'" for s in RESERVED_SPELLINGS)
                + "].exists(p, a == p || a.startsWith(p + '=')))",
                "extraArgs: " + ", ".join(RESERVED_FLAGS) + " (or an abbreviation of one) are set by the operator "
                "or would break the instance (the model is fixed by spec.model; the port by webui.port; "
                "authentication by webui.apiAuthSecret; the others would leave out the probe and ControlNet "
                "extensions)",
                ".extraArgs",
            ),
        )
    )

    image: str = Field(DEFAULT_WEBUI_IMAGE, description="WebUI container image.", min_length=1)
    image_pull_policy: str = Field(
        "IfNotPresent",
        description="Image pull policy.",
        json_schema_extra={"enum": ["Always", "IfNotPresent", "Never"]},
    )
    attention: Attention = Field(
        Attention.AUTO,
        description="Attention backend: auto (xformers), xformers (--xformers) or sdp (--opt-sdp-attention).",
    )
    vram_mode: VRAMMode = Field(
        VRAMMode.AUTO,
        alias="vramMode",
        description="VRAM saving: auto picks from gpu.memoryGiB and the family (lowvram under 8 GiB, medvram "
        "for 8-12 GiB, medvram-sdxl for SDXL under 16 GiB, none above); or none, medvram, lowvram, medvram-sdxl.",
    )
    no_half_vae: bool | None = Field(
        None,
        alias="noHalfVAE",
        description="Run the VAE in full precision (--no-half-vae). Default: on for SDXL (black images otherwise).",
    )
    extra_args: list[str] | None = Field(
        None,
        description="Extra WebUI flags, appended last; each must be a flag of the WebUI image's AUTOMATIC1111 "
        "(v1.10.1) or of its extensions, or the WebUI exits at start.",
        max_length=100,
    )
    api_auth_secret: SecretKeyRef | None = Field(
        None, description="Secret key holding user:password[,user2:password2] for --api-auth."
    )
    port: int = Field(DEFAULT_PORT, description="Port the API listens on.", ge=1024, le=65535)


class Storage(ApiModel):
    """The model cache: a shared PersistentVolumeClaim, or ephemeral storage per pod (the default)."""

    model_config = ConfigDict(json_schema_extra=validations(at_most_one("pvc", "ephemeral", what="storage")))

    pvc: PVCPath | None = Field(
        None, description="A shared claim (ReadWriteMany for several replicas); downloads are done once and locked."
    )
    ephemeral: EphemeralStorage | None = Field(None, description="Per-pod ephemeral storage (the default, 64Gi).")


class EphemeralStorage(ApiModel):
    """Per-pod ephemeral storage: models are downloaded by every new pod."""

    size: Quantity = Field("64Gi", description="Size limit of the per-pod model cache.")


Storage.model_rebuild()


class Autoscaling(ApiModel):
    """Replicas that follow the demand the gateways hold for the model (queued plus running requests)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule(
                "self.maxReplicas >= (has(self.minReplicas) ? self.minReplicas : 1)",
                "autoscaling.maxReplicas must be at least autoscaling.minReplicas",
                ".maxReplicas",
            ),
        )
    )

    min_replicas: int = Field(
        1,
        description="Fewest pods. 0 lets the instance sleep at zero: the gateway holds the first request while a "
        "pod starts (its --cold-start-timeout), so no request is lost.",
        ge=0,
        le=1000,
    )
    max_replicas: int = Field(description="Most pods (GPUs are the cost: this is the budget).", ge=1, le=1000)
    target_per_replica: int = Field(
        2,
        description="Demand (queued plus running requests for the model) each pod should carry; the fleet aims "
        "for ceil(demand / targetPerReplica) pods. 1 renders every request at once; higher trades waiting "
        "for fewer GPUs.",
        ge=1,
        le=1000,
    )
    scale_down_delay_seconds: int = Field(
        600,
        description="Scale down only to the highest count the demand asked for within this window (the HPA's "
        "stabilisation window); scaling up is immediate.",
        ge=0,
        le=86400,
    )


class SDInstanceSpec(ApiModel):
    """The desired state of an SDInstance."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule(
                "!has(self.webui) || self.webui.vramMode != 'medvram-sdxl' || self.model.family == 'sdxl'",
                "webui.vramMode: medvram-sdxl applies to SDXL models only (model.family: sdxl)",
                ".webui.vramMode",
            ),
        )
    )

    model: InstanceModel = Field(description="The one model this instance serves.")
    replicas: int = Field(
        1,
        description="Number of WebUI pods (each with its own GPUs). Ignored while autoscaling is set: the "
        "operator then owns the Deployment's replica count (status.desiredReplicas).",
        ge=0,
        le=1000,
    )
    gpu: GPU = Field(
        default_factory=GPU, description="GPUs per pod and the GPU class.", json_schema_extra={"default": {}}
    )
    scheduling: Scheduling | None = Field(None, description="Node selection, tolerations, affinity, priority.")
    resources: Resources | None = Field(None, description="CPU and memory of the WebUI container.")
    webui: WebUI = Field(
        default_factory=WebUI, description="WebUI image, flags and API settings.", json_schema_extra={"default": {}}
    )
    storage: Storage | None = Field(None, description="Where downloaded models are cached.")
    autoscaling: Autoscaling | None = Field(
        None,
        description="Scale with the demand the gateways report, down to minReplicas (0 allowed) and back. When set, "
        "spec.replicas is ignored and nothing in the spec changes at runtime (safe with GitOps); leave it unset "
        "to scale with kubectl scale, an HPA or KEDA on the scale subresource instead.",
    )


class SDInstanceStatus(ApiModel):
    """The observed state of an SDInstance."""

    phase: Phase | None = Field(None, description="Pending, Downloading, Loading, Ready, Degraded or Failed.")
    message: str | None = Field(None, description="Why the instance is in its phase, for a person.")
    conditions: list[Condition] | None = Field(None, description="Standard conditions (Ready, ModelFetched, ...).")
    observed_generation: int | None = Field(None, description="The generation the status describes.")
    replicas: int | None = Field(None, description="Pods that exist.")
    ready_replicas: int | None = Field(None, description="Pods with the model loaded and the API answering.")
    ready: str | None = Field(None, description="readyReplicas/replicas, for kubectl get.")
    selector: str | None = Field(None, description="Label selector of the pods (scale subresource).")
    endpoint: str | None = Field(None, description="In-cluster URL of the WebUI API.")
    model_sha256: str | None = Field(None, alias="modelSHA256", description="SHA-256 of the loaded checkpoint.")
    gpu: str | None = Field(None, description="GPU summary per pod, for kubectl get.")
    desired_replicas: int | None = Field(
        None, description="Pods the instance should have: spec.replicas, or the autoscaler's choice."
    )
    last_scale_time: str | None = Field(None, description="When the autoscaler last changed desiredReplicas.")
    last_scale_reason: str | None = Field(
        None, description="Why the autoscaler last scaled, with the demand that caused it."
    )
