"""rlops in a cluster, as installed by a platform team: ``helm install``, then tenants'
``kubectl apply``; the trainers, the operator (and its webhook) and Ray Serve all run as
containers on a real kubelet node. See conftest.py for what is real here and what is not.

The tests run in file order and share one tenant namespace (``STATE``): a policy trained in
the engine image, approved through the webhook's Service, served on Ray in the cluster, then a
second version whose canary moves a step; the samples; a failing trainer; two replicas; the
chart's KubeRay RayCluster serving; then ``helm upgrade`` and ``helm uninstall``.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
import yaml

from incluster import ARTIFACTS_HOST_DIR, helm, tenant_namespace
from support import CACHE, REPO, Cluster, sample, scrape, wait_for
from rl_operator import models as m
from rl_operator import rayserve

ENGINE_IMAGE = "ghcr.io/rlops/engine:0.1.0"
STATE: dict[str, Any] = {}


def status(c: Cluster, kind: str, name: str, ns: str) -> dict[str, Any]:
    return ((c.get(kind, name, "-n", ns) or {}).get("status")) or {}


def wait_phase(c: Cluster, kind: str, name: str, ns: str, phases: tuple[str, ...], timeout: float) -> dict[str, Any]:
    st = wait_for(lambda: (s := status(c, kind, name, ns)).get("phase") in (*phases, "Failed") and s, timeout,
                  f"{kind}/{name} in {phases}", interval=2)
    assert st["phase"] in phases, f"{kind}/{name}: {st}"
    return st


def trainer_pod(c: Cluster, ns: str, run: str, evaluation: bool = False) -> dict[str, Any]:
    """The run's trainer pod (``evaluation``: the pod of the operator's evaluation Job)."""
    selector = f"{m.RUN_LABEL}={run},{m.EVALUATION_LABEL}" + ("=true" if evaluation else "!=true")
    pods = c.get("pods", "-n", ns, "-l", selector)["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def cartpole(seed: int) -> str:
    """The CartPole sample, on the CPU (the real node has no GPU), with a short canary plan."""
    doc = yaml.safe_load((REPO / "manifests" / "samples" / "cartpole.yaml").read_text())
    doc["spec"]["training"]["resources"] = {"gpu": 0, "cpu": "1", "memory": "2Gi"}
    doc["spec"]["training"]["seed"] = seed
    # maxOverrideRate 1: two policies trained from different seeds choose differently on many
    # near-upright states, more than the default limit (20%) allows; the tier-2 e2e tests the limit
    doc["spec"]["canary"] = {"steps": [{"setWeight": 20}, {"pause": {"durationSeconds": 3}}, {"setWeight": 60},
                                       {"pause": {}}, {"setWeight": 100}],
                             "analysis": {"intervalSeconds": 2, "windowSeconds": 30, "minSampleCount": 20,
                                          "maxOverrideRate": 1}}
    return yaml.safe_dump(doc)


def test_the_operator_runs_in_a_pod_read_only_and_non_root(real_cluster, rlops):
    c = real_cluster
    pods = c.get("pods", "-n", "rlops-system", "-l", "app.kubernetes.io/name=rlops-operator")["items"]
    assert len(pods) == 1
    pod = pods[0]
    assert pod["spec"]["nodeName"] == "rlops-node"
    assert pod["status"]["containerStatuses"][0]["ready"] is True
    assert pod["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")
    # a real container: exec (API server -> kubelet -> containerd) shows uid 1000 and a read-only /
    out = c.kubectl("exec", "-n", "rlops-system", pod["metadata"]["name"], "--", "python", "-c",
                    "import os\ntry:\n open('/probe', 'w')\nexcept OSError as e:\n print(os.getuid(), e.strerror)")
    assert out.stdout.split(None, 1) == ["1000", "Read-only file system\n"], out.stdout
    # the API server reaches the approval webhook through the chart's Service
    hooks = c.get("mutatingwebhookconfiguration", "rlops.dev")["webhooks"]
    services = {h["name"]: h["clientConfig"].get("service") for h in hooks}
    assert services and all(s and s["name"] == "rlops-operator" and s["namespace"] == "rlops-system"
                            for s in services.values()), services


def test_the_node_and_the_build_store_keep_one_copy_of_each_image(real_cluster):
    """Every commit builds and imports new images (the engine is 6.5 GB): hack/images.sh drops the
    earlier ones, in containerd including the kubelet's names by image id (``sha256:...``), which
    once kept every earlier engine on the disk until it filled."""
    ctr = ["ctr", "-a", "/run/rlops-node/containerd.sock", "-n", "k8s.io", "images", "ls"]
    rows = [line.split() for line in subprocess.run(ctr, check=True, capture_output=True, text=True).stdout.splitlines()[1:]]
    targets: dict[str, set[str]] = {}
    for name, _type, digest, *_ in rows:
        targets.setdefault(name.split(":")[0] if not name.startswith("sha256:") else "sha256", set()).add(digest)
    assert len(targets["ghcr.io/rlops/engine"]) == 1 and len(targets["ghcr.io/rlops/operator"]) == 1, targets
    named = set().union(*(t for repo, t in targets.items() if repo != "sha256"))
    assert targets.get("sha256", set()) <= named, f"images known only by their id: {targets['sha256'] - named}"
    buildah = ["buildah", "--root", str(CACHE / "buildah" / "storage"), "--runroot", "/run/rlops-buildah"]
    dangling = subprocess.run([*buildah, "images", "--quiet", "--filter", "dangling=true"], check=True,
                              capture_output=True, text=True).stdout.split()
    assert dangling == [], f"images that nothing holds in buildah's store: {dangling}"


def test_train_in_the_engine_image_approve_through_the_service_serve_and_canary(real_cluster, rlops, monitoring):
    c = real_cluster
    ns = STATE["ns"] = tenant_ns(c)
    t0 = time.monotonic()
    assert c.apply(cartpole(seed=1), ns).returncode == 0
    run = wait_phase(c, "trainingrun", "cartpole-1", ns, ("Succeeded",), 900)
    print(f"cartpole-1 trained in a container: {time.monotonic() - t0:.0f} s, mean return {run['metrics'].get('meanReturn')}")

    # the trainer ran in a container from the engine image; its exit code and termination message
    # come from the real kubelet, and the TrainingRun shows the summary the trainer wrote there
    pod = trainer_pod(c, ns, "cartpole-1")
    cs = pod["status"]["containerStatuses"][0]
    assert cs["image"].endswith(ENGINE_IMAGE.split("/", 1)[1]) and cs["containerID"].startswith("containerd://")
    assert cs["state"]["terminated"]["exitCode"] == 0
    summary = json.loads(cs["state"]["terminated"]["message"])
    assert (run["fingerprint"], run["artifactURI"]) == (summary["fingerprint"], summary["artifactURI"])
    assert run["metrics"] == summary["metrics"]
    assert run["artifactURI"].startswith(f"file:///var/lib/rlops/artifacts/{ns}/cartpole/cartpole-1-")
    # the trainer saw its run's directory only, made by the init container as the trainer's user
    rest = run["artifactURI"].removeprefix(f"file:///var/lib/rlops/artifacts/{ns}/")
    assert pod["spec"]["containers"][0]["volumeMounts"][0]["subPath"] == rest
    assert (ARTIFACTS_HOST_DIR / ns / rest).stat().st_uid == 1000 and (ARTIFACTS_HOST_DIR / ns / rest / "model.pt").is_file()
    logs = c.kubectl("logs", "-n", ns, pod["metadata"]["name"]).stdout
    assert "fingerprint" in logs or "return" in logs, logs[-2000:]

    # the operator measures the artifact itself, in a container of the engine image the chart
    # pins, on the artifact mounted read only; the Rollout shows those figures and that image's digest
    run = wait_for(lambda: (s := status(c, "trainingrun", "cartpole-1", ns)).get("evaluation", {}).get("phase")
                   in ("Succeeded", "Failed") and s, 600, "the operator's evaluation")
    measured = run["evaluation"]
    assert measured["phase"] == "Succeeded", measured
    evaluator = trainer_pod(c, ns, "cartpole-1", evaluation=True)
    ecs = evaluator["status"]["containerStatuses"][0]
    assert ecs["imageID"] and "sha256:" in ecs["imageID"] and ecs["containerID"].startswith("containerd://")
    assert {"name": "artifacts", "mountPath": f"/var/lib/rlops/artifacts/{ns}/{rest}", "subPath": rest,
            "readOnly": True} in evaluator["spec"]["containers"][0]["volumeMounts"]
    assert measured["imageID"] == ecs["imageID"] and measured["fingerprint"] == run["fingerprint"]
    evaluated = wait_for(lambda: (c.get("rollout", "cartpole-1", "-n", ns) or {}).get("spec", {}).get("evaluation"),
                         120, "the Rollout")
    assert evaluated["evaluatorImageID"] == ecs["imageID"] and evaluated["meanReturn"] == measured["meanReturn"]
    assert evaluated["trusted"] is True and evaluated["reportedMeanReturn"] == run["metrics"]["meanReturn"]
    print(f"cartpole-1 measured by the operator in {ecs['imageID']}: mean return {measured['meanReturn']} "
          f"(the trainer reported {run['metrics']['meanReturn']})")

    # approval: the API server calls the webhook through the Service; it records who approved
    STATE["approve"] = approve(c, ns, "cartpole-1")
    ro = c.get("rollout", "cartpole-1", "-n", ns)["metadata"]["annotations"]
    assert ro["rlops.dev/approved-by"] == "kwok-admin" and ro["rlops.dev/approval-signature"].startswith("v2:")
    wait_phase(c, "rollout", "cartpole-1", ns, ("Promoted",), 300)
    serve = f"http://{rlops['ray']}:8000/{ns}/cartpole"
    answer = wait_for(lambda: answered(serve), 120, "the policy answering on Ray Serve in the cluster")
    assert answer["version"] == "cartpole-1" and answer["action"] in (0, 1)

    # a second version: under client load, its canary passes the analysis (Prometheus scraping
    # Ray in the cluster) and moves from 20% to 60% on Ray Serve in the cluster
    t0 = time.monotonic()
    assert c.apply(cartpole(seed=2), ns).returncode == 0
    wait_phase(c, "trainingrun", "cartpole-2", ns, ("Succeeded",), 900)
    wait_phase(c, "rollout", "cartpole-2", ns, ("AwaitingApproval",), 120)
    with Load(serve) as load:
        approve(c, ns, "cartpole-2")
        wait_for(lambda: status(c, "rollout", "cartpole-2", ns).get("canaryWeight") == 20, 300, "canary at 20%")
        # 20% passes its analysis, waits out the 3 s pause, moves to 60%, passes again, then pauses
        # until promoted
        st = wait_for(lambda: (s := status(c, "rollout", "cartpole-2", ns)).get("canaryWeight") == 60
                      and s["phase"] == "Paused" and s, 300, "canary step to 60%, then paused", interval=2)
    assert st["stableVersion"] == "cartpole-1", st
    assert st["analysis"]["phase"] == "Successful", st["analysis"]
    assert load.failed == 0, f"{load.failed} of {load.sent} client requests failed during the canary"
    weights = rayserve.application_weights(rayserve.application_summary(
        rayserve.get_applications(f"http://{rlops['ray']}:8265"), rayserve.app_name(ns, "cartpole"))["config"])
    assert weights == {"cartpole-1": 40, "cartpole-2": 60}, weights
    versions = {answered(serve)["version"] for _ in range(40)}
    assert versions == {"cartpole-1", "cartpole-2"}, versions
    # the operator's own metrics, through its Service's metrics port (what Prometheus scrapes)
    svc = c.get("service", "rlops-operator", "-n", "rlops-system")
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "metrics")
    scraped = scrape(f"http://{svc['spec']['clusterIP']}:{port}/metrics")
    assert sample(scraped, "rlops_rollout_canary_weight_percent", namespace=ns, rollout="cartpole-2") == 60
    assert sample(scraped, "rlops_rollout_phase", namespace=ns, rollout="cartpole-2", phase="Paused") == 1
    assert sample(scraped, "rlops_analysis_runs_total", namespace=ns, result="Successful") >= 2
    assert sample(scraped, "rlops_training_runs_finished_total", namespace=ns, phase="Succeeded") == 2
    assert sample(scraped, "rlops_admission_reviews_total", result="allowed") >= 2
    print(f"second version trained, approved and at 60%: {time.monotonic() - t0:.0f} s")


def test_every_cpu_sample_trains_on_the_real_node(real_cluster, rlops):
    """The samples that ask for no GPU, applied unchanged (CartPole asks for one: it ran above on
    the CPU, the real node having no GPU)."""
    c = real_cluster
    ns = tenant_ns(c)
    runs = {}
    for sample in sorted((REPO / "manifests" / "samples").glob("*.yaml")):
        doc = yaml.safe_load(sample.read_text())
        if doc["spec"].get("training", {}).get("resources", {}).get("gpu", 1) != 0:
            continue
        assert c.kubectl("apply", "-n", ns, "-f", str(sample)).returncode == 0
        runs[sample.name] = f"{doc['metadata']['name']}-1"
    assert set(runs) == {"gate-dqn.yaml", "router-ppo.yaml"}
    for sample, run in runs.items():
        t0 = time.monotonic()
        st = wait_phase(c, "trainingrun", run, ns, ("Succeeded",), 1200)
        print(f"{sample}: {run} Succeeded ({time.monotonic() - t0:.0f} s after the previous one), metrics {st['metrics']}")


def test_a_failing_trainer_reports_its_exit_code_and_logs(real_cluster, rlops):
    """A trainer that crashes (a keyword the environment does not take): the run fails with the
    exit code and the log tail that the kubelet put in the pod's termination message."""
    c = real_cluster
    ns = STATE["ns"]
    doc = yaml.safe_load(cartpole(seed=3))
    doc["metadata"]["name"] = "broken"
    doc["spec"]["environment"]["kwargs"] = {"no_such_option": 1}
    doc["spec"]["training"]["backoffLimit"] = 0
    assert c.apply(yaml.safe_dump(doc), ns).returncode == 0
    st = wait_for(lambda: (s := status(c, "trainingrun", "broken-1", ns)).get("phase") in ("Failed", "Succeeded") and s,
                  600, "broken-1 finished", interval=2)
    assert st["phase"] == "Failed", st
    terminated = trainer_pod(c, ns, "broken-1")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] != 0
    assert st["failureMessage"].startswith(f"trainer exited with code {terminated['exitCode']}: ") or \
        st["failureReason"] not in ("", "BackoffLimitExceeded"), st
    assert "no_such_option" in st["failureMessage"], st["failureMessage"]


