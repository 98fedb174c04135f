"""Approvals at admission, on the real API server: the fingerprint must match, the user must hold
the `approve` verb (SubjectAccessReview), and the approver's identity is recorded from the request."""


import pytest

from support import wait_for

FP = "sha256:" + "d" * 64
STALE = "sha256:" + "e" * 64

AGENT = """apiVersion: rlops.dev/v1alpha1
kind: RLAgent
metadata: {name: gate}
spec:
  environment: {id: CartPole-v1}
  training: {nodeSelector: {rlops.dev/test-pool: none}}
  serving: {enabled: false}
"""
ROLLOUT = f"""apiVersion: rlops.dev/v1alpha1
kind: Rollout
metadata:
  name: gate-7
  labels: {{rlops.dev/agent: gate}}
spec:
  agentRef: {{name: gate}}
  trainingRunRef: {{name: gate-7}}
  version: gate-7
  artifactURI: file:///nowhere/gate-7
  fingerprint: "{FP}"
  evaluation: {{meanReturn: 500}}
"""


@pytest.fixture
def gate(cluster, operator, namespace):
    # alice may edit rlops objects (the built-in `edit` role aggregates rlops-edit) but not approve
    cluster.kubectl("create", "rolebinding", "alice-edit", "-n", namespace, "--clusterrole=edit", "--user=alice")
    cluster.kubectl("create", "rolebinding", "bob-approve", "-n", namespace, "--clusterrole=rlops-approver",
                    "--user=bob")
    assert cluster.apply(AGENT, namespace).returncode == 0
    # the webhook must be registered before the first annotation: kopf writes it at start-up
    wait_for(lambda: cluster.get("mutatingwebhookconfiguration", "rlops.dev"), 60, "webhook configuration")
    proc = cluster.apply(ROLLOUT, namespace)
    assert proc.returncode == 0, proc.stderr
    return namespace


def annotate(cluster, namespace, user, *pairs):
    return cluster.kubectl("annotate", "rollout", "gate-7", "-n", namespace, f"--as={user}", "--overwrite",
                           *pairs, check=False)


def test_user_without_approve_verb_is_refused(cluster, gate):
    assert cluster.kubectl("auth", "can-i", "patch", "rollouts.rlops.dev", "-n", gate, "--as=alice").stdout.strip() == "yes"
    proc = annotate(cluster, gate, "alice", f"rlops.dev/approve={FP}")
    assert proc.returncode != 0
    assert "may not approve rollouts.rlops.dev" in proc.stderr and "alice" in proc.stderr, proc.stderr


def test_stale_fingerprint_is_refused(cluster, gate):
    proc = annotate(cluster, gate, "bob", f"rlops.dev/approve={STALE}")
    assert proc.returncode != 0 and "stale or wrong fingerprint" in proc.stderr and FP in proc.stderr, proc.stderr


def test_approval_records_the_approver_and_nobody_can_forge_it(cluster, gate):
    proc = annotate(cluster, gate, "alice", "rlops.dev/approved-by=alice")
    assert proc.returncode != 0 and "recorded by the rlops admission webhook" in proc.stderr, proc.stderr

    proc = annotate(cluster, gate, "bob", f"rlops.dev/approve={FP}", "rlops.dev/approve-notes=reviewed eval report")
    assert proc.returncode == 0, proc.stderr
    ann = cluster.get("rollout", "gate-7", "-n", gate)["metadata"]["annotations"]
    assert ann["rlops.dev/approved-by"] == "bob" and ann["rlops.dev/approved-at"].endswith("Z")

    status = wait_for(lambda: (cluster.get("rollout", "gate-7", "-n", gate).get("status") or {}).get("approval")
                      and cluster.get("rollout", "gate-7", "-n", gate)["status"], 60, "status.approval")
    assert status["approval"]["approvedBy"] == "bob"
    assert status["approval"]["fingerprint"] == FP
    assert status["approval"]["policy"] == "manual"
    assert status["approval"]["notes"] == "reviewed eval report"
    assert status["phase"] == "Approved"  # serving disabled for this agent: approved, nothing to ship
    events = cluster.get("events", "-n", gate)["items"]
    assert any(e["reason"] == "Approved" and "bob" in e["message"] for e in events)


def test_reject_needs_the_approve_verb_too(cluster, gate):
    assert annotate(cluster, gate, "alice", "rlops.dev/reject=looks off").returncode != 0
    assert annotate(cluster, gate, "bob", "rlops.dev/reject=reward hacking").returncode == 0
    wait_for(lambda: (cluster.get("rollout", "gate-7", "-n", gate).get("status") or {}).get("phase") == "Rejected",
             60, "Rejected")
