"""E2E: serving trained policies on a real local Ray Serve, deployed the operator's way.

Real Ray head (``hack/ray-up.sh``), real trained artifacts (``python -m rl_engine.train``),
deployments written only through ``rl_operator.rayserve`` (Serve's declarative REST API),
traffic over real HTTP, metrics read from Ray's Prometheus endpoint. No mocks.

The tests run in file order and share one application (``e2e-cartpole``): deploy stable +
canary at 90/10, move to 50/50 under load, feedback, a NaN-poisoned canary, delete. An
application the operator does not own (``bystander``) is deployed first and must survive
every write unchanged (same config, same replica process).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from rl_engine.artifacts import compute_fingerprint
from rl_engine.serving import config as sc
from rl_engine.serving.testing import poison_artifact
from rl_operator import rayserve
from support import finish_training, start_training

NAMESPACE, AGENT = "e2e", "cartpole"
APP = rayserve.app_name(NAMESPACE, AGENT)
STABLE, CANARY, BAD = "cartpole-1", "cartpole-2", "cartpole-3"
OBS = [0.01, -0.02, 0.03, 0.04]
FEEDBACK_KEY = "7e" * 32  # the application's request-id signing key (the operator derives one per application)
DEPLOY_TIMEOUT = 240
BYSTANDER = {
    "name": "bystander",
    "route_prefix": "/bystander",
    "import_path": "rl_engine.serving.testing:build_echo_app",
    "args": {"message": "not the operator's"},
    "runtime_env": {"env_vars": {"BYSTANDER": "1"}},
    "deployments": [{"name": "echo", "max_ongoing_requests": 7}],
}
M = {  # exported Prometheus series (see docs/serving.md)
    "requests": "ray_rlops_serve_requests_total",
    "errors": "ray_rlops_serve_errors_total",
    "latency_count": "ray_rlops_serve_latency_seconds_count",
    "feedback": "ray_rlops_serve_feedback_total",
    "reward_pos": "ray_rlops_serve_feedback_reward_positive_total",
    "reward_neg": "ray_rlops_serve_feedback_reward_negative_total",
    "negative": "ray_rlops_serve_negative_feedback_total",
    "reward_scaled_count": "ray_rlops_serve_feedback_reward_scaled_count",
    "reward_scaled_sum": "ray_rlops_serve_feedback_reward_scaled_sum",
    "feedback_capped": "ray_rlops_serve_feedback_capped_total",
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Two really trained CartPole policies (trained side by side) and a NaN-poisoned copy of the first."""
    workdir = tmp_path_factory.mktemp("artifacts")
    procs = {run: start_training(workdir, NAMESPACE, AGENT, run, seed) for run, seed in ((STABLE, 1), (CANARY, 2))}
    trained = {run: finish_training(workdir, run, proc) for run, proc in procs.items()}
    stable = trained[STABLE]
    bad_uri = f"file://{workdir / BAD}"
    bad = {"artifactURI": bad_uri, "fingerprint": poison_artifact(stable["artifactURI"], bad_uri)}
    assert bad["fingerprint"] == compute_fingerprint(bad_uri) != stable["fingerprint"]
    assert compute_fingerprint(stable["artifactURI"]) == stable["fingerprint"]
    return {**trained, BAD: bad}


class Client:
    """HTTP client of the application (one httpx.Client per thread)."""

    def __init__(self, head):
        self.url = f"{head.serve}/{NAMESPACE}/{AGENT}"
        self._local = threading.local()

    def _client(self) -> httpx.Client:
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = httpx.Client(timeout=60)
        return c

    def predict(self, observation=OBS) -> httpx.Response:
        return self._client().post(self.url, json={"observation": observation})

    def feedback(self, body) -> httpx.Response:
        if isinstance(body, (dict, list)):
            return self._client().post(self.url + "/feedback", json=body)
        return self._client().post(self.url + "/feedback", content=body)

    def info(self) -> dict:
        return self._client().get(self.url).json()

    def many(self, n: int, concurrency: int = 8) -> list[httpx.Response]:
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda _: self.predict(), range(n)))


@pytest.fixture(scope="module")
def client(ray_head) -> Client:
    return Client(ray_head)


def _replicas(head, app: str) -> dict[str, list[tuple[str, str, int]]]:
    summary = rayserve.application_summary(rayserve.get_applications(head.dashboard), app)
    assert summary is not None, f"{app} not deployed"
    return {name: sorted((r["replica_id"], r["actor_id"], r["pid"]) for r in d["replicas"])
            for name, d in summary["deployments"].items()}


