"""The scaling rule (sd_operator.autoscaling), the operator's memory of it (scalestore) and the status it
gives an autoscaled SDInstance (derive_status)."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from test_sdinstance_status import downloading_pod, fetch_failed_pod, make_spec, ready_pod, views

from sd_operator.autoscaling import (
    DEMAND_STALE_SECONDS,
    Demand,
    Policy,
    ScaleState,
    decide,
    recommend,
    sum_reports,
)
from sd_operator.conditions import get_condition
from sd_operator.controllers.scalestore import ScaleStore
from sd_operator.controllers.sdinstance_status import derive_status

POLICY = Policy(min_replicas=0, max_replicas=3, target_per_replica=2, scale_down_delay=600)


def d(queued: int = 0, running: int = 0) -> Demand:
    return Demand(queued, running)


# ---------------------------------------------------------------------------------------------
# recommend: ceil(demand / target) within the bounds


@pytest.mark.parametrize(
    ("demand", "replicas", "wanted", "limited"),
    [(0, 0, 0, False), (1, 1, 1, False), (2, 1, 1, False), (3, 2, 2, False), (6, 3, 3, False), (24, 3, 12, True)],
)
def test_recommendation_is_demand_over_target_within_bounds(
    demand: int, replicas: int, wanted: int, limited: bool
) -> None:
    rec = recommend(d(queued=demand), POLICY)
    assert (rec.replicas, rec.wanted, rec.limited) == (replicas, wanted, limited)


def test_min_replicas_holds_without_demand() -> None:
    assert recommend(d(), Policy(1, 3)).replicas == 1


def test_running_requests_count_as_demand() -> None:
    assert recommend(d(queued=0, running=1), POLICY).replicas == 1


# ---------------------------------------------------------------------------------------------
# decide: up at once, down after the delay, no flapping


def test_scale_up_is_immediate() -> None:
    state = ScaleState.starting(0, now=0)
    decision = decide(state, d(queued=5), POLICY, now=1)
    assert (decision.replicas, decision.changed, decision.reason) == (3, True, "ScaledUp")
    assert state.desired == 3


def test_scale_down_waits_for_the_delay_then_goes_to_zero() -> None:
    state = ScaleState.starting(0, now=0)
    decide(state, d(queued=6), POLICY, now=10)
    for t in range(12, 610, 2):  # demand gone at 12 s: nothing moves for 600 s
        assert decide(state, d(), POLICY, now=t).replicas == 3, t
    decision = decide(state, d(), POLICY, now=612)
    assert (decision.replicas, decision.reason) == (0, "ScaledToZero")


def test_scale_down_goes_only_to_the_highest_recent_recommendation() -> None:
    state = ScaleState.starting(3, now=0)
    decide(state, d(queued=6), POLICY, now=0)  # 3
    decide(state, d(queued=3), POLICY, now=100)  # 2 from 100 s on
    decide(state, d(queued=1), POLICY, now=500)  # 1 from 500 s on
    assert decide(state, d(queued=1), POLICY, now=650).replicas == 3  # 3 stood until 100, within 600 s of 650
    assert decide(state, d(queued=1), POLICY, now=701).replicas == 2  # 3 is older than the window now
    assert decide(state, d(queued=1), POLICY, now=1101).replicas == 1


def test_a_restarted_operator_does_not_scale_down_before_a_full_delay() -> None:
    state = ScaleState.starting(2, now=1000)  # from status.desiredReplicas
    assert decide(state, d(), POLICY, now=1001).replicas == 2
    assert decide(state, d(), POLICY, now=1599).replicas == 2
    assert decide(state, d(), POLICY, now=1601).replicas == 0


def test_a_noisy_signal_does_not_flap() -> None:
    """Demand jumping between 0 and 6 every few seconds: one scale up, no scale down while it lasts."""
    rng = random.Random(7)  # noqa: S311 - a reproducible noise, not a secret
    state = ScaleState.starting(0, now=0)
    changes = []
    for t in range(0, 1200, 2):
        decision = decide(state, d(queued=rng.choice([0, 0, 1, 3, 6])), POLICY, now=t)
        if decision.changed:
            changes.append((t, decision.replicas))
    assert len(changes) <= 3, changes  # up (maybe in two steps), never down while the noise lasts
    assert all(b[1] > a[1] for a, b in itertools.pairwise(changes)), changes


def test_zero_delay_scales_down_on_the_next_evaluation() -> None:
    policy = Policy(0, 3, 2, scale_down_delay=0)
    state = ScaleState.starting(0, now=0)
    decide(state, d(queued=4), policy, now=1)
    assert decide(state, d(), policy, now=2).replicas == 0


def test_bounds_are_respected_whatever_the_start() -> None:
    policy = Policy(1, 2, 1, 60)
    state = ScaleState.starting(1, now=0)
    assert decide(state, d(queued=100), policy, now=1).replicas == 2
    # A recommendation stands until the next observation: the 2 of t=1 stood until t=100.
    assert decide(state, d(), policy, now=100).replicas == 2
    assert decide(state, d(), policy, now=161).replicas == 1


# ---------------------------------------------------------------------------------------------
# Demand from the gateways' reports


def report(gateway: str, renew: float, **models: tuple[int, int]) -> dict[str, Any]:
    return {
        "gateway": gateway,
        "renewTime": renew,
        "models": {m: {"queued": q, "running": r, "oldestWaitSeconds": 1.5} for m, (q, r) in models.items()},
    }


def test_reports_of_two_gateways_are_summed() -> None:
    reports = [report("a", 100, m=(2, 1)), report("b", 100, m=(3, 0), other=(9, 9))]
    total = sum_reports(reports, "m", now=101)
    assert (total.queued, total.running, total.gateways) == (5, 1, 2)
    assert recommend(total, POLICY).replicas == 3  # one gateway's demand alone asks for 2


def test_a_stale_report_does_not_count() -> None:
    reports = [report("gone", 100, m=(10, 0)), report("live", 150, m=(1, 0))]
    assert sum_reports(reports, "m", now=100 + DEMAND_STALE_SECONDS + 1).total == 1


def test_demand_is_split_exactly_among_autoscaled_instances_of_a_model() -> None:
    total = Demand(queued=3, running=2)
    parts = [total.share(i, 2).total for i in range(2)]
    assert parts == [3, 2]
    assert [Demand(queued=1).share(i, 3).total for i in range(3)] == [1, 0, 0]  # one request wakes one


# ---------------------------------------------------------------------------------------------
# The operator's memory (scalestore) and the status of an autoscaled instance


AUTOSCALED = {"autoscaling": {"minReplicas": 0, "maxReplicas": 3, "scaleDownDelaySeconds": 60}}


def test_store_starts_from_the_status_and_records_the_scale() -> None:
    store = ScaleStore()
    spec = make_spec(**AUTOSCALED)
    key = ("ns", "a")
    assert store.get(key, spec, {"desiredReplicas": 2}, now=0).state.desired == 2  # type: ignore[union-attr]
    outcome = store.evaluate(key, spec, {}, Demand(queued=9), now=1)
    assert outcome is not None
    decision, previous = outcome
    assert (previous, decision.replicas) == (2, 3)
    item = store.get(key, spec, {}, now=1)
    assert item is not None and item.last_time is not None
    assert (
        item.last_reason
        == "scaled 2 -> 3: demand 9 (9 queued, 0 running), target 2 per replica; 5 wanted, capped at maxReplicas 3"
    )
    assert item.limited and "maxReplicas is 3" in item.limited


def test_store_forgets_an_instance_whose_autoscaling_was_removed() -> None:
    store = ScaleStore()
    key = ("ns", "a")
    store.get(key, make_spec(**AUTOSCALED), {}, now=0)
    assert store.get(key, make_spec(replicas=2), {}, now=1) is None
    assert store.evaluate(key, make_spec(replicas=2), {}, Demand(queued=5), now=2) is None


def _scaling(desired: int, limited: str | None = None) -> dict[str, Any]:
    return {
        "desiredReplicas": desired,
        "lastScaleTime": "2026-01-01T00:00:00Z",
        "lastScaleReason": "why",
        "limited": limited,
    }


def test_an_autoscaled_instance_at_zero_is_ready_and_says_so() -> None:
    status = derive_status("a", "ns", make_spec(**AUTOSCALED), [], None, 1, _scaling(0))
    assert (status["phase"], status["ready"], status["desiredReplicas"]) == ("Ready", "0/0", 0)
    ready = get_condition(status["conditions"], "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("True", "ScaledToZero")
    zero = get_condition(status["conditions"], "ScaledToZero")
    assert zero is not None and zero["status"] == "True"
    assert status["lastScaleReason"] == "why"


def test_an_autoscaled_instance_follows_the_autoscaler_not_spec_replicas() -> None:
    spec = make_spec(replicas=5, **AUTOSCALED)
    status = derive_status("a", "ns", spec, views(ready_pod("p1")), None, 1, _scaling(2, limited="demand 9 asks for 5"))
    assert (status["phase"], status["ready"], status["desiredReplicas"]) == ("Ready", "1/2", 2)  # scaling up
    limited = get_condition(status["conditions"], "ScalingLimited")
    assert limited is not None and (limited["status"], limited["reason"]) == ("True", "TooManyReplicas")
    zero = get_condition(status["conditions"], "ScaledToZero")
    assert zero is not None and zero["status"] == "False"


def test_removing_autoscaling_removes_its_status() -> None:
    before = derive_status("a", "ns", make_spec(**AUTOSCALED), [], None, 1, _scaling(0))
    after = derive_status("a", "ns", make_spec(replicas=1), views(ready_pod("p1")), before, 2)
    assert {c["type"] for c in after["conditions"]}.isdisjoint({"ScaledToZero", "ScalingLimited"})
    assert after["lastScaleTime"] is None and after["desiredReplicas"] == 1


def test_an_autoscaled_instance_scaling_up_stays_ready_while_new_pods_start() -> None:
    spec = make_spec(**AUTOSCALED)
    status = derive_status("a", "ns", spec, views(ready_pod("p1"), downloading_pod("p2")), None, 1, _scaling(2))
    assert (status["phase"], status["ready"]) == ("Ready", "1/2")
    ready = get_condition(status["conditions"], "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("True", "ScalingUp")
    assert status["message"] == "1/2 ready; scaling up: fetching model files"
    # Without autoscaling the same pods are a degraded instance; so is an autoscaled one whose new pod fails.
    assert (
        derive_status("a", "ns", make_spec(replicas=2), views(ready_pod("p1"), downloading_pod("p2")), None, 1)["phase"]
        == "Degraded"
    )
    failing = derive_status("a", "ns", spec, views(ready_pod("p1"), fetch_failed_pod("p2")), None, 1, _scaling(2))
    assert failing["phase"] == "Degraded"
