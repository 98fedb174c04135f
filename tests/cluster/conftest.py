"""The cluster tier: rlops installed as a platform team installs it, on a real node.

A control plane of its own (``rlops-cluster``), a real kubelet node (containerd + runc + CNI +
kube-proxy, ``hack/node-up.sh``) with rlops's images built from the Dockerfile and imported
(``hack/images.sh``), a Ray head from the engine image (``manifests/ray/ray-head.yaml``), then
``helm install rlops charts/rlops``. Nothing of rlops runs on the host: the operator, its
webhook, the trainers and Ray Serve are containers on the node.

What is not the real thing, and why: the kwok GPU nodes are still fake (no GPU here; nothing
runs on them in this tier); there is no cluster DNS (CoreDNS's image cannot be pulled here), so
the operator is given the Ray Service's ClusterIP instead of its DNS name; the artifact volume
is a hostPath PersistentVolume (one node); KubeRay's operator (built from its Go module) runs
as a local process, like the control plane, while the RayCluster it makes runs on the node.
Needs root (containerd, iptables).

``RLOPS_KEEP_TEST_CLUSTER=1`` keeps the cluster and the node after the tier.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from incluster import ARTIFACTS_HOST_DIR, cluster_state, helm
from support import CACHE, REPO, Cluster, free_port, prometheus_down, prometheus_up, wait_for

NAME = "rlops-cluster"
NODE_IP = "10.88.0.1"  # the real node's bridge address (hack/node-up.sh): pods reach the host there


def run(cmd: list[str], env: dict[str, str], timeout: float) -> None:
    start = time.monotonic()
    subprocess.run(cmd, env=env, check=True, timeout=timeout)
    print(f"[cluster tier] {' '.join(Path(c).name if '/' in c else c for c in cmd[:2])}: {time.monotonic() - start:.0f} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, the cluster's state goes into the report (CI's output is all there is)."""
    outcome = yield
    report = outcome.get_result()
    c = item.funcargs.get("real_cluster") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(c, Cluster):
        try:
            report.sections.append(("cluster state at the failure", cluster_state(c)))
        except Exception as e:  # noqa: BLE001 - diagnostics must never hide the failure itself
            report.sections.append(("cluster state at the failure", f"could not be read: {e!r}"))


@pytest.fixture(scope="package")
def real_cluster(request) -> Cluster:
    if os.geteuid() != 0:
        pytest.fail("the cluster tier runs a real kubelet node and needs root (containerd, runc, iptables)")
    env = {**os.environ, "RLOPS_CLUSTER_NAME": NAME, "RLOPS_AUDIT_PORT": "8192"}

    def down() -> None:
        subprocess.run(["bash", str(REPO / "hack" / "node-down.sh")], env=env, check=False, timeout=300)
        subprocess.run(["bash", str(REPO / "hack" / "cluster-down.sh")], env=env, check=False, timeout=300)

    if not os.environ.get("RLOPS_KEEP_TEST_CLUSTER"):
        # registered before the bring-up: a half-started cluster goes too (its API server left
        # running once pointed at the next cluster's etcd, which took the freed port)
        request.addfinalizer(down)
    run(["bash", str(REPO / "hack" / "cluster-up.sh")], env, 600)
    run(["bash", str(REPO / "hack" / "node-up.sh")], env, 2400)
    return Cluster(name=NAME, dir=CACHE / "clusters" / NAME, env=env)


@pytest.fixture(scope="package")
def ray_service(real_cluster: Cluster) -> str:
    """The Ray head (engine image) in ray-system; returns its Service's ClusterIP."""
    ARTIFACTS_HOST_DIR.mkdir(parents=True, exist_ok=True)
    os.chown(ARTIFACTS_HOST_DIR, 1000, 1000)  # the trainer and Ray run as uid 1000
    real_cluster.kubectl("apply", "-f", str(REPO / "manifests" / "ray" / "ray-head.yaml"))
    real_cluster.kubectl("-n", "ray-system", "rollout", "status", "deployment/ray-head", "--timeout=300s")
    return real_cluster.get("service", "ray-head", "-n", "ray-system")["spec"]["clusterIP"]