class Bystander:
    """An application the operator does not own, deployed with a raw PUT before anything else."""

    def __init__(self, head):
        self.head = head
        details = rayserve.get_applications(head.dashboard)
        assert details["applications"] == {}, "the test Ray head must start empty"
        body = {"http_options": details["http_options"], "proxy_location": details["proxy_location"],
                "applications": [BYSTANDER]}
        resp = httpx.put(f"{head.dashboard}/api/serve/applications/", json=body, timeout=30)
        assert resp.status_code == 200, resp.text
        rayserve.wait_running(head.dashboard, "bystander", DEPLOY_TIMEOUT)
        self.replicas = _replicas(head, "bystander")
        self.pid = httpx.get(f"{head.serve}/bystander", timeout=30).json()["pid"]

    def assert_intact(self) -> None:
        """Still deployed with the config it was given, RUNNING (every PUT briefly shows every
        application as DEPLOYING while Serve re-applies its unchanged config), the same
        replica, answering."""
        summary = rayserve.application_summary(rayserve.get_applications(self.head.dashboard), "bystander")
        assert summary is not None, "the bystander application was dropped"
        assert summary["config"] == BYSTANDER, summary["config"]
        rayserve.wait_running(self.head.dashboard, "bystander", 60, interval=0.5)
        assert _replicas(self.head, "bystander") == self.replicas
        assert httpx.get(f"{self.head.serve}/bystander", timeout=30).json() == {
            "echo": "not the operator's", "pid": self.pid}


@pytest.fixture(scope="module")
def bystander(ray_head) -> Bystander:
    return Bystander(ray_head)


def _split(responses: list[httpx.Response]) -> collections.Counter:
    return collections.Counter(r.json()["version"] for r in responses)


def test_deploy_stable_and_canary_through_the_adapter(ray_head, artifacts, bystander, client):
    config = rayserve.app_config(NAMESPACE, AGENT, {STABLE: artifacts[STABLE], CANARY: artifacts[CANARY]},
                                 {STABLE: 90, CANARY: 10}, feedback_key=FEEDBACK_KEY)
    assert config["route_prefix"] == f"/{NAMESPACE}/{AGENT}" and config["name"] == APP
    rayserve.apply_application(ray_head.dashboard, config)
    summary = rayserve.wait_running(ray_head.dashboard, APP, DEPLOY_TIMEOUT, expect=config)
    assert set(summary["deployments"]) == {"router", f"policy-{STABLE}", f"policy-{CANARY}"}
    assert rayserve.application_status(ray_head.dashboard, APP) == "RUNNING"
    assert rayserve.application_status(ray_head.dashboard, "nope") == "NOT_STARTED"
    bystander.assert_intact()

    info = client.info()
    assert info["weights"] == {STABLE: 90, CANARY: 10} and info["versions"] == [STABLE, CANARY]
    resp = client.predict()
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["action"] in (0, 1) and body["version"] in (STABLE, CANARY)
    assert body["request_id"].startswith(body["version"] + ".")
    # A malformed observation is the client's error, not the version's.
    bad = client.predict([1.0, 2.0])
    assert bad.status_code == 400 and "shape" in bad.json()["error"]
    for body in (b"not json", b'{"obs": [1, 2, 3, 4]}', b'{"observation": [1, "x", 3, 4]}',
                 b'{"observation": []}', b'{"observation": [1, 2, 3, NaN]}'):
        resp = httpx.post(client.url, content=body, timeout=30)
        assert resp.status_code == 400 and resp.json()["error"], (body, resp.text)


def test_split_90_10_over_1000_requests(client):
    responses = client.many(1000)
    assert [r.status_code for r in responses if r.status_code != 200] == []
    split = _split(responses)
    assert set(split) <= {STABLE, CANARY}
    assert abs(split[CANARY] / 1000 * 100 - 10) <= 3, split
    assert {r.json()["action"] for r in responses} <= {0, 1}


