"""E2E: approval-gated canary rollouts on real Ray Serve, analysed by a real Prometheus, rolled
back by a real Alertmanager alert.

Everything is real: the API server and admission webhook, training Jobs run by the node agent,
Ray Serve (router + policy deployments), Prometheus scraping Ray's metrics agent and evaluating
``manifests/prometheus/rules.yaml``, and Alertmanager calling the operator's receiver.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from support import REPO, prometheus_down, prometheus_up, published_events, sample, stage_chain, wait_for
from rl_engine.policy import load_policy
from rl_engine.serving.contract import counter_series
from rl_engine.serving.testing import poison_artifact, shift_action_preference
from rl_operator import analysis, rayserve

AGENT = "pole"
AGENT_YAML = """apiVersion: rlops.dev/v1alpha1
kind: RLAgent
metadata: {{name: pole}}
spec:
  environment: {{id: CartPole-v1, numEnvs: 8}}
  training: {{totalTimesteps: 300000, targetReturn: 475, seed: {seed}, resources: {{gpu: 1}}}}
  evaluation: {{episodes: 20, minMeanReturn: 400}}
  canary:
    steps:
    - setWeight: 10
    - pause: {{}}
    - setWeight: 25
    - pause: {{}}
    - setWeight: 50
    - pause: {{}}
    - setWeight: 100
    analysis: {{intervalSeconds: 2, windowSeconds: 30, minSampleCount: {min_samples}, maxOverrideRate: 1}}
    # the poisoned canary below must fail client requests, so that the alert path acts: no breaker
    circuitBreaker: {{consecutiveErrors: 0}}