def operator_pods(c: Cluster) -> list[dict[str, Any]]:
    return c.get("pods", "-n", "rlops-system", "-l", "app.kubernetes.io/name=rlops-operator")["items"]


def test_two_replicas_one_works_and_the_standby_takes_over_from_a_sigkill(real_cluster, rlops):
    """Two replicas (kopf peering): one works, the other stands by. The working one is killed
    with SIGKILL while a run trains: a replica takes over and finishes it, with one Job. (Which
    one: the kubelet restarts the killed container at once, with a new random priority; when it
    is lower, the standby resumes, else the restarted one works and the standby waits on.)"""
    c = real_cluster
    ns = STATE["ns"]
    helm(c, "upgrade", "rlops", str(REPO / "charts" / "rlops"), "-n", "rlops-system", *rlops["values"],
         "--set", "replicas=2", "--wait", "--timeout", "5m")
    pods = wait_for(lambda: (p := operator_pods(c)) and len(p) == 2
                    and all(x["status"].get("containerStatuses", [{}])[0].get("ready") for x in p) and p,
                    300, "two ready operator replicas")
    names = {p["metadata"]["name"] for p in pods}
    peers = wait_for(lambda: (s := (c.get("clusterkopfpeering", "rlops") or {}).get("status") or {})
                     and names <= set(s) and s, 120, "both replicas in the peering object")
    active = max(names, key=lambda n: peers[n]["priority"])
    standby = (names - {active}).pop()

    doc = yaml.safe_load(cartpole(seed=5))
    doc["metadata"]["name"] = "failover"
    assert c.apply(yaml.safe_dump(doc), ns).returncode == 0
    wait_for(lambda: c.get("job", "failover-1", "-n", ns), 120, "the run's Job")
    pod = next(p for p in pods if p["metadata"]["name"] == active)
    container = pod["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    def resumed() -> int:
        return c.kubectl("logs", "-n", "rlops-system", standby).stdout.count("Resuming operations")

    # the operator's own loop (the resync of unfinished runs) stands by with kopf's handlers
    wait_for(lambda: "resync of unfinished TrainingRuns: standing by" in
             c.kubectl("logs", "-n", "rlops-system", standby).stdout, 60, "the standby's resync standing by")
    resumed_before = resumed()  # (a replica may have resumed earlier in its life, at a handover)
    t_kill = time.monotonic()
    subprocess.run(["ctr", "-a", "/run/rlops-node/containerd.sock", "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL",
                    container], check=True, timeout=30)


    def who_works() -> str | None:
        """The replica working again after the kill: the standby (it resumed), or the killed one
        restarted by the kubelet with a new, higher priority (then the standby keeps waiting)."""
        if resumed() > resumed_before:
            return standby
        killed = c.get("pod", active, "-n", "rlops-system") or {"status": {}}
        restarted = any(s.get("restartCount", 0) >= 1 and s.get("ready") for s in killed["status"].get("containerStatuses", []))
        peers = (c.get("clusterkopfpeering", "rlops") or {}).get("status") or {}
        if restarted and active in peers and standby in peers and peers[active]["priority"] > peers[standby]["priority"]:
            return active
        return None

    worker = wait_for(who_works, 120, "a replica working again")
    takeover = time.monotonic() - t_kill
    st = wait_phase(c, "trainingrun", "failover-1", ns, ("Succeeded",), 600)
    jobs = c.get("jobs", "-n", ns, "-l", f"{m.RUN_LABEL}=failover-1")["items"]
    # one trainer Job, and the operator's one evaluation Job
    assert sorted(j["metadata"]["labels"].get(m.EVALUATION_LABEL, "trainer") for j in jobs) == ["trainer", "true"], \
        [j["metadata"]["name"] for j in jobs]
    wait_phase(c, "rollout", "failover-1", ns, ("AwaitingApproval",), 120)
    rollouts = [r for r in c.get("rollouts", "-n", ns)["items"] if r["spec"]["agentRef"]["name"] == "failover"]
    assert len(rollouts) == 1
    print(f"SIGKILL of the working replica -> {'the standby' if worker == standby else 'the restarted replica'} "
          f"working after {takeover:.1f} s; run {st['phase']}, one Job")


KUBERAY_HEAD = "rlops-ray-head-svc.rlops-system.svc"  # the chart's RayCluster rlops-ray: its head Service


def test_kuberay_makes_the_ray_cluster_and_rlops_serves_on_it(real_cluster, rlops):
    """KubeRay's operator (built from its Go module, a local process) makes the chart's RayCluster
    (ray.kuberay.enabled): its head runs on the real node from the engine image. The operator,
    pointed at it, restores the canary in flight (its application was on the other Ray cluster)
    at the same weights, and a new agent's policy is trained, approved and served there."""
    c = real_cluster
    subprocess.run(["bash", str(REPO / "hack" / "kuberay-up.sh")], env=c.env, check=True, timeout=1200)
    values = [*rlops["values"], "--set", "ray.kuberay.enabled=true", "--set", "ray.kuberay.resources.requests.cpu=250m",
              "--set-json", 'ray.kuberay.artifactsVolume={"hostPath": {"path": "/var/lib/rlops/artifacts", '
                            '"type": "Directory"}}']
    t0 = time.monotonic()
    helm(c, "upgrade", "rlops", str(REPO / "charts" / "rlops"), "-n", "rlops-system", *values, "--wait",
         "--timeout", "5m")
    head = wait_for(lambda: (p := c.get("pods", "-n", "rlops-system", "-l", "ray.io/cluster=rlops-ray,ray.io/node-type=head")
                             ["items"]) and p[0]["status"].get("containerStatuses", [{}])[0].get("ready") and p[0],
                    600, "KubeRay's head pod ready")
    print(f"RayCluster head ready {time.monotonic() - t0:.0f} s after helm upgrade")
    assert head["metadata"]["ownerReferences"][0]["kind"] == "RayCluster"
    assert head["spec"]["containers"][0]["image"] == ENGINE_IMAGE and head["spec"]["nodeName"] == "rlops-node"
    assert head["spec"]["securityContext"]["runAsUser"] == 1000
    # KubeRay's head Service is headless: its name resolves to the head pod's IP. There is no
    # cluster DNS on this machine, so the operator pod gets that through the chart's hostAliases.
    assert c.get("service", "rlops-ray-head-svc", "-n", "rlops-system")["spec"]["clusterIP"] == "None"
    ip = head["status"]["podIP"]
    helm(c, "upgrade", "rlops", str(REPO / "charts" / "rlops"), "-n", "rlops-system", *values,
         "--set-json", f'hostAliases=[{{"ip": "{ip}", "hostnames": ["{KUBERAY_HEAD}"]}}]', "--wait", "--timeout", "5m")
    pod = wait_for(lambda: (p := operator_pods(c)) and len(p) == 1 and p[0]["spec"].get("hostAliases")
                   and p[0]["status"].get("containerStatuses", [{}])[0].get("ready") and p[0], 300,
                   "the operator pod pointed at KubeRay's cluster")
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["RLOPS_RAY_DASHBOARD_URL"] == f"http://{KUBERAY_HEAD}:8265"

    # the canary in flight (cartpole-2, paused at 60%) is restored on the new cluster at its weights
    dashboard = f"http://{ip}:8265"
    app = rayserve.app_name(STATE["ns"], "cartpole")

    def restored() -> dict[str, int] | None:
        try:
            details = rayserve.get_applications(dashboard)
        except rayserve.RayServeError:
            return None  # the dashboard still starting
        summary = rayserve.application_summary(details, app)
        return summary and summary.get("status") == "RUNNING" and rayserve.application_weights(summary["config"])

    weights = wait_for(restored, 600, "the in-flight canary restored on KubeRay's cluster")
    assert weights == {"cartpole-1": 40, "cartpole-2": 60}, weights

    # a new agent: trained, approved, served on KubeRay's cluster
    ns = tenant_ns(c)
    doc = yaml.safe_load(cartpole(seed=7))
    assert c.apply(yaml.safe_dump(doc), ns).returncode == 0
    wait_phase(c, "trainingrun", "cartpole-1", ns, ("Succeeded",), 900)
    wait_phase(c, "rollout", "cartpole-1", ns, ("AwaitingApproval",), 120)
    approve(c, ns, "cartpole-1")
    wait_phase(c, "rollout", "cartpole-1", ns, ("Promoted",), 600)
    answer = wait_for(lambda: answered(f"http://{ip}:8000/{ns}/cartpole"), 120, "the policy answering on KubeRay's cluster")
    assert answer["version"] == "cartpole-1" and answer["action"] in (0, 1)
    ray_status = c.get("raycluster", "rlops-ray", "-n", "rlops-system")["status"]
    conditions = {x["type"]: x["status"] for x in ray_status.get("conditions", [])}
    assert conditions.get("HeadPodReady") == "True", ray_status


def snooping_pod(name: str, volume: dict[str, Any], script: str) -> str:
    """A pod that Pod Security ``restricted`` admits (non-root, no privilege), of the engine
    image, with ``volume`` at /data, running ``script``."""
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never",
                 "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [{"name": "snoop", "image": ENGINE_IMAGE, "command": ["sh", "-c", script],
                                 "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                                 "volumeMounts": [{"name": "store", "mountPath": "/data"}]}],
                 "volumes": [{"name": "store", **volume}]}})


