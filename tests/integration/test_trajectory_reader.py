"""The trainer's reader of logged trajectories (rl_engine.trajectories) against Debian's
nats-server with JetStream: exactly the range, only its subject, invalid records counted."""

from __future__ import annotations

import json
import uuid

import pytest

from rl_engine import trajectories
from rl_engine.errors import InvalidConfig


def record(i):
    return json.dumps({"trajectory_id": f"t-{i}", "task": {"complexity": 0.5, "ambiguity": 0.5, "urgency": 0.5,
                                                          "domain": "code"}}).encode()


def test_reads_exactly_the_range_of_its_subject(nats_server):
    stream = f"R_{uuid.uuid4().hex[:8]}"
    mine, other = f"{stream}.mine", f"{stream}.other"
    nats_server.add_stream(stream, [f"{stream}.>"])
    before = nats_server.publish(mine, [record(0)])
    inside = nats_server.publish(mine, [record(1), record(2)])
    nats_server.publish(other, [record(99)])  # another agent's, inside the range
    inside += nats_server.publish(mine, [b"not json", json.dumps({"task": {"domain": "code"}}).encode(), record(3)])
    nats_server.publish(mine, [record(4)])  # after the range
    source = trajectories.Source(url=nats_server.url, stream=stream, subject=mine, first_sequence=inside[0],
                                 last_sequence=inside[-1])
    got = trajectories.read(source, log=lambda line: None)
    assert [r["trajectory_id"] for r in got.records] == ["t-1", "t-2", "t-3"]
    assert (got.skipped, got.first_sequence, got.last_sequence) == (2, inside[0], inside[-1])
    assert before[0] < inside[0]
    assert got.summary()["read"] == 5 and got.summary()["used"] == 0  # used: once an environment took them


def test_a_missing_stream_is_a_config_error(nats_server):
    source = trajectories.Source(url=nats_server.url, stream="NO_SUCH_STREAM", subject="x", first_sequence=1,
                                 last_sequence=2)
    with pytest.raises(InvalidConfig, match="RLOPS_TRAJECTORIES: cannot read NO_SUCH_STREAM"):
        trajectories.read(source, log=lambda line: None)


def test_the_range_comes_from_the_environment():
    assert trajectories.source_from_env({}) is None
    source = trajectories.source_from_env({"RLOPS_TRAJECTORIES": json.dumps(
        {"url": "nats://n:4222", "stream": "S", "subject": "s", "firstSequence": 3, "lastSequence": 9})})
    assert (source.first_sequence, source.last_sequence) == (3, 9)
    with pytest.raises(InvalidConfig, match="RLOPS_TRAJECTORIES"):
        trajectories.source_from_env({"RLOPS_TRAJECTORIES": "{"})
