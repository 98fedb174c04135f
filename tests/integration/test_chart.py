"""The Helm chart (charts/rlops): lint, values schema, a server-side dry run against the real
API server (cert-manager's and KubeRay's resources against their own CRDs), and manifests/base
rendered from it (one source).

The chart installed for real, with the operator in its pod, is the cluster tier (tests/cluster).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    # by default the Ray dashboard's NetworkPolicy goes where ray.dashboardUrl says Ray runs
    cluster.kubectl("create", "namespace", "ray-system", check=False)
    proc = template("--include-crds", *values)
    assert proc.returncode == 0, proc.stderr
    kinds = {d["kind"] for d in docs(proc.stdout)}
    assert {"CustomResourceDefinition", "Deployment", "Service", "NetworkPolicy", "ClusterRole",
            "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "ServiceAccount"} <= kinds
    applied = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=proc.stdout, check=False)
    assert applied.returncode == 0, applied.stderr


SHARDS = ["--set", "shards[0].name=east,shards[0].namespaces={team-a,team-b},"
                  "shards[0].rayDashboardUrl=http://ray-east-head-svc.ray.svc:8265",
          "--set", "shards[1].name=west,shards[1].namespaces={team-c},"
                  "shards[1].rayDashboardUrl=http://ray-west-head-svc.ray.svc:8265"]


def test_shards_render_one_operator_each_with_its_namespaces_ray_cluster_and_webhook(cluster):
    """Each shard: a Deployment and a Service of its own, the namespaces and Ray cluster it
    serves, its own webhook certificate Secret, no peering; the RBAC names every shard's webhook
    configuration and Secret, and the uninstall hook removes every configuration."""
    proc = template(*SHARDS)
    assert proc.returncode == 0, proc.stderr
    rendered = docs(proc.stdout)
    applied = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=proc.stdout, check=False)
    assert applied.returncode == 0, applied.stderr
    deployments = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Deployment"}
    assert set(deployments) == {"rlops-operator-east", "rlops-operator-west"}
    services = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Service"}
    for shard, namespaces in (("east", "team-a,team-b"), ("west", "team-c")):
        dep = deployments[f"rlops-operator-{shard}"]
        env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["RLOPS_SHARD"] == shard and env["RLOPS_NAMESPACES"] == namespaces
        assert env["RLOPS_RAY_DASHBOARD_URL"] == f"http://ray-{shard}-head-svc.ray.svc:8265"
        assert env["RLOPS_WEBHOOK_SERVICE"] == f"rlops-system/rlops-operator-{shard}:443"
        assert env["RLOPS_WEBHOOK_CERT_SECRET"] == f"rlops-system/rlops-webhook-tls-{shard}"
        assert "RLOPS_PEERING" not in env
        selector = dep["spec"]["selector"]["matchLabels"]
        assert selector["rlops.dev/shard"] == shard == dep["spec"]["template"]["metadata"]["labels"]["rlops.dev/shard"]
        assert services[f"rlops-operator-{shard}"]["spec"]["selector"] == selector
    rules = [r for d in rendered if d["kind"] in ("ClusterRole", "Role") and d["metadata"]["name"].startswith("rlops-operator")
             for r in d["rules"]]
    assert {"east.rlops.dev", "west.rlops.dev"} <= {n for r in rules for n in r.get("resourceNames", [])}
    assert {"rlops-webhook-tls-east", "rlops-webhook-tls-west"} <= {n for r in rules for n in r.get("resourceNames", [])}
    (job,) = [d for d in docs(template(*SHARDS, "--show-only", "templates/uninstall-hook.yaml").stdout)]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-3:] == ["rlops.dev", "east.rlops.dev",
                                                                                 "west.rlops.dev"]


@pytest.mark.parametrize(("override", "words"), [
    (["--set", "replicas=2"], "each shard runs one operator"),
    (["--set", "shards[1].namespaces={team-b}"], 'namespace "team-b" is listed by shards "east" and "west"'),
    (["--set", "shards[1].rayDashboardUrl=http://ray-east-head-svc.ray.svc:8265"], "needs a Ray cluster of its own"),
    (["--set", "ray.kuberay.enabled=true"], "give each shard its rayDashboardUrl"),
    (["--set", "shards[1].namespaces={team-*}"], "/shards/1/namespaces/0"),
])
def test_shards_that_would_share_a_namespace_or_a_ray_cluster_are_refused(cluster, override, words):
    proc = template(*SHARDS, *override)
    assert proc.returncode != 0 and words in proc.stderr, proc.stderr


def wait_established(cluster, crd: str) -> None:
    """Wait for a CRD just applied to be served (``kubectl wait`` errors out while it has no
    conditions yet)."""
    wait_for(lambda: any(x["type"] == "Established" and x["status"] == "True" for x in
                         ((cluster.get("crd", crd) or {}).get("status") or {}).get("conditions") or []),
             60, f"CRD {crd} established")


CERT_MANAGER = "github.com/cert-manager/cert-manager@v1.21.2"  # its CRDs, from the Go module proxy


def test_the_cert_manager_option_renders_what_cert_manager_accepts(cluster, tmp_path):
    """With webhook.certManager.enabled, the chart's Issuer and Certificate pass a server-side dry
    run against cert-manager's own CRDs (from its Go module: cert-manager's controller itself is
    not run here), and the operator is told to only read the Secret."""
    proc = subprocess.run(["go", "mod", "download", "-json", CERT_MANAGER], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GOTOOLCHAIN": "local"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    crds = Path(json.loads(proc.stdout)["Dir"]) / "deploy" / "crds"
    for kind in ("issuers", "clusterissuers", "certificates"):
        cluster.kubectl("apply", "--server-side", "-f", str(crds / f"cert-manager.io_{kind}.yaml"))
    for kind in ("issuers", "clusterissuers", "certificates"):
        wait_established(cluster, f"{kind}.cert-manager.io")
    for extra in ([], ["--set", "webhook.certManager.issuerRef.name=corp-ca",
                       "--set", "webhook.certManager.issuerRef.kind=ClusterIssuer"]):
        rendered = template("--set", "webhook.certManager.enabled=true", *extra)
        assert rendered.returncode == 0, rendered.stderr
        objs = docs(rendered.stdout)
        (cert,) = [d for d in objs if d["kind"] == "Certificate"]
        assert cert["spec"]["secretName"] == "rlops-webhook-tls"
        assert "rlops-operator.rlops-system.svc" in cert["spec"]["dnsNames"]
        issuers = [d for d in objs if d["kind"] == "Issuer"]
        assert len(issuers) == (0 if extra else 1)
        (deploy,) = [d for d in objs if d["kind"] == "Deployment"]
        env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["RLOPS_WEBHOOK_CERT_MANAGED"] == "1" and env["RLOPS_WEBHOOK_CERT_SECRET"] == "rlops-system/rlops-webhook-tls"
        dry = cluster.kubectl("apply", "--dry-run=server", "-f", "-", check=False,
                              input="---\n".join(yaml.safe_dump(d) for d in [cert, *issuers]))
        assert dry.returncode == 0, dry.stderr


def kuberay_module() -> tuple[str, str]:
    """KubeRay's operator module and version, as hack/tools/kuberay/go.mod pins them."""
    mod = "github.com/ray-project/kuberay/ray-operator"
    for line in (REPO / "hack" / "tools" / "kuberay" / "go.mod").read_text().splitlines():
        if line.split()[:2] in (["require", mod], [mod]) or line.strip().startswith(mod + " "):
            return mod, line.split()[-1]
    raise AssertionError("hack/tools/kuberay/go.mod does not require " + mod)


