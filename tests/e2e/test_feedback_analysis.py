"""E2E: feedback that the canary analysis can trust, through real Ray Serve and a real Prometheus.

Two really trained (short) CartPole policies serve 50/50 on a real Ray head, deployed with
``rl_operator.rayserve`` as the operator does, with the application's request-id key. Honest
clients send feedback that makes the canary clearly worse than the stable version, and the
analysis (``analysis.measure`` on Prometheus, then ``verdicts.judge``) fails it. Then an attacker,
who can reach the Serve endpoint, tries to rescue the canary and sink the stable version with a
burst of forged request ids, replayed ids, out-of-range and non-finite rewards (every one
refused, with the status code asserted), and a handful of in-range extreme rewards on real ids
that the attacker got by calling the endpoint like anyone (accepted: they are feedback, but the
10%-trimmed mean does not move). The verdict is measured again over the same window: unchanged.
"""

from __future__ import annotations

import collections
import secrets
import time

import httpx
import pytest

from rl_engine.serving import config as sc
from rl_operator import analysis, rayserve, verdicts
from rl_operator import models as m
from support import finish_training, prometheus_down, prometheus_up, start_training, wait_for

NAMESPACE, AGENT = "burst", "pole"
APP = rayserve.app_name(NAMESPACE, AGENT)
STABLE, CANARY = "pole-1", "pole-2"
KEY = secrets.token_hex(32)
OBS = [0.01, -0.02, 0.03, 0.04]
HONEST = {STABLE: 0.6, CANARY: 0.2}  # rewards on the router's 1/20-of-range grid (range [-1, 1])
WINDOW = 600  # seconds: the whole test falls inside one analysis window
SPEC = m.AnalysisSpec(min_sample_count=100, window_seconds=WINDOW)


@pytest.fixture(scope="module")
def app(ray_head, tmp_path_factory, request):
    workdir = tmp_path_factory.mktemp("burst")
    procs = {run: start_training(workdir, NAMESPACE, AGENT, run, seed) for run, seed in ((STABLE, 1), (CANARY, 2))}
    versions = {run: finish_training(workdir, run, proc) for run, proc in procs.items()}
    config = rayserve.app_config(NAMESPACE, AGENT, versions, {STABLE: 50, CANARY: 50}, feedback_key=KEY)
    rayserve.apply_application(ray_head.dashboard, config)
    request.addfinalizer(lambda: rayserve.delete_application(ray_head.dashboard, APP))
    url = f"{ray_head.serve}/{NAMESPACE}/{AGENT}"
    wait_for(lambda: _ok(url), 240, f"{APP} answering")
    return url


@pytest.fixture(scope="module")
def prometheus(ray_head, tmp_path_factory, request):
    services = prometheus_up(tmp_path_factory.mktemp("prom"), ray_head.metrics.split("//")[1].split("/")[0],
                             "http://127.0.0.1:9/unused", secrets.token_hex(16))
    request.addfinalizer(lambda: prometheus_down(services["env"]))
    return services["prometheus"]


