"""The alerting path for real: metrics -> Prometheus -> rule -> Alertmanager -> the receiver.

Real Prometheus and Alertmanager (Debian's packages, ``hack/install-services.sh``), started by
``hack/prom-up.sh`` on free ports with their own state dir and stopped by ``hack/prom-down.sh``.
Prometheus scrapes a metrics endpoint served here (the serving counters, labelled ``namespace``,
``agent``, ``version``, with the names ``manifests/prometheus/rules.yaml`` uses), evaluates the
shipped rule, and Alertmanager POSTs to :func:`rl_operator.alerts.start_receiver` running in this
process. Nothing is mocked; the only thing faked is the traffic.

The last test reads the token from a real Secret (``load_token_from_secret``) and needs the local
control plane (the ``cluster`` fixture); the others need no cluster.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import support
import yaml
from aiohttp import web
from rl_operator import alerts, analysis
from rl_operator.alerts import AlertTarget

wait_for = functools.partial(support.wait_for, interval=0.2)  # this file polls faster than the default

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "manifests" / "prometheus" / "rules.yaml"
ALERT = "RLOpsCanaryErrorRateHigh"

needs_services = pytest.mark.skipif(
    not (Path("/usr/bin/prometheus").exists() and Path("/usr/bin/prometheus-alertmanager").exists()),
    reason="Prometheus/Alertmanager missing: run `sudo bash hack/install-services.sh`",
)




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving_metric_names() -> tuple[str, str]:
    """The request and error counters the rule reads, taken from rules.yaml (their one place)."""
    exprs = {r["record"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"]
             for r in g["rules"] if "record" in r}
    def metric(record: str) -> str:
        return re.search(r"rate\(([a-zA-Z_:][a-zA-Z0-9_:]*)\[", exprs[record]).group(1)
    return (metric("namespace_agent_version:rlops_serve_requests:rate1m"),
            metric("namespace_agent_version:rlops_serve_errors:rate1m"))


# ----------------------------------------------------------------------------- fake traffic


class Traffic:
    """Counters of requests and errors per (namespace, agent, version), advanced every 0.1 s.

    ``set(key, rps, error_fraction)`` changes a version's traffic. As with Ray's counters, a series
    appears at its first increment (a version without errors has no error series). The counters
    are exposed in the Prometheus text format, through ``prometheus_client`` when it is installed
    (it comes with ray), else written by hand.
    """

    def __init__(self) -> None:
        self.requests_name, self.errors_name = serving_metric_names()
        self.profile: dict[tuple[str, str, str], tuple[float, float]] = {}
        self.counts: dict[tuple[str, str, str], list[float]] = {}
        self.lock = threading.Lock()
        try:
            import prometheus_client
        except ImportError:
            self.registry = None
        else:
            self.registry = prometheus_client.CollectorRegistry()
            labels = ["namespace", "agent", "version"]
            # prometheus_client adds the `_total` suffix of a counter itself.
            self.c_requests = prometheus_client.Counter(self.requests_name.removesuffix("_total"), "requests",
                                                        labels, registry=self.registry)
            self.c_errors = prometheus_client.Counter(self.errors_name.removesuffix("_total"), "errors",
                                                      labels, registry=self.registry)

    def set(self, key: tuple[str, str, str], rps: float, error_fraction: float) -> None:
        with self.lock:
            self.profile[key] = (rps, error_fraction)
            self.counts.setdefault(key, [0.0, 0.0])

    async def run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            dt, last = now - last, now
            with self.lock:
                for key, (rps, error_fraction) in self.profile.items():
                    n = rps * dt
                    self.counts[key][0] += n
                    self.counts[key][1] += n * error_fraction
                    # Like Ray's counters, a series appears at its first (positive) increment.
                    if self.registry is not None:
                        self.c_requests.labels(*key).inc(n)
                        if n * error_fraction > 0:
                            self.c_errors.labels(*key).inc(n * error_fraction)

    def exposition(self) -> bytes:
        with self.lock:
            if self.registry is not None:
                import prometheus_client
                return prometheus_client.generate_latest(self.registry)
            lines = []
            for name, i in ((self.requests_name, 0), (self.errors_name, 1)):
                lines.append(f"# TYPE {name} counter")
                for (ns, agent, version), counts in self.counts.items():
                    if counts[i] > 0:
                        lines.append(f'{name}{{namespace="{ns}",agent="{agent}",version="{version}"}} {counts[i]}')
            return ("\n".join(lines) + "\n").encode()


# ----------------------------------------------------------------------------- the harness


class Harness:
    """An event loop in a thread running the metrics endpoint, the traffic and the receiver."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.traffic = Traffic()
        self.expected_token = "rollback-" + os.urandom(8).hex()
        self.token_file = tmp / "alert-token"
        self.token_file.write_text(self.expected_token + "\n")
        self.token_file.chmod(0o600)
        self.calls: list[tuple[float, AlertTarget]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.metrics_port, self.receiver_port = free_port(), free_port()
        self.prom_port, self.am_port = free_port(), free_port()
        self.state = tmp / "services"
        self.env = {
            **os.environ,
            "RLOPS_STATE_DIR": str(self.state),
            "RLOPS_PROMETHEUS_PORT": str(self.prom_port),
            "RLOPS_ALERTMANAGER_PORT": str(self.am_port),
            "RLOPS_SCRAPE_TARGETS": f"127.0.0.1:{self.metrics_port}",
            "RLOPS_ALERT_WEBHOOK_URL": f"http://127.0.0.1:{self.receiver_port}{alerts.ALERTS_PATH}",
            "RLOPS_ALERT_TOKEN_FILE": str(self.token_file),
        }

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.traffic_task = asyncio.ensure_future(self.traffic.run())

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=self.traffic.exposition(), content_type="text/plain",
                                charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self.metrics_runner = web.AppRunner(app, access_log=None)
        await self.metrics_runner.setup()
        await web.TCPSite(self.metrics_runner, "127.0.0.1", self.metrics_port).start()

        async def on_alert(target: AlertTarget) -> None:
            self.calls.append((time.monotonic(), target))

        self.receiver = await alerts.start_receiver("127.0.0.1", self.receiver_port,
                                                    lambda: self.expected_token, on_alert)

    async def _stop(self) -> None:
        self.traffic_task.cancel()
        await self.receiver.cleanup()
        await self.metrics_runner.cleanup()

    def start(self) -> None:
        self.call(self._start())
        proc = subprocess.run(["bash", str(REPO / "hack" / "prom-up.sh")], env=self.env, check=False,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"prom-up.sh failed:\n{proc.stdout}\n{proc.stderr}"

    def stop(self) -> None:
        subprocess.run(["bash", str(REPO / "hack" / "prom-down.sh")], env=self.env, check=False, timeout=60)
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    @property
    def stats(self) -> alerts.ReceiverStats:
        return self.receiver.app[alerts.STATS]

    def prometheus(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.prom_port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.load(resp)["data"]

    def prometheus_alerts(self, agent: str) -> list[dict[str, Any]]:
        return [a for a in self.prometheus("/api/v1/alerts")["alerts"]
                if a["labels"].get("alertname") == ALERT and a["labels"].get("agent") == agent]

    def calls_for(self, namespace: str, agent: str) -> list[tuple[float, AlertTarget]]:
        return [(t, c) for t, c in self.calls if (c.namespace, c.agent) == (namespace, agent)]

    def alertmanager_log(self) -> str:
        path = self.state / "alertmanager.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Harness:
    h = Harness(tmp_path_factory.mktemp("alerting"))
    try:
        h.start()
        yield h
    finally:
        h.stop()
        assert not (h.state / "prometheus.pid").exists() and not (h.state / "alertmanager.pid").exists()


# ----------------------------------------------------------------------------- tests


@needs_services
def test_error_burst_rolls_back_through_prometheus_and_alertmanager(harness: Harness):
    h = harness
    stable, canary, idle = ("ns-a", "cartpole", "v1"), ("ns-a", "cartpole", "v2"), ("ns-a", "idle", "v9")
    h.traffic.set(stable, rps=20, error_fraction=0.0)
    h.traffic.set(canary, rps=10, error_fraction=0.01)   # 1%: below the 5% threshold
    h.traffic.set(idle, rps=0.05, error_fraction=1.0)    # all errors, but under the minimum rate

    # Prometheus scrapes us and the recording rules have a ratio for the canary (>= 2 samples).
    wait_for(lambda: h.prometheus("/api/v1/query", query='up{job="rlops-serving"} == 1')["result"],
             30, "Prometheus scraping the test's metrics endpoint")
    wait_for(lambda: h.prometheus("/api/v1/query", query='namespace_agent_version:rlops_serve_error_ratio:rate1m'
                                                         '{agent="cartpole",version="v2"}')["result"],
             30, "the canary's error ratio")
    time.sleep(6)  # three evaluations of healthy traffic: nothing may fire
    assert h.prometheus_alerts("cartpole") == [] and h.calls == [], "fired on healthy traffic"

    # The burst: the canary now fails half of its requests.
    burst_wall, burst = time.time(), time.monotonic()
    h.traffic.set(canary, rps=10, error_fraction=0.5)
    seen: dict[str, float] = {}

    def delivered():
        for a in h.prometheus_alerts("cartpole"):
            seen.setdefault(a["state"], time.monotonic())
        return h.calls_for("ns-a", "cartpole")

    (called_at, target), *_ = wait_for(delivered, 60, "the rollback alert to reach the receiver")
    latency = called_at - burst
    (prom_alert,) = [a for a in h.prometheus_alerts("cartpole") if a["labels"]["version"] == "v2"]
    active_at = prom_alert["activeAt"]
    print(f"\nerror burst -> receiver callback: {latency:.1f}s "
          f"(Prometheus pending after {seen.get('pending', float('nan')) - burst:.1f}s, "
          f"firing after {seen.get('firing', float('nan')) - burst:.1f}s; activeAt {active_at}, "
          f"burst at {time.strftime('%H:%M:%S', time.gmtime(burst_wall))}Z; "
          f"scrape 2s, evaluation 2s, for 4s, group_wait 1s)")

    assert (target.namespace, target.agent, target.version) == ("ns-a", "cartpole", "v2")
    assert target.alertname == ALERT and target.fingerprint
    # the operator acts only on what Prometheus confirms: this one fires there
    assert analysis.alert_firing(f"http://127.0.0.1:{h.prom_port}", target.labels)
    assert target.summary.startswith("RLAgent ns-a/cartpole: version v2 fails")
    assert h.stats.unauthorized == 0 and h.stats.notifications >= 1 and h.stats.callbacks_ok >= 1
    assert latency < 30
    # Neither the idle version nor the healthy stable one fired.
    assert not h.calls_for("ns-a", "idle") and h.prometheus_alerts("idle") == []
    assert {c.version for _, c in h.calls} == {"v2"}
    h.traffic.set(canary, rps=10, error_fraction=0.0)


@needs_services
def test_wrong_token_is_refused_with_401_then_a_fixed_token_goes_through(harness: Harness):
    h = harness
    unauthorized_before = h.stats.unauthorized
    # Alertmanager reads its credentials_file on every notification: a wrong token takes effect at once.
    h.token_file.write_text("not-the-token\n")
    try:
        key = ("ns-b", "pong", "v2")
        h.traffic.set(key, rps=10, error_fraction=0.5)
        wait_for(lambda: h.stats.unauthorized > unauthorized_before, 60,
                 "Alertmanager's notification with the wrong token")
        assert not h.calls_for("ns-b", "pong"), "a notification with a wrong token reached on_alert"
        wait_for(lambda: re.search(r"Notify for alerts failed.*401", h.alertmanager_log()), 15,
                 "Alertmanager logging the 401")
    finally:
        h.token_file.write_text(h.expected_token + "\n")
    # The failed notification was not recorded as sent, so Alertmanager sends it again at the
    # next group_interval: with the right token it now reaches the callback, without a restart.
    fixed = time.monotonic()
    (called_at, target), *_ = wait_for(lambda: h.calls_for("ns-b", "pong"), 30,
                                       "the alert after the token was fixed")
    print(f"\ntoken fixed -> receiver callback: {called_at - fixed:.1f}s "
          f"({h.stats.unauthorized - unauthorized_before} notifications refused with 401 before)")
    assert (target.namespace, target.agent, target.version) == ("ns-b", "pong", "v2")
    h.traffic.set(key, rps=10, error_fraction=0.0)


@needs_services
def test_an_alert_posted_to_alertmanager_by_hand_is_not_confirmed_by_prometheus(harness: Harness):
    """Anyone who reaches Alertmanager's API can post an alert, and Alertmanager delivers it like
    any other. Prometheus' own ALERTS series tells a rule's alert from a forged one: a forged
    alert, even one that copies a real rule's name and labels, has none (the operator then
    changes nothing); the rule's alert has one."""
    h = harness
    prometheus = f"http://127.0.0.1:{h.prom_port}"
    h.traffic.set(("ns-c", "real", "v2"), rps=10, error_fraction=0.5)
    forged = [{"labels": {"alertname": "Forged", "rlops_action": "rollback", "namespace": "ns-c", "rlagent": "victim"},
               "annotations": {"summary": "forged"}},
              {"labels": {"alertname": ALERT, "rlops_action": "rollback", "severity": "critical", "namespace": "ns-c",
                          "rlagent": "victim", "agent": "victim", "version": "v2"}}]
    req = urllib.request.Request(f"http://127.0.0.1:{h.am_port}/api/v2/alerts", data=json.dumps(forged).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
    calls = wait_for(lambda: len(h.calls_for("ns-c", "victim")) >= 2 and h.calls_for("ns-c", "victim"), 30,
                     "Alertmanager to deliver both forged alerts")
    assert {c.alertname for _, c in calls} == {"Forged", ALERT}
    for _, target in calls:
        assert not analysis.alert_firing(prometheus, target.labels), target.labels
    # the rule's own alert for another agent of that namespace fires, and is confirmed; the same
    # labels with another version are not
    _, real = wait_for(lambda: h.calls_for("ns-c", "real") and h.calls_for("ns-c", "real")[0], 60,
                       "the rule's alert for ns-c/real")
    assert analysis.alert_firing(prometheus, real.labels)
    assert not analysis.alert_firing(prometheus, {**real.labels, "version": "v3"})
    # extra labels on the alert (Prometheus' external labels) do not matter
    assert analysis.alert_firing(prometheus, {**real.labels, "cluster": "eu-1"})
    h.traffic.set(("ns-c", "real", "v2"), rps=10, error_fraction=0.0)


def test_token_from_a_real_secret(cluster, namespace):
    """``load_token_from_secret`` against the local API server (admin credentials)."""
    from kubernetes import config

    token = "from-the-secret-" + os.urandom(6).hex()
    cluster.kubectl("create", "secret", "generic", "rlops-alertmanager", "-n", namespace,
                    f"--from-literal=token={token}\n", "--from-literal=empty=")
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        assert alerts.load_token_from_secret(namespace, "rlops-alertmanager", api_client=api) == token
        assert alerts.load_token_from_secret(namespace, "rlops-alertmanager", key="empty", api_client=api) is None
        assert alerts.load_token_from_secret(namespace, "rlops-alertmanager", key="other", api_client=api) is None
        assert alerts.load_token_from_secret(namespace, "no-such-secret", api_client=api) is None
        encoded = base64.b64encode(token.encode()).decode()
        assert cluster.get("secret", "rlops-alertmanager", "-n", namespace)["data"]["token"] != encoded  # had "\n"
    finally:
        api.close()
