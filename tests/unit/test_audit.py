"""Approvals made with impersonation, from the API server's audit events (rl_operator.audit),
and the receiver's ``POST /api/v1/audit`` route on aiohttp's real server."""

from __future__ import annotations

import asyncio
import json
import ssl
from datetime import datetime, timezone

import aiohttp
import pytest

from rl_operator import alerts, audit, certs
from rl_operator import approvals

FP = "sha256:" + "a" * 64
TOKEN = "audit-token"


def event(verb="patch", body=None, impersonated="bob", code=200, stage="ResponseComplete", resource="rollouts",
          subresource=None, group="rlops.dev", user="alice", at="2026-12-02T12:00:00.123456Z"):
    ev = {"kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Request", "auditID": "a-1", "stage": stage,
          "verb": verb, "user": {"username": user, "groups": ["system:authenticated"]},
          "objectRef": {"apiGroup": group, "apiVersion": "v1alpha1", "resource": resource, "namespace": "ml",
                        "name": "cp-2"},
          "responseStatus": {"code": code}, "requestReceivedTimestamp": at,
          "requestObject": {"metadata": {"annotations": {approvals.APPROVE: FP}}} if body is None else body}
    if subresource:
        ev["objectRef"]["subresource"] = subresource
    if impersonated:
        ev["impersonatedUser"] = {"username": impersonated, "groups": ["system:authenticated"]}
    return ev


def found(*events):
    return audit.impersonated_approvals(audit.parse(json.dumps({"kind": "EventList", "items": list(events)}).encode()))


def test_an_impersonated_approval_is_found_in_each_request_form():
    merge = event()
    json_patch = event(body=[{"op": "add", "path": "/metadata/annotations/rlops.dev~1approve", "value": FP}])
    whole = event(verb="update", body={"metadata": {"name": "cp-2", "annotations": {approvals.APPROVE: FP, "x": "y"}}})
    via_parent = event(body=[{"op": "replace", "path": "/metadata/annotations", "value": {approvals.APPROVE: FP}}])
    (rec,) = found(merge)
    assert (rec.namespace, rec.name, rec.user, rec.impersonated) == ("ml", "cp-2", "alice", "bob")
    assert rec.at == datetime(2026, 12, 2, 12, 0, 0, 123456, tzinfo=timezone.utc) and rec.audit_id == "a-1"
    assert len(found(json_patch, whole, via_parent)) == 3


@pytest.mark.parametrize("ev", [
    event(impersonated=None),  # not impersonated: approved-by is already the real user
    event(code=403),  # refused
    event(stage="RequestReceived"),
    event(verb="get"),
    event(resource="rlagents"),
    event(group="argoproj.io"),
    event(subresource="status"),
    event(body={"metadata": {"annotations": {approvals.REJECT: "no"}}}),  # not an approval
    event(body={"metadata": {"annotations": {approvals.APPROVE: None}}}),  # removing one
    event(body=[{"op": "remove", "path": "/metadata/annotations/rlops.dev~1approve"}]),
    event(body=None) | {"requestObject": None},  # logged at level Metadata: no body to read
])
def test_other_events_are_not_impersonated_approvals(ev):
    assert found(ev) == []


@pytest.mark.parametrize(("raw", "fragment"), [
    (b"{", "Invalid JSON"),
    (b'{"kind": "Pod", "items": []}', "kind: expected EventList"),
    (b'{"kind": "EventList", "items": "no"}', "items"),
    (b'{"kind": "EventList", "items": [{"impersonatedUser": 3}]}', "items.0.impersonatedUser"),
])
def test_a_body_that_is_not_an_event_list_is_described(raw, fragment):
    with pytest.raises(ValueError, match=fragment):
        audit.parse(raw)


def test_the_record_must_be_the_rollouts_recorded_approval():
    (rec,) = found(event(at="2026-12-02T12:00:00Z"))
    ann = {approvals.APPROVED_BY: "bob", approvals.APPROVED_AT: "2026-12-02T12:00:01Z"}
    assert audit.matches(rec, ann, approvals.APPROVED_BY, approvals.APPROVED_AT)
    assert not audit.matches(rec, {**ann, approvals.APPROVED_BY: "carol"}, approvals.APPROVED_BY, approvals.APPROVED_AT)
    assert not audit.matches(rec, {**ann, approvals.APPROVED_AT: "2026-12-02T12:05:00Z"}, approvals.APPROVED_BY, approvals.APPROVED_AT)
    assert not audit.matches(rec, {**ann, approvals.APPROVED_AT: "yesterday"}, approvals.APPROVED_BY, approvals.APPROVED_AT)


async def _post_audit(body: bytes, token: str | None, configured: str | None = TOKEN, certs=None):
    seen: list[audit.ImpersonatedApproval] = []

    async def on_audit(record):
        seen.append(record)
        if record.name == "boom":
            raise RuntimeError("cannot record")

    tls = {"certfile": str(certs.cert), "keyfile": str(certs.key)} if certs else {}
    runner = await alerts.start_audit_receiver("127.0.0.1", 0, lambda: configured, on_audit, **tls)
    try:
        host, port = runner.addresses[0][:2]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        context = ssl.create_default_context(cafile=str(certs.ca)) if certs else None
        url = f"{'https' if certs else 'http'}://{host}:{port}{alerts.AUDIT_PATH}"
        async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=headers, ssl=context) as resp:
            return resp.status, await resp.json(), seen, runner.app[alerts.STATS]
    finally:
        await runner.cleanup()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_the_receiver_hands_each_impersonated_approval_to_the_callback():
    boom = event()
    boom["objectRef"]["name"] = "boom"
    body = json.dumps({"kind": "EventList", "items": [event(), event(impersonated=None), boom]}).encode()
    status, answer, seen, stats = run(_post_audit(body, TOKEN))
    assert status == 200 and answer == {"events": 3, "impersonatedApprovals": 2}
    assert [s.name for s in seen] == ["cp-2", "boom"] and stats.audit_events == 3  # a failing one is logged


@pytest.mark.parametrize(("token", "configured", "code"), [(None, TOKEN, 401), ("alert-token", TOKEN, 401),
                                                           (TOKEN, None, 503)])
def test_the_audit_route_needs_its_own_token(token, configured, code):
    body = json.dumps({"kind": "EventList", "items": [event()]}).encode()
    status, _, seen, _ = run(_post_audit(body, token, configured))
    assert status == code and seen == []


def test_the_audit_route_answers_400_to_what_is_not_an_event_list():
    status, answer, seen, stats = run(_post_audit(b'{"kind": "Status"}', TOKEN))
    assert status == 400 and "EventList" in answer["error"] and stats.malformed == 1 and seen == []


def test_the_receiver_serves_https_with_its_certificate(tmp_path):
    """The API server sends its bearer token over TLS only; the client here verifies the CA."""
    files = certs.ensure_webhook_certs(tmp_path, ["127.0.0.1"])
    body = json.dumps({"kind": "EventList", "items": [event()]}).encode()
    status, answer, seen, _ = run(_post_audit(body, TOKEN, certs=files))
    assert status == 200 and answer["impersonatedApprovals"] == 1 and seen[0].user == "alice"
