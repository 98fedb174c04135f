"""Which replica works under kopf peering (rl_operator.peering), for the operator's own loops."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from rl_operator import peering

NOW = datetime(2026, 12, 3, 12, 0, 0, tzinfo=timezone.utc)


def rec(priority, seen_ago=0.0, lifetime=60):
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - timedelta(seconds=seen_ago)).isoformat()}


def test_the_highest_live_priority_works():
    records = {"a": rec(10), "b": rec(5)}
    assert peering.works(records, "a", 10, NOW)
    assert not peering.works(records, "b", 5, NOW)


def test_a_dead_peer_does_not_count():
    """A record not renewed within its lifetime is a dead replica (a SIGKILLed one): the
    standby works without waiting for kopf to clean the record up."""
    records = {"a": rec(10, seen_ago=61), "b": rec(5)}
    assert peering.works(records, "b", 5, NOW)
    assert not peering.works({"a": rec(10, seen_ago=59), "b": rec(5)}, "b", 5, NOW)


def test_equal_priorities_pause_both_as_kopf_does():
    records = {"a": rec(7), "b": rec(7)}
    assert not peering.works(records, "a", 7, NOW)
    assert not peering.works(records, "b", 7, NOW)


def test_not_yet_announced_or_unreadable_records_do_not_work():
    assert not peering.works({}, "a", 10, NOW)
    assert not peering.works(None, "a", 10, NOW)
    # a peer whose time cannot be read counts as alive (the cautious side)
    assert not peering.works({"a": rec(5), "b": {"priority": 9, "lastseen": "yesterday"}}, "a", 5, NOW)
    assert not peering.works({"a": rec(5), "b": {"priority": 9}}, "a", 5, NOW)


def test_own_identity_is_the_pods_name_when_kopf_would_read_it(monkeypatch):
    monkeypatch.setenv("POD_ID", "rlops-operator-7c9f-abcde")
    assert peering.own_identity() == "rlops-operator-7c9f-abcde"
    monkeypatch.delenv("POD_ID")
    first, second = peering.own_identity(), peering.own_identity()
    assert first != second and "@" in first
