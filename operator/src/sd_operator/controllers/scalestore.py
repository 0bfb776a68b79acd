"""The autoscaler's memory of each autoscaled SDInstance (no I/O): its ScaleState, and the status fields
that describe its scaling. The controller holds the instance's status lock while it uses them, so the
reconcile (which renders the Deployment's replica count) and the autoscaler (which changes it) agree.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from sd_operator.api.sdinstance import SDInstanceSpec
from sd_operator.autoscaling import Decision, Demand, Policy, ScaleState, decide, describe
from sd_operator.conditions import now as timestamp

Key = tuple[str, str]


def policy_of(spec: SDInstanceSpec) -> Policy | None:
    a = spec.autoscaling
    if a is None:
        return None
    return Policy(a.min_replicas, a.max_replicas, a.target_per_replica, float(a.scale_down_delay_seconds))


@dataclass
class Scaling:
    """One instance: the rule's state and what its status says about scaling."""

    state: ScaleState
    last_time: str | None = None
    last_reason: str | None = None
    limited: str | None = None  # why maxReplicas caps the demand, while it does

    def status(self) -> dict[str, Any]:
        return {
            "desiredReplicas": self.state.desired,
            "lastScaleTime": self.last_time,
            "lastScaleReason": self.last_reason,
            "limited": self.limited,
        }


class ScaleStore:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._items: dict[Key, Scaling] = {}

    def get(self, key: Key, spec: SDInstanceSpec, status: dict[str, Any], now: float) -> Scaling | None:
        """The instance's scaling, created on first sight from its status (after an operator restart the
        last desired count stands, and scale-down waits a full delay of fresh observations)."""
        policy = policy_of(spec)
        with self._guard:
            if policy is None:
                self._items.pop(key, None)
                return None
            item = self._items.get(key)
            if item is None:
                known = status.get("desiredReplicas")
                start = policy.min_replicas if known is None else int(known)
                start = min(max(start, policy.min_replicas), policy.max_replicas)
                item = self._items[key] = Scaling(
                    ScaleState.starting(start, now), status.get("lastScaleTime"), status.get("lastScaleReason")
                )
            return item

    def evaluate(
        self, key: Key, spec: SDInstanceSpec, status: dict[str, Any], demand: Demand, now: float
    ) -> tuple[Decision, int] | None:
        """Runs the rule; returns the decision and the previous count (None when not autoscaled). The caller
        applies a changed count to the Deployment."""
        item = self.get(key, spec, status, now)
        policy = policy_of(spec)
        if item is None or policy is None:
            return None
        # A spec edit may move the bounds under the current count.
        item.state.desired = min(max(item.state.desired, policy.min_replicas), policy.max_replicas)
        previous = item.state.desired
        decision = decide(item.state, demand, policy, now)
        rec = decision.recommendation
        item.limited = (
            f"{demand.describe()} asks for {rec.wanted} replicas; maxReplicas is {policy.max_replicas}"
            if rec.limited
            else None
        )
        if decision.changed:
            item.last_time = timestamp()
            item.last_reason = describe(decision, demand, policy, previous)
        return decision, previous

    def forget(self, key: Key) -> None:
        with self._guard:
            self._items.pop(key, None)