def test_weight_change_restarts_no_replica_and_fails_no_request(ray_head, client, bystander):
    before = _replicas(ray_head, APP)
    router_before = client.info()
    results: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:
        c = Client(ray_head)
        while not stop.is_set():
            try:
                r = c.predict()
                results.append(r.status_code)
                if r.status_code != 200:
                    errors.append(r.text)
            except httpx.HTTPError as err:  # a dropped connection is a failed request too
                results.append(-1)
                errors.append(repr(err))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        app = rayserve.set_weights(ray_head.dashboard, APP, {STABLE: 50, CANARY: 50})
        assert rayserve.application_weights(app) == {STABLE: 50, CANARY: 50}
        rayserve.wait_running(ray_head.dashboard, APP, 60, expect=app, interval=0.5)
        deadline = time.monotonic() + 30
        while client.info()["weights"] != {STABLE: 50, CANARY: 50} and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert len(results) >= 20, f"the load thread made only {len(results)} requests"
    assert errors == [], errors[:5]

    router_after = client.info()
    assert router_after["weights"] == {STABLE: 50, CANARY: 50}
    assert router_after["reconfigurations"] == router_before["reconfigurations"] + 1
    assert (router_after["pid"], router_after["replica"]) == (router_before["pid"], router_before["replica"])
    assert _replicas(ray_head, APP) == before, "a weight change restarted a replica"
    bystander.assert_intact()

    split = _split(client.many(1000))
    assert abs(split[CANARY] / 1000 * 100 - 50) <= 3, split


def test_feedback_credits_the_version_that_answered(ray_head, client):
    responses = [r.json() for r in client.many(60)]
    sent = collections.Counter()
    for body in responses:
        version = body["version"]
        reward, negative = (1.0, False) if version == STABLE else (-0.5, True)  # within the default [-1, 1]
        resp = client.feedback({"request_id": body["request_id"], "reward": reward, "negative": negative})
        assert resp.status_code == 200 and resp.json()["version"] == version, resp.text
        sent[version] += 1
    assert sent[STABLE] and sent[CANARY], sent

    # At most one feedback per answer: a second one for the same id is refused and not counted.
    replay = client.feedback({"request_id": responses[0]["request_id"], "reward": 1.0})
    assert replay.status_code == 409 and "already received" in replay.json()["error"], replay.text

    fresh = [r.json()["request_id"] for r in client.many(4)]  # real ids that got no feedback yet
    version, issued, nonce, signature = fresh[0].rsplit(".", 3)
    other = STABLE if version == CANARY else CANARY
    key = bytes.fromhex(FEEDBACK_KEY)
    for body, fragment in (
        (b"{", "not valid JSON"),
        ([1, 2], "JSON object"),
        ({"reward": 1.0}, "request_id"),
        ({"request_id": "nodot", "reward": 1.0}, "request_id: malformed"),
        ({"request_id": f"{STABLE}.{'0' * 32}", "reward": 1.0}, "request_id: malformed"),  # the old, unsigned form
        ({"request_id": f"{STABLE}.{int(time.time())}.{'0' * 16}.{'0' * 32}", "reward": 1.0}, "invalid signature"),
        ({"request_id": f"{other}.{issued}.{nonce}.{signature}", "reward": 1.0}, "invalid signature"),
        ({"request_id": f"{version}.{int(issued) + 100}.{nonce}.{signature}", "reward": 1.0}, "invalid signature"),
        ({"request_id": sc.make_request_id(STABLE, key, scope=f"{NAMESPACE}/{AGENT}", issued_at=time.time() - 3600),
          "reward": 1.0}, "expired"),
        ({"request_id": sc.make_request_id("other-version", key, scope=f"{NAMESPACE}/{AGENT}"), "reward": 1.0},
         "does not serve"),
        ({"request_id": fresh[1]}, "reward"),
        ({"request_id": fresh[1], "reward": "high"}, "reward"),
        ({"request_id": fresh[1], "reward": 1e300}, "outside the declared reward range [-1, 1]"),
        ({"request_id": fresh[1], "reward": -1e300}, "outside the declared reward range [-1, 1]"),
        (b'{"request_id": "%s", "reward": NaN}' % fresh[1].encode(), "finite"),
        (b'{"request_id": "%s", "reward": Infinity}' % fresh[1].encode(), "finite"),
        ({"request_id": fresh[1], "reward": 1, "negative": "yes"}, "negative"),
        ({"request_id": fresh[1], "reward": 1, "extra": 1}, "extra"),
    ):
        resp = client.feedback(body)
        assert resp.status_code == 400, (body, resp.text)
        assert fragment in resp.json()["error"], (body, resp.text)
    info = client.info()["feedback"]
    assert info == {"configured": True, "rewardMin": -1.0, "rewardMax": 1.0, "ttlSeconds": 600,
                    "remembered": sum(sent.values()), "perClientPerMinute": 600, "clientHeader": "",
                    "clients": 1}, info  # every request came from this process: one address

    labels = {"namespace": NAMESPACE, "agent": AGENT}
    ray_head.wait_metric(M["feedback"], sent[STABLE], version=STABLE, **labels)
    ray_head.wait_metric(M["feedback"], sent[CANARY], version=CANARY, **labels)
    ray_head.wait_metric(M["reward_pos"], 1.0 * sent[STABLE], version=STABLE, **labels)
    ray_head.wait_metric(M["reward_neg"], 0.5 * sent[CANARY], version=CANARY, **labels)
    ray_head.wait_metric(M["negative"], sent[CANARY], version=CANARY, **labels)
    # The reward histogram the analysis reads: rewards as a fraction of [-1, 1] (1.0 -> 1, -0.5 -> 0.25).
    ray_head.wait_metric(M["reward_scaled_count"], sent[STABLE], version=STABLE, **labels)
    ray_head.wait_metric(M["reward_scaled_count"], sent[CANARY], version=CANARY, **labels)
    # Not checked: the exported histogram's _sum (Ray's exporter gave 48.75 for 100 observations of
    # 0.25 here); the analysis reads only the bucket counts (operator/rl_operator/analysis.py).
    assert ray_head.metric(M["negative"], version=STABLE, **labels) is None
    assert ray_head.metric(M["reward_pos"], version=CANARY, **labels) is None
    # Every request so far was routed and counted; none failed.
    total = sum(ray_head.metric(M["requests"], version=v, **labels) or 0 for v in (STABLE, CANARY))
    assert total >= 1000 + 1000 + 60
    assert ray_head.metric(M["latency_count"], version=STABLE, **labels) == ray_head.metric(
        M["requests"], version=STABLE, **labels)
    assert ray_head.metric(M["errors"], **labels) is None


