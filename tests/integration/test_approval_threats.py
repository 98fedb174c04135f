"""The approval gate against a hostile tenant, on the real API server (docs/security.md).

``mallory`` holds the built-in ``edit`` role in the namespace (which aggregates ``rlops-edit``),
and so can write RLAgents, pods, Jobs, Secrets and ServiceAccounts, but lacks the ``approve``
verb. ``bob`` holds ``rlops-approver``. ``ci`` is a ServiceAccount that also holds
``rlops-approver``. Every path that mallory tries is refused (the message is asserted) or is
harmless with a visible condition; bob succeeds, with his identity recorded and signed.

The ValidatingAdmissionPolicies (``manifests/base/admission-policies.yaml``) are enforced by the
API server itself; the approval webhook and the operator's own checks run in the operator.
"""

from __future__ import annotations

import json

import pytest

from support import OPERATOR_USER, PENDING_AGENT as AGENT, stage_chain, wait_for

FP = "sha256:" + "d" * 64
OTHER_FP = "sha256:" + "e" * 64
MALLORY, BOB = "mallory", "bob"


@pytest.fixture
def tenant(cluster, operator, namespace):
    """A namespace where mallory has `edit`, bob has `rlops-approver`, and agent `gate` exists."""
    cluster.kubectl("create", "rolebinding", "mallory-edit", "-n", namespace, "--clusterrole=edit", f"--user={MALLORY}")
    cluster.kubectl("create", "rolebinding", "bob-approve", "-n", namespace, "--clusterrole=rlops-approver",
                    f"--user={BOB}")
    cluster.kubectl("create", "serviceaccount", "ci", "-n", namespace)
    cluster.kubectl("create", "rolebinding", "ci-approve", "-n", namespace, "--clusterrole=rlops-approver",
                    f"--serviceaccount={namespace}:ci")
    proc = cluster.kubectl("apply", "-n", namespace, "-f", "-", f"--as={MALLORY}", check=False,
                           input=AGENT.format(name="gate", extra=""))
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: cluster.get("mutatingwebhookconfiguration", "rlops.dev"), 60, "webhook configuration")
    return namespace


def as_user(cluster, user, *args, input=None):
    return cluster.kubectl(*args, f"--as={user}", check=False, input=input)


def refused(proc, *words):
    assert proc.returncode != 0, f"accepted: {proc.stdout}"
    for word in words:
        assert word in proc.stderr, proc.stderr
    return proc.stderr


def rollout_status(cluster, namespace, name):
    return (cluster.get("rollout", name, "-n", namespace) or {}).get("status") or {}


# ----------------------------------------------------------------------------- 1. only the operator creates


def _crafted_rollout(name="gate-9"):
    return json.dumps({
        "apiVersion": "rlops.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": name, "labels": {"rlops.dev/agent": "gate"}},
        "spec": {"agentRef": {"name": "gate"}, "trainingRunRef": {"name": "gate-1"}, "version": name,
                 "artifactURI": "file:///tmp/mallory/weights", "fingerprint": FP,
                 "evaluation": {"meanReturn": 1e9}},
    })


def test_tenant_cannot_create_rollouts_or_training_runs(cluster, tenant):
    assert as_user(cluster, MALLORY, "auth", "can-i", "create", "rollouts.rlops.dev", "-n", tenant).stdout.strip() == "no"
    refused(as_user(cluster, MALLORY, "create", "-n", tenant, "-f", "-", input=_crafted_rollout()),
            "forbidden")
    run = cluster.get("trainingrun", "gate-1", "-n", tenant) or wait_for(
        lambda: cluster.get("trainingrun", "gate-1", "-n", tenant), 60, "gate-1")
    crafted = {"apiVersion": "rlops.dev/v1alpha1", "kind": "TrainingRun",
               "metadata": {"name": "gate-50"}, "spec": {**run["spec"]}}
    refused(as_user(cluster, MALLORY, "create", "-n", tenant, "-f", "-", input=json.dumps(crafted)), "forbidden")


