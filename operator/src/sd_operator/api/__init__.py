"""The sd-operator.dev/v1alpha1 API: SDInstance, LoRAJob and GenerationBatch.

The pydantic models in this package are the single source of truth; `sd-operator crds` renders the
CRDs from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from sd_operator import API_GROUP, API_VERSION
from sd_operator.api import crdgen
from sd_operator.api.generationbatch import GenerationBatchSpec, GenerationBatchStatus
from sd_operator.api.lorajob import LoRAJobSpec, LoRAJobStatus
from sd_operator.api.sdinstance import SDInstanceSpec, SDInstanceStatus

CATEGORY = "sd"


def _col(name: str, path: str, type_: str = "string", description: str = "", priority: int = 0) -> dict[str, Any]:
    col: dict[str, Any] = {"name": name, "type": type_, "jsonPath": path}
    if description:
        col["description"] = description
    if priority:
        col["priority"] = priority
    return col


AGE = _col("Age", ".metadata.creationTimestamp", "date")


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short_names: tuple[str, ...]
    spec: type[BaseModel]
    status: type[BaseModel]
    description: str
    printer_columns: tuple[dict[str, Any], ...]
    scale: bool = False

    @property
    def api_version(self) -> str:
        return f"{API_GROUP}/{API_VERSION}"

    def crd(self) -> dict[str, Any]:
        scale = None
        if self.scale:
            scale = {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            }
        return crdgen.crd(
            group=API_GROUP,
            version=API_VERSION,
            kind=self.kind,
            plural=self.plural,
            short_names=list(self.short_names),
            categories=[CATEGORY],
            spec=self.spec,
            status=self.status,
            description=self.description,
            printer_columns=list(self.printer_columns),
            scale=scale,
        )


SDINSTANCE = Kind(
    kind="SDInstance",
    plural="sdinstances",
    short_names=("sdi",),
    spec=SDInstanceSpec,
    status=SDInstanceStatus,
    description="An AUTOMATIC1111 WebUI deployment serving one fixed Stable Diffusion model on GPUs.",
    printer_columns=(
        _col("Model", ".spec.model.checkpoint.name", description="The checkpoint served."),
        _col("Ready", ".status.ready", description="Ready replicas / desired replicas."),
        _col("Desired", ".status.desiredReplicas", "integer", description="Pods wanted (the autoscaler's choice)."),
        _col("Phase", ".status.phase"),
        _col("GPU", ".status.gpu", description="GPUs per pod."),
        AGE,
        _col("Message", ".status.message", priority=1),
    ),
    scale=True,
)
LORAJOB = Kind(
    kind="LoRAJob",
    plural="lorajobs",
    short_names=("lj", "lora"),
    spec=LoRAJobSpec,
    status=LoRAJobStatus,
    description="A LoRA training run with kohya-ss sd-scripts, as a Kubernetes Job.",
    printer_columns=(
        _col("Base", ".spec.baseModel.family", description="Model family trained on."),
        _col("Epoch", ".status.progress.epoch", "integer"),
        _col("Progress", ".status.progress.percent", "integer", description="Percent done."),
        _col("Phase", ".status.phase"),
        AGE,
        _col("Message", ".status.message", priority=1),
    ),
)
GENERATIONBATCH = Kind(
    kind="GenerationBatch",
    plural="generationbatches",
    short_names=("gb",),
    spec=GenerationBatchSpec,
    status=GenerationBatchStatus,
    description="Many images rendered through the services layer with bounded concurrency; resumable.",
    printer_columns=(
        _col("Model", ".status.model", description="The model that renders the batch."),
        _col("Progress", ".status.progress", description="Items done / total."),
        _col("Failed", ".status.failed", "integer"),
        _col("Phase", ".status.phase"),
        AGE,
        _col("Message", ".status.message", priority=1),
    ),
)
KINDS = (SDINSTANCE, LORAJOB, GENERATIONBATCH)


def peering_crd(scope: str) -> dict[str, Any]:
    """kopf's peering resource, so that of several operator replicas only one acts at a time."""
    kind = "ClusterKopfPeering" if scope == "Cluster" else "KopfPeering"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{kind.lower()}s.kopf.dev", "labels": {"app.kubernetes.io/part-of": "sd-operator"}},
        "spec": {
            "group": "kopf.dev",
            "scope": scope,
            "names": {"kind": kind, "plural": f"{kind.lower()}s", "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "Operator replicas announce themselves here (kopf peering).",
                            "properties": {
                                "status": {
                                    "type": "object",
                                    "description": "The live operator replicas and their priorities.",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD manifest, for every kind (and kopf's peering kinds)."""
    crds = {f"{API_GROUP}_{k.plural}.yaml": k.crd() for k in KINDS}
    crds["kopf.dev_clusterkopfpeerings.yaml"] = peering_crd("Cluster")
    crds["kopf.dev_kopfpeerings.yaml"] = peering_crd("Namespaced")
    return crds