def test_the_ray_dashboard_is_guarded_by_default_or_the_install_refuses(cluster):
    """Whoever reaches the Ray dashboard can change what Serve runs: by default only the
    operator's pods reach it (a NetworkPolicy in the namespace that ray.dashboardUrl names); a
    URL that names no namespace is refused unless the policy's namespace is given or the
    dashboard is declared guarded some other way."""
    (policy,) = [d for d in docs(template().stdout) if d["kind"] == "NetworkPolicy"
                 and d["metadata"]["name"] == "rlops-ray-dashboard"]
    assert policy["metadata"]["namespace"] == "ray-system"
    (dashboard,) = [rule for rule in policy["spec"]["ingress"] if {"port": 8265} in (rule.get("ports") or [])]
    assert dashboard["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "rlops-system"}},
                                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "rlops-operator"}}}]
    by_address = ("--set", "ray.dashboardUrl=http://10.0.0.7:8265")
    refused = template(*by_address)
    assert refused.returncode != 0 and "networkPolicy.ray.namespace" in refused.stderr, refused.stderr
    named = template(*by_address, "--set", "networkPolicy.ray.namespace=serving")
    assert [d["metadata"]["namespace"] for d in docs(named.stdout) if d["kind"] == "NetworkPolicy"
            and d["metadata"]["name"] == "rlops-ray-dashboard"] == ["serving"]
    elsewhere = template(*by_address, "--set", "networkPolicy.ray.unprotected=true")
    assert elsewhere.returncode == 0 and "rlops-ray-dashboard" not in elsewhere.stdout


