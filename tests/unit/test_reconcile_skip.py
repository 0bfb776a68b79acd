"""Which children a reconcile applies (the rendered hash, the skip decision) and when it writes the status,
with the API calls replaced by recorders (no cluster)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from sd_operator.controllers import sdinstance
from sd_operator.controllers.scalestore import ScaleStore
from sd_operator.controllers.statusmemo import (
    Applied,
    AppliedMemo,
    Backoff,
    Pending,
    StatusMemo,
    children_to_apply,
)
from sd_operator.render.common import rendered_hash

UID = "5d7f2a1c-0000-4000-8000-000000000001"
SPEC: dict[str, Any] = {
    "model": {
        "family": "sd15",
        "checkpoint": {"name": "m.safetensors", "source": {"http": {"url": "http://models.invalid/m.safetensors"}}},
    },
    "gpu": {"memoryGiB": 24},
}
CHILDREN = ["ConfigMap/sd-webui", "Service/sd-webui", "NetworkPolicy/sd-webui", "Deployment/sd-webui"]


# ---------------------------------------------------------------------------------------------
# The hash


def test_rendered_hash_is_stable_and_follows_the_content() -> None:
    obj = {"kind": "Service", "metadata": {"name": "a", "labels": {"x": "1", "y": "2"}}, "spec": {"ports": [1]}}
    reordered = {"spec": {"ports": [1]}, "metadata": {"labels": {"y": "2", "x": "1"}, "name": "a"}, "kind": "Service"}
    assert rendered_hash(obj) == rendered_hash(reordered)
    changed = copy.deepcopy(obj)
    changed["metadata"]["labels"]["x"] = "3"
    assert rendered_hash(changed) != rendered_hash(obj)


def test_rendered_hash_ignores_the_given_paths_without_changing_the_object() -> None:
    obj = {"kind": "Deployment", "spec": {"replicas": 1, "template": {"a": 1}}}
    before = copy.deepcopy(obj)
    other_count = {"kind": "Deployment", "spec": {"replicas": 5, "template": {"a": 1}}}
    ignore = [("spec", "replicas")]
    assert rendered_hash(obj, ignore) == rendered_hash(other_count, ignore)
    assert rendered_hash(obj) != rendered_hash(other_count)
    assert obj == before
    # A path that is not there changes nothing.
    assert rendered_hash(obj, [("status", "x"), ("spec", "template", "b")]) == rendered_hash(obj)
    # The rest still counts.
    other_template = {"kind": "Deployment", "spec": {"replicas": 1, "template": {"a": 2}}}
    assert rendered_hash(obj, ignore) != rendered_hash(other_template, ignore)


def test_only_an_autoscaled_deployments_count_is_left_out_of_its_hash() -> None:
    deployment = {"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 1}}
    scaled = {"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 3}}
    assert sdinstance.child_hash(deployment, autoscaled=True) == sdinstance.child_hash(scaled, autoscaled=True)
    assert sdinstance.child_hash(deployment, autoscaled=False) != sdinstance.child_hash(scaled, autoscaled=False)
    other = {"kind": "Other", "metadata": {"name": "d"}, "spec": {"replicas": 1}}
    other_scaled = {"kind": "Other", "metadata": {"name": "d"}, "spec": {"replicas": 3}}
    assert sdinstance.child_hash(other, autoscaled=True) != sdinstance.child_hash(other_scaled, autoscaled=True)


# ---------------------------------------------------------------------------------------------
# The skip decision


def test_everything_is_applied_on_first_sight_and_for_a_new_generation_or_uid() -> None:
    rendered = {"a": "1", "b": "2"}
    assert children_to_apply(rendered, None, UID, 1) == ["a", "b"]
    applied = Applied(UID, 1, {"a": "1", "b": "2"})
    assert children_to_apply(rendered, applied, UID, 1) == []
    # A spec change re-applies every child (one deleted by hand comes back), changed or not.
    assert children_to_apply(rendered, applied, UID, 2) == ["a", "b"]
    # The same name, another object.
    assert children_to_apply(rendered, applied, "another-uid", 1) == ["a", "b"]


def test_within_a_generation_only_changed_or_unapplied_children() -> None:
    applied = Applied(UID, 1, {"a": "1"})
    assert children_to_apply({"a": "1", "b": "2"}, applied, UID, 1) == ["b"]  # b's apply failed
    assert children_to_apply({"a": "9", "b": "2"}, Applied(UID, 1, {"a": "1", "b": "2"}), UID, 1) == ["a"]


def test_the_memo_starts_over_for_a_new_generation() -> None:
    memo = AppliedMemo()
    key = ("ns", "sd")
    memo.remember(key, UID, 1, "a", "1")
    memo.remember(key, UID, 1, "b", "2")
    assert memo.plan(key, UID, 1, {"a": "1", "b": "2"}) == []
    memo.remember(key, UID, 2, "a", "1")
    assert memo.plan(key, UID, 2, {"a": "1", "b": "2"}) == ["b"]
    assert memo.observed(key) is None  # not all of generation 2 applied yet
    memo.remember(key, UID, 2, "b", "2")
    memo.completed(key, UID, 2)
    assert memo.observed(key) == 2
    memo.forget(key)
    assert memo.plan(key, UID, 2, {"a": "1", "b": "2"}) == ["a", "b"]
    assert memo.observed(key) is None


def test_pending_joins_requests_until_released() -> None:
    pending = Pending()
    assert pending.request("k", now=0.0, quiet=1.0) and "k" in pending
    assert not pending.request("k", now=0.5, quiet=1.0)
    assert pending.due("k") == 1.0  # without a cap: one second after the first request
    assert pending.request("other", now=0.5, quiet=1.0)
    assert pending.release_if_due("k", now=1.0) is None
    assert "k" not in pending and pending.request("k", now=1.1, quiet=1.0)


def test_pending_with_a_cap_waits_for_quiet_but_not_beyond_the_cap() -> None:
    pending = Pending()
    assert pending.request("k", now=0.0, quiet=1.0, cap=3.0)
    assert not pending.request("k", now=0.8, quiet=1.0, cap=3.0)
    assert pending.due("k") == 1.8
    assert pending.release_if_due("k", now=1.0) == pytest.approx(0.8)  # postponed: wait on
    for now in (1.5, 2.2, 2.9):
        pending.request("k", now=now, quiet=1.0, cap=3.0)
    assert pending.due("k") == 3.0  # the cap
    assert pending.release_if_due("k", now=3.0) is None and "k" not in pending


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(first=1.0, cap=5.0)
    assert [backoff.failed("k") for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.failed("other") == 1.0
    backoff.succeeded("k")
    assert backoff.failed("k") == 1.0


# ---------------------------------------------------------------------------------------------
# reconcile() with recorded API calls


class Api:
    def __init__(self) -> None:
        self.applied: list[str] = []
        self.statuses: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.fail: set[str] = set()

    def apply(self, obj: dict[str, Any], **_: Any) -> dict[str, Any]:
        cid = f"{obj['kind']}/{obj['metadata']['name']}"
        if cid in self.fail:
            raise RuntimeError(f"apply of {cid} failed")
        self.applied.append(cid)
        return obj

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.statuses.append(status)

    def event(self, obj: dict[str, Any], *, type: str, reason: str, message: str = "") -> None:
        self.events.append(reason)

    def take(self) -> tuple[list[str], int]:
        applied, statuses = self.applied, len(self.statuses)
        self.applied, self.statuses = [], []
        return applied, statuses


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Api:
    recorder = Api()
    monkeypatch.setattr(sdinstance.kube, "apply", recorder.apply)
    monkeypatch.setattr(sdinstance.kube, "patch_status", recorder.patch_status)
    monkeypatch.setattr(sdinstance.kopf, "event", recorder.event)
    monkeypatch.setattr(sdinstance, "_memo", StatusMemo())
    monkeypatch.setattr(sdinstance, "_applied", AppliedMemo())
    monkeypatch.setattr(sdinstance, "scaling", ScaleStore())
    return recorder


def view(generation: int = 1, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "uid": UID,
        "spec": {**copy.deepcopy(SPEC), **spec},
        "status": {},
        "generation": generation,
        "labels": labels or {},
        "deleting": False,
    }


def reconcile(v: dict[str, Any], pods: list[dict[str, Any]] | None = None) -> None:
    """A reconcile with the instance (and its pods) as the indexes have them; the status refresh it asks
    for runs at once (no event loop)."""
    key = ("ns", "sd")
    sdinstance.reconcile(key, v, sdinstance.log, {key: [v]}, {key: pods or []})


def test_a_second_reconcile_of_the_same_generation_applies_and_writes_nothing(api: Api) -> None:
    reconcile(view())
    assert api.take() == (CHILDREN, 1)
    assert api.events == ["Pending"]
    # The event of its own status write, a resumed watch, ...: nothing to do.
    reconcile(view())
    reconcile(view())
    assert api.take() == ([], 0)


def test_a_pod_ready_by_the_refresh_makes_one_status_write_and_one_event(api: Api) -> None:
    ready = {"name": "sd-webui-1", "state": "Ready", "reason": "Ready", "message": "model loaded", "fetched": {}}
    reconcile(view(), pods=[ready])
    assert api.take() == (CHILDREN, 1)
    assert api.events == ["Ready"]  # no Pending first: that status was never written
    assert sdinstance._memo.last(("ns", "sd"))["observedGeneration"] == 1


def test_the_observed_generation_waits_for_all_children_of_a_generation(api: Api) -> None:
    reconcile(view())
    api.take()
    api.fail = {"Deployment/sd-webui"}
    with pytest.raises(RuntimeError):
        reconcile(view(generation=2, replicas=2))
    assert sdinstance._applied.observed(("ns", "sd")) is None
    # A pod change meanwhile: the status follows the pods but does not claim generation 2.
    key = ("ns", "sd")
    sdinstance._refresh_from_index(key, {key: [view(generation=2, replicas=2)]}, {key: []})
    assert sdinstance._memo.last(key)["observedGeneration"] == 1
    api.fail = set()
    reconcile(view(generation=2, replicas=2))
    assert sdinstance._memo.last(key)["observedGeneration"] == 2


def test_a_spec_change_applies_every_child_and_observes_the_generation(api: Api) -> None:
    reconcile(view())
    api.take()
    reconcile(view(generation=2, replicas=2))
    assert api.take() == (CHILDREN, 1)
    assert sdinstance._memo.last(("ns", "sd"))["observedGeneration"] == 2


def test_a_label_change_applies_the_children_that_carry_it(api: Api) -> None:
    reconcile(view())
    api.take()
    reconcile(view(labels={"team": "art"}))
    applied, statuses = api.take()
    assert applied == CHILDREN and statuses == 0  # every child carries the owner's labels; the status is the same


def test_a_failed_apply_is_retried_without_the_children_that_were_applied(api: Api) -> None:
    api.fail = {"NetworkPolicy/sd-webui"}
    with pytest.raises(RuntimeError):
        reconcile(view())
    assert api.take() == (CHILDREN[:2], 0)
    api.fail = set()
    reconcile(view())
    assert api.take() == (CHILDREN[2:], 1)


def test_an_autoscaled_count_change_is_the_autoscalers_not_a_reason_to_apply(api: Api) -> None:
    autoscaled = {"autoscaling": {"minReplicas": 0, "maxReplicas": 3}}
    reconcile(view(**autoscaled))
    assert api.take()[0] == CHILDREN
    item = sdinstance.scaling.get(("ns", "sd"), sdinstance.parse_spec(view(**autoscaled)["spec"]), {}, 0.0)
    assert item is not None
    item.state.desired = 2  # what the autoscaler does (and patches the Deployment's count itself)
    reconcile(view(**autoscaled))
    assert api.take()[0] == []


def test_later_without_an_event_loop_runs_at_once() -> None:
    calls: list[int] = []
    pending = Pending()
    sdinstance.later(pending, "k", 5.0, lambda: calls.append(1))
    assert calls == [1] and "k" not in pending