def test_a_tenant_reaches_no_other_tenants_artifacts(real_cluster, rlops):
    """An ``edit`` user of one tenant namespace tries every way to the artifact store that the
    API gives them: the host's directory, the other tenant's volume, a subPath out of their own,
    and their own claim mounted whole. None reaches the other tenant's files; their own are
    reachable (so the last attempt could have done harm)."""
    c = real_cluster
    a, b = tenant_ns(c), tenant_ns(c)
    theirs = ARTIFACTS_HOST_DIR / b / "cartpole" / "cartpole-1-0000beef"
    theirs.mkdir(parents=True)
    (theirs / "model.pt").write_bytes(b"tenant b's weights")
    (ARTIFACTS_HOST_DIR / a / "mine.txt").write_bytes(b"tenant a's file")
    for path in (theirs.parent, theirs, theirs / "model.pt", ARTIFACTS_HOST_DIR / a / "mine.txt"):
        os.chown(path, 1000, 1000)  # as a trainer of uid 1000 leaves them, the snooper's uid
    c.kubectl("create", "rolebinding", "mallory-edit", "--clusterrole=edit", "--user=mallory", "-n", a)

    def as_mallory(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return c.kubectl(*args, "-n", a, "--as=mallory", check=False, input=input)

    # the host's directory: Pod Security refuses hostPath volumes
    out = as_mallory("apply", "-f", "-", input=snooping_pod(
        "by-host", {"hostPath": {"path": str(ARTIFACTS_HOST_DIR)}}, "ls -R /data"))
    assert out.returncode != 0 and "hostPath" in out.stderr, out.stdout + out.stderr
    # tenant b's volume through a claim of a's own: the volume is reserved for b's claim, never bound
    out = as_mallory("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "theirs"},
        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "rlops-hostpath",
                 "resources": {"requests": {"storage": "1Gi"}}, "volumeName": f"rlops-artifacts-{b}"}}))
    assert out.returncode == 0, out.stderr
    # out of a's own claim by a subPath: refused by the API's validation
    escape = yaml.safe_load(snooping_pod("by-subpath", {"persistentVolumeClaim": {"claimName": "rlops-artifacts"}},
                                         "ls -R /data"))
    escape["spec"]["containers"][0]["volumeMounts"][0]["subPath"] = f"../{b}"
    out = as_mallory("apply", "-f", "-", input=yaml.safe_dump(escape))
    assert out.returncode != 0 and "'..'" in out.stderr, out.stdout + out.stderr
    # a's own claim, mounted whole: list it, read b's weights by every path, delete what can be deleted
    script = (f"ls -laR /data; cat /data/{b}/cartpole/*/model.pt /data/../{b}/cartpole/*/model.pt; "
              "find /data -mindepth 1 -delete; echo listed-after; ls -laR /data")
    out = as_mallory("apply", "-f", "-", input=snooping_pod(
        "by-claim", {"persistentVolumeClaim": {"claimName": "rlops-artifacts"}}, script))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: (c.get("pod", "by-claim", "-n", a) or {}).get("status", {}).get("phase") in ("Succeeded", "Failed"),
             180, "the snooping pod ran")
    logs = c.kubectl("logs", "-n", a, "by-claim").stdout
    assert "mine.txt" in logs.split("listed-after")[0], logs  # its own volume was there to read
    assert "mine.txt" not in logs.split("listed-after")[1] and not (ARTIFACTS_HOST_DIR / a / "mine.txt").exists()
    assert "weights" not in logs and b not in logs.replace(f"/data/{b}/", "").replace(f"/data/../{b}/", ""), logs
    assert (theirs / "model.pt").read_bytes() == b"tenant b's weights"
    assert c.get("pvc", "theirs", "-n", a)["status"]["phase"] == "Pending"
    assert c.get("pv", f"rlops-artifacts-{b}")["spec"]["claimRef"]["namespace"] == b
    print(f"tenant {a} reached none of tenant {b}'s artifacts: hostPath refused, volume not bound, subPath refused, "
          "its own claim holds its own files only")


