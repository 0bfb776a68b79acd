"""GPU scheduling shared by every GPU workload (WebUI pods, training Jobs): tolerations, node
selection by GPU product, a minimum GPU memory, priority and runtime class."""

from __future__ import annotations

import copy
from typing import Any

from sd_operator.api.base import GPU, Scheduling

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"


def gpu_tolerations(scheduling: Scheduling | None) -> list[dict[str, Any]]:
    """The GPU taint is tolerated by default; the user's tolerations come on top."""
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if scheduling and scheduling.tolerations:
        tolerations += [t.to_api() for t in scheduling.tolerations]
    return tolerations


def gpu_node_selector(gpu: GPU, scheduling: Scheduling | None) -> dict[str, str]:
    selector = dict(scheduling.node_selector or {}) if scheduling else {}
    if gpu.product:
        selector[GPU_PRODUCT_LABEL] = gpu.product
    return selector


def gpu_affinity(gpu: GPU, scheduling: Scheduling | None) -> dict[str, Any] | None:
    """The user's affinity, plus a GPU memory requirement ANDed into every node selector term."""
    affinity = copy.deepcopy(scheduling.affinity) if scheduling and scheduling.affinity else None
    if not (gpu.match_memory and gpu.memory_gib):
        return affinity
    # Cards report a little less than their nominal size (a 24 GiB RTX 4090 says 24564 MiB),
    # so "at least N GiB" means more than N * 1000 - 1 MiB.
    requirement = {"key": GPU_MEMORY_LABEL, "operator": "Gt", "values": [str(gpu.memory_gib * 1000 - 1)]}
    affinity = affinity or {}
    required = affinity.setdefault("nodeAffinity", {}).setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.setdefault("nodeSelectorTerms", []) or [{}]
    for term in terms:
        term.setdefault("matchExpressions", []).append(requirement)
    required["nodeSelectorTerms"] = terms
    return affinity


def scheduling_extras(scheduling: Scheduling | None) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    if scheduling and scheduling.priority_class_name:
        extras["priorityClassName"] = scheduling.priority_class_name
    if scheduling and scheduling.runtime_class_name:
        extras["runtimeClassName"] = scheduling.runtime_class_name
    return extras
