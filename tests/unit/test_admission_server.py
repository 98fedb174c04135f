"""The approval webhook's server and configuration (rl_operator.admission). Whether the API server
honours the matchCondition is checked against a real one in tests/integration/test_approval_threats.py."""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time

import httpx
import jsonpatch
import pytest

from rl_operator import admission, certs
from support import free_port


def review(uid: str = "u-1", annotations: dict | None = None, **request) -> dict:
    obj = {"metadata": {"name": "r", "namespace": "t"}, "spec": {"fingerprint": "sha256:x"}}
    if annotations is not None:
        obj["metadata"]["annotations"] = annotations
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": uid, "operation": "UPDATE", "object": obj, **request}}


def applied(out: dict, obj: dict) -> dict:
    ops = json.loads(base64.b64decode(out["response"]["patch"]))
    return jsonpatch.apply_patch(obj, ops)


def test_an_allowed_review_patches_the_annotations_it_records_and_removes():
    ann = {"rlops.dev/approve": "sha256:x", "rlops.dev/approved-via": "impersonated by x", "keep": "1"}
    req = review(annotations=ann)
    out = admission.answer(req, lambda r: {"rlops.dev/approved-by": "alice", "rlops.dev/approved-via": None})
    assert out["response"]["uid"] == "u-1" and out["response"]["allowed"] is True
    assert out["response"]["patchType"] == "JSONPatch"
    assert applied(out, req["request"]["object"])["metadata"]["annotations"] == {
        "rlops.dev/approve": "sha256:x", "rlops.dev/approved-by": "alice", "keep": "1"}


def test_a_patch_onto_an_object_without_annotations_makes_the_map_first():
    req = review()
    out = admission.answer(req, lambda r: {"a/b~c": "v", "gone": None})
    assert applied(out, req["request"]["object"])["metadata"]["annotations"] == {"a/b~c": "v"}


def test_nothing_to_record_means_no_patch():
    out = admission.answer(review(annotations={}), lambda r: {"absent": None})
    assert out["response"] == {"uid": "u-1", "allowed": True}


def test_a_refusal_carries_its_code_and_message_and_a_failed_review_fails_closed():
    def deny(_):
        raise admission.Denied("approval refused: wrong fingerprint", code=403)

    out = admission.answer(review(), deny)["response"]
    assert out == {"uid": "u-1", "allowed": False, "status": {"code": 403, "message": "approval refused: wrong fingerprint"}}

    def crash(_):
        raise RuntimeError("API server unreachable")

    out = admission.answer(review(), crash)["response"]
    assert out["allowed"] is False and out["status"]["code"] == 500
    assert "API server unreachable" in out["status"]["message"]
    with pytest.raises(ValueError, match="request.uid"):
        admission.answer({"kind": "AdmissionReview"}, crash)


def test_the_configuration_fails_closed_and_is_called_only_when_a_reviewed_annotation_changes():
    conf = admission.configuration(admission.client_config(b"CA", url="https://127.0.0.1:9443"))
    (hook,) = conf["webhooks"]
    assert conf["metadata"]["name"] == "rlops.dev" and hook["name"] == "approval.rlops.dev"
    assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
    assert hook["rules"][0]["resources"] == ["rollouts"]  # not rollouts/status: status writes never call it
    expr = hook["matchConditions"][0]["expression"]
    for key in ("rlops.dev/approve", "rlops.dev/reject", "rlops.dev/approved-by", "rlops.dev/approved-at",
                "rlops.dev/approved-via", "rlops.dev/approval-signature"):
        assert f"'{key}' in object.metadata.annotations" in expr
        assert f"'{key}' in oldObject.metadata.annotations" in expr
    assert expr.startswith("request.operation == 'CREATE' ? ")
    assert hook["namespaceSelector"] == {}  # one operator for every namespace


def test_a_shards_configuration_has_its_own_name_and_selects_its_namespaces_by_name():
    conf = admission.configuration(admission.client_config(b"CA", url="https://127.0.0.1:9443"), "east",
                                   ("team-b", "team-a"))
    (hook,) = conf["webhooks"]
    assert conf["metadata"]["name"] == "east.rlops.dev" == admission.configuration_name("east")
    assert hook["namespaceSelector"] == {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}]}