def test_rbac_drift_does_not_reopen_create(cluster, tenant):
    """Even with `create` granted by mistake, the API server's own policy refuses it."""
    cluster.kubectl("create", "role", "too-much", "-n", tenant, "--verb=create",
                    "--resource=rollouts.rlops.dev,trainingruns.rlops.dev")
    cluster.kubectl("create", "rolebinding", "too-much", "-n", tenant, "--role=too-much", f"--user={MALLORY}")
    wait_for(lambda: as_user(cluster, MALLORY, "auth", "can-i", "create", "rollouts.rlops.dev", "-n", tenant)
             .stdout.strip() == "yes", 30, "RBAC drift in place")
    refused(as_user(cluster, MALLORY, "create", "-n", tenant, "-f", "-", input=_crafted_rollout()),
            "only the rlops operator creates rollouts", MALLORY)
    assert cluster.get("rollout", "gate-9", "-n", tenant) is None


def test_rollout_outside_the_owner_chain_is_ignored(cluster, tenant):
    """A Rollout made by anyone but the operator (here cluster-admin impersonating the operator,
    which no tenant can do) is not acted on: Ignored, with a condition and an Event."""
    cluster.kubectl("patch", "rlagent", "gate", "-n", tenant, "--type=merge",
                    "-p", '{"spec": {"approval": {"mode": "auto"}}}')
    proc = as_user(cluster, OPERATOR_USER, "create", "-n", tenant, "-f", "-", input=_crafted_rollout())
    assert proc.returncode == 0, proc.stderr
    status = wait_for(lambda: rollout_status(cluster, tenant, "gate-9").get("phase") == "Ignored"
                      and rollout_status(cluster, tenant, "gate-9"), 60, "Ignored")
    assert status.get("approval") is None
    trusted = next(c for c in status["conditions"] if c["type"] == "Trusted")
    assert trusted["status"] == "False" and "not controlled by TrainingRun" in trusted["message"]
    events = cluster.get("events", "-n", tenant, "--field-selector", "involvedObject.name=gate-9")["items"]
    assert any(e["reason"] == "Ignored" for e in events)


# ----------------------------------------------------------------------------- 2. policy changes need the verb


@pytest.mark.parametrize(("patch", "field"), [
    ({"approval": {"mode": "auto"}}, "spec.approval"),
    ({"approval": {"allowedServiceAccounts": ["system:serviceaccount:x:ci"]}}, "spec.approval"),
    ({"canary": {"steps": [{"setWeight": 100}]}}, "spec.canary"),
    ({"canary": {"analysis": {"maxErrorRate": 1.0}}}, "spec.canary"),
    ({"canary": {"analysis": {"minSampleCount": 1000000000}}}, "spec.canary"),
    ({"canary": {"analysis": {"feedbackPerClient": {"maxPerMinute": 0}}}}, "spec.canary"),
    ({"canary": {"analysis": {"feedbackPerClient": {"clientHeader": "X-Anyone"}}}}, "spec.canary"),
], ids=["auto-approval", "service-accounts", "skip-steps", "error-threshold", "sample-count", "feedback-cap-off",
        "feedback-client-header"])
def test_policy_changes_need_the_approve_verb(cluster, tenant, patch, field):
    proc = as_user(cluster, MALLORY, "patch", "rlagent", "gate", "-n", tenant, "--type=merge",
                   "-p", json.dumps({"spec": patch}))
    refused(proc, f"changing {field}", "'approve' verb on rlagents.rlops.dev", MALLORY)
    proc = as_user(cluster, BOB, "patch", "rlagent", "gate", "-n", tenant, "--type=merge",
                   "-p", json.dumps({"spec": patch}))
    assert proc.returncode == 0, proc.stderr


def test_new_agent_gets_the_default_policy_without_the_verb(cluster, tenant):
    refused(as_user(cluster, MALLORY, "apply", "-n", tenant, "-f", "-",
                    input=AGENT.format(name="sneaky", extra="  approval: {mode: auto}\n")),
            "a spec.approval other than the default", MALLORY)
    refused(as_user(cluster, MALLORY, "apply", "-n", tenant, "-f", "-",
                    input=AGENT.format(name="sneaky", extra="  canary: {steps: [{setWeight: 100}]}\n")),
            "a spec.canary other than the default")
    # spelling the defaults out is fine
    ok = as_user(cluster, MALLORY, "apply", "-n", tenant, "-f", "-",
                 input=AGENT.format(name="plain", extra="  approval: {mode: manual}\n"
                                                        "  canary: {analysis: {maxErrorRate: 0.05}}\n"))
    assert ok.returncode == 0, ok.stderr
    # other spec changes stay open to edit (a retrain)
    ok = as_user(cluster, MALLORY, "patch", "rlagent", "plain", "-n", tenant, "--type=merge",
                 "-p", '{"spec": {"training": {"totalTimesteps": 40960}}}')
    assert ok.returncode == 0, ok.stderr


