"""The trajectory trigger (``spec.triggers.trajectories``) against Debian's nats-server with
JetStream and a real API server (docs/lifecycle.md).

Each test publishes to a stream of its own. The agents select a node label nothing carries, so
their runs stay Pending: what counts is which runs the operator makes, and what its durable
consumer acknowledges. The resync period is 5 s in the tests.
"""

from __future__ import annotations

import json
import time

import nats.js.errors
import pytest

from support import PENDING_AGENT as AGENT, published_events, wait_for

pytestmark = pytest.mark.timeout(300)


def runs(cluster, namespace, agent):
    items = cluster.get("trainingruns", "-n", namespace, "-l", f"rlops.dev/agent={agent}")["items"]
    return {r["metadata"]["name"]: r for r in items}


def by_trajectories(cluster, namespace, agent):
    return sorted((r for r in runs(cluster, namespace, agent).values() if r["spec"]["trigger"].get("trajectories")),
                  key=lambda r: r["spec"]["trigger"]["trajectories"]["firstSequence"])


def condition(cluster, namespace, agent, kind):
    status = cluster.get("rlagent", agent, "-n", namespace).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == kind), None)


def consumer(nats_server, stream, uid):
    """The agent's durable consumer (``rlops-<uid>``), or None."""
    async def info(js):
        try:
            return await js.consumer_info(stream, f"rlops-{uid}")
        except nats.js.errors.NotFoundError:
            return None
    return nats_server.call(info)


def agent_with_trigger(name, stream, subject, threshold, extra=""):
    return AGENT.format(name=name, extra=(
        f"  triggers: {{trajectories: {{threshold: {threshold}, stream: {stream}, subject: {subject}}}}}\n{extra}"))


def payloads(n, start=0):
    return [json.dumps({"trajectory_id": f"t{i}", "reward": 0.5}).encode() for i in range(start, start + n)]


def test_threshold_starts_one_run_across_an_operator_restart(cluster, operator, nats_server, namespace):
    """N−1 trajectories, an operator killed, the N-th while it is down: exactly one run, for
    exactly those N, and the consumer acknowledges them (nothing counted twice afterwards)."""
    stream, subject = f"TRAJ_{namespace.replace('-', '_')}", f"{namespace}.trajectory.v1"
    nats_server.add_stream(stream, [subject])
    spec = agent_with_trigger("a", stream, subject, 5, "  concurrencyPolicy: Allow\n")
    assert cluster.apply(spec, namespace).returncode == 0
    uid = wait_for(lambda: cluster.get("rlagent", "a", "-n", namespace)["metadata"]["uid"], 30, "agent")
    wait_for(lambda: consumer(nats_server, stream, uid), 30, "its durable consumer")
    # trajectories published before the consumer did not count; these do
    seqs = nats_server.publish(subject, payloads(4))
    wait_for(lambda: (c := consumer(nats_server, stream, uid)) and c.num_pending == 4, 30, "4 pending")
    time.sleep(12)  # two resync rounds: 4 of 5 start nothing
    assert by_trajectories(cluster, namespace, "a") == []
    operator.kill()
    seqs += nats_server.publish(subject, payloads(1, start=4))
    operator.start()
    (run,) = wait_for(lambda: by_trajectories(cluster, namespace, "a"), 60, "the Trajectories run")
    assert run["spec"]["trigger"]["reason"] == "Trajectories"
    assert run["spec"]["trigger"]["trajectories"] == {
        "stream": stream, "subject": subject, "firstSequence": seqs[0], "lastSequence": seqs[4], "count": 5}
    wait_for(lambda: (c := consumer(nats_server, stream, uid)) and c.ack_floor.stream_seq == seqs[4]
             and c.num_pending == 0 and c.num_ack_pending == 0, 30, "the 5 acknowledged")
    time.sleep(12)
    assert len(by_trajectories(cluster, namespace, "a")) == 1
    # the next 5: one more run, for them alone
    more = nats_server.publish(subject, payloads(5, start=5))
    second = wait_for(lambda: (found := by_trajectories(cluster, namespace, "a")) and len(found) == 2 and found[1],
                      60, "the second Trajectories run")
    assert second["spec"]["trigger"]["trajectories"]["firstSequence"] == more[0]
    assert second["spec"]["trigger"]["trajectories"]["lastSequence"] == more[-1]
    events = cluster.get("events", "-n", namespace, "--field-selector", "involvedObject.name=a")["items"]
    assert any(e["reason"] == "TrainingRunCreated" and "(Trajectories" in e["message"] for e in events)
    # the request event out names the trajectories
    request = wait_for(lambda: next((p for i, p in published_events(nats_server, "agent.rl.training.request.v1", namespace)
                                     if i == f"{run['metadata']['uid']}:request"), None), 30, "the request event")
    assert request["trigger_reason"] == "threshold_reached"
    assert request["training_config"]["dataset"] == {
        "source": "nats_stream", "stream_name": stream, "subject": subject, "first_sequence": seqs[0],
        "last_sequence": seqs[4], "sample_size": 5}


