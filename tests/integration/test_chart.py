"""The Helm chart (charts/rlops): lint, values schema, a server-side dry run against the real
API server, and manifests/base rendered from it (one source).

Not here yet: the operator running in a pod from the chart (that needs the real kubelet node and
the project's images: docs/install.md says what is tested where).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from support import CACHE, REPO, wait_for

CHART = REPO / "charts" / "rlops"


def helm(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([str(CACHE / "bin" / "current" / "helm"), *args], capture_output=True, text=True,
                          check=check, timeout=120)


def template(*args: str) -> subprocess.CompletedProcess:
    return helm("template", "rlops", str(CHART), "--namespace", "rlops-system", *args)


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_helm_lint(cluster):
    proc = helm("lint", str(CHART), "--namespace", "rlops-system", "--strict")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values", [[], ["--set", "auditReceiver.enabled=true", "--set",
                                         "networkPolicy.ray.namespace=default", "--set", "image.tag=dev"]])
def test_server_side_dry_run_accepts_everything_the_chart_renders(cluster, values):
    proc = template("--include-crds", *values)
    assert proc.returncode == 0, proc.stderr
    kinds = {d["kind"] for d in docs(proc.stdout)}
    assert {"CustomResourceDefinition", "Deployment", "Service", "NetworkPolicy", "ClusterRole",
            "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "ServiceAccount"} <= kinds
    applied = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=proc.stdout, check=False)
    assert applied.returncode == 0, applied.stderr


def test_the_operator_pod_is_non_root_with_a_read_only_root_filesystem(cluster):
    (deploy,) = [d for d in docs(template().stdout) if d["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["RLOPS_WEBHOOK_SERVICE"] == "rlops-system/rlops-operator:443"
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {env["RLOPS_CERT_DIR"], "/tmp"}
    assert container["image"] == "ghcr.io/rlops/operator:0.1.0"


@pytest.mark.parametrize(("args", "words"), [
    (["--namespace", "tenant-a"], ["rlops-system", "tenant-a"]),
    (["--set", "replicas=2"], ["/replicas", "maximum"]),
    (["--set", "image.pullPolicy=Sometimes"], ["/image/pullPolicy"]),
    (["--set", "ray.dashboardUrl=ray-head:8265"], ["/ray/dashboardUrl"]),
    (["--set", "webhook.port=443"], ["/webhook/port", "minimum"]),
    (["--set", "unknown=1"], ["unknown"]),
])
def test_bad_values_are_refused_naming_them(cluster, args, words):
    base = ["template", "rlops", str(CHART)]
    proc = helm(*base, *(args if args[0] == "--namespace" else ["--namespace", "rlops-system", *args]))
    assert proc.returncode != 0, proc.stdout[:500]
    for word in words:
        assert word in proc.stderr, proc.stderr


def test_manifests_base_is_rendered_from_the_chart(cluster, tmp_path):
    subprocess.run(["bash", str(REPO / "hack" / "render-manifests.sh"), str(tmp_path)], check=True,
                   capture_output=True, timeout=120, env={"RLOPS_HELM": str(CACHE / "bin" / "current" / "helm"),
                                                         "PATH": "/usr/bin:/bin"})
    rendered = sorted(p.name for p in tmp_path.glob("*.yaml"))
    assert rendered, "nothing rendered"
    for name in rendered:
        committed = REPO / "manifests" / "base" / name
        assert committed.exists() and committed.read_text() == (tmp_path / name).read_text(), \
            f"manifests/base/{name} is stale: run `make crds`"
    kustomization = yaml.safe_load((REPO / "manifests" / "base" / "kustomization.yaml").read_text())
    assert set(rendered) <= set(kustomization["resources"])


def test_the_uninstall_hook_removes_the_webhook_configuration(cluster, operator):
    """What the chart's pre-delete hook runs, as the operator's ServiceAccount (its RBAC lets it
    delete only the configurations named rlops.dev). The operator is restarted afterwards, which
    registers the webhook again for the tests that follow."""
    (job,) = [d for d in docs(template().stdout) if d["kind"] == "Job"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    kubeconfig = subprocess.run(["bash", str(REPO / "hack" / "operator-kubeconfig.sh")], env=cluster.env,
                                check=True, capture_output=True, text=True).stdout.strip()
    try:
        assert cluster.get("mutatingwebhookconfiguration", "rlops.dev") is not None
        proc = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "KUBECONFIG": kubeconfig})
        assert proc.returncode == 0, proc.stderr
        assert cluster.get("mutatingwebhookconfiguration", "rlops.dev") is None
        again = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "KUBECONFIG": kubeconfig})
        assert again.returncode == 0, again.stderr  # nothing left to remove is fine
    finally:
        operator.kill()
        operator.start()
        wait_for(lambda: cluster.get("mutatingwebhookconfiguration", "rlops.dev"), 60, "webhook registered again")
