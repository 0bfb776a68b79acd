"""Building blocks shared by the three kinds: the model base class, CEL rules, k8s-shaped types."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

# A Kubernetes resource quantity ("500m", "16Gi", 2): int-or-string in the CRD schema.
Quantity = Annotated[
    str | int,
    WithJsonSchema({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}),
]

# An object the CRD keeps as-is (e.g. a core/v1 Affinity): validated by the apiserver where it is used.
FreeForm = Annotated[dict[str, Any], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})]

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SHA256 = r"^[a-fA-F0-9]{64}$"
# A single file name in a models folder: no directories, no hidden files.
FILE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.+\- ]*$"
# A relative path without '.' or '..' segments (RE2 has no look-ahead, so segments are spelled out).
_SEGMENT = r"([^/.][^/]*|\.[^/.][^/]*)"
RELATIVE_PATH = rf"^{_SEGMENT}(/{_SEGMENT})*$"
RELATIVE_PATH_OR_EMPTY = rf"^({_SEGMENT}(/{_SEGMENT})*)?$"


def rule(expr: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict[str, str]:
    """A CEL validation rule (x-kubernetes-validations) with a message a person understands."""
    out = {"rule": expr, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


def exactly_one(*fields: str, what: str) -> dict[str, str]:
    counted = " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields)
    names = ", ".join(fields[:-1]) + f" or {fields[-1]}"
    return rule(f"{counted} == 1", f"{what}: set exactly one of {names}")


def at_most_one(*fields: str, what: str) -> dict[str, str]:
    counted = " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields)
    names = ", ".join(fields[:-1]) + f" or {fields[-1]}"
    return rule(f"{counted} <= 1", f"{what}: set at most one of {names}")


def immutable(field: str, advice: str = "") -> dict[str, Any]:
    """For a field's json_schema_extra: the field cannot change once set."""
    return validations(rule("self == oldSelf", f"{field} is immutable{advice}"))


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """For a model's json_schema_extra."""
    return {"x-kubernetes-validations": list(rules)}


class ApiModel(BaseModel):
    """Base of every API type: camelCase on the wire, unknown fields refused when parsing locally."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_api(self) -> dict[str, Any]:
        """The object as it is written to the API: camelCase, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class SecretKeyRef(ApiModel):
    """A key in a Secret in the same namespace."""

    name: str = Field(description="Name of the Secret.", pattern=DNS_SUBDOMAIN, max_length=253)
    key: str = Field(description="Key within the Secret.", min_length=1, max_length=253)


class SecretRef(ApiModel):
    """A Secret in the same namespace."""

    name: str = Field(description="Name of the Secret.", pattern=DNS_SUBDOMAIN, max_length=253)


class LocalObjectRef(ApiModel):
    """An object of the same namespace, by name."""

    name: str = Field(description="Name of the object.", pattern=DNS_SUBDOMAIN, max_length=253)