# Two policies trained from different seeds choose differently on many near-upright states (the
# load's observations): the override limit is not what this test is about (see
# test_a_canary_that_overrides_stable_too_often_is_rolled_back)
"""
RESULTS = Path(os.environ.get("RLOPS_BENCH_RESULTS", REPO / "tests" / "e2e" / ".results"))


@pytest.fixture(scope="module")
def stack(cluster, operator, ray_head, tmp_path_factory, request):
    """Prometheus + Alertmanager wired to this Ray head and the operator's receiver; the operator
    restarted with the Ray and Prometheus URLs and the receiver token from its Secret."""
    state = tmp_path_factory.mktemp("services")
    token = secrets.token_hex(16)
    cluster.kubectl("-n", "rlops-system", "delete", "secret", "rlops-alertmanager", "--ignore-not-found")
    cluster.kubectl("-n", "rlops-system", "create", "secret", "generic", "rlops-alertmanager",
                    f"--from-literal=token={token}")
    services = prometheus_up(state, ray_head.metrics.split("//")[1].split("/")[0],
                             f"http://127.0.0.1:{operator.receiver_port}/api/v1/alerts", token)
    request.addfinalizer(lambda: prometheus_down(services["env"]))
    operator.extra_env.update({"RLOPS_RAY_DASHBOARD_URL": ray_head.dashboard,
                               "RLOPS_PROMETHEUS_URL": services["prometheus"]})
    operator.kill()
    operator.start()
    return {"prometheus": services["prometheus"], "alertmanager": services["alertmanager"], "ray": ray_head,
            "token": token, "operator": operator, "prometheus_pid_file": state / "prometheus.pid", "cluster": cluster}


@pytest.fixture
def app_cleanup(stack, namespace):
    """Leave the shared Ray head as found: other e2e modules expect no application of ours."""
    yield
    ray = stack["ray"]
    name = rayserve.app_name(namespace, AGENT)
    rayserve.delete_application(ray.dashboard, name)
    wait_for(lambda: name not in rayserve.get_applications(ray.dashboard)["applications"], 120,
             f"Serve application {name} deleted")


class Load:
    """Steady client load on the agent's route: ``threads`` clients, each request recorded as
    ``(start monotonic seconds, answering version or None, ok, observation sent)``."""

    def __init__(self, url: str, threads: int = 4):
        self.url, self.threads = url, threads
        self.records: list[tuple[float, str | None, bool]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                obs = rng.uniform(-0.05, 0.05, size=4).tolist()
                t = time.monotonic()
                try:
                    resp = client.post(self.url, json={"observation": obs})
                    rec = (t, resp.json().get("version") if resp.status_code == 200 else None, resp.status_code == 200,
                           obs)
                except (httpx.HTTPError, ValueError):
                    rec = (t, None, False, obs)
                with self._lock:
                    self.records.append(rec)

    def __enter__(self) -> "Load":
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(timeout=60)

    def between(self, t0: float, t1: float) -> list[tuple[float, str | None, bool]]:
        with self._lock:
            return [r for r in self.records if t0 <= r[0] < t1]

    def count_since(self, t0: float) -> int:
        with self._lock:
            return sum(1 for r in self.records if r[0] >= t0)


def rollout_status(cluster, namespace, name):
    return (cluster.get("rollout", name, "-n", namespace) or {}).get("status") or {}


def wait_phase(cluster, namespace, kind, name, phases, timeout):
    seen: list[dict] = [{}]  # the last status, for the message on a timeout

    def probe() -> dict | None:
        seen[0] = ((cluster.get(kind, name, "-n", namespace) or {}).get("status") or {})
        return seen[0] if seen[0].get("phase") in phases else None

    try:
        return wait_for(probe, timeout, f"{kind}/{name} in {phases}", interval=1)
    except pytest.fail.Exception as exc:
        raise AssertionError(f"{exc}; last status: {seen[0]}") from None


def approve(cluster, namespace, name):
    fp = cluster.get("rollout", name, "-n", namespace)["spec"]["fingerprint"]
    cluster.kubectl("annotate", "rollout", name, "-n", namespace, f"rlops.dev/approve={fp}")


def serving(ray, namespace):
    summary = rayserve.application_summary(rayserve.get_applications(ray.dashboard), rayserve.app_name(namespace, AGENT))
    config = (summary or {}).get("config") or {}
    return set(rayserve.application_versions(config)), rayserve.application_weights(config)


def train_and_wait_rollout(cluster, namespace, run):
    wait_phase(cluster, namespace, "trainingrun", run, ("Succeeded",), 900)
    return wait_phase(cluster, namespace, "rollout", run, ("AwaitingApproval",), 60)


def forge_alert(stack, namespace):
    """An alert posted to Alertmanager's API by hand (anyone who reaches it can): Alertmanager
    delivers it to the operator like a rule's, and the operator, finding no firing ALERTS series
    for it in Prometheus, changes nothing."""
    def unconfirmed() -> float:
        return sample(stack["operator"].metrics(), "rlops_alerts_received_total", action="unconfirmed") or 0.0

    before, status = unconfirmed(), rollout_status(stack["cluster"], namespace, "pole-2")
    forged = [{"labels": {"alertname": "Forged", "rlops_action": "rollback", "namespace": namespace, "rlagent": AGENT},
               "annotations": {"summary": "a forged alert"}}]
    assert httpx.post(f"{stack['alertmanager']}/api/v2/alerts", json=forged, timeout=5).status_code == 200
    wait_for(lambda: unconfirmed() > before, 30, "the forged alert at the operator", interval=0.5)
    time.sleep(2)  # a reconcile or two
    after = rollout_status(stack["cluster"], namespace, "pole-2")
    assert (after["phase"], after["canaryWeight"]) == (status["phase"], status["canaryWeight"]), after
    assert "Forged" not in (after.get("message") or "") and not after.get("abortReason")


def test_canary_steps_under_load_then_alert_rollback(cluster, stack, nats_server, namespace, app_cleanup):
    ray = stack["ray"]
    url = f"{ray.serve}/{namespace}/{AGENT}"

    # --- the first policy has no stable version to compare with: approved, it goes to 100% at once
    assert cluster.apply(AGENT_YAML.format(seed=1, min_samples=50), namespace).returncode == 0
    train_and_wait_rollout(cluster, namespace, "pole-1")
    approve(cluster, namespace, "pole-1")
    wait_phase(cluster, namespace, "rollout", "pole-1", ("Promoted",), 300)
    agent = cluster.get("rlagent", AGENT, "-n", namespace)
    assert agent["status"]["activeModel"]["version"] == "pole-1"

    # --- a retrained policy (new seed: a new generation, a new TrainingRun) is canaried against it
    assert cluster.apply(AGENT_YAML.format(seed=2, min_samples=50), namespace).returncode == 0
    pending = train_and_wait_rollout(cluster, namespace, "pole-2")
    assert "rlops.dev/approve=" in pending["message"]

    segments: dict[int, list] = {}
    with Load(url) as load:
        wait_for(lambda: load.count_since(0) > 50, 60, "client load to start")
        approve(cluster, namespace, "pole-2")
        for weight in (10, 25, 50):
            wait_for(lambda: (s := rollout_status(cluster, namespace, "pole-2")).get("canaryWeight") == weight
                     and s.get("phase") == "Paused", 300, f"paused at {weight}%", interval=0.5)
            if weight == 10:
                forge_alert(stack, namespace)
            t0 = time.monotonic() + 1.0  # the router's reconfigure lands within a moment of the PUT
            if weight == 25:
                # SIGKILL the operator mid-rollout: the restarted one resumes at the same step and
                # leaves the traffic as it is (the load keeps running and is measured across it)
                before, status_before = serving(ray, namespace), rollout_status(cluster, namespace, "pole-2")
                stack["operator"].kill()
                stack["operator"].start()
                time.sleep(8)  # several reconciles of the restarted operator
                after_restart = rollout_status(cluster, namespace, "pole-2")
                assert serving(ray, namespace) == before
                for key in ("phase", "canaryWeight", "currentStepIndex", "stepStartedAt"):
                    assert after_restart.get(key) == status_before.get(key), key
            # the operator's own metrics say the same (after the restart too: resumed Rollouts rewrite them)
            wait_for(lambda: sample(m := stack["operator"].metrics(), "rlops_rollout_canary_weight_percent",
                                    namespace=namespace, rollout="pole-2") == weight
                     and sample(m, "rlops_rollout_phase", namespace=namespace, rollout="pole-2", phase="Paused") == 1,
                     10, f"operator metrics at {weight}%")
            wait_for(lambda: load.count_since(t0) >= 1100, 300, f"1100 requests at {weight}%", interval=0.5)
            t1 = time.monotonic()
            cluster.kubectl("annotate", "rollout", "pole-2", "-n", namespace, "rlops.dev/promote=true")
            segments[weight] = load.between(t0, t1)
        wait_phase(cluster, namespace, "rollout", "pole-2", ("Promoted",), 300)
        t_promoted = time.monotonic()
        time.sleep(3)
        after = load.between(t_promoted + 1.0, time.monotonic())

    failed = [r for r in load.records if not r[2]]
    assert not failed, f"{len(failed)} of {len(load.records)} client requests failed during the canary"
    for weight, records in segments.items():
        share = 100.0 * sum(1 for r in records if r[1] == "pole-2") / len(records)
        print(f"weight {weight}%: {len(records)} requests, canary share {share:.1f}%")
        assert len(records) >= 1000 and abs(share - weight) <= 3, (weight, share, len(records))
    assert after and all(r[1] == "pole-2" for r in after)
    assert serving(ray, namespace) == ({"pole-2"}, {"pole-2": 100})
    agent = cluster.get("rlagent", AGENT, "-n", namespace)
    assert agent["status"]["activeModel"]["version"] == "pole-2"
    status = rollout_status(cluster, namespace, "pole-2")
    assert status["approval"]["approvedBy"] and status["approval"]["fingerprint"] == \
        cluster.get("rollout", "pole-2", "-n", namespace)["spec"]["fingerprint"]
    reasons = Counter(e["reason"] for e in cluster.get("events", "-n", namespace)["items"]
                      if e["involvedObject"]["name"] == "pole-2")
    assert reasons["StepAdvanced"] >= 4 and reasons["Promoted"] == 1

    # --- a faulty canary (NaN-poisoned weights) is rolled back by the Prometheus alert, through
    # Alertmanager and the operator's receiver. Analysis is made unable to decide (huge sample
    # minimum), so that the alert path alone acts. A canary-plan change does not retrain.
    assert cluster.apply(AGENT_YAML.format(seed=2, min_samples=100000000), namespace).returncode == 0
    stable_uri = cluster.get("rollout", "pole-2", "-n", namespace)["spec"]["artifactURI"]
    with Load(url) as load:
        # a run whose artifact is the stable one, NaN-poisoned: made through the operator's own
        # chain (only the operator creates Rollouts), then approved like any other
        stage_chain(cluster, namespace, AGENT, "pole-bad", stack["operator"].artifact_root,
                    lambda uri: poison_artifact(stable_uri, uri))
        wait_phase(cluster, namespace, "rollout", "pole-bad", ("AwaitingApproval",), 60)
        approve(cluster, namespace, "pole-bad")
        wait_for(lambda: rollout_status(cluster, namespace, "pole-bad").get("canaryWeight") == 10, 300,
                 "faulty canary at 10%", interval=0.5)
        t_alert = t_zero = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and t_zero is None:
            if t_alert is None:
                alerts = httpx.get(f"{stack['alertmanager']}/api/v2/alerts", timeout=5).json()
                if any(a["labels"].get("alertname") == "RLOpsCanaryErrorRateHigh"
                       and a["labels"].get("rlagent") == AGENT for a in alerts):
                    t_alert = time.monotonic()
            versions, weights = serving(ray, namespace)
            if "pole-bad" not in versions or not (weights or {}).get("pole-bad"):
                t_zero = time.monotonic()  # weight 0 (or the canary's deployment already removed)
            time.sleep(0.1)
        assert t_zero is not None, f"canary weight never reached 0: {rollout_status(cluster, namespace, 'pole-bad')}"
        time.sleep(5)
        t_end = time.monotonic()
    status = wait_phase(cluster, namespace, "rollout", "pole-bad", ("RolledBack",), 30)
    assert "RLOpsCanaryErrorRateHigh" in status["abortReason"]
    # the receiver's abort posts its Event too (it runs outside kopf's handlers)
    wait_for(lambda: any(e["reason"] == "RolledBack" and e["involvedObject"]["name"] == "pole-bad"
                         for e in cluster.get("events", "-n", namespace)["items"]), 30, "RolledBack Event")
    errors_before = [r for r in load.records if not r[2] and r[0] < t_zero]
    errors_after = [r for r in load.between(t_zero + 1.0, t_end) if not r[2]]
    assert errors_before, "the poisoned canary never failed a request: the fault was not injected"
    assert not errors_after, f"{len(errors_after)} client requests failed after the canary weight reached 0"
    assert cluster.get("rlagent", AGENT, "-n", namespace)["status"]["activeModel"]["version"] == "pole-2"
    # no retraining for plan changes: pole-1, pole-2 and the staged pole-bad
    assert len(cluster.get("trainingruns", "-n", namespace)["items"]) == 3
    # The receiver refuses what is not an Alertmanager payload, and survives it.
    receiver = f"http://127.0.0.1:{stack['operator'].receiver_port}/api/v1/alerts"
    auth = {"Authorization": f"Bearer {stack['token']}"}
    assert httpx.post(receiver, content=b"{not json", headers=auth, timeout=10).status_code == 400
    assert httpx.post(receiver, json={"version": "4", "alerts": "nope"}, headers=auth, timeout=10).status_code == 400
    assert httpx.post(receiver, json={"version": "4", "alerts": []}, headers={"Authorization": "Bearer wrong"},
                      timeout=10).status_code == 401
    assert stack["operator"].proc.poll() is None
    scraped = stack["operator"].metrics()
    assert sample(scraped, "rlops_alerts_received_total", action="aborted") >= 1
    assert sample(scraped, "rlops_rollout_transitions_total", namespace=namespace, phase="RolledBack") == 1
    assert sample(scraped, "rlops_rollout_canary_weight_percent", namespace=namespace, rollout="pole-bad") is None
    assert sample(scraped, "rlops_admission_reviews_total", result="allowed") >= 1
    assert sample(scraped, "rlops_admission_review_duration_seconds_count") >= 1

    # the events out: each deployment outcome once, by Rollout uid, valid against its schema
    uid = {n: cluster.get("rollout", n, "-n", namespace)["metadata"]["uid"] for n in ("pole-1", "pole-2", "pole-bad")}
    deployed = dict(wait_for(lambda: (found := published_events(nats_server, "agent.rl.model.deployed.v1", namespace))
                             and f"{uid['pole-bad']}:deployed:RolledBack" in dict(found) and found, 30,
                             "the rolled_back event"))
    assert {f"{uid['pole-1']}:deployed:Promoted", f"{uid['pole-2']}:deployed:Progressing",
            f"{uid['pole-2']}:deployed:Promoted", f"{uid['pole-bad']}:deployed:Progressing"} <= set(deployed)
    promoted = deployed[f"{uid['pole-2']}:deployed:Promoted"]
    assert (promoted["outcome"], promoted["previous_version"], promoted["traffic_percentage"]) == ("promoted", "pole-1", 100)
    assert promoted["fingerprint"] == cluster.get("rollout", "pole-2", "-n", namespace)["spec"]["fingerprint"]
    rolled_back = deployed[f"{uid['pole-bad']}:deployed:RolledBack"]
    assert rolled_back["outcome"] == "rolled_back" and rolled_back["traffic_percentage"] == 0
    assert "RLOpsCanaryErrorRateHigh" in rolled_back["reason"]
    succeeded = [p for i, p in published_events(nats_server, "agent.rl.training.status.v1", namespace)
                 if p["phase"] == "Succeeded" and p["training_job_id"] == f"{namespace}/pole-2"]
    assert len(succeeded) == 1 and succeeded[0]["artifact"]["fingerprint"] == promoted["fingerprint"]

    latency = t_zero - t_alert if t_alert else float("nan")
    print(f"alert in Alertmanager -> canary weight 0: {latency:.2f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "alert_to_weight0.json").write_text(json.dumps({
        "alertmanager_to_weight0_seconds": round(latency, 3),
        "errors_before_weight0": len(errors_before), "requests": len(load.records)}))


CRAFTED_AGENT = """apiVersion: rlops.dev/v1alpha1
kind: RLAgent
metadata: {name: crafted}
spec:
  environment: {id: CartPole-v1}
  training: {nodeSelector: {rlops.dev/test-pool: none}}
  approval: {mode: auto}
