"""Which models the fleet serves and how a request names one (title, file name, short hash, alias).

Backends come from a static file (local runs) or from Kubernetes discovery; each new backend is
probed once (`/sdapi/v1/sd-models`, `/sdapi/v1/memory`) to learn its model's title and hash and its
GPU's memory, from which its pixel budget follows.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sd_operator.emulator.profiles import PIXELS_PER_GIB, WEIGHTS_GIB, Family
from sd_operator.gateway.dispatch import Backend, Dispatcher

log = logging.getLogger("sd_operator.gateway")
GIB = 1024**3
_TITLE_HASH = re.compile(r"^(?P<name>.+?)\s*\[(?P<hash>[0-9a-fA-F]{8,10})\]$")


class UnknownModel(LookupError):
    def __init__(self, name: str, available: list[str]):
        shown = ", ".join(available) or "none"
        super().__init__(f"unknown model {name!r}; the fleet serves: {shown} (GET /sdapi/v1/sd-models)")
        self.name, self.available = name, available


class ModelNotReady(LookupError):
    """The model is declared by SDInstances, none of whose pods is ready yet (answered 503, not 404)."""

    def __init__(self, name: str, model: str, instances: list[DeclaredModel]):
        states = ", ".join(d.describe() for d in instances)
        super().__init__(f"model {model!r} has no ready instance yet: {states}; retry later")
        self.name, self.model, self.instances = name, model, instances


@dataclass(frozen=True)
class DeclaredModel:
    """What an SDInstance says it serves, known before any of its pods is ready."""

    model: str  # checkpoint file name
    instance: str  # namespace/name
    sha256: str | None = None
    phase: str | None = None
    message: str | None = None
    reason: str | None = None  # of the Ready condition, e.g. ScaledToZero
    family: str | None = None  # spec.model.family
    # At zero (or on the way) and a replica will come when there is demand (spec.autoscaling, or an external
    # autoscaler the instance names with the scale-from-zero annotation): requests wait instead of a 503.
    scalable: bool = False

    def names(self) -> set[str]:
        return model_names(self.model, self.sha256)

    @property
    def state(self) -> str:
        """What /v1/models shows for an instance without a ready pod."""
        return self.reason if self.reason == "ScaledToZero" else (self.phase or "Pending")

    def describe(self) -> str:
        return f"{self.instance} {self.phase or 'Pending'}" + (f" ({self.message})" if self.message else "")


def family_of(model: str, hint: str | None = None) -> Family:
    if hint in {f.value for f in Family}:
        return Family(hint)
    return Family.SDXL if "xl" in model.lower() else Family.SD15


def pixel_budget(vram_gib: float, family: Family) -> int:
    """The largest width*height*batch a GPU of this size renders for the family (same model as the fleet's)."""
    return int(max(0.0, vram_gib - WEIGHTS_GIB[family]) * PIXELS_PER_GIB[family])


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def model_names(model: str, sha256: str | None, *more: str) -> set[str]:
    """Every name a request may use for a model, lower case: file name, stem, short and full hash, and more."""
    names = {model, _stem(model), *more}
    if sha256:
        names.update({sha256[:10], sha256[:8], sha256})
    return {n.lower() for n in names}


class Registry:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.declared: dict[str, DeclaredModel] = {}  # by instance (namespace/name), from discovery
        self._index: dict[str, str] = {}  # every name of a served model (lower case) -> its model key
        self._index_version = -1

    def names(self, backend: Backend) -> set[str]:
        return model_names(backend.model, backend.sha256, *backend.aliases, *([backend.title] if backend.title else []))

    def resolve(self, name: str) -> str:
        """The model key (checkpoint file name) a request's model name means."""
        wanted = name.strip().lower()
        match = _TITLE_HASH.match(name.strip())
        candidates = {wanted}
        if match:
            candidates |= {match["name"].lower(), match["hash"].lower()}
        if self._index_version != self.dispatcher.version:  # rebuilt when backends come or go, not per request
            self._index = {n: b.model for b in reversed(self.dispatcher.all_backends()) for n in self.names(b)}
            self._index_version = self.dispatcher.version
        for candidate in (wanted, *sorted(candidates - {wanted})):
            if candidate in self._index:
                return self._index[candidate]
        waiting = [d for d in self.declared.values() if candidates & d.names()]
        if any(d.scalable and d.phase != "Failed" for d in waiting):
            return waiting[0].model  # held in the queue while a replica starts (see cold_start)
        if waiting:
            raise ModelNotReady(name, waiting[0].model, sorted(waiting, key=lambda d: d.instance))
        raise UnknownModel(name, self.dispatcher.models())

    def family(self, model: str) -> Family:
        """The model's family: as its SDInstances declare it, else guessed from the name."""
        declared = next((d.family for d in self.instances_of(model) if d.family), None)
        return family_of(model, declared)

    def instances_of(self, model: str) -> list[DeclaredModel]:
        return sorted((d for d in self.declared.values() if d.model == model), key=lambda d: d.instance)

    def cold_start(self, model: str) -> bool:
        """The model has no backend now but an instance that scales up on demand: requests may wait."""
        return not self.dispatcher.backends.get(model) and any(
            d.scalable and d.phase != "Failed" for d in self.instances_of(model)
        )

    def sd_models(self) -> list[dict[str, Any]]:
        """The union of models, shaped like the WebUI's /sdapi/v1/sd-models."""
        seen: dict[str, dict[str, Any]] = {}
        for b in self.dispatcher.all_backends():
            if b.model in seen:
                continue
            short = b.sha256[:10] if b.sha256 else None
            seen[b.model] = {
                "title": b.title or (f"{b.model} [{short}]" if short else b.model),
                "model_name": _stem(b.model),
                "hash": short,
                "sha256": b.sha256,
                "filename": b.model,
                "config": None,
            }
        # Models whose instances have no ready pod (scaled to zero, starting) are still the fleet's.
        for d in sorted(self.declared.values(), key=lambda d: d.instance):
            if d.model in seen:
                continue
            short = d.sha256[:10] if d.sha256 else None
            seen[d.model] = {
                "title": f"{d.model} [{short}]" if short else d.model,
                "model_name": _stem(d.model),
                "hash": short,
                "sha256": d.sha256,
                "filename": d.model,
                "config": None,
            }
        return list(seen.values())

    def budget(self, model: str) -> int | None:
        """The largest pixel budget among the model's backends (None when any is unknown)."""
        budgets = [b.pixel_budget for b in self.dispatcher.backends.get(model, [])]
        if not budgets or any(b is None for b in budgets):
            return None
        return max(b for b in budgets if b is not None)


async def probe(session: aiohttp.ClientSession, backend: Backend, family: str | None = None) -> bool:
    """Learns title, hash and GPU memory; False when the backend does not answer like a WebUI."""
    try:
        async with session.get(f"{backend.url}/sdapi/v1/sd-models", timeout=aiohttp.ClientTimeout(total=5)) as r:
            if r.status != 200:
                return False
            models = await r.json()
        if models:
            first = models[0]
            backend.title = backend.title or first.get("title")
            backend.sha256 = backend.sha256 or first.get("sha256")
            if not backend.model:
                backend.model = first.get("filename", "").rsplit("/", 1)[-1] or first.get("title", "")
        if backend.pixel_budget is None:
            async with session.get(f"{backend.url}/sdapi/v1/memory", timeout=aiohttp.ClientTimeout(total=5)) as r:
                memory = await r.json() if r.status == 200 else {}
            total = ((memory.get("cuda") or {}).get("system") or {}).get("total")
            if total:
                backend.pixel_budget = pixel_budget(total / GIB, family_of(backend.model, family))
                backend.gpu = backend.gpu or f"{total / GIB:.0f}GiB"
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        log.warning("probe of %s failed: %s", backend.url, e)
        return False
    return True


def load_backends_file(path: Path, inflight: int) -> list[Backend]:
    """backends: [{url, model?, aliases?, maxInflight?, pixelBudget?, family?}]"""
    doc = yaml.safe_load(path.read_text()) or {}
    out = []
    for i, entry in enumerate(doc.get("backends") or []):
        if not entry.get("url"):
            raise ValueError(f"{path}: backends[{i}]: url is required")
        out.append(
            Backend(
                url=str(entry["url"]).rstrip("/"),
                model=str(entry.get("model") or ""),
                aliases=frozenset(str(a) for a in entry.get("aliases") or []),
                max_inflight=int(entry.get("maxInflight", inflight)),
                pixel_budget=entry.get("pixelBudget"),
                instance=entry.get("instance"),
                gpu=entry.get("gpu"),
            )
        )
    return out