def test_tenant_cannot_remove_the_operators_finalizer(cluster, tenant):
    """An agent that may serve carries the operator's finalizer (its Serve application goes
    first); one with serving disabled and nothing promoted carries none, so deleting it waits
    for nobody."""
    served = AGENT.format(name="served", extra="").replace("serving: {enabled: false}", "serving: {enabled: true}")
    proc = as_user(cluster, MALLORY, "apply", "-n", tenant, "-f", "-", input=served)
    assert proc.returncode == 0, proc.stderr

    def finalizers(name):
        return cluster.get("rlagent", name, "-n", tenant)["metadata"].get("finalizers") or []

    wait_for(lambda: "rlops.dev/finalizer" in finalizers("served"), 60, "finalizer on the agent that may serve")
    refused(as_user(cluster, MALLORY, "patch", "rlagent", "served", "-n", tenant, "--type=merge",
                    "-p", '{"metadata": {"finalizers": null}}'), "only the rlops operator removes")
    wait_for(lambda: cluster.get("trainingrun", "gate-1", "-n", tenant), 60, "the gate agent's run")
    assert finalizers("gate") == []


# ----------------------------------------------------------------------------- approvals on a real chain


@pytest.fixture
def staged(cluster, operator, tenant):
    ro = stage_chain(cluster, tenant, "gate", "gate-7", operator.artifact_root, FP)
    wait_for(lambda: rollout_status(cluster, tenant, "gate-7").get("phase") == "AwaitingApproval", 60,
             "AwaitingApproval")
    return ro


def annotate(cluster, namespace, user, *pairs):
    return cluster.kubectl("annotate", "rollout", "gate-7", "-n", namespace, f"--as={user}", "--overwrite",
                           *pairs, check=False)


def test_operator_made_rollout_is_trusted(cluster, tenant, staged):
    run = cluster.get("trainingrun", "gate-7", "-n", tenant)
    assert staged["metadata"]["ownerReferences"][0]["uid"] == run["metadata"]["uid"]
    assert staged["spec"]["artifactURI"] == run["status"]["artifactURI"]
    # born with the operator's finalizer (no write of kopf's to add it), which edit cannot remove
    assert staged["metadata"]["finalizers"] == ["rlops.dev/finalizer"]
    refused(as_user(cluster, MALLORY, "patch", "rollout", "gate-7", "-n", tenant, "--type=merge",
                    "-p", '{"metadata": {"finalizers": null}}'), "only the rlops operator removes")


@pytest.mark.parametrize(("pairs", "words"), [
    ((f"rlops.dev/approve={FP}",), "may not approve rollouts.rlops.dev"),
    (("rlops.dev/reject=nope",), "may not approve rollouts.rlops.dev"),
    # the webhook refuses first (it is called before the policies); either names the annotation
    (("rlops.dev/promote=full",), "setting rlops.dev/promote"),
    (("rlops.dev/promote=yes",), "setting rlops.dev/promote"),
    (("rlops.dev/approved-by=bob",), "recorded by the rlops admission webhook"),
    (("rlops.dev/approval-signature=v1:00",), "recorded by the rlops admission webhook"),
], ids=["approve", "reject", "promote-full", "promote", "forged-approver", "forged-signature"])
def test_tenant_annotations_that_decide_promotion_are_refused(cluster, tenant, staged, pairs, words):
    refused(annotate(cluster, tenant, MALLORY, *pairs), words)
    assert rollout_status(cluster, tenant, "gate-7").get("approval") is None


def test_abort_stays_open_to_edit(cluster, tenant, staged):
    """Abort only sends traffic back to the approved stable version (docs/security.md)."""
    assert annotate(cluster, tenant, MALLORY, "rlops.dev/abort=looks wrong").returncode == 0


