#!/usr/bin/env python
"""Benchmark: how fast an abort reaches Ray Serve's router, written two ways.

* **REST** (what rlops does): a PUT of the router's ``user_config`` to Serve's REST API
  (``rayserve.set_weights``) of a RayCluster made from the chart's spec.
* **RayService**: a patch of a KubeRay ``RayService``'s ``spec.serveConfigV2``; KubeRay's
  operator sees the change and submits it to the same REST API itself.

Both measure from the write's start until Serve's own GET reports the new weights in the router's
``user_config`` (polled every 10 ms): Serve has taken the new config. What follows (the router's
reconfigure, some milliseconds) is the same for both paths. Both Ray clusters have the
chart's RayCluster head spec (same image, same Ray), serving the same application: a policy's
router and two versions, from TrainingRuns the cluster already has. Prints the medians and the
RayService path as a ratio to REST, measured in the same run.

Needs the cluster tier's cluster kept, with KubeRay's operator running (``hack/kuberay-up.sh``)::

    RLOPS_KEEP_TEST_CLUSTER=1 make test-cluster
    RLOPS_CLUSTER_NAME=rlops-cluster .venv/bin/python hack/bench/rayservice_abort.py --flips 20

KubeRay's operator runs on the host here and reaches the head's dashboard through the API
server's Service proxy (no cluster DNS): one hop more than in a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import kubernetes
import yaml

from rl_operator import rayserve
from rl_operator.traffic import same_split

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("RLOPS_CACHE", Path.home() / ".cache" / "rlops"))
NAME = os.environ.get("RLOPS_CLUSTER_NAME", "rlops-cluster")
KUBECTL = [str(CACHE / "bin" / "current" / "kubectl"), "--kubeconfig", str(CACHE / "clusters" / NAME / "kubeconfig")]
HELM = CACHE / "bin" / "current" / "helm"
NS = "rlops-system"


def kubectl(*args: str, input: str | None = None) -> str:
    return subprocess.run([*KUBECTL, *args], input=input, capture_output=True, text=True, check=True).stdout


def two_versions() -> tuple[str, str, dict[str, dict[str, str]]]:
    """Two Succeeded TrainingRuns of one agent: ``(namespace, agent, {run: {artifactURI, fingerprint}})``."""
    runs = json.loads(kubectl("get", "trainingruns", "-A", "-o", "json"))["items"]
    by_agent: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
    for r in runs:
        st = r.get("status") or {}
        if st.get("phase") == "Succeeded" and st.get("fingerprint"):
            key = (r["metadata"]["namespace"], r["spec"]["agentRef"]["name"])
            by_agent.setdefault(key, {})[r["metadata"]["name"]] = {"artifactURI": st["artifactURI"],
                                                                   "fingerprint": st["fingerprint"]}
    for (ns, agent), versions in sorted(by_agent.items()):
        if len(versions) >= 2:
            return ns, agent, dict(sorted(versions.items())[:2])
    raise SystemExit("no agent with two Succeeded TrainingRuns: run the cluster tier first")


def chart_head_spec() -> dict[str, Any]:
    """The chart's RayCluster spec (helm template), as the cluster tier sets it."""
    out = subprocess.run(
        [str(HELM), "template", "rlops", str(REPO / "charts" / "rlops"), "-n", NS, "--api-versions", "ray.io/v1/RayCluster",
         "--set", "ray.kuberay.enabled=true", "--set", "ray.kuberay.resources.requests.cpu=250m", "--set-json",
         'ray.kuberay.artifactsVolume={"hostPath": {"path": "/var/lib/rlops/artifacts", "type": "Directory"}}',
         "--show-only", "templates/raycluster.yaml"], capture_output=True, text=True, check=True).stdout
    return yaml.safe_load(out)["spec"]