"""


def test_crafted_rollout_never_reaches_ray_serve(cluster, stack, namespace):
    """A Rollout the tenant crafts is refused by the API server; one made outside the operator's
    owner chain anyway (cluster-admin acting as the operator) is Ignored: Serve's config does not
    change, although the agent's policy would auto-approve it."""
    ray = stack["ray"]
    before = rayserve.get_applications(ray.dashboard)["applications"]
    cluster.kubectl("create", "rolebinding", "mallory-edit", "-n", namespace, "--clusterrole=edit", "--user=mallory")
    assert cluster.apply(CRAFTED_AGENT, namespace).returncode == 0
    crafted = json.dumps({
        "apiVersion": "rlops.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "crafted-9", "labels": {"rlops.dev/agent": "crafted"}},
        "spec": {"agentRef": {"name": "crafted"}, "trainingRunRef": {"name": "crafted-1"}, "version": "crafted-9",
                 "artifactURI": "file:///tmp/mallory/policy", "fingerprint": "sha256:" + "9" * 64,
                 "evaluation": {"meanReturn": 1e9}},
    })
    proc = cluster.kubectl("create", "-n", namespace, "-f", "-", "--as=mallory", input=crafted, check=False)
    assert proc.returncode != 0 and "forbidden" in proc.stderr, proc.stderr
    proc = cluster.kubectl("create", "-n", namespace, "-f", "-",
                           "--as=system:serviceaccount:rlops-system:rlops-operator", input=crafted, check=False)
    assert proc.returncode == 0, proc.stderr
    status = wait_phase(cluster, namespace, "rollout", "crafted-9", ("Ignored",), 60)
    assert status.get("approval") is None and "not controlled by TrainingRun" in status["message"]
    time.sleep(2 * float(os.environ.get("RLOPS_ROLLOUT_INTERVAL_SECONDS", "2")))
    after = rayserve.get_applications(ray.dashboard)["applications"]
    assert rayserve.app_name(namespace, "crafted") not in after
    assert {k: v.get("deployed_app_config") for k, v in after.items()} == \
        {k: v.get("deployed_app_config") for k, v in before.items()}