def test_helm_upgrade_keeps_the_webhook_and_uninstall_leaves_nothing_blocking(real_cluster, rlops):
    c = real_cluster
    ns = STATE["ns"]
    old = {p["metadata"]["uid"] for p in operator_pods(c)}
    ca_before = c.get("mutatingwebhookconfiguration", "rlops.dev")["webhooks"][0]["clientConfig"]["caBundle"]
    assert c.get("secret", "rlops-webhook-tls", "-n", "rlops-system")["type"] == "kubernetes.io/tls"
    helm(c, "upgrade", "rlops", str(REPO / "charts" / "rlops"), "-n", "rlops-system", *rlops["values"],
         "--set", "resources.requests.cpu=150m", "--wait", "--timeout", "5m")
    new = wait_for(lambda: (p := operator_pods(c)) and len(p) == 1 and p[0]["metadata"]["uid"] not in old
                   and p[0]["status"].get("containerStatuses", [{}])[0].get("ready") and p, 300, "the upgraded pod")
    assert new[0]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "150m"
    # the new pod serves the certificate in the shared Secret: the CA bundle did not change
    ca_after = c.get("mutatingwebhookconfiguration", "rlops.dev")["webhooks"][0]["clientConfig"]["caBundle"]
    assert ca_after == ca_before
    # the new pod's webhook answers through the Service: a wrong fingerprint is refused by it
    bad = c.kubectl("annotate", "rollout", "cartpole-2", "-n", ns, "--overwrite",
                    "rlops.dev/approve=sha256:" + "0" * 64, check=False)
    assert bad.returncode != 0 and "fingerprint" in bad.stderr, bad.stderr

    helm(c, "uninstall", "rlops", "-n", "rlops-system", "--wait", "--timeout", "5m")
    names = {h["metadata"]["name"] for kind in ("mutatingwebhookconfigurations", "validatingwebhookconfigurations")
             for h in c.get(kind)["items"]}
    assert not {n for n in names if "rlops" in n}, names
    # nothing left to block the API: a Rollout write goes through with no operator running
    c.kubectl("annotate", "rollout", "cartpole-2", "-n", ns, "--overwrite", "note=after-uninstall")
    assert c.get("crd", "rlagents.rlops.dev") is not None  # Helm keeps CRDs (and so the tenants' objects)


def tenant_ns(c: Cluster) -> str:
    return tenant_namespace(c, f"t-{uuid.uuid4().hex[:6]}")


def approve(c: Cluster, ns: str, rollout: str) -> str:
    fp = c.get("rollout", rollout, "-n", ns)["spec"]["fingerprint"]
    c.kubectl("annotate", "rollout", rollout, "-n", ns, f"rlops.dev/approve={fp}")
    return fp


class Load:
    """One client thread posting observations to the agent's route until the block ends."""

    def __init__(self, url: str):
        self.url, self.sent, self.failed = url, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sent += 1
            self.failed += answered(self.url) is None
            time.sleep(0.1)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def answered(url: str) -> dict[str, Any] | None:
    try:
        resp = httpx.post(url, json={"observation": [0.01, -0.02, 0.03, 0.01]}, timeout=10)
    except httpx.HTTPError:
        return None
    return resp.json() if resp.status_code == 200 else None