def wait(fn: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := fn():
                return value
        except rayserve.RayServeError:
            pass
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


def weights_now(dashboard: str, app: str) -> dict[str, int] | None:
    summary = rayserve.application_summary(rayserve.get_applications(dashboard), app)
    return rayserve.application_weights(summary["config"]) if summary else None


def running(dashboard: str, app: str) -> bool:
    summary = rayserve.application_summary(rayserve.get_applications(dashboard), app)
    return bool(summary) and summary["status"] == "RUNNING"


def time_until(dashboard: str, app: str, want: dict[str, int], write: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    write()
    while True:
        try:
            if same_split(weights_now(dashboard, app), want):
                return time.perf_counter() - t0
        except rayserve.RayServeError:
            pass
        if time.perf_counter() - t0 > 120:
            raise SystemExit(f"{app}: weights {want} never seen")
        time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flips", type=int, default=20, help="weight changes per path (alternating)")
    ap.add_argument("--keep", action="store_true", help="leave the RayService and the RayCluster running")
    args = ap.parse_args()
    ns, agent, versions = two_versions()  # (the router loads artifacts from its agent's directory only)
    stable, canary = list(versions)
    splits = [{stable: 100, canary: 0}, {stable: 60, canary: 40}]
    app = rayserve.app_name(ns, agent)
    config = rayserve.app_config(ns, agent, versions, splits[1], artifact_root="file:///var/lib/rlops/artifacts")

    spec = chart_head_spec()
    # REST: a RayCluster whose Serve config we write, as the operator does
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {
        "name": "abort-rest", "namespace": NS}, "spec": spec}))
    # RayService: KubeRay makes its own RayCluster from the same head spec and submits the config
    kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "abort-bench", "namespace": NS},
        "spec": {"serveConfigV2": yaml.safe_dump({"applications": [config]}), "rayClusterConfig": spec}}))

    def service_ip(name: str) -> str:
        """The head's address behind a (headless) head Service: its endpoint."""
        names = kubectl("get", "endpoints", "-n", NS, "-o", "name").split()
        return kubectl("get", "endpoints", name, "-n", NS, "-o", "jsonpath={.subsets[0].addresses[0].ip}") \
            if f"endpoints/{name}" in names else ""

    rest = f"http://{wait(lambda: service_ip('abort-rest-head-svc'), 600, 'the RayCluster head Service')}:8265"
    wait(lambda: isinstance(rayserve.get_applications(rest), dict), 900, "the RayCluster's dashboard")
    rayserve.apply_application(rest, config)
    wait(lambda: running(rest, app), 600, "the REST application running")
    svc = f"http://{wait(lambda: service_ip('abort-bench-head-svc'), 900, 'the RayService head Service')}:8265"
    wait(lambda: running(svc, app), 900, "the RayService's application running")

    # the patch as the operator would send it: one API call from a client already connected
    api = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(KUBECTL[2]))

    def patch_rayservice(split: dict[str, int]) -> Callable[[], None]:
        cfg = rayserve.app_config(ns, agent, versions, split, artifact_root="file:///var/lib/rlops/artifacts")
        doc = {"spec": {"serveConfigV2": yaml.safe_dump({"applications": [cfg]})}}
        return lambda: api.patch_namespaced_custom_object("ray.io", "v1", NS, "rayservices", "abort-bench", doc)

    times: dict[str, list[float]] = {"REST PUT": [], "RayService": []}
    for i in range(args.flips):
        split = splits[i % 2]
        times["REST PUT"].append(time_until(rest, app, split, lambda: rayserve.set_weights(rest, app, split)))
        times["RayService"].append(time_until(svc, app, split, patch_rayservice(split)))
        time.sleep(1.0)
    base = statistics.median(times["REST PUT"])
    for path, ts in times.items():
        print(f"{path:>10}: median {statistics.median(ts) * 1000:7.0f} ms  max {max(ts) * 1000:7.0f} ms  "
              f"({statistics.median(ts) / base:.1f}x REST)  n={len(ts)}")
    if not args.keep:
        kubectl("delete", "rayservice", "abort-bench", "-n", NS, "--wait=false")
        kubectl("delete", "raycluster", "abort-rest", "-n", NS, "--wait=false")


if __name__ == "__main__":
    main()