DEGRADING_AGENT = """apiVersion: rlops.dev/v1alpha1
kind: RLAgent
metadata: {name: pole}
spec:
  environment: {id: CartPole-v1, numEnvs: 8}
  training: {totalTimesteps: 8192, evalInterval: 8192, seed: 3, resources: {gpu: 1}}
  evaluation: {episodes: 5}
  triggers:
    degradation: {margin: 0.2, windowSeconds: 20, minFeedback: 10}
"""


def test_a_degraded_live_reward_starts_one_retraining(cluster, stack, nats_server, namespace, app_cleanup):
    """The active model's feedback rewards, through real Ray Serve and Prometheus: its first full
    window after promotion becomes its baseline; once its live reward falls below that minus the
    margin, one Degraded run starts, and no second one."""
    url = f"{stack['ray'].serve}/{namespace}/{AGENT}"
    assert cluster.apply(DEGRADING_AGENT, namespace).returncode == 0
    train_and_wait_rollout(cluster, namespace, "pole-1")
    approve(cluster, namespace, "pole-1")
    wait_phase(cluster, namespace, "rollout", "pole-1", ("Promoted",), 300)

    def active():
        return (cluster.get("rlagent", AGENT, "-n", namespace).get("status") or {}).get("activeModel") or {}

    def feedback(client, reward, n):
        for _ in range(n):
            body = client.post(url, json={"observation": [0.01, -0.02, 0.03, 0.04]}).json()
            assert client.post(f"{url}/feedback", json={"request_id": body["request_id"], "reward": reward}).status_code == 200

    def degraded_runs():
        return [r for r in cluster.get("trainingruns", "-n", namespace)["items"] if r["spec"]["trigger"]["reason"] == "Degraded"]

    with httpx.Client(timeout=30) as client:
        wait_for(lambda: (feedback(client, 0.6, 3), active().get("baselineReward"))[1] is not None, 120,
                 "the baseline recorded", interval=1)
        baseline = active()["baselineReward"]
        assert abs(baseline - 0.6) <= 0.05, baseline
        assert degraded_runs() == []
        (run,) = wait_for(lambda: (feedback(client, 0.1, 3), degraded_runs())[1], 120, "a Degraded run", interval=1)
        time.sleep(12)  # more rounds of the resync, the reward still low
        feedback(client, 0.1, 10)
    assert [r["metadata"]["name"] for r in degraded_runs()] == [run["metadata"]["name"]]
    degraded = run["spec"]["trigger"]["degraded"]
    assert degraded["version"] == "pole-1" and degraded["baselineReward"] == baseline
    assert degraded["liveReward"] < baseline - 0.2
    agent = cluster.get("rlagent", AGENT, "-n", namespace)
    cond = next(c for c in agent["status"]["conditions"] if c["type"] == "Degraded")
    assert cond["status"] == "True" and cond["reason"] == "LiveRewardBelowBaseline", cond
    assert agent["status"]["activeModel"]["degradedAt"]
    request = wait_for(lambda: next((p for i, p in published_events(nats_server, "agent.rl.training.request.v1",
                                                                    namespace)
                                     if i == f"{run['metadata']['uid']}:request"), None), 30, "the request event")
    assert request["trigger_reason"] == "performance_degradation"
    assert request["training_config"]["degraded_model"]["version"] == "pole-1"


QUICK_AGENT = """apiVersion: rlops.dev/v1alpha1
kind: RLAgent
metadata: {{name: pole}}
spec:
  environment: {{id: CartPole-v1, numEnvs: 8}}
  training: {{totalTimesteps: 8192, evalInterval: 8192, seed: {seed}, resources: {{gpu: 1}}}}
  evaluation: {{episodes: 5}}
  canary:
    steps:
    - setWeight: 50
    - pause: {{}}
    - setWeight: 100
    analysis: {{intervalSeconds: 2, windowSeconds: 30, minSampleCount: 50}}
"""