def test_approver_succeeds_with_identity_recorded_and_signed(cluster, tenant, staged):
    refused(annotate(cluster, tenant, BOB, f"rlops.dev/approve={OTHER_FP}"), "stale or wrong fingerprint", FP)
    proc = annotate(cluster, tenant, BOB, f"rlops.dev/approve={FP}", "rlops.dev/approve-notes=reviewed")
    assert proc.returncode == 0, proc.stderr
    ann = cluster.get("rollout", "gate-7", "-n", tenant)["metadata"]["annotations"]
    assert ann["rlops.dev/approved-by"] == BOB and ann["rlops.dev/approval-signature"].startswith("v2:")
    status = wait_for(lambda: rollout_status(cluster, tenant, "gate-7").get("approval")
                      and rollout_status(cluster, tenant, "gate-7"), 60, "status.approval")
    assert status["approval"]["approvedBy"] == BOB and status["approval"]["fingerprint"] == FP
    assert status["phase"] == "Approved"
    # the recorded approval can't be re-attributed afterwards, not even by an approver
    refused(annotate(cluster, tenant, BOB, "rlops.dev/approved-by=alice"), "recorded by the rlops admission webhook")


def test_an_approval_made_with_impersonation_shows_the_real_user(cluster, tenant, staged):
    """Every user in this suite is played by the test's cluster-admin with ``kubectl --as``.
    Admission sees only the impersonated user; the API server's audit webhook tells the operator
    who really sent the request, and the operator records it."""
    assert (cluster.dir / "audit-port").exists(), (
        "this cluster was created without the audit webhook: RLOPS_CLUSTER_NAME=rlops-test hack/cluster-down.sh")
    admin = json.loads(cluster.kubectl("auth", "whoami", "-o", "json").stdout)["status"]["userInfo"]["username"]
    assert annotate(cluster, tenant, BOB, f"rlops.dev/approve={FP}").returncode == 0
    via = f"impersonated by {admin}"
    ann = wait_for(lambda: (a := cluster.get("rollout", "gate-7", "-n", tenant)["metadata"]["annotations"])
                   .get("rlops.dev/approved-via") == via and a, 30, "approved-via from the audit log")
    assert ann["rlops.dev/approved-by"] == BOB
    status = wait_for(lambda: (rollout_status(cluster, tenant, "gate-7").get("approval") or {}).get("via") == via
                      and rollout_status(cluster, tenant, "gate-7"), 30, "status.approval.via")
    assert status["approval"]["approvedBy"] == BOB and status["approval"]["fingerprint"] == FP
    events = cluster.get("events", "-n", tenant, "--field-selector", "involvedObject.name=gate-7")["items"]
    assert any(e["reason"] == "ApprovedWithImpersonation" and admin in e["message"] for e in events)
    # nobody but rlops writes or removes that record
    refused(annotate(cluster, tenant, MALLORY, "rlops.dev/approved-via=impersonated by nobody"), "recorded by")
    refused(annotate(cluster, tenant, BOB, "rlops.dev/approved-via-"), "recorded by")


def test_approver_may_reject(cluster, tenant, staged):
    assert annotate(cluster, tenant, BOB, "rlops.dev/reject=reward hacking").returncode == 0
    wait_for(lambda: rollout_status(cluster, tenant, "gate-7").get("phase") == "Rejected", 60, "Rejected")


def test_service_account_approval_needs_the_policy(cluster, tenant, staged):
    ci = f"system:serviceaccount:{tenant}:ci"
    refused(annotate(cluster, tenant, ci, f"rlops.dev/approve={FP}"), "is a ServiceAccount", "allowedServiceAccounts")
    proc = as_user(cluster, BOB, "patch", "rlagent", "gate", "-n", tenant, "--type=merge",
                   "-p", json.dumps({"spec": {"approval": {"allowedServiceAccounts": [ci]}}}))
    assert proc.returncode == 0, proc.stderr
    assert annotate(cluster, tenant, ci, f"rlops.dev/approve={FP}").returncode == 0
    status = wait_for(lambda: rollout_status(cluster, tenant, "gate-7").get("approval")
                      and rollout_status(cluster, tenant, "gate-7"), 60, "status.approval")
    assert status["approval"]["approvedBy"] == ci