def test_nan_canary_fails_with_500_until_its_weight_is_0(ray_head, artifacts, client, bystander):
    config = rayserve.app_config(NAMESPACE, AGENT, {STABLE: artifacts[STABLE], BAD: artifacts[BAD]},
                                 {STABLE: 50, BAD: 50}, feedback_key=FEEDBACK_KEY)
    rayserve.apply_application(ray_head.dashboard, config)
    rayserve.wait_running(ray_head.dashboard, APP, DEPLOY_TIMEOUT, expect=config)
    bystander.assert_intact()
    assert client.info()["versions"] == [STABLE, BAD]

    responses = client.many(200)
    by_version: dict[str, list[httpx.Response]] = collections.defaultdict(list)
    for r in responses:
        by_version[r.json()["version"]].append(r)
    assert {r.status_code for r in by_version[STABLE]} == {200}
    assert by_version[BAD] and {r.status_code for r in by_version[BAD]} == {500}
    err = by_version[BAD][0].json()
    assert "non-finite" in err["error"] and err["version"] == BAD and err["request_id"].startswith(BAD + ".")
    assert by_version[BAD][0].headers["content-type"].startswith("application/json")

    labels = {"namespace": NAMESPACE, "agent": AGENT}
    ray_head.wait_metric(M["errors"], len(by_version[BAD]), version=BAD, **labels)
    ray_head.wait_metric(M["requests"], len(by_version[BAD]), version=BAD, **labels)
    assert ray_head.metric(M["errors"], version=STABLE, **labels) is None

    before = _replicas(ray_head, APP)
    app = rayserve.set_weights(ray_head.dashboard, APP, {STABLE: 100})  # BAD left out: 0
    assert rayserve.application_weights(app) == {STABLE: 100, BAD: 0}
    rayserve.wait_running(ray_head.dashboard, APP, 60, expect=app)
    deadline = time.monotonic() + 30
    while client.info()["weights"] != {STABLE: 100, BAD: 0} and time.monotonic() < deadline:
        time.sleep(0.2)
    after = client.many(200)
    assert {r.status_code for r in after} == {200}
    assert _split(after) == {STABLE: 200}
    assert _replicas(ray_head, APP) == before
    bystander.assert_intact()


def test_invalid_weights_are_refused_before_anything_is_written(ray_head):
    deployed = rayserve.get_applications(ray_head.dashboard)["applications"][APP]["deployed_app_config"]
    for weights, fragment in (({STABLE: 60, BAD: 30}, "sum to 100"), ({"ghost": 100}, "not a version"),
                              ({STABLE: 100.0}, "integer")):
        with pytest.raises(ValueError, match=fragment):
            rayserve.set_weights(ray_head.dashboard, APP, weights)
    with pytest.raises(rayserve.ApplicationNotFound):
        rayserve.set_weights(ray_head.dashboard, "missing-app", {STABLE: 100})
    assert rayserve.get_applications(ray_head.dashboard)["applications"][APP]["deployed_app_config"] == deployed


