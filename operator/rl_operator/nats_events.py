"""The events out: the operator's training and deployment events, published to NATS JetStream
(optional; ``RLOPS_NATS_EVENTS``, Helm value ``nats.events.enabled``).

Subjects (each payload's JSON Schema is in ``docs/events/``):

- ``agent.rl.training.request.v1``: a TrainingRun was created (why, for which agent, with what
  training configuration and, for the trajectory trigger, which trajectories);
- ``agent.rl.training.status.v1``: a TrainingRun entered a phase (Pending, Running, Succeeded,
  Failed, Superseded), with its artifact once Succeeded;
- ``agent.rl.model.deployed.v1``: a Rollout started its canary, was promoted (100% of traffic),
  or rolled back.

At least once: each event carries a ``Nats-Msg-Id`` header (``<object uid>:<event>``), by which
JetStream drops a repeat within the stream's duplicate window and consumers can drop later
ones. Events wait in memory while NATS is down (:class:`Outbox`); the ones an operator restart
loses are published again by the next operator (:func:`replay`): every current state that
changed since the last event the streams hold.

Streams: when no stream captures a subject, the operator creates one (:data:`STREAMS`, file
storage, limits retention).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, NamedTuple

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from rl_operator import models as m

log = logging.getLogger(__name__)

REQUEST = "agent.rl.training.request.v1"
STATUS = "agent.rl.training.status.v1"
DEPLOYED = "agent.rl.model.deployed.v1"
SUBJECTS = (REQUEST, STATUS, DEPLOYED)
REQUESTER = "rlops-operator"


class Stream(NamedTuple):
    name: str
    subjects: list[str]
    max_age_seconds: float
    max_msgs: int
    publishes: tuple[str, ...]  #: the operator's subjects it captures


#: The streams the operator creates when none captures its subjects
STREAMS = (Stream("RL_TRAINING", ["agent.rl.training.>"], 7 * 86400, 10_000, (REQUEST, STATUS)),
           Stream("RL_DEPLOYMENTS", ["agent.rl.model.>"], 30 * 86400, 10_000, (DEPLOYED,)))
#: Rollout phases that are deployment events, and the outcome each reports
DEPLOYMENT_OUTCOMES = {"Progressing": "canary_started", "Promoted": "promoted", "RolledBack": "rolled_back"}
#: trigger reasons as the request event names them
TRIGGER_REASONS = {"Created": "created", "SpecChanged": "spec_changed", "Manual": "manual",
                   "Scheduled": "scheduled", "Trajectories": "threshold_reached", "Degraded": "performance_degradation"}
OUTBOX_LIMIT = 10_000  #: events kept while NATS is down; beyond, the oldest go (and the log says so)
#: on replay, states that changed this long before the last event the streams hold count too
REPLAY_MARGIN = timedelta(minutes=1)


class Event(NamedTuple):
    subject: str
    msg_id: str  #: the Nats-Msg-Id
    payload: dict[str, Any]


def _ts(t: datetime | str | None) -> str | None:
    if t is None:
        return None
    if isinstance(t, str):
        return t
    return m.rfc3339(t)


def _job_id(obj: dict[str, Any]) -> str:
    return f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"


def training_request(run: dict[str, Any]) -> Event:
    """``agent.rl.training.request.v1`` for a created TrainingRun."""
    spec = m.TrainingRunSpec.model_validate(run["spec"])
    trigger = spec.trigger
    config: dict[str, Any] = {
        "algorithm": spec.algorithm.name, "environment": spec.environment.id,
        "total_timesteps": spec.training.total_timesteps}
    if trigger.trajectories is not None:
        w = trigger.trajectories
        config["dataset"] = {"source": "nats_stream", "stream_name": w.stream, "subject": w.subject,
                             "first_sequence": w.first_sequence, "last_sequence": w.last_sequence,
                             "sample_size": w.count}
    if trigger.degraded is not None:
        config["degraded_model"] = {"version": trigger.degraded.version, "live_reward": trigger.degraded.live_reward,
                                    "baseline_reward": trigger.degraded.baseline_reward}
    payload = {"training_job_id": _job_id(run), "run_uid": run["metadata"]["uid"],
               "timestamp": _ts(run["metadata"].get("creationTimestamp")), "requester": REQUESTER,
               "trigger_reason": TRIGGER_REASONS[trigger.reason], "namespace": run["metadata"]["namespace"],
               "agent": spec.agent_ref.name, "agent_generation": trigger.agent_generation,
               "training_config": config}
    return Event(REQUEST, f"{run['metadata']['uid']}:request", payload)


def _changed_at(status: m.TrainingRunStatus | m.RolloutStatus, created: str | None, *times: datetime | None) -> str | None:
    candidates = [t for t in (*times, *(c.last_transition_time for c in status.conditions)) if t is not None]
    return _ts(max(candidates)) if candidates else _ts(created)


def training_status(run: dict[str, Any]) -> Event | None:
    """``agent.rl.training.status.v1`` for a TrainingRun's current phase (None: no phase yet)."""
    status = m.TrainingRunStatus.model_validate(run.get("status") or {})
    if status.phase is None:
        return None
    payload: dict[str, Any] = {
        "training_job_id": _job_id(run), "run_uid": run["metadata"]["uid"],
        "timestamp": _changed_at(status, run["metadata"].get("creationTimestamp"), status.start_time,
                                 status.completion_time),
        "namespace": run["metadata"]["namespace"], "agent": run["spec"]["agentRef"]["name"], "phase": status.phase}
    if status.phase == "Succeeded" and status.artifact_uri:
        payload["artifact"] = {"uri": status.artifact_uri, "fingerprint": status.fingerprint}
        if isinstance(status.metrics.get("meanReturn"), (int, float)):
            payload["mean_return"] = float(status.metrics["meanReturn"])
    superseded = next((c for c in status.conditions if c.type == "Superseded"), None)
    if status.phase == "Superseded" and superseded is not None:
        reason, message = superseded.reason, superseded.message
    else:
        reason, message = status.failure_reason, status.failure_message
    if reason:
        payload["reason"] = reason
    if message:
        payload["message"] = message[:1000]
    return Event(STATUS, f"{run['metadata']['uid']}:status:{status.phase}", payload)


