"""The events out (rl_operator.nats_events): payloads against their JSON Schemas in docs/events/,
the outbox while NATS is down, and what a starting operator publishes again."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest

from rl_operator import models as m
from rl_operator import nats_events, triggers

DOCS = Path(__file__).resolve().parents[2] / "docs" / "events"
FP = "sha256:" + "a" * 64


def validate(event):
    schema = json.loads((DOCS / f"{event.subject}.schema.json").read_text())
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(event.payload)
    return event.payload


def agent(**spec):
    body = {"environment": {"id": "CartPole-v1"}, **spec}
    return {"apiVersion": m.API_VERSION, "kind": "RLAgent",
            "metadata": {"name": "pole", "namespace": "team", "uid": "a-1", "generation": 1},
            "spec": m.RLAgentSpec.model_validate(body).wire(), "status": {}}


def run(status=None, due=None, created="2026-12-04T08:00:00Z", uid="r-1", **spec):
    body = triggers.new_run(agent(**spec), [], due or [triggers.Due("Created")])
    body["metadata"].update(uid=uid, namespace="team", creationTimestamp=created)
    body["status"] = status or {}
    return body


def rollout(phase, uid="ro-1", **status):
    return {"metadata": {"name": "pole-2", "namespace": "team", "uid": uid, "creationTimestamp": "2026-12-04T08:00:00Z"},
            "spec": {"agentRef": {"name": "pole"}, "trainingRunRef": {"name": "pole-2"}, "version": "pole-2",
                     "artifactURI": "file:///a/pole-2", "fingerprint": FP},
            "status": {"phase": phase, **status}}


def test_a_training_request_names_its_trigger_and_trajectories():
    traj = {"trajectories": {"threshold": 5}}
    window = triggers.Window(7, 3, 12)
    event = nats_events.training_request(run(due=[triggers.Due("Trajectories", window=window)], triggers=traj))
    payload = validate(event)
    assert event.msg_id == "r-1:request" and payload["trigger_reason"] == "threshold_reached"
    assert payload["training_config"]["dataset"] == {
        "source": "nats_stream", "stream_name": "RL_TRAJECTORIES", "subject": "agent.rl.trajectory.v1",
        "first_sequence": 3, "last_sequence": 12, "sample_size": 7}
    plain = validate(nats_events.training_request(run()))
    assert plain["trigger_reason"] == "created" and "dataset" not in plain["training_config"]


def test_training_status_per_phase():
    assert nats_events.training_status(run()) is None  # no phase yet
    done = nats_events.training_status(run({"phase": "Succeeded", "artifactURI": "file:///a", "fingerprint": FP,
                                            "metrics": {"meanReturn": 487.5}, "completionTime": "2026-12-04T08:10:00Z"}))
    payload = validate(done)
    assert done.msg_id == "r-1:status:Succeeded" and payload["timestamp"] == "2026-12-04T08:10:00Z"
    assert payload["artifact"] == {"uri": "file:///a", "fingerprint": FP} and payload["mean_return"] == 487.5
    failed = validate(nats_events.training_status(run({"phase": "Failed", "failureReason": "BackoffLimitExceeded",
                                                        "failureMessage": "x" * 5000})))
    assert failed["reason"] == "BackoffLimitExceeded" and len(failed["message"]) == 1000


@pytest.mark.parametrize("phase,outcome,traffic", [("Progressing", "canary_started", 10), ("Promoted", "promoted", 100),
                                                   ("RolledBack", "rolled_back", 0)])
def test_deployment_outcomes(phase, outcome, traffic):
    event = nats_events.model_deployed(rollout(phase, canaryWeight=10, stableVersion="pole-1",
                                               abortReason="alert X firing" if phase == "RolledBack" else None))
    payload = validate(event)
    assert event.msg_id == f"ro-1:deployed:{phase}"
    assert (payload["outcome"], payload["traffic_percentage"], payload["previous_version"]) == (outcome, traffic, "pole-1")


def test_other_rollout_phases_are_no_deployment_event():
    assert nats_events.model_deployed(rollout("AwaitingApproval")) is None
    first = validate(nats_events.model_deployed(rollout("Promoted")))
    assert first["previous_version"] is None


def test_the_outbox_keeps_order_and_drops_the_oldest_beyond_its_limit():
    box = nats_events.Outbox(limit=2)
    box.put(nats_events.training_request(run()))  # disabled: nothing kept
    assert len(box) == 0
    box.enabled = True
    for uid in ("r-1", "r-2", "r-3"):
        box.put(nats_events.training_request(run(uid=uid)))
    assert len(box) == 2 and box.dropped == 1 and box._peek().msg_id == "r-2:request"


def test_replay_republishes_what_changed_since_the_last_event():
    old = run(uid="r-old", created="2026-12-04T07:00:00Z",
              status={"phase": "Failed", "completionTime": "2026-12-04T07:05:00Z"})
    new = run(uid="r-new", created="2026-12-04T08:00:00Z", status={"phase": "Pending"})
    since = datetime(2026, 12, 4, 8, 0, 30, tzinfo=timezone.utc)  # within the margin of r-new's creation
    ids = [e.msg_id for e in nats_events.replay([old, new], [rollout("Promoted", completedAt="2026-12-04T09:00:00Z")],
                                                since)]
    assert ids == ["r-new:request", "r-new:status:Pending", "ro-1:deployed:Promoted"]
    assert len(nats_events.replay([old, new], [], None)) == 4  # nothing on the streams yet: all