def test_the_kill_switch_pins_traffic_to_stable_until_lifted(cluster, stack, namespace, app_cleanup):
    """A canary at 50%: the kill switch (ConfigMap rlops-kill-switch) moves all traffic to the
    stable version within seconds and holds the step, promote or not; lifted, the canary gets
    its 50% back and goes on. Not one client request fails."""
    url = f"{stack['ray'].serve}/{namespace}/{AGENT}"
    # two policies trained from different seeds: their override rate is not what this test is about
    unlimited = {seed: QUICK_AGENT.format(seed=seed).replace("minSampleCount: 50}", "minSampleCount: 50, maxOverrideRate: 1}")
                 for seed in (1, 2)}
    assert "maxOverrideRate: 1" in unlimited[1]
    assert cluster.apply(unlimited[1], namespace).returncode == 0
    train_and_wait_rollout(cluster, namespace, "pole-1")
    approve(cluster, namespace, "pole-1")
    wait_phase(cluster, namespace, "rollout", "pole-1", ("Promoted",), 300)
    assert cluster.apply(unlimited[2], namespace).returncode == 0
    train_and_wait_rollout(cluster, namespace, "pole-2")
    switch = ["-n", "rlops-system", "configmap", "rlops-kill-switch"]
    try:
        with Load(url) as load:
            wait_for(lambda: load.count_since(0) > 20, 60, "client load to start")
            approve(cluster, namespace, "pole-2")
            wait_for(lambda: (s := rollout_status(cluster, namespace, "pole-2")).get("phase") == "Paused"
                     and s.get("canaryWeight") == 50, 300, "the canary paused at 50%", interval=0.5)
            cluster.kubectl("create", *switch[:-2], *switch[-2:], "--from-literal=engaged=true",
                            "--from-literal=reason=e2e incident")
            t_engaged = time.monotonic()
            wait_for(lambda: serving(stack["ray"], namespace)[1] == {"pole-1": 100, "pole-2": 0}, 30,
                     "traffic pinned to stable", interval=0.2)
            t_pinned = time.monotonic()
            cluster.kubectl("annotate", "rollout", "pole-2", "-n", namespace, "rlops.dev/promote=true")
            time.sleep(8)  # reconciles, the promote annotation among them: nothing moves
            frozen = rollout_status(cluster, namespace, "pole-2")
            assert (frozen["phase"], frozen["canaryWeight"], frozen["weightBeforeFreeze"]) == ("Paused", 0, 50)
            cond = next(c for c in frozen["conditions"] if c["type"] == "Frozen")
            assert cond["status"] == "True" and "e2e incident" in cond["message"]
            assert serving(stack["ray"], namespace)[1] == {"pole-1": 100, "pole-2": 0}
            pinned = load.between(t_pinned + 1.0, time.monotonic())
            assert len(pinned) > 50 and all(r[1] == "pole-1" for r in pinned), Counter(r[1] for r in pinned)
            cluster.kubectl("delete", *switch)
            # lifted: the canary is back, and the promote asked while frozen now counts
            wait_phase(cluster, namespace, "rollout", "pole-2", ("Promoted",), 120)
    finally:
        cluster.kubectl("delete", *switch, "--ignore-not-found")
    assert not [r for r in load.records if not r[2]], "client requests failed"
    print(f"kill switch engaged -> traffic on stable: {t_pinned - t_engaged:.2f} s")
    events = {e["reason"] for e in cluster.get("events", "-n", namespace)["items"]
              if e["involvedObject"]["name"] == "pole-2"}
    assert {"Frozen", "Unfrozen"} <= events


def serving_extras(ray, namespace):
    summary = rayserve.application_summary(rayserve.get_applications(ray.dashboard), rayserve.app_name(namespace, AGENT))
    return rayserve.router_extras((summary or {}).get("config") or {})


def serving_dump(ray, namespace, url, load=None, prometheus=None) -> str:
    """What a failed serving test needs to tell why: the router's own view (weights, breaker),
    each deployment's status and replicas, the router's raw metrics at Ray, Prometheus' view of
    its scrapes of Ray, the last 30 s of load."""
    lines = []
    if prometheus is not None:
        for promql in ("up", "scrape_duration_seconds", "scrape_samples_scraped",
                       f'count({counter_series("requests")}{{namespace="{namespace}"}})'):
            try:
                lines.append(f"prometheus {promql}: {analysis.instant_vector(prometheus, promql, timeout=10)}")
            except analysis.AnalysisError as err:
                lines.append(f"prometheus {promql} failed: {err}")
    try:
        lines.append(f"router GET: {httpx.get(url, timeout=10).text[:2000]}")
    except httpx.HTTPError as err:
        lines.append(f"router GET failed: {err!r}")
    try:
        summary = rayserve.application_summary(rayserve.get_applications(ray.dashboard),
                                               rayserve.app_name(namespace, AGENT)) or {}
        lines.append(f"application: {summary.get('status')} {summary.get('message')!r}")
        for name, dep in (summary.get("deployments") or {}).items():
            lines.append(f"  {name}: {dep}")
    except Exception as err:  # noqa: BLE001 - a diagnostic must not hide the failure
        lines.append(f"applications failed: {err!r}")
    try:
        lines += [f"  {line}" for line in ray.metrics_text().splitlines()
                  if "rlops_serve" in line and namespace in line and "bucket" not in line]
    except httpx.HTTPError as err:
        lines.append(f"metrics failed: {err!r}")
    if load is not None:
        t = time.monotonic()
        lines.append(f"load, last 30 s: {Counter((r[1], r[2]) for r in load.between(t - 30, t))}; "
                     f"all: {Counter((r[1], r[2]) for r in load.records)}")
    return "\n".join(lines)


def promote_first_policy(cluster, namespace, yaml):
    assert cluster.apply(yaml, namespace).returncode == 0
    train_and_wait_rollout(cluster, namespace, "pole-1")
    approve(cluster, namespace, "pole-1")
    wait_phase(cluster, namespace, "rollout", "pole-1", ("Promoted",), 300)
    return cluster.get("rlagent", AGENT, "-n", namespace)["status"]["activeModel"]["artifactURI"]