@pytest.fixture(scope="package")
def rlops(real_cluster: Cluster, ray_service: str) -> dict[str, str]:
    """``helm upgrade --install rlops charts/rlops`` (the operator image the node has)."""
    start = time.monotonic()
    # Helm installs the chart's CRDs on the first install only: a later chart's CRDs are applied
    # by hand, as docs/install.md says.
    real_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "charts" / "rlops" / "crds"))
    prometheus_port = free_port()  # Prometheus starts later (monitoring), on the node's address
    # the dashboard by address: the chart needs the Ray cluster's namespace for its NetworkPolicy
    values = ["--set", f"ray.dashboardUrl=http://{ray_service}:8265", "--set", "networkPolicy.ray.namespace=ray-system",
              "--set", f"prometheus.url=http://{NODE_IP}:{prometheus_port}"]
    # the CA of the client certificate the API server presents to webhooks (hack/cluster-up.sh):
    # only the API server gets a review
    client_ca = real_cluster.dir / "webhook-client" / "ca.crt"
    if client_ca.exists():
        real_cluster.kubectl("-n", "rlops-system", "apply", "-f", "-", input=real_cluster.kubectl(
            "-n", "rlops-system", "create", "configmap", "rlops-webhook-client-ca", f"--from-file=ca.crt={client_ca}",
            "--dry-run=client", "-o", "yaml").stdout)
        values += ["--set", "webhook.clientCAConfigMap=rlops-webhook-client-ca"]
    helm(real_cluster, "upgrade", "--install", "rlops", str(REPO / "charts" / "rlops"), "-n", "rlops-system",
         *values, "--wait", "--timeout", "5m")
    def one_pod() -> dict:
        pods = wait_for(lambda: (p := real_cluster.get("pods", "-n", "rlops-system", "-l",
                                                       "app.kubernetes.io/name=rlops-operator")["items"])
                        and len(p) == 1 and p, 300, "one operator pod (the replaced ones gone)")
        return pods[0]

    pod = one_pod()
    # the node may have a newer operator image under the same tag (hack/images.sh re-imported it):
    # restart the pod onto it, as `kubectl rollout restart` after a rebuild
    want = (CACHE / "images" / "loaded-operator").read_text().strip()
    if pod["status"]["containerStatuses"][0].get("imageID", "").removeprefix("sha256:") != want:
        real_cluster.kubectl("-n", "rlops-system", "rollout", "restart", "deployment/rlops-operator")
        real_cluster.kubectl("-n", "rlops-system", "rollout", "status", "deployment/rlops-operator", "--timeout=300s")
        one_pod()
    print(f"[cluster tier] helm install: {time.monotonic() - start:.0f} s")
    return {"ray": ray_service, "values": values, "prometheus_port": prometheus_port}


@pytest.fixture(scope="package")
def monitoring(real_cluster: Cluster, rlops: dict[str, str], tmp_path_factory) -> dict[str, str]:
    """Prometheus and Alertmanager (Debian's) as host processes: Prometheus scrapes Ray's metrics
    through the Ray Service and listens on the node's bridge address (the operator's pod queries
    it); Alertmanager calls the operator's receiver through its Service. (No Prometheus image
    here: monitoring runs beside the cluster, as a managed one would.)"""
    token = secrets.token_hex(16)
    real_cluster.kubectl("-n", "rlops-system", "delete", "secret", "rlops-alertmanager", "--ignore-not-found")
    real_cluster.kubectl("-n", "rlops-system", "create", "secret", "generic", "rlops-alertmanager",
                         f"--from-literal=token={token}")
    receiver = real_cluster.get("service", "rlops-operator", "-n", "rlops-system")["spec"]["clusterIP"]
    services = prometheus_up(tmp_path_factory.mktemp("monitoring"), f"{rlops['ray']}:8080",
                             f"http://{receiver}:8090/api/v1/alerts", token, addr=NODE_IP,
                             prom_port=rlops["prometheus_port"])
    yield services
    prometheus_down(services["env"])
