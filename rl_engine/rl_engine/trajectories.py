"""Logged trajectories from a NATS JetStream stream, for a run the trajectory trigger started
(torch-free).

The operator gives the trainer the range it started the run for in ``RLOPS_TRAJECTORIES``
(JSON: ``url``, ``stream``, ``subject``, ``firstSequence``, ``lastSequence``). :func:`read`
fetches those messages in stream order through an ephemeral consumer (nothing acknowledged,
nothing left behind), keeps those that are valid ``agent.rl.trajectory.v1`` records
(:class:`Trajectory`; JSON Schema in ``docs/events/agent.rl.trajectory.v1.schema.json``) and
counts the others. An environment whose constructor takes a ``trajectories`` keyword trains on
them (``rlops/Router-v0``: :class:`rl_engine.domains.router.RouterEnv`).

Message layout (one routed task, the mode it went to and how it went; the reward components
are those of the reward shaping, :mod:`rl_engine.rewards`)::

    {"trajectory_id": "t-1", "timestamp": "2026-12-04T08:00:00Z",
     "task": {"complexity": 0.7, "ambiguity": 0.2, "urgency": 0.9, "domain": "math"},
     "mode": "planner_executor",
     "reward_components": {"task_completion": 1.0, "efficiency": 0.67, "code_quality": 0.8,
                           "user_feedback": 1.0}}
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InvalidConfig

ENV_VAR = "RLOPS_TRAJECTORIES"
DOMAINS = ("code", "math", "writing", "research")
MODES = ("solo", "planner_executor", "pair_review", "committee")
FETCH_BATCH = 1000
FETCH_TIMEOUT_SECONDS = 2.0


class Source(BaseModel):
    """Where the run's trajectories are: a stream's sequence range on one subject."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    url: str = Field(min_length=1)
    stream: str = Field(min_length=1)
    subject: str = Field(min_length=1)
    first_sequence: int = Field(ge=1, alias="firstSequence")
    last_sequence: int = Field(ge=1, alias="lastSequence")


class Task(BaseModel):
    """The routed task's features (the router's observation, :mod:`rl_engine.domains.router`)."""

    model_config = ConfigDict(extra="ignore")

    complexity: float = Field(ge=0.0, le=1.0)
    ambiguity: float = Field(ge=0.0, le=1.0)
    urgency: float = Field(ge=0.0, le=1.0)
    domain: Literal["code", "math", "writing", "research"]


class RewardComponents(BaseModel):
    """Raw reward components of the outcome, before normalization (:mod:`rl_engine.rewards`)."""

    model_config = ConfigDict(extra="ignore")

    task_completion: float = Field(ge=0.0, le=1.0)
    efficiency: float = Field(ge=0.0, le=1.0)
    code_quality: float = Field(ge=0.0, le=1.0)
    user_feedback: float = Field(ge=0.0, le=1.0)


class Trajectory(BaseModel):
    """One ``agent.rl.trajectory.v1`` message."""

    model_config = ConfigDict(extra="ignore")

    trajectory_id: str | None = None
    timestamp: str | None = None
    task: Task
    mode: Literal["solo", "planner_executor", "pair_review", "committee"] | None = None
    reward_components: RewardComponents | None = None


@dataclass
class Read:
    """The trajectories of a range: the valid records (stream order) and what was skipped."""

    source: Source
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    first_sequence: int | None = None  #: of the first message read
    last_sequence: int | None = None  #: of the last message read
    trained_on: bool = False  #: whether the environment took the records

    def summary(self) -> dict[str, Any]:
        """For the termination message (the run's ``status.trajectories``): ``read`` messages,
        ``used`` to train (0 when the environment takes none), ``skipped`` as not valid."""
        return {"stream": self.source.stream, "subject": self.source.subject,
                "read": len(self.records) + self.skipped, "used": len(self.records) if self.trained_on else 0,
                "skipped": self.skipped, "firstSequence": self.first_sequence, "lastSequence": self.last_sequence}


def source_from_env(env: dict[str, str] | None = None) -> Source | None:
    """The range in ``RLOPS_TRAJECTORIES``, or None when unset.

    Raises:
        InvalidConfig: not JSON, or not a valid range.
    """
    raw = (os.environ if env is None else env).get(ENV_VAR)
    if not raw:
        return None
    try:
        return Source.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as err:
        raise InvalidConfig(f"{ENV_VAR}: not a trajectory range: {err}") from None


def parse(data: bytes) -> dict[str, Any] | None:
    """A message's record (validated, as a plain dict), or None when it is not one."""
    try:
        return Trajectory.model_validate_json(data).model_dump()
    except ValidationError:
        return None


def read(source: Source, log: Callable[[str], None] = print) -> Read:
    """Read the messages of ``source``'s range (nats-py).

    Raises:
        InvalidConfig: NATS unreachable, or no such stream.
    """
    try:
        return asyncio.run(_read(source, log))
    except InvalidConfig:
        raise
    except Exception as err:  # noqa: BLE001 - the reason goes into the run's failure message
        raise InvalidConfig(f"{ENV_VAR}: cannot read {source.stream} {source.subject} "
                            f"[{source.first_sequence}, {source.last_sequence}] from {source.url}: "
                            f"{type(err).__name__}: {err}") from None


async def _read(source: Source, log: Callable[[str], None]) -> Read:
    import nats
    import nats.errors
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    result = Read(source)
    nc = await nats.connect(servers=[source.url], connect_timeout=10, max_reconnect_attempts=3)
    try:
        js = nc.jetstream(timeout=10)
        sub = await js.pull_subscribe(
            source.subject, stream=source.stream,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=source.first_sequence,
                                  ack_policy=AckPolicy.NONE, filter_subject=source.subject, inactive_threshold=60.0))
        try:
            done = False
            while not done:
                try:
                    msgs = await sub.fetch(batch=FETCH_BATCH, timeout=FETCH_TIMEOUT_SECONDS)
                except nats.errors.TimeoutError:
                    break  # nothing more in the stream (some may be gone: the stream's limits)
                for msg in msgs:
                    seq = msg.metadata.sequence.stream
                    if seq > source.last_sequence:
                        done = True
                        break
                    result.first_sequence = result.first_sequence or seq
                    result.last_sequence = seq
                    record = parse(msg.data)
                    if record is None:
                        result.skipped += 1
                    else:
                        result.records.append(record)
                    if seq == source.last_sequence:
                        done = True
                        break
        finally:
            await sub.unsubscribe()
    finally:
        await nc.close()
    log(f"trajectories: {len(result.records)} read from {source.stream} {source.subject} "
        f"[{result.first_sequence}, {result.last_sequence}], {result.skipped} skipped (not agent.rl.trajectory.v1)")
    return result