# ----------------------------------------------------------------------------- 3. approver ServiceAccounts


def minted_token(cluster, namespace, sa):
    """What any `edit` user can do with a ServiceAccount of their namespace: mallory creates a
    token Secret for it, and reads the token back. Returns a kubeconfig file that uses it."""
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
              "metadata": {"name": f"{sa}-minted", "annotations": {"kubernetes.io/service-account.name": sa}}}
    proc = as_user(cluster, MALLORY, "create", "-n", namespace, "-f", "-", input=json.dumps(secret))
    assert proc.returncode == 0, proc.stderr
    token = wait_for(lambda: ((cluster.get("secret", f"{sa}-minted", "-n", namespace) or {}).get("data") or {})
                     .get("token"), 60, "the token controller to fill the Secret")
    import base64
    import yaml
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["users"] = [{"name": sa, "user": {"token": base64.b64decode(token).decode()}}]
    for context in config["contexts"]:
        context["context"]["user"] = sa
    path = cluster.dir / f"kubeconfig-{namespace}-{sa}"
    path.write_text(yaml.safe_dump(config))
    return path


def with_token(cluster, kubeconfig, *args, input=None):
    """kubectl authenticated by the token alone (no impersonation: a token leaves no record of who used it)."""
    import subprocess
    from support import CACHE
    return subprocess.run([str(CACHE / "bin" / "current" / "kubectl"), "--kubeconfig", str(kubeconfig), *args],
                          input=input, capture_output=True, text=True, timeout=120)


def test_a_minted_approver_token_changes_no_promotion_policy(cluster, tenant):
    """The approver ServiceAccount `ci` lives in the tenant's namespace, so mallory (edit) can
    mint its token. As `ci` she holds the verb, but a ServiceAccount changes the approval policy
    or the canary plan only when a person listed it on the agent, and never changes that list."""
    ci = f"system:serviceaccount:{tenant}:ci"
    kubeconfig = minted_token(cluster, tenant, "ci")
    assert with_token(cluster, kubeconfig, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"
                      ).stdout == ci
    for patch, field in (({"approval": {"mode": "auto"}}, "spec.approval"),
                         ({"canary": {"steps": [{"setWeight": 100}]}}, "spec.canary"),
                         ({"approval": {"allowedServiceAccounts": [ci]}}, "spec.approval")):
        refused(with_token(cluster, kubeconfig, "patch", "rlagent", "gate", "-n", tenant, "--type=merge",
                           "-p", json.dumps({"spec": patch})), f"changing {field}", "by a ServiceAccount", ci)
    # a CI bot often also holds edit (it applies the agents it approves): it still can't create a
    # self-approving agent
    cluster.kubectl("create", "rolebinding", "ci-edit", "-n", tenant, "--clusterrole=edit",
                    f"--serviceaccount={tenant}:ci")
    wait_for(lambda: with_token(cluster, kubeconfig, "auth", "can-i", "create", "rlagents.rlops.dev", "-n", tenant)
             .stdout.strip() == "yes", 30, "ci may create agents")
    refused(with_token(cluster, kubeconfig, "apply", "-n", tenant, "-f", "-",
                       input=AGENT.format(name="self-approving", extra="  approval: {mode: auto}\n")),
            "a spec.approval other than the default", "by a ServiceAccount")
    assert (cluster.get("rlagent", "gate", "-n", tenant)["spec"].get("approval") or {}).get("mode", "manual") == "manual"
    # a person lists it: it may now change the canary plan, never the list itself
    proc = as_user(cluster, BOB, "patch", "rlagent", "gate", "-n", tenant, "--type=merge",
                   "-p", json.dumps({"spec": {"approval": {"allowedServiceAccounts": [ci]}}}))
    assert proc.returncode == 0, proc.stderr
    ok = with_token(cluster, kubeconfig, "patch", "rlagent", "gate", "-n", tenant, "--type=merge",
                    "-p", json.dumps({"spec": {"canary": {"analysis": {"maxErrorRate": 0.01}}}}))
    assert ok.returncode == 0, ok.stderr
    refused(with_token(cluster, kubeconfig, "patch", "rlagent", "gate", "-n", tenant, "--type=merge",
                       "-p", json.dumps({"spec": {"approval": {"allowedServiceAccounts": [
                           ci, f"system:serviceaccount:{tenant}:other"]}}})),
            "set by a person, never by a ServiceAccount")
    # the operator warns: this ServiceAccount shares the agent's namespace
    cond = wait_for(lambda: next((c for c in (cluster.get("rlagent", "gate", "-n", tenant).get("status") or {})
                                  .get("conditions", []) if c["type"] == "ApproversIsolated"), None),
                    60, "ApproversIsolated condition")
    assert cond["status"] == "False" and cond["reason"] == "ServiceAccountInAgentNamespace" and ci in cond["message"]
    events = cluster.get("events", "-n", tenant, "--field-selector", "involvedObject.name=gate")["items"]
    assert any(e["reason"] == "ApproverInAgentNamespace" and e["type"] == "Warning" for e in events)


