"""The alerting path without a cluster: payload parsing, the receiver over real HTTP, the rule.

The receiver tests run aiohttp's real server on a free loopback port (port 0) and talk to it with
a real client; nothing is mocked. The rule tests check that ``rules.yaml`` and the PrometheusRule
hold the same group, and (when Debian's ``promtool`` is installed: ``hack/install-services.sh``)
run the rule against synthetic series with ``promtool test rules``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
import yaml
from pydantic import ValidationError
from rl_operator import alerts
from rl_operator.alerts import AlertTarget, WebhookPayload

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "manifests" / "prometheus" / "rules.yaml"
PROMETHEUS_RULE = ROOT / "manifests" / "prometheus" / "prometheusrule.yaml"
TOKEN = "s3cret-token"
STARTS = "2026-11-22T12:00:00.123456789Z"


def alert(status="firing", **labels):
    return {
        "status": status,
        "labels": {"alertname": "RLOpsCanaryErrorRateHigh", **labels},
        "annotations": {"summary": f"{labels.get('rlagent')} fails", "description": "..."},
        "startsAt": STARTS,
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-22T12:05:00Z",
        "generatorURL": "http://prometheus/graph",
        "fingerprint": f"fp-{labels.get('rlagent', 'none')}-{labels.get('version', '')}",
    }


def payload(*items, status="firing"):
    """An Alertmanager webhook body (version 4), as Alertmanager 0.25 sends it."""
    return {
        "receiver": "rlops-operator", "status": status, "alerts": list(items),
        "groupLabels": {"namespace": "ml", "rlagent": "cartpole"},
        "commonLabels": {"alertname": "RLOpsCanaryErrorRateHigh"}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093", "version": "4",
        "groupKey": '{}/{rlops_action="rollback"}:{namespace="ml", rlagent="cartpole"}',
        "truncatedAlerts": 0,
    }


# ----------------------------------------------------------------------------- payload parsing


def test_firing_alert_with_agent_labels_is_a_target():
    body = payload(alert(namespace="ml", rlagent="cartpole", agent="cartpole", version="v2"))
    got = alerts.targets(WebhookPayload.model_validate(body))
    assert got == [AlertTarget(
        namespace="ml", agent="cartpole", alertname="RLOpsCanaryErrorRateHigh",
        summary="cartpole fails", fingerprint="fp-cartpole-v2", version="v2",
        starts_at=datetime(2026, 11, 22, 12, 0, 0, 123456, tzinfo=UTC),
        labels=body["alerts"][0]["labels"],
    )]


def test_resolved_alerts_are_no_targets():
    body = payload(alert("resolved", namespace="ml", rlagent="cartpole"), status="resolved")
    c = alerts.classify(WebhookPayload.model_validate(body))
    assert (c.matched, len(c.resolved), c.unmatched) == ([], 1, [])


def test_firing_alerts_without_namespace_or_rlagent_are_unmatched(caplog):
    body = payload(
        alert(namespace="ml"),                                   # no rlagent
        alert(rlagent="cartpole"),                               # no namespace
        alert(namespace="ml", rlagent=""),                       # empty rlagent
        alert(namespace="ml", rlagent="pong", version="v7"),
        alert("resolved", namespace="ml", rlagent="cartpole"),   # a group mixes both states
    )
    c = alerts.classify(WebhookPayload.model_validate(body))
    assert [(t.namespace, t.agent, t.version) for t in c.matched] == [("ml", "pong", "v7")]
    assert (len(c.unmatched), len(c.resolved)) == (3, 1)
    with caplog.at_level("WARNING", logger="rl_operator.alerts"):
        assert len(alerts.targets(WebhookPayload.model_validate(body))) == 1
    assert caplog.text.count("ignoring firing alert") == 3


def test_unknown_fields_are_ignored_and_optional_ones_default():
    body = payload({"status": "firing", "labels": {"namespace": "ml", "rlagent": "a"},
                    "startsAt": STARTS, "someNewField": 1})
    body["newTopLevel"] = {"x": 1}
    (t,) = alerts.targets(WebhookPayload.model_validate(body))
    assert (t.alertname, t.summary, t.fingerprint, t.version) == ("", "", "", None)


@pytest.mark.parametrize("raw, expected", [
    (b"{not json", "invalid JSON"),
    (b"[]", "body: Input should be an object"),
    (json.dumps({**payload(), "version": "3"}).encode(), "version: Input should be '4'"),
    (json.dumps({k: v for k, v in payload().items() if k != "alerts"}).encode(), "alerts: Field required"),
    (json.dumps(payload({**alert(namespace="a", rlagent="b"), "status": "pending"})).encode(),
     "alerts.0.status: Input should be 'firing' or 'resolved'"),
    (json.dumps(payload({**alert(namespace="a", rlagent="b"), "startsAt": "yesterday"})).encode(),
     "alerts.0.startsAt"),
    (json.dumps(payload({**alert(), "labels": {"namespace": 3}})).encode(), "alerts.0.labels.namespace"),
])
def test_malformed_payloads_are_described(raw, expected):
    with pytest.raises(ValidationError) as err:
        WebhookPayload.model_validate_json(raw)
    assert expected in alerts.describe_validation_error(err.value)


# ----------------------------------------------------------------------------- the receiver


class Receiver:
    """A started receiver plus a client; ``calls`` records every ``on_alert`` target."""

    def __init__(self, token=TOKEN, fail_for=(), slow_for=()):
        self.token = token
        self.fail_for, self.slow_for = set(fail_for), set(slow_for)
        self.calls: list[AlertTarget] = []

    async def on_alert(self, target: AlertTarget) -> None:
        self.calls.append(target)
        if target.agent in self.fail_for:
            raise RuntimeError(f"cannot abort {target.agent}")
        if target.agent in self.slow_for:
            await asyncio.sleep(5)

    async def __aenter__(self):
        self.runner = await alerts.start_receiver("127.0.0.1", 0, lambda: self.token, self.on_alert,
                                                  callback_timeout=0.5)
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc):
        await self.session.close()
        await self.runner.cleanup()

    @property
    def stats(self) -> alerts.ReceiverStats:
        return self.runner.app[alerts.STATS]

    async def post(self, body, token: str | None = TOKEN, scheme="Bearer") -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"{scheme} {token}"
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.session.post(self.url + alerts.ALERTS_PATH, data=data, headers=headers) as resp:
            return resp.status, await resp.json()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_receiver_calls_on_alert_for_each_firing_target():
    async def scenario():
        async with Receiver() as r:
            body = payload(alert(namespace="ml", rlagent="cartpole", version="v2"),
                           alert(namespace="ml", rlagent="pong", version="v3"),
                           alert(namespace="ml"),
                           alert("resolved", namespace="ml", rlagent="old"))
            status, answer = await r.post(body)
            return r, status, answer

    r, status, answer = run(scenario())
    assert status == 200
    assert [(t.namespace, t.agent, t.version) for t in r.calls] == [("ml", "cartpole", "v2"), ("ml", "pong", "v3")]
    assert answer["unmatched"] == 1 and answer["resolved"] == 1 and answer["failed"] == 0
    assert [(m["namespace"], m["agent"], m["ok"]) for m in answer["matched"]] == [("ml", "cartpole", True), ("ml", "pong", True)]
    assert answer["matched"][0]["starts_at"] == "2026-11-22T12:00:00.123456+00:00"
    assert (r.stats.notifications, r.stats.callbacks_ok) == (1, 2)


@pytest.mark.parametrize("token, scheme", [(None, "Bearer"), ("wrong", "Bearer"), (TOKEN + "x", "Bearer"),
                                           (TOKEN, "Basic"), ("", "Bearer"), ("tökén", "Bearer")])
def test_receiver_refuses_a_missing_or_wrong_token(token, scheme):
    async def scenario():
        async with Receiver() as r:
            status, answer = await r.post(payload(alert(namespace="ml", rlagent="cartpole")), token, scheme)
            return r, status, answer

    r, status, answer = run(scenario())
    assert status == 401 and "bearer token" in answer["error"]
    assert r.calls == [] and r.stats.unauthorized == 1 and r.stats.notifications == 0


def test_receiver_accepts_the_token_whatever_the_scheme_case_and_surrounding_space():
    async def scenario():
        async with Receiver(token=f"  {TOKEN}\n") as r:
            return await r.post(payload(alert(namespace="ml", rlagent="a")), f" {TOKEN} ", scheme="bearer")

    assert run(scenario())[0] == 200


@pytest.mark.parametrize("configured", [None, "", " \n"])
def test_receiver_without_a_configured_token_answers_503(configured):
    async def scenario():
        async with Receiver(token=configured) as r:
            status, answer = await r.post(payload(alert(namespace="ml", rlagent="a")), "anything")
            return r, status, answer

    r, status, answer = run(scenario())
    assert status == 503 and answer == {"error": "no alert token configured"}
    assert r.calls == [] and r.stats.unconfigured == 1


def test_receiver_token_is_read_on_every_request():
    async def scenario():
        async with Receiver(token="old") as r:
            first = (await r.post(payload(), "old"))[0]
            r.token = "new"
            return first, (await r.post(payload(), "old"))[0], (await r.post(payload(), "new"))[0]

    assert run(scenario()) == (200, 401, 200)


@pytest.mark.parametrize("raw, expected", [
    (b"garbage", "invalid JSON"),
    (b"", "invalid JSON"),
    (json.dumps({"version": "4", "status": "firing"}).encode(), "alerts: Field required"),
    (json.dumps(payload({"status": "firing", "labels": {}})).encode(), "alerts.0.startsAt: Field required"),
])
def test_receiver_answers_400_naming_the_problem(raw, expected):
    async def scenario():
        async with Receiver() as r:
            status, answer = await r.post(raw)
            return r, status, answer

    r, status, answer = run(scenario())
    assert status == 400 and expected in answer["error"], answer
    assert r.calls == [] and r.stats.malformed == 1


def test_receiver_answers_413_to_a_huge_body():
    async def scenario():
        async with Receiver() as r:
            return await r.post(b"{" + b" " * (5 * 1024 * 1024) + b"}")

    status, answer = run(scenario())
    assert status == 413 and "larger than" in answer["error"]


def test_a_failing_or_slow_callback_does_not_stop_the_others():
    async def scenario():
        async with Receiver(fail_for={"broken"}, slow_for={"slow"}) as r:
            body = payload(alert(namespace="ml", rlagent="broken"), alert(namespace="ml", rlagent="slow"),
                           alert(namespace="ml", rlagent="fine"))
            status, answer = await r.post(body)
            async with r.session.get(r.url + "/healthz") as resp:
                health = await resp.json()
            return r, status, answer, health

    r, status, answer, health = run(scenario())
    assert status == 200
    assert [t.agent for t in r.calls] == ["broken", "slow", "fine"]
    by_agent = {m["agent"]: m for m in answer["matched"]}
    assert by_agent["broken"]["ok"] is False and "RuntimeError: cannot abort broken" in by_agent["broken"]["error"]
    assert by_agent["slow"]["ok"] is False and "TimeoutError" in by_agent["slow"]["error"]
    assert by_agent["fine"]["ok"] is True and answer["failed"] == 2
    assert health["ok"] is True and health["stats"]["callbacks_failed"] == 2 and health["stats"]["callbacks_ok"] == 1


def test_a_token_source_that_raises_is_a_503_not_a_500():
    def broken_token():
        raise OSError("secret unreadable")

    async def scenario():
        runner = await alerts.start_receiver("127.0.0.1", 0, broken_token, lambda t: asyncio.sleep(0))
        try:
            host, port = runner.addresses[0][:2]
            async with aiohttp.ClientSession() as s, s.post(
                    f"http://{host}:{port}{alerts.ALERTS_PATH}", data=b"{}", headers={"Authorization": "Bearer x"}) as resp:
                return resp.status
        finally:
            await runner.cleanup()

    assert run(scenario()) == 503


# ----------------------------------------------------------------------------- the rule


def _groups():
    plain = yaml.safe_load(RULES.read_text())
    crd = yaml.safe_load(PROMETHEUS_RULE.read_text())
    return plain, crd


def test_prometheusrule_holds_the_same_rules_as_rules_yaml():
    plain, crd = _groups()
    assert crd["apiVersion"] == "monitoring.coreos.com/v1" and crd["kind"] == "PrometheusRule"
    assert crd["metadata"]["namespace"] == "rlops-system"
    assert crd["spec"]["groups"] == plain["groups"], "manifests/prometheus/prometheusrule.yaml drifted from rules.yaml"


def test_rollback_rule_shape():
    plain, _ = _groups()
    (group,) = plain["groups"]
    rule = next(r for r in group["rules"] if r.get("alert") == "RLOpsCanaryErrorRateHigh")
    assert rule["labels"] == {"severity": "critical", "rlops_action": "rollback"}
    assert "> 0.05" in rule["expr"] and '"rlagent", "$1", "agent"' in rule["expr"]
    assert rule["for"].endswith("s") and int(rule["for"][:-1]) <= 10
    assert {"summary", "description"} <= set(rule["annotations"])
    # The serving metric names appear exactly once each (the recording rules): one place to change.
    text = RULES.read_text()
    for name in ("ray_rlops_serve_requests_total", "ray_rlops_serve_errors_total"):
        assert text.count(f"{name}[") == 1


def _series(name, version, values, agent="cartpole"):
    return {"series": f'{name}{{namespace="ml",agent="{agent}",version="{version}"}}', "values": values}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: run hack/install-services.sh")
def test_rule_fires_on_error_rate_above_5_percent_only_with_traffic(tmp_path):
    req, err = "ray_rlops_serve_requests_total", "ray_rlops_serve_errors_total"
    # 2s samples (as hack/prom-up.sh scrapes): +20 per sample = 10 requests/s.
    series = [
        _series(req, "v2", "0+20x60"), _series(err, "v2", "0+2x60"),     # canary: 10% errors -> fires
        _series(req, "v1", "0+20x60"), _series(err, "v1", "0+0.8x60"),   # stable: 4% -> below threshold
        _series(req, "v0", "0+0.1x60"), _series(err, "v0", "0+0.1x60"),  # idle: 100% at 0.05 req/s -> guarded
        _series(req, "v3", "0+20x60"), _series(err, "v3", "0x30 20+20x30"),  # healthy, then 100% errors from 62s
    ]
    labels = {"severity": "critical", "rlops_action": "rollback", "namespace": "ml",
              "agent": "cartpole", "rlagent": "cartpole", "version": "v2"}
    v2 = {
        "exp_labels": labels,
        "exp_annotations": {
            "summary": "RLAgent ml/cartpole: version v2 fails 10% of requests",
            "description": (
                "Over the last minute, 10% of the requests served by version v2 of RLAgent ml/cartpole "
                "failed (threshold 5%, at >= 0.1 requests/s). rlops rolls the canary back: its weight "
                "goes to 0 and the Rollout ends RolledBack."),
        },
    }

    def state(version, at, alertstate):
        selector = f'ALERTS{{alertname="RLOpsCanaryErrorRateHigh",version="{version}"}}'
        sample = (f'ALERTS{{alertname="RLOpsCanaryErrorRateHigh",alertstate="{alertstate}",severity="critical",'
                  f'rlops_action="rollback",namespace="ml",agent="cartpole",rlagent="cartpole",version="{version}"}}')
        return {"expr": selector, "eval_time": at,
                "exp_samples": [{"labels": sample, "value": 1}] if alertstate else []}

    spec = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "2s",
        "tests": [{
            "interval": "2s",
            "input_series": series,
            # only v2 fires (with its labels and annotations); v0, v1 and v3 stay quiet until 62s
            "alert_rule_test": [{"eval_time": t, "alertname": "RLOpsCanaryErrorRateHigh", "exp_alerts": [v2]}
                                for t in ("30s", "60s")],
            "promql_expr_test": [
                {"expr": 'round(namespace_agent_version:rlops_serve_error_ratio:rate1m{version="v1"}, 0.0001)',
                 "eval_time": "1m",
                 "exp_samples": [{"labels": '{namespace="ml",agent="cartpole",version="v1"}', "value": 0.04}]},
                # v3: errors from 62s; over 5% in the 1m window at 64s -> pending, firing 4s later
                state("v3", "62s", None), state("v3", "64s", "pending"), state("v3", "66s", "pending"),
                state("v3", "68s", "firing"),
                state("v0", "2m", None), state("v1", "2m", None),
            ],
        }],
    }
    test_file = tmp_path / "rules_test.yaml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = subprocess.run(["promtool", "test", "rules", str(test_file)], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