def test_the_server_answers_over_https_on_its_own_thread(tmp_path):
    files = certs.ensure_webhook_certs(str(tmp_path), ["127.0.0.1"])
    threads: list[str] = []

    def decide(_):
        threads.append(threading.current_thread().name)
        return {"rlops.dev/approved-by": "alice"}

    port = free_port()
    server = admission.AdmissionServer("127.0.0.1", port, str(files.cert), str(files.key), decide)
    server.start()
    try:
        ctx = ssl.create_default_context(cafile=str(files.ca))
        with httpx.Client(verify=ctx, timeout=10) as http:
            out = http.post(f"https://127.0.0.1:{port}/approval", json=review(annotations={})).json()
            assert out["response"]["allowed"] is True and out["response"]["uid"] == "u-1"
            assert http.post(f"https://127.0.0.1:{port}/approval", content=b"not json").status_code == 400
            assert http.post(f"https://127.0.0.1:{port}/approval", json=[1]).status_code == 400
            assert http.get(f"https://127.0.0.1:{port}/healthz").json() == {"ok": True}
    finally:
        server.stop()
    assert threads and all(t.startswith("rlops-admission") for t in threads), threads


def test_with_a_client_ca_only_a_caller_with_its_certificate_gets_a_review(tmp_path):
    """The API server presents a client certificate (its AdmissionConfiguration); anyone else who
    reaches the port, without one or with another CA's, fails the TLS handshake: no review, no
    signature, no SubjectAccessReview spent."""
    files = certs.ensure_webhook_certs(str(tmp_path / "serving"), ["127.0.0.1"])
    apiserver = certs.ensure_webhook_certs(str(tmp_path / "client"), ["kube-apiserver-webhook-client"], client=True)
    stranger = certs.ensure_webhook_certs(str(tmp_path / "stranger"), ["mallory"], client=True)
    calls: list[dict] = []
    port = free_port()
    server = admission.AdmissionServer("127.0.0.1", port, str(files.cert), str(files.key),
                                       lambda request: calls.append(request) or {}, client_ca=str(apiserver.ca))
    server.start()
    try:
        def post(cert):
            ctx = ssl.create_default_context(cafile=str(files.ca))
            if cert is not None:
                ctx.load_cert_chain(str(cert.cert), str(cert.key))
            with httpx.Client(verify=ctx, timeout=10) as http:
                return http.post(f"https://127.0.0.1:{port}/approval", json=review(annotations={}))

        assert post(apiserver).json()["response"]["allowed"] is True and len(calls) == 1
        for who in (None, stranger):
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                post(who)
        assert len(calls) == 1
    finally:
        server.stop()


def test_a_flood_of_reviews_is_refused_beyond_what_the_webhook_holds_and_fails_closed(tmp_path):
    """A review beyond ``workers + max_waiting`` in hand is refused at once (429), without calling
    ``decide`` (no SubjectAccessReview); the reviews in hand are answered."""
    files = certs.ensure_webhook_certs(str(tmp_path), ["127.0.0.1"])
    release, started = threading.Event(), threading.Semaphore(0)

    def decide(_):
        started.release()
        release.wait(30)
        return {}

    port = free_port()
    server = admission.AdmissionServer("127.0.0.1", port, str(files.cert), str(files.key), decide,
                                       workers=2, max_waiting=3)
    server.start()
    ctx = ssl.create_default_context(cafile=str(files.ca))
    answers: list[dict] = []

    def post() -> None:
        with httpx.Client(verify=ctx, timeout=30) as http:
            answers.append(http.post(f"https://127.0.0.1:{port}/approval", json=review(annotations={})).json())

    try:
        held = [threading.Thread(target=post) for _ in range(5)]
        for t in held:
            t.start()
        assert started.acquire(timeout=10) and started.acquire(timeout=10)  # both workers busy
        deadline = time.monotonic() + 10
        while server._in_hand < 5 and time.monotonic() < deadline:  # and three waiting
            time.sleep(0.05)
        for _ in range(4):
            post()
        refused = [a["response"] for a in answers]
        assert len(refused) == 4 and all(r["allowed"] is False and r["status"]["code"] == 429 for r in refused), refused
        release.set()
        for t in held:
            t.join(30)
        assert [a["response"]["allowed"] for a in answers[4:]] == [True] * 5
        post()  # room again
        assert answers[-1]["response"]["allowed"] is True
    finally:
        release.set()
        server.stop()