def test_forbid_holds_the_trajectories_until_the_run_ends(cluster, operator, nats_server, namespace):
    """Under Forbid, trajectories past the threshold wait (condition TriggerWaiting) while a run
    is in progress, and keep arriving: the run that starts after it takes all of them."""
    stream, subject = f"TRAJ_{namespace.replace('-', '_')}", f"{namespace}.trajectory.v1"
    nats_server.add_stream(stream, [subject])
    assert cluster.apply(agent_with_trigger("f", stream, subject, 3, "  concurrencyPolicy: Forbid\n"),
                         namespace).returncode == 0
    uid = wait_for(lambda: cluster.get("rlagent", "f", "-n", namespace)["metadata"]["uid"], 30, "agent")
    wait_for(lambda: "f-1" in runs(cluster, namespace, "f"), 60, "run f-1")
    wait_for(lambda: consumer(nats_server, stream, uid), 30, "its durable consumer")
    seqs = nats_server.publish(subject, payloads(4))
    cond = wait_for(lambda: (c := condition(cluster, namespace, "f", "TriggerWaiting")) and c["status"] == "True" and c,
                    30, "TriggerWaiting")
    assert cond["message"] == "concurrencyPolicy Forbid: the Trajectories trigger waits for f-1", cond
    seqs += nats_server.publish(subject, payloads(2, start=4))
    assert consumer(nats_server, stream, uid).num_ack_pending == 0  # not read while it waits
    cluster.kubectl("patch", "trainingrun", "f-1", "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": {"phase": "Failed", "failureReason": "Test"}}))
    (run,) = wait_for(lambda: by_trajectories(cluster, namespace, "f"), 60, "the Trajectories run after f-1 ended")
    assert run["spec"]["trigger"]["trajectories"]["count"] == 6
    assert (run["spec"]["trigger"]["trajectories"]["firstSequence"],
            run["spec"]["trigger"]["trajectories"]["lastSequence"]) == (seqs[0], seqs[-1])
    wait_for(lambda: condition(cluster, namespace, "f", "TriggerWaiting")["status"] == "False", 30, "nothing waits")


def test_a_missing_stream_is_a_condition_until_it_exists(cluster, operator, nats_server, namespace):
    stream, subject = f"TRAJ_{namespace.replace('-', '_')}", f"{namespace}.trajectory.v1"
    assert cluster.apply(agent_with_trigger("s", stream, subject, 2), namespace).returncode == 0
    cond = wait_for(lambda: (c := condition(cluster, namespace, "s", "TriggerInvalid")) and c["status"] == "True" and c,
                    30, "TriggerInvalid")
    assert cond["reason"] == "TrajectoriesUnavailable" and f"no JetStream stream '{stream}'" in cond["message"], cond
    nats_server.add_stream(stream, [subject])
    wait_for(lambda: condition(cluster, namespace, "s", "TriggerInvalid")["status"] == "False", 30, "the stream found")


def test_the_consumer_goes_with_its_agent(cluster, operator, nats_server, namespace):
    stream, subject = f"TRAJ_{namespace.replace('-', '_')}", f"{namespace}.trajectory.v1"
    nats_server.add_stream(stream, [subject])
    assert cluster.apply(agent_with_trigger("g", stream, subject, 10), namespace).returncode == 0
    uid = wait_for(lambda: cluster.get("rlagent", "g", "-n", namespace)["metadata"]["uid"], 30, "agent")
    wait_for(lambda: consumer(nats_server, stream, uid), 30, "its durable consumer")
    cluster.kubectl("delete", "rlagent", "g", "-n", namespace)
    wait_for(lambda: consumer(nats_server, stream, uid) is None, 30, "its consumer deleted")