def test_an_artifact_that_is_not_the_approved_one_is_not_served(ray_head, artifacts, bystander):
    # The fingerprint names the stable artifact, the URI points at the canary's: the policy
    # replica refuses to start and wait_running reports DEPLOY_FAILED with the reason.
    versions = {STABLE: {"artifactURI": artifacts[CANARY]["artifactURI"], "fingerprint": artifacts[STABLE]["fingerprint"]}}
    config = rayserve.app_config(NAMESPACE, "impostor", versions, {STABLE: 100})
    rayserve.apply_application(ray_head.dashboard, config)
    try:
        with pytest.raises(rayserve.DeployFailed, match="fingerprint"):
            rayserve.wait_running(ray_head.dashboard, config["name"], DEPLOY_TIMEOUT, expect=config)
        assert rayserve.application_status(ray_head.dashboard, config["name"]) == "DEPLOY_FAILED"
    finally:
        rayserve.delete_application(ray_head.dashboard, config["name"])
    bystander.assert_intact()


def test_feedback_beyond_a_clients_cap_gets_429_and_is_not_counted(ray_head, artifacts, bystander):
    """A client (the value of a gateway's header, else the source address) gets at most
    ``perClientPerMinute`` feedbacks counted a minute; the rest get 429, count only as capped, and
    their request ids stay usable; another client is counted apart."""
    cap, agent = 5, "capped"
    config = rayserve.app_config(NAMESPACE, agent, {STABLE: artifacts[STABLE]}, {STABLE: 100},
                                 feedback_key=FEEDBACK_KEY, feedback_per_client_per_minute=cap,
                                 feedback_client_header="X-Client-Id")
    rayserve.apply_application(ray_head.dashboard, config)
    try:
        rayserve.wait_running(ray_head.dashboard, config["name"], DEPLOY_TIMEOUT, expect=config)
        url = f"{ray_head.serve}/{NAMESPACE}/{agent}"
        with httpx.Client(timeout=60) as http:
            ids = [http.post(url, json={"observation": OBS}).json()["request_id"] for _ in range(20)]

            def send(rid, client=None):
                headers = {"X-Client-Id": client} if client else {}
                return http.post(f"{url}/feedback", json={"request_id": rid, "reward": 1.0}, headers=headers)

            started = time.monotonic()
            alice = [send(rid, "alice") for rid in ids[:8]]
            took = time.monotonic() - started
            assert [r.status_code for r in alice] == [200] * cap + [429] * 3, [r.text for r in alice]
            refused = alice[-1]
            assert f"over the cap of {cap} feedbacks per minute from one client" in refused.json()["error"]
            # alice's minute began at her first counted feedback, within the `took` seconds above:
            # she may send again when it ends, not sooner and not later
            assert math.floor(60 - took) <= int(refused.headers["retry-after"]) <= 60, (took, refused.headers)
            # another client is counted apart, and the ids refused to alice were not used up
            assert [send(rid, "bob").status_code for rid in ids[cap:8] + ids[8:10]] == [200] * 5
            assert send(ids[10], "bob").status_code == 429
            # without the header, the client is the address the Serve proxy saw (this process's)
            assert [send(rid).status_code for rid in ids[10:17]] == [200] * cap + [429] * 2
            # ... which, for a connection from loopback (uvicorn's FORWARDED_ALLOW_IPS), it takes
            # from X-Forwarded-For: on the Ray head's machine a client can name any address
            spoofed = http.post(f"{url}/feedback", json={"request_id": ids[17], "reward": 1.0},
                                headers={"X-Forwarded-For": "203.0.113.9"})
            assert spoofed.status_code == 200, spoofed.text
            info = http.get(url).json()["feedback"]
        assert (info["perClientPerMinute"], info["clientHeader"], info["clients"]) == (cap, "X-Client-Id", 4), info
        labels = {"namespace": NAMESPACE, "agent": agent, "version": STABLE}
        ray_head.wait_metric(M["feedback"], 3 * cap + 1, **labels)
        ray_head.wait_metric(M["feedback_capped"], 3 + 1 + 2, **labels)
        ray_head.wait_metric(M["reward_scaled_count"], 3 * cap + 1, **labels)
    finally:
        rayserve.delete_application(ray_head.dashboard, config["name"])
    bystander.assert_intact()


def test_delete_removes_only_the_application(ray_head, bystander):
    assert rayserve.delete_application(ray_head.dashboard, APP) is True
    deadline = time.monotonic() + 120
    while rayserve.application_status(ray_head.dashboard, APP) != "NOT_STARTED" and time.monotonic() < deadline:
        time.sleep(1)
    assert rayserve.application_status(ray_head.dashboard, APP) == "NOT_STARTED"
    assert rayserve.delete_application(ray_head.dashboard, APP) is False
    bystander.assert_intact()