def test_the_circuit_breaker_answers_from_stable_and_the_canary_is_rolled_back(cluster, stack, namespace,
                                                                               app_cleanup):
    """A canary whose every inference fails (NaN weights), at 50% under client load: the router
    answers each failed request from stable and opens after 5 consecutive failures, with no
    operator round trip; the operator then rolls the canary back with the breaker as the reason.
    Not one client request fails. (The analysis cannot decide: huge sample minimum.)"""
    url = f"{stack['ray'].serve}/{namespace}/{AGENT}"
    yaml = QUICK_AGENT.format(seed=1).replace("minSampleCount: 50", "minSampleCount: 100000000")
    stable_uri = promote_first_policy(cluster, namespace, yaml)
    with Load(url) as load:
        wait_for(lambda: load.count_since(0) > 20, 60, "client load to start")
        stage_chain(cluster, namespace, AGENT, "pole-bad", stack["operator"].artifact_root,
                    lambda uri: poison_artifact(stable_uri, uri))
        wait_phase(cluster, namespace, "rollout", "pole-bad", ("AwaitingApproval",), 60)
        approve(cluster, namespace, "pole-bad")
        wait_for(lambda: (serving_extras(stack["ray"], namespace) or {}).get("circuitBreaker") ==
                 {"stable": "pole-1", "consecutiveErrors": 5, "timeoutSeconds": 2.0}, 300,
                 "the canary at 50% behind the breaker", interval=0.2)
        t_canary = time.monotonic()
        try:
            status = wait_phase(cluster, namespace, "rollout", "pole-bad", ("RolledBack",), 120)
        except AssertionError as exc:
            dump = serving_dump(stack["ray"], namespace, url, load, stack["prometheus"])
            raise AssertionError(f"{exc}\n{dump}") from None
        t_rolled_back = time.monotonic()
        time.sleep(3)
    assert status["abortReason"].startswith("circuit breaker open: 5 consecutive canary errors"), status
    assert serving(stack["ray"], namespace) == ({"pole-1"}, {"pole-1": 100})
    assert serving_extras(stack["ray"], namespace) == {}
    failed = [r for r in load.records if not r[2]]
    assert not failed, f"{len(failed)} of {len(load.records)} client requests failed"
    answered = Counter(r[1] for r in load.records)
    assert set(answered) == {"pole-1"}, answered  # every canary draw was answered by stable
    fallbacks = wait_for(lambda: stack["ray"].metric("ray_rlops_serve_circuit_fallbacks_total", namespace=namespace,
                                                     version="pole-bad"), 30, "the fallbacks counted")
    errors = stack["ray"].metric("ray_rlops_serve_errors_total", namespace=namespace, version="pole-bad")
    assert stack["ray"].metric("ray_rlops_serve_circuit_opens_total", namespace=namespace, version="pole-bad") == 1
    # 5 failures open it; requests already on their way to the canary then (one per client thread
    # at most) fail too, and are answered from stable like the others
    assert 5 <= errors <= 5 + load.threads - 1 and fallbacks > errors, (errors, fallbacks)
    reasons = [e["reason"] for e in cluster.get("events", "-n", namespace)["items"]
               if e["involvedObject"]["name"] == "pole-bad"]
    assert "RolledBack" in reasons
    print(f"canary at 50% -> rolled back by the breaker: {t_rolled_back - t_canary:.2f} s; "
          f"{len(load.records)} requests, {fallbacks:.0f} answered by stable instead of the canary, 0 failed")


def test_a_canary_that_stops_answering_is_answered_by_stable_and_rolled_back(cluster, stack, namespace,
                                                                              app_cleanup):
    """A healthy canary at 50% under client load whose replica then hangs (SIGSTOP: no answer,
    no error). The router stops waiting for it after timeoutSeconds (2 s), answers from stable
    and counts a failure; 5 in a row open the breaker, and the operator rolls the canary back.
    Not one client request fails. (The analysis cannot decide: huge sample minimum.)"""
    url = f"{stack['ray'].serve}/{namespace}/{AGENT}"
    yaml = QUICK_AGENT.format(seed=1).replace("minSampleCount: 50", "minSampleCount: 100000000")
    stable_uri = promote_first_policy(cluster, namespace, yaml)
    stage_chain(cluster, namespace, AGENT, "pole-hung", stack["operator"].artifact_root,
                lambda uri: shift_action_preference(stable_uri, uri, action=0, delta=0.01))  # a healthy copy
    wait_phase(cluster, namespace, "rollout", "pole-hung", ("AwaitingApproval",), 60)
    with Load(url) as load:
        wait_for(lambda: load.count_since(0) > 20, 60, "client load to start")
        approve(cluster, namespace, "pole-hung")
        wait_for(lambda: (serving_extras(stack["ray"], namespace) or {}).get("circuitBreaker") ==
                 {"stable": "pole-1", "consecutiveErrors": 5, "timeoutSeconds": 2.0}, 300,
                 "the canary at 50% behind the breaker", interval=0.2)
        t_canary = time.monotonic()
        wait_for(lambda: sum(1 for r in load.between(t_canary, time.monotonic()) if r[1] == "pole-hung") >= 10, 60,
                 "the canary answering", interval=0.2)
        summary = rayserve.application_summary(rayserve.get_applications(stack["ray"].dashboard),
                                               rayserve.app_name(namespace, AGENT))
        pids = [r["pid"] for r in summary["deployments"]["policy-pole-hung"]["replicas"]]
        assert pids, summary["deployments"]["policy-pole-hung"]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        t_hung = time.monotonic()
        try:
            status = wait_phase(cluster, namespace, "rollout", "pole-hung", ("RolledBack",), 120)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{serving_dump(stack['ray'], namespace, url, load, stack['prometheus'])}") from None
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        t_rolled_back = time.monotonic()
        wait_for(lambda: serving(stack["ray"], namespace) == ({"pole-1"}, {"pole-1": 100}), 60, "back on stable")
    assert status["abortReason"].startswith("circuit breaker open: 5 consecutive canary errors"), status
    failed = [r for r in load.records if not r[2]]
    assert not failed, f"{len(failed)} of {len(load.records)} client requests failed"
    hung = load.between(t_hung, t_rolled_back)
    assert hung and all(r[1] == "pole-1" for r in hung), Counter(r[1] for r in hung)  # stable answered them all
    errors = wait_for(lambda: (n := stack["ray"].metric("ray_rlops_serve_errors_total", namespace=namespace,
                                                         version="pole-hung")) and n >= 5 and n, 30,
                      "the canary's timeouts counted as errors")
    print(f"canary replica hung -> rolled back by the breaker: {t_rolled_back - t_hung:.2f} s; "
          f"{len(load.records)} requests, {errors:.0f} canary timeouts answered by stable, 0 failed")