def model_deployed(ro: dict[str, Any]) -> Event | None:
    """``agent.rl.model.deployed.v1`` for a Rollout's current phase, if it is a deployment
    event (canary started, promoted, rolled back)."""
    status = m.RolloutStatus.model_validate(ro.get("status") or {})
    outcome = DEPLOYMENT_OUTCOMES.get(status.phase or "")
    if outcome is None:
        return None
    spec = m.RolloutSpec.model_validate(ro["spec"])
    payload: dict[str, Any] = {
        "rollout": _job_id(ro), "rollout_uid": ro["metadata"]["uid"],
        "timestamp": _changed_at(status, ro["metadata"].get("creationTimestamp"), status.step_started_at,
                                 status.completed_at, status.aborted_at),
        "namespace": ro["metadata"]["namespace"], "agent": spec.agent_ref.name, "outcome": outcome,
        "model_version": spec.version, "fingerprint": spec.fingerprint, "artifact_uri": spec.artifact_uri,
        "previous_version": status.stable_version,
        "traffic_percentage": {"canary_started": status.canary_weight or 0, "promoted": 100, "rolled_back": 0}[outcome]}
    if status.abort_reason:
        payload["reason"] = status.abort_reason[:1000]
    return Event(DEPLOYED, f"{ro['metadata']['uid']}:deployed:{status.phase}", payload)