class Toleration(ApiModel):
    """A core/v1 Toleration."""

    key: str | None = Field(None, description="Taint key the toleration applies to; empty matches all keys.")
    operator: str | None = Field(
        None, description="Exists or Equal (default Equal).", json_schema_extra={"enum": ["Exists", "Equal"]}
    )
    value: str | None = Field(None, description="Taint value the toleration matches (with operator Equal).")
    effect: str | None = Field(
        None,
        description="Taint effect to match; empty matches all effects.",
        json_schema_extra={"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
    )
    toleration_seconds: int | None = Field(
        None, description="How long a NoExecute taint is tolerated before eviction, in seconds."
    )


class Resources(ApiModel):
    """CPU and memory requests and limits for the main container (GPUs are set under gpu)."""

    requests: dict[str, Quantity] | None = Field(None, description="Minimum resources, e.g. cpu: 4, memory: 16Gi.")
    limits: dict[str, Quantity] | None = Field(None, description="Maximum resources, e.g. memory: 24Gi.")


class Scheduling(ApiModel):
    """Where the pods may run, beyond the GPU requirements."""

    node_selector: dict[str, str] | None = Field(None, description="Node labels the pods require.")
    tolerations: list[Toleration] | None = Field(
        None, description="Tolerations added to the default GPU toleration (nvidia.com/gpu NoSchedule)."
    )
    affinity: FreeForm | None = Field(None, description="A core/v1 Affinity for the pods.")
    priority_class_name: str | None = Field(None, description="PriorityClass of the pods.", pattern=DNS_SUBDOMAIN)
    runtime_class_name: str | None = Field(
        None,
        description="RuntimeClass of the pods, e.g. 'nvidia' where the NVIDIA container runtime is not the default.",
        pattern=DNS_SUBDOMAIN,
    )


class PodMetadata(ApiModel):
    """Extra labels and annotations for the pods (e.g. cluster-autoscaler or service-mesh annotations)."""

    labels: dict[str, str] | None = Field(None, description="Labels added to the pods.")
    annotations: dict[str, str] | None = Field(None, description="Annotations added to the pods.")


class GPU(ApiModel):
    """The GPUs each pod gets, and the card class it runs on."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule(
                "!has(self.matchMemory) || !self.matchMemory || has(self.memoryGiB)",
                "gpu.matchMemory needs gpu.memoryGiB",
                ".matchMemory",
            ),
        )
    )

    count: int = Field(1, description="GPUs per pod.", ge=1, le=16)
    resource_name: str = Field(
        "nvidia.com/gpu",
        description="Extended resource to request: nvidia.com/gpu, a MIG profile such as "
        "nvidia.com/mig-1g.10gb, or a time-sliced resource name.",
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        max_length=253,
    )
    memory_gib: int | None = Field(
        None,
        alias="memoryGiB",
        description="Memory of one GPU in GiB. Chooses VRAM-saving flags and training defaults (auto modes).",
        ge=1,
        le=1024,
    )
    product: str | None = Field(
        None,
        description="GPU product (GPU Feature Discovery label nvidia.com/gpu.product); when set, pods are "
        "scheduled only onto nodes with this product.",
        max_length=63,
    )
    match_memory: bool | None = Field(
        None,
        description="Schedule only onto nodes whose nvidia.com/gpu.memory label (MiB) is at least memoryGiB.",
    )


class PVCPath(ApiModel):
    """A path inside a PersistentVolumeClaim of the same namespace."""

    claim_name: str = Field(description="Name of the PersistentVolumeClaim.", pattern=DNS_SUBDOMAIN, max_length=253)
    path: str = Field(
        "",
        description="Path inside the volume, relative to its root.",
        pattern=RELATIVE_PATH_OR_EMPTY,
        max_length=1024,
    )


class S3Location(ApiModel):
    """A bucket and key (or prefix) in an S3-compatible object store."""

    bucket: str = Field(description="Bucket name.", min_length=3, max_length=63)
    key: str = Field(description="Object key (or prefix, where a prefix is meant).", max_length=1024)
    endpoint: str | None = Field(
        None, description="Endpoint URL of an S3-compatible store; empty means AWS S3.", pattern=r"^https?://.+"
    )
    region: str | None = Field(None, description="Region of the bucket.")
    credentials_secret: SecretRef | None = Field(
        None,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; empty means the pod's own identity.",
    )


class Condition(ApiModel):
    """A standard Kubernetes condition."""

    type: str = Field(description="Type of the condition, e.g. Ready.")
    status: str = Field(description="True, False or Unknown.", json_schema_extra={"enum": ["True", "False", "Unknown"]})
    reason: str | None = Field(None, description="One CamelCase word for the last transition.")
    message: str | None = Field(None, description="What happened, for a person.")
    observed_generation: int | None = Field(None, description="The .metadata.generation the condition was set for.")
    last_transition_time: str | None = Field(
        None, description="When the status last changed.", json_schema_extra={"format": "date-time"}
    )
