"""The real API server refuses bad specs at admission, naming the field (CRD schema + CEL)."""

import pytest

from support import REPO

AGENT = """apiVersion: rlops.dev/v1alpha1
kind: RLAgent
metadata:
  name: {name}
spec:
{spec}
"""


@pytest.mark.parametrize(
    ("spec", "field", "why"),
    [
        ("  environment: {id: CartPole-v1}\n  training: {resources: {gpu: -1}}",
         "spec.training.resources.gpu", "greater than or equal to 0"),
        ("  environment: {id: CartPole-v1}\n  algorithm: {name: A2C}",
         "spec.algorithm.name", 'Unsupported value: "A2C"'),
        ("  algorithm: {name: PPO}", "spec.environment", "Required value"),
        ("  environment: {id: CartPole-v1}\n  training: {totalTimesteps: 100, evalInterval: 1000}",
         "spec.training.evalInterval", "evalInterval must not exceed totalTimesteps"),
        ("  environment: {id: ''}", "spec.environment.id", "at least 1 chars long"),
        ("  environment: {id: CartPole-v1, numEnvs: 4096}", "spec.environment.numEnvs",
         "numEnvs above 1024 needs backend: torch"),
        ("  environment: {id: CartPole-v1}\n  canary: {analysis: {feedbackPerClient: {clientHeader: 'X Client'}}}",
         "spec.canary.analysis.feedbackPerClient.clientHeader", "should match"),
        ("  environment: {id: CartPole-v1}\n  canary: {analysis: {feedbackPerClient: {maxPerMinute: -1}}}",
         "spec.canary.analysis.feedbackPerClient.maxPerMinute", "greater than or equal to 0"),
    ],
    ids=["negative-gpu", "unknown-algorithm", "missing-environment", "cel-eval-interval", "empty-env-id",
         "cel-num-envs-backend", "feedback-client-header", "feedback-per-minute"],
)
def test_bad_agent_is_refused_naming_the_field(cluster, namespace, spec, field, why):
    proc = cluster.apply(AGENT.format(name="bad", spec=spec), namespace)
    assert proc.returncode != 0, f"the API server accepted a bad spec:\n{spec}"
    assert field in proc.stderr and why in proc.stderr, proc.stderr
    assert cluster.get("rlagent", "bad", "-n", namespace) is None


def test_agent_name_too_long_for_its_jobs_is_refused(cluster, namespace):
    proc = cluster.apply(AGENT.format(name="a" * 53, spec="  environment: {id: CartPole-v1}"), namespace)
    assert proc.returncode != 0 and "at most 52 characters" in proc.stderr, proc.stderr


def test_defaults_are_applied_by_the_api_server(cluster, namespace):
    proc = cluster.apply(AGENT.format(name="defaults", spec="  environment: {id: CartPole-v1}"), namespace)
    assert proc.returncode == 0, proc.stderr
    spec = cluster.get("rlagent", "defaults", "-n", namespace)["spec"]
    assert spec["algorithm"]["name"] == "PPO"
    assert spec["training"]["resources"] == {"gpu": 1, "cpu": "1", "memory": "2Gi"}
    assert spec["training"]["activeDeadlineSeconds"] == 3600
    assert spec["evaluation"]["episodes"] == 20
    assert spec["environment"]["numEnvs"] == 8
    assert spec["canary"]["analysis"]["feedbackPerClient"] == {"maxPerMinute": 600, "clientHeader": ""}


def test_rbac_is_enforced(cluster):
    """Authorization is RBAC (not AlwaysAllow), and the operator's role is what it needs, no more."""
    sa = "system:serviceaccount:rlops-system:rlops-operator"
    can = lambda *a: cluster.kubectl("auth", "can-i", *a, check=False).stdout.strip()  # noqa: E731
    assert can("create", "rlagents.rlops.dev", "--as=nobody") == "no"
    assert can("create", "jobs.batch", "--as", sa, "-A") == "yes"
    assert can("patch", "trainingruns.rlops.dev", "--subresource=status", "--as", sa, "-A") == "yes"
    assert can("delete", "pods", "--as", sa, "-A") == "no"
    assert can("get", "secrets", "--as", sa, "-A") == "no"


@pytest.mark.parametrize("sample", sorted(p.name for p in (REPO / "manifests" / "samples").glob("*.yaml")))
def test_sample_manifests_are_accepted(cluster, namespace, sample):
    """Every sample the docs point users at passes the API server's validation (dry run)."""
    proc = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f",
                           str(REPO / "manifests" / "samples" / sample), check=False)
    assert proc.returncode == 0, proc.stderr


def test_torch_backend_allows_many_envs(cluster, namespace):
    spec = "  environment: {id: CartPole-v1, numEnvs: 4096, backend: torch}\n  algorithm: {name: DQN}"
    proc = cluster.apply(AGENT.format(name="many", spec=spec), namespace)
    assert proc.returncode == 0, proc.stderr