class Outbox:
    """Events to publish, in order, kept while NATS is down. Filled by reconciles (any thread),
    drained on kopf's event loop (:meth:`drain`)."""

    def __init__(self, limit: int = OUTBOX_LIMIT):
        self.enabled = False
        self._events: collections.deque[Event] = collections.deque()
        self._limit = limit
        self._lock = threading.Lock()
        self.dropped = 0

    def put(self, event: Event | None) -> None:
        if event is None or not self.enabled:
            return
        with self._lock:
            self._events.append(event)
            if len(self._events) > self._limit:
                gone = self._events.popleft()
                self.dropped += 1
                log.warning("events out: %d events wait for NATS; dropped the oldest (%s %s)", self._limit,
                            gone.subject, gone.msg_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)

    def _peek(self) -> Event | None:
        with self._lock:
            return self._events[0] if self._events else None

    def _done(self, event: Event) -> None:
        with self._lock:
            if self._events and self._events[0] is event:
                self._events.popleft()

    async def drain(self, client: Client, timeout: float = 5.0) -> int:
        """Publish the waiting events in order until none is left or one fails (it stays
        first; the next call tries again). Returns how many were published."""
        js = client.jetstream(timeout=timeout)
        sent = 0
        while (event := self._peek()) is not None:
            data = json.dumps(event.payload, separators=(",", ":"), sort_keys=True).encode()
            try:
                await js.publish(event.subject, data, headers={"Nats-Msg-Id": event.msg_id})
            except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError) as exc:
                log.warning("events out: cannot publish %s %s yet (%d waiting): %s", event.subject, event.msg_id,
                            len(self), exc)
                return sent
            self._done(event)
            sent += 1
        return sent


OUTBOX = Outbox()


async def ensure_streams(client: Client) -> None:
    """Create the streams of :data:`STREAMS` whose subjects no stream captures yet."""
    js = client.jetstream()
    for stream in STREAMS:
        try:
            for subject in stream.publishes:
                await js.find_stream_name_by_subject(subject)
            continue
        except nats.js.errors.NotFoundError:
            pass
        try:
            await js.add_stream(StreamConfig(
                name=stream.name, subjects=stream.subjects, retention=RetentionPolicy.LIMITS,
                max_age=stream.max_age_seconds, max_msgs=stream.max_msgs, storage=StorageType.FILE))
        except nats.js.errors.BadRequestError as exc:  # e.g. another stream holds part of the subjects
            log.warning("events out: cannot create JetStream stream %s (%s): %s", stream.name,
                        ", ".join(stream.subjects), exc)
            continue
        log.info("events out: created JetStream stream %s (%s)", stream.name, ", ".join(stream.subjects))


async def last_published(client: Client) -> datetime | None:
    """The time of the oldest of the last events on each subject (None: a subject has none)."""
    js = client.jetstream()
    times: list[datetime] = []
    for subject in SUBJECTS:
        try:
            stream = await js.find_stream_name_by_subject(subject)
            msg = await js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            return None
        if msg.time is None:
            return None
        times.append(msg.time if msg.time.tzinfo else msg.time.replace(tzinfo=timezone.utc))
    return min(times)


def replay(runs: Iterable[dict[str, Any]], rollouts: Iterable[dict[str, Any]], since: datetime | None) -> list[Event]:
    """The events of the current states that changed at or after ``since`` minus
    :data:`REPLAY_MARGIN` (all, with ``since`` None), oldest first: what an operator publishes
    when it starts, in case the one before it stopped with events unpublished."""
    runs, rollouts = list(runs), list(rollouts)
    start = _ts(since - REPLAY_MARGIN) if since is not None else None
    events = [training_request(r) for r in runs]
    events += [e for r in runs if (e := training_status(r)) is not None]
    events += [e for ro in rollouts if (e := model_deployed(ro)) is not None]
    events = [e for e in events if start is None or (e.payload["timestamp"] or "") >= start]
    return sorted(events, key=lambda e: e.payload["timestamp"] or "")
