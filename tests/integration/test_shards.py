"""Two operators sharding the cluster by namespace, against the real API server.

Each shard serves its own namespaces: its watches, its approval webhook (a
MutatingWebhookConfiguration of its own, with a namespaceSelector) and its alert receiver stay
inside them, and each claims its own Ray cluster (a Lease): a third operator pointed at a Ray
cluster that a shard already serves refuses to start, because Serve's REST API replaces the
whole config with no compare-and-swap.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
import uuid

import pytest

from support import CACHE, REPO, OperatorProcess, free_port, sample, stage_chain, wait_for

FP = "sha256:" + "5" * 64
AGENT = """apiVersion: rlops.dev/v1alpha1
kind: RLAgent
metadata: {name: gate}
spec:
  environment: {id: CartPole-v1}
  training: {totalTimesteps: 20480, nodeSelector: {rlops.dev/test-pool: none}}
  serving: {enabled: false}
"""
TOKEN = "shard-test-" + uuid.uuid4().hex


@pytest.fixture
def shards(cluster, operator, tmp_path):
    """Shards ``a`` and ``b`` (one namespace each, a Ray URL each), with the session's
    all-namespaces operator stopped meanwhile (it would serve every namespace too)."""
    names = {s: f"shard-{s}-{uuid.uuid4().hex[:6]}" for s in "ab"}
    for ns in names.values():
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl("create", "rolebinding", "bob-approve", "-n", ns, "--clusterrole=rlops-approver", "--user=bob")
    cluster.kubectl("-n", "rlops-system", "delete", "secret", "rlops-alertmanager", "--ignore-not-found")
    cluster.kubectl("-n", "rlops-system", "create", "secret", "generic", "rlops-alertmanager",
                    f"--from-literal=token={TOKEN}")
    urls = {s: f"http://127.0.0.1:{free_port()}" for s in "ab"}  # no Ray there: serving is off
    # the operator's RBAC as the chart renders it for these shards (their webhook configurations
    # and certificate Secrets by name), instead of the single operator's
    values = [f"shards[{i}].name={s},shards[{i}].namespaces={{{names[s]}}},shards[{i}].rayDashboardUrl={urls[s]}"
              for i, s in enumerate("ab")]
    rbac = subprocess.run([str(CACHE / "bin" / "current" / "helm"), "template", "rlops", str(REPO / "charts" / "rlops"),
                           "--namespace", "rlops-system", "--show-only", "templates/rbac.yaml",
                           *[a for v in values for a in ("--set", v)]],
                          capture_output=True, text=True, check=True, timeout=60).stdout
    cluster.kubectl("apply", "-f", "-", input=rbac)
    operator.kill(signal.SIGTERM)
    ops: dict[str, OperatorProcess] = {}
    try:
        for s, ns in names.items():
            (tmp_path / s).mkdir()
            op = OperatorProcess(cluster, tmp_path / s)
            op.artifact_root = operator.artifact_root
            op.extra_env.update(RLOPS_SHARD=s, RLOPS_NAMESPACES=ns, RLOPS_RAY_DASHBOARD_URL=urls[s],
                                RLOPS_AUDIT_RECEIVER="")  # the API server's audit webhook has one address
            ops[s] = op  # stopped in the end even if its start fails
            op.start()
        yield ops, names, urls
    finally:
        for op in ops.values():
            op.kill(signal.SIGTERM)
        for s in "ab":
            cluster.kubectl("delete", "mutatingwebhookconfiguration", f"{s}.rlops.dev", "--ignore-not-found")
        cluster.kubectl("-n", "rlops-system", "delete", "lease", "-l", "app.kubernetes.io/part-of=rlops",
                        "--ignore-not-found")
        for ns in names.values():
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        cluster.kubectl("apply", "-k", str(REPO / "manifests" / "overlays" / "local"))  # the single operator's RBAC
        operator.start()


def _post_alert(op: OperatorProcess, namespace: str, agent: str) -> int:
    payload = {"version": "4", "status": "firing", "receiver": "rlops", "groupKey": "{}", "truncatedAlerts": 0,
               "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am",
               "alerts": [{"status": "firing", "labels": {"alertname": "CanaryErrors", "namespace": namespace,
                                                          "rlagent": agent, "rlops_action": "rollback"},
                           "annotations": {}, "startsAt": "2026-12-03T00:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
                           "generatorURL": "", "fingerprint": "0"}]}
    req = urllib.request.Request(f"http://127.0.0.1:{op.receiver_port}/api/v1/alerts", json.dumps(payload).encode(),
                                 {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status


def test_two_shards_each_serve_their_own_namespaces(cluster, shards):
    ops, names, urls = shards
    # each shard's webhook reviews Rollouts in its own namespaces only
    for s, ns in names.items():
        hook = wait_for(lambda: cluster.get("mutatingwebhookconfiguration", f"{s}.rlops.dev"), 30,
                        f"webhook configuration of shard {s}")["webhooks"][0]
        assert hook["namespaceSelector"]["matchExpressions"] == [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [ns]}]
        assert hook["matchConditions"][0]["name"] == "approval-annotations-change"
    # the single operator's configuration (every namespace, failing closed) went when the shards started
    assert cluster.get("mutatingwebhookconfiguration", "rlops.dev") is None

    for s, ns in names.items():
        assert cluster.apply(AGENT, ns).returncode == 0
    rollouts = {s: stage_chain(cluster, ns, "gate", "gate-7", ops[s].artifact_root, FP) for s, ns in names.items()}
    for s, ns in names.items():
        wait_for(lambda: (cluster.get("rollout", "gate-7", "-n", ns).get("status") or {}).get("phase")
                 == "AwaitingApproval", 60, f"shard {s}: AwaitingApproval")
        assert rollouts[s]["metadata"]["namespace"] == ns
        # one run and one Job per namespace: nobody else made another
        assert [r["metadata"]["name"] for r in cluster.get("trainingruns", "-n", ns)["items"]] == ["gate-1", "gate-7"]

    # an approval in shard a's namespace is reviewed by shard a's webhook, and by it alone
    def reviews(op: OperatorProcess) -> float:
        return sum(v for (name, _), v in op.metrics().items() if name == "rlops_admission_reviews_total")

    before = {s: reviews(op) for s, op in ops.items()}
    proc = cluster.kubectl("annotate", "rollout", "gate-7", "-n", names["a"], "--as=bob", f"rlops.dev/approve={FP}",
                           check=False)
    assert proc.returncode == 0, proc.stderr
    assert reviews(ops["a"]) == before["a"] + 1 and reviews(ops["b"]) == before["b"]
    wait_for(lambda: (cluster.get("rollout", "gate-7", "-n", names["a"]).get("status") or {}).get("phase")
             == "Approved", 60, "shard a: Approved")
    assert (cluster.get("rollout", "gate-7", "-n", names["b"]).get("status") or {}).get("phase") == "AwaitingApproval"

    # an alert that names shard b's agent, sent to shard a's receiver, is left to shard b
    assert _post_alert(ops["a"], names["b"], "gate") == 200
    wait_for(lambda: sample(ops["a"].metrics(), "rlops_alerts_received_total", action="other_shard") == 1, 10,
             "shard a to count the other shard's alert")
    assert (cluster.get("rollout", "gate-7", "-n", names["b"]).get("status") or {}).get("phase") == "AwaitingApproval"

    # every object line in a shard's log is about its own namespace
    for s, op in ops.items():
        other = names["b" if s == "a" else "a"]
        assert f"[{names[s]}/gate" in op.log()
        assert f"[{other}/" not in op.log(), f"shard {s} acted in {other}"

    # a third operator pointed at shard a's Ray cluster refuses to start, naming the holder
    (ops["a"].workdir.parent / "c").mkdir()
    third = OperatorProcess(cluster, ops["a"].workdir.parent / "c")
    third.extra_env.update(RLOPS_SHARD="c", RLOPS_NAMESPACES="default", RLOPS_RAY_DASHBOARD_URL=urls["a"],
                           RLOPS_AUDIT_RECEIVER="")
    argv, env = third.command()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"the Ray cluster at {urls['a']} is served by the operator of shard 'a'" in proc.stderr
    assert cluster.get("mutatingwebhookconfiguration", "c.rlops.dev") is None
    held = cluster.get("leases", "-n", "rlops-system", "-l", "app.kubernetes.io/part-of=rlops")["items"]
    assert {(ls["spec"]["holderIdentity"], ls["metadata"]["annotations"]["rlops.dev/ray-dashboard-url"])
            for ls in held} >= {("a", urls["a"]), ("b", urls["b"])}


def test_a_shard_needs_its_namespaces_listed_by_name(cluster, tmp_path):
    op = OperatorProcess(cluster, tmp_path)
    for extra, words in (({"RLOPS_SHARD": "x"}, "--shard needs --namespace"),
                         ({"RLOPS_SHARD": "x", "RLOPS_NAMESPACES": "team-*"}, "name each namespace (no patterns)")):
        op.extra_env = extra
        argv, env = op.command()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-2000:]