def test_a_minted_approver_token_decides_no_rollout(cluster, tenant, staged):
    """As the unlisted `ci`, with its verb: approve, reject and promote are all refused."""
    kubeconfig = minted_token(cluster, tenant, "ci")
    for pair in (f"rlops.dev/approve={FP}", "rlops.dev/reject=no", "rlops.dev/promote=full"):
        refused(with_token(cluster, kubeconfig, "annotate", "rollout", "gate-7", "-n", tenant, "--overwrite", pair),
                "is a ServiceAccount", "allowedServiceAccounts")
    status = rollout_status(cluster, tenant, "gate-7")
    assert status["phase"] == "AwaitingApproval" and status.get("approval") is None
    ann = cluster.get("rollout", "gate-7", "-n", tenant)["metadata"].get("annotations") or {}
    assert not {"rlops.dev/approve", "rlops.dev/reject", "rlops.dev/promote"} & set(ann)


def test_the_api_server_calls_the_webhook_only_when_an_approval_annotation_changes(cluster, operator, tenant,
                                                                                   staged):
    """The configuration's CEL matchCondition: the operator's own writes (status, other
    annotations) and a tenant's unrelated annotation never reach the webhook; an approval
    annotation, added or removed, always does (the counter is the webhook's own)."""
    def reviews() -> float:
        return sum(v for (name, _), v in operator.metrics().items() if name == "rlops_admission_reviews_total")

    hook = cluster.get("mutatingwebhookconfiguration", "rlops.dev")["webhooks"][0]
    assert hook["matchConditions"][0]["name"] == "approval-annotations-change"
    before = reviews()
    assert annotate(cluster, tenant, MALLORY, "example.com/note=unrelated").returncode == 0
    assert annotate(cluster, tenant, MALLORY, "example.com/note-").returncode == 0
    assert reviews() == before
    refused(annotate(cluster, tenant, MALLORY, "rlops.dev/approved-at=2026-12-02T00:00:00Z"), "recorded by")
    assert reviews() == before + 1
    assert annotate(cluster, tenant, BOB, f"rlops.dev/approve={FP}").returncode == 0
    assert reviews() == before + 2
    # the operator then records the impersonation from the audit log (bob is played with
    # kubectl --as): rlops.dev/approved-via is a reviewed annotation, so that is one more review
    wait_for(lambda: "rlops.dev/approved-via" in cluster.get("rollout", "gate-7", "-n", tenant)["metadata"]["annotations"],
             30, "approved-via from the audit log")
    status = wait_for(lambda: (rollout_status(cluster, tenant, "gate-7").get("approval") or {}).get("via")
                      and rollout_status(cluster, tenant, "gate-7"), 60, "status.approval")
    # the operator wrote the Rollout's status (twice) and Events since: none of it was reviewed
    assert status["phase"] == "Approved" and reviews() == before + 3
    refused(annotate(cluster, tenant, MALLORY, "rlops.dev/approval-signature-"), "recorded by")
    assert reviews() == before + 4


