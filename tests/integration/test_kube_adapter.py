"""The Kubernetes adapter (rl_operator.kube) against the real API server: the edge cases that
reconciles meet when objects go away under them."""

from __future__ import annotations

from kubernetes import config

from rl_operator import kube
from rl_operator import models as m

AGENT = """apiVersion: rlops.dev/v1alpha1
kind: RLAgent
metadata: {name: gone}
spec:
  environment: {id: CartPole-v1}
"""


def test_a_status_patch_of_a_deleted_object_is_a_no_op(cluster, namespace):
    """A reconcile that read an object which is deleted before its status write (its namespace
    going, a user's delete) records nothing and raises nothing."""
    config.load_kube_config(config_file=str(cluster.kubeconfig))
    assert cluster.apply(AGENT, namespace).returncode == 0
    patched = kube.patch_status(namespace, m.RLAgent.PLURAL, "gone", {"phase": "Pending"})
    assert patched is not None and patched["status"]["phase"] == "Pending"
    cluster.kubectl("delete", "rlagent", "gone", "-n", namespace, "--wait=true")
    assert kube.patch_status(namespace, m.RLAgent.PLURAL, "gone", {"phase": "Training"}) is None
    assert kube.patch_status(namespace, m.Rollout.PLURAL, "never-existed", {"phase": "Paused"}) is None


def test_a_status_patch_from_a_stale_copy_conflicts_and_a_current_one_lands(cluster, namespace):
    """The operator computes statuses from its watch cache and writes them guarded by the cached
    copy's resourceVersion: the API server refuses a write computed from an older copy. (The
    session's operator reconciles this agent too: a write from a copy it just replaced is
    retried from a fresh read, as the operator itself does.)"""
    import pytest

    config.load_kube_config(config_file=str(cluster.kubeconfig))
    assert cluster.apply(AGENT, namespace).returncode == 0

    def patch_current(phase: str) -> dict:
        for _ in range(10):
            rv = kube.get_custom(namespace, m.RLAgent.PLURAL, "gone")["metadata"]["resourceVersion"]
            try:
                return kube.patch_status(namespace, m.RLAgent.PLURAL, "gone", {"phase": phase}, rv)
            except kube.Conflict:
                continue
        raise AssertionError("the agent never held still")

    stale = kube.get_custom(namespace, m.RLAgent.PLURAL, "gone")["metadata"]["resourceVersion"]
    assert patch_current("Pending")["status"]["phase"] == "Pending"
    with pytest.raises(kube.Conflict, match="changed since resourceVersion"):
        kube.patch_status(namespace, m.RLAgent.PLURAL, "gone", {"phase": "Training"}, stale)
    assert patch_current("Training")["status"]["phase"] == "Training"


def test_a_claim_is_one_holders_until_it_lapses(cluster, namespace):
    """The Lease through which an operator claims its Ray cluster: created atomically, renewed
    by its holder, refused to another holder while it is renewed, taken over once it lapses."""
    from datetime import datetime, timedelta, timezone

    config.load_kube_config(config_file=str(cluster.kubeconfig))
    t0 = datetime.now(timezone.utc)
    ann = {"rlops.dev/ray-dashboard-url": "http://ray.example:8265"}
    assert kube.claim(namespace, "rlops-ray-test", "east", ann, 60, now=t0) == "east"
    assert kube.claim(namespace, "rlops-ray-test", "west", ann, 60, now=t0 + timedelta(seconds=30)) == "east"
    assert kube.claim(namespace, "rlops-ray-test", "east", ann, 60, now=t0 + timedelta(seconds=50)) == "east"
    # renewed at +50 s: still east's at +100 s, west's at +111 s
    assert kube.claim(namespace, "rlops-ray-test", "west", ann, 60, now=t0 + timedelta(seconds=100)) == "east"
    assert kube.claim(namespace, "rlops-ray-test", "west", ann, 60, now=t0 + timedelta(seconds=111)) == "west"
    assert kube.claim(namespace, "rlops-ray-test", "east", ann, 60, now=t0 + timedelta(seconds=112)) == "west"
    lease = cluster.get("lease", "rlops-ray-test", "-n", namespace)
    assert lease["spec"]["holderIdentity"] == "west" and lease["spec"]["leaseDurationSeconds"] == 60
    assert lease["metadata"]["annotations"] == ann
