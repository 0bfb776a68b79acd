"""The scaling rule of autoscaled SDInstances (pure: no clock, no I/O; the controller and the bench drive it).

Demand is what the gateways hold for a model: requests waiting in their queues plus requests rendering.
Each gateway replica publishes its own (gateway/demand.py); the operator sums the fresh reports. The rule
follows the HPA's shape, which people already know how to reason about:

- the recommendation is ceil(demand / targetPerReplica), within [minReplicas, maxReplicas];
- scaling up is immediate: queued requests are people waiting;
- scaling down takes the highest recommendation of the last `scaleDownDelaySeconds` (the HPA's
  stabilisation window), so a noisy signal never flaps the fleet and a lull shorter than the delay
  keeps warm GPUs warm.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# A gateway's report older than this is ignored: its gateway is gone or cannot reach the API server
# (gateways renew reports with demand every DEMAND_HEARTBEAT_SECONDS).
DEMAND_HEARTBEAT_SECONDS = 10.0
DEMAND_STALE_SECONDS = 3 * DEMAND_HEARTBEAT_SECONDS


@dataclass(frozen=True)
class Demand:
    """A model's demand, summed over the gateways that reported it."""

    queued: int = 0
    running: int = 0
    oldest_wait_seconds: float = 0.0
    gateways: int = 0  # gateways whose fresh report counted

    @property
    def total(self) -> int:
        return self.queued + self.running

    def __add__(self, other: Demand) -> Demand:
        return Demand(
            self.queued + other.queued,
            self.running + other.running,
            max(self.oldest_wait_seconds, other.oldest_wait_seconds),
            self.gateways + other.gateways,
        )

    def share(self, index: int, parts: int) -> Demand:
        """The part of this demand that the `index`-th of `parts` autoscaled SDInstances of the same model
        (in name order) takes: an exact split, so one waiting request wakes one of them, not all."""
        if parts <= 1:
            return self

        def split(n: int) -> int:
            return n // parts + (1 if index < n % parts else 0)

        # Running requests are where they are; queued ones go to whichever instances come up first.
        return Demand(split(self.queued + self.running), 0, self.oldest_wait_seconds, self.gateways)

    def describe(self) -> str:
        return f"demand {self.total} ({self.queued} queued, {self.running} running)"


def sum_reports(
    reports: list[dict[str, Any]], model: str, now: float, stale_after: float = DEMAND_STALE_SECONDS
) -> Demand:
    """The demand for `model` from the gateways' reports (see gateway/demand.py for their shape): fresh ones
    only, so a gateway that vanished without a word stops counting once its report ages out."""
    total = Demand()
    for report in reports:
        if now - float(report.get("renewTime") or 0) > stale_after:
            continue
        entry = (report.get("models") or {}).get(model)
        if not entry:
            continue
        total = total + Demand(
            int(entry.get("queued") or 0),
            int(entry.get("running") or 0),
            float(entry.get("oldestWaitSeconds") or 0.0),
            1,
        )
    return total


@dataclass(frozen=True)
class Policy:
    """spec.autoscaling, as the rule needs it."""

    min_replicas: int
    max_replicas: int
    target_per_replica: int = 2
    scale_down_delay: float = 600.0


@dataclass(frozen=True)
class Recommendation:
    replicas: int  # within the bounds
    wanted: int  # what the demand alone asks for
    limited: bool  # maxReplicas caps the demand


def recommend(demand: Demand, policy: Policy) -> Recommendation:
    wanted = math.ceil(demand.total / max(policy.target_per_replica, 1))
    replicas = min(max(wanted, policy.min_replicas), policy.max_replicas)
    return Recommendation(replicas, wanted, wanted > policy.max_replicas)


@dataclass
class ScaleState:
    """What the rule remembers of one SDInstance: its current desired count and recent recommendations."""

    desired: int
    history: deque[tuple[float, int]] = field(default_factory=deque)  # (time, recommended replicas)

    @classmethod
    def starting(cls, desired: int, now: float) -> ScaleState:
        """After an operator (re)start the history is empty: seeding it with the current count means no
        scale-down happens before a full delay of fresh observations (scale-up still may)."""
        return cls(desired, deque([(now, desired)]))


@dataclass(frozen=True)
class Decision:
    replicas: int
    recommendation: Recommendation
    changed: bool
    reason: str  # ScaledUp, ScaledDown, ScaledToZero, or Steady


def decide(state: ScaleState, demand: Demand, policy: Policy, now: float) -> Decision:
    """The new desired replica count (and `state` updated to it)."""
    rec = recommend(demand, policy)
    # The history is a step function: an entry stands until the next one, so repeats add nothing.
    if not state.history or state.history[-1][1] != rec.replicas:
        state.history.append((now, rec.replicas))
    horizon = now - policy.scale_down_delay
    # Keep the newest entry that began before the window: it still stood when the window opened.
    while len(state.history) > 1 and state.history[1][0] <= horizon:
        state.history.popleft()
    # Up at once; down only as far as the highest recommendation that stood within the window.
    stood = max(n for _, n in state.history)
    target = rec.replicas if rec.replicas >= state.desired else min(stood, state.desired)
    target = min(max(target, policy.min_replicas), policy.max_replicas)
    if target == state.desired:
        return Decision(target, rec, False, "Steady")
    reason = "ScaledUp" if target > state.desired else ("ScaledToZero" if target == 0 else "ScaledDown")
    state.desired = target
    return Decision(target, rec, True, reason)


def describe(decision: Decision, demand: Demand, policy: Policy, previous: int) -> str:
    """The Event and status message of a scale, with the demand that caused it."""
    why = f"{demand.describe()}, target {policy.target_per_replica} per replica"
    if decision.recommendation.limited:
        why += f"; {decision.recommendation.wanted} wanted, capped at maxReplicas {policy.max_replicas}"
    if decision.reason == "ScaledToZero":
        return f"scaled {previous} -> 0: no demand for {policy.scale_down_delay:g}s"
    if decision.reason == "ScaledDown":
        return f"scaled {previous} -> {decision.replicas} after {policy.scale_down_delay:g}s at lower demand ({why})"
    return f"scaled {previous} -> {decision.replicas}: {why}"