def test_a_canary_that_cannot_be_measured_is_rolled_back(cluster, stack, namespace, app_cleanup):
    """Prometheus stops answering (SIGSTOP: its port stays open and queries time out) while a
    healthy canary is paused at 50% under client load. After more than consecutiveErrorLimit
    (here 1) measurements in a row could not be taken, the operator rolls the canary back with
    Prometheus' error as the reason: it does not keep half the traffic unmeasured. Not one client
    request fails."""
    url = f"{stack['ray'].serve}/{namespace}/{AGENT}"
    # the copy's tiny logit shift flips near-ties of a briefly trained policy: the override limit
    # is not what this test is about
    yaml = QUICK_AGENT.format(seed=1).replace("minSampleCount: 50}",
                                              "minSampleCount: 50, consecutiveErrorLimit: 1, maxOverrideRate: 1}")
    assert "consecutiveErrorLimit: 1, maxOverrideRate: 1}" in yaml
    stable_uri = promote_first_policy(cluster, namespace, yaml)
    stage_chain(cluster, namespace, AGENT, "pole-blind", stack["operator"].artifact_root,
                lambda uri: shift_action_preference(stable_uri, uri, action=0, delta=0.01))  # a healthy copy
    wait_phase(cluster, namespace, "rollout", "pole-blind", ("AwaitingApproval",), 60)
    prometheus = int(stack["prometheus_pid_file"].read_text())
    with Load(url) as load:
        wait_for(lambda: load.count_since(0) > 20, 60, "client load to start")
        approve(cluster, namespace, "pole-blind")
        paused = wait_for(lambda: (s := rollout_status(cluster, namespace, "pole-blind")).get("phase") == "Paused"
                          and s.get("canaryWeight") == 50 and s, 300, "the canary paused at 50%", interval=0.5)
        assert paused["currentStepIndex"] == 1, paused  # the analysis gate at 50% passed: measurements worked
        os.kill(prometheus, signal.SIGSTOP)
        t_stopped = time.monotonic()
        try:
            status = wait_phase(cluster, namespace, "rollout", "pole-blind", ("RolledBack",), 120)
        finally:
            os.kill(prometheus, signal.SIGCONT)
        t_rolled_back = time.monotonic()
        wait_for(lambda: serving(stack["ray"], namespace) == ({"pole-1"}, {"pole-1": 100}), 60, "back on stable")
    assert status["abortReason"].startswith(
        "analysis could not measure 2 times in a row at 50% (consecutiveErrorLimit 1): GET "), status
    assert "/api/v1/query: ReadTimeout" in status["abortReason"], status["abortReason"]
    assert status["analysis"]["consecutiveErrors"] == 2
    assert not [r for r in load.records if not r[2]], "client requests failed"
    assert "pole-blind" in {r[1] for r in load.records}, "the canary never answered"
    print(f"Prometheus stopped -> canary rolled back: {t_rolled_back - t_stopped:.1f} s")


OBSERVING_AGENT = QUICK_AGENT.format(seed=1) + """  mode: observe
  observe: {minDecisions: 60, minAgreement: 0.8, maxAgreement: 0.95, minOverrideAccuracy: 0.6, minOverrideFeedback: 5}
"""


