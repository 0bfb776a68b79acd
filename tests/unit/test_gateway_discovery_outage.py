"""Discovery across an API server outage: the pure parts (backoff, re-list) and the outage bookkeeping."""

from __future__ import annotations

import itertools
import logging

import pytest

from sd_operator.gateway.discovery import KubeDiscovery, backoff_delays, relist_events


def test_backoff_doubles_up_to_a_cap() -> None:
    assert list(itertools.islice(backoff_delays(0.25, 4.0), 7)) == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_relist_deletes_what_the_list_no_longer_has_and_updates_the_rest() -> None:
    known = {("ns", "a"), ("ns", "b")}
    b = {"metadata": {"namespace": "ns", "name": "b", "resourceVersion": "9"}}
    c = {"metadata": {"namespace": "ns", "name": "c"}}
    assert relist_events(known, [b, c]) == [
        ("DELETED", {"metadata": {"namespace": "ns", "name": "a"}}),
        ("MODIFIED", b),
        ("MODIFIED", c),
    ]
    # A list that found nothing is a list (everything was deleted); a failed list never gets here.
    assert [k for k, _ in relist_events(known, [])] == ["DELETED", "DELETED"]


def test_one_log_line_when_the_outage_begins_and_one_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    d = KubeDiscovery(state=None)  # type: ignore[arg-type]  # (the bookkeeping never reads it)
    d._watches = {"instances", "slices"}
    caplog.set_level(logging.INFO, "sd_operator.gateway.discovery")
    assert not d.up()  # nothing listed yet
    d._reached("instances")
    d._reached("slices")
    assert d.up() and d.stale_seconds() == 0
    for _ in range(5):  # every watch fails, and keeps failing on each retry
        d._lost("instances", "ConnectionRefusedError")
        d._lost("slices", "MaxRetryError")
    assert not d.up() and d.stale_seconds() > 0
    d._reached("instances")  # one watch is back, the other not yet: still an outage
    assert not d.up()
    d._reached("slices")
    assert d.up() and d.stale_seconds() == 0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("discovery lost the Kubernetes API (instances: ConnectionRefusedError)")
    assert "serving the 0 last known backends" in lines[0]
    assert lines[1].startswith("discovery reached the Kubernetes API again after ")
