"""NATS JetStream for the operator: the trajectory trigger's durable consumers, and the events out
(``rl_operator.events``). nats-py on kopf's event loop; one connection per operator.

The trajectory trigger (``spec.triggers.trajectories``) of an agent reads its subject of the
stream through a durable pull consumer of its own, ``rlops-<agent uid>``, created when the
operator first sees the trigger (``DeliverPolicy.NEW``: trajectories published before do not
count) and acknowledged with ``AckPolicy.ALL``. The consumer's acknowledgement floor is the
trigger's position: what lies after it counts towards the threshold. At the threshold, the
operator reads every trajectory after the floor (:meth:`Trajectories.read`), starts the run that
records their sequence range, and only then acknowledges the last one (:meth:`Read.settle`).
If the operator stops in between, the next one reads the same trajectories again (they come back
after ``ACK_WAIT_SECONDS``), finds the run for them and acknowledges: one run, nothing lost.

Consumers of deleted agents, and of a stream or subject an agent no longer names, are deleted
by :meth:`Trajectories.forget_others`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from rl_operator import models as m
from rl_operator.triggers import Window

log = logging.getLogger(__name__)

CONSUMER_PREFIX = "rlops-"
#: seconds before the trajectories read by an operator that stopped before it acknowledged them
#: are delivered again (to the next operator)
ACK_WAIT_SECONDS = 30.0
FETCH_BATCH = 1000  #: trajectories per fetch request
#: the most trajectories one run is started for; more wait for the next run
MAX_WINDOW = 200_000
REQUEST_TIMEOUT_SECONDS = 5.0


def consumer_name(agent: dict[str, Any]) -> str:
    """The durable consumer of an agent's trajectory trigger (by uid: a new agent of the same
    name starts afresh)."""
    return CONSUMER_PREFIX + agent["metadata"]["uid"]


async def connect(url: str, name: str = "rlops-operator") -> Client:
    """A NATS connection that reconnects for ever (the operator outlives NATS outages)."""
    return await nats.connect(servers=[url], name=name, max_reconnect_attempts=-1,
                              connect_timeout=REQUEST_TIMEOUT_SECONDS, allow_reconnect=True)


@dataclass
class Read:
    """Trajectories read at the threshold: their window, and the messages to acknowledge."""

    window: Window
    msgs: list[Msg]

    async def settle(self, handled: int | None) -> None:
        """Acknowledge up to stream sequence ``handled`` (all before it with it: AckPolicy.ALL),
        and hand the rest back at once (nak). ``handled=None``: hand everything back."""
        upto = [msg for msg in self.msgs if handled is not None and msg.metadata.sequence.stream <= handled]
        if upto:
            await upto[-1].ack_sync(timeout=REQUEST_TIMEOUT_SECONDS)
        for msg in self.msgs[len(upto):]:
            await msg.nak()


@dataclass
class Trajectories:
    """The operator's view of every trajectory trigger: the count since each agent's last run,
    and why a trigger cannot count (no NATS, no stream), by agent uid. Written on kopf's
    event loop, read by reconciles on other threads."""

    client: Client | None = None
    url: str | None = None
    _seen: dict[str, tuple[Window | None, str | None]] = field(default_factory=dict)
    _streams: set[str] = field(default_factory=set)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def seen(self, uid: str) -> tuple[Window | None, str | None]:
        """The last count of an agent's new trajectories (no sequence range: no run starts for
        it; it only tells whether the trigger waits) and the trigger's problem, if any."""
        with self._guard:
            return self._seen.get(uid, (None, None))

    def _note(self, uid: str, window: Window | None, problem: str | None) -> None:
        with self._guard:
            self._seen[uid] = (window, problem)

    def unavailable(self, agent: dict[str, Any], problem: str) -> None:
        self._note(agent["metadata"]["uid"], None, problem)

    async def count(self, agent: dict[str, Any], trigger: m.TrajectoryTrigger) -> Window | None:
        """How many trajectories arrived since the agent's last trajectory-triggered run
        (creating its consumer the first time), or None when they cannot be counted (the reason
        is then in :meth:`seen`)."""
        uid = agent["metadata"]["uid"]
        if self.client is None or not self.client.is_connected:
            self._note(uid, None, f"spec.triggers.trajectories: the operator cannot reach NATS at {self.url}"
                       if self.url else "spec.triggers.trajectories: the operator has no NATS server (RLOPS_NATS_URL, "
                       "Helm value nats.url)")
            return None
        js = self.client.jetstream(timeout=REQUEST_TIMEOUT_SECONDS)
        name = consumer_name(agent)
        self._streams.add(trigger.stream)
        try:
            info = await js.consumer_info(trigger.stream, name)
            if info.config.filter_subject != trigger.subject:  # the subject changed: count afresh
                await js.delete_consumer(trigger.stream, name)
                raise nats.js.errors.NotFoundError
        except nats.js.errors.NotFoundError:
            try:
                info = await js.add_consumer(trigger.stream, ConsumerConfig(
                    durable_name=name, description=f"rlops trajectory trigger of RLAgent "
                    f"{agent['metadata']['namespace']}/{agent['metadata']['name']}",
                    deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.ALL, ack_wait=ACK_WAIT_SECONDS,
                    filter_subject=trigger.subject, max_ack_pending=-1))
            except nats.js.errors.NotFoundError:
                self._note(uid, None, f"spec.triggers.trajectories.stream: no JetStream stream {trigger.stream!r} "
                           f"on {self.url}")
                return None
            log.info("RLAgent %s/%s: durable consumer %s on stream %s (subject %s) counts its trajectories",
                     agent["metadata"]["namespace"], agent["metadata"]["name"], name, trigger.stream, trigger.subject)
        window = Window(int(info.num_pending or 0) + int(info.num_ack_pending or 0))
        self._note(uid, window, None)
        return window

    async def read(self, agent: dict[str, Any], trigger: m.TrajectoryTrigger, count: int) -> Read | None:
        """Read the trajectories after the consumer's acknowledgement floor (at most
        :data:`MAX_WINDOW`), in stream order, or None when they are not all deliverable yet
        (those an operator read before a restart come back after ``ACK_WAIT_SECONDS``)."""
        assert self.client is not None
        js = self.client.jetstream(timeout=REQUEST_TIMEOUT_SECONDS)
        name = consumer_name(agent)
        info = await js.consumer_info(trigger.stream, name)
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        try:
            first = (await js.get_msg(trigger.stream, seq=floor + 1, subject=trigger.subject, next=True)).seq
        except nats.js.errors.NotFoundError:
            return None
        want = min(count, MAX_WINDOW)
        sub = await js.pull_subscribe_bind(durable=name, stream=trigger.stream)
        msgs: dict[int, Msg] = {}
        try:
            while len(msgs) < want:
                try:
                    got = await sub.fetch(batch=min(FETCH_BATCH, want - len(msgs)), timeout=1.0)
                except nats.errors.TimeoutError:
                    break
                for msg in got:
                    msgs.setdefault(msg.metadata.sequence.stream, msg)
        finally:
            await sub.unsubscribe()
        ordered = [msgs[s] for s in sorted(msgs)]
        read = Read(Window(len(ordered), ordered[0].metadata.sequence.stream if ordered else None,
                           ordered[-1].metadata.sequence.stream if ordered else None), ordered)
        if not ordered or read.window.first != first or len(ordered) < trigger.threshold:
            log.info("RLAgent %s/%s: %d of the trajectories after sequence %d are deliverable now (from %s); "
                     "reading again later", agent["metadata"]["namespace"], agent["metadata"]["name"],
                     len(ordered), floor, read.window.first)
            await read.settle(None)
            return None
        return read

    async def forget_others(self, agents: list[dict[str, Any]], namespaces: tuple[str, ...]) -> None:
        """Delete the consumers of agents in ``namespaces`` (empty: all) that no trajectory
        trigger uses any more (the agent is gone, its trigger was removed, or it names another
        stream), and forget the counts of agents not in ``agents``. Only call it with every agent
        of those namespaces that has a trajectory trigger (from a complete watch cache). A
        consumer names its agent's namespace in its description: the consumers of another
        operator's namespaces stay."""
        if self.client is None or not self.client.is_connected:
            return
        js = self.client.jetstream(timeout=REQUEST_TIMEOUT_SECONDS)
        wanted = set()
        for agent in agents:
            trigger = m.RLAgentSpec.model_validate(agent["spec"]).triggers.trajectories
            if trigger is not None:
                wanted.add((trigger.stream, consumer_name(agent)))
        for stream in sorted(self._streams):
            try:
                consumers = await js.consumers_info(stream)
            except nats.js.errors.NotFoundError:
                continue
            for info in consumers:
                described = (info.config.description or "").rpartition(" ")[2]
                ours = not namespaces or described.split("/")[0] in namespaces
                if info.name.startswith(CONSUMER_PREFIX) and ours and (stream, info.name) not in wanted:
                    await js.delete_consumer(stream, info.name)
                    log.info("deleted durable consumer %s of stream %s (no trajectory trigger uses it)", info.name, stream)
        with self._guard:
            uids = {a["metadata"]["uid"] for a in agents}
            for uid in [u for u in self._seen if u not in uids]:
                del self._seen[uid]


TRAJECTORIES = Trajectories()
