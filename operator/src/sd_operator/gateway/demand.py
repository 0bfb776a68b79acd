"""Publishing this gateway's demand per model for the operator's autoscaler.

Each gateway replica holds its own queues, so each publishes its own report: a ConfigMap
`sd-gateway-demand-<gateway id>` in its namespace, labelled DEMAND_LABEL, with `demand.json`:

    {"gateway": "<id>", "renewTime": <unix seconds>,
     "models": {"<checkpoint>": {"queued": 3, "running": 1, "oldestWaitSeconds": 4.2}}}

The operator sums the reports of all gateways (sd_operator.autoscaling.sum_reports). A report is written
when the demand changes (at most every MIN_INTERVAL seconds, but at once when a model goes from no demand to
some: that is a cold start someone waits for) and renewed every DEMAND_HEARTBEAT_SECONDS while there is
demand. A gateway that disappears leaves nothing behind for long: its report is owned by its pod (garbage
collected with it) and the operator ignores reports older than DEMAND_STALE_SECONDS; on a clean stop the
gateway deletes its report.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import time
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from sd_operator import API_GROUP, kube
from sd_operator.autoscaling import DEMAND_HEARTBEAT_SECONDS
from sd_operator.gateway.dispatch import Dispatcher

log = logging.getLogger("sd_operator.gateway.demand")

DEMAND_LABEL = f"{API_GROUP}/demand-report"
DEMAND_KEY = "demand.json"
FIELD_MANAGER = "sd-operator-gateway"
MIN_INTERVAL = 1.0  # seconds between two writes of a changing report
TICK = 0.1  # how often the dispatcher's demand is looked at (in memory; no API call)


def report_name(gateway_id: str) -> str:
    cleaned = re.sub(r"[^a-z0-9-]+", "-", gateway_id.lower()).strip("-") or "gateway"
    return f"sd-gateway-demand-{cleaned}"[:253]


def default_gateway_id() -> str:
    return os.environ.get("POD_NAME") or socket.gethostname()


def default_namespace() -> str:
    return os.environ.get("POD_NAMESPACE") or "default"


def render_report(
    gateway_id: str, namespace: str, models: dict[str, dict[str, Any]], now: float, owner: dict[str, str] | None
) -> dict[str, Any]:
    """The ConfigMap of one gateway's report (pure). `owner`: the gateway's pod {name, uid}, if it runs in one."""
    meta: dict[str, Any] = {
        "name": report_name(gateway_id),
        "namespace": namespace,
        "labels": {DEMAND_LABEL: "true", "app.kubernetes.io/managed-by": "sd-operator"},
    }
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": owner["name"], "uid": owner["uid"]}]
    body = {"gateway": gateway_id, "renewTime": round(now, 3), "models": models}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {DEMAND_KEY: json.dumps(body)}}


def parse_report(configmap: dict[str, Any]) -> dict[str, Any] | None:
    """A report as the operator reads it; None when it is not one (pure)."""
    raw = (configmap.get("data") or {}).get(DEMAND_KEY)
    try:
        report = json.loads(raw) if raw else None
    except ValueError:
        return None
    return report if isinstance(report, dict) and isinstance(report.get("models"), dict) else None


def _shape(models: dict[str, dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """What a change is: the counts, not the ages (those grow every instant)."""
    return {m: (d["queued"], d["running"]) for m, d in models.items()}


class DemandPublisher:
    def __init__(self, dispatcher: Dispatcher, gateway_id: str, namespace: str) -> None:
        self.dispatcher = dispatcher
        self.gateway_id = gateway_id
        self.namespace = namespace
        pod_uid = os.environ.get("POD_UID")
        self.owner = {"name": os.environ.get("POD_NAME", gateway_id), "uid": pod_uid} if pod_uid else None
        self.written: dict[str, tuple[int, int]] | None = None
        self.written_at = -1e9
        self.writes = 0

    def due(self, models: dict[str, dict[str, Any]], now: float) -> bool:
        """Whether the report should be written now (pure apart from the clock given)."""
        shape = _shape(models)
        if self.written is None:
            return True
        if shape != self.written:
            waking = any(m not in self.written for m in shape)  # a model that had no demand: someone waits
            return waking or now - self.written_at >= MIN_INTERVAL
        return bool(shape) and now - self.written_at >= DEMAND_HEARTBEAT_SECONDS

    async def run(self) -> None:
        log.info("publishing demand as %s/%s", self.namespace, report_name(self.gateway_id))
        try:
            while True:
                models = self.dispatcher.demand()
                now = time.monotonic()
                if self.due(models, now):
                    try:
                        await asyncio.to_thread(self._write, models)
                        self.written, self.written_at = _shape(models), now
                        self.writes += 1
                    except (ApiException, OSError) as e:
                        # The API server may be away: keep serving, try again next tick (after a pause).
                        log.warning("demand report not written: %s", getattr(e, "reason", None) or e)
                        await asyncio.sleep(MIN_INTERVAL)
                await asyncio.sleep(TICK)
        finally:
            await asyncio.to_thread(self._delete)

    def _write(self, models: dict[str, dict[str, Any]]) -> None:
        kube.apply(
            render_report(self.gateway_id, self.namespace, models, time.time(), self.owner),
            field_manager=FIELD_MANAGER,
        )

    def _delete(self) -> None:
        try:
            client.CoreV1Api(kube.api_client()).delete_namespaced_config_map(
                report_name(self.gateway_id), self.namespace, _request_timeout=5
            )
        except Exception as e:  # a clean stop is best effort: the report ages out anyway
            log.info("demand report not deleted: %s", getattr(e, "reason", None) or e.__class__.__name__)