def test_observe_mode_shadows_then_graduates_on_the_exact_decision(cluster, stack, namespace, app_cleanup):
    """Observe mode on real Ray Serve and Prometheus. The first policy rolls out as in active
    mode. The next one shadows it: every request is mirrored to it, every answer comes from
    stable. The operator's agreement and override accuracy equal the test's own count, from the
    two policies run locally; the 59th decision leaves it shadowing, the 60th graduates it; then
    the normal approval moves it to active."""
    ray = stack["ray"]
    url = f"{ray.serve}/{namespace}/{AGENT}"
    stable_uri = promote_first_policy(cluster, namespace, OBSERVING_AGENT)
    assert rollout_status(cluster, namespace, "pole-1").get("shadow") is None  # no stable to shadow
    candidate = stage_chain(cluster, namespace, AGENT, "pole-shadow", stack["operator"].artifact_root,
                            lambda uri: shift_action_preference(stable_uri, uri, action=1, delta=1.0))
    shadow_uri = candidate["spec"]["artifactURI"]
    wait_phase(cluster, namespace, "rollout", "pole-shadow", ("Shadowing",), 60)
    app = rayserve.app_name(namespace, AGENT)
    # deployed, RUNNING (the previous router, without the shadow, has left), and mirroring
    wait_for(lambda: serving_extras(ray, namespace) == {"shadow": "pole-shadow"}
             and rayserve.application_status(ray.dashboard, app) == "RUNNING"
             and httpx.get(url, timeout=10).json().get("shadow") == "pole-shadow", 300, "the shadow deployed",
             interval=0.5)
    assert serving(ray, namespace) == ({"pole-1", "pole-shadow"}, {"pole-1": 100, "pole-shadow": 0})

    # the test's own count: both policies run here, on observations whose choice is clear-cut
    stable, shadow = load_policy(stable_uri), load_policy(shadow_uri)
    pool = np.random.default_rng(7).uniform(-0.5, 0.5, size=(4000, 4)).astype(np.float32)
    margins = [np.abs(np.diff(p.logits(pool), axis=1))[:, 0] for p in (stable, shadow)]
    clear = pool[(margins[0] > 0.05) & (margins[1] > 0.05)]
    agree = clear[stable.act(clear) == shadow.act(clear)]
    disagree = clear[stable.act(clear) != shadow.act(clear)]
    assert len(agree) >= 52 and len(disagree) >= 8, (len(agree), len(disagree))
    batch = [(o, True) for o in agree[:51]] + [(o, False) for o in disagree[:8]]
    np.random.default_rng(1).shuffle(batch)

    def ask(client, obs):
        resp = client.post(url, json={"observation": obs.tolist()})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["version"] == "pole-1" and body["action"] == int(stable.act(obs[None])[0]), body
        return body["request_id"]

    seen: list[dict] = [{}]  # the last Rollout status, for the message on a timeout

    def shadow_status():
        seen[0] = rollout_status(cluster, namespace, "pole-shadow")
        return seen[0].get("shadow") or {}

    def counted(key, n, what):
        try:
            wait_for(lambda: shadow_status().get(key) == n, 60, what, interval=0.5)
        except pytest.fail.Exception as exc:
            raise AssertionError(f"{exc}; last status: {seen[0]}") from None

    with httpx.Client(timeout=30) as client:
        ids = [(ask(client, obs), agrees) for obs, agrees in batch]
        counted("decisions", 59, "59 decisions measured")
        # feedback on the 8 disagreements: 5 condemn stable's answer (the shadow was right), 3
        # approve it; feedback on agreements judges no override
        disagreed = [rid for rid, agrees in ids if not agrees]
        agreed = [rid for rid, agrees in ids if agrees]
        for rid, reward in [*zip(disagreed, [-1.0] * 5 + [1.0] * 3), *zip(agreed[:5], [1.0] * 5)]:
            assert client.post(f"{url}/feedback", json={"request_id": rid, "reward": reward}).status_code == 200
        counted("overrideFeedback", 8, "8 judged overrides")
        time.sleep(4)  # more reconciles with every criterion but the decisions met
        status = rollout_status(cluster, namespace, "pole-shadow")
        assert status["phase"] == "Shadowing" and status["shadow"].get("graduatedAt") is None, status
        sh = status["shadow"]
        assert (sh["decisions"], sh["agreements"], sh["overrideFeedback"], sh["overrideCorrect"]) == (59, 51, 8, 5)
        assert sh["agreementRate"] == round(51 / 59, 4) and sh["overrideAccuracy"] == round(5 / 8, 4)
        table = cluster.kubectl("get", "rla", AGENT, "-n", namespace).stdout
        print(table)
        assert "SHADOW" in table and "59/60 decisions" in table, table

        ask(client, agree[51])  # the 60th decision
        status = wait_phase(cluster, namespace, "rollout", "pole-shadow", ("AwaitingApproval",), 60)
    sh = status["shadow"]
    assert sh["graduatedAt"] and (sh["decisions"], sh["agreements"]) == (60, 52), sh
    cond = next(c for c in status["conditions"] if c["type"] == "Graduated")
    assert cond["status"] == "True" and "60/60 decisions, agreement 86.7%, override accuracy 62.5%" in cond["message"]
    agent = cluster.get("rlagent", AGENT, "-n", namespace)
    assert agent["status"]["shadow"]["progress"].startswith("graduated: 60/60 decisions")
    wait_for(lambda: serving_extras(ray, namespace) == {}, 30, "the mirror off", interval=0.5)

    # active through the normal approval
    approve(cluster, namespace, "pole-shadow")
    wait_for(lambda: rollout_status(cluster, namespace, "pole-shadow").get("canaryWeight") == 50, 120,
             "the canary at 50%", interval=0.5)
    cluster.kubectl("annotate", "rollout", "pole-shadow", "-n", namespace, "rlops.dev/promote=full")
    wait_phase(cluster, namespace, "rollout", "pole-shadow", ("Promoted",), 120)
    assert cluster.get("rlagent", AGENT, "-n", namespace)["status"]["activeModel"]["version"] == "pole-shadow"
    reasons = {e["reason"] for e in cluster.get("events", "-n", namespace)["items"]
               if e["involvedObject"]["name"] == "pole-shadow"}
    assert {"ShadowStarted", "Graduated", "Approved", "Promoted"} <= reasons


def test_a_canary_that_overrides_stable_too_often_is_rolled_back(cluster, stack, namespace, app_cleanup):
    """The default override limit (20%) under client load: a canary that prefers one action more
    than the stable policy (a copy of it with that action's logit raised) chooses differently
    on a third or more of the load's observations. Its analysis fails on the override rate and it
    is rolled back; its answers were valid, so no client request failed."""
    url = f"{stack['ray'].serve}/{namespace}/{AGENT}"
    stable_uri = promote_first_policy(cluster, namespace, QUICK_AGENT.format(seed=1))
    stable = load_policy(stable_uri)
    observations = np.random.default_rng(0).uniform(-0.05, 0.05, size=(2000, 4)).astype(np.float32)
    share: dict[str, float] = {}

    def overriding(uri):
        for action in (0, 1):  # the action the stable policy chooses less often near upright
            fp = shift_action_preference(stable_uri, uri, action=action, delta=3.0)
            share["uri"] = uri
            if float(np.mean(load_policy(uri).act(observations) != stable.act(observations))) > 0.3:
                return fp
        raise AssertionError("no shifted copy overrides the stable policy on 30% of near-upright observations")

    stage_chain(cluster, namespace, AGENT, "pole-override", stack["operator"].artifact_root, overriding)
    wait_phase(cluster, namespace, "rollout", "pole-override", ("AwaitingApproval",), 60)
    with Load(url) as load:
        wait_for(lambda: load.count_since(0) > 20, 60, "client load to start")
        approve(cluster, namespace, "pole-override")
        status = wait_phase(cluster, namespace, "rollout", "pole-override", ("RolledBack",), 300)
        time.sleep(2)
    assert "canary overrides stable in" in status["abortReason"] and "> maxOverrideRate 20.0%" in status["abortReason"]
    measured = status["analysis"]["metrics"]["canaryOverrideRate"]
    # the expectation from the very observations the canary answered (the router compares those
    # with stable's answers), not from a sample of the same distribution
    answered = np.array([r[3] for r in load.records if r[1] == "pole-override"], dtype=np.float32)
    assert len(answered) >= 50, f"the canary answered {len(answered)} requests"
    share["expected"] = float(np.mean(load_policy(share["uri"]).act(answered) != stable.act(answered)))
    assert abs(measured - share["expected"]) < 0.15, (measured, share["expected"], len(answered))
    assert not [r for r in load.records if not r[2]], "client requests failed"
    print(f"override rate measured {measured:.1%} (the test's count {share['expected']:.1%}): rolled back")