def test_only_the_api_server_gets_a_review_from_the_webhook(cluster, operator, tenant, staged):
    """A forged AdmissionReview, posted straight to the webhook's port by anyone who reaches it
    (as bob, approving the real fingerprint), would come back with a valid approval signature and
    spend a SubjectAccessReview. The webhook requires the client certificate that the API server
    presents (its AdmissionConfiguration, hack/cluster-up.sh): without it, or with another CA's,
    the TLS handshake fails. Approvals through the API server still work (the other tests)."""
    import ssl

    import httpx

    from rl_operator import certs

    assert (cluster.dir / "webhook-client" / "ca.crt").exists(), "the cluster was made without a webhook client CA"
    rollout = cluster.get("rollout", "gate-7", "-n", tenant)
    forged = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "forged-1", "operation": "UPDATE", "namespace": tenant, "name": "gate-7",
        "userInfo": {"username": BOB, "groups": ["system:authenticated"]},
        "object": {**rollout, "metadata": {**rollout["metadata"], "annotations": {"rlops.dev/approve": FP}}},
        "oldObject": rollout}}
    mallory_ca = certs.ensure_webhook_certs(str(operator.workdir / "mallory-client"), ["mallory"], client=True)
    for cert in (None, mallory_ca):
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # whatever serves there: she wants a signature
        if cert is not None:
            ctx.load_cert_chain(str(cert.cert), str(cert.key))
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.post(f"https://127.0.0.1:{operator.webhook_port}/approval", json=forged, verify=ctx, timeout=10)
    assert rollout_status(cluster, tenant, "gate-7").get("approval") is None


def test_no_trust_without_the_webhook(cluster, tenant, staged):
    """With the webhook unregistered, an approver's hand-written approval is accepted by the API
    server (the policies still check the verb and the name) but the operator does not honour it."""
    saved = cluster.get("mutatingwebhookconfiguration", "rlops.dev")
    cluster.kubectl("delete", "mutatingwebhookconfiguration", "rlops.dev")
    try:
        refused(annotate(cluster, tenant, MALLORY, f"rlops.dev/approve={FP}", "rlops.dev/approved-by=mallory",
                         "rlops.dev/approved-at=2026-12-02T00:00:00Z"), "approve")
        refused(annotate(cluster, tenant, BOB, f"rlops.dev/approve={FP}", "rlops.dev/approved-by=alice",
                         "rlops.dev/approved-at=2026-12-02T00:00:00Z"), "must name the user who sets")
        proc = annotate(cluster, tenant, BOB, f"rlops.dev/approve={FP}", "rlops.dev/approved-by=bob",
                        "rlops.dev/approved-at=2026-12-02T00:00:00Z")
        assert proc.returncode == 0, proc.stderr
        status = wait_for(lambda: "approval-signature" in (rollout_status(cluster, tenant, "gate-7").get("message") or "")
                          and rollout_status(cluster, tenant, "gate-7"), 60, "refusal of the unsigned approval")
        assert status["phase"] == "AwaitingApproval" and status.get("approval") is None
        assert "not recorded by the rlops admission webhook" in status["message"]
    finally:
        for key in ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields"):
            saved["metadata"].pop(key, None)
        cluster.kubectl("apply", "-f", "-", input=json.dumps(saved))


# ----------------------------------------------------------------------------- the run's own Job and pods


def test_job_name_squatting_fails_the_run_with_a_reason(cluster, tenant):
    squat = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "gate-2"},
             "spec": {"template": {"spec": {"restartPolicy": "Never", "nodeSelector": {"rlops.dev/test-pool": "none"},
                                            "containers": [{"name": "trainer", "image": "evil"}]}}}}
    assert as_user(cluster, MALLORY, "create", "-n", tenant, "-f", "-", input=json.dumps(squat)).returncode == 0
    assert as_user(cluster, MALLORY, "patch", "rlagent", "gate", "-n", tenant, "--type=merge",
                   "-p", '{"spec": {"training": {"totalTimesteps": 40960}}}').returncode == 0
    status = wait_for(lambda: (cluster.get("trainingrun", "gate-2", "-n", tenant) or {}).get("status", {})
                      .get("phase") == "Failed" and cluster.get("trainingrun", "gate-2", "-n", tenant)["status"],
                      60, "gate-2 Failed")
    assert status["failureReason"] == "JobNotOwned" and "not controlled by this TrainingRun" in status["failureMessage"]