def test_the_kuberay_option_renders_a_raycluster_that_kuberay_accepts(cluster, tmp_path):
    """With ray.kuberay.enabled, the chart's RayCluster passes a server-side dry run against
    KubeRay's own CRD (from its Go module), and the operator talks to that cluster's head
    Service; without KubeRay's CRDs, the chart refuses and says why."""
    mod, version = kuberay_module()
    proc = subprocess.run(["go", "mod", "download", "-json", f"{mod}@{version}"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GOTOOLCHAIN": "local"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    crd = Path(json.loads(proc.stdout)["Dir"]) / "config" / "crd" / "bases" / "ray.io_rayclusters.yaml"
    cluster.kubectl("apply", "--server-side", "-f", str(crd))
    wait_established(cluster, "rayclusters.ray.io")

    missing = template("--set", "ray.kuberay.enabled=true")
    assert missing.returncode != 0 and "KubeRay" in missing.stderr and "ray.dashboardUrl" in missing.stderr
    rendered = template("--set", "ray.kuberay.enabled=true", "--api-versions", "ray.io/v1/RayCluster",
                        "--set", "ray.kuberay.name=policies")
    assert rendered.returncode == 0, rendered.stderr
    objs = docs(rendered.stdout)
    (ray,) = [d for d in objs if d["kind"] == "RayCluster"]
    head = ray["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == "ghcr.io/rlops/engine:0.1.0"
    assert head["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"mountPath": "/var/lib/rlops/artifacts", "name": "artifacts", "readOnly": True} in \
        head["containers"][0]["volumeMounts"]
    (deploy,) = [d for d in objs if d["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RLOPS_RAY_DASHBOARD_URL"] == "http://policies-head-svc.rlops-system.svc:8265"
    (policy,) = [d for d in objs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "rlops-ray-dashboard"]
    assert policy["metadata"]["namespace"] == "rlops-system"
    dry = cluster.kubectl("apply", "--dry-run=server", "-f", "-", check=False, input=yaml.safe_dump(ray))
    assert dry.returncode == 0, dry.stderr
    # an object-store root: nothing to mount
    s3 = template("--set", "ray.kuberay.enabled=true", "--api-versions", "ray.io/v1/RayCluster",
                  "--set", "artifacts.root=s3://policies/rlops")
    (ray,) = [d for d in docs(s3.stdout) if d["kind"] == "RayCluster"]
    assert "artifacts" not in {v["name"] for v in ray["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]}


def test_the_operator_pod_is_non_root_with_a_read_only_root_filesystem(cluster):
    (deploy,) = [d for d in docs(template().stdout) if d["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RLOPS_WEBHOOK_SERVICE"] == "rlops-system/rlops-operator:443"
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {env["RLOPS_CERT_DIR"], "/tmp"}
    assert container["image"] == "ghcr.io/rlops/operator:0.1.0"
    assert env["RLOPS_WORKERS"] == "32"
    (deploy,) = [d for d in docs(template("--set", "reconcileWorkers=4").stdout) if d["kind"] == "Deployment"]
    assert {"name": "RLOPS_WORKERS", "value": "4"} in deploy["spec"]["template"]["spec"]["containers"][0]["env"]


@pytest.mark.parametrize(("args", "words"), [
    (["--namespace", "tenant-a"], ["rlops-system", "tenant-a"]),
    (["--set", "replicas=3"], ["/replicas", "maximum"]),
    (["--set", "image.pullPolicy=Sometimes"], ["/image/pullPolicy"]),
    (["--set", "ray.dashboardUrl=ray-head:8265"], ["/ray/dashboardUrl"]),
    (["--set", "webhook.port=443"], ["/webhook/port", "minimum"]),
    (["--set", "reconcileWorkers=0"], ["/reconcileWorkers", "minimum"]),
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