def _ok(url: str) -> bool:
    try:
        return httpx.post(url, json={"observation": OBS}, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def answers(client: httpx.Client, url: str, n: int) -> dict[str, list[str]]:
    """``n`` predictions: the signed request ids each version answered."""
    out: dict[str, list[str]] = collections.defaultdict(list)
    for _ in range(n):
        body = client.post(url, json={"observation": OBS}).json()
        out[body["version"]].append(body["request_id"])
    return out


def verdict(prom: str) -> tuple[str, str, dict]:
    meas = analysis.measure(prom, NAMESPACE, AGENT, CANARY, STABLE, WINDOW)
    return verdicts.judge(meas, SPEC, has_stable=True)


def test_a_burst_of_forged_replayed_and_extreme_feedback_does_not_change_the_verdict(app, prometheus):
    client = httpx.Client(timeout=30)

    def counted(expected: dict[str, int]) -> bool:
        """Prometheus has scraped every feedback so far (the raw counters, not the window's increase)."""
        got = {r["metric"]["version"]: float(r["value"][1]) for r in analysis.instant_vector(
            prometheus, f'sum by (version) ({analysis.SERIES["feedback"]}{{namespace="{NAMESPACE}",agent="{AGENT}"}})')}
        return all(got.get(v) == n for v, n in expected.items())

    # Prometheus' increase() does not count a series' first sample. So, as in a canary that has
    # been serving a while (where a new series loses at most one scrape interval), both versions
    # answer and get one feedback, and Prometheus scrapes that, before the measured traffic.
    warm = answers(client, app, 40)
    for version, reward in HONEST.items():
        assert client.post(f"{app}/feedback", json={"request_id": warm[version][0], "reward": reward}).status_code == 200
    wait_for(lambda: counted({STABLE: 1, CANARY: 1}), 120, "the feedback series in Prometheus", interval=1)
    time.sleep(5)  # two more scrapes (every 2 s here)
    ids = answers(client, app, 400)
    assert len(ids[STABLE]) > 120 and len(ids[CANARY]) > 120, {v: len(i) for v, i in ids.items()}
    for version, reward in HONEST.items():
        for rid in warm[version][1:] + ids[version]:
            resp = client.post(f"{app}/feedback", json={"request_id": rid, "reward": reward})
            assert resp.status_code == 200, resp.text
    honest = {v: len(warm[v]) + len(ids[v]) for v in HONEST}

    wait_for(lambda: counted(honest), 120, f"Prometheus to see the honest feedback {honest}", interval=2)
    before = verdict(prometheus)
    print("before the burst:", before)
    assert before[0] == "Failed" and "canary reward" in before[1], before
    assert before[2]["canaryTrimmedMeanReward"] == pytest.approx(HONEST[CANARY], abs=0.03)
    assert before[2]["stableTrimmedMeanReward"] == pytest.approx(HONEST[STABLE], abs=0.03)

    # --- the attacker: every forgery refused, with its status code
    codes: collections.Counter = collections.Counter()
    fresh = answers(client, app, 60)  # real, signed ids nobody has given feedback for yet
    now = int(time.time())
    attempts = []
    for i in range(150):
        attempts.append({"request_id": f"{CANARY}.{now}.{secrets.token_hex(8)}.{secrets.token_hex(16)}", "reward": 1.0})
        attempts.append({"request_id": f"{CANARY}.{secrets.token_hex(16)}", "reward": 1.0})  # the old, unsigned form
        attempts.append({"request_id": sc.make_request_id(CANARY, b"not the key", scope=f"{NAMESPACE}/{AGENT}"),
                         "reward": 1.0})
        attempts.append({"request_id": ids[CANARY][i % len(ids[CANARY])], "reward": 1.0})  # replays
        attempts.append({"request_id": ids[STABLE][i % len(ids[STABLE])], "reward": -1.0, "negative": True})
        target = fresh[CANARY] if fresh.get(CANARY) else fresh[STABLE]
        attempts.append({"request_id": target[i % len(target)], "reward": 1e300})  # out of range
        attempts.append({"request_id": target[i % len(target)], "reward": 1.0000001})
    for body in attempts:
        codes[client.post(f"{app}/feedback", json=body).status_code] += 1
    for raw in (b'{"request_id": "%s", "reward": NaN}', b'{"request_id": "%s", "reward": -Infinity}'):
        for rid in fresh[STABLE][:20]:
            codes[client.post(f"{app}/feedback", content=raw % rid.encode(),
                              headers={"content-type": "application/json"}).status_code] += 1
    print("burst answers:", dict(codes))
    assert set(codes) <= {400, 409} and sum(codes.values()) == len(attempts) + 40, codes
    assert codes[409] == 300  # every replay: "already received"

    # --- and a handful (8%, inside the 10% trim) of real, in-range, extreme feedback: accepted, and trimmed away
    handful = {CANARY: max(1, honest[CANARY] // 12), STABLE: max(1, honest[STABLE] // 12)}
    more = answers(client, app, 200)
    for version, reward in ((CANARY, 1.0), (STABLE, -1.0)):
        assert len(more[version]) >= handful[version], {v: len(i) for v, i in more.items()}
        for rid in more[version][:handful[version]]:
            resp = client.post(f"{app}/feedback", json={"request_id": rid, "reward": reward, "negative": reward < 0})
            assert resp.status_code == 200, resp.text
    total = {v: honest[v] + handful[v] for v in HONEST}
    wait_for(lambda: counted(total), 120, f"Prometheus to see {total} feedbacks", interval=2)
    after = verdict(prometheus)
    print("after the burst:", after)
    assert after[0] == before[0] == "Failed" and "canary reward" in after[1], after
    for key in ("canaryTrimmedMeanReward", "stableTrimmedMeanReward"):
        assert after[2][key] == pytest.approx(before[2][key], abs=0.03), (key, before[2], after[2])