def test_a_pod_cannot_claim_the_runs_label(cluster, tenant):
    """Mallory's pod with the run's label and a controller reference to its Job, which the Job
    controller would adopt, is refused at admission: only the Job controller puts that label on
    a pod, for a Job of the operator's (the ValidatingAdmissionPolicy
    ``rlops.dev-reserved-pod-labels``). Without the label, the operator never sees a pod (it
    watches only pods with the label, filtered by the API server); should the Job complete
    through such a pod, the run fails ``TrainerPodMissing`` (unit: ``test_training_decisions.py``).
    A pod that a cluster-admin makes with the label is still compared with the Job's template
    (``PodsIgnored``, unit: ``test_trust.py``)."""
    job = wait_for(lambda: cluster.get("job", "gate-1", "-n", tenant), 60, "Job gate-1")
    labels = {**job["spec"]["template"]["metadata"]["labels"], "rlops.dev/training-run": "gate-1"}
    forged = {"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": "gate-1-forged", "labels": labels,
                           "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "gate-1",
                                                "uid": job["metadata"]["uid"], "controller": True}]},
              "spec": {"restartPolicy": "Never", "nodeName": "kwok-gpu-0",
                       "containers": [{"name": "trainer", "image": "mallory/forger"}]}}
    refused(as_user(cluster, MALLORY, "create", "-n", tenant, "-f", "-", input=json.dumps(forged)),
            "rlops.dev-reserved-pod-labels", "set by the Job controller", MALLORY)
    # nor can she put the label on the Job's own pod, or take it off
    pod = wait_for(lambda: next((p for p in cluster.get("pods", "-n", tenant, "-l", "rlops.dev/training-run=gate-1")
                                 ["items"]), None), 60, "the Job's own pod")
    for change in ("rlops.dev/training-run=gate-2", "rlops.dev/training-run-"):
        refused(as_user(cluster, MALLORY, "label", "pod", pod["metadata"]["name"], "-n", tenant, "--overwrite",
                        change), "rlops.dev-reserved-pod-labels")


# ----------------------------------------------------------------------------- 7. admission catches what the Job would refuse


@pytest.mark.parametrize(("extra", "field", "why"), [
    ("  training: {resources: {cpu: lots}}", "spec.training.resources.cpu", "Kubernetes quantity"),
    ("  training: {resources: {memory: '-1Gi'}}", "spec.training.resources.memory", "above zero"),
    ("  training: {image: 'evil image'}", "spec.training.image", "should match"),
    ("  training: {nodeSelector: {'bad key!': x}}", "spec.training.nodeSelector", "label keys"),
    ("  training: {nodeSelector: {pool: 'not a label value'}}", "spec.training.nodeSelector", "should match"),
    ("  training: {tolerations: [{operator: Sometimes}]}", "spec.training.tolerations[0].operator",
     "Unsupported value"),
    ("  training: {tolerations: [{key: a, tolerationSeconds: 5}]}", "spec.training.tolerations[0].tolerationSeconds",
     "needs effect NoExecute"),
], ids=["cpu", "memory", "image", "selector-key", "selector-value", "toleration-operator", "toleration-seconds"])
def test_values_copied_into_the_job_are_checked_at_admission(cluster, tenant, extra, field, why):
    manifest = f"""apiVersion: rlops.dev/v1alpha1
kind: RLAgent
metadata: {{name: bad}}
spec:
  environment: {{id: CartPole-v1}}
{extra}
"""
    refused(as_user(cluster, MALLORY, "apply", "-n", tenant, "-f", "-", input=manifest), field, why)


def test_a_job_the_api_server_refuses_fails_the_run_with_a_reason(cluster, operator, tenant):
    cluster.kubectl("create", "quota", "no-jobs", "-n", tenant, "--hard=count/jobs.batch=0")
    assert as_user(cluster, MALLORY, "apply", "-n", tenant, "-f", "-",
                   input=AGENT.format(name="quota", extra="")).returncode == 0
    status = wait_for(lambda: ((cluster.get("trainingrun", "quota-1", "-n", tenant) or {}).get("status") or {})
                      .get("phase") == "Failed" and cluster.get("trainingrun", "quota-1", "-n", tenant)["status"],
                      60, "quota-1 Failed")
    assert status["failureReason"] == "JobRejected" and "quota" in status["failureMessage"]
    assert "Traceback" not in operator.log().split("quota-1", 1)[-1]
